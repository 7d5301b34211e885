//! Members and the realm's policy: roles, topic ACLs, dedicated nodes, verified roles, and its
//! versions.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    pub async fn members(&self, actor: &Actor, name: &str) -> ApiResult<List<Member>> {
        let (mut tx, InRealm { row, .. }) = self.read_in(actor, name).await?;
        let rows = sqlx::query(
            "SELECT email, role, added_by, added_at FROM members WHERE realm = $1 ORDER BY email",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        let mut items = vec![Member {
            email: row.owner_email,
            role: "owner".into(),
            added_by: None,
            added_at: None,
        }];
        for r in rows {
            items.push(Member {
                email: r.try_get("email")?,
                role: r.try_get("role")?,
                added_by: Some(r.try_get("added_by")?),
                added_at: Some(rfc3339(r.try_get::<i64, _>("added_at")? as u64)),
            });
        }
        Ok(all_of(items))
    }

    /// Adds a member (an invitation: it applies when that email has an account) or changes a
    /// member's role. Nobody changes their own role.
    pub async fn set_member(
        &self,
        actor: &Actor,
        name: &str,
        email: &str,
        role: &str,
    ) -> ApiResult<MemberSet> {
        let email = validate_email(email)?;
        let (mut tx, InRealm { row, mut doc, .. }) =
            self.change_in(actor, name, Needs::Action(ADMIN)).await?;
        if email == actor.email {
            return Err(ApiError::forbidden(
                "own_role",
                "nobody may change their own role; ask another admin or the owner",
            ));
        }
        if email == row.owner_email {
            return Err(ApiError::conflict(
                "is_owner",
                format!("{email} owns {name}; transfer the realm to change that"),
            ));
        }
        require_role(&doc, name, role)?;
        let now = now_secs() as i64;
        sqlx::query("DELETE FROM members WHERE realm = $1 AND email = $2")
            .bind(name)
            .bind(&email)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO members (realm, email, role, added_by, added_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(name)
            .bind(&email)
            .bind(role)
            .bind(&actor.email)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        doc.users.retain(|u| u.email != email);
        doc.users.push(UserDoc {
            email: email.clone(),
            role: role.to_owned(),
        });
        let doc = tx.put_policy(doc).await?;
        tx.audit("member.set", json!({"email": email, "role": role}));
        tx.commit().await?;
        Ok(MemberSet {
            realm: name.to_owned(),
            email,
            role: role.to_owned(),
            policy_version: doc.version,
        })
    }

    pub async fn remove_member(&self, actor: &Actor, name: &str, email: &str) -> ApiResult<()> {
        let email = email.trim().to_ascii_lowercase();
        let (mut tx, InRealm { mut doc, .. }) =
            self.change_in(actor, name, Needs::Action(ADMIN)).await?;
        let n = sqlx::query("DELETE FROM members WHERE realm = $1 AND email = $2")
            .bind(name)
            .bind(&email)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(ApiError::not_found(format!(
                "{email} is not a member of {name}"
            )));
        }
        doc.users.retain(|u| u.email != email);
        tx.put_policy(doc).await?;
        tx.audit("member.remove", json!({"email": email}));
        tx.commit().await
    }

    pub async fn policy(
        &self,
        actor: &Actor,
        name: &str,
        version: Option<i64>,
    ) -> ApiResult<PolicyDoc> {
        let (mut tx, InRealm { row, doc, .. }) = self.read_in(actor, name).await?;
        let doc = match version {
            Some(v) if v != row.policy_version => {
                let text: Option<String> = sqlx::query_scalar(
                    "SELECT doc FROM policy_versions WHERE realm = $1 AND version = $2",
                )
                .bind(name)
                .bind(v)
                .fetch_optional(&mut *tx)
                .await?;
                let text = text.ok_or_else(|| {
                    ApiError::not_found(format!("{name} has no policy version {v}"))
                })?;
                Policy::from_yaml(&text).map_err(ApiError::internal)?.doc
            }
            _ => doc,
        };
        Ok(doc)
    }

    pub async fn policy_versions(
        &self,
        actor: &Actor,
        name: &str,
        page: &Page,
    ) -> ApiResult<List<PolicyVersion>> {
        let (mut tx, _) = self.read_in(actor, name).await?;
        let limit = page.limit();
        let after = page.below()?;
        let rows = sqlx::query("SELECT version, author, created_at FROM policy_versions WHERE realm = $1 AND version < $2 ORDER BY version DESC LIMIT $3")
            .bind(name)
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&mut *tx)
            .await?;
        let mut items = vec![];
        for r in rows {
            items.push(PolicyVersion {
                version: r.try_get("version")?,
                author: r.try_get("author")?,
                created_at: rfc3339(r.try_get::<i64, _>("created_at")? as u64),
            });
        }
        Ok(page_of(items, limit, |v| v.version.to_string()))
    }

    /// Replaces the realm's roles and topic ACLs (users, keys, revocations and status are the
    /// registry's to manage). `expected_version` makes the change conditional (409 if stale).
    pub async fn set_policy(
        &self,
        actor: &Actor,
        name: &str,
        req: PolicyUpdate,
    ) -> ApiResult<PolicyDoc> {
        let (
            mut tx,
            InRealm {
                row,
                access,
                mut doc,
            },
        ) = self.change_in(actor, name, Needs::Action(ADMIN)).await?;
        if let Some(v) = req.expected_version {
            if v != row.policy_version {
                return Err(ApiError::conflict(
                    "stale_policy",
                    format!(
                        "the policy of {name} is at version {}, not {v}; reload and retry",
                        row.policy_version
                    ),
                ));
            }
        }
        // A member may not remove or weaken the role they act through (self-escalation by
        // rewriting one's own role is the same: the role must stay as it is).
        if let Access::Member(role) = &access {
            let before = doc.roles.iter().find(|r| &r.name == role);
            let after = req.roles.iter().find(|r| &r.name == role);
            if before != after {
                return Err(ApiError::forbidden(
                    "own_role",
                    format!(
                        "you act through role {role:?}; another admin or the owner must change it"
                    ),
                ));
            }
        }
        let used: Vec<String> = doc.users.iter().map(|u| u.role.clone()).collect();
        for r in used {
            if !req.roles.iter().any(|x| x.name == r) {
                return Err(ApiError::conflict(
                    "role_in_use",
                    format!("role {r:?} is held by members; change their role first"),
                ));
            }
        }
        doc.roles = req.roles;
        doc.topic_acls = req.topic_acls;
        if let Some(nodes) = req.nodes {
            for n in &nodes {
                if n.parse::<libp2p_identity::PeerId>().is_err() {
                    return Err(ApiError::invalid(
                        "invalid_node",
                        format!("{n:?} is not a node's peer id (see `macula mesh status`)"),
                    ));
                }
            }
            if !nodes.is_empty() {
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM addons WHERE realm = $1 AND feature = 'dedicated_nodes' AND ended_at = 0",
                )
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                if active == 0 {
                    return Err(ApiError::conflict(
                        "addon_required",
                        format!("restricting {name} to dedicated nodes needs the dedicated_nodes add-on (macula realms addon)"),
                    ));
                }
            }
            doc.nodes = nodes;
        }
        if let Some(v) = req.verified_roles {
            doc.verified_roles = v;
        }
        if let Some(p) = req.packages {
            p.check()
                .map_err(|e| ApiError::invalid("invalid_packages", e))?;
            doc.packages = p;
        }
        let doc = tx.put_policy(doc).await?;
        tx.audit("policy.update", json!({"version": doc.version}));
        tx.commit().await?;
        Ok(doc)
    }
}

/// The role must exist in the realm's policy (422 naming the roles there are).
pub(crate) fn require_role(doc: &PolicyDoc, realm: &str, role: &str) -> ApiResult<()> {
    if doc.roles.iter().any(|r| r.name == role) {
        return Ok(());
    }
    let roles: Vec<&str> = doc.roles.iter().map(|r| r.name.as_str()).collect();
    Err(ApiError::invalid(
        "unknown_role",
        format!("{realm} has no role {role:?}; roles: {}", roles.join(", ")),
    ))
}

/// The address whose memberships apply to `actor`: none ("", which no member row has) until the
/// address is verified.
pub(crate) fn member_email(actor: &Actor) -> &str {
    if actor.verified {
        &actor.email
    } else {
        ""
    }
}
