//! Node configuration (`node.yaml` in the config directory). Every limit is explicit and has a
//! default that suits a single machine; see `docs` in the README for the full list.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the node listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// WebSocket (`/ws`), HTTP bridge (`/v1/...`), `/metrics`, `/healthz`, `/readyz`.
    pub http: SocketAddr,
    /// WAMP RawSocket over TCP.
    pub rawsocket: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: ([127, 0, 0, 1], 8080).into(),
            rawsocket: ([127, 0, 0, 1], 8081).into(),
        }
    }
}

/// Limits that protect the node and its other clients from one session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted from a client, in bytes; bigger ones ABORT the session.
    pub max_message_size: usize,
    /// Messages queued for one session before the slow-consumer policy applies.
    pub outbox_capacity: usize,
    /// Bytes queued for one session (roughly, as held in memory) before the slow-consumer
    /// policy applies: with large messages, the count alone would allow gigabytes.
    pub outbox_max_bytes: usize,
    pub slow_consumer: SlowConsumerPolicy,
    /// Messages per second one session may send (token bucket); 0 disables the limit.
    pub rate_limit_per_second: u64,
    /// Burst size of the rate limit.
    pub rate_limit_burst: u64,
    /// Timeout for calls that set none, in milliseconds; 0 means calls may wait forever.
    pub call_timeout_ms: u64,
    /// Time a connection has to complete HELLO → WELCOME, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Sessions this node accepts at once.
    pub max_sessions: usize,
    /// Largest HTTP bridge request body, in bytes.
    pub max_http_body: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions_per_session: usize,
    /// Registrations one session may hold.
    pub max_registrations_per_session: usize,
    /// Calls one session may have waiting for an answer; more get `macula.error.limit_exceeded`.
    pub max_calls_per_session: usize,
    /// Connections the HTTP listener holds at once (WebSockets included); more are closed as
    /// they arrive.
    pub max_http_connections: usize,
    /// Time a client has to send a request's complete headers, in milliseconds.
    pub http_header_timeout_ms: u64,
    /// RawSocket connections this node holds at once; more are closed as they arrive.
    pub max_rawsocket_connections: usize,
    /// How long the state of a realm used only by HTTP bridge requests is kept after the last
    /// one, in milliseconds (then freed, and its DHT announcement withdrawn).
    pub bridge_realm_linger_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 1024 * 1024,
            outbox_capacity: 8192,
            outbox_max_bytes: 64 << 20,
            slow_consumer: SlowConsumerPolicy::DropOldest,
            rate_limit_per_second: 100_000,
            rate_limit_burst: 200_000,
            call_timeout_ms: 60_000,
            handshake_timeout_ms: 10_000,
            max_sessions: 100_000,
            max_http_body: 1024 * 1024,
            max_subscriptions_per_session: 10_000,
            max_registrations_per_session: 10_000,
            max_calls_per_session: 1_000,
            max_http_connections: 20_000,
            http_header_timeout_ms: 10_000,
            max_rawsocket_connections: 20_000,
            bridge_realm_linger_ms: 10_000,
        }
    }
}

impl Limits {
    pub fn call_timeout(&self) -> Option<Duration> {
        (self.call_timeout_ms > 0).then(|| Duration::from_millis(self.call_timeout_ms))
    }
}

