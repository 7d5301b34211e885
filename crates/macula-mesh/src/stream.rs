//! Mesh streams: one per direction per linked peer. Writers batch queued frames; readers check
//! the certificate in the first frame and hand frames to the node within an inbound budget.

use super::*;

/// Starts the outgoing mesh stream to a connected peer, unless it has one.
pub(crate) fn start_writer(peer: PeerId, shared: &Arc<Shared>, cmd: &mpsc::UnboundedSender<Cmd>) {
    let mut writers = shared.writers.write();
    if writers.contains_key(&peer) {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let q = Arc::new(PeerQueue {
        tx,
        queued: AtomicUsize::new(0),
        congested: AtomicBool::new(false),
    });
    writers.insert(peer, q.clone());
    tokio::spawn(writer(
        shared.control.clone(),
        peer,
        rx,
        q,
        shared.clone(),
        cmd.clone(),
    ));
}

/// Opens the outbound stream to `peer`, introduces this node and writes queued frames in batches.
pub(crate) async fn writer(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queue: Arc<PeerQueue>,
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
) {
    write_frames(&mut control, peer, &mut rx, &queue, &shared, &cmd).await;
    // Whatever ends the stream, nobody waits on this queue any more, and a later link to the
    // peer starts a fresh one.
    queue.relieve(&shared);
    let mut writers = shared.writers.write();
    if writers.get(&peer).is_some_and(|q| Arc::ptr_eq(q, &queue)) {
        writers.remove(&peer);
    }
}

pub(crate) async fn write_frames(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    queue: &PeerQueue,
    shared: &Shared,
    cmd: &mpsc::UnboundedSender<Cmd>,
) {
    // A stream that cannot be opened must not leave the connection up without a link: the peer
    // would never hear our Hello, never link back, and nothing would retry (a node that never
    // joins; interest that never arrives over a "live" link). A transient failure is retried;
    // then the connection is dropped, and redialling starts over.
    let mut attempt = 0u32;
    let mut stream = loop {
        match control.open_stream(peer, MESH_PROTOCOL).await {
            Ok(s) => break s,
            Err(e) => {
                attempt += 1;
                let unsupported =
                    matches!(e, libp2p_stream::OpenStreamError::UnsupportedProtocol(_));
                if unsupported || attempt >= 3 {
                    tracing::debug!(local = %shared.local, %peer, attempt, "no mesh stream, disconnecting: {e}");
                    // Only the peer's current writer may drop the connection: a writer left
                    // over from a closed connection must not take the new one down with it.
                    if is_current(shared, peer, queue) {
                        let _ = cmd.send(Cmd::Disconnect(peer));
                    }
                    return;
                }
                tracing::debug!(local = %shared.local, %peer, attempt, "no mesh stream yet: {e}");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    };
    let hello = Frame::Hello {
        version: frame::PROTOCOL_VERSION,
        cert: shared.cert.read().0.clone(),
    }
    .encode();
    if stream.write_all(&hello).await.is_err() {
        if is_current(shared, peer, queue) {
            let _ = cmd.send(Cmd::Disconnect(peer));
        }
        return;
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        if buf.capacity() > 1 << 20 {
            buf.shrink_to(64 << 10);
        }
        buf.extend_from_slice(&first);
        while buf.len() < (256 << 10) {
            match rx.try_recv() {
                Ok(b) => buf.extend_from_slice(&b),
                Err(_) => break,
            }
        }
        if stream.write_all(&buf).await.is_err() || stream.flush().await.is_err() {
            if is_current(shared, peer, queue) {
                let _ = cmd.send(Cmd::Disconnect(peer));
            }
            return;
        }
        shared
            .stats
            .bytes_out
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let left = queue.queued.fetch_sub(buf.len(), Ordering::SeqCst) - buf.len();
        if left <= shared.config.peer_queue_bytes / 2 {
            queue.relieve(shared);
        }
    }
    let _ = stream.close().await;
}

/// Whether `queue` is (still) the writer queue of `peer`.
pub(crate) fn is_current(shared: &Shared, peer: PeerId, queue: &PeerQueue) -> bool {
    shared
        .writers
        .read()
        .get(&peer)
        .is_some_and(|q| std::ptr::eq(&**q, queue))
}

pub(crate) async fn accept_loop(
    mut incoming: libp2p_stream::IncomingStreams,
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(reader(peer, stream, shared.clone(), cmd.clone()));
    }
}

pub(crate) enum ReadError {
    Closed,
    Oversized(usize),
}

/// Reads one length-prefixed frame body. Bodies are cut from a shared buffer, so a burst of
/// small frames costs one allocation, and the node keeps the WAMP messages without copying.
pub(crate) async fn read_frame<R: futures_util::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    chunk: &mut usize,
    max: usize,
) -> Result<Bytes, ReadError> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len)
        .await
        .map_err(|_| ReadError::Closed)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(ReadError::Oversized(n));
    }
    if buf.capacity() < n {
        // Chunks grow with traffic (4 KiB → 64 KiB), so an idle stream holds little memory.
        *chunk = (*chunk * 2).clamp(4 << 10, 64 << 10);
        buf.reserve(n.max(*chunk));
    }
    buf.resize(n, 0);
    rd.read_exact(&mut buf[..])
        .await
        .map_err(|_| ReadError::Closed)?;
    Ok(buf.split().freeze())
}

