//! `macula usage`, `macula metrics`, `macula invoices`, `macula plans`: the billing side of the
//! registry's REST API.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::registry_cmds::{emit, pick_realm, s, seg, Api, Server};

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

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
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

fn ms(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |m| format!("{m:.2} ms"))
}

/// `macula usage --realm R --month M`.
pub fn usage(a: UsageArgs, json: bool) -> Result<()> {
    let (api, realm) = usage_api(&a.server, a.realm, &a.key)?;
    if a.csv {
        let month = api.send(
            "GET",
            &format!("/v1/realms/{}/usage/{}", seg(&realm), seg(&a.month)),
            None,
            true,
        )?;
        let from = s(&month["month"]).to_owned();
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
    let v = api.send(
        "GET",
        &format!("/v1/realms/{}/usage/{}", seg(&realm), seg(&a.month)),
        None,
        true,
    )?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let u = &v["usage"];
    let plan = &v["plan"];
    println!("{realm}, {} ({} plan)", s(&v["month"]), s(&plan["title"]));
    println!(
        "  operations  {:>14}  of {} included ({:.1}%)",
        num(&u["ops_total"]),
        num(&plan["included_ops"]),
        v["used"]["ops_percent"].as_f64().unwrap_or(0.0)
    );
    for k in ["publish", "subscribe", "call", "register", "dht"] {
        println!("    {k:<10}{:>14}", num(&u["ops"][k]));
    }
    println!(
        "  egress      {:>14}  of {} included ({:.1}%)",
        bytes(num(&u["egress_bytes"])),
        bytes(num(&plan["included_bytes"])),
        v["used"]["egress_percent"].as_f64().unwrap_or(0.0)
    );
    println!("  bytes in    {:>14}", bytes(num(&u["bytes_in"])));
    println!(
        "  call latency  p50 {}  p95 {}",
        ms(&u["latency_p50_ms"]),
        ms(&u["latency_p95_ms"])
    );
    if let Some(q) = v["quota_exceeded"].as_str() {
        println!("  QUOTA EXCEEDED: {q}");
    }
    println!(
        "  charges so far {}",
        money(v["charges"]["total_cents"].as_i64().unwrap_or(0))
    );
    for n in v["notices"].as_array().into_iter().flatten() {
        println!("  notice ({}): {}", s(&n["at"]), s(&n["message"]));
    }
    let days = v["days"].as_array().cloned().unwrap_or_default();
    if !days.is_empty() {
        println!("  {:<12}{:>12}{:>14}", "day", "operations", "egress");
        for d in days {
            println!(
                "  {:<12}{:>12}{:>14}",
                &s(&d["start"])[..10.min(s(&d["start"]).len())],
                num(&d["ops_total"]),
                bytes(num(&d["egress_bytes"]))
            );
        }
    }
    Ok(())
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
    let v = api.send(
        "GET",
        &format!(
            "/v1/realms/{}/usage?period=hour&from={from}&to={}",
            seg(&realm),
            now + 1
        ),
        None,
        true,
    )?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let items = v["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("{realm}: no usage in the last {} hours", a.hours);
        return Ok(());
    }
    println!(
        "{:<21}{:>10}{:>9}{:>9}{:>8}{:>9}{:>6}{:>12}{:>10}{:>10}",
        "hour (UTC)", "ops", "publish", "subscr", "call", "register", "dht", "egress", "p50", "p95"
    );
    for i in items {
        println!(
            "{:<21}{:>10}{:>9}{:>9}{:>8}{:>9}{:>6}{:>12}{:>10}{:>10}",
            s(&i["start"]),
            num(&i["ops_total"]),
            num(&i["ops"]["publish"]),
            num(&i["ops"]["subscribe"]),
            num(&i["ops"]["call"]),
            num(&i["ops"]["register"]),
            num(&i["ops"]["dht"]),
            bytes(num(&i["egress_bytes"])),
            ms(&i["latency_p50_ms"]),
            ms(&i["latency_p95_ms"]),
        );
    }
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

pub fn print_invoice(v: &Value) {
    println!(
        "Invoice {}  {}  {}",
        s(&v["id"]),
        s(&v["month"]),
        s(&v["status"]).to_uppercase()
    );
    println!("Account {}", s(&v["account"]));
    println!();
    println!("  {:<22}{:<52}{:>14}", "realm", "item", "amount");
    for l in v["lines"].as_array().into_iter().flatten() {
        let mut item = s(&l["description"]).to_owned();
        let unit = s(&l["unit"]);
        if unit == "operations" || unit == "bytes" {
            item = format!("{item}: {} {unit}", num(&l["quantity"]));
        }
        println!(
            "  {:<22}{:<52}{:>14}",
            s(&l["realm"]),
            item,
            money(l["amount_cents"].as_i64().unwrap_or(0))
        );
    }
    println!(
        "  {:<74}{:>14}",
        format!("Total ({})", s(&v["currency"])),
        money(v["total_cents"].as_i64().unwrap_or(0))
    );
    if let Some(p) = v["paid_at"].as_str() {
        println!("  paid {p}");
    }
}

pub fn invoices(cmd: InvoicesCmd, json: bool) -> Result<()> {
    match cmd {
        InvoicesCmd::List { server } => {
            let api = Api::new(&server)?;
            let v = api.send("GET", "/v1/invoices", None, true)?;
            if json {
                println!("{v}");
                return Ok(());
            }
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                println!("no invoices yet (you have no realm)");
            }
            for i in items {
                println!(
                    "{:<26}{:<9}{:<7}{:>12}",
                    s(&i["id"]),
                    s(&i["month"]),
                    s(&i["status"]),
                    money(i["total_cents"].as_i64().unwrap_or(0))
                );
            }
        }
        InvoicesCmd::Show {
            server,
            invoice,
            html,
        } => {
            let api = Api::new(&server)?;
            let v = api.send(
                "GET",
                &format!("/v1/invoices/{}", seg(&invoice)),
                None,
                true,
            )?;
            if let Some(path) = html {
                let doc = api.send(
                    "GET",
                    &format!("/v1/invoices/{}?format=html", seg(s(&v["id"]))),
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
            let v = api.send(
                "POST",
                &format!("/v1/invoices/{}/pay", seg(&invoice)),
                None,
                true,
            )?;
            emit(json, &v, |v| {
                println!(
                    "paid {} of {} ({} reference {})",
                    money(v["amount_cents"].as_i64().unwrap_or(0)),
                    s(&v["invoice"]),
                    s(&v["provider"]),
                    s(&v["reference"])
                )
            });
        }
        InvoicesCmd::Run { server, month } => {
            let api = Api::new(&server)?;
            let v = api.send(
                "POST",
                "/v1/admin/invoices/run",
                Some(&json!({"month": month})),
                true,
            )?;
            emit(json, &v, |v| {
                println!(
                    "{}: {} invoices ({}), {} in total, in {} ms",
                    s(&v["month"]),
                    num(&v["invoices"]),
                    if v["final"].as_bool() == Some(true) {
                        "finalized"
                    } else {
                        "drafts"
                    },
                    money(v["total_cents"].as_i64().unwrap_or(0)),
                    num(&v["elapsed_ms"])
                )
            });
        }
        InvoicesCmd::Void { server, invoice } => {
            let api = Api::new(&server)?;
            let v = api.send(
                "POST",
                &format!("/v1/admin/invoices/{}/void", seg(&invoice)),
                None,
                true,
            )?;
            emit(json, &v, |v| println!("{} is void", s(&v["invoice"])));
        }
    }
    Ok(())
}

/// `macula plans`: the tiers and add-ons.
pub fn plans(server: Server, json: bool) -> Result<()> {
    let api = Api::new(&server)?;
    let v = api.send("GET", "/v1/plans", None, false)?;
    if json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{:<14}{:>10}{:>16}{:>12}{:>16}{:>14}",
        "plan", "base", "included ops", "egress", "overage /1K", "overage /GiB"
    );
    for t in v["tiers"].as_array().into_iter().flatten() {
        println!(
            "{:<14}{:>10}{:>16}{:>12}{:>16}{:>14}{}",
            s(&t["title"]),
            money(t["base_cents"].as_i64().unwrap_or(0)),
            num(&t["included_ops"]),
            bytes(num(&t["included_bytes"])),
            format!("${}", num(&t["ops_millicents_per_1k"]) as f64 / 100_000.0),
            money(num(&t["egress_cents_per_gib"]) as i64),
            if t["hard_quota"].as_bool() == Some(true) {
                "  (hard quota: refused past it)"
            } else {
                ""
            }
        );
    }
    println!("\nadd-ons:");
    for a in v["addons"].as_array().into_iter().flatten() {
        println!(
            "  {:<18}{:<22}{:>10}/month",
            s(&a["id"]),
            s(&a["title"]),
            money(a["monthly_cents"].as_i64().unwrap_or(0))
        );
    }
    for (k, r) in v["rules"].as_object().into_iter().flatten() {
        println!("{k}: {}", r.as_str().unwrap_or(""));
    }
    Ok(())
}
