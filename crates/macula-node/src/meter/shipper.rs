//! Delivery: the [`Shipper`] turns the counters into cumulative per-hour reports, delivers them
//! to the billing aggregator and moves the bases at hour boundaries.

#[allow(unused_imports)]
use super::*;

/// Rows per usage report a node sends.
pub const SHIP_CHUNK: usize = 1024;

/// Builds reports from the slot file and moves bases once the aggregator has a report.
pub struct Shipper {
    pub(crate) meter: Arc<Meter>,
    pub(crate) node: String,
    /// What was last delivered per slot (skips unchanged rows).
    pub(crate) sent: HashMap<u32, (u32, [u64; COUNTERS])>,
}

impl Shipper {
    pub fn new(meter: Arc<Meter>, node: String) -> Shipper {
        Shipper {
            meter,
            node,
            sent: HashMap::new(),
        }
    }

    /// Delivers what changed since the last delivery to `sink`; `now_secs` decides the hour.
    /// Returns the number of rows delivered.
    pub async fn ship(&mut self, sink: &dyn UsageSink, now_secs: u64) -> Result<usize, String> {
        let now_hour = hour_of(now_secs);
        self.meter
            .hour_floor
            .fetch_max(u64::from(now_hour), Ordering::Relaxed);
        let names = self.meter.names.lock().by_slot.clone();
        let mut rows = vec![];
        // Slots whose hour ended: (slot, counters the final row was built from).
        let mut rebase = vec![];
        let mut sent = vec![];
        for (idx, SlotName { realm, key, .. }) in names {
            let s = self.meter.slot(idx);
            let hour = s[HOUR].load(Ordering::Relaxed) as u32;
            let mut cur = [0u64; COUNTERS];
            let mut val = [0u64; COUNTERS];
            for j in 0..COUNTERS {
                cur[j] = s[CUR + j].load(Ordering::Relaxed);
                val[j] = cur[j].saturating_sub(s[BASE + j].load(Ordering::Relaxed));
            }
            let ended = hour < now_hour;
            if ended {
                rebase.push((idx, cur));
            }
            if self.sent.get(&idx) == Some(&(hour, val)) {
                continue;
            }
            if val.iter().all(|&v| v == 0) && !ended {
                continue;
            }
            sent.push((idx, (hour, val)));
            if val.iter().all(|&v| v == 0) {
                continue;
            }
            let mut ops = [0u64; OPS];
            ops.copy_from_slice(&val[..OPS]);
            rows.push(UsageRow {
                realm,
                key_id: key,
                hour,
                ops,
                bytes_in: val[IN],
                bytes_out: val[OUT],
                latency: val[HIST..HIST + BUCKETS].to_vec(),
                instance_ms: val[INSTANCE_MS],
                package_bytes: val[PACKAGE_BYTES],
            });
        }
        let n = rows.len();
        // In reports of bounded size: a backlog (after an outage, or many pairs in one hour)
        // never becomes one huge frame or transaction. A failure part-way re-sends all of it
        // next time, which changes nothing of what was taken (rows are cumulative).
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            sink.deliver(UsageReport {
                node: self.node.clone(),
                epoch: self.meter.epoch,
                rows: rows.by_ref().take(SHIP_CHUNK).collect(),
            })
            .await?;
        }
        self.sent.extend(sent);
        // The old hour is delivered: its final counters become the new hour's base.
        for (idx, cur) in rebase {
            let s = self.meter.slot(idx);
            for (j, v) in cur.iter().enumerate() {
                s[BASE + j].store(*v, Ordering::Relaxed);
            }
            s[HOUR].store(u64::from(now_hour), Ordering::Relaxed);
            self.sent.remove(&idx);
            // Delivered, and idle since: the slot can serve another pair.
            self.meter.reclaim(idx, &cur);
        }
        Ok(n)
    }
}
