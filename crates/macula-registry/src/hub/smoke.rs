//! The smoke test of a release, the last step of the pipeline: its workload is deployed on the
//! mesh, in a realm of the Hub's own (`io.macula.hubsmoke`), through the hosting node's HTTP API
//! with that realm's key — the path any tenant's deploy takes, so every node verifies and
//! installs the package from the Hub as it would for a tenant. It must become healthy (a
//! payload's replica running and ready, a job's completions done), then be upgraded (a new
//! record: the same package with `MACULA_SMOKE=upgrade` in its environment) and rolled back (the
//! first manifest again), healthy after each; then it is removed.
//!
//! A release whose smoke test passed and whose scan found nothing (with a vulnerability
//! database configured) is **Verified**; anything else stays **Community**. The result is kept
//! with the release and shown by `macula hub info`; the tier is in the Hub's signed status.
//! One smoke test runs at a time (`Hub::smoking`).

use std::time::{Duration, Instant};

use super::types::*;
#[allow(unused_imports)]
use crate::prelude::*;

/// Smoke tests that may wait for their turn; more are skipped, saying so.
const MAX_SMOKE_WAITING: usize = 32;

/// How long a payload must stay running and ready, without a restart, to count as healthy.
const SETTLE: Duration = Duration::from_secs(3);

/// The Hub's own realm for smoke tests, and its owner (an account no one logs in to).
pub const SMOKE_REALM: &str = "io.macula.hubsmoke";
const SMOKE_ACCOUNT: &str = "acct_hub_smoke";
const SMOKE_EMAIL: &str = "hub-smoke@macula.invalid";

fn system() -> Actor {
    Actor {
        account_id: SMOKE_ACCOUNT.into(),
        email: SMOKE_EMAIL.into(),
        verified: true,
        // `io.macula.*` realms are the platform's: only an operator registers them.
        operator: true,
        remote: "hub".into(),
    }
}

