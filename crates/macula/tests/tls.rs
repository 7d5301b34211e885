//! TLS from the user's side (isolation finding 11), against `macula up`: it serves TLS with a
//! self-signed certificate whose fingerprint it prints; the SDK and the CLI verify it with `--ca`
//! (WebSocket, RawSocket and the registry's REST API), refuse it without, remember the CA given
//! at login, and refuse to send credentials over plain http:// to another machine.

mod macula_up;

use std::time::Duration;

use futures_util::StreamExt;
use macula_client::{Client, ConnectOptions, Payload};
use macula_up::{cli_as, cli_run};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::Digest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macula_up_serves_tls_that_clients_verify() {
    let home = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let (_up, v) = macula_up::up(home.path(), &[]);
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {v}"))
            .to_owned()
    };
    let (realm, key, ca) = (s("realm"), s("key"), s("ca"));

    // The fingerprint printed is the certificate's.
    let der = CertificateDer::from_pem_file(&ca).unwrap();
    let hex: Vec<String> = sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    assert_eq!(s("fingerprint"), hex.join(":"));

    // The SDK over wss:// and rss://, verifying the certificate against it.
    let connect = |url: String| {
        let (realm, key, ca) = (realm.clone(), key.clone(), ca.clone());
        async move {
            let mut o = ConnectOptions::new(&url, &realm, &key)
                .with_ca_file(&ca)
                .unwrap();
            o.reconnect = false;
            Client::connect_with(o).await
        }
    };
    let sub = connect(s("wss")).await.expect("wss:// with --ca");
    let topic = format!("{realm}.tls");
    let mut events = sub.subscribe(&topic).await.unwrap();
    let publisher = connect(s("rss")).await.expect("rss:// with --ca");
    publisher
        .publish_with(
            &topic,
            Payload::default(),
            [("acknowledge".to_owned(), true.into())]
                .into_iter()
                .collect(),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the event crossed TLS")
        .unwrap();

    // The CLI: with --ca it publishes over wss://; without, it refuses the certificate and says
    // what to do.
    let c = cfg.path();
    let https = s("https");
    let home_s = home.path().to_str().unwrap();
    let wss = s("wss");
    let base = ["--home", home_s, "--url", &wss];
    let mut args = vec!["pub"];
    args.extend_from_slice(&base);
    args.extend_from_slice(&["--ca", &ca, &topic, "1"]);
    cli_as(c, &https, &args, None);
    let mut args = vec!["pub"];
    args.extend_from_slice(&base);
    args.extend_from_slice(&[&topic, "1"]);
    let (ok, _, err) = cli_run(c, &https, &args, None);
    assert!(
        !ok && err.contains("certificate") && err.contains("--ca"),
        "{err}"
    );

    // The registry over https://: sign up and log in with --ca; later commands reuse it.
    let pw = Some("correct horse battery\n");
    let (ok, _, err) = cli_run(c, &https, &["plans"], None);
    assert!(
        !ok && err.contains("certificate") && err.contains("--ca"),
        "{err}"
    );
    cli_as(
        c,
        &https,
        &[
            "signup",
            "--email",
            "tls@example.com",
            "--password-stdin",
            "--ca",
            &ca,
        ],
        pw,
    );
    cli_as(
        c,
        &https,
        &[
            "login",
            "--email",
            "tls@example.com",
            "--password-stdin",
            "--ca",
            &ca,
        ],
        pw,
    );
    cli_as(c, &https, &["realms", "create", "com.tls.app"], None);
    let listed = cli_as(c, &https, &["realms", "list"], None);
    assert!(listed.contains("com.tls.app"), "{listed}");

    // Plain http:// to another machine is refused before anything is sent.
    let (ok, _, err) = cli_run(
        c,
        "http://192.0.2.1:8080",
        &["login", "--email", "tls@example.com", "--password-stdin"],
        pw,
    );
    assert!(!ok && err.contains("refusing plain http://"), "{err}");
}