/// How the node joins the mesh (`mesh:` in node.yaml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshSection {
    /// Join a mesh at all. Off: the node serves only its own clients.
    pub enabled: bool,
    /// QUIC listen addresses (multiaddr), e.g. `/ip4/0.0.0.0/udp/7600/quic-v1`.
    pub listen: Vec<String>,
    /// Addresses other nodes should dial, when the listen address is not reachable as is.
    pub announce: Vec<String>,
    /// Nodes to join through (multiaddr, optionally ending in `/p2p/<peer id>`).
    pub bootstrap: Vec<String>,
    /// Node identity key (created on first start); relative to the config directory.
    pub identity: PathBuf,
    /// The operator's certificate for this node (from `macula mesh certify`); not needed where
    /// `trust/operator.key` is present. Relative to the config directory. Certificates expire:
    /// when a third of its validity is left the node asks its peers for a new one (a node holding
    /// the operator key issues it) and saves it here; a newer file put here is picked up too.
    pub cert: PathBuf,
    /// Validity of the certificates this node issues (its own where it holds the operator key,
    /// and renewals for its peers), in days. At most 400.
    pub cert_validity_days: u64,
    /// A silent peer is considered gone after this long (ms).
    pub peer_timeout_ms: u64,
    /// How often realm peers are looked up and lost peers redialled (ms).
    pub discovery_interval_ms: u64,
    /// Largest inter-node frame, in bytes.
    pub max_frame: usize,
    /// Bytes queued for one peer above which the sessions feeding it pause reading until it
    /// drains (backpressure instead of loss).
    pub peer_queue_bytes: usize,
    /// Bytes queued for one peer above which frames are dropped and counted (a peer that stopped
    /// reading but has not timed out yet).
    pub peer_queue_max_bytes: usize,
    /// Received inter-node bytes not yet processed above which the node stops reading from its
    /// peers (QUIC flow control then holds their senders).
    pub inbound_queue_bytes: usize,
    /// Kademlia lookup parallelism.
    pub dht_parallelism: usize,
    /// How often the DHT routing table is refreshed by bootstrap lookups, in seconds.
    pub dht_refresh_s: u64,
    /// Largest value `macula.dht.put` accepts, in bytes.
    pub dht_max_value: usize,
    /// Longest TTL `macula.dht.put` accepts, in seconds (also the default).
    pub dht_max_ttl_s: u64,
    /// A node with bootstrap peers admits sessions to a realm it knows only through an
    /// ancestor's registration once a peer has sent it every realm state it holds, or after
    /// this long (ms), so that a subrealm registered apart is never governed by its parent
    /// for want of its own state.
    pub state_sync_timeout_ms: u64,
    /// How long a deleted realm's tombstone is kept (and flooded), in seconds (30 days). After
    /// it, nodes forget the tombstone; a node that was cut off from every peer for longer than
    /// this forgets the states it learned from the mesh, so that it cannot bring back a state
    /// of a registration deleted meanwhile.
    pub tombstone_retention_s: u64,
    /// Interests and registrations one peer node may hold here at once (one per URI and match
    /// policy, whatever the number of its sessions behind each); beyond, its announcements are
    /// refused, so that a node that lies cannot grow this one's memory without bound.
    pub max_holds_per_peer: usize,
    /// Realms in which one peer node may hold interest or registrations here at once (each
    /// costs a realm's state); beyond, its announcements for new realms are refused.
    pub max_realms_per_peer: usize,
}

impl Default for MeshSection {
    fn default() -> Self {
        MeshSection {
            enabled: true,
            listen: vec!["/ip4/127.0.0.1/udp/7600/quic-v1".into()],
            announce: vec![],
            bootstrap: vec![],
            identity: PathBuf::from("node/identity.key"),
            cert: PathBuf::from("node/node.cert"),
            cert_validity_days: 90,
            peer_timeout_ms: 3000,
            discovery_interval_ms: 2000,
            max_frame: 16 << 20,
            peer_queue_bytes: 4 << 20,
            peer_queue_max_bytes: 64 << 20,
            inbound_queue_bytes: 8 << 20,
            dht_parallelism: 3,
            dht_refresh_s: 300,
            dht_max_value: 64 << 10,
            state_sync_timeout_ms: 30_000,
            dht_max_ttl_s: 86_400,
            tombstone_retention_s: 30 * 86_400,
            max_holds_per_peer: 262_144,
            max_realms_per_peer: 4096,
        }
    }
}

