//! The Prometheus exposition of the mesh's and the meter's counters (the node's own message
//! counters are rendered by [`crate::metrics::Metrics::render`]). Above the parts it reads: it
//! depends on them, they do not depend on it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::Metrics;

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
