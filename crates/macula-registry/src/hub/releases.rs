//! Releases: blobs uploaded by digest, publishing a publisher's signed role through the review
//! pipeline, the Hub's signed status of every release (tier, yanked, revoked), search.

use std::collections::BTreeMap;

use base64::Engine as _;
use macula_hub::attest::Trusted;
use macula_hub::review::{self, Rules};
use macula_hub::submit;
use macula_hub::tuf::HUB_NAMESPACE;
use macula_hub::Digest;

use super::publishers::unverified;
use super::tuf_error;
use super::types::*;
#[allow(unused_imports)]
use crate::prelude::*;

/// The Hub's own target listing every release's tier, yank and revocation (`hub/status.json`).
pub const STATUS_TARGET: &str = "status.json";

/// The most one package's workload may ask for, whatever the plan: CPU and memory.
const MAX_CPU_MILLIS: u64 = 64_000;
const MAX_MEMORY_BYTES: u64 = 256 << 30;

const RELEASE_COLUMNS: &str = "r.target, r.package, r.version, r.digest, r.size, r.tier, r.scan, r.smoke, r.yanked, r.revoked, r.certification, r.published_by, r.created_at";

fn release_of(r: &AnyRow) -> ApiResult<Release> {
    let scan: String = r.try_get("scan")?;
    Ok(Release {
        target: r.try_get("target")?,
        package: r.try_get("package")?,
        version: r.try_get("version")?,
        digest: r.try_get("digest")?,
        size: r.try_get("size")?,
        tier: r.try_get("tier")?,
        scan: serde_json::from_str(&scan).unwrap_or(Value::Null),
        smoke: serde_json::from_str(&r.try_get::<String, _>("smoke")?).unwrap_or(Value::Null),
        yanked: r.try_get("yanked")?,
        revoked: r.try_get("revoked")?,
        certification: serde_json::from_str(&r.try_get::<String, _>("certification")?)
            .unwrap_or_else(|_| json!({})),
        published_by: r.try_get("published_by")?,
        published_at: rfc3339(r.try_get::<i64, _>("created_at")? as u64),
    })
}

/// The most uploads one account may have that no release names yet (besides their bytes,
/// `registry.hub.max_unpublished_bytes`): rows and files stay bounded however small they are.
const MAX_UNPUBLISHED_FILES: i64 = 10_000;

fn scan_json(scan: Option<&macula_hub::osv::Scan>) -> Value {
    match scan {
        None => json!({"database": false}),
        Some(s) => {
            let mut v = s.to_json();
            v["database"] = json!(true);
            v
        }
    }
}

