//! python-tuf's `ngclient` (PyPI `tuf`, pinned) for the tests that check the reference client
//! reads a Hub: a venv made once per target directory, and the script that refreshes and
//! downloads. Included by path from other crates' tests too.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

const TUF_PIN: &str = "tuf==7.0.1";

/// A venv with python-tuf, made once per target directory; `None` (with the reason) if it
/// cannot be made here.
pub fn venv() -> Result<PathBuf, String> {
    let dir = target_tmp().join("venv-tuf-7.0.1");
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

fn target_tmp() -> PathBuf {
    // `CARGO_TARGET_TMPDIR` is the including crate's; every crate shares one venv.
    let t = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    t.parent().map(Path::to_path_buf).unwrap_or(t)
}

pub const SCRIPT: &str = r#"
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

/// Runs ngclient against the repository at `url` (its `metadata/` and `targets/`), trusting
/// `root`, downloading `target`; its JSON report (sha256, length, custom, root_version,
/// missing) or the failure.
pub fn ngclient(
    py: &Path,
    work: &Path,
    url: &str,
    root: &Path,
    target: &str,
) -> Result<serde_json::Value, String> {
    let md = work.join("py-metadata");
    let td = work.join("py-targets");
    std::fs::create_dir_all(&md).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&td).map_err(|e| e.to_string())?;
    let out = Command::new(py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&md)
        .arg(&td)
        .arg(url)
        .arg(root)
        .arg(target)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "ngclient failed:\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))
}
