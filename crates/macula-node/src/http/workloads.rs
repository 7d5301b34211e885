//! `/v1/realms/{realm}/workloads`: deploy records. `POST` takes a signed record (the key
//! holder's signature is the authorization: no other credential is needed to hand one in) and
//! floods it to the mesh; `GET` lists the realm's records to a key of the realm.

#[allow(unused_imports)]
use super::*;

use macula_workloads::record::{DeployRecord, Refused};

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// `POST /v1/realms/{realm}/workloads` with a [`DeployRecord`] as JSON.
pub(super) async fn post_record(
    State(node): State<Arc<Node>>,
    Path(realm): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let record: DeployRecord = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_record",
                format!("the body is not a deploy record: {e}"),
            )
        }
    };
    if record.realm != realm {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_record",
            format!("the record is for realm {}, not {realm}", record.realm),
        );
    }
    let taken = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || crate::workloads::accept(&node, record)).await
    };
    let Ok(taken) = taken else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the record could not be judged; nothing was changed",
        );
    };
    match taken {
        Ok(r) => {
            if let Some(m) = crate::mesh::of(&node) {
                crate::mesh::flood_record(m, &r, None);
            }
            (
                StatusCode::CREATED,
                Json(json!({"realm": r.realm, "name": r.name, "seq": r.seq, "deleted": r.manifest.is_none()})),
            )
                .into_response()
        }
        Err(Refused::Stale { have }) => error(
            StatusCode::CONFLICT,
            "stale_record",
            format!(
                "this node has a record of that workload with sequence {have}: sign a newer one"
            ),
        ),
        Err(Refused::Unverified(why)) => {
            error(StatusCode::UNAUTHORIZED, errors::AUTHENTICATION_FAILED, why)
        }
        Err(Refused::Forbidden(why)) => error(StatusCode::FORBIDDEN, errors::NOT_AUTHORIZED, why),
        Err(Refused::Invalid(why)) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest", why)
        }
        Err(Refused::Full) => error(
            StatusCode::CONFLICT,
            "too_many_workloads",
            format!(
                "{realm} has as many workloads as a node keeps ({} workloads, {} MiB of manifests): delete one first",
                macula_workloads::record::MAX_PER_REALM,
                macula_workloads::record::MAX_BYTES_PER_REALM >> 20
            ),
        ),
    }
}

/// `GET /v1/realms/{realm}/workloads` with `Authorization: Bearer <a key of the realm>`.
pub(super) async fn list_records(
    State(node): State<Arc<Node>>,
    Path(realm): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(key) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return error(
            StatusCode::UNAUTHORIZED,
            errors::AUTHENTICATION_FAILED,
            "send a key of the realm as `Authorization: Bearer sk_live_...`",
        );
    };
    let auth = node.auth();
    let v = match auth.authenticator.verify(key, now_secs()) {
        Ok(v) if !auth.authenticator.is_revoked(&v.claims.kid) => v,
        Ok(_) => {
            return error(
                StatusCode::UNAUTHORIZED,
                errors::AUTHENTICATION_FAILED,
                "the key was revoked",
            )
        }
        Err(e) => {
            return error(
                StatusCode::UNAUTHORIZED,
                errors::AUTHENTICATION_FAILED,
                e.to_string(),
            )
        }
    };
    if let Err((uri, why)) = node.role_admitted(&realm, &v.claims.realm, &v.claims.role) {
        return error(StatusCode::FORBIDDEN, uri, why);
    }
    let records = node.workloads.records.lock();
    let items: Vec<_> = records
        .all()
        .filter(|r| r.realm == realm)
        .map(|r| {
            json!({"name": r.name, "seq": r.seq, "deleted": r.manifest.is_none(),
                   "issued_at": crate::confdir::rfc3339(r.issued_at), "manifest": r.manifest})
        })
        .collect();
    Json(json!({"realm": realm, "items": items})).into_response()
}
