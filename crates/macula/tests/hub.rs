//! The Hub end to end against `macula up`: a publisher with a verified domain registers a key,
//! attests and publishes a package from the CLI; it is found by search and info; python-tuf's
//! ngclient reads it from the node over HTTP; another tenant cannot publish in its namespace,
//! yank its versions or overwrite them; a yank shows with its reason; a revoked key takes the
//! publisher's packages out of the repository.

mod common;
mod macula_up;

/// The realm the shared test helpers (`common`) name: `macula up`'s.
#[allow(dead_code)]
const REALM: &str = "com.example.demo";
#[path = "../../macula-hub/tests/common/pytuf.rs"]
mod pytuf;
#[path = "../../macula-hub/tests/common/s3s.rs"]
mod s3s;

use std::path::Path;

use macula_up::{cli_as as cli, cli_run, mailed_code, Up};
use serde_json::Value;

/// A signed-up, logged-in, verified account with its own CLI config home.
fn account(http: &str, mail: &Path, email: &str) -> tempfile::TempDir {
    let cfg = tempfile::tempdir().unwrap();
    let pw = "correct horse battery\n";
    let c = cfg.path();
    cli(
        c,
        http,
        &["signup", "--email", email, "--password-stdin"],
        Some(pw),
    );
    cli(
        c,
        http,
        &["login", "--email", email, "--password-stdin"],
        Some(pw),
    );
    let code = mailed_code(mail, email);
    cli(c, http, &["account", "verify", &code], None);
    cfg
}

const MANIFEST: &str = r#"
name: acme/hello
version: 1.0.0
kind: hub-package
description: Says hello.
permissions:
  planes: [workplane]
  capabilities: ["rpc:register:com.acme.hello"]
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

fn package(dir: &Path, manifest: &str, body: &str) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("package.yaml"), manifest).unwrap();
    std::fs::write(dir.join("bin/hello"), body).unwrap();
}

/// Runs the CLI expecting a refusal; its error output.
fn refused(cfg: &Path, http: &str, args: &[&str]) -> String {
    let (ok, _, err) = cli_run(cfg, http, args, None);
    assert!(!ok, "macula {args:?} was not refused");
    err
}

/// `macula [--json] hub publish DIR --key KEY --attest`.
fn publish_args(dir: &Path, key: &Path, json: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![];
    if json {
        a.push("--json".into());
    }
    for s in ["hub", "publish"] {
        a.push(s.into());
    }
    a.push(dir.display().to_string());
    a.push("--key".into());
    a.push(key.display().to_string());
    a.push("--attest".into());
    a
}

