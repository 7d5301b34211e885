//! Attestations: a DSSE envelope verifies only as the payload type it was signed as, only over
//! the payload signed, and only with enough distinct trusted keys; an in-toto Statement must
//! name exactly the package's artifacts by digest.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use macula_hub::attest::*;
use macula_hub::Digest;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn trusted(keys: &[&SigningKey], threshold: usize) -> Trusted {
    Trusted {
        keys: keys.iter().map(|k| k.verifying_key()).collect(),
        threshold,
    }
}

fn json(e: &Envelope) -> Vec<u8> {
    serde_json::to_vec(e).unwrap()
}

fn provenance(subjects: &[(&str, Digest)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "_type": STATEMENT_V1,
        "subject": subjects.iter().map(|(n, d)| serde_json::json!({"name": n, "digest": {"sha256": d.hex()}})).collect::<Vec<_>>(),
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {"buildDefinition": {"buildType": "https://example.com/build"}},
    }))
    .unwrap()
}

#[test]
fn the_pre_authentication_encoding_is_dsses() {
    assert_eq!(
        pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    );
}

#[test]
fn an_envelope_verifies_as_signed_and_only_so() {
    let (a, b, stranger) = (key(1), key(2), key(3));
    let body = provenance(&[("server", Digest::of(b"bin"))]);
    let env = sign(INTOTO_PAYLOAD_TYPE, &body, &[&a]);
    assert_eq!(
        verify(&json(&env), INTOTO_PAYLOAD_TYPE, &trusted(&[&a], 1)).unwrap(),
        body
    );
    // Asked for as another type: refused, by name.
    assert!(matches!(
        verify(
            &json(&env),
            "application/vnd.macula.scan+json",
            &trusted(&[&a], 1)
        ),
        Err(AttestError::WrongType { .. })
    ));
    // Payload-type confusion: signed as one type, relabelled as the type asked for.
    let other = sign("application/vnd.macula.scan+json", &body, &[&a]);
    let mut relabelled = other.clone();
    relabelled.payload_type = INTOTO_PAYLOAD_TYPE.into();
    assert!(matches!(
        verify(&json(&relabelled), INTOTO_PAYLOAD_TYPE, &trusted(&[&a], 1)),
        Err(AttestError::BelowThreshold { valid: 0, .. })
    ));
    // A signature over another payload (the subject's digest changed after signing).
    let mut swapped = env.clone();
    let forged = provenance(&[("server", Digest::of(b"other bin"))]);
    swapped.payload = sign(INTOTO_PAYLOAD_TYPE, &forged, &[&stranger]).payload;
    assert!(matches!(
        verify(&json(&swapped), INTOTO_PAYLOAD_TYPE, &trusted(&[&a], 1)),
        Err(AttestError::BelowThreshold { valid: 0, .. })
    ));
    // A key not trusted for it.
    let by_stranger = sign(INTOTO_PAYLOAD_TYPE, &body, &[&stranger]);
    assert!(matches!(
        verify(
            &json(&by_stranger),
            INTOTO_PAYLOAD_TYPE,
            &trusted(&[&a, &b], 1)
        ),
        Err(AttestError::BelowThreshold { valid: 0, .. })
    ));
    // Below threshold: one compromised key signing twice, under two key ids, is one key.
    let mut twice = sign(INTOTO_PAYLOAD_TYPE, &body, &[&a, &a]);
    twice.signatures[1].keyid = key_id(&b.verifying_key());
    assert!(matches!(
        verify(&json(&twice), INTOTO_PAYLOAD_TYPE, &trusted(&[&a, &b], 2)),
        Err(AttestError::BelowThreshold {
            valid: 1,
            threshold: 2
        })
    ));
    let both = sign(INTOTO_PAYLOAD_TYPE, &body, &[&a, &b]);
    assert!(verify(&json(&both), INTOTO_PAYLOAD_TYPE, &trusted(&[&a, &b], 2)).is_ok());
    // Not an envelope, or an endless one.
    assert!(matches!(
        verify(b"{\"payload\": 1}", INTOTO_PAYLOAD_TYPE, &trusted(&[&a], 1)),
        Err(AttestError::Malformed(_))
    ));
    let huge = vec![b' '; MAX_ENVELOPE + 1];
    assert!(matches!(
        verify(&huge, INTOTO_PAYLOAD_TYPE, &trusted(&[&a], 1)),
        Err(AttestError::Malformed(_))
    ));
}

#[test]
fn a_statements_subjects_are_exactly_the_packages_artifacts() {
    let (bin, image) = (Digest::of(b"bin"), Digest::of(b"image"));
    let artifacts: BTreeMap<String, Digest> =
        [("server".to_owned(), bin), ("image".to_owned(), image)].into();
    let ok = statement(
        &provenance(&[("server", bin), ("image", image)]),
        SLSA_PROVENANCE_V1,
    )
    .unwrap();
    check_subjects(&ok, &artifacts).unwrap();
    let cases: Vec<(Vec<(&str, Digest)>, &str)> = vec![
        (vec![("server", image), ("image", image)], "server"),
        (vec![("server", bin)], "image"),
        (
            vec![("server", bin), ("image", image), ("extra", bin)],
            "extra",
        ),
        (
            vec![("server", bin), ("server", bin), ("image", image)],
            "server",
        ),
    ];
    for (subjects, name) in cases {
        let s = statement(&provenance(&subjects), SLSA_PROVENANCE_V1).unwrap();
        match check_subjects(&s, &artifacts) {
            Err(AttestError::Subject { name: n, .. }) => assert_eq!(n, name, "{subjects:?}"),
            other => panic!("{subjects:?}: {other:?}"),
        }
    }
    // Another predicate than the one asked for, or not a Statement.
    assert!(matches!(
        statement(
            &provenance(&[("server", bin)]),
            "https://example.com/scan/v1"
        ),
        Err(AttestError::WrongPredicate { .. })
    ));
    assert!(matches!(
        statement(
            b"{\"_type\": \"x\", \"subject\": [], \"predicateType\": \"y\"}",
            "y"
        ),
        Err(AttestError::NotStatement(_))
    ));
}
