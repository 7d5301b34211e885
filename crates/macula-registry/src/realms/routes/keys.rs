//! Routes of API keys and the audit log.

#[allow(unused_imports)]
use crate::http::*;

pub(crate) async fn list_keys(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_keys(&actor, Some(&realm), &page).await?))
}

pub(crate) async fn all_keys(
    State(reg): Reg,
    actor: Actor,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_keys(&actor, None, &page).await?))
}

pub(crate) async fn create_key(
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

pub(crate) async fn revoke_key(
    State(reg): Reg,
    actor: Actor,
    Path((realm, kid)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.revoke_key(&actor, &realm, &kid).await?))
}

pub(crate) async fn revoke_any_key(
    State(reg): Reg,
    actor: Actor,
    Path(kid): Path<String>,
) -> ApiResult<Json<Value>> {
    let realm = reg.realm_of_key(&kid).await?;
    Ok(Json(reg.revoke_key(&actor, &realm, &kid).await?))
}

pub(crate) async fn realm_audit(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.audit_log(&actor, Some(&realm), &page).await?))
}

pub(crate) async fn my_audit(
    State(reg): Reg,
    actor: Actor,
    Q(page): Q<Page>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.audit_log(&actor, None, &page).await?))
}
