//! The REST API under `/v1`, described by `/v1/openapi.json`: an OpenAPI 3.1 document generated
//! from the handlers' `#[utoipa::path]` annotations and the request and response types (each
//! capability's `types.rs`). The router and the document are made from one list ([`routes`]).
//!
//! Authentication is a session token from `POST /v1/sessions`, sent as
//! `Authorization: Bearer mcs_...`. Lists take `?limit=&cursor=` and answer
//! `{"items": [...], "next_cursor": ...}`. `POST /v1/realms` and `POST /v1/realms/{realm}/keys`
//! honour an `Idempotency-Key` header (24 h).
//!
//! The handlers live with their capability (`identity/routes.rs`, `realms/routes/`,
//! `billing/routes.rs`); this file holds the route list, the router, the extractors (body,
//! query, remote address, bearer, actor, idempotency key, path parameters) and the document's
//! frame (info, security schemes, the error shape). Route files start with `use crate::http::*;`.

#[allow(unused_imports)]
use crate::{billing::routes::*, hub::routes::*, identity::routes::*, realms::routes::*};

pub(crate) use std::net::SocketAddr;
pub(crate) use std::sync::Arc;

pub(crate) use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
};
pub(crate) use axum::http::request::Parts;
pub(crate) use axum::http::{header, HeaderMap, StatusCode};
pub(crate) use axum::response::{IntoResponse, Response};
pub(crate) use axum::{Json, Router};
pub(crate) use serde::de::DeserializeOwned;
pub(crate) use serde::{Deserialize, Serialize};
pub(crate) use utoipa_axum::{router::OpenApiRouter, routes};

pub(crate) use crate::error::{ApiError, ApiResult};
pub(crate) use crate::service::{Actor, Idempotency, List, Page, Registry};

/// The error every route may answer with: `{"error": {"code", "message"}}`, its status saying
/// who must act (see [`ApiError`]).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema, utoipa::ToResponse)]
#[response(
    description = "An error: `code` is stable (`forbidden`, `realm_taken`...), `message` says what to do."
)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The document's frame; the paths come from the handlers' `#[utoipa::path]` through
/// [`routes`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Macula registry",
        version = "1",
        description = "Accounts, realm registry, members, roles, API keys, audit log, usage, plans and invoices. \
Errors are `{\"error\": {\"code\", \"message\"}}`: 401 not logged in, 403 not allowed, 404 no such thing, \
409 conflicts with the current state, 413 body too large, 422 invalid input, 429 slow down (Retry-After).",
        license(name = "MIT")
    ),
    components(schemas(ErrorBody), responses(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "identity", description = "Accounts, sessions, email ownership."),
        (name = "realms", description = "The realm registry, members and policies."),
        (name = "keys", description = "API keys and the audit log."),
        (name = "operators", description = "Platform operators' tools."),
        (name = "billing", description = "Plans, usage, add-ons, invoices."),
        (name = "hub", description = "Packages: publishers and their keys, publishing, yank and revoke, search, the TUF root of trust."),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A session token (mcs_...) from POST /v1/sessions."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "realm_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The realm's admin API key (sk_live_...): reads its usage.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every route with its documentation: the router and the OpenAPI document are both made from
/// this one list, so neither can have a route the other lacks.
fn routes() -> OpenApiRouter<Arc<Registry>> {
    OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(signup))
        .routes(routes!(whoami))
        .routes(routes!(verify_email))
        .routes(routes!(resend_verification))
        .routes(routes!(change_email))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(list_realms, register))
        .routes(routes!(show_realm, delete_realm))
        .routes(routes!(renew))
        .routes(routes!(transfer_code))
        .routes(routes!(transfer))
        .routes(routes!(members, set_member))
        .routes(routes!(remove_member))
        .routes(routes!(policy, set_policy))
        .routes(routes!(policy_versions))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
        .routes(routes!(all_keys))
        .routes(routes!(revoke_any_key))
        .routes(routes!(realm_audit))
        .routes(routes!(my_audit))
        .routes(routes!(claims, add_claim))
        .routes(routes!(freeze))
        .routes(routes!(unfreeze))
        .routes(routes!(suspend))
        .routes(routes!(unsuspend))
        .routes(routes!(force_transfer))
        .routes(routes!(plans))
        .routes(routes!(usage))
        .routes(routes!(usage_month))
        .routes(routes!(set_plan))
        .routes(routes!(set_addon))
        .routes(routes!(invoices))
        .routes(routes!(invoice))
        .routes(routes!(pay_invoice))
        .routes(routes!(run_invoices))
        .routes(routes!(void_invoice))
        .routes(routes!(create_publisher))
        .routes(routes!(show_publisher))
        .routes(routes!(approve_publisher))
        .routes(routes!(add_publisher_key))
        .routes(routes!(revoke_publisher_key))
        .routes(routes!(publisher_role))
        .routes(routes!(publish))
        .routes(routes!(put_blob, get_blob))
        .routes(routes!(search_packages))
        .routes(routes!(package_info))
        .routes(routes!(mark_release))
        .routes(routes!(hub_trust))
        .routes(routes!(bundle_metadata))
        .routes(routes!(openapi_json))
}

