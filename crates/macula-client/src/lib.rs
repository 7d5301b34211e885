//! # macula-client
//!
//! The Rust SDK for Macula. Connect to a realm with an API key, then publish, subscribe, call and
//! register. The client reconnects by itself after a lost connection and restores its
//! subscriptions and registrations; calls in flight at that moment fail with [`Error::ConnectionLost`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), macula_client::Error> {
//! use futures_util::StreamExt;
//! use macula_client::{Client, Payload};
//!
//! let client = Client::connect("ws://127.0.0.1:8080/ws", "com.example.demo", "sk_live_...").await?;
//! let mut sub = client.subscribe("com.example.demo.greetings").await?;
//! client.publish("com.example.demo.greetings", Payload::args(vec!["hello".into()])).await?;
//! if let Some(event) = sub.next().await {
//!     println!("got {:?}", event.payload.args);
//! }
//! # Ok(()) }
//! ```
//!
//! See `examples/` for RPC, progressive results and Cryptosign.

mod transport;
pub use transport::tls_config;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use futures_util::Stream;
use macula_wamp::{code, errors};
pub use macula_wamp::{dict, Dict, Id, List, Message, Payload, Serializer, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// Everything that can go wrong, with the router's own words where it gave any.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The router refused or closed the session (ABORT).
    #[error("{reason}: {message}")]
    Aborted { reason: String, message: String },
    /// The router or callee answered with an ERROR.
    #[error("{uri}: {message}")]
    Wamp {
        uri: String,
        message: String,
        payload: Payload,
    },
    #[error("the connection was lost before the answer arrived")]
    ConnectionLost,
    #[error("the client is closed")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// The WAMP error URI, if this is an error reply or an ABORT.
    pub fn uri(&self) -> Option<&str> {
        match self {
            Error::Wamp { uri, .. } => Some(uri),
            Error::Aborted { reason, .. } => Some(reason),
            _ => None,
        }
    }

    fn from_error_message(error: String, payload: Payload) -> Error {
        let message = payload
            .args
            .first()
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Error::Wamp {
            uri: error,
            message,
            payload,
        }
    }
}

/// How the client authenticates.
#[derive(Clone)]
pub enum Auth {
    /// WAMP-Ticket with the API key as the ticket.
    Ticket(String),
    /// WAMP-Cryptosign: a key bound to `secret`'s public key, plus the secret to answer the challenge.
    Cryptosign {
        credential: String,
        secret: [u8; 32],
    },
}

/// Connection settings.
#[derive(Clone)]
pub struct ConnectOptions {
    pub url: String,
    pub realm: String,
    pub auth: Auth,
    pub serializer: Serializer,
    /// Reconnect after a lost connection (not after the router refused the credentials).
    pub reconnect: bool,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Events buffered per subscription; when full, further events for it are dropped and counted.
    pub subscription_buffer: usize,
    /// For `wss://` and `rss://`: trust only these CA certificates (PEM) instead of the public
    /// roots — a private CA, or `macula up`'s self-signed certificate.
    pub ca_pem: Option<Vec<u8>>,
}

impl ConnectOptions {
    pub fn new(url: &str, realm: &str, key: &str) -> Self {
        ConnectOptions {
            url: url.into(),
            realm: realm.into(),
            auth: Auth::Ticket(key.into()),
            serializer: Serializer::MsgPack,
            reconnect: true,
            max_backoff: Duration::from_secs(5),
            subscription_buffer: 65_536,
            ca_pem: None,
        }
    }

    /// Trusts only the CA certificates in the PEM file at `path` for TLS.
    pub fn with_ca_file(mut self, path: impl AsRef<std::path::Path>) -> std::io::Result<Self> {
        self.ca_pem = Some(std::fs::read(path)?);
        Ok(self)
    }
}

/// One received event.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Option<String>,
    pub publication: Id,
    pub details: Dict,
    pub payload: Payload,
}

