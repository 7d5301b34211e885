//! The node's side of mesh trust: its own certificate (loaded, issued where the operator key
//! is, renewed before it expires), renewals it issues for peers, and node revocations (read from
//! the config directory, received over the mesh, persisted and flooded on).
//!
//! - **Certificates expire** (`mesh.cert_validity_days`, 90 by default). When a third of its
//!   validity is left, a node holding the operator key issues itself a new one; any other node
//!   asks its peers (`CertRenew`), and a peer holding the operator key answers with a new
//!   certificate (`CertIssued`) as long as the asker's current one is valid and unrevoked. The
//!   node saves it as `mesh.cert` and presents it on every link (a new Hello). A newer
//!   certificate dropped in as `mesh.cert` by the operator is picked up as well.
//! - **Revocations** are signed by the operator (`macula mesh revoke`, which writes
//!   `trust/revoked-nodes/<peer>.rev`). A node applies a revocation from its directory or from a
//!   peer at once (the mesh disconnects the revoked node and refuses it from then on), stores it,
//!   and sends it to every peer, which do the same: every node cuts the revoked node off within
//!   the time a frame takes to cross the mesh. Peers that connect later get every revocation
//!   first thing. A revocation is forgotten (and its file removed) once every certificate it
//!   covers has expired anyway.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use macula_mesh::cert::{self, CertError, Revocation, Trust};
use macula_mesh::{Frame, Peer as PeerId};
use parking_lot::Mutex;

use crate::mesh::MeshState;
use crate::node::Node;

/// How often a node whose certificate is due asks its peers for a new one.
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// State of the node's trust upkeep (in [`MeshState`]).
#[derive(Default)]
pub struct Upkeep {
    /// Revocation files already applied.
    seen_files: Mutex<HashSet<PathBuf>>,
    /// When renewal was last asked for.
    asked: Mutex<Option<Instant>>,
    /// The `mesh.cert` file as last read.
    cert_file: Mutex<Option<String>>,
    /// When each peer was last renewed here (one renewal per peer every 5 s at most).
    renewed: Mutex<std::collections::HashMap<PeerId, Instant>>,
}

fn validity_secs(node: &Node) -> u64 {
    node.config
        .mesh
        .cert_validity_days
        .clamp(1, cert::MAX_LIFETIME_SECS / 86_400)
        * 86_400
}

/// Where the node's certificate file is.
pub fn cert_path(node: &Node) -> PathBuf {
    let p = &node.config.mesh.cert;
    match &node.confdir {
        Some(d) if p.is_relative() => d.root.join(p),
        _ => p.clone(),
    }
}

/// The trust the mesh starts with: the operator's key and the revocations on disk.
pub fn load(node: &Node) -> Arc<Trust> {
    let trust = Arc::new(Trust::new(*node.auth().authenticator.operator()));
    if let Some(dir) = &node.confdir {
        for (path, text) in dir.node_revocations() {
            match parse_revocation(&trust, &text) {
                Ok(r) => {
                    trust.revoke(r);
                }
                Err(e) => tracing::warn!("{}: ignored: {e}", path.display()),
            }
        }
    }
    trust
}

fn parse_revocation(trust: &Trust, text: &str) -> Result<Revocation, CertError> {
    let bytes = hex::decode(text.trim()).map_err(|_| CertError::Malformed)?;
    Revocation::verify(trust.operator(), &bytes)
}

/// This node's certificate: issued here where the operator key is, else read from `mesh.cert`.
pub fn own_cert(node: &Node, peer: &PeerId, trust: &Trust) -> anyhow::Result<Vec<u8>> {
    if let Some(op) = node.confdir.as_ref().and_then(|d| d.operator_key().ok()) {
        return Ok(cert::issue_for(&op, peer, validity_secs(node)));
    }
    let path = cert_path(node);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "this node ({peer}) has no operator certificate: run `macula mesh certify {peer}` where trust/operator.key lives and save the output as {} (or set mesh.enabled: false)",
            path.display()
        )
    })?;
    let bytes =
        hex::decode(text.trim()).with_context(|| format!("{} is not hex", path.display()))?;
    match trust.check(peer, &bytes, cert::now_secs()) {
        Ok(_) => Ok(bytes),
        Err(e) => anyhow::bail!(
            "{}: {e}; run `macula mesh certify {peer}` where trust/operator.key lives and save the output there",
            path.display()
        ),
    }
}

/// A revocation from a peer: verified, then [`apply_revocation`].
pub fn on_revocation(node: &Node, mesh: &MeshState, from: PeerId, bytes: &[u8]) {
    match Revocation::verify(mesh.handle.operator(), bytes) {
        Ok(r) => apply_revocation(node, mesh, Some(from), r),
        Err(e) => tracing::debug!(%from, "node revocation refused: {e}"),
    }
}

/// A verified revocation from the config directory (`from` = None) or from a peer: applied,
/// stored and sent on if it is news.
fn apply_revocation(node: &Node, mesh: &MeshState, from: Option<PeerId>, r: Revocation) {
    // Past what `Trust::collect` keeps: every certificate it covers has expired.
    if r.revoked_at.saturating_add(2 * cert::MAX_LIFETIME_SECS) <= cert::now_secs() {
        return;
    }
    let (peer, bytes) = (r.peer, r.bytes.clone());
    if !mesh.handle.revoke(r) {
        return;
    }
    if peer == mesh.handle.peer_id() {
        tracing::error!("this node was revoked by the operator: its peers refuse it from now on");
    } else {
        tracing::warn!(%peer, "node revoked by the operator: cut off");
    }
    if let (Some(dir), Some(_)) = (&node.confdir, from) {
        match dir.save_node_revocation(&peer.to_string(), &bytes) {
            Ok(path) => {
                mesh.trust_upkeep.seen_files.lock().insert(path);
            }
            Err(e) => tracing::warn!("node revocation not stored (applied until restart): {e:#}"),
        }
    }
    mesh.handle
        .broadcast(&Frame::NodeRevoked { revocation: bytes }, from.as_ref());
}

