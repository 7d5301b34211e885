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
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/keys", seg(&realm)),
                Some(
                    &json!({"name": name, "role": role, "expires_in_days": days, "pubkey": pubkey}),
                ),
                true,
            )?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "Created key {} (realm {}, role {}, expires {}). It is shown only once:\n\n{}\n",
                    s(&v["id"]),
                    s(&v["realm"]),
                    s(&v["role"]),
                    v["expires_at"].as_str().unwrap_or("never"),
                    s(&v["key"])
                );
            }
        }
        KeysCmd::List { realm, .. } => {
            let keys = match realm {
                Some(r) => api.all(&format!("/v1/realms/{}/keys", seg(&r)))?,
                None => api.all("/v1/keys")?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print_keys(&keys);
            }
        }
        KeysCmd::Revoke { key_id, .. } => {
            let v = api.send("DELETE", &format!("/v1/keys/{}", seg(&key_id)), None, true)?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "Revoked {key_id} in realm {} at {}. Every node refuses it within seconds and closes its sessions.",
                    s(&v["realm"]),
                    s(&v["revoked_at"])
                );
            }
        }
    }
    Ok(())
}

pub fn print_keys(keys: &[Value]) {
    if keys.is_empty() {
        println!("No keys. Create one with `macula keys create --realm <realm> --name <name>`.");
        return;
    }
    println!(
        "{:<22} {:<24} {:<16} {:<22} {:<22} {:<8} NAME",
        "ID", "REALM", "ROLE", "CREATED", "EXPIRES", "STATUS"
    );
    for k in keys {
        println!(
            "{:<22} {:<24} {:<16} {:<22} {:<22} {:<8} {}",
            s(&k["id"]),
            s(&k["realm"]),
            s(&k["role"]),
            s(&k["created_at"]),
            k["expires_at"].as_str().unwrap_or("never"),
            s(&k["status"]),
            s(&k["name"])
        );
    }
}