/// A call being answered by a registered handler.
pub struct Invocation {
    pub procedure: Option<String>,
    pub details: Dict,
    pub payload: Payload,
    progress: Option<(Id, mpsc::UnboundedSender<Message>)>,
}

impl Invocation {
    /// Whether the caller asked for progressive results.
    pub fn wants_progress(&self) -> bool {
        self.progress.is_some()
    }

    /// Sends a progressive result (ignored when the caller did not ask for them).
    pub fn progress(&self, payload: Payload) {
        if let Some((request, tx)) = &self.progress {
            let _ = tx.send(Message::Yield {
                request: *request,
                options: dict! {"progress" => true},
                payload,
            });
        }
    }
}

/// What a handler returns on failure: an error URI and a message.
#[derive(Debug, Clone)]
pub struct CallError {
    pub uri: String,
    pub message: String,
}

impl CallError {
    pub fn new(uri: &str, message: impl Into<String>) -> Self {
        CallError {
            uri: uri.into(),
            message: message.into(),
        }
    }
}

type Handler = Arc<
    dyn Fn(Invocation) -> Pin<Box<dyn Future<Output = Result<Payload, CallError>> + Send>>
        + Send
        + Sync,
>;

enum Waiter {
    Once(oneshot::Sender<Result<Message, Error>>),
    Stream(mpsc::UnboundedSender<Result<Message, Error>>),
}

struct LocalSub {
    topic: String,
    options: Dict,
    tx: mpsc::Sender<Event>,
    server_id: Option<Id>,
}

struct LocalReg {
    procedure: String,
    options: Dict,
    handler: Handler,
    server_id: Option<Id>,
}

#[derive(Default)]
struct State {
    next_request: Id,
    pending: HashMap<Id, Waiter>,
    subs: HashMap<u64, LocalSub>,
    regs: HashMap<u64, LocalReg>,
    next_local: u64,
    invocations: HashMap<Id, tokio::task::JoinHandle<()>>,
    session: Option<Id>,
    dropped_events: u64,
    /// SUBSCRIBE/REGISTER requests in flight → the local subscription/registration they serve,
    /// so the driver records the router's id *before* it dispatches the next frame (an EVENT or
    /// INVOCATION may follow SUBSCRIBED/REGISTERED in the same read).
    binds: HashMap<Id, Bind>,
}

#[derive(Clone, Copy)]
enum Bind {
    Sub(u64),
    Reg(u64),
}

impl State {
    fn next_local(&mut self) -> u64 {
        self.next_local += 1;
        self.next_local
    }

    fn request_id(&mut self) -> Id {
        self.next_request = (self.next_request % macula_wamp::MAX_ID) + 1;
        self.next_request
    }
}

struct Inner {
    state: Mutex<State>,
    subscription_buffer: usize,
    out: mpsc::UnboundedSender<Message>,
    /// Connection generation: bumps on every (re)connect; `None` while disconnected.
    connected: watch::Receiver<Option<u64>>,
    closed: watch::Sender<bool>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connected client. Cheap to clone; all clones share one session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A stream of events of one subscription. Dropping it unsubscribes (in the background).
pub struct Subscription {
    rx: mpsc::Receiver<Event>,
    local: u64,
    client: Client,
}

impl Stream for Subscription {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl Subscription {
    /// Waits for the next event.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.client.inner.lock();
        if let Some(sub) = st.subs.remove(&self.local) {
            if let Some(sid) = sub.server_id {
                // Another local subscription shares the router's subscription, or is about to (its
                // SUBSCRIBED for the same topic and options has not arrived yet).
                let still_used = st.subs.values().any(|s| {
                    s.server_id == Some(sid)
                        || (s.server_id.is_none()
                            && s.topic == sub.topic
                            && s.options == sub.options)
                });
                if !still_used {
                    let request = st.request_id();
                    let _ = self.client.inner.out.send(Message::Unsubscribe {
                        request,
                        subscription: sid,
                    });
                }
            }
        }
    }
}

/// A registration; dropping it does **not** unregister (call [`Registration::unregister`]).
pub struct Registration {
    local: u64,
    client: Client,
}

impl Registration {
    pub async fn unregister(self) -> Result<(), Error> {
        let sid = {
            let mut st = self.client.inner.lock();
            st.regs.remove(&self.local).and_then(|r| r.server_id)
        };
        if let Some(registration) = sid {
            let (request, rx) = self.client.waiter();
            self.client.send(Message::Unregister {
                request,
                registration,
            })?;
            self.client.await_reply(rx).await?;
        }
        Ok(())
    }
}

/// Options of a call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Router-enforced timeout.
    pub timeout: Option<Duration>,
    /// Ask the callee for progressive results (use [`Client::call_stream`]).
    pub receive_progress: bool,
    /// Reveal this session's id to the callee.
    pub disclose_me: bool,
}

