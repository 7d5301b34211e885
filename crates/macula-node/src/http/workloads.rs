//! `/v1/realms/{realm}/workloads`: deploy records. `POST` takes a signed record (the key
//! holder's signature is the authorization: no other credential is needed to hand one in) and
//! floods it to the mesh; `GET` lists the realm's records to a key of the realm.
//!
//! `/v1/realms/{realm}/payloads` and `/jobs`: the same records as plain REST for clients that
//! sign nothing themselves. A manifest sent with a realm key (`Authorization: Bearer
//! sk_live_...`) is made into a record signed *with that key* here (the key's holder secret is
//! in it), so what the nodes check is the same: the key's role must have `realm:deploy`.

#[allow(unused_imports)]
use super::*;

use axum::Extension;
use macula_workloads::record::{DeployRecord, Refused};

use crate::workloads::Controller;

/// A refused request: its HTTP status, a code and a message (answered as
/// `{"error": {"code", "message"}}`, or as a Kubernetes `Status` on that API).
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

pub(crate) fn fail(status: StatusCode, code: &str, message: impl Into<String>) -> Failure {
    Failure {
        status,
        code: code.to_owned(),
        message: message.into(),
    }
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    fail(status, code, message).into_response()
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
    hand_in(node, &realm, record).await
}

/// Takes `record` (for `realm`) as a node takes one from the mesh, floods it, and answers
/// with its name and sequence, or why it was refused.
pub(crate) async fn hand_in(node: Arc<Node>, realm: &str, record: DeployRecord) -> Response {
    match take(node, realm, record).await {
        Ok(r) => answer(&r),
        Err(f) => f.into_response(),
    }
}

/// The answer to a record taken: 201 for a first version, 200 after.
fn answer(r: &DeployRecord) -> Response {
    let status = if r.seq == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(taken(r))).into_response()
}

/// What a taken record is answered with.
fn taken(r: &DeployRecord) -> serde_json::Value {
    json!({"realm": r.realm, "name": r.name, "seq": r.seq, "deleted": r.manifest.is_none()})
}

/// Takes `record` (for `realm`) as a node takes one from the mesh and floods it; or why not.
pub(crate) async fn take(
    node: Arc<Node>,
    realm: &str,
    record: DeployRecord,
) -> Result<DeployRecord, Failure> {
    if record.realm != realm {
        return Err(fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_record",
            format!("the record is for realm {}, not {realm}", record.realm),
        ));
    }
    let taken = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || crate::workloads::accept(&node, record, true)).await
    };
    let Ok(taken) = taken else {
        return Err(fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the record could not be judged; nothing was changed",
        ));
    };
    let why = match taken {
        Ok(r) => {
            if let Some(m) = crate::mesh::of(&node) {
                crate::mesh::flood_record(m, &r, None);
            }
            return Ok(r);
        }
        Err(Refused::Stale { have }) => fail(
            StatusCode::CONFLICT,
            "stale_record",
            format!(
                "this node has a record of that workload with sequence {have}: sign a newer one"
            ),
        ),
        Err(Refused::Unverified(why)) => {
            fail(StatusCode::UNAUTHORIZED, errors::AUTHENTICATION_FAILED, why)
        }
        Err(Refused::Forbidden(why)) => fail(StatusCode::FORBIDDEN, errors::NOT_AUTHORIZED, why),
        Err(Refused::Invalid(why)) => {
            fail(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest", why)
        }
        Err(Refused::OverLimit { asked, limit }) => fail(
            StatusCode::FORBIDDEN,
            "plan_limit",
            format!(
                "{realm}'s plan allows {limit} instances at once (payload replicas and job runs at once, over all its workloads); with this deploy they would ask for {asked}: scale another workload down, or change the plan (macula plans)"
            ),
        ),
        Err(Refused::Full) => fail(
            StatusCode::CONFLICT,
            "too_many_workloads",
            format!(
                "{realm} has as many workloads as a node keeps ({} workloads, {} MiB of manifests): delete one first",
                macula_workloads::record::MAX_PER_REALM,
                macula_workloads::record::MAX_BYTES_PER_REALM >> 20
            ),
        ),
    };
    Err(why)
}

