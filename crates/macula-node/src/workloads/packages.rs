//! Hub packages on this node: installing the version a workload pins before its replica starts.
//!
//! A workload with `package: {name, digest}` runs files from the Hub. Before the first replica
//! of it starts here, the node:
//! 1. refreshes its view of the Hub's TUF repository (`macula_hub::tuf::Client`: root walked
//!    from the trusted root in `hub.root`, timestamp, snapshot, targets, every publisher's
//!    role; versions kept in `packages/tuf/` against rollback) from `hub.url`;
//! 2. finds the release, and requires its digest to be the one pinned — a name the Hub lists
//!    with other bytes is refused, as is one it no longer lists;
//! 3. reads the Hub's signed status (`hub/status.json`): a revoked release is refused; a yanked
//!    one installs (it was pinned by digest before the yank, which is what yanking allows);
//! 4. downloads the index through TUF (verified), then every file it names by digest into the
//!    node's blob store (verified as it is stored), and lays them out under
//!    `packages/installed/<digest>/`, read-only, artifacts executable. The directory appears
//!    only when complete (written beside it, then renamed).
//!
//! One install of a digest at a time; later replicas reuse the directory.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use macula_hub::pack::Index;
use macula_hub::tuf::{Client, ClientOptions, Source};
use macula_hub::{BlobStore, FsStore};
use macula_workloads::PackageRef;

/// Where the node reads the Hub: its URL (the registry node's HTTP address; none on an
/// air-gapped site, which reads the bundles imported into `packages/repo/`) and the root of
/// trust.
#[derive(Debug, Clone)]
pub struct HubClientConfig {
    pub url: Option<String>,
    pub root: PathBuf,
}

/// The node's packages (see the module's documentation).
pub struct Packages {
    dir: PathBuf,
    hub: Option<HubClientConfig>,
    /// The node's blobs (or why it could not be opened: installs then fail, saying so).
    store: Result<Arc<FsStore>, String>,
    /// One install per digest at a time.
    busy: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    agent: ureq::Agent,
    /// What the last refresh found (see [`Packages::refresh`]).
    view: parking_lot::RwLock<HubView>,
    /// One refresh at a time; none sooner than a second after the last.
    refreshing: tokio::sync::Mutex<std::time::Instant>,
    /// The highest version change notices named, and whether a refresh for them runs.
    noticed: std::sync::atomic::AtomicU64,
    notice_running: std::sync::atomic::AtomicBool,
    /// Notices received so far (a refresh that ends checks none came while it ran).
    notices: std::sync::atomic::AtomicU64,
    /// The node (its mesh: files from peers), and whether to ask peers first.
    node: std::sync::Weak<crate::node::Node>,
    peers: bool,
}

/// The Hub as this node last verified it: the timestamp's version, the releases it revoked
/// (with why), and the targets it lists.
#[derive(Debug, Default, Clone)]
pub struct HubView {
    pub version: u64,
    pub revoked: HashMap<String, String>,
    pub listed: std::collections::HashSet<String>,
    /// Each release's tier, as the Hub's signed status says.
    pub tiers: HashMap<String, String>,
    /// Each listed release's digest (`sha256:<hex>`): what its name pins.
    pub digests: HashMap<String, String>,
}

impl HubView {
    /// Why a replica of `pkg` should not run, if the Hub says so.
    pub fn flag(&self, pkg: &PackageRef) -> Option<String> {
        if self.version == 0 {
            return None;
        }
        if let Some(why) = self.revoked.get(&pkg.name) {
            return Some(format!("package {} revoked: {why}", pkg.name));
        }
        (!self.listed.contains(&pkg.name))
            .then(|| format!("package {} is no longer on the Hub", pkg.name))
    }
}

/// A release's state in the Hub's status document.
#[derive(serde::Deserialize, Default)]
struct Status {
    #[serde(default)]
    releases: HashMap<String, StatusEntry>,
}

#[derive(serde::Deserialize, Default)]
struct StatusEntry {
    #[serde(default)]
    revoked: String,
    #[serde(default)]
    yanked: String,
    #[serde(default)]
    tier: String,
}

/// The Hub over HTTP: `/v1/hub/tuf/<path>`, at most `max` bytes. What it serves is also kept
/// in `cache` (`packages/repo-cache/`): this node's copy of the repository, which it reads
/// itself and serves its peers when the Hub cannot be reached.
#[derive(Clone)]
struct HttpSource {
    base: String,
    agent: ureq::Agent,
    cache: PathBuf,
}

