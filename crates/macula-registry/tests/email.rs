//! Email ownership (isolation finding 6), with mail sent by the registry's SMTP client (lettre)
//! to an SMTP server this test starts: an invitation to an address, operator status configured
//! for one, and a realm delegated to one apply only to the account that proved it receives mail
//! there; a change of address waits for the new one to be proven; a squatter that never
//! verified cannot keep the address from its owner.

mod common;

use std::time::Duration;

use common::{code_in, login, req, serve, unverified_account};
use macula_registry::mail::MailConfig;
use macula_registry::RegistryConfig;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// One message as the SMTP server received it: (envelope recipients, data).
type Received = (Vec<String>, String);

/// A minimal SMTP server (RFC 5321 without extensions) on loopback: it accepts every message
/// and hands it to the test. Returns its port.
async fn smtp_sink() -> (u16, mpsc::UnboundedReceiver<Received>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let _ = w.write_all(b"220 sink ESMTP\r\n").await;
                let mut rcpt = vec![];
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.trim_end().to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("HELO") || cmd.starts_with("MAIL FROM") {
                        b"250 OK\r\n"
                    } else if cmd.starts_with("RCPT TO") {
                        let addr = line.trim_end()[8..]
                            .trim()
                            .trim_start_matches('<')
                            .trim_end_matches('>')
                            .to_owned();
                        rcpt.push(addr);
                        b"250 OK\r\n"
                    } else if cmd == "DATA" {
                        let _ = w.write_all(b"354 go on\r\n").await;
                        let mut data = String::new();
                        loop {
                            line.clear();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == ".\r\n" {
                                break;
                            }
                            data.push_str(&line);
                        }
                        let _ = tx.send((std::mem::take(&mut rcpt), data));
                        b"250 queued\r\n"
                    } else if cmd == "QUIT" {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else if cmd == "RSET" || cmd == "NOOP" {
                        b"250 OK\r\n"
                    } else {
                        b"502 not implemented\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// The code in the next message, which must be addressed to `to`.
async fn code_for(inbox: &mut mpsc::UnboundedReceiver<Received>, to: &str) -> String {
    let (rcpt, data) = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .expect("a mail arrives")
        .expect("the sink runs");
    assert_eq!(rcpt, [to], "{data}");
    assert!(
        data.contains("Subject: Verify your email address"),
        "{data}"
    );
    // Quoted-printable may wrap long lines with a soft break ("=\r\n").
    code_in(&data.replace("=\r\n", "")).expect("a code in the mail")
}

async fn verify(base: &str, code: &str) -> (u16, serde_json::Value) {
    req(
        base,
        "POST",
        "/v1/account/verify",
        None,
        Some(json!({"code": code})),
    )
    .await
}

async fn status(base: &str, token: &str, path: &str) -> u16 {
    req(base, "GET", path, Some(token), None).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_proven_address_receives_what_is_sent_to_it() {
    let (port, mut inbox) = smtp_sink().await;
    let tmp = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        operators: vec!["ops@x.example".into()],
        mail: MailConfig {
            url: format!("smtp://127.0.0.1:{port}"),
            from: "Macula <noreply@x.example>".into(),
        },
        ..RegistryConfig::default()
    };
    let srv = serve(&common::sqlite_url(tmp.path()), tmp.path(), config).await;
    let b = srv.base.as_str();

    // Alice verifies her address from the mail, registers a realm and invites dev@x.example.
    let alice = unverified_account(b, "alice@x.example").await;
    let code = code_for(&mut inbox, "alice@x.example").await;
    assert_eq!(verify(b, &code).await.0, 200);
    common::register(b, &alice, "com.acme").await;
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/members",
        Some(&alice),
        Some(json!({"email": "dev@x.example", "role": "admin"})),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {v}");

    // Mallory signs up first with the invited address and the operator's: the codes go to
    // those mailboxes, not to her, and she gets neither the membership nor operator rights.
    let squatter = unverified_account(b, "dev@x.example").await;
    let dev_code = code_for(&mut inbox, "dev@x.example").await;
    assert_eq!(status(b, &squatter, "/v1/realms/com.acme").await, 403);
    let (_, mine) = req(b, "GET", "/v1/realms", Some(&squatter), None).await;
    assert!(!mine.to_string().contains("com.acme"), "{mine}");
    let fake_ops = unverified_account(b, "ops@x.example").await;
    let ops_code = code_for(&mut inbox, "ops@x.example").await;
    let (_, who) = req(b, "GET", "/v1/account", Some(&fake_ops), None).await;
    assert_eq!(
        (who["operator"].as_bool(), who["email_verified"].as_bool()),
        (Some(false), Some(false))
    );
    assert_eq!(status(b, &fake_ops, "/v1/realms/com.acme").await, 403);
    // Nor can a realm be delegated to an unproven address.
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&alice),
        Some(json!({"name": "com.acme.shop", "owner_email": "dev@x.example"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("email_unverified")),
        "{v}"
    );
    // Codes are single-use, and a made-up one is refused.
    assert_eq!(verify(b, "ev_0000").await.0, 422);
    // The squatter cannot ask for codes in a loop.
    let (s, v) = req(b, "POST", "/v1/account/verification", Some(&squatter), None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("too_soon")),
        "{v}"
    );

    // Whoever reads ops@x.example's mail proves it: operator rights follow.
    assert_eq!(verify(b, &ops_code).await.0, 200);
    let (_, who) = req(b, "GET", "/v1/account", Some(&fake_ops), None).await;
    assert_eq!(who["operator"].as_bool(), Some(true), "{who}");
    assert_eq!(verify(b, &ops_code).await.0, 422, "a code works once");

    // An unverified squatter past the code's lifetime, owning nothing, loses the address to a
    // new signup (here its age is set back rather than waited for).
    sqlx::query(
        "UPDATE accounts SET email_since = email_since - 2 * 86400 WHERE email = 'dev@x.example'",
    )
    .execute(&srv.reg.db.pool)
    .await
    .unwrap();
    let dev = unverified_account(b, "dev@x.example").await;
    let (_, who) = req(b, "GET", "/v1/account", Some(&squatter), None).await;
    assert!(
        who["email"].as_str().unwrap().starts_with("released+"),
        "the squatter's account no longer holds the address: {who}"
    );
    assert_eq!(
        verify(b, &dev_code).await.0,
        422,
        "codes of the removed account are void"
    );
    let code = code_for(&mut inbox, "dev@x.example").await;
    assert_eq!(status(b, &dev, "/v1/realms/com.acme").await, 403);
    assert_eq!(verify(b, &code).await.0, 200);
    // The session sees the verified address within the session cache's lifetime.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status(b, &dev, "/v1/realms/com.acme").await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the invitation never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A change of address: needs the password; nothing changes until the new address is
    // proven; then the invitation to the old address no longer applies.
    let (s, _) = req(
        b,
        "PUT",
        "/v1/account/email",
        Some(&dev),
        Some(json!({"email": "dev@y.example", "password": "wrong password!"})),
    )
    .await;
    assert_eq!(s, 401);
    // (One code a minute: let the earlier one age.)
    sqlx::query("UPDATE email_tokens SET created_at = created_at - 120")
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    let (s, v) = req(
        b,
        "PUT",
        "/v1/account/email",
        Some(&dev),
        Some(json!({"email": "dev@y.example", "password": "correct horse battery"})),
    )
    .await;
    assert_eq!(
        (s, v["pending_email"].as_str()),
        (202, Some("dev@y.example")),
        "{v}"
    );
    let code = code_for(&mut inbox, "dev@y.example").await;
    let (_, who) = req(b, "GET", "/v1/account", Some(&dev), None).await;
    assert_eq!(who["email"].as_str(), Some("dev@x.example"));
    assert_eq!(verify(b, &code).await.0, 200);
    let dev = login(b, "dev@y.example").await;
    let (_, who) = req(b, "GET", "/v1/account", Some(&dev), None).await;
    assert_eq!(
        (who["email"].as_str(), who["email_verified"].as_bool()),
        (Some("dev@y.example"), Some(true))
    );
    assert_eq!(status(b, &dev, "/v1/realms/com.acme").await, 403);

    // The password check of a change of address is throttled like a login: a stolen session
    // token is no way to guess the password without limit.
    let change = |password: &'static str| {
        let alice = alice.clone();
        async move {
            req(
                b,
                "PUT",
                "/v1/account/email",
                Some(&alice),
                Some(json!({"email": "alice@z.example", "password": password})),
            )
            .await
        }
    };
    for _ in 0..4 {
        assert_eq!(change("not the password").await.0, 401);
    }
    let (s, v) = change("not the password").await;
    assert_eq!(s, 429, "{v}");
    let (s, v) = change("correct horse battery").await;
    assert_eq!(s, 429, "locked, even with the right password: {v}");
}
