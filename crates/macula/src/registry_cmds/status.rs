//! `macula status`: a realm at a glance.

#[allow(unused_imports)]
use super::*;

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: Server,
    /// The realm [default: your only realm].
    #[arg(long)]
    pub realm: Option<String>,
}

/// `macula status --realm R`: the realm's registry record and its live sessions on the node.
pub fn status(a: StatusArgs, json: bool) -> Result<()> {
    let api = Api::new(&a.server)?;
    let realm = pick_realm(&api, a.realm)?;
    let v: Realm = api.get("GET", &format!("/v1/realms/{}", seg(&realm)))?;
    emit(json, &v, print_realm);
    Ok(())
}
