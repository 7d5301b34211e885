//! Reviewing a package by its index: everything a publisher, the Hub and a node check before a
//! package counts, in one place (`macula hub publish` checks before uploading, the Hub before
//! accepting, `macula hub verify` and nodes before installing).
//!
//! Given the index's bytes and a store holding the blobs it names:
//! 1. the index is an index (`macula-package-index/v1`), naming the manifest and every file;
//! 2. the manifest parses and names the same package and version as the index;
//! 3. every file the manifest names is in the index, and the store holds it at that size;
//! 4. what the package asks for is within the publisher's grants and the largest plan
//!    (`submit::check`);
//! 5. the SBOM parses and describes every artifact by its SHA-256;
//! 6. the provenance is a DSSE envelope signed by a threshold of the publisher's keys, holding an
//!    in-toto Statement with a SLSA provenance predicate whose subjects are exactly the artifacts;
//! 7. with a vulnerability database, the SBOM's components are scanned (findings do not refuse
//!    the package; they decide its tier).
//!
//! Every problem is reported, with the file and the field.

use std::collections::BTreeMap;
use std::fmt;

use crate::attest::{self, Trusted};
use crate::digest::Digest;
use crate::osv;
use crate::pack::{Index, INDEX_KIND, MAX_MANIFEST};
use crate::package::{self, Package};
use crate::sbom;
use crate::store::BlobStore;
use crate::submit;

/// One problem: the file (`index`, `package.yaml`, the SBOM's path...), the field where one
/// applies, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub field: String,
    pub why: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field.is_empty() {
            true => write!(f, "{}: {}", self.file, self.why),
            false => write!(f, "{}: {}: {}", self.file, self.field, self.why),
        }
    }
}

/// All the problems, one per line.
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A package that passed review.
#[derive(Debug)]
pub struct Reviewed {
    pub package: Package,
    pub index: Index,
    /// The index's digest: the package's identity.
    pub digest: Digest,
    /// The artifacts by name, with their digests.
    pub artifacts: BTreeMap<String, Digest>,
    /// The vulnerability scan, when a database was given.
    pub scan: Option<osv::Scan>,
    /// The provenance statement's predicate (builder, materials...), as signed.
    pub provenance: serde_json::Value,
}

/// What a review checks against.
pub struct Rules<'a> {
    /// The publisher's keys, and how many must have signed the provenance.
    pub publisher: &'a Trusted,
    /// What the publisher may grant, and the largest plan.
    pub policy: &'a submit::Policy,
    /// The vulnerability database, if there is one.
    pub osv: Option<&'a osv::Database>,
}

/// The largest index read.
pub const MAX_INDEX: u64 = 4 * MAX_MANIFEST;

