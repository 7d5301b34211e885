//! `macula realms ...` against a registry.

#[allow(unused_imports)]
use super::*;

pub fn realms(api: &Api, cmd: crate::local::RealmsCmd, json: bool) -> Result<()> {
    use crate::local::RealmsCmd;
    let out = |v: &Value, human: &dyn Fn(&Value)| emit(json, v, human);
    match cmd {
        RealmsCmd::List { .. } => {
            let realms = api.all("/v1/realms")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&realms)?);
            } else {
                print_realms(&realms);
            }
        }
        RealmsCmd::Create {
            name, owner, tier, ..
        } => {
            let v = api.send(
                "POST",
                "/v1/realms",
                Some(&json!({"name": name, "owner_email": owner, "tier": tier})),
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "Registered {} (owner {}, tier {}, expires {}).\nGet a key: macula keys create --realm {} --role admin --name first",
                    s(&v["name"]), s(&v["owner"]), s(&v["tier"]), s(&v["expires_at"]), s(&v["name"])
                )
            });
        }
        RealmsCmd::Show { name, .. } => {
            let v = api.send("GET", &format!("/v1/realms/{}", seg(&name)), None, true)?;
            out(&v, &print_realm);
        }
        RealmsCmd::Delete { name, yes, .. } => {
            if !yes {
                if !std::io::stdin().is_terminal() {
                    bail!("deleting {name} needs --yes when there is no terminal to confirm on");
                }
                eprint!("Delete realm {name}? Its keys stop working on every node. Type the name to confirm: ");
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != name {
                    bail!("not confirmed; nothing was deleted");
                }
            }
            api.send("DELETE", &format!("/v1/realms/{}", seg(&name)), None, true)?;
            out(&json!({"deleted": name}), &|_| println!("Deleted {name}."));
        }
        RealmsCmd::Renew { name, years, .. } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/renew", seg(&name)),
                Some(&json!({"years": years})),
                true,
            )?;
            out(&v, &|v| {
                println!("Renewed {} until {}.", s(&v["name"]), s(&v["expires_at"]))
            });
        }
        RealmsCmd::Transfer {
            name, code: None, ..
        } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/transfer-code", seg(&name)),
                None,
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "Transfer code for {name} (valid until {}; shown once):\n\n  {}\n\nThe new owner runs: macula realms transfer {name} --code {}\n(a transfer fee of ${}.{:02} is recorded against their account)",
                    s(&v["expires_at"]),
                    s(&v["code"]),
                    s(&v["code"]),
                    v["fee_cents"].as_i64().unwrap_or(0) / 100,
                    v["fee_cents"].as_i64().unwrap_or(0) % 100
                )
            });
        }
        RealmsCmd::Transfer {
            name,
            code: Some(code),
            ..
        } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/transfer", seg(&name)),
                Some(&json!({"code": code})),
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "You now own {} (fee {} cents recorded).",
                    s(&v["name"]),
                    v["fee_cents"]
                )
            });
        }
        RealmsCmd::Plan { name, tier, .. } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/plan", seg(&name)),
                Some(&json!({"tier": tier})),
                true,
            )?;
            out(&v, &|v| match v["scheduled"].as_object() {
                Some(sch) => println!(
                    "{name} stays on {} until {}, then moves to {}",
                    s(&v["tier"]),
                    sch["effective_at"].as_str().unwrap_or(""),
                    sch["tier"].as_str().unwrap_or("")
                ),
                None => println!("{name} is now on the {} plan", s(&v["tier"])),
            });
        }
        RealmsCmd::Addon {
            name, feature, off, ..
        } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/addons", seg(&name)),
                Some(&json!({"feature": feature, "active": !off})),
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "{} is {} for {name} (${:.2}/month)",
                    s(&v["title"]),
                    if off { "off" } else { "on" },
                    v["monthly_cents"].as_i64().unwrap_or(0) as f64 / 100.0
                )
            });
        }
        RealmsCmd::Policy {
            name,
            verified_roles,
            nodes,
            ..
        } => {
            let path = format!("/v1/realms/{}/policy", seg(&name));
            let v = api.send("GET", &path, None, true)?;
            let mut doc: macula_router::policy::PolicyDoc =
                serde_json::from_value(v).map_err(|e| {
                    anyhow::anyhow!("the registry sent a policy this CLI cannot read: {e}")
                })?;
            let v = if crate::local::change_policy(&mut doc, verified_roles, nodes.as_deref()) {
                api.send(
                    "PUT",
                    &path,
                    Some(&json!({
                        "roles": doc.roles,
                        "topic_acls": doc.topic_acls,
                        "nodes": nodes.is_some().then_some(&doc.nodes),
                        "verified_roles": verified_roles.map(|_| doc.verified_roles),
                        "expected_version": doc.version,
                    })),
                    true,
                )?
            } else {
                serde_json::to_value(&doc)?
            };
            out(&v, &|v| match serde_json::from_value(v.clone()) {
                Ok(doc) => crate::local::print_policy(&doc),
                Err(_) => println!("{v}"),
            });
        }
        RealmsCmd::Acl {
            name,
            add_user,
            role,
            remove_user,
            ..
        } => {
            if let (Some(email), Some(role)) = (&add_user, &role) {
                let v = api.send(
                    "POST",
                    &format!("/v1/realms/{}/members", seg(&name)),
                    Some(&json!({"email": email, "role": role})),
                    true,
                )?;
                out(&v, &|v| {
                    println!(
                        "{} is {} in {} (policy version {}).",
                        s(&v["email"]),
                        s(&v["role"]),
                        name,
                        v["policy_version"]
                    )
                });
            } else if let Some(email) = &remove_user {
                api.send(
                    "DELETE",
                    &format!("/v1/realms/{}/members/{}", seg(&name), seg(email)),
                    None,
                    true,
                )?;
                out(&json!({"removed": email}), &|_| {
                    println!("Removed {email} from {name}.")
                });
            } else {
                let v = api.send(
                    "GET",
                    &format!("/v1/realms/{}/members", seg(&name)),
                    None,
                    true,
                )?;
                out(&v, &|v| {
                    println!("{:<40} ROLE", "MEMBER");
                    for m in v["items"].as_array().into_iter().flatten() {
                        println!("{:<40} {}", s(&m["email"]), s(&m["role"]));
                    }
                });
            }
        }
    }
    Ok(())
}

