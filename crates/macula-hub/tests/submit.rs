//! The submission gate: capabilities only within the publisher's grants, the workload within the
//! largest plan, no secret in a (public) manifest.

use macula_hub::package::parse;
use macula_hub::submit::{check, grants, Policy};

fn policy() -> Policy {
    Policy {
        capabilities: vec!["rpc:call:com.acme.*".into(), "pubsub:*".into()],
        max_instances: 10,
        max_cpu_millis: 4_000,
        max_memory_bytes: 8 << 30,
    }
}

#[test]
fn patterns_grant_what_they_say_and_no_more() {
    assert!(grants("rpc:call:com.acme.*", "rpc:call:com.acme.db.get"));
    assert!(!grants("rpc:call:com.acme.*", "rpc:call:com.other.db"));
    assert!(!grants("rpc:call:com.acme.*", "rpc:register:com.acme.db"));
    assert!(grants("pubsub:*", "pubsub:subscribe:com.acme.events"));
    assert!(grants("pubsub:*", "pubsub:publish"));
    assert!(!grants("pubsub:*", "rpc:call:x"));
    assert!(grants("realm:deploy", "realm:deploy"));
    assert!(!grants("realm:deploy", "realm:deploy:x"));
    assert!(!grants("rpc:call", "rpc:call:anything"));
}

#[test]
fn what_a_publisher_may_not_grant_or_no_plan_allows_is_refused_by_field() {
    let ok = r#"
name: acme/db
version: 1.0.0
kind: hub-package
permissions:
  planes: [workplane, dataplane]
  capabilities: ["rpc:call:com.acme.db.get", "pubsub:publish:com.acme.events"]
workload:
  kind: payload
  name: db
  replicas: 2
  command: [./db]
  resources: {cpu: 500m, memory: 1Gi}
  env: {LOG_LEVEL: info, DB_PASSWORD: ""}
"#;
    assert!(check(&parse(ok).unwrap(), &policy()).is_empty());
    let bad = ok
        .replace(
            "\"rpc:call:com.acme.db.get\", ",
            "\"rpc:call:com.acme.db.get\", \"realm:deploy\", ",
        )
        .replace("replicas: 2", "replicas: 20")
        .replace(
            "DB_PASSWORD: \"\"",
            "DB_PASSWORD: hunter2, KEY: sk_live_abc",
        );
    let e = check(&parse(&bad).unwrap(), &policy());
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "permissions.capabilities[1]",
            "workload",
            "workload.resources.cpu",
            "workload.resources.memory",
            "workload.env.DB_PASSWORD",
            "workload.env.KEY",
        ],
        "{e:#?}"
    );
    assert!(
        e[0].message.contains("\"realm:deploy\""),
        "{}",
        e[0].message
    );
    assert!(
        e[0].message.contains("rpc:call:com.acme.*"),
        "{}",
        e[0].message
    );
}
