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

/// The mesh series: peers, frames by outcome, interest table sizes and DHT lookups.
pub fn render_mesh(s: &mut String, m: &crate::mesh::MeshState, node: &Metrics) {
    let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let st = m.handle.stats();
    let peers = m.handle.peer_status();
    let certified = peers.iter().filter(|p| p.certified).count();
    let _ = writeln!(s, "# HELP macula_mesh_peers Connected mesh peers (certified ones exchange traffic).\n# TYPE macula_mesh_peers gauge\nmacula_mesh_peers{{certified=\"true\"}} {certified}\nmacula_mesh_peers{{certified=\"false\"}} {}", peers.len() - certified);
    let _ = writeln!(s, "# HELP macula_mesh_peer_rtt_seconds Last ping round trip per peer.\n# TYPE macula_mesh_peer_rtt_seconds gauge");
    for p in &peers {
        if let Some(us) = p.rtt_us {
            let _ = writeln!(
                s,
                "macula_mesh_peer_rtt_seconds{{peer=\"{}\"}} {}",
                p.peer_id,
                us as f64 / 1e6
            );
        }
    }
    let _ = writeln!(s, "# HELP macula_mesh_frames_total Inter-node frames by outcome.\n# TYPE macula_mesh_frames_total counter");
    for (k, v) in [
        ("in", g(&st.frames_in)),
        ("out", g(&st.frames_out)),
        ("dropped", g(&st.frames_dropped)),
        ("malformed", g(&st.frames_malformed)),
        ("rejected", g(&m.counters.rejected)),
        ("unknown_realm", g(&m.counters.unknown_realm)),
    ] {
        let _ = writeln!(s, "macula_mesh_frames_total{{outcome=\"{k}\"}} {v}");
    }
    let _ = writeln!(s, "# HELP macula_mesh_bytes_total Inter-node bytes.\n# TYPE macula_mesh_bytes_total counter\nmacula_mesh_bytes_total{{dir=\"in\"}} {}\nmacula_mesh_bytes_total{{dir=\"out\"}} {}", g(&st.bytes_in), g(&st.bytes_out));
    let _ = writeln!(s, "# HELP macula_mesh_session_pauses_total Times a client session stopped reading until a congested peer drained.\n# TYPE macula_mesh_session_pauses_total counter\nmacula_mesh_session_pauses_total {}", g(&node.mesh_pauses));
    let _ = writeln!(s, "# HELP macula_mesh_congestion_total Times a peer's queue went over mesh.peer_queue_bytes and its senders paused.\n# TYPE macula_mesh_congestion_total counter\nmacula_mesh_congestion_total {}", g(&st.congestion_events));
    let _ = writeln!(s, "# HELP macula_mesh_peers_rejected_total Peers refused for lacking a valid operator certificate (missing, expired, revoked).\n# TYPE macula_mesh_peers_rejected_total counter\nmacula_mesh_peers_rejected_total {}", g(&st.peers_rejected));
    let _ = writeln!(s, "# HELP macula_mesh_peers_cut_off_total Linked peers disconnected because their certificate expired or was revoked.\n# TYPE macula_mesh_peers_cut_off_total counter\nmacula_mesh_peers_cut_off_total {}", g(&st.peers_cut_off));
    let _ = writeln!(s, "# HELP macula_mesh_dht_refused_total DHT records and provider records refused (the sender was not certified).\n# TYPE macula_mesh_dht_refused_total counter\nmacula_mesh_dht_refused_total {}", g(&st.dht_refused));
    let _ = writeln!(s, "# HELP macula_mesh_cert_expiry_timestamp_seconds When this node's mesh certificate expires (renewed when a third of its validity is left).\n# TYPE macula_mesh_cert_expiry_timestamp_seconds gauge\nmacula_mesh_cert_expiry_timestamp_seconds {}", m.handle.own_cert().not_after);
    let _ = writeln!(s, "# HELP macula_mesh_links Remote nodes with interest or registrations in a local realm.\n# TYPE macula_mesh_links gauge\nmacula_mesh_links {}", m.link_count());
    let _ = writeln!(s, "# HELP macula_mesh_realm_states Signed realm states known.\n# TYPE macula_mesh_realm_states gauge\nmacula_mesh_realm_states {}", m.states.lock().len());
    let _ = writeln!(s, "# HELP macula_mesh_states_total Realm states received, by outcome.\n# TYPE macula_mesh_states_total counter\nmacula_mesh_states_total{{outcome=\"applied\"}} {}\nmacula_mesh_states_total{{outcome=\"rejected\"}} {}", g(&m.counters.states_applied), g(&m.counters.states_rejected));
    let _ = writeln!(s, "# HELP macula_mesh_events_in_total Publications received from other nodes.\n# TYPE macula_mesh_events_in_total counter\nmacula_mesh_events_in_total {}", g(&node.mesh_events_in));
    let _ = writeln!(s, "# HELP macula_dht_lookups_total DHT lookups (macula.dht.get).\n# TYPE macula_dht_lookups_total counter\nmacula_dht_lookups_total {}", g(&node.dht_lookups));
}

/// Per-realm usage series from the node's metering counters (cumulative since the counters file
/// was created, so they survive restarts), and the share of its plan's allowance each realm has
/// used this month (on the node hosting the billing aggregator).
pub fn render_usage(
    s: &mut String,
    meter: &crate::meter::Meter,
    quota: &std::collections::HashMap<String, f64>,
) {
    use crate::meter::{Op, OPS};
    let mut per: std::collections::BTreeMap<String, [u64; OPS + 2]> = Default::default();
    for (realm, _key, c) in meter.totals() {
        let e = per.entry(realm).or_default();
        for (i, v) in e.iter_mut().enumerate() {
            *v += c[i];
        }
    }
    let _ = writeln!(s, "# HELP macula_realm_ops_total Billed operations on this node, by realm and kind.\n# TYPE macula_realm_ops_total counter");
    for (realm, c) in &per {
        for op in Op::ALL {
            let _ = writeln!(
                s,
                "macula_realm_ops_total{{realm=\"{realm}\",kind=\"{}\"}} {}",
                op.name(),
                c[op as usize]
            );
        }
    }
    let _ = writeln!(s, "# HELP macula_realm_bytes_in_total Bytes of billed operations received, by realm.\n# TYPE macula_realm_bytes_in_total counter");
    for (realm, c) in &per {
        let _ = writeln!(
            s,
            "macula_realm_bytes_in_total{{realm=\"{realm}\"}} {}",
            c[OPS]
        );
    }
    let _ = writeln!(s, "# HELP macula_realm_egress_bytes_total Bytes written to the realm's clients (egress).\n# TYPE macula_realm_egress_bytes_total counter");
    for (realm, c) in &per {
        let _ = writeln!(
            s,
            "macula_realm_egress_bytes_total{{realm=\"{realm}\"}} {}",
            c[OPS + 1]
        );
    }
    if !quota.is_empty() {
        let _ = writeln!(s, "# HELP macula_realm_quota_used_ratio Share of the plan's monthly allowance used (1 = all), by realm.\n# TYPE macula_realm_quota_used_ratio gauge");
        let mut q: Vec<_> = quota.iter().collect();
        q.sort_by(|a, b| a.0.cmp(b.0));
        for (realm, r) in q {
            let _ = writeln!(
                s,
                "macula_realm_quota_used_ratio{{realm=\"{realm}\"}} {r:.6}"
            );
        }
    }
}
