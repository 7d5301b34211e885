//! The offline vulnerability scan: an SBOM's components against a directory of OSV records.

use macula_hub::osv::Database;
use macula_hub::sbom::parse;

fn record(id: &str, eco: &str, name: &str, ranges: serde_json::Value) -> String {
    serde_json::json!({
        "id": id,
        "summary": format!("{id} in {name}"),
        "affected": [{"package": {"ecosystem": eco, "name": name}, "ranges": ranges}]
    })
    .to_string()
}

/// The records both tests load: lodash below 4.17.21, serde 1.0.0 to 1.0.50, @scope/pkg from 2.0.0.
fn records() -> Vec<(&'static str, String)> {
    vec![
        (
            "GHSA-1.json",
            record(
                "GHSA-1",
                "npm",
                "lodash",
                serde_json::json!([{"type": "SEMVER", "events": [{"introduced": "0"}, {"fixed": "4.17.21"}]}]),
            ),
        ),
        (
            "RUSTSEC-2.json",
            record(
                "RUSTSEC-2",
                "crates.io",
                "serde",
                serde_json::json!([{"type": "ECOSYSTEM", "events": [{"introduced": "1.0.0"}, {"last_affected": "1.0.50"}]}]),
            ),
        ),
        (
            "GHSA-3.json",
            record(
                "GHSA-3",
                "npm",
                "@scope/pkg",
                serde_json::json!([{"type": "SEMVER", "events": [{"introduced": "2.0.0"}]}]),
            ),
        ),
    ]
}

fn sbom(components: &[(&str, &str, &str)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "components": components.iter().map(|(n, v, purl)| serde_json::json!({"name": n, "version": v, "purl": purl})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

#[test]
fn components_in_an_affected_range_are_found_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let w = |f: &str, t: String| std::fs::write(dir.path().join(f), t).unwrap();
    std::fs::create_dir_all(dir.path().join("npm")).unwrap();
    for (file, text) in records() {
        let file = if file == "GHSA-1.json" {
            "npm/GHSA-1.json"
        } else {
            file
        };
        w(file, text);
    }
    w("README.json", "not a record".into());
    let (db, skipped) = Database::load_dir(dir.path()).unwrap();
    assert_eq!((db.len(), skipped), (3, 1));
    let s = parse(&sbom(&[
        ("lodash", "4.17.20", "pkg:npm/lodash@4.17.20"),
        ("serde", "1.0.100", "pkg:cargo/serde@1.0.100"),
        ("pkg", "2.1.0", "pkg:npm/%40scope/pkg@2.1.0"),
        ("left-pad", "1.0.0", "pkg:npm/left-pad@1.0.0"),
        ("mystery", "1.0.0", "pkg:unknown/mystery@1.0.0"),
    ]))
    .unwrap();
    let scan = db.scan(&s);
    let found: Vec<(&str, &str, Option<&str>)> = scan
        .findings
        .iter()
        .map(|f| (f.id.as_str(), f.component.as_str(), f.fixed.as_deref()))
        .collect();
    assert_eq!(
        found,
        [
            ("GHSA-1", "lodash", Some("4.17.21")),
            ("GHSA-3", "@scope/pkg", None)
        ]
    );
    assert_eq!(scan.unchecked, ["mystery"]);
    // Fixed and not-yet-affected versions are clean.
    let clean = parse(&sbom(&[
        ("lodash", "4.17.21", "pkg:npm/lodash@4.17.21"),
        ("serde", "1.0.50", "pkg:cargo/serde@1.0.50"),
        ("pkg", "1.9.0", "pkg:npm/%40scope/pkg@1.9.0"),
    ]))
    .unwrap();
    let scan = db.scan(&clean);
    assert_eq!(
        scan.findings
            .iter()
            .map(|f| f.id.as_str())
            .collect::<Vec<_>>(),
        ["RUSTSEC-2"],
        "serde 1.0.50 is the last affected"
    );
}

#[test]
fn osv_zip_exports_load_and_a_zip_bomb_entry_is_skipped() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.zip");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let mut entries = records();
        entries.push(("junk.json", "{".to_owned()));
        for (name, text) in entries {
            z.start_file(name, opts).unwrap();
            z.write_all(text.as_bytes()).unwrap();
        }
        // An entry that inflates past the bound (it compresses to almost nothing).
        z.start_file("bomb.json", opts).unwrap();
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..5 {
            z.write_all(&zeros).unwrap();
        }
        z.finish().unwrap();
    }
    let (db, skipped) = Database::load_zip(&path).unwrap();
    assert_eq!((db.len(), skipped), (3, 2));
    let s = parse(&sbom(&[("lodash", "4.17.20", "pkg:npm/lodash@4.17.20")])).unwrap();
    assert_eq!(db.scan(&s).findings.len(), 1);
    // Not a zip.
    std::fs::write(&path, b"not a zip").unwrap();
    assert!(Database::load_zip(&path).is_err());
}
