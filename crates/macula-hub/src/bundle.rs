//! Offline bundles (`.bmz`): packages with everything needed to verify and install them where
//! the Hub cannot be reached.
//!
//! A bundle is a zip archive (entries stored, not compressed: the blobs are mostly compressed
//! already) holding:
//! - `bundle.json`: what it is (`macula-bundle/v1`), when it was made, until when it verifies,
//!   and its packages (`org/name@version` with the index digest);
//! - `repo/metadata/`: the TUF chain — every `N.root.json` from the root the site trusts
//!   onwards (so a site rotates roots offline), a bundle timestamp and snapshot with the bundle's
//!   own expiry, the targets role and every publisher's role;
//! - `repo/targets/<org>/<sha256>.<file>`: each package's index, and the Hub's signed status;
//! - `blobs/sha256/<hex>`: every file of every package;
//! - `osv/osv.json` and `osv/envelope.json` (when the Hub has a vulnerability database): the
//!   OSV records of the ecosystems in the packages' SBOMs (`osv::Export`), and the Hub's DSSE
//!   signature over its digest (`osv::ExportStatement`) with the targets key that the verified
//!   root names, so the site scans the packages offline against data no one altered.
//!
//! [`import`] verifies everything before anything is usable: each blob's bytes against its name,
//! the whole TUF chain against the root the site trusts (with its rollback datastore), each
//! listed package's index through TUF and every file the index names. Only then does the
//! repository take the place of the previous one (a rename); blobs enter the store as they are
//! verified (content-addressed, they are harmless until a verified repository names them). A
//! tampered byte anywhere is refused with the entry that failed.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::pack::Index;
use crate::store::{BlobStore, FsStore};
use crate::tuf::{Client, ClientOptions, DirSource};

/// The bundle's format.
pub const BUNDLE_KIND: &str = "macula-bundle/v1";
/// The most entries a bundle may have.
pub const MAX_ENTRIES: usize = 200_000;
/// The largest metadata or index entry read.
pub const MAX_META: u64 = 16 << 20;

/// `bundle.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub kind: String,
    /// RFC 3339.
    pub created: String,
    /// Until when its metadata verifies (the earliest expiry in its TUF chain), RFC 3339.
    pub expires: String,
    pub packages: Vec<Entry>,
    /// The vulnerability data it carries (as the Hub's signed statement says; checked against
    /// the signature at import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub osv: Option<crate::osv::ExportStatement>,
}

/// The bundle entries of the vulnerability data.
pub const OSV_EXPORT: &str = "osv/osv.json";
pub const OSV_ENVELOPE: &str = "osv/envelope.json";

/// A package in a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// `org/name@version`.
    pub target: String,
    /// `sha256:<hex>` of its index.
    pub digest: String,
}

/// Why a bundle was refused: the entry (or step) and what failed.
#[derive(Debug, thiserror::Error)]
#[error("{entry}: {why}")]
pub struct BundleError {
    pub entry: String,
    pub why: String,
}

fn err(entry: impl Into<String>, why: impl Into<String>) -> BundleError {
    BundleError {
        entry: entry.into(),
        why: why.into(),
    }
}

/// Writes a bundle: `bundle.json`, then `files` (path in the bundle → bytes, or a file to copy).
pub fn write<W: Write + Seek>(
    out: W,
    manifest: &Manifest,
    files: impl IntoIterator<Item = (String, Source)>,
) -> Result<W, BundleError> {
    let mut z = zip::ZipWriter::new(out);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    let json =
        serde_json::to_vec_pretty(manifest).map_err(|e| err("bundle.json", e.to_string()))?;
    let io = |name: &str, e: &dyn std::fmt::Display| err(name, e.to_string());
    z.start_file("bundle.json", opts)
        .map_err(|e| io("bundle.json", &e))?;
    z.write_all(&json).map_err(|e| io("bundle.json", &e))?;
    for (name, src) in files {
        z.start_file(name.as_str(), opts)
            .map_err(|e| io(&name, &e))?;
        match src {
            Source::Bytes(b) => z.write_all(&b).map_err(|e| io(&name, &e))?,
            Source::File(p) => {
                let mut f = std::fs::File::open(&p).map_err(|e| io(&name, &e))?;
                std::io::copy(&mut f, &mut z).map_err(|e| io(&name, &e))?;
            }
        }
    }
    z.finish().map_err(|e| io("the archive", &e))
}

