//! Usage over the mesh: a node without the billing aggregator delivers its reports to the node
//! that has it (`Usage`/`UsageAck` frames), which takes rows only for realms the sender may
//! serve.

#[allow(unused_imports)]
use super::*;

/// The name under which the node hosting the billing aggregator announces itself in the DHT
/// (a provider record, like a realm's; no realm name starts with `_`).
pub const BILLING: &str = "_billing";

/// A usage report from another node: stored by this node's aggregator, then acknowledged. A
/// node reports only its own usage (the report's node must be the sending peer).
pub(crate) fn on_usage(
    node: &Arc<Node>,
    mesh: &Arc<MeshState>,
    peer: PeerId,
    id: u64,
    report: Bytes,
) {
    let reply = |error: Option<String>| {
        mesh.handle.send(&peer, &Frame::UsageAck { id, error });
    };
    let mut report = match rmp_serde::from_slice::<crate::meter::UsageReport>(&report) {
        Ok(r) if r.node == peer.to_string() => r,
        Ok(_) => return reply(Some("a node reports only its own usage".into())),
        Err(e) => return reply(Some(format!("malformed usage report: {e}"))),
    };
    let sink = match node.usage_sink.get() {
        Some(s) if node.config.registry.enabled => s.clone(),
        _ => {
            return reply(Some(
                "this node does not host the billing aggregator".into(),
            ))
        }
    };
    // Usage of a realm restricted to dedicated nodes counts only from them (a node outside the
    // list cannot charge the realm's owner, under the realm's name or a subrealm's), and usage
    // of realms no known registration governs is not billable. The rest of the report is
    // taken; the node is not asked to resend rows that will never be accepted.
    let from = peer.to_string();
    let before = report.rows.len();
    report
        .rows
        .retain(|r| node.peer_may_serve(&r.realm, &from) == Some(true));
    if report.rows.len() < before {
        rejected(
            mesh,
            &peer,
            "usage",
            format_args!(
                "{} rows for realms it may not serve",
                before - report.rows.len()
            ),
        );
    }
    let mesh = mesh.clone();
    tokio::spawn(async move {
        let error = sink.deliver(report).await.err();
        mesh.handle.send(&peer, &Frame::UsageAck { id, error });
    });
}

/// Delivers a node's usage to the billing node across the mesh (found through its DHT provider
/// record), waiting for its acknowledgement.
pub struct MeshSink(pub Weak<Node>);

impl crate::meter::UsageSink for MeshSink {
    fn deliver(
        &self,
        report: crate::meter::UsageReport,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        let node = self.0.clone();
        Box::pin(async move {
            let mesh = node
                .upgrade()
                .and_then(|n| crate::mesh::of(&n).cloned())
                .ok_or("the mesh is off")?;
            let h = &mesh.handle;
            let known = *mesh.billing_peer.lock();
            let peer = match known.filter(|p| h.peers().contains(p)) {
                Some(p) => p,
                None => {
                    if let Some((next, _)) = *mesh.billing_miss.lock() {
                        if Instant::now() < next {
                            return Err("no node hosting the registry (billing aggregator) in the mesh yet; usage is kept".into());
                        }
                    }
                    let found = h.providers(BILLING).await;
                    let Some(p) = found.into_iter().find(|p| *p != h.peer_id()) else {
                        let mut miss = mesh.billing_miss.lock();
                        let backoff = miss.map_or(Duration::from_secs(5), |(_, b)| {
                            (b * 2).min(Duration::from_secs(300))
                        });
                        *miss = Some((Instant::now() + backoff, backoff));
                        return Err("no node hosting the registry (billing aggregator) was found in the mesh; usage is kept".into());
                    };
                    *mesh.billing_miss.lock() = None;
                    h.want(p);
                    *mesh.billing_peer.lock() = Some(p);
                    p
                }
            };
            // Linked (the DHT lookup connects; the link follows within a round trip or two).
            let linked = async {
                loop {
                    let up = mesh.peer_up.notified();
                    tokio::pin!(up);
                    up.as_mut().enable();
                    if h.peers().contains(&peer) {
                        return;
                    }
                    up.await;
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), linked)
                .await
                .is_err()
            {
                return Err(format!("the billing node {peer} is not reachable"));
            }
            let body = rmp_serde::to_vec_named(&report).map_err(|e| e.to_string())?;
            let id: u64 = rand::random();
            let (tx, rx) = tokio::sync::oneshot::channel();
            mesh.usage_acks.lock().insert(id, tx);
            h.send(
                &peer,
                &Frame::Usage {
                    id,
                    report: body.into(),
                },
            );
            let answer = tokio::time::timeout(Duration::from_secs(10), rx).await;
            mesh.usage_acks.lock().remove(&id);
            match answer {
                Ok(Ok(None)) => Ok(()),
                Ok(Ok(Some(e))) => Err(format!("the billing node refused the report: {e}")),
                _ => Err(format!("no acknowledgement from the billing node {peer}")),
            }
        })
    }
}