/// Sends every known revocation to a peer that just connected.
pub fn send_revocations(mesh: &MeshState, peer: &PeerId) {
    for r in mesh.handle.trust().revocations() {
        mesh.handle.send(
            peer,
            &Frame::NodeRevoked {
                revocation: r.bytes,
            },
        );
    }
}

/// A peer asks for a new certificate: issued where the operator key is, if the peer's current
/// certificate is valid, unrevoked and due (so a peer cannot make this node sign in a loop).
pub fn on_renew_request(node: &Node, mesh: &MeshState, peer: PeerId) {
    let Some(op) = node.confdir.as_ref().and_then(|d| d.operator_key().ok()) else {
        return;
    };
    let now = cert::now_secs();
    let Some(current) = mesh.handle.peer_cert(&peer) else {
        return;
    };
    if mesh
        .handle
        .trust()
        .check_valid(&peer, &current, now)
        .is_err()
        || !current.due_for_renewal(now)
    {
        return;
    }
    {
        let mut renewed = mesh.trust_upkeep.renewed.lock();
        if renewed
            .get(&peer)
            .is_some_and(|t| t.elapsed() < RENEW_EVERY)
        {
            return;
        }
        if renewed.len() >= 4096 {
            renewed.retain(|_, t| t.elapsed() < RENEW_EVERY);
        }
        renewed.insert(peer, Instant::now());
    }
    let secs = current.lifetime().min(validity_secs(node)).max(1);
    let new = cert::renew(&op, &peer, &current, now, secs);
    tracing::info!(%peer, "renewed a peer's mesh certificate");
    mesh.handle
        .send(&peer, &Frame::CertIssued { cert: new.into() });
}

/// A peer sent this node a certificate: used (and saved) if valid and newer than the current one.
pub fn on_cert_issued(node: &Node, mesh: &MeshState, cert: &[u8]) {
    let newer = |c: &cert::NodeCert| c.not_after > mesh.handle.own_cert().not_after;
    let me = mesh.handle.peer_id();
    match mesh.handle.trust().check(&me, cert, cert::now_secs()) {
        Ok(c) if newer(&c) => {}
        _ => return,
    }
    if let Err(e) = mesh.handle.set_cert(cert.to_vec()) {
        tracing::warn!("renewed certificate refused: {e}");
        return;
    }
    let text = hex::encode(cert);
    if node.confdir.is_some() {
        let path = cert_path(node);
        match std::fs::write(&path, &text) {
            Ok(()) => *mesh.trust_upkeep.cert_file.lock() = Some(text),
            Err(e) => tracing::warn!("renewed certificate not saved to {}: {e}", path.display()),
        }
    }
    tracing::info!("mesh certificate renewed");
}

/// Once a second: revocations dropped into the config directory, renewal of this node's
/// certificate, and forgetting revocations that no longer matter.
pub async fn upkeep(node: Arc<Node>, mesh: Arc<MeshState>) {
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        iv.tick().await;
        let now = cert::now_secs();
        if let Some(dir) = &node.confdir {
            let files = dir.node_revocations();
            for (path, text) in files {
                if mesh.trust_upkeep.seen_files.lock().insert(path.clone()) {
                    match parse_revocation(mesh.handle.trust(), &text) {
                        Ok(r) => apply_revocation(&node, &mesh, None, r),
                        Err(e) => tracing::warn!("{}: ignored: {e}", path.display()),
                    }
                }
            }
            for peer in mesh.handle.trust().collect(now) {
                let path = dir.revocations_dir().join(format!("{peer}.rev"));
                let _ = std::fs::remove_file(&path);
                mesh.trust_upkeep.seen_files.lock().remove(&path);
            }
        }
        let own = mesh.handle.own_cert();
        if !own.due_for_renewal(now) {
            warned = false;
            continue;
        }
        renew(&node, &mesh);
        if !warned && mesh.handle.own_cert().due_for_renewal(now) {
            warned = true;
            tracing::warn!(
                expires = %crate::confdir::rfc3339(own.not_after),
                "the mesh certificate is due for renewal and no node holding the operator key has renewed it yet; run `macula mesh certify` where trust/operator.key lives"
            );
        }
    }
}

fn renew(node: &Node, mesh: &MeshState) {
    let me = mesh.handle.peer_id();
    if let Some(op) = node.confdir.as_ref().and_then(|d| d.operator_key().ok()) {
        let _ = mesh
            .handle
            .set_cert(cert::issue_for(&op, &me, validity_secs(node)));
        return;
    }
    // A newer certificate put in place by the operator.
    if let Ok(text) = std::fs::read_to_string(cert_path(node)) {
        let changed = mesh.trust_upkeep.cert_file.lock().as_deref() != Some(text.as_str());
        if changed {
            *mesh.trust_upkeep.cert_file.lock() = Some(text.clone());
            if let Ok(bytes) = hex::decode(text.trim()) {
                on_cert_issued(node, mesh, &bytes);
            }
        }
    }
    let mut asked = mesh.trust_upkeep.asked.lock();
    // Asked only when there is someone to ask (a node not linked yet asks once it is).
    if asked.is_none_or(|t| t.elapsed() >= RENEW_EVERY) && !mesh.handle.peers().is_empty() {
        *asked = Some(Instant::now());
        mesh.handle.broadcast(&Frame::CertRenew, None);
    }
}
