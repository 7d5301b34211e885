//! The REST API under `/v1`, described by `/v1/openapi.json` (the document in `openapi.json`;
//! a test checks that every route here is in it and nothing else is).
//!
//! Authentication is a session token from `POST /v1/sessions`, sent as
//! `Authorization: Bearer mcs_...`. Lists take `?limit=&cursor=` and answer
//! `{"items": [...], "next_cursor": ...}`. `POST /v1/realms` and `POST /v1/realms/{realm}/keys`
//! honour an `Idempotency-Key` header (24 h).
//!
//! The handlers live with their capability (`identity/routes.rs`, `realms/routes/`,
//! `billing/routes.rs`); this file holds the route list, the router, the extractors (body,
//! query, remote address, bearer, actor, idempotency key) and the OpenAPI document. Route files
//! start with `use crate::http::*;`.

#[allow(unused_imports)]
use crate::{billing::routes::*, identity::routes::*, realms::routes::*};

pub(crate) use std::net::SocketAddr;
pub(crate) use std::sync::Arc;

pub(crate) use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
};
pub(crate) use axum::http::request::Parts;
pub(crate) use axum::http::{header, HeaderMap, StatusCode};
pub(crate) use axum::response::{IntoResponse, Response};
pub(crate) use axum::routing::{get, post};
pub(crate) use axum::{Json, Router};
pub(crate) use serde::de::DeserializeOwned;
pub(crate) use serde::Deserialize;
pub(crate) use serde_json::Value;

pub(crate) use crate::error::{ApiError, ApiResult};
pub(crate) use crate::realms::{NewKey, NewRealm, PolicyUpdate};
pub(crate) use crate::service::{Actor, Idempotency, Page, Registry};

/// The OpenAPI 3.1 document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every route: (method, path). The router below and the OpenAPI test both read this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/accounts"),
    ("get", "/v1/account"),
    ("post", "/v1/account/verify"),
    ("post", "/v1/account/verification"),
    ("put", "/v1/account/email"),
    ("post", "/v1/sessions"),
    ("delete", "/v1/sessions/current"),
    ("get", "/v1/realms"),
    ("post", "/v1/realms"),
    ("get", "/v1/realms/{realm}"),
    ("delete", "/v1/realms/{realm}"),
    ("post", "/v1/realms/{realm}/renew"),
    ("post", "/v1/realms/{realm}/transfer-code"),
    ("post", "/v1/realms/{realm}/transfer"),
    ("get", "/v1/realms/{realm}/members"),
    ("post", "/v1/realms/{realm}/members"),
    ("delete", "/v1/realms/{realm}/members/{email}"),
    ("get", "/v1/realms/{realm}/policy"),
    ("put", "/v1/realms/{realm}/policy"),
    ("get", "/v1/realms/{realm}/policy/versions"),
    ("get", "/v1/realms/{realm}/keys"),
    ("post", "/v1/realms/{realm}/keys"),
    ("delete", "/v1/realms/{realm}/keys/{key_id}"),
    ("get", "/v1/keys"),
    ("delete", "/v1/keys/{key_id}"),
    ("get", "/v1/realms/{realm}/audit"),
    ("get", "/v1/audit"),
    ("get", "/v1/admin/realms/{realm}/claims"),
    ("post", "/v1/admin/realms/{realm}/claims"),
    ("post", "/v1/admin/realms/{realm}/freeze"),
    ("post", "/v1/admin/realms/{realm}/unfreeze"),
    ("post", "/v1/admin/realms/{realm}/suspend"),
    ("post", "/v1/admin/realms/{realm}/unsuspend"),
    ("post", "/v1/admin/realms/{realm}/transfer"),
    ("get", "/v1/plans"),
    ("get", "/v1/realms/{realm}/usage"),
    ("get", "/v1/realms/{realm}/usage/{month}"),
    ("post", "/v1/realms/{realm}/plan"),
    ("post", "/v1/realms/{realm}/addons"),
    ("get", "/v1/invoices"),
    ("get", "/v1/invoices/{invoice}"),
    ("post", "/v1/invoices/{invoice}/pay"),
    ("post", "/v1/admin/invoices/run"),
    ("post", "/v1/admin/invoices/{invoice}/void"),
    ("get", "/v1/openapi.json"),
];

pub(crate) type Reg = State<Arc<Registry>>;

/// The registry's routes, to be merged into the node's router. Bodies above `body_limit` get 413.
pub fn router(reg: Arc<Registry>, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/accounts", post(signup))
        .route("/v1/account", get(whoami))
        .route("/v1/account/verify", post(verify_email))
        .route("/v1/account/verification", post(resend_verification))
        .route("/v1/account/email", axum::routing::put(change_email))
        .route("/v1/sessions", post(login))
        .route("/v1/sessions/current", axum::routing::delete(logout))
        .route("/v1/realms", get(list_realms).post(register))
        .route("/v1/realms/{realm}", get(show_realm).delete(delete_realm))
        .route("/v1/realms/{realm}/renew", post(renew))
        .route("/v1/realms/{realm}/transfer-code", post(transfer_code))
        .route("/v1/realms/{realm}/transfer", post(transfer))
        .route("/v1/realms/{realm}/members", get(members).post(set_member))
        .route(
            "/v1/realms/{realm}/members/{email}",
            axum::routing::delete(remove_member),
        )
        .route("/v1/realms/{realm}/policy", get(policy).put(set_policy))
        .route("/v1/realms/{realm}/policy/versions", get(policy_versions))
        .route("/v1/realms/{realm}/keys", get(list_keys).post(create_key))
        .route(
            "/v1/realms/{realm}/keys/{key_id}",
            axum::routing::delete(revoke_key),
        )
        .route("/v1/keys", get(all_keys))
        .route("/v1/keys/{key_id}", axum::routing::delete(revoke_any_key))
        .route("/v1/realms/{realm}/audit", get(realm_audit))
        .route("/v1/audit", get(my_audit))
        .route(
            "/v1/admin/realms/{realm}/claims",
            get(claims).post(add_claim),
        )
        .route("/v1/admin/realms/{realm}/freeze", post(freeze))
        .route("/v1/admin/realms/{realm}/unfreeze", post(unfreeze))
        .route("/v1/admin/realms/{realm}/suspend", post(suspend))
        .route("/v1/admin/realms/{realm}/unsuspend", post(unsuspend))
        .route("/v1/admin/realms/{realm}/transfer", post(force_transfer))
        .route("/v1/plans", get(plans))
        .route("/v1/realms/{realm}/usage", get(usage))
        .route("/v1/realms/{realm}/usage/{month}", get(usage_month))
        .route("/v1/realms/{realm}/plan", post(set_plan))
        .route("/v1/realms/{realm}/addons", post(set_addon))
        .route("/v1/invoices", get(invoices))
        .route("/v1/invoices/{invoice}", get(invoice))
        .route("/v1/invoices/{invoice}/pay", post(pay_invoice))
        .route("/v1/admin/invoices/run", post(run_invoices))
        .route("/v1/admin/invoices/{invoice}/void", post(void_invoice))
        .route("/v1/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(reg)
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

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

// ---- billing ----

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
