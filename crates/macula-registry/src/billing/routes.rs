//! Routes of billing: plans, usage, add-ons, invoices.

use crate::billing::types::*;
#[allow(unused_imports)]
use crate::http::*;

/// The plans (Hobby, Starter, Professional, Enterprise), premium add-ons and billing rules.
#[utoipa::path(get, path = "/v1/plans", tag = "billing",
    responses((status = 200, body = Plans, description = "The price list (`registry.prices`).")))]
pub(crate) async fn plans(State(reg): Reg) -> Json<Plans> {
    let rule = |s: &str| s.to_owned();
    Json(Plans {
        tiers: reg.config.prices.tiers.clone(),
        addons: reg.config.prices.addons.clone(),
        rules: PlanRules {
            rounding: rule("each line is computed exactly and rounded half up to the cent; the total is the sum of the lines"),
            gib: rule("1 GiB = 2^30 bytes of egress (bytes written to the realm's clients)"),
            plan_changes: rule("upgrades apply at once and the whole month is billed at the new plan; downgrades apply on the first of next month"),
            hard_quota: rule("the Hobby plan refuses operations past its allowance until the month ends; paid plans bill overage"),
            addons: rule("an add-on is billed in full for every month in which it was active"),
        },
    })
}

/// A time given as Unix seconds, `YYYY-MM` (that month's start) or `YYYY-MM-DD`.
pub(crate) fn parse_time(s: &str) -> ApiResult<i64> {
    if let Ok(v) = s.parse::<i64>() {
        return Ok(v);
    }
    if let (10, Some(m), Some(d)) = (s.len(), s.get(..7), s.get(8..)) {
        let month = crate::billing::parse_month(m)?;
        let day: i64 = d.parse().map_err(|_| {
            ApiError::invalid(
                "invalid_time",
                format!("{s:?}: write YYYY-MM-DD, YYYY-MM or Unix seconds"),
            )
        })?;
        if !(1..=31).contains(&day) {
            return Err(ApiError::invalid(
                "invalid_time",
                format!("{s:?}: no such day"),
            ));
        }
        return Ok(month + (day - 1) * 86_400);
    }
    crate::billing::parse_month(s)
}

/// A usage reader: `Authorization: Bearer mcs_...` (a session) or `Bearer sk_live_...` (the
/// realm's admin API key).
pub(crate) async fn viewer(
    reg: &Registry,
    parts_headers: &HeaderMap,
    remote: String,
) -> ApiResult<crate::billing::Viewer> {
    let v = parts_headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| t.starts_with("mcs_") || t.starts_with("sk_"))
        .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <session token> (macula login) or Bearer <the realm's admin API key>"))?;
    reg.viewer(v, remote).await
}

