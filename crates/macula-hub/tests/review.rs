//! Reviewing a package by its index — what the publisher's CLI, the Hub and a node all check —
//! and preparing one (`macula hub attest`): an SBOM for the artifacts, signed provenance.

use std::path::Path;

use ed25519_dalek::SigningKey;
use macula_hub::attest::Trusted;
use macula_hub::pack::{pack, Limits};
use macula_hub::prepare::attest;
use macula_hub::review::{describe, review, Rules};
use macula_hub::submit::Policy;
use macula_hub::{BlobStore, FsStore};

const MANIFEST: &str = r#"
name: acme/hello
version: 1.0.0
kind: hub-package
permissions:
  planes: [workplane]
  capabilities: ["rpc:call:com.acme.hello"]
artifacts:
  - name: hello
    file: bin/hello
attestations:
  sbom: sbom.spdx.json
  provenance: provenance.dsse.json
workload:
  kind: payload
  name: hello
  command: [./bin/hello]
"#;

fn package(dir: &Path, key: &SigningKey) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("package.yaml"), MANIFEST).unwrap();
    std::fs::write(dir.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    let a = attest(dir, &[key], "test").expect("attest");
    assert_eq!(a.sbom_written.as_deref(), Some("sbom.spdx.json"));
    assert_eq!(a.artifacts.len(), 1);
}

fn policy() -> Policy {
    Policy {
        capabilities: vec!["rpc:call:com.acme.*".into()],
        max_instances: 100,
        max_cpu_millis: 64_000,
        max_memory_bytes: 64 << 30,
    }
}

fn trusted(key: &SigningKey) -> Trusted {
    Trusted {
        keys: vec![key.verifying_key()],
        threshold: 1,
    }
}

fn packed(dir: &Path, store: &FsStore) -> Vec<u8> {
    let p = pack(dir, store, Limits::default()).expect("pack");
    store.read(&p.digest, 1 << 20).unwrap().unwrap()
}

#[test]
fn an_attested_package_passes_review() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path(), &key);
    let s = tempfile::tempdir().unwrap();
    let store = FsStore::open(s.path()).unwrap();
    let index = packed(pkg.path(), &store);
    let policy = policy();
    let t = trusted(&key);
    let r = review(
        &index,
        &store,
        &Rules {
            publisher: &t,
            policy: &policy,
            osv: None,
        },
    )
    .unwrap_or_else(|p| panic!("{}", describe(&p)));
    assert_eq!(r.package.full_name(), "acme/hello");
    assert_eq!(r.artifacts.len(), 1);
    assert_eq!(r.provenance["runDetails"]["builder"]["id"], "test");
    // Attesting again keeps the SBOM the package has.
    let again = attest(pkg.path(), &[&key], "test").unwrap();
    assert_eq!(again.sbom_written, None);
}

#[test]
fn what_does_not_hold_together_is_refused_with_file_and_field() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let other = SigningKey::from_bytes(&[8; 32]);
    let policy = policy();
    let s = tempfile::tempdir().unwrap();
    let store = FsStore::open(s.path()).unwrap();
    let check = |dir: &Path, t: &Trusted| -> String {
        let index = packed(dir, &store);
        match review(
            &index,
            &store,
            &Rules {
                publisher: t,
                policy: &policy,
                osv: None,
            },
        ) {
            Ok(_) => panic!("accepted"),
            Err(p) => describe(&p),
        }
    };

    // Provenance signed by a key that is not the publisher's.
    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path(), &other);
    let e = check(pkg.path(), &trusted(&key));
    assert!(
        e.starts_with("provenance.dsse.json: ") && e.contains("signature"),
        "{e}"
    );

    // The artifact changed after it was attested: the SBOM and the provenance no longer match.
    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path(), &key);
    std::fs::write(pkg.path().join("bin/hello"), b"#!/bin/sh\necho evil\n").unwrap();
    let e = check(pkg.path(), &trusted(&key));
    assert!(
        e.contains("sbom.spdx.json: ") && e.contains("not described"),
        "{e}"
    );
    assert!(
        e.contains("provenance.dsse.json: ") && e.contains("subject"),
        "{e}"
    );

    // A capability the publisher may not grant, and no provenance named at all.
    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path(), &key);
    let m = MANIFEST
        .replace("com.acme.hello", "com.other.steal")
        .replace("  provenance: provenance.dsse.json\n", "");
    std::fs::write(pkg.path().join("package.yaml"), m).unwrap();
    let e = check(pkg.path(), &trusted(&key));
    assert!(
        e.contains("package.yaml: permissions.capabilities[0]"),
        "{e}"
    );
    assert!(e.contains("package.yaml: attestations.provenance"), "{e}");

    // An index whose blobs were never uploaded.
    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path(), &key);
    let elsewhere = tempfile::tempdir().unwrap();
    let other_store = FsStore::open(elsewhere.path()).unwrap();
    let index = packed(pkg.path(), &other_store);
    let t = trusted(&key);
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = FsStore::open(empty_dir.path()).unwrap();
    let e = describe(
        &review(
            &index,
            &empty,
            &Rules {
                publisher: &t,
                policy: &policy,
                osv: None,
            },
        )
        .expect_err("nothing uploaded"),
    );
    assert!(e.contains("was not uploaded"), "{e}");

    // Not an index.
    let e = describe(
        &review(
            br#"{"kind": 1}"#,
            &store,
            &Rules {
                publisher: &t,
                policy: &policy,
                osv: None,
            },
        )
        .expect_err("garbage"),
    );
    assert!(e.starts_with("index: kind"), "{e}");
}