/// The control plane this node may host (`registry:` in node.yaml). It needs the trust root's
/// secret (`trust/operator.key`) in the config directory, since it certifies realm authorities.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// Serve the registry's REST API (`/v1/accounts`, `/v1/realms`, ...) on this node.
    pub enabled: bool,
    /// `sqlite://PATH` or `postgres://USER:PASSWORD@HOST/DB`; empty: `registry.db` in the config
    /// directory.
    pub database: String,
    /// Emails of platform operators (disputes, freeze, suspension).
    pub operators: Vec<String>,
    /// Lifetime of a login session, in days.
    pub session_ttl_days: u64,
    /// Failed logins in a row that lock an account.
    pub max_failed_logins: u32,
    /// How long a locked account stays locked, in minutes.
    pub lockout_minutes: u64,
    /// Login attempts per minute from one address.
    pub login_attempts_per_minute: u32,
    /// Days a registration or renewal buys.
    pub term_days: u64,
    /// Days an expired realm keeps working before it is disabled and its name is free.
    pub grace_days: u64,
    /// Fee recorded for a transfer, in cents.
    pub transfer_fee_cents: u64,
    /// How long a transfer code is valid, in hours.
    pub transfer_code_ttl_hours: u64,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Plans and add-ons (default: the seed's).
    pub prices: Prices,
    /// The key-encryption key that seals realm authorities' secrets in the database (64 hex
    /// digits; relative paths are in the config directory). Created with mode 0600 when
    /// missing. The environment variable `MACULA_REGISTRY_KEK`, when set, is used instead.
    /// Keep it apart from database backups: the two together mint keys for every realm.
    pub kek_file: PathBuf,
    /// How mail (email verification codes) is sent.
    pub mail: MailSection,
    /// How long an email verification code is valid, in hours.
    pub verification_ttl_hours: u64,
    /// Realms (subrealms included) one account may hold; 0: no limit. Operators are exempt.
    pub max_realms_per_account: u64,
    /// Registrations one account may make in 24 hours (each deleted one leaves a tombstone on
    /// every node); 0: no limit. Operators are exempt.
    pub max_registrations_per_day: u64,
    /// Reverse proxies in front of the registry whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Failed logins to one account per hour (all sources) past which only sources that logged
    /// in to it before may try; 0: no such limit.
    pub max_failed_logins_per_hour: u32,
    /// The Hub: packages, publishers and the TUF repository nodes verify them with.
    pub hub: HubSection,
}

/// `registry.hub` in node.yaml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubSection {
    /// Serve the Hub (`/v1/hub/...`) with the registry.
    pub enabled: bool,
    /// Where its repository, blobs and keys live; empty: `hub/` in the config directory.
    pub dir: PathBuf,
    /// An offline OSV database to scan packages' SBOMs with: OSV's `all.zip` (or one
    /// ecosystem's zip) or a directory of OSV JSON records; empty: no scan.
    pub osv: PathBuf,
    /// The largest file of a package accepted, in bytes.
    pub max_blob: u64,
    /// Keep the Hub's blobs in an S3-compatible bucket instead of `<dir>/blobs` (endpoint,
    /// bucket, region, prefix, access_key_id, secret_access_key_file, virtual_hosted,
    /// allow_http); unset: the filesystem.
    pub s3: macula_hub::s3::S3Config,
    /// The fee for certifying a release, in cents, charged to the publisher's owner when an
    /// operator certifies it; 0: free.
    pub certification_fee_cents: u64,
    /// The most bytes an account may have uploaded that no release names yet.
    pub max_unpublished_bytes: u64,
    /// How long (seconds) an upload no release names is kept before it is collected.
    pub upload_ttl_secs: u64,
}

impl Default for HubSection {
    fn default() -> Self {
        HubSection {
            enabled: true,
            dir: PathBuf::new(),
            osv: PathBuf::new(),
            max_blob: 1 << 30,
            s3: Default::default(),
            certification_fee_cents: 50_000,
            max_unpublished_bytes: 10 << 30,
            upload_ttl_secs: 86_400,
        }
    }
}

