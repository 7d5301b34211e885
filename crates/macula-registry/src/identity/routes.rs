//! Routes of accounts, sessions and email ownership.

#[allow(unused_imports)]
use crate::http::*;
use crate::identity::types::*;

/// Sign up.
///
/// Creates an account and mails a verification code to its address. Until the address is
/// verified, invitations to it and operator status configured for it do not apply.
#[utoipa::path(post, path = "/v1/accounts", tag = "identity",
    request_body = Credentials,
    responses((status = 201, body = NewAccount, description = "The account; `verification` says whether the code was mailed."), (status = 409, response = ErrorBody), (status = 413, response = ErrorBody), (status = 422, response = ErrorBody), (status = 429, response = ErrorBody)))]
pub(crate) async fn signup(
    State(reg): Reg,
    Remote(remote, ip): Remote,
    Body(c): Body<Credentials>,
) -> ApiResult<(StatusCode, Json<NewAccount>)> {
    let v = reg.signup(&c.email, &c.password, &remote, ip).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Log in.
///
/// Answers a session token. Repeated failures lock the (account, source) pair out for a while
/// (429 with `Retry-After`).
#[utoipa::path(post, path = "/v1/sessions", tag = "identity",
    request_body = Credentials,
    responses((status = 201, body = Session, description = "The session."), (status = 401, response = ErrorBody), (status = 422, response = ErrorBody), (status = 429, response = ErrorBody)))]
pub(crate) async fn login(
    State(reg): Reg,
    Remote(remote, ip): Remote,
    Body(c): Body<Credentials>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    let client = c.client.unwrap_or_else(|| "api".into());
    let v = reg
        .login(&c.email, &c.password, &client, ip, &remote)
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Log out: the session's token stops working.
#[utoipa::path(delete, path = "/v1/sessions/current", tag = "identity",
    security(("session" = [])),
    responses((status = 204, description = "Logged out."), (status = 401, response = ErrorBody)))]
pub(crate) async fn logout(
    State(reg): Reg,
    headers: HeaderMap,
    actor: Actor,
) -> ApiResult<StatusCode> {
    reg.logout(bearer(&headers)?, &actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Verify an address with the code mailed to it.
///
/// Needs no session: the code is the proof. After a change of address, this is when the
/// account's address changes.
#[utoipa::path(post, path = "/v1/account/verify", tag = "identity",
    request_body = VerifyCode,
    responses((status = 200, body = VerifiedEmail, description = "The account, its address verified."), (status = 409, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn verify_email(
    State(reg): Reg,
    Remote(remote, _): Remote,
    Body(b): Body<VerifyCode>,
) -> ApiResult<Json<VerifiedEmail>> {
    Ok(Json(reg.verify_email(&b.code, &remote).await?))
}

/// Mail a new verification code to the account's address.
#[utoipa::path(post, path = "/v1/account/verification", tag = "identity",
    security(("session" = [])),
    responses((status = 202, body = Verification, description = "Whether the code was mailed."), (status = 401, response = ErrorBody), (status = 409, response = ErrorBody), (status = 429, response = ErrorBody)))]
pub(crate) async fn resend_verification(
    State(reg): Reg,
    actor: Actor,
) -> ApiResult<(StatusCode, Json<Verification>)> {
    let v = reg.resend_verification(&actor).await?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

/// Change the account's address.
///
/// Needs the password. A code goes to the new address; the change happens when it is verified.
#[utoipa::path(put, path = "/v1/account/email", tag = "identity",
    security(("session" = [])),
    request_body = EmailChange,
    responses((status = 202, body = PendingEmail, description = "The change under way."), (status = 400, response = ErrorBody), (status = 401, response = ErrorBody), (status = 409, response = ErrorBody), (status = 429, response = ErrorBody)))]
pub(crate) async fn change_email(
    State(reg): Reg,
    actor: Actor,
    Body(b): Body<EmailChange>,
) -> ApiResult<(StatusCode, Json<PendingEmail>)> {
    let v = reg.change_email(&actor, &b.email, &b.password).await?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

/// The signed-in account.
#[utoipa::path(get, path = "/v1/account", tag = "identity",
    security(("session" = [])),
    responses((status = 200, body = Account, description = "The account."), (status = 401, response = ErrorBody)))]
pub(crate) async fn whoami(State(reg): Reg, actor: Actor) -> Json<Account> {
    Json(reg.whoami(&actor))
}
