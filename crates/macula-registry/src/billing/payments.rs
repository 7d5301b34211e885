//! Payments: the provider interface and paying an invoice (claimed first, so two payments
//! cannot both charge).

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Pays an open invoice through the payment provider (the account's owner).
    pub async fn pay_invoice(&self, actor: &Actor, id: &str) -> ApiResult<Payment> {
        let row = self.invoice_row(actor, id).await?;
        let status: String = row.try_get("status")?;
        let total: i64 = row.try_get("total_cents")?;
        let acct: String = row.try_get("account_id")?;
        if status != "open" {
            return Err(ApiError::conflict(
                "invoice_not_open",
                format!("invoice {id} is {status}; only an open invoice can be paid"),
            ));
        }
        // The invoice is claimed before the provider is asked, so that two payments racing
        // cannot both charge.
        let claimed =
            sqlx::query("UPDATE invoices SET status = 'paying' WHERE id = $1 AND status = 'open'")
                .bind(id)
                .execute(&self.db.pool)
                .await?
                .rows_affected();
        if claimed == 0 {
            return Err(ApiError::conflict(
                "invoice_not_open",
                format!("invoice {id} is being paid, was paid or was voided meanwhile"),
            ));
        }
        let reference = match self.payments.charge(id, total) {
            Ok(r) => r,
            Err(e) => {
                sqlx::query(
                    "UPDATE invoices SET status = 'open' WHERE id = $1 AND status = 'paying'",
                )
                .bind(id)
                .execute(&self.db.pool)
                .await?;
                return Err(ApiError::new(
                    axum::http::StatusCode::PAYMENT_REQUIRED,
                    "payment_failed",
                    e,
                ));
            }
        };
        let now = now_secs() as i64;
        let mut tx = self.change(actor).await?;
        sqlx::query(
            "UPDATE invoices SET status = 'paid', paid_at = $1 WHERE id = $2 AND status = 'paying'",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let pid = macula_common::ids::random_id("pay_", 8);
        sqlx::query("INSERT INTO payments (id, invoice_id, provider, reference, amount_cents, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&pid)
            .bind(id)
            .bind(self.payments.name())
            .bind(&reference)
            .bind(total)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let entries = ledger_entries(
            &format!("payment:{pid}"),
            "payment",
            id,
            &[
                (format!("cash:{}", self.payments.name()), total),
                (format!("receivable:{acct}"), -total),
            ],
        )?;
        insert_rows(&mut tx, LEDGER_INSERT, 6, entries).await?;
        tx.audit(
            "invoice.pay",
            json!({"invoice": id, "payment": pid, "amount_cents": total}),
        );
        tx.commit().await?;
        Ok(Payment {
            invoice: id.to_owned(),
            payment: pid,
            provider: self.payments.name().to_owned(),
            reference,
            amount_cents: total,
            status: "paid".into(),
        })
    }
}

/// Takes payment for an invoice. Implementations talk to a payment provider; the one built in
/// records the payment without moving money.
pub trait PaymentProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Charges `amount_cents` for `invoice`; returns the provider's reference.
    fn charge(&self, invoice: &str, amount_cents: i64) -> Result<String, String>;
}

/// Records payments against invoices; no card is charged.
pub struct RecordingProvider;

impl PaymentProvider for RecordingProvider {
    fn name(&self) -> &'static str {
        "recorded"
    }
    fn charge(&self, _invoice: &str, _amount_cents: i64) -> Result<String, String> {
        Ok(macula_common::ids::random_id("rec_", 8))
    }
}
