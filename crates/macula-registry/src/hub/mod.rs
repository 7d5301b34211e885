//! The Hub (issue 15) as a control-plane service: publishers and their signing keys, publishing
//! through the review pipeline into the TUF repository, yanks and revocations, search.
//!
//! **What it holds.** Under `hub.dir` (default `<config dir>/hub`): `repo/` the TUF repository
//! (`macula_hub::tuf::Repo`: metadata and the package indexes as targets, in the layout both
//! tough and python-tuf read), `blobs/` every file of every package by digest
//! (`macula_hub::FsStore`; or, with `hub.s3` set, the objects `<prefix>sha256/<hex>` of an
//! S3-compatible bucket, `macula_hub::s3::S3Store`), `keys/` the repository's keys (0600): the root key, made here on first
//! start for a single-machine Hub (move it offline, see `docs/design/hub.md`), and the online
//! keys (targets, snapshot, timestamp), which the Hub must hold to re-sign.
//!
//! **Who may do what.** An account with a verified email creates a publisher for a namespace; the
//! publisher is verified at once when the owner's address is at a domain named like the
//! namespace (`x@acme.com` for `acme`; free-mail domains never count), else when a platform
//! operator approves it. Only a verified publisher's owner publishes and registers keys; each
//! publish is the publisher's own TUF role signed by a threshold of its keys, which the Hub can
//! check but cannot forge. Yanks and revocations are the publisher owner's or an operator's;
//! they are written into `hub/status.json`, a target the Hub signs with the top-level targets
//! key, with every release's tier.
//!
//! One file per concept: `publishers.rs` (publishers, keys, the delegation they make),
//! `releases.rs` (blobs, publishing, status, yank/revoke, search), `smoke.rs` (the smoke test
//! on the mesh, and the tier it earns); `routes.rs`, `types.rs`.

mod publishers;
mod releases;
pub(crate) mod routes;
mod smoke;
pub mod types;

use std::path::{Path, PathBuf};

use macula_hub::s3::S3Config;
use macula_hub::tuf::{self, Key, Lifetimes, Online, Repo};
use macula_hub::{osv, BlobStore, FsStore};

#[allow(unused_imports)]
use crate::prelude::*;

/// The Hub's settings (the node's `registry.hub` section).
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub enabled: bool,
    /// Where the repository, blobs and keys live; default `<config dir>/hub`.
    pub dir: Option<PathBuf>,
    /// An offline OSV database to scan SBOMs with: OSV's `all.zip` (or one ecosystem's zip),
    /// or a directory of OSV JSON records. None: packages are published unscanned (and stay
    /// below the Verified tier).
    pub osv: Option<PathBuf>,
    /// The largest blob (one file of a package) accepted, in bytes.
    pub max_blob: u64,
    /// How long the repository's signatures last.
    pub lifetimes: Lifetimes,
    /// Blobs in an S3-compatible bucket instead of `<dir>/blobs` (when set).
    pub s3: S3Config,
    /// The fee for certifying a release, in cents, charged to the publisher's owner when an
    /// operator certifies it (the publisher accepts it when requesting certification).
    pub certification_fee_cents: i64,
    /// The most bytes an account may have uploaded that no release names yet (uploads of a
    /// publish in progress, or abandoned); past it, uploads are refused until a publish names
    /// them or they are collected.
    pub max_unpublished_bytes: u64,
    /// How long an upload no release names is kept before it is collected.
    pub upload_ttl: std::time::Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            enabled: true,
            dir: None,
            osv: None,
            max_blob: 1 << 30,
            lifetimes: Lifetimes::default(),
            s3: S3Config::default(),
            certification_fee_cents: 50_000,
            max_unpublished_bytes: 10 << 30,
            upload_ttl: std::time::Duration::from_secs(86_400),
        }
    }
}

