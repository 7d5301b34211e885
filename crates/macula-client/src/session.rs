//! The session's life: HELLO and authentication, the connection driver, reconnection (restoring
//! subscriptions and registrations), and the dispatch of every message the router sends.

use super::*;

pub(crate) struct Established {
    pub(crate) reader: transport::Reader,
    pub(crate) writer: transport::Writer,
    pub(crate) session: Id,
}

pub(crate) fn hello(opts: &ConnectOptions) -> Message {
    let (methods, extra) = match &opts.auth {
        Auth::Ticket(_) => (vec![Value::from("ticket")], Dict::new()),
        Auth::Cryptosign { credential, secret } => {
            let pk = SigningKey::from_bytes(secret).verifying_key();
            (
                vec![Value::from("cryptosign")],
                dict! {"pubkey" => hex::encode(pk.to_bytes()), "credential" => credential.as_str()},
            )
        }
    };
    let roles = dict! {
        "publisher" => dict!{"features" => dict!{"publisher_exclusion" => true, "subscriber_blackwhite_listing" => true, "publisher_identification" => true}},
        "subscriber" => dict!{"features" => dict!{"pattern_based_subscription" => true}},
        "caller" => dict!{"features" => dict!{"progressive_call_results" => true, "call_canceling" => true, "call_timeout" => true, "caller_identification" => true}},
        "callee" => dict!{"features" => dict!{"progressive_call_results" => true, "call_canceling" => true, "shared_registration" => true, "pattern_based_registration" => true}},
    };
    Message::Hello {
        realm: opts.realm.clone(),
        details: dict! {"roles" => roles, "authmethods" => Value::List(methods), "authextra" => extra, "agent" => "macula-client"},
    }
}

/// Opens a connection and runs HELLO … WELCOME.
pub(crate) async fn establish(opts: &ConnectOptions) -> Result<Established, Error> {
    let (mut reader, mut writer) =
        transport::connect(&opts.url, opts.serializer, opts.ca_pem.as_deref()).await?;
    let ser = opts.serializer;
    let io = |e: std::io::Error| Error::Connect(e.to_string());
    writer.feed(ser.encode(&hello(opts))).await.map_err(io)?;
    writer.flush().await.map_err(io)?;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .map_err(|_| Error::Connect("no answer to HELLO within 10 s".into()))?
            .ok_or_else(|| Error::Connect("connection closed during the handshake".into()))?;
        match ser
            .decode(&frame)
            .map_err(|e| Error::Protocol(e.to_string()))?
        {
            Message::Welcome { session, .. } => {
                return Ok(Established {
                    reader,
                    writer,
                    session,
                })
            }
            Message::Abort { details, reason } => {
                let message = details
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                return Err(Error::Aborted { reason, message });
            }
            Message::Challenge { method, extra } => {
                let signature = match (&opts.auth, method.as_str()) {
                    (Auth::Ticket(key), "ticket") => key.clone(),
                    (Auth::Cryptosign { secret, .. }, "cryptosign") => {
                        let challenge = extra
                            .get("challenge")
                            .and_then(Value::as_str)
                            .and_then(|c| hex::decode(c).ok())
                            .ok_or_else(|| {
                                Error::Protocol(
                                    "cryptosign challenge without a hex challenge".into(),
                                )
                            })?;
                        let sig = SigningKey::from_bytes(secret).sign(&challenge);
                        let mut out = sig.to_bytes().to_vec();
                        out.extend_from_slice(&challenge);
                        hex::encode(out)
                    }
                    _ => {
                        return Err(Error::Protocol(format!(
                            "unexpected challenge method {method}"
                        )))
                    }
                };
                writer
                    .feed(ser.encode(&Message::Authenticate {
                        signature,
                        extra: Dict::new(),
                    }))
                    .await
                    .map_err(io)?;
                writer.flush().await.map_err(io)?;
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {} during the handshake",
                    other.kind()
                )))
            }
        }
    }
}

