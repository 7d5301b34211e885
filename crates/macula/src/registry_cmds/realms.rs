//! `macula realms ...` against a registry.

#[allow(unused_imports)]
use super::*;

pub fn realms(api: &Api, cmd: crate::local::RealmsCmd, json: bool) -> Result<()> {
    use crate::local::RealmsCmd;
    match cmd {
        RealmsCmd::List { .. } => {
            let realms: Vec<Realm> = api.all("/v1/realms")?;
            emit_list(json, &realms, print_realms)?;
        }
        RealmsCmd::Create {
            name, owner, tier, ..
        } => {
            let v: Realm = api.call(
                "POST",
                "/v1/realms",
                &NewRealm {
                    name,
                    owner_email: owner,
                    tier,
                },
            )?;
            emit(json, &v, |v| {
                println!(
                    "Registered {} (owner {}, tier {}, expires {}).\nGet a key: macula keys create --realm {} --role admin --name first",
                    v.name, v.owner, v.tier, v.expires_at, v.name
                )
            });
        }
        RealmsCmd::Show { name, .. } => {
            let v: Realm = api.get("GET", &format!("/v1/realms/{}", seg(&name)))?;
            emit(json, &v, print_realm);
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
            emit(json, &json!({"deleted": name}), |_| {
                println!("Deleted {name}.")
            });
        }
        RealmsCmd::Renew { name, years, .. } => {
            let v: Realm = api.call(
                "POST",
                &format!("/v1/realms/{}/renew", seg(&name)),
                &Renew { years },
            )?;
            emit(json, &v, |v| {
                println!("Renewed {} until {}.", v.name, v.expires_at)
            });
        }
        RealmsCmd::Transfer {
            name, code: None, ..
        } => {
            let v: TransferCode =
                api.get("POST", &format!("/v1/realms/{}/transfer-code", seg(&name)))?;
            emit(json, &v, |v| {
                println!(
                    "Transfer code for {name} (valid until {}; shown once):\n\n  {}\n\nThe new owner runs: macula realms transfer {name} --code {}\n(a transfer fee of ${}.{:02} is recorded against their account)",
                    v.expires_at,
                    v.code,
                    v.code,
                    v.fee_cents / 100,
                    v.fee_cents % 100
                )
            });
        }
        RealmsCmd::Transfer {
            name,
            code: Some(code),
            ..
        } => {
            let v: Realm = api.call(
                "POST",
                &format!("/v1/realms/{}/transfer", seg(&name)),
                &TransferRequest { code },
            )?;
            emit(json, &v, |v| {
                println!(
                    "You now own {} (fee {} cents recorded).",
                    v.name,
                    v.fee_cents.unwrap_or(0)
                )
            });
        }
        RealmsCmd::Plan { name, tier, .. } => {
            let v: PlanChange = api.call(
                "POST",
                &format!("/v1/realms/{}/plan", seg(&name)),
                &PlanRequest { tier },
            )?;
            emit(json, &v, |v| match &v.scheduled {
                Some(sch) => println!(
                    "{name} stays on {} until {}, then moves to {}",
                    v.tier, sch.effective_at, sch.tier
                ),
                None => println!("{name} is now on the {} plan", v.tier),
            });
        }
        RealmsCmd::Addon {
            name, feature, off, ..
        } => {
            let v: Addon = api.call(
                "POST",
                &format!("/v1/realms/{}/addons", seg(&name)),
                &AddonRequest {
                    feature,
                    active: !off,
                },
            )?;
            emit(json, &v, |v| {
                println!(
                    "{} is {} for {name} (${:.2}/month)",
                    v.title,
                    if off { "off" } else { "on" },
                    v.monthly_cents as f64 / 100.0
                )
            });
        }
        RealmsCmd::Policy {
            name,
            verified_roles,
            nodes,
            packages,
            ..
        } => {
            let path = format!("/v1/realms/{}/policy", seg(&name));
            let mut doc: macula_router::policy::PolicyDoc = api.get("GET", &path)?;
            let doc = if crate::local::change_policy(
                &mut doc,
                verified_roles,
                nodes.as_deref(),
                &packages,
            )? {
                api.call(
                    "PUT",
                    &path,
                    &PolicyUpdate {
                        nodes: nodes.is_some().then(|| doc.nodes.clone()),
                        verified_roles: verified_roles.map(|_| doc.verified_roles),
                        packages: packages.any().then(|| doc.packages.clone()),
                        expected_version: Some(doc.version as i64),
                        roles: doc.roles,
                        topic_acls: doc.topic_acls,
                    },
                )?
            } else {
                doc
            };
            emit(json, &doc, crate::local::print_policy);
        }
        RealmsCmd::Acl {
            name,
            add_user,
            role,
            remove_user,
            ..
        } => {
            if let (Some(email), Some(role)) = (add_user, role) {
                let v: MemberSet = api.call(
                    "POST",
                    &format!("/v1/realms/{}/members", seg(&name)),
                    &MemberRequest { email, role },
                )?;
                emit(json, &v, |v| {
                    println!(
                        "{} is {} in {} (policy version {}).",
                        v.email, v.role, name, v.policy_version
                    )
                });
            } else if let Some(email) = &remove_user {
                api.send(
                    "DELETE",
                    &format!("/v1/realms/{}/members/{}", seg(&name), seg(email)),
                    None,
                    true,
                )?;
                emit(json, &json!({"removed": email}), |_| {
                    println!("Removed {email} from {name}.")
                });
            } else {
                let v: List<Member> =
                    api.get("GET", &format!("/v1/realms/{}/members", seg(&name)))?;
                emit(json, &v, |v| {
                    let mut t = table(&["MEMBER", "ROLE"]);
                    for m in &v.items {
                        t.add_row([m.email.as_str(), &m.role]);
                    }
                    println!("{}", t.trim_fmt());
                });
            }
        }
    }
    Ok(())
}

pub fn print_realms(realms: &[Realm]) {
    if realms.is_empty() {
        println!("No realms. Register one with `macula realms create com.example.app`.");
        return;
    }
    let mut t = table(&["REALM", "STATUS", "ACCESS", "TIER", "EXPIRES", "OWNER"]);
    for r in realms {
        t.add_row([
            r.name.as_str(),
            &r.status,
            or_dash(&r.access),
            &r.tier,
            &r.expires_at,
            &r.owner,
        ]);
    }
    println!("{}", t.trim_fmt());
}

pub fn print_realm(r: &Realm) {
    let line = |label: &str, v: &str| println!("  {label:<15} {v}");
    line("realm", &r.name);
    line("status", &r.status);
    line("owner", &r.owner);
    if let Some(a) = &r.access {
        line("your access", a);
    }
    line("tier", &r.tier);
    line("created", &r.created_at);
    line("expires", &r.expires_at);
    line("grace ends", &r.grace_ends_at);
    line("policy version", &r.policy_version.to_string());
    if let Some(n) = r.active_keys {
        line("active keys", &n.to_string());
    }
    if let Some(n) = r.members {
        line("members", &n.to_string());
    }
    if let Some(why) = &r.suspended_reason {
        line("suspended for", why);
    }
    if r.frozen {
        line("frozen", or_dash(&r.frozen_reason));
    }
    if let Some(live) = &r.live {
        line("live sessions", &live.sessions_on_this_node.to_string());
    }
}