/// The Hub's state: its repository (one writer at a time), its blobs, its scan database.
pub struct Hub {
    pub dir: PathBuf,
    pub(crate) repo: tokio::sync::Mutex<Repo>,
    pub(crate) store: Arc<dyn BlobStore>,
    /// The OSV database, replaced when its source changes (`reload_osv`).
    osv: std::sync::RwLock<Option<Arc<osv::Database>>>,
    /// Its source and the stamp (length, modification time) it was loaded at.
    osv_source: Option<(PathBuf, std::sync::Mutex<Option<OsvStamp>>)>,
    pub(crate) max_blob: u64,
    pub(crate) certification_fee_cents: i64,
    pub(crate) max_unpublished_bytes: u64,
    pub(crate) upload_ttl: std::time::Duration,
    /// One smoke test at a time (see `smoke.rs`), and how many wait for their turn.
    pub(crate) smoking: tokio::sync::Mutex<()>,
    pub(crate) smoke_waiting: std::sync::atomic::AtomicUsize,
}

/// The Hub's blob store: the filesystem under `<dir>/blobs`, or the S3 bucket configured.
fn open_store(cfg: &HubConfig, dir: &Path) -> anyhow::Result<Arc<dyn BlobStore>> {
    if !cfg.s3.is_set() {
        return Ok(Arc::new(FsStore::open(dir.join("blobs"))?));
    }
    #[cfg(feature = "s3")]
    {
        Ok(Arc::new(macula_hub::s3::S3Store::open(
            &cfg.s3,
            dir.join("s3-spool"),
        )?))
    }
    #[cfg(not(feature = "s3"))]
    {
        anyhow::bail!(
            "registry.hub.s3 is set, but this build of macula has no S3 support (cargo feature s3)"
        )
    }
}

/// Loads an OSV database: a directory of records, or an OSV zip export.
fn load_osv(p: &Path) -> std::io::Result<osv::Database> {
    let (db, skipped) = if p.is_dir() {
        osv::Database::load_dir(p)?
    } else {
        osv::Database::load_zip(p)?
    };
    tracing::info!(
        "hub: OSV database {}: {} records ({skipped} entries skipped)",
        p.display(),
        db.len()
    );
    Ok(db)
}

/// An OSV source's length and modification time (a directory's own: records added or removed).
type OsvStamp = (u64, std::time::SystemTime);

/// When the source of an OSV database changed (see [`OsvStamp`]).
fn osv_stamp(p: &Path) -> Option<OsvStamp> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Runs blocking work — blob reads: a disk, or an S3 round trip — without stalling the async
/// runtime's other tasks: in place on a multi-threaded runtime (the node's), else inline.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Hub {
    /// The vulnerability database as it is now (none configured: None).
    pub(crate) fn osv(&self) -> Option<Arc<osv::Database>> {
        self.osv.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads the OSV database again when its source changed since it was loaded (a newer export
    /// dropped in place), off the async workers; the old one serves until the new one is read,
    /// and stays if the new one cannot be.
    pub(crate) async fn reload_osv(&self) {
        let Some((path, stamp)) = &self.osv_source else {
            return;
        };
        let now = osv_stamp(path);
        if now.is_none() || *stamp.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return;
        }
        let p = path.clone();
        match tokio::task::spawn_blocking(move || load_osv(&p)).await {
            Ok(Ok(db)) => {
                *self.osv.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
                *stamp.lock().unwrap_or_else(|p| p.into_inner()) = now;
            }
            Ok(Err(e)) => tracing::warn!(
                "hub: the OSV database {} changed and could not be read: {e}",
                path.display()
            ),
            Err(e) => tracing::warn!("hub: reloading the OSV database: {e}"),
        }
    }

    /// A release's index (`target` of `digest`): from the blob store, else the repository's
    /// target file.
    pub(crate) fn release_index(
        &self,
        target: &str,
        digest: &macula_hub::Digest,
    ) -> Option<Vec<u8>> {
        blocking(|| self.release_index_now(target, digest))
    }

    fn release_index_now(&self, target: &str, digest: &macula_hub::Digest) -> Option<Vec<u8>> {
        self.store
            .read(digest, macula_hub::review::MAX_INDEX)
            .ok()
            .flatten()
            .or_else(|| {
                let (org, file) = target.split_once('/')?;
                std::fs::read(
                    self.repo_dir()
                        .join(format!("targets/{org}/{}.{file}", digest.hex())),
                )
                .ok()
            })
            .filter(|b| macula_hub::Digest::of(b) == *digest)
    }
}

