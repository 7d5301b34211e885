//! `macula hub ...`: the Hub from a publisher's and an operator's side — signing keys,
//! publishers, attesting and publishing a package directory, search, yank and revoke.
//!
//! Publishing signs on this machine: the package's provenance and the publisher's TUF role are
//! signed with the publisher's key file, which never leaves it; the Hub checks both against the
//! keys registered for the publisher.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use clap::{Args, Subcommand};
use macula_hub::attest::Trusted;
use macula_hub::pack::{pack, Limits};
use macula_hub::review::{self, Rules};
use macula_hub::tuf::{sign_next_role, Key};
use macula_hub::{submit, BlobStore, FsStore};
use macula_registry::hub::types::*;
use serde_json::{json, Value};

use crate::registry_cmds::{emit, emit_list, seg, table, Api, Server};

#[derive(Args)]
pub struct HubArgs {
    #[command(flatten)]
    pub server: Server,
    #[command(subcommand)]
    pub cmd: HubCmd,
}

#[derive(Subcommand)]
pub enum HubCmd {
    /// Make a signing key: its secret into a file only you can read, its public half printed
    /// (register it with `macula hub keys add`).
    Keygen {
        /// Where to write the key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// Publishers: `create NAMESPACE`, `show NAMESPACE`, `approve NAMESPACE` (operators).
    #[command(subcommand)]
    Publisher(PublisherCmd),
    /// A publisher's signing keys: add, list, revoke.
    #[command(subcommand)]
    Keys(HubKeysCmd),
    /// Write a package's SBOM (when the file it names does not exist: an SPDX document of its
    /// artifacts) and its provenance, signed with your key.
    Attest {
        /// The package directory (with package.yaml).
        dir: PathBuf,
        /// Your signing key file (repeat for a threshold of keys).
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
    },
    /// Publish a package directory: pack it, review it as the Hub will, upload its files, sign
    /// your publisher's next TUF role with the new version, and publish.
    Publish {
        dir: PathBuf,
        /// Your signing key file (repeat for a threshold of keys).
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        /// Attest first (`macula hub attest`).
        #[arg(long)]
        attest: bool,
        /// How long the signed role stays valid, in days (publish again before it ends).
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
    /// Search packages by name.
    Search {
        /// Part of the name (`postgres`); all packages if absent.
        query: Option<String>,
        /// Only this publisher's.
        #[arg(long)]
        publisher: Option<String>,
    },
    /// A package: its publisher, tier and scan, and its versions.
    Info {
        /// `org/name`.
        package: String,
    },
    /// A package's versions, newest first.
    Versions {
        /// `org/name`.
        package: String,
    },
    /// Yank a version: hidden from new installs, still installable by digest.
    Yank {
        /// `org/name@version`.
        release: String,
        #[arg(long)]
        reason: String,
    },
    /// Revoke a version: installable nowhere, running replicas flagged.
    Revoke {
        /// `org/name@version`.
        release: String,
        #[arg(long)]
        reason: String,
    },
    /// Test a version again (its publisher's owner, or an operator): scan its SBOM against the
    /// Hub's current vulnerability database and run its smoke test on the mesh; the tier
    /// follows (see `macula hub info`).
    Retest {
        /// `org/name@version`.
        release: String,
    },
    /// Ask for a Verified version to be certified (its publisher's owner): declare the support
    /// you offer and the SLO you commit to, and accept the certification fee (shown in the
    /// answer; charged to your account when an operator certifies it).
    RequestCertification {
        /// `org/name@version`.
        release: String,
        /// Your support terms and SLO, e.g. "support@acme.com, 24x7, 4 h response; 99.9 %
        /// monthly availability".
        #[arg(long)]
        declare: String,
    },
    /// Certify a Verified version (platform operators) whose publisher asked for it: its
    /// declared support and SLO were reviewed. The certification fee is charged to the
    /// publisher's owner.
    Certify {
        /// `org/name@version`.
        release: String,
        /// What was reviewed (support terms, SLO).
        #[arg(long)]
        note: String,
    },
    /// Verify a bundle (.bmz) offline, as an import would, without installing anything: every
    /// file against its digest, the metadata chain against the root of trust, every package;
    /// and scan the packages with the bundle's signed vulnerability data, printing findings.
    Verify {
        file: PathBuf,
        /// The Hub's root of trust to verify against (`macula hub trust` wrote it).
        #[arg(long)]
        root: PathBuf,
    },
    /// The Hub's root of trust (the newest root.json), for nodes to verify it with.
    Trust,
    /// Offline bundles (.bmz) for sites that cannot reach the Hub: export, import.
    #[command(subcommand)]
    Bundle(BundleCmd),
}

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Write a bundle of packages: their files, their signed metadata from the root a site
    /// trusts onwards, and a timestamp of the bundle's own (logged in).
    Export {
        /// `org/name@version` (or `org/name`: its newest usable version); repeatable.
        #[arg(required = true)]
        packages: Vec<String>,
        #[arg(long, short)]
        out: PathBuf,
        /// How long the bundle verifies, in days (the chain's other roles may end it sooner).
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// The first root the importing site may trust (its version): every newer root is in
        /// the bundle, so the site rotates offline.
        #[arg(long, default_value_t = 1)]
        since_root: u64,
    },
    /// Verify a bundle and make its packages installable on nodes that cannot reach the Hub:
    /// into a node's packages directory, or into every node of a `macula up` home.
    Import {
        bundle: PathBuf,
        /// A node's packages directory (`<workloads dir>/packages`); repeatable. One node of a
        /// site is enough: the others take the bundle from it.
        #[arg(long, required_unless_present = "home")]
        into: Vec<PathBuf>,
        /// A `macula up` home: every node's packages directory, and its `hub-root.json`.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The Hub's root of trust the site holds [default: the home's hub-root.json].
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum PublisherCmd {
    /// Create a publisher for a namespace (verified at once when your address is at a domain
    /// named like it; else an operator approves it).
    Create {
        namespace: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    Show {
        namespace: String,
    },
    /// Approve a publisher's identity (platform operators).
    Approve {
        namespace: String,
    },
}

#[derive(Subcommand)]
pub enum HubKeysCmd {
    /// Register a key (its public half, from its key file or in hex).
    Add {
        namespace: String,
        /// The key file (`macula hub keygen`).
        #[arg(long, conflicts_with = "public")]
        key: Option<PathBuf>,
        /// The public key, 64 hex digits.
        #[arg(long)]
        public: Option<String>,
        #[arg(long)]
        label: Option<String>,
        /// Days until it expires (default 365).
        #[arg(long)]
        days: Option<u64>,
    },
    List {
        namespace: String,
    },
    /// Revoke a key: it signs nothing from now on.
    Revoke {
        namespace: String,
        key_id: String,
    },
}

pub async fn hub(args: HubArgs, json: bool) -> Result<()> {
    if let HubCmd::Keygen { out } = &args.cmd {
        return keygen(out, json);
    }
    if let HubCmd::Attest { dir, key } = &args.cmd {
        let keys = read_keys(key)?;
        let signing: Vec<_> = keys.iter().map(Key::signing).collect();
        let a = macula_hub::prepare::attest(dir, &signing, &builder_id())
            .map_err(|e| anyhow!("{e}"))?;
        emit(
            json,
            &json!({"artifacts": a.artifacts.iter().map(|(n, d)| (n.clone(), d.to_string())).collect::<BTreeMap<_, _>>(), "sbom_written": a.sbom_written, "provenance": a.provenance}),
            |_| {
                if let Some(s) = &a.sbom_written {
                    println!("Wrote {s}: an SPDX SBOM of the package's artifacts (it lists no components; a build tool that knows the dependencies should write the SBOM).");
                }
                println!(
                    "Wrote {} (provenance of {} artifact(s), signed with {} key(s)).",
                    a.provenance,
                    a.artifacts.len(),
                    keys.len()
                );
            },
        );
        return Ok(());
    }
    if let HubCmd::Verify { file, root } = &args.cmd {
        let trusted =
            std::fs::read(root).with_context(|| format!("the root of trust {}", root.display()))?;
        let scratch = tempfile::tempdir()?;
        let v = macula_hub::bundle::import(file, scratch.path(), &trusted, 8 << 30)
            .await
            .map_err(|e| anyhow!("{} does not verify: {e}", file.display()))?;
        emit(
            json,
            &json!({"file": file, "packages": v.manifest.packages, "expires": v.manifest.expires, "root_version": v.root_version, "blobs": v.blobs, "scan": bundle_scan_json(v.osv.as_ref())}),
            |_| {
                println!(
                    "{} verifies against root version {}: {} file(s), until {}.",
                    file.display(),
                    v.root_version,
                    v.blobs,
                    v.manifest.expires
                );
                for p in &v.manifest.packages {
                    println!("  {} {}", p.target, p.digest);
                }
                print_bundle_scan(v.osv.as_ref());
            },
        );
        return Ok(());
    }
    if let HubCmd::Bundle(BundleCmd::Import {
        bundle,
        into,
        home,
        root,
    }) = &args.cmd
    {
        return import_bundle(bundle, into, home.as_deref(), root.as_deref(), json).await;
    }
    let api = Api::new(&args.server)?;
    match args.cmd {
        HubCmd::Keygen { .. }
        | HubCmd::Attest { .. }
        | HubCmd::Verify { .. }
        | HubCmd::Bundle(BundleCmd::Import { .. }) => {
            unreachable!("handled above")
        }
        HubCmd::Bundle(BundleCmd::Export {
            packages,
            out,
            days,
            since_root,
        }) => export_bundle(&api, &packages, &out, days, since_root, json)?,
        HubCmd::Publisher(PublisherCmd::Create {
            namespace,
            display_name,
        }) => {
            let p: Publisher = api.call(
                "POST",
                "/v1/hub/publishers",
                &NewPublisher {
                    namespace,
                    display_name,
                },
            )?;
            emit(json, &p, print_publisher);
        }
        HubCmd::Publisher(PublisherCmd::Show { namespace }) => {
            let p: Publisher =
                api.get_anonymous(&format!("/v1/hub/publishers/{}", seg(&namespace)))?;
            emit(json, &p, print_publisher);
        }
        HubCmd::Publisher(PublisherCmd::Approve { namespace }) => {
            let p: Publisher = api.call(
                "POST",
                &format!("/v1/hub/publishers/{}/approve", seg(&namespace)),
                &json!({}),
            )?;
            emit(json, &p, print_publisher);
        }
        HubCmd::Keys(HubKeysCmd::Add {
            namespace,
            key,
            public,
            label,
            days,
        }) => {
            let public_key = match (key, public) {
                (Some(k), _) => Key::read_file(&k)
                    .map_err(|e| anyhow!(e))?
                    .public()
                    .to_hex(),
                (None, Some(p)) => p,
                (None, None) => bail!("give the key: --key FILE or --public HEX"),
            };
            let k: PublisherKey = api.call(
                "POST",
                &format!("/v1/hub/publishers/{}/keys", seg(&namespace)),
                &NewPublisherKey {
                    public_key,
                    label,
                    days,
                },
            )?;
            emit(json, &k, |k| {
                println!(
                    "Registered key {} for {namespace} (expires {}).",
                    k.key_id, k.expires_at
                )
            });
        }
        HubCmd::Keys(HubKeysCmd::List { namespace }) => {
            let p: Publisher =
                api.get_anonymous(&format!("/v1/hub/publishers/{}", seg(&namespace)))?;
            emit_list(json, &p.keys, print_keys)?;
        }
        HubCmd::Keys(HubKeysCmd::Revoke { namespace, key_id }) => {
            let k: PublisherKey = api.get(
                "DELETE",
                &format!(
                    "/v1/hub/publishers/{}/keys/{}",
                    seg(&namespace),
                    seg(&key_id)
                ),
            )?;
            emit(json, &k, |k| {
                println!(
                    "Revoked key {} of {namespace}: it signs nothing from now on.",
                    k.key_id
                )
            });
        }
        HubCmd::Publish {
            dir,
            key,
            attest,
            days,
        } => publish(&api, &dir, &key, attest, days, json).await?,
        HubCmd::Search { query, publisher } => {
            let mut q = vec![];
            if let Some(s) = &query {
                q.push(format!("q={}", seg(s)));
            }
            if let Some(p) = &publisher {
                q.push(format!("publisher={}", seg(p)));
            }
            let found: Vec<PackageSummary> =
                api.get_anonymous(&format!("/v1/hub/packages?{}", q.join("&")))?;
            emit_list(json, &found, |items| {
                let mut t = table(&["PACKAGE", "LATEST", "TIER", "VERSIONS", "PUBLISHER"]);
                for p in items {
                    t.add_row(vec![
                        p.package.clone(),
                        dash(&p.latest),
                        dash(&p.tier),
                        p.versions.to_string(),
                        format!("{} ({})", p.publisher, verified(&p.verified_by)),
                    ]);
                }
                println!("{t}");
            })?;
        }
        HubCmd::Info { package } | HubCmd::Versions { package } => {
            let (ns, name) = package
                .split_once('/')
                .ok_or_else(|| anyhow!("{package}: write org/name"))?;
            let info: PackageInfo =
                api.get_anonymous(&format!("/v1/hub/packages/{}/{}", seg(ns), seg(name)))?;
            emit(json, &info, |info| {
                println!(
                    "{} by {} ({})",
                    info.package,
                    info.publisher.display_name,
                    verified(&info.publisher.verified_by)
                );
                print_releases(&info.releases);
            });
        }
        HubCmd::Yank { release, reason } => mark(&api, &release, "yank", &reason, json)?,
        HubCmd::Revoke { release, reason } => mark(&api, &release, "revoke", &reason, json)?,
        HubCmd::Certify { release, note } => mark(&api, &release, "certify", &note, json)?,
        HubCmd::Retest { release } => mark(&api, &release, "retest", "retest", json)?,
        HubCmd::RequestCertification { release, declare } => {
            mark(&api, &release, "request-certification", &declare, json)?
        }
        HubCmd::Trust => {
            let t: Trust = api.get_anonymous("/v1/hub/trust")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t.root)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&t.root)?);
                eprintln!(
                    "(root version {}; the repository is at {})",
                    t.root_version, t.repository
                );
            }
        }
    }
    Ok(())
}

