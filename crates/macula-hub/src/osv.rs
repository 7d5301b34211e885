//! The vulnerability scan: an SBOM's components against an offline OSV database (OSV's zip
//! exports, `all.zip` or one ecosystem's, or a directory of OSV JSON records), with no network.
//!
//! A component is affected by a record that names its ecosystem and package when its version
//! is listed in `versions`, or falls in a `SEMVER` range (introduced ≤ v < fixed, or
//! ≤ last_affected). `ECOSYSTEM` ranges are compared as semantic versions where both sides
//! parse as one (crates.io, npm, Go and most others); where they do not, only the listed
//! versions count, and the finding's absence is not a guarantee — said so in the scan's result.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sbom::{Component, Sbom};

/// The largest record read, and the most records loaded.
pub const MAX_RECORD: u64 = 4 << 20;
pub const MAX_RECORDS: usize = 2_000_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub affected: Vec<Affected>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Affected {
    pub package: Option<PackageRef>,
    #[serde(default)]
    pub ranges: Vec<Range>,
    #[serde(default)]
    pub versions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageRef {
    pub ecosystem: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Range {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub introduced: Option<String>,
    pub fixed: Option<String>,
    pub last_affected: Option<String>,
}

/// What [`Database::export`] writes (`osv/osv.json` in a bundle).
pub const EXPORT_KIND: &str = "macula-osv-export/v1";

/// The DSSE payload type of the Hub's signature over an export (`osv/envelope.json`).
pub const EXPORT_PAYLOAD_TYPE: &str = "application/vnd.macula.osv-export+json";

/// Records for some ecosystems, as a bundle carries them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub kind: String,
    pub ecosystems: Vec<String>,
    pub records: Vec<Record>,
}

/// What the Hub signs about an export: its digest and size, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportStatement {
    /// `sha256:<hex>` of `osv/osv.json`.
    pub digest: String,
    pub size: u64,
    pub ecosystems: Vec<String>,
    pub records: u64,
    /// When the Hub exported it (RFC 3339): how current the data is.
    pub exported: String,
    /// The snapshot version of the bundle it was made for (data of another bundle is refused).
    pub snapshot_version: u64,
}

impl Scan {
    /// As the Hub and the CLI show it: `{"findings": [{id, summary, component, version,
    /// fixed}], "unchecked": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "findings": self.findings.iter().map(|f| serde_json::json!({
                "id": f.id, "summary": f.summary, "component": f.component,
                "version": f.version, "fixed": f.fixed,
            })).collect::<Vec<_>>(),
            "unchecked": self.unchecked,
        })
    }
}

/// Records by (ecosystem, package name).
#[derive(Debug, Default)]
pub struct Database {
    by_package: HashMap<(String, String), Vec<Record>>,
    records: usize,
}

/// One vulnerability of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub id: String,
    pub summary: String,
    pub component: String,
    pub version: String,
    /// The first version that fixes it, where the record says.
    pub fixed: Option<String>,
}

/// What a scan found, and what it could not judge.
#[derive(Debug, Default)]
pub struct Scan {
    pub findings: Vec<Finding>,
    /// Components with no version or no known ecosystem: not checked.
    pub unchecked: Vec<String>,
}

