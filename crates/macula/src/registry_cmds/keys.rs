//! `macula keys ...` against a registry.

#[allow(unused_imports)]
use super::*;

pub fn keys(api: &Api, cmd: crate::local::KeysCmd, json: bool) -> Result<()> {
    use crate::local::KeysCmd;
    match cmd {
        KeysCmd::Create {
            realm,
            role,
            name,
            expires,
            pubkey,
            ..
        } => {
            let realm = pick_realm(api, realm)?;
            let secs = crate::local::parse_duration_secs(&expires)?;
            let days = if secs == 0 { 0 } else { secs.div_ceil(86_400) };
            let k: Key = api.call(
                "POST",
                &format!("/v1/realms/{}/keys", seg(&realm)),
                &NewKey {
                    name,
                    role,
                    expires_in_days: days,
                    pubkey,
                },
            )?;
            emit(json, &k, |k| {
                println!(
                    "Created key {} (realm {}, role {}, expires {}). It is shown only once:\n\n{}\n",
                    k.id,
                    k.realm,
                    k.role,
                    k.expires_at.as_deref().unwrap_or("never"),
                    or_dash(&k.key)
                )
            });
        }
        KeysCmd::List { realm, .. } => {
            let keys: Vec<Key> = match realm {
                Some(r) => api.all(&format!("/v1/realms/{}/keys", seg(&r)))?,
                None => api.all("/v1/keys")?,
            };
            emit_list(json, &keys, print_keys)?;
        }
        KeysCmd::Revoke { key_id, .. } => {
            let v: RevokedKey = api.get("DELETE", &format!("/v1/keys/{}", seg(&key_id)))?;
            emit(json, &v, |v| {
                println!(
                    "Revoked {key_id} in realm {} at {}. Every node refuses it within seconds and closes its sessions.",
                    v.realm, v.revoked_at
                )
            });
        }
    }
    Ok(())
}

pub fn print_keys(keys: &[Key]) {
    if keys.is_empty() {
        println!("No keys. Create one with `macula keys create --realm <realm> --name <name>`.");
        return;
    }
    let mut t = table(&[
        "ID", "REALM", "ROLE", "CREATED", "EXPIRES", "STATUS", "NAME",
    ]);
    for k in keys {
        t.add_row([
            k.id.as_str(),
            &k.realm,
            &k.role,
            &k.created_at,
            k.expires_at.as_deref().unwrap_or("never"),
            or_dash(&k.status),
            &k.name,
        ]);
    }
    println!("{}", t.trim_fmt());
}
