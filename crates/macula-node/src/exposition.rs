//! `/metrics`: the node's counters in the OpenMetrics text format, encoded by
//! `prometheus-client`.
//!
//! The data plane counts with plain atomic adds (`metrics.rs`, the mesh's and the meter's own
//! counters); nothing is registered or locked on that path. At scrape time a [`NodeCollector`]
//! reads those atomics (and the realms' table sizes, the mesh's peers, the meter's totals) and
//! hands each value to the encoder as a constant counter or gauge. Counters are declared without
//! their `_total` suffix: the encoder adds it. This module is above the parts it reads: it
//! depends on them, they do not depend on it.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::node::Node;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything the node counts, as one OpenMetrics document.
pub fn render(node: &Arc<Node>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector(node.clone())));
    let mut text = String::with_capacity(8192);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!("encoding /metrics: {e}");
    }
    text
}

/// Reads the node's counters at scrape time (see the module's documentation).
struct NodeCollector(Arc<Node>);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
    }
}

type Label = (Cow<'static, str>, Cow<'static, str>);

fn label(k: &'static str, v: impl Into<Cow<'static, str>>) -> [Label; 1] {
    [(Cow::Borrowed(k), v.into())]
}

fn get(v: &AtomicU64) -> u64 {
    v.load(Ordering::Relaxed)
}

/// One metric family after another, each with its help text.
struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        let m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(m)
    }

    fn gauge(&mut self, name: &str, help: &str, v: impl EncodeGaugeValue) -> fmt::Result {
        let m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(m)
    }

    fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        items: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (l, v) in items {
            ConstCounter::new(v).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }

    fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        items: impl IntoIterator<Item = (L, N)>,
    ) -> fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (l, v) in items {
            ConstGauge::new(v).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

impl Collector for NodeCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let node = &self.0;
        let mut out = Out(encoder);
        node_series(&mut out, node)?;
        if let Some(m) = crate::mesh::of(node) {
            mesh_series(&mut out, m, &node.metrics)?;
        }
        if let Some(meter) = &node.meter {
            let quota = node.quota_used.lock().clone();
            usage_series(&mut out, meter, &quota)?;
        }
        workload_series(&mut out, &node.metrics.workloads)
    }
}

/// The workload controller's counters, and the replicas this node runs.
fn workload_series(out: &mut Out, w: &crate::metrics::WorkloadMetrics) -> fmt::Result {
    out.counter(
        "macula_workload_placements",
        "Replica slots this node took (an award turned into a lease).",
        get(&w.placements),
    )?;
    out.counter(
        "macula_workload_tenders",
        "Tenders this node made as a slot's lease authority.",
        get(&w.tenders),
    )?;
    out.counter(
        "macula_workload_lease_renewals",
        "Lease renewals granted by a majority of the slot's authorities.",
        get(&w.renewals),
    )?;
    out.counter(
        "macula_workload_leases_lost",
        "Replicas stopped because their lease ended unrenewed or another node held it.",
        get(&w.leases_lost),
    )?;
    out.counter(
        "macula_workload_authority_moves",
        "Moves of a slot's lease authorities this node finished, each agreed by a majority of the authorities it replaced.",
        get(&w.authority_moves),
    )?;
    let m = out.0.encode_descriptor(
        "macula_workload_schedule_seconds",
        "From the tender of a slot to its replica starting.",
        None,
        MetricType::Histogram,
    )?;
    w.schedule_seconds.encode(m)?;
    let replicas = w.replicas.lock().map(|r| r.clone()).unwrap_or_default();
    let mut by_state: std::collections::BTreeMap<&str, i64> = [
        "starting",
        "running",
        "backoff",
        "succeeded",
        "failed",
        "stopped",
    ]
    .into_iter()
    .map(|s| (s, 0))
    .collect();
    for r in &replicas {
        *by_state.entry(r.state).or_default() += 1;
    }
    out.gauges(
        "macula_workload_replicas",
        "Replicas this node runs, by state.",
        by_state.into_iter().map(|(s, n)| (label("state", s), n)),
    )?;
    type ReplicaLabels = [Label; 3];
    let labels = |r: &crate::metrics::ReplicaSample| -> ReplicaLabels {
        [
            (Cow::Borrowed("realm"), Cow::Owned(r.realm.clone())),
            (Cow::Borrowed("workload"), Cow::Owned(r.workload.clone())),
            (Cow::Borrowed("replica"), Cow::Owned(r.replica.to_string())),
        ]
    };
    out.counters(
        "macula_workload_restarts",
        "Restarts of each replica this node runs.",
        replicas.iter().map(|r| (labels(r), r.restarts as u64)),
    )?;
    out.gauges(
        "macula_workload_memory_bytes",
        "Memory of each replica this node runs (its control groups).",
        replicas
            .iter()
            .filter_map(|r| Some((labels(r), r.memory_bytes? as i64))),
    )?;
    let mut m = out.0.encode_descriptor(
        "macula_workload_cpu_seconds",
        "CPU time of each replica this node runs (its control groups).",
        None,
        MetricType::Counter,
    )?;
    for r in &replicas {
        if let Some(c) = r.cpu_seconds {
            ConstCounter::new(c).encode(m.encode_family(&labels(r))?)?;
        }
    }
    Ok(())
}

