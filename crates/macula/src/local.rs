//! Commands that work on a local config directory: keys and realms.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use macula_node::ConfDir;

/// `$<var>/macula`, else `~/<under_home>/macula`, else `./<last_resort>` (XDG base directories).
pub fn xdg_dir(var: &str, under_home: &str, last_resort: &str) -> PathBuf {
    if let Some(x) = std::env::var_os(var).filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("macula");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(h).join(under_home).join("macula");
    }
    PathBuf::from(last_resort)
}

/// `$MACULA_HOME`, else `$XDG_DATA_HOME/macula`, else `~/.local/share/macula`.
pub fn default_home() -> PathBuf {
    xdg_dir("XDG_DATA_HOME", ".local/share", ".macula")
}

/// The file where `macula up` leaves the admin key it printed, and the realm it belongs to.
pub fn up_key_path(home: &std::path::Path) -> PathBuf {
    home.join("up-admin.key")
}

/// Where a keys/realms command acts: the registry you logged in to (`macula login`), or a
/// node's config directory (`--config`, the operator's offline mode, and the default until you
/// log in).
#[derive(Args)]
pub struct DirArg {
    /// Act on this config directory instead of the registry [default: the one `macula up`
    /// uses, when not logged in].
    #[arg(long, env = "MACULA_HOME")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub server: crate::registry_cmds::Server,
}

impl DirArg {
    /// The registry to use, or `None` for the config directory.
    fn registry(&self) -> Result<Option<crate::registry_cmds::Api>> {
        if self.config.is_some() {
            return Ok(None);
        }
        (self.server.server.is_some() || crate::registry_cmds::stored_credential().is_some())
            .then(|| crate::registry_cmds::Api::new(&self.server))
            .transpose()
    }

    fn dir(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(default_home)
    }
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Issue a key. It is printed once and never stored (the registry keeps only its hash).
    ///
    /// Example: macula keys create --realm com.example.demo --role service_account --name "home bots" --expires 90d
    Create {
        #[command(flatten)]
        dir: DirArg,
        /// The realm [default: your only realm, when you have one].
        #[arg(long)]
        realm: Option<String>,
        #[arg(long, default_value = "service_account")]
        role: String,
        /// A name to recognise the key by in listings.
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. 30d, 12h, 90m; `never` for no expiry.
        #[arg(long, default_value = "365d")]
        expires: String,
        /// Bind the key to an Ed25519 public key (64 hex) for WAMP-Cryptosign clients.
        #[arg(long)]
        pubkey: Option<String>,
    },
    /// List issued keys (ids, roles, expiry, revocation).
    List {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        realm: Option<String>,
    },
    /// Revoke a key by id. Every node refuses it and closes the sessions using it within
    /// seconds.
    Revoke {
        #[command(flatten)]
        dir: DirArg,
        /// The key id (key_…), as `macula keys list` shows it.
        key_id: String,
    },
}

