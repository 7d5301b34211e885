//! What many requests share: pages of listings, idempotent retries.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    /// The stored answer to an earlier request with the same idempotency key, if any (409 if
    /// that request was a different one).
    pub(crate) async fn replay<T: serde::de::DeserializeOwned>(
        &self,
        c: &mut AnyConnection,
        actor: &Actor,
        i: &Idempotency,
    ) -> ApiResult<Option<(StatusCode, T)>> {
        let row = sqlx::query(
            "SELECT request_hash, status, body FROM idempotency WHERE account_id = $1 AND key = $2",
        )
        .bind(&actor.account_id)
        .bind(&i.key)
        .fetch_optional(&mut *c)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = row.try_get("request_hash")?;
        if hash != i.request_hash {
            return Err(ApiError::conflict(
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request",
            ));
        }
        let status: i64 = row.try_get("status")?;
        let body: String = row.try_get("body")?;
        Ok(Some((
            StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK),
            serde_json::from_str(&body).map_err(ApiError::internal)?,
        )))
    }

    /// Stores the response to an idempotent request, in the request's transaction (a racing
    /// twin fails at commit on the primary key).
    pub(crate) fn remember(
        &self,
        tx: &mut WriteTx,
        actor: &Actor,
        i: &Idempotency,
        status: StatusCode,
        body: &impl Serialize,
    ) {
        let now = now_secs() as i64;
        tx.defer(
            "DELETE FROM idempotency WHERE created_at < $1",
            vec![(now - 86_400).into()],
        );
        tx.defer(
            "INSERT INTO idempotency (account_id, key, request_hash, status, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            vec![
                (&actor.account_id).into(),
                (&i.key).into(),
                (&i.request_hash).into(),
                (status.as_u16() as i64).into(),
                serde_json::to_string(body).unwrap_or_default().into(),
                now.into(),
            ],
        );
    }
}

/// A page of a list: `limit` items after `cursor`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of a list; `next_cursor` is null on the last page.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The OpenAPI schemas of the lists the API answers with, one concrete type per item type.
///
/// Why not `body = List<Realm>` in the routes: utoipa expands a generic schema into
/// `String::from(<T as ToSchema>::name().as_ref())`, which stops compiling as soon as a crate in
/// the dependency graph adds another `AsRef` for `Cow<str>` (typed-path does, through the Hub's
/// tough and zip). Each type keeps the name utoipa gives the generic one (`List_Realm`), so the
/// document is the same; the handlers still return `List<T>`, which serializes identically.
macro_rules! list_schemas {
    ($($name:ident = $as:ident($item:ty)),* $(,)?) => {
        $(
            #[derive(utoipa::ToSchema)]
            #[schema(as = $as)]
            #[allow(dead_code)]
            pub struct $name {
                pub items: Vec<$item>,
                pub next_cursor: Option<String>,
            }
        )*
    };
}

list_schemas!(
    RealmList = List_Realm(crate::realms::types::Realm),
    MemberList = List_Member(crate::realms::types::Member),
    PolicyVersionList = List_PolicyVersion(crate::realms::types::PolicyVersion),
    KeyList = List_Key(crate::realms::types::Key),
    AuditEntryList = List_AuditEntry(crate::realms::types::AuditEntry),
    ClaimList = List_Claim(crate::realms::types::Claim),
);

impl Page {
    pub(crate) fn limit(&self) -> i64 {
        self.limit.unwrap_or(50).clamp(1, 500)
    }
    /// The cursor is the hex of the last sort key of the previous page.
    pub(crate) fn after(&self) -> ApiResult<String> {
        match &self.cursor {
            None => Ok(String::new()),
            Some(c) => hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad_cursor),
        }
    }

    /// For lists newest first by a numeric id: the id to stay below (all when no cursor).
    pub(crate) fn below(&self) -> ApiResult<i64> {
        match self.after()?.as_str() {
            "" => Ok(i64::MAX),
            s => s.parse().map_err(|_| bad_cursor()),
        }
    }
}

pub(crate) fn bad_cursor() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
        "the cursor is not one this API returned; start again without it",
    )
}

pub(crate) fn page_of<T>(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> List<T> {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next = if more {
        items.last().map(|v| hex::encode(key(v)))
    } else {
        None
    };
    List {
        items,
        next_cursor: next,
    }
}

/// A whole list, in one page.
pub(crate) fn all_of<T>(items: Vec<T>) -> List<T> {
    List {
        items,
        next_cursor: None,
    }
}

/// An idempotent request's identity: the client's key and a hash of what it asked.
pub struct Idempotency {
    pub key: String,
    pub request_hash: String,
}

impl Idempotency {
    pub fn new(key: &str, request: &impl Serialize) -> ApiResult<Idempotency> {
        if key.is_empty() || key.len() > 200 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 200 characters",
            ));
        }
        let body = serde_json::to_string(request).map_err(ApiError::internal)?;
        Ok(Idempotency {
            key: key.to_owned(),
            request_hash: sha256_hex(&body),
        })
    }
}
