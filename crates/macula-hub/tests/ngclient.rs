//! The reference client reads the Hub: python-tuf's `ngclient` (PyPI `tuf`, pinned) refreshes
//! from a Hub repository served over HTTP — walking a root rotation and a publisher's
//! delegation — and downloads a package's index, byte for byte.
//!
//! Needs Python 3 with `venv` and PyPI; it creates its own virtual environment under the target
//! directory and says SKIPPED where it cannot (CI installs python3-venv first, so it runs there).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::pytuf::{ngclient, venv};
use macula_hub::tuf::{sign_publisher_role, Delegation, Key, Lifetimes, Online, Repo};
use macula_hub::Digest;
use serde_json::json;

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
    let got =
        ngclient(&py, tmp.path(), &server.url, &root1, &name).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got["sha256"], Digest::of(&index).hex(), "{got}");
    assert_eq!(got["length"], index.len());
    assert_eq!(got["root_version"], 2, "ngclient walked the rotation");
    assert_eq!(got["custom"]["version"], "1.0.0");
    assert_eq!(got["missing"], true);
}