#[derive(Subcommand)]
pub enum RealmsCmd {
    /// List your realms (or those of the config directory).
    List {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Register a realm (reverse-DNS, first come first served) with the roles admin, developer
    /// and service_account. A subrealm (com.acme.shop) only by the owner of its parent.
    ///
    /// Example: macula realms create com.myapp
    Create {
        #[command(flatten)]
        dir: DirArg,
        name: String,
        /// Delegate a subrealm to this account.
        #[arg(long)]
        owner: Option<String>,
        /// hobby, starter, professional or enterprise.
        #[arg(long)]
        tier: Option<String>,
    },
    /// Show a realm: status, owner, expiry, keys, members.
    Show {
        #[command(flatten)]
        dir: DirArg,
        name: String,
    },
    /// Delete a realm you own (its keys stop working everywhere).
    Delete {
        #[command(flatten)]
        dir: DirArg,
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Renew a realm you own.
    Renew {
        #[command(flatten)]
        dir: DirArg,
        name: String,
        #[arg(long, default_value_t = 1)]
        years: u64,
    },
    /// Transfer a realm. The owner runs it without --code to get an authorization code; the new
    /// owner runs it with --code to take the realm over (a transfer fee is recorded).
    Transfer {
        #[command(flatten)]
        dir: DirArg,
        name: String,
        #[arg(long)]
        code: Option<String>,
    },
    /// Members and roles: `macula realms acl com.myapp --add-user dev@example.com --role developer`.
    Acl {
        #[command(flatten)]
        dir: DirArg,
        name: String,
        #[arg(long, requires = "role", conflicts_with = "remove_user")]
        add_user: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        remove_user: Option<String>,
    },
    /// Change a realm's plan (by default hobby, starter $29, professional $99, enterprise; `macula
    /// plans` lists those in force). Upgrades apply at once (the month is billed at the new plan);
    /// downgrades on the first of next month.
    ///
    /// Example: macula realms plan com.myapp starter
    Plan {
        #[command(flatten)]
        dir: DirArg,
        name: String,
        tier: String,
    },
    /// Show a realm's policy, or change how the mesh treats it: `--verified-roles on` makes
    /// every node take forwarded publications, calls, subscriptions and registrations only with
    /// roles the sessions' keys prove (a proof signed by the key's holder for the node the
    /// session joined; keys issued before this release prove nothing and must be reissued);
    /// `--nodes` restricts the realm to dedicated nodes (their peer ids from `macula mesh
    /// status`, comma-separated; `any` lifts the restriction; needs the dedicated_nodes add-on
    /// on a registry); `--package-tier`, `--package-publishers` and `--on-revoked` say which Hub
    /// packages the realm's workloads may run and whether a revocation stops their replicas
    /// (every node enforces it).
    ///
    /// Example: macula realms policy com.myapp --verified-roles on
    /// Example: macula realms policy com.myapp --package-tier verified --package-publishers acme --on-revoked stop
    Policy {
        #[command(flatten)]
        dir: DirArg,
        /// The realm (e.g. com.myapp).
        name: String,
        #[arg(long, value_name = "on|off")]
        verified_roles: Option<Switch>,
        #[arg(long, value_name = "PEER,...|any")]
        nodes: Option<String>,
        #[command(flatten)]
        packages: PackageFlags,
    },
    /// Turn a premium add-on on (or --off): analytics, multi_region, priority_support,
    /// custom_domains, dedicated_nodes, sso. Billed for every month in which it was on.
    Addon {
        #[command(flatten)]
        dir: DirArg,
        name: String,
        feature: String,
        #[arg(long)]
        off: bool,
    },
}

/// `macula realms policy` flags for Hub packages (`PolicyDoc::packages`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PackageFlags {
    /// The lowest Hub tier the realm's workloads may run: community (any signed package),
    /// verified (scan and smoke test passed) or certified.
    #[arg(long, value_name = "TIER")]
    pub package_tier: Option<String>,
    /// The publishers whose packages the realm's workloads may run (comma-separated
    /// namespaces, e.g. acme,initech); `any` lifts the restriction.
    #[arg(long, value_name = "NS,...|any")]
    pub package_publishers: Option<String>,
    /// What a revocation does to the realm's running replicas of the package: flag (shown in
    /// status) or stop.
    #[arg(long, value_name = "flag|stop")]
    pub on_revoked: Option<String>,
}

impl PackageFlags {
    pub fn any(&self) -> bool {
        self.package_tier.is_some()
            || self.package_publishers.is_some()
            || self.on_revoked.is_some()
    }
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Applies `macula realms policy` flags to `doc`; returns whether anything was asked to change.
pub fn change_policy(
    doc: &mut macula_router::policy::PolicyDoc,
    verified_roles: Option<Switch>,
    nodes: Option<&str>,
    packages: &PackageFlags,
) -> Result<bool> {
    if let Some(t) = &packages.package_tier {
        doc.packages.min_tier = if t == "community" {
            String::new()
        } else {
            t.trim().to_owned()
        };
    }
    if let Some(p) = &packages.package_publishers {
        doc.packages.publishers = match p.trim() {
            "any" | "" => vec![],
            list => list.split(',').map(|x| x.trim().to_owned()).collect(),
        };
    }
    if let Some(r) = &packages.on_revoked {
        doc.packages.on_revoked = if r == "flag" {
            String::new()
        } else {
            r.trim().to_owned()
        };
    }
    doc.packages.check().map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(v) = verified_roles {
        doc.verified_roles = v == Switch::On;
    }
    if let Some(n) = nodes {
        doc.nodes = match n.trim() {
            "any" | "" => vec![],
            list => list.split(',').map(|p| p.trim().to_owned()).collect(),
        };
    }
    Ok(verified_roles.is_some() || nodes.is_some() || packages.any())
}

/// Prints a realm's policy for people.
pub fn print_policy(doc: &macula_router::policy::PolicyDoc) {
    println!("{} (policy version {})", doc.realm, doc.version);
    println!("  roles:");
    for r in &doc.roles {
        let sub = if r.subrealms { " (and subrealms)" } else { "" };
        println!("    {}{sub}: {}", r.name, r.permissions.join(", "));
    }
    for a in &doc.topic_acls {
        println!("  topic ACL: {a:?}");
    }
    println!(
        "  served by:      {}",
        if doc.nodes.is_empty() {
            "any node of the mesh".to_string()
        } else {
            doc.nodes.join(", ")
        }
    );
    println!(
        "  verified roles: {}",
        if doc.verified_roles {
            "on (forwarded traffic only with roles keys prove)"
        } else {
            "off (a claimed role is believed when no key proves one)"
        }
    );
    let p = &doc.packages;
    println!(
        "  hub packages:   {} or better, from {}; revoked ones {}",
        if p.min_tier.is_empty() {
            "community"
        } else {
            &p.min_tier
        },
        if p.publishers.is_empty() {
            "any publisher".to_string()
        } else {
            p.publishers.join(", ")
        },
        if p.stops_revoked() {
            "stopped"
        } else {
            "flagged"
        }
    );
}

/// Parses `30d`, `12h`, `90m`, `45s`, `500ms` or `never` (0).
pub fn parse_duration_secs(s: &str) -> Result<u64> {
    if s == "never" {
        return Ok(0);
    }
    let (num, unit): (String, String) = s.chars().partition(|c| c.is_ascii_digit());
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!("invalid duration {s:?}: use e.g. 30d, 12h, 90m, 45s or never")
    })?;
    Ok(match unit.as_str() {
        "d" => n * 86_400,
        "h" => n * 3600,
        "m" => n * 60,
        "s" | "" => n,
        _ => bail!("invalid duration {s:?}: use e.g. 30d, 12h, 90m, 45s or never"),
    })
}

