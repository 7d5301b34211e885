//! Macula's manifest format, as written ([`doc`]) and as checked ([`Manifest`]).
//!
//! ```yaml
//! kind: payload                 # payload (long-running, `replicas`) or job (runs to completion)
//! name: api-server              # lowercase letters, digits and `-`; at most 63
//! realm: com.myapp              # optional where the command line names it (--realm)
//! replicas: 3
//! runtime: process              # process (a native command) or podman (an OCI image)
//! command: [my-server, --port, "${PORT}"]   # process: the program and its arguments
//! # image: localhost/api:1      # podman: the image, from an archive in the node's images
//! #                             # directory (no registry); command/args override its own
//! env: {LOG_LEVEL: info}
//! role: service_account         # the role of the replicas' own sessions in the realm
//! resources: {cpu: 500m, memory: 256Mi, pids: 128}
//! ports:
//!   - {name: http}              # assigned by the node, passed as PORT (the first) and PORT_HTTP
//!   - {name: admin, port: 9090} # fixed
//! health:
//!   liveness: {http: {path: /healthz, port: http}, period: 10s, timeout: 1s, failure_threshold: 3}
//!   readiness: {tcp: {port: http}}
//! restart: {policy: always, backoff: {initial: 1s, max: 5m}}
//! placement: {labels: {disk: ssd}, region: eu-west, spread: true}
//! network: host                # host (the node's network, default) or none (loopback only)
//! package: {name: acme/hello@1.0.0, digest: "sha256:…"}  # files from the Hub (see below)
//! update: {strategy: rolling, max_surge: 1, max_unavailable: 0}
//! duplicate_tolerant: false     # may run twice during a partition (see ARCHITECTURE.md)
//! ```
//!
//! With `package`, the node installs that version of a Hub package (verified against the Hub's
//! TUF repository and pinned to `digest`) before it starts a replica, and a `command` starting
//! with `./` runs from the package's directory (`MACULA_PACKAGE_DIR`), read-only; with
//! `image` (the podman runtime), the image comes from the package's image archives;
//! `macula deploy --package org/name@version` writes it from the package's own manifest.
//!
//! A job has `completions`, `parallelism`, `backoff_limit` and `active_deadline` instead of
//! `replicas`, `update` and `duplicate_tolerant`; its restart policy is `on_failure` or `never`.
//! Every field but `kind`, `name`, the artifact (`command` or `image`) is optional, with the
//! defaults named on [`Manifest`]'s fields.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ManifestError, Problems};
use crate::quantity;

/// The most a manifest may ask for, whatever the plan allows.
pub mod limits {
    pub const NAME: usize = 63;
    pub const REPLICAS: u32 = 1_000;
    pub const COMPLETIONS: u32 = 100_000;
    pub const ARGS: usize = 1_024;
    pub const ARG_BYTES: usize = 64 << 10;
    pub const ENV: usize = 256;
    pub const PORTS: usize = 64;
    pub const LABELS: usize = 64;
    /// The manifest's text.
    pub const BYTES: usize = 256 << 10;
}

/// The manifest as written (see the module's documentation).
pub mod doc {
    use super::*;

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ManifestDoc {
        pub kind: String,
        pub name: String,
        #[serde(default)]
        pub realm: Option<String>,
        #[serde(default)]
        pub runtime: Option<String>,
        #[serde(default)]
        pub command: Option<Vec<String>>,
        #[serde(default)]
        pub image: Option<String>,
        #[serde(default)]
        pub args: Vec<String>,
        #[serde(default)]
        pub env: BTreeMap<String, String>,
        #[serde(default)]
        pub role: Option<String>,
        #[serde(default)]
        pub resources: ResourcesDoc,
        #[serde(default)]
        pub ports: Vec<PortDoc>,
        #[serde(default)]
        pub health: HealthDoc,
        #[serde(default)]
        pub restart: RestartDoc,
        #[serde(default)]
        pub placement: PlacementDoc,
        #[serde(default)]
        pub network: Option<String>,
        #[serde(default)]
        pub package: Option<PackageDoc>,
        // payload
        #[serde(default)]
        pub replicas: Option<u32>,
        #[serde(default)]
        pub update: Option<UpdateDoc>,
        #[serde(default)]
        pub duplicate_tolerant: Option<bool>,
        // job
        #[serde(default)]
        pub completions: Option<u32>,
        #[serde(default)]
        pub parallelism: Option<u32>,
        #[serde(default)]
        pub backoff_limit: Option<u32>,
        #[serde(default)]
        pub active_deadline: Option<String>,
    }

