//! Usage ingest: reports from nodes, idempotent per (node, counters file, realm, key, hour),
//! taken in bounded chunks and rolled up by hour, day and month.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Takes a node's usage report (see the module doc). Idempotent: the same report, or an
    /// older one, changes nothing. Returns the billing realms whose totals grew.
    ///
    /// A report is taken [`INGEST_CHUNK`] rows per transaction: a node that re-sends a large
    /// backlog holds the database's writer for one short transaction at a time, and signups,
    /// logins and revocations queue between them. Rows are independent (each is merged by its
    /// own key), so a failure part-way leaves the earlier chunks taken and the re-sent report
    /// changes nothing of them.
    pub async fn ingest(&self, report: &UsageReport) -> ApiResult<Vec<String>> {
        // Rows are cumulative: two rows for one (realm, key, hour) in a report (a node that
        // lost track of a slot, or a hostile one) merge into their maximum, never add up.
        let mut merged: HashMap<ReportKey, UsageRow> = HashMap::new();
        for row in &report.rows {
            let k = (row.realm.clone(), row.key_id.clone(), row.hour as i64);
            match merged.get_mut(&k) {
                None => {
                    merged.insert(k, row.clone());
                }
                Some(m) => {
                    for (a, b) in m.ops.iter_mut().zip(&row.ops) {
                        *a = (*a).max(*b);
                    }
                    m.bytes_in = m.bytes_in.max(row.bytes_in);
                    m.bytes_out = m.bytes_out.max(row.bytes_out);
                    m.instance_ms = m.instance_ms.max(row.instance_ms);
                    m.package_bytes = m.package_bytes.max(row.package_bytes);
                    if m.latency.len() < row.latency.len() {
                        m.latency.resize(row.latency.len(), 0);
                    }
                    for (a, b) in m.latency.iter_mut().zip(&row.latency) {
                        *a = (*a).max(*b);
                    }
                }
            }
        }
        let rows: Vec<UsageRow> = merged.into_values().collect();
        let mut grew = HashSet::new();
        for chunk in rows.chunks(INGEST_CHUNK) {
            grew.extend(self.ingest_chunk(report, chunk).await?);
            // Let queued control-plane writes go first.
            tokio::task::yield_now().await;
        }
        Ok(grew.into_iter().collect())
    }

    pub(crate) async fn ingest_chunk(
        &self,
        report: &UsageReport,
        chunk: &[UsageRow],
    ) -> ApiResult<HashSet<String>> {
        if chunk.is_empty() {
            return Ok(HashSet::new());
        }
        let epoch = format!("{:016x}", report.epoch);
        let min_hour = chunk.iter().map(|r| r.hour).min().unwrap_or(0) as i64;
        let mut tx = self.db.begin().await?;
        // Deliveries from one node are taken one at a time: on PostgreSQL two overlapping ones
        // (a re-send after a timeout) would both read a row that does not exist yet and both
        // add its growth. SQLite serializes writers already (`BEGIN IMMEDIATE`).
        let lock = if self.db.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("usage:{}:{epoch}", report.node))
                .execute(&mut *tx)
                .await?;
            " FOR UPDATE"
        } else {
            ""
        };
        // The stored rows of this chunk's realms and keys only.
        let realms: Vec<&str> = chunk
            .iter()
            .map(|r| r.realm.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let keys: Vec<&str> = chunk
            .iter()
            .map(|r| r.key_id.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let list = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = format!(
            "SELECT realm, key_id, hour, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, \
             bytes_in, bytes_out, instance_ms, package_bytes, latency FROM usage_reports WHERE node = $1 AND epoch = $2 AND hour >= $3 \
             AND realm IN ({}) AND key_id IN ({}){lock}",
            list(4, realms.len()),
            list(4 + realms.len(), keys.len())
        );
        let mut q = sqlx::query(&sql)
            .bind(&report.node)
            .bind(&epoch)
            .bind(min_hour);
        for v in realms.iter().chain(&keys) {
            q = q.bind(*v);
        }
        let rows = q.fetch_all(&mut *tx).await?;
        let mut old: HashMap<ReportKey, ([u64; N], Vec<u64>)> = HashMap::new();
        for r in rows {
            let mut c = [0u64; N];
            for (i, col) in COUNTER_COLS.iter().enumerate() {
                c[i] = r.try_get::<i64, _>(*col)?.max(0) as u64;
            }
            let latency: String = r.try_get("latency")?;
            old.insert(
                (
                    r.try_get("realm")?,
                    r.try_get("key_id")?,
                    r.try_get("hour")?,
                ),
                (c, parse_hist(&latency)),
            );
        }
        // Billing realm of each reported realm: the nearest registered one.
        let mut billing: HashMap<String, String> = HashMap::new();
        for row in chunk {
            if !billing.contains_key(&row.realm) {
                let b = self.billing_realm(&mut tx, &row.realm).await?;
                billing.insert(row.realm.clone(), b);
            }
        }
        // Usage by a key the registry no longer has, in a realm registered more than once: a
        // key of the previous registration, reported late. It is that registration's usage,
        // never the current registrant's (keys die with their registration).
        let known: HashSet<String> = {
            let sql = format!(
                "SELECT id FROM api_keys WHERE id IN ({})",
                list(1, keys.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for k in &keys {
                q = q.bind(*k);
            }
            q.fetch_all(&mut *tx).await?.into_iter().collect()
        };
        let mut generation: HashMap<String, i64> = HashMap::new();
        for b in billing.values() {
            if !generation.contains_key(b) {
                let g: Option<i64> =
                    sqlx::query_scalar("SELECT generation FROM realms WHERE name = $1")
                        .bind(b)
                        .fetch_optional(&mut *tx)
                        .await?;
                generation.insert(b.clone(), g.unwrap_or(0));
            }
        }
        let bill_to = |row: &UsageRow| -> String {
            let b = &billing[&row.realm];
            match generation.get(b) {
                Some(&g) if g > 1 && !known.contains(&row.key_id) => {
                    crate::realms::archived(b, g - 1)
                }
                _ => b.clone(),
            }
        };
        let now = now_secs() as i64;
        let mut grew: HashSet<String> = HashSet::new();
        for row in chunk {
            let mut new = [0u64; N];
            new[..OPS].copy_from_slice(&row.ops);
            new[5] = row.bytes_in;
            new[6] = row.bytes_out;
            new[7] = row.instance_ms;
            new[8] = row.package_bytes;
            // Stored as BIGINT: a value beyond it (only a broken or hostile node sends one)
            // is held at the maximum rather than wrapping negative.
            for v in new.iter_mut() {
                *v = (*v).min(i64::MAX as u64 / 4);
            }
            let key = (row.realm.clone(), row.key_id.clone(), row.hour as i64);
            let (prev, prev_hist) = old.get(&key).cloned().unwrap_or(([0; N], vec![0; BUCKETS]));
            let mut hist = parse_hist(&hist_text(&row.latency));
            for h in hist.iter_mut() {
                *h = (*h).min(i64::MAX as u64 / 4);
            }
            for (h, p) in hist.iter_mut().zip(&prev_hist) {
                *h = (*h).max(*p);
            }
            let delta: Vec<i64> = new
                .iter()
                .zip(&prev)
                .map(|(n, p)| n.saturating_sub(*p) as i64)
                .collect();
            if delta.iter().all(|d| *d == 0) && hist == prev_hist {
                continue;
            }
            let keep: Vec<i64> = new
                .iter()
                .zip(&prev)
                .map(|(n, p)| (*n).max(*p) as i64)
                .collect();
            let mut args: Vec<Arg> = vec![
                report.node.as_str().into(),
                epoch.as_str().into(),
                row.realm.as_str().into(),
                row.key_id.as_str().into(),
                (row.hour as i64).into(),
            ];
            args.extend(keep.iter().map(|v| Arg::Int(*v)));
            args.push(hist_text(&hist).into());
            args.push(now.into());
            tx.defer(
                "INSERT INTO usage_reports (node, epoch, realm, key_id, hour, ops_publish, ops_subscribe, \
                 ops_call, ops_register, ops_dht, bytes_in, bytes_out, instance_ms, package_bytes, latency, \
                 updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
                 ON CONFLICT (node, epoch, realm, key_id, hour) DO UPDATE SET \
                 ops_publish = excluded.ops_publish, ops_subscribe = excluded.ops_subscribe, \
                 ops_call = excluded.ops_call, ops_register = excluded.ops_register, \
                 ops_dht = excluded.ops_dht, bytes_in = excluded.bytes_in, \
                 bytes_out = excluded.bytes_out, instance_ms = excluded.instance_ms, \
                 package_bytes = excluded.package_bytes, \
                 latency = excluded.latency, updated_at = excluded.updated_at",
                args,
            );
            if delta.iter().all(|d| *d == 0) {
                continue;
            }
            let realm = &bill_to(row);
            grew.insert(realm.clone());
            let hour = row.hour as i64 * 3600;
            for (period, start) in [
                ("hour", hour),
                ("day", hour - hour.rem_euclid(86_400)),
                ("month", month_start(hour)),
            ] {
                let mut args: Vec<Arg> = vec![realm.as_str().into(), period.into(), start.into()];
                args.extend(delta.iter().map(|v| Arg::Int(*v)));
                tx.defer(
                    add_to_rollup!(
                        "INSERT INTO usage_rollups (realm, period, start, ops_publish, ops_subscribe, ops_call, \
                         ops_register, ops_dht, bytes_in, bytes_out, instance_ms, package_bytes) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                    ),
                    args,
                );
            }
        }
        tx.commit().await?;
        Ok(grew)
    }

    pub(crate) async fn billing_realm(
        &self,
        c: &mut sqlx::AnyConnection,
        realm: &str,
    ) -> ApiResult<String> {
        let mut candidates = vec![realm.to_owned()];
        let mut r = realm;
        while let Some(i) = r.rfind('.') {
            r = &r[..i];
            candidates.push(r.to_owned());
        }
        let placeholders: Vec<String> = (1..=candidates.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT name FROM realms WHERE name IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for c in &candidates {
            q = q.bind(c);
        }
        let found: HashSet<String> = q.fetch_all(&mut *c).await?.into_iter().collect();
        Ok(candidates
            .into_iter()
            .find(|c| found.contains(c))
            .unwrap_or_else(|| realm.to_owned()))
    }
}

pub(crate) const COUNTER_COLS: [&str; N] = [
    "ops_publish",
    "ops_subscribe",
    "ops_call",
    "ops_register",
    "ops_dht",
    "bytes_in",
    "bytes_out",
    "instance_ms",
    "package_bytes",
];

/// The counters of a usage row: operations by kind, bytes in and out, compute, package
/// delivery.
pub(crate) const N: usize = 9;

/// (realm, key id, hour) of a node's report row.
type ReportKey = (String, String, i64);

pub(crate) fn parse_hist(s: &str) -> Vec<u64> {
    let mut h: Vec<u64> = s.split(',').map(|x| x.parse().unwrap_or(0)).collect();
    h.resize(BUCKETS, 0);
    h
}

pub(crate) fn hist_text(h: &[u64]) -> String {
    h.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Rows of a usage report taken per transaction (see [`Registry::ingest`]).
pub const INGEST_CHUNK: usize = 256;
