//! Manifests in both formats: what they mean, and every way they can be wrong named by field.

use std::time::Duration;

use macula_workloads::*;
use proptest::prelude::*;

const PAYLOAD: &str = r#"
kind: payload
name: api-server
realm: com.myapp
replicas: 3
runtime: process
command: [my-server, --verbose]
args: [--color=never]
env: {LOG_LEVEL: info}
role: developer
resources: {cpu: 500m, memory: 256Mi, pids: 64}
ports:
  - {name: http}
  - {name: admin, port: 9090}
health:
  liveness: {http: {path: /healthz, port: http}, period: 5s, timeout: 1s, failure_threshold: 2}
  readiness: {tcp: {port: admin}}
restart: {policy: always, backoff: {initial: 500ms, max: 1m}}
placement: {labels: {disk: ssd}, region: eu-west, spread: false}
update: {strategy: rolling, max_surge: 2, max_unavailable: 1}
duplicate_tolerant: true
"#;

fn errors(text: &str) -> ManifestError {
    match parse(text) {
        Ok(m) => panic!("accepted: {m:?}"),
        Err(e) => e,
    }
}

#[test]
fn a_payload_means_what_it_says() {
    let Manifest::Payload(p) = parse(PAYLOAD).unwrap() else {
        panic!("not a payload")
    };
    let w = &p.workload;
    assert_eq!(
        (w.name.as_str(), w.realm.as_deref()),
        ("api-server", Some("com.myapp"))
    );
    assert_eq!(w.runtime, Runtime::Process);
    assert_eq!(
        w.artifact,
        Artifact::Command(vec!["my-server".into(), "--verbose".into()])
    );
    assert_eq!(w.args, ["--color=never"]);
    assert_eq!(w.env["LOG_LEVEL"], "info");
    assert_eq!(w.role, "developer");
    assert_eq!(
        w.resources,
        Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            pids: 64
        }
    );
    assert_eq!(
        w.ports[0],
        Port {
            name: "http".into(),
            port: None
        }
    );
    assert_eq!(w.ports[1].port, Some(9090));
    let live = w.liveness.as_ref().unwrap();
    assert_eq!(
        live.check,
        Check::Http {
            path: "/healthz".into(),
            port: PortRef::Named("http".into())
        }
    );
    assert_eq!(
        (live.period, live.failure_threshold),
        (Duration::from_secs(5), 2)
    );
    assert_eq!(
        w.readiness.as_ref().unwrap().check,
        Check::Tcp {
            port: PortRef::Named("admin".into())
        }
    );
    assert_eq!(w.restart.policy, RestartPolicy::Always);
    assert_eq!(w.restart.backoff_initial, Duration::from_millis(500));
    assert_eq!(w.restart.backoff_max, Duration::from_secs(60));
    assert_eq!(w.placement.labels["disk"], "ssd");
    assert!(!w.placement.spread);
    assert_eq!(
        (p.replicas, p.update.max_surge, p.update.max_unavailable),
        (3, 2, 1)
    );
    assert!(p.duplicate_tolerant);
}

#[test]
fn defaults_are_those_documented() {
    let Manifest::Payload(p) =
        parse("kind: payload\nname: tiny\ncommand: [sleep, '1000']\n").unwrap()
    else {
        panic!()
    };
    assert_eq!(p.replicas, 1);
    assert_eq!(p.workload.role, "service_account");
    assert_eq!(p.workload.resources, Resources::default());
    assert_eq!(p.workload.restart.policy, RestartPolicy::Always);
    assert!(p.workload.placement.spread && !p.duplicate_tolerant);
    assert_eq!((p.update.max_surge, p.update.max_unavailable), (1, 0));
    let Manifest::Job(j) = parse("kind: job\nname: once\nimage: alpine:3\n").unwrap() else {
        panic!()
    };
    assert_eq!(j.workload.runtime, Runtime::Podman);
    assert_eq!((j.completions, j.parallelism, j.backoff_limit), (1, 1, 6));
    assert_eq!(j.workload.restart.policy, RestartPolicy::OnFailure);
}

#[test]
fn every_problem_is_named_by_its_field() {
    let e = errors(
        r#"
kind: payload
name: Bad_Name
runtime: process
command: []
env: {PORT: "1", "9lives": x}
resources: {cpu: lots, memory: 1Ki, pids: 0}
ports: [{name: http, port: 0}, {name: http}]
health:
  liveness: {http: {port: nope}, period: 1s, timeout: 2s}
  readiness: {}
restart: {policy: sometimes, backoff: {initial: 10s, max: 1s}}
update: {strategy: recreate, max_surge: 0, max_unavailable: 0}
completions: 3
"#,
    );
    for path in [
        "name",
        "command",
        "env.PORT",
        "env.9lives",
        "resources.cpu",
        "resources.memory",
        "resources.pids",
        "ports[0].port",
        "ports[1].name",
        "health.liveness.http.port",
        "health.liveness.timeout",
        "health.readiness",
        "restart.policy",
        "restart.backoff.max",
        "update.strategy",
        "update",
        "completions",
    ] {
        assert!(e.has(path), "no error at {path}:\n{e}");
    }
    // The message says what to write.
    let text = e.to_string();
    assert!(
        text.contains("resources.cpu: \"lots\" is not a CPU amount"),
        "{text}"
    );
    assert!(
        text.contains("no port is named \"nope\" (the ports are: http, http)"),
        "{text}"
    );
}

