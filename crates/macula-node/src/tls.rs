//! TLS on the client listeners (HTTP: WebSocket, bridge, registry REST, metrics; RawSocket).
//!
//! With `tls.cert` and `tls.key` set, both listeners accept TLS (rustls) on their one port; a
//! connection whose first byte is not a TLS handshake is served in the clear only if
//! `tls.plaintext` allows its peer (`loopback`, the default: local tools and sidecars; `any`;
//! `none`). Without TLS, a listener bound to a non-loopback address is refused at start unless
//! `tls.plaintext: any` says that clear text on the network is meant (passwords, session
//! tokens and API keys would cross it).
//!
//! The certificate and key are PEM files, re-read when they change (checked every
//! `tls.reload_s`): renewing a certificate needs no restart, and a broken renewal keeps the
//! last good pair (logged).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Which peers may connect without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Plaintext {
    /// Peers on this machine (127.0.0.0/8, ::1).
    #[default]
    Loopback,
    /// Every peer.
    Any,
    /// No peer: TLS only.
    None,
}

/// `tls:` in node.yaml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Certificate chain, PEM (relative paths: in the config directory). Empty: no TLS.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Who may connect in the clear: `loopback` (default), `any`, `none`.
    pub plaintext: Plaintext,
    /// How often the certificate files are checked for change, in seconds.
    pub reload_s: u64,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            plaintext: Plaintext::Loopback,
            reload_s: 10,
        }
    }
}

impl TlsSection {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }

    /// Refuses a configuration that would serve clear text where it was not asked for.
    pub fn check_listener(&self, name: &str, addr: SocketAddr) -> Result<()> {
        if self.enabled() {
            if self.key.as_os_str().is_empty() {
                bail!("tls.cert is set but tls.key is not");
            }
            return Ok(());
        }
        if self.plaintext == Plaintext::None {
            bail!("tls.plaintext is none but no certificate is configured (tls.cert, tls.key)");
        }
        if !addr.ip().to_canonical().is_loopback() && self.plaintext != Plaintext::Any {
            bail!(
                "{name} is {addr}, reachable from the network, and no TLS is configured: set tls.cert and tls.key \
                 (PEM files), or tls.plaintext: any to serve clear text anyway (passwords, tokens and API keys \
                 would cross the network unencrypted)"
            );
        }
        Ok(())
    }

    /// Whether `peer` may use this listener without TLS.
    pub fn allows_plain(&self, peer: SocketAddr) -> bool {
        match self.plaintext {
            Plaintext::Any => true,
            Plaintext::None => false,
            Plaintext::Loopback => peer.ip().to_canonical().is_loopback(),
        }
    }
}

/// The certificate in use, replaced when its files change.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// The provider: rustls is built with aws-lc-rs (the QUIC mesh already uses it).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate chain ({e})", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("{}: no PEM private key ({e})", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| anyhow!("{}: unusable private key ({e})", key.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| {
        anyhow!(
            "{} does not belong to the certificate {} ({e})",
            key.display(),
            cert.display()
        )
    })?;
    Ok(ck)
}

/// A listener's TLS: the acceptor and the policy for plain connections.
pub struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Reloading>,
    paths: (PathBuf, PathBuf),
    pub section: TlsSection,
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Tls {
    /// Loads the configured certificate (`root`: the config directory, for relative paths).
    pub fn load(section: &TlsSection, root: Option<&Path>) -> Result<Option<Arc<Tls>>> {
        if !section.enabled() {
            return Ok(None);
        }
        let at = |p: &Path| match root {
            Some(r) if p.is_relative() => r.join(p),
            _ => p.to_path_buf(),
        };
        let (cert, key) = (at(&section.cert), at(&section.key));
        let pair = load_pair(&cert, &key)?;
        let resolver = Arc::new(Reloading {
            current: RwLock::new(Arc::new(pair)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            paths: (cert, key),
            section: section.clone(),
        })))
    }

    /// Re-reads the certificate files whenever they change, forever.
    pub async fn watch(self: Arc<Tls>) {
        let (cert, key) = &self.paths;
        let mut last = (stamp(cert), stamp(key));
        let mut iv = tokio::time::interval(Duration::from_secs(self.section.reload_s.max(1)));
        loop {
            iv.tick().await;
            let now = (stamp(cert), stamp(key));
            if now == last {
                continue;
            }
            last = now;
            match load_pair(cert, key) {
                Ok(pair) => {
                    *self.resolver.current.write() = Arc::new(pair);
                    tracing::info!("TLS certificate reloaded from {}", cert.display());
                }
                Err(e) => {
                    tracing::error!("TLS certificate not reloaded, keeping the last one: {e:#}")
                }
            }
        }
    }

    /// Sorts a new connection: TLS (its handshake done within `timeout`), plain (if allowed for
    /// its peer), or refused (`None`; `refusal` has been written to a plain client).
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
        refusal: &[u8],
    ) -> Option<Stream> {
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(timeout, stream.peek(&mut first)).await;
        if !matches!(peeked, Ok(Ok(1))) {
            return None;
        }
        // 0x16: a TLS handshake record.
        if first[0] == 0x16 {
            return match tokio::time::timeout(timeout, self.acceptor.accept(stream)).await {
                Ok(Ok(s)) => Some(Stream::Tls(Box::new(s))),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    None
                }
                Err(_) => None,
            };
        }
        if self.section.allows_plain(peer) {
            return Some(Stream::Plain(stream));
        }
        if !refusal.is_empty() {
            // Answer, then read (a little, briefly) what the client sent: closing with unread
            // input would reset the connection and could discard the answer before it is read.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = stream;
            let _ = tokio::time::timeout(timeout, async {
                stream.write_all(refusal).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                let mut left: usize = 64 * 1024;
                while left > 0 {
                    let n = stream.read(&mut sink).await?;
                    if n == 0 {
                        break;
                    }
                    left = left.saturating_sub(n);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
        }
        None
    }
}

/// A connection after [`Tls::accept`].
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// What a plain HTTP client that must use TLS is told.
pub fn http_refusal() -> Vec<u8> {
    let body = "This listener needs TLS: use https:// or wss://.\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_text_on_the_network_needs_saying_so() {
        let mut s = TlsSection::default();
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6lo: SocketAddr = "[::1]:8080".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(s.check_listener("listen.http", lo).is_ok());
        assert!(s.check_listener("listen.http", v6lo).is_ok());
        let e = s
            .check_listener("listen.http", any)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.cert") && e.contains("tls.plaintext: any"),
            "{e}"
        );
        s.plaintext = Plaintext::Any;
        assert!(s.check_listener("listen.http", any).is_ok());
        s.plaintext = Plaintext::None;
        assert!(s.check_listener("listen.http", lo).is_err());
    }

    #[test]
    fn plain_peers_by_policy() {
        let mut s = TlsSection::default();
        let lo: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        let far: SocketAddr = "192.0.2.7:1".parse().unwrap();
        assert!(s.allows_plain(lo) && s.allows_plain(mapped) && !s.allows_plain(far));
        s.plaintext = Plaintext::None;
        assert!(!s.allows_plain(lo));
        s.plaintext = Plaintext::Any;
        assert!(s.allows_plain(far));
    }

    #[test]
    fn the_refusal_is_a_complete_http_answer() {
        let bytes = http_refusal();
        let text = std::str::from_utf8(&bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