/// The nodes running a replica, from `macula --json deploy`'s answer.
fn running_nodes(d: &Value) -> std::collections::BTreeSet<String> {
    d["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["state"] == "running")
        .filter_map(|r| r["node"].as_str().map(str::to_owned))
        .collect()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn a_publisher_publishes_and_the_hub_serves_it_verified() {
    let home = tempfile::tempdir().unwrap();
    let mail = home.path().join("mail");
    std::fs::write(
        home.path().join("node.yaml"),
        format!(
            "registry:\n  operators: [ops@example.com]\n  mail:\n    url: dir:{}\n",
            mail.display()
        ),
    )
    .unwrap();
    let (_up, banner): (Up, Value) = macula_up::up(home.path(), &[]);
    let http = banner["http"].as_str().unwrap().to_owned();

    // acme: dev@acme.com is at a domain named like the namespace: verified at once.
    let acme = account(&http, &mail, "dev@acme.com");
    let a = acme.path();
    let key = a.join("acme.key");
    let k = json(&cli(
        a,
        &http,
        &["--json", "hub", "keygen", "--out", key.to_str().unwrap()],
        None,
    ));
    assert_eq!(k["public_key"].as_str().unwrap().len(), 64);
    let p = json(&cli(
        a,
        &http,
        &["--json", "hub", "publisher", "create", "acme"],
        None,
    ));
    assert_eq!(p["verified_by"], "email-domain:acme.com");
    cli(
        a,
        &http,
        &["hub", "keys", "add", "acme", "--key", key.to_str().unwrap()],
        None,
    );

    let pkg = tempfile::tempdir().unwrap();
    package(pkg.path(), MANIFEST, "#!/bin/sh\necho hello\n");
    let out = json(&cli(
        a,
        &http,
        &publish_args(pkg.path(), &key, true)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        None,
    ));
    let rel = &out["added"][0];
    assert_eq!(rel["target"], "acme/hello@1.0.0", "{out}");
    assert_eq!(rel["tier"], "community");
    let digest = rel["digest"].as_str().unwrap().to_owned();

    // Found, with its publisher's verification.
    let found = cli(a, &http, &["hub", "search", "hel"], None);
    assert!(
        found.contains("acme/hello") && found.contains("1.0.0"),
        "{found}"
    );
    let info = json(&cli(
        a,
        &http,
        &["--json", "hub", "info", "acme/hello"],
        None,
    ));
    assert_eq!(info["releases"][0]["digest"], digest.as_str());
    assert_eq!(info["publisher"]["verified_by"], "email-domain:acme.com");

    // python-tuf's reference client reads the Hub from the node: the release and the Hub's
    // signed status.
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root.json");
    std::fs::write(&root, cli(a, &http, &["--json", "hub", "trust"], None)).unwrap();
    let url = format!("{http}/v1/hub/tuf");
    match pytuf::venv() {
        Err(why) => eprintln!("SKIPPED python-tuf ngclient against the node: {why}"),
        Ok(py) => {
            let got = pytuf::ngclient(&py, work.path(), &url, &root, "acme/hello@1.0.0")
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                format!("sha256:{}", got["sha256"].as_str().unwrap()),
                digest,
                "ngclient downloaded the package's index: {got}"
            );
            assert_eq!(got["custom"]["version"], "1.0.0");
            let w2 = tempfile::tempdir().unwrap();
            let status = pytuf::ngclient(&py, w2.path(), &url, &root, "hub/status.json")
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(status["length"].as_u64().unwrap() > 0);
        }
    }

    // Another tenant: unverified (a free-mail domain) it cannot publish; approved by an
    // operator, it still cannot publish in acme's namespace, yank acme's versions, or register
    // keys for acme.
    let evil = account(&http, &mail, "mallory@example.com");
    let e = evil.path();
    let ekey = e.join("evil.key");
    cli(
        e,
        &http,
        &["hub", "keygen", "--out", ekey.to_str().unwrap()],
        None,
    );
    let p = json(&cli(
        e,
        &http,
        &["--json", "hub", "publisher", "create", "evil"],
        None,
    ));
    assert_eq!(p["verified_by"], "");
    let err = refused(
        e,
        &http,
        &[
            "hub",
            "keys",
            "add",
            "evil",
            "--key",
            ekey.to_str().unwrap(),
        ],
    );
    assert!(err.contains("not verified"), "{err}");
    // Nor export bundles (the Hub signs their metadata and exports its vulnerability data
    // for publishers and operators only).
    let out = e.join("stolen.bmz");
    let err = refused(
        e,
        &http,
        &[
            "hub",
            "bundle",
            "export",
            "acme/hello@1.0.0",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("bundles are exported by operators") && !out.exists(),
        "{err}"
    );
    let ops = account(&http, &mail, "ops@example.com");
    cli(
        ops.path(),
        &http,
        &["hub", "publisher", "approve", "evil"],
        None,
    );
    cli(
        e,
        &http,
        &[
            "hub",
            "keys",
            "add",
            "evil",
            "--key",
            ekey.to_str().unwrap(),
        ],
        None,
    );
    let err = refused(
        e,
        &http,
        &[
            "hub",
            "keys",
            "add",
            "acme",
            "--key",
            ekey.to_str().unwrap(),
        ],
    );
    assert!(err.contains("only the owner"), "{err}");
    let pkg2 = tempfile::tempdir().unwrap();
    package(
        pkg2.path(),
        &MANIFEST.replace("1.0.0", "1.0.1"),
        "#!/bin/sh\necho pwned\n",
    );
    let err = refused(
        e,
        &http,
        &publish_args(pkg2.path(), &ekey, false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(err.contains("only the owner of publisher acme"), "{err}");
    let err = refused(
        e,
        &http,
        &["hub", "yank", "acme/hello@1.0.0", "--reason", "mine now"],
    );
    assert!(err.contains("only the owner"), "{err}");
    let err = refused(e, &http, &["hub", "retest", "acme/hello@1.0.0"]);
    assert!(err.contains("only the owner"), "{err}");

    // acme cannot overwrite 1.0.0 with other bytes either.
    let pkg3 = tempfile::tempdir().unwrap();
    package(pkg3.path(), MANIFEST, "#!/bin/sh\necho changed\n");
    let err = refused(
        a,
        &http,
        &publish_args(pkg3.path(), &key, false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(err.contains("immutable"), "{err}");

    // A yank shows with its reason.
    cli(
        a,
        &http,
        &["hub", "yank", "acme/hello@1.0.0", "--reason", "use 1.0.1"],
        None,
    );
    let info = json(&cli(
        a,
        &http,
        &["--json", "hub", "info", "acme/hello"],
        None,
    ));
    assert_eq!(info["releases"][0]["yanked"], "use 1.0.1");

    // Revoking acme's only key takes its role, and its packages, out of the repository.
    let kid = json(&cli(
        a,
        &http,
        &["--json", "hub", "keys", "list", "acme"],
        None,
    ))[0]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    cli(a, &http, &["hub", "keys", "revoke", "acme", &kid], None);
    let role: Value = ureq::get(&format!("{http}/v1/hub/publishers/acme/role"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert!(role.is_null(), "the role left the repository: {role}");
}

/// `macula up` (with `extra` arguments) and a verified publisher `acme` with a registered key.
struct Fixture {
    _up: Up,
    _home: tempfile::TempDir,
    acme: tempfile::TempDir,
    key: std::path::PathBuf,
    http: String,
    ws: String,
    realm: String,
    rkey: String,
}

impl Fixture {
    fn new(extra: &[&str]) -> Fixture {
        Fixture::with(extra, "")
    }

    /// With `registry` settings (YAML lines, indented under `registry:`) added.
    fn with(extra: &[&str], registry: &str) -> Fixture {
        let home = tempfile::tempdir().unwrap();
        let mail = home.path().join("mail");
        std::fs::write(
            home.path().join("node.yaml"),
            format!(
                "registry:\n  mail:\n    url: dir:{}\n{registry}",
                mail.display()
            ),
        )
        .unwrap();
        let (up, banner): (Up, Value) = macula_up::up(home.path(), extra);
        let s = |k: &str| banner[k].as_str().unwrap().to_owned();
        let http = s("http");
        let acme = account(&http, &mail, "dev@acme.com");
        let a = acme.path();
        let key = a.join("acme.key");
        cli(
            a,
            &http,
            &["hub", "keygen", "--out", key.to_str().unwrap()],
            None,
        );
        cli(a, &http, &["hub", "publisher", "create", "acme"], None);
        cli(
            a,
            &http,
            &["hub", "keys", "add", "acme", "--key", key.to_str().unwrap()],
            None,
        );
        Fixture {
            _up: up,
            _home: home,
            acme,
            key,
            ws: s("ws"),
            realm: s("realm"),
            rkey: s("key"),
            http,
        }
    }

    /// Publishes a package with `manifest` whose program is `body`.
    fn publish(&self, manifest: &str, body: &str) {
        self.publish_with(manifest, body, &[]);
    }

    /// Publishes a package with `manifest` whose program is `body`, and `files` (path,
    /// contents) beside them.
    fn publish_with(&self, manifest: &str, body: &str, files: &[(&str, String)]) {
        let pkg = tempfile::tempdir().unwrap();
        package(pkg.path(), manifest, body);
        for (path, text) in files {
            std::fs::write(pkg.path().join(path), text).unwrap();
        }
        let (ok, _, err) = self.publish_dir(pkg.path());
        assert!(ok, "publishing: {err}");
    }

    /// `macula hub publish DIR --key --attest` as acme: (ok, stdout, stderr).
    fn publish_dir(&self, dir: &Path) -> (bool, String, String) {
        cli_run(
            self.acme.path(),
            &self.http,
            &publish_args(dir, &self.key, false)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            None,
        )
    }

    /// `macula ARGS` as acme (the registry's commands).
    fn hub(&self, args: &[&str]) -> String {
        cli(self.acme.path(), &self.http, args, None)
    }

    /// `macula --json deploy --package TARGET --timeout T`, which must succeed: its answer.
    fn deploy(&self, target: &str, timeout: &str) -> String {
        let (ok, out, err) = self.node(&["deploy", "--package", target, "--timeout", timeout]);
        assert!(ok, "deploy --package {target}: {err}");
        out
    }

    /// `macula logs NAME` once they say `want` (within 15 s).
    fn logs_saying(&self, name: &str, want: &str) -> String {
        let t = std::time::Instant::now();
        loop {
            let (_, out, _) = self.node(&["logs", name]);
            if out.contains(want) {
                return out;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(15),
                "{name}'s output never said {want:?}: {out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The replica of workload `name` whose status detail says `want` (within 30 s).
    fn replica_saying(&self, name: &str, want: &str) -> Value {
        let t = std::time::Instant::now();
        loop {
            let (_, out, _) = self.node(&["status"]);
            let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            let found = v["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["name"] == name)
                .flat_map(|w| w["items"].as_array().cloned().unwrap_or_default())
                .find(|r| r["detail"].as_str().is_some_and(|d| d.contains(want)));
            if let Some(r) = found {
                return r;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "no replica of {name} says {want:?}: {v}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// `macula --json ARGS --url --realm --key` against the node: (ok, stdout, stderr).
    fn node(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--url",
            &self.ws,
            "--realm",
            &self.realm,
            "--key",
            &self.rkey,
        ]);
        cli_run(self.acme.path(), &self.http, &all, None)
    }
}

/// `macula deploy --package` on `macula up`: the node installs the package from its Hub —
/// verified against the Hub's TUF repository, pinned by digest — and runs its program from the
/// package's files; a yanked version is refused for new deployments.
#[test]
fn deploy_package_runs_it_from_the_hub() {
    let f = Fixture::new(&[]);
    f.publish(
        MANIFEST,
        "#!/bin/sh\necho \"hello from $MACULA_PACKAGE_DIR\"\nexec sleep 300\n",
    );
    let out = f.deploy("acme/hello@1.0.0", "60s");
    let d = json(&out);
    assert_eq!(d["name"], "hello", "{d}");
    assert_eq!(d["replicas"][0]["state"], "running", "{d}");
    // The program ran from the package's installed files.
    let logs = f.logs_saying("hello", "hello from");
    assert!(logs.contains("/packages/installed/"), "{logs}");
    // The delivery is metered for the realm: the package's files, once per node (whoever
    // installed them first there: the Hub's smoke test may have).
    let metrics = ureq::get(&format!("{}/metrics", f.http))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let series = format!("macula_realm_package_bytes_total{{realm=\"{}\"}} ", f.realm);
    let delivered: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series}in {metrics}"));
    // ... the bytes of the package's files as installed on the node.
    let installed = logs
        .lines()
        .find_map(|l| l.split("hello from ").nth(1))
        // (a JSON line: the path ends at the string's end)
        .and_then(|d| d.split(['"', '\\']).next())
        .map(|d| std::path::PathBuf::from(d.trim()))
        .expect("the package's directory in the output");
    fn tree(d: &Path) -> u64 {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| match e.file_type().unwrap().is_dir() {
                true => tree(&e.path()),
                false => e.metadata().unwrap().len(),
            })
            .sum()
    }
    assert_eq!(delivered, tree(&installed), "{metrics}");
    assert!(delivered > 0);

    // A manifest that pins the installed digest under a name the Hub does not list with it (to
    // pass a realm's policy, or dodge a revocation, by name) does not start.
    let info = json(&f.hub(&["--json", "hub", "info", "acme/hello"]));
    let digest = info["releases"][0]["digest"].as_str().unwrap().to_owned();
    let forged = tempfile::tempdir().unwrap();
    let manifest = forged.path().join("forged.yaml");
    std::fs::write(
        &manifest,
        format!(
            "kind: payload\nname: forged\ncommand: [./bin/hello]\npackage:\n  name: acme/certified@9.9.9\n  digest: {digest}\n"
        ),
    )
    .unwrap();
    let (ok, _, err) = f.node(&["deploy", "-f", manifest.to_str().unwrap(), "--no-wait"]);
    assert!(ok, "{err}");
    let r = f.replica_saying("forged", "acme/certified@9.9.9 is not on the Hub");
    assert_ne!(r["state"], "running", "{r}");

    // Yanked: new deployments of that version are refused (the running one stays).
    f.hub(&["hub", "yank", "acme/hello@1.0.0", "--reason", "broken"]);
    let (ok, _, e) = f.node(&["deploy", "--package", "acme/hello@1.0.0"]);
    assert!(!ok && e.contains("yanked (broken)"), "{e}");
}

/// A Hub whose blobs live in an S3-compatible bucket (`registry.hub.s3`, against a real S3 API
/// server, s3s-fs): a publish puts the package's files there — none on the node's disk — and a
/// deploy installs them from it through the Hub, verified. SKIPPED without s3s-fs.
#[test]
fn a_hub_keeps_its_blobs_in_an_s3_bucket() {
    let server = match s3s::start() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED the Hub on S3: {why}");
            return;
        }
    };
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("s3-secret");
    std::fs::write(&secret, s3s::SECRET_KEY).unwrap();
    let f = Fixture::with(
        &[],
        &format!(
            "  hub:\n    s3:\n      endpoint: {}\n      bucket: {}\n      prefix: packages\n      access_key_id: {}\n      secret_access_key_file: {}\n",
            server.endpoint,
            s3s::BUCKET,
            s3s::ACCESS_KEY,
            secret.display()
        ),
    );
    let body = "#!/bin/sh\necho \"hello from s3\"\nexec sleep 300\n";
    f.publish(MANIFEST, body);
    let hex = macula_hub::Digest::of(body.as_bytes()).hex();
    let object = server.object_file(s3s::BUCKET, &format!("packages/sha256/{hex}"));
    assert_eq!(
        std::fs::read(&object).expect("the program's file in the bucket"),
        body.as_bytes()
    );
    assert!(
        !f._home.path().join("hub/blobs/sha256").join(&hex).exists(),
        "no copy on the node's disk"
    );
    let out = f.deploy("acme/hello@1.0.0", "60s");
    let d = json(&out);
    assert_eq!(d["replicas"][0]["state"], "running", "{d}");
    // The Hub serves the file from the bucket, verified: altered there, it is not served
    // whole (the download ends in an error, never as a clean copy of other bytes).
    let url = format!("{}/v1/hub/blobs/sha256:{hex}", f.http);
    let mut got = ureq::get(&url).call().unwrap();
    assert_eq!(got.body_mut().read_to_vec().unwrap(), body.as_bytes());
    std::fs::write(&object, body.replace("s3", "s4")).unwrap();
    let got = ureq::get(&url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_vec().ok());
    assert_eq!(got, None, "altered bytes were served whole");
}

/// A realm's policy decides which Hub packages its workloads run, on every node: with
/// `--on-revoked stop` a revocation stops the running replica (its restart refused, saying
/// why); `--package-tier verified` refuses a Community release; `--package-publishers`
/// refuses another publisher's. A policy that names no tier is refused, naming the choices.
#[test]
fn a_realms_policy_decides_which_packages_run_and_stops_revoked_ones() {
    let f = Fixture::new(&[]);
    f.publish(MANIFEST, "#!/bin/sh\nexec sleep 300\n");
    let home = f._home.path().to_str().unwrap().to_owned();
    let policy = |args: &[&str]| {
        let mut a = vec!["realms", "policy", f.realm.as_str(), "--config", &home];
        a.extend_from_slice(args);
        cli_run(f.acme.path(), &f.http, &a, None)
    };
    let (ok, shown, err) = policy(&["--on-revoked", "stop"]);
    assert!(ok && shown.contains("revoked ones stopped"), "{shown}{err}");
    let out = f.deploy("acme/hello@1.0.0", "60s");
    assert_eq!(running_nodes(&json(&out)).len(), 1);
    let replica_says = |want: &str| f.replica_saying("hello", want);
    f.hub(&["hub", "revoke", "acme/hello@1.0.0", "--reason", "bad build"]);
    let r = replica_says("the realm's policy stops its replicas");
    assert_ne!(r["state"], "running", "{r}");

    // A Community release where Verified is required: refused on the node.
    f.publish(
        &MANIFEST.replace("version: 1.0.0", "version: 1.1.0"),
        "#!/bin/sh\nexec sleep 300\n",
    );
    let (ok, shown, err) = policy(&["--package-tier", "verified"]);
    assert!(ok && shown.contains("verified or better"), "{shown}{err}");
    let _ = f.node(&["deploy", "--package", "acme/hello@1.1.0", "--timeout", "2s"]);
    let r = replica_says("allows verified packages or better; this one is community");
    assert_ne!(r["state"], "running", "{r}");
    // Another publisher's only.
    let (ok, _, err) = policy(&[
        "--package-tier",
        "community",
        "--package-publishers",
        "initech",
    ]);
    assert!(ok, "{err}");
    replica_says("allows packages of initech only, not of acme");
    // Nonsense is refused, naming the choices.
    let (ok, _, err) = policy(&["--package-tier", "gold"]);
    assert!(
        !ok && err.contains("one of community, verified, certified"),
        "{err}"
    );
}

/// Uploads no release names are bounded per account and collected: a package too large for
/// what the account may have pending is refused, saying so; once the uploads of that failed
/// publish are older than `upload_ttl_secs`, they are collected (their blobs gone from the Hub),
/// while the files of published releases stay.
#[test]
fn unpublished_uploads_are_bounded_and_collected() {
    let f = Fixture::with(
        &[],
        "  hub:\n    max_unpublished_bytes: 3500\n    upload_ttl_secs: 1\n",
    );
    let blobs = f._home.path().join("hub/blobs/sha256");
    let publish = |manifest: &str, body: &str| {
        let pkg = tempfile::tempdir().unwrap();
        package(pkg.path(), manifest, body);
        let (ok, _, err) = f.publish_dir(pkg.path());
        let files: Vec<String> = [
            "package.yaml",
            "bin/hello",
            "sbom.spdx.json",
            "provenance.dsse.json",
        ]
        .iter()
        .filter_map(|p| std::fs::read(pkg.path().join(p)).ok())
        .map(|b| macula_hub::Digest::of(&b).hex().to_owned())
        .collect();
        (ok, err, files)
    };
    let (ok, err, a) = publish(MANIFEST, "#!/bin/sh\nexec sleep 300\n");
    assert!(ok, "{err}");
    // Each of its files fits on its own (the program 3,000 bytes), all of them do not: the
    // first uploads are kept pending, whatever their order, and a later one is refused.
    let big = format!("#!/bin/sh\n# {}\nexec sleep 300\n", "x".repeat(2_970));
    let (ok, err, b) = publish(&MANIFEST.replace("version: 1.0.0", "version: 1.1.0"), &big);
    assert!(!ok && err.contains("no release names yet"), "{err}");
    let unique: Vec<&String> = b.iter().filter(|d| !a.contains(d)).collect();
    assert!(
        unique.iter().any(|d| blobs.join(d).exists()),
        "some of the failed publish's files were uploaded"
    );
    // After the time to live, the next upload collects them.
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_millis(1100) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (ok, err, c) = publish(
        &MANIFEST.replace("version: 1.0.0", "version: 1.2.0"),
        "#!/bin/sh\necho c\nexec sleep 300\n",
    );
    assert!(ok, "{err}");
    for d in unique.iter().filter(|d| !c.contains(d)) {
        assert!(
            !blobs.join(d).exists(),
            "an abandoned upload {d} is still kept"
        );
    }
    for d in a.iter().chain(&c) {
        assert!(blobs.join(d).exists(), "a published file {d} is gone");
    }
}

/// A package whose artifact is an OCI image (a `podman save` archive): published, verified
/// and installed by the node like any package, and run by Podman from the installed archive —
/// no images directory, no registry. SKIPPED without podman, runc and a static busybox.
#[test]
fn a_package_image_runs_in_a_container() {
    if let Some(why) = common::work::containers_unavailable() {
        eprintln!("SKIPPED the Hub's container packages: {why}");
        return;
    }
    let build = tempfile::tempdir().unwrap();
    let archive = match common::work::busybox_image(build.path(), "localhost/hubpod:1") {
        Ok(a) => a,
        Err(why) => {
            eprintln!("SKIPPED the Hub's container packages: no test image: {why}");
            return;
        }
    };
    let f = Fixture::with(
        &[],
        "workloads:\n  require_limits: false\n  require_sandbox: false\n",
    );
    let manifest = r#"
name: acme/pod
version: 1.0.0
kind: hub-package
description: A container from the Hub.
permissions:
  planes: [workplane]
artifacts:
  - name: image
    file: image.tar
attestations:
  sbom: sbom.spdx.json
  provenance: provenance.dsse.json
workload:
  kind: payload
  name: pod
  image: localhost/hubpod:1
  command: [sh, -c, "cat /etc/macula-image; echo from the hub; exec sleep 300"]
"#;
    let pkg = tempfile::tempdir().unwrap();
    std::fs::write(pkg.path().join("package.yaml"), manifest).unwrap();
    std::fs::copy(&archive, pkg.path().join("image.tar")).unwrap();
    let (ok, _, err) = f.publish_dir(pkg.path());
    assert!(ok, "{err}");
    let out = f.deploy("acme/pod@1.0.0", "90s");
    let d = json(&out);
    assert_eq!(d["replicas"][0]["state"], "running", "{d}");
    let logs = f.logs_saying("pod", "from the hub");
    // `yes`: /etc/macula-image, which only the image holds.
    assert!(logs.contains("yes"), "{logs}");
    let (_, out, _) = f.node(&["workloads", "pod"]);
    assert!(out.contains("podman"), "{out}");
}

/// Revocation spreads: on `macula up --nodes 3`, a package's 3 replicas run on the three nodes;
/// its version is revoked at the Hub; every node flags its replica in `macula status` (nodes 2
/// and 3 learn it from the mesh's change notice, well before their periodic check), and new
/// deployments of it are refused.
#[test]
fn a_revocation_reaches_every_node_and_flags_its_replicas() {
    let f = Fixture::new(&["--nodes", "3"]);
    f.publish(
        &MANIFEST.replace("  name: hello\n", "  name: hello\n  replicas: 3\n"),
        "#!/bin/sh\nexec sleep 300\n",
    );
    let run = |args: &[&str]| f.node(args);
    let (ok, out, err) = run(&[
        "deploy",
        "--package",
        "acme/hello@1.0.0",
        "--timeout",
        "90s",
    ]);
    assert!(ok, "deploy: {err}");
    let d = json(&out);
    let nodes = running_nodes(&d);
    assert_eq!(nodes.len(), 3, "one replica on each node: {d}");

    f.hub(&[
        "hub",
        "revoke",
        "acme/hello@1.0.0",
        "--reason",
        "CVE-2026-0001",
    ]);
    let t = std::time::Instant::now();
    let flagged = loop {
        let (_, out, _) = run(&["status"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let items: Vec<Value> = v["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["name"] == "hello")
            .flat_map(|w| w["items"].as_array().cloned().unwrap_or_default())
            .collect();
        let revoked = items
            .iter()
            .filter(|r| {
                r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("revoked: CVE-2026-0001"))
            })
            .count();
        if revoked == 3 {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "not every replica flagged: {items:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    eprintln!("revocation flagged on 3 nodes after {flagged:?}");
    let (ok, _, err) = run(&["deploy", "--package", "acme/hello@1.0.0"]);
    assert!(!ok && err.contains("revoked: CVE-2026-0001"), "{err}");
}

/// The pipeline's last step: each release is smoke-tested on the mesh (installed, upgraded,
/// rolled back, healthy each time). With a vulnerability database and nothing found it is
/// Verified; a package whose program dies is not, and says why.
#[test]
fn the_smoke_test_promotes_a_healthy_package_to_verified() {
    let osv = tempfile::tempdir().unwrap();
    std::fs::write(
        osv.path().join("GHSA-0000-0000-0000.json"),
        r#"{"id": "GHSA-0000-0000-0000", "summary": "not about this package",
            "affected": [{"package": {"ecosystem": "npm", "name": "left-pad"}, "versions": ["1.0.0"]}]}"#,
    )
    .unwrap();
    let f = Fixture::with(
        &[],
        &format!(
            "  operators: [ops@example.com]\n  hub:\n    osv: {}\n",
            osv.path().display()
        ),
    );
    f.publish(MANIFEST, "#!/bin/sh\nexec sleep 300\n");
    let dying = MANIFEST
        .replace("name: acme/hello", "name: acme/dies")
        .replace("  name: hello\n", "  name: dies\n");
    f.publish(&dying, "#!/bin/sh\nexit 3\n");
    let info = |pkg: &str| json(&f.hub(&["--json", "hub", "info", pkg]));
    let settled = |pkg: &str| {
        let t = std::time::Instant::now();
        loop {
            let v = info(pkg);
            if v["releases"][0]["smoke"]["passed"].is_boolean() {
                return v["releases"][0].clone();
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(240),
                "no smoke result for {pkg}: {v}"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    };
    let ok = settled("acme/hello");
    assert_eq!(ok["smoke"]["passed"], true, "{ok}");
    let steps: Vec<&str> = ok["smoke"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["install", "upgrade", "rollback"]);
    assert_eq!(ok["scan"]["findings"].as_array().map(Vec::len), Some(0));
    assert_eq!(ok["tier"], "verified");
    // The results are in the Hub's signed status (a TUF target every node verifies).
    // (Written just after the result is recorded: looked for until it is there.)
    let status_dir = f._home.path().join("hub/repo/targets/hub");
    let signed = |want: &dyn Fn(&Value) -> bool| {
        let t = std::time::Instant::now();
        loop {
            let status = std::fs::read_dir(&status_dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".status.json"))
                .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
                .max()
                .and_then(|(_, p)| {
                    serde_json::from_str::<Value>(&std::fs::read_to_string(p).ok()?).ok()
                })
                .unwrap_or(Value::Null);
            if want(&status) {
                return;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "not in the signed status: {status}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    signed(&|s: &Value| {
        let e = &s["releases"]["acme/hello@1.0.0"];
        e["tier"] == "verified" && e["smoke"] == true && e["scan"]["database"] == true
    });
    let bad = settled("acme/dies");
    assert_eq!(bad["smoke"]["passed"], false, "{bad}");
    assert_eq!(bad["tier"], "community");
    assert!(
        bad["smoke"]["steps"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("restarted") || d.contains("failed")),
        "{bad}"
    );
    let search = f.hub(&["hub", "search"]);
    assert!(search.contains("verified"), "{search}");

    // Certified: an operator's review of a Verified release; nobody else's, nothing less.
    let note = ["--note", "support: 24/7; SLO 99.9%"];
    let (ok, _, err) = cli_run(
        f.acme.path(),
        &f.http,
        &[&["hub", "certify", "acme/hello@1.0.0"][..], &note[..]].concat(),
        None,
    );
    assert!(!ok && err.contains("operator"), "{err}");
    let ops = account(&f.http, &f._home.path().join("mail"), "ops@example.com");
    let (ok, _, err) = cli_run(
        ops.path(),
        &f.http,
        &[&["hub", "certify", "acme/dies@1.0.0"][..], &note[..]].concat(),
        None,
    );
    assert!(!ok && err.contains("only a Verified release"), "{err}");
    // Paid: only once its publisher asked (declaring support and an SLO, accepting the fee).
    let (ok, _, err) = cli_run(
        ops.path(),
        &f.http,
        &[&["hub", "certify", "acme/hello@1.0.0"][..], &note[..]].concat(),
        None,
    );
    assert!(
        !ok && err.contains("has not asked for certification"),
        "{err}"
    );
    let declare = ["--declare", "support@acme.com 24x7; SLO 99.9% monthly"];
    let (ok, _, err) = cli_run(
        ops.path(),
        &f.http,
        &[
            &["hub", "request-certification", "acme/hello@1.0.0"][..],
            &declare[..],
        ]
        .concat(),
        None,
    );
    assert!(
        !ok && err.contains("only the owner of publisher acme"),
        "{err}"
    );
    let (ok, _, err) = cli_run(
        f.acme.path(),
        &f.http,
        &[
            &["hub", "request-certification", "acme/dies@1.0.0"][..],
            &declare[..],
        ]
        .concat(),
        None,
    );
    assert!(!ok && err.contains("for Verified releases"), "{err}");
    let asked = f.hub(
        &[
            &["hub", "request-certification", "acme/hello@1.0.0"][..],
            &declare[..],
        ]
        .concat(),
    );
    assert!(asked.contains("the fee of $500.00"), "{asked}");
    let c = json(&cli(
        ops.path(),
        &f.http,
        &[
            &["--json", "hub", "certify", "acme/hello@1.0.0"][..],
            &note[..],
        ]
        .concat(),
        None,
    ));
    assert_eq!(c["tier"], "certified", "{c}");
    assert_eq!(c["certification"]["certified_by"], "ops@example.com", "{c}");
    let shown = f.hub(&["hub", "info", "acme/hello"]);
    assert!(shown.contains("SLO 99.9% monthly"), "{shown}");
    // The fee is on the publisher's invoice (not the operator's).
    let inv = json(&f.hub(&["--json", "invoices", "show", "current"]));
    let fee = inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "hub_certification_fee")
        .cloned()
        .unwrap_or_else(|| panic!("no certification fee on {inv}"));
    assert_eq!(
        (fee["amount_cents"].as_i64(), fee["realm"].as_str()),
        (Some(50_000), Some("acme/hello@1.0.0")),
        "{inv}"
    );
    // Tested again on its owner's word (scan and smoke test): pending, then passed again,
    // and a certification stands while it stays healthy.
    let (ok, _, err) = cli_run(
        ops.path(),
        &f.http,
        &["hub", "retest", "acme/nonexistent@1.0.0"],
        None,
    );
    assert!(!ok && err.contains("no release"), "{err}");
    let again = json(&f.hub(&["--json", "hub", "retest", "acme/hello@1.0.0"]));
    assert_eq!(again["smoke"]["pending"], true, "{again}");
    let settled_again = settled("acme/hello");
    assert_eq!(settled_again["smoke"]["passed"], true, "{settled_again}");
    assert_eq!(settled_again["tier"], "certified", "{settled_again}");
    // Certified once: asking again is refused.
    let (ok, _, err) = cli_run(
        f.acme.path(),
        &f.http,
        &[
            &["hub", "request-certification", "acme/hello@1.0.0"][..],
            &declare[..],
        ]
        .concat(),
        None,
    );
    assert!(!ok && err.contains("certified already"), "{err}");
}

/// An offline bundle: exported from a Hub, imported on one node of a mesh that cannot reach it
/// (two nodes of their own, no Hub; only the first Hub's root of trust), where the package is
/// installed and runs on both nodes (the second takes the verified repository and the files
/// from the first). A tampered byte anywhere is refused, naming the entry. The bundle
/// carries the Hub's vulnerability records for the ecosystems its SBOMs name, signed: the site
/// scans the package offline.
#[test]
fn a_bundle_installs_and_runs_on_an_isolated_site() {
    let osv = tempfile::tempdir().unwrap();
    std::fs::write(
        osv.path().join("GHSA-1111-2222-3333.json"),
        r#"{"id": "GHSA-1111-2222-3333", "summary": "left-pad pads wrong",
            "affected": [{"package": {"ecosystem": "npm", "name": "left-pad"},
                          "ranges": [{"type": "SEMVER", "events": [{"introduced": "0"}, {"fixed": "1.0.1"}]}]}]}"#,
    )
    .unwrap();
    std::fs::write(
        osv.path().join("RUSTSEC-0000-0001.json"),
        r#"{"id": "RUSTSEC-0000-0001", "summary": "another ecosystem: not in the bundle",
            "affected": [{"package": {"ecosystem": "crates.io", "name": "serde"}, "versions": ["1.0.0"]}]}"#,
    )
    .unwrap();
    let f = Fixture::with(&[], &format!("  hub:\n    osv: {}\n", osv.path().display()));
    let body = "#!/bin/sh\necho offline\nexec sleep 300\n";
    let sbom = format!(
        r#"{{"bomFormat": "CycloneDX", "specVersion": "1.5", "components": [
            {{"type": "file", "name": "bin/hello", "hashes": [{{"alg": "SHA-256", "content": "{}"}}]}},
            {{"type": "library", "name": "left-pad", "version": "1.0.0", "purl": "pkg:npm/left-pad@1.0.0"}}]}}"#,
        macula_hub::Digest::of(body.as_bytes()).hex()
    );
    f.publish_with(
        &MANIFEST.replace("  name: hello\n", "  name: hello\n  replicas: 2\n"),
        body,
        &[("sbom.spdx.json", sbom.clone())],
    );
    let work = tempfile::tempdir().unwrap();
    let bmz = work.path().join("hello.bmz");
    let out = json(&f.hub(&[
        "--json",
        "hub",
        "bundle",
        "export",
        "acme/hello@1.0.0",
        "--out",
        bmz.to_str().unwrap(),
    ]));
    assert_eq!(
        out["bundle"]["packages"][0]["target"], "acme/hello@1.0.0",
        "{out}"
    );
    // The records of npm (the SBOM's only ecosystem), not of crates.io.
    assert_eq!(
        out["bundle"]["osv"]["ecosystems"],
        serde_json::json!(["npm"]),
        "{out}"
    );
    assert_eq!(out["bundle"]["osv"]["records"], 1, "{out}");
    // Another bundle, after another release (a newer snapshot): its vulnerability data is
    // signed for that bundle only.
    f.publish_with(
        &MANIFEST.replace("version: 1.0.0", "version: 1.0.1"),
        body,
        &[("sbom.spdx.json", sbom)],
    );
    let bmz2 = work.path().join("hello2.bmz");
    f.hub(&[
        "hub",
        "bundle",
        "export",
        "acme/hello@1.0.1",
        "--out",
        bmz2.to_str().unwrap(),
    ]);

    // A newer vulnerability record dropped into the Hub's database: a retest scans with it
    // (the database is read again when its source changed), no restart.
    std::fs::write(
        osv.path().join("GHSA-4444-5555-6666.json"),
        r#"{"id": "GHSA-4444-5555-6666", "summary": "left-pad 1.0.0 again",
            "affected": [{"package": {"ecosystem": "npm", "name": "left-pad"}, "versions": ["1.0.0"]}]}"#,
    )
    .unwrap();
    let t = std::time::Instant::now();
    let again = loop {
        let (ok, out, err) = cli_run(
            f.acme.path(),
            &f.http,
            &["--json", "hub", "retest", "acme/hello@1.0.0"],
            None,
        );
        if ok {
            break json(&out);
        }
        // The release's first smoke test may still run.
        assert!(
            err.contains("being tested") && t.elapsed() < std::time::Duration::from_secs(240),
            "{err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    let ids: Vec<&str> = again["scan"]["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"GHSA-1111-2222-3333") && ids.contains(&"GHSA-4444-5555-6666"),
        "{again}"
    );

    // The site: its own `macula up` (another trust root, another mesh), no Hub, only the first
    // Hub's root of trust.
    let site = tempfile::tempdir().unwrap();
    std::fs::write(
        site.path().join("node.yaml"),
        "registry:\n  hub:\n    enabled: false\n",
    )
    .unwrap();
    std::fs::write(
        site.path().join("hub-root.json"),
        f.hub(&["--json", "hub", "trust"]),
    )
    .unwrap();
    let (_site_up, banner): (Up, Value) = macula_up::up(site.path(), &["--nodes", "2"]);
    let s = |k: &str| banner[k].as_str().unwrap().to_owned();
    let (ws, realm, rkey) = (s("ws"), s("realm"), s("key"));
    let cfg = tempfile::tempdir().unwrap();
    let site_cli = |args: &[&str]| cli_run(cfg.path(), "http://127.0.0.1:1", args, None);

    // Tampered copies are refused, naming what failed; nothing becomes installable.
    let bytes = std::fs::read(&bmz).unwrap();
    let flip = |needle: &[u8]| {
        let mut b = bytes.clone();
        let at = b
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("the bytes to flip");
        b[at] ^= 1;
        let p = work.path().join(format!("tampered-{at}.bmz"));
        std::fs::write(&p, b).unwrap();
        p
    };
    let home = site.path().to_str().unwrap();
    for (needle, names) in [
        (&b"echo offline"[..], "blobs/sha256/"),
        (&b"\"_type\": \"timestamp\""[..], "repo/metadata"),
    ] {
        let bad = flip(needle);
        let (ok, _, err) = site_cli(&[
            "hub",
            "bundle",
            "import",
            bad.to_str().unwrap(),
            "--home",
            home,
        ]);
        assert!(
            !ok && err.contains("refused") && err.contains(names),
            "{needle:?}: {err}"
        );
        eprintln!("tampered: {}", err.trim());
    }
    // The same attacks with the archive rebuilt (its checksums right): the bundle's own
    // verification refuses them.
    let (manifest, entries) = macula_hub::bundle::read_all(&bmz, 1 << 30).unwrap();
    let rebuilt = |edit: &dyn Fn(&str, &mut Vec<u8>)| {
        let files = entries.iter().map(|(n, b)| {
            let mut b = b.clone();
            edit(n, &mut b);
            (n.clone(), macula_hub::bundle::Source::Bytes(b))
        });
        let p = work.path().join(format!("rebuilt-{}.bmz", files.len()));
        let f = std::fs::File::create(&p).unwrap();
        macula_hub::bundle::write(f, &manifest, files).unwrap();
        p
    };
    let swap = |only: &'static str, at: &[u8], with: &[u8]| {
        let (at, with) = (at.to_vec(), with.to_vec());
        move |name: &str, b: &mut Vec<u8>| {
            if !name.contains(only) {
                return;
            }
            if let Some(i) = b.windows(at.len()).position(|w| w == at) {
                b.splice(i..i + at.len(), with.iter().copied());
            }
        }
    };
    for (edit, names) in [
        (
            swap("blobs/", b"echo offline", b"echo pwned!!"),
            "blobs/sha256/",
        ),
        // The vulnerability data edited (a finding hidden): its signed digest does not match.
        (
            swap(
                "osv/osv.json",
                b"\"fixed\":\"1.0.1\"",
                b"\"fixed\":\"0.0.1\"",
            ),
            "osv/osv.json",
        ),
        // Its signature made over other data: refused by the targets key's check.
        (
            swap("osv/envelope.json", b"\"sig\":\"", b"\"sig\":\"A"),
            "osv/envelope.json",
        ),
        // A later expiry, the signature left as it was.
        (
            swap("timestamp.json", b"\"expires\": \"20", b"\"expires\": \"21"),
            "repo/metadata",
        ),
    ] {
        let bad = rebuilt(&edit);
        let (ok, _, err) = site_cli(&[
            "hub",
            "bundle",
            "import",
            bad.to_str().unwrap(),
            "--home",
            home,
        ]);
        assert!(!ok && err.contains(names), "{err}");
        eprintln!("rebuilt: {}", err.trim());
        std::fs::remove_file(&bad).unwrap();
    }
    // The vulnerability data stripped (both entries, and bundle.json's mention of it): the
    // bundle's signed timestamp still names it.
    let stripped = work.path().join("stripped.bmz");
    let mut bare = manifest.clone();
    bare.osv = None;
    macula_hub::bundle::write(
        std::fs::File::create(&stripped).unwrap(),
        &bare,
        entries
            .iter()
            .filter(|(n, _)| !n.starts_with("osv/"))
            .map(|(n, b)| (n.clone(), macula_hub::bundle::Source::Bytes(b.clone()))),
    )
    .unwrap();
    let (ok, _, err) = site_cli(&[
        "hub",
        "bundle",
        "import",
        stripped.to_str().unwrap(),
        "--home",
        home,
    ]);
    assert!(
        !ok && err.contains("osv/osv.json") && err.contains("signed timestamp"),
        "{err}"
    );
    // The vulnerability data of the other bundle (validly signed, for another snapshot).
    let (_, other) = macula_hub::bundle::read_all(&bmz2, 1 << 30).unwrap();
    let bad = rebuilt(&|name: &str, b: &mut Vec<u8>| {
        if name.starts_with("osv/") {
            if let Some((_, theirs)) = other.iter().find(|(n, _)| n == name) {
                *b = theirs.clone();
            }
        }
    });
    let (ok, _, err) = site_cli(&[
        "hub",
        "bundle",
        "import",
        bad.to_str().unwrap(),
        "--home",
        home,
    ]);
    assert!(
        !ok && err.contains("osv/envelope.json") && err.contains("snapshot version"),
        "{err}"
    );
    assert!(!site.path().join("nodes/1/workloads/packages/repo").exists());

    // Verified offline without installing anything.
    let root = site.path().join("hub-root.json");
    let (ok, out, err) = site_cli(&[
        "hub",
        "verify",
        bmz.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("acme/hello@1.0.0"), "verify: {err}");
    assert!(
        out.contains("GHSA-1111-2222-3333 in left-pad 1.0.0 (fixed in 1.0.1)"),
        "the offline scan: {out}"
    );
    // Imported on node 1 only: node 2 gets the verified repository and the files from it.
    let node1 = site.path().join("nodes/1/workloads/packages");
    let node2 = site.path().join("nodes/2/workloads/packages");
    let (ok, out, err) = site_cli(&[
        "--json",
        "hub",
        "bundle",
        "import",
        bmz.to_str().unwrap(),
        "--into",
        node1.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(ok, "import: {err}");
    assert_eq!(json(&out).as_array().map(Vec::len), Some(1), "{out}");
    assert!(!node2.join("repo").exists());
    let (ok, out, err) = site_cli(&[
        "--json",
        "deploy",
        "--package",
        "acme/hello@1.0.0",
        "--bundle",
        bmz.to_str().unwrap(),
        "--timeout",
        "60s",
        "--url",
        &ws,
        "--realm",
        &realm,
        "--key",
        &rkey,
    ]);
    assert!(ok, "deploy from the bundle: {err}");
    let d = json(&out);
    let nodes = running_nodes(&d);
    assert_eq!(nodes.len(), 2, "running on both nodes of the site: {d}");
    assert!(
        !node2.join("repo").exists() && node2.join("installed").is_dir(),
        "node 2 installed from its peer, with no bundle of its own"
    );
}

/// Packages travel between nodes: on `macula up --nodes 3`, one replica installs the package
/// from the Hub; then the Hub serves nothing (its repository and the artifact's file gone), and
/// the package is scaled to three replicas — the other nodes get the TUF metadata and the file
/// from the node that has them (verified as if from the Hub), and run.
#[test]
fn nodes_install_files_from_their_peers() {
    let f = Fixture::new(&["--nodes", "3"]);
    let body = "#!/bin/sh\necho from a peer\nexec sleep 300\n";
    f.publish(MANIFEST, body);
    let out = f.deploy("acme/hello@1.0.0", "60s");
    assert_eq!(running_nodes(&json(&out)).len(), 1);
    // The Hub serves nothing any more: neither the program's file nor its TUF repository.
    let hex = macula_hub::Digest::of(body.as_bytes()).hex();
    let at_hub = f._home.path().join("hub/blobs/sha256").join(&hex);
    std::fs::remove_file(&at_hub).expect("the Hub's copy of the program");
    let repo = f._home.path().join("hub/repo");
    std::fs::rename(&repo, repo.with_extension("gone")).expect("the Hub's repository");
    let (ok, _, _) = f.node(&["deploy", "--package", "acme/hello@1.0.0"]);
    assert!(!ok, "the Hub cannot resolve packages now");
    let (ok, _, err) = f.node(&["scale", "hello", "--replicas", "3"]);
    assert!(ok, "scale: {err}");
    let t = std::time::Instant::now();
    loop {
        let (_, out, _) = f.node(&["status"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let running: std::collections::BTreeSet<String> = v["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["name"] == "hello")
            .flat_map(|w| w["items"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["state"] == "running")
            .filter_map(|r| r["node"].as_str().map(str::to_owned))
            .collect();
        if running.len() == 3 {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "not running on three nodes: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