impl Database {
    /// Loads every `*.json` record under `dir` (recursively). A file that is not a record is
    /// skipped and counted in the second value.
    pub fn load_dir(dir: &Path) -> std::io::Result<(Database, usize)> {
        let mut db = Database::default();
        let mut skipped = 0;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let path = entry.path();
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    stack.push(path);
                    continue;
                }
                if !kind.is_file() || path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                if entry.metadata()?.len() > MAX_RECORD || db.records >= MAX_RECORDS {
                    skipped += 1;
                    continue;
                }
                match serde_json::from_slice::<Record>(&std::fs::read(&path)?) {
                    Ok(r) => db.add(r),
                    Err(_) => skipped += 1,
                }
            }
        }
        Ok((db, skipped))
    }

    /// Loads every `*.json` record of an OSV export (`all.zip`, or one ecosystem's zip). An
    /// entry larger than [`MAX_RECORD`] once inflated (a zip bomb), or that is not a record, is
    /// skipped and counted in the second value.
    pub fn load_zip(file: &Path) -> std::io::Result<(Database, usize)> {
        use std::io::Read as _;
        let mut zip = zip::ZipArchive::new(std::fs::File::open(file)?)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut db = Database::default();
        let mut skipped = 0;
        for i in 0..zip.len() {
            let mut entry = zip
                .by_index(i)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let json = entry.name().is_ok_and(|n| n.ends_with(".json"));
            if !entry.is_file() || !json {
                continue;
            }
            if db.records >= MAX_RECORDS {
                skipped += 1;
                continue;
            }
            // The size an entry claims is not trusted: reading stops past the bound.
            let mut bytes = vec![];
            let read = (&mut entry).take(MAX_RECORD + 1).read_to_end(&mut bytes);
            if read.is_err() || bytes.len() as u64 > MAX_RECORD {
                skipped += 1;
                continue;
            }
            match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) => db.add(r),
                Err(_) => skipped += 1,
            }
        }
        Ok((db, skipped))
    }

    pub fn add(&mut self, r: Record) {
        let mut keys: Vec<(String, String)> = r
            .affected
            .iter()
            .filter_map(|a| a.package.as_ref())
            .map(|p| (p.ecosystem.clone(), p.name.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            self.by_package.entry(k).or_default().push(r.clone());
        }
        self.records += 1;
    }

    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The records that name a package of one of `ecosystems`, each once, by id (what an
    /// offline bundle carries for the ecosystems in its SBOMs: the fields the scan reads).
    pub fn export(&self, ecosystems: &std::collections::BTreeSet<String>) -> Export {
        let mut by_id: std::collections::BTreeMap<&str, &Record> = Default::default();
        for ((eco, _), records) in &self.by_package {
            if ecosystems.contains(eco) {
                for r in records {
                    by_id.entry(r.id.as_str()).or_insert(r);
                }
            }
        }
        Export {
            kind: EXPORT_KIND.into(),
            ecosystems: ecosystems.iter().cloned().collect(),
            records: by_id.into_values().cloned().collect(),
        }
    }

    /// A database of an [`Export`]'s records.
    pub fn from_export(e: Export) -> Database {
        let mut db = Database::default();
        for r in e.records {
            db.add(r);
        }
        db
    }

    /// Scans the SBOM's components.
    pub fn scan(&self, sbom: &Sbom) -> Scan {
        let mut scan = Scan::default();
        for c in &sbom.components {
            let (Some(eco), Some(version)) = (c.ecosystem(), c.version.as_deref()) else {
                scan.unchecked.push(c.name.clone());
                continue;
            };
            let name = purl_name(c).unwrap_or_else(|| c.name.clone());
            let Some(records) = self.by_package.get(&(eco.to_owned(), name.clone())) else {
                continue;
            };
            for r in records {
                for a in r.affected.iter().filter(|a| {
                    a.package
                        .as_ref()
                        .is_some_and(|p| p.ecosystem == eco && p.name == name)
                }) {
                    if let Some(fixed) = affects(a, version) {
                        scan.findings.push(Finding {
                            id: r.id.clone(),
                            summary: r.summary.clone(),
                            component: name.clone(),
                            version: version.to_owned(),
                            fixed,
                        });
                        break;
                    }
                }
            }
        }
        scan
    }
}

/// The package name a component's package URL gives (`pkg:npm/%40scope/x@1` → `@scope/x`).
fn purl_name(c: &Component) -> Option<String> {
    let rest = c.purl.as_deref()?.strip_prefix("pkg:")?;
    let (_, path) = rest.split_once('/')?;
    let path = path.split(['@', '?', '#']).next()?;
    Some(path.replace("%40", "@").replace("%2F", "/"))
}

/// Whether `a` affects `version`: `Some(fixed version, if known)` when it does.
fn affects(a: &Affected, version: &str) -> Option<Option<String>> {
    if a.versions.iter().any(|v| v == version) {
        return Some(None);
    }
    let v = semver::Version::parse(version.trim_start_matches('v')).ok()?;
    let parse = |s: &str| {
        if s == "0" {
            Some(semver::Version::new(0, 0, 0))
        } else {
            semver::Version::parse(s.trim_start_matches('v')).ok()
        }
    };
    for r in a
        .ranges
        .iter()
        .filter(|r| r.kind == "SEMVER" || r.kind == "ECOSYSTEM")
    {
        // Events in order: each `introduced` opens an interval that the next `fixed` (exclusive)
        // or `last_affected` (inclusive) closes.
        let mut open: Option<semver::Version> = None;
        for e in &r.events {
            if let Some(i) = e.introduced.as_deref().and_then(parse) {
                open = Some(i);
            }
            if let Some(f) = e.fixed.as_deref() {
                if let (Some(start), Some(end)) = (open.take(), parse(f)) {
                    if v >= start && v < end {
                        return Some(Some(f.to_owned()));
                    }
                }
            }
            if let Some(l) = e.last_affected.as_deref() {
                if let (Some(start), Some(end)) = (open.take(), parse(l)) {
                    if v >= start && v <= end {
                        return Some(None);
                    }
                }
            }
        }
        if open.is_some_and(|start| v >= start) {
            return Some(None);
        }
    }
    None
}
