//! Routes of API keys and the audit log.

#[allow(unused_imports)]
use crate::http::*;
use crate::realms::types::*;

/// API keys of a realm (never the secret).
#[utoipa::path(get, path = "/v1/realms/{realm}/keys", tag = "keys", security(("session" = [])),
    params(RealmParam, Page),
    responses((status = 200, body = crate::service::KeyList, description = "A page of keys, by id."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn list_keys(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<List<Key>>> {
    Ok(Json(reg.list_keys(&actor, Some(&realm), &page).await?))
}

/// Keys of every realm you own or administer.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", security(("session" = [])),
    params(Page),
    responses((status = 200, body = crate::service::KeyList, description = "A page of keys, by id."),
        (status = 401, response = ErrorBody)))]
pub(crate) async fn all_keys(
    State(reg): Reg,
    actor: Actor,
    Q(page): Q<Page>,
) -> ApiResult<Json<List<Key>>> {
    Ok(Json(reg.list_keys(&actor, None, &page).await?))
}

/// Create an API key (realm:admin).
///
/// The key is in this answer only; the registry keeps its hash. Honours `Idempotency-Key`.
#[utoipa::path(post, path = "/v1/realms/{realm}/keys", tag = "keys", security(("session" = [])),
    params(RealmParam, ("Idempotency-Key" = Option<String>, Header,
        description = "Retrying with the same key and body returns the first answer (24 h); a different body gets 409 idempotency_key_reused.")),
    request_body = NewKey,
    responses((status = 201, body = Key, description = "The key with its secret in `key`."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody),
        (status = 413, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn create_key(
    State(reg): Reg,
    actor: Actor,
    headers: HeaderMap,
    Path(realm): Path<String>,
    Body(req): Body<NewKey>,
) -> ApiResult<(StatusCode, Json<Key>)> {
    let idem = idempotency(&headers, &(&realm, &req))?;
    let (status, v) = reg.create_key(&actor, &realm, req, idem).await?;
    Ok((status, Json(v)))
}

/// Revoke a key: every node refuses it and closes its live sessions within seconds.
#[utoipa::path(delete, path = "/v1/realms/{realm}/keys/{key_id}", tag = "keys", security(("session" = [])),
    params(RealmParam, ("key_id" = String, Path, description = "The key's id (`key_...`).")),
    responses((status = 200, body = RevokedKey, description = "Revoked (again: the first time it was)."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn revoke_key(
    State(reg): Reg,
    actor: Actor,
    Path((realm, kid)): Path<(String, String)>,
) -> ApiResult<Json<RevokedKey>> {
    Ok(Json(reg.revoke_key(&actor, &realm, &kid).await?))
}

/// Revoke a key by id alone (realm:admin in its realm).
#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "keys", security(("session" = [])),
    params(("key_id" = String, Path, description = "The key's id (`key_...`).")),
    responses((status = 200, body = RevokedKey, description = "Revoked."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn revoke_any_key(
    State(reg): Reg,
    actor: Actor,
    Path(kid): Path<String>,
) -> ApiResult<Json<RevokedKey>> {
    let realm = reg.realm_of_key(&kid).await?;
    Ok(Json(reg.revoke_key(&actor, &realm, &kid).await?))
}

/// The realm's audit log, newest first: who, what, when, from where.
#[utoipa::path(get, path = "/v1/realms/{realm}/audit", tag = "keys", security(("session" = [])),
    params(RealmParam, Page),
    responses((status = 200, body = crate::service::AuditEntryList, description = "A page of entries."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn realm_audit(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<List<AuditEntry>>> {
    Ok(Json(reg.audit_log(&actor, Some(&realm), &page).await?))
}

/// Your own actions (operators: everything), newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "keys", security(("session" = [])),
    params(Page),
    responses((status = 200, body = crate::service::AuditEntryList, description = "A page of entries."),
        (status = 401, response = ErrorBody)))]
pub(crate) async fn my_audit(
    State(reg): Reg,
    actor: Actor,
    Q(page): Q<Page>,
) -> ApiResult<Json<List<AuditEntry>>> {
    Ok(Json(reg.audit_log(&actor, None, &page).await?))
}
