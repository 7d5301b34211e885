//! Package manifests: the seed's example parses; every problem is named by its field; the
//! workload a package deploys is checked as the nodes check one.

use macula_hub::package::{parse, FieldError};

const SEED: &str = r#"
name: org/postgres-ha
version: 14.7.1
channel: stable
kind: hub-package
permissions:
  planes: ["workplane"]
  capabilities: ["wdht:read","tasks:publish"]
signing:
  cosign: ghcr.io/org/postgres-ha:sha256-abc.sig
attestations:
  sbom: spdx.json
  provenance: intoto.jsonl
compatibility:
  core: ">=0.2.0"
  commercial: ">=0.2.0"
"#;

fn paths(errors: &[FieldError]) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

#[test]
fn the_seeds_manifest_parses() {
    let p = parse(SEED).unwrap();
    assert_eq!(p.full_name(), "org/postgres-ha");
    assert_eq!(p.version, semver::Version::new(14, 7, 1));
    assert_eq!(p.channel, "stable");
    assert_eq!(p.capabilities, ["wdht:read", "tasks:publish"]);
    assert_eq!(p.sbom.as_deref(), Some("spdx.json"));
    assert!(p.compatibility["core"].matches(&semver::Version::new(0, 3, 0)));
    assert!(!p.compatibility["core"].matches(&semver::Version::new(0, 1, 9)));
    assert_eq!(
        p.signing.get("cosign").map(String::as_str),
        Some("ghcr.io/org/postgres-ha:sha256-abc.sig")
    );
}

#[test]
fn a_package_that_deploys_a_workload_carries_a_checked_manifest() {
    let text = r#"
name: acme/whoami
version: 1.0.0
kind: hub-package
permissions:
  planes: [workplane, dataplane]
  capabilities: ["rpc:register:com.example.whoami"]
artifacts:
  - name: server
    file: bin/whoami
workload:
  kind: payload
  name: whoami
  replicas: 2
  command: [./bin/whoami]
"#;
    let p = parse(text).unwrap();
    let (_, m) = p.workload.as_ref().unwrap();
    assert_eq!(m.workload().name, "whoami");
    assert_eq!(p.artifacts[0].file, "bin/whoami");
    // A workload that is not valid is refused, with the nodes' own message, under `workload`.
    let bad = text.replace("replicas: 2", "replicas: -1");
    let e = parse(&bad).unwrap_err();
    assert_eq!(paths(&e), ["workload"], "{e:?}");
    assert!(e[0].message.contains("replicas"), "{e:?}");
    // A workload needs the workplane.
    let e = parse(&text.replace("[workplane, dataplane]", "[dataplane]")).unwrap_err();
    assert_eq!(paths(&e), ["permissions.planes"], "{e:?}");
}

#[test]
fn every_problem_is_named_by_its_field() {
    let bad = r#"
name: Org/../x
version: "14.7"
channel: "Not A Channel"
kind: package
permissions:
  planes: [workplane, skyplane, workplane]
  capabilities: ["rpc:call:com.example.*", "everything", "rpc:call:com.example.*", "rpc:call:  "]
attestations:
  sbom: /etc/passwd
  provenance: ../outside.jsonl
compatibility:
  core: "not a range"
  kernel: ">=6"
artifacts:
  - name: image
    file: image.tar
  - name: image
    file: ../../image.tar
"#;
    let e = parse(bad).unwrap_err();
    assert_eq!(
        paths(&e),
        [
            "name",
            "version",
            "channel",
            "kind",
            "permissions.planes[1]",
            "permissions.planes[2]",
            "permissions.capabilities[1]",
            "permissions.capabilities[2]",
            "permissions.capabilities[3]",
            "attestations.sbom",
            "attestations.provenance",
            "compatibility.core",
            "compatibility.kernel",
            "artifacts[1].name",
            "artifacts[1].file",
        ],
        "{e:#?}"
    );
    // A field nobody acts on, or of the wrong type, is refused with its path.
    let e = parse(&SEED.replace("channel: stable", "chanel: stable")).unwrap_err();
    assert!(e[0].message.contains("chanel"), "{e:?}");
    let e = parse(&SEED.replace("planes: [\"workplane\"]", "planes: workplane")).unwrap_err();
    assert_eq!(paths(&e), ["permissions.planes"], "{e:?}");
    // Not YAML at all.
    assert!(parse("{{{").is_err());
    // The file's name goes in front of each problem.
    let text = macula_hub::package::describe("pkg/package.yaml", &e);
    assert!(
        text.starts_with("pkg/package.yaml: permissions.planes: "),
        "{text}"
    );
}