/// The background task: moves messages between the connection and the client state, and
/// reconnects (restoring subscriptions and registrations) when the connection drops.
pub(crate) async fn drive(
    inner: std::sync::Weak<Inner>,
    opts: ConnectOptions,
    first: Established,
    out_rx: mpsc::UnboundedReceiver<Message>,
    conn_tx: watch::Sender<Option<u64>>,
    closed_rx: watch::Receiver<bool>,
) {
    connections(inner.clone(), opts, first, out_rx, conn_tx, closed_rx).await;
    // The client is done (closed, refused on reconnect, or reconnection off): end every
    // subscription stream and fail whatever still waits, instead of leaving them pending forever.
    if let Some(inner) = inner.upgrade() {
        fail_pending(&inner);
        let mut st = inner.lock();
        st.subs.clear();
        st.regs.clear();
    }
}

pub(crate) async fn connections(
    inner: std::sync::Weak<Inner>,
    opts: ConnectOptions,
    first: Established,
    mut out_rx: mpsc::UnboundedReceiver<Message>,
    conn_tx: watch::Sender<Option<u64>>,
    mut closed_rx: watch::Receiver<bool>,
) {
    let mut conn = Some(first);
    let mut generation = 0u64;
    loop {
        let Some(Established {
            mut reader,
            mut writer,
            session,
        }) = conn.take()
        else {
            break;
        };
        generation += 1;
        {
            let Some(inner) = inner.upgrade() else { return };
            inner.lock().session = Some(session);
            if generation > 1 {
                drain_stale(&inner, &mut out_rx);
                restore(&inner);
            }
        }
        let _ = conn_tx.send(Some(generation));
        let ser = opts.serializer;
        let mut goodbye = false;
        loop {
            tokio::select! {
                frame = reader.next() => {
                    let Some(frame) = frame else { break };
                    let Some(inner) = inner.upgrade() else { return };
                    match ser.decode(&frame) {
                        Ok(m) => {
                            if dispatch(&inner, m) {
                                goodbye = true;
                                break;
                            }
                        }
                        Err(e) => tracing::warn!("undecodable message from the router: {e}"),
                    }
                }
                m = out_rx.recv() => {
                    let Some(m) = m else { goodbye = true; break };
                    if writer.feed(ser.encode(&m)).await.is_err() { break; }
                    // Batch whatever else is queued before flushing once.
                    let mut ok = true;
                    for _ in 0..1024 {
                        match out_rx.try_recv() {
                            Ok(m) => if writer.feed(ser.encode(&m)).await.is_err() { ok = false; break; },
                            Err(_) => break,
                        }
                    }
                    if !ok || writer.flush().await.is_err() { break; }
                }
                _ = closed_rx.changed() => {
                    let bye = Message::Goodbye { details: Dict::new(), reason: errors::NORMAL.into() };
                    let _ = writer.feed(ser.encode(&bye)).await;
                    let _ = writer.flush().await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), reader.next()).await;
                    writer.close().await;
                    goodbye = true;
                    break;
                }
            }
        }
        let _ = conn_tx.send(None);
        if let Some(inner) = inner.upgrade() {
            fail_pending(&inner);
        }
        if goodbye || !opts.reconnect || *closed_rx.borrow() {
            return;
        }
        // Reconnect with capped exponential backoff until it works or the client is dropped.
        let mut backoff = Duration::from_millis(50);
        loop {
            if inner.upgrade().is_none() || *closed_rx.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = closed_rx.changed() => return,
            }
            match establish(&opts).await {
                Ok(e) => {
                    conn = Some(e);
                    break;
                }
                Err(Error::Aborted { reason, message }) => {
                    tracing::error!("reconnection refused ({reason}: {message}); giving up");
                    return;
                }
                Err(e) => {
                    tracing::debug!("reconnect failed: {e}");
                    backoff = (backoff * 2).min(opts.max_backoff);
                }
            }
        }
    }
}

