//! A Kubernetes-style API over the realm's workloads, enough for `kubectl` to `apply`, `get`,
//! `scale`, `delete` Deployments and Jobs and to read (and follow) their pods' logs. The realm
//! is the namespace and a realm key is the bearer token (`kubectl --token sk_live_...`).
//!
//! Served: discovery (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/apps/v1`,
//! `/apis/batch/v1`); `deployments` and `jobs` (list, get, create, replace, patch, delete, and a
//! Deployment's `scale` subresource); `pods` (list, get, `log`). A Deployment or Job is stored
//! as the deploy record of a workload, signed with the bearer key on this node as
//! `/v1/realms/{realm}/payloads` does: the same checks (`realm:deploy`), the same record flooded
//! to the mesh. Pods are the replicas the nodes report: `NAME-i` (and `NAME-i-vN` for the
//! previous version's replica during a rolling update). Lists answer `Table`s when kubectl asks
//! for them, so `kubectl get` prints the usual columns.
//!
//! Patches: JSON merge patches, strategic merge patches (lists of containers, env, volumes by
//! name and ports by `containerPort`, as Kubernetes merges them; other lists are replaced) and
//! server-side apply (the applied object merged onto the live one). JSON patches are refused.
//! A workload deployed in Macula's own format is shown as a Deployment or Job and may be
//! scaled or deleted here; changing it is refused (with a message that says how).

#[allow(unused_imports)]
use super::*;

use axum::body::Bytes;
use axum::Extension;
use macula_workloads::wire::{ReplicaStatus, Summary};
use macula_workloads::Manifest;
use serde_json::{Map, Value as J};

use super::workloads::{fail, realm_key, sign_and_take, summaries, Failure, Kind};
use crate::workloads::Controller;

/// The API's two resources of workloads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Res {
    Deployments,
    Jobs,
}

impl Res {
    fn of(resource: &str) -> Option<Res> {
        match resource {
            "deployments" => Some(Res::Deployments),
            "jobs" => Some(Res::Jobs),
            _ => None,
        }
    }
    fn kind(self) -> Kind {
        match self {
            Res::Deployments => Kind::Payload,
            Res::Jobs => Kind::Job,
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Res::Deployments => "apps/v1",
            Res::Jobs => "batch/v1",
        }
    }
    fn kind_name(self) -> &'static str {
        match self {
            Res::Deployments => "Deployment",
            Res::Jobs => "Job",
        }
    }
    fn group(self) -> &'static str {
        match self {
            Res::Deployments => "apps",
            Res::Jobs => "batch",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Res::Deployments => "deployments",
            Res::Jobs => "jobs",
        }
    }
}

/// A Kubernetes `Status` for a failure.
fn status(f: Failure, res: &str, name: &str) -> Response {
    let reason = match f.status.as_u16() {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 if f.code == "already_exists" => "AlreadyExists",
        409 => "Conflict",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        _ => "InternalError",
    };
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f.message, "reason": reason,
        "details": {"name": name, "kind": res}, "code": f.status.as_u16(),
    });
    (f.status, Json(body)).into_response()
}

fn not_found(res: &str, name: &str, realm: &str) -> Failure {
    fail(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{res} \"{name}\" not found in namespace {realm}"),
    )
}

// ---- discovery ----

pub(super) async fn version() -> Json<J> {
    Json(json!({
        "major": "1", "minor": "32",
        "gitVersion": format!("v1.32.0+macula-{}", env!("CARGO_PKG_VERSION")),
        "platform": "linux/amd64",
    }))
}

pub(super) async fn api() -> Json<J> {
    Json(json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}))
}

fn group(name: &str) -> J {
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
}

pub(super) async fn apis() -> Json<J> {
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1",
        "groups": [group("apps"), group("batch")]}))
}

pub(super) async fn api_group(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "apps" | "batch" => {
            let mut g = group(&name);
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            Json(g).into_response()
        }
        _ => status(not_found("groups", &name, "-"), "groups", &name),
    }
}

fn resource(name: &str, kind: &str, verbs: &[&str], short: &[&str]) -> J {
    json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": true, "kind": kind,
           "verbs": verbs, "shortNames": short})
}

const RW: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

pub(super) async fn core_v1() -> Json<J> {
    Json(
        json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            resource("pods", "Pod", &["get", "list"], &["po"]),
            resource("pods/log", "Pod", &["get"], &[]),
            json!({"name": "namespaces", "singularName": "namespace", "namespaced": false,
                   "kind": "Namespace", "verbs": ["get"], "shortNames": ["ns"]}),
        ]}),
    )
}

pub(super) async fn group_v1(Path(name): Path<String>) -> Response {
    let resources = match name.as_str() {
        "apps" => vec![
            resource("deployments", "Deployment", RW, &["deploy"]),
            json!({"name": "deployments/scale", "singularName": "", "namespaced": true,
                   "group": "autoscaling", "version": "v1", "kind": "Scale",
                   "verbs": ["get", "patch", "update"]}),
        ],
        "batch" => vec![resource("jobs", "Job", RW, &[])],
        _ => return status(not_found("groups", &name, "-"), "groups", &name),
    };
    Json(
        json!({"kind": "APIResourceList", "groupVersion": format!("{name}/v1"),
                "resources": resources}),
    )
    .into_response()
}

