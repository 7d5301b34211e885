//! Packing a package directory: every file hashed into the store, the index last and the same
//! for the same package; missing, escaping or oversized files refused with the file and field.

use std::path::Path;

use macula_hub::pack::{pack, Limits, PackError, INDEX_KIND};
use macula_hub::{BlobStore, FsStore};

const MANIFEST: &str = r#"
name: acme/whoami
version: 1.2.0
kind: hub-package
permissions:
  planes: [workplane]
artifacts:
  - name: server
    file: bin/whoami
attestations:
  sbom: sbom.spdx.json
workload:
  kind: payload
  name: whoami
  command: [./bin/whoami]
"#;

fn package(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("package.yaml"), MANIFEST).unwrap();
    std::fs::write(dir.join("bin/whoami"), b"#!/bin/sh\nhostname\n").unwrap();
    std::fs::write(
        dir.join("sbom.spdx.json"),
        b"{\"spdxVersion\": \"SPDX-2.3\"}",
    )
    .unwrap();
}

#[test]
fn a_package_is_stored_file_by_file_and_named_by_its_index() {
    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path());
    let store_dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(store_dir.path()).unwrap();
    let packed = pack(pkg.path(), &store, Limits::default()).unwrap();
    assert_eq!(packed.index.kind, INDEX_KIND);
    assert_eq!(packed.index.name, "acme/whoami");
    assert_eq!(packed.index.version, "1.2.0");
    assert_eq!(
        packed.index.files.keys().collect::<Vec<_>>(),
        ["bin/whoami", "sbom.spdx.json"]
    );
    for f in packed.index.files.values() {
        assert!(store.has(&f.digest));
    }
    // The index is a blob: read back, it is the index.
    let bytes = store.read(&packed.digest, 1 << 20).unwrap().unwrap();
    let index: macula_hub::pack::Index = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(index, packed.index);
    // The same package packs to the same identity; one byte changed, to another.
    assert_eq!(
        pack(pkg.path(), &store, Limits::default()).unwrap().digest,
        packed.digest
    );
    std::fs::write(pkg.path().join("bin/whoami"), b"#!/bin/sh\nuname\n").unwrap();
    assert_ne!(
        pack(pkg.path(), &store, Limits::default()).unwrap().digest,
        packed.digest
    );
}

#[test]
fn what_cannot_be_packed_is_named_by_file_and_field() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(store_dir.path()).unwrap();
    // No manifest.
    let empty = tempfile::tempdir().unwrap();
    let e = pack(empty.path(), &store, Limits::default()).unwrap_err();
    assert!(e.to_string().contains("no package.yaml"), "{e}");
    // A bad manifest: the file and the field.
    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path());
    std::fs::write(
        pkg.path().join("package.yaml"),
        MANIFEST.replace("1.2.0", "one"),
    )
    .unwrap();
    let e = pack(pkg.path(), &store, Limits::default()).unwrap_err();
    assert!(matches!(e, PackError::Manifest { .. }));
    assert!(e.to_string().contains("package.yaml: version: "), "{e}");
    // A file named but missing.
    package(pkg.path());
    std::fs::remove_file(pkg.path().join("sbom.spdx.json")).unwrap();
    let e = pack(pkg.path(), &store, Limits::default()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("sbom.spdx.json (named by attestations.sbom)"),
        "{e}"
    );
    // A symbolic link out of the package.
    package(pkg.path());
    std::fs::remove_file(pkg.path().join("bin/whoami")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", pkg.path().join("bin/whoami")).unwrap();
    let e = pack(pkg.path(), &store, Limits::default()).unwrap_err();
    assert!(e.to_string().contains("outside the package"), "{e}");
    // Larger than allowed.
    std::fs::remove_file(pkg.path().join("bin/whoami")).unwrap();
    std::fs::write(pkg.path().join("bin/whoami"), vec![0u8; 4096]).unwrap();
    let e = pack(
        pkg.path(),
        &store,
        Limits {
            file: 1024,
            total: 1 << 20,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("artifacts[0].file"), "{e}");
    assert!(e.to_string().contains("larger than 1024"), "{e}");
}
