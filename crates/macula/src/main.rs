//! The `macula` command.

mod billing_cmds;
mod client_cmds;
mod hosting;
mod hub_cmds;
mod local;
mod mesh_cmds;
mod registry_cmds;
mod run;
mod workload_cmds;

/// mimalloc: messages are allocated on a reader's thread and freed on a writer's; glibc's
/// allocator serialises that on an arena lock (measured: ~10% of pub/sub time in futex wake-ups).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Macula: a decentralized application mesh. Realms, pub/sub and RPC over WAMP, authorized at the edge.
#[derive(Parser)]
#[command(name = "macula", version, propagate_version = true)]
#[command(
    after_help = "Start here:\n  macula up                     start a local node with a demo realm and print a key\n  macula sub com.example.demo.hello\n  macula pub com.example.demo.hello '\"hi\"'\n\nEvery command has --help with examples."
)]
struct Cli {
    /// Print machine-readable JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where a client command connects. Defaults come from `macula up`'s directory, so commands work
/// right after `macula up` with no flags.
#[derive(Args, Clone)]
pub struct Conn {
    /// Node URL: ws://host:port/ws (WebSocket), rs://host:port (RawSocket), or over TLS
    /// wss://host:port/ws and rss://host:port.
    #[arg(long, env = "MACULA_URL", default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// For wss:// and rss://: trust only the CA certificates in this PEM file (a private CA,
    /// or the certificate `macula up` prints) instead of the public roots.
    #[arg(long, env = "MACULA_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Realm to join [default: the realm created by `macula up`].
    #[arg(long, env = "MACULA_REALM")]
    pub realm: Option<String>,
    /// API key (sk_live_...) [default: the admin key printed by `macula up`].
    #[arg(long, env = "MACULA_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Config directory of `macula up` used for the defaults above.
    #[arg(long, env = "MACULA_HOME", default_value_os_t = local::default_home())]
    pub home: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Start a complete local node on embedded defaults: creates a config directory with a trust
    /// root and a demo realm, issues a fresh admin key, prints copy-paste examples, and runs.
    Up(run::UpArgs),
    /// Run a node from a config directory (see `macula up` for one that is set up for you).
    Node(run::NodeArgs),
    /// Publish an event: `macula pub com.example.demo.hello '{"n": 1}'`.
    Pub(client_cmds::PubArgs),
    /// Subscribe and print events: `macula sub com.example.demo --match prefix`.
    Sub(client_cmds::SubArgs),
    /// Call a procedure and print its result: `macula call com.example.demo.add '[2, 3]'`.
    Call(client_cmds::CallArgs),
    /// Register a procedure answered by running a command:
    /// `macula serve com.example.demo.date -- date -u`.
    Serve(client_cmds::ServeArgs),
    /// Create an account on a registry: `macula signup --email you@example.com`.
    Signup(registry_cmds::AccountArgs),
    /// Log in to a registry; the credential is kept under ~/.config/macula for later commands.
    Login(registry_cmds::AccountArgs),
    /// Log out (ends the session and forgets the credential).
    Logout(registry_cmds::Server),
    /// Your account: show it, verify its email address, change the address.
    #[command(subcommand)]
    Account(registry_cmds::AccountCmd),
    /// API keys: create, list, revoke (in the registry once logged in, else in a config directory).
    #[command(subcommand)]
    Keys(local::KeysCmd),
    /// Realms: list, create, show, delete, renew, transfer, acl (registry once logged in).
    #[command(subcommand)]
    Realms(local::RealmsCmd),
    /// A realm's status: owner, expiry, keys, members, live sessions.
    Status(registry_cmds::StatusArgs),
    /// Inspect the mesh (peers, latency, interest tables) and certify nodes.
    #[command(subcommand)]
    Mesh(mesh_cmds::MeshCmd),
    /// Realm-scoped records in the mesh's DHT (signed, with a TTL).
    #[command(subcommand)]
    Dht(mesh_cmds::DhtCmd),
    /// A realm's usage this month (or --month): operations by kind, egress, latency, allowance
    /// used, charges so far, quota notices; --csv for the rows.
    Usage(billing_cmds::UsageArgs),
    /// A realm's usage hour by hour (last 24 hours by default).
    Metrics(billing_cmds::MetricsArgs),
    /// Invoices: list, show (text or --html), pay; run and void for operators.
    #[command(subcommand)]
    Invoices(billing_cmds::InvoicesCmd),
    /// The plans (Hobby, Starter, Professional, Enterprise), add-ons and billing rules.
    Plans(registry_cmds::Server),
    /// Deploy a payload (a command, or a manifest with -f) into the realm: the nodes place,
    /// run and heal its replicas.
    Deploy(workload_cmds::DeployArgs),
    /// The Hub: signing keys, publishers, attest and publish packages, search, yank, revoke,
    /// retest, certification, offline bundles.
    Hub(hub_cmds::HubArgs),
    /// The realm's workloads and their replicas: node, state, restarts, lease token, age.
    #[command(visible_alias = "ps")]
    Workloads(workload_cmds::WorkloadsArgs),
    /// A workload's output, from whichever nodes run it (--follow to stream).
    Logs(workload_cmds::LogsArgs),
    /// Change how many replicas a payload has.
    Scale(workload_cmds::ScaleArgs),
    /// Delete a workload: every node stops its replicas.
    Delete(workload_cmds::DeleteArgs),
    /// The realm's jobs: completions that count, runs going, failures, state.
    Jobs(workload_cmds::JobsArgs),
    /// A payload's versions: wait for a rolling update (status), list (history), go back (undo).
    #[command(subcommand)]
    Rollout(workload_cmds::RolloutCmd),
}

fn main() {
    // `macula __exec`: the exec shim a node starts a native replica through (see
    // `macula_workloads::runtime`): before any thread exists, it sandboxes itself and becomes
    // the replica.
    if std::env::args_os().nth(1).is_some_and(|a| a == "__exec") {
        macula_workloads::runtime::sandbox::main();
    }
    // Output piped into `head` ends quietly, as for any Unix tool, instead of panicking on EPIPE.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MACULA_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error,macula=info,macula_node=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let json = cli.json;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(a) => run::up(a, json).await,
            Command::Node(a) => run::node(a).await,
            Command::Pub(a) => client_cmds::publish(a, json).await,
            Command::Sub(a) => client_cmds::subscribe(a, json).await,
            Command::Call(a) => client_cmds::call(a, json).await,
            Command::Serve(a) => client_cmds::serve(a, json).await,
            Command::Signup(a) => registry_cmds::signup(a, json),
            Command::Login(a) => registry_cmds::login(a, json),
            Command::Logout(s) => registry_cmds::logout(s, json),
            Command::Account(c) => registry_cmds::account(c, json),
            Command::Status(a) => registry_cmds::status(a, json),
            Command::Keys(c) => local::keys(c, json),
            Command::Realms(c) => local::realms(c, json),
            Command::Mesh(c) => mesh_cmds::mesh(c, json).await,
            Command::Dht(c) => mesh_cmds::dht(c, json).await,
            Command::Usage(a) => billing_cmds::usage(a, json),
            Command::Metrics(a) => billing_cmds::metrics(a, json),
            Command::Invoices(c) => billing_cmds::invoices(c, json),
            Command::Plans(s) => billing_cmds::plans(s, json),
            Command::Deploy(a) => workload_cmds::deploy(a, json),
            Command::Hub(a) => hub_cmds::hub(a, json).await,
            Command::Workloads(a) => workload_cmds::workloads(a, json),
            Command::Logs(a) => workload_cmds::logs(a, json),
            Command::Scale(a) => workload_cmds::scale(a, json),
            Command::Delete(a) => workload_cmds::delete(a, json),
            Command::Jobs(a) => workload_cmds::jobs(a, json),
            Command::Rollout(c) => workload_cmds::rollout(c, json),
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn pub_takes_a_positional_payload_and_a_global_json_flag() {
        use clap::Parser;
        let cli =
            super::Cli::try_parse_from(["macula", "--json", "pub", "com.a.b", "[1]"]).unwrap();
        assert!(cli.json);
        assert!(
            matches!(cli.command, super::Command::Pub(ref p) if p.payload.as_deref() == Some("[1]"))
        );
    }
}