impl Registry {
    /// Stores a blob the caller (the owner of a verified publisher) uploads, if its bytes hash
    /// to `digest`; nothing is visible unless the whole of it arrived and matched.
    pub async fn put_blob(
        &self,
        actor: &Actor,
        digest: &str,
        body: axum::body::Body,
    ) -> ApiResult<Blob> {
        use futures_util::StreamExt;
        use std::io::Write;
        let hub = self.hub()?;
        let want: Digest = digest.parse().map_err(|e: macula_hub::digest::BadDigest| {
            ApiError::invalid("invalid_digest", e.to_string())
        })?;
        if !self.owns_verified_publisher(actor).await? {
            return Err(ApiError::forbidden(
                "not_publisher",
                "only the owner of a verified publisher uploads to the Hub",
            ));
        }
        let have = {
            let store = hub.store.clone();
            tokio::task::spawn_blocking(move || store.size(&want))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?
        };
        if let Some(size) = have {
            // Read to its end (bounded) before answering, so the client can finish sending
            // instead of meeting a closed connection.
            let mut stream = body.into_data_stream();
            let mut seen = 0u64;
            while let Some(Ok(chunk)) = stream.next().await {
                seen += chunk.len() as u64;
                if seen > hub.max_blob {
                    break;
                }
            }
            return Ok(Blob {
                digest: want.to_string(),
                size,
            });
        }
        // What the account has uploaded that no release names yet is bounded (abandoned uploads
        // are collected after `upload_ttl`; this account's first).
        self.collect_uploads(Some(&actor.account_id)).await?;
        let (pending, files): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM hub_uploads WHERE account_id = $1",
        )
        .bind(&actor.account_id)
        .fetch_one(&self.db.pool)
        .await?;
        if files >= MAX_UNPUBLISHED_FILES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "unpublished_quota",
                format!(
                    "you have {files} uploads that no release names yet (at most {MAX_UNPUBLISHED_FILES}): publish them, or wait until they are collected (registry.hub.upload_ttl_secs)"
                ),
            ));
        }
        let room = hub
            .max_unpublished_bytes
            .saturating_sub(pending.max(0) as u64);
        let limit = hub.max_blob.min(room);
        let too_large = || {
            if limit < hub.max_blob {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "unpublished_quota",
                    format!(
                        "your uploads that no release names yet take {pending} of the {} bytes allowed (registry.hub.max_unpublished_bytes): publish them, or wait until they are collected",
                        hub.max_unpublished_bytes
                    ),
                )
            } else {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "blob_too_large",
                    format!(
                        "a blob may be {} bytes (registry.hub.max_blob)",
                        hub.max_blob
                    ),
                )
            }
        };
        // Spooled to a file as it arrives (a blob may be larger than memory should hold), then
        // hashed into the store, which keeps it only if it is `digest`.
        let tmp_dir = hub.dir.join("uploads");
        std::fs::create_dir_all(&tmp_dir).map_err(ApiError::internal)?;
        let tmp = tmp_dir.join(format!("{}.{}", want.hex(), random_token("u", 8)));
        let mut file = std::fs::File::create(&tmp).map_err(ApiError::internal)?;
        let mut stream = body.into_data_stream();
        let mut size = 0u64;
        let result: ApiResult<()> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| ApiError::invalid("upload_failed", e.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(too_large());
                }
                file.write_all(&chunk).map_err(ApiError::internal)?;
            }
            file.flush().map_err(ApiError::internal)
        }
        .await;
        drop(file);
        let stored = match result {
            Ok(()) => {
                let store = hub.store.clone();
                let path = tmp.clone();
                tokio::task::spawn_blocking(move || {
                    let mut f = std::fs::File::open(&path)?;
                    store
                        .put(&mut f, limit, Some(want))
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .await
                .map_err(ApiError::internal)?
                .map_err(|e| ApiError::invalid("digest_mismatch", format!("blob {want}: {e}")))
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&tmp);
        let (d, size) = stored?;
        sqlx::query(
            "INSERT INTO hub_uploads (digest, account_id, size, uploaded_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (digest, account_id) DO NOTHING",
        )
        .bind(d.to_string())
        .bind(&actor.account_id)
        .bind(size as i64)
        .bind(now_secs() as i64)
        .execute(&self.db.pool)
        .await?;
        Ok(Blob {
            digest: d.to_string(),
            size,
        })
    }

    /// Publishes: the publisher's signed role, and the index of every version it lists for the
    /// first time. Each new version passes review (manifest, files uploaded, capabilities
    /// within the publisher's grants, resources within the largest plan, no secret, SBOM
    /// covering the artifacts, provenance signed by the publisher's keys, scan); then the role
    /// is checked and written by the TUF repository (signatures, version, namespace,
    /// immutability); then the releases are recorded, audited, and the Hub's status re-signed.
    pub async fn publish(&self, actor: &Actor, ns: &str, req: Publish) -> ApiResult<Published> {
        let hub = self.hub()?;
        let mut c = self.db.pool.acquire().await?;
        let p = self.owned_publisher(&mut c, actor, ns, false).await?;
        if p.verified_by.is_empty() {
            return Err(unverified(ns));
        }
        let delegation = self.delegation(&mut c, &p).await?.ok_or_else(|| {
            ApiError::conflict(
                "no_keys",
                format!("publisher {ns} has no active signing key (macula hub keys add)"),
            )
        })?;
        drop(c);
        let role_bytes = serde_json::to_vec_pretty(&req.role).map_err(ApiError::internal)?;
        let mut files = BTreeMap::new();
        for (name, b64) in &req.indexes {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| {
                    ApiError::invalid("invalid_index", format!("indexes.{name}: not base64: {e}"))
                })?;
            files.insert(name.clone(), bytes);
        }
        let trusted = Trusted {
            keys: delegation.keys.iter().map(|k| k.0).collect(),
            threshold: delegation.threshold as usize,
        };
        let policy = submit::Policy {
            capabilities: p.grants.clone(),
            max_instances: self
                .config
                .prices
                .tiers
                .iter()
                .map(|t| t.max_instances)
                .max()
                .unwrap_or(u32::MAX),
            max_cpu_millis: MAX_CPU_MILLIS,
            max_memory_bytes: MAX_MEMORY_BYTES,
        };
        let osv_db = hub.osv();
        let rules = Rules {
            publisher: &trusted,
            policy: &policy,
            osv: osv_db.as_deref(),
        };
        // Review every index given (the repository refuses a new target without one, and an
        // index given for a target already published must be that target's).
        let mut reviewed = vec![];
        for (name, bytes) in &files {
            let r = super::blocking(|| review::review(bytes, hub.store.as_ref(), &rules)).map_err(
                |problems| {
                    ApiError::invalid(
                        "package_refused",
                        format!("{name}:\n{}", review::describe(&problems)),
                    )
                },
            )?;
            let want = format!("{}@{}", r.index.name, r.index.version);
            if *name != want {
                return Err(ApiError::invalid(
                    "package_refused",
                    format!("{name}: the index is of {want}; a package version's target is named <namespace>/<name>@<version>"),
                ));
            }
            let size: u64 =
                r.index.files.values().map(|f| f.size).sum::<u64>() + r.index.manifest.size;
            reviewed.push((name.clone(), r, size));
        }
        let mut repo = hub.repo.lock().await;
        let accepted = repo
            .accept_role(ns, &delegation, &role_bytes, &files)
            .await
            .map_err(tuf_error)?;
        let role_version = repo.publishers().get(ns).copied().unwrap_or(0);
        let mut ch = self.change(actor).await?;
        let now = now_secs() as i64;
        let mut added = vec![];
        for (name, r, size) in reviewed
            .into_iter()
            .filter(|(n, _, _)| accepted.added.contains(n))
        {
            let release = Release {
                target: name.clone(),
                package: r.index.name.clone(),
                version: r.index.version.clone(),
                digest: r.digest.to_string(),
                size: size as i64,
                tier: "community".into(),
                scan: scan_json(r.scan.as_ref()),
                smoke: json!({"pending": true}),
                yanked: String::new(),
                revoked: String::new(),
                certification: json!({}),
                published_by: actor.email.clone(),
                published_at: rfc3339(now as u64),
            };
            sqlx::query(
                "INSERT INTO hub_releases (target, namespace, package, version, digest, size, tier, scan, smoke, yanked, revoked, published_by, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '{\"pending\": true}', '', '', $9, $10)",
            )
            .bind(&release.target)
            .bind(ns)
            .bind(&release.package)
            .bind(&release.version)
            .bind(&release.digest)
            .bind(release.size)
            .bind(&release.tier)
            .bind(release.scan.to_string())
            .bind(&actor.email)
            .bind(now)
            .execute(&mut *ch)
            .await?;
            // Its files are a release's now: kept, and no longer anyone's pending uploads.
            let mut files: Vec<String> = r
                .index
                .files
                .values()
                .map(|f| f.digest.to_string())
                .collect();
            files.push(r.index.manifest.digest.to_string());
            files.sort();
            files.dedup();
            for d in &files {
                sqlx::query(
                    "INSERT INTO hub_release_files (target, digest) VALUES ($1, $2) ON CONFLICT (target, digest) DO NOTHING",
                )
                .bind(&release.target)
                .bind(d)
                .execute(&mut *ch)
                .await?;
                sqlx::query("DELETE FROM hub_uploads WHERE digest = $1")
                    .bind(d)
                    .execute(&mut *ch)
                    .await?;
            }
            added.push(release);
        }
        for name in &accepted.removed {
            sqlx::query("UPDATE hub_releases SET revoked = $1 WHERE target = $2 AND revoked = ''")
                .bind("removed by the publisher")
                .bind(name)
                .execute(&mut *ch)
                .await?;
        }
        ch.audit(
            "hub.publish",
            json!({
                "namespace": ns, "role_version": role_version,
                "added": added.iter().map(|r| json!({"target": r.target, "digest": r.digest})).collect::<Vec<_>>(),
                "removed": accepted.removed,
            }),
        );
        ch.commit().await?;
        self.write_status(&mut repo).await?;
        Ok(Published {
            role_version,
            added,
            removed: accepted.removed,
        })
    }

    /// Re-signs `hub/status.json`: every release's tier, yank and revocation, as the Hub says.
    pub(crate) async fn write_status(&self, repo: &mut macula_hub::tuf::Repo) -> ApiResult<()> {
        let rows = sqlx::query(
            "SELECT target, digest, tier, yanked, revoked, scan, smoke FROM hub_releases ORDER BY target",
        )
        .fetch_all(&self.db.pool)
        .await?;
        let mut releases = serde_json::Map::new();
        for r in rows {
            let target: String = r.try_get("target")?;
            // The pipeline's results, signed with the rest: whether a database scanned it and
            // what it found (by id), and whether its smoke test passed (null: not run yet).
            let scan: Value =
                serde_json::from_str(&r.try_get::<String, _>("scan")?).unwrap_or(Value::Null);
            let smoke: Value =
                serde_json::from_str(&r.try_get::<String, _>("smoke")?).unwrap_or(Value::Null);
            let findings: Vec<Value> = scan["findings"]
                .as_array()
                .map(|f| f.iter().map(|x| x["id"].clone()).collect())
                .unwrap_or_default();
            releases.insert(
                target,
                json!({
                    "digest": r.try_get::<String, _>("digest")?,
                    "tier": r.try_get::<String, _>("tier")?,
                    "yanked": r.try_get::<String, _>("yanked")?,
                    "revoked": r.try_get::<String, _>("revoked")?,
                    "scan": {"database": scan["database"] == json!(true), "findings": findings},
                    "smoke": smoke.get("passed").cloned().unwrap_or(Value::Null),
                }),
            );
        }
        let doc = json!({"kind": "macula-hub-status/v1", "releases": releases});
        let bytes = serde_json::to_vec(&doc).map_err(ApiError::internal)?;
        repo.set_hub_target(STATUS_TARGET, Some((&bytes, json!({}))))
            .await
            .map_err(tuf_error)
    }

    /// Re-signs the Hub's status and tells the nodes (through the hosting node) that the
    /// repository changed: they refresh, and flag replicas of what is revoked.
    pub(crate) async fn announce_status(
        &self,
        mut repo: tokio::sync::MutexGuard<'_, macula_hub::tuf::Repo>,
    ) -> ApiResult<()> {
        self.write_status(&mut repo).await?;
        let version = repo.timestamp_version();
        drop(repo);
        if let Some(node) = &self.node {
            node.hub_changed(version);
        }
        Ok(())
    }

    /// Yanks (hidden from new installs, still installable by digest) or revokes (installable
    /// nowhere) a release: its publisher's owner or an operator.
    pub async fn mark_release(
        &self,
        actor: &Actor,
        target: &str,
        revoke: bool,
        reason: &str,
    ) -> ApiResult<Release> {
        let hub = self.hub()?;
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 500 {
            return Err(ApiError::invalid(
                "invalid_reason",
                "reason: 1 to 500 bytes",
            ));
        }
        let ns = target.split('/').next().unwrap_or_default().to_owned();
        if ns == HUB_NAMESPACE {
            return Err(ApiError::not_found(format!("no release {target}")));
        }
        let repo = hub.repo.lock().await;
        let mut ch = self.change(actor).await?;
        self.owned_publisher(&mut ch, actor, &ns, true).await?;
        let column = if revoke { "revoked" } else { "yanked" };
        let sql = if revoke {
            "UPDATE hub_releases SET revoked = $1 WHERE target = $2"
        } else {
            "UPDATE hub_releases SET yanked = $1 WHERE target = $2"
        };
        let done = sqlx::query(sql)
            .bind(reason)
            .bind(target)
            .execute(&mut *ch)
            .await?;
        if done.rows_affected() == 0 {
            return Err(ApiError::not_found(format!("no release {target}")));
        }
        ch.audit(
            if revoke { "hub.revoke" } else { "hub.yank" },
            json!({"target": target, column: reason}),
        );
        ch.commit().await?;
        self.announce_status(repo).await?;
        self.release(target).await
    }

    /// Tests a release again (its publisher's owner or an operator): its SBOM scanned against
    /// the Hub's vulnerability database as it is now (a newer OSV export finds what an older
    /// did not), and its smoke test marked pending — the caller runs it (`smoke_release`), which
    /// then sets the tier. A revoked release is not tested.
    pub async fn retest_release(&self, actor: &Actor, target: &str) -> ApiResult<Release> {
        let hub = self.hub()?;
        let ns = target.split('/').next().unwrap_or_default().to_owned();
        if ns == HUB_NAMESPACE {
            return Err(ApiError::not_found(format!("no release {target}")));
        }
        let release = self.release(target).await?;
        let mut ch = self.change(actor).await?;
        self.owned_publisher(&mut ch, actor, &ns, true).await?;
        if !release.revoked.is_empty() {
            return Err(ApiError::conflict(
                "revoked",
                format!("{target} is revoked: nothing to test"),
            ));
        }
        if release.smoke["pending"] == json!(true) {
            return Err(ApiError::conflict(
                "test_pending",
                format!("{target} is being tested already; `macula hub info` shows the result when it ends"),
            ));
        }
        let digest: Digest = release.digest.parse().map_err(ApiError::internal)?;
        let index = hub.release_index(target, &digest).ok_or_else(|| {
            ApiError::internal(format!("the index of {target} is not in the repository"))
        })?;
        let index: macula_hub::pack::Index =
            serde_json::from_slice(&index).map_err(ApiError::internal)?;
        hub.reload_osv().await;
        let scan = match hub.osv() {
            None => None,
            Some(db) => {
                let store = hub.store.clone();
                let sbom = tokio::task::spawn_blocking(move || {
                    macula_hub::sbom::of_package(store.as_ref(), &index)
                })
                .await
                .map_err(ApiError::internal)?
                .map_err(|e| ApiError::invalid("package_refused", format!("{target}: {e}")))?;
                Some(sbom.map(|s| db.scan(&s)).unwrap_or_default())
            }
        };
        sqlx::query(
            "UPDATE hub_releases SET scan = $1, smoke = '{\"pending\": true}' WHERE target = $2",
        )
        .bind(scan_json(scan.as_ref()).to_string())
        .bind(target)
        .execute(&mut *ch)
        .await?;
        ch.audit("hub.retest", json!({"target": target}));
        ch.commit().await?;
        self.release(target).await
    }

    /// The publisher's owner asks for a Verified release to be certified: `declared` is the
    /// vendor's support terms and SLO; the certification fee (quoted in the answer) is charged
    /// to the owner's account when an operator certifies it. The declaration is fixed once
    /// made (what the operator reviews does not change under them).
    pub async fn request_certification(
        &self,
        actor: &Actor,
        target: &str,
        declared: &str,
    ) -> ApiResult<Release> {
        let hub = self.hub()?;
        let declared = declared.trim();
        if declared.len() < 10 || declared.len() > 2000 {
            return Err(ApiError::invalid(
                "invalid_declaration",
                "declare the support you offer and the SLO you commit to (10 to 2000 bytes)",
            ));
        }
        let ns = target.split('/').next().unwrap_or_default().to_owned();
        let release = self.release(target).await?;
        // Whose release it is, before anything about its state is said.
        let mut ch = self.change(actor).await?;
        self.owned_publisher(&mut ch, actor, &ns, false).await?;
        if release.tier == "certified" {
            return Err(ApiError::conflict(
                "already_certified",
                format!("{target} is certified already"),
            ));
        }
        if release.tier != "verified" || !release.revoked.is_empty() {
            return Err(ApiError::conflict(
                "not_verified",
                format!(
                    "{target} is {}: certification is for Verified releases (scan and smoke test passed) that are not revoked",
                    release.tier
                ),
            ));
        }
        if let Some(at) = release.certification["requested_at"].as_str() {
            return Err(ApiError::conflict(
                "already_requested",
                format!("{target}: certification was requested at {at}; an operator reviews that declaration"),
            ));
        }
        let request = json!({
            "declared": declared,
            "requested_by": actor.email,
            "requested_at": rfc3339(now_secs()),
            "fee_cents": hub.certification_fee_cents,
        });
        sqlx::query("UPDATE hub_releases SET certification = $1 WHERE target = $2")
            .bind(request.to_string())
            .bind(target)
            .execute(&mut *ch)
            .await?;
        ch.audit(
            "hub.certification.request",
            json!({"target": target, "declared": declared, "fee_cents": hub.certification_fee_cents}),
        );
        ch.commit().await?;
        self.release(target).await
    }

    /// An operator certifies a Verified release whose publisher asked for it (the declared
    /// support and SLO reviewed: `note`); the fee the publisher accepted is charged to its
    /// owner's account (a `hub_certification` fee on the month's invoice).
    pub async fn certify_release(
        &self,
        actor: &Actor,
        target: &str,
        note: &str,
    ) -> ApiResult<Release> {
        let hub = self.hub()?;
        Self::operator_only(actor)?;
        let note = note.trim();
        if note.is_empty() || note.len() > 500 {
            return Err(ApiError::invalid(
                "invalid_reason",
                "reason: what was reviewed (support, SLO), 1 to 500 bytes",
            ));
        }
        let release = self.release(target).await?;
        if release.tier != "verified" || !release.revoked.is_empty() {
            return Err(ApiError::conflict(
                "not_verified",
                format!(
                    "{target} is {}: only a Verified release (scan and smoke test passed) that is not revoked can be certified",
                    release.tier
                ),
            ));
        }
        let Some(fee) = release.certification["fee_cents"].as_i64() else {
            return Err(ApiError::conflict(
                "not_requested",
                format!(
                    "{target}: its publisher has not asked for certification (macula hub request-certification), declaring support and an SLO and accepting the fee"
                ),
            ));
        };
        let ns = target.split('/').next().unwrap_or_default().to_owned();
        let repo = hub.repo.lock().await;
        let mut ch = self.change(actor).await?;
        let owner = self.publisher_row(&mut ch, &ns).await?.owner_id;
        let mut cert = release.certification.clone();
        cert["review"] = json!(note);
        cert["certified_by"] = json!(actor.email);
        cert["certified_at"] = json!(rfc3339(now_secs()));
        sqlx::query(
            "UPDATE hub_releases SET tier = 'certified', certification = $1 WHERE target = $2",
        )
        .bind(cert.to_string())
        .bind(target)
        .execute(&mut *ch)
        .await?;
        if fee > 0 {
            sqlx::query("INSERT INTO fees (account_id, realm, kind, amount_cents, created_at) VALUES ($1, $2, 'hub_certification', $3, $4)")
                .bind(&owner)
                .bind(target)
                .bind(fee)
                .bind(now_secs() as i64)
                .execute(&mut *ch)
                .await?;
        }
        ch.audit(
            "hub.tier",
            json!({"target": target, "tier": "certified", "was": release.tier, "review": note, "fee_cents": fee}),
        );
        ch.commit().await?;
        self.announce_status(repo).await?;
        self.release(target).await
    }

    pub async fn release(&self, target: &str) -> ApiResult<Release> {
        let r = sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM hub_releases r WHERE r.target = $1"
        ))
        .bind(target)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no release {target}")))?;
        release_of(&r)
    }

    /// Packages whose name contains `q`, optionally of one publisher.
    pub async fn search_packages(&self, s: &Search) -> ApiResult<Vec<PackageSummary>> {
        self.hub()?;
        let q = format!("%{}%", s.q.as_deref().unwrap_or("").replace(['%', '_'], ""));
        let rows = sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS}, p.verified_by, p.namespace FROM hub_releases r \
             JOIN hub_publishers p ON p.namespace = r.namespace \
             WHERE r.package LIKE $1 AND ($2 = '' OR r.namespace = $2) ORDER BY r.package, r.created_at DESC LIMIT 5000"
        ))
        .bind(&q)
        .bind(s.publisher.as_deref().unwrap_or(""))
        .fetch_all(&self.db.pool)
        .await?;
        let mut out: Vec<PackageSummary> = vec![];
        for row in rows {
            let r = release_of(&row)?;
            let usable = r.yanked.is_empty() && r.revoked.is_empty();
            match out.last_mut() {
                Some(last) if last.package == r.package => {
                    last.versions += 1;
                    if last.latest.is_empty() && usable {
                        last.latest = r.version.clone();
                        last.tier = r.tier.clone();
                    }
                }
                _ => out.push(PackageSummary {
                    package: r.package.clone(),
                    publisher: row.try_get("namespace")?,
                    verified_by: row.try_get("verified_by")?,
                    latest: if usable {
                        r.version.clone()
                    } else {
                        String::new()
                    },
                    tier: if usable {
                        r.tier.clone()
                    } else {
                        String::new()
                    },
                    versions: 1,
                }),
            }
        }
        Ok(out)
    }

    /// A package and every version of it, newest first.
    pub async fn package_info(&self, package: &str) -> ApiResult<PackageInfo> {
        self.hub()?;
        let ns = package.split('/').next().unwrap_or_default();
        let rows = sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM hub_releases r WHERE r.package = $1 ORDER BY r.created_at DESC, r.target DESC"
        ))
        .bind(package)
        .fetch_all(&self.db.pool)
        .await?;
        if rows.is_empty() {
            return Err(ApiError::not_found(format!(
                "no package {package} on the Hub"
            )));
        }
        let releases = rows.iter().map(release_of).collect::<ApiResult<Vec<_>>>()?;
        let publisher = self.show_publisher(ns).await?;
        Ok(PackageInfo {
            package: package.to_owned(),
            publisher,
            releases,
        })
    }

    /// The publisher's current signed role (to add to and re-sign), or null before its first.
    pub async fn publisher_role(&self, ns: &str) -> ApiResult<Value> {
        let hub = self.hub()?;
        let repo = hub.repo.lock().await;
        match repo.role_bytes(ns) {
            None => Ok(Value::Null),
            Some(b) => serde_json::from_slice(b).map_err(ApiError::internal),
        }
    }

    /// A snapshot and timestamp for an offline bundle (a logged-in account asks).
    pub async fn bundle_metadata(
        &self,
        actor: &Actor,
        req: NewBundleMetadata,
    ) -> ApiResult<BundleMetadata> {
        let hub = self.hub()?;
        // Bundles are for publishers and operators (an export of vulnerability records is work
        // worth bounding to them).
        if !actor.operator && !self.owns_verified_publisher(actor).await? {
            return Err(ApiError::forbidden(
                "not_publisher",
                "bundles are exported by operators and the owners of verified publishers",
            ));
        }
        let days = req.days.unwrap_or(30);
        if !(1..=180).contains(&days) {
            return Err(ApiError::invalid("invalid_days", "days: 1 to 180"));
        }
        if req.ecosystems.len() > 64 || req.ecosystems.iter().any(|e| e.is_empty() || e.len() > 64)
        {
            return Err(ApiError::invalid(
                "invalid_ecosystems",
                "ecosystems: at most 64 names of 1 to 64 bytes",
            ));
        }
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        // The vulnerability data for the bundle's ecosystems, made before the repository is
        // locked (it may be large); signed below like the repository's own files (the targets
        // key), and bound to the bundle's snapshot version, so the site can trust it offline.
        let osv = match (hub.osv(), req.ecosystems.is_empty()) {
            (Some(db), false) => {
                let wanted: std::collections::BTreeSet<String> =
                    req.ecosystems.iter().cloned().collect();
                let export = db.export(&wanted);
                let records = export.records.len() as u64;
                let bytes = serde_json::to_vec(&export).map_err(ApiError::internal)?;
                Some((bytes, export.ecosystems, records))
            }
            _ => None,
        };
        let repo = hub.repo.lock().await;
        let signed_osv = osv.as_ref().map(
            |(bytes, _, _)| json!({"digest": Digest::of(bytes).to_string(), "size": bytes.len()}),
        );
        let (snapshot, timestamp, expires) = repo
            .bundle_metadata(std::time::Duration::from_secs(days * 86_400), signed_osv)
            .await
            .map_err(super::tuf_error)?;
        let (osv, osv_envelope) = match osv {
            Some((bytes, ecosystems, records)) => {
                let statement = macula_hub::osv::ExportStatement {
                    digest: Digest::of(&bytes).to_string(),
                    size: bytes.len() as u64,
                    ecosystems,
                    records,
                    exported: rfc3339(now_secs()),
                    snapshot_version: repo.snapshot_version(),
                };
                let body = serde_json::to_vec(&statement).map_err(ApiError::internal)?;
                let envelope =
                    repo.sign_with_targets_key(macula_hub::osv::EXPORT_PAYLOAD_TYPE, &body);
                let envelope = serde_json::to_vec(&envelope).map_err(ApiError::internal)?;
                (Some(b64(&bytes)), Some(b64(&envelope)))
            }
            None => (None, None),
        };
        Ok(BundleMetadata {
            snapshot: b64(&snapshot),
            snapshot_version: repo.snapshot_version(),
            timestamp: b64(&timestamp),
            expires: rfc3339(expires.as_second().max(0) as u64),
            osv,
            osv_envelope,
        })
    }

    /// Removes the uploads older than `upload_ttl` that no release names (of `account` only,
    /// or of every account): their rows, and their blobs unless a release or another upload
    /// still holds them. Returns how many uploads it collected.
    pub(crate) async fn collect_uploads(&self, account: Option<&str>) -> ApiResult<usize> {
        let hub = self.hub()?;
        let before = now_secs() as i64 - hub.upload_ttl.as_secs() as i64;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT digest, account_id FROM hub_uploads WHERE uploaded_at <= $1 AND ($2 = '' OR account_id = $2) LIMIT 10000",
        )
        .bind(before)
        .bind(account.unwrap_or(""))
        .fetch_all(&self.db.pool)
        .await?;
        for (digest, acct) in &rows {
            sqlx::query("DELETE FROM hub_uploads WHERE digest = $1 AND account_id = $2")
                .bind(digest)
                .bind(acct)
                .execute(&self.db.pool)
                .await?;
            let held: i64 = sqlx::query_scalar(
                "SELECT (SELECT COUNT(*) FROM hub_release_files WHERE digest = $1) + \
                 (SELECT COUNT(*) FROM hub_uploads WHERE digest = $1)",
            )
            .bind(digest)
            .fetch_one(&self.db.pool)
            .await?;
            // Only blobs an upload stored are tracked: a release's files from before this
            // table existed were never in it, so they are never collected.
            let in_release: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM hub_releases WHERE digest = $1")
                    .bind(digest)
                    .fetch_one(&self.db.pool)
                    .await?;
            if held == 0 && in_release == 0 {
                if let Ok(d) = digest.parse::<Digest>() {
                    let store = hub.store.clone();
                    let _ = tokio::task::spawn_blocking(move || store.remove(&d)).await;
                }
            }
        }
        Ok(rows.len())
    }

    /// Whether `actor` owns a verified publisher.
    async fn owns_verified_publisher(&self, actor: &Actor) -> ApiResult<bool> {
        let owns: Option<String> = sqlx::query_scalar(
            "SELECT namespace FROM hub_publishers WHERE owner_id = $1 AND verified_by <> '' LIMIT 1",
        )
        .bind(&actor.account_id)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(owns.is_some())
    }

    /// The Hub's newest root, for a node or client to trust.
    pub async fn hub_trust(&self) -> ApiResult<Trust> {
        let hub = self.hub()?;
        let repo = hub.repo.lock().await;
        let v = repo.root_version();
        let bytes = repo.root_file(v).map_err(ApiError::internal)?;
        Ok(Trust {
            root: serde_json::from_slice(&bytes).map_err(ApiError::internal)?,
            root_version: v,
            repository: "/v1/hub/tuf/".into(),
        })
    }
}
