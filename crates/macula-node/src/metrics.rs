//! Prometheus metrics, kept as plain atomics so that counting costs the data plane almost nothing
//! (read at scrape time by `exposition.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// What the workload controller counts (see `workloads::controller`).
    pub workloads: WorkloadMetrics,
}

/// The workload controller's counters, and its replicas as of its last look (once a second).
pub struct WorkloadMetrics {
    /// Replica slots this node took (an award turned into a lease).
    pub placements: AtomicU64,
    /// Tenders this node made as a slot's authority.
    pub tenders: AtomicU64,
    /// Lease renewals granted by a majority.
    pub renewals: AtomicU64,
    /// Replicas stopped because their lease ended unrenewed or another node held it.
    pub leases_lost: AtomicU64,
    /// Moves of a slot's lease authorities this node finished (the realm's nodes changed).
    pub authority_moves: AtomicU64,
    /// From the first tender of a slot to its replica starting (seconds).
    pub schedule_seconds: prometheus_client::metrics::histogram::Histogram,
    pub replicas: std::sync::Mutex<Vec<ReplicaSample>>,
}

/// One replica run here, for `/metrics`.
#[derive(Debug, Clone)]
pub struct ReplicaSample {
    pub realm: String,
    pub workload: String,
    pub replica: u32,
    pub state: &'static str,
    pub restarts: u32,
    pub memory_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

impl Default for WorkloadMetrics {
    fn default() -> Self {
        WorkloadMetrics {
            placements: AtomicU64::new(0),
            tenders: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            authority_moves: AtomicU64::new(0),
            schedule_seconds: prometheus_client::metrics::histogram::Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            replicas: std::sync::Mutex::new(vec![]),
        }
    }
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
            workloads: WorkloadMetrics::default(),
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
}
