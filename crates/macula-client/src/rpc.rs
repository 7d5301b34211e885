//! Remote procedure calls: [`Client::call`] (and progressive results through [`CallStream`]),
//! [`Client::register`] with async handlers ([`Invocation`]).

use super::*;

/// A call being answered by a registered handler.
pub struct Invocation {
    pub procedure: Option<String>,
    pub details: Dict,
    pub payload: Payload,
    pub(crate) progress: Option<(Id, mpsc::UnboundedSender<Message>)>,
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

pub(crate) type Handler = Arc<
    dyn Fn(Invocation) -> Pin<Box<dyn Future<Output = Result<Payload, CallError>> + Send>>
        + Send
        + Sync,
>;

/// A registration; dropping it does **not** unregister (call [`Registration::unregister`]).
pub struct Registration {
    pub(crate) local: u64,
    pub(crate) client: Client,
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
    pub(crate) rx: mpsc::UnboundedReceiver<Result<Message, Error>>,
    pub(crate) request: Id,
    pub(crate) client: Client,
    pub(crate) done: bool,
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
}
