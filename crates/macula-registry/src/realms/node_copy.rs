//! The node's copy: every realm's newest policy and authority written to the hosting node's
//! config directory (the database is the source of truth, the directory a copy), and the
//! authority secrets sealed at rest.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    /// The realm's authority secret (hex), opened with the KEK.
    pub(crate) fn authority_secret(&self, row: &RealmRow) -> ApiResult<String> {
        self.kek
            .open(&row.name, &row.authority_key)
            .map_err(ApiError::internal)
    }

    /// Seals every authority secret still stored in the clear (written before sealing), and
    /// checks that the KEK opens the others: a registry started with the wrong KEK refuses to
    /// start, saying so, rather than failing on each key it issues.
    pub(crate) async fn seal_secrets(&self) -> anyhow::Result<()> {
        let rows = sqlx::query("SELECT name, authority_key FROM realms")
            .fetch_all(&self.db.pool)
            .await?;
        let mut plain = vec![];
        for r in &rows {
            let name: String = r.try_get("name")?;
            let stored: String = r.try_get("authority_key")?;
            if crate::kek::Kek::is_plain(&stored) {
                plain.push((name, stored));
            } else {
                self.kek.open(&name, &stored)?;
            }
        }
        if plain.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        for (name, secret) in &plain {
            sqlx::query(
                "UPDATE realms SET authority_key = $1 WHERE name = $2 AND authority_key = $3",
            )
            .bind(self.kek.seal(name, secret))
            .bind(name)
            .bind(secret)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        // The clear text must not linger in free pages or the WAL of the embedded database.
        if self.db.backend == crate::Backend::Sqlite {
            sqlx::raw_sql("PRAGMA secure_delete = ON; VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
                .execute(&self.db.pool)
                .await?;
        }
        tracing::warn!(
            "sealed {} realm authority secrets under the registry's KEK; backups made before hold them \
             in the clear: rotate those realms' authorities (transfer or re-register) if they may leak",
            plain.len()
        );
        Ok(())
    }

    /// Writes the realm's authority and newest policy into the node's config directory and
    /// applies it at once (the node floods the signed state to the mesh).
    pub async fn materialize(&self, name: &str) -> ApiResult<()> {
        let mut tx = self.db.pool.acquire().await?;
        let row = self.realm(&mut tx, name).await?;
        let doc = self.policy_doc(&row)?;
        self.write_realm(&row, &doc).map_err(ApiError::from)?;
        if let Some(node) = &self.node {
            node.apply().map_err(ApiError::from)?;
        }
        Ok(())
    }

    pub(crate) fn write_realm(&self, row: &RealmRow, doc: &PolicyDoc) -> anyhow::Result<()> {
        let dir = self.confdir.root.join("realms").join(&row.name);
        std::fs::create_dir_all(&dir)?;
        let key_path = dir.join("authority.key");
        let secret = self.kek.open(&row.name, &row.authority_key)?;
        if std::fs::read_to_string(&key_path).ok().as_deref() != Some(secret.as_str()) {
            macula_common::secret::write_secret(&key_path, &secret)?;
            std::fs::write(dir.join("authority.cert"), &row.authority_cert)?;
        }
        let current = self.confdir.read_policy(&row.name).ok();
        if current.as_ref() != Some(doc) {
            self.confdir.write_policy(doc)?;
        }
        Ok(())
    }

    /// Replaces a deleted realm's policy in the node's config directory with a tombstone (the
    /// next version of the same registration, signed by its authority as every state is): the
    /// node floods it, every node closes the realm's sessions and refuses its keys, and no older
    /// state of it can win again, also after restarts.
    pub(crate) fn bury(&self, row: &RealmRow) {
        let name = &row.name;
        let tombstone = PolicyDoc {
            realm: name.clone(),
            version: row.policy_version as u64 + 1,
            generation: row.generation as u64,
            deleted: true,
            deleted_at: now_secs(),
            ..PolicyDoc::default()
        };
        if let Err(e) = self.write_realm(row, &tombstone) {
            tracing::error!("writing the tombstone of {name}: {e:#}");
        }
        if let Some(node) = &self.node {
            if let Err(e) = node.apply() {
                tracing::error!("reloading after deleting {name}: {e:#}");
            }
        }
    }

    /// Brings the config directory in line with the database (after a crash between a commit
    /// and its copy, or a restore).
    pub async fn sync_all(&self) -> anyhow::Result<()> {
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM realms ORDER BY name")
            .fetch_all(&self.db.pool)
            .await?;
        for name in &names {
            let mut tx = self.db.begin().await?;
            let row = self
                .realm(&mut tx, name)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            let mut doc = self
                .policy_doc(&row)
                .map_err(|e| anyhow::anyhow!(e.message))?;
            // A policy written before `authorities` existed (or before an ancestor changed
            // hands) gets the list it should have, as a new version (put_policy sets both).
            let authorities = owner_authorities(
                &mut tx,
                &self.operator_key.verifying_key(),
                name,
                &row.owner_id,
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
            // Likewise one written before plans limited instances, or under a price list
            // whose limits have changed since.
            let max_instances = self.plan_max_instances(&row.tier);
            if authorities != doc.authorities || max_instances != doc.max_instances {
                doc = self
                    .put_policy(&mut tx, name, doc, "registry")
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
            }
            let row = self
                .realm(&mut tx, name)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            tx.commit().await?;
            self.write_realm(&row, &doc)?;
        }
        if let Some(node) = &self.node {
            node.apply()?;
        }
        Ok(())
    }
}
