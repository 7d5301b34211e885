//! The Hub's TUF repository and the client every node verifies it with: a publish round trip,
//! root rotation, publishers' delegations, and every TUF attack class the issue lists, each
//! refused by the client (or by the Hub before it is written).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use macula_hub::tuf::{
    sign_publisher_role, Client, ClientOptions, Delegation, DirSource, Key, Lifetimes, Online,
    Repo, Source, TufError,
};
use macula_hub::Digest;
use serde_json::json;
use tough::async_trait;
use tough::schema::{Signed, Targets};

const MONTH: Duration = Duration::from_secs(30 * 86_400);

/// A publisher's next role with `add` (name, index bytes) added, signed by `keys`.
async fn next_role(
    ns: &str,
    current: Option<&Signed<Targets>>,
    add: &[(&str, &[u8])],
    keys: &[Key],
    life: Duration,
) -> Vec<u8> {
    let add: Vec<_> = add
        .iter()
        .map(|(n, b)| (n.to_string(), b.to_vec(), json!({})))
        .collect();
    sign_publisher_role(ns, current, &add, &[], keys, life)
        .await
        .expect("sign")
}

/// Signs any role with one key, as a holder of that key would (an attacker's forgery).
async fn sign_with<T: tough::schema::Role + serde::Serialize>(
    role: T,
    holder: tough::schema::KeyHolder,
    key: &Key,
) -> Vec<u8> {
    let keys: Vec<Box<dyn tough::key_source::KeySource>> = vec![Box::new(key.clone())];
    tough::editor::signed::SignedRole::new(
        role,
        &holder,
        &keys,
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .await
    .expect("sign")
    .buffer()
    .clone()
}

struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    repo: Repo,
    roots: Vec<Key>,
    online: Online,
    acme: Key,
}

impl World {
    fn acme(&self) -> Delegation {
        Delegation {
            keys: vec![self.acme.public()],
            threshold: 1,
        }
    }
    fn root1(&self) -> Vec<u8> {
        self.repo.root_file(1).expect("1.root.json")
    }
    fn datastore(&self, who: &str) -> PathBuf {
        self.dir.parent().expect("parent").join(format!("ds-{who}"))
    }
    /// Publishes `acme/<file>` holding `content`, signed with the acme key.
    async fn publish(&mut self, file: &str, content: &[u8]) -> Vec<u8> {
        let name = format!("acme/{file}");
        let role = sign_publisher_role(
            "acme",
            self.repo.role("acme").as_ref(),
            &[(
                name.clone(),
                content.to_vec(),
                json!({"package": "acme/pg"}),
            )],
            &[],
            std::slice::from_ref(&self.acme),
            Duration::from_secs(30 * 86_400),
        )
        .await
        .expect("sign role");
        let files = BTreeMap::from([(name, content.to_vec())]);
        let d = self.acme();
        self.repo
            .accept_role("acme", &d, &role, &files)
            .await
            .expect("accept role");
        role
    }
    async fn load(&self, who: &str, source: Arc<dyn Source>) -> Result<Client, TufError> {
        Client::load(
            &self.root1(),
            source,
            &self.datastore(who),
            ClientOptions {
                deadline: Duration::from_secs(5),
                ..ClientOptions::default()
            },
        )
        .await
    }
    fn dir_source(&self) -> Arc<dyn Source> {
        Arc::new(DirSource(self.dir.clone()))
    }
}

async fn world() -> World {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("repo");
    let roots = vec![Key::generate(), Key::generate(), Key::generate()];
    let online = Online::generate();
    let repo = Repo::create(&dir, &roots[..2], 2, online.clone(), Lifetimes::default())
        .await
        .expect("create");
    World {
        _tmp: tmp,
        dir,
        repo,
        roots,
        online,
        acme: Key::generate(),
    }
}

/// A mirror: serves the repository but with some files replaced (or withheld, or stalled).
#[derive(Debug)]
struct Mirror {
    dir: PathBuf,
    replace: HashMap<String, Vec<u8>>,
    stall: bool,
}

