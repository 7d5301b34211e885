//! Helpers shared by the tests that drive `macula up` and the registry CLI.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_macula");

/// A `macula up` process, killed on drop.
pub struct Up(pub Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `macula --json up` on free ports (`extra` arguments appended); its process and JSON banner.
pub fn up(home: &Path, extra: &[&str]) -> (Up, serde_json::Value) {
    let mut child = Command::new(BIN)
        .args(["--json", "up", "--home"])
        .arg(home)
        .args([
            "--http",
            "127.0.0.1:0",
            "--rawsocket",
            "127.0.0.1:0",
            "--mesh-port",
            "0",
        ])
        .args(extra)
        .env("MACULA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("macula up printed its addresses");
    let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    (Up(child), v)
}

/// Runs the CLI against the registry at `server` with its own config home (`XDG_CONFIG_HOME`);
/// panics with stderr on failure.
pub fn cli_as(cfg: &Path, server: &str, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out, err) = cli_run(cfg, server, args, stdin);
    assert!(ok, "macula {args:?} failed: {err}");
    out
}

/// [`cli_as`] that returns (success, stdout, stderr) instead of panicking.
pub fn cli_run(
    cfg: &Path,
    server: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("XDG_CONFIG_HOME", cfg)
        .env("MACULA_SERVER", server)
        .env_remove("MACULA_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The verification code in the newest mail to `to` in the registry's mail directory.
pub fn mailed_code(dir: &Path, to: &str) -> String {
    let mut mails: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(&format!("-{to}.eml")))
        .collect();
    mails.sort();
    let text = std::fs::read_to_string(mails.last().expect("a mail")).unwrap();
    let text = text.replace("=\r\n", "");
    let at = text.find("ev_").expect("a code");
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}