/// `/openapi/v3`: where each group's document is. kubectl reads them to learn that this server
/// validates objects itself (the `fieldValidation` parameter of each PATCH), and then sends
/// `fieldValidation=Strict` (which is how manifests are read here anyway: an unknown field is
/// an error).
pub(super) async fn openapi_root() -> Json<J> {
    let doc =
        |path: &str| json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=macula-1")});
    Json(json!({"paths": {
        "api/v1": doc("api/v1"), "apis/apps/v1": doc("apis/apps/v1"), "apis/batch/v1": doc("apis/batch/v1"),
    }}))
}

/// `/openapi/v2`: an OpenAPI v2 document with no definitions, in protobuf when asked (older
/// kubectl reads only that). Its client-side validation skips kinds the document does not
/// define, and the server validates every object strictly anyway.
pub(super) async fn openapi_v2(headers: HeaderMap) -> Response {
    let proto = headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.contains("protobuf"));
    if proto {
        // A gnostic `openapi_v2.Document` with only `swagger: "2.0"` (field 1, a string).
        let body: &'static [u8] = b"\x0a\x032.0";
        return ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    }
    Json(
        json!({"swagger": "2.0", "info": {"title": "Macula", "version": env!("CARGO_PKG_VERSION")},
                "paths": {}, "definitions": {}}),
    )
    .into_response()
}

fn openapi_doc(ops: &[(&str, &str, &str, &str)]) -> J {
    let mut paths = Map::new();
    for (path, group, version, kind) in ops {
        let op = json!({
            "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": kind},
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(
            (*path).to_owned(),
            json!({"patch": op.clone(), "put": op.clone(), "get": op}),
        );
    }
    json!({"openapi": "3.0.0", "info": {"title": "Macula", "version": env!("CARGO_PKG_VERSION")},
           "paths": paths})
}

pub(super) async fn openapi_core() -> Json<J> {
    Json(openapi_doc(&[(
        "/api/v1/namespaces/{namespace}/pods/{name}",
        "",
        "v1",
        "Pod",
    )]))
}

pub(super) async fn openapi_group(Path(group): Path<String>) -> Response {
    let ops: &[(&str, &str, &str, &str)] = match group.as_str() {
        "apps" => &[
            (
                "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                "apps",
                "v1",
                "Deployment",
            ),
            (
                "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
                "autoscaling",
                "v1",
                "Scale",
            ),
        ],
        "batch" => &[(
            "/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            "batch",
            "v1",
            "Job",
        )],
        _ => return status(not_found("groups", &group, "-"), "groups", &group),
    };
    Json(openapi_doc(ops)).into_response()
}

pub(super) async fn namespace(
    State(node): State<Arc<Node>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(f) = realm_key(&node, &ns, &headers) {
        return status(f, "namespaces", &ns);
    }
    Json(
        json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns},
                "status": {"phase": "Active"}}),
    )
    .into_response()
}

// ---- objects ----

