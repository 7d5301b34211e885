//! The double-entry ledger: every invoice, payment, void and sale posts entries that sum to zero.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Posts a marketplace sale: the buyer's receivable against the author's 70 % and the
    /// platform's 30 % ([`revenue_share`]). For the marketplace to call.
    pub async fn post_sale(
        &self,
        buyer: &str,
        author: &str,
        sale_cents: i64,
        reference: &str,
    ) -> ApiResult<(i64, i64)> {
        let (to_author, to_platform) = revenue_share(sale_cents);
        let entries = ledger_entries(
            &format!("sale:{reference}"),
            "sale",
            reference,
            &[
                (format!("receivable:{buyer}"), sale_cents),
                (format!("payable:author:{author}"), -to_author),
                ("revenue:platform".into(), -to_platform),
            ],
        )?;
        let mut tx = self.db.begin().await?;
        insert_rows(&mut tx, LEDGER_INSERT, 6, entries).await?;
        tx.commit().await?;
        Ok((to_author, to_platform))
    }

    /// The balance of a ledger account (sum of its entries).
    pub async fn ledger_balance(&self, account: &str) -> ApiResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger WHERE account = $1",
        )
        .bind(account)
        .fetch_one(&self.db.pool)
        .await?)
    }
}

/// A double-entry posting: amounts of one transaction add up to zero. Accounts are named
/// `receivable:<account>`, `revenue:platform`, `cash:<provider>`, and (for the marketplace)
/// `payable:author:<account>`.
pub fn ledger_entries(
    txn: &str,
    kind: &str,
    reference: &str,
    entries: &[(String, i64)],
) -> ApiResult<Vec<Vec<Arg>>> {
    if entries.iter().map(|e| e.1).sum::<i64>() != 0 {
        return Err(ApiError::internal(format!(
            "ledger transaction {txn} does not balance"
        )));
    }
    let now = now_secs() as i64;
    Ok(entries
        .iter()
        .map(|(account, cents)| {
            vec![
                txn.into(),
                account.into(),
                (*cents).into(),
                kind.into(),
                reference.into(),
                now.into(),
            ]
        })
        .collect())
}

pub(crate) const LEDGER_INSERT: &str =
    "INSERT INTO ledger (txn, account, amount_cents, kind, ref, created_at) VALUES ";

/// `INSERT ... VALUES (...), (...)` for `rows` rows of `cols` placeholders.
pub(crate) fn values_sql(head: &str, rows: usize, cols: usize) -> String {
    let mut s = String::from(head);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!("${}", r * cols + c + 1));
        }
        s.push(')');
    }
    s
}

/// Inserts many rows with multi-row INSERTs (a few hundred rows per statement).
pub async fn insert_rows(
    c: &mut sqlx::AnyConnection,
    head: &str,
    cols: usize,
    rows: Vec<Vec<Arg>>,
) -> sqlx::Result<()> {
    let per = (30_000 / cols).clamp(1, 500);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<Arg>> = rows.by_ref().take(per).collect();
        let sql = values_sql(head, chunk.len(), cols);
        crate::db::bind_all(sqlx::query(&sql), chunk.into_iter().flatten().collect())
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}
