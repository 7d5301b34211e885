//! Client transports: WebSocket (`ws://host:port/ws`) and RawSocket (`rs://host:port`).

use futures_util::{SinkExt, StreamExt};
use macula_wamp::rawsocket::{FrameHeader, FrameKind, Handshake, HEADER_LEN};
use macula_wamp::Serializer;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Error;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) enum Reader {
    Ws(futures_util::stream::SplitStream<Ws>),
    Raw(BufReader<OwnedReadHalf>, usize),
}

pub(crate) enum Writer {
    Ws(futures_util::stream::SplitSink<Ws, WsMessage>, bool),
    Raw(BufWriter<OwnedWriteHalf>),
}

/// Largest message this client accepts from a router.
const MAX_LEN: usize = 16 * 1024 * 1024;

pub(crate) async fn connect(url: &str, serializer: Serializer) -> Result<(Reader, Writer), Error> {
    if let Some(addr) = url
        .strip_prefix("rs://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        let addr = addr.trim_end_matches('/');
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::Connect(format!("{url}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
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
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| Error::Connect(format!("{url}: {e}")))?;
        let (sink, stream) = ws.split();
        Ok((Reader::Ws(stream), Writer::Ws(sink, serializer.is_text())))
    } else {
        Err(Error::Connect(format!(
            "unsupported URL {url:?}: use ws://host:port/ws or rs://host:port"
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
