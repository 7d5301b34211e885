//! Client commands: pub, sub, call, serve.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use macula_client::{CallError, CallOptions, Client, ConnectOptions, Dict, Payload, Value};
use tokio::io::AsyncWriteExt;

use crate::local::{parse_duration_secs, up_key_path};
use crate::Conn;

impl Conn {
    pub(crate) fn resolve(&self) -> Result<(String, String)> {
        let realm = match &self.realm {
            Some(r) => r.clone(),
            None => std::fs::read_to_string(self.home.join("up-realm"))
                .map(|s| s.trim().to_owned())
                .map_err(|_| {
                    anyhow!(
                        "no --realm given and no `macula up` realm found in {}",
                        self.home.display()
                    )
                })?,
        };
        let key = match &self.key {
            Some(k) => k.clone(),
            None => std::fs::read_to_string(up_key_path(&self.home))
                .map(|s| s.trim().to_owned())
                .map_err(|_| {
                    anyhow!(
                        "no --key given (or MACULA_KEY) and no `macula up` key in {}",
                        self.home.display()
                    )
                })?,
        };
        Ok((realm, key))
    }

    pub async fn connect(&self, reconnect: bool) -> Result<Client> {
        let (realm, key) = self.resolve()?;
        let mut o = ConnectOptions::new(&self.url, &realm, &key);
        o.reconnect = reconnect;
        if let Some(ca) = &self.ca {
            o = o
                .with_ca_file(ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
        }
        Client::connect_with(o).await.map_err(|e| {
            let hint = crate::registry_cmds::tls_hint(&e.to_string());
            anyhow::Error::new(e).context(format!("connecting to {} realm {realm}{hint}", self.url))
        })
    }
}

/// Positional JSON: an array becomes the arguments, anything else a single argument.
fn payload(json: Option<&str>, kwargs: Option<&str>) -> Result<Payload> {
    let args = match json {
        None => vec![],
        Some(s) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::Array(a)) => a.into_iter().map(Value::from).collect(),
            Ok(v) => vec![Value::from(v)],
            Err(_) => vec![Value::Str(s.to_owned())],
        },
    };
    let kwargs = match kwargs {
        None => Dict::new(),
        Some(s) => match serde_json::from_str::<serde_json::Value>(s)
            .context("--kwargs must be a JSON object")?
        {
            serde_json::Value::Object(o) => {
                o.into_iter().map(|(k, v)| (k, Value::from(v))).collect()
            }
            _ => bail!("--kwargs must be a JSON object"),
        },
    };
    Ok(Payload::new(args, kwargs))
}

fn human(p: &Payload) -> String {
    let mut parts: Vec<String> = p
        .args
        .iter()
        .map(|v| serde_json::Value::from(v).to_string())
        .collect();
    if !p.kwargs.is_empty() {
        parts.push(serde_json::Value::from(&Value::Dict(p.kwargs.clone())).to_string());
    }
    parts.join(" ")
}

#[derive(Args)]
pub struct PubArgs {
    /// Topic URI, e.g. com.example.demo.hello
    pub topic: String,
    /// JSON payload: an array is the argument list, anything else one argument. Plain text is sent as a string.
    #[arg(value_name = "JSON")]
    pub payload: Option<String>,
    /// Keyword arguments as a JSON object.
    #[arg(long)]
    pub kwargs: Option<String>,
    /// Publish this many times (useful for quick load).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    #[command(flatten)]
    pub conn: Conn,
}

pub async fn publish(a: PubArgs, json: bool) -> Result<()> {
    let client = a.conn.connect(false).await?;
    let p = payload(a.payload.as_deref(), a.kwargs.as_deref())?;
    let mut last = None;
    for _ in 0..a.count.max(1) {
        last = client
            .publish_with(
                &a.topic,
                p.clone(),
                macula_client::dict! {"acknowledge" => true},
            )
            .await?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"topic": a.topic, "publication": last, "count": a.count.max(1)})
        );
    } else {
        println!(
            "published to {} (publication {})",
            a.topic,
            last.unwrap_or(0)
        );
    }
    client.close().await;
    Ok(())
}

#[derive(Args)]
pub struct SubArgs {
    /// Topic or pattern.
    pub pattern: String,
    /// Match policy: exact, prefix or wildcard (empty components match anything: com.acme..created).
    #[arg(long = "match", default_value = "exact")]
    pub match_policy: String,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    #[command(flatten)]
    pub conn: Conn,
}

