//! Routes of billing: plans, usage, add-ons, invoices.

#[allow(unused_imports)]
use crate::http::*;

pub(crate) async fn plans(State(reg): Reg) -> Json<Value> {
    Json(serde_json::json!({
        "tiers": reg.config.prices.tiers,
        "addons": reg.config.prices.addons,
        "rules": {
            "rounding": "each line is computed exactly and rounded half up to the cent; the total is the sum of the lines",
            "gib": "1 GiB = 2^30 bytes of egress (bytes written to the realm's clients)",
            "plan_changes": "upgrades apply at once and the whole month is billed at the new plan; downgrades apply on the first of next month",
            "hard_quota": "the Hobby plan refuses operations past its allowance until the month ends; paid plans bill overage",
            "addons": "an add-on is billed in full for every month in which it was active",
        },
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageQuery {
    #[serde(default)]
    pub(crate) period: Option<String>,
    #[serde(default)]
    pub(crate) from: Option<String>,
    #[serde(default)]
    pub(crate) to: Option<String>,
    #[serde(default)]
    pub(crate) format: Option<String>,
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
    Ok(Json(serde_json::json!({"realm": realm, "period": period, "items": rows})).into_response())
}

pub(crate) async fn usage_month(
    State(reg): Reg,
    Remote(remote, _): Remote,
    headers: HeaderMap,
    Path((realm, month)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let month = crate::billing::parse_month(&month)?;
    let actor = viewer(&reg, &headers, remote).await?;
    Ok(Json(reg.usage_month(&actor, &realm, month).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanReq {
    pub(crate) tier: String,
}

pub(crate) async fn set_plan(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(b): Body<PlanReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.set_plan(&actor, &realm, &b.tier).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddonReq {
    pub(crate) feature: String,
    #[serde(default = "yes")]
    pub(crate) active: bool,
}

pub(crate) fn yes() -> bool {
    true
}

pub(crate) async fn set_addon(
    State(reg): Reg,
    actor: Actor,
    Path(realm): Path<String>,
    Body(b): Body<AddonReq>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        reg.set_addon(&actor, &realm, &b.feature, b.active).await?,
    ))
}

pub(crate) async fn invoices(State(reg): Reg, actor: Actor) -> ApiResult<Json<Value>> {
    Ok(Json(reg.list_invoices(&actor).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InvoiceQuery {
    #[serde(default)]
    pub(crate) format: Option<String>,
}

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

pub(crate) async fn pay_invoice(
    State(reg): Reg,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.pay_invoice(&actor, &id).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunReq {
    #[serde(default)]
    pub(crate) month: Option<String>,
}

pub(crate) async fn run_invoices(
    State(reg): Reg,
    actor: Actor,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    Registry::operator_only(&actor)?;
    let r = optional_body::<RunReq>(&body)?.unwrap_or_default();
    let month = crate::billing::parse_month(r.month.as_deref().unwrap_or("previous"))?;
    Ok(Json(reg.run_invoices(month, None).await?))
}

pub(crate) async fn void_invoice(
    State(reg): Reg,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.void_invoice(&actor, &id).await?))
}