/// A stable id for (realm, name, first version) in the shape of a UUID.
fn uid(realm: &str, name: &str) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(format!("{realm}/{name}").as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The object as written, when it was written as a Kubernetes one.
fn written(text: &str) -> Option<J> {
    let v: J = serde_yaml_ng::from_str(text).ok()?;
    v.get("apiVersion").is_some().then_some(v)
}

/// The labels of a workload's pods: its template's, and Macula's own.
fn pod_labels(obj: &J, name: &str) -> Map<String, J> {
    let mut labels = obj
        .pointer("/spec/template/metadata/labels")
        .and_then(J::as_object)
        .cloned()
        .unwrap_or_default();
    labels.insert("macula.io/workload".into(), json!(name));
    labels
}

/// The object for a workload: as written (a Kubernetes manifest) or drawn from Macula's own
/// format, with its metadata and status.
fn object(res: Res, realm: &str, s: &Summary, text: &str, m: &Manifest) -> J {
    let w = m.workload();
    let mut obj = written(text).unwrap_or_else(|| {
        let mut c = json!({"name": w.name});
        match &w.artifact {
            macula_workloads::Artifact::Command(cmd) => {
                c["command"] = json!(cmd);
            }
            macula_workloads::Artifact::Image { image, command } => {
                c["image"] = json!(image);
                if let Some(cmd) = command {
                    c["command"] = json!(cmd);
                }
            }
        }
        if !w.args.is_empty() {
            c["args"] = json!(w.args);
        }
        let labels = json!({"app": w.name});
        let mut spec = json!({"template": {"metadata": {"labels": labels},
                                            "spec": {"containers": [c]}}});
        match m {
            Manifest::Payload(p) => {
                spec["replicas"] = json!(p.replicas);
                spec["selector"] = json!({"matchLabels": labels});
            }
            Manifest::Job(j) => {
                spec["completions"] = json!(j.completions);
                spec["parallelism"] = json!(j.parallelism);
                spec["backoffLimit"] = json!(j.backoff_limit);
            }
        }
        json!({"apiVersion": res.api_version(), "kind": res.kind_name(),
               "metadata": {"name": w.name, "annotations": {"macula.io/format": "macula"}},
               "spec": spec})
    });
    if let Some(meta) = obj.get_mut("metadata").and_then(J::as_object_mut) {
        meta.insert("name".into(), json!(s.name));
        meta.insert("namespace".into(), json!(realm));
        meta.insert("uid".into(), json!(uid(realm, &s.name)));
        meta.insert("resourceVersion".into(), json!(s.seq.to_string()));
        meta.insert("generation".into(), json!(s.seq));
        meta.insert(
            "creationTimestamp".into(),
            json!(crate::confdir::rfc3339(s.issued_at)),
        );
    }
    obj["status"] = match res {
        Res::Deployments => json!({
            "observedGeneration": s.seq, "replicas": s.running, "updatedReplicas": s.updated,
            "readyReplicas": s.updated, "availableReplicas": s.updated,
            "unavailableReplicas": s.desired.saturating_sub(s.updated),
        }),
        Res::Jobs => {
            let mut st = json!({"active": s.running, "succeeded": s.succeeded, "failed": s.failed,
                                "startTime": crate::confdir::rfc3339(s.issued_at)});
            let condition = match s.state.as_str() {
                "complete" => Some(("Complete", "")),
                "failed" => Some(("Failed", s.detail.as_deref().unwrap_or_default())),
                _ => None,
            };
            if let Some((t, msg)) = condition {
                st["conditions"] = json!([{"type": t, "status": "True", "message": msg}]);
            }
            st
        }
    };
    obj
}

/// A pod for a replica (`current`: the workload's version now).
fn pod(realm: &str, r: &ReplicaStatus, current: u64, labels: &Map<String, J>) -> J {
    let name = pod_name(r, current);
    let phase = match r.state.as_str() {
        "running" | "starting" | "backoff" => "Running",
        "succeeded" => "Succeeded",
        "failed" => "Failed",
        _ => "Pending",
    };
    let state = match r.state.as_str() {
        "running" => json!({"running": {"startedAt": crate::confdir::rfc3339(r.since)}}),
        "succeeded" | "failed" => {
            json!({"terminated": {"exitCode": i32::from(r.state == "failed"),
                                   "reason": if r.state == "failed" { "Error" } else { "Completed" }}})
        }
        _ => {
            json!({"waiting": {"reason": if r.state == "backoff" { "CrashLoopBackOff" } else { "ContainerCreating" },
                                 "message": r.detail}})
        }
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": realm, "labels": labels,
                     "uid": uid(realm, &name),
                     "creationTimestamp": crate::confdir::rfc3339(r.since),
                     "annotations": {"macula.io/fencing-token": r.token.to_string(),
                                     "macula.io/since": r.since.to_string(),
                                     "macula.io/version": r.seq.to_string()}},
        "spec": {"nodeName": r.node, "containers": [{"name": r.name}]},
        "status": {"phase": phase, "message": r.detail,
                   "conditions": [{"type": "Ready", "status": if r.ready { "True" } else { "False" }}],
                   "containerStatuses": [{"name": r.name, "ready": r.ready,
                                          "restartCount": r.restarts, "state": state}]},
    })
}

fn pod_name(r: &ReplicaStatus, current: u64) -> String {
    if r.seq == current || r.seq == 0 {
        format!("{}-{}", r.name, r.replica)
    } else {
        format!("{}-{}-v{}", r.name, r.replica, r.seq)
    }
}

/// A pod's workload and replica (`web-2`, `web-2-v3`).
fn parse_pod(pod: &str) -> Option<(&str, u32)> {
    let base = match pod.rsplit_once("-v") {
        Some((b, v)) if !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => pod,
    };
    let (name, i) = base.rsplit_once('-')?;
    Some((name, i.parse().ok()?))
}

/// Whether kubectl asked for a `Table` (what `kubectl get` prints).
fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn table(columns: &[(&str, &str)], rows: Vec<(Vec<J>, J)>) -> J {
    let defs: Vec<J> = columns
        .iter()
        .map(|(n, t)| {
            json!({"name": n, "type": t, "format": if *n == "Name" { "name" } else { "" },
                   "description": "", "priority": 0})
        })
        .collect();
    let rows: Vec<J> = rows
        .into_iter()
        .map(|(cells, obj)| {
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                   "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
           "columnDefinitions": defs, "rows": rows})
}

