//! Node configuration (`node.yaml` in the config directory). Every limit is explicit and has a
//! default that suits a single machine; see `docs` in the README for the full list.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outbox::SlowConsumerPolicy;

/// Where the node listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// WebSocket (`/ws`), HTTP bridge (`/v1/...`), `/metrics`, `/healthz`, `/readyz`.
    pub http: SocketAddr,
    /// WAMP RawSocket over TCP.
    pub rawsocket: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: ([127, 0, 0, 1], 8080).into(),
            rawsocket: ([127, 0, 0, 1], 8081).into(),
        }
    }
}

/// Limits that protect the node and its other clients from one session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted from a client, in bytes; bigger ones ABORT the session.
    pub max_message_size: usize,
    /// Messages queued for one session before the slow-consumer policy applies.
    pub outbox_capacity: usize,
    pub slow_consumer: SlowConsumerPolicy,
    /// Messages per second one session may send (token bucket); 0 disables the limit.
    pub rate_limit_per_second: u64,
    /// Burst size of the rate limit.
    pub rate_limit_burst: u64,
    /// Timeout for calls that set none, in milliseconds; 0 means calls may wait forever.
    pub call_timeout_ms: u64,
    /// Time a connection has to complete HELLO → WELCOME, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Sessions this node accepts at once.
    pub max_sessions: usize,
    /// Largest HTTP bridge request body, in bytes.
    pub max_http_body: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions_per_session: usize,
    /// Registrations one session may hold.
    pub max_registrations_per_session: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 1024 * 1024,
            outbox_capacity: 8192,
            slow_consumer: SlowConsumerPolicy::DropOldest,
            rate_limit_per_second: 100_000,
            rate_limit_burst: 200_000,
            call_timeout_ms: 60_000,
            handshake_timeout_ms: 10_000,
            max_sessions: 100_000,
            max_http_body: 1024 * 1024,
            max_subscriptions_per_session: 10_000,
            max_registrations_per_session: 10_000,
        }
    }
}

impl Limits {
    pub fn call_timeout(&self) -> Option<Duration> {
        (self.call_timeout_ms > 0).then(|| Duration::from_millis(self.call_timeout_ms))
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub listen: Listen,
    pub limits: Limits,
    /// How often the config directory is re-read for policy and revocation changes, in ms.
    pub reload_interval_ms: u64,
}

impl NodeConfig {
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(if self.reload_interval_ms == 0 {
            1000
        } else {
            self.reload_interval_ms
        })
    }
}
