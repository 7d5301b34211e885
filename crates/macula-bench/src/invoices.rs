//! The monthly invoice run on embedded SQLite: `realms` realms over a quarter as many accounts,
//! every plan, usage over and under the allowances, add-ons and transfer fees; then the run
//! that finalizes last month (invoices, ledger postings) is timed.

use std::time::Instant;

use anyhow::Result;
use macula_node::ConfDir;
use macula_registry::billing::{month_start, Prices};
use macula_registry::db::Arg;
use macula_registry::{Db, Registry, RegistryConfig};

use crate::Figure;

/// Inserts `rows` (texts; numbers bind as integers) with the registry's multi-row INSERTs.
async fn insert(db: &Db, head: &str, cols: usize, rows: Vec<Vec<String>>) -> Result<()> {
    let rows = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| match v.parse::<i64>() {
                    Ok(i) => Arg::Int(i),
                    Err(_) => Arg::Text(v),
                })
                .collect()
        })
        .collect();
    let mut conn = db.pool.acquire().await?;
    macula_registry::billing::insert_rows(&mut conn, head, cols, rows).await?;
    Ok(())
}

pub async fn run(realms: usize) -> Result<Vec<Figure>> {
    let tmp = std::env::temp_dir().join(format!("macula-bench-invoices-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let dir = ConfDir::new(&tmp);
    dir.init()?;
    // The registry first (its start-up sync reads every realm), then the data, straight in.
    let reg = Registry::new(
        macula_registry::db::sqlite(&tmp.join("registry.db")).await?,
        RegistryConfig::default(),
        dir,
        None,
    )
    .await?;
    let db = &reg.db;
    let now = macula_node::confdir::now_secs() as i64;
    let month = month_start(month_start(now) - 1);
    let accounts = (realms / 4).max(1);
    let t0 = Instant::now();
    let acct_rows = (0..accounts)
        .map(|a| {
            vec![
                format!("acct{a}"),
                format!("user{a}@example.com"),
                "x".into(),
                "1".into(),
            ]
        })
        .collect();
    insert(
        db,
        "INSERT INTO accounts (id, email, password_hash, created_at) VALUES ",
        4,
        acct_rows,
    )
    .await?;
    let (mut realm_rows, mut usage, mut addons, mut fees) = (vec![], vec![], vec![], vec![]);
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let tiers = Prices::default().tiers;
    for r in 0..realms {
        let t = &tiers[r % tiers.len()];
        let name = format!("com.bench{r}.app");
        realm_rows.push(vec![
            name.clone(),
            format!("acct{}", r % accounts),
            t.name.clone(),
            (month - 86_400).to_string(),
            (now + 365 * 86_400).to_string(),
            "k".into(),
            "c".into(),
            "1".into(),
        ]);
        // Between half and twice the allowance.
        let ops = t.included_ops / 2 + next() % (t.included_ops * 3 / 2);
        let bytes = t.included_bytes / 2 + next() % (t.included_bytes * 3 / 2);
        usage.push(vec![
            name.clone(),
            "month".into(),
            month.to_string(),
            (ops / 2).to_string(),
            (ops / 8).to_string(),
            (ops / 4).to_string(),
            (ops / 16).to_string(),
            (ops - ops / 2 - ops / 8 - ops / 4 - ops / 16).to_string(),
            (bytes / 4).to_string(),
            bytes.to_string(),
        ]);
        if r % 7 == 0 {
            addons.push(vec![
                name.clone(),
                "analytics".into(),
                (month + 3600).to_string(),
            ]);
        }
        if r % 50 == 0 {
            fees.push(vec![
                format!("acct{}", r % accounts),
                name,
                "transfer".into(),
                "2000".into(),
                (month + 7200).to_string(),
            ]);
        }
    }
    insert(db, "INSERT INTO realms (name, owner_id, tier, created_at, expires_at, authority_key, authority_cert, policy_version) VALUES ", 8, realm_rows).await?;
    insert(db, "INSERT INTO usage_rollups (realm, period, start, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, bytes_in, bytes_out) VALUES ", 10, usage).await?;
    insert(
        db,
        "INSERT INTO addons (realm, feature, started_at) VALUES ",
        3,
        addons,
    )
    .await?;
    insert(
        db,
        "INSERT INTO fees (account_id, realm, kind, amount_cents, created_at) VALUES ",
        5,
        fees,
    )
    .await?;
    eprintln!(
        "invoices: seeded {realms} realms over {accounts} accounts in {:.1?}",
        t0.elapsed()
    );
    let t = Instant::now();
    let s = reg
        .run_invoices(month, None)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let secs = t.elapsed().as_secs_f64();
    let n = s.invoices;
    anyhow::ensure!(n == accounts, "{n} invoices for {accounts} accounts");
    let again = reg
        .run_invoices(month, None)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    anyhow::ensure!(again.invoices == 0, "a second run billed again: {again:?}");
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(vec![Figure {
        scenario: format!("invoice run, {realms} realms"),
        server: "macula",
        value: secs,
        unit: "s",
        note: format!(
            "SQLite; {n} invoices finalized with ledger postings, ${:.2} in total",
            s.total_cents as f64 / 100.0
        ),
    }])
}