fn mark(api: &Api, release: &str, what: &str, reason: &str, json: bool) -> Result<()> {
    let (ns, rel) = release
        .split_once('/')
        .filter(|(_, r)| r.contains('@'))
        .ok_or_else(|| anyhow!("{release}: write org/name@version"))?;
    let r: Release = api.call(
        "POST",
        &format!("/v1/hub/releases/{}/{}/{what}", seg(ns), seg(rel)),
        &Reason {
            reason: reason.to_owned(),
        },
    )?;
    emit(json, &r, |r| {
        match what {
        "yank" => println!(
            "Yanked {}: new installs skip it; deployments pinned to {} keep working.",
            r.target, r.digest
        ),
        "certify" => println!(
            "Certified {} (tier {}); the fee of ${:.2} is charged to its publisher.",
            r.target,
            r.tier,
            r.certification["fee_cents"].as_i64().unwrap_or(0) as f64 / 100.0
        ),
        "retest" => println!(
            "Testing {} again: its SBOM was scanned against the Hub's current database ({}), and its smoke test runs now; `macula hub info {}` shows the result and the tier.",
            r.target,
            match r.scan["findings"].as_array() {
                Some(f) if f.is_empty() => "nothing found".to_string(),
                Some(f) => format!("{} finding(s)", f.len()),
                None => "no database".to_string(),
            },
            r.package
        ),
        "request-certification" => println!(
            "Asked for {} to be certified. An operator reviews the support and SLO declared; when it is certified, the fee of ${:.2} is charged to your account.",
            r.target,
            r.certification["fee_cents"].as_i64().unwrap_or(0) as f64 / 100.0
        ),
        _ => println!(
            "Revoked {}: no node installs it any more, and running replicas of it are flagged.",
            r.target
        ),
    }
    });
    Ok(())
}

