//! Counting: a session's (or bridge request's) [`Counter`] into its slot, and the per-session
//! call timing that feeds the latency histogram.

#[allow(unused_imports)]
use super::*;

/// The counters of one (realm, key). Cheap to clone; every method is a few relaxed adds.
#[derive(Clone)]
pub struct Counter {
    pub(crate) meter: Arc<Meter>,
    pub(crate) slot: u32,
    /// Keeps the slot from being reclaimed while this counter lives.
    pub(crate) _hold: Arc<()>,
}

impl Counter {
    #[inline]
    fn add(&self, i: usize, n: u64) {
        self.meter.slot(self.slot)[CUR + i].fetch_add(n, Ordering::Relaxed);
    }

    /// One operation of `kind` whose request was `bytes_in` bytes.
    #[inline]
    pub fn op(&self, kind: Op, bytes_in: usize) {
        let s = self.meter.slot(self.slot);
        s[CUR + kind as usize].fetch_add(1, Ordering::Relaxed);
        s[CUR + IN].fetch_add(bytes_in as u64, Ordering::Relaxed);
    }

    /// Bytes written to a client of the realm.
    #[inline]
    pub fn egress(&self, bytes: usize) {
        self.add(OUT, bytes as u64);
    }

    /// A call's latency, from its CALL to its final RESULT or ERROR.
    #[inline]
    pub fn latency(&self, d: Duration) {
        self.add(HIST + bucket(d), 1);
    }

    /// A replica of the realm ran for `ms` milliseconds (compute).
    #[inline]
    pub fn instance_ms(&self, ms: u64) {
        self.add(INSTANCE_MS, ms);
    }

    /// `bytes` of a Hub package were delivered to this node for a replica of the realm.
    #[inline]
    pub fn package_bytes(&self, bytes: u64) {
        self.add(PACKAGE_BYTES, bytes);
    }
}

/// A session's metering: its counter and the start times of its calls in flight.
pub struct SessionMeter {
    pub counter: Counter,
    pub(crate) calls: Mutex<HashMap<u64, Instant>>,
}

/// Calls tracked per session for latency; beyond that, calls go unmeasured (still counted).
pub(crate) const MAX_TRACKED_CALLS: usize = 65_536;

impl SessionMeter {
    pub fn new(counter: Counter) -> SessionMeter {
        SessionMeter {
            counter,
            calls: Mutex::new(HashMap::new()),
        }
    }

    pub fn call_started(&self, request: u64, at: Instant) {
        let mut c = self.calls.lock();
        if c.len() < MAX_TRACKED_CALLS {
            c.insert(request, at);
        }
    }

    /// A call that was refused before it started.
    pub fn call_forget(&self, request: u64) {
        self.calls.lock().remove(&request);
    }

    /// The final answer to a call went out.
    pub fn call_done(&self, request: u64) {
        if let Some(t) = self.calls.lock().remove(&request) {
            self.counter.latency(t.elapsed());
        }
    }
}