pub async fn subscribe(a: SubArgs, json: bool) -> Result<()> {
    let client = a.conn.connect(true).await?;
    let mut options = Dict::new();
    if a.match_policy != "exact" {
        options.insert("match".into(), Value::Str(a.match_policy.clone()));
    }
    let mut sub = client.subscribe_with(&a.pattern, options).await?;
    if !json {
        eprintln!(
            "subscribed to {} ({}); Ctrl-C to stop",
            a.pattern, a.match_policy
        );
    }
    let mut n = 0;
    while let Some(e) = sub.next().await {
        let topic = e.topic.clone().unwrap_or_else(|| a.pattern.clone());
        if json {
            let mut v = e.payload.to_json();
            v["topic"] = serde_json::Value::String(topic);
            v["publication"] = serde_json::json!(e.publication);
            println!("{v}");
        } else {
            println!("{topic}  {}", human(&e.payload));
        }
        n += 1;
        if a.count.is_some_and(|c| n >= c) {
            break;
        }
    }
    client.close().await;
    Ok(())
}

#[derive(Args)]
pub struct CallArgs {
    /// Procedure URI.
    pub procedure: String,
    /// JSON arguments: an array is the argument list, anything else one argument.
    #[arg(value_name = "JSON")]
    pub payload: Option<String>,
    /// Keyword arguments as a JSON object, e.g. '{"workload": "api", "replica": 0}'.
    #[arg(long)]
    pub kwargs: Option<String>,
    /// Call timeout, e.g. 10s.
    #[arg(long, default_value = "30s")]
    pub timeout: String,
    /// Print progressive results as they arrive.
    #[arg(long)]
    pub progress: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub async fn call(a: CallArgs, json: bool) -> Result<()> {
    let client = a.conn.connect(false).await?;
    let p = payload(a.payload.as_deref(), a.kwargs.as_deref())?;
    let timeout = Duration::from_secs(parse_duration_secs(&a.timeout)?.max(1));
    let mut s = client.call_stream(
        &a.procedure,
        p,
        CallOptions {
            timeout: Some(timeout),
            receive_progress: a.progress,
            disclose_me: false,
        },
    )?;
    while let Some(answer) = s.next().await {
        let answer = answer.map_err(|e| anyhow!("{e}"))?;
        if json {
            let mut v = answer.payload.to_json();
            v["progress"] = serde_json::Value::Bool(answer.progress);
            println!("{v}");
        } else {
            println!(
                "{}{}",
                if answer.progress { "… " } else { "" },
                human(&answer.payload)
            );
        }
    }
    client.close().await;
    Ok(())
}

#[derive(Args)]
pub struct ServeArgs {
    /// Procedure URI to register.
    pub procedure: String,
    /// Shared registration policy: single, roundrobin, random, first, last [default: single;
    /// roundrobin inside a workload replica (MACULA_REPLICA set), so that its replicas share the
    /// procedure].
    #[arg(long)]
    pub invoke: Option<String>,
    /// The command to run for each call. It receives {"args": [...], "kwargs": {...}} on stdin;
    /// its stdout is the result (parsed as JSON when it is JSON, else returned as a string).
    /// A non-zero exit returns the error macula.error.command_failed with its stderr.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
}

pub async fn serve(a: ServeArgs, json: bool) -> Result<()> {
    // A handler that exits without reading its input (`date`, `hostname`) must not kill the
    // server: writing to its closed stdin is an error (ignored), not SIGPIPE.
    #[cfg(unix)]
    // SAFETY: changing a signal's disposition; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let client = a.conn.connect(true).await?;
    let cmd = a.command.clone();
    let mut options = Dict::new();
    let invoke = a.invoke.clone().unwrap_or_else(|| {
        if std::env::var_os("MACULA_REPLICA").is_some() {
            "roundrobin".into()
        } else {
            "single".into()
        }
    });
    if invoke != "single" {
        options.insert("invoke".into(), Value::Str(invoke));
    }
    let _reg = client
        .register_with(&a.procedure, options, move |inv| {
            let cmd = cmd.clone();
            async move { run_command(&cmd, &inv.payload).await }
        })
        .await?;
    if json {
        println!("{}", serde_json::json!({"registered": a.procedure}));
    } else {
        eprintln!(
            "serving {} with `{}`; Ctrl-C to stop",
            a.procedure,
            a.command.join(" ")
        );
    }
    let _ = tokio::signal::ctrl_c().await;
    client.close().await;
    Ok(())
}

async fn run_command(cmd: &[String], p: &Payload) -> Result<Payload, CallError> {
    let failed = |m: String| CallError::new("macula.error.command_failed", m);
    let mut child = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot start {}: {e}", cmd[0])))?;
    if let Some(mut stdin) = child.stdin.take() {
        let input = p.to_json().to_string();
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(failed(format!(
            "{} exited with {}: {err}",
            cmd[0], out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    let v = serde_json::from_str::<serde_json::Value>(&text)
        .map(Value::from)
        .unwrap_or(Value::Str(text));
    Ok(Payload::args(vec![v]))
}
