//! `macula status`: a realm at a glance: its registry record (when logged in to a registry)
//! and its workloads on the nodes (payloads and jobs, their replicas, where they run).

#[allow(unused_imports)]
use super::*;

#[derive(Args)]
#[command(after_help = "Examples:
  macula status                               (the realm `macula up` made, on the local node)
  macula status --realm com.you.app --url wss://node.example.com/ws")]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: Server,
    /// The realm [default: your only realm, else the one `macula up` made].
    #[arg(long)]
    pub realm: Option<String>,
    /// A node of the realm, for its workloads: ws://host:port/ws or wss://...
    #[arg(long, env = "MACULA_URL", default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// A key of the realm for the node [default: the admin key `macula up` printed].
    #[arg(long, env = "MACULA_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Config directory of `macula up` used for the defaults above.
    #[arg(long, env = "MACULA_HOME", default_value_os_t = crate::local::default_home())]
    pub home: std::path::PathBuf,
}

/// `macula status --realm R`: the realm's registry record and its workloads.
pub fn status(a: StatusArgs, json: bool) -> Result<()> {
    // The registry's record, when there is a registry session (or a registry answers).
    let record = Api::new(&a.server).and_then(|api| {
        let realm = pick_realm(&api, a.realm.clone())?;
        api.get::<Realm>("GET", &format!("/v1/realms/{}", seg(&realm)))
    });
    let realm = a
        .realm
        .clone()
        .or_else(|| record.as_ref().ok().map(|r| r.name.clone()));
    let conn = crate::Conn {
        url: a.url.clone(),
        ca: a.server.ca.clone(),
        realm,
        key: a.key.clone(),
        home: a.home.clone(),
    };
    let workloads = crate::workload_cmds::render_workloads(&conn, None);
    if let (Err(r), Err(w)) = (&record, &workloads) {
        bail!("{r}\n(and no node answered for its workloads: {w})");
    }
    if json {
        let v = json!({
            "realm": record.as_ref().ok(),
            "workloads": workloads.as_ref().ok().map(|w| w.0["workloads"].clone()),
        });
        println!("{v}");
        return Ok(());
    }
    match &record {
        Ok(r) => print_realm(r),
        Err(e) => println!("(no registry record: {e})"),
    }
    match workloads {
        Ok((_, text)) => {
            println!("\nWorkloads:");
            print!("{text}");
        }
        Err(e) => println!("\n(workloads: {e})"),
    }
    Ok(())
}
