//! Operators' routes: ownership claims, freezing, suspension, forced transfer.

#[allow(unused_imports)]
use crate::http::*;
use crate::realms::types::*;

/// Record a claim on a realm (operator).
#[utoipa::path(post, path = "/v1/admin/realms/{realm}/claims", tag = "operators", security(("session" = [])),
    params(RealmParam),
    request_body = ClaimRequest,
    responses((status = 201, body = Claim, description = "The claim, open."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn add_claim(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(c): Body<ClaimRequest>,
) -> ApiResult<(StatusCode, Json<Claim>)> {
    Ok((
        StatusCode::CREATED,
        Json(reg.add_claim(&actor, &realm, &c.claimant, &c.note).await?),
    ))
}

/// Disputes: recorded claims on a realm (operator).
#[utoipa::path(get, path = "/v1/admin/realms/{realm}/claims", tag = "operators", security(("session" = [])),
    params(RealmParam),
    responses((status = 200, body = crate::service::ClaimList, description = "The claims, oldest first."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody)))]
pub(crate) async fn claims(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<List<Claim>>> {
    Ok(Json(reg.claims(&actor, &realm).await?))
}

/// Freeze ownership (no transfer or delete) while a dispute is open (operator).
#[utoipa::path(post, path = "/v1/admin/realms/{realm}/freeze", tag = "operators", security(("session" = [])),
    params(RealmParam),
    request_body(content = Option<Reason>, description = "May be left out."),
    responses((status = 200, body = Realm, description = "The realm, frozen."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn freeze(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Realm>> {
    let r = optional_body::<Reason>(&body)?.unwrap_or_default();
    Ok(Json(reg.set_frozen(&actor, &realm, Some(&r.reason)).await?))
}

/// Lift a freeze (operator).
#[utoipa::path(post, path = "/v1/admin/realms/{realm}/unfreeze", tag = "operators", security(("session" = [])),
    params(RealmParam),
    responses((status = 200, body = Realm, description = "The realm."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn unfreeze(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Realm>> {
    Ok(Json(reg.set_frozen(&actor, &realm, None).await?))
}

/// Suspend (abuse takedown): nodes refuse the realm's sessions and close live ones (operator).
#[utoipa::path(post, path = "/v1/admin/realms/{realm}/suspend", tag = "operators", security(("session" = [])),
    params(RealmParam),
    request_body(content = Option<Reason>, description = "May be left out."),
    responses((status = 200, body = Realm, description = "The realm, suspended."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn suspend(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Realm>> {
    let r = optional_body::<Reason>(&body)?.unwrap_or_default();
    Ok(Json(
        reg.set_suspended(&actor, &realm, Some(&r.reason)).await?,
    ))
}

/// Lift a suspension (operator).
#[utoipa::path(post, path = "/v1/admin/realms/{realm}/unsuspend", tag = "operators", security(("session" = [])),
    params(RealmParam),
    responses((status = 200, body = Realm, description = "The realm."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn unsuspend(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Realm>> {
    Ok(Json(reg.set_suspended(&actor, &realm, None).await?))
}

/// Resolve a dispute by transferring the realm (operator; no fee).
#[utoipa::path(post, path = "/v1/admin/realms/{realm}/transfer", tag = "operators", security(("session" = [])),
    params(RealmParam),
    request_body = ForceTransfer,
    responses((status = 200, body = Realm, description = "The realm, with its new owner."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn force_transfer(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(t): Body<ForceTransfer>,
) -> ApiResult<Json<Realm>> {
    Ok(Json(reg.force_transfer(&actor, &realm, &t.to).await?))
}