fn age(since: u64) -> String {
    let s = now_secs().saturating_sub(since);
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// The realm's workloads of `res` (or one), each with its manifest text and replicas.
async fn current(
    node: &Node,
    ctrl: &Controller,
    realm: &str,
    res: Res,
    only: Option<&str>,
) -> Vec<(Summary, Vec<ReplicaStatus>, String, Manifest)> {
    let found = summaries(node, ctrl, realm, res.kind(), only).await;
    let records = node.workloads.records.lock();
    found
        .into_iter()
        .filter_map(|(s, r)| {
            let text = records.get(realm, &s.name)?.manifest.clone()?;
            let m = macula_workloads::parse(&text).ok()?;
            Some((s, r, text, m))
        })
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListQuery {
    label_selector: Option<String>,
    field_selector: Option<String>,
    watch: Option<String>,
}

/// `k=v,k2=v2` (equality only; anything else matches nothing).
fn selects(selector: Option<&str>, labels: &Map<String, J>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => {
            let v = v.trim_start_matches('=');
            labels.get(k.trim()).and_then(J::as_str) == Some(v.trim())
        }
        None => false,
    })
}

fn name_selected(field_selector: Option<&str>, name: &str) -> bool {
    field_selector
        .and_then(|f| f.strip_prefix("metadata.name="))
        .is_none_or(|n| n == name)
}

/// Deployments or jobs as the `Table` kubectl prints (`kubectl get deployments|jobs [NAME]`).
fn workload_table(res: Res, items: Vec<(Summary, J)>) -> J {
    let rows = items
        .into_iter()
        .map(|(s, o)| {
            let cells = match res {
                Res::Deployments => vec![
                    json!(s.name),
                    json!(format!("{}/{}", s.updated, s.desired)),
                    json!(s.updated),
                    json!(s.updated),
                    json!(age(s.issued_at)),
                ],
                Res::Jobs => vec![
                    json!(s.name),
                    json!(match s.state.as_str() {
                        "complete" => "Complete",
                        "failed" => "Failed",
                        _ => "Running",
                    }),
                    json!(format!("{}/{}", s.succeeded, s.desired)),
                    json!(age(s.issued_at)),
                ],
            };
            (cells, o)
        })
        .collect();
    let columns: &[(&str, &str)] = match res {
        Res::Deployments => &[
            ("Name", "string"),
            ("Ready", "string"),
            ("Up-to-date", "integer"),
            ("Available", "integer"),
            ("Age", "string"),
        ],
        Res::Jobs => &[
            ("Name", "string"),
            ("Status", "string"),
            ("Completions", "string"),
            ("Age", "string"),
        ],
    };
    table(columns, rows)
}

pub(super) async fn list(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((group, ns, resource)): Path<(String, String, String)>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(res) = Res::of(&resource).filter(|r| r.group() == group) else {
        return status(not_found(&resource, "", &ns), &resource, "");
    };
    if let Err(f) = realm_key(&node, &ns, &headers) {
        return status(f, res.name(), "");
    }
    let items: Vec<(Summary, J)> = current(&node, &ctrl, &ns, res, None)
        .await
        .into_iter()
        .filter(|(s, ..)| name_selected(q.field_selector.as_deref(), &s.name))
        .map(|(s, _, text, m)| {
            let o = object(res, &ns, &s, &text, &m);
            (s, o)
        })
        .collect();
    if q.watch.as_deref().is_some_and(|w| w == "true" || w == "1") {
        return watch(node, ctrl, ns, res, q.field_selector, items).await;
    }
    if wants_table(&headers) {
        return Json(workload_table(res, items)).into_response();
    }
    let items: Vec<J> = items.into_iter().map(|(_, o)| o).collect();
    Json(
        json!({"kind": format!("{}List", res.kind_name()), "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": "0"}, "items": items}),
    )
    .into_response()
}

