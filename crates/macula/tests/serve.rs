//! `macula serve`: a handler that exits without reading its input (`date`, `hostname`) leaves
//! the server running and answering.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod macula_up;
use macula_up::BIN;

#[test]
fn a_handler_that_ignores_its_input_does_not_kill_the_server() {
    let home = tempfile::tempdir().unwrap();
    let (_up, v) = macula_up::up(home.path(), &[]);
    let (ws, key, realm) = (
        v["ws"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
        v["realm"].as_str().unwrap().to_owned(),
    );
    let procedure = format!("{realm}.now");
    let cli = |args: &[&str], command: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .args(["--url", &ws, "--key", &key, "--realm", &realm])
            .args(command)
            .env("MACULA_HOME", "/nonexistent");
        c
    };
    let mut server = cli(&["serve", &procedure], &["--", "date", "-u"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // More input than a pipe holds: the write to the handler's stdin fails once it exited.
    let big = format!(r#"["{}"]"#, "x".repeat(100 << 10));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = 0;
    while answered < 5 {
        assert!(Instant::now() < deadline, "only {answered} calls answered");
        let out = cli(&["call", &procedure, &big], &[]).output().unwrap();
        if out.status.success() {
            answered += 1;
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("UTC"),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        } else {
            // Not registered yet.
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("no_such_procedure"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server died: {:?}",
            server
                .wait_with_output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}