impl std::fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpSource({})", self.base)
    }
}

#[macula_hub::tuf::async_trait]
impl Source for HttpSource {
    async fn get(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, String> {
        let url = format!("{}/v1/hub/tuf/{path}", self.base);
        let agent = self.agent.clone();
        let (cache, rel) = (self.cache.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut res = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
            match res.status().as_u16() {
                404 => return Ok(None),
                200 => {}
                s => return Err(format!("{url}: HTTP {s}")),
            }
            let mut out = vec![];
            res.body_mut()
                .as_reader()
                .take(max.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|e| format!("{url}: {e}"))?;
            if out.len() as u64 <= max {
                keep(&cache, &rel, &out);
            }
            Ok(Some(out))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Writes `bytes` as `rel` under the repository cache (atomically); best effort.
fn keep(cache: &Path, rel: &str, bytes: &[u8]) {
    if rel.split('/').any(|c| c.is_empty() || c == "..") {
        return;
    }
    let to = cache.join(rel);
    if let Some(p) = to.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    let tmp = to.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, &to);
    }
}

/// The repository as this node's peers keep it (their caches, or the bundles imported on them),
/// over the mesh: what a node reads when the Hub cannot be reached. Everything is verified by
/// the TUF client like anything from the Hub.
#[derive(Clone)]
struct MeshSource {
    node: std::sync::Weak<crate::node::Node>,
    peer: macula_mesh::Peer,
}

impl std::fmt::Debug for MeshSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshSource")
    }
}

#[macula_hub::tuf::async_trait]
impl Source for MeshSource {
    async fn get(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, String> {
        let node = self.node.upgrade().ok_or("the node is gone")?;
        Ok(crate::mesh::blobs::fetch_repo_file(&node, &self.peer, path, max).await)
    }
}

fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .timeout_connect(Some(Duration::from_secs(10)))
        .tls_config(tls)
        .build()
        .into()
}

impl Packages {
    /// Packages under `dir` (`<workloads dir>/packages`), read from `hub` (none: a workload
    /// with a package is refused, saying so).
    pub fn new(
        dir: PathBuf,
        hub: Option<HubClientConfig>,
        node: std::sync::Weak<crate::node::Node>,
        peers: bool,
    ) -> Packages {
        let blobs = dir.join("blobs");
        let store = FsStore::open(&blobs)
            .map(Arc::new)
            .map_err(|e| format!("the packages' blob store {}: {e}", blobs.display()));
        Packages {
            dir,
            hub,
            store,
            busy: tokio::sync::Mutex::new(HashMap::new()),
            agent: agent(),
            view: parking_lot::RwLock::new(HubView::default()),
            noticed: Default::default(),
            notice_running: Default::default(),
            notices: Default::default(),
            node,
            peers,
            refreshing: tokio::sync::Mutex::new(
                std::time::Instant::now()
                    .checked_sub(Duration::from_secs(2))
                    .unwrap_or_else(std::time::Instant::now),
            ),
        }
    }

    /// Whether this node reads a Hub (over HTTP, from an imported bundle, or — trusting a Hub's
    /// root, with `hub.peers` — from peers that have one of those).
    pub fn has_hub(&self) -> bool {
        self.hub.as_ref().is_some_and(|h| {
            h.url.is_some()
                || self.dir.join("repo/metadata").is_dir()
                || (self.peers && h.root.is_file())
        })
    }

    /// Records a change notice naming `version`; true if the caller is to run the refresh
    /// (none runs), false if the one running will see it.
    pub fn notice(&self, version: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.noticed.fetch_max(version, Ordering::AcqRel);
        self.notices.fetch_add(1, Ordering::AcqRel);
        !self.notice_running.swap(true, Ordering::AcqRel)
    }

