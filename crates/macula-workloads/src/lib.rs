//! # macula-workloads
//!
//! Workloads: what a realm asks the mesh to run. This crate holds the manifests — a *payload*
//! (a long-running service with `replicas`) or a *job* (work that runs to completion) — in
//! Macula's own YAML format ([`manifest`]) or in the Kubernetes-compatible subset ([`k8s`]: an
//! `apps/v1` Deployment, a `batch/v1` Job), checked into one [`Manifest`] with every problem
//! named by its field's path; the native runtime ([`runtime`]: control groups, a Landlock
//! sandbox through an exec shim, bounded output); and the leases with fencing tokens that keep a replica slot held
//! by one node at a time ([`lease`], a state machine without I/O); and placement by the nodes
//! themselves ([`placement`]: probing a few candidates, bids from a capacity ledger, a
//! deterministic award). The desired state is a set of signed deploy records ([`record`]) that
//! nodes keep and flood. It depends on nothing of Macula's; the node (placement, leases,
//! runtimes) and the control plane (records, the REST and Kubernetes-style APIs) build on it.

mod error;
pub mod k8s;
pub mod lease;
pub mod manifest;
pub mod placement;
pub mod quantity;
pub mod record;
pub mod runtime;
pub mod wire;

pub use error::{FieldError, ManifestError};
pub use manifest::{
    Artifact, Check, Job, Manifest, Network, PackageRef, Payload, Placement, Port, PortRef, Probe,
    Resources, Restart, RestartPolicy, Runtime, Update, Workload,
};

/// Parses a manifest in either format: a document with `apiVersion` is read as Kubernetes,
/// any other as Macula's own. Refuses text over [`manifest::limits::BYTES`] before reading it.
pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
    if text.len() > manifest::limits::BYTES {
        return Err(ManifestError::one(
            "",
            format!(
                "the manifest is {} bytes; at most {}",
                text.len(),
                manifest::limits::BYTES
            ),
        ));
    }
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
        .map_err(|e| ManifestError::one("", format!("not YAML: {e}")))?;
    let Some(map) = value.as_mapping() else {
        return Err(ManifestError::one(
            "",
            "a manifest is a mapping (`kind: payload`, `name: ...`)",
        ));
    };
    if map.contains_key("apiVersion") {
        k8s::parse_k8s(text)
    } else {
        manifest::parse_macula(text)
    }
}