/// `registry.mail` in node.yaml.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailSection {
    /// Empty: write mail to the log. `smtps://user:pass@host:465` (SMTP over TLS),
    /// `smtp://user:pass@host:587?tls=required` (STARTTLS), `smtp://localhost:25` (a local
    /// relay, unencrypted), or `dir:PATH` (one .eml file per message).
    pub url: String,
    /// The sender (`Macula <noreply@example.com>`); default `Macula <noreply@localhost>`.
    pub from: String,
}

impl Default for RegistrySection {
    fn default() -> Self {
        RegistrySection {
            enabled: false,
            database: String::new(),
            operators: vec![],
            session_ttl_days: 30,
            max_failed_logins: 5,
            lockout_minutes: 15,
            login_attempts_per_minute: 30,
            term_days: 365,
            grace_days: 30,
            transfer_fee_cents: 2000,
            transfer_code_ttl_hours: 168,
            max_body: 64 << 10,
            prices: Prices::default(),
            kek_file: PathBuf::from("registry.kek"),
            mail: MailSection::default(),
            verification_ttl_hours: 24,
            max_realms_per_account: 100,
            max_registrations_per_day: 20,
            trusted_proxies: vec![],
            max_failed_logins_per_hour: 50,
            hub: HubSection::default(),
        }
    }
}

/// Metering of every billed operation (see `meter.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringSection {
    /// Count usage per realm and API key. Off, nothing is counted or billed on this node.
    pub enabled: bool,
    /// Where the counters file lives (relative to the config directory). One node per directory.
    pub dir: PathBuf,
    /// Distinct (realm, API key) pairs this node can count at once (1 KiB of counters file
    /// each). A pair's slot is released once its usage is delivered and it was idle for the
    /// rest of its hour; a new pair that finds no slot is refused, never counted unbilled.
    pub slots: usize,
    /// What the counters file may grow to, in slots: when every slot is taken it grows by
    /// `slots` at a time (1 KiB of disk per slot), so that many accounts at once do not lock new
    /// ones out. Past this, new pairs are refused until slots are released.
    pub max_slots: usize,
    /// Pairs the keys of one realm registration may have metered on this node at once (its
    /// subrealms times its keys): past it, new sessions and bridge requests of that
    /// registration get `macula.error.limit_exceeded`, and no one else is affected. 0: no limit.
    pub max_pairs_per_registration: usize,
    /// How often usage is delivered to the billing aggregator, in ms.
    pub flush_ms: u64,
    /// How often the counters file is written to disk (against power loss), in ms. A process
    /// crash loses nothing either way.
    pub sync_ms: u64,
    /// Raw per-operation events for analytics (the seed's metering event, one JSON object per
    /// line): 0 = off, N = one operation in N. Not used for billing.
    pub events_sample: u64,
    /// Where raw events are appended (relative to the config directory).
    pub events_file: PathBuf,
}

impl Default for MeteringSection {
    fn default() -> Self {
        MeteringSection {
            enabled: true,
            dir: PathBuf::from("meter"),
            slots: 16_384,
            max_slots: 262_144,
            max_pairs_per_registration: 1_024,
            flush_ms: 1000,
            sync_ms: 5000,
            events_sample: 0,
            events_file: PathBuf::from("meter/events.jsonl"),
        }
    }
}

pub use macula_common::prices::{AddonPrice, Prices, TierPrice};

/// What to do when a session's outgoing queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    #[default]
    DropOldest,
    Disconnect,
}

/// The whole node configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub listen: Listen,
    pub limits: Limits,
    pub mesh: MeshSection,
    pub registry: RegistrySection,
    pub metering: MeteringSection,
    /// TLS on the client listeners (see `tls.rs`).
    pub tls: crate::tls::TlsSection,
    /// How often the config directory is re-read for policy and revocation changes, in ms.
    pub reload_interval_ms: u64,
    /// Running replicas of workloads here (see `workloads/`).
    pub workloads: WorkloadsSection,
    /// The Hub this node installs packages from (see `workloads/packages.rs`).
    pub hub: HubClientSection,
}

