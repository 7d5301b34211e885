//! The Kubernetes-compatible subset: an `apps/v1` Deployment becomes a payload, a `batch/v1`
//! Job a job. The realm is the namespace.
//!
//! Accepted: one container with `image`, `command`, `args`, `env` (plain values), `resources`
//! (`limits`, else `requests`: `cpu`, `memory`), `ports`, `livenessProbe` and `readinessProbe`
//! (`httpGet`, `tcpSocket`, `exec` and their timing); the pod's `restartPolicy` and
//! `nodeSelector` (placement labels); a Deployment's `replicas` and rolling `strategy`; a Job's
//! `completions`, `parallelism`, `backoffLimit` and `activeDeadlineSeconds`. Fields that
//! change nothing here (`selector`, labels, `imagePullPolicy`, `terminationGracePeriodSeconds`,
//! `status`...) are accepted and ignored. Anything else is refused with its path, so a
//! manifest never means something other than what it says.
//!
//! The runtime is Podman with the container's image; the annotation
//! `macula.io/runtime: process` runs `command` + `args` as a native command instead.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::error::{FieldError, ManifestError, Problems};
use crate::manifest::doc::*;
use crate::manifest::{check, Manifest};

/// The annotation that picks the runtime.
pub const RUNTIME_ANNOTATION: &str = "macula.io/runtime";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Object {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: Spec,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    // Accepted, no effect here.
    #[serde(default)]
    #[allow(dead_code)]
    labels: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    creation_timestamp: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    generation: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    resource_version: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    uid: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    template: Template,
    // Deployment
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    strategy: Option<Strategy>,
    // Job
    #[serde(default)]
    completions: Option<u32>,
    #[serde(default)]
    parallelism: Option<u32>,
    #[serde(default)]
    backoff_limit: Option<u32>,
    #[serde(default)]
    active_deadline_seconds: Option<u64>,
    // Accepted, no effect here.
    #[serde(default)]
    #[allow(dead_code)]
    selector: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    progress_deadline_seconds: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    revision_history_limit: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    min_ready_seconds: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    ttl_seconds_after_finished: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Strategy {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    rolling_update: Option<RollingUpdate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RollingUpdate {
    #[serde(default)]
    max_surge: Option<u32>,
    #[serde(default)]
    max_unavailable: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Template {
    spec: PodSpec,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodSpec {
    containers: Vec<Container>,
    #[serde(default)]
    restart_policy: Option<String>,
    #[serde(default)]
    node_selector: BTreeMap<String, String>,
    // Accepted, no effect here.
    #[serde(default)]
    #[allow(dead_code)]
    termination_grace_period_seconds: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    dns_policy: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    scheduler_name: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Container {
    #[allow(dead_code)]
    name: String,
    image: String,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    resources: ContainerResources,
    #[serde(default)]
    ports: Vec<ContainerPort>,
    #[serde(default)]
    liveness_probe: Option<K8sProbe>,
    #[serde(default)]
    readiness_probe: Option<K8sProbe>,
    // Accepted, no effect here.
    #[serde(default)]
    #[allow(dead_code)]
    image_pull_policy: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    termination_message_path: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    termination_message_policy: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerResources {
    #[serde(default)]
    limits: Option<ResourceMap>,
    #[serde(default)]
    requests: Option<ResourceMap>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceMap {
    #[serde(default)]
    cpu: Option<Amount>,
    #[serde(default)]
    memory: Option<Amount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ContainerPort {
    container_port: u16,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sProbe {
    #[serde(default)]
    http_get: Option<HttpGet>,
    #[serde(default)]
    tcp_socket: Option<TcpSocket>,
    #[serde(default)]
    exec: Option<ExecCheckDoc>,
    #[serde(default)]
    initial_delay_seconds: Option<u64>,
    #[serde(default)]
    period_seconds: Option<u64>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    failure_threshold: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    success_threshold: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpGet {
    #[serde(default)]
    path: Option<String>,
    port: PortRefDoc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpSocket {
    port: PortRefDoc,
}

const CONTAINER: &str = "spec.template.spec.containers[0]";

/// Parses a Deployment or a Job of the accepted subset.
pub fn parse_k8s(text: &str) -> Result<Manifest, ManifestError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let o: Object = serde_path_to_error::deserialize(de).map_err(crate::error::from_serde)?;
    let job = match (o.api_version.as_str(), o.kind.as_str()) {
        ("apps/v1", "Deployment") => false,
        ("batch/v1", "Job") => true,
        (v, k) => {
            return Err(ManifestError::one(
                "kind",
                format!(
                    "{v} {k} is not accepted: Macula takes an apps/v1 Deployment or a batch/v1 Job"
                ),
            ))
        }
    };
    let containers = &o.spec.template.spec.containers;
    if containers.len() != 1 {
        return Err(ManifestError::one(
            "spec.template.spec.containers",
            format!(
                "{} containers: Macula runs exactly one per replica",
                containers.len()
            ),
        ));
    }
    let c = &containers[0];
    let process = match o
        .metadata
        .annotations
        .get(RUNTIME_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("podman") => false,
        Some("process") => true,
        Some(other) => {
            return Err(ManifestError::one(
                format!("metadata.annotations.{RUNTIME_ANNOTATION}"),
                format!("{other:?}: write `process` or `podman`"),
            ))
        }
    };
    let mut extra = vec![];
    for (i, p) in c.ports.iter().enumerate() {
        if p.protocol.as_deref().is_some_and(|pr| pr != "TCP") {
            extra.push(FieldError {
                path: format!("{CONTAINER}.ports[{i}].protocol"),
                message: "only TCP ports are supported".into(),
            });
        }
    }
    let probe = |p: &K8sProbe| ProbeDoc {
        http: p.http_get.as_ref().map(|h| HttpCheckDoc {
            path: h.path.clone(),
            port: h.port.clone(),
        }),
        tcp: p.tcp_socket.as_ref().map(|t| TcpCheckDoc {
            port: t.port.clone(),
        }),
        exec: p.exec.clone(),
        initial_delay: p.initial_delay_seconds.map(|s| format!("{s}s")),
        period: p.period_seconds.map(|s| format!("{s}s")),
        timeout: p.timeout_seconds.map(|s| format!("{s}s")),
        failure_threshold: p.failure_threshold,
    };
    let res = c
        .resources
        .limits
        .clone()
        .or_else(|| c.resources.requests.clone())
        .unwrap_or_default();
    let restart = match o.spec.template.spec.restart_policy.as_deref() {
        None => None,
        Some("Always") => Some("always".to_owned()),
        Some("OnFailure") => Some("on_failure".to_owned()),
        Some("Never") => Some("never".to_owned()),
        Some(other) => Some(other.to_owned()),
    };
    if let Some(s) = &o.spec.strategy {
        if s.kind.as_deref().is_some_and(|k| k != "RollingUpdate") {
            extra.push(FieldError {
                path: "spec.strategy.type".into(),
                message: "only RollingUpdate is supported".into(),
            });
        }
    }
    let doc = ManifestDoc {
        kind: if job { "job" } else { "payload" }.into(),
        name: o.metadata.name.clone(),
        realm: o.metadata.namespace.clone(),
        runtime: Some(if process { "process" } else { "podman" }.into()),
        network: None,
        package: None,
        command: if process {
            c.command.clone().map(|mut cmd| {
                cmd.extend(c.args.iter().cloned());
                cmd
            })
        } else {
            c.command.clone()
        },
        image: (!process).then(|| c.image.clone()),
        args: if process { vec![] } else { c.args.clone() },
        env: c
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        role: None,
        resources: ResourcesDoc {
            cpu: res.cpu,
            memory: res.memory,
            pids: None,
        },
        ports: c
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| PortDoc {
                name: p.name.clone().unwrap_or_else(|| format!("port-{i}")),
                port: Some(p.container_port),
            })
            .collect(),
        health: HealthDoc {
            liveness: c.liveness_probe.as_ref().map(probe),
            readiness: c.readiness_probe.as_ref().map(probe),
        },
        restart: RestartDoc {
            policy: restart,
            backoff: BackoffDoc::default(),
        },
        placement: PlacementDoc {
            labels: o.spec.template.spec.node_selector.clone(),
            region: None,
            spread: None,
        },
        replicas: if job {
            None
        } else {
            Some(o.spec.replicas.unwrap_or(1))
        },
        update: o
            .spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .map(|r| UpdateDoc {
                strategy: None,
                max_surge: r.max_surge,
                max_unavailable: r.max_unavailable,
            }),
        duplicate_tolerant: None,
        completions: if job { o.spec.completions } else { None },
        parallelism: if job { o.spec.parallelism } else { None },
        backoff_limit: if job { o.spec.backoff_limit } else { None },
        active_deadline: if job {
            o.spec.active_deadline_seconds.map(|s| format!("{s}s"))
        } else {
            None
        },
    };
    let mut wrong_kind = Problems::default();
    if !job {
        wrong_kind.refuse_set(
            &[
                ("spec.completions", o.spec.completions.is_some()),
                ("spec.parallelism", o.spec.parallelism.is_some()),
                ("spec.backoffLimit", o.spec.backoff_limit.is_some()),
                (
                    "spec.activeDeadlineSeconds",
                    o.spec.active_deadline_seconds.is_some(),
                ),
            ],
            "a Job's field, not a Deployment's",
        );
    } else {
        wrong_kind.refuse_set(
            &[
                ("spec.replicas", o.spec.replicas.is_some()),
                ("spec.strategy", o.spec.strategy.is_some()),
            ],
            "a Deployment's field, not a Job's",
        );
    }
    extra.extend(wrong_kind.0);
    let checked = check(doc).map_err(|e| ManifestError {
        errors: e
            .errors
            .into_iter()
            .map(|f| FieldError {
                path: k8s_path(&f.path, process),
                message: f.message,
            })
            .collect(),
    });
    match (checked, extra.is_empty()) {
        (Ok(m), true) => Ok(m),
        (Ok(_), false) => Err(ManifestError { errors: extra }),
        (Err(mut e), _) => {
            e.errors.extend(extra);
            Err(e)
        }
    }
}

/// Where a field of Macula's format came from in the Kubernetes object.
fn k8s_path(path: &str, process: bool) -> String {
    let (head, rest) = match path.find(['.', '[']) {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let mapped = match head {
        "name" => "metadata.name".to_owned(),
        "realm" => "metadata.namespace".to_owned(),
        "replicas" => "spec.replicas".to_owned(),
        "completions" => "spec.completions".to_owned(),
        "parallelism" => "spec.parallelism".to_owned(),
        "backoff_limit" => "spec.backoffLimit".to_owned(),
        "active_deadline" => "spec.activeDeadlineSeconds".to_owned(),
        "update" => return format!("spec.strategy.rollingUpdate{}", camel(rest)),
        "image" => format!("{CONTAINER}.image"),
        "command" if process => format!("{CONTAINER}.command"),
        "command" | "args" => format!("{CONTAINER}.{head}"),
        "env" => return format!("{CONTAINER}.env{rest}"),
        "resources" => return format!("{CONTAINER}.resources.limits{rest}"),
        "ports" => {
            return format!(
                "{CONTAINER}.ports{}",
                camel(rest).replace(".port", ".containerPort")
            )
        }
        "health" => {
            let rest = rest
                .replacen(".liveness", ".livenessProbe", 1)
                .replacen(".readiness", ".readinessProbe", 1)
                .replacen(".http", ".httpGet", 1)
                .replacen(".tcp", ".tcpSocket", 1);
            return format!(
                "{CONTAINER}{}",
                camel(&rest)
                    .replacen(".period", ".periodSeconds", 1)
                    .replacen(".timeout", ".timeoutSeconds", 1)
            );
        }
        "restart" => "spec.template.spec.restartPolicy".to_owned(),
        "placement" => "spec.template.spec.nodeSelector".to_owned(),
        "kind" | "" => head.to_owned(),
        other => other.to_owned(),
    };
    if matches!(head, "restart" | "placement") {
        return mapped;
    }
    format!("{mapped}{rest}")
}

/// `a.max_surge.b` → `a.maxSurge.b`.
fn camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}
