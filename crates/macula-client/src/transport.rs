//! Client transports: WebSocket (`ws://host:port/ws`, over TLS `wss://`) and RawSocket
//! (`rs://host:port`, over TLS `rss://`). TLS verifies the server's certificate against the
//! public roots (Mozilla's, built in), or only against the CA given in
//! [`ConnectOptions::ca_pem`](crate::ConnectOptions) (a private CA, or `macula up`'s
//! self-signed certificate).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{SinkExt, StreamExt};
use macula_wamp::rawsocket::{FrameHeader, FrameKind, Handshake, HEADER_LEN};
use macula_wamp::Serializer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadBuf,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::Error;

/// A connection to the router, with or without TLS.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Ws = WebSocketStream<Conn>;
type RawRead = Box<dyn AsyncRead + Send + Unpin>;
type RawWrite = Box<dyn AsyncWrite + Send + Unpin>;

pub(crate) enum Reader {
    Ws(futures_util::stream::SplitStream<Ws>),
    Raw(BufReader<RawRead>, usize),
}

pub(crate) enum Writer {
    Ws(futures_util::stream::SplitSink<Ws, WsMessage>, bool),
    Raw(BufWriter<RawWrite>),
}

/// Largest message this client accepts from a router.
const MAX_LEN: usize = 16 * 1024 * 1024;

/// The TLS client settings: the public roots, or only the CA certificates in `ca_pem`.
pub fn tls_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(pem) => {
            let mut n = 0;
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| Error::Connect(format!("the CA file is not PEM: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| Error::Connect(format!("unusable CA certificate: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(Error::Connect("the CA file holds no certificate".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Connect(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens TCP to `addr` (`host:port`) and, with `tls`, runs the TLS handshake for `host`.
async fn open(
    url: &str,
    addr: &str,
    host: &str,
    tls: Option<&[u8]>,
    secure: bool,
) -> Result<Conn, Error> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Error::Connect(format!("{url}: {e}")))?;
    let _ = stream.set_nodelay(true);
    if !secure {
        return Ok(Conn::Plain(stream));
    }
    let config = tls_config(tls)?;
    let name = ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .map_err(|_| Error::Connect(format!("{url}: {host:?} is not a host name")))?;
    let s = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| Error::Connect(format!("{url}: TLS: {e}")))?;
    Ok(Conn::Tls(Box::new(s)))
}

/// The host of `host:port` (IPv6 in brackets).
fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => addr,
    }
}

pub(crate) async fn connect(
    url: &str,
    serializer: Serializer,
    ca_pem: Option<&[u8]>,
) -> Result<(Reader, Writer), Error> {
    let raw = [
        ("rs://", false),
        ("tcp://", false),
        ("rss://", true),
        ("tcps://", true),
    ]
    .into_iter()
    .find_map(|(p, secure)| url.strip_prefix(p).map(|a| (a, secure)));
    if let Some((addr, secure)) = raw {
        let addr = addr.trim_end_matches('/');
        let conn = open(url, addr, host_of(addr), ca_pem, secure).await?;
        let (r, w): (RawRead, RawWrite) = match conn {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        };
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut w = BufWriter::with_capacity(64 * 1024, w);
        w.write_all(&Handshake::encode(MAX_LEN, serializer))
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        w.flush().await.map_err(|e| Error::Connect(e.to_string()))?;
        let mut reply = [0u8; 4];
        r.read_exact(&mut reply)
            .await
            .map_err(|e| Error::Connect(format!("{url}: no RawSocket handshake reply ({e})")))?;
        Handshake::parse_reply(reply).map_err(Error::Connect)?;
        Ok((Reader::Raw(r, MAX_LEN), Writer::Raw(w)))
    } else if url.starts_with("ws://") || url.starts_with("wss://") {
        let mut req = url
            .into_client_request()
            .map_err(|e| Error::Connect(format!("{url}: {e}")))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            serializer
                .subprotocol()
                .parse()
                .map_err(|_| Error::Connect("bad subprotocol".into()))?,
        );
        let secure = url.starts_with("wss://");
        let host = req
            .uri()
            .host()
            .ok_or_else(|| Error::Connect(format!("{url}: no host")))?
            .to_owned();
        let port = req
            .uri()
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let conn = open(url, &addr, &host, ca_pem, secure).await?;
        let (ws, _) = tokio_tungstenite::client_async(req, conn)
            .await
            .map_err(|e| Error::Connect(format!("{url}: {e}")))?;
        let (sink, stream) = ws.split();
        Ok((Reader::Ws(stream), Writer::Ws(sink, serializer.is_text())))
    } else {
        Err(Error::Connect(format!(
            "unsupported URL {url:?}: use ws://host:port/ws, wss://host:port/ws, rs://host:port or rss://host:port"
        )))
    }
}

impl Reader {
    /// The next message frame; `None` when the connection closed.
    pub(crate) async fn next(&mut self) -> Option<Vec<u8>> {
        match self {
            Reader::Ws(s) => loop {
                match s.next().await? {
                    Ok(WsMessage::Binary(b)) => return Some(b.to_vec()),
                    Ok(WsMessage::Text(t)) => return Some(t.as_bytes().to_vec()),
                    Ok(WsMessage::Close(_)) | Err(_) => return None,
                    Ok(_) => continue,
                }
            },
            Reader::Raw(r, max) => loop {
                let mut h = [0u8; HEADER_LEN];
                r.read_exact(&mut h).await.ok()?;
                let h = FrameHeader::parse(h).ok()?;
                if h.len > *max {
                    return None;
                }
                let mut buf = vec![0u8; h.len];
                r.read_exact(&mut buf).await.ok()?;
                if h.kind == FrameKind::Message {
                    return Some(buf);
                }
            },
        }
    }
}

impl Writer {
    /// Queues a frame; call [`Writer::flush`] after a batch.
    pub(crate) async fn feed(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        match self {
            Writer::Ws(s, text) => {
                let m = if *text {
                    WsMessage::Text(
                        String::from_utf8(bytes)
                            .map_err(std::io::Error::other)?
                            .into(),
                    )
                } else {
                    WsMessage::Binary(bytes.into())
                };
                s.feed(m).await.map_err(std::io::Error::other)
            }
            Writer::Raw(w) => {
                w.write_all(&FrameHeader::encode(FrameKind::Message, bytes.len()))
                    .await?;
                w.write_all(&bytes).await
            }
        }
    }

    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Writer::Ws(s, _) => s.flush().await.map_err(std::io::Error::other),
            Writer::Raw(w) => w.flush().await,
        }
    }

    pub(crate) async fn close(&mut self) {
        match self {
            Writer::Ws(s, _) => {
                let _ = s.close().await;
            }
            Writer::Raw(w) => {
                let _ = w.flush().await;
                let _ = w.shutdown().await;
            }
        }
    }
}