    /// How many notices came so far.
    pub fn notice_count(&self) -> u64 {
        self.notices.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes the refresh for notices again after [`Packages::notice_done`] (a notice came as
    /// the last one ended); false if another task took it.
    pub fn notice_retake(&self) -> bool {
        !self
            .notice_running
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// The highest version notices named.
    pub fn noticed(&self) -> u64 {
        self.noticed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The refresh for notices ended.
    pub fn notice_done(&self) {
        self.notice_running
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// What the last refresh found.
    pub fn view(&self) -> HubView {
        self.view.read().clone()
    }

    /// Refreshes the view of the Hub (TUF-verified: the targets listed, and the Hub's signed
    /// status for revocations); returns the timestamp version verified. At most one a second.
    pub async fn refresh(&self) -> Result<u64, String> {
        let mut last = self.refreshing.lock().await;
        let wait = Duration::from_secs(1).saturating_sub(last.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let r = self.refresh_now().await;
        *last = std::time::Instant::now();
        r
    }

    async fn refresh_now(&self) -> Result<u64, String> {
        let (client, _) = self.client().await?;
        let status = status_of(&client).await?;
        let view = HubView {
            digests: client
                .releases()
                .into_iter()
                .map(|r| (r.name, r.digest.to_string()))
                .collect(),
            version: client.timestamp_version(),
            tiers: status
                .releases
                .iter()
                .map(|(name, s)| (name.clone(), s.tier.clone()))
                .collect(),
            revoked: status
                .releases
                .into_iter()
                .filter(|(_, s)| !s.revoked.is_empty())
                .map(|(name, s)| (name, s.revoked))
                .collect(),
            listed: client.releases().into_iter().map(|r| r.name).collect(),
        };
        let version = view.version;
        *self.view.write() = view;
        Ok(version)
    }

    /// A client of the Hub, freshly verified, and the Hub's base URL (none: the repository of
    /// the bundles imported here).
    async fn client(&self) -> Result<(Client, Option<String>), String> {
        let hub = self.hub.as_ref().ok_or(
            "this node reads no Hub: set hub.url (the registry node's HTTP address) and hub.root (its root of trust) in node.yaml",
        )?;
        let root = std::fs::read(&hub.root).map_err(|e| {
            format!(
                "the Hub's root of trust {}: {e} (`macula hub trust` prints it)",
                hub.root.display()
            )
        })?;
        let base = hub.url.as_ref().map(|u| u.trim_end_matches('/').to_owned());
        let datastore = self.dir.join("tuf");
        let load = |source: Arc<dyn Source>| {
            Client::load(&root, source, &datastore, ClientOptions::default())
        };
        let own: Option<Arc<dyn Source>> = match &base {
            Some(base) => Some(Arc::new(HttpSource {
                base: base.clone(),
                agent: self.agent.clone(),
                cache: self.dir.join("repo-cache"),
            })),
            None if self.dir.join("repo/metadata").is_dir() => {
                Some(Arc::new(macula_hub::tuf::DirSource(self.dir.join("repo"))))
            }
            // An air-gapped node with no bundle of its own: its peers' (one imported one).
            None => None,
        };
        let first = match own {
            Some(source) => load(source).await.map_err(|e| e.to_string()),
            None if self.peers => Err("no bundle was imported on this node".to_owned()),
            None => {
                return Err(
                    "this node reads no Hub: set hub.url (the registry node's HTTP address), or import a bundle (macula hub bundle import)"
                        .into(),
                )
            }
        };
        let client = match first {
            Ok(c) => c,
            // The Hub cannot be reached (or failed to verify), or this node has no bundle: the
            // repository as peers keep it (what they cached from the Hub, or the bundle they
            // imported), verified the same way — installs go on while the Hub is down, and one
            // node of an air-gapped site importing a bundle serves the others. Each peer is a
            // whole source (one version of the repository); the newest copy that verifies (no
            // older than what this node saw, unexpired) serves.
            Err(e) if self.peers => {
                let peers = match self.node.upgrade() {
                    Some(node) => crate::mesh::blobs::repo_peers(&node).await,
                    None => vec![],
                };
                // Every peer is tried (the versions they claim only order the tries: a peer
                // claiming the newest copy and serving an older, still valid one must not keep
                // the node from a newer one another peer has); the highest verified timestamp
                // wins.
                let mut why = vec![];
                let mut found: Option<Client> = None;
                for peer in peers {
                    let source: Arc<dyn Source> = Arc::new(MeshSource {
                        node: self.node.clone(),
                        peer,
                    });
                    match load(source).await {
                        Ok(c) => {
                            if found
                                .as_ref()
                                .is_none_or(|f| c.timestamp_version() > f.timestamp_version())
                            {
                                found = Some(c);
                            }
                        }
                        Err(e2) => why.push(format!("{peer}: {e2}")),
                    }
                }
                match found {
                    Some(c) => {
                        tracing::info!("packages: {e}; the Hub's repository came from peers");
                        c
                    }
                    None if why.is_empty() => {
                        return Err(format!("{e}; no peer keeps the Hub's repository"))
                    }
                    None => {
                        return Err(format!(
                            "{e}; from {} peer(s): {}",
                            why.len(),
                            why.join("; ")
                        ))
                    }
                }
            }
            Err(e) => return Err(e),
        };
        // Keep the newest root verified as the next trust (a rotation is walked once).
        let tmp = hub
            .root
            .with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, client.root_json()).is_ok() {
            let _ = std::fs::rename(&tmp, &hub.root);
        }
        Ok((client, base))
    }

    fn store(&self) -> Result<&Arc<FsStore>, String> {
        self.store.as_ref().map_err(Clone::clone)
    }

    /// The installed directory of `pkg`, installing it first if needed.
    pub async fn install(&self, pkg: &PackageRef) -> Result<PathBuf, String> {
        let hex = pkg.digest_hex().to_owned();
        let done = self.dir.join("installed").join(&hex);
        if done.is_dir() {
            return Ok(done);
        }
        let lock = self
            .busy
            .lock()
            .await
            .entry(hex.clone())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        if done.is_dir() {
            return Ok(done);
        }
        let r = self.install_now(pkg, &done).await;
        self.busy.lock().await.remove(&hex);
        r.map(|()| done)
    }

    /// `pkg`'s pin checked against the Hub as this node sees it, before each start of a replica:
    /// the name must be listed with the digest pinned (an installed digest is otherwise run
    /// under any name a manifest gives it, and judged — policy, revocation — by that name);
    /// on a replica's `first` start, a release the Hub revoked or no longer lists is refused
    /// (later restarts of a running replica are the realm policy's to stop). With no view of
    /// the Hub at all (none could be read) the install verifies through TUF as before.
    pub async fn check_pin(&self, pkg: &PackageRef, first: bool) -> Result<(), String> {
        // A view that does not (yet) show the pin — none at all, or one older than a release
        // just published — is refreshed once (at most one refresh a second runs).
        let mut v = self.view();
        if v.digests.get(&pkg.name) != Some(&pkg.digest) {
            if let Err(e) = self.refresh().await {
                tracing::debug!("packages: checking {}: {e}", pkg.name);
            }
            v = self.view();
        }
        if v.version == 0 {
            return Ok(());
        }
        match v.digests.get(&pkg.name) {
            Some(d) if *d == pkg.digest => {}
            Some(d) => {
                return Err(format!(
                    "the Hub's {} is {d}, not the {} pinned: refused",
                    pkg.name, pkg.digest
                ))
            }
            None if first => {
                return Err(format!(
                    "{} is not on the Hub (never published, removed, or its publisher's key was revoked)",
                    pkg.name
                ))
            }
            None => {}
        }
        match v.revoked.get(&pkg.name) {
            Some(why) if first => Err(format!("{} is revoked: {why}", pkg.name)),
            _ => Ok(()),
        }
    }

    /// The realm's package rules, unless they are the default (anything the Hub lists).
    fn rules_for(&self, realm: &str) -> Option<macula_router::policy::PackagePolicy> {
        let node = self.node.upgrade()?;
        let rules = node.policy_for(realm)?.doc.packages.clone();
        (!rules.is_default()).then_some(rules)
    }

    /// Why the realm's policy (`PolicyDoc::packages`) does not let a replica of `pkg` run, if it
    /// does not: a publisher it does not allow, a tier below the one it requires, or a revoked
    /// release where revocation stops replicas. Judged with the view of the Hub this node has
    /// (refreshed first when it has none yet, with `fresh`).
    pub async fn policy_refusal(
        &self,
        realm: &str,
        pkg: &PackageRef,
        fresh: bool,
    ) -> Option<String> {
        let rules = self.rules_for(realm)?;
        if fresh && self.view().version == 0 {
            if let Err(e) = self.refresh().await {
                tracing::warn!("packages: the Hub's status for the realm's policy: {e}");
            }
        }
        judge(&rules, &self.view(), pkg)
    }

    /// [`Packages::policy_refusal`] with what this node knows now, only when it knows the Hub's
    /// status (for replicas already running: stopped on positive knowledge only).
    pub fn policy_refusal_now(&self, realm: &str, pkg: &PackageRef) -> Option<String> {
        let rules = self.rules_for(realm)?;
        let view = self.view();
        if view.version == 0 {
            return None;
        }
        judge(&rules, &view, pkg)
    }

    /// The bytes of `pkg` delivered for a replica of `realm`, the first time one of the realm's
    /// replicas uses it on this node (marked under `packages/metered/<digest>/`, so a restart
    /// does not charge again); 0 after. Each realm pays for each package delivered to a node
    /// once, whoever installed it first: a tenant's bill never tells what other tenants run
    /// (nor does the Hub's own smoke test make it free).
    pub fn delivery_to_charge(&self, realm: &str, pkg: &PackageRef, installed: &Path) -> u64 {
        let plain = !realm.is_empty()
            && !realm.starts_with('.')
            && realm
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        let name = if plain {
            realm.to_owned()
        } else {
            macula_hub::Digest::of(realm.as_bytes()).hex().to_owned()
        };
        let dir = self.dir.join("metered").join(pkg.digest_hex());
        let first = std::fs::create_dir_all(&dir).is_ok()
            && std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(name))
                .is_ok();
        if first {
            tree_size(installed)
        } else {
            0
        }
    }

    async fn install_now(&self, pkg: &PackageRef, done: &Path) -> Result<(), String> {
        let (client, base) = self.client().await?;
        let release = client.release(&pkg.name).ok_or_else(|| {
            format!(
                "{} is not on the Hub (never published, removed by its publisher, or its publisher's key was revoked)",
                pkg.name
            )
        })?;
        if release.digest.to_string() != pkg.digest {
            return Err(format!(
                "the Hub's {} is {}, not the {} pinned: refused",
                pkg.name, release.digest, pkg.digest
            ));
        }
        let status = status_of(&client).await?;
        if let Some(s) = status.releases.get(&pkg.name) {
            if !s.revoked.is_empty() {
                return Err(format!("{} is revoked: {}", pkg.name, s.revoked));
            }
            if !s.yanked.is_empty() {
                tracing::warn!(
                    "installing {} although it is yanked ({}): pinned by digest",
                    pkg.name,
                    s.yanked
                );
            }
        }
        let index_bytes = client.fetch(&pkg.name).await.map_err(|e| e.to_string())?;
        let index: Index = serde_json::from_slice(&index_bytes)
            .map_err(|e| format!("{}: its index: {e}", pkg.name))?;
        // Every file by digest, verified into the store.
        let mut wanted = vec![(index.manifest.digest, index.manifest.size)];
        wanted.extend(index.files.values().map(|f| (f.digest, f.size)));
        let store = self.store()?;
        for (d, size) in wanted {
            if store.has(&d) {
                continue;
            }
            if self.fetch_from_peers(store, &d, size).await {
                continue;
            }
            let Some(base) = &base else {
                return Err(format!(
                    "{d} (a file of {}) is not here, nor at a peer: it was not in the bundles imported",
                    pkg.name
                ));
            };
            let url = format!("{base}/v1/hub/blobs/{d}");
            let agent = self.agent.clone();
            let store = store.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                let mut res = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
                if res.status().as_u16() != 200 {
                    return Err(format!("{url}: HTTP {}", res.status().as_u16()));
                }
                let mut r = res.body_mut().as_reader();
                store
                    .put(&mut r, size, Some(d))
                    .map_err(|e| format!("{url}: {e}"))?;
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())??;
        }
        self.lay_out(&index, done)
    }

    /// Fetches blob `d` from a peer into the store (verified there); whether it did.
    async fn fetch_from_peers(
        &self,
        store: &Arc<FsStore>,
        d: &macula_hub::Digest,
        size: u64,
    ) -> bool {
        let Some(node) = self.node.upgrade().filter(|_| self.peers) else {
            return false;
        };
        let partial = self.dir.join("partial");
        if std::fs::create_dir_all(&partial).is_err() {
            return false;
        }
        let tmp = partial.join(d.hex());
        let got = crate::mesh::blobs::fetch(&node, &d.to_string(), size, &tmp).await;
        let stored = match got {
            Ok(peer) => {
                let (store, tmp, d) = (store.clone(), tmp.clone(), *d);
                let put = tokio::task::spawn_blocking(move || {
                    let mut f = std::fs::File::open(&tmp)?;
                    store
                        .put(&mut f, size, Some(d))
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .await;
                match put {
                    Ok(Ok(_)) => true,
                    other => {
                        tracing::warn!(
                            "packages: {d} from {peer} is not what it should be: {other:?}"
                        );
                        false
                    }
                }
            }
            Err(e) => {
                tracing::debug!("packages: {d} from peers: {e}");
                false
            }
        };
        let _ = std::fs::remove_file(&tmp);
        stored
    }

    /// Writes the package's files under `done`, all or nothing.
    fn lay_out(&self, index: &Index, done: &Path) -> Result<(), String> {
        let tmp = done.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        let io = |e: std::io::Error| format!("laying out the package: {e}");
        for (path, f) in &index.files {
            let rel = Path::new(path);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(format!(
                    "the index names {path:?}: not a path inside the package"
                ));
            }
            let to = tmp.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            let mut r = self
                .store()?
                .open(&f.digest)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{} is not in the store", f.digest))?;
            let mut w = std::fs::File::create(&to).map_err(io)?;
            std::io::copy(&mut r, &mut w).map_err(io)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o555))
                    .map_err(io)?;
            }
        }
        if let Some(parent) = done.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::rename(&tmp, done).map_err(io)
    }
}

/// The Hub's signed status (revocations, yanks, tiers). Required when the repository lists it:
/// a source that withholds it (a peer, a proxy) must not make revoked releases look fine.
async fn status_of(client: &Client) -> Result<Status, String> {
    match client.fetch("hub/status.json").await {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("hub/status.json: {e}")),
        Err(e) if client.release("hub/status.json").is_some() => Err(format!(
            "the Hub's status (hub/status.json) could not be read: {e}"
        )),
        // A repository with no status yet (nothing published).
        Err(_) => Ok(Status::default()),
    }
}