/// A watch (what `kubectl delete` waits with): the objects as they are now, then each change
/// seen every half second, as JSON lines, until the client goes (at most 10 minutes).
async fn watch(
    node: Arc<Node>,
    ctrl: Arc<Controller>,
    ns: String,
    res: Res,
    field_selector: Option<String>,
    first: Vec<(Summary, J)>,
) -> Response {
    type Seen = std::collections::BTreeMap<String, (u64, J)>;
    let seen: Seen = first
        .into_iter()
        .map(|(s, o)| (s.name.clone(), (s.seq, o)))
        .collect();
    let started = Instant::now();
    let stream = futures_util::stream::unfold(Some(seen), move |seen| {
        let (node, ctrl, ns, fs) = (
            node.clone(),
            ctrl.clone(),
            ns.clone(),
            field_selector.clone(),
        );
        async move {
            let seen = seen?;
            if started.elapsed() > Duration::from_secs(600) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now: Seen = current(&node, &ctrl, &ns, res, None)
                .await
                .into_iter()
                .filter(|(s, ..)| name_selected(fs.as_deref(), &s.name))
                .map(|(s, _, text, m)| {
                    let o = object(res, &ns, &s, &text, &m);
                    (s.name.clone(), (s.seq, o))
                })
                .collect();
            let mut out = String::new();
            for (name, (seq, o)) in &now {
                let kind = match seen.get(name) {
                    None => "ADDED",
                    Some((old, _)) if old != seq => "MODIFIED",
                    _ => continue,
                };
                out.push_str(&json!({"type": kind, "object": o}).to_string());
                out.push('\n');
            }
            for (name, (_, o)) in &seen {
                if !now.contains_key(name) {
                    out.push_str(&json!({"type": "DELETED", "object": o}).to_string());
                    out.push('\n');
                }
            }
            Some((Ok::<_, std::convert::Infallible>(out), Some(now)))
        }
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

pub(super) async fn get_one(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((group, ns, resource, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(res) = Res::of(&resource).filter(|r| r.group() == group) else {
        return status(not_found(&resource, &name, &ns), &resource, &name);
    };
    if let Err(f) = realm_key(&node, &ns, &headers) {
        return status(f, res.name(), &name);
    }
    match current(&node, &ctrl, &ns, res, Some(&name)).await.first() {
        Some((s, _, text, m)) if wants_table(&headers) => {
            let o = object(res, &ns, s, text, m);
            Json(workload_table(res, vec![(s.clone(), o)])).into_response()
        }
        Some((s, _, text, m)) => Json(object(res, &ns, s, text, m)).into_response(),
        None => status(not_found(res.name(), &name, &ns), res.name(), &name),
    }
}

/// An object from a request body (JSON or YAML), of `res`, in namespace `ns`, with server-set
/// fields taken out: what is stored as the workload's manifest.
fn body_object(
    res: Res,
    ns: &str,
    body: &[u8],
    name: Option<&str>,
) -> Result<(String, J), Failure> {
    let text = std::str::from_utf8(body).map_err(|_| {
        fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body is not UTF-8",
        )
    })?;
    let mut obj: J = serde_yaml_ng::from_str(text).map_err(|e| {
        fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not an object: {e}"),
        )
    })?;
    let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
    if kind != res.kind_name() || obj["apiVersion"] != res.api_version() {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "this is {}/{kind}: {} takes {}/{}",
                obj["apiVersion"].as_str().unwrap_or("?"),
                res.name(),
                res.api_version(),
                res.kind_name()
            ),
        ));
    }
    let n = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if n.is_empty() {
        return Err(fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_manifest",
            "metadata.name: required",
        ));
    }
    if name.is_some_and(|x| x != n) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the name of the object ({n}) does not match the name in the URL"),
        ));
    }
    match obj["metadata"]["namespace"].as_str() {
        Some(x) if x != ns => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                "the namespace of the object ({x}) does not match the namespace in the URL ({ns})"
            ),
            ))
        }
        _ => {}
    }
    clean(&mut obj);
    Ok((n, obj))
}

/// Takes out what the server sets (status, ids, versions, timestamps).
fn clean(obj: &mut J) {
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    if let Some(m) = obj.get_mut("metadata").and_then(J::as_object_mut) {
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
            "selfLink",
        ] {
            m.remove(k);
        }
        m.remove("namespace");
    }
}

