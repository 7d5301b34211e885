//! Metering: what every realm used on this node, per API key, for billing.
//!
//! **Counting** is a handful of relaxed atomic adds per operation into a *slot* per (realm, API
//! key): operations by kind (PUBLISH, SUBSCRIBE, CALL, REGISTER, DHT lookup), bytes in, bytes out
//! (egress: everything written to the realm's clients) and a latency histogram of calls.
//!
//! **Durability.** The slots live in a memory-mapped file (`meter/counters.bin` in the config
//! directory, `MAP_SHARED`): an add is a store into the kernel's page cache, so a process crash
//! (`kill -9`) loses nothing that was counted, and nothing on the message path waits for a
//! syscall. The file is `msync`ed every `metering.sync_ms`, which bounds what a power loss can
//! take. The file grows on demand, one segment of `metering.slots` slots at a time (each mapped
//! on its own, so counters in earlier segments never move), up to `metering.max_slots`. Which slot is which (realm, key) is an append-only `meter/slots` file, written and
//! synced before the slot is first used.
//!
//! **Delivery is idempotent by construction.** Counters only grow. Each slot remembers a *base*
//! (its counters at the start of the hour being reported) in the same file; a report row says
//! "in hour H, (realm, key) on node N reached these cumulative values". The aggregator keeps the
//! largest value it has seen per (node, file epoch, realm, key, hour), so a row delivered twice,
//! or re-sent after a crash, counts once. At an hour boundary the final row of the old hour is
//! delivered before the base moves; a crash in between re-sends the old hour, which may then
//! include a few operations of the new one (attribution at the boundary is exact to one flush
//! interval; totals are exact).
//!
//! One file per concept: this one holds the counters file (slots, names, segments) — one
//! concept past 600 lines, since its layout, naming and growth are one invariant and are read
//! together; `counter.rs` counting; `shipper.rs` delivery; `events.rs` the raw-event tap.

mod counter;
mod events;
mod shipper;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use self::{counter::*, events::*, shipper::*};

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

pub use macula_common::usage::*;

pub(crate) const IN: usize = OPS;

pub(crate) const OUT: usize = OPS + 1;

pub(crate) const HIST: usize = OPS + 2;

/// Milliseconds of replicas running (compute, billed per instance-hour).
pub const INSTANCE_MS: usize = OPS + 2 + BUCKETS;

/// Bytes of Hub packages delivered for the realm's replicas (billed per GiB).
pub const PACKAGE_BYTES: usize = INSTANCE_MS + 1;

/// Counters per slot: operations by kind, bytes in, bytes out, histogram, compute, package
/// delivery.
pub const COUNTERS: usize = OPS + 2 + BUCKETS + 2;

pub(crate) const SLOT_WORDS: usize = 128;

// The current counters end where the base begins, and the base within the slot.
const _: () = assert!(CUR + COUNTERS <= BASE && BASE + COUNTERS <= SLOT_WORDS);

/// Word 0 of a slot: the hour its base belongs to. Then the counters, then the base.
pub(crate) const HOUR: usize = 0;

pub(crate) const CUR: usize = 7;

pub(crate) const BASE: usize = 64;

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"MACMETR3");

/// The format before package delivery was counted: the current counters one word later
/// (`CUR` 8), one fewer. Such a file is converted in place when opened (see
/// [`Meter::upgrade_v2`]).
pub(crate) const MAGIC_V2: u64 = u64::from_le_bytes(*b"MACMETR2");

/// Word 1 of a slot (unused before): [`V3`] once the slot is in this format, and while it is
/// converted `MOVING + j`, `j` the counters moved so far (so a conversion cut short resumes at
/// the word where it stopped and moves none twice).
pub(crate) const SLOT_FORMAT: usize = 1;
pub(crate) const V3: u64 = 3;
pub(crate) const MOVING: u64 = 1_000;

