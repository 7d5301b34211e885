//! `macula-bench`: measures a Macula node and, side by side, a NATS server on the same machine.
//!
//! Both servers run as separate processes and are driven by equally lean clients that speak the
//! raw protocol (pre-encoded frames, counting without full decoding), so the figures compare the
//! servers rather than the client libraries. Payloads are 64 bytes; Macula uses MessagePack over
//! RawSocket unless told otherwise.
//!
//! ```text
//! cargo build --release -p macula-bench -p macula
//! target/release/macula-bench all            # every scenario, Macula and NATS
//! target/release/macula-bench pubsub --subscribers 4 --messages 2000000
//! ```

mod baseline;
mod hash;
mod heal;
mod hub_mesh;
mod hub_verify;
mod invoices;
mod macula_side;
mod nats_side;
mod registry;
mod schedule;
mod sim;
mod start;

/// mimalloc: messages are allocated on a reader's thread and freed on a writer's; glibc's
/// allocator serialises that on an arena lock (measured: ~10% of pub/sub time in futex wake-ups).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "macula-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Which servers to measure.
    #[arg(long, global = true, default_value = "both")]
    target: Target,
    /// Print results as JSON lines.
    #[arg(long, global = true)]
    json: bool,
    /// Repeat each scenario this many times per server and report the median (loopback figures on
    /// a shared 2-core machine vary by ±30% from run to run).
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    /// Metering on the Macula node: on (the default, as shipped), off, or both side by side
    /// (figures of the unmetered node are labelled `unmetered`).
    #[arg(long, global = true, default_value = "on")]
    metering: Metering,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Metering {
    On,
    Off,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    Macula,
    Nats,
    Both,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Publish → subscribe throughput; `--subscribers N` for 1:N fan-out.
    Pubsub {
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
    },
    /// Sequential RPC round trips: p50/p99 latency.
    RpcLatency {
        #[arg(long, default_value_t = 20_000)]
        calls: u64,
    },
    /// RPC throughput with many concurrent callers, each making sequential calls.
    RpcThroughput {
        #[arg(long, default_value_t = 64)]
        callers: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Memory per idle WebSocket session (Macula only).
    Idle {
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
    },
    /// The machine's floor: one TCP round trip of 64 bytes to an echo process.
    Baseline {
        #[arg(long, default_value_t = 20_000)]
        calls: u64,
    },
    /// Cross-node pub/sub: publisher on node A, subscriber on node B of a two-node mesh,
    /// side by side with the same figure on one node.
    CrossPubsub {
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Cross-node RPC latency: caller on node A, callee on node B.
    CrossRpc {
        #[arg(long, default_value_t = 20_000)]
        calls: u64,
    },
    /// In-process mesh of many nodes: DHT lookup success, requests and latency; event delivery.
    MeshSim {
        #[arg(long, default_value_t = 200)]
        nodes: usize,
        #[arg(long, default_value_t = 200)]
        lookups: usize,
        /// Nodes with a subscriber.
        #[arg(long, default_value_t = 20)]
        subscribers: usize,
        /// Nodes with a publisher.
        #[arg(long, default_value_t = 5)]
        publishers: usize,
        /// Events per publisher.
        #[arg(long, default_value_t = 50)]
        events: u64,
    },
    /// The registry: REST create/list throughput on SQLite and API-key verification cost.
    Registry {
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
    /// The monthly invoice run on SQLite (target: 10,000 realms in under 10 s).
    Invoices {
        #[arg(long, default_value_t = 10_000)]
        realms: usize,
    },
    /// Placement by the nodes themselves, in process: placements/s and latency (goal ≥ 1,000/s,
    /// p95 ≤ 100 ms at ≥ 100 nodes, signatures on).
    Schedule {
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        #[arg(long, default_value_t = 3_000)]
        placements: usize,
        /// Tenders in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Content hashing as the Hub verifies packages, side by side with `sha256sum` of the same
    /// file (goal ≥ 1 GiB/s).
    Hash {
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Verifying packages as a node does before installing one: the index through TUF, the
    /// manifest, SBOM and signed provenance (goal ≤ 5 ms per package).
    HubVerify {
        #[arg(long, default_value_t = 50)]
        packages: usize,
        #[arg(long, default_value_t = 5)]
        publishers: usize,
    },
    /// A revocation at the Hub until every node flags its replicas of the package, on
    /// `macula up --nodes N` (goal ≤ 10 s; needs target/release/macula).
    HubRevoke {
        #[arg(long, default_value_t = 5)]
        nodes: u32,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Installing a package on every node of `macula up --nodes N`, from peers and from the Hub
    /// alone (needs target/release/macula).
    HubInstall {
        #[arg(long, default_value_t = 5)]
        nodes: u32,
        #[arg(long, default_value_t = 100)]
        mib: u64,
    },
    /// Self-healing on real node processes: SIGKILL a node that runs a replica, time until the
    /// replica runs elsewhere (goal p95 ≤ 5 s), restart the node, repeat.
    Heal {
        #[arg(long, default_value_t = 5)]
        nodes: u32,
        #[arg(long, default_value_t = 10)]
        kills: usize,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
    },
    /// Native replica start, as a node starts one (control groups, Landlock, output captured),
    /// side by side with a plain spawn of the same command (goal p95 ≤ 50 ms); and a container
    /// replica's start through the node's Podman beside `podman run` of the same image (where
    /// podman and runc are installed).
    Start {
        #[arg(long, default_value_t = 200)]
        starts: usize,
        /// Container starts (0: none).
        #[arg(long, default_value_t = 20)]
        container_starts: usize,
    },
    /// Every scenario with default sizes.
    All,
    /// (internal) a TCP echo server for the baseline.
    #[command(hide = true)]
    Echo,
    /// (internal) run a Macula node for the benchmark.
    #[command(hide = true)]
    Node {
        config: std::path::PathBuf,
        /// Join a mesh, with this node number (its identity file).
        #[arg(long)]
        mesh: Option<u32>,
        #[arg(long)]
        bootstrap: Option<String>,
        /// Run without metering (for `--metering off|both`).
        #[arg(long)]
        no_metering: bool,
    },
}

/// One measured figure.
pub struct Figure {
    pub scenario: String,
    pub server: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub note: String,
}

fn print(figs: &[Figure], json: bool) {
    for f in figs {
        if json {
            println!(
                "{}",
                serde_json::json!({"scenario": f.scenario, "server": f.server, "value": f.value, "unit": f.unit, "note": f.note})
            );
        } else {
            println!(
                "{:<34} {:<7} {:>14.1} {:<10} {}",
                f.scenario, f.server, f.value, f.unit, f.note
            );
        }
    }
    // Ratios where both servers were measured, and cross-node against one node.
    if !json {
        print_ratios(figs, "macula", "nats");
        print_ratios(figs, "mesh", "1 node");
        print_ratios(figs, "macula", "unmetered");
    }
}

fn print_ratios(figs: &[Figure], num: &str, den: &str) {
    for m in figs.iter().filter(|f| f.server == num) {
        if let Some(n) = figs
            .iter()
            .find(|f| f.server == den && f.scenario == m.scenario && f.unit == m.unit)
        {
            if n.value > 0.0 {
                println!(
                    "{:<34} ratio   {:>14.2} {num}/{den}",
                    m.scenario,
                    m.value / n.value
                );
            }
        }
    }
}

fn main() -> Result<()> {
    // `macula-bench __exec`: the exec shim of the bench nodes' replicas (before any thread).
    if std::env::args_os().nth(1).is_some_and(|a| a == "__exec") {
        macula_workloads::runtime::sandbox::main();
    }
    let cli = Cli::parse();
    // Logs only when asked for (`MACULA_LOG=macula_mesh=debug`): figures stay readable.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("MACULA_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    if let Cmd::Node {
        config,
        mesh,
        bootstrap,
        no_metering,
    } = &cli.cmd
    {
        return macula_side::run_node(config, *mesh, bootstrap.clone(), !no_metering);
    }
    if let Cmd::Echo = &cli.cmd {
        return baseline::run_echo();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Cmd::MeshSim {
        nodes,
        lookups,
        subscribers,
        publishers,
        events,
    } = cli.cmd
    {
        let a = sim::SimArgs {
            nodes: nodes.max(publishers + subscribers + 2),
            lookups,
            subscribers,
            publishers,
            events,
        };
        let figs = rt.block_on(sim::run(&a))?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::Invoices { realms } = cli.cmd {
        let figs = rt.block_on(invoices::run(realms))?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::Schedule {
        nodes,
        placements,
        concurrency,
    } = cli.cmd
    {
        let figs = rt.block_on(schedule::run(nodes, placements, concurrency))?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::HubVerify {
        packages,
        publishers,
    } = cli.cmd
    {
        let figs = rt.block_on(hub_verify::run(packages, publishers))?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::HubInstall { nodes, mib } = cli.cmd {
        let figs = hub_mesh::install(nodes, mib)?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::HubRevoke { nodes, rounds } = cli.cmd {
        let figs = hub_mesh::revoke(nodes, rounds)?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::Hash { mib, runs } = cli.cmd {
        let figs = hash::run(mib, runs)?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::Heal {
        nodes,
        kills,
        replicas,
    } = cli.cmd
    {
        let figs = rt.block_on(heal::run(nodes, kills, replicas))?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::Start {
        starts,
        container_starts,
    } = cli.cmd
    {
        let figs = rt.block_on(start::run(starts, container_starts))?;
        print(&figs, cli.json);
        return Ok(());
    }
    if let Cmd::Registry { requests, clients } = cli.cmd {
        let figs = rt.block_on(registry::run(requests, clients))?;
        print(&figs, cli.json);
        return Ok(());
    }
    rt.block_on(async move {
        let scenarios: Vec<Cmd> = match cli.cmd {
            Cmd::All => vec![
                Cmd::Baseline { calls: 20_000 },
                Cmd::Pubsub {
                    messages: 2_000_000,
                    size: 64,
                    subscribers: 1,
                },
                Cmd::Pubsub {
                    messages: 500_000,
                    size: 64,
                    subscribers: 4,
                },
                Cmd::RpcLatency { calls: 20_000 },
                Cmd::RpcThroughput {
                    callers: 64,
                    seconds: 5,
                },
                Cmd::Idle { sessions: 10_000 },
                Cmd::CrossPubsub {
                    messages: 2_000_000,
                    size: 64,
                },
                Cmd::CrossRpc { calls: 20_000 },
            ],
            other => vec![other],
        };
        let mut figs = vec![];
        // Progress on stderr (drawn only on a terminal): a full run takes minutes.
        let progress = indicatif::ProgressBar::new((scenarios.len() * cli.runs.max(1)) as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} runs  {elapsed}  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        for s in scenarios {
            let mut runs = vec![];
            progress.set_message(scenario_name(&s));
            // Alternate the servers run by run so that drift in the machine's load hits both alike.
            for _ in 0..cli.runs.max(1) {
                progress.inc(1);
                if let Cmd::Baseline { calls } = s {
                    runs.extend(baseline::round_trips(calls).await?);
                    continue;
                }
                let macula_only = matches!(
                    s,
                    Cmd::Idle { .. } | Cmd::CrossPubsub { .. } | Cmd::CrossRpc { .. }
                );
                if matches!(s, Cmd::CrossPubsub { .. } | Cmd::CrossRpc { .. }) {
                    // These start their own pair of meshed nodes.
                    runs.extend(macula_side::run_cross(&s).await?);
                } else if cli.target != Target::Nats {
                    let variants: &[bool] = match cli.metering {
                        Metering::On => &[true],
                        Metering::Off => &[false],
                        Metering::Both => &[false, true],
                    };
                    for &metered in variants {
                        let server = macula_side::Server::start_metered(metered).await?;
                        let mut figs = macula_side::run(&server, &s).await?;
                        if !metered && cli.metering == Metering::Both {
                            for f in &mut figs {
                                f.server = "unmetered";
                            }
                        }
                        runs.extend(figs);
                        server.stop().await;
                    }
                }
                if cli.target != Target::Macula && !macula_only {
                    match nats_side::Server::start().await {
                        Ok(server) => {
                            runs.extend(nats_side::run(&server, &s).await?);
                            server.stop().await;
                        }
                        Err(e) => eprintln!("skipping NATS: {e:#}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            figs.extend(median(runs));
        }
        progress.finish_and_clear();
        print(&figs, cli.json);
        Ok(())
    })
}

/// What a scenario is called in the progress line.
fn scenario_name(s: &Cmd) -> String {
    let debug = format!("{s:?}");
    debug
        .split([' ', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Collapses repeated runs of the same (scenario, server) into their median, noting the range.
fn median(runs: Vec<Figure>) -> Vec<Figure> {
    let mut out: Vec<Figure> = vec![];
    let mut keys: Vec<(String, &'static str)> = vec![];
    for f in &runs {
        if !keys.iter().any(|(s, v)| *s == f.scenario && *v == f.server) {
            keys.push((f.scenario.clone(), f.server));
        }
    }
    for (scenario, server) in keys {
        let mut same: Vec<&Figure> = runs
            .iter()
            .filter(|f| f.scenario == scenario && f.server == server)
            .collect();
        same.sort_by(|a, b| a.value.total_cmp(&b.value));
        let mid = same[same.len() / 2];
        let note = if same.len() > 1 {
            format!(
                "median of {} (range {:.1}–{:.1}); {}",
                same.len(),
                same[0].value,
                same[same.len() - 1].value,
                mid.note
            )
        } else {
            mid.note.clone()
        };
        out.push(Figure {
            scenario,
            server,
            value: mid.value,
            unit: mid.unit,
            note,
        });
    }
    out
}

/// Publishes `messages` copies of the pre-encoded `frame` as fast as the socket takes them (64 KiB
/// writes), then collects what the subscriber tasks counted. Shared by both servers so that they
/// are driven and measured identically.
#[allow(clippy::too_many_arguments)]
pub async fn measure_pubsub<W: tokio::io::AsyncWrite + Unpin>(
    server: &'static str,
    w: &mut W,
    frame: &[u8],
    messages: u64,
    subscribers: usize,
    size: usize,
    start: std::time::Instant,
    tasks: Vec<tokio::task::JoinHandle<(u64, std::time::Instant)>>,
) -> Result<Vec<Figure>> {
    use tokio::io::AsyncWriteExt;
    let per_chunk = (64 * 1024 / frame.len()).max(1);
    let chunk: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * per_chunk)
        .collect();
    let mut sent = 0u64;
    while sent < messages {
        let k = (messages - sent).min(per_chunk as u64) as usize;
        w.write_all(&chunk[..k * frame.len()]).await?;
        sent += k as u64;
    }
    w.flush().await?;
    let mut total = 0;
    let mut end = start;
    for t in tasks {
        let (n, last) = t.await?;
        total += n;
        end = end.max(last);
    }
    let secs = end.duration_since(start).as_secs_f64().max(1e-9);
    Ok(vec![Figure {
        scenario: format!("pubsub 1:{subscribers} {size}B events/s"),
        server,
        value: total as f64 / secs,
        unit: "events/s",
        note: format!(
            "{total}/{} delivered in {secs:.2}s",
            messages * subscribers as u64
        ),
    }])
}

/// p50/p99 figures from round-trip times in microseconds.
pub fn latency_figures(server: &'static str, mut lat: Vec<f64>, note: String) -> Vec<Figure> {
    lat.sort_by(|a, b| a.total_cmp(b));
    vec![
        Figure {
            scenario: "rpc latency p50".into(),
            server,
            value: percentile(&lat, 0.5),
            unit: "µs",
            note,
        },
        Figure {
            scenario: "rpc latency p99".into(),
            server,
            value: percentile(&lat, 0.99),
            unit: "µs",
            note: String::new(),
        },
    ]
}

/// Waits for the caller tasks of a throughput run and turns their count into calls per second.
pub async fn throughput_figure(
    server: &'static str,
    callers: usize,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    done: &std::sync::atomic::AtomicU64,
) -> Result<Figure> {
    let start = std::time::Instant::now();
    for t in tasks {
        t.await??;
    }
    let n = done.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Figure {
        scenario: format!("rpc throughput {callers} callers"),
        server,
        value: n as f64 / start.elapsed().as_secs_f64(),
        unit: "calls/s",
        note: format!("{n} calls"),
    })
}

/// Percentile of a sorted list of durations in microseconds.
pub fn percentile(sorted_us: &[f64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i.min(sorted_us.len() - 1)]
}

pub(crate) use Cmd as Scenario;
