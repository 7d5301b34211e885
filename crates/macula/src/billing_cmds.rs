//! `macula usage`, `macula metrics`, `macula invoices`, `macula plans`: the billing side of the
//! registry's REST API.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use macula_registry::billing::types::*;

use crate::registry_cmds::{emit, pick_realm, right_aligned, seg, table, Api, Server};

/// Without a login, usage is read with a realm's admin API key: the one given, or the one
/// `macula up` printed (with its realm), so that `macula usage` works right after `macula up`.
#[derive(Args)]
pub struct KeyFallback {
    /// Admin API key of the realm (used when not logged in) [default: `macula up`'s key].
    #[arg(long, env = "MACULA_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Config directory of `macula up` (for its key and realm).
    #[arg(long, env = "MACULA_HOME", default_value_os_t = crate::local::default_home())]
    pub home: PathBuf,
}

/// The API client and the realm for a usage command.
fn usage_api(server: &Server, realm: Option<String>, k: &KeyFallback) -> Result<(Api, String)> {
    let mut api = Api::new(server)?;
    if api.has_credential() {
        let realm = pick_realm(&api, realm)?;
        return Ok((api, realm));
    }
    let key = k.key.clone().or_else(|| {
        std::fs::read_to_string(crate::local::up_key_path(&k.home))
            .ok()
            .map(|s| s.trim().to_owned())
    });
    let Some(key) = key else {
        bail!("not logged in and no API key: run `macula login`, pass --key, or start `macula up`")
    };
    let realm = realm
        .or_else(|| {
            std::fs::read_to_string(k.home.join("up-realm"))
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("say which realm with --realm"))?;
    api.use_key(key);
    Ok((api, realm))
}

#[derive(Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub server: Server,
    #[command(flatten)]
    pub key: KeyFallback,
    /// The realm [default: your only realm, or `macula up`'s].
    #[arg(long)]
    pub realm: Option<String>,
    /// The month: YYYY-MM, current or previous.
    #[arg(long, default_value = "current")]
    pub month: String,
    /// Rows per hour, day or month (with --csv; the summary shows days).
    #[arg(long, default_value = "day")]
    pub period: String,
    /// Print the month's rows as CSV (realm, period, start, operations by kind, bytes, latency).
    #[arg(long)]
    pub csv: bool,
}

fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}${}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |m| format!("{m:.2} ms"))
}

fn op(p: &UsagePeriod, kind: &str) -> u64 {
    p.ops.get(kind).copied().unwrap_or(0)
}

/// `macula usage --realm R --month M`.
pub fn usage(a: UsageArgs, json: bool) -> Result<()> {
    let (api, realm) = usage_api(&a.server, a.realm, &a.key)?;
    if a.csv {
        let month: UsageMonth = api.get(
            "GET",
            &format!("/v1/realms/{}/usage/{}", seg(&realm), seg(&a.month)),
        )?;
        let from = month.month;
        let v = api.send(
            "GET",
            &format!(
                "/v1/realms/{}/usage?period={}&from={from}&to={}&format=csv",
                seg(&realm),
                seg(&a.period),
                next_month_name(&from)?
            ),
            None,
            true,
        )?;
        print!("{}", v.as_str().unwrap_or(""));
        return Ok(());
    }
    let v: UsageMonth = api.get(
        "GET",
        &format!("/v1/realms/{}/usage/{}", seg(&realm), seg(&a.month)),
    )?;
    emit(json, &v, print_usage_month);
    Ok(())
}

fn print_usage_month(v: &UsageMonth) {
    let (u, plan) = (&v.usage, &v.plan);
    println!("{}, {} ({} plan)", v.realm, v.month, plan.title);
    println!(
        "  operations  {:>14}  of {} included ({:.1}%)",
        u.ops_total, plan.included_ops, v.used.ops_percent
    );
    for k in ["publish", "subscribe", "call", "register", "dht"] {
        println!("    {k:<10}{:>14}", op(u, k));
    }
    println!(
        "  egress      {:>14}  of {} included ({:.1}%)",
        bytes(u.egress_bytes),
        bytes(plan.included_bytes),
        v.used.egress_percent
    );
    println!("  bytes in    {:>14}", bytes(u.bytes_in));
    println!(
        "  compute     {:>14}  at ${:.2} an instance-hour",
        format!("{:.2} h", u.instance_hours),
        plan.instance_millicents_per_hour as f64 / 100_000.0
    );
    println!(
        "  packages    {:>14}  delivered, at ${:.2}/GiB",
        bytes(u.package_bytes),
        plan.package_cents_per_gib as f64 / 100.0
    );
    println!(
        "  call latency  p50 {}  p95 {}",
        ms(u.latency_p50_ms),
        ms(u.latency_p95_ms)
    );
    if let Some(q) = &v.quota_exceeded {
        println!("  QUOTA EXCEEDED: {q}");
    }
    println!("  charges so far {}", money(v.charges.total_cents));
    for n in &v.notices {
        println!("  notice ({}): {}", n.at, n.message);
    }
    if !v.days.is_empty() {
        let mut t = table(&["day", "operations", "egress"]);
        right_aligned(&mut t, &[1, 2]);
        for d in &v.days {
            t.add_row([
                d.start.get(..10).unwrap_or(&d.start).to_owned(),
                d.ops_total.to_string(),
                bytes(d.egress_bytes),
            ]);
        }
        for line in t.lines() {
            println!("  {}", line.trim_end());
        }
    }
}

