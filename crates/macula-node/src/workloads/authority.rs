//! This node as a lease authority (`macula_workloads::lease::Authority`): its promises kept in
//! `workloads/promises.json` and written before any answer that depends on them, its clock, and
//! its bound on slots. Imports nothing of the node.
//!
//! The clock is the wall clock in milliseconds, so that grants persisted before a restart keep
//! their meaning after it. A clock set back makes this authority's grants last longer (safe); a
//! clock set forward ends them early, which the holders' margin covers only up to its size.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use macula_workloads::lease::{
    Ask, Authority, Cfg, Handover, Refusal, Reply, Request, SlotPromise,
};
use parking_lot::Mutex;

/// The most slots an authority keeps, and the most of them one node may have made it keep (so
/// that one peer cannot take all the room). The lease term is `workloads.lease_term_ms`.
pub const MAX_SLOTS: usize = 100_000;
pub const MAX_SLOTS_PER_PEER: usize = 10_000;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct LeaseAuthority {
    inner: Mutex<Inner>,
    file: Option<PathBuf>,
}

struct Inner {
    authority: Authority,
    /// Slots each holder made this authority keep (since it started).
    made_by: HashMap<String, usize>,
}

impl LeaseAuthority {
    /// Restores the promises kept at `file`. No file: a node that never promised anything.
    /// A file that cannot be read: its promises are lost, and the authority abstains for a term.
    pub fn load(file: Option<PathBuf>, term_ms: u64) -> LeaseAuthority {
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
            inner: Mutex::new(Inner {
                authority: Authority::new(term_ms, restored, now_ms()),
                made_by: HashMap::new(),
            }),
            file,
        }
    }

    /// Whether this authority has kept `slot` (granted or promised it).
    pub fn knows(&self, slot: &str) -> bool {
        self.inner.lock().authority.knows(slot)
    }

    /// The node whose lease on `slot` this authority counts as running now.
    pub fn holder(&self, slot: &str) -> Option<String> {
        self.inner.lock().authority.holder(slot, now_ms()).cloned()
    }

    /// Whether this authority ever promised a token for `slot`.
    pub fn granted_before(&self, slot: &str) -> bool {
        self.inner
            .lock()
            .authority
            .promises_of(slot)
            .is_some_and(|p| p.promised > 0)
    }

    /// The configuration of `slot` this authority serves (not being moved).
    pub fn active(&self, slot: &str) -> Option<Cfg> {
        self.inner.lock().authority.active(slot).cloned()
    }

    /// The configuration of `slot` this authority is a member of, unless it knows its
    /// successor (see `lease::Authority::member_of`).
    pub fn member_of(&self, slot: &str) -> Option<Cfg> {
        self.inner.lock().authority.member_of(slot).cloned()
    }

    /// The newest configuration of `slot` this authority knows of.
    pub fn newest(&self, slot: &str) -> Option<Cfg> {
        self.inner.lock().authority.newest(slot)
    }

    /// Every slot this authority is a member of a configuration of, with the configuration and
    /// whether a move froze it.
    pub fn configs(&self) -> Vec<(String, Cfg, bool)> {
        self.inner.lock().authority.configs()
    }

    /// `slot`'s first configuration `cfg` is not the slot's after all (see
    /// `lease::Authority::abandon`); kept on disk.
    pub fn abandon(&self, slot: &str, cfg: &Cfg) {
        let mut inner = self.inner.lock();
        let changed = inner.authority.abandon(slot, cfg).is_some();
        self.keep(&inner.authority, changed);
    }

    /// `slot`'s configuration `epoch` was succeeded by `newer` (see
    /// `lease::Authority::superseded`); kept on disk.
    pub fn superseded(&self, slot: &str, epoch: u64, newer: &Cfg) {
        let mut inner = self.inner.lock();
        let changed = inner.authority.superseded(slot, epoch, newer).is_some();
        self.keep(&inner.authority, changed);
    }

    /// Writes `a`'s promises to the file when `changed`; false if they could not be kept.
    fn keep(&self, a: &Authority, changed: bool) -> bool {
        let (true, Some(f)) = (changed, &self.file) else {
            return true;
        };
        match write(f, &a.promises()) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("keeping a lease promise: {e}");
                false
            }
        }
    }

    /// What this authority holds for `slot`, as a move hands it on.
    pub fn handover(&self, slot: &str) -> Handover {
        self.inner.lock().authority.handover(slot, now_ms())
    }

    /// Takes `cfg` on as `slot`'s first configuration (from its deploy record), unless the slot
    /// is kept here already. False if it could not be kept on disk.
    pub fn adopt(&self, slot: &str, cfg: Cfg) -> bool {
        let mut inner = self.inner.lock();
        if inner.authority.slots() >= MAX_SLOTS && !inner.authority.knows(slot) {
            return false;
        }
        if inner.authority.adopt(slot, cfg).is_none() {
            return true;
        }
        self.keep(&inner.authority, true)
    }

    /// Answers `ask`. A lease request must name the configuration it is asked under (a node
    /// that does not know the slot's asks nothing). A changed promise is written before the
    /// answer is returned; if it cannot be written, the answer is a refusal (a promise not
    /// kept must not be given).
    pub fn answer(&self, ask: &Ask) -> Reply {
        let req = &ask.req;
        let (slot, holder) = req.slot_holder();
        let full = || Reply::Refused {
            slot: slot.to_owned(),
            why: Refusal::Full,
        };
        let lease = !req.is_move() && !matches!(req, Request::Release { .. });
        if lease && ask.cfg.is_none() {
            return Reply::Refused {
                slot: slot.to_owned(),
                why: Refusal::Config(self.newest(slot)),
            };
        }
        let mut inner = self.inner.lock();
        let Inner {
            authority: a,
            made_by,
        } = &mut *inner;
        let new = !a.knows(slot);
        if new
            && (a.slots() >= MAX_SLOTS
                || made_by.get(holder).copied().unwrap_or(0) >= MAX_SLOTS_PER_PEER)
        {
            return full();
        }
        let (reply, changed) = a.ask(ask, now_ms());
        if new && a.knows(slot) {
            *made_by.entry(holder.to_owned()).or_default() += 1;
        }
        // A promise that could not be kept on disk is not given (it stays made in memory, which
        // only makes this authority more careful until it restarts).
        if !self.keep(a, changed.is_some()) {
            return full();
        }
        reply
    }
}