/// A realm's usage per hour, day or month.
///
/// Operations by kind, bytes in, egress, call latency p50/p95, as JSON or CSV
/// (`?format=csv`). Readable with a session (a member) or the realm's admin API key.
#[utoipa::path(get, path = "/v1/realms/{realm}/usage", tag = "billing",
    security(("session" = []), ("realm_key" = [])),
    params(RealmParam, UsageQuery),
    responses((status = 200, body = Usage, description = "The periods, oldest first.",
            content_type = "application/json"),
        (status = 200, description = "With `?format=csv`: one line per period.", content_type = "text/csv"),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn usage(
    State(reg): Reg,
    Remote(remote, _): Remote,
    headers: HeaderMap,
    Path(realm): Path<String>,
    Q(q): Q<UsageQuery>,
) -> ApiResult<Response> {
    let period = q.period.as_deref().unwrap_or("day");
    let now = macula_common::time::now_secs() as i64;
    let to =
        q.to.as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or(now + 1);
    let from = match q.from.as_deref() {
        Some(f) => parse_time(f)?,
        None => crate::billing::month_start(now),
    };
    let actor = viewer(&reg, &headers, remote).await?;
    let rows = reg.usage(&actor, &realm, period, from, to).await?;
    if q.format.as_deref() == Some("csv") {
        let mut out = String::from("realm,period,start,publish,subscribe,call,register,dht,ops_total,bytes_in,egress_bytes,latency_p50_ms,latency_p95_ms\n");
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        for r in &rows {
            out.push_str(&format!(
                "{realm},{period},{},{},{},{},{},{},{},{},{},{},{}\n",
                r.start,
                r.ops.get("publish").unwrap_or(&0),
                r.ops.get("subscribe").unwrap_or(&0),
                r.ops.get("call").unwrap_or(&0),
                r.ops.get("register").unwrap_or(&0),
                r.ops.get("dht").unwrap_or(&0),
                r.ops_total,
                r.bytes_in,
                r.egress_bytes,
                ms(r.latency_p50_ms),
                ms(r.latency_p95_ms),
            ));
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response());
    }
    Ok(Json(Usage {
        realm,
        period: period.to_owned(),
        items: rows,
    })
    .into_response())
}

/// A realm's month: usage, plan, allowance used, charges so far, quota notices.
#[utoipa::path(get, path = "/v1/realms/{realm}/usage/{month}", tag = "billing",
    security(("session" = []), ("realm_key" = [])),
    params(RealmParam, ("month" = String, Path, description = "`YYYY-MM`, `current` or `previous`.")),
    responses((status = 200, body = UsageMonth, description = "The month."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn usage_month(
    State(reg): Reg,
    Remote(remote, _): Remote,
    headers: HeaderMap,
    Path((realm, month)): Path<(String, String)>,
) -> ApiResult<Json<UsageMonth>> {
    let month = crate::billing::parse_month(&month)?;
    let actor = viewer(&reg, &headers, remote).await?;
    Ok(Json(reg.usage_month(&actor, &realm, month).await?))
}

/// Change the realm's plan (owner).
///
/// Upgrades apply at once and bill the whole month at the new plan; downgrades apply on the
/// first of next month.
#[utoipa::path(post, path = "/v1/realms/{realm}/plan", tag = "billing", security(("session" = [])),
    params(RealmParam),
    request_body = PlanRequest,
    responses((status = 200, body = PlanChange, description = "The plan now, and any scheduled change."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn set_plan(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(b): Body<PlanRequest>,
) -> ApiResult<Json<PlanChange>> {
    Ok(Json(reg.set_plan(&actor, &realm, &b.tier).await?))
}

/// Turn a premium add-on on or off for the realm (owner).
#[utoipa::path(post, path = "/v1/realms/{realm}/addons", tag = "billing", security(("session" = [])),
    params(RealmParam),
    request_body = AddonRequest,
    responses((status = 200, body = Addon, description = "The add-on's state."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn set_addon(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(b): Body<AddonRequest>,
) -> ApiResult<Json<Addon>> {
    Ok(Json(
        reg.set_addon(&actor, &realm, &b.feature, b.active).await?,
    ))
}

/// The caller's invoices, newest first; the current month's draft is brought up to date first.
#[utoipa::path(get, path = "/v1/invoices", tag = "billing", security(("session" = [])),
    responses((status = 200, body = Invoices, description = "The invoices."),
        (status = 401, response = ErrorBody)))]
pub(crate) async fn invoices(State(reg): Reg, actor: Actor) -> ApiResult<Json<Invoices>> {
    Ok(Json(reg.list_invoices(&actor).await?))
}

/// One invoice as JSON, or as an HTML document (`?format=html` or `Accept: text/html`).
#[utoipa::path(get, path = "/v1/invoices/{invoice}", tag = "billing", security(("session" = [])),
    params(("invoice" = String, Path, description = "The invoice's id (`inv_...`)."), InvoiceQuery),
    responses((status = 200, body = Invoice, description = "The invoice.", content_type = "application/json"),
        (status = 200, description = "As HTML.", content_type = "text/html"),
        (status = 401, response = ErrorBody), (status = 404, response = ErrorBody),
        (status = 422, response = ErrorBody)))]
pub(crate) async fn invoice(
    State(reg): Reg,
    actor: Actor,
    headers: HeaderMap,
    Path(id): Path<String>,
    Q(q): Q<InvoiceQuery>,
) -> ApiResult<Response> {
    let inv = reg.show_invoice(&actor, &id).await?;
    let html = q.format.as_deref() == Some("html")
        || (q.format.is_none()
            && headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.starts_with("text/html")));
    if html {
        return Ok((
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::billing::invoice_html(&inv),
        )
            .into_response());
    }
    Ok(Json(inv).into_response())
}

/// Pay an open invoice through the payment provider (the built-in one records the payment; no
/// card is charged).
#[utoipa::path(post, path = "/v1/invoices/{invoice}/pay", tag = "billing", security(("session" = [])),
    params(("invoice" = String, Path, description = "The invoice's id (`inv_...`).")),
    responses((status = 200, body = Payment, description = "The payment."),
        (status = 401, response = ErrorBody), (status = 402, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody)))]
pub(crate) async fn pay_invoice(
    State(reg): Reg,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<Json<Payment>> {
    Ok(Json(reg.pay_invoice(&actor, &id).await?))
}

/// Build the invoices of a month for every account (operators).
///
/// Drafts while the month runs, open once it ended. Runs by itself an hour after each month
/// ends.
#[utoipa::path(post, path = "/v1/admin/invoices/run", tag = "operators", security(("session" = [])),
    request_body(content = Option<RunRequest>, description = "May be left out: the previous month."),
    responses((status = 200, body = InvoiceRun, description = "What the run did."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 409, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn run_invoices(
    State(reg): Reg,
    actor: Actor,
    body: axum::body::Bytes,
) -> ApiResult<Json<InvoiceRun>> {
    Registry::operator_only(&actor)?;
    let r = optional_body::<RunRequest>(&body)?.unwrap_or_default();
    let month = crate::billing::parse_month(r.month.as_deref().unwrap_or("previous"))?;
    Ok(Json(reg.run_invoices(month, None).await?))
}

/// Void a draft or open invoice (operators); its ledger entries are reversed.
#[utoipa::path(post, path = "/v1/admin/invoices/{invoice}/void", tag = "operators", security(("session" = [])),
    params(("invoice" = String, Path, description = "The invoice's id (`inv_...`).")),
    responses((status = 200, body = Voided, description = "Voided."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody)))]
pub(crate) async fn void_invoice(
    State(reg): Reg,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<Json<Voided>> {
    Ok(Json(reg.void_invoice(&actor, &id).await?))
}
