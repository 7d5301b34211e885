//! Routes of the realm registry: listing, registration, renewal, deletion, transfer, members,
//! policies.

#[allow(unused_imports)]
use crate::http::*;

pub(crate) async fn list_realms(
    State(reg): Reg,
    actor: Actor,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_realms(&actor, &page).await?))
}

pub(crate) async fn register(
    State(reg): Reg,
    actor: Actor,
    headers: HeaderMap,
    Body(req): Body<NewRealm>,
) -> ApiResult<Response> {
    let idem = idempotency(&headers, &req)?;
    let (status, v) = reg.register(&actor, req, idem).await?;
    Ok((status, Json(v)).into_response())
}

pub(crate) async fn show_realm(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.show_realm(&actor, &realm).await?))
}

pub(crate) async fn delete_realm(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<StatusCode> {
    reg.delete_realm(&actor, &realm).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Renew {
    #[serde(default = "one")]
    pub(crate) years: u64,
}

pub(crate) fn one() -> u64 {
    1
}

pub(crate) async fn renew(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let years = optional_body::<Renew>(&body)?.map_or(1, |b| b.years);
    Ok(Json(reg.renew(&actor, &realm, years).await?))
}

pub(crate) async fn transfer_code(
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
pub(crate) struct TransferReq {
    pub(crate) code: String,
}

pub(crate) async fn transfer(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(t): Body<TransferReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.transfer(&actor, &realm, &t.code).await?))
}

pub(crate) async fn members(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.members(&actor, &realm).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MemberReq {
    pub(crate) email: String,
    pub(crate) role: String,
}

pub(crate) async fn set_member(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(m): Body<MemberReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        reg.set_member(&actor, &realm, &m.email, &m.role).await?,
    ))
}

pub(crate) async fn remove_member(
    State(reg): Reg,
    actor: Actor,
    Path((realm, email)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    reg.remove_member(&actor, &realm, &email).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub(crate) struct VersionQ {
    pub(crate) version: Option<i64>,
}

pub(crate) async fn policy(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(v): Q<VersionQ>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.policy(&actor, &realm, v.version).await?))
}

pub(crate) async fn set_policy(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(p): Body<PolicyUpdate>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_policy(&actor, &realm, p).await?))
}

pub(crate) async fn policy_versions(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.policy_versions(&actor, &realm, &page).await?))
}