/// Stores `obj` as workload `name`'s next version (`create`: a new one).
async fn store(
    node: &Arc<Node>,
    ctrl: &Controller,
    (key, ns): (&str, &str),
    res: Res,
    name: &str,
    obj: &J,
    create: bool,
) -> Response {
    let text = match serde_json::to_string_pretty(obj) {
        Ok(t) => t,
        Err(e) => {
            return status(
                fail(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
                res.name(),
                name,
            )
        }
    };
    match sign_and_take(
        node.clone(),
        ns,
        key,
        name,
        Some(text.clone()),
        res.kind(),
        create,
    )
    .await
    {
        Ok(r) => {
            let m = match macula_workloads::parse(&text) {
                Ok(m) => m,
                Err(e) => {
                    return status(
                        fail(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "invalid_manifest",
                            e.to_string(),
                        ),
                        res.name(),
                        name,
                    )
                }
            };
            let replicas = ctrl.local_status(ns);
            let s = macula_workloads::wire::summarize(
                name,
                r.seq,
                r.issued_at,
                &m,
                &replicas,
                now_secs(),
            );
            let code = if create {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, Json(object(res, ns, &s, &text, &m))).into_response()
        }
        Err(f) => status(f, res.name(), name),
    }
}

pub(super) async fn create(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((group, ns, resource)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(res) = Res::of(&resource).filter(|r| r.group() == group) else {
        return status(not_found(&resource, "", &ns), &resource, "");
    };
    let key = match realm_key(&node, &ns, &headers) {
        Ok(k) => k,
        Err(f) => return status(f, res.name(), ""),
    };
    match body_object(res, &ns, &body, None) {
        Ok((name, obj)) => store(&node, &ctrl, (&key, &ns), res, &name, &obj, true).await,
        Err(f) => status(f, res.name(), ""),
    }
}

/// The live object of `name` as stored (a Kubernetes manifest), or why it cannot be changed
/// here.
fn live(node: &Node, ns: &str, res: Res, name: &str) -> Result<J, Failure> {
    let records = node.workloads.records.lock();
    let text = records
        .get(ns, name)
        .and_then(|r| r.manifest.clone())
        .ok_or_else(|| not_found(res.name(), name, ns))?;
    drop(records);
    let m = macula_workloads::parse(&text)
        .map_err(|e| fail(StatusCode::CONFLICT, "conflict", e.to_string()))?;
    if Kind::of(&m) != res.kind() {
        return Err(not_found(res.name(), name, ns));
    }
    written(&text).ok_or_else(|| {
        fail(
            StatusCode::CONFLICT,
            "conflict",
            format!("{name} was deployed in Macula's own format: change it with `macula deploy -f` (here it may only be scaled or deleted)"),
        )
    })
}

pub(super) async fn replace(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((group, ns, resource, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(res) = Res::of(&resource).filter(|r| r.group() == group) else {
        return status(not_found(&resource, &name, &ns), &resource, &name);
    };
    let key = match realm_key(&node, &ns, &headers) {
        Ok(k) => k,
        Err(f) => return status(f, res.name(), &name),
    };
    if let Err(f) = live(&node, &ns, res, &name) {
        return status(f, res.name(), &name);
    }
    match body_object(res, &ns, &body, Some(&name)) {
        Ok((name, obj)) => store(&node, &ctrl, (&key, &ns), res, &name, &obj, false).await,
        Err(f) => status(f, res.name(), &name),
    }
}

pub(super) async fn patch(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((group, ns, resource, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(res) = Res::of(&resource).filter(|r| r.group() == group) else {
        return status(not_found(&resource, &name, &ns), &resource, &name);
    };
    let key = match realm_key(&node, &ns, &headers) {
        Ok(k) => k,
        Err(f) => return status(f, res.name(), &name),
    };
    let mut obj = match live(&node, &ns, res, &name) {
        Ok(o) => o,
        Err(f) => return status(f, res.name(), &name),
    };
    if let Err(f) = apply_patch(&mut obj, &headers, &body) {
        return status(f, res.name(), &name);
    }
    let bytes = serde_json::to_vec(&obj).unwrap_or_default();
    match body_object(res, &ns, &bytes, Some(&name)) {
        Ok((name, obj)) => store(&node, &ctrl, (&key, &ns), res, &name, &obj, false).await,
        Err(f) => status(f, res.name(), &name),
    }
}

/// Applies a patch body to `obj` by its content type.
fn apply_patch(obj: &mut J, headers: &HeaderMap, body: &[u8]) -> Result<(), Failure> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let text = std::str::from_utf8(body).map_err(|_| {
        fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the patch is not UTF-8",
        )
    })?;
    let parse = || -> Result<J, Failure> {
        serde_yaml_ng::from_str(text).map_err(|e| {
            fail(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the patch is not an object: {e}"),
            )
        })
    };
    if ct.starts_with("application/merge-patch+json")
        || ct.starts_with("application/apply-patch+yaml")
    {
        merge(obj, &parse()?, false);
        Ok(())
    } else if ct.starts_with("application/strategic-merge-patch+json") {
        merge(obj, &parse()?, true);
        Ok(())
    } else {
        Err(fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_patch",
            format!("patches of type {ct:?} are not supported here: use a merge or strategic merge patch"),
        ))
    }
}

/// The key that lists of a strategic merge patch are merged by (Kubernetes' `patchMergeKey`
/// of the fields Macula reads); lists not named here are replaced.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets" => Some("name"),
        "ports" => Some("containerPort"),
        "volumeMounts" => Some("mountPath"),
        _ => None,
    }
}

/// A JSON merge patch (RFC 7386), or with `strategic`, Kubernetes' strategic merge patch for
/// the lists [`merge_key`] names (items merged by key, `$patch: delete` removing one) and its
/// directives ignored where they change nothing here.
fn merge(target: &mut J, patch: &J, strategic: bool) {
    let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) else {
        *target = strip(patch);
        return;
    };
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(J::Array(items)), J::Array(changes)) if strategic && merge_key(k).is_some() => {
                let key = merge_key(k).unwrap_or("name");
                for c in changes {
                    let id = c.get(key).cloned();
                    let pos = items
                        .iter()
                        .position(|i| id.is_some() && i.get(key) == id.as_ref());
                    let delete = c.get("$patch").and_then(J::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            items.remove(i);
                        }
                        (Some(i), false) => merge(&mut items[i], c, true),
                        (None, false) => items.push(strip(c)),
                        (None, true) => {}
                    }
                }
            }
            (Some(old @ J::Object(_)), J::Object(_)) => merge(old, v, strategic),
            _ => {
                t.insert(k.clone(), strip(v));
            }
        }
    }
}

