//! WAMP RawSocket over TCP, and over TLS when the node has a certificate (see [`crate::tls`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use macula_wamp::rawsocket::{
    FrameHeader, FrameKind, Handshake, HandshakeError, HEADER_LEN, MAX_FRAME_LEN,
};
use macula_wamp::Serializer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

use crate::node::Node;
use crate::outbox::Out;
use crate::session::{encode_out, Connection, Flow};
use crate::tls::{Stream, Tls};

/// Accepts RawSocket connections until the listener fails; with `tls`, RawSocket over TLS and
/// (where its policy allows) plain RawSocket on the one port.
pub async fn serve(listener: TcpListener, node: Arc<Node>, tls: Option<Arc<Tls>>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(
        node.config.limits.max_rawsocket_connections.max(1),
    ));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Over the cap: closed on arrival (and counted), before any handshake work.
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    node.metrics
                        .rawsocket_refused_connections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(stream);
                    continue;
                };
                let node = node.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    let res = match tls {
                        None => plain(stream, peer, node).await,
                        Some(tls) => {
                            let timeout =
                                Duration::from_millis(node.config.limits.handshake_timeout_ms);
                            match tls.accept(stream, peer, timeout, &[]).await {
                                Some(Stream::Plain(s)) => plain(s, peer, node).await,
                                Some(Stream::Tls(s)) => {
                                    let (r, w) = tokio::io::split(*s);
                                    handle(r, w, peer, node).await
                                }
                                None => Ok(()),
                            }
                        }
                    };
                    if let Err(e) = res {
                        tracing::debug!(%peer, "rawsocket connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("rawsocket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn plain(stream: TcpStream, peer: SocketAddr, node: Arc<Node>) -> std::io::Result<()> {
    let (r, w) = stream.into_split();
    handle(r, w, peer, node).await
}

async fn handle<R, W>(r: R, w: W, peer: SocketAddr, node: Arc<Node>) -> std::io::Result<()>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    let timeout = Duration::from_millis(node.config.limits.handshake_timeout_ms);
    let mut hs = [0u8; 4];
    tokio::time::timeout(timeout, r.read_exact(&mut hs))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let ours = node.config.limits.max_message_size.min(MAX_FRAME_LEN);
    let client = match Handshake::parse(hs) {
        Ok(h) => h,
        Err(None) => return Ok(()), // not RawSocket: close silently
        Err(Some(e)) => {
            w.write_all(&Handshake::encode_error(e)).await?;
            return w.flush().await;
        }
    };
    let Some(serializer) = Serializer::from_rawsocket_id(client.serializer_id) else {
        w.write_all(&Handshake::encode_error(
            HandshakeError::SerializerUnsupported,
        ))
        .await?;
        return w.flush().await;
    };
    w.write_all(&Handshake::encode(ours, serializer)).await?;
    w.flush().await?;

    let mut conn = Connection::new(node.clone(), serializer, "rawsocket", peer.to_string());
    let outbox = conn.outbox();
    let writer_node = node.clone();
    let client_max = client.max_len;
    let mut writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        let mut buf = Vec::with_capacity(1024);
        while outbox.next_batch(&mut batch).await {
            for item in batch.drain(..) {
                buf.clear();
                if encode_out(&item, serializer, &writer_node, outbox.meter(), &mut buf) {
                    if buf.len() > client_max {
                        tracing::warn!("dropping a {}-byte message above the client's RawSocket limit of {client_max}", buf.len());
                        continue;
                    }
                    w.write_all(&FrameHeader::encode(FrameKind::Message, buf.len()))
                        .await?;
                    w.write_all(&buf).await?;
                } else if let Out::Pong(p) = item {
                    w.write_all(&FrameHeader::encode(FrameKind::Pong, p.len()))
                        .await?;
                    w.write_all(&p).await?;
                }
            }
            w.flush().await?;
        }
        w.flush().await?;
        w.shutdown().await
    });

    let mut writer_done = false;
    let result = read_loop(
        &mut r,
        &mut conn,
        ours,
        timeout,
        &mut writer,
        &mut writer_done,
    )
    .await;
    conn.finish();
    // Give the writer a moment to deliver the final GOODBYE/ABORT; a client that does not read
    // must not keep the task (and its memory) alive. (A finished JoinHandle is not polled again.)
    if !writer_done
        && tokio::time::timeout(Duration::from_secs(5), &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
    result
}

async fn read_loop<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    conn: &mut Connection,
    max_len: usize,
    handshake_timeout: Duration,
    writer: &mut tokio::task::JoinHandle<std::io::Result<()>>,
    writer_done: &mut bool,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let started = tokio::time::Instant::now();
    let outbox = conn.outbox();
    loop {
        let mut header = [0u8; HEADER_LEN];
        // One frame: header, then payload. The payload buffer grows as bytes arrive (a header
        // alone never reserves memory), and the whole read is bounded by the handshake deadline
        // before WELCOME and ends at once when the session is closed.
        let read = async {
            r.read_exact(&mut header).await?;
            let h = FrameHeader::parse(header)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if h.len > max_len {
                return Ok(Err(h.len));
            }
            buf.clear();
            let n = (&mut *r).take(h.len as u64).read_to_end(&mut buf).await?;
            if n < h.len {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok::<_, std::io::Error>(Ok(h))
        };
        let h = tokio::select! {
            res = read => match res? {
                Ok(h) => h,
                Err(len) => {
                    conn.refuse_oversized(len);
                    return Ok(());
                }
            },
            _ = &mut *writer => {
                *writer_done = true;
                return Ok(());
            }
            _ = outbox.closed() => return Ok(()),
            _ = tokio::time::sleep_until(started + handshake_timeout), if !conn.is_joined() => {
                outbox.close_with(macula_router::auth::abort(macula_wamp::errors::PROTOCOL_VIOLATION, "no WELCOME within the handshake timeout"));
                return Ok(());
            }
        };
        match h.kind {
            FrameKind::Message => {
                if conn.on_frame(&buf) == Flow::Close {
                    return Ok(());
                }
            }
            FrameKind::Ping => {
                if conn.on_ping(&buf) == Flow::Close {
                    return Ok(());
                }
            }
            FrameKind::Pong => {}
        }
        // Deliveries are staged while complete frames are already buffered; they go out before
        // the reader can wait on the socket.
        if conn.should_flush() || !full_frame_buffered(r.buffer()) {
            conn.flush();
        }
        conn.mesh_backpressure().await;
    }
}

/// Whether `buf` starts with a complete frame (header and payload).
fn full_frame_buffered(buf: &[u8]) -> bool {
    if buf.len() < HEADER_LEN {
        return false;
    }
    match FrameHeader::parse([buf[0], buf[1], buf[2], buf[3]]) {
        Ok(h) => buf.len() >= HEADER_LEN + h.len,
        Err(_) => true,
    }
}
