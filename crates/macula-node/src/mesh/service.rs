//! The node's own services in every realm (`macula.dht.put`, `macula.dht.get`,
//! `macula.fence.check`), answered through the dealer with the usual ACL check.

#[allow(unused_imports)]
use super::*;

/// Procedures the node answers itself in every realm.
pub const SERVICE_PROCEDURES: [&str; 3] =
    ["macula.dht.put", "macula.dht.get", "macula.fence.check"];

/// The node's service member of one realm: runs `macula.dht.put` / `macula.dht.get` against the
/// DHT and answers through the dealer.
#[derive(Clone)]
pub struct ServicePeer {
    pub node: Weak<Node>,
    pub realm: Arc<str>,
}

impl Peer for ServicePeer {
    fn send(&self, _msg: Arc<Message>) {}

    fn forward(&self, f: Forwarded<'_>) {
        self.invoke(f)
    }
}

impl ServicePeer {
    pub(crate) fn invoke(&self, f: Forwarded<'_>) {
        let Forwarded::Call {
            invocation,
            procedure,
            payload,
            origin,
            ..
        } = f
        else {
            return;
        };
        let (Some(node), Ok(rt)) = (self.node.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let realm = self.realm.clone();
        let procedure = procedure.to_owned();
        let writer = origin.authid.clone();
        let payload = payload.materialized().into_owned();
        rt.spawn(async move {
            let answer = if procedure == "macula.fence.check" {
                fence_call(&node, &realm, &writer, payload).await
            } else {
                dht_call(&node, &realm, &procedure, &writer, payload).await
            };
            let reply = match answer {
                Ok(p) => Message::Result {
                    request: invocation,
                    details: macula_wamp::Dict::new(),
                    payload: p,
                },
                Err((uri, msg)) => {
                    macula_router::error(macula_wamp::code::CALL, invocation, uri, msg)
                }
            };
            if let Some(r) = node.realm_handle(&realm) {
                if let Some(id) = r.service {
                    let _ = r.lock().link_reply(id, reply);
                }
            }
        });
    }
}

pub(crate) type CallError = (&'static str, String);

pub(crate) async fn dht_call(
    node: &Node,
    realm: &str,
    procedure: &str,
    writer: &str,
    payload: macula_wamp::Payload,
) -> Result<macula_wamp::Payload, CallError> {
    use macula_wamp::{errors, Value};
    let mesh = crate::mesh::of(node).ok_or((
        errors::NO_SUCH_PROCEDURE,
        "the mesh is off on this node (mesh.enabled: false): enable it, or connect to a node that runs one".to_string(),
    ))?;
    let key = payload
        .args
        .first()
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty() && k.len() <= 512)
        .ok_or((
            errors::INVALID_ARGUMENT,
            format!("{procedure} takes a key (a string of 1 to 512 bytes) as first argument"),
        ))?
        .to_owned();
    let cfg = &node.config.mesh;
    let dkey = macula_mesh::record::dht_key(realm, &key);
    let now = crate::confdir::now_secs();
    if procedure == "macula.dht.put" {
        let value = payload.args.get(1).cloned().ok_or((
            errors::INVALID_ARGUMENT,
            "macula.dht.put takes a key and a value: [key, value]".to_string(),
        ))?;
        let ttl = payload
            .kwargs
            .get("ttl")
            .and_then(Value::as_u64)
            .unwrap_or(cfg.dht_max_ttl_s);
        if ttl == 0 || ttl > cfg.dht_max_ttl_s {
            return Err((
                errors::INVALID_ARGUMENT,
                format!(
                    "ttl must be 1..={} seconds (mesh.dht_max_ttl_s)",
                    cfg.dht_max_ttl_s
                ),
            ));
        }
        let bytes = rmp_serde::to_vec(&value).unwrap_or_default();
        if bytes.len() > cfg.dht_max_value {
            return Err((
                errors::LIMIT_EXCEEDED,
                format!(
                    "the value is {} bytes; the limit is {} (mesh.dht_max_value)",
                    bytes.len(),
                    cfg.dht_max_value
                ),
            ));
        }
        let h = &mesh.handle;
        // A record is valid only while this node's certificate is (see `AppRecord::verify`).
        let expires_at = (now + ttl).min(h.own_cert().not_after);
        let rec = macula_mesh::record::AppRecord::sign(
            h.keypair(),
            &h.cert(),
            realm,
            &key,
            Bytes::from(bytes),
            writer,
            now,
            expires_at,
        );
        let replicas = h
            .put(
                dkey,
                rec.encode(),
                std::time::Duration::from_secs(expires_at.saturating_sub(now).max(1)),
            )
            .await
            .map_err(|e| (errors::CANCELED, e))?;
        return Ok(macula_wamp::Payload::new(
            vec![],
            macula_wamp::dict! {"replicas" => replicas as u64, "expires_at" => expires_at},
        ));
    }
    node.metrics.dht_lookups.fetch_add(1, Ordering::Relaxed);
    let found = mesh
        .handle
        .get(dkey)
        .await
        .map_err(|e| (errors::CANCELED, e))?;
    let Some(raw) = found.value else {
        return Err((
            errors::NOT_FOUND,
            format!("no record {key:?} in realm {realm}"),
        ));
    };
    let rec = macula_mesh::record::AppRecord::verify(&raw, mesh.handle.trust(), realm, &key, now)
        .map_err(|e| (errors::NOT_FOUND, format!("no valid record {key:?}: {e}")))?;
    // In a realm restricted to dedicated nodes, only their records count.
    let by = rec.writer_node().map(|p| p.to_string()).unwrap_or_default();
    if node.peer_may_serve(realm, &by) != Some(true) {
        return Err((
            errors::NOT_FOUND,
            format!("no valid record {key:?}: written by a node that does not serve {realm}"),
        ));
    }
    let value: Value = rmp_serde::from_slice(&rec.value).unwrap_or(Value::Null);
    Ok(macula_wamp::Payload::new(
        vec![value],
        macula_wamp::dict! {"writer" => rec.writer, "written_at" => rec.written_at, "expires_at" => rec.expires_at},
    ))
}

/// `macula.fence.check(token)` from a replica (its own slot, from its authid
/// `workload:<name>/<i>`), or `macula.fence.check(token, workload=..., replica=...)` from
/// anyone of the realm (a store checking a writer): whether `token` is still the slot's
/// current fencing token, by a majority of the slot's lease authorities.
pub(crate) async fn fence_call(
    node: &Node,
    realm: &str,
    caller: &str,
    payload: macula_wamp::Payload,
) -> Result<macula_wamp::Payload, CallError> {
    use macula_wamp::{errors, Value};
    const USAGE: &str = "macula.fence.check takes a fencing token (a replica's MACULA_FENCING_TOKEN) as first argument, and workload= and replica= when the caller is not that replica (a replica may leave the token out: its node's is checked)";
    let token = match payload.args.first() {
        None => None,
        Some(v) => Some(
            match v {
                Value::Str(s) => s.parse().ok(),
                v => v.as_u64(),
            }
            .ok_or((errors::INVALID_ARGUMENT, USAGE.to_owned()))?,
        ),
    };
    let own = caller
        .strip_prefix("workload:")
        .and_then(|w| w.rsplit_once('/'))
        .and_then(|(n, i)| Some((n.to_owned(), i.parse::<u64>().ok()?)));
    let name = payload
        .kwargs
        .get("workload")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| own.as_ref().map(|o| o.0.clone()))
        .ok_or((errors::INVALID_ARGUMENT, USAGE.to_owned()))?;
    let replica = payload
        .kwargs
        .get("replica")
        .and_then(Value::as_u64)
        .or_else(|| own.as_ref().map(|o| o.1))
        .ok_or((errors::INVALID_ARGUMENT, USAGE.to_owned()))?;
    if name.is_empty() || name.len() > 253 || replica > u64::from(u32::MAX) {
        return Err((errors::INVALID_ARGUMENT, USAGE.to_owned()));
    }
    let Some(fencing) = node.fencing.get().and_then(|f| f.upgrade()) else {
        return Err((
            errors::NO_SUCH_PROCEDURE,
            "this node runs no workload controller yet (it is starting): try again in a moment"
                .to_owned(),
        ));
    };
    let slot = macula_workloads::wire::slot(realm, &name, replica as u32);
    // A replica asking about itself without a token: the one its node holds the slot under.
    let token = match token {
        Some(t) => t,
        None if own.as_ref().is_some_and(|o| o.0 == name && o.1 == replica) => {
            fencing.held(&slot).ok_or((
                "macula.error.not_held",
                format!("this node no longer holds {slot}: stop writing, another replica may hold it now"),
            ))?
        }
        None => return Err((errors::INVALID_ARGUMENT, USAGE.to_owned())),
    };
    let f = fencing
        .check(slot, token)
        .await
        .map_err(|e| ("macula.error.unavailable", e))?;
    Ok(macula_wamp::Payload::new(
        vec![Value::Bool(f.current)],
        macula_wamp::dict! {"current" => f.current, "token" => token, "highest" => f.highest, "workload" => name, "replica" => replica},
    ))
}