/// The realm key in `Authorization: Bearer ...`, valid, not revoked, and admitted to `realm`
/// (returned); or the answer that says why not.
pub(crate) fn realm_key(node: &Node, realm: &str, headers: &HeaderMap) -> Result<String, Failure> {
    let Some(key) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return Err(fail(
            StatusCode::UNAUTHORIZED,
            errors::AUTHENTICATION_FAILED,
            "send a key of the realm as `Authorization: Bearer sk_live_...`",
        ));
    };
    let auth = node.auth();
    let v = match auth.authenticator.verify(key, now_secs()) {
        Ok(v) if !auth.authenticator.is_revoked(&v.claims.kid) => v,
        Ok(_) => {
            return Err(fail(
                StatusCode::UNAUTHORIZED,
                errors::AUTHENTICATION_FAILED,
                "the key was revoked",
            ))
        }
        Err(e) => {
            return Err(fail(
                StatusCode::UNAUTHORIZED,
                errors::AUTHENTICATION_FAILED,
                e.to_string(),
            ))
        }
    };
    if let Err((uri, why)) = node.role_admitted(realm, &v.claims.realm, &v.claims.role) {
        return Err(fail(StatusCode::FORBIDDEN, uri, why));
    }
    Ok(key.to_owned())
}

/// `GET /v1/realms/{realm}/workloads` with `Authorization: Bearer <a key of the realm>`.
pub(super) async fn list_records(
    State(node): State<Arc<Node>>,
    Path(realm): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(f) = realm_key(&node, &realm, &headers) {
        return f.into_response();
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

/// `GET /v1/realms/{realm}/workloads/{name}/history`: the workload's current record and the
/// earlier versions this node keeps (newest first), for `macula rollout history|undo`.
pub(super) async fn history(
    State(node): State<Arc<Node>>,
    Path((realm, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(f) = realm_key(&node, &realm, &headers) {
        return f.into_response();
    }
    let records = node.workloads.records.lock();
    let Some(current) = records.get(&realm, &name) else {
        return error(
            StatusCode::NOT_FOUND,
            "no_such_workload",
            format!("{realm} has no workload named {name}"),
        );
    };
    let items: Vec<serde_json::Value> = std::iter::once(current)
        .chain(records.history(&realm, &name))
        .map(|r| {
            json!({"seq": r.seq, "deleted": r.manifest.is_none(),
                   "issued_at": crate::confdir::rfc3339(r.issued_at), "manifest": r.manifest})
        })
        .collect();
    Json(json!({"realm": realm, "name": name, "items": items})).into_response()
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
    if let Err(f) = realm_key(&node, &realm, &headers) {
        return f.into_response();
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
    if let Err(f) = realm_key(&node, &realm, &headers) {
        return f.into_response();
    }
    stream_logs(ctrl, realm, name, q.replica, q.follow, false)
}

/// The output of `realm`/`name`'s replicas (or `replica`) on every node that runs one: as JSON
/// lines (`{"replica","slot","seq","stream","text"}`), or the text alone (`plain`, as
/// Kubernetes serves a pod's log); with `follow`, new lines as they come until the client goes.
pub(crate) fn stream_logs(
    ctrl: Arc<Controller>,
    realm: String,
    name: String,
    replica: Option<u32>,
    follow: bool,
    plain: bool,
) -> Response {
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
            let lines = ctrl.gather_logs(&realm, &name, replica, &cursor).await;
            let mut out = String::new();
            for l in lines {
                let seen = cursor.entry(l.slot.clone()).or_insert(0);
                if l.seq < *seen && !(l.seq == 0 && *seen == 0) {
                    continue;
                }
                *seen = (*seen).max(l.seq);
                if plain {
                    out.push_str(&l.text);
                } else {
                    let replica = macula_workloads::wire::parse_slot(&l.slot).map_or(0, |s| s.2);
                    out.push_str(
                        &json!({"replica": replica, "slot": l.slot, "seq": l.seq,
                        "stream": if l.stderr { "stderr" } else { "stdout" }, "text": l.text})
                        .to_string(),
                    );
                }
                out.push('\n');
            }
            // A cursor that has seen nothing yet still marks the first round as done.
            cursor.entry(String::new()).or_insert(0);
            let next = follow.then_some(cursor);
            Some((Ok::<_, std::convert::Infallible>(out), next))
        }
    });
    let content_type = if plain {
        "text/plain; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    (
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// Which kind of workload a route serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Payload,
    Job,
}

impl Kind {
    pub(crate) fn of(m: &macula_workloads::Manifest) -> Kind {
        match m {
            macula_workloads::Manifest::Payload(_) => Kind::Payload,
            macula_workloads::Manifest::Job(_) => Kind::Job,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Kind::Payload => "payload",
            Kind::Job => "job",
        }
    }
}

/// The realm's live workloads of `kind` (all, or `only` one), summed up from the replicas the
/// nodes report, each with its replicas.
pub(crate) async fn summaries(
    node: &Node,
    ctrl: &Controller,
    realm: &str,
    kind: Kind,
    only: Option<&str>,
) -> Vec<(
    macula_workloads::wire::Summary,
    Vec<macula_workloads::wire::ReplicaStatus>,
)> {
    let live: Vec<(String, u64, u64, macula_workloads::Manifest)> = {
        let records = node.workloads.records.lock();
        let live = records
            .all()
            .filter(|r| r.realm == realm && only.is_none_or(|n| n == r.name))
            .filter_map(|r| {
                let m = macula_workloads::parse(r.manifest.as_deref()?).ok()?;
                (Kind::of(&m) == kind).then(|| (r.name.clone(), r.seq, r.issued_at, m))
            })
            .collect();
        live
    };
    if live.is_empty() {
        return vec![];
    }
    let replicas = ctrl.gather_status(realm).await;
    let now = now_secs();
    live.into_iter()
        .map(|(name, seq, issued_at, m)| {
            let s = macula_workloads::wire::summarize(&name, seq, issued_at, &m, &replicas, now);
            let mine = replicas
                .iter()
                .filter(|r| r.name == name)
                .cloned()
                .collect();
            (s, mine)
        })
        .collect()
}

fn summary_json(
    s: &macula_workloads::wire::Summary,
    replicas: &[macula_workloads::wire::ReplicaStatus],
) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["issued_at"] = json!(crate::confdir::rfc3339(s.issued_at));
    v["replicas"] = serde_json::to_value(replicas).unwrap_or_default();
    v
}

async fn list(
    node: Arc<Node>,
    ctrl: Arc<Controller>,
    realm: String,
    headers: HeaderMap,
    kind: Kind,
) -> Response {
    if let Err(f) = realm_key(&node, &realm, &headers) {
        return f.into_response();
    }
    let items: Vec<serde_json::Value> = summaries(&node, &ctrl, &realm, kind, None)
        .await
        .iter()
        .map(|(s, r)| summary_json(s, r))
        .collect();
    Json(json!({"realm": realm, "items": items})).into_response()
}

async fn one(
    node: Arc<Node>,
    ctrl: Arc<Controller>,
    realm: String,
    name: String,
    headers: HeaderMap,
    kind: Kind,
) -> Response {
    if let Err(f) = realm_key(&node, &realm, &headers) {
        return f.into_response();
    }
    match summaries(&node, &ctrl, &realm, kind, Some(&name))
        .await
        .first()
    {
        Some((s, r)) => Json(summary_json(s, r)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no_such_workload",
            format!("{realm} has no {} named {name}", kind.word()),
        ),
    }
}

/// Signs the next record of `name` (`manifest` None: a tombstone) with the bearer key and
/// hands it in. `kind` is what the route serves (a manifest of the other kind is refused);
/// `create` refuses a name that is live already.
pub(crate) async fn sign_and_take(
    node: Arc<Node>,
    realm: &str,
    key: &str,
    name: &str,
    manifest: Option<String>,
    kind: Kind,
    create: bool,
) -> Result<DeployRecord, Failure> {
    let current = {
        let records = node.workloads.records.lock();
        let found = records
            .all()
            .find(|r| r.realm == realm && r.name == name)
            .map(|r| (r.seq, r.manifest.clone()));
        found
    };
    let live_kind = current
        .as_ref()
        .and_then(|(_, m)| macula_workloads::parse(m.as_deref()?).ok())
        .map(|m| Kind::of(&m));
    match (&manifest, live_kind) {
        (Some(_), Some(_)) if create => {
            return Err(fail(
                StatusCode::CONFLICT,
                "already_exists",
                format!(
                    "{realm} has a workload named {name}: replace it with PUT, or delete it first"
                ),
            ))
        }
        (None, None) => {
            return Err(fail(
                StatusCode::NOT_FOUND,
                "no_such_workload",
                format!("{realm} has no {} named {name}", kind.word()),
            ))
        }
        (None, Some(k)) if k != kind => {
            return Err(fail(
                StatusCode::NOT_FOUND,
                "no_such_workload",
                format!("{name} in {realm} is a {}, not a {}", k.word(), kind.word()),
            ))
        }
        _ => {}
    }
    let Some(public) = macula_router::auth::credential::public_form(key) else {
        return Err(fail(
            StatusCode::FORBIDDEN,
            errors::NOT_AUTHORIZED,
            "this key cannot sign deploy records (a key of an older format): issue a new one",
        ));
    };
    let seq = current.map_or(0, |c| c.0) + 1;
    let record = DeployRecord::signed(realm, name, seq, manifest, now_secs(), &public, |d| {
        macula_router::auth::credential::bearer_proof(key, d)
    });
    let Some(record) = record else {
        return Err(fail(
            StatusCode::FORBIDDEN,
            errors::NOT_AUTHORIZED,
            "this key cannot sign deploy records",
        ));
    };
    take(node, realm, record).await
}

fn respond(r: Result<DeployRecord, Failure>) -> Response {
    match r {
        Ok(r) => answer(&r),
        Err(f) => f.into_response(),
    }
}

/// A manifest in a request body (YAML or JSON), of `kind`, with its workload's name.
fn manifest_of(body: &[u8], kind: Kind, name: Option<&str>) -> Result<(String, String), Response> {
    let text = std::str::from_utf8(body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_manifest",
            "the manifest is not UTF-8 text",
        )
    })?;
    let m = macula_workloads::parse(text).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_manifest",
            e.to_string(),
        )
    })?;
    if Kind::of(&m) != kind {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_manifest",
            format!(
                "this manifest is a {}: send it to /{}s",
                Kind::of(&m).word(),
                Kind::of(&m).word()
            ),
        ));
    }
    let n = m.workload().name.clone();
    if let Some(want) = name.filter(|w| **w != n) {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_manifest",
            format!("the manifest names {n}, the path {want}"),
        ));
    }
    Ok((n, text.to_owned()))
}

