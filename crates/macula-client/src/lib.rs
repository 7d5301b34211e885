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
//!
//! One file per concept: this one holds the options, errors and the shared state of a
//! [`Client`]; `pubsub.rs` publish and subscribe; `rpc.rs` calls and registrations;
//! `session.rs` the connection's life (authentication, the driver, reconnection, dispatch);
//! `transport.rs` WebSocket and RawSocket, plain or TLS.

mod pubsub;
mod rpc;
mod session;
mod transport;

pub use pubsub::{Event, Subscription};
use rpc::Handler;
pub use rpc::{CallAnswer, CallError, CallOptions, CallStream, Invocation, Registration};
use session::*;
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

    /// Says GOODBYE and closes; no reconnection afterwards.
    pub async fn close(&self) {
        let _ = self.inner.closed.send(true);
        let mut rx = self.inner.connected.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|c| c.is_none())).await;
    }
}
