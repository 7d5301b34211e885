//! A package's manifest: the seed's `beemesh.yaml` shape (`name: org/postgres-ha`, `version`,
//! `channel`, `kind: hub-package`, `permissions.planes`/`capabilities`, `signing`,
//! `attestations.sbom`/`provenance`, `compatibility` ranges) plus our runtime fields: the
//! `artifacts` it carries (files of the package directory) and the `workload` it deploys (a
//! payload or job manifest, checked as the nodes check one). Every problem is reported with its
//! field's path.

use std::collections::{BTreeMap, BTreeSet};

/// The manifest's file name in a package directory (the seed's name is accepted too).
pub const MANIFEST_FILE: &str = "package.yaml";
pub const SEED_MANIFEST_FILE: &str = "beemesh.yaml";

/// The planes a package may ask to reach: `workplane` (it runs as workloads), `dataplane` (its
/// replicas connect to a realm's pub/sub and RPC).
pub const PLANES: &[&str] = &["workplane", "dataplane"];

/// The most capabilities and artifacts one manifest may list.
pub const MAX_CAPABILITIES: usize = 64;
pub const MAX_ARTIFACTS: usize = 64;

/// One problem with a manifest: where (`permissions.capabilities[2]`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A checked package manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Package {
    /// The publisher's namespace (`org` of `org/name`).
    pub publisher: String,
    /// The package's name within it.
    pub name: String,
    pub version: semver::Version,
    pub channel: String,
    pub description: Option<String>,
    pub planes: BTreeSet<String>,
    /// As the manifest lists them (its indexes are the manifest's).
    pub capabilities: Vec<String>,
    /// References to signatures made elsewhere (the seed's `signing.cosign`), kept as written:
    /// informational — what a node trusts is the Hub's signed metadata.
    pub signing: BTreeMap<String, String>,
    /// The SBOM and provenance files, as the package directory names them.
    pub sbom: Option<String>,
    pub provenance: Option<String>,
    /// Compatibility ranges by component (`core`, `commercial`).
    pub compatibility: BTreeMap<String, semver::VersionReq>,
    pub artifacts: Vec<Artifact>,
    /// The workload it deploys, as written (YAML), and checked.
    pub workload: Option<(String, macula_workloads::Manifest)>,
}

impl Package {
    /// `org/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.publisher, self.name)
    }

    /// The workload this package deploys, pinned to its release: the workload manifest with
    /// `package: {name: <target>, digest: <index digest>}` added, with `edit` applied to the
    /// document first (a smoke test renames it). Its name and YAML; an error if the package
    /// deploys none.
    pub fn pinned_workload(
        &self,
        target: &str,
        digest: &str,
        edit: impl FnOnce(&mut serde_yaml_ng::Mapping),
    ) -> Result<(String, String), String> {
        let (text, _) = self.workload.as_ref().ok_or_else(|| {
            format!("{target} deploys no workload (its manifest has no `workload`)")
        })?;
        let mut doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| format!("{target}: workload: {e}"))?;
        let m = doc
            .as_mapping_mut()
            .ok_or_else(|| format!("{target}: workload: not a mapping"))?;
        edit(m);
        let mut pin = serde_yaml_ng::Mapping::new();
        pin.insert("name".into(), target.into());
        pin.insert("digest".into(), digest.into());
        m.insert("package".into(), serde_yaml_ng::Value::Mapping(pin));
        let text = serde_yaml_ng::to_string(&doc).map_err(|e| e.to_string())?;
        let checked = macula_workloads::parse(&text).map_err(|e| format!("{target}: {e}"))?;
        Ok((checked.workload().name.clone(), text))
    }
}

/// A file the package carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    /// Its path in the package directory.
    pub file: String,
}

