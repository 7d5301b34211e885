//! Software bills of materials: SPDX 2.x JSON or CycloneDX JSON, read into the components they
//! list (name, version, package URL) and checked against the package: every artifact must be
//! described in the SBOM by its SHA-256 (as a file, a package or a component checksum), so an
//! SBOM written for other bytes is refused. The components feed the vulnerability scan.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::digest::Digest;

/// The largest SBOM read, and the most components kept.
pub const MAX_SBOM: usize = 16 << 20;
pub const MAX_COMPONENTS: usize = 100_000;

/// Which format an SBOM is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Spdx,
    CycloneDx,
}

/// A component an SBOM lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub version: Option<String>,
    /// Its package URL (`pkg:cargo/serde@1.0.0`), when given.
    pub purl: Option<String>,
}

impl Component {
    /// The OSV ecosystem its package URL names (`pkg:cargo/...` → `crates.io`), if known.
    pub fn ecosystem(&self) -> Option<&'static str> {
        let kind = self
            .purl
            .as_deref()?
            .strip_prefix("pkg:")?
            .split('/')
            .next()?;
        Some(match kind {
            "cargo" => "crates.io",
            "npm" => "npm",
            "pypi" => "PyPI",
            "golang" => "Go",
            "maven" => "Maven",
            "deb" => "Debian",
            "gem" => "RubyGems",
            "nuget" => "NuGet",
            "composer" => "Packagist",
            "apk" => "Alpine",
            _ => return None,
        })
    }
}

/// An SBOM as read.
#[derive(Debug, Clone)]
pub struct Sbom {
    pub format: Format,
    pub components: Vec<Component>,
    /// Every SHA-256 it gives a checksum for.
    pub digests: BTreeSet<Digest>,
}

/// Why an SBOM is refused; `field` is a JSON path where one applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct SbomError {
    pub field: String,
    pub why: String,
}

fn err(field: &str, why: impl Into<String>) -> SbomError {
    SbomError {
        field: field.to_owned(),
        why: why.into(),
    }
}

/// Reads an SBOM (SPDX 2.x or CycloneDX 1.x, JSON).
pub fn parse(bytes: &[u8]) -> Result<Sbom, SbomError> {
    if bytes.len() > MAX_SBOM {
        return Err(err("", format!("larger than {MAX_SBOM} bytes")));
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|e| err("", format!("not JSON: {e}")))?;
    let str_at = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut digests = BTreeSet::new();
    let mut components = vec![];
    let mut add_digest = |field: &str, hex: &str| -> Result<(), SbomError> {
        let d: Digest = format!("sha256:{}", hex.to_ascii_lowercase())
            .parse()
            .map_err(|e: crate::digest::BadDigest| err(field, e.to_string()))?;
        digests.insert(d);
        Ok(())
    };
    let format = if let Some(version) = str_at(&v, "spdxVersion") {
        if !version.starts_with("SPDX-2.") {
            return Err(err("spdxVersion", format!("{version:?}: SPDX 2.x is read")));
        }
        for key in ["packages", "files"] {
            let Some(items) = v.get(key) else { continue };
            let items = items.as_array().ok_or_else(|| err(key, "not a list"))?;
            for (i, p) in items.iter().enumerate() {
                let at = format!("{key}[{i}]");
                let checksums = p.get("checksums").and_then(Value::as_array);
                for (j, c) in checksums.into_iter().flatten().enumerate() {
                    if str_at(c, "algorithm").as_deref() == Some("SHA256") {
                        let value = str_at(c, "checksumValue").unwrap_or_default();
                        add_digest(&format!("{at}.checksums[{j}].checksumValue"), &value)?;
                    }
                }
                if key == "packages" {
                    let name =
                        str_at(p, "name").ok_or_else(|| err(&at, "a package with no name"))?;
                    let purl = p
                        .get("externalRefs")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .find(|r| str_at(r, "referenceType").as_deref() == Some("purl"))
                        .and_then(|r| str_at(r, "referenceLocator"));
                    components.push(Component {
                        name,
                        version: str_at(p, "versionInfo"),
                        purl,
                    });
                }
            }
        }
        Format::Spdx
    } else if str_at(&v, "bomFormat").as_deref() == Some("CycloneDX") {
        let spec = str_at(&v, "specVersion").unwrap_or_default();
        if !spec.starts_with("1.") {
            return Err(err(
                "specVersion",
                format!("{spec:?}: CycloneDX 1.x is read"),
            ));
        }
        let mut all: Vec<(String, &Value)> = vec![];
        if let Some(c) = v.get("metadata").and_then(|m| m.get("component")) {
            all.push(("metadata.component".into(), c));
        }
        if let Some(items) = v.get("components") {
            let items = items
                .as_array()
                .ok_or_else(|| err("components", "not a list"))?;
            all.extend(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("components[{i}]"), c)),
            );
        }
        for (at, c) in all {
            for (j, h) in c
                .get("hashes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                if str_at(h, "alg").as_deref() == Some("SHA-256") {
                    let value = str_at(h, "content").unwrap_or_default();
                    add_digest(&format!("{at}.hashes[{j}].content"), &value)?;
                }
            }
            let name = str_at(c, "name").ok_or_else(|| err(&at, "a component with no name"))?;
            components.push(Component {
                name,
                version: str_at(c, "version"),
                purl: str_at(c, "purl"),
            });
        }
        Format::CycloneDx
    } else {
        return Err(err(
            "",
            "neither SPDX (spdxVersion) nor CycloneDX (bomFormat: CycloneDX)",
        ));
    };
    if components.len() > MAX_COMPONENTS {
        return Err(err(
            "",
            format!("{} components: at most {MAX_COMPONENTS}", components.len()),
        ));
    }
    Ok(Sbom {
        format,
        components,
        digests,
    })
}

/// The SBOM of a packed package (`index`), read from `store` (its manifest's
/// `attestations.sbom`): None when the package names none; an error naming what could not be
/// read.
pub fn of_package(
    store: &dyn crate::store::BlobStore,
    index: &crate::pack::Index,
) -> Result<Option<Sbom>, String> {
    let manifest = store
        .read(&index.manifest.digest, crate::pack::MAX_MANIFEST)
        .map_err(|e| format!("its manifest: {e}"))?
        .ok_or("its manifest is missing")?;
    let pkg = crate::parse(&String::from_utf8_lossy(&manifest))
        .map_err(|e| crate::package::describe("package.yaml", &e))?;
    let Some(path) = pkg.sbom.as_ref() else {
        return Ok(None);
    };
    let file = index
        .files
        .get(path)
        .ok_or_else(|| format!("{path}: not among the package's files"))?;
    let bytes = store
        .read(&file.digest, MAX_SBOM as u64)
        .map_err(|e| format!("{path}: {e}"))?
        .ok_or_else(|| format!("{path}: missing"))?;
    parse(&bytes).map(Some).map_err(|e| format!("{path}: {e}"))
}

/// Every artifact (name → digest) is described by the SBOM by its SHA-256; the first one that
/// is not, by name.
pub fn covers(sbom: &Sbom, artifacts: &BTreeMap<String, Digest>) -> Result<(), SbomError> {
    match artifacts.iter().find(|(_, d)| !sbom.digests.contains(d)) {
        None => Ok(()),
        Some((name, d)) => Err(err(
            "",
            format!(
                "artifact {name} ({d}) is not described by the SBOM (no SHA-256 checksum of it)"
            ),
        )),
    }
}