/// A call in flight with progressive results. Yields each progressive result, then the final
/// one; [`CallStream::cancel`] asks the router to cancel.
pub struct CallStream {
    rx: mpsc::UnboundedReceiver<Result<Message, Error>>,
    request: Id,
    client: Client,
    done: bool,
}

/// One answer of a [`CallStream`].
#[derive(Debug, Clone, PartialEq)]
pub struct CallAnswer {
    pub payload: Payload,
    /// `true` for progressive results, `false` for the final result.
    pub progress: bool,
}

impl CallStream {
    /// The next answer; `None` after the final result or an error.
    pub async fn next(&mut self) -> Option<Result<CallAnswer, Error>> {
        if self.done {
            return None;
        }
        let r = self.rx.recv().await.unwrap_or(Err(Error::ConnectionLost));
        Some(match r {
            Ok(Message::Result {
                details, payload, ..
            }) => {
                let progress = details
                    .get("progress")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.done = !progress;
                Ok(CallAnswer { payload, progress })
            }
            Ok(Message::Error { error, payload, .. }) => {
                self.done = true;
                Err(Error::from_error_message(error, payload))
            }
            Ok(other) => {
                self.done = true;
                Err(Error::Protocol(format!(
                    "unexpected {} for a call",
                    other.kind()
                )))
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        })
    }

    /// Asks the router to cancel the call (`skip`, `kill` or `killnowait`).
    pub fn cancel(&self, mode: &str) -> Result<(), Error> {
        self.client.send(Message::Cancel {
            request: self.request,
            options: dict! {"mode" => mode},
        })
    }
}

impl Client {
    /// Connects with an API key (WAMP-Ticket) using MessagePack, reconnecting automatically.
    pub async fn connect(url: &str, realm: &str, key: &str) -> Result<Client, Error> {
        Client::connect_with(ConnectOptions::new(url, realm, key)).await
    }

    /// Connects with explicit options. Returns once the first session is established, or with the
    /// router's refusal.
    pub async fn connect_with(opts: ConnectOptions) -> Result<Client, Error> {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = watch::channel(None);
        let (closed_tx, closed_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            subscription_buffer: opts.subscription_buffer.max(1),
            out: out_tx,
            connected: conn_rx,
            closed: closed_tx,
        });
        let client = Client { inner };
        let first = establish(&opts).await?;
        let weak = Arc::downgrade(&client.inner);
        tokio::spawn(drive(weak, opts, first, out_rx, conn_tx, closed_rx));
        let mut rx = client.inner.connected.clone();
        let _ = rx.wait_for(|c| c.is_some()).await;
        Ok(client)
    }

    /// The current session id, if connected.
    pub fn session_id(&self) -> Option<Id> {
        self.inner.lock().session
    }

    /// Events dropped because a subscription's buffer was full.
    pub fn dropped_events(&self) -> u64 {
        self.inner.lock().dropped_events
    }

    fn send(&self, m: Message) -> Result<(), Error> {
        self.inner.out.send(m).map_err(|_| Error::Closed)
    }

