//! SBOMs: SPDX and CycloneDX JSON read into components; every artifact must be described by its
//! SHA-256; what is not an SBOM is refused with where.

use std::collections::BTreeMap;

use macula_hub::sbom::{covers, parse, Format};
use macula_hub::Digest;

fn spdx(bin: &Digest) -> String {
    serde_json::json!({
        "spdxVersion": "SPDX-2.3",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": "whoami",
        "packages": [
            {"name": "whoami", "versionInfo": "1.2.0", "SPDXID": "SPDXRef-whoami",
             "checksums": [{"algorithm": "SHA256", "checksumValue": bin.hex()}]},
            {"name": "serde", "versionInfo": "1.0.100", "SPDXID": "SPDXRef-serde",
             "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                               "referenceLocator": "pkg:cargo/serde@1.0.100"}]}
        ]
    })
    .to_string()
}

fn cyclonedx(bin: &Digest) -> String {
    serde_json::json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "metadata": {"component": {"type": "application", "name": "whoami", "version": "1.2.0",
                                   "hashes": [{"alg": "SHA-256", "content": bin.hex()}]}},
        "components": [
            {"type": "library", "name": "lodash", "version": "4.17.20", "purl": "pkg:npm/lodash@4.17.20"}
        ]
    })
    .to_string()
}

#[test]
fn both_formats_list_their_components_and_must_describe_every_artifact() {
    let bin = Digest::of(b"the server");
    let artifacts: BTreeMap<String, Digest> = [("server".to_owned(), bin)].into();
    for (text, format, dep, eco) in [
        (spdx(&bin), Format::Spdx, "serde", "crates.io"),
        (cyclonedx(&bin), Format::CycloneDx, "lodash", "npm"),
    ] {
        let s = parse(text.as_bytes()).unwrap();
        assert_eq!(s.format, format);
        let c = s.components.iter().find(|c| c.name == dep).unwrap();
        assert_eq!(c.ecosystem(), Some(eco));
        covers(&s, &artifacts).unwrap();
        // An SBOM written for other bytes does not describe this artifact.
        let other: BTreeMap<String, Digest> =
            [("server".to_owned(), Digest::of(b"other bytes"))].into();
        let e = covers(&s, &other).unwrap_err();
        assert!(e.why.contains("artifact server"), "{e}");
    }
}

#[test]
fn what_is_not_an_sbom_is_refused_with_where() {
    for (text, field) in [
        ("not json", ""),
        ("{\"name\": \"x\"}", ""),
        ("{\"spdxVersion\": \"SPDX-3.0\"}", "spdxVersion"),
        ("{\"bomFormat\": \"CycloneDX\", \"specVersion\": \"2.0\"}", "specVersion"),
        ("{\"spdxVersion\": \"SPDX-2.3\", \"packages\": {}}", "packages"),
        (
            "{\"spdxVersion\": \"SPDX-2.3\", \"packages\": [{\"versionInfo\": \"1\"}]}",
            "packages[0]",
        ),
        (
            "{\"spdxVersion\": \"SPDX-2.3\", \"files\": [{\"checksums\": [{\"algorithm\": \"SHA256\", \"checksumValue\": \"abc\"}]}]}",
            "files[0].checksums[0].checksumValue",
        ),
    ] {
        let e = parse(text.as_bytes()).unwrap_err();
        assert_eq!(e.field, field, "{text}: {e}");
    }
}
