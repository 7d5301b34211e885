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

const IN: usize = OPS;
const OUT: usize = OPS + 1;
const HIST: usize = OPS + 2;
/// Counters per slot: operations by kind, bytes in, bytes out, histogram.
pub const COUNTERS: usize = OPS + 2 + BUCKETS;

const SLOT_WORDS: usize = 128;
/// Word 0 of a slot: the hour its base belongs to. Then the counters, then the base.
const HOUR: usize = 0;
const CUR: usize = 8;
const BASE: usize = 64;
const MAGIC: u64 = u64::from_le_bytes(*b"MACMETR2");

/// Slot names by slot number, and the file they are appended to
/// (`slot<TAB>realm<TAB>key<TAB>owner`; the last line for a slot wins). Slot 0 is the file
/// header; slot 1 is reserved (it counted unattributed usage in older versions: nothing is ever
/// counted unattributed now — a pair that cannot get a slot is refused).
struct Names {
    by_slot: BTreeMap<u32, SlotName>,
    file: Option<File>,
    /// Slots reclaimed after their usage was delivered, to hand out again.
    free: Vec<u32>,
    /// Named slots per owner (the registration a key belongs to).
    per_owner: HashMap<String, usize>,
    /// Lines in the names file (it is rewritten when mostly superseded).
    lines: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SlotName {
    realm: String,
    key: String,
    owner: String,
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

const RESERVED: u32 = 1;

/// A named pair's slot and the token its counters hold.
type SlotRef = (u32, Arc<()>);

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
const MAX_SEGMENTS: usize = 1024;

/// A zeroed slot, read where a slot's segment is not mapped (never, for a slot handed out).
static NO_SLOT: [AtomicU64; SLOT_WORDS] = [const { AtomicU64::new(0) }; SLOT_WORDS];

/// The slot file.
pub struct Meter {
    /// The mapped segments, `per_segment` slots each; segment 0 starts with the header slot.
    segments: Vec<std::sync::OnceLock<memmap2::MmapMut>>,
    per_segment: usize,
    /// Slots usable now (numbers 2..=slots; the mapped segments hold them).
    slots: std::sync::atomic::AtomicUsize,
    epoch: u64,
    /// Slot of each named pair, with the token every [`Counter`] of it holds (a slot whose
    /// token is held only here has no live counter and may be reclaimed).
    index: RwLock<HashMap<(String, String), SlotRef>>,
    names: Mutex<Names>,
    dir: Option<PathBuf>,
    full_warned: AtomicBool,
    /// Pairs one owner may have metered at once (0: no limit).
    owner_limit: AtomicU64,
    /// The newest hour the shipper closed slots into: a slot named later starts no earlier, so
    /// a pair whose slot was released never reports into an hour already closed for it.
    hour_floor: AtomicU64,
    /// The counters file, held open for its lock (and to map new segments from).
    file: Option<File>,
}

/// Reserves the file's blocks, so that a full disk is an error now rather than a SIGBUS when
/// a counter first touches a page.
#[cfg(unix)]
fn reserve(f: &File, len: usize) -> std::io::Result<()> {
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
fn grow(f: &File, len: usize) -> std::io::Result<()> {
    if (f.metadata()?.len() as usize) < len {
        f.set_len(len as u64)?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn reserve(f: &File, len: usize) -> std::io::Result<()> {
    grow(f, len)
}

/// Maps `len` bytes of the counters file from `offset` (a multiple of the page size).
fn map_segment(f: &File, offset: usize, len: usize) -> std::io::Result<memmap2::MmapMut> {
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

/// The counters of one (realm, key). Cheap to clone; every method is a few relaxed adds.
#[derive(Clone)]
pub struct Counter {
    meter: Arc<Meter>,
    slot: u32,
    /// Keeps the slot from being reclaimed while this counter lives.
    _hold: Arc<()>,
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
}

/// A session's metering: its counter and the start times of its calls in flight.
pub struct SessionMeter {
    pub counter: Counter,
    calls: Mutex<HashMap<u64, Instant>>,
}

/// Calls tracked per session for latency; beyond that, calls go unmeasured (still counted).
const MAX_TRACKED_CALLS: usize = 65_536;

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

/// Rows per usage report a node sends.
pub const SHIP_CHUNK: usize = 1024;

/// Builds reports from the slot file and moves bases once the aggregator has a report.
pub struct Shipper {
    meter: Arc<Meter>,
    node: String,
    /// What was last delivered per slot (skips unchanged rows).
    sent: HashMap<u32, (u32, [u64; COUNTERS])>,
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
                latency: val[HIST..].to_vec(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bounded() {
        let mut last = 0;
        for us in [1u64, 2, 3, 4, 5, 6, 7, 8, 12, 100, 1000, 10_000, 1 << 30] {
            let b = bucket(Duration::from_micros(us));
            assert!(b >= last, "{us} µs went to bucket {b} after {last}");
            last = b;
        }
        assert_eq!(bucket(Duration::from_secs(100_000)), BUCKETS - 1);
        // A bucket's middle falls in the bucket (bucket 1 is never used: below 2 µs there is
        // one bucket).
        for b in (0..BUCKETS - 1).filter(|b| *b != 1) {
            let mid = bucket_mid_us(b);
            assert_eq!(
                bucket(Duration::from_micros(mid as u64)),
                b,
                "mid {mid} of {b}"
            );
        }
    }

    struct Rec(Mutex<Vec<UsageReport>>);

    impl UsageSink for Rec {
        fn deliver(
            &self,
            report: UsageReport,
        ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
            self.0.lock().push(report);
            Box::pin(async { Ok(()) })
        }
    }

    /// Many pairs at once (many accounts, each within its limits) do not lock new ones out: the
    /// counters file grows a segment at a time up to `max_slots`, counters in the new segments
    /// survive a restart like the first ones, and past `max_slots` new pairs are refused.
    #[test]
    fn the_counters_file_grows_on_demand_and_keeps_what_it_counted() {
        let d = tempfile::tempdir().unwrap();
        let m = Meter::open(Some(d.path()), 16, 64).unwrap();
        let first = m.slots.load(Ordering::Relaxed);
        let mut held = vec![];
        let mut i = 0;
        let refused = loop {
            match m.counter_for("com.a", &format!("key_{i}"), "") {
                Ok(c) => {
                    c.op(Op::Publish, i);
                    held.push(c);
                    i += 1;
                }
                Err(e) => break e,
            }
        };
        let grown = m.slots.load(Ordering::Relaxed);
        assert!(grown > first && grown >= 64, "{first} → {grown}");
        assert_eq!(
            held.len(),
            grown - 1,
            "every slot but the reserved one is used"
        );
        assert_eq!(refused, NoSlot::Full(grown));
        let len = std::fs::metadata(d.path().join("counters.bin"))
            .unwrap()
            .len() as usize;
        assert_eq!(len, (grown + 1) * SLOT_WORDS * 8);
        drop(held);
        drop(m);
        let m = Meter::open(Some(d.path()), 16, 64).unwrap();
        assert_eq!(
            m.slots.load(Ordering::Relaxed),
            grown,
            "the grown file is mapped again"
        );
        let t = m.totals();
        assert_eq!(t.len(), grown - 1);
        for (_, key, c) in t {
            let n: usize = key.trim_start_matches("key_").parse().unwrap();
            assert_eq!((c[Op::Publish as usize], c[IN]), (1, n as u64), "{key}");
        }
    }

    #[test]
    fn slots_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let m = Meter::open(Some(d.path()), 16, 16).unwrap();
        let a = m.counter("com.a", "key_1");
        a.op(Op::Publish, 10);
        a.op(Op::Publish, 10);
        a.egress(5);
        m.counter("com.b", "key_2").op(Op::Call, 3);
        let epoch = m.epoch();
        assert!(
            Meter::open(Some(d.path()), 16, 16).is_err(),
            "one node per file"
        );
        drop(a);
        drop(m);
        // A crash while a name was being written leaves a torn line: skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join("slots"))
            .unwrap();
        f.write_all(b"9\tcom.torn").unwrap();
        let m = Meter::open(Some(d.path()), 16, 16).unwrap();
        assert_eq!(m.epoch(), epoch);
        let mut t = m.totals();
        t.sort();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (
                t[0].0.as_str(),
                t[0].2[Op::Publish as usize],
                t[0].2[IN],
                t[0].2[OUT]
            ),
            ("com.a", 2, 20, 5)
        );
        assert_eq!((t[1].0.as_str(), t[1].2[Op::Call as usize]), ("com.b", 1));
        // The same pair counts on in its slot; a new pair gets a new one.
        m.counter("com.a", "key_1").op(Op::Publish, 1);
        m.counter("com.c", "key_3").op(Op::Dht, 1);
        let t = m.totals();
        assert_eq!(
            t.iter().find(|x| x.0 == "com.a").unwrap().2[Op::Publish as usize],
            3
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn a_pair_without_a_slot_is_refused_never_counted_unbilled() {
        // 19 slots (a segment is whole pages: slot 0, the header, and 19 more).
        let m = Meter::open(None, 19, 19).unwrap();
        let held: Vec<Counter> = (0..18)
            .map(|i| m.counter_for("com.a", &format!("key_{i}"), "a").unwrap())
            .collect();
        // Slots 2..=19 are named; the 19th pair is refused, and nothing counts anywhere else.
        assert_eq!(
            m.counter_for("com.b", "key_x", "b").err(),
            Some(NoSlot::Full(19))
        );
        assert_eq!(m.totals().len(), 18);
        drop(held);
    }

    #[test]
    fn one_owner_is_limited_and_the_others_are_not() {
        let m = Meter::open(None, 64, 64).unwrap();
        m.set_owner_limit(3);
        let _a: Vec<Counter> = (0..3)
            .map(|i| m.counter_for(&format!("com.a.s{i}"), "key_a", "a").unwrap())
            .collect();
        assert_eq!(
            m.counter_for("com.a.s9", "key_a", "a").err(),
            Some(NoSlot::OwnerLimit(3))
        );
        // A pair already metered is not a new one.
        assert!(m.counter_for("com.a.s0", "key_a", "a").is_ok());
        assert!(m.counter_for("com.b", "key_b", "b").is_ok());
        assert_eq!(m.named("a"), (4, 3));
    }

    #[tokio::test]
    async fn slots_are_released_once_delivered_and_idle_and_usage_stays_exact() {
        let d = tempfile::tempdir().unwrap();
        let m = Meter::open(Some(d.path()), 19, 19).unwrap();
        m.set_owner_limit(2);
        let rec = Rec(Mutex::new(vec![]));
        let mut sh = Shipper::new(m.clone(), "n1".into());
        let now = macula_common::time::now_secs();
        m.counter_for("com.a", "k1", "a")
            .unwrap()
            .op(Op::Publish, 1);
        m.counter_for("com.a", "k2", "a")
            .unwrap()
            .op(Op::Publish, 1);
        let live = m.counter_for("com.b", "k3", "b").unwrap();
        live.op(Op::Call, 1);
        assert!(
            m.counter_for("com.a", "k4", "a").is_err(),
            "owner a is full"
        );
        sh.ship(&rec, now).await.unwrap();
        // Within the hour nothing is released (a pair used again this hour must keep its row).
        assert_eq!(m.named("a"), (3, 2));
        // The hour ends: the final rows go out, then idle pairs without a live counter are
        // released; the live one keeps its slot.
        let next = now + 3600;
        sh.ship(&rec, next).await.unwrap();
        assert_eq!(m.named("a"), (1, 0));
        assert_eq!(m.named("b"), (1, 1));
        // Owner a gets slots again; k1 counts from zero in the new hour.
        m.counter_for("com.a", "k4", "a")
            .unwrap()
            .op(Op::Publish, 1);
        m.counter_for("com.a", "k1", "a")
            .unwrap()
            .op(Op::Publish, 5);
        sh.ship(&rec, next).await.unwrap();
        let reports = rec.0.lock().clone();
        let rows: Vec<&UsageRow> = reports
            .iter()
            .flat_map(|r| &r.rows)
            .filter(|r| r.key_id == "k1")
            .collect();
        let first: u64 = rows
            .iter()
            .filter(|r| r.hour == hour_of(now))
            .map(|r| r.ops[0])
            .max()
            .unwrap();
        let second: u64 = rows
            .iter()
            .filter(|r| r.hour == hour_of(next))
            .map(|r| r.ops[0])
            .max()
            .unwrap();
        assert_eq!((first, second), (1, 1));
        // A restart reads the last name of each slot; released ones are free.
        drop((live, sh, m));
        let m = Meter::open(Some(d.path()), 19, 19).unwrap();
        let mut names: Vec<String> = m.totals().into_iter().map(|t| t.1).collect();
        names.sort();
        assert_eq!(names, ["k1", "k3", "k4"]);
        assert_eq!(m.named("a"), (3, 2));
        let fill: Vec<Counter> = (0..15)
            .map(|i| m.counter_for("com.c", &format!("c{i}"), "c").unwrap())
            .collect();
        assert!(
            m.counter_for("com.c", "one-more", "c").is_err(),
            "18 usable slots"
        );
        drop(fill);
    }

    #[tokio::test]
    async fn reports_are_cumulative_per_hour_and_skip_what_did_not_change() {
        let m = Meter::open(None, 16, 16).unwrap();
        let rec = Rec(Mutex::new(vec![]));
        let mut sh = Shipper::new(m.clone(), "n1".into());
        let now = macula_common::time::now_secs();
        let c = m.counter("com.a", "key_1");
        c.op(Op::Publish, 7);
        c.latency(Duration::from_millis(2));
        assert_eq!(sh.ship(&rec, now).await.unwrap(), 1);
        assert_eq!(sh.ship(&rec, now).await.unwrap(), 0, "nothing changed");
        c.op(Op::Publish, 7);
        sh.ship(&rec, now).await.unwrap();
        let r = rec.0.lock().last().unwrap().rows[0].clone();
        assert_eq!((r.ops[0], r.bytes_in, r.hour), (2, 14, hour_of(now)));
        assert_eq!(r.latency.iter().sum::<u64>(), 1);
        // The hour ends: its final row goes out, then the next hour starts from zero.
        c.op(Op::Publish, 7);
        let next = now + 3600;
        sh.ship(&rec, next).await.unwrap();
        let r = rec.0.lock().last().unwrap().rows[0].clone();
        assert_eq!((r.ops[0], r.hour), (3, hour_of(now)));
        c.op(Op::Subscribe, 1);
        sh.ship(&rec, next).await.unwrap();
        let r = rec.0.lock().last().unwrap().rows[0].clone();
        assert_eq!((r.ops[0], r.ops[1], r.hour), (0, 1, hour_of(next)));
    }

    #[test]
    fn quantiles_of_a_histogram() {
        let mut h = vec![0u64; BUCKETS];
        h[bucket(Duration::from_micros(100))] = 90;
        h[bucket(Duration::from_millis(10))] = 10;
        let p50 = quantile_ms(&h, 0.5).unwrap();
        let p95 = quantile_ms(&h, 0.95).unwrap();
        assert!((0.08..0.13).contains(&p50), "{p50}");
        assert!((8.0..12.5).contains(&p95), "{p95}");
        assert_eq!(quantile_ms(&[0; BUCKETS], 0.5), None);
    }
}

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
    every: u64,
    seq: AtomicU64,
    tx: tokio::sync::mpsc::Sender<OpEvent>,
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
