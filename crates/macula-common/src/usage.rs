//! The usage report: what a node delivers to the billing aggregator, and the shapes of its
//! counters (operation kinds, the latency histogram).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kinds of operations that are billed (the seed's "what counts as an operation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Publish = 0,
    Subscribe = 1,
    Call = 2,
    Register = 3,
    Dht = 4,
}

impl Op {
    pub const ALL: [Op; OPS] = [Op::Publish, Op::Subscribe, Op::Call, Op::Register, Op::Dht];

    pub fn name(self) -> &'static str {
        match self {
            Op::Publish => "publish",
            Op::Subscribe => "subscribe",
            Op::Call => "call",
            Op::Register => "register",
            Op::Dht => "dht",
        }
    }
}

pub const OPS: usize = 5;
/// Latency histogram buckets: two per power of two of microseconds, from 1 µs to ~16 s (the
/// last bucket holds everything slower).
pub const BUCKETS: usize = 48;
/// The histogram bucket of a latency.
pub fn bucket(d: Duration) -> usize {
    let us = (d.as_micros() as u64).max(1);
    let octave = 63 - us.leading_zeros() as usize;
    let half = if octave == 0 {
        0
    } else {
        ((us >> (octave - 1)) & 1) as usize
    };
    (octave * 2 + half).min(BUCKETS - 1)
}

/// A representative latency (µs) for a bucket: the middle of its range.
pub fn bucket_mid_us(b: usize) -> f64 {
    let octave = b / 2;
    let lo = (1u64 << octave) as f64 * if b % 2 == 1 { 1.5 } else { 1.0 };
    let width = (1u64 << octave) as f64 / if octave == 0 { 1.0 } else { 2.0 };
    lo + width / 2.0
}

/// The `p` quantile (0..=1) of a histogram, in milliseconds; `None` when it is empty.
pub fn quantile_ms(hist: &[u64], p: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bucket_mid_us(b) / 1000.0);
        }
    }
    Some(bucket_mid_us(hist.len() - 1) / 1000.0)
}

/// Hours since the Unix epoch.
pub fn hour_of(unix_secs: u64) -> u32 {
    (unix_secs / 3600) as u32
}

/// One row of a usage report: cumulative usage of (realm, key) on the reporting node in `hour`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub realm: String,
    pub key_id: String,
    /// Hours since the Unix epoch.
    pub hour: u32,
    /// Operations by kind, in [`Op`] order.
    pub ops: [u64; OPS],
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Call latency histogram ([`BUCKETS`] entries, see [`bucket`]).
    pub latency: Vec<u64>,
    /// Milliseconds the realm's replicas ran on the node (compute, billed per instance-hour).
    #[serde(default)]
    pub instance_ms: u64,
    /// Bytes of Hub packages delivered to the node for the realm's replicas (from the Hub or
    /// its peers; billed per GiB).
    #[serde(default)]
    pub package_bytes: u64,
}

/// What a node delivers to the aggregator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The node (its mesh peer id, or `standalone`).
    pub node: String,
    /// Identifies the counters file: a node whose file was lost starts a new epoch.
    pub epoch: u64,
    pub rows: Vec<UsageRow>,
}

/// Where reports go (the billing aggregator, in process or across the mesh).
pub trait UsageSink: Send + Sync + 'static {
    fn deliver(
        &self,
        report: UsageReport,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>>;
}