#[async_trait]
impl Source for Mirror {
    async fn get(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, String> {
        if self.stall {
            std::future::pending::<()>().await;
        }
        if let Some(b) = self.replace.get(path) {
            return Ok(Some(b[..b.len().min(max as usize + 1)].to_vec()));
        }
        DirSource(self.dir.clone()).get(path, max).await
    }
}

fn mirror(dir: &Path, replace: &[(&str, Vec<u8>)]) -> Arc<dyn Source> {
    Arc::new(Mirror {
        dir: dir.to_path_buf(),
        replace: replace
            .iter()
            .map(|(p, b)| (p.to_string(), b.clone()))
            .collect(),
        stall: false,
    })
}

fn target_path(dir: &Path, org: &str, file: &str, content: &[u8]) -> (String, PathBuf) {
    let rel = format!("targets/{org}/{}.{file}", Digest::of(content).hex());
    let p = dir.join(&rel);
    (rel, p)
}

fn refused(r: Result<Client, TufError>, what: &str) -> String {
    match r {
        Ok(c) => panic!("{what}: the client accepted it ({c:?})"),
        Err(e) => {
            eprintln!("{what}: refused: {e}");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn a_published_package_is_listed_and_downloaded_verified() {
    let mut w = world().await;
    let index = br#"{"kind":"macula-package-index/v1"}"#.to_vec();
    w.publish("pg@1.0.0", &index).await;

    let (rel, path) = target_path(&w.dir, "acme", "pg@1.0.0", &index);
    assert!(path.exists(), "target written in ngclient's layout: {rel}");

    let c = w.load("a", w.dir_source()).await.expect("load");
    let rel = c.release("acme/pg@1.0.0").expect("listed");
    assert_eq!(rel.digest, Digest::of(&index));
    assert_eq!(rel.publisher, "acme");
    assert_eq!(rel.custom["package"], "acme/pg");
    assert_eq!(c.fetch("acme/pg@1.0.0").await.expect("fetch"), index);
    assert!(c.release("acme/pg@9.9.9").is_none());
    assert!(c.fetch("acme/pg@9.9.9").await.is_err());

    // A second version; the first stays, unchanged. Reopening the repository from disk keeps all.
    w.publish("pg@1.1.0", b"second").await;
    let reopened = Repo::open(&w.dir, w.online.clone(), Lifetimes::default()).expect("open");
    assert_eq!(reopened.publishers()["acme"], 2);
    let c = w.load("a", w.dir_source()).await.expect("reload");
    let names: Vec<_> = c.releases().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["acme/pg@1.0.0", "acme/pg@1.1.0"]);
}

#[tokio::test]
async fn versions_are_immutable_and_roles_go_one_version_at_a_time() {
    let mut w = world().await;
    let first = w.publish("pg@1.0.0", b"one").await;

    // The same name with other content: refused, nothing written.
    let role = sign_publisher_role(
        "acme",
        w.repo.role("acme").as_ref(),
        &[("acme/pg@1.0.0".into(), b"other".to_vec(), json!({}))],
        &[],
        std::slice::from_ref(&w.acme),
        Duration::from_secs(30 * 86_400),
    )
    .await
    .expect("sign");
    let files = BTreeMap::from([("acme/pg@1.0.0".to_string(), b"other".to_vec())]);
    let e = w
        .repo
        .accept_role("acme", &w.acme(), &role, &files)
        .await
        .expect_err("overwrite refused");
    assert!(e.to_string().contains("immutable"), "{e}");

    // Replaying version 1 (or any but the next) is a conflict.
    let e = w
        .repo
        .accept_role("acme", &w.acme(), &first, &BTreeMap::new())
        .await
        .expect_err("replay refused");
    assert!(
        matches!(
            e,
            TufError::Conflict {
                got: 1,
                want: 2,
                ..
            }
        ),
        "{e}"
    );

    // A new target without its file, or with a file that is not it: refused.
    let role = next_role(
        "acme",
        w.repo.role("acme").as_ref(),
        &[("acme/pg@2.0.0", &b"two"[..])],
        std::slice::from_ref(&w.acme),
        MONTH,
    )
    .await;
    let e = w
        .repo
        .accept_role("acme", &w.acme(), &role, &BTreeMap::new())
        .await
        .expect_err("no file");
    assert!(e.to_string().contains("not uploaded"), "{e}");
    let lying = BTreeMap::from([("acme/pg@2.0.0".to_string(), b"TWO".to_vec())]);
    let e = w
        .repo
        .accept_role("acme", &w.acme(), &role, &lying)
        .await
        .expect_err("wrong file");
    assert!(e.to_string().contains("does not match"), "{e}");
    assert_eq!(w.repo.publishers()["acme"], 1, "nothing was accepted");

    // An expiry too soon is refused (it would fail every client's load when it came).
    let role = next_role(
        "acme",
        w.repo.role("acme").as_ref(),
        &[],
        std::slice::from_ref(&w.acme),
        Duration::from_secs(60),
    )
    .await;
    let e = w
        .repo
        .accept_role("acme", &w.acme(), &role, &BTreeMap::new())
        .await
        .expect_err("short expiry");
    assert!(e.to_string().contains("too soon"), "{e}");

    // Malformed uploads name the field.
    let e = w
        .repo
        .accept_role(
            "acme",
            &w.acme(),
            br#"{"signed":{"_type":"targets"},"signatures":[]}"#,
            &BTreeMap::new(),
        )
        .await
        .expect_err("malformed");
    assert!(e.to_string().contains("role acme: signed"), "{e}");
}

#[tokio::test]
async fn root_rotates_and_a_client_on_the_old_root_follows() {
    let mut w = world().await;
    w.publish("pg@1.0.0", b"x").await;
    let before = w.load("a", w.dir_source()).await.expect("load");
    assert_eq!(before.root_version(), 1);

    // New root keys (one kept, two new), threshold 2; new online keys too.
    let new_roots = [w.roots[1].clone(), Key::generate(), Key::generate()];
    let publics: Vec<_> = new_roots.iter().map(Key::public).collect();
    let online2 = Online::generate();

    // Signed by only one of the old keys: refused before anything is written.
    let e = w
        .repo
        .rotate_root(&publics, 2, online2.clone(), &w.roots[..1], &new_roots[1..])
        .await
        .expect_err("one old signature is below the old threshold");
    assert!(e.to_string().contains("old root"), "{e}");
    assert!(!w.dir.join("metadata/2.root.json").exists());

    let v = w
        .repo
        .rotate_root(&publics, 2, online2, &w.roots[..2], &new_roots[1..])
        .await
        .expect("rotate");
    assert_eq!(v, 2);
    // A client that trusts only 1.root.json walks to 2 and loads what the new keys signed.
    let c = w
        .load("a", w.dir_source())
        .await
        .expect("load after rotation");
    assert_eq!(c.root_version(), 2);
    assert!(c.release("acme/pg@1.0.0").is_some());
    // Keeping the newest root as its trust: it loads from it next time.
    let next = Client::load(
        &c.root_json(),
        w.dir_source(),
        &w.datastore("a"),
        ClientOptions::default(),
    )
    .await
    .expect("from the newer root");
    assert_eq!(next.root_version(), 2);
}

#[tokio::test]
async fn a_publisher_signs_only_its_own_namespace_and_a_revoked_key_signs_nothing() {
    let mut w = world().await;
    w.publish("pg@1.0.0", b"x").await;
    let evil = Key::generate();
    let evil_d = Delegation {
        keys: vec![evil.public()],
        threshold: 1,
    };
    // Wrong software: `evil` claims a name under acme/.
    let e = sign_publisher_role(
        "evil",
        None,
        &[("acme/pg@1.0.1".into(), b"bad".to_vec(), json!({}))],
        &[],
        std::slice::from_ref(&evil),
        MONTH,
    )
    .await
    .expect_err("the signer refuses too");
    assert!(e.to_string().contains("outside the namespace"), "{e}");
    // Hand-built role that does it anyway (tough's editor signs whatever it is given).
    let forged = forge_role("evil", &evil, "acme/pg@1.0.1", b"bad").await;
    let files = BTreeMap::from([("acme/pg@1.0.1".to_string(), b"bad".to_vec())]);
    let e = w
        .repo
        .accept_role("evil", &evil_d, &forged, &files)
        .await
        .expect_err("refused by the Hub");
    assert!(e.to_string().contains("outside the namespace"), "{e}");
    // Acme's role signed by evil's key: refused.
    let role = next_role(
        "acme",
        w.repo.role("acme").as_ref(),
        &[("acme/pg@1.0.1", &b"bad"[..])],
        std::slice::from_ref(&evil),
        MONTH,
    )
    .await;
    let e = w
        .repo
        .accept_role("acme", &w.acme(), &role, &files)
        .await
        .expect_err("wrong key");
    assert!(e.to_string().contains("signatures"), "{e}");
    // Reserved namespaces.
    for ns in ["hub", "targets", "root", "Acme", "-x", ""] {
        assert!(
            w.repo
                .accept_role(ns, &evil_d, &forged, &files)
                .await
                .is_err(),
            "{ns:?}"
        );
    }

    // Key compromise below threshold: acme now needs 2 of 2 keys; one signature is not enough.
    let acme2 = Key::generate();
    let two = Delegation {
        keys: vec![w.acme.public(), acme2.public()],
        threshold: 2,
    };
    let dropped = w
        .repo
        .set_delegation("acme", Some(&two))
        .await
        .expect("set");
    assert!(
        dropped,
        "the role signed by one key does not meet the new threshold"
    );
    let c = w.load("b", w.dir_source()).await.expect("load");
    assert!(
        c.release("acme/pg@1.0.0").is_none(),
        "dropped with its role"
    );
    let one = next_role(
        "acme",
        None,
        &[("acme/pg@1.0.0", &b"x"[..])],
        std::slice::from_ref(&w.acme),
        MONTH,
    )
    .await;
    let files = BTreeMap::from([("acme/pg@1.0.0".to_string(), b"x".to_vec())]);
    let e = w
        .repo
        .accept_role("acme", &two, &one, &files)
        .await
        .expect_err("one of two");
    assert!(e.to_string().contains("signatures"), "{e}");
    // Both keys: accepted, and it is listed again.
    let both = next_role(
        "acme",
        None,
        &[("acme/pg@1.0.0", &b"x"[..])],
        &[w.acme.clone(), acme2.clone()],
        MONTH,
    )
    .await;
    w.repo
        .accept_role("acme", &two, &both, &files)
        .await
        .expect("threshold met");
    let c = w.load("b", w.dir_source()).await.expect("load");
    assert!(c.release("acme/pg@1.0.0").is_some());

    // Revoking a key the role still meets its threshold without: nothing dropped.
    let rotated = Delegation {
        keys: vec![acme2.public()],
        threshold: 1,
    };
    assert!(!w
        .repo
        .set_delegation("acme", Some(&rotated))
        .await
        .expect("set"));
    // The revoked key alone signs nothing any more.
    let by_revoked = next_role(
        "acme",
        w.repo.role("acme").as_ref(),
        &[("acme/pg@3.0.0", &b"3"[..])],
        std::slice::from_ref(&w.acme),
        MONTH,
    )
    .await;
    let files = BTreeMap::from([("acme/pg@3.0.0".to_string(), b"3".to_vec())]);
    let e = w
        .repo
        .accept_role("acme", &rotated, &by_revoked, &files)
        .await
        .expect_err("revoked key");
    assert!(e.to_string().contains("signatures"), "{e}");
}

/// A role signed by `key` naming `target`, built without the namespace check (an attacker's).
async fn forge_role(ns: &str, key: &Key, target: &str, content: &[u8]) -> Vec<u8> {
    use tough::schema::{DelegatedTargets, Hashes, KeyHolder, Target, Targets};
    let mut t = Targets::new(
        "1.0.31".into(),
        std::num::NonZeroU64::MIN,
        macula_hub::tuf::expiry_in(Duration::from_secs(30 * 86_400)),
    );
    t.targets.insert(
        tough::TargetName::new(target).expect("name"),
        Target {
            length: content.len() as u64,
            hashes: Hashes {
                sha256: Digest::of(content).0.to_vec().into(),
                _extra: HashMap::new(),
            },
            custom: HashMap::new(),
            _extra: HashMap::new(),
        },
    );
    let mut d = tough::schema::Delegations::new();
    let tk = key.public().tuf();
    let id = tk.key_id().expect("id");
    d.keys.insert(id.clone(), tk);
    d.roles.push(tough::schema::DelegatedRole {
        name: ns.into(),
        keyids: vec![id],
        threshold: std::num::NonZeroU64::MIN,
        paths: tough::schema::PathSet::Paths(vec![
            tough::schema::PathPattern::new("*/*").expect("pattern")
        ]),
        terminating: true,
        targets: None,
    });
    let bytes = sign_with(
        DelegatedTargets {
            name: ns.into(),
            targets: t,
        },
        KeyHolder::Delegations(d),
        key,
    )
    .await;
    let signed: tough::schema::Signed<DelegatedTargets> =
        serde_json::from_slice(&bytes).expect("json");
    let (_, targets) = signed.targets();
    serde_json::to_vec(&targets).expect("json")
}

#[tokio::test]
async fn attacks_on_metadata_are_refused() {
    let mut w = world().await;
    w.publish("pg@1.0.0", b"v1").await;
    let ts1 = std::fs::read(w.dir.join("metadata/timestamp.json")).expect("ts");
    let role1 = std::fs::read(w.dir.join("metadata/1.acme.json")).expect("role");
    w.publish("pg@1.1.0", b"v2").await;

    // The node has seen the newest state.
    w.load("n", w.dir_source()).await.expect("load");

    // Rollback: a mirror serves the older (validly signed) timestamp.
    let e = refused(
        w.load(
            "n",
            mirror(&w.dir, &[("metadata/timestamp.json", ts1.clone())]),
        )
        .await,
        "rollback",
    );
    assert!(e.to_lowercase().contains("version"), "rollback: {e}");

    // Mix-and-match: the current snapshot names acme's role version 2; the mirror serves the
    // (validly signed) version 1 under that name.
    let e = refused(
        w.load(
            "m",
            mirror(&w.dir, &[("metadata/2.acme.json", role1.clone())]),
        )
        .await,
        "mix-and-match",
    );
    assert!(
        e.contains("acme") || e.to_lowercase().contains("hash"),
        "mix: {e}"
    );

    // A role version far above what the snapshot names (signed by acme's key, as by an attacker
    // holding it): not the file the snapshot names, refused.
    let ff = next_role(
        "acme",
        Some(&{
            let mut r = w.repo.role("acme").expect("role");
            r.signed.version = std::num::NonZeroU64::new(99).expect("nz");
            r
        }),
        &[],
        std::slice::from_ref(&w.acme),
        MONTH,
    )
    .await;
    let e = refused(
        w.load("f", mirror(&w.dir, &[("metadata/2.acme.json", ff)]))
            .await,
        "role above the snapshot",
    );
    assert!(e.contains("snapshot"), "{e}");

    // Endless data: a timestamp of 2 MiB (the limit is 1 MiB).
    let mut big = b"{".to_vec();
    big.resize(2 << 20, b' ');
    let e = refused(
        w.load("e", mirror(&w.dir, &[("metadata/timestamp.json", big)]))
            .await,
        "endless data",
    );
    assert!(
        e.to_lowercase().contains("size") || e.contains("limit") || e.contains("max"),
        "endless: {e}"
    );

    // Slow retrieval: a mirror that never answers; the client gives up at its deadline.
    let stall: Arc<dyn Source> = Arc::new(Mirror {
        dir: w.dir.clone(),
        replace: HashMap::new(),
        stall: true,
    });
    let t0 = std::time::Instant::now();
    let r = Client::load(
        &w.root1(),
        stall,
        &w.datastore("s"),
        ClientOptions {
            deadline: Duration::from_millis(300),
            ..ClientOptions::default()
        },
    )
    .await;
    assert!(matches!(r, Err(TufError::Deadline(_))), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    // A tampered signature on the current timestamp.
    let mut ts =
        String::from_utf8(std::fs::read(w.dir.join("metadata/timestamp.json")).expect("ts"))
            .expect("utf8");
    let at = ts.find("\"sig\": \"").expect("sig") + 8;
    let flipped = if &ts[at..at + 1] == "0" { "1" } else { "0" };
    ts.replace_range(at..at + 1, flipped);
    let e = refused(
        w.load(
            "t",
            mirror(&w.dir, &[("metadata/timestamp.json", ts.into_bytes())]),
        )
        .await,
        "bad signature",
    );
    assert!(
        e.to_lowercase().contains("signature") || e.contains("threshold"),
        "sig: {e}"
    );
}

#[tokio::test]
async fn indefinite_freeze_an_expired_timestamp_is_refused() {
    use tough::schema::{KeyHolder, Timestamp};
    let mut w = world().await;
    w.publish("pg@1.0.0", b"v1").await;
    // The attacker replays a timestamp that was valid once and has expired: one signed with the
    // real timestamp key, a version above the current, expired a minute ago.
    let current: tough::schema::Signed<Timestamp> =
        serde_json::from_slice(&std::fs::read(w.dir.join("metadata/timestamp.json")).expect("ts"))
            .expect("parse");
    let mut stale = current.signed.clone();
    stale.version = std::num::NonZeroU64::new(stale.version.get() + 1).expect("nz");
    stale.expires =
        jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 60).expect("time");
    let root: tough::schema::Signed<tough::schema::Root> =
        serde_json::from_slice(&w.root1()).expect("root");
    let signed = sign_with(stale, KeyHolder::Root(root.signed), &w.online.timestamp).await;
    let e = refused(
        w.load("z", mirror(&w.dir, &[("metadata/timestamp.json", signed)]))
            .await,
        "freeze",
    );
    assert!(e.to_lowercase().contains("expired"), "freeze: {e}");
}

#[tokio::test]
async fn attacks_on_targets_are_refused() {
    let mut w = world().await;
    let index = b"the real index".to_vec();
    w.publish("pg@1.0.0", &index).await;
    let (rel, _) = target_path(&w.dir, "acme", "pg@1.0.0", &index);

    // Arbitrary package / malicious mirror: other bytes at the target's path.
    let c = w
        .load(
            "x",
            mirror(&w.dir, &[(rel.as_str(), b"the evil index".to_vec())]),
        )
        .await
        .expect("metadata is fine");
    let e = c
        .fetch("acme/pg@1.0.0")
        .await
        .expect_err("other bytes")
        .to_string();
    assert!(
        e.to_lowercase().contains("hash") || e.contains("sha"),
        "{e}"
    );

    // Endless data / oversized download: the right bytes and then more.
    let mut longer = index.clone();
    longer.extend_from_slice(&[b'A'; 4096]);
    let c = w
        .load("y", mirror(&w.dir, &[(rel.as_str(), longer)]))
        .await
        .expect("metadata is fine");
    let e = c.fetch("acme/pg@1.0.0").await.expect_err("too long");
    assert!(!e.to_string().is_empty());

    // The untouched repository still serves it.
    let c = w.load("ok", w.dir_source()).await.expect("load");
    assert_eq!(c.fetch("acme/pg@1.0.0").await.expect("fetch"), index);
}

#[tokio::test]
async fn a_forged_root_below_threshold_is_refused_by_the_client() {
    let w = world().await;
    // An attacker holding one of the two root keys (threshold 2) writes 2.root.json naming its
    // own online keys and signs it with that key and its new ones.
    let evil_online = Online::generate();
    let evil_roots = [w.roots[0].clone(), Key::generate()];
    let mut forger = Repo::open(&w.dir, w.online.clone(), Lifetimes::default()).expect("open");
    let publics: Vec<_> = evil_roots.iter().map(Key::public).collect();
    // The Hub's own writer refuses it...
    assert!(forger
        .rotate_root(&publics, 1, evil_online.clone(), &w.roots[..1], &evil_roots)
        .await
        .is_err());
    // ...so the attacker writes it by hand, into a copy the mirror serves.
    use tough::schema::{KeyHolder, Root, Signed};
    let mut root: Signed<Root> = serde_json::from_slice(&w.root1()).expect("root");
    root.signed.version = std::num::NonZeroU64::new(2).expect("nz");
    let old = root.signed.clone();
    let signed = sign_with(root.signed.clone(), KeyHolder::Root(old), &w.roots[0]).await;
    let e = refused(
        w.load("r", mirror(&w.dir, &[("metadata/2.root.json", signed)]))
            .await,
        "root below threshold",
    );
    assert!(
        e.to_lowercase().contains("signature") || e.contains("threshold"),
        "{e}"
    );
}

#[tokio::test]
async fn fast_forward_is_recovered_from_by_rotating_the_online_keys() {
    use tough::schema::{Hashes, KeyHolder, Metafile, Root, Signed, Snapshot, Timestamp};
    let mut w = world().await;
    w.publish("pg@1.0.0", b"v1").await;
    let root: Signed<Root> = serde_json::from_slice(&w.root1()).expect("root");
    let holder = KeyHolder::Root(root.signed);
    let meta = |version: u64, bytes: &[u8]| Metafile {
        length: Some(bytes.len() as u64),
        hashes: Some(Hashes {
            sha256: Digest::of(bytes).0.to_vec().into(),
            _extra: HashMap::new(),
        }),
        version: std::num::NonZeroU64::new(version).expect("nz"),
        _extra: HashMap::new(),
    };
    // An attacker who stole the snapshot and timestamp keys serves version 1000 of both.
    let snap_name = format!("metadata/{}.snapshot.json", w.repo.timestamp_version());
    let mut snap: Signed<Snapshot> =
        serde_json::from_slice(&std::fs::read(w.dir.join(&snap_name)).expect("snap"))
            .expect("parse");
    snap.signed.version = std::num::NonZeroU64::new(1000).expect("nz");
    let snap = sign_with(snap.signed, holder.clone(), &w.online.snapshot).await;
    let mut ts: Signed<Timestamp> =
        serde_json::from_slice(&std::fs::read(w.dir.join("metadata/timestamp.json")).expect("ts"))
            .expect("parse");
    ts.signed.version = std::num::NonZeroU64::new(1000).expect("nz");
    ts.signed
        .meta
        .insert("snapshot.json".into(), meta(1000, &snap));
    let ts = sign_with(ts.signed, holder, &w.online.timestamp).await;
    let evil = mirror(
        &w.dir,
        &[
            ("metadata/timestamp.json", ts),
            ("metadata/1000.snapshot.json", snap),
        ],
    );
    w.load("ff", evil)
        .await
        .expect("the forged versions verify: the keys were stolen");

    // The node is now fast-forwarded: the Hub's real (lower) versions look like a rollback.
    let e = refused(w.load("ff", w.dir_source()).await, "after fast-forward");
    assert!(e.contains("previously fetched"), "{e}");

    // The operator rotates root with new online keys; the node walks to it, forgets the
    // timestamp and snapshot versions the old keys signed (TUF 5.3.11), and loads again.
    let publics: Vec<_> = w.roots[..2].iter().map(Key::public).collect();
    let roots = w.roots[..2].to_vec();
    w.repo
        .rotate_root(&publics, 2, Online::generate(), &roots, &roots)
        .await
        .expect("rotate");
    let c = w.load("ff", w.dir_source()).await.expect("recovered");
    assert!(c.release("acme/pg@1.0.0").is_some());
}