/// Fails every request waiting for an answer: the connection that would carry it is gone.
pub(crate) fn fail_pending(inner: &Inner) {
    let mut st = inner.lock();
    st.session = None;
    st.binds.clear();
    for (_, w) in st.pending.drain() {
        match w {
            Waiter::Once(tx) => {
                let _ = tx.send(Err(Error::ConnectionLost));
            }
            Waiter::Stream(tx) => {
                let _ = tx.send(Err(Error::ConnectionLost));
            }
        }
    }
    for (_, h) in st.invocations.drain() {
        h.abort();
    }
    for s in st.subs.values_mut() {
        s.server_id = None;
    }
    for r in st.regs.values_mut() {
        r.server_id = None;
    }
}

/// After a reconnect: subscribe and register again. The driver records the new ids when
/// SUBSCRIBED/REGISTERED arrive (see `State::binds`).
pub(crate) fn restore(inner: &Arc<Inner>) {
    let mut st = inner.lock();
    let subs: Vec<(u64, String, Dict)> = st
        .subs
        .iter()
        .map(|(l, s)| (*l, s.topic.clone(), s.options.clone()))
        .collect();
    let regs: Vec<(u64, String, Dict)> = st
        .regs
        .iter()
        .map(|(l, r)| (*l, r.procedure.clone(), r.options.clone()))
        .collect();
    for (local, topic, options) in subs {
        let request = st.request_id();
        st.binds.insert(request, Bind::Sub(local));
        let _ = inner.out.send(Message::Subscribe {
            request,
            options,
            topic,
        });
    }
    for (local, procedure, options) in regs {
        let request = st.request_id();
        st.binds.insert(request, Bind::Reg(local));
        let _ = inner.out.send(Message::Register {
            request,
            options,
            procedure,
        });
    }
}

/// Drops messages queued for a connection that no longer exists (YIELDs of aborted invocations,
/// requests made while disconnected) and fails the requests among them, so nothing stale reaches
/// the new session and nobody waits for an answer that cannot come.
pub(crate) fn drain_stale(inner: &Inner, out_rx: &mut mpsc::UnboundedReceiver<Message>) {
    while let Ok(m) = out_rx.try_recv() {
        let request = match &m {
            Message::Call { request, .. }
            | Message::Publish { request, .. }
            | Message::Subscribe { request, .. }
            | Message::Unsubscribe { request, .. }
            | Message::Register { request, .. }
            | Message::Unregister { request, .. } => *request,
            _ => continue,
        };
        let mut st = inner.lock();
        st.binds.remove(&request);
        match st.pending.remove(&request) {
            Some(Waiter::Once(tx)) => {
                let _ = tx.send(Err(Error::ConnectionLost));
            }
            Some(Waiter::Stream(tx)) => {
                let _ = tx.send(Err(Error::ConnectionLost));
            }
            None => {}
        }
    }
}