    /// A Hub package's version, pinned to its index's digest.
    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct PackageDoc {
        /// `org/name@version`.
        pub name: String,
        /// `sha256:<hex>` of the package's index.
        pub digest: String,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ResourcesDoc {
        #[serde(default)]
        pub cpu: Option<Amount>,
        #[serde(default)]
        pub memory: Option<Amount>,
        #[serde(default)]
        pub pids: Option<u32>,
    }

    /// A quantity written as a string (`500m`) or a number (`2`).
    #[derive(Debug, Clone, Deserialize, Serialize)]
    #[serde(untagged)]
    pub enum Amount {
        Number(f64),
        Text(String),
    }

    impl Amount {
        pub fn text(&self) -> String {
            match self {
                Amount::Number(n) => n.to_string(),
                Amount::Text(s) => s.clone(),
            }
        }
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct PortDoc {
        pub name: String,
        #[serde(default)]
        pub port: Option<u16>,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthDoc {
        #[serde(default)]
        pub liveness: Option<ProbeDoc>,
        #[serde(default)]
        pub readiness: Option<ProbeDoc>,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ProbeDoc {
        #[serde(default)]
        pub http: Option<HttpCheckDoc>,
        #[serde(default)]
        pub tcp: Option<TcpCheckDoc>,
        #[serde(default)]
        pub exec: Option<ExecCheckDoc>,
        #[serde(default)]
        pub initial_delay: Option<String>,
        #[serde(default)]
        pub period: Option<String>,
        #[serde(default)]
        pub timeout: Option<String>,
        #[serde(default)]
        pub failure_threshold: Option<u32>,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct HttpCheckDoc {
        #[serde(default)]
        pub path: Option<String>,
        pub port: PortRefDoc,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct TcpCheckDoc {
        pub port: PortRefDoc,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ExecCheckDoc {
        pub command: Vec<String>,
    }

    /// A port by number or by the name of one of the manifest's ports.
    #[derive(Debug, Clone, Deserialize, Serialize)]
    #[serde(untagged)]
    pub enum PortRefDoc {
        Number(u16),
        Name(String),
    }

    impl Default for PortRefDoc {
        fn default() -> Self {
            PortRefDoc::Number(0)
        }
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct RestartDoc {
        #[serde(default)]
        pub policy: Option<String>,
        #[serde(default)]
        pub backoff: BackoffDoc,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct BackoffDoc {
        #[serde(default)]
        pub initial: Option<String>,
        #[serde(default)]
        pub max: Option<String>,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct PlacementDoc {
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
        #[serde(default)]
        pub region: Option<String>,
        #[serde(default)]
        pub spread: Option<bool>,
    }

    #[derive(Debug, Clone, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct UpdateDoc {
        #[serde(default)]
        pub strategy: Option<String>,
        #[serde(default)]
        pub max_surge: Option<u32>,
        #[serde(default)]
        pub max_unavailable: Option<u32>,
    }
}

use doc::*;

/// A checked manifest: a payload or a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Manifest {
    Payload(Payload),
    Job(Job),
}

impl Manifest {
    pub fn workload(&self) -> &Workload {
        match self {
            Manifest::Payload(p) => &p.workload,
            Manifest::Job(j) => &j.workload,
        }
    }

    /// The instances it asks for at once: a payload's replicas, a job's parallelism (what a
    /// plan's `max_instances` counts).
    pub fn instances(&self) -> u32 {
        match self {
            Manifest::Payload(p) => p.replicas,
            Manifest::Job(j) => j.parallelism,
        }
    }
}

/// What payloads and jobs have alike.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub name: String,
    /// None when the command line names it.
    pub realm: Option<String>,
    pub runtime: Runtime,
    pub artifact: Artifact,
    /// Arguments after the command (or the image's own command).
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The role of the replicas' own sessions (default `service_account`).
    pub role: String,
    pub resources: Resources,
    pub ports: Vec<Port>,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
    pub restart: Restart,
    pub placement: Placement,
    /// The network its replicas have (default: the node's).
    pub network: Network,
    /// The Hub package whose files it runs, if any.
    pub package: Option<PackageRef>,
}

/// A Hub package's version (`org/name@version`) pinned to its index's digest (`sha256:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub digest: String,
}

impl PackageRef {
    /// The digest's 64 hex digits.
    pub fn digest_hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

/// Whether `s` names a package version: `org/name@version`, ASCII, one `/`.
fn is_package_name(s: &str) -> bool {
    let Some((pkg, version)) = s.split_once('@') else {
        return false;
    };
    let Some((org, name)) = pkg.split_once('/') else {
        return false;
    };
    !org.is_empty()
        && !name.is_empty()
        && !version.is_empty()
        && s.len() <= 200
        && [org, name].iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// The network a replica has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// The node's own: it reaches the node (`MACULA_URL`) and the mesh, and binds its ports
    /// on the node.
    #[default]
    Host,
    /// None: only a loopback of its own (it cannot reach its realm or anything else).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// A native command in its own cgroup and sandbox.
    Process,
    /// An OCI image through Podman.
    Podman,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Artifact {
    /// The program and its arguments (process runtime).
    Command(Vec<String>),
    /// An image reference (podman runtime); `command` overrides its entry point.
    Image {
        image: String,
        command: Option<Vec<String>>,
    },
}

/// Limits of one replica. Defaults: 250 millicores, 256 MiB, 256 pids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub pids: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millis: 250,
            memory_bytes: 256 << 20,
            pids: 256,
        }
    }
}

/// A port of a replica: fixed, or assigned by the node (`None`) and passed in the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    pub name: String,
    pub port: Option<u16>,
}

/// A health check and its timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub check: Check,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// A GET that answers 2xx or 3xx.
    Http { path: String, port: PortRef },
    /// A TCP connection that opens.
    Tcp { port: PortRef },
    /// A command that exits 0.
    Exec { command: Vec<String> },
}

/// A port by number, or by the name of a port of the manifest (resolved when it is assigned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortRef {
    Number(u16),
    Named(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// When a replica that stopped is started again, and how long it waits: doubling from
/// `initial` up to `max` while it keeps failing (reset after it ran for `max`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Restart {
    pub policy: RestartPolicy,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// Where replicas may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Labels a node must have.
    pub labels: BTreeMap<String, String>,
    pub region: Option<String>,
    /// Replicas on distinct nodes where there are enough (default true).
    pub spread: bool,
}

/// A long-running service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Payload {
    #[serde(flatten)]
    pub workload: Workload,
    /// Default 1.
    pub replicas: u32,
    pub update: Update,
    /// May run twice on the two sides of a partition (default false: never twice).
    pub duplicate_tolerant: bool,
}

/// How a payload moves to a new version: rolling, at most `max_surge` replicas above and
/// `max_unavailable` below `replicas` at any time (default 1 and 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Update {
    pub max_surge: u32,
    pub max_unavailable: u32,
}

/// Work that runs to completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    #[serde(flatten)]
    pub workload: Workload,
    /// Successful runs needed (default 1).
    pub completions: u32,
    /// Runs at once (default 1, at most `completions`).
    pub parallelism: u32,
    /// Failed runs after which the job fails (default 6).
    pub backoff_limit: u32,
    /// The job fails if it has not completed by then.
    pub active_deadline: Option<Duration>,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= limits::NAME
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Names the node sets for every replica; a manifest may not set them.
pub const RESERVED_ENV: &[&str] = &[
    "PORT",
    "MACULA_URL",
    "MACULA_REALM",
    "MACULA_KEY",
    "MACULA_FENCING_TOKEN",
    "MACULA_PAYLOAD",
    "MACULA_REPLICA",
];

/// Parses Macula's manifest format (see the module's documentation).
pub fn parse_macula(text: &str) -> Result<Manifest, ManifestError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let doc: ManifestDoc =
        serde_path_to_error::deserialize(de).map_err(crate::error::from_serde)?;
    check(doc)
}

