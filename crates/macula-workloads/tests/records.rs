//! Deploy records: only a deploy key's own, newer records change the desired state; replays,
//! forgeries, other realms' keys and roles without `realm:deploy` change nothing.

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use macula_workloads::record::*;
use macula_workloads::Manifest;

const REALM: &str = "com.example.app";
const MANIFEST: &str = "kind: payload\nname: api\nreplicas: 2\ncommand: [my-server]\n";

/// A stand-in for the node's credentials: a "public form" names the key's realm and role and
/// its holder's public key; the holder signs with the matching secret.
struct Key {
    secret: SigningKey,
    realm: &'static str,
    role: &'static str,
}

impl Key {
    fn new(seed: u8, realm: &'static str, role: &'static str) -> Key {
        Key {
            secret: SigningKey::from_bytes(&[seed; 32]),
            realm,
            role,
        }
    }

    fn public(&self) -> String {
        format!(
            "{}|{}|{}",
            self.realm,
            self.role,
            hex::encode(self.secret.verifying_key().to_bytes())
        )
    }

    fn record(&self, name: &str, seq: u64, manifest: Option<&str>) -> DeployRecord {
        DeployRecord::signed(
            REALM,
            name,
            seq,
            manifest.map(str::to_owned),
            1_000,
            &self.public(),
            |d| Some(self.secret.sign(d).to_bytes()),
        )
        .unwrap()
    }
}

fn verify(public: &str, digest: &[u8; 32], sig: &[u8]) -> Result<Signer, String> {
    let mut parts = public.split('|');
    let (Some(realm), Some(role), Some(pk)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("not a key".into());
    };
    let pk: [u8; 32] = hex::decode(pk)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("bad key")?;
    let vk = VerifyingKey::from_bytes(&pk).map_err(|e| e.to_string())?;
    let sig = Signature::from_slice(sig).map_err(|e| e.to_string())?;
    vk.verify(digest, &sig)
        .map_err(|_| "the signature is not the key's".to_owned())?;
    Ok(Signer {
        key_realm: realm.into(),
        role: role.into(),
    })
}

/// The realm's rule: a key of the realm (or a parent) whose role is `developer` or `admin`;
/// its workloads run as `service_account` or as the signer's own role.
fn may_deploy(realm: &str, s: &Signer, workload_role: Option<&str>) -> Result<(), String> {
    let ok = (realm == s.key_realm || realm.ends_with(&format!(".{}", s.key_realm)))
        && (s.role == "developer" || s.role == "admin");
    match workload_role {
        _ if !ok => Err(String::new()),
        Some(r) if r != "service_account" && r != s.role => {
            Err(format!("a {} key cannot start a workload as {r}", s.role))
        }
        _ => Ok(()),
    }
}

fn accept(records: &mut Records, r: DeployRecord) -> Result<Option<Manifest>, Refused> {
    records
        .accept(r, verify, may_deploy, None, None)
        .map(|(_, m)| m)
}

fn nodes(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|n| n.to_string()).collect()
}

