//! `/v1/realms/{realm}/workloads`: deploy records. `POST` takes a signed record (the key
//! holder's signature is the authorization: no other credential is needed to hand one in) and
//! floods it to the mesh; `GET` lists the realm's records to a key of the realm.

#[allow(unused_imports)]
use super::*;

use axum::Extension;
use macula_workloads::record::{DeployRecord, Refused};

use crate::workloads::Controller;

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

/// The realm key in `Authorization: Bearer ...`, valid, not revoked, and admitted to `realm`;
/// or the answer that says why not.
fn realm_key(node: &Node, realm: &str, headers: &HeaderMap) -> Result<(), Response> {
    let Some(key) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            errors::AUTHENTICATION_FAILED,
            "send a key of the realm as `Authorization: Bearer sk_live_...`",
        ));
    };
    let auth = node.auth();
    let v = match auth.authenticator.verify(key, now_secs()) {
        Ok(v) if !auth.authenticator.is_revoked(&v.claims.kid) => v,
        Ok(_) => {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                errors::AUTHENTICATION_FAILED,
                "the key was revoked",
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                errors::AUTHENTICATION_FAILED,
                e.to_string(),
            ))
        }
    };
    if let Err((uri, why)) = node.role_admitted(realm, &v.claims.realm, &v.claims.role) {
        return Err(error(StatusCode::FORBIDDEN, uri, why));
    }
    Ok(())
}

/// `GET /v1/realms/{realm}/workloads` with `Authorization: Bearer <a key of the realm>`.
pub(super) async fn list_records(
    State(node): State<Arc<Node>>,
    Path(realm): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = realm_key(&node, &realm, &headers) {
        return r;
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

#[derive(Deserialize)]
pub(super) struct ReplicasQuery {
    #[serde(default)]
    local: bool,
}

/// `GET /v1/realms/{realm}/replicas[?local=true]`: every replica of the realm's workloads on
/// the nodes that answer (node, state, restarts, fencing token, since), and the slots no node
/// could take, with why; with `local`, this node's alone (no waiting on others).
pub(super) async fn replicas(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path(realm): Path<String>,
    Query(q): Query<ReplicasQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = realm_key(&node, &realm, &headers) {
        return r;
    }
    let items = if q.local {
        ctrl.local_status(&realm)
    } else {
        ctrl.gather_status(&realm).await
    };
    Json(json!({"realm": realm, "node": ctrl.me(), "items": items})).into_response()
}

#[derive(Deserialize)]
pub(super) struct LogsQuery {
    replica: Option<u32>,
    #[serde(default)]
    follow: bool,
}

/// `GET /v1/realms/{realm}/workloads/{name}/logs[?replica=i][&follow=true]`: the output of the
/// workload's replicas on every node that runs one, as JSON lines
/// (`{"replica","slot","seq","stream","text"}`); with `follow`, new lines as they come until
/// the client goes.
pub(super) async fn logs(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((realm, name)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = realm_key(&node, &realm, &headers) {
        return r;
    }
    type Cursor = std::collections::BTreeMap<String, u64>;
    let first = Some(Cursor::new());
    let stream = futures_util::stream::unfold(first, move |cursor| {
        let (ctrl, realm, name) = (ctrl.clone(), realm.clone(), name.clone());
        async move {
            let mut cursor = cursor?;
            let started = cursor.is_empty();
            if !started {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let lines = ctrl.gather_logs(&realm, &name, q.replica, &cursor).await;
            let mut out = String::new();
            for l in lines {
                let seen = cursor.entry(l.slot.clone()).or_insert(0);
                if l.seq < *seen && !(l.seq == 0 && *seen == 0) {
                    continue;
                }
                *seen = (*seen).max(l.seq);
                let replica = macula_workloads::wire::parse_slot(&l.slot).map_or(0, |s| s.2);
                out.push_str(
                    &json!({"replica": replica, "slot": l.slot, "seq": l.seq,
                    "stream": if l.stderr { "stderr" } else { "stdout" }, "text": l.text})
                    .to_string(),
                );
                out.push('\n');
            }
            // A cursor that has seen nothing yet still marks the first round as done.
            cursor.entry(String::new()).or_insert(0);
            let next = q.follow.then_some(cursor);
            Some((Ok::<_, std::convert::Infallible>(out), next))
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}