fn open(dir: &DirArg) -> Result<ConfDir> {
    let d = ConfDir::new(dir.dir());
    if !d.exists() {
        bail!(
            "{} is not a Macula config directory; run `macula up` once, pass --config, or log in to a registry (macula login)",
            d.root.display()
        );
    }
    Ok(d)
}

fn registry_only(what: &str) -> anyhow::Error {
    anyhow::anyhow!("`macula realms {what}` works on the registry: log in first (macula login), or pass --server")
}

pub fn keys(cmd: KeysCmd, json: bool) -> Result<()> {
    let target = match &cmd {
        KeysCmd::Create { dir, .. } | KeysCmd::List { dir, .. } | KeysCmd::Revoke { dir, .. } => {
            dir
        }
    };
    if let Some(api) = target.registry()? {
        return crate::registry_cmds::keys(&api, cmd, json);
    }
    match cmd {
        KeysCmd::Create {
            dir,
            realm,
            role,
            name,
            expires,
            pubkey,
        } => {
            let d = open(&dir)?;
            let realm = realm
                .ok_or_else(|| anyhow::anyhow!("--realm is required with a config directory"))?;
            let ttl = parse_duration_secs(&expires)?;
            let pk = match pubkey {
                Some(p) => Some(
                    macula_router::auth::credential::parse_public_key(&p).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--pubkey must be 64 hex characters: an Ed25519 public key (a valid, not weak, point)"
                        )
                    })?,
                ),
                None => None,
            };
            let (kid, key) = d.issue_key(&realm, &role, &name, ttl, pk)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": kid, "key": key, "realm": realm, "role": role})
                );
            } else {
                println!("Created key {kid} (realm {realm}, role {role}). It is shown only once:\n\n{key}\n");
            }
        }
        KeysCmd::List { dir, realm } => {
            let d = open(&dir)?;
            let keys = d.list_keys(realm.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else if keys.is_empty() {
                println!(
                    "No keys. Create one with `macula keys create --realm <realm> --role <role>`."
                );
            } else {
                println!(
                    "{:<22} {:<24} {:<16} {:<22} {:<22} STATUS  NAME",
                    "ID", "REALM", "ROLE", "CREATED", "EXPIRES"
                );
                for k in keys {
                    println!(
                        "{:<22} {:<24} {:<16} {:<22} {:<22} {:<7} {}",
                        k.id,
                        k.realm,
                        k.role,
                        k.created_at.as_deref().unwrap_or("-"),
                        k.expires_at.as_deref().unwrap_or("never"),
                        if k.revoked { "revoked" } else { "active" },
                        k.name
                    );
                }
            }
        }
        KeysCmd::Revoke { dir, key_id } => {
            let d = open(&dir)?;
            let realm = d.revoke_key(&key_id)?;
            if json {
                println!("{}", serde_json::json!({"revoked": key_id, "realm": realm}));
            } else {
                println!("Revoked {key_id} in realm {realm}. Nodes using {} refuse it from their next reload (≤ 1 s).", d.root.display());
            }
        }
    }
    Ok(())
}