pub(crate) type Reg = State<Arc<Registry>>;

/// The realm a route is about (the documentation of the `{realm}` path parameter).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct RealmParam {
    /// Reverse-DNS realm name, e.g. `com.acme.shop`.
    #[allow(dead_code)]
    pub(crate) realm: String,
}

/// The registry's routes, to be merged into the node's router. Bodies above `body_limit` get 413.
pub fn router(reg: Arc<Registry>, body_limit: usize) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .route("/v1/hub/tuf/{*path}", axum::routing::get(tuf_file))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(reg)
}

/// The OpenAPI 3.1 document of the API, as served at `/v1/openapi.json`.
pub fn openapi() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let (_, doc) = routes().split_for_parts();
        doc.to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    })
}

/// This document: the API in OpenAPI 3.1.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "identity",
    responses((status = 200, description = "The OpenAPI document.", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi()).into_response()
}

/// A JSON body whose rejections use the API's error shape.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Body(Json::<T>::from_request(req, state).await?.0))
    }
}

/// Query parameters whose rejections use the API's error shape.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Ok(Q(Query::<T>::from_request_parts(parts, state).await?.0))
    }
}

/// The client's address: the connection's peer, or, when that peer is one of
/// `registry.trusted_proxies`, the last address a trusted proxy added to `X-Forwarded-For`
/// (addresses a client wrote into the header itself are never believed).
pub(crate) fn client_ip(parts: &Parts, trusted: &[std::net::IpAddr]) -> Option<std::net::IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical())?;
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<std::net::IpAddr> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    // From the right: skip our own proxies; the first other address is the client.
    Some(
        forwarded
            .iter()
            .rev()
            .find(|ip| !trusted.contains(ip))
            .copied()
            .unwrap_or(peer),
    )
}

pub(crate) fn remote_of(parts: &Parts, reg: &Registry) -> String {
    client_ip(parts, &reg.config.trusted_proxies)
        .map(|ip| ip.to_string())
        .unwrap_or_default()
}

/// Where the request came from (for the audit log and login rate limits).
pub struct Remote(pub String, pub Option<std::net::IpAddr>);

impl FromRequestParts<Arc<Registry>> for Remote {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, reg: &Arc<Registry>) -> Result<Self, ApiError> {
        let ip = client_ip(parts, &reg.config.trusted_proxies);
        Ok(Remote(ip.map(|i| i.to_string()).unwrap_or_default(), ip))
    }
}

/// A body that may be absent (empty): `None`, else JSON of `T`.
pub(crate) fn optional_body<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<Option<T>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| ApiError::invalid("invalid_body", format!("the body is not valid: {e}")))
}

pub(crate) fn bearer(headers: &HeaderMap) -> ApiResult<&str> {
    let v = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "log in first: send Authorization: Bearer <session token> (macula login)",
            )
        })?;
    let token = v
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| t.starts_with("mcs_"))
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer mcs_...`, a session token from POST /v1/sessions (API keys authorize WAMP sessions, not the registry)"))?;
    Ok(token)
}

impl FromRequestParts<Arc<Registry>> for Actor {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, reg: &Arc<Registry>) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        reg.authenticate(token, remote_of(parts, reg)).await
    }
}

pub(crate) fn idempotency(
    headers: &HeaderMap,
    request: &impl serde::Serialize,
) -> ApiResult<Option<Idempotency>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let k = v.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    "Idempotency-Key must be visible ASCII",
                )
            })?;
            Idempotency::new(k, request).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(peer: &str, forwarded: &[&str]) -> Parts {
        let mut b = axum::http::Request::builder()
            .extension(ConnectInfo::<SocketAddr>(peer.parse().unwrap()));
        for f in forwarded {
            b = b.header("x-forwarded-for", *f);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn forwarded_addresses_count_only_through_trusted_proxies() {
        let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        // No trusted proxy: the header is the client's own word, ignored.
        assert_eq!(
            client_ip(&parts("10.0.0.1:5", &["198.51.100.7"]), &[]),
            ip("10.0.0.1")
        );
        // From a trusted proxy: the last address it added; what the client wrote before is not
        // believed, and a chain of our own proxies is skipped.
        assert_eq!(
            client_ip(&parts("10.0.0.1:5", &["6.6.6.6, 198.51.100.7"]), &[proxy]),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(
                &parts("10.0.0.1:5", &["198.51.100.7", "10.0.0.1"]),
                &[proxy]
            ),
            ip("198.51.100.7")
        );
        // A peer that is not a trusted proxy cannot pose as one.
        assert_eq!(
            client_ip(&parts("203.0.113.1:5", &["198.51.100.7"]), &[proxy]),
            ip("203.0.113.1")
        );
        // IPv4-mapped peers are the same address.
        assert_eq!(
            client_ip(&parts("[::ffff:10.0.0.1]:5", &["198.51.100.7"]), &[proxy]),
            ip("198.51.100.7")
        );
    }
}
