//! Packages' files between nodes: a node serves the blobs it installed to its peers
//! ([`Frame::BlobAsk`] → [`Frame::BlobPart`], at most `MAX_BLOB_PART` bytes each), and fetches
//! a blob from peers before it asks the Hub, so installs keep working when the Hub cannot be
//! reached. Nothing a peer sends is trusted: the whole blob is hashed against its digest as it
//! enters the store (`BlobStore::put` with the digest expected); a peer that lies costs a
//! retry elsewhere.
//!
//! Bounds: at most [`SERVING`] blob reads at once on a node (asks beyond are answered "busy");
//! a part is read from disk off the event loop; a fetch keeps [`WINDOW`] parts in flight and
//! gives up on a peer after [`PART_TIMEOUT`] without an answer.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_mesh::frame::{Frame, MAX_BLOB_PART};
use macula_mesh::Peer as PeerId;

use super::MeshState;
use crate::node::Node;

/// Blob reads served at once on this node.
pub const SERVING: usize = 8;
/// Parts in flight from one peer while fetching.
pub const WINDOW: usize = 8;
/// How long a part may take.
pub const PART_TIMEOUT: Duration = Duration::from_secs(10);

/// A blob part as answered.
pub(crate) struct Part {
    pub offset: u64,
    pub total: u64,
    pub data: Bytes,
    pub error: Option<String>,
}

/// Asks in flight: (the peer asked, where its answer goes).
pub(crate) type Waits = parking_lot::Mutex<
    std::collections::HashMap<u64, (PeerId, tokio::sync::oneshot::Sender<Part>)>,
>;

static NEXT: AtomicU64 = AtomicU64::new(1);
static BUSY: AtomicUsize = AtomicUsize::new(0);

fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(hex)
}

/// A peer asks for part of a blob: read it off the event loop, answer with what there is.
pub(crate) fn on_ask(
    node: &Arc<Node>,
    mesh: &Arc<MeshState>,
    peer: PeerId,
    id: u64,
    digest: String,
    offset: u64,
    len: u32,
) {
    let answer = move |total: u64, data: Bytes, error: Option<String>| Frame::BlobPart {
        id,
        offset,
        total,
        data,
        error,
    };
    // `repo:<path>`: a TUF file of the repository as this node keeps it; else a blob.
    let path = match digest.strip_prefix("repo:") {
        Some(rel) => repo_file(node, rel),
        None => node
            .blob_dir
            .get()
            .zip(hex_of(&digest))
            .map(|(dir, hex)| dir.join(hex)),
    };
    let Some(path) = path else {
        mesh.handle
            .send(&peer, &answer(0, Bytes::new(), Some("not here".into())));
        return;
    };
    if BUSY.fetch_add(1, Ordering::AcqRel) >= SERVING {
        BUSY.fetch_sub(1, Ordering::AcqRel);
        mesh.handle
            .send(&peer, &answer(0, Bytes::new(), Some("busy".into())));
        return;
    }
    let len = len.min(MAX_BLOB_PART) as u64;
    let mesh = mesh.clone();
    tokio::spawn(async move {
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, Vec<u8>)> {
            let mut f = std::fs::File::open(&path)?;
            let total = f.metadata()?.len();
            f.seek(SeekFrom::Start(offset.min(total)))?;
            let mut buf = Vec::with_capacity(len.min(total.saturating_sub(offset)) as usize);
            f.take(len).read_to_end(&mut buf)?;
            Ok((total, buf))
        })
        .await;
        BUSY.fetch_sub(1, Ordering::AcqRel);
        let frame = match read {
            Ok(Ok((total, data))) => answer(total, Bytes::from(data), None),
            _ => answer(0, Bytes::new(), Some("not here".into())),
        };
        mesh.handle.send(&peer, &frame);
    });
}

/// A peer's answer: to the ask that waits for it, if that peer was the one asked.
pub(crate) fn on_part(mesh: &MeshState, peer: PeerId, id: u64, part: Part) {
    let mut waits = mesh.blob_waits.lock();
    if waits.get(&id).is_some_and(|(asked, _)| *asked == peer) {
        if let Some((_, tx)) = waits.remove(&id) {
            let _ = tx.send(part);
        }
    }
}

async fn ask(mesh: &MeshState, peer: &PeerId, digest: &str, offset: u64) -> Result<Part, String> {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::oneshot::channel();
    mesh.blob_waits.lock().insert(id, (*peer, tx));
    mesh.handle.send(
        peer,
        &Frame::BlobAsk {
            id,
            digest: digest.to_owned(),
            offset,
            len: MAX_BLOB_PART,
        },
    );
    let r = tokio::time::timeout(PART_TIMEOUT, rx).await;
    mesh.blob_waits.lock().remove(&id);
    match r {
        Ok(Ok(p)) => match p.error {
            Some(e) => Err(e),
            None => Ok(p),
        },
        _ => Err("no answer".into()),
    }
}