/// A patch value without its directives or nulls.
fn strip(v: &J) -> J {
    match v {
        J::Object(o) => J::Object(
            o.iter()
                .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        J::Array(a) => J::Array(a.iter().map(strip).collect()),
        v => v.clone(),
    }
}

pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    Path((group, ns, resource, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(res) = Res::of(&resource).filter(|r| r.group() == group) else {
        return status(not_found(&resource, &name, &ns), &resource, &name);
    };
    let key = match realm_key(&node, &ns, &headers) {
        Ok(k) => k,
        Err(f) => return status(f, res.name(), &name),
    };
    match sign_and_take(node.clone(), &ns, &key, &name, None, res.kind(), false).await {
        Ok(_) => Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success", "details": {"name": name, "group": res.group(), "kind": res.name()}}))
        .into_response(),
        Err(f) => status(f, res.name(), &name),
    }
}

// ---- scale ----

fn scale_object(ns: &str, name: &str, seq: u64, desired: u32, running: u32, selector: &str) -> J {
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
           "metadata": {"name": name, "namespace": ns, "resourceVersion": seq.to_string(),
                        "uid": uid(ns, name)},
           "spec": {"replicas": desired},
           "status": {"replicas": running, "selector": selector}})
}

/// Whether a `.../{resource}/{name}/scale` path is a Deployment's.
fn is_scale(group: &str, resource: &str) -> bool {
    group == "apps" && resource == "deployments"
}

