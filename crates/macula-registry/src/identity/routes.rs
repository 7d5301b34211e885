//! Routes of accounts, sessions and email ownership.

#[allow(unused_imports)]
use crate::http::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Credentials {
    pub(crate) email: String,
    pub(crate) password: String,
    #[serde(default)]
    pub(crate) client: Option<String>,
}

pub(crate) async fn signup(
    State(reg): Reg,
    Remote(remote, ip): Remote,
    Body(c): Body<Credentials>,
) -> ApiResult<Response> {
    let v = reg.signup(&c.email, &c.password, &remote, ip).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub(crate) async fn login(
    State(reg): Reg,
    Remote(remote, ip): Remote,
    Body(c): Body<Credentials>,
) -> ApiResult<Response> {
    let client = c.client.unwrap_or_else(|| "api".into());
    let v = reg
        .login(&c.email, &c.password, &client, ip, &remote)
        .await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub(crate) async fn logout(
    State(reg): Reg,
    headers: HeaderMap,
    actor: Actor,
) -> ApiResult<StatusCode> {
    reg.logout(bearer(&headers)?, &actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyBody {
    pub(crate) code: String,
}

pub(crate) async fn verify_email(
    State(reg): Reg,
    Remote(remote, _): Remote,
    Body(b): Body<VerifyBody>,
) -> ApiResult<Json<Value>> {
    Ok(Json(reg.verify_email(&b.code, &remote).await?))
}

pub(crate) async fn resend_verification(State(reg): Reg, actor: Actor) -> ApiResult<Response> {
    let v = reg.resend_verification(&actor).await?;
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmailChange {
    pub(crate) email: String,
    pub(crate) password: String,
}

pub(crate) async fn change_email(
    State(reg): Reg,
    actor: Actor,
    Body(b): Body<EmailChange>,
) -> ApiResult<Response> {
    let v = reg.change_email(&actor, &b.email, &b.password).await?;
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

pub(crate) async fn whoami(State(reg): Reg, actor: Actor) -> Json<Value> {
    Json(reg.whoami(&actor))
}