/// What a bundle entry is written from.
pub enum Source {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// An entry's name, checked: relative, no `..`, under `repo/` or `blobs/sha256/`.
fn entry_path(name: &str) -> Result<&str, BundleError> {
    let p = Path::new(name);
    let normal = !name.is_empty()
        && name.len() <= 512
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !normal
        || !(name.starts_with("repo/")
            || name.starts_with("blobs/sha256/")
            || name == "bundle.json"
            || name == OSV_EXPORT
            || name == OSV_ENVELOPE)
    {
        return Err(err(
            name,
            "not an entry a bundle has (repo/…, blobs/sha256/…, osv/…, bundle.json)",
        ));
    }
    Ok(name)
}

/// Reads `bundle.json` and one package's index and manifest from a bundle, each checked against
/// its digest (for `macula deploy --package … --bundle`, which pins what the nodes verify).
pub fn read_package(bundle: &Path, target: &str) -> Result<(Entry, Index, Vec<u8>), BundleError> {
    let f = std::fs::File::open(bundle)
        .map_err(|e| err(bundle.display().to_string(), e.to_string()))?;
    let mut z =
        zip::ZipArchive::new(f).map_err(|e| err(bundle.display().to_string(), e.to_string()))?;
    let manifest: Manifest = serde_json::from_slice(&read_entry(&mut z, "bundle.json", MAX_META)?)
        .map_err(|e| err("bundle.json", e.to_string()))?;
    let entry = manifest
        .packages
        .iter()
        .find(|p| p.target == target || p.target.split('@').next() == Some(target))
        .cloned()
        .ok_or_else(|| err("bundle.json", format!("the bundle has no {target}")))?;
    let digest: Digest = entry
        .digest
        .parse()
        .map_err(|e: crate::digest::BadDigest| err("bundle.json", e.to_string()))?;
    let (org, file) = entry.target.split_once('/').ok_or_else(|| {
        err(
            "bundle.json",
            format!("{}: not org/name@version", entry.target),
        )
    })?;
    let name = format!("repo/targets/{org}/{}.{file}", digest.hex());
    let index_bytes = read_entry(&mut z, &name, MAX_META)?;
    if Digest::of(&index_bytes) != digest {
        return Err(err(name, "its bytes are not the index bundle.json names"));
    }
    let index: Index =
        serde_json::from_slice(&index_bytes).map_err(|e| err(&name, e.to_string()))?;
    let mname = format!("blobs/sha256/{}", index.manifest.digest.hex());
    let m = read_entry(&mut z, &mname, crate::pack::MAX_MANIFEST)?;
    if Digest::of(&m) != index.manifest.digest {
        return Err(err(mname, "its bytes are not the manifest the index names"));
    }
    Ok((entry, index, m))
}

fn read_entry<R: Read + Seek>(
    z: &mut zip::ZipArchive<R>,
    name: &str,
    max: u64,
) -> Result<Vec<u8>, BundleError> {
    let e = z
        .by_name(name)
        .map_err(|_| err(name, "missing from the bundle"))?;
    let mut out = vec![];
    e.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|x| err(name, x.to_string()))?;
    if out.len() as u64 > max {
        return Err(err(name, format!("larger than {max} bytes")));
    }
    Ok(out)
}

/// A bundle's entries: name and bytes.
pub type Entries = Vec<(String, Vec<u8>)>;