/// Slot names by slot number, and the file they are appended to
/// (`slot<TAB>realm<TAB>key<TAB>owner`; the last line for a slot wins). Slot 0 is the file
/// header; slot 1 is reserved (it counted unattributed usage in older versions: nothing is ever
/// counted unattributed now — a pair that cannot get a slot is refused).
pub(crate) struct Names {
    pub(crate) by_slot: BTreeMap<u32, SlotName>,
    pub(crate) file: Option<File>,
    /// Slots reclaimed after their usage was delivered, to hand out again.
    pub(crate) free: Vec<u32>,
    /// Named slots per owner (the registration a key belongs to).
    pub(crate) per_owner: HashMap<String, usize>,
    /// Lines in the names file (it is rewritten when mostly superseded).
    pub(crate) lines: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotName {
    pub(crate) realm: String,
    pub(crate) key: String,
    pub(crate) owner: String,
}

impl Names {
    fn name(&mut self, slot: u32, n: SlotName) {
        *self.per_owner.entry(n.owner.clone()).or_default() += 1;
        if let Some(old) = self.by_slot.insert(slot, n) {
            self.forget_owner(&old.owner);
        }
    }

    fn forget_owner(&mut self, owner: &str) {
        if let Some(c) = self.per_owner.get_mut(owner) {
            *c -= 1;
            if *c == 0 {
                self.per_owner.remove(owner);
            }
        }
    }
}

pub(crate) const RESERVED: u32 = 1;

/// A named pair's slot and the token its counters hold.
pub(crate) type SlotRef = (u32, Arc<()>);

/// Why a (realm, key) pair got no counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoSlot {
    /// Every slot holds usage not yet delivered, or a live session's counter.
    Full(usize),
    /// The owner already has this many pairs metered on this node.
    OwnerLimit(usize),
    /// The slot's name could not be written (disk full?).
    Disk,
}

impl std::fmt::Display for NoSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoSlot::Full(n) => write!(
                f,
                "this node meters {n} (realm, key) pairs already (metering.max_slots, or the disk is full); try again later or another node"
            ),
            NoSlot::OwnerLimit(n) => write!(
                f,
                "this realm's registration has {n} (realm, key) pairs metered on this node \
                 (metering.max_pairs_per_registration): use fewer subrealms or keys at once; \
                 pairs idle since the last hour are released"
            ),
            NoSlot::Disk => write!(f, "this node cannot record usage (disk full?)"),
        }
    }
}

/// Segments the counters file may grow to (with `metering.max_slots`).
pub(crate) const MAX_SEGMENTS: usize = 1024;

/// A zeroed slot, read where a slot's segment is not mapped (never, for a slot handed out).
pub(crate) static NO_SLOT: [AtomicU64; SLOT_WORDS] = [const { AtomicU64::new(0) }; SLOT_WORDS];

/// The slot file.
pub struct Meter {
    /// The mapped segments, `per_segment` slots each; segment 0 starts with the header slot.
    pub(crate) segments: Vec<std::sync::OnceLock<memmap2::MmapMut>>,
    pub(crate) per_segment: usize,
    /// Slots usable now (numbers 2..=slots; the mapped segments hold them).
    pub(crate) slots: std::sync::atomic::AtomicUsize,
    pub(crate) epoch: u64,
    /// Slot of each named pair, with the token every [`Counter`] of it holds (a slot whose
    /// token is held only here has no live counter and may be reclaimed).
    pub(crate) index: RwLock<HashMap<(String, String), SlotRef>>,
    pub(crate) names: Mutex<Names>,
    pub(crate) dir: Option<PathBuf>,
    pub(crate) full_warned: AtomicBool,
    /// Pairs one owner may have metered at once (0: no limit).
    pub(crate) owner_limit: AtomicU64,
    /// The newest hour the shipper closed slots into: a slot named later starts no earlier, so
    /// a pair whose slot was released never reports into an hour already closed for it.
    pub(crate) hour_floor: AtomicU64,
    /// The counters file, held open for its lock (and to map new segments from).
    pub(crate) file: Option<File>,
}

