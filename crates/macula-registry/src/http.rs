//! The REST API under `/v1`, described by `/v1/openapi.json` (the document in `openapi.json`;
//! a test checks that every route here is in it and nothing else is).
//!
//! Authentication is a session token from `POST /v1/sessions`, sent as
//! `Authorization: Bearer mcs_...`. Lists take `?limit=&cursor=` and answer
//! `{"items": [...], "next_cursor": ...}`. `POST /v1/realms` and `POST /v1/realms/{realm}/keys`
//! honour an `Idempotency-Key` header (24 h).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::registry::{Actor, Idempotency, NewKey, NewRealm, Page, PolicyUpdate, Registry};

/// The OpenAPI 3.1 document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

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

type Reg = State<Arc<Registry>>;

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
fn client_ip(parts: &Parts, trusted: &[std::net::IpAddr]) -> Option<std::net::IpAddr> {
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

fn remote_of(parts: &Parts, reg: &Registry) -> String {
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
fn optional_body<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<Option<T>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| ApiError::invalid("invalid_body", format!("the body is not valid: {e}")))
}

fn bearer(headers: &HeaderMap) -> ApiResult<&str> {
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

fn idempotency(
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    email: String,
    password: String,
    #[serde(default)]
    client: Option<String>,
}

async fn signup(
    State(reg): Reg,
    Remote(remote, ip): Remote,
    Body(c): Body<Credentials>,
) -> ApiResult<Response> {
    let v = reg.signup(&c.email, &c.password, &remote, ip).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn login(
    State(reg): Reg,
    Remote(remote, ip): Remote,
    Body(c): Body<Credentials>,
) -> ApiResult<Response> {
    let client = c.client.unwrap_or_else(|| "api".into());
    let v = reg
        .login(&c.email, &c.password, &client, ip, &remote)
        .await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn logout(State(reg): Reg, headers: HeaderMap, actor: Actor) -> ApiResult<StatusCode> {
    reg.logout(bearer(&headers)?, &actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    code: String,
}

async fn verify_email(
    State(reg): Reg,
    Remote(remote, _): Remote,
    Body(b): Body<VerifyBody>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.verify_email(&b.code, &remote).await?))
}

async fn resend_verification(State(reg): Reg, actor: Actor) -> ApiResult<Response> {
    let v = reg.resend_verification(&actor).await?;
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailChange {
    email: String,
    password: String,
}

async fn change_email(
    State(reg): Reg,
    actor: Actor,
    Body(b): Body<EmailChange>,
) -> ApiResult<Response> {
    let v = reg.change_email(&actor, &b.email, &b.password).await?;
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

async fn whoami(State(reg): Reg, actor: Actor) -> Json<Value> {
    Json(reg.whoami(&actor))
}

async fn list_realms(State(reg): Reg, actor: Actor, Q(page): Q<Page>) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_realms(&actor, &page).await?))
}

async fn register(
    State(reg): Reg,
    actor: Actor,
    headers: HeaderMap,
    Body(req): Body<NewRealm>,
) -> ApiResult<Response> {
    let idem = idempotency(&headers, &req)?;
    let (status, v) = reg.register(&actor, req, idem).await?;
    Ok((status, Json(v)).into_response())
}

async fn show_realm(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.show_realm(&actor, &realm).await?))
}

async fn delete_realm(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<StatusCode> {
    reg.delete_realm(&actor, &realm).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Renew {
    #[serde(default = "one")]
    years: u64,
}
fn one() -> u64 {
    1
}

async fn renew(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let years = optional_body::<Renew>(&body)?.map_or(1, |b| b.years);
    Ok(Json(reg.renew(&actor, &realm, years).await?))
}

async fn transfer_code(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Response> {
    Ok((
        StatusCode::CREATED,
        Json(reg.transfer_code(&actor, &realm).await?),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferReq {
    code: String,
}

async fn transfer(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(t): Body<TransferReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.transfer(&actor, &realm, &t.code).await?))
}

async fn members(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.members(&actor, &realm).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberReq {
    email: String,
    role: String,
}

async fn set_member(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(m): Body<MemberReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        reg.set_member(&actor, &realm, &m.email, &m.role).await?,
    ))
}

async fn remove_member(
    State(reg): Reg,
    actor: Actor,
    Path((realm, email)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    reg.remove_member(&actor, &realm, &email).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct VersionQ {
    version: Option<i64>,
}

async fn policy(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(v): Q<VersionQ>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.policy(&actor, &realm, v.version).await?))
}

async fn set_policy(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(p): Body<PolicyUpdate>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_policy(&actor, &realm, p).await?))
}

async fn policy_versions(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.policy_versions(&actor, &realm, &page).await?))
}