/// Checks a manifest as written; every problem is reported with its field.
pub fn check(d: ManifestDoc) -> Result<Manifest, ManifestError> {
    let mut p = Problems::default();
    let kind = d.kind.as_str();
    if kind != "payload" && kind != "job" {
        p.add(
            "kind",
            format!(
                "{kind:?}: write `payload` (a long-running service) or `job` (runs to completion)"
            ),
        );
    }
    if !is_name(&d.name) {
        p.add(
            "name",
            format!(
                "{:?}: 1 to {} lowercase letters, digits and `-`, not starting or ending with `-`",
                d.name,
                limits::NAME
            ),
        );
    }
    if let Some(r) = &d.realm {
        if r.is_empty() || r.len() > 255 || r.split('.').any(|s| s.is_empty()) {
            p.add(
                "realm",
                format!("{r:?} is not a realm name (reverse-DNS, e.g. com.example.app)"),
            );
        }
    }
    let runtime = match d.runtime.as_deref() {
        None if d.image.is_some() => Runtime::Podman,
        None | Some("process") => Runtime::Process,
        Some("podman") => Runtime::Podman,
        Some(other) => {
            p.add(
                "runtime",
                format!("{other:?} is not a runtime: write `process` (a native command) or `podman` (an OCI image)"),
            );
            Runtime::Process
        }
    };
    let artifact = match (runtime, &d.command, &d.image) {
        (Runtime::Process, Some(c), None) if !c.is_empty() && !c[0].is_empty() => {
            Artifact::Command(c.clone())
        }
        (Runtime::Process, _, Some(_)) => {
            p.add(
                "image",
                "the process runtime runs `command`; an image needs `runtime: podman`",
            );
            Artifact::Command(vec![])
        }
        (Runtime::Process, _, None) => {
            p.add(
                "command",
                "the program to run is missing (e.g. `command: [my-server, --verbose]`)",
            );
            Artifact::Command(vec![])
        }
        (Runtime::Podman, command, Some(image)) if !image.trim().is_empty() => Artifact::Image {
            image: image.clone(),
            command: command.clone(),
        },
        (Runtime::Podman, _, _) => {
            p.add(
                "image",
                "the image to run is missing (e.g. `image: docker.io/library/nginx:1.27`)",
            );
            Artifact::Command(vec![])
        }
    };
    let all_args: Vec<&String> = match &artifact {
        Artifact::Command(c) => c.iter().chain(&d.args).collect(),
        Artifact::Image { command, .. } => command.iter().flatten().chain(&d.args).collect(),
    };
    if all_args.len() > limits::ARGS {
        p.add(
            "args",
            format!("{} arguments; at most {}", all_args.len(), limits::ARGS),
        );
    }
    if all_args.iter().map(|a| a.len()).sum::<usize>() > limits::ARG_BYTES {
        p.add(
            "args",
            format!(
                "the command line is longer than {} bytes",
                limits::ARG_BYTES
            ),
        );
    }
    if all_args.iter().any(|a| a.contains('\0')) {
        p.add("command", "an argument contains a NUL byte");
    }
    if d.env.len() > limits::ENV {
        p.add(
            "env",
            format!("{} variables; at most {}", d.env.len(), limits::ENV),
        );
    }
    for (k, v) in &d.env {
        if !is_env_name(k) {
            p.add(
                format!("env.{k}"),
                "a variable name is letters, digits and `_`, not starting with a digit",
            );
        } else if RESERVED_ENV.contains(&k.as_str()) || k.starts_with("PORT_") {
            p.add(
                format!("env.{k}"),
                "set by the node for every replica; choose another name",
            );
        }
        if v.contains('\0') {
            p.add(format!("env.{k}"), "the value contains a NUL byte");
        }
    }
    let role = d.role.clone().unwrap_or_else(|| "service_account".into());
    if role.is_empty() || role.len() > 64 {
        p.add("role", "1 to 64 characters: a role of the realm's policy");
    }
    let mut resources = Resources::default();
    if let Some(c) = &d.resources.cpu {
        match quantity::cpu_millis(&c.text()) {
            Ok(0) => p.add("resources.cpu", "must be more than 0"),
            Ok(v) => resources.cpu_millis = v,
            Err(e) => p.add("resources.cpu", e),
        }
    }
    if let Some(m) = &d.resources.memory {
        match quantity::memory_bytes(&m.text()) {
            Ok(v) if v < 4 << 20 => p.add("resources.memory", "at least 4Mi"),
            Ok(v) => resources.memory_bytes = v,
            Err(e) => p.add("resources.memory", e),
        }
    }
    if let Some(n) = d.resources.pids {
        if n == 0 {
            p.add("resources.pids", "must be more than 0");
        } else {
            resources.pids = n;
        }
    }
    if d.ports.len() > limits::PORTS {
        p.add(
            "ports",
            format!("{} ports; at most {}", d.ports.len(), limits::PORTS),
        );
    }
    let mut ports = vec![];
    for (i, port) in d.ports.iter().enumerate() {
        if !is_name(&port.name) || port.name.len() > 15 {
            p.add(
                format!("ports[{i}].name"),
                format!("{:?}: 1 to 15 lowercase letters, digits and `-`", port.name),
            );
        }
        if ports.iter().any(|q: &Port| q.name == port.name) {
            p.add(
                format!("ports[{i}].name"),
                format!("{:?} is named twice", port.name),
            );
        }
        if port.port == Some(0) {
            p.add(
                format!("ports[{i}].port"),
                "1 to 65535, or leave it out to have the node assign one",
            );
        }
        ports.push(Port {
            name: port.name.clone(),
            port: port.port,
        });
    }
    let liveness = d
        .health
        .liveness
        .as_ref()
        .map(|pr| probe(pr, "health.liveness", &ports, &mut p));
    let readiness = d
        .health
        .readiness
        .as_ref()
        .map(|pr| probe(pr, "health.readiness", &ports, &mut p));
    let policy = match (kind, d.restart.policy.as_deref()) {
        ("job", None) => RestartPolicy::OnFailure,
        (_, None) | (_, Some("always")) => RestartPolicy::Always,
        (_, Some("on_failure")) => RestartPolicy::OnFailure,
        (_, Some("never")) => RestartPolicy::Never,
        (_, Some(other)) => {
            p.add(
                "restart.policy",
                format!("{other:?}: write `always`, `on_failure` or `never`"),
            );
            RestartPolicy::Always
        }
    };
    if kind == "job" && policy == RestartPolicy::Always {
        p.add(
            "restart.policy",
            "a job runs to completion: `on_failure` or `never`",
        );
    }
    let backoff_initial = opt_duration(
        &d.restart.backoff.initial,
        "restart.backoff.initial",
        Duration::from_secs(1),
        &mut p,
    );
    let backoff_max = opt_duration(
        &d.restart.backoff.max,
        "restart.backoff.max",
        Duration::from_secs(300),
        &mut p,
    );
    if backoff_initial.is_zero() {
        p.add("restart.backoff.initial", "must be more than 0");
    }
    if backoff_max < backoff_initial {
        p.add("restart.backoff.max", "must not be less than `initial`");
    }
    if d.placement.labels.len() > limits::LABELS {
        p.add(
            "placement.labels",
            format!("at most {} labels", limits::LABELS),
        );
    }
    let network = match d.network.as_deref() {
        None | Some("host") => Network::Host,
        Some("none") => Network::None,
        Some(other) => {
            p.add(
                "network",
                format!("{other:?}: write `host` (the node's network, default) or `none` (loopback only)"),
            );
            Network::Host
        }
    };
    let package = d.package.as_ref().map(|pk| {
        if !is_package_name(&pk.name) {
            p.add(
                "package.name",
                format!(
                    "{:?}: write org/name@version (e.g. acme/hello@1.0.0)",
                    pk.name
                ),
            );
        }
        let hex = pk.digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            p.add(
                "package.digest",
                format!(
                    "{:?}: write sha256: and 64 lowercase hex digits (`macula hub info` shows it)",
                    pk.digest
                ),
            );
        }
        PackageRef {
            name: pk.name.clone(),
            digest: pk.digest.clone(),
        }
    });
    let workload = Workload {
        network,
        package,
        name: d.name.clone(),
        realm: d.realm.clone(),
        runtime,
        artifact,
        args: d.args.clone(),
        env: d.env.clone(),
        role,
        resources,
        ports,
        liveness,
        readiness,
        restart: Restart {
            policy,
            backoff_initial,
            backoff_max,
        },
        placement: Placement {
            labels: d.placement.labels.clone(),
            region: d.placement.region.clone(),
            spread: d.placement.spread.unwrap_or(true),
        },
    };
    let manifest = if kind == "job" {
        for (field, set) in [
            ("replicas", d.replicas.is_some()),
            ("update", d.update.is_some()),
            ("duplicate_tolerant", d.duplicate_tolerant.is_some()),
        ] {
            if set {
                p.add(
                    field,
                    "a payload's field; a job has `completions` and `parallelism`",
                );
            }
        }
        let completions = d.completions.unwrap_or(1);
        if completions == 0 || completions > limits::COMPLETIONS {
            p.add("completions", format!("1 to {}", limits::COMPLETIONS));
        }
        let parallelism = d.parallelism.unwrap_or(1);
        if parallelism == 0 || parallelism > completions.max(1) {
            p.add("parallelism", format!("1 to `completions` ({completions})"));
        }
        let active_deadline = d
            .active_deadline
            .as_ref()
            .map(|s| opt_duration(&Some(s.clone()), "active_deadline", Duration::ZERO, &mut p));
        if active_deadline.is_some_and(|d| d.is_zero()) {
            p.add("active_deadline", "must be more than 0");
        }
        Manifest::Job(Job {
            workload,
            completions,
            parallelism,
            backoff_limit: d.backoff_limit.unwrap_or(6),
            active_deadline,
        })
    } else {
        p.refuse_set(
            &[
                ("completions", d.completions.is_some()),
                ("parallelism", d.parallelism.is_some()),
                ("backoff_limit", d.backoff_limit.is_some()),
                ("active_deadline", d.active_deadline.is_some()),
            ],
            "a job's field; a payload has `replicas`",
        );
        let replicas = d.replicas.unwrap_or(1);
        if replicas > limits::REPLICAS {
            p.add("replicas", format!("at most {}", limits::REPLICAS));
        }
        let u = d.update.clone().unwrap_or_default();
        if let Some(s) = u.strategy.as_deref().filter(|s| *s != "rolling") {
            p.add(
                "update.strategy",
                format!("{s:?}: the one strategy is `rolling`"),
            );
        }
        let update = Update {
            max_surge: u.max_surge.unwrap_or(1),
            max_unavailable: u.max_unavailable.unwrap_or(0),
        };
        if update.max_surge == 0 && update.max_unavailable == 0 {
            p.add("update", "`max_surge` and `max_unavailable` cannot both be 0: a rolling update could not move");
        }
        Manifest::Payload(Payload {
            workload,
            replicas,
            update,
            duplicate_tolerant: d.duplicate_tolerant.unwrap_or(false),
        })
    };
    p.into_result(manifest)
}