#[test]
fn a_slots_first_configuration_is_fixed_by_the_record_and_the_same_on_every_node() {
    let dev = Key::new(1, REALM, "developer");
    // The node a deploy enters at chooses the first range from the nodes it sees; whatever
    // the signer put there is not taken.
    let mut entry = Records::default();
    let mut r = dev.record("api", 1, Some(MANIFEST));
    r.genesis = Genesis {
        ranges: vec![GenesisRange {
            from: 0,
            to: 2,
            nodes: nodes(&["mine"]),
        }],
    };
    let seen = nodes(&["n1", "n2", "n3", "n4"]);
    let (taken, _) = entry
        .accept(r, verify, may_deploy, None, Some(&seen))
        .unwrap();
    assert_eq!(taken.genesis.ranges.len(), 1);
    assert_eq!(
        taken.genesis.covered(),
        2,
        "replicas: 2 (and one rollout permit)"
    );
    assert!(taken.genesis.ranges[0]
        .nodes
        .iter()
        .all(|n| seen.contains(n)));
    let first = taken.genesis.cfg("com.example.app/api/1", 1).unwrap();
    assert_eq!(first.epoch, 1);
    assert_eq!(first.set.len(), 3);
    // A peer takes the record's ranges on, whatever it sees itself.
    let mut peer = Records::default();
    let (at_peer, _) = peer
        .accept(taken.clone(), verify, may_deploy, None, None)
        .unwrap();
    assert_eq!(at_peer.genesis, taken.genesis);
    // A scale-up adds a range for the new indices from what the entry node sees then; the
    // first range stays as it was, at the entry node and at the peer.
    let scaled = MANIFEST.replace("replicas: 2", "replicas: 5");
    let later = nodes(&["n3", "n4", "n5", "n6"]);
    let (t2, _) = entry
        .accept(
            dev.record("api", 2, Some(&scaled)),
            verify,
            may_deploy,
            None,
            Some(&later),
        )
        .unwrap();
    assert_eq!(t2.genesis.ranges[0], taken.genesis.ranges[0]);
    assert_eq!(t2.genesis.ranges[1].from, 2);
    assert_eq!(t2.genesis.ranges[1].to, 5);
    assert!(t2.genesis.ranges[1].nodes.iter().all(|n| later.contains(n)));
    // A peer that gets a record rewriting the first range keeps its own (and takes the new
    // range on).
    let mut forged = t2.clone();
    forged.genesis.ranges[0].nodes = nodes(&["evil"]);
    let (at_peer, _) = peer.accept(forged, verify, may_deploy, None, None).unwrap();
    assert_eq!(at_peer.genesis, t2.genesis);
    // A tombstone carries the ranges on, so the workload deployed again starts where it was.
    let (dead, _) = entry
        .accept(
            dev.record("api", 3, None),
            verify,
            may_deploy,
            None,
            Some(&later),
        )
        .unwrap();
    assert_eq!(dead.genesis, t2.genesis);
    let (again, _) = entry
        .accept(
            dev.record("api", 4, Some(MANIFEST)),
            verify,
            may_deploy,
            None,
            Some(&seen),
        )
        .unwrap();
    assert_eq!(again.genesis, t2.genesis);
    // The ranges are not signed: the record's signature holds with any.
    assert_eq!(
        again.digest(),
        dev.record("api", 4, Some(MANIFEST)).digest()
    );
}

#[test]
fn a_deploy_key_sets_the_desired_state_and_only_newer_records_change_it() {
    let dev = Key::new(1, REALM, "developer");
    let mut records = Records::default();
    let m = accept(&mut records, dev.record("api", 5, Some(MANIFEST)))
        .unwrap()
        .unwrap();
    assert_eq!(m.workload().name, "api");
    assert_eq!(records.live(REALM).count(), 1);
    // Replayed, or an older one arriving late: nothing changes.
    assert_eq!(
        accept(&mut records, dev.record("api", 5, Some(MANIFEST))),
        Err(Refused::Stale { have: 5 })
    );
    assert_eq!(
        accept(&mut records, dev.record("api", 4, None)),
        Err(Refused::Stale { have: 5 })
    );
    // A tombstone deletes it, and keeps the older versions from coming back.
    assert_eq!(accept(&mut records, dev.record("api", 6, None)), Ok(None));
    assert_eq!(records.live(REALM).count(), 0);
    assert_eq!(
        accept(&mut records, dev.record("api", 5, Some(MANIFEST))),
        Err(Refused::Stale { have: 6 })
    );
    // The tombstone is still there, for peers that link later.
    assert!(records
        .get(REALM, "api")
        .is_some_and(|r| r.manifest.is_none()));
}