/// Fetches blob `digest` of `size` bytes from one peer into the file `to` (its bytes are not
/// checked here: the caller puts the file into the store with the digest expected).
async fn from_peer(
    mesh: &MeshState,
    peer: &PeerId,
    digest: &str,
    size: u64,
    to: &Path,
) -> Result<(), String> {
    let first = ask(mesh, peer, digest, 0).await?;
    if first.total != size || first.offset != 0 {
        return Err(format!(
            "it has {} bytes, the index says {size}",
            first.total
        ));
    }
    let mut file = std::fs::File::create(to).map_err(|e| e.to_string())?;
    file.write_all(&first.data).map_err(|e| e.to_string())?;
    let mut next = first.data.len() as u64;
    if next == 0 && size > 0 {
        return Err("an empty part".into());
    }
    let part = MAX_BLOB_PART as u64;
    // Parts in order, `WINDOW` in flight.
    let mut inflight = futures_util::stream::FuturesOrdered::new();
    let mut asked = next;
    use futures_util::StreamExt;
    while next < size {
        while inflight.len() < WINDOW && asked < size {
            let offset = asked;
            inflight.push_back(async move { (offset, ask(mesh, peer, digest, offset).await) });
            asked += part;
        }
        let Some((offset, r)) = inflight.next().await else {
            break;
        };
        let p = r?;
        if p.offset != offset || p.data.is_empty() || p.total != size {
            return Err("a part that is not the one asked for".into());
        }
        file.write_all(&p.data).map_err(|e| e.to_string())?;
        next = offset + p.data.len() as u64;
        if next != (offset + part).min(size) {
            return Err("a short part".into());
        }
    }
    file.flush().map_err(|e| e.to_string())
}

/// Fetches blob `digest` (`size` bytes) from the first peer that has it, into `to`; the peers
/// tried in turn (a random order, so nodes installing at once spread over their peers).
pub(crate) async fn fetch(
    node: &Node,
    digest: &str,
    size: u64,
    to: &Path,
) -> Result<PeerId, String> {
    let mesh = super::of(node).ok_or("no mesh")?;
    let mut peers: Vec<PeerId> = mesh.handle.peers();
    if peers.is_empty() {
        return Err("no peers".into());
    }
    use rand::seq::SliceRandom;
    peers.shuffle(&mut rand::thread_rng());
    let mut why = vec![];
    for p in peers.iter().take(16) {
        match from_peer(mesh, p, digest, size, to).await {
            Ok(()) => return Ok(*p),
            Err(e) => why.push(e),
        }
    }
    let _ = std::fs::remove_file(to);
    Err(format!(
        "no peer had it ({})",
        why.first().cloned().unwrap_or_default()
    ))
}

/// A TUF file (`metadata/…`, `targets/…`) as this node keeps it: the repository cache of
/// what the Hub served it, else the bundles imported here.
fn repo_file(node: &Node, path: &str) -> Option<PathBuf> {
    let ok = (path.starts_with("metadata/") || path.starts_with("targets/"))
        && path.len() <= 512
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains(".tmp"));
    if !ok {
        return None;
    }
    let packages = node.blob_dir.get()?.parent()?.parent()?;
    ["repo-cache", "repo"]
        .iter()
        .map(|d| packages.join(d).join(path))
        .find(|p| p.is_file())
}

/// The peers to ask for the Hub's repository (at most 16 of them), those with the newest
/// copy first: each is asked for its `metadata/timestamp.json`, ordered by the version it
/// claims (unverified: only the order depends on it; the TUF client verifies what is used),
/// ties in a random order so that nodes refreshing at once spread over their peers. A peer
/// keeping no copy is left out.
pub(crate) async fn repo_peers(node: &Node) -> Vec<PeerId> {
    let Some(mesh) = super::of(node) else {
        return vec![];
    };
    let mut peers: Vec<PeerId> = mesh.handle.peers();
    use rand::seq::SliceRandom;
    peers.shuffle(&mut rand::thread_rng());
    peers.truncate(16);
    let claims = futures_util::future::join_all(peers.into_iter().map(|p| async move {
        let ts = fetch_repo_file(node, &p, "metadata/timestamp.json", 64 * 1024).await?;
        let v: serde_json::Value = serde_json::from_slice(&ts).ok()?;
        Some((v["signed"]["version"].as_u64().unwrap_or(0), p))
    }))
    .await;
    let mut claims: Vec<(u64, PeerId)> = claims.into_iter().flatten().collect();
    claims.sort_by_key(|c| std::cmp::Reverse(c.0));
    claims.into_iter().map(|c| c.1).collect()
}

/// Fetches a TUF file from `peer` (at most `max` bytes); None when it does not keep it (the
/// TUF client then takes it as absent: a root version that does not exist yet). One peer
/// serves a whole refresh: files from different peers could be of different versions of the
/// repository, which the client would rightly refuse as mix-and-match.
pub(crate) async fn fetch_repo_file(
    node: &Node,
    peer: &PeerId,
    path: &str,
    max: u64,
) -> Option<Vec<u8>> {
    let mesh = super::of(node)?;
    let name = format!("repo:{path}");
    let first = ask(mesh, peer, &name, 0).await.ok()?;
    if first.total > max {
        return Some(vec![0; max as usize + 1]);
    }
    let mut out = first.data.to_vec();
    while (out.len() as u64) < first.total {
        match ask(mesh, peer, &name, out.len() as u64).await {
            Ok(part) if !part.data.is_empty() && part.offset == out.len() as u64 => {
                out.extend_from_slice(&part.data)
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Where this node's installed blobs are (`<packages>/blobs/sha256`): what it serves.
pub fn serve_from(node: &Node, dir: PathBuf) {
    let _ = node.blob_dir.set(dir);
}