fn builder_id() -> String {
    format!("macula-cli/{}", env!("CARGO_PKG_VERSION"))
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<Key>> {
    paths
        .iter()
        .map(|p| Key::read_file(p).map_err(|e| anyhow!(e)))
        .collect()
}

fn keygen(out: &Path, json: bool) -> Result<()> {
    if out.exists() {
        bail!("{} exists: not overwriting a key", out.display());
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let key = Key::generate();
    macula_common::secret::write_secret(out, &format!("{}\n", hex::encode(key.seed())))?;
    let v = json!({"file": out, "public_key": key.public().to_hex(), "key_id": key.id()});
    emit(json, &v, |_| {
        println!(
            "Wrote {} (keep it secret; it signs your packages).\nPublic key: {}\nRegister it: macula hub keys add <namespace> --key {}",
            out.display(),
            key.public().to_hex(),
            out.display()
        )
    });
    Ok(())
}

async fn publish(
    api: &Api,
    dir: &Path,
    key_files: &[PathBuf],
    attest: bool,
    days: u64,
    json: bool,
) -> Result<()> {
    let keys = read_keys(key_files)?;
    let say = |s: String| {
        if !json {
            eprintln!("{s}");
        }
    };
    if attest {
        let signing: Vec<_> = keys.iter().map(Key::signing).collect();
        macula_hub::prepare::attest(dir, &signing, &builder_id()).map_err(|e| anyhow!("{e}"))?;
        say("attested: SBOM and signed provenance written".into());
    }
    // Packed into a store of its own: the files as they will be uploaded, and the index.
    let tmp = tempfile::tempdir()?;
    let store = FsStore::open(tmp.path().join("blobs"))?;
    let packed = pack(dir, &store, Limits::default()).map_err(|e| anyhow!("{e}"))?;
    let ns = packed.package.publisher.clone();
    let publisher: Publisher = api.get_anonymous(&format!("/v1/hub/publishers/{}", seg(&ns)))?;
    let index = store
        .read(&packed.digest, review::MAX_INDEX)?
        .ok_or_else(|| anyhow!("the packed index is missing"))?;
    // Reviewed here first, as the Hub will (its publisher's grants, these keys): problems are
    // found before anything is uploaded.
    let trusted = Trusted {
        keys: keys.iter().map(|k| k.public().0).collect(),
        threshold: keys.len(),
    };
    let policy = submit::Policy {
        capabilities: publisher.grants.clone(),
        max_instances: u32::MAX,
        max_cpu_millis: u64::MAX,
        max_memory_bytes: u64::MAX,
    };
    let reviewed = review::review(
        &index,
        &store,
        &Rules {
            publisher: &trusted,
            policy: &policy,
            osv: None,
        },
    )
    .map_err(|p| {
        anyhow!(
            "{} is not publishable:\n{}",
            dir.display(),
            review::describe(&p)
        )
    })?;
    let target = format!("{}@{}", reviewed.index.name, reviewed.index.version);
    say(format!("packed {target} ({})", packed.digest));
    // Upload every file (the manifest and what it names).
    let mut blobs: Vec<(macula_hub::Digest, u64)> =
        vec![(reviewed.index.manifest.digest, reviewed.index.manifest.size)];
    blobs.extend(reviewed.index.files.values().map(|f| (f.digest, f.size)));
    blobs.sort();
    blobs.dedup();
    let total: u64 = blobs.iter().map(|b| b.1).sum();
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    let mut sent = (0usize, 0u64);
    for (d, size) in &blobs {
        let at = format!("/v1/hub/blobs/{}", seg(&d.to_string()));
        // Files the Hub holds already (an unchanged manifest, a shared artifact) are not sent.
        if !api.exists(&at)? {
            let path = store.root().join("sha256").join(d.hex());
            api.put_file(&at, &path)
                .with_context(|| format!("uploading {d}"))?;
            sent = (sent.0 + 1, sent.1 + size);
        }
        bar.inc(*size);
    }
    bar.finish_and_clear();
    say(format!(
        "uploaded {} of {} file(s), {} of {total} bytes (the rest the Hub held already)",
        sent.0,
        blobs.len(),
        sent.1
    ));
    // The publisher's next role: the current one with this version added, signed here.
    let current: Value = api.get_anonymous(&format!("/v1/hub/publishers/{}/role", seg(&ns)))?;
    let current = serde_json::to_vec(&current)?;
    let custom = json!({
        "package": reviewed.index.name,
        "version": reviewed.index.version,
        "channel": reviewed.package.channel,
    });
    let role = sign_next_role(
        &ns,
        Some(&current),
        &[(target.clone(), index.clone(), custom)],
        &[],
        &keys,
        Duration::from_secs(days.clamp(3, 3650) * 86_400),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let body = Publish {
        role: serde_json::from_slice(&role)?,
        indexes: BTreeMap::from([(
            target.clone(),
            base64::engine::general_purpose::STANDARD.encode(&index),
        )]),
    };
    let published: Published = api.call(
        "POST",
        &format!("/v1/hub/publishers/{}/releases", seg(&ns)),
        &body,
    )?;
    emit(json, &published, |p| {
        for r in &p.added {
            println!("Published {} ({}), tier {}.", r.target, r.digest, r.tier);
            print_scan(&r.scan);
        }
        if p.added.is_empty() {
            println!(
                "{target} was published already (versions are immutable); role version {}.",
                p.role_version
            );
        }
    });
    Ok(())
}

fn print_scan(scan: &Value) {
    if scan["database"] != json!(true) {
        println!("  Not scanned: the Hub has no vulnerability database (registry.hub.osv).");
        return;
    }
    let findings = scan["findings"].as_array().map_or(0, Vec::len);
    let unchecked = scan["unchecked"].as_array().map_or(0, Vec::len);
    println!(
        "  Scan: {findings} known vulnerabilit{} ({unchecked} component(s) could not be checked).",
        if findings == 1 { "y" } else { "ies" }
    );
    for f in scan["findings"].as_array().into_iter().flatten() {
        println!(
            "    {} in {} {}{}",
            f["id"].as_str().unwrap_or(""),
            f["component"].as_str().unwrap_or(""),
            f["version"].as_str().unwrap_or(""),
            f["fixed"]
                .as_str()
                .map(|v| format!(" (fixed in {v})"))
                .unwrap_or_default()
        );
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn verified(by: &str) -> String {
    if by.is_empty() {
        "unverified".into()
    } else {
        format!("verified: {by}")
    }
}

fn print_publisher(p: &Publisher) {
    println!(
        "Publisher {} ({}), owner {}, {}.",
        p.namespace,
        p.display_name,
        p.owner,
        verified(&p.verified_by)
    );
    println!("  May grant: {}", p.grants.join(", "));
    print_keys(&p.keys);
}

fn print_keys(keys: &[PublisherKey]) {
    if keys.is_empty() {
        println!("  No signing keys yet: macula hub keygen --out FILE, then macula hub keys add <namespace> --key FILE");
        return;
    }
    let mut t = table(&["KEY ID", "LABEL", "STATUS", "EXPIRES"]);
    for k in keys {
        t.add_row(vec![
            k.key_id.clone(),
            dash(&k.label),
            k.status.clone(),
            k.expires_at.clone(),
        ]);
    }
    println!("{t}");
}

fn print_releases(releases: &[Release]) {
    let mut t = table(&["VERSION", "TIER", "DIGEST", "SIZE", "STATE", "PUBLISHED"]);
    for r in releases {
        let state = if !r.revoked.is_empty() {
            format!("revoked: {}", r.revoked)
        } else if !r.yanked.is_empty() {
            format!("yanked: {}", r.yanked)
        } else {
            "ok".into()
        };
        t.add_row(vec![
            r.version.clone(),
            r.tier.clone(),
            r.digest.clone(),
            r.size.to_string(),
            state,
            r.published_at.clone(),
        ]);
    }
    println!("{t}");
    for r in releases {
        let c = &r.certification;
        if let Some(declared) = c["declared"].as_str() {
            match c["certified_at"].as_str() {
                Some(at) => println!(
                    "{}: certified {at} by {} — support and SLO: {declared} (review: {})",
                    r.version,
                    c["certified_by"].as_str().unwrap_or(""),
                    c["review"].as_str().unwrap_or("")
                ),
                None => println!(
                    "{}: certification requested — support and SLO: {declared}",
                    r.version
                ),
            }
        }
    }
}

/// A release's index from the Hub's repository (`targets/<ns>/<sha256>.<name@version>`),
/// required to hash to the release's digest (it is content-addressed): its target path, bytes
/// and contents.
fn fetch_index(
    agent: &ureq::Agent,
    hub: &str,
    ns: &str,
    release: &Release,
) -> Result<(String, Vec<u8>, macula_hub::pack::Index)> {
    let digest: macula_hub::Digest = release
        .digest
        .parse()
        .map_err(|e| anyhow!("the Hub's digest {}: {e}", release.digest))?;
    let file = release.target.split_once('/').map_or("", |x| x.1);
    let tname = format!("targets/{ns}/{}.{file}", digest.hex());
    let bytes = fetch(
        agent,
        &format!("{hub}/v1/hub/tuf/{tname}"),
        review::MAX_INDEX,
    )?;
    if macula_hub::Digest::of(&bytes) != digest {
        bail!(
            "the Hub served an index for {} that is not {digest}",
            release.target
        );
    }
    let index = serde_json::from_slice(&bytes)?;
    Ok((tname, bytes, index))
}

/// GETs `url` (a Hub route), at most `max` bytes.
fn fetch(agent: &ureq::Agent, url: &str, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut res = agent
        .get(url)
        .call()
        .map_err(|e| anyhow!("cannot reach the Hub at {url}: {e}"))?;
    let status = res.status().as_u16();
    let mut out = vec![];
    res.body_mut()
        .as_reader()
        .take(max + 1)
        .read_to_end(&mut out)?;
    if status != 200 {
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        let msg = v["error"]["message"].as_str().unwrap_or("").to_owned();
        bail!("{url}: HTTP {status} {msg}");
    }
    if out.len() as u64 > max {
        bail!("{url}: larger than {max} bytes");
    }
    Ok(out)
}

/// The workload manifest of Hub package `spec` (`org/name@version` or `org/name`), pinned to
/// the version's digest: its name and text, ready to deploy.
pub fn package_manifest(
    agent: &ureq::Agent,
    hub: &str,
    spec: &str,
    say: bool,
) -> Result<(String, String)> {
    let hub = hub.trim_end_matches('/');
    let (package, version) = match spec.split_once('@') {
        Some((p, v)) => (p, Some(v)),
        None => (spec, None),
    };
    let (ns, name) = package
        .split_once('/')
        .ok_or_else(|| anyhow!("--package {spec}: write org/name@version"))?;
    let info: PackageInfo = serde_json::from_slice(&fetch(
        agent,
        &format!("{hub}/v1/hub/packages/{}/{}", seg(ns), seg(name)),
        16 << 20,
    )?)?;
    let release = pick_release(&info, version)?;
    if !release.yanked.is_empty() {
        bail!(
            "{} is yanked ({}): new deployments take another version; one pinned by digest ({}) in a manifest still runs",
            release.target, release.yanked, release.digest
        );
    }
    let (_, _, index) = fetch_index(agent, hub, ns, release)?;
    let manifest = fetch(
        agent,
        &format!("{hub}/v1/hub/blobs/{}", index.manifest.digest),
        macula_hub::pack::MAX_MANIFEST,
    )?;
    if macula_hub::Digest::of(&manifest) != index.manifest.digest {
        bail!(
            "the Hub served a manifest that is not {}",
            index.manifest.digest
        );
    }
    let pkg = macula_hub::parse(&String::from_utf8_lossy(&manifest)).map_err(|e| {
        anyhow!(
            "{}: {}",
            release.target,
            macula_hub::package::describe("package.yaml", &e)
        )
    })?;
    let (name, text) = pkg
        .pinned_workload(&release.target, &release.digest, |_| {})
        .map_err(|e| anyhow!(e))?;
    if say {
        eprintln!(
            "{} ({}, tier {}) by {} ({})",
            release.target,
            release.digest,
            release.tier,
            info.publisher.display_name,
            verified(&info.publisher.verified_by)
        );
    }
    Ok((name, text))
}

/// A package's newest usable release, or the version asked for (refusing a revoked one).
fn pick_release<'a>(info: &'a PackageInfo, version: Option<&str>) -> Result<&'a Release> {
    let package = &info.package;
    let release = match version {
        Some(v) => info
            .releases
            .iter()
            .find(|r| r.version == v)
            .ok_or_else(|| {
                anyhow!("{package} has no version {v} on the Hub (macula hub versions {package})")
            })?,
        None => info
            .releases
            .iter()
            .find(|r| r.yanked.is_empty() && r.revoked.is_empty())
            .ok_or_else(|| {
                anyhow!("{package} has no version that is neither yanked nor revoked")
            })?,
    };
    if !release.revoked.is_empty() {
        bail!("{} is revoked: {}", release.target, release.revoked);
    }
    Ok(release)
}

fn export_bundle(
    api: &Api,
    specs: &[String],
    out: &Path,
    days: u64,
    since_root: u64,
    json: bool,
) -> Result<()> {
    use macula_hub::bundle::{self, Manifest, Source};
    let agent = crate::registry_cmds::http_agent(api.ca(), Duration::from_secs(600))?;
    let hub = api.base().to_owned();
    let tuf = |path: &str, max: u64| fetch(&agent, &format!("{hub}/v1/hub/tuf/{path}"), max);
    let mut files: Vec<(String, Source)> = vec![];
    let trust: Trust = api.get_anonymous("/v1/hub/trust")?;
    if since_root == 0 || since_root > trust.root_version {
        bail!(
            "--since-root {since_root}: the Hub's roots are 1 to {}",
            trust.root_version
        );
    }
    for n in since_root..=trust.root_version {
        let name = format!("metadata/{n}.root.json");
        files.push((format!("repo/{name}"), Source::Bytes(tuf(&name, 1 << 20)?)));
    }
    let tmp = tempfile::tempdir()?;
    let store = FsStore::open(tmp.path().join("blobs"))?;
    let mut entries = vec![];
    let mut ecosystems = std::collections::BTreeSet::new();
    for spec in specs {
        let (entry, index_name, index_bytes) =
            bundle_package(api, &agent, &hub, &store, spec, &mut files)?;
        ecosystems.extend(sbom_ecosystems(&store, &index_bytes));
        files.push((format!("repo/{index_name}"), Source::Bytes(index_bytes)));
        entries.push(entry);
    }
    // Signed for the bundle: its snapshot and timestamp, and the vulnerability records of the
    // ecosystems its SBOMs name.
    let meta: BundleMetadata = api.call(
        "POST",
        "/v1/hub/bundle-metadata",
        &NewBundleMetadata {
            days: Some(days),
            ecosystems: ecosystems.into_iter().collect(),
        },
    )?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s);
    let mut osv_statement = None;
    if let (Some(export), Some(envelope)) = (&meta.osv, &meta.osv_envelope) {
        let envelope = b64(envelope)?;
        let e: macula_hub::attest::Envelope = serde_json::from_slice(&envelope)?;
        let statement: macula_hub::osv::ExportStatement =
            serde_json::from_slice(&b64(&e.payload)?)?;
        osv_statement = Some(statement);
        files.push((bundle::OSV_EXPORT.into(), Source::Bytes(b64(export)?)));
        files.push((bundle::OSV_ENVELOPE.into(), Source::Bytes(envelope)));
    }
    let snapshot = b64(&meta.snapshot)?;
    files.push((
        "repo/metadata/timestamp.json".into(),
        Source::Bytes(b64(&meta.timestamp)?),
    ));
    let snap: Value = serde_json::from_slice(&snapshot)?;
    files.push((
        format!("repo/metadata/{}.snapshot.json", meta.snapshot_version),
        Source::Bytes(snapshot),
    ));
    let mut targets_json = Value::Null;
    for (file, m) in snap["signed"]["meta"].as_object().into_iter().flatten() {
        let role = file.trim_end_matches(".json");
        let v = m["version"].as_u64().unwrap_or(0);
        let name = format!("metadata/{v}.{role}.json");
        let bytes = tuf(&name, bundle::MAX_META)?;
        if role == "targets" {
            targets_json = serde_json::from_slice(&bytes)?;
        }
        files.push((format!("repo/{name}"), Source::Bytes(bytes)));
    }
    // The Hub's signed status (revocations, tiers).
    if let Some(h) =
        targets_json["signed"]["targets"]["hub/status.json"]["hashes"]["sha256"].as_str()
    {
        let name = format!("targets/hub/{h}.status.json");
        files.push((
            format!("repo/{name}"),
            Source::Bytes(tuf(&name, bundle::MAX_META)?),
        ));
    }
    let manifest = Manifest {
        kind: bundle::BUNDLE_KIND.into(),
        created: macula_common::time::rfc3339(macula_common::time::now_secs()),
        expires: meta.expires.clone(),
        packages: entries,
        osv: osv_statement,
    };
    let tmp_out = out.with_extension("bmz.partial");
    let f = std::fs::File::create(&tmp_out).with_context(|| tmp_out.display().to_string())?;
    bundle::write(f, &manifest, files).map_err(|e| anyhow!("{e}"))?;
    std::fs::rename(&tmp_out, out)?;
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    emit(
        json,
        &json!({"file": out, "bytes": size, "bundle": manifest}),
        |_| {
            println!(
            "Wrote {} ({size} bytes): {} package(s), roots {since_root} to {}, verifies until {}.",
            out.display(),
            manifest.packages.len(),
            trust.root_version,
            manifest.expires
        );
            match &manifest.osv {
                Some(o) => println!(
                    "Vulnerability data: {} OSV record(s) for {}, as of {} (signed by the Hub).",
                    o.records,
                    o.ecosystems.join(", "),
                    o.exported
                ),
                None => println!(
                    "No vulnerability data: the Hub has no OSV database, or the SBOMs name no ecosystem."
                ),
            }
        },
    );
    Ok(())
}

/// Fetches one package of a bundle (`org/name[@version]`): its index (checked against the
/// digest the Hub lists) and every file it names into `store`, the files added to `files`.
/// Returns its entry, the index's TUF target path and the index.
fn bundle_package(
    api: &Api,
    agent: &ureq::Agent,
    hub: &str,
    store: &FsStore,
    spec: &str,
    files: &mut Vec<(String, macula_hub::bundle::Source)>,
) -> Result<(macula_hub::bundle::Entry, String, Vec<u8>)> {
    use macula_hub::bundle::{Entry, Source};
    let (package, version) = match spec.split_once('@') {
        Some((p, v)) => (p, Some(v)),
        None => (spec, None),
    };
    let (ns, name) = package
        .split_once('/')
        .ok_or_else(|| anyhow!("{spec}: write org/name@version"))?;
    let info: PackageInfo =
        api.get_anonymous(&format!("/v1/hub/packages/{}/{}", seg(ns), seg(name)))?;
    let release = pick_release(&info, version)?;
    let (tname, index_bytes, index) = fetch_index(agent, hub, ns, release)?;
    let mut blobs = vec![(index.manifest.digest, index.manifest.size)];
    blobs.extend(index.files.values().map(|f| (f.digest, f.size)));
    for (d, size) in blobs {
        if store.has(&d) {
            continue;
        }
        let url = format!("{hub}/v1/hub/blobs/{d}");
        let mut res = agent.get(&url).call().map_err(|e| anyhow!("{url}: {e}"))?;
        if res.status().as_u16() != 200 {
            bail!("{url}: HTTP {}", res.status().as_u16());
        }
        store
            .put(&mut res.body_mut().as_reader(), size, Some(d))
            .map_err(|e| anyhow!("{url}: {e}"))?;
        files.push((
            format!("blobs/sha256/{}", d.hex()),
            Source::File(store.root().join("sha256").join(d.hex())),
        ));
    }
    Ok((
        Entry {
            target: release.target.clone(),
            digest: release.digest.clone(),
        },
        tname,
        index_bytes,
    ))
}

/// The OSV ecosystems of the components a package's SBOM lists (none when it has no SBOM or
/// it cannot be read: the bundle then carries no data for them, and the site's scan says so).
fn sbom_ecosystems(store: &FsStore, index_bytes: &[u8]) -> Vec<String> {
    let Ok(index) = serde_json::from_slice::<macula_hub::pack::Index>(index_bytes) else {
        return vec![];
    };
    let sbom = macula_hub::sbom::of_package(store, &index).ok().flatten();
    sbom.map(|s| {
        s.components
            .iter()
            .filter_map(|c| c.ecosystem().map(str::to_owned))
            .collect()
    })
    .unwrap_or_default()
}

/// Prints what a bundle's vulnerability data found in its packages.
fn print_bundle_scan(osv: Option<&macula_hub::bundle::OsvChecked>) {
    let Some(o) = osv else {
        println!("  no vulnerability data in the bundle: not scanned here");
        return;
    };
    println!(
        "  scanned against the bundle's {} OSV record(s) ({}), as of {}:",
        o.statement.records,
        o.statement.ecosystems.join(", "),
        o.statement.exported
    );
    for (target, scan) in &o.scans {
        if scan.findings.is_empty() {
            println!("    {target}: no known vulnerability");
        }
        for f in &scan.findings {
            println!(
                "    {target}: {} in {} {}{}: {}",
                f.id,
                f.component,
                f.version,
                f.fixed
                    .as_deref()
                    .map(|x| format!(" (fixed in {x})"))
                    .unwrap_or_default(),
                f.summary
            );
        }
        if !scan.unchecked.is_empty() {
            println!(
                "    {target}: {} component(s) not checked (no version or ecosystem)",
                scan.unchecked.len()
            );
        }
    }
}

/// The scan results of an import, for `--json`.
fn bundle_scan_json(osv: Option<&macula_hub::bundle::OsvChecked>) -> Value {
    match osv {
        None => Value::Null,
        Some(o) => json!({
            "statement": o.statement,
            "packages": o.scans.iter().map(|(t, s)| {
                let mut v = s.to_json();
                v["target"] = json!(t);
                v
            }).collect::<Vec<_>>(),
        }),
    }
}

async fn import_bundle(
    bundle: &Path,
    into: &[PathBuf],
    home: Option<&Path>,
    root: Option<&Path>,
    json: bool,
) -> Result<()> {
    let mut dirs: Vec<PathBuf> = into.to_vec();
    if let Some(h) = home {
        for entry in std::fs::read_dir(h.join("nodes")).with_context(|| h.display().to_string())? {
            let d = entry?.path().join("workloads/packages");
            dirs.push(d);
        }
    }
    let root = match (root, home) {
        (Some(r), _) => r.to_path_buf(),
        (None, Some(h)) => h.join("hub-root.json"),
        (None, None) => bail!("give the Hub's root of trust the site holds: --root FILE"),
    };
    let trusted =
        std::fs::read(&root).with_context(|| format!("the root of trust {}", root.display()))?;
    let mut done = vec![];
    let mut last = None;
    for d in &dirs {
        let imported = macula_hub::bundle::import(bundle, d, &trusted, 8 << 30)
            .await
            .map_err(|e| anyhow!("{} refused: {e}", bundle.display()))?;
        done.push(json!({"into": d, "packages": imported.manifest.packages, "blobs": imported.blobs, "root_version": imported.root_version, "scan": bundle_scan_json(imported.osv.as_ref())}));
        last = imported.osv;
    }
    emit(json, &done, |done| {
        for d in done {
            println!(
                "Imported into {}: {} package(s), {} file(s), verified against root version {}.",
                d["into"].as_str().unwrap_or(""),
                d["packages"].as_array().map_or(0, Vec::len),
                d["blobs"],
                d["root_version"]
            );
        }
        print_bundle_scan(last.as_ref());
    });
    Ok(())
}

/// [`package_manifest`] from a bundle instead of the Hub (an air-gapped site).
pub fn bundle_manifest(bundle: &Path, spec: &str, say: bool) -> Result<(String, String)> {
    let (entry, _, manifest) = macula_hub::bundle::read_package(bundle, spec)
        .map_err(|e| anyhow!("{}: {e}", bundle.display()))?;
    let pkg = macula_hub::parse(&String::from_utf8_lossy(&manifest)).map_err(|e| {
        anyhow!(
            "{}: {}",
            entry.target,
            macula_hub::package::describe("package.yaml", &e)
        )
    })?;
    let (name, text) = pkg
        .pinned_workload(&entry.target, &entry.digest, |_| {})
        .map_err(|e| anyhow!(e))?;
    if say {
        eprintln!(
            "{} ({}) from {}",
            entry.target,
            entry.digest,
            bundle.display()
        );
    }
    Ok((name, text))
}