pub fn print_realms(realms: &[Value]) {
    if realms.is_empty() {
        println!("No realms. Register one with `macula realms create com.example.app`.");
        return;
    }
    println!(
        "{:<32} {:<10} {:<9} {:<13} {:<22} OWNER",
        "REALM", "STATUS", "ACCESS", "TIER", "EXPIRES"
    );
    for r in realms {
        println!(
            "{:<32} {:<10} {:<9} {:<13} {:<22} {}",
            s(&r["name"]),
            s(&r["status"]),
            s(&r["access"]),
            s(&r["tier"]),
            s(&r["expires_at"]),
            s(&r["owner"])
        );
    }
}

pub fn print_realm(r: &Value) {
    for (label, key) in [
        ("realm", "name"),
        ("status", "status"),
        ("owner", "owner"),
        ("your access", "access"),
        ("tier", "tier"),
        ("created", "created_at"),
        ("expires", "expires_at"),
        ("grace ends", "grace_ends_at"),
        ("policy version", "policy_version"),
        ("active keys", "active_keys"),
        ("members", "members"),
    ] {
        let v = &r[key];
        if !v.is_null() {
            println!(
                "  {label:<15} {}",
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            );
        }
    }
    if let Some(why) = r["suspended_reason"].as_str() {
        println!("  {:<15} {why}", "suspended for");
    }
    if r["frozen"].as_bool() == Some(true) {
        println!("  {:<15} {}", "frozen", s(&r["frozen_reason"]));
    }
    if let Some(n) = r["live"]["sessions_on_this_node"].as_u64() {
        println!("  {:<15} {n}", "live sessions");
    }
}