/// Routes one message from the router. Returns `true` when the session ended (GOODBYE/ABORT).
pub(crate) fn dispatch(inner: &Arc<Inner>, m: Message) -> bool {
    let reply_to = |request: Id, m: Message| {
        let waiter = inner.lock().pending.remove(&request);
        match waiter {
            Some(Waiter::Once(tx)) => {
                let _ = tx.send(Ok(m));
            }
            Some(Waiter::Stream(tx)) => {
                let _ = tx.send(Ok(m));
            }
            None => {}
        }
    };
    match m {
        Message::Event {
            subscription,
            publication,
            details,
            payload,
        } => {
            let topic = details
                .get("topic")
                .and_then(Value::as_str)
                .map(String::from);
            let mut st = inner.lock();
            let mut dropped = 0;
            for s in st.subs.values() {
                if s.server_id == Some(subscription) {
                    let ev = Event {
                        topic: topic.clone(),
                        publication,
                        details: details.clone(),
                        payload: payload.clone(),
                    };
                    if s.tx.try_send(ev).is_err() {
                        dropped += 1;
                    }
                }
            }
            st.dropped_events += dropped;
            false
        }
        Message::Result {
            request,
            details,
            payload,
        } => {
            let progress = details.get("progress").and_then(Value::as_bool) == Some(true);
            let mut st = inner.lock();
            match st.pending.remove(&request) {
                Some(Waiter::Stream(tx)) => {
                    let ok = tx
                        .send(Ok(Message::Result {
                            request,
                            details,
                            payload,
                        }))
                        .is_ok();
                    if progress && ok {
                        st.pending.insert(request, Waiter::Stream(tx));
                    }
                }
                Some(Waiter::Once(tx)) => {
                    let _ = tx.send(Ok(Message::Result {
                        request,
                        details,
                        payload,
                    }));
                }
                None => {}
            }
            false
        }
        Message::Subscribed {
            request,
            subscription,
        } => {
            let mut st = inner.lock();
            if let Some(Bind::Sub(local)) = st.binds.remove(&request) {
                if let Some(s) = st.subs.get_mut(&local) {
                    s.server_id = Some(subscription);
                }
            }
            drop(st);
            reply_to(request, m);
            false
        }
        Message::Registered {
            request,
            registration,
        } => {
            let mut st = inner.lock();
            if let Some(Bind::Reg(local)) = st.binds.remove(&request) {
                if let Some(r) = st.regs.get_mut(&local) {
                    r.server_id = Some(registration);
                }
            }
            drop(st);
            reply_to(request, m);
            false
        }
        Message::Published { request, .. }
        | Message::Unsubscribed { request }
        | Message::Unregistered { request } => {
            reply_to(request, m);
            false
        }
        Message::Error {
            request,
            request_type,
            ref error,
            ..
        } => {
            if inner.lock().binds.remove(&request).is_some() {
                tracing::warn!(
                    "re-subscribe/register (message type {request_type}) refused: {error}"
                );
            }
            reply_to(request, m);
            false
        }
        Message::Invocation {
            request,
            registration,
            details,
            payload,
        } => {
            let handler = {
                let st = inner.lock();
                st.regs
                    .values()
                    .find(|r| r.server_id == Some(registration))
                    .map(|r| r.handler.clone())
            };
            let out = inner.out.clone();
            let Some(handler) = handler else {
                let _ = out.send(Message::Error {
                    request_type: code::INVOCATION,
                    request,
                    details: Dict::new(),
                    error: errors::NO_SUCH_REGISTRATION.into(),
                    payload: Payload::default(),
                });
                return false;
            };
            let wants_progress = details
                .get("receive_progress")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let inv = Invocation {
                procedure: details
                    .get("procedure")
                    .and_then(Value::as_str)
                    .map(String::from),
                details,
                payload,
                progress: wants_progress.then(|| (request, out.clone())),
            };
            let weak = Arc::downgrade(inner);
            let task = tokio::spawn(async move {
                let reply = match handler(inv).await {
                    Ok(payload) => Message::Yield {
                        request,
                        options: Dict::new(),
                        payload,
                    },
                    Err(e) => Message::Error {
                        request_type: code::INVOCATION,
                        request,
                        details: Dict::new(),
                        error: e.uri,
                        payload: Payload::args(vec![Value::Str(e.message)]),
                    },
                };
                let _ = out.send(reply);
                if let Some(inner) = weak.upgrade() {
                    inner.lock().invocations.remove(&request);
                }
            });
            inner.lock().invocations.insert(request, task);
            false
        }
        Message::Interrupt { request, .. } => {
            if let Some(h) = inner.lock().invocations.remove(&request) {
                h.abort();
                let _ = inner.out.send(Message::Error {
                    request_type: code::INVOCATION,
                    request,
                    details: Dict::new(),
                    error: errors::CANCELED.into(),
                    payload: Payload::default(),
                });
            }
            false
        }
        Message::Goodbye { .. } => {
            let _ = inner.out.send(Message::Goodbye {
                details: Dict::new(),
                reason: errors::GOODBYE_AND_OUT.into(),
            });
            true
        }
        Message::Abort { details, reason } => {
            tracing::warn!(
                "session aborted by the router: {reason} {:?}",
                details.get("message")
            );
            // An abort (revoked key, slow consumer...) ends this connection; reconnection decides.
            false
        }
        _ => false,
    }
}
