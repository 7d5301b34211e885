//! Publish and subscribe: [`Client::publish`], [`Client::subscribe`] and the [`Subscription`]
//! stream of [`Event`]s.

use super::*;

/// One received event.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Option<String>,
    pub publication: Id,
    pub details: Dict,
    pub payload: Payload,
}

/// A stream of events of one subscription. Dropping it unsubscribes (in the background).
pub struct Subscription {
    pub(crate) rx: mpsc::Receiver<Event>,
    pub(crate) local: u64,
    pub(crate) client: Client,
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

impl Client {
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
        let (request, rx) = if ack {
            let (request, rx) = self.waiter();
            (request, Some(rx))
        } else {
            (self.inner.lock().request_id(), None)
        };
        self.send(Message::Publish {
            request,
            options,
            topic: topic.into(),
            payload,
        })?;
        let Some(rx) = rx else {
            return Ok(None);
        };
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
}