/// `YYYY-MM` of the month after `m` (the registry's calendar).
fn next_month_name(m: &str) -> Result<String> {
    use macula_registry::billing::{month_name, next_month, parse_month};
    let start = parse_month(m).map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(month_name(next_month(start)))
}

#[derive(Args)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub server: Server,
    #[command(flatten)]
    pub key: KeyFallback,
    /// The realm [default: your only realm, or `macula up`'s].
    #[arg(long)]
    pub realm: Option<String>,
    /// How many hours back.
    #[arg(long, default_value_t = 24)]
    pub hours: u64,
}

/// `macula metrics --realm R`: the last hours, hour by hour.
pub fn metrics(a: MetricsArgs, json: bool) -> Result<()> {
    let (api, realm) = usage_api(&a.server, a.realm, &a.key)?;
    let now = macula_node::confdir::now_secs();
    let from = now - now % 3600 - a.hours.saturating_sub(1) * 3600;
    let v: Usage = api.get(
        "GET",
        &format!(
            "/v1/realms/{}/usage?period=hour&from={from}&to={}",
            seg(&realm),
            now + 1
        ),
    )?;
    emit(json, &v, |v| {
        if v.items.is_empty() {
            println!("{realm}: no usage in the last {} hours", a.hours);
            return;
        }
        let mut t = table(&[
            "hour (UTC)",
            "ops",
            "publish",
            "subscr",
            "call",
            "register",
            "dht",
            "egress",
            "p50",
            "p95",
        ]);
        right_aligned(&mut t, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        for i in &v.items {
            t.add_row([
                i.start.clone(),
                i.ops_total.to_string(),
                op(i, "publish").to_string(),
                op(i, "subscribe").to_string(),
                op(i, "call").to_string(),
                op(i, "register").to_string(),
                op(i, "dht").to_string(),
                bytes(i.egress_bytes),
                ms(i.latency_p50_ms),
                ms(i.latency_p95_ms),
            ]);
        }
        println!("{}", t.trim_fmt());
    });
    Ok(())
}

#[derive(Subcommand)]
pub enum InvoicesCmd {
    /// Your invoices, newest first (this month's draft included).
    List {
        #[command(flatten)]
        server: Server,
    },
    /// Print an invoice: by id (in_...) or month (YYYY-MM, current, previous).
    ///
    /// Example: macula invoices show current --html invoice.html
    Show {
        #[command(flatten)]
        server: Server,
        #[arg(default_value = "current")]
        invoice: String,
        /// Also write the invoice as an HTML document to this file.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Pay an open invoice (the built-in provider records the payment; no card is charged).
    Pay {
        #[command(flatten)]
        server: Server,
        invoice: String,
    },
    /// Build a month's invoices for every account (platform operators). Past months are
    /// finalized (open); the registry does this by itself an hour after each month ends.
    Run {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value = "previous")]
        month: String,
    },
    /// Void a draft or open invoice (platform operators).
    Void {
        #[command(flatten)]
        server: Server,
        invoice: String,
    },
}

pub fn print_invoice(v: &Invoice) {
    println!("Invoice {}  {}  {}", v.id, v.month, v.status.to_uppercase());
    println!("Account {}", v.account.as_deref().unwrap_or("-"));
    println!();
    let mut t = table(&["realm", "item", "amount"]);
    right_aligned(&mut t, &[2]);
    for l in &v.lines {
        let mut item = l.description.clone();
        if l.unit == "operations" || l.unit == "bytes" {
            item = format!("{item}: {} {}", l.quantity, l.unit);
        }
        t.add_row([l.realm.clone(), item, money(l.amount_cents)]);
    }
    t.add_row([
        format!("Total ({})", v.currency),
        String::new(),
        money(v.total_cents),
    ]);
    for line in t.lines() {
        println!("  {}", line.trim_end());
    }
    if let Some(p) = &v.paid_at {
        println!("  paid {p}");
    }
}