pub(super) async fn get_scale(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((group, ns, resource, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !is_scale(&group, &resource) {
        return status(not_found(&resource, &name, &ns), &resource, &name);
    }
    if let Err(f) = realm_key(&node, &ns, &headers) {
        return status(f, "deployments", &name);
    }
    match current(&node, &ctrl, &ns, Res::Deployments, Some(&name))
        .await
        .first()
    {
        Some((s, ..)) => Json(scale_object(
            &ns,
            &name,
            s.seq,
            s.desired,
            s.running,
            &format!("macula.io/workload={name}"),
        ))
        .into_response(),
        None => status(not_found("deployments", &name, &ns), "deployments", &name),
    }
}

/// `PUT` (a Scale) or `PATCH` (a patch of one) of a Deployment's scale: its replicas changed,
/// in whichever format it was deployed.
pub(super) async fn set_scale(
    State(node): State<Arc<Node>>,
    Path((group, ns, resource, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_scale(&group, &resource) {
        return status(not_found(&resource, &name, &ns), &resource, &name);
    }
    let key = match realm_key(&node, &ns, &headers) {
        Ok(k) => k,
        Err(f) => return status(f, "deployments", &name),
    };
    let text = {
        let records = node.workloads.records.lock();
        let t = records.get(&ns, &name).and_then(|r| r.manifest.clone());
        t
    };
    let Some(text) = text else {
        return status(not_found("deployments", &name, &ns), "deployments", &name);
    };
    let mut scale = json!({"spec": {}});
    if let Err(f) = apply_patch(&mut scale, &headers, &body).or_else(|f| {
        // A PUT sends the whole Scale.
        if f.status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            serde_json::from_slice(&body)
                .map(|v| scale = v)
                .map_err(|e| {
                    fail(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("not a Scale: {e}"),
                    )
                })
        } else {
            Err(f)
        }
    }) {
        return status(f, "deployments", &name);
    }
    let Some(replicas) = scale["spec"]["replicas"].as_u64() else {
        return status(
            fail(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "spec.replicas: required",
            ),
            "deployments",
            &name,
        );
    };
    let mut doc: J = serde_yaml_ng::from_str(&text).unwrap_or_default();
    match doc.get_mut("spec").filter(|_| written(&text).is_some()) {
        Some(spec) => spec["replicas"] = json!(replicas),
        None => doc["replicas"] = json!(replicas),
    }
    let new = serde_json::to_string_pretty(&doc).unwrap_or_default();
    match sign_and_take(
        node.clone(),
        &ns,
        &key,
        &name,
        Some(new),
        Kind::Payload,
        false,
    )
    .await
    {
        Ok(r) => Json(scale_object(
            &ns,
            &name,
            r.seq,
            replicas as u32,
            0,
            &format!("macula.io/workload={name}"),
        ))
        .into_response(),
        Err(f) => status(f, "deployments", &name),
    }
}

// ---- pods ----

async fn pods_of(node: &Node, ctrl: &Controller, ns: &str) -> Vec<J> {
    let mut out = vec![];
    for res in [Res::Deployments, Res::Jobs] {
        for (s, replicas, text, m) in current(node, ctrl, ns, res, None).await {
            let o = object(res, ns, &s, &text, &m);
            let mut labels = pod_labels(&o, &s.name);
            if res == Res::Jobs {
                labels.insert("job-name".into(), json!(s.name));
            }
            for r in replicas
                .iter()
                .filter(|r| r.state != "pending" || r.node.is_empty())
            {
                out.push(pod(ns, r, s.seq, &labels));
            }
        }
    }
    out
}

/// Pods as the `Table` kubectl prints (`kubectl get pods [NAME]`).
fn pod_table(pods: Vec<J>) -> J {
    let rows = pods
        .into_iter()
        .map(|p| {
            let st = &p["status"]["containerStatuses"][0];
            let ready = u8::from(st["ready"].as_bool().unwrap_or(false));
            let since = p["metadata"]["annotations"]["macula.io/since"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let phase = match &st["state"] {
                s if s.get("waiting").is_some() => s["waiting"]["reason"].clone(),
                s if s.get("terminated").is_some() => s["terminated"]["reason"].clone(),
                _ => p["status"]["phase"].clone(),
            };
            let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
            let cells = vec![
                p["metadata"]["name"].clone(),
                json!(format!("{ready}/1")),
                phase,
                st["restartCount"].clone(),
                json!(age(since)),
                json!(if node.is_empty() {
                    "<none>"
                } else {
                    &node[node.len().saturating_sub(8)..]
                }),
            ];
            (cells, p)
        })
        .collect();
    let columns = [
        ("Name", "string"),
        ("Ready", "string"),
        ("Status", "string"),
        ("Restarts", "integer"),
        ("Age", "string"),
        ("Node", "string"),
    ];
    table(&columns, rows)
}

pub(super) async fn list_pods(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(f) = realm_key(&node, &ns, &headers) {
        return status(f, "pods", "");
    }
    let pods: Vec<J> = pods_of(&node, &ctrl, &ns)
        .await
        .into_iter()
        .filter(|p| {
            let labels = p["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            selects(q.label_selector.as_deref(), &labels)
                && name_selected(
                    q.field_selector.as_deref(),
                    p["metadata"]["name"].as_str().unwrap_or_default(),
                )
        })
        .collect();
    if wants_table(&headers) {
        return Json(pod_table(pods)).into_response();
    }
    Json(json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "0"}, "items": pods}))
        .into_response()
}

pub(super) async fn get_pod(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(f) = realm_key(&node, &ns, &headers) {
        return status(f, "pods", &name);
    }
    match pods_of(&node, &ctrl, &ns)
        .await
        .into_iter()
        .find(|p| p["metadata"]["name"] == name)
    {
        Some(p) if wants_table(&headers) => Json(pod_table(vec![p])).into_response(),
        Some(p) => Json(p).into_response(),
        None => status(not_found("pods", &name, &ns), "pods", &name),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct PodLogQuery {
    #[serde(default)]
    follow: Option<String>,
}

/// `GET .../pods/{pod}/log[?follow=true]`: the replica's output as plain lines.
pub(super) async fn pod_log(
    State(node): State<Arc<Node>>,
    Extension(ctrl): Extension<Arc<Controller>>,
    Path((ns, pod)): Path<(String, String)>,
    Query(q): Query<PodLogQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(f) = realm_key(&node, &ns, &headers) {
        return status(f, "pods", &pod);
    }
    let Some((name, i)) = parse_pod(&pod) else {
        return status(not_found("pods", &pod, &ns), "pods", &pod);
    };
    if node
        .workloads
        .records
        .lock()
        .get(&ns, name)
        .and_then(|r| r.manifest.as_ref())
        .is_none()
    {
        return status(not_found("pods", &pod, &ns), "pods", &pod);
    }
    let follow = q.follow.as_deref().is_some_and(|f| f == "true" || f == "1");
    super::workloads::stream_logs(ctrl, ns, name.to_owned(), Some(i), follow, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strategic_merge_patch_merges_containers_by_name_and_replaces_other_lists() {
        let mut obj = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "K", "value": "1"}], "args": ["p"]},
            {"name": "b", "image": "y:1"}]}}}});
        let patch = json!({"spec": {"replicas": 3, "template": {"spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [
                {"name": "a", "image": "x:2", "env": [{"name": "L", "value": "2"}], "args": ["q"]},
                {"name": "b", "$patch": "delete"}]}}}});
        merge(&mut obj, &patch, true);
        assert_eq!(
            obj,
            json!({"spec": {"replicas": 3, "template": {"spec": {"containers": [
            {"name": "a", "image": "x:2", "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "2"}], "args": ["q"]}]}}}})
        );
        // A merge patch replaces lists and deletes with null.
        let mut obj = json!({"a": [1, 2], "b": {"c": 1, "d": 2}});
        merge(&mut obj, &json!({"a": [3], "b": {"c": null}}), false);
        assert_eq!(obj, json!({"a": [3], "b": {"d": 2}}));
    }

    #[test]
    fn pods_name_their_workload_and_replica() {
        assert_eq!(parse_pod("web-2"), Some(("web", 2)));
        assert_eq!(parse_pod("my-web-12-v3"), Some(("my-web", 12)));
        assert_eq!(parse_pod("web"), None);
        assert_eq!(parse_pod("web-x"), None);
    }

    #[test]
    fn label_selectors_match_equalities() {
        let labels: Map<String, J> = [
            ("app".to_owned(), json!("web")),
            ("tier".to_owned(), json!("a")),
        ]
        .into_iter()
        .collect();
        assert!(selects(None, &labels));
        assert!(selects(Some("app=web"), &labels));
        assert!(selects(Some("app==web,tier=a"), &labels));
        assert!(!selects(Some("app=api"), &labels));
        assert!(!selects(Some("app!=web"), &labels));
    }
}
