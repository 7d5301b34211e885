//! Preparing a package directory for publishing (`macula hub attest`): the attestations a
//! package must carry, made from its files.
//!
//! - **SBOM.** If the file the manifest names as `attestations.sbom` does not exist, an SPDX 2.3
//!   document is written that describes every artifact by name and SHA-256 (and lists no
//!   components: a build tool that knows the dependencies should write the SBOM instead; the
//!   vulnerability scan has nothing to check then, and says so). An existing SBOM is kept.
//! - **Provenance.** An in-toto Statement with a SLSA provenance predicate whose subjects are the
//!   artifacts, signed into a DSSE envelope with the publisher's keys, written to the file the
//!   manifest names as `attestations.provenance` (replacing what was there: it must match the
//!   artifacts as they are now).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use ed25519_dalek::SigningKey;

use crate::attest;
use crate::digest::{hash_stream, Digest};
use crate::pack::{inside, read_manifest, PackError};
use crate::package;
use crate::review::provenance_statement;

/// What `attest` wrote.
#[derive(Debug, PartialEq, Eq)]
pub struct Attested {
    /// The artifacts by name, with their digests.
    pub artifacts: BTreeMap<String, Digest>,
    /// The SBOM's path, if this wrote it (`None`: the package's own was kept).
    pub sbom_written: Option<String>,
    pub provenance: String,
}

fn file_err(file: &str, field: &str, why: impl Into<String>) -> PackError {
    PackError::File {
        file: file.to_owned(),
        field: field.to_owned(),
        why: why.into(),
    }
}

/// Writes the package's SBOM (when missing) and its signed provenance.
pub fn attest(dir: &Path, keys: &[&SigningKey], builder: &str) -> Result<Attested, PackError> {
    let (manifest_file, text) = read_manifest(dir)?;
    let pkg = package::parse(&text).map_err(|errors| PackError::Manifest {
        file: manifest_file.clone(),
        errors,
    })?;
    let root = dir
        .canonicalize()
        .map_err(|e| file_err(&dir.display().to_string(), "", e.to_string()))?;
    let mut artifacts = BTreeMap::new();
    for (i, a) in pkg.artifacts.iter().enumerate() {
        let field = format!("artifacts[{i}].file");
        let full = inside(&root, &a.file).map_err(|why| file_err(&a.file, &field, why))?;
        let mut f = File::open(&full).map_err(|e| file_err(&a.file, &field, e.to_string()))?;
        let (d, _) = hash_stream(&mut f, u64::MAX, |_| Ok(()))
            .map_err(|e| file_err(&a.file, &field, e.to_string()))?;
        artifacts.insert(a.name.clone(), d);
    }
    let sbom = pkg.sbom.clone().ok_or_else(|| {
        file_err(
            &manifest_file,
            "attestations.sbom",
            "name the SBOM's file (it is written if it does not exist)",
        )
    })?;
    let provenance = pkg.provenance.clone().ok_or_else(|| {
        file_err(
            &manifest_file,
            "attestations.provenance",
            "name the provenance's file (for example provenance.dsse.json)",
        )
    })?;
    let mut sbom_written = None;
    let sbom_path = safe_join(&root, &sbom, "attestations.sbom")?;
    if !sbom_path.exists() {
        let doc = spdx_of(&pkg.full_name(), &pkg.version.to_string(), &pkg, &artifacts);
        write(&sbom_path, &doc, &sbom)?;
        sbom_written = Some(sbom.clone());
    }
    let statement = provenance_statement(&artifacts, builder, &pkg.full_name());
    let body =
        serde_json::to_vec(&statement).map_err(|e| file_err(&provenance, "", e.to_string()))?;
    let envelope = attest::sign(attest::INTOTO_PAYLOAD_TYPE, &body, keys);
    let json = serde_json::to_vec_pretty(&envelope)
        .map_err(|e| file_err(&provenance, "", e.to_string()))?;
    let prov_path = safe_join(&root, &provenance, "attestations.provenance")?;
    write(&prov_path, &json, &provenance)?;
    Ok(Attested {
        artifacts,
        sbom_written,
        provenance,
    })
}

/// `rel` under `root`, refusing `..` and absolute paths (the manifest's check), and a parent
/// that resolves outside.
fn safe_join(root: &Path, rel: &str, field: &str) -> Result<std::path::PathBuf, PackError> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(file_err(rel, field, "must be a path inside the package"));
    }
    let full = root.join(p);
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent).map_err(|e| file_err(rel, field, e.to_string()))?;
        let real = parent
            .canonicalize()
            .map_err(|e| file_err(rel, field, e.to_string()))?;
        if !real.starts_with(root) {
            return Err(file_err(
                rel,
                field,
                "resolves outside the package directory",
            ));
        }
    }
    if full.is_symlink() {
        return Err(file_err(rel, field, "is a symbolic link"));
    }
    Ok(full)
}

fn write(path: &Path, bytes: &[u8], shown: &str) -> Result<(), PackError> {
    let tmp = path.with_extension("tmp-attest");
    std::fs::write(&tmp, bytes).map_err(|e| file_err(shown, "", e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(shown, "", e.to_string()))
}

/// An SPDX 2.3 document describing `artifacts` (files by name and SHA-256).
fn spdx_of(
    name: &str,
    version: &str,
    pkg: &package::Package,
    artifacts: &BTreeMap<String, Digest>,
) -> Vec<u8> {
    let files: Vec<serde_json::Value> = pkg
        .artifacts
        .iter()
        .filter_map(|a| {
            let d = artifacts.get(&a.name)?;
            Some(serde_json::json!({
                "SPDXID": format!("SPDXRef-File-{}", spdx_id(&a.name)),
                "fileName": format!("./{}", a.file),
                "checksums": [{"algorithm": "SHA256", "checksumValue": d.hex()}],
            }))
        })
        .collect();
    let doc = serde_json::json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{name}@{version}"),
        "documentNamespace": format!("https://macula.dev/spdx/{name}/{version}"),
        "creationInfo": {"creators": ["Tool: macula-hub-attest"], "created": "1970-01-01T00:00:00Z"},
        "files": files,
    });
    serde_json::to_vec_pretty(&doc).unwrap_or_default()
}

fn spdx_id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}