/// Reserves the file's blocks, so that a full disk is an error now rather than a SIGBUS when
/// a counter first touches a page.
#[cfg(unix)]
pub(crate) fn reserve(f: &File, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor this function borrows.
    match unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len as libc::off_t) } {
        0 => Ok(()),
        // File systems without fallocate: a sparse file, as before (never shorter).
        libc::EOPNOTSUPP | libc::EINVAL => grow(f, len),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Extends `f` to `len` bytes if it is shorter (never truncates).
pub(crate) fn grow(f: &File, len: usize) -> std::io::Result<()> {
    if (f.metadata()?.len() as usize) < len {
        f.set_len(len as u64)?;
    }
    Ok(())
}

#[cfg(not(unix))]
pub(crate) fn reserve(f: &File, len: usize) -> std::io::Result<()> {
    grow(f, len)
}

/// Maps `len` bytes of the counters file from `offset` (a multiple of the page size).
pub(crate) fn map_segment(
    f: &File,
    offset: usize,
    len: usize,
) -> std::io::Result<memmap2::MmapMut> {
    // SAFETY: the file is this node's own (locked in `Meter::open`); nothing else maps or
    // truncates it while the node runs, and it only grows.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset as u64)
            .len(len)
            .map_mut(f)
    }
}

impl Meter {
    /// Opens (or creates) the slot file in `dir`, or an in-memory one when `dir` is `None`
    /// (usage then lives as long as the process).
    /// It starts with `slots` slots and grows, a segment of that many at a time, up to
    /// `max_slots`.
    pub fn open(dir: Option<&Path>, slots: usize, max_slots: usize) -> anyhow::Result<Arc<Meter>> {
        use anyhow::Context;
        // Segments are whole pages (four 1 KiB slots), so each can be mapped on its own.
        let per_segment = (slots.max(16) + 1).next_multiple_of(4);
        let seg_bytes = per_segment * SLOT_WORDS * 8;
        let max_segments = max_slots
            .max(slots)
            .div_ceil(per_segment)
            .clamp(1, MAX_SEGMENTS);
        // Whether a file of unknown content must be cleared before use (a new one is zeros).
        let mut stale = false;
        let mut mapped = 1;
        let (map, names, file, counters) = match dir {
            None => (memmap2::MmapMut::map_anon(seg_bytes)?, vec![], None, None),
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
                let path = d.join("counters.bin");
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                // One node per counters file: a second one would double-count.
                if f.try_lock().is_err() {
                    anyhow::bail!(
                        "{} is in use by another node: give each node its own --data-dir \
                         (or metering.dir in node.yaml), or turn metering off (metering.enabled: false)",
                        path.display()
                    );
                }
                let have = f.metadata()?.len() as usize;
                stale = have > 0;
                // Segments a grown file already has are mapped again (their slots are named).
                mapped = (have / seg_bytes).clamp(1, max_segments);
                if have < seg_bytes {
                    reserve(&f, seg_bytes).with_context(|| {
                        format!("cannot reserve {seg_bytes} bytes for {}", path.display())
                    })?;
                }
                let map = map_segment(&f, 0, seg_bytes)
                    .with_context(|| format!("cannot map {}", path.display()))?;
                let names_path = d.join("slots");
                let names = match File::open(&names_path) {
                    Ok(f) => BufReader::new(f)
                        .lines()
                        .map_while(Result::ok)
                        .filter_map(|l| {
                            // A torn last line (a crash mid-write) has no key and is skipped:
                            // its slot was never handed out.
                            let mut it = l.splitn(4, '\t');
                            let slot: u32 = it.next()?.parse().ok()?;
                            let realm = it.next()?.to_owned();
                            let key = it.next()?.to_owned();
                            let owner = it.next().unwrap_or_default().to_owned();
                            Some((slot, SlotName { realm, key, owner }))
                        })
                        .collect::<Vec<_>>(),
                    Err(_) => vec![],
                };
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&names_path)
                    .with_context(|| format!("cannot open {}", names_path.display()))?;
                (map, names, Some(file), Some(f))
            }
        };
        let segments: Vec<std::sync::OnceLock<memmap2::MmapMut>> = (0..max_segments)
            .map(|_| std::sync::OnceLock::new())
            .collect();
        let _ = segments[0].set(map);
        let mut meter = Meter {
            segments,
            per_segment,
            slots: std::sync::atomic::AtomicUsize::new(per_segment - 1),
            epoch: 0,
            index: RwLock::new(HashMap::new()),
            names: Mutex::new(Names {
                by_slot: BTreeMap::new(),
                file,
                free: vec![],
                per_owner: HashMap::new(),
                lines: 0,
            }),
            dir: dir.map(Path::to_path_buf),
            full_warned: AtomicBool::new(false),
            owner_limit: AtomicU64::new(0),
            hour_floor: AtomicU64::new(0),
            file: counters,
        };
        for _ in 1..mapped {
            if !meter.map_next_segment() {
                break;
            }
        }
        let slots = meter.slots.load(Ordering::Relaxed);
        let w = meter.words();
        let lines = names.len();
        if w[0].load(Ordering::Relaxed) == MAGIC_V2 && w[1].load(Ordering::Relaxed) != 0 {
            meter.upgrade_v2();
        }
        let w = meter.words();
        let names = if w[0].load(Ordering::Relaxed) == MAGIC && w[1].load(Ordering::Relaxed) != 0 {
            meter.epoch = w[1].load(Ordering::Relaxed);
            names
        } else {
            // A new file (or one of an unknown format): a new epoch, empty slots, and the slot
            // names of an older file mean nothing.
            if stale {
                // Every segment of the old file: a slot handed out later must start empty.
                for seg in 0..meter.segments.len() {
                    for x in meter.segment_words(seg).unwrap_or(&[]) {
                        x.store(0, Ordering::Relaxed);
                    }
                }
                // And nothing past the mapped segments: growth later extends with zeros.
                if let Some(f) = &meter.file {
                    let mapped = (meter.slots.load(Ordering::Relaxed) + 1) * SLOT_WORDS * 8;
                    if let Err(e) = f.set_len(mapped as u64) {
                        tracing::warn!("metering: cannot clear the old counters file's tail: {e}");
                    }
                }
            }
            let e = rand::random::<u64>().max(1);
            w[0].store(MAGIC, Ordering::Relaxed);
            w[1].store(e, Ordering::Relaxed);
            meter.epoch = e;
            if let Some(d) = dir {
                std::fs::write(d.join("slots"), b"")?;
            }
            vec![]
        };
        {
            let mut n = meter.names.lock();
            n.lines = lines;
            // The last line for a slot names it, and a pair named again in another slot (after
            // its first slot was released) is only in the newest one.
            let mut slot_of: HashMap<(String, String), u32> = HashMap::new();
            for (slot, name) in names {
                // Slots beyond a (since reduced) `metering.slots` are not used.
                if slot <= RESERVED || (slot as usize) > slots {
                    continue;
                }
                // A release (`slot` with an empty name): the slot is free.
                if name.realm.is_empty() {
                    if let Some(gone) = n.by_slot.remove(&slot) {
                        n.forget_owner(&gone.owner);
                        slot_of.remove(&(gone.realm, gone.key));
                    }
                    continue;
                }
                let pair = (name.realm.clone(), name.key.clone());
                if let Some(old) = slot_of.insert(pair, slot) {
                    if old != slot {
                        if let Some(gone) = n.by_slot.remove(&old) {
                            n.forget_owner(&gone.owner);
                        }
                    }
                }
                if let Some(prev) = n.by_slot.get(&slot) {
                    slot_of.remove(&(prev.realm.clone(), prev.key.clone()));
                }
                n.name(slot, name);
            }
            // Every slot without a name is free (released ones included), smallest first.
            let named: std::collections::HashSet<u32> = n.by_slot.keys().copied().collect();
            n.free = (RESERVED + 1..=slots as u32)
                .rev()
                .filter(|s| !named.contains(s))
                .collect();
            let mut idx = meter.index.write();
            for (slot, name) in &n.by_slot {
                idx.insert(
                    (name.realm.clone(), name.key.clone()),
                    (*slot, Arc::new(())),
                );
            }
        }
        meter.sync();
        Ok(Arc::new(meter))
    }

    /// Limits the pairs one owner may have metered on this node at once (0: none).
    pub fn set_owner_limit(&self, n: usize) {
        self.owner_limit.store(n as u64, Ordering::Relaxed);
    }

    /// Named slots (pairs being metered), and those of `owner`.
    pub fn named(&self, owner: &str) -> (usize, usize) {
        let n = self.names.lock();
        (
            n.by_slot.len(),
            n.per_owner.get(owner).copied().unwrap_or(0),
        )
    }

    /// The words of segment `seg`, if it is mapped.
    fn segment_words(&self, seg: usize) -> Option<&[AtomicU64]> {
        let map = self.segments.get(seg)?.get()?;
        // SAFETY: the map is page-aligned, `len` bytes long and lives as long as `self`;
        // `AtomicU64` has the layout of `u64`, and every access to the mapped words goes
        // through these atomics.
        Some(unsafe { std::slice::from_raw_parts(map.as_ptr() as *const AtomicU64, map.len() / 8) })
    }

    /// Converts a file of the previous format (`MACMETR2`) in place, keeping its epoch and
    /// every count: in each slot the current counters move one word down, and the new counter
    /// (package bytes) starts at zero. Each slot is marked when moved, and the header last, so
    /// a conversion cut short resumes where it stopped.
    fn upgrade_v2(&self) {
        const OLD_CUR: usize = 8;
        let old_counters = COUNTERS - 1;
        for seg in 0..self.segments.len() {
            let Some(words) = self.segment_words(seg) else {
                continue;
            };
            for (i, s) in words.chunks(SLOT_WORDS).enumerate() {
                if (seg == 0 && i == 0) || s.len() < SLOT_WORDS {
                    continue;
                }
                let mark = s[SLOT_FORMAT].load(Ordering::Relaxed);
                if mark == V3 {
                    continue;
                }
                // Word `CUR + j` is written from `OLD_CUR + j`, which no earlier step wrote: a
                // resumed conversion finds every word it still needs where it was.
                let from = match mark {
                    m if (MOVING..=MOVING + old_counters as u64).contains(&m) => {
                        (m - MOVING) as usize
                    }
                    _ => 0,
                };
                for j in from..old_counters {
                    s[CUR + j].store(s[OLD_CUR + j].load(Ordering::Relaxed), Ordering::Relaxed);
                    s[SLOT_FORMAT].store(MOVING + j as u64 + 1, Ordering::Relaxed);
                }
                s[CUR + old_counters].store(0, Ordering::Relaxed);
                s[BASE + old_counters].store(0, Ordering::Relaxed);
                s[SLOT_FORMAT].store(V3, Ordering::Relaxed);
            }
        }
        self.sync();
        self.words()[0].store(MAGIC, Ordering::Relaxed);
        tracing::info!("metering: the counters file was converted to the current format");
    }

    /// The header (slot 0 of segment 0, always mapped).
    fn words(&self) -> &[AtomicU64] {
        self.segment_words(0).unwrap_or(&NO_SLOT)
    }

    fn slot(&self, i: u32) -> &[AtomicU64] {
        let (seg, at) = (i as usize / self.per_segment, i as usize % self.per_segment);
        match self.segment_words(seg) {
            Some(w) => &w[at * SLOT_WORDS..(at + 1) * SLOT_WORDS],
            None => &NO_SLOT,
        }
    }

    /// Maps the next segment (extending the file), making its slots usable; `false` when the
    /// file is at `metering.max_slots` or cannot grow (disk full).
    fn map_next_segment(&self) -> bool {
        let seg = (self.slots.load(Ordering::Relaxed) + 1) / self.per_segment;
        if seg >= self.segments.len() {
            return false;
        }
        let bytes = self.per_segment * SLOT_WORDS * 8;
        let map = match &self.file {
            None => memmap2::MmapMut::map_anon(bytes),
            Some(f) => {
                reserve(f, (seg + 1) * bytes).and_then(|_| map_segment(f, seg * bytes, bytes))
            }
        };
        match map {
            Ok(m) => {
                let _ = self.segments[seg].set(m);
                self.slots
                    .store((seg + 1) * self.per_segment - 1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!("metering: cannot grow the counters file: {e}");
                false
            }
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn refuse(&self, why: NoSlot) -> NoSlot {
        if !self.full_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                slots = self.slots.load(Ordering::Relaxed),
                "metering: {why}; new (realm, key) pairs are refused until slots are released"
            );
        }
        why
    }

    /// The counter of (realm, key), whose key belongs to `owner` (the realm registration's
    /// authority), creating its slot on first use. A slot is handed out only once its name is on
    /// disk. Without one (every slot holds undelivered usage or a live counter, the owner is at
    /// its limit, or the name cannot be written) the pair is refused: usage is never counted
    /// where it would not be billed.
    pub fn counter_for(
        self: &Arc<Self>,
        realm: &str,
        key_id: &str,
        owner: &str,
    ) -> Result<Counter, NoSlot> {
        let k = (realm.to_owned(), key_id.to_owned());
        if let Some((slot, hold)) = self.index.read().get(&k) {
            return Ok(Counter {
                meter: self.clone(),
                slot: *slot,
                _hold: hold.clone(),
            });
        }
        let mut names = self.names.lock();
        if let Some((slot, hold)) = self.index.read().get(&k) {
            return Ok(Counter {
                meter: self.clone(),
                slot: *slot,
                _hold: hold.clone(),
            });
        }
        let limit = self.owner_limit.load(Ordering::Relaxed) as usize;
        let owned = names.per_owner.get(owner).copied().unwrap_or(0);
        if limit > 0 && owned >= limit {
            return Err(NoSlot::OwnerLimit(limit));
        }
        if names.free.is_empty() {
            // Grow by a segment: its slots are new (zeros), smallest handed out first.
            let before = self.slots.load(Ordering::Relaxed);
            if self.map_next_segment() {
                let after = self.slots.load(Ordering::Relaxed);
                names.free.extend((before as u32 + 1..=after as u32).rev());
                tracing::info!(slots = after, "metering: counters file grown");
            }
        }
        let Some(slot) = names.free.pop() else {
            return Err(self.refuse(NoSlot::Full(self.slots.load(Ordering::Relaxed))));
        };
        if let Some(f) = names.file.as_mut() {
            let line = format!("{slot}\t{}\t{}\t{owner}\n", k.0, k.1);
            if f.write_all(line.as_bytes())
                .and_then(|_| f.sync_data())
                .is_err()
            {
                names.free.push(slot);
                return Err(self.refuse(NoSlot::Disk));
            }
        }
        names.lines += 1;
        // Whatever an earlier life of the slot left in it is not this pair's usage.
        let s = self.slot(slot);
        for j in 0..COUNTERS {
            s[BASE + j].store(s[CUR + j].load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let hour = u64::from(hour_of(macula_common::time::now_secs()))
            .max(self.hour_floor.load(Ordering::Relaxed));
        s[HOUR].store(hour, Ordering::Relaxed);
        names.name(
            slot,
            SlotName {
                realm: k.0.clone(),
                key: k.1.clone(),
                owner: owner.to_owned(),
            },
        );
        let hold = Arc::new(());
        self.index.write().insert(k, (slot, hold.clone()));
        Ok(Counter {
            meter: self.clone(),
            slot,
            _hold: hold,
        })
    }

    /// [`Meter::counter_for`] with no owner, for tests.
    #[cfg(test)]
    pub fn counter(self: &Arc<Self>, realm: &str, key_id: &str) -> Counter {
        self.counter_for(realm, key_id, "").expect("a free slot")
    }

    /// Releases `slot` for another pair if nothing counts into it any more and everything it
    /// counted was delivered: no live [`Counter`] holds it, and its counters are still those of
    /// the final report of its last hour (`delivered`). Usage of its pair later is counted in a
    /// new hour, so the aggregator's rows stay exact.
    fn reclaim(&self, slot: u32, delivered: &[u64; COUNTERS]) -> bool {
        let mut names = self.names.lock();
        let Some(name) = names.by_slot.get(&slot).cloned() else {
            return false;
        };
        let k = (name.realm, name.key);
        {
            let mut index = self.index.write();
            match index.get(&k) {
                Some((s, hold)) if *s == slot && Arc::strong_count(hold) == 1 => {}
                _ => return false,
            }
            // The last counter's adds happen before its drop; see them before comparing.
            std::sync::atomic::fence(Ordering::Acquire);
            let cur = self.slot(slot);
            if (0..COUNTERS).any(|j| cur[CUR + j].load(Ordering::Relaxed) != delivered[j]) {
                return false;
            }
            index.remove(&k);
        }
        names.by_slot.remove(&slot);
        names.forget_owner(&name.owner);
        names.free.push(slot);
        // Recorded, so that a restart finds the slot free (losing this line only delays that
        // to the next release).
        if let Some(f) = names.file.as_mut() {
            if f.write_all(format!("{slot}\t\t\t\n").as_bytes()).is_ok() {
                names.lines += 1;
            }
        }
        // The names file keeps every assignment; rewrite it when it is mostly superseded.
        if names.lines > 2 * names.by_slot.len() + 1024 {
            if let Err(e) = self.rewrite_names(&mut names) {
                tracing::warn!("metering: cannot compact the slot names file: {e}");
            }
        }
        self.full_warned.store(false, Ordering::Relaxed);
        true
    }

    /// Rewrites the names file with the current names only (write, sync, rename).
    fn rewrite_names(&self, names: &mut Names) -> std::io::Result<()> {
        let Some(d) = &self.dir else { return Ok(()) };
        let tmp = d.join("slots.tmp");
        let mut f = File::create(&tmp)?;
        let mut text = String::new();
        for (slot, n) in &names.by_slot {
            text.push_str(&format!("{slot}\t{}\t{}\t{}\n", n.realm, n.key, n.owner));
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, d.join("slots"))?;
        names.file = Some(OpenOptions::new().append(true).open(d.join("slots"))?);
        names.lines = names.by_slot.len();
        Ok(())
    }

    /// Writes the counters to disk (against power loss; a process crash loses nothing anyway).
    pub fn sync(&self) {
        if self.dir.is_some() {
            for m in self.segments.iter().filter_map(|s| s.get()) {
                if let Err(e) = m.flush() {
                    tracing::warn!("metering: cannot sync the counters file: {e}");
                }
            }
        }
    }

    /// Current cumulative counters of every slot, for the metrics endpoint: (realm, key, totals).
    pub fn totals(&self) -> Vec<(String, String, [u64; COUNTERS])> {
        let names = self.names.lock().by_slot.clone();
        names
            .into_iter()
            .map(
                |(
                    slot,
                    SlotName {
                        realm: r, key: k, ..
                    },
                )| {
                    let s = self.slot(slot);
                    let mut c = [0u64; COUNTERS];
                    for (j, v) in c.iter_mut().enumerate() {
                        *v = s[CUR + j].load(Ordering::Relaxed);
                    }
                    (r, k, c)
                },
            )
            .collect()
    }
}