#[test]
fn forged_foreign_and_unauthorized_records_change_nothing() {
    let dev = Key::new(1, REALM, "developer");
    let reader = Key::new(2, REALM, "service_account");
    let other_tenant = Key::new(3, "com.other", "admin");
    let mut records = Records::default();
    // Tampered after signing.
    let mut r = dev.record("api", 1, Some(MANIFEST));
    r.manifest = Some(MANIFEST.replace("replicas: 2", "replicas: 200"));
    assert!(matches!(
        accept(&mut records, r),
        Err(Refused::Unverified(_))
    ));
    // Signed by one key, claiming another.
    let mut r = reader.record("api", 1, Some(MANIFEST));
    r.key = dev.public();
    assert!(matches!(
        accept(&mut records, r),
        Err(Refused::Unverified(_))
    ));
    // A role without realm:deploy.
    assert!(matches!(
        accept(&mut records, reader.record("api", 1, Some(MANIFEST))),
        Err(Refused::Forbidden(m)) if m.contains("realm:deploy")
    ));
    // Another tenant's admin key, for this realm.
    assert!(matches!(
        accept(&mut records, other_tenant.record("api", 1, Some(MANIFEST))),
        Err(Refused::Forbidden(_))
    ));
    // A manifest for another workload or realm than the record says.
    assert!(matches!(
        accept(&mut records, dev.record("web", 1, Some(MANIFEST))),
        Err(Refused::Invalid(_))
    ));
    let elsewhere = MANIFEST.replace("name: api\n", "name: api\nrealm: com.other\n");
    assert!(matches!(
        accept(&mut records, dev.record("api", 1, Some(&elsewhere))),
        Err(Refused::Invalid(_))
    ));
    // A workload that would have more than its deployer.
    let escalating = MANIFEST.replace("name: api\n", "name: api\nrole: admin\n");
    assert!(matches!(
        accept(&mut records, dev.record("api", 1, Some(&escalating))),
        Err(Refused::Forbidden(m)) if m.contains("cannot start a workload as admin")
    ));
    assert!(matches!(
        accept(&mut records, dev.record("api", 1, Some("kind: payload\nname: api\n"))),
        Err(Refused::Invalid(m)) if m.contains("command")
    ));
    assert_eq!(records.all().count(), 0, "none of them was kept");
    // A forged record with a huge sequence number cannot block the name either.
    let mut forged = dev.record("api", u64::MAX, Some(MANIFEST));
    forged.sig[0] ^= 1;
    assert!(matches!(
        accept(&mut records, forged),
        Err(Refused::Unverified(_))
    ));
    assert!(accept(&mut records, dev.record("api", 1, Some(MANIFEST))).is_ok());
}

#[test]
fn a_realm_keeps_a_bounded_number_of_workloads() {
    let dev = Key::new(1, REALM, "developer");
    let mut records = Records::default();
    for i in 0..MAX_PER_REALM {
        let name = format!("w{i}");
        let m = MANIFEST.replace("name: api", &format!("name: {name}"));
        accept(&mut records, dev.record(&name, 1, Some(&m))).unwrap();
    }
    let m = MANIFEST.replace("name: api", "name: one-more");
    assert_eq!(
        accept(&mut records, dev.record("one-more", 1, Some(&m))),
        Err(Refused::Full)
    );
    // Updating one it has is fine.
    let m = MANIFEST.replace("name: api", "name: w0");
    assert!(accept(&mut records, dev.record("w0", 2, Some(&m))).is_ok());
    // Nor can big manifests take more than the realm's bytes.
    let mut big = Records::default();
    let padded = |name: &str| {
        format!(
            "kind: payload\nname: {name}\ncommand: [my-server]\nenv: {{PAD: \"{}\"}}\n",
            "x".repeat(200 << 10)
        )
    };
    let fits = MAX_BYTES_PER_REALM / (200 << 10);
    for i in 0..fits {
        let name = format!("b{i}");
        accept(&mut big, dev.record(&name, 1, Some(&padded(&name)))).unwrap();
    }
    let name = format!("b{fits}");
    assert_eq!(
        accept(&mut big, dev.record(&name, 1, Some(&padded(&name)))),
        Err(Refused::Full)
    );
    // Earlier versions are kept (newest first, at most HISTORY), within the realm's bytes: a
    // realm full of big manifests keeps its live ones and drops history first.
    for seq in 2..(HISTORY as u64 + 4) {
        let name = "b0";
        let text = padded(name).replace("PAD:", &format!("V: \"{seq}\", PAD:"));
        accept(&mut big, dev.record(name, seq, Some(&text))).unwrap();
    }
    let kept: Vec<u64> = big.history(REALM, "b0").map(|r| r.seq).collect();
    assert!(kept.len() < HISTORY, "no room for all of it: {kept:?}");
    assert_eq!(big.live(REALM).count(), fits, "the live ones all stay");
    let all_bytes: usize = big
        .all()
        .chain(big.history(REALM, "b0"))
        .filter_map(|r| r.manifest.as_ref().map(String::len))
        .sum();
    assert!(all_bytes <= MAX_BYTES_PER_REALM, "{all_bytes}");
    let small = MANIFEST.replace("name: api", "name: w1");
    for seq in 2..(HISTORY as u64 + 4) {
        let text = small.replace("replicas: 2", &format!("replicas: {seq}"));
        accept(&mut records, dev.record("w1", seq, Some(&text))).unwrap();
    }
    let kept: Vec<u64> = records.history(REALM, "w1").map(|r| r.seq).collect();
    let newest = HISTORY as u64 + 3;
    assert_eq!(
        kept,
        ((newest - HISTORY as u64)..newest)
            .rev()
            .collect::<Vec<_>>()
    );
    // Records survive a round trip through their persisted form.
    let text = serde_json::to_string(&records).unwrap();
    let back: Records = serde_json::from_str(&text).unwrap();
    assert_eq!(back.get(REALM, "w0"), records.get(REALM, "w0"));
    assert_eq!(back.history(REALM, "w1").count(), HISTORY);
}

