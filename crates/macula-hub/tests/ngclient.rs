//! The reference client reads the Hub: python-tuf's `ngclient` (PyPI `tuf`, pinned) refreshes
//! from a Hub repository served over HTTP — walking a root rotation and a publisher's
//! delegation — and downloads a package's index, byte for byte.
//!
//! Needs Python 3 with `venv` and PyPI; it creates its own virtual environment under the target
//! directory and says SKIPPED where it cannot (CI installs python3-venv first, so it runs there).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use macula_hub::tuf::{sign_publisher_role, Delegation, Key, Lifetimes, Online, Repo};
use macula_hub::Digest;
use serde_json::json;

const TUF_PIN: &str = "tuf==7.0.1";

/// A venv with python-tuf, made once per target directory; `None` (with the reason) if it
/// cannot be made here.
fn venv() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("venv-tuf-7.0.1");
    let py = dir.join("bin/python");
    if py.exists() {
        let ok = Command::new(&py)
            .args(["-c", "import tuf.ngclient"])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(py);
        }
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&made.stderr)
        ));
    }
    let pip = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            TUF_PIN,
        ])
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !pip.status.success() {
        return Err(format!(
            "pip install {TUF_PIN} failed: {}",
            String::from_utf8_lossy(&pip.stderr)
        ));
    }
    Ok(py)
}

/// Serves `dir` over HTTP on loopback; killed on drop.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Server {
    let mut child = Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "0",
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("first line");
    // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    let port = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .unwrap_or_else(|| panic!("no port in {line:?}"))
        .to_string();
    Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

const SCRIPT: &str = r#"
import hashlib, json, os, sys
from tuf.ngclient import Updater
md, td, url, root, name = sys.argv[1:6]
with open(root, "rb") as f:
    bootstrap = f.read()
u = Updater(metadata_dir=md, metadata_base_url=url + "/metadata/",
            target_base_url=url + "/targets/", target_dir=td, bootstrap=bootstrap)
u.refresh()
info = u.get_targetinfo(name)
if info is None:
    print(json.dumps({"error": "target not found"})); sys.exit(3)
path = u.download_target(info)
with open(path, "rb") as f:
    data = f.read()
with open(os.path.join(md, "root.json"), "rb") as f:
    root_version = json.load(f)["signed"]["version"]
print(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "length": len(data),
                  "custom": info.custom, "root_version": root_version,
                  "missing": u.get_targetinfo("acme/nothing@0.0.0") is None}))
"#;

#[tokio::test]
async fn python_tuf_ngclient_refreshes_and_downloads_from_the_hub() {
    let py = match venv() {
        Ok(py) => py,
        Err(why) => {
            eprintln!("SKIPPED python-tuf ngclient interop: {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("repo");
    let roots = [Key::generate(), Key::generate(), Key::generate()];
    let mut repo = Repo::create(
        &dir,
        &roots[..2],
        2,
        Online::generate(),
        Lifetimes::default(),
    )
    .await
    .expect("create");
    let root1 = tmp.path().join("1.root.json");
    std::fs::write(&root1, repo.root_file(1).expect("root")).expect("write");

    // Root rotates (new root keys and online keys) before the client first looks.
    let publics: Vec<_> = roots[1..].iter().map(Key::public).collect();
    repo.rotate_root(&publics, 2, Online::generate(), &roots[..2], &roots[1..])
        .await
        .expect("rotate");

    // A publisher's delegated role with one package index.
    let acme = Key::generate();
    let index = br#"{"kind":"macula-package-index/v1","name":"acme/pg"}"#.to_vec();
    let name = "acme/pg@1.0.0".to_string();
    let role = sign_publisher_role(
        "acme",
        None,
        &[(
            name.clone(),
            index.clone(),
            json!({"package": "acme/pg", "version": "1.0.0"}),
        )],
        &[],
        std::slice::from_ref(&acme),
        Duration::from_secs(30 * 86_400),
    )
    .await
    .expect("sign");
    let d = Delegation {
        keys: vec![acme.public()],
        threshold: 1,
    };
    repo.accept_role(
        "acme",
        &d,
        &role,
        &BTreeMap::from([(name.clone(), index.clone())]),
    )
    .await
    .expect("accept");

    let server = serve(&dir);
    let md = tmp.path().join("py-metadata");
    let td = tmp.path().join("py-targets");
    std::fs::create_dir_all(&md).expect("md");
    std::fs::create_dir_all(&td).expect("td");
    let out = Command::new(&py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&md)
        .arg(&td)
        .arg(&server.url)
        .arg(&root1)
        .arg(&name)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ngclient failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(got["sha256"], Digest::of(&index).hex(), "{got}");
    assert_eq!(got["length"], index.len());
    assert_eq!(got["root_version"], 2, "ngclient walked the rotation");
    assert_eq!(got["custom"]["version"], "1.0.0");
    assert_eq!(got["missing"], true);
}