/// Every entry of a bundle but `bundle.json`, with `bundle.json` read (at most `max_total`
/// bytes in all): to inspect a bundle, or to write one again.
pub fn read_all(bundle: &Path, max_total: u64) -> Result<(Manifest, Entries), BundleError> {
    let shown = bundle.display().to_string();
    let f = std::fs::File::open(bundle).map_err(|e| err(&shown, e.to_string()))?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| err(&shown, format!("not a bundle: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&read_entry(&mut z, "bundle.json", MAX_META)?)
        .map_err(|e| err("bundle.json", e.to_string()))?;
    let mut left = max_total;
    let mut out = vec![];
    for i in 0..z.len().min(MAX_ENTRIES) {
        let e = z.by_index(i).map_err(|x| err(&shown, x.to_string()))?;
        let name = e
            .name()
            .map_err(|x| err(&shown, format!("entry {i}: {x}")))?
            .into_owned();
        if name == "bundle.json" || e.is_dir() {
            continue;
        }
        let mut b = vec![];
        e.take(left + 1)
            .read_to_end(&mut b)
            .map_err(|x| err(&name, x.to_string()))?;
        if b.len() as u64 > left {
            return Err(err(&shown, format!("more than {max_total} bytes")));
        }
        left -= b.len() as u64;
        out.push((name, b));
    }
    Ok((manifest, out))
}

/// What an import made usable.
#[derive(Debug)]
pub struct Imported {
    pub manifest: Manifest,
    pub blobs: usize,
    pub root_version: u64,
    /// The bundle's vulnerability data, verified, and each package scanned against it (none
    /// when the bundle carries none).
    pub osv: Option<OsvChecked>,
}

/// A bundle's vulnerability data as verified, and what the packages' scans found.
#[derive(Debug)]
pub struct OsvChecked {
    pub statement: crate::osv::ExportStatement,
    /// Per package: the findings, and how many components could not be checked.
    pub scans: Vec<(String, crate::osv::Scan)>,
}

/// Verifies a bundle's vulnerability data (`export`, `envelope`) against the targets keys of
/// the verified root, and scans each package's SBOM (from `store`) with it.
fn check_osv(
    client: &Client,
    export: &[u8],
    envelope: &[u8],
    packages: &[(String, Index)],
    store: &FsStore,
) -> Result<OsvChecked, BundleError> {
    use crate::osv;
    let payload =
        crate::attest::verify(envelope, osv::EXPORT_PAYLOAD_TYPE, &client.targets_trust())
            .map_err(|e| err(OSV_ENVELOPE, e.to_string()))?;
    let statement: osv::ExportStatement = serde_json::from_slice(&payload)
        .map_err(|e| err(OSV_ENVELOPE, format!("its statement: {e}")))?;
    let actual = Digest::of(export);
    if actual.to_string() != statement.digest || export.len() as u64 != statement.size {
        return Err(err(
            OSV_EXPORT,
            format!(
                "its bytes hash to {actual} ({} bytes); the Hub signed {} ({} bytes)",
                export.len(),
                statement.digest,
                statement.size
            ),
        ));
    }
    if statement.snapshot_version != client.snapshot_version() {
        return Err(err(
            OSV_ENVELOPE,
            format!(
                "made for the bundle of snapshot version {}, not this one ({})",
                statement.snapshot_version,
                client.snapshot_version()
            ),
        ));
    }
    let data: osv::Export =
        serde_json::from_slice(export).map_err(|e| err(OSV_EXPORT, e.to_string()))?;
    if data.kind != osv::EXPORT_KIND {
        return Err(err(
            OSV_EXPORT,
            format!("kind {:?}: not {}", data.kind, osv::EXPORT_KIND),
        ));
    }
    let db = osv::Database::from_export(data);
    let mut scans = vec![];
    for (target, index) in packages {
        let scan = match crate::sbom::of_package(store, index)
            .map_err(|e| err(format!("the SBOM of {target}"), e))?
        {
            Some(sbom) => {
                // The data must cover what the SBOM names (a statement for other ecosystems
                // would make every package look clean).
                if let Some(eco) = sbom
                    .components
                    .iter()
                    .filter_map(|c| c.ecosystem())
                    .find(|e| !statement.ecosystems.iter().any(|s| s == e))
                {
                    return Err(err(
                        OSV_ENVELOPE,
                        format!("the SBOM of {target} names ecosystem {eco}, which the vulnerability data does not cover"),
                    ));
                }
                db.scan(&sbom)
            }
            None => osv::Scan::default(),
        };
        scans.push((target.clone(), scan));
    }
    Ok(OsvChecked { statement, scans })
}

/// Imports `bundle` into a node's packages directory `dir` (its `repo/`, `blobs/` and `tuf/`),
/// verifying everything against `trusted_root` first (see the module's documentation).
pub async fn import(
    bundle: &Path,
    dir: &Path,
    trusted_root: &[u8],
    max_blob: u64,
) -> Result<Imported, BundleError> {
    let shown = bundle.display().to_string();
    let f = std::fs::File::open(bundle).map_err(|e| err(&shown, e.to_string()))?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| err(&shown, format!("not a bundle: {e}")))?;
    if z.len() > MAX_ENTRIES {
        return Err(err(&shown, format!("more than {MAX_ENTRIES} entries")));
    }
    let manifest: Manifest = serde_json::from_slice(&read_entry(&mut z, "bundle.json", MAX_META)?)
        .map_err(|e| err("bundle.json", e.to_string()))?;
    if manifest.kind != BUNDLE_KIND {
        return Err(err(
            "bundle.json",
            format!("kind {:?}: not {BUNDLE_KIND}", manifest.kind),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| err(dir.display().to_string(), e.to_string()))?;
    let staging = dir.join(format!("import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let cleanup = Staging(staging.clone());
    let store = FsStore::open(dir.join("blobs")).map_err(|e| err("blobs", e.to_string()))?;
    let mut blobs = 0;
    let (mut osv_export, mut osv_envelope) = (None, None);
    for i in 0..z.len() {
        let mut e = z.by_index(i).map_err(|x| err(&shown, x.to_string()))?;
        let name = e
            .name()
            .map_err(|x| err(&shown, format!("entry {i}: {x}")))?
            .into_owned();
        if e.is_dir() {
            continue;
        }
        entry_path(&name)?;
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let d: Digest = format!("sha256:{hex}")
                .parse()
                .map_err(|x: crate::digest::BadDigest| err(&name, x.to_string()))?;
            store
                .put(&mut e, max_blob, Some(d))
                .map_err(|x| err(&name, format!("refused: {x}")))?;
            blobs += 1;
        } else if name == OSV_EXPORT || name == OSV_ENVELOPE {
            let max = if name == OSV_EXPORT {
                max_blob
            } else {
                crate::attest::MAX_ENVELOPE as u64
            };
            let mut b = vec![];
            (&mut e)
                .take(max + 1)
                .read_to_end(&mut b)
                .map_err(|x| err(&name, x.to_string()))?;
            if b.len() as u64 > max {
                return Err(err(&name, format!("larger than {max} bytes")));
            }
            if name == OSV_EXPORT {
                osv_export = Some(b);
            } else {
                osv_envelope = Some(b);
            }
        } else if let Some(rest) = name.strip_prefix("repo/") {
            let to = staging.join("repo").join(rest);
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p).map_err(|x| err(&name, x.to_string()))?;
            }
            let mut out = std::fs::File::create(&to).map_err(|x| err(&name, x.to_string()))?;
            let n = std::io::copy(&mut (&mut e).take(MAX_META + 1), &mut out)
                .map_err(|x| err(&name, x.to_string()))?;
            if n > MAX_META {
                return Err(err(&name, format!("larger than {MAX_META} bytes")));
            }
        }
    }
    // The TUF chain, against the root this site trusts (and the versions it saw before).
    let client = Client::load(
        trusted_root,
        Arc::new(DirSource(staging.join("repo"))),
        &dir.join("tuf"),
        ClientOptions::default(),
    )
    .await
    .map_err(|e| err("repo/metadata", e.to_string()))?;
    let mut indexes = vec![];
    for p in &manifest.packages {
        let listed = client.release(&p.target).ok_or_else(|| {
            err(
                "bundle.json",
                format!("{}: not in the bundle's signed metadata", p.target),
            )
        })?;
        if listed.digest.to_string() != p.digest {
            return Err(err(
                "bundle.json",
                format!(
                    "{}: the signed metadata says {}, not {}",
                    p.target, listed.digest, p.digest
                ),
            ));
        }
        let index_bytes = client
            .fetch(&p.target)
            .await
            .map_err(|e| err(format!("the index of {}", p.target), e.to_string()))?;
        let index: Index = serde_json::from_slice(&index_bytes)
            .map_err(|e| err(format!("the index of {}", p.target), e.to_string()))?;
        let mut want: BTreeMap<String, Digest> = index
            .files
            .iter()
            .map(|(path, f)| (path.clone(), f.digest))
            .collect();
        want.insert("package.yaml".into(), index.manifest.digest);
        for (path, d) in want {
            if !store.has(&d) {
                return Err(err(
                    format!("blobs/sha256/{}", d.hex()),
                    format!("missing: {} of {} names it", path, p.target),
                ));
            }
        }
        indexes.push((p.target.clone(), index));
    }
    // The vulnerability data: what the bundle's signed timestamp names, if it names any (a
    // bundle stripped of it, or given other data, is refused)...
    if let Some(signed) = client.bundle_osv() {
        let Some(export) = &osv_export else {
            return Err(err(
                OSV_EXPORT,
                "missing: the bundle's signed timestamp names vulnerability data",
            ));
        };
        let actual = Digest::of(export).to_string();
        if signed["digest"].as_str() != Some(actual.as_str())
            || signed["size"].as_u64() != Some(export.len() as u64)
        {
            return Err(err(
                OSV_EXPORT,
                format!(
                    "its bytes hash to {actual} ({} bytes); the bundle's signed timestamp names {}",
                    export.len(),
                    signed
                ),
            ));
        }
    }
    // ... and signed by the Hub's targets key, or not taken at all.
    let osv = match (&osv_export, &osv_envelope) {
        (None, None) => None,
        (Some(export), Some(envelope)) => {
            Some(check_osv(&client, export, envelope, &indexes, &store)?)
        }
        (Some(_), None) => {
            return Err(err(
                OSV_ENVELOPE,
                "missing: the Hub's signature over osv/osv.json",
            ))
        }
        (None, Some(_)) => {
            return Err(err(OSV_EXPORT, "missing: the data osv/envelope.json signs"))
        }
    };
    // Verified: the bundle's repository replaces the previous one.
    let live = dir.join("repo");
    let old = dir.join("repo.old");
    let _ = std::fs::remove_dir_all(&old);
    if live.exists() {
        std::fs::rename(&live, &old).map_err(|e| err("repo", e.to_string()))?;
    }
    std::fs::rename(staging.join("repo"), &live).map_err(|e| err("repo", e.to_string()))?;
    let _ = std::fs::remove_dir_all(&old);
    // Kept beside the repository, verified, for scans on the site (`osv.json`, with its
    // signature in `osv.envelope.json`).
    if let (Some(export), Some(envelope)) = (&osv_export, &osv_envelope) {
        for (name, bytes) in [("osv.json", export), ("osv.envelope.json", envelope)] {
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
                .map_err(|e| err(name, e.to_string()))?;
        }
    }
    drop(cleanup);
    Ok(Imported {
        root_version: client.root_version(),
        manifest,
        blobs,
        osv,
    })
}

/// Removes an import's staging directory when the import ends, however it ends.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