pub fn invoices(cmd: InvoicesCmd, json: bool) -> Result<()> {
    match cmd {
        InvoicesCmd::List { server } => {
            let api = Api::new(&server)?;
            let v: Invoices = api.get("GET", "/v1/invoices")?;
            emit(json, &v, |v| {
                if v.items.is_empty() {
                    println!("no invoices yet (you have no realm)");
                    return;
                }
                let mut t = table(&["INVOICE", "MONTH", "STATUS", "TOTAL"]);
                right_aligned(&mut t, &[3]);
                for i in &v.items {
                    t.add_row([
                        i.id.clone(),
                        i.month.clone(),
                        i.status.clone(),
                        money(i.total_cents),
                    ]);
                }
                println!("{}", t.trim_fmt());
            });
        }
        InvoicesCmd::Show {
            server,
            invoice,
            html,
        } => {
            let api = Api::new(&server)?;
            let v: Invoice = api.get("GET", &format!("/v1/invoices/{}", seg(&invoice)))?;
            if let Some(path) = html {
                let doc = api.send(
                    "GET",
                    &format!("/v1/invoices/{}?format=html", seg(&v.id)),
                    None,
                    true,
                )?;
                let Some(text) = doc.as_str() else {
                    bail!("the registry did not answer with an HTML document");
                };
                std::fs::write(&path, text)?;
                eprintln!("wrote {}", path.display());
            }
            emit(json, &v, print_invoice);
        }
        InvoicesCmd::Pay { server, invoice } => {
            let api = Api::new(&server)?;
            let v: Payment = api.get("POST", &format!("/v1/invoices/{}/pay", seg(&invoice)))?;
            emit(json, &v, |v| {
                println!(
                    "paid {} of {} ({} reference {})",
                    money(v.amount_cents),
                    v.invoice,
                    v.provider,
                    v.reference
                )
            });
        }
        InvoicesCmd::Run { server, month } => {
            let api = Api::new(&server)?;
            let v: InvoiceRun = api.call(
                "POST",
                "/v1/admin/invoices/run",
                &RunRequest { month: Some(month) },
            )?;
            emit(json, &v, |v| {
                println!(
                    "{}: {} invoices ({}), {} in total, in {} ms",
                    v.month,
                    v.invoices,
                    if v.is_final { "finalized" } else { "drafts" },
                    money(v.total_cents),
                    v.elapsed_ms
                )
            });
        }
        InvoicesCmd::Void { server, invoice } => {
            let api = Api::new(&server)?;
            let v: Voided = api.get(
                "POST",
                &format!("/v1/admin/invoices/{}/void", seg(&invoice)),
            )?;
            emit(json, &v, |v| println!("{} is void", v.invoice));
        }
    }
    Ok(())
}

/// `macula plans`: the tiers and add-ons.
pub fn plans(server: Server, json: bool) -> Result<()> {
    let api = Api::new(&server)?;
    let v: Plans = api.get_anonymous("/v1/plans")?;
    emit(json, &v, print_plans);
    Ok(())
}

fn print_plans(v: &Plans) {
    let mut t = table(&[
        "plan",
        "base",
        "included ops",
        "egress",
        "overage /1K",
        "overage /GiB",
        "",
    ]);
    right_aligned(&mut t, &[1, 2, 3, 4, 5]);
    for p in &v.tiers {
        t.add_row([
            p.title.clone(),
            money(p.base_cents),
            p.included_ops.to_string(),
            bytes(p.included_bytes),
            format!("${}", p.ops_millicents_per_1k as f64 / 100_000.0),
            money(p.egress_cents_per_gib as i64),
            if p.hard_quota {
                "(hard quota: refused past it)".into()
            } else {
                String::new()
            },
        ]);
    }
    println!("{}", t.trim_fmt());
    println!("\nadd-ons:");
    let mut t = table(&["add-on", "title", "per month"]);
    right_aligned(&mut t, &[2]);
    for a in &v.addons {
        t.add_row([a.id.clone(), a.title.clone(), money(a.monthly_cents)]);
    }
    for line in t.lines() {
        println!("  {}", line.trim_end());
    }
    let r = &v.rules;
    for (k, rule) in [
        ("rounding", &r.rounding),
        ("gib", &r.gib),
        ("plan_changes", &r.plan_changes),
        ("hard_quota", &r.hard_quota),
        ("addons", &r.addons),
    ] {
        println!("{k}: {rule}");
    }
}
