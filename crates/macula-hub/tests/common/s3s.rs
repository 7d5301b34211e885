//! A real S3 API server for the tests of the S3 blob store: `s3s-fs` (crates.io; `.ci/run`
//! installs it with `cargo install s3s-fs --features binary`), started on a free port of this
//! machine with keys of its own, serving a directory. Included by path from other crates' tests.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "macula-test-key";
pub const SECRET_KEY: &str = "macula-test-secret-0123456789";
pub const BUCKET: &str = "hub";

/// A running `s3s-fs`; stopped when dropped.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    /// The directory it serves: a bucket is a directory in it, an object a file.
    pub root: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// Where an object of `bucket` is kept on disk (to alter it behind the server's back).
    pub fn object_file(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }
}

fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        Some(home.join("bin/s3s-fs")).filter(|p| p.is_file())
    })
}

/// Starts `s3s-fs` with bucket [`BUCKET`] made; Err (the reason to print with SKIPPED) when
/// it is not installed here.
pub fn start() -> Result<S3Server, String> {
    let bin = binary().ok_or(
        "s3s-fs is not installed (cargo install s3s-fs@0.14.1 --features binary --locked; .ci/run does)",
    )?;
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(root.path().join(BUCKET)).map_err(|e| e.to_string())?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let mut server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        root,
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!("s3s-fs exited at start: {status}"));
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err("s3s-fs did not listen within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}