pub fn realms(cmd: RealmsCmd, json: bool) -> Result<()> {
    let target = match &cmd {
        RealmsCmd::List { dir }
        | RealmsCmd::Create { dir, .. }
        | RealmsCmd::Show { dir, .. }
        | RealmsCmd::Delete { dir, .. }
        | RealmsCmd::Renew { dir, .. }
        | RealmsCmd::Transfer { dir, .. }
        | RealmsCmd::Acl { dir, .. }
        | RealmsCmd::Plan { dir, .. }
        | RealmsCmd::Addon { dir, .. }
        | RealmsCmd::Policy { dir, .. } => dir,
    };
    if let Some(api) = target.registry()? {
        return crate::registry_cmds::realms(&api, cmd, json);
    }
    match cmd {
        RealmsCmd::List { dir } => {
            let d = open(&dir)?;
            let names = d.realms()?;
            if json {
                let rows: Vec<_> = names
                    .iter()
                    .map(|r| {
                        let doc = d.read_policy(r).ok();
                        serde_json::json!({
                            "realm": r,
                            "policy_version": doc.as_ref().map(|p| p.version),
                            "roles": doc.as_ref().map(|p| p.roles.iter().map(|x| x.name.clone()).collect::<Vec<_>>()),
                            "keys": doc.as_ref().map(|p| p.api_keys.len()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if names.is_empty() {
                println!("No realms. Create one with `macula realms create com.example.app`.");
            } else {
                println!("{:<32} {:<8} {:<6} ROLES", "REALM", "VERSION", "KEYS");
                for r in names {
                    let doc = d.read_policy(&r)?;
                    let roles: Vec<&str> = doc.roles.iter().map(|x| x.name.as_str()).collect();
                    println!(
                        "{:<32} {:<8} {:<6} {}",
                        r,
                        doc.version,
                        doc.api_keys.len(),
                        roles.join(", ")
                    );
                }
            }
        }
        RealmsCmd::Create {
            dir, name, owner, ..
        } => {
            if owner.is_some() {
                bail!("--owner delegates through the registry: log in first (macula login)");
            }
            let d = ConfDir::new(dir.dir());
            d.init()?;
            d.create_realm(&name, None)?;
            if json {
                println!("{}", serde_json::json!({"realm": name}));
            } else {
                println!("Created realm {name} with roles admin, developer, service_account.\nIssue a key: macula keys create --realm {name} --role admin");
            }
        }
        RealmsCmd::Show { .. } => return Err(registry_only("show")),
        RealmsCmd::Delete { .. } => return Err(registry_only("delete")),
        RealmsCmd::Renew { .. } => return Err(registry_only("renew")),
        RealmsCmd::Transfer { .. } => return Err(registry_only("transfer")),
        RealmsCmd::Acl { .. } => return Err(registry_only("acl")),
        RealmsCmd::Plan { .. } => return Err(registry_only("plan")),
        RealmsCmd::Addon { .. } => return Err(registry_only("addon")),
        RealmsCmd::Policy {
            dir,
            name,
            verified_roles,
            nodes,
            packages,
        } => {
            let d = open(&dir)?;
            let mut doc = d
                .read_policy(&name)
                .map_err(|e| anyhow::anyhow!("realm {name}: {e}"))?;
            if change_policy(&mut doc, verified_roles, nodes.as_deref(), &packages)? {
                for n in &doc.nodes {
                    if n.parse::<macula_mesh::Peer>().is_err() {
                        bail!("{n:?} is not a node's peer id (see `macula mesh status`)");
                    }
                }
                doc.version += 1;
                d.write_policy(&doc)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_policy(&doc);
            }
        }
    }
    Ok(())
}