/// `hub:` in node.yaml: where the node reads the Hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubClientSection {
    /// The HTTP address of the node that serves the Hub (`http://host:8080`); empty: this node's
    /// own when it hosts the Hub (registry.enabled and registry.hub.enabled), else none.
    pub url: String,
    /// The Hub's root of trust (`macula hub trust` prints it); relative to the config
    /// directory. The newest root the node verifies replaces it.
    pub root: PathBuf,
    /// How often the node checks the Hub for revocations, in seconds (they also spread at once
    /// over the mesh from the Hub's node).
    pub check_secs: u64,
    /// Fetch packages' files from peers that have them before asking the Hub (and serve
    /// those this node has to its peers).
    pub peers: bool,
}

impl Default for HubClientSection {
    fn default() -> Self {
        HubClientSection {
            url: String::new(),
            root: PathBuf::from("hub-root.json"),
            check_secs: 300,
            peers: true,
        }
    }
}

/// What this node offers to run workloads with, and how it runs them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadsSection {
    /// Take part in placement (bid for replicas and run them). Off, the node still keeps
    /// deploy records and answers lease requests as an authority.
    pub enabled: bool,
    /// CPU offered to replicas, in millicores (0: all of the machine's).
    pub cpu_millis: u64,
    /// Memory offered to replicas, in bytes (0: three quarters of the machine's).
    pub memory_bytes: u64,
    /// Processes offered to replicas.
    pub pids: u64,
    /// Labels a manifest's `placement.labels` can ask for.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Region a manifest's `placement.region` can ask for.
    pub region: Option<String>,
    /// What an instance-hour costs here, in thousandths of a cent (cheaper wins a tie).
    pub millicents_per_hour: u64,
    /// The exec shim that starts native replicas (empty: this program with `__exec`).
    pub shim: PathBuf,
    /// Refuse to run a replica where its resources cannot be limited (no control groups).
    pub require_limits: bool,
    /// Refuse to run a replica where its files cannot be sandboxed (no Landlock).
    pub require_sandbox: bool,
    /// A lease's term in ms: a dead node's replicas are placed elsewhere about this long after
    /// it died. Holders renew at a third of it.
    pub lease_term_ms: u64,
    /// How long a node that stopped answering still counts among a realm's nodes when slots'
    /// lease authorities are moved to follow them, in ms: a damper against moving on every flap
    /// of a link. Safety does not rest on it (a slot's authorities change only with a majority
    /// of those they replace); past it, a dead node leaves the slots' authorities.
    pub member_grace_ms: u64,
    /// Where replicas' working directories and logs go (relative to the config directory).
    pub dir: PathBuf,
    /// The `podman` program for the podman runtime (containers): `auto` finds it (and `runc`)
    /// on `PATH`; `off` runs no containers; else its path.
    pub podman: String,
    /// Directories of image archives (`podman save` files) containers' images are loaded from
    /// (no registry is reached); empty: `<dir>/images`.
    pub images: Vec<PathBuf>,
}

impl Default for WorkloadsSection {
    fn default() -> Self {
        WorkloadsSection {
            enabled: true,
            cpu_millis: 0,
            memory_bytes: 0,
            pids: 4_096,
            labels: Default::default(),
            region: None,
            millicents_per_hour: 5_000,
            shim: PathBuf::new(),
            require_limits: true,
            require_sandbox: true,
            lease_term_ms: 3_000,
            member_grace_ms: 300_000,
            dir: PathBuf::from("workloads"),
            podman: "auto".into(),
            images: vec![],
        }
    }
}

impl NodeConfig {
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(if self.reload_interval_ms == 0 {
            1000
        } else {
            self.reload_interval_ms
        })
    }
}
