//! This node as a lease authority (`macula_workloads::lease::Authority`): its promises kept in
//! `workloads/promises.json` and written before any answer that depends on them, its clock, and
//! its bound on slots. Imports nothing of the node.
//!
//! The clock is the wall clock in milliseconds, so that grants persisted before a restart keep
//! their meaning after it. A clock set back makes this authority's grants last longer (safe); a
//! clock set forward ends them early, which the holders' margin covers only up to its size.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use macula_workloads::lease::{Authority, Refusal, Reply, Request, SlotPromise};
use parking_lot::Mutex;

/// A lease's term, and the most slots an authority keeps.
pub const TERM_MS: u64 = 10_000;
pub const MAX_SLOTS: usize = 100_000;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct LeaseAuthority {
    inner: Mutex<Authority>,
    file: Option<PathBuf>,
}

impl LeaseAuthority {
    /// Restores the promises kept at `file`. No file: a node that never promised anything.
    /// A file that cannot be read: its promises are lost, and the authority abstains for a term.
    pub fn load(file: Option<PathBuf>) -> LeaseAuthority {
        let restored: Option<BTreeMap<String, SlotPromise>> =
            match file.as_ref().map(std::fs::read_to_string) {
                None => Some(BTreeMap::new()),
                Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Some(BTreeMap::new()),
                Some(Err(e)) => {
                    tracing::error!("lease promises unreadable ({e}): abstaining for one term");
                    None
                }
                Some(Ok(text)) => match serde_json::from_str(&text) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::error!("lease promises unreadable ({e}): abstaining for one term");
                        None
                    }
                },
            };
        LeaseAuthority {
            inner: Mutex::new(Authority::new(TERM_MS, restored, now_ms())),
            file,
        }
    }

    /// Answers `req`. A changed promise is written before the answer is returned; if it cannot
    /// be written, the answer is a refusal (a promise not kept must not be given).
    pub fn handle(&self, req: &Request) -> Reply {
        let slot = match req {
            Request::Acquire { slot, .. }
            | Request::Release { slot, .. }
            | Request::Provisional { slot, .. } => slot,
        };
        let mut a = self.inner.lock();
        if !a.knows(slot) && a.slots() >= MAX_SLOTS {
            return Reply::Refused {
                slot: slot.clone(),
                why: Refusal::Full,
            };
        }
        let (reply, changed) = a.handle(req, now_ms());
        if changed.is_some() {
            if let Some(f) = &self.file {
                if let Err(e) = write(f, &a.promises()) {
                    tracing::error!("keeping a lease promise: {e}");
                    return Reply::Refused {
                        slot: slot.clone(),
                        why: Refusal::Full,
                    };
                }
            }
        }
        reply
    }
}

fn write(file: &PathBuf, promises: &BTreeMap<String, SlotPromise>) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(promises)?)?;
    std::fs::rename(&tmp, file)
}