/// With real API keys: the record is signed by the key's holder (the secret's Ed25519 key) and
/// verified from the key's public form alone, with the operator's public key and the realm's
/// policy, as a node does it.
#[test]
fn records_signed_with_real_api_keys() {
    use macula_router::auth::credential::{
        bearer_proof, issue_key, public_form, verify_public, verify_session_proof, AuthorityCert,
        KeyClaims, SignedCert,
    };
    use macula_router::policy::Policy;
    let operator = SigningKey::from_bytes(&[7; 32]);
    let authority = SigningKey::from_bytes(&[8; 32]);
    let cert = SignedCert::issue(
        &operator,
        &AuthorityCert {
            realm: REALM.into(),
            authority: authority.verifying_key().to_bytes(),
            expires_at: 0,
        },
    );
    let key_of = |role: &str, kid: &str| {
        issue_key(
            &authority,
            &cert,
            &KeyClaims {
                realm: REALM.into(),
                role: role.into(),
                kid: kid.into(),
                name: "test".into(),
                issued_at: 1,
                expires_at: 0,
                pubkey: None,
                secret_hash: None,
                holder: None,
            },
        )
    };
    let policy = Policy::from_doc(macula_common::policy::default_policy(REALM)).unwrap();
    let op_public = operator.verifying_key();
    let verify_real = |public: &str, digest: &[u8; 32], sig: &[u8]| -> Result<Signer, String> {
        let v = verify_public(public, &op_public, 10).map_err(|e| e.to_string())?;
        if !verify_session_proof(&v.claims, digest, sig) {
            return Err("the signature is not the key holder's".into());
        }
        Ok(Signer {
            key_realm: v.claims.realm.clone(),
            role: v.claims.role.clone(),
        })
    };
    let may = |_realm: &str, s: &Signer, _role: Option<&str>| {
        policy
            .allows_realm_action(&s.role, "deploy")
            .then_some(())
            .ok_or_else(String::new)
    };
    let sign = |key: &str, name: &str, seq: u64| {
        DeployRecord::signed(
            REALM,
            name,
            seq,
            Some(MANIFEST.into()),
            1,
            &public_form(key).unwrap(),
            |d| bearer_proof(key, d),
        )
        .unwrap()
    };
    let developer = key_of("developer", "key_dev");
    let service = key_of("service_account", "key_svc");
    let mut records = Records::default();
    assert!(records
        .accept(sign(&developer, "api", 1), verify_real, may, None, None)
        .is_ok());
    assert!(matches!(
        records.accept(sign(&service, "api", 2), verify_real, may, None, None),
        Err(Refused::Forbidden(_))
    ));
    // The public form of one key with another key's signature.
    let mut r = sign(&service, "api", 3);
    r.key = public_form(&developer).unwrap();
    assert!(matches!(
        records.accept(r, verify_real, may, None, None),
        Err(Refused::Unverified(_))
    ));
}

