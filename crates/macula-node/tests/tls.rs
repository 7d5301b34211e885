//! TLS on the client listeners (isolation finding 11), over real sockets: WebSocket and
//! RawSocket over TLS verified by the SDK against a private CA, clear text refused where the
//! policy says so (with an answer a browser or curl shows), a certificate renewed on disk used
//! without a restart, a silent TLS client cut off, and clear text on the network refused at start.

mod common;

use macula_node::Load;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use macula_client::{Client, ConnectOptions, Payload};
use macula_node::tls::Plaintext;
use tokio::io::AsyncReadExt;

/// A self-signed certificate for 127.0.0.1 and localhost, written as `<name>.pem` and
/// `<name>.key`; returns the certificate's path.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let pair = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .self_signed(&pair)
        .unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, pair.serialize_pem()).unwrap();
    (c, k)
}

fn opts(url: &str, key: &str, ca: &Path) -> ConnectOptions {
    let mut o = ConnectOptions::new(url, REALM, key)
        .with_ca_file(ca)
        .unwrap();
    o.reconnect = false;
    o
}

#[tokio::test]
async fn a_tls_only_node_serves_verified_tls_and_refuses_clear_text() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(certs.path(), "node");
    let (c2, k2) = (cert.clone(), key.clone());
    let t = TestNode::start_with(move |c| {
        c.tls.cert = c2;
        c.tls.key = k2;
        c.tls.plaintext = Plaintext::None;
        c.tls.reload_s = 1;
        c.limits.http_header_timeout_ms = 500;
    })
    .await;
    let wss = t.running.wss_url().expect("TLS is on");
    let rss = t.running.rss_url().expect("TLS is on");
    assert!(wss.starts_with("wss://") && rss.starts_with("rss://"));

    // Over TLS, both transports, certificate verified against the CA given: an event published
    // over RawSocket/TLS reaches a WebSocket/TLS subscriber.
    let sub = Client::connect_with(opts(&wss, &t.admin_key, &cert))
        .await
        .expect("wss:// with the node's CA");
    let mut events = sub.subscribe("com.example.test.tls").await.unwrap();
    let publisher = Client::connect_with(opts(&rss, &t.admin_key, &cert))
        .await
        .expect("rss:// with the node's CA");
    publisher
        .publish_with(
            "com.example.test.tls",
            Payload::default(),
            [("acknowledge".to_owned(), true.into())]
                .into_iter()
                .collect(),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the event arrived")
        .expect("the subscription is open");

    // Without the CA (public roots only) and with another CA, the certificate is refused.
    let mut public = ConnectOptions::new(&wss, REALM, &t.admin_key);
    public.reconnect = false;
    let e = Client::connect_with(public)
        .await
        .err()
        .expect("unknown issuer");
    assert!(e.to_string().contains("certificate"), "{e}");
    let (other, _) = certificate(certs.path(), "other");
    let e = Client::connect_with(opts(&wss, &t.admin_key, &other))
        .await
        .err()
        .expect("another CA");
    assert!(e.to_string().contains("certificate"), "{e}");

    // Clear text is refused on both listeners (plaintext: none), even from this machine; a
    // plain HTTP client is told why.
    let mut plain = ConnectOptions::new(&t.running.ws_url(), REALM, &t.admin_key);
    plain.reconnect = false;
    assert!(Client::connect_with(plain).await.is_err());
    let mut plain = ConnectOptions::new(&t.running.rawsocket_url(), REALM, &t.admin_key);
    plain.reconnect = false;
    assert!(Client::connect_with(plain).await.is_err());
    let (status, body) = t.http("GET", "/healthz", None, "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("needs TLS"), "{body}");

    // A client that starts a TLS handshake and goes silent is cut off (the header deadline).
    let mut s = tokio::net::TcpStream::connect(t.running.http_addr)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &[0x16])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a silent TLS client is disconnected");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // A renewed certificate (a new key) is used without a restart: clients that trust only the
    // new one get in once the files change, and clients that trust only the old one no longer do.
    let old = certs.path().join("old.pem");
    std::fs::copy(&cert, &old).unwrap();
    let (new_cert, new_key) = certificate(certs.path(), "renewed");
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if Client::connect_with(opts(&wss, &t.admin_key, &new_cert))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = Client::connect_with(opts(&wss, &t.admin_key, &old))
        .await
        .err()
        .expect("the replaced certificate is no longer served");
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[tokio::test]
async fn clear_text_on_the_network_needs_saying_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = macula_node::ConfDir::new(tmp.path());
    dir.init().unwrap();
    let mut loaded = dir.load().unwrap();
    loaded.config.listen.http = "0.0.0.0:0".parse().unwrap();
    loaded.config.listen.rawsocket = "127.0.0.1:0".parse().unwrap();
    loaded.config.mesh.enabled = false;
    let refused =
        macula_node::start(macula_node::Node::new(loaded.clone(), Some(dir.clone()))).await;
    let e = format!(
        "{:#}",
        refused.err().expect("plain text on 0.0.0.0 refused")
    );
    assert!(
        e.contains("listen.http") && e.contains("tls.cert") && e.contains("tls.plaintext: any"),
        "{e}"
    );
    loaded.config.tls.plaintext = Plaintext::Any;
    let running = macula_node::start(macula_node::Node::new(loaded, Some(dir)))
        .await
        .expect("allowed when asked for");
    assert!(running.wss_url().is_none());
}