mod doc {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Doc {
        pub name: String,
        pub version: String,
        #[serde(default)]
        pub channel: Option<String>,
        pub kind: String,
        #[serde(default)]
        pub description: Option<String>,
        #[serde(default)]
        pub permissions: Permissions,
        /// Where the seed keeps a cosign signature's reference: informational here (what a
        /// node trusts is the Hub's TUF metadata and the publisher's delegation).
        #[serde(default)]
        pub signing: BTreeMap<String, String>,
        #[serde(default)]
        pub attestations: Attestations,
        #[serde(default)]
        pub compatibility: BTreeMap<String, String>,
        #[serde(default)]
        pub artifacts: Vec<ArtifactDoc>,
        #[serde(default)]
        pub workload: Option<serde_yaml_ng::Value>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Permissions {
        #[serde(default)]
        pub planes: Vec<String>,
        #[serde(default)]
        pub capabilities: Vec<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Attestations {
        #[serde(default)]
        pub sbom: Option<String>,
        #[serde(default)]
        pub provenance: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ArtifactDoc {
        pub name: String,
        pub file: String,
    }
}

/// A name part: lowercase letters, digits and inner hyphens, 1 to 64 characters.
fn name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A path inside the package directory: relative, no `..`, no empty parts.
fn inner_path(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('/')
        && s.split('/')
            .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\\'))
}

/// A capability: `domain:action`, or `domain:action:what` (as realm roles write permissions:
/// `rpc:call:com.example.*`), lowercase domain and action, nothing blank.
fn capability(s: &str) -> Result<(), String> {
    let mut parts = s.splitn(3, ':');
    let (domain, action) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= 32
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if !word(domain) || !word(action) {
        return Err(format!(
            "{s:?} is not a capability: write domain:action or domain:action:what (for example rpc:call:com.example.db.*)"
        ));
    }
    if let Some(what) = parts.next() {
        if what.is_empty() || what.len() > 200 || what.chars().any(char::is_whitespace) {
            return Err(format!(
                "{s:?}: what it applies to is blank, too long or has spaces"
            ));
        }
    }
    Ok(())
}

/// Parses and checks a manifest (YAML or JSON); every problem found, each with its path.
pub fn parse(text: &str) -> Result<Package, Vec<FieldError>> {
    let err = |path: &str, message: String| FieldError {
        path: path.to_owned(),
        message,
    };
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let d: doc::Doc = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        vec![err(
            if path == "." { "" } else { &path },
            e.inner().to_string(),
        )]
    })?;
    let mut errors = vec![];
    let (publisher, name) = match d.name.split_once('/') {
        Some((p, n)) if name_part(p) && name_part(n) => (p.to_owned(), n.to_owned()),
        _ => {
            errors.push(err(
                "name",
                format!(
                    "{:?} is not org/name (lowercase letters, digits and inner hyphens, each part 1 to 64)",
                    d.name
                ),
            ));
            (String::new(), String::new())
        }
    };
    let version = semver::Version::parse(&d.version).unwrap_or_else(|e| {
        errors.push(err(
            "version",
            format!(
                "{:?} is not a semantic version (MAJOR.MINOR.PATCH): {e}",
                d.version
            ),
        ));
        semver::Version::new(0, 0, 0)
    });
    let channel = d.channel.unwrap_or_else(|| "stable".to_owned());
    if !name_part(&channel) || channel.len() > 32 {
        errors.push(err("channel", format!("{channel:?} is not a channel name")));
    }
    if d.kind != "hub-package" {
        errors.push(err(
            "kind",
            format!("{:?}: a package's kind is hub-package", d.kind),
        ));
    }
    if d.description.as_ref().is_some_and(|s| s.len() > 4096) {
        errors.push(err("description", "longer than 4096 bytes".into()));
    }
    let mut planes = BTreeSet::new();
    for (i, p) in d.permissions.planes.iter().enumerate() {
        if !PLANES.contains(&p.as_str()) {
            errors.push(err(
                &format!("permissions.planes[{i}]"),
                format!("unknown plane {p:?} (known: {})", PLANES.join(", ")),
            ));
        } else if !planes.insert(p.clone()) {
            errors.push(err(
                &format!("permissions.planes[{i}]"),
                format!("{p:?} twice"),
            ));
        }
    }
    let caps = &d.permissions.capabilities;
    if caps.len() > MAX_CAPABILITIES {
        errors.push(err(
            "permissions.capabilities",
            format!("{} capabilities: at most {MAX_CAPABILITIES}", caps.len()),
        ));
    }
    let mut capabilities: Vec<String> = vec![];
    for (i, c) in caps.iter().enumerate().take(MAX_CAPABILITIES) {
        let path = format!("permissions.capabilities[{i}]");
        if let Err(m) = capability(c) {
            errors.push(err(&path, m));
        } else if capabilities.contains(c) {
            errors.push(err(&path, format!("{c:?} twice")));
        }
        capabilities.push(c.clone());
    }
    for (field, v) in [
        ("attestations.sbom", &d.attestations.sbom),
        ("attestations.provenance", &d.attestations.provenance),
    ] {
        if let Some(p) = v.as_deref().filter(|p| !inner_path(p)) {
            errors.push(err(
                field,
                format!("{p:?} is not a path inside the package (relative, no ..)"),
            ));
        }
    }
    let mut compatibility = BTreeMap::new();
    for (k, v) in &d.compatibility {
        let path = format!("compatibility.{k}");
        if !["core", "commercial"].contains(&k.as_str()) {
            errors.push(err(
                &path,
                "unknown component (known: core, commercial)".into(),
            ));
            continue;
        }
        match semver::VersionReq::parse(v) {
            Ok(r) => {
                compatibility.insert(k.clone(), r);
            }
            Err(e) => errors.push(err(&path, format!("{v:?} is not a version range: {e}"))),
        }
    }
    if d.artifacts.len() > MAX_ARTIFACTS {
        errors.push(err(
            "artifacts",
            format!("{} artifacts: at most {MAX_ARTIFACTS}", d.artifacts.len()),
        ));
    }
    let mut artifacts = vec![];
    let mut names = BTreeSet::new();
    for (i, a) in d.artifacts.iter().enumerate().take(MAX_ARTIFACTS) {
        if !name_part(&a.name) {
            errors.push(err(
                &format!("artifacts[{i}].name"),
                format!("{:?} is not an artifact name", a.name),
            ));
        } else if !names.insert(a.name.clone()) {
            errors.push(err(
                &format!("artifacts[{i}].name"),
                format!("{:?} twice", a.name),
            ));
        }
        if !inner_path(&a.file) {
            errors.push(err(
                &format!("artifacts[{i}].file"),
                format!(
                    "{:?} is not a path inside the package (relative, no ..)",
                    a.file
                ),
            ));
        }
        artifacts.push(Artifact {
            name: a.name.clone(),
            file: a.file.clone(),
        });
    }
    let workload = match &d.workload {
        None => None,
        Some(v) => {
            let text = serde_yaml_ng::to_string(v).unwrap_or_default();
            match macula_workloads::parse(&text) {
                Ok(m) => Some((text, m)),
                Err(e) => {
                    errors.push(err("workload", e.to_string()));
                    None
                }
            }
        }
    };
    if workload.is_some() && !planes.contains("workplane") {
        errors.push(err(
            "permissions.planes",
            "a package with a workload runs on the workplane: list it".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Package {
        publisher,
        name,
        version,
        channel,
        description: d.description,
        planes,
        capabilities,
        signing: d.signing,
        sbom: d.attestations.sbom,
        provenance: d.attestations.provenance,
        compatibility,
        artifacts,
        workload,
    })
}

/// The problems of manifest `file`, one per line, each naming the file and the field.
pub fn describe(file: &str, errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{file}: {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}