async fn list_keys(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_keys(&actor, Some(&realm), &page).await?))
}

async fn all_keys(State(reg): Reg, actor: Actor, Q(page): Q<Page>) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_keys(&actor, None, &page).await?))
}

async fn create_key(
    State(reg): Reg,
    actor: Actor,
    headers: HeaderMap,
    Path(realm): Path<String>,
    Body(req): Body<NewKey>,
) -> ApiResult<Response> {
    let idem = idempotency(&headers, &(&realm, &req))?;
    let (status, v) = reg.create_key(&actor, &realm, req, idem).await?;
    Ok((status, Json(v)).into_response())
}

async fn revoke_key(
    State(reg): Reg,
    actor: Actor,
    Path((realm, kid)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.revoke_key(&actor, &realm, &kid).await?))
}

async fn revoke_any_key(
    State(reg): Reg,
    actor: Actor,
    Path(kid): Path<String>,
) -> ApiResult<Json<Value>> {
    let realm = reg.realm_of_key(&kid).await?;
    Ok(Json(reg.revoke_key(&actor, &realm, &kid).await?))
}

async fn realm_audit(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.audit_log(&actor, Some(&realm), &page).await?))
}

async fn my_audit(State(reg): Reg, actor: Actor, Q(page): Q<Page>) -> ApiResult<Json<Value>> {
    Ok(Json(reg.audit_log(&actor, None, &page).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimReq {
    claimant: String,
    #[serde(default)]
    note: String,
}

async fn add_claim(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(c): Body<ClaimReq>,
) -> ApiResult<Response> {
    Ok((
        StatusCode::CREATED,
        Json(reg.add_claim(&actor, &realm, &c.claimant, &c.note).await?),
    )
        .into_response())
}

async fn claims(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.claims(&actor, &realm).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    #[serde(default)]
    reason: String,
}

async fn freeze(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let r = optional_body::<Reason>(&body)?.unwrap_or_default();
    Ok(Json(reg.set_frozen(&actor, &realm, Some(&r.reason)).await?))
}

async fn unfreeze(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_frozen(&actor, &realm, None).await?))
}

async fn suspend(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let r = optional_body::<Reason>(&body)?.unwrap_or_default();
    Ok(Json(
        reg.set_suspended(&actor, &realm, Some(&r.reason)).await?,
    ))
}

async fn unsuspend(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_suspended(&actor, &realm, None).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceTransfer {
    to: String,
}

async fn force_transfer(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(t): Body<ForceTransfer>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.force_transfer(&actor, &realm, &t.to).await?))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

// ---- billing ----

async fn plans(State(reg): Reg) -> Json<Value> {
    Json(serde_json::json!({
        "tiers": reg.config.prices.tiers,
        "addons": reg.config.prices.addons,
        "rules": {
            "rounding": "each line is computed exactly and rounded half up to the cent; the total is the sum of the lines",
            "gib": "1 GiB = 2^30 bytes of egress (bytes written to the realm's clients)",
            "plan_changes": "upgrades apply at once and the whole month is billed at the new plan; downgrades apply on the first of next month",
            "hard_quota": "the Hobby plan refuses operations past its allowance until the month ends; paid plans bill overage",
            "addons": "an add-on is billed in full for every month in which it was active",
        },
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    #[serde(default)]
    period: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    format: Option<String>,
}

/// A time given as Unix seconds, `YYYY-MM` (that month's start) or `YYYY-MM-DD`.
fn parse_time(s: &str) -> ApiResult<i64> {
    if let Ok(v) = s.parse::<i64>() {
        return Ok(v);
    }
    if let (10, Some(m), Some(d)) = (s.len(), s.get(..7), s.get(8..)) {
        let month = crate::billing::parse_month(m)?;
        let day: i64 = d.parse().map_err(|_| {
            ApiError::invalid(
                "invalid_time",
                format!("{s:?}: write YYYY-MM-DD, YYYY-MM or Unix seconds"),
            )
        })?;
        if !(1..=31).contains(&day) {
            return Err(ApiError::invalid(
                "invalid_time",
                format!("{s:?}: no such day"),
            ));
        }
        return Ok(month + (day - 1) * 86_400);
    }
    crate::billing::parse_month(s)
}

/// A usage reader: `Authorization: Bearer mcs_...` (a session) or `Bearer sk_live_...` (the
/// realm's admin API key).
async fn viewer(
    reg: &Registry,
    parts_headers: &HeaderMap,
    remote: String,
) -> ApiResult<crate::billing::Viewer> {
    let v = parts_headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| t.starts_with("mcs_") || t.starts_with("sk_"))
        .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <session token> (macula login) or Bearer <the realm's admin API key>"))?;
    reg.viewer(v, remote).await
}

async fn usage(
    State(reg): Reg,
    Remote(remote, _): Remote,
    headers: HeaderMap,
    Path(realm): Path<String>,
    Q(q): Q<UsageQuery>,
) -> ApiResult<Response> {
    let period = q.period.as_deref().unwrap_or("day");
    let now = macula_common::time::now_secs() as i64;
    let to =
        q.to.as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or(now + 1);
    let from = match q.from.as_deref() {
        Some(f) => parse_time(f)?,
        None => crate::billing::month_start(now),
    };
    let actor = viewer(&reg, &headers, remote).await?;
    let rows = reg.usage(&actor, &realm, period, from, to).await?;
    if q.format.as_deref() == Some("csv") {
        let mut out = String::from("realm,period,start,publish,subscribe,call,register,dht,ops_total,bytes_in,egress_bytes,latency_p50_ms,latency_p95_ms\n");
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        for r in &rows {
            out.push_str(&format!(
                "{realm},{period},{},{},{},{},{},{},{},{},{},{},{}\n",
                r.start,
                r.ops.get("publish").unwrap_or(&0),
                r.ops.get("subscribe").unwrap_or(&0),
                r.ops.get("call").unwrap_or(&0),
                r.ops.get("register").unwrap_or(&0),
                r.ops.get("dht").unwrap_or(&0),
                r.ops_total,
                r.bytes_in,
                r.egress_bytes,
                ms(r.latency_p50_ms),
                ms(r.latency_p95_ms),
            ));
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response());
    }
    Ok(Json(serde_json::json!({"realm": realm, "period": period, "items": rows})).into_response())
}

async fn usage_month(
    State(reg): Reg,
    Remote(remote, _): Remote,
    headers: HeaderMap,
    Path((realm, month)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let month = crate::billing::parse_month(&month)?;
    let actor = viewer(&reg, &headers, remote).await?;
    Ok(Json(reg.usage_month(&actor, &realm, month).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanReq {
    tier: String,
}

async fn set_plan(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(b): Body<PlanReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_plan(&actor, &realm, &b.tier).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddonReq {
    feature: String,
    #[serde(default = "yes")]
    active: bool,
}

fn yes() -> bool {
    true
}

async fn set_addon(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(b): Body<AddonReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        reg.set_addon(&actor, &realm, &b.feature, b.active).await?,
    ))
}

async fn invoices(State(reg): Reg, actor: Actor) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_invoices(&actor).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceQuery {
    #[serde(default)]
    format: Option<String>,
}

async fn invoice(
    State(reg): Reg,
    actor: Actor,
    headers: HeaderMap,
    Path(id): Path<String>,
    Q(q): Q<InvoiceQuery>,
) -> ApiResult<Response> {
    let inv = reg.show_invoice(&actor, &id).await?;
    let html = q.format.as_deref() == Some("html")
        || (q.format.is_none()
            && headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.starts_with("text/html")));
    if html {
        return Ok((
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::billing::invoice_html(&inv),
        )
            .into_response());
    }
    Ok(Json(inv).into_response())
}

async fn pay_invoice(
    State(reg): Reg,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.pay_invoice(&actor, &id).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunReq {
    #[serde(default)]
    month: Option<String>,
}

async fn run_invoices(
    State(reg): Reg,
    actor: Actor,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    Registry::operator_only(&actor)?;
    let r = optional_body::<RunReq>(&body)?.unwrap_or_default();
    let month = crate::billing::parse_month(r.month.as_deref().unwrap_or("previous"))?;
    Ok(Json(reg.run_invoices(month, None).await?))
}

async fn void_invoice(
    State(reg): Reg,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.void_invoice(&actor, &id).await?))
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
