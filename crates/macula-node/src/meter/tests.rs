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

/// Package delivery is a counter like the others: counted, reported, zero until counted.
#[tokio::test]
async fn package_delivery_is_counted_and_reported() {
    let m = Meter::open(None, 16, 16).unwrap();
    let rec = Rec(Mutex::new(vec![]));
    let mut sh = Shipper::new(m.clone(), "n1".into());
    let now = macula_common::time::now_secs();
    let c = m.counter("com.a", "key_1");
    c.op(Op::Publish, 1);
    sh.ship(&rec, now).await.unwrap();
    assert_eq!(rec.0.lock().last().unwrap().rows[0].package_bytes, 0);
    c.package_bytes(5_000);
    c.package_bytes(2_000);
    sh.ship(&rec, now).await.unwrap();
    let r = rec.0.lock().last().unwrap().rows[0].clone();
    assert_eq!((r.package_bytes, r.ops[0]), (7_000, 1));
}

/// A counters file of the previous format (`MACMETR2`: the counters one word later, no
/// package counter) is converted when the node starts: the epoch, every count and every base
/// (what was delivered already) kept, so no usage is lost or billed twice by an upgrade; and
/// converted once.
#[tokio::test]
async fn a_counters_file_of_the_previous_format_is_converted_keeping_every_count() {
    let d = tempfile::tempdir().unwrap();
    let rec = Rec(Mutex::new(vec![]));
    let now = macula_common::time::now_secs();
    let next = now + 3600;
    let epoch = {
        let m = Meter::open(Some(d.path()), 16, 16).unwrap();
        let mut sh = Shipper::new(m.clone(), "n1".into());
        let a = m.counter("com.a", "key_1");
        a.op(Op::Publish, 10);
        a.op(Op::Publish, 10);
        a.egress(5);
        a.instance_ms(1_234);
        a.latency(Duration::from_millis(3));
        let b = m.counter("com.b", "key_2");
        b.op(Op::Call, 3);
        // The hour ends and is delivered: the bases move to what was counted.
        sh.ship(&rec, next).await.unwrap();
        a.op(Op::Publish, 10);
        b.op(Op::Call, 3);
        m.sync();
        m.epoch()
    };
    // Written back in the previous layout.
    let path = d.path().join("counters.bin");
    let bytes = std::fs::read(&path).unwrap();
    let mut w: Vec<u64> = bytes
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    w[0] = MAGIC_V2;
    for s in w.chunks_mut(SLOT_WORDS).skip(1) {
        assert_eq!(s[CUR + COUNTERS - 1], 0, "no package bytes before");
        for i in (0..COUNTERS - 1).rev() {
            s[8 + i] = s[CUR + i];
        }
        s[CUR] = 0;
        s[SLOT_FORMAT] = 0;
    }
    // The conversion of com.a's slot was cut short after 5 words (they moved, and the slot
    // says so): it resumes there.
    let a_slot = w
        .chunks(SLOT_WORDS)
        .position(|s| s[8 + Op::Publish as usize] == 3)
        .expect("com.a's slot");
    {
        let s = &mut w[a_slot * SLOT_WORDS..(a_slot + 1) * SLOT_WORDS];
        for j in 0..5 {
            s[CUR + j] = s[8 + j];
        }
        s[SLOT_FORMAT] = MOVING + 5;
    }
    let old: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&path, old).unwrap();
    let check = |m: &Meter| {
        assert_eq!(m.epoch(), epoch, "the same epoch: reports stay idempotent");
        let mut t = m.totals();
        t.sort();
        let a = &t[0].2;
        assert_eq!(
            (
                a[Op::Publish as usize],
                a[IN],
                a[OUT],
                a[INSTANCE_MS],
                a[PACKAGE_BYTES],
                a[HIST..HIST + BUCKETS].iter().sum::<u64>()
            ),
            (3, 30, 5, 1_234, 0, 1)
        );
        assert_eq!(t[1].2[Op::Call as usize], 2);
    };
    let m = Meter::open(Some(d.path()), 16, 16).unwrap();
    check(&m);
    // The bases were kept: what follows the delivered hour is only the one publish since.
    let mut sh = Shipper::new(m.clone(), "n1".into());
    m.counter("com.a", "key_1").package_bytes(99);
    sh.ship(&rec, next).await.unwrap();
    let r = rec.0.lock().last().unwrap().rows.clone();
    let a = r.iter().find(|r| r.realm == "com.a").unwrap();
    assert_eq!(
        (a.ops[0], a.bytes_in, a.instance_ms, a.package_bytes, a.hour),
        (1, 10, 0, 99, hour_of(next))
    );
    drop(sh);
    drop(m);
    // Opened again: already converted, nothing moves twice.
    let m = Meter::open(Some(d.path()), 16, 16).unwrap();
    let t = m.totals();
    let a = &t.iter().find(|x| x.0 == "com.a").unwrap().2;
    assert_eq!((a[Op::Publish as usize], a[PACKAGE_BYTES]), (3, 99));
}