fn write(file: &PathBuf, promises: &BTreeMap<String, SlotPromise>) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Durable before the answer that depends on it: the tokens promised (so that they only
    // grow) and the runs counted must survive a power loss, not only a crash of the process.
    let tmp = file.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec(promises)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Cfg {
        Cfg {
            epoch: 2,
            set: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    /// A peer's install of slot `i` (each makes this authority keep a slot).
    fn install(holder: &str, i: usize) -> Ask {
        Ask {
            cfg: None,
            id: 0,
            req: Request::Install {
                slot: format!("com.example/p/{i}"),
                holder: holder.into(),
                cfg: cfg(),
                handover: Handover::default(),
            },
        }
    }

    #[test]
    fn one_peer_cannot_take_all_the_room() {
        let a = LeaseAuthority::load(None, 10_000);
        for i in 0..MAX_SLOTS_PER_PEER {
            assert!(matches!(
                a.answer(&install("greedy", i)),
                Reply::Installed { .. }
            ));
        }
        let next = a.answer(&install("greedy", MAX_SLOTS_PER_PEER));
        assert!(
            matches!(
                next,
                Reply::Refused {
                    why: Refusal::Full,
                    ..
                }
            ),
            "{next:?}"
        );
        // Slots it made this authority keep it may still use; another node still gets room.
        let acquire = Ask {
            cfg: Some(cfg()),
            id: 0,
            req: Request::Acquire {
                slot: "com.example/p/0".into(),
                holder: "greedy".into(),
                token: 1,
                seq: 1,
            },
        };
        assert!(matches!(a.answer(&acquire), Reply::Granted { .. }));
        assert!(matches!(
            a.answer(&install("modest", MAX_SLOTS_PER_PEER + 1)),
            Reply::Installed { .. }
        ));
    }

    #[test]
    fn a_lease_is_asked_under_a_configuration() {
        let a = LeaseAuthority::load(None, 10_000);
        assert!(a.adopt("com.example/p/0", cfg()));
        let ask = |cfg: Option<Cfg>| Ask {
            cfg,
            id: 7,
            req: Request::Acquire {
                slot: "com.example/p/0".into(),
                holder: "n".into(),
                token: 1,
                seq: 1,
            },
        };
        // None, or another one: refused, told the one served.
        for other in [
            None,
            Some(Cfg {
                epoch: 1,
                set: vec!["x".into()],
            }),
        ] {
            assert_eq!(
                a.answer(&ask(other)),
                Reply::Refused {
                    slot: "com.example/p/0".into(),
                    why: Refusal::Config(Some(cfg())),
                }
            );
        }
        assert!(matches!(a.answer(&ask(Some(cfg()))), Reply::Granted { .. }));
    }
}