const ROLES: [&str; 4] = ["root", "targets", "snapshot", "timestamp"];

fn read_key(path: &Path) -> anyhow::Result<Key> {
    let text = std::fs::read_to_string(path)?;
    let bytes = hex::decode(text.trim())?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: not 64 hex digits", path.display()))?;
    Ok(Key::from_seed(seed))
}

impl Hub {
    /// Opens the Hub under `dir`, creating its keys and repository on first start.
    pub async fn open(cfg: &HubConfig, dir: &Path) -> anyhow::Result<Hub> {
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys)?;
        let key_path = |role: &str| keys.join(format!("{role}.key"));
        let repo_dir = dir.join("repo");
        let repo = if repo_dir.join("metadata/1.root.json").exists() {
            let online = Online {
                targets: read_key(&key_path("targets"))?,
                snapshot: read_key(&key_path("snapshot"))?,
                timestamp: read_key(&key_path("timestamp"))?,
            };
            Repo::open(&repo_dir, online, cfg.lifetimes)?
        } else {
            let root = Key::generate();
            let online = Online::generate();
            for (role, key) in
                ROLES
                    .iter()
                    .zip([&root, &online.targets, &online.snapshot, &online.timestamp])
            {
                macula_common::secret::write_secret(&key_path(role), &hex::encode(key.seed()))?;
            }
            tracing::warn!(
                "hub: made a new TUF repository with its root key at {} — for anything but a \
                 single machine, move that key offline and rotate to a threshold of offline keys",
                key_path("root").display()
            );
            Repo::create(&repo_dir, &[root], 1, online, cfg.lifetimes).await?
        };
        let store = open_store(cfg, dir)?;
        tracing::info!("hub: blobs in {}", store.describe());
        let osv = match &cfg.osv {
            None => None,
            Some(p) => Some(Arc::new(load_osv(p)?)),
        };
        let osv_source = cfg
            .osv
            .as_ref()
            .map(|p| (p.clone(), std::sync::Mutex::new(osv_stamp(p))));
        Ok(Hub {
            dir: dir.to_path_buf(),
            repo: tokio::sync::Mutex::new(repo),
            store,
            osv: std::sync::RwLock::new(osv),
            osv_source,
            max_blob: cfg.max_blob,
            certification_fee_cents: cfg.certification_fee_cents.max(0),
            max_unpublished_bytes: cfg.max_unpublished_bytes,
            upload_ttl: cfg.upload_ttl,
            smoking: tokio::sync::Mutex::new(()),
            smoke_waiting: Default::default(),
        })
    }

    /// The repository's directory (`metadata/`, `targets/`), as nodes and python-tuf read it.
    pub fn repo_dir(&self) -> PathBuf {
        self.dir.join("repo")
    }
}

impl Registry {
    /// The Hub, or 404 where this registry runs without one.
    pub(crate) fn hub(&self) -> ApiResult<&Hub> {
        self.hub
            .as_ref()
            .ok_or_else(|| ApiError::not_found("this registry runs no Hub (registry.hub.enabled)"))
    }

    /// Keeps the repository's signatures fresh (timestamp, snapshot, targets at half-life) and
    /// drops publishers' roles about to expire. Run by the hosting node's sweep.
    pub async fn hub_tick(&self) -> ApiResult<()> {
        let Some(hub) = &self.hub else {
            return Ok(());
        };
        let dropped = hub
            .repo
            .lock()
            .await
            .refresh()
            .await
            .map_err(|e| ApiError::internal(format!("hub refresh: {e}")))?;
        for ns in dropped {
            tracing::warn!(
                "hub: publisher {ns}'s role is about to expire and was dropped from the repository \
                 until it signs a new one"
            );
        }
        hub.reload_osv().await;
        let n = self.collect_uploads(None).await?;
        if n > 0 {
            tracing::info!("hub: collected {n} upload(s) no release named");
        }
        Ok(())
    }
}

fn tuf_error(e: tuf::TufError) -> ApiError {
    match e {
        tuf::TufError::Conflict { .. } => ApiError::conflict("role_version", e.to_string()),
        tuf::TufError::Refused { .. } => ApiError::invalid("refused", e.to_string()),
        e => ApiError::internal(e),
    }
}
