//! Packing a package directory: its manifest checked, every file it names hashed into the blob
//! store, and its *index* written last — a canonical JSON blob naming the manifest and every file
//! by digest and size. The index's digest is the package's identity (what the Hub signs, what a
//! deploy names). The index is stored only once every file is, so a package is never visible
//! with a file missing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::package::{self, Package};
use crate::store::{BlobStore, StoreError};

/// The index's format.
pub const INDEX_KIND: &str = "macula-package-index/v1";
/// The largest manifest read.
pub const MAX_MANIFEST: u64 = 1 << 20;

/// What a package may weigh.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// One file.
    pub file: u64,
    /// All of them.
    pub total: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            file: 4 << 30,
            total: 8 << 30,
        }
    }
}

/// A file of a package, as its index names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub digest: Digest,
    pub size: u64,
}

/// A package's index (see the module's documentation). Keys are sorted (`BTreeMap`), so the
/// same package always gives the same bytes, and the same digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub kind: String,
    /// `org/name`.
    pub name: String,
    pub version: String,
    /// The manifest as written.
    pub manifest: FileRef,
    /// Every file the manifest names, by its path in the package.
    pub files: BTreeMap<String, FileRef>,
}

/// A package packed: checked, stored, indexed.
#[derive(Debug)]
pub struct Packed {
    pub package: Package,
    pub index: Index,
    /// The index's digest: the package's identity.
    pub digest: Digest,
}

/// Why a directory could not be packed; each names the file, and the field where one applies.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{}", package::describe(.file, .errors))]
    Manifest {
        file: String,
        errors: Vec<package::FieldError>,
    },
    #[error("{file} (named by {field}): {why}")]
    File {
        file: String,
        field: String,
        why: String,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Packs the package in `dir` into `store`.
pub fn pack(dir: &Path, store: &dyn BlobStore, limits: Limits) -> Result<Packed, PackError> {
    let (manifest_file, text) = read_manifest(dir)?;
    let pkg = package::parse(&text).map_err(|errors| PackError::Manifest {
        file: manifest_file.clone(),
        errors,
    })?;
    // Every file the manifest names: artifacts, SBOM, provenance.
    let mut named: Vec<(String, String)> = pkg
        .artifacts
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("artifacts[{i}].file"), a.file.clone()))
        .collect();
    for (field, f) in [
        ("attestations.sbom", &pkg.sbom),
        ("attestations.provenance", &pkg.provenance),
    ] {
        if let Some(f) = f {
            named.push((field.to_owned(), f.clone()));
        }
    }
    let root = dir.canonicalize().map_err(|e| PackError::File {
        file: dir.display().to_string(),
        field: String::new(),
        why: e.to_string(),
    })?;
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    for (field, path) in named {
        if files.contains_key(&path) {
            continue;
        }
        let fail = |why: String| PackError::File {
            file: path.clone(),
            field: field.clone(),
            why,
        };
        let full = inside(&root, &path).map_err(fail)?;
        let mut f = File::open(&full).map_err(|e| fail(e.to_string()))?;
        let left = limits.total.saturating_sub(total);
        let (digest, size) =
            store
                .put(&mut f, limits.file.min(left), None)
                .map_err(|e| match e {
                    StoreError::TooLarge { limit } => fail(format!(
                        "larger than {limit} bytes (a file may be {} bytes, a package {})",
                        limits.file, limits.total
                    )),
                    e => PackError::Store(e),
                })?;
        total += size;
        files.insert(path.clone(), FileRef { digest, size });
    }
    let (mdigest, msize) = store.put(&mut text.as_bytes(), MAX_MANIFEST, None)?;
    let index = Index {
        kind: INDEX_KIND.to_owned(),
        name: pkg.full_name(),
        version: pkg.version.to_string(),
        manifest: FileRef {
            digest: mdigest,
            size: msize,
        },
        files,
    };
    let bytes = serde_json::to_vec(&index).map_err(|e| PackError::File {
        file: manifest_file,
        field: String::new(),
        why: e.to_string(),
    })?;
    let (digest, _) = store.put(&mut &bytes[..], MAX_MANIFEST * 4, None)?;
    Ok(Packed {
        package: pkg,
        index,
        digest,
    })
}

/// The manifest of the package in `dir`: its file name and text.
pub(crate) fn read_manifest(dir: &Path) -> Result<(String, String), PackError> {
    for name in [package::MANIFEST_FILE, package::SEED_MANIFEST_FILE] {
        let path = dir.join(name);
        let Ok(f) = File::open(&path) else {
            continue;
        };
        let mut text = String::new();
        let shown = path.display().to_string();
        f.take(MAX_MANIFEST + 1)
            .read_to_string(&mut text)
            .map_err(|e| PackError::File {
                file: shown.clone(),
                field: String::new(),
                why: format!("not UTF-8 text: {e}"),
            })?;
        if text.len() as u64 > MAX_MANIFEST {
            return Err(PackError::File {
                file: shown,
                field: String::new(),
                why: format!("larger than {MAX_MANIFEST} bytes"),
            });
        }
        return Ok((shown, text));
    }
    Err(PackError::File {
        file: dir.display().to_string(),
        field: String::new(),
        why: format!(
            "no {} (or {}) in the package directory",
            package::MANIFEST_FILE,
            package::SEED_MANIFEST_FILE
        ),
    })
}

/// `path` (relative, checked by the manifest) under `root`, refusing what resolves outside it
/// (a symbolic link out of the package) and what is not a regular file.
pub(crate) fn inside(root: &Path, path: &str) -> Result<PathBuf, String> {
    let full = root
        .join(path)
        .canonicalize()
        .map_err(|e| format!("cannot be read: {e}"))?;
    if !full.starts_with(root) {
        return Err("resolves outside the package directory".into());
    }
    if !full.is_file() {
        return Err("not a regular file".into());
    }
    Ok(full)
}