macro_rules! kind_routes {
    ($kind:expr, $list:ident, $get:ident, $create:ident, $replace:ident, $delete:ident) => {
        pub(super) async fn $list(
            State(node): State<Arc<Node>>,
            Extension(ctrl): Extension<Arc<Controller>>,
            Path(realm): Path<String>,
            headers: HeaderMap,
        ) -> Response {
            list(node, ctrl, realm, headers, $kind).await
        }

        pub(super) async fn $get(
            State(node): State<Arc<Node>>,
            Extension(ctrl): Extension<Arc<Controller>>,
            Path((realm, name)): Path<(String, String)>,
            headers: HeaderMap,
        ) -> Response {
            one(node, ctrl, realm, name, headers, $kind).await
        }

        pub(super) async fn $create(
            State(node): State<Arc<Node>>,
            Path(realm): Path<String>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> Response {
            let key = match realm_key(&node, &realm, &headers) {
                Ok(k) => k,
                Err(f) => return f.into_response(),
            };
            match manifest_of(&body, $kind, None) {
                Ok((name, text)) => {
                    // Created (also a name deleted before): 201.
                    match sign_and_take(node, &realm, &key, &name, Some(text), $kind, true).await {
                        Ok(r) => (StatusCode::CREATED, Json(taken(&r))).into_response(),
                        Err(f) => f.into_response(),
                    }
                }
                Err(r) => r,
            }
        }

        pub(super) async fn $replace(
            State(node): State<Arc<Node>>,
            Path((realm, name)): Path<(String, String)>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> Response {
            let key = match realm_key(&node, &realm, &headers) {
                Ok(k) => k,
                Err(f) => return f.into_response(),
            };
            match manifest_of(&body, $kind, Some(&name)) {
                Ok((name, text)) => respond(
                    sign_and_take(node, &realm, &key, &name, Some(text), $kind, false).await,
                ),
                Err(r) => r,
            }
        }

        pub(super) async fn $delete(
            State(node): State<Arc<Node>>,
            Path((realm, name)): Path<(String, String)>,
            headers: HeaderMap,
        ) -> Response {
            let key = match realm_key(&node, &realm, &headers) {
                Ok(k) => k,
                Err(f) => return f.into_response(),
            };
            respond(sign_and_take(node, &realm, &key, &name, None, $kind, false).await)
        }
    };
}

kind_routes!(
    Kind::Payload,
    list_payloads,
    get_payload,
    create_payload,
    replace_payload,
    delete_payload
);
kind_routes!(
    Kind::Job,
    list_jobs,
    get_job,
    create_job,
    replace_job,
    delete_job
);
