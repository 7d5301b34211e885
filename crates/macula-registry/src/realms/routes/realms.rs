//! Routes of the realm registry: listing, registration, renewal, deletion, transfer, members,
//! policies.

#[allow(unused_imports)]
use crate::http::*;
use crate::realms::types::*;
use macula_common::policy::PolicyDoc;

/// Realms you own or are a member of.
#[utoipa::path(get, path = "/v1/realms", tag = "realms", security(("session" = [])),
    params(Page),
    responses((status = 200, body = crate::service::RealmList, description = "A page of realms; `access` is `owner` or `member`."),
        (status = 401, response = ErrorBody)))]
pub(crate) async fn list_realms(
    State(reg): Reg,
    actor: Actor,
    Q(page): Q<Page>,
) -> ApiResult<Json<List<Realm>>> {
    Ok(Json(reg.list_realms(&actor, &page).await?))
}

/// Register a realm.
///
/// Reverse-DNS, first come first served; a subrealm only by the owner of its nearest
/// registered parent, who may delegate it (`owner_email`). Honours `Idempotency-Key`.
#[utoipa::path(post, path = "/v1/realms", tag = "realms", security(("session" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Retrying with the same key and body returns the first answer (24 h); a different body gets 409 idempotency_key_reused.")),
    request_body = NewRealm,
    responses((status = 201, body = Realm, description = "The registration."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 409, response = ErrorBody), (status = 413, response = ErrorBody),
        (status = 422, response = ErrorBody)))]
pub(crate) async fn register(
    State(reg): Reg,
    actor: Actor,
    headers: HeaderMap,
    Body(req): Body<NewRealm>,
) -> ApiResult<(StatusCode, Json<Realm>)> {
    let idem = idempotency(&headers, &req)?;
    let (status, v) = reg.register(&actor, req, idem).await?;
    Ok((status, Json(v)))
}

/// A realm: status, expiry, grace, counts, live sessions on this node.
#[utoipa::path(get, path = "/v1/realms/{realm}", tag = "realms", security(("session" = [])),
    params(RealmParam),
    responses((status = 200, body = Realm, description = "The realm, with `access`, `active_keys`, `members`, `roles` (and `live` where the node hosts the registry)."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn show_realm(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<Realm>> {
    Ok(Json(reg.show_realm(&actor, &realm).await?))
}

/// Delete a realm (owner; not while frozen or with subrealms).
#[utoipa::path(delete, path = "/v1/realms/{realm}", tag = "realms", security(("session" = [])),
    params(RealmParam),
    responses((status = 204, description = "Deleted: every node refuses the realm from now on."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody)))]
pub(crate) async fn delete_realm(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<StatusCode> {
    reg.delete_realm(&actor, &realm).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Renew for 1 to 10 years (owner); restores a realm that expiry disabled.
#[utoipa::path(post, path = "/v1/realms/{realm}/renew", tag = "realms", security(("session" = [])),
    params(RealmParam),
    request_body(content = Option<Renew>, description = "May be left out: one year."),
    responses((status = 200, body = Realm, description = "The realm, renewed."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn renew(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Realm>> {
    let years = optional_body::<Renew>(&body)?.map_or(1, |b| b.years);
    Ok(Json(reg.renew(&actor, &realm, years).await?))
}

/// An authorization code for a transfer (owner), shown once; valid `registry.transfer_code_ttl`.
#[utoipa::path(post, path = "/v1/realms/{realm}/transfer-code", tag = "realms", security(("session" = [])),
    params(RealmParam),
    responses((status = 201, body = TransferCode, description = "The code."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody)))]
pub(crate) async fn transfer_code(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<(StatusCode, Json<TransferCode>)> {
    Ok((
        StatusCode::CREATED,
        Json(reg.transfer_code(&actor, &realm).await?),
    ))
}

/// Accept a transfer with the owner's code.
///
/// You become the owner; the transfer fee is recorded against your account. The realm gets a
/// new authority: every key issued before stops working on every node.
#[utoipa::path(post, path = "/v1/realms/{realm}/transfer", tag = "realms", security(("session" = [])),
    params(RealmParam),
    request_body = TransferRequest,
    responses((status = 200, body = Realm, description = "The realm, yours, with `fee_cents`."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody),
        (status = 422, response = ErrorBody)))]
pub(crate) async fn transfer(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(t): Body<TransferRequest>,
) -> ApiResult<Json<Realm>> {
    Ok(Json(reg.transfer(&actor, &realm, &t.code).await?))
}

/// Owner and members with their roles.
#[utoipa::path(get, path = "/v1/realms/{realm}/members", tag = "realms", security(("session" = [])),
    params(RealmParam),
    responses((status = 200, body = crate::service::MemberList, description = "The owner first, then members by address."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn members(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
) -> ApiResult<Json<List<Member>>> {
    Ok(Json(reg.members(&actor, &realm).await?))
}

/// Invite a member or change a member's role (realm:admin).
///
/// Nobody changes their own role (403 `own_role`).
#[utoipa::path(post, path = "/v1/realms/{realm}/members", tag = "realms", security(("session" = [])),
    params(RealmParam),
    request_body = MemberRequest,
    responses((status = 200, body = MemberSet, description = "The member, and the policy version that carries it."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody),
        (status = 422, response = ErrorBody)))]
pub(crate) async fn set_member(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(m): Body<MemberRequest>,
) -> ApiResult<Json<MemberSet>> {
    Ok(Json(
        reg.set_member(&actor, &realm, &m.email, &m.role).await?,
    ))
}

/// Remove a member (realm:admin).
#[utoipa::path(delete, path = "/v1/realms/{realm}/members/{email}", tag = "realms", security(("session" = [])),
    params(RealmParam, ("email" = String, Path, description = "The member's email address.")),
    responses((status = 204, description = "Removed."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn remove_member(
    State(reg): Reg,
    actor: Actor,
    Path((realm, email)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    reg.remove_member(&actor, &realm, &email).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The realm policy in the seed's ACL shape (roles, users, topic_acls, revoked_keys), newest
/// or `?version=N`.
#[utoipa::path(get, path = "/v1/realms/{realm}/policy", tag = "realms", security(("session" = [])),
    params(RealmParam, VersionQuery),
    responses((status = 200, body = PolicyDoc, description = "The policy document."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn policy(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(v): Q<VersionQuery>,
) -> ApiResult<Json<PolicyDoc>> {
    Ok(Json(reg.policy(&actor, &realm, v.version).await?))
}

/// Replace roles and topic ACLs (realm:admin).
///
/// A new policy version that every node applies within seconds. `expected_version` makes it
/// conditional (409 `stale_policy`).
#[utoipa::path(put, path = "/v1/realms/{realm}/policy", tag = "realms", security(("session" = [])),
    params(RealmParam),
    request_body = PolicyUpdate,
    responses((status = 200, body = PolicyDoc, description = "The new version."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody),
        (status = 413, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn set_policy(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(p): Body<PolicyUpdate>,
) -> ApiResult<Json<PolicyDoc>> {
    Ok(Json(reg.set_policy(&actor, &realm, p).await?))
}

/// Policy versions, newest first.
#[utoipa::path(get, path = "/v1/realms/{realm}/policy/versions", tag = "realms", security(("session" = [])),
    params(RealmParam, Page),
    responses((status = 200, body = crate::service::PolicyVersionList, description = "A page of versions."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn policy_versions(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<List<PolicyVersion>>> {
    Ok(Json(reg.policy_versions(&actor, &realm, &page).await?))
}
