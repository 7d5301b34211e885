//! kubectl (Debian's `kubernetes-client`) against a node's Kubernetes-style API: `apply` a
//! Deployment, `get` it and its pods, `scale` it, `logs -f` a pod, `apply` a change, `delete`
//! it; a Deployment with no runtime annotation runs its containers in Podman (where it can run);
//! a Job runs to completion; another realm's key sees nothing. SKIPPED where kubectl is
//! not installed (`.ci/run` installs it).

use std::path::Path;
use std::time::Duration;

use macula_node::ConfDir;

mod common;

use common::*;

const REALM: &str = "com.example.kube";

/// kubectl against the node at `http` (over TLS: kubectl sends a token over TLS only) with
/// `token`, in namespace `ns`.
fn kubectl_cmd(home: &Path, http: &str, token: &str, ns: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("kubectl");
    c.args(["--server", &format!("https://{http}"), "--token", token])
        .args(["--namespace", ns, "--certificate-authority"])
        .arg(home.join("ca.pem"))
        .env("HOME", home)
        .env("KUBECONFIG", home.join("kubeconfig"));
    c
}

/// `kubectl ARGS`: (success, stdout, stderr).
async fn kubectl(
    home: &Path,
    http: &str,
    token: &str,
    ns: &str,
    args: &[&str],
) -> (bool, String, String) {
    let out = kubectl_cmd(home, http, token, ns)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn have_kubectl() -> bool {
    std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_scales_follows_and_deletes_a_deployment() {
    if !have_kubectl() {
        eprintln!("SKIPPED: kubectl is not installed (apt install kubernetes-client)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let homes: Vec<_> = (1..=3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let c1 = ConfDir::new(&homes[0]);
    c1.init().unwrap();
    c1.create_realm(REALM, None).unwrap();
    c1.create_realm("com.example.other", None).unwrap();
    let (_, admin) = c1.issue_key(REALM, "admin", "test", 3600, None).unwrap();
    let (_, other) = c1
        .issue_key("com.example.other", "admin", "test", 3600, None)
        .unwrap();
    // An image for the container part (where containers can run).
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let containers = match work::containers_unavailable() {
        Some(why) => Err(why),
        None => work::busybox_image(&images, "localhost/kube-web:1").map(drop),
    };
    // A certificate for the nodes' HTTP listeners.
    let kube_home = tmp.path().join("kube");
    std::fs::create_dir_all(&kube_home).unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(kube_home.join("ca.pem"), cert.cert.pem()).unwrap();
    std::fs::write(tmp.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    for d in &homes {
        std::fs::create_dir_all(d.join("trust")).unwrap();
        if d != &homes[0] {
            for f in ["trust/operator.pub", "trust/operator.key"] {
                std::fs::copy(homes[0].join(f), d.join(f)).unwrap();
            }
        }
        std::fs::write(
            d.join("node.yaml"),
            format!(
                "workloads:\n  require_limits: false\n  require_sandbox: false\n  lease_term_ms: 2000\n\
                 \x20 images: [{}]\n\
                 tls:\n  cert: {}\n  key: {}\n",
                images.display(),
                kube_home.join("ca.pem").display(),
                tmp.path().join("key.pem").display()
            ),
        )
        .unwrap();
    }
    let first = start_node(&homes[0], None);
    let _others: Vec<_> = homes[1..]
        .iter()
        .map(|h| start_node(h, Some(&first.mesh)))
        .collect();
    eventually("the nodes to link", Duration::from_secs(20), || async {
        let v = mesh_status(&first.http).await;
        (v["peers"].as_array().map_or(0, Vec::len) >= 2).then_some(())
    })
    .await;
    let k = |args: Vec<String>| {
        let (home, http, admin) = (kube_home.clone(), first.http.clone(), admin.clone());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kubectl(&home, &http, &admin, REALM, &args).await
        }
    };
    let s = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let deployment = |replicas: u32, greeting: &str| {
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
  annotations:
    macula.io/runtime: process
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: hello}}
  template:
    metadata:
      labels: {{app: hello}}
    spec:
      containers:
        - name: hello
          image: unused
          command: [sh, -c, 'while true; do echo "{greeting} from $MACULA_REPLICA"; sleep 0.3; done']
"#
        )
    };
    let file = tmp.path().join("hello.yaml");
    std::fs::write(&file, deployment(2, "hello")).unwrap();
    let path = file.display().to_string();
    let (ok, out, err) = k(s(&["apply", "-f", &path])).await;
    assert!(ok, "apply: {out}{err}");
    assert!(out.contains("deployment.apps/hello created"), "{out}");

    // get: the Deployment's columns, and its pods once they run.
    let got = eventually("2 ready replicas", Duration::from_secs(30), || async {
        let (ok, out, _) = k(s(&["get", "deployments"])).await;
        (ok && out.contains("hello") && out.contains("2/2")).then_some(out)
    })
    .await;
    assert!(got.contains("READY") && got.contains("UP-TO-DATE"), "{got}");
    let (ok, pods, err) = k(s(&["get", "pods", "-l", "app=hello"])).await;
    assert!(ok, "{err}");
    assert!(
        pods.contains("hello-0") && pods.contains("hello-1") && pods.contains("Running"),
        "{pods}"
    );
    let (ok, json, _) = k(s(&["get", "deployment", "hello", "-o", "json"])).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["metadata"]["namespace"], REALM);
    assert_eq!(v["status"]["readyReplicas"], 2, "{v}");

    // logs -f of a pod: its lines stream until we stop reading.
    let mut follow = kubectl_cmd(&kube_home, &first.http, &admin, REALM)
        .args(["logs", "-f", "hello-1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    let mut seen = 0;
    while seen < 5 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("the stream goes on");
        assert_eq!(line, "hello from 1");
        seen += 1;
    }
    drop(follow);

    // scale, then apply a change (a rolling update), then delete.
    let (ok, out, err) = k(s(&["scale", "deployment", "hello", "--replicas", "3"])).await;
    assert!(ok, "scale: {out}{err}");
    eventually("3 ready replicas", Duration::from_secs(30), || async {
        let (_, out, _) = k(s(&["get", "deployments"])).await;
        out.contains("3/3").then_some(())
    })
    .await;
    std::fs::write(&file, deployment(3, "hi")).unwrap();
    let (ok, out, err) = k(s(&["apply", "-f", &path])).await;
    assert!(ok, "apply a change: {out}{err}");
    assert!(out.contains("deployment.apps/hello configured"), "{out}");
    eventually(
        "the new version everywhere",
        Duration::from_secs(40),
        || async {
            let (_, out, _) = k(s(&["logs", "hello-2"])).await;
            let (_, d, _) = k(s(&["get", "deployment", "hello", "-o", "json"])).await;
            let v: serde_json::Value = serde_json::from_str(&d).ok()?;
            (out.contains("hi from 2")
                && v["status"]["updatedReplicas"] == 3
                && v["status"]["replicas"] == 3)
                .then_some(())
        },
    )
    .await;
    // The scale survived the apply (kubectl's patch leaves replicas as they are? it sets 3 in
    // the file anyway): 3 replicas.
    let (_, d, _) = k(s(&["get", "deployment", "hello", "-o", "json"])).await;
    let v: serde_json::Value = serde_json::from_str(&d).unwrap();
    assert_eq!(v["spec"]["replicas"], 3, "{v}");
    assert_eq!(
        v["spec"]["template"]["spec"]["containers"][0]["name"],
        "hello"
    );

    // Another realm's key: its namespace is its own; this one is refused.
    let (ok, out, err) = kubectl(
        &kube_home,
        &first.http,
        &other,
        REALM,
        &["get", "deployments"],
    )
    .await;
    assert!(
        !ok && (err.contains("Forbidden") || err.contains("forbidden")),
        "{ok} {out} {err}"
    );
    let (ok, out, _) = kubectl(
        &kube_home,
        &first.http,
        &other,
        "com.example.other",
        &["get", "deployments"],
    )
    .await;
    assert!(ok && !out.contains("hello"), "{out}");

    let (ok, out, err) = k(s(&["delete", "deployment", "hello"])).await;
    assert!(ok, "delete: {out}{err}");
    assert!(out.contains("deleted"), "{out}");
    eventually("no pods", Duration::from_secs(20), || async {
        let (_, out, err) = k(s(&["get", "pods"])).await;
        (out.trim().is_empty() && err.contains("No resources")).then_some(())
    })
    .await;
    let (ok, _, err) = k(s(&["get", "deployment", "hello"])).await;
    assert!(
        !ok && err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );

    // A Deployment as Kubernetes writes it (no runtime annotation): its containers run in
    // Podman, from the image archive in the nodes' images directory.
    match &containers {
        Err(why) => eprintln!("SKIPPED (the container part): {why}"),
        Ok(()) => {
            let web = tmp.path().join("web.yaml");
            std::fs::write(
                &web,
                r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: localhost/kube-web:1
          command: [sh, -c, 'cat /etc/macula-image; echo "web $MACULA_REPLICA"; exec sleep 600']
          resources:
            limits: {cpu: 200m, memory: 64Mi}
"#,
            )
            .unwrap();
            let (ok, out, err) = k(s(&["apply", "-f", &web.display().to_string()])).await;
            assert!(ok, "apply: {out}{err}");
            eventually("2 containers ready", Duration::from_secs(40), || async {
                let (_, out, _) = k(s(&["get", "deployments", "web"])).await;
                out.contains("2/2").then_some(())
            })
            .await;
            let (ok, pods, err) = k(s(&["get", "pods", "-l", "app=web"])).await;
            assert!(ok, "{err}");
            assert!(pods.contains("web-0") && pods.contains("web-1"), "{pods}");
            // One by name: the same columns as the list.
            let (ok, pod, err) = k(s(&["get", "pod", "web-0"])).await;
            assert!(
                ok && pod.contains("READY") && pod.contains("Running"),
                "{pod}{err}"
            );
            let logs = eventually("a container's output", Duration::from_secs(20), || async {
                let (_, out, _) = k(s(&["logs", "web-1"])).await;
                out.contains("web 1").then_some(out)
            })
            .await;
            assert_eq!(
                logs.lines().next(),
                Some("yes"),
                "from inside the image: {logs}"
            );
            let (ok, out, err) = k(s(&["delete", "deployment", "web"])).await;
            assert!(ok, "delete: {out}{err}");
        }
    }

    // A Job: runs to completion.
    let job = tmp.path().join("job.yaml");
    std::fs::write(
        &job,
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: count
  annotations: {macula.io/runtime: process}
spec:
  completions: 3
  parallelism: 2
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: count
          image: unused
          command: [sh, -c, 'echo counted $MACULA_REPLICA']
"#,
    )
    .unwrap();
    let (ok, out, err) = k(s(&["apply", "-f", &job.display().to_string()])).await;
    assert!(ok, "{out}{err}");
    eventually("the job complete", Duration::from_secs(40), || async {
        let (_, out, _) = k(s(&["get", "jobs"])).await;
        (out.contains("Complete") && out.contains("3/3")).then_some(())
    })
    .await;
}