#[test]
fn unknown_fields_and_wrong_types_are_refused_with_their_path() {
    let e = errors("kind: payload\nname: x\ncommand: [a]\nresources: {gpu: 1}\n");
    assert_eq!(e.errors[0].path, "resources.gpu");
    assert!(e.errors[0].message.contains("unknown field `gpu`"), "{e}");
    let e = errors("kind: payload\nname: x\ncommand: [a]\nreplicas: many\n");
    assert_eq!(e.errors[0].path, "replicas", "{e}");
    let e = errors("kind: payload\nname: x\ncommand: [a]\nreplicas: 5000\n");
    assert!(e.has("replicas"), "{e}");
    let e = errors("kind: service\nname: x\ncommand: [a]\n");
    assert!(e.has("kind"), "{e}");
    let e = errors("kind: payload\nname: x\nruntime: wasm\ncommand: [a]\n");
    assert!(
        e.to_string().contains("runtime: \"wasm\" is not a runtime"),
        "{e}"
    );
    let e = errors("kind: payload\nname: x\nimage: nginx\nruntime: process\n");
    assert!(e.has("image"), "{e}");
}

#[test]
fn a_job_refuses_what_only_payloads_have_and_checks_its_own() {
    let e = errors(
        "kind: job\nname: j\ncommand: [a]\nreplicas: 2\nduplicate_tolerant: true\ncompletions: 2\nparallelism: 3\nrestart: {policy: always}\nactive_deadline: never\n",
    );
    for path in [
        "replicas",
        "duplicate_tolerant",
        "parallelism",
        "restart.policy",
        "active_deadline",
    ] {
        assert!(e.has(path), "no error at {path}:\n{e}");
    }
    let Manifest::Job(j) = parse(
        "kind: job\nname: j\ncommand: [a]\ncompletions: 10\nparallelism: 2\nbackoff_limit: 1\nactive_deadline: 10m\nrestart: {policy: never}\n",
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!((j.completions, j.parallelism, j.backoff_limit), (10, 2, 1));
    assert_eq!(j.active_deadline, Some(Duration::from_secs(600)));
    assert_eq!(j.workload.restart.policy, RestartPolicy::Never);
}

/// A Deployment as `kubectl apply` sends it: with the fields kubectl and the API server add.
const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: com.example.demo
  labels: {app: web}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
  creationTimestamp: null
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  progressDeadlineSeconds: 600
  revisionHistoryLimit: 10
  template:
    metadata: {labels: {app: web}, creationTimestamp: null}
    spec:
      nodeSelector: {zone: a}
      terminationGracePeriodSeconds: 30
      containers:
        - name: web
          image: docker.io/library/nginx:1.27
          imagePullPolicy: IfNotPresent
          args: [nginx, -g, daemon off;]
          env: [{name: MODE, value: prod}]
          resources:
            limits: {cpu: "1", memory: 128Mi}
            requests: {cpu: 100m, memory: 64Mi}
          ports: [{containerPort: 80, name: http, protocol: TCP}]
          livenessProbe:
            httpGet: {path: /, port: http}
            periodSeconds: 20
            timeoutSeconds: 2
          readinessProbe:
            tcpSocket: {port: 80}
status: {}
"#;

#[test]
fn a_kubernetes_deployment_is_a_payload() {
    let Manifest::Payload(p) = parse(DEPLOYMENT).unwrap() else {
        panic!("not a payload")
    };
    let w = &p.workload;
    assert_eq!(
        (w.name.as_str(), w.realm.as_deref()),
        ("web", Some("com.example.demo"))
    );
    assert_eq!(w.runtime, Runtime::Podman);
    assert_eq!(
        w.artifact,
        Artifact::Image {
            image: "docker.io/library/nginx:1.27".into(),
            command: None
        }
    );
    assert_eq!(w.args, ["nginx", "-g", "daemon off;"]);
    assert_eq!(w.env["MODE"], "prod");
    // Limits, not requests.
    assert_eq!(
        (w.resources.cpu_millis, w.resources.memory_bytes),
        (1000, 128 << 20)
    );
    assert_eq!(
        w.ports,
        [Port {
            name: "http".into(),
            port: Some(80)
        }]
    );
    let live = w.liveness.as_ref().unwrap();
    assert_eq!(live.period, Duration::from_secs(20));
    assert_eq!(
        w.readiness.as_ref().unwrap().check,
        Check::Tcp {
            port: PortRef::Number(80)
        }
    );
    assert_eq!(w.placement.labels["zone"], "a");
    assert_eq!(
        (p.replicas, p.update.max_surge, p.update.max_unavailable),
        (2, 1, 0)
    );
}

#[test]
fn a_kubernetes_job_is_a_job_and_may_run_natively() {
    let Manifest::Job(j) = parse(
        r#"
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  annotations: {macula.io/runtime: process}
spec:
  completions: 10
  parallelism: 3
  backoffLimit: 2
  activeDeadlineSeconds: 120
  template:
    spec:
      restartPolicy: Never
      containers:
        - {name: m, image: ignored, command: [./migrate], args: [--all]}
"#,
    )
    .unwrap() else {
        panic!("not a job")
    };
    assert_eq!(j.workload.runtime, Runtime::Process);
    assert_eq!(
        j.workload.artifact,
        Artifact::Command(vec!["./migrate".into(), "--all".into()])
    );
    assert_eq!((j.completions, j.parallelism, j.backoff_limit), (10, 3, 2));
    assert_eq!(j.active_deadline, Some(Duration::from_secs(120)));
    assert_eq!(j.workload.restart.policy, RestartPolicy::Never);
}

#[test]
fn kubernetes_errors_name_the_kubernetes_field() {
    let bad_memory = DEPLOYMENT.replace("memory: 128Mi", "memory: lots");
    let e = errors(&bad_memory);
    assert!(
        e.has("spec.template.spec.containers[0].resources.limits.memory"),
        "{e}"
    );
    let secret_env = DEPLOYMENT.replace(
        "env: [{name: MODE, value: prod}]",
        "env: [{name: MODE, valueFrom: {secretKeyRef: {name: s, key: k}}}]",
    );
    let e = errors(&secret_env);
    assert!(
        e.errors[0]
            .path
            .starts_with("spec.template.spec.containers[0].env[0]")
            && e.errors[0].message.contains("valueFrom"),
        "{e}"
    );
    let e = errors(&DEPLOYMENT.replace("name: web\n  namespace", "name: Web\n  namespace"));
    assert!(e.has("metadata.name"), "{e}");
    let e = errors(&DEPLOYMENT.replace("kind: Deployment", "kind: StatefulSet"));
    assert!(
        e.to_string()
            .contains("apps/v1 StatefulSet is not accepted"),
        "{e}"
    );
    let e = errors(&DEPLOYMENT.replace(
        "      containers:\n",
        "      hostNetwork: true\n      containers:\n",
    ));
    assert!(
        e.errors[0].path == "spec.template.spec.hostNetwork"
            && e.errors[0].message.contains("unknown field `hostNetwork`"),
        "{e}"
    );
    let two = DEPLOYMENT.replace(
        "      containers:\n",
        "      containers:\n        - {name: side, image: busybox}\n",
    );
    assert!(errors(&two).has("spec.template.spec.containers"));
    let e = errors(&DEPLOYMENT.replace("periodSeconds: 20", "periodSeconds: 1"));
    assert!(
        e.has("spec.template.spec.containers[0].livenessProbe.timeoutSeconds"),
        "{e}"
    );
    let e = errors(&DEPLOYMENT.replace("  replicas: 2\n", "  replicas: 2\n  completions: 3\n"));
    assert!(e.has("spec.completions"), "{e}");
    let e = errors(&DEPLOYMENT.replace("protocol: TCP", "protocol: UDP"));
    assert!(
        e.has("spec.template.spec.containers[0].ports[0].protocol"),
        "{e}"
    );
}

#[test]
fn what_is_not_a_manifest_is_refused_plainly() {
    assert!(errors("").to_string().contains("mapping"));
    assert!(errors("- a\n- b\n").to_string().contains("mapping"));
    assert!(errors("kind: [unclosed").to_string().contains("not YAML"));
    let huge = format!(
        "kind: payload\nname: x\ncommand: [a]\nargs: [{}]\n",
        "aa,".repeat(100_000)
    );
    assert!(errors(&huge).to_string().contains("bytes; at most"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the text, parsing answers (a manifest or errors) and never panics.
    #[test]
    fn any_text_is_answered(text in "\\PC{0,400}") {
        let _ = parse(&text);
    }

    /// A valid manifest with one line changed is still answered without a panic, and every
    /// error it gets names a field or the document.
    #[test]
    fn a_damaged_manifest_is_answered(line in 0usize..24, junk in "[ -~]{0,40}", k8s: bool) {
        let base = if k8s { DEPLOYMENT } else { PAYLOAD };
        let mut lines: Vec<&str> = base.lines().collect();
        let i = line % lines.len();
        lines[i] = &junk;
        let text = lines.join("\n");
        if let Err(e) = parse(&text) {
            prop_assert!(!e.errors.is_empty());
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