/// Sessions, messages, errors, queues, listeners, and the realms' table sizes.
fn node_series(out: &mut Out, node: &Node) -> fmt::Result {
    let m = &node.metrics;
    out.gauge(
        "macula_sessions",
        "Sessions currently joined.",
        get(&m.sessions),
    )?;
    // `macula_sessions_joined_total`: OpenMetrics gives each family one name, and the gauge
    // has `macula_sessions`.
    out.counter(
        "macula_sessions_joined",
        "Sessions joined since start.",
        get(&m.sessions_total),
    )?;
    for (name, help, arr) in [
        (
            "macula_messages_in",
            "WAMP messages received, by type.",
            &m.messages_in,
        ),
        (
            "macula_messages_out",
            "WAMP messages sent, by type.",
            &m.messages_out,
        ),
    ] {
        out.counters(
            name,
            help,
            arr.iter().enumerate().filter_map(|(code, c)| {
                let k = macula_wamp::kind_name(code as u64);
                (k != "unknown").then(|| (label("kind", k), get(c)))
            }),
        )?;
    }
    out.counters(
        "macula_errors",
        "Errors by kind.",
        [
            ("decode", &m.decode_errors),
            ("protocol", &m.protocol_errors),
            ("oversized", &m.oversized),
            ("rate_limited", &m.rate_limited),
            ("auth", &m.auth_failures),
        ]
        .map(|(k, v)| (label("kind", k), get(v))),
    )?;
    for (name, help, v) in [
        ("macula_queue_dropped", "Events dropped from full session queues (drop_oldest policy).", &m.queue_dropped),
        ("macula_slow_consumer_disconnects", "Sessions closed because their queue overflowed.", &m.slow_consumer_disconnects),
        ("macula_http_requests", "HTTP bridge requests.", &m.http_requests),
        ("macula_http_refused_connections", "HTTP connections closed on arrival at limits.max_http_connections.", &m.http_refused_connections),
        ("macula_rawsocket_refused_connections", "RawSocket connections closed on arrival at limits.max_rawsocket_connections.", &m.rawsocket_refused_connections),
        ("macula_meter_refused", "Sessions and bridge requests refused because no metering slot was left for them (metering.slots, metering.max_pairs_per_registration).", &m.meter_refused),
    ] {
        out.counter(name, help, get(v))?;
    }
    // Per realm: (name, sessions, subscriptions, registrations, calls in flight).
    let realms: Vec<(String, [usize; 4])> = node
        .realm_handles()
        .iter()
        .map(|r| {
            let core = r.lock();
            let (subs, regs, calls) = core.stats();
            (r.name.clone(), [core.session_count(), subs, regs, calls])
        })
        .collect();
    for (i, (name, help)) in [
        ("macula_realm_sessions", "Sessions per realm."),
        ("macula_realm_subscriptions", "Subscriptions per realm."),
        ("macula_realm_registrations", "Registrations per realm."),
        (
            "macula_realm_calls_in_flight",
            "Calls awaiting a result per realm.",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        out.gauges(
            name,
            help,
            realms
                .iter()
                .map(|(r, v)| (label("realm", r.clone()), v[i] as u64)),
        )?;
    }
    Ok(())
}

/// The mesh: peers, frames by outcome, interest table sizes and DHT lookups.
fn mesh_series(
    out: &mut Out,
    m: &crate::mesh::MeshState,
    node: &crate::metrics::Metrics,
) -> fmt::Result {
    let st = m.handle.stats();
    let peers = m.handle.peer_status();
    let certified = peers.iter().filter(|p| p.certified).count() as u64;
    out.gauges(
        "macula_mesh_peers",
        "Connected mesh peers (certified ones exchange traffic).",
        [
            (label("certified", "true"), certified),
            (label("certified", "false"), peers.len() as u64 - certified),
        ],
    )?;
    out.gauges(
        "macula_mesh_peer_rtt_seconds",
        "Last ping round trip per peer.",
        peers.iter().filter_map(|p| {
            p.rtt_us
                .map(|us| (label("peer", p.peer_id.to_string()), us as f64 / 1e6))
        }),
    )?;
    out.counters(
        "macula_mesh_frames",
        "Inter-node frames by outcome.",
        [
            ("in", get(&st.frames_in)),
            ("out", get(&st.frames_out)),
            ("dropped", get(&st.frames_dropped)),
            ("malformed", get(&st.frames_malformed)),
            ("rejected", get(&m.counters.rejected)),
            ("unknown_realm", get(&m.counters.unknown_realm)),
        ]
        .map(|(k, v)| (label("outcome", k), v)),
    )?;
    out.counters(
        "macula_mesh_bytes",
        "Inter-node bytes.",
        [("in", get(&st.bytes_in)), ("out", get(&st.bytes_out))].map(|(k, v)| (label("dir", k), v)),
    )?;
    for (name, help, v) in [
        (
            "macula_mesh_session_pauses",
            "Times a client session stopped reading until a congested peer drained.",
            get(&node.mesh_pauses),
        ),
        (
            "macula_mesh_congestion",
            "Times a peer's queue went over mesh.peer_queue_bytes and its senders paused.",
            get(&st.congestion_events),
        ),
        (
            "macula_mesh_peers_rejected",
            "Peers refused for lacking a valid operator certificate (missing, expired, revoked).",
            get(&st.peers_rejected),
        ),
        (
            "macula_mesh_peers_cut_off",
            "Linked peers disconnected because their certificate expired or was revoked.",
            get(&st.peers_cut_off),
        ),
        (
            "macula_mesh_dht_refused",
            "DHT records and provider records refused (the sender was not certified).",
            get(&st.dht_refused),
        ),
    ] {
        out.counter(name, help, v)?;
    }
    out.gauge(
        "macula_mesh_cert_expiry_timestamp_seconds",
        "When this node's mesh certificate expires (renewed when a third of its validity is left).",
        m.handle.own_cert().not_after,
    )?;
    out.gauge(
        "macula_mesh_links",
        "Remote nodes with interest or registrations in a local realm.",
        m.link_count() as u64,
    )?;
    out.gauge(
        "macula_mesh_realm_states",
        "Signed realm states known.",
        m.states.lock().len() as u64,
    )?;
    out.counters(
        "macula_mesh_states",
        "Realm states received, by outcome.",
        [
            ("applied", get(&m.counters.states_applied)),
            ("rejected", get(&m.counters.states_rejected)),
        ]
        .map(|(k, v)| (label("outcome", k), v)),
    )?;
    out.counter(
        "macula_mesh_events_in",
        "Publications received from other nodes.",
        get(&node.mesh_events_in),
    )?;
    out.counter(
        "macula_dht_lookups",
        "DHT lookups (macula.dht.get).",
        get(&node.dht_lookups),
    )
}

/// Per-realm usage from the node's metering counters (cumulative since the counters file was
/// created, so they survive restarts), and the share of its plan's allowance each realm has
/// used this month (on the node hosting the billing aggregator).
fn usage_series(
    out: &mut Out,
    meter: &crate::meter::Meter,
    quota: &std::collections::HashMap<String, f64>,
) -> fmt::Result {
    use crate::meter::{Op, OPS};
    let mut per: std::collections::BTreeMap<String, [u64; OPS + 2]> = Default::default();
    for (realm, _key, c) in meter.totals() {
        let e = per.entry(realm).or_default();
        for (i, v) in e.iter_mut().enumerate() {
            *v += c[i];
        }
    }
    out.counters(
        "macula_realm_ops",
        "Billed operations on this node, by realm and kind.",
        per.iter().flat_map(|(realm, c)| {
            Op::ALL.into_iter().map(move |op| {
                (
                    [
                        (Cow::Borrowed("realm"), Cow::Owned(realm.clone())),
                        (Cow::Borrowed("kind"), Cow::Borrowed(op.name())),
                    ],
                    c[op as usize],
                )
            })
        }),
    )?;
    out.counters(
        "macula_realm_bytes_in",
        "Bytes of billed operations received, by realm.",
        per.iter()
            .map(|(realm, c)| (label("realm", realm.clone()), c[OPS])),
    )?;
    out.counters(
        "macula_realm_egress_bytes",
        "Bytes written to the realm's clients (egress).",
        per.iter()
            .map(|(realm, c)| (label("realm", realm.clone()), c[OPS + 1])),
    )?;
    let mut compute: std::collections::BTreeMap<String, u64> = Default::default();
    let mut delivered: std::collections::BTreeMap<String, u64> = Default::default();
    for (realm, _key, c) in meter.totals() {
        *compute.entry(realm.clone()).or_default() += c[crate::meter::INSTANCE_MS];
        *delivered.entry(realm).or_default() += c[crate::meter::PACKAGE_BYTES];
    }
    out.counters(
        "macula_realm_package_bytes",
        "Bytes of Hub packages delivered to this node for the realm's replicas (billed per GiB).",
        delivered
            .iter()
            .map(|(realm, b)| (label("realm", realm.clone()), *b)),
    )?;
    out.gauges(
        "macula_realm_instance_seconds_total",
        "Seconds of replicas run on this node (compute, billed per instance-hour), by realm.",
        compute
            .into_iter()
            .map(|(realm, ms)| (label("realm", realm), ms as f64 / 1e3)),
    )?;
    if !quota.is_empty() {
        let mut q: Vec<_> = quota.iter().collect();
        q.sort_by(|a, b| a.0.cmp(b.0));
        out.gauges(
            "macula_realm_quota_used_ratio",
            "Share of the plan's monthly allowance used (1 = all), by realm.",
            q.into_iter()
                .map(|(realm, r)| (label("realm", realm.clone()), *r)),
        )?;
    }
    Ok(())
}