#[test]
fn a_plans_instance_limit_counts_every_workload_of_the_realm() {
    let dev = Key::new(1, REALM, "developer");
    let mut records = Records::default();
    let limited = |records: &mut Records, r: DeployRecord| {
        records.accept(r, verify, may_deploy, Some(5), None)
    };
    let payload = |name: &str, n: u32| {
        format!("kind: payload\nname: {name}\nreplicas: {n}\ncommand: [my-server]\n")
    };
    let job = |name: &str, p: u32| {
        format!("kind: job\nname: {name}\ncompletions: 10\nparallelism: {p}\ncommand: [work]\n")
    };
    // 2 + 2 fit; a job running 2 at once would make 6.
    limited(&mut records, dev.record("api", 1, Some(&payload("api", 2)))).unwrap();
    limited(&mut records, dev.record("web", 1, Some(&payload("web", 2)))).unwrap();
    assert_eq!(
        limited(&mut records, dev.record("batch", 1, Some(&job("batch", 2)))),
        Err(Refused::OverLimit { asked: 6, limit: 5 })
    );
    assert!(records.get(REALM, "batch").is_none(), "nothing changed");
    // One at a time fits; scaling api to 3 then does not.
    limited(&mut records, dev.record("batch", 1, Some(&job("batch", 1)))).unwrap();
    assert_eq!(
        limited(&mut records, dev.record("api", 2, Some(&payload("api", 3)))),
        Err(Refused::OverLimit { asked: 6, limit: 5 })
    );
    // Deleting web makes room (a tombstone always passes).
    limited(&mut records, dev.record("web", 2, None)).unwrap();
    limited(&mut records, dev.record("api", 2, Some(&payload("api", 4)))).unwrap();
    assert_eq!(records.instances(REALM, None), 5);
    // After a restart (records read back from disk), the count is the same.
    let mut loaded: Records =
        serde_json::from_str(&serde_json::to_string(&records).unwrap()).unwrap();
    assert_eq!(loaded.instances(REALM, None), 5);
    assert_eq!(
        limited(&mut loaded, dev.record("web", 3, Some(&payload("web", 1)))),
        Err(Refused::OverLimit { asked: 6, limit: 5 })
    );
    // A plan lowered below what runs: scaling down is still taken, scaling up is not.
    let tighter = |records: &mut Records, r: DeployRecord| {
        records.accept(r, verify, may_deploy, Some(2), None)
    };
    tighter(&mut loaded, dev.record("api", 3, Some(&payload("api", 3)))).unwrap();
    assert!(matches!(
        tighter(&mut loaded, dev.record("api", 4, Some(&payload("api", 4)))),
        Err(Refused::OverLimit { .. })
    ));
    // Another realm's workloads do not count.
    assert_eq!(loaded.instances("com.example.other", None), 0);
}

#[test]
fn two_records_of_one_sequence_end_the_same_on_every_node() {
    let dev = Key::new(1, REALM, "developer");
    let first = dev.record("api", 1, Some(MANIFEST));
    // Two deploys of seq 2 at once at two nodes that see the realm differently.
    let scaled = MANIFEST.replace("replicas: 2", "replicas: 3");
    let (mut x, mut y) = (Records::default(), Records::default());
    let seen_x = nodes(&["n1", "n2", "n3"]);
    let seen_y = nodes(&["n1", "n2", "n4"]);
    let (base, _) = x
        .accept(first, verify, may_deploy, None, Some(&seen_x))
        .unwrap();
    y.accept(base.clone(), verify, may_deploy, None, None)
        .unwrap();
    let (at_x, _) = x
        .accept(
            dev.record("api", 2, Some(MANIFEST)),
            verify,
            may_deploy,
            None,
            Some(&seen_x),
        )
        .unwrap();
    let (at_y, _) = y
        .accept(
            dev.record("api", 2, Some(&scaled)),
            verify,
            may_deploy,
            None,
            Some(&seen_y),
        )
        .unwrap();
    // Each floods its own to the other: both end with the same one, whichever came first.
    let x_takes = x.accept(at_y.clone(), verify, may_deploy, None, None);
    let y_takes = y.accept(at_x.clone(), verify, may_deploy, None, None);
    assert!(
        x_takes.is_ok() != y_takes.is_ok(),
        "exactly one of them gives way: {x_takes:?} {y_takes:?}"
    );
    let kept_x = x.get(REALM, "api").unwrap().clone();
    let kept_y = y.get(REALM, "api").unwrap().clone();
    assert_eq!(kept_x, kept_y);
    // The one replaced is not an earlier version of the workload.
    assert!(x.history(REALM, "api").all(|r| r.seq < 2));
    assert!(y.history(REALM, "api").all(|r| r.seq < 2));
    // The kept record sent back with other first configurations (unsigned: a lying peer) is
    // not taken, and the configurations stay.
    let mut rewritten = kept_x.clone();
    rewritten.genesis.ranges[0].nodes = nodes(&["evil"]);
    assert!(matches!(
        x.accept(rewritten, verify, may_deploy, None, None),
        Err(Refused::Stale { have: 2 })
    ));
    assert_eq!(x.get(REALM, "api").unwrap(), &kept_x);
    // A replay of the one that gave way changes nothing any more.
    let loser = if kept_x == at_x { at_y } else { at_x };
    assert!(matches!(
        x.accept(loser, verify, may_deploy, None, None),
        Err(Refused::Stale { have: 2 })
    ));
}