/// Why `rules` do not let `pkg` run, judged with `view` (see [`Packages::policy_refusal`]).
fn judge(
    rules: &macula_router::policy::PackagePolicy,
    view: &HubView,
    pkg: &PackageRef,
) -> Option<String> {
    let ns = pkg.name.split('/').next().unwrap_or_default();
    let tier = (view.version > 0)
        .then(|| view.tiers.get(&pkg.name).map(String::as_str))
        .flatten();
    if let Some(why) = rules.refusal(ns, tier) {
        return Some(format!("package {}: {why}", pkg.name));
    }
    if rules.stops_revoked() {
        if let Some(why) = view.revoked.get(&pkg.name) {
            return Some(format!(
                "package {} revoked: {why} (the realm's policy stops its replicas)",
                pkg.name
            ));
        }
    }
    None
}

/// The bytes of the files under `dir` (an installed package: a few files).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => total += tree_size(&e.path()),
            Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => {}
        }
    }
    total
}

/// The argv of a package's replica: a program named `./…` runs from the package's directory.
pub fn in_package(argv: &mut [String], dir: &Path) {
    if let Some(first) = argv.first_mut() {
        if let Some(rest) = first.strip_prefix("./") {
            *first = dir.join(rest).display().to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each realm pays for a package delivered to a node once — also after a restart (the
    /// marks are on disk) — and another realm pays for its own, whoever installed it first.
    #[test]
    fn each_realm_pays_once_per_package_and_node() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("installed/abc");
        std::fs::create_dir_all(installed.join("bin")).unwrap();
        std::fs::write(installed.join("bin/run"), vec![1u8; 1000]).unwrap();
        std::fs::write(installed.join("package.yaml"), vec![2u8; 234]).unwrap();
        let pkg = PackageRef {
            name: "acme/hello@1.0.0".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
        };
        let open = || Packages::new(dir.path().to_owned(), None, std::sync::Weak::new(), false);
        let p = open();
        assert_eq!(p.delivery_to_charge("com.a", &pkg, &installed), 1234);
        assert_eq!(p.delivery_to_charge("com.a", &pkg, &installed), 0);
        assert_eq!(p.delivery_to_charge("com.b", &pkg, &installed), 1234);
        // A name that is no plain file name is marked by its hash, and still once.
        assert_eq!(p.delivery_to_charge("../x", &pkg, &installed), 1234);
        assert_eq!(p.delivery_to_charge("../x", &pkg, &installed), 0);
        assert!(!dir.path().join("metered/x").exists());
        drop(p);
        let p = open();
        assert_eq!(p.delivery_to_charge("com.a", &pkg, &installed), 0);
        assert_eq!(p.delivery_to_charge("com.b", &pkg, &installed), 0);
    }
}