/// `peer` presented `cert` (on a mesh or cert stream; `None`: something else came). A valid one
/// is recorded and the routing table follows it; otherwise the peer is refused, disconnected
/// and `false` returned.
pub(crate) fn presented(
    shared: &Shared,
    cmd: &mpsc::UnboundedSender<Cmd>,
    peer: PeerId,
    cert: Option<&[u8]>,
) -> bool {
    let checked = cert
        .ok_or(cert::CertError::Malformed)
        .and_then(|c| shared.trust.check(&peer, c, cert::now_secs()));
    match checked {
        Ok(c) => {
            shared.certified.write().insert(peer, c);
            let _ = cmd.send(Cmd::Certified(peer));
            true
        }
        Err(e) => {
            shared.stats.peers_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "peer refused: {e}");
            let _ = cmd.send(Cmd::Disconnect(peer));
            false
        }
    }
}

/// Reads one peer's inbound stream: the certificate first, then frames for the node.
pub(crate) async fn reader(
    peer: PeerId,
    stream: libp2p::Stream,
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
) {
    let stats = &shared.stats;
    let mut rd = BufReader::with_capacity(16 << 10, stream);
    let mut buf = BytesMut::new();
    let mut chunk = 0;
    let max = shared.config.max_frame;
    let budget = shared
        .config
        .inbound_queue_bytes
        .clamp(64 << 10, Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize) as u32;
    let first = tokio::time::timeout(CERT_WITHIN, read_frame(&mut rd, &mut buf, &mut chunk, 4096));
    let hello = match first.await.unwrap_or(Err(ReadError::Closed)) {
        Ok(body) => match Frame::decode(body) {
            Ok(Frame::Hello { version, cert }) if version == frame::PROTOCOL_VERSION => Some(cert),
            Ok(Frame::Hello { version, .. }) => {
                tracing::warn!(
                    %peer,
                    "peer speaks mesh protocol version {version} and this node {}: run the same \
                     Macula release on every node",
                    frame::PROTOCOL_VERSION
                );
                None
            }
            _ => None,
        },
        Err(_) => None,
    };
    if !presented(&shared, &cmd, peer, hello.as_deref()) {
        return;
    }
    // A new stream from a peer that is still linked: the peer lost its end of the old link (it
    // restarted, or its writer failed) while the old connection has not timed out here yet.
    // The new stream supersedes the old link both ways: the old writer is retired (it would
    // write into the dead stream and then, failing, take the new connection down), and the
    // node hears PeerDown then PeerUp, so that what the old link held goes with it.
    let old_link = shared.up.read().get(&peer).map(|(_, since)| *since);
    if let Some(since) = old_link {
        if let Some(q) = shared.writers.write().remove(&peer) {
            q.relieve(&shared);
        }
        // Its connection is dead too (or would be read by no one): closed now rather than
        // when it times out, so that the new writer does not open its stream on it.
        let _ = cmd.send(Cmd::Superseded(peer, since));
    }
    // Reciprocate: frames flow both ways between linked peers. The stream is started here, before
    // the node hears of the peer, so that what it sends on PeerUp has a queue to go to.
    start_writer(peer, &shared, &cmd);
    let _ = cmd.send(Cmd::Want(peer));
    let generation = shared.generation.fetch_add(1, Ordering::Relaxed);
    {
        let mut up = shared.up.write();
        if up.insert(peer, (generation, Instant::now())).is_some() {
            let _ = shared.events.send((MeshEvent::PeerDown(peer), 0));
        }
        let _ = shared.events.send((MeshEvent::PeerUp(peer), 0));
    }
    loop {
        match read_frame(&mut rd, &mut buf, &mut chunk, max).await {
            Ok(body) => {
                stats.frames_in.fetch_add(1, Ordering::Relaxed);
                let len = body.len();
                stats.bytes_in.fetch_add(len as u64 + 4, Ordering::Relaxed);
                match Frame::decode(body) {
                    // A renewed certificate, or one that is not good: then the peer is gone.
                    Ok(Frame::Hello { cert, .. }) => {
                        if !presented(&shared, &cmd, peer, Some(&cert)) {
                            return;
                        }
                    }
                    Ok(f) => {
                        // Wait for room in the node's inbound budget: while the node is behind,
                        // this stream is not read and QUIC flow control stops the sender.
                        let permits = (len as u32).clamp(1, budget);
                        let Ok(p) = shared.inbound.acquire_many(permits).await else {
                            return;
                        };
                        p.forget();
                        // Checked under the lock that PeerDown is sent under: no frame of a
                        // stream is delivered after the peer was reported gone.
                        let up = shared.up.read();
                        if up.get(&peer).map(|(g, _)| *g) != Some(generation) {
                            shared.inbound.add_permits(permits as usize);
                            return;
                        }
                        let _ = shared.events.send((MeshEvent::Frame(peer, f), permits));
                    }
                    Err(e) => {
                        stats.frames_malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "malformed mesh frame dropped: {e}");
                    }
                }
            }
            Err(ReadError::Oversized(n)) => {
                stats.frames_malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "mesh frame of {n} bytes exceeds mesh.max_frame; disconnecting");
                let _ = cmd.send(Cmd::Disconnect(peer));
                return;
            }
            Err(ReadError::Closed) => return,
        }
    }
}
