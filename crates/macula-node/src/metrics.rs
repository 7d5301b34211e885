//! Prometheus metrics, kept as plain atomics so that counting costs the data plane almost nothing.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use macula_wamp::kind_name;

/// Number of message type codes tracked (codes are below 71).
const KINDS: usize = 71;

/// Node-wide counters.
pub struct Metrics {
    pub sessions: AtomicU64,
    pub sessions_total: AtomicU64,
    pub messages_in: [AtomicU64; KINDS],
    pub messages_out: [AtomicU64; KINDS],
    pub queue_dropped: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    /// Times a session stopped reading because the mesh peer it fed was congested.
    pub mesh_pauses: AtomicU64,
    pub decode_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub oversized: AtomicU64,
    pub rate_limited: AtomicU64,
    pub auth_failures: AtomicU64,
    pub http_requests: AtomicU64,
    /// HTTP connections closed on arrival because the listener was at `max_http_connections`.
    pub http_refused_connections: AtomicU64,
    /// RawSocket connections closed on arrival at limits.max_rawsocket_connections.
    pub rawsocket_refused_connections: AtomicU64,
    /// Sessions and bridge requests refused because their usage could not be metered.
    pub meter_refused: AtomicU64,
    /// Publications received from other nodes.
    pub mesh_events_in: AtomicU64,
    /// `macula.dht.get` lookups served.
    pub dht_lookups: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            sessions: AtomicU64::new(0),
            sessions_total: AtomicU64::new(0),
            messages_in: std::array::from_fn(|_| AtomicU64::new(0)),
            messages_out: std::array::from_fn(|_| AtomicU64::new(0)),
            queue_dropped: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            mesh_pauses: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
            http_refused_connections: AtomicU64::new(0),
            meter_refused: AtomicU64::new(0),
            rawsocket_refused_connections: AtomicU64::new(0),
            mesh_events_in: AtomicU64::new(0),
            dht_lookups: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn count_in(&self, code: u64) {
        if let Some(c) = self.messages_in.get(code as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count_out(&self, code: u64) {
        if let Some(c) = self.messages_out.get(code as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Renders the Prometheus text exposition format. `extra` adds per-realm gauges.
    pub fn render(&self, realms: &[(String, usize, usize, usize, usize)]) -> String {
        let mut s = String::with_capacity(4096);
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(s, "# HELP macula_sessions Sessions currently joined.\n# TYPE macula_sessions gauge\nmacula_sessions {}", g(&self.sessions));
        let _ = writeln!(s, "# HELP macula_sessions_total Sessions joined since start.\n# TYPE macula_sessions_total counter\nmacula_sessions_total {}", g(&self.sessions_total));
        for (name, help, arr) in [
            (
                "macula_messages_in_total",
                "WAMP messages received, by type.",
                &self.messages_in,
            ),
            (
                "macula_messages_out_total",
                "WAMP messages sent, by type.",
                &self.messages_out,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (code, c) in arr.iter().enumerate() {
                let k = kind_name(code as u64);
                if k != "unknown" {
                    let _ = writeln!(s, "{name}{{kind=\"{k}\"}} {}", g(c));
                }
            }
        }
        let _ = writeln!(
            s,
            "# HELP macula_errors_total Errors by kind.\n# TYPE macula_errors_total counter"
        );
        for (k, v) in [
            ("decode", &self.decode_errors),
            ("protocol", &self.protocol_errors),
            ("oversized", &self.oversized),
            ("rate_limited", &self.rate_limited),
            ("auth", &self.auth_failures),
        ] {
            let _ = writeln!(s, "macula_errors_total{{kind=\"{k}\"}} {}", g(v));
        }
        let _ = writeln!(s, "# HELP macula_queue_dropped_total Events dropped from full session queues (drop_oldest policy).\n# TYPE macula_queue_dropped_total counter\nmacula_queue_dropped_total {}", g(&self.queue_dropped));
        let _ = writeln!(s, "# HELP macula_slow_consumer_disconnects_total Sessions closed because their queue overflowed.\n# TYPE macula_slow_consumer_disconnects_total counter\nmacula_slow_consumer_disconnects_total {}", g(&self.slow_consumer_disconnects));
        let _ = writeln!(s, "# HELP macula_http_requests_total HTTP bridge requests.\n# TYPE macula_http_requests_total counter\nmacula_http_requests_total {}", g(&self.http_requests));
        let _ = writeln!(s, "# HELP macula_http_refused_connections_total HTTP connections closed on arrival at limits.max_http_connections.\n# TYPE macula_http_refused_connections_total counter\nmacula_http_refused_connections_total {}", g(&self.http_refused_connections));
        let _ = writeln!(s, "# HELP macula_rawsocket_refused_connections_total RawSocket connections closed on arrival at limits.max_rawsocket_connections.\n# TYPE macula_rawsocket_refused_connections_total counter\nmacula_rawsocket_refused_connections_total {}", g(&self.rawsocket_refused_connections));
        let _ = writeln!(s, "# HELP macula_meter_refused_total Sessions and bridge requests refused because no metering slot was left for them (metering.slots, metering.max_pairs_per_registration).\n# TYPE macula_meter_refused_total counter\nmacula_meter_refused_total {}", g(&self.meter_refused));
        let _ = writeln!(
            s,
            "# HELP macula_realm_sessions Sessions per realm.\n# TYPE macula_realm_sessions gauge"
        );
        for (r, sess, ..) in realms {
            let _ = writeln!(s, "macula_realm_sessions{{realm=\"{r}\"}} {sess}");
        }
        let _ = writeln!(s, "# HELP macula_realm_subscriptions Subscriptions per realm.\n# TYPE macula_realm_subscriptions gauge");
        for (r, _, subs, ..) in realms {
            let _ = writeln!(s, "macula_realm_subscriptions{{realm=\"{r}\"}} {subs}");
        }
        let _ = writeln!(s, "# HELP macula_realm_registrations Registrations per realm.\n# TYPE macula_realm_registrations gauge");
        for (r, _, _, regs, _) in realms {
            let _ = writeln!(s, "macula_realm_registrations{{realm=\"{r}\"}} {regs}");
        }
        let _ = writeln!(s, "# HELP macula_realm_calls_in_flight Calls awaiting a result per realm.\n# TYPE macula_realm_calls_in_flight gauge");
        for (r, _, _, _, calls) in realms {
            let _ = writeln!(s, "macula_realm_calls_in_flight{{realm=\"{r}\"}} {calls}");
        }
        s
    }
}