    fn waiter(&self) -> (Id, oneshot::Receiver<Result<Message, Error>>) {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.lock();
        let id = st.request_id();
        st.pending.insert(id, Waiter::Once(tx));
        (id, rx)
    }

    async fn await_reply(
        &self,
        rx: oneshot::Receiver<Result<Message, Error>>,
    ) -> Result<Message, Error> {
        match rx.await {
            Ok(Ok(Message::Error { error, payload, .. })) => {
                Err(Error::from_error_message(error, payload))
            }
            Ok(r) => r,
            Err(_) => Err(Error::ConnectionLost),
        }
    }

    /// Waits until the client is connected (after a reconnect, say).
    pub async fn wait_connected(&self) {
        let mut rx = self.inner.connected.clone();
        let _ = rx.wait_for(|c| c.is_some()).await;
    }

    /// Publishes without acknowledgement (fastest).
    pub async fn publish(&self, topic: &str, payload: Payload) -> Result<(), Error> {
        let request = self.inner.lock().request_id();
        self.send(Message::Publish {
            request,
            options: Dict::new(),
            topic: topic.into(),
            payload,
        })
    }

    /// Publishes with options (e.g. `exclude_me`, `eligible`, `disclose_me`); with
    /// `acknowledge: true` waits for the router and returns the publication id.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: Payload,
        options: Dict,
    ) -> Result<Option<Id>, Error> {
        let ack = options
            .get("acknowledge")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !ack {
            let request = self.inner.lock().request_id();
            self.send(Message::Publish {
                request,
                options,
                topic: topic.into(),
                payload,
            })?;
            return Ok(None);
        }
        let (request, rx) = self.waiter();
        self.send(Message::Publish {
            request,
            options,
            topic: topic.into(),
            payload,
        })?;
        match self.await_reply(rx).await? {
            Message::Published { publication, .. } => Ok(Some(publication)),
            other => Err(Error::Protocol(format!(
                "unexpected {} for a publish",
                other.kind()
            ))),
        }
    }

    /// Subscribes to a topic (exact match).
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription, Error> {
        self.subscribe_with(topic, Dict::new()).await
    }

    /// Subscribes with options, e.g. `dict!{"match" => "prefix"}`.
    pub async fn subscribe_with(&self, topic: &str, options: Dict) -> Result<Subscription, Error> {
        let (tx, rx) = mpsc::channel(self.inner.subscription_buffer);
        let local = {
            let mut st = self.inner.lock();
            let l = st.next_local();
            let sub = LocalSub {
                topic: topic.into(),
                options: options.clone(),
                tx,
                server_id: None,
            };
            st.subs.insert(l, sub);
            l
        };
        let topic = topic.to_owned();
        self.bound_request(Bind::Sub(local), |request| Message::Subscribe {
            request,
            options,
            topic,
        })
        .await?;
        Ok(Subscription {
            rx,
            local,
            client: self.clone(),
        })
    }

    /// Sends the SUBSCRIBE or REGISTER of local entry `bind` and waits for the router's answer.
    /// The driver records the router's id when the answer arrives (see `State::binds`); on any
    /// failure the local entry is removed.
    async fn bound_request(
        &self,
        bind: Bind,
        message: impl FnOnce(Id) -> Message,
    ) -> Result<(), Error> {
        let (request, rx) = self.waiter();
        self.inner.lock().binds.insert(request, bind);
        let result = match self.send(message(request)) {
            Ok(()) => self.await_reply(rx).await,
            Err(e) => Err(e),
        };
        let answered = matches!(
            (&result, bind),
            (Ok(Message::Subscribed { .. }), Bind::Sub(_))
                | (Ok(Message::Registered { .. }), Bind::Reg(_))
        );
        if answered {
            return Ok(());
        }
        let mut st = self.inner.lock();
        st.binds.remove(&request);
        match bind {
            Bind::Sub(l) => st.subs.remove(&l).map(|_| ()),
            Bind::Reg(l) => st.regs.remove(&l).map(|_| ()),
        };
        match result {
            Err(e) => Err(e),
            Ok(other) => Err(Error::Protocol(format!(
                "unexpected {} in answer to a subscribe or register",
                other.kind()
            ))),
        }
    }

    /// Calls a procedure and waits for its result.
    pub async fn call(&self, procedure: &str, payload: Payload) -> Result<Payload, Error> {
        self.call_with(procedure, payload, CallOptions::default())
            .await
    }

    /// Calls with options; progressive results, if requested, are skipped (use [`Client::call_stream`]).
    pub async fn call_with(
        &self,
        procedure: &str,
        payload: Payload,
        options: CallOptions,
    ) -> Result<Payload, Error> {
        let mut s = self.call_stream(procedure, payload, options)?;
        loop {
            match s.next().await {
                Some(Ok(a)) if !a.progress => return Ok(a.payload),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
                None => return Err(Error::ConnectionLost),
            }
        }
    }

    /// Starts a call and returns the stream of its answers (progressive results, then the final one).
    pub fn call_stream(
        &self,
        procedure: &str,
        payload: Payload,
        options: CallOptions,
    ) -> Result<CallStream, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = {
            let mut st = self.inner.lock();
            let id = st.request_id();
            st.pending.insert(id, Waiter::Stream(tx));
            id
        };
        let mut o = Dict::new();
        if let Some(t) = options.timeout {
            o.insert("timeout".into(), Value::from(t.as_millis() as u64));
        }
        if options.receive_progress {
            o.insert("receive_progress".into(), Value::Bool(true));
        }
        if options.disclose_me {
            o.insert("disclose_me".into(), Value::Bool(true));
        }
        self.send(Message::Call {
            request,
            options: o,
            procedure: procedure.into(),
            payload,
        })?;
        Ok(CallStream {
            rx,
            request,
            client: self.clone(),
            done: false,
        })
    }

    /// Registers a procedure answered by `handler`.
    pub async fn register<F, Fut>(&self, procedure: &str, handler: F) -> Result<Registration, Error>
    where
        F: Fn(Invocation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Payload, CallError>> + Send + 'static,
    {
        self.register_with(procedure, Dict::new(), handler).await
    }

    /// Registers with options, e.g. `dict!{"invoke" => "roundrobin"}` for a shared registration.
    pub async fn register_with<F, Fut>(
        &self,
        procedure: &str,
        options: Dict,
        handler: F,
    ) -> Result<Registration, Error>
    where
        F: Fn(Invocation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Payload, CallError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |inv| Box::pin(handler(inv)));
        let local = {
            let mut st = self.inner.lock();
            let l = st.next_local();
            let reg = LocalReg {
                procedure: procedure.into(),
                options: options.clone(),
                handler,
                server_id: None,
            };
            st.regs.insert(l, reg);
            l
        };
        let procedure = procedure.to_owned();
        self.bound_request(Bind::Reg(local), |request| Message::Register {
            request,
            options,
            procedure,
        })
        .await?;
        Ok(Registration {
            local,
            client: self.clone(),
        })
    }

    /// Says GOODBYE and closes; no reconnection afterwards.
    pub async fn close(&self) {
        let _ = self.inner.closed.send(true);
        let mut rx = self.inner.connected.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|c| c.is_none())).await;
    }
}

struct Established {
    reader: transport::Reader,
    writer: transport::Writer,
    session: Id,
}

fn hello(opts: &ConnectOptions) -> Message {
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
async fn establish(opts: &ConnectOptions) -> Result<Established, Error> {
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
async fn drive(
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

async fn connections(
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
fn fail_pending(inner: &Inner) {
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
fn restore(inner: &Arc<Inner>) {
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
fn drain_stale(inner: &Inner, out_rx: &mut mpsc::UnboundedReceiver<Message>) {
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
fn dispatch(inner: &Arc<Inner>, m: Message) -> bool {
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
