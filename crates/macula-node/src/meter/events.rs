//! The sampled raw-event tap (`metering.events_sample`): operations in the seed's JSON shape,
//! written as JSON lines.

#[allow(unused_imports)]
use super::*;

/// One raw operation event, in the seed's shape. `api_key` is the key's id: the key itself is a
/// secret and never leaves the node.
#[derive(Debug, Clone, Serialize)]
pub struct OpEvent {
    pub timestamp: String,
    pub realm: String,
    pub node_id: String,
    pub operation: &'static str,
    pub topic: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency_ms: Option<f64>,
    pub api_key: String,
}

/// The opt-in, sampled stream of raw events (`metering.events_sample`): one operation in
/// `every` is queued for a writer task; when the queue is full, events are dropped (counted),
/// never waited for.
pub struct EventTap {
    pub(crate) every: u64,
    pub(crate) seq: AtomicU64,
    pub(crate) tx: tokio::sync::mpsc::Sender<OpEvent>,
    pub dropped: AtomicU64,
}

impl EventTap {
    pub fn new(every: u64) -> (EventTap, tokio::sync::mpsc::Receiver<OpEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        (
            EventTap {
                every: every.max(1),
                seq: AtomicU64::new(0),
                tx,
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Whether this operation is sampled (cheap: one relaxed add).
    #[inline]
    pub fn sample(&self) -> bool {
        self.seq
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.every)
    }

    pub fn offer(&self, e: OpEvent) {
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Appends sampled events to `path` as JSON lines until the tap is gone.
pub async fn write_events(path: PathBuf, mut rx: tokio::sync::mpsc::Receiver<OpEvent>) {
    use tokio::io::AsyncWriteExt;
    if let Some(parent) = path.parent() {
        let _ = tokio::fs::create_dir_all(parent).await;
    }
    let file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("metering events: cannot open {}: {e}", path.display());
            return;
        }
    };
    let mut w = tokio::io::BufWriter::new(file);
    while let Some(e) = rx.recv().await {
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        if w.write_all(&line).await.is_err() {
            return;
        }
        // Write what queued up, then flush before waiting again.
        while let Ok(e) = rx.try_recv() {
            let mut line = serde_json::to_vec(&e).unwrap_or_default();
            line.push(b'\n');
            if w.write_all(&line).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}
