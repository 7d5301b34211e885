//! One change by one actor: the one way a service writes.
//!
//! Every change the registry makes on someone's behalf has the same frame: a write transaction
//! is opened, the actor is checked against the realm (or the platform), the change's rows are
//! written, its audit entry is appended in the same transaction, the transaction commits, and —
//! if the change alters what nodes enforce — the realm's newest state is handed to the node
//! (`materialize`). [`Registry::change`] and [`Registry::change_in`] open that frame; the
//! service function writes its rows through the [`Change`] (it derefs to the transaction's
//! connection), then calls [`Change::audit`] and [`Change::commit`]. A change dropped without
//! a commit rolls back, audit entry included. Reads in a realm go through [`Registry::read_in`].

#[allow(unused_imports)]
use crate::prelude::*;

/// Who must the actor be for a change in a realm.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Needs<'a> {
    /// A role that grants `realm:<action>` (the owner always may).
    Action(&'a str),
    /// The realm's owner; `what` ends the refusal: "only the owner of X may <what>".
    Owner(&'a str),
    /// A platform operator (`registry.operators`).
    Operator,
    /// Anyone signed in; the service checks what else authorizes the change (a transfer code).
    Anyone,
}

/// What [`Registry::change_in`] found: the realm as read in the change's transaction, the
/// actor's access to it and its newest policy.
pub(crate) struct InRealm {
    pub row: RealmRow,
    pub access: Access,
    pub doc: PolicyDoc,
}

/// An open change (see the module's documentation). Derefs to its transaction's connection, so
/// queries run on it as on any connection (`.execute(&mut *tx)`).
pub(crate) struct Change<'r> {
    reg: &'r Registry,
    actor: &'r Actor,
    tx: WriteTx,
    realm: Option<String>,
    publish: bool,
}

impl Registry {
    /// Opens a change by `actor` that belongs to no realm (account-level), or to a realm the
    /// caller has already authorized (see [`Change::in_realm`]).
    pub(crate) async fn change<'r>(&'r self, actor: &'r Actor) -> ApiResult<Change<'r>> {
        Ok(Change {
            reg: self,
            actor,
            tx: self.db.begin().await?,
            realm: None,
            publish: false,
        })
    }

    /// Opens a change by `actor` in realm `name`, after checking that `actor` is who `needs`
    /// asks for. The realm is read in the change's transaction.
    pub(crate) async fn change_in<'r>(
        &'r self,
        actor: &'r Actor,
        name: &str,
        needs: Needs<'_>,
    ) -> ApiResult<(Change<'r>, InRealm)> {
        if let Needs::Operator = needs {
            Self::operator_only(actor)?;
        }
        let mut change = self.change(actor).await?.in_realm(name);
        let found = match needs {
            Needs::Action(action) => {
                let (row, access, doc) = self.authorize(&mut change, name, actor, action).await?;
                InRealm { row, access, doc }
            }
            Needs::Owner(what) => {
                let (row, doc) = self.authorize_owner(&mut change, name, actor, what).await?;
                InRealm {
                    row,
                    access: Access::Owner,
                    doc,
                }
            }
            Needs::Operator | Needs::Anyone => {
                let row = self.realm(&mut change, name).await?;
                let doc = self.policy_doc(&row)?;
                let access = match needs {
                    Needs::Operator => Access::Operator,
                    _ => Access::Stranger,
                };
                InRealm { row, access, doc }
            }
        };
        Ok((change, found))
    }

    /// A read in realm `name` by `actor`, who needs `realm:read` (any member, the owner, an
    /// operator): a pooled connection and what it found.
    pub(crate) async fn read_in(
        &self,
        actor: &Actor,
        name: &str,
    ) -> ApiResult<(sqlx::pool::PoolConnection<sqlx::Any>, InRealm)> {
        let mut c = self.db.pool.acquire().await?;
        let (row, access, doc) = self.authorize(&mut c, name, actor, READ).await?;
        Ok((c, InRealm { row, access, doc }))
    }
}

impl<'r> Change<'r> {
    /// The change's audit entries name `realm`, and [`Change::publish`] hands `realm` to the node.
    pub(crate) fn in_realm(mut self, realm: &str) -> Self {
        self.realm = Some(realm.to_owned());
        self
    }

    /// Appends the change's audit entry (in its transaction: it commits with the change or not
    /// at all).
    pub(crate) fn audit(&mut self, action: &str, detail: Value) {
        self.actor
            .audit(&mut self.tx, self.realm.as_deref(), action, detail);
    }

    /// The change alters what nodes enforce: after the commit the realm's newest state is
    /// written to the node's config directory (and from there flooded to the mesh).
    pub(crate) fn publish(&mut self) {
        self.publish = true;
    }

    /// Stores `doc` as the realm's next policy version (authored by the actor), to be
    /// published after the commit.
    pub(crate) async fn put_policy(&mut self, doc: PolicyDoc) -> ApiResult<PolicyDoc> {
        let realm = self.realm.clone().unwrap_or_default();
        let doc = self
            .reg
            .put_policy(&mut self.tx, &realm, doc, &self.actor.email)
            .await?;
        self.publish = true;
        Ok(doc)
    }

    /// Writes the realm's next policy version if its plan's limits changed (after a change of
    /// tier), to be published with the change.
    pub(crate) async fn refresh_plan_limits(&mut self) -> ApiResult<()> {
        let realm = self.realm.clone().unwrap_or_default();
        if self
            .reg
            .refresh_plan_limits(&mut self.tx, &realm, &self.actor.email)
            .await?
        {
            self.publish = true;
        }
        Ok(())
    }

    /// Records the change's response under the request's idempotency key, in its transaction
    /// (a retry gets the same response; see `requests.rs`).
    pub(crate) fn remember(
        &mut self,
        idem: &Idempotency,
        status: StatusCode,
        body: &impl Serialize,
    ) {
        self.reg
            .remember(&mut self.tx, self.actor, idem, status, body);
    }

    /// The transaction itself (for statements queued with [`WriteTx::defer`]).
    pub(crate) fn tx(&mut self) -> &mut WriteTx {
        &mut self.tx
    }

    /// The row of the change's realm as it now stands in the transaction.
    pub(crate) async fn reread(&mut self) -> ApiResult<RealmRow> {
        let name = self.realm.clone().unwrap_or_default();
        self.reg.realm(&mut self.tx, &name).await
    }

    /// Commits, then publishes if asked to.
    pub(crate) async fn commit(self) -> ApiResult<()> {
        self.commit_or(|e| e.into()).await
    }

    /// [`Change::commit`], where a unique violation at commit (a racing writer won) is the
    /// conflict `code`.
    pub(crate) async fn commit_unique(self, code: &'static str, message: &str) -> ApiResult<()> {
        self.commit_or(|e| {
            if is_unique_violation(&e) {
                ApiError::conflict(code, message)
            } else {
                e.into()
            }
        })
        .await
    }

    async fn commit_or(self, error: impl FnOnce(sqlx::Error) -> ApiError) -> ApiResult<()> {
        let Change {
            reg,
            tx,
            realm,
            publish,
            ..
        } = self;
        tx.commit().await.map_err(error)?;
        match (realm, publish) {
            (Some(realm), true) => reg.materialize(&realm).await,
            _ => Ok(()),
        }
    }
}

impl std::ops::Deref for Change<'_> {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Change<'_> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}