/// Reviews the package whose index is `index_bytes`, its blobs in `store`.
pub fn review(
    index_bytes: &[u8],
    store: &dyn BlobStore,
    rules: &Rules<'_>,
) -> Result<Reviewed, Vec<Problem>> {
    let problem = |file: &str, field: &str, why: String| Problem {
        file: file.to_owned(),
        field: field.to_owned(),
        why,
    };
    let one = |file: &str, field: &str, why: String| vec![problem(file, field, why)];
    if index_bytes.len() as u64 > MAX_INDEX {
        return Err(one("index", "", format!("larger than {MAX_INDEX} bytes")));
    }
    let de = &mut serde_json::Deserializer::from_slice(index_bytes);
    let index: Index = serde_path_to_error::deserialize(de)
        .map_err(|e| one("index", &e.path().to_string(), e.inner().to_string()))?;
    if index.kind != INDEX_KIND {
        return Err(one(
            "index",
            "kind",
            format!("{:?}: not {INDEX_KIND}", index.kind),
        ));
    }
    let digest = Digest::of(index_bytes);
    let read = |d: &Digest, size: u64, file: &str| -> Result<Vec<u8>, Vec<Problem>> {
        match store.read(d, size) {
            Ok(Some(b)) if b.len() as u64 == size => Ok(b),
            Ok(Some(b)) => Err(one(
                file,
                "",
                format!("{} bytes, the index says {size}", b.len()),
            )),
            Ok(None) => Err(one(file, "", format!("{d} was not uploaded"))),
            Err(e) => Err(one(file, "", e.to_string())),
        }
    };
    if index.manifest.size > MAX_MANIFEST {
        return Err(one(
            "index",
            "manifest.size",
            format!("at most {MAX_MANIFEST}"),
        ));
    }
    let text = read(&index.manifest.digest, index.manifest.size, "package.yaml")?;
    let text =
        String::from_utf8(text).map_err(|_| one("package.yaml", "", "not UTF-8 text".into()))?;
    let pkg = package::parse(&text).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| problem("package.yaml", &e.path, e.message))
            .collect::<Vec<_>>()
    })?;

    let mut problems = vec![];
    if index.name != pkg.full_name() {
        problems.push(problem(
            "index",
            "name",
            format!("{:?}, the manifest names {:?}", index.name, pkg.full_name()),
        ));
    }
    if index.version != pkg.version.to_string() {
        problems.push(problem(
            "index",
            "version",
            format!("{:?}, the manifest says {}", index.version, pkg.version),
        ));
    }
    // Every file the manifest names, present at its size.
    let mut named: Vec<(String, &str)> = pkg
        .artifacts
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("artifacts[{i}].file"), a.file.as_str()))
        .collect();
    if let Some(f) = &pkg.sbom {
        named.push(("attestations.sbom".into(), f));
    } else {
        problems.push(problem(
            "package.yaml",
            "attestations.sbom",
            "a package carries an SBOM (CycloneDX or SPDX JSON)".into(),
        ));
    }
    if let Some(f) = &pkg.provenance {
        named.push(("attestations.provenance".into(), f));
    } else {
        problems.push(problem(
            "package.yaml",
            "attestations.provenance",
            "a package carries its provenance (an in-toto Statement in a DSSE envelope; `macula hub attest` writes one)".into(),
        ));
    }
    for (field, file) in &named {
        match index.files.get(*file) {
            None => problems.push(problem(
                "index",
                &format!("files.{file}"),
                format!("missing: the manifest names it ({field})"),
            )),
            Some(r) if !store.has(&r.digest) => problems.push(problem(
                file,
                field,
                format!("{} was not uploaded", r.digest),
            )),
            Some(_) => {}
        }
    }
    for e in submit::check(&pkg, rules.policy) {
        problems.push(problem("package.yaml", &e.path, e.message));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let artifacts: BTreeMap<String, Digest> = pkg
        .artifacts
        .iter()
        .filter_map(|a| Some((a.name.clone(), index.files.get(&a.file)?.digest)))
        .collect();

    // The SBOM.
    let mut sbom_doc = None;
    if let Some(file) = &pkg.sbom {
        let r = &index.files[file];
        match read(&r.digest, r.size.min(sbom::MAX_SBOM as u64), file) {
            Err(mut p) => problems.append(&mut p),
            Ok(bytes) => match sbom::parse(&bytes).and_then(|s| {
                let artifact_files: BTreeMap<String, Digest> = artifacts.clone();
                sbom::covers(&s, &artifact_files).map(|_| s)
            }) {
                Ok(s) => sbom_doc = Some(s),
                Err(e) => problems.push(problem(file, &e.field, e.why)),
            },
        }
    }
    // The provenance.
    let mut predicate = serde_json::Value::Null;
    if let Some(file) = &pkg.provenance {
        let r = &index.files[file];
        match read(&r.digest, r.size.min(attest::MAX_ENVELOPE as u64), file) {
            Err(mut p) => problems.append(&mut p),
            Ok(bytes) => {
                let checked = attest::verify(&bytes, attest::INTOTO_PAYLOAD_TYPE, rules.publisher)
                    .and_then(|payload| attest::statement(&payload, attest::SLSA_PROVENANCE_V1))
                    .and_then(|s| attest::check_subjects(&s, &artifacts).map(|_| s));
                match checked {
                    Ok(s) => predicate = s.predicate,
                    Err(e) => problems.push(problem(file, "", e.to_string())),
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let scan = match (rules.osv, &sbom_doc) {
        (Some(db), Some(s)) => Some(db.scan(s)),
        _ => None,
    };
    Ok(Reviewed {
        package: pkg,
        index,
        digest,
        artifacts,
        scan,
        provenance: predicate,
    })
}

/// A SLSA provenance Statement for `artifacts`, as `macula hub attest` writes it (signed into a
/// DSSE envelope by the caller).
pub fn provenance_statement(
    artifacts: &BTreeMap<String, Digest>,
    builder: &str,
    package: &str,
) -> serde_json::Value {
    let subject: Vec<serde_json::Value> = artifacts
        .iter()
        .map(|(name, d)| serde_json::json!({"name": name, "digest": {"sha256": d.hex()}}))
        .collect();
    serde_json::json!({
        "_type": attest::STATEMENT_V1,
        "subject": subject,
        "predicateType": attest::SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": "https://macula.dev/hub/package/v1",
                "externalParameters": {"package": package},
            },
            "runDetails": {"builder": {"id": builder}},
        },
    })
}