/// One step of a smoke test.
#[derive(Debug, Clone, Serialize)]
struct Step {
    step: &'static str,
    ok: bool,
    ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Registry {
    /// The smoke realm's key, creating the realm (and its owner) on first use.
    async fn smoke_key(&self) -> ApiResult<String> {
        let hub = self.hub()?;
        let path = hub.dir.join("keys").join("smoke-realm.key");
        if let Ok(k) = std::fs::read_to_string(&path) {
            if !k.trim().is_empty() {
                return Ok(k.trim().to_owned());
            }
        }
        let unusable = hash_password(&random_token("x", 32)).map_err(ApiError::internal)?;
        let _ = sqlx::query(
            "INSERT INTO accounts (id, email, password_hash, created_at, email_since) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(SMOKE_ACCOUNT)
        .bind(SMOKE_EMAIL)
        .bind(&unusable)
        .bind(now_secs() as i64)
        .execute(&self.db.pool)
        .await;
        let actor = system();
        match self
            .register(
                &actor,
                crate::realms::types::NewRealm {
                    name: SMOKE_REALM.into(),
                    owner_email: None,
                    tier: None,
                },
                None,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.status == StatusCode::CONFLICT => {}
            Err(e) => return Err(e),
        }
        let (_, key) = self
            .create_key(
                &actor,
                SMOKE_REALM,
                crate::realms::types::NewKey {
                    name: "hub-smoke".into(),
                    role: "admin".into(),
                    expires_in_days: 0,
                    pubkey: None,
                },
                None,
            )
            .await?;
        let secret = key
            .key
            .ok_or_else(|| ApiError::internal("a new key without its secret"))?;
        macula_common::secret::write_secret(&path, &secret).map_err(ApiError::internal)?;
        Ok(secret)
    }

    /// Runs the smoke test of release `target` and records it, with the tier it earns.
    pub async fn smoke_release(&self, target: &str) -> ApiResult<Release> {
        use std::sync::atomic::Ordering;
        let hub = self.hub()?;
        // A bounded queue: publishes beyond it are not smoke-tested (they stay Community and
        // say why) rather than piling up tasks.
        let waiting = hub.smoke_waiting.fetch_add(1, Ordering::AcqRel);
        let turn = if waiting < MAX_SMOKE_WAITING {
            Some(hub.smoking.lock().await)
        } else {
            None
        };
        hub.smoke_waiting.fetch_sub(1, Ordering::AcqRel);
        let release = self.release(target).await?;
        let result = match turn {
            None => json!({"passed": false, "skipped": format!(
                "{MAX_SMOKE_WAITING} smoke tests were waiting already; publish a new version to be tested"
            )}),
            Some(_one) => match self.smoke_run(&release).await {
                Ok(steps) => json!({"passed": steps.iter().all(|s| s.ok), "steps": steps}),
                Err(why) => json!({"passed": false, "skipped": why}),
            },
        };
        let scan_clean = release.scan["database"] == json!(true)
            && release.scan["findings"]
                .as_array()
                .is_some_and(Vec::is_empty);
        let tier = if result["passed"] == json!(true) && scan_clean {
            // A certification stands while the release stays healthy.
            if release.tier == "certified" {
                "certified"
            } else {
                "verified"
            }
        } else {
            "community"
        };
        let repo = hub.repo.lock().await;
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE hub_releases SET smoke = $1, tier = $2 WHERE target = $3")
            .bind(result.to_string())
            .bind(tier)
            .bind(target)
            .execute(&mut *tx)
            .await?;
        if tier != release.tier {
            crate::realms::audit(
                &mut tx,
                None,
                SMOKE_EMAIL,
                "hub.tier",
                json!({"target": target, "tier": tier, "was": release.tier}),
                "hub",
            );
        }
        tx.commit().await?;
        self.announce_status(repo).await?;
        self.release(target).await
    }

    /// The steps of a smoke test, or why it could not run.
    async fn smoke_run(&self, release: &Release) -> Result<Vec<Step>, String> {
        let node = self
            .node
            .clone()
            .ok_or("no node hosts this registry: nothing to run the smoke test on")?;
        let hub = self.hub().map_err(|e| e.message)?;
        let digest: macula_hub::Digest = release.digest.parse().map_err(|e| format!("{e}"))?;
        let index = hub
            .release_index(&release.target, &digest)
            .ok_or("the release's index is not in the repository")?;
        let index: macula_hub::pack::Index =
            serde_json::from_slice(&index).map_err(|e| e.to_string())?;
        let manifest = super::blocking(|| {
            hub.store
                .read(&index.manifest.digest, macula_hub::pack::MAX_MANIFEST)
        })
        .map_err(|e| e.to_string())?
        .ok_or("the release's manifest is not in the blob store")?;
        let pkg = macula_hub::parse(&String::from_utf8_lossy(&manifest))
            .map_err(|e| macula_hub::package::describe("package.yaml", &e))?;
        let name = format!("smoke-{}", &digest.hex()[..16]);
        let edit = |upgrade: bool| {
            let name = name.clone();
            move |m: &mut serde_yaml_ng::Mapping| {
                m.insert("name".into(), name.into());
                m.insert("realm".into(), SMOKE_REALM.into());
                if m.get("kind").and_then(|k| k.as_str()) == Some("payload") {
                    m.insert("replicas".into(), 1.into());
                }
                if upgrade {
                    let env = m
                        .entry("env".into())
                        .or_insert_with(|| serde_yaml_ng::Value::Mapping(Default::default()));
                    if let Some(env) = env.as_mapping_mut() {
                        env.insert("MACULA_SMOKE".into(), "upgrade".into());
                    }
                }
            }
        };
        let (_, first) = pkg.pinned_workload(&release.target, &release.digest, edit(false))?;
        let (_, upgraded) = pkg.pinned_workload(&release.target, &release.digest, edit(true))?;
        let kind = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&first) {
            Ok(v) if v["kind"].as_str() == Some("job") => "jobs",
            _ => "payloads",
        };
        let key = self.smoke_key().await.map_err(|e| e.message)?;
        let mut steps = vec![];
        for (step, manifest) in [
            ("install", &first),
            ("upgrade", &upgraded),
            ("rollback", &first),
        ] {
            let t = Instant::now();
            let r = match node
                .deploy(SMOKE_REALM, &key, kind, &name, Some(manifest.clone()))
                .await
            {
                Ok(()) => healthy(node.as_ref(), &key, kind, &name).await,
                Err(e) => Err(e),
            };
            let ok = r.is_ok();
            steps.push(Step {
                step,
                ok,
                ms: t.elapsed().as_millis() as u64,
                detail: r.err(),
            });
            if !ok {
                break;
            }
        }
        let _ = node.deploy(SMOKE_REALM, &key, kind, &name, None).await;
        Ok(steps)
    }
}

/// Waits until workload `name` is healthy at its newest record: every replica running and ready
/// (a payload) for [`SETTLE`] without a restart, every completion done (a job). Fails at once
/// when it failed or keeps restarting, after 120 s.
async fn healthy(
    node: &dyn crate::service::Host,
    key: &str,
    kind: &str,
    name: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    // Since when it has been up, and how many restarts it had then: a program that starts and
    // dies looks running for a moment.
    let mut up_since: Option<(Instant, u64)> = None;
    loop {
        if let Some(w) = node.workload(SMOKE_REALM, key, kind, name).await? {
            let n = |k: &str| w[k].as_u64().unwrap_or(0);
            let state = w["state"].as_str().unwrap_or("");
            let restarts: u64 = w["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| r["restarts"].as_u64().unwrap_or(0))
                .sum();
            match kind {
                "jobs" if state == "complete" => return Ok(()),
                "jobs" => {}
                _ if n("desired") > 0 && n("updated") >= n("desired") => match up_since {
                    Some((t, r)) if r == restarts && t.elapsed() >= SETTLE => return Ok(()),
                    Some((_, r)) if r == restarts => {}
                    _ => up_since = Some((Instant::now(), restarts)),
                },
                _ => up_since = None,
            }
            if state == "failed" {
                return Err(format!(
                    "failed: {}",
                    w["detail"].as_str().unwrap_or("a replica failed")
                ));
            }
            // A replica that keeps restarting will not become healthy.
            for r in w["replicas"].as_array().into_iter().flatten() {
                if r["restarts"].as_u64().unwrap_or(0) >= 3 {
                    return Err(format!(
                        "replica {} restarted {} times: {}",
                        r["replica"],
                        r["restarts"],
                        r["detail"].as_str().unwrap_or("")
                    ));
                }
            }
            last = format!("{state}: {}", w["detail"].as_str().unwrap_or(""));
        }
        if Instant::now() > deadline {
            return Err(format!("not healthy within 120 s ({last})"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