fn opt_duration(v: &Option<String>, path: &str, default: Duration, p: &mut Problems) -> Duration {
    match v {
        None => default,
        Some(s) => quantity::duration(s).unwrap_or_else(|e| {
            p.add(path, e);
            default
        }),
    }
}

fn probe(d: &ProbeDoc, path: &str, ports: &[Port], p: &mut Problems) -> Probe {
    let port_ref = |r: &PortRefDoc, field: &str, p: &mut Problems| match r {
        PortRefDoc::Number(0) => {
            p.add(field, "1 to 65535, or the name of one of `ports`");
            PortRef::Number(0)
        }
        PortRefDoc::Number(n) => PortRef::Number(*n),
        PortRefDoc::Name(n) => {
            if !ports.iter().any(|q| &q.name == n) {
                p.add(
                    field,
                    format!("no port is named {n:?} (the ports are: {})", names(ports)),
                );
            }
            PortRef::Named(n.clone())
        }
    };
    let checks = [d.http.is_some(), d.tcp.is_some(), d.exec.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if checks != 1 {
        p.add(path, "one of `http`, `tcp` or `exec`");
    }
    let check = if let Some(h) = &d.http {
        let path_ = h.path.clone().unwrap_or_else(|| "/".into());
        if !path_.starts_with('/') {
            p.add(format!("{path}.http.path"), "a path starting with `/`");
        }
        Check::Http {
            path: path_,
            port: port_ref(&h.port, &format!("{path}.http.port"), p),
        }
    } else if let Some(t) = &d.tcp {
        Check::Tcp {
            port: port_ref(&t.port, &format!("{path}.tcp.port"), p),
        }
    } else if let Some(e) = &d.exec {
        if e.command.is_empty() {
            p.add(
                format!("{path}.exec.command"),
                "the command to run is missing",
            );
        }
        Check::Exec {
            command: e.command.clone(),
        }
    } else {
        Check::Exec { command: vec![] }
    };
    let period = opt_duration(
        &d.period,
        &format!("{path}.period"),
        Duration::from_secs(10),
        p,
    );
    let timeout = opt_duration(
        &d.timeout,
        &format!("{path}.timeout"),
        Duration::from_secs(1),
        p,
    );
    if period.is_zero() {
        p.add(format!("{path}.period"), "must be more than 0");
    }
    if timeout.is_zero() || timeout > period {
        p.add(
            format!("{path}.timeout"),
            "more than 0 and at most `period`",
        );
    }
    let failure_threshold = d.failure_threshold.unwrap_or(3);
    if failure_threshold == 0 {
        p.add(format!("{path}.failure_threshold"), "must be more than 0");
    }
    Probe {
        check,
        initial_delay: opt_duration(
            &d.initial_delay,
            &format!("{path}.initial_delay"),
            Duration::ZERO,
            p,
        ),
        period,
        timeout,
        failure_threshold,
    }
}

fn names(ports: &[Port]) -> String {
    if ports.is_empty() {
        return "none".into();
    }
    ports
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
