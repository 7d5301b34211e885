//! Operators' routes: ownership claims, freezing, suspension, forced transfer.

#[allow(unused_imports)]
use crate::http::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClaimReq {
    pub(crate) claimant: String,
    #[serde(default)]
    pub(crate) note: String,
}

pub(crate) async fn add_claim(
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

pub(crate) async fn claims(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.claims(&actor, &realm).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Reason {
    #[serde(default)]
    pub(crate) reason: String,
}

pub(crate) async fn freeze(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let r = optional_body::<Reason>(&body)?.unwrap_or_default();
    Ok(Json(reg.set_frozen(&actor, &realm, Some(&r.reason)).await?))
}

pub(crate) async fn unfreeze(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_frozen(&actor, &realm, None).await?))
}

pub(crate) async fn suspend(
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

pub(crate) async fn unsuspend(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_suspended(&actor, &realm, None).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ForceTransfer {
    pub(crate) to: String,
}

pub(crate) async fn force_transfer(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(t): Body<ForceTransfer>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.force_transfer(&actor, &realm, &t.to).await?))
}
