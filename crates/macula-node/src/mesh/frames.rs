//! What a peer's frames mean: each kind of frame applied to this node's realms.

#[allow(unused_imports)]
use super::*;

pub(crate) fn on_frame(node: &Arc<Node>, mesh: &Arc<MeshState>, peer: PeerId, frame: Frame) {
    // A realm served only by dedicated nodes takes forwarded traffic only from them.
    let realm = match &frame {
        Frame::Interest { realm, .. }
        | Frame::Registration { realm, .. }
        | Frame::Publish { realm, .. }
        | Frame::Call { realm, .. }
        | Frame::Reply { realm, .. }
        | Frame::Peers { realm, .. }
        | Frame::Session { realm, .. } => Some(realm.as_str()),
        _ => None,
    };
    if let Some(realm) = realm.filter(|_| node.any_dedicated()) {
        if node.peer_may_serve(realm, &peer.to_string()) == Some(false) {
            return rejected(
                mesh,
                &peer,
                frame.kind(),
                "not a dedicated node of the realm",
            );
        }
    }
    match frame {
        Frame::Hello { .. } => {}
        Frame::Barrier { id } => {
            // Frames from one peer are applied in order: everything before this is in.
            mesh.handle.send(&peer, &Frame::BarrierAck { id });
        }
        Frame::BarrierAck { id } => mesh.barrier_done(peer, Some(id)),
        Frame::NodeRevoked { revocation } => {
            crate::mesh::trust::on_revocation(node, mesh, peer, &revocation)
        }
        Frame::CertRenew => crate::mesh::trust::on_renew_request(node, mesh, peer),
        Frame::CertIssued { cert } => crate::mesh::trust::on_cert_issued(node, mesh, &cert),
        Frame::Session {
            realm,
            session,
            public,
            nonce,
            sig,
        } => mesh
            .proofs
            .on_session(node, mesh, peer, &realm, session, &public, &nonce, &sig),
        Frame::StatesDone => {
            if !node.states_synced() {
                tracing::info!(%peer, "realm states synced from a peer");
            }
            node.mark_states_synced();
        }
        Frame::Usage { id, report } => on_usage(node, mesh, peer, id, report),
        Frame::Workload { record } => on_workload(node, mesh, peer, &record),
        Frame::LeaseRequest { req } => on_lease_request(node, mesh, peer, &req),
        // Answers to this node's own lease requests, and placement, status and logs: for the
        // workload controller.
        Frame::LeaseReply { reply } => {
            match serde_json::from_slice::<macula_workloads::lease::Answer>(&reply) {
                Ok(r) => {
                    node.work_inbox
                        .push(peer.to_string(), crate::workloads::InMsg::Lease(r));
                }
                Err(_) => rejected(mesh, &peer, "lease_reply", "not a lease reply"),
            }
        }
        Frame::BlobAsk {
            id,
            digest,
            offset,
            len,
        } => super::blobs::on_ask(node, mesh, peer, id, digest, offset, len),
        Frame::BlobPart {
            id,
            offset,
            total,
            data,
            error,
        } => super::blobs::on_part(
            mesh,
            peer,
            id,
            super::blobs::Part {
                offset,
                total,
                data,
                error,
            },
        ),
        Frame::Work { msg } => match serde_json::from_slice::<macula_workloads::wire::Work>(&msg) {
            Ok(w) => {
                node.work_inbox
                    .push(peer.to_string(), crate::workloads::InMsg::Work(w));
            }
            Err(_) => rejected(mesh, &peer, "work", "not a workload message"),
        },
        Frame::UsageAck { id, error } => {
            if let Some(tx) = mesh.usage_acks.lock().remove(&id) {
                let _ = tx.send(error);
            }
        }
        Frame::Peers { realm, peers } => {
            // Only for a realm this node serves with sessions of its own (as the DHT's provider
            // records): a node that merely holds a peer's interest does not pull the realm in.
            if !node
                .realm_handle(&realm)
                .is_some_and(|r| r.serves_sessions())
            {
                return;
            }
            if peers.len() > macula_mesh::MAX_REALM_NODES {
                return rejected(mesh, &peer, "peers", "too many peers");
            }
            for p in peers {
                match p.parse::<PeerId>() {
                    Ok(p) => mesh.handle.want(p),
                    Err(e) => return rejected(mesh, &peer, "peers", e),
                }
            }
        }
        Frame::State { realm, state } => {
            let Ok(s) = rmp_serde::from_slice::<RealmState>(&state) else {
                mesh.counters
                    .states_rejected
                    .fetch_add(1, Ordering::Relaxed);
                return;
            };
            if s.realm != realm {
                mesh.counters
                    .states_rejected
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Err(e) = s.verify(node.auth().authenticator.operator()) {
                mesh.counters
                    .states_rejected
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, realm, "realm state refused: {e}");
                return;
            }
            if mesh.offer_state(s.clone()) {
                mesh.counters.states_applied.fetch_add(1, Ordering::Relaxed);
                node.rebuild_auth();
                mesh.handle.broadcast(
                    &Frame::State {
                        realm,
                        state: s.encode(),
                    },
                    Some(&peer),
                );
            } else {
                // The peer is behind (an old state, perhaps of a deleted registration): send it
                // what this node holds, which it takes and spreads.
                let newer = mesh
                    .states
                    .lock()
                    .get(&realm)
                    .filter(|h| h.seq > s.seq)
                    .map(RealmState::encode);
                if let Some(state) = newer {
                    mesh.handle.send(&peer, &Frame::State { realm, state });
                }
            }
        }
        f @ (Frame::Interest { .. } | Frame::Registration { .. }) => {
            on_announce(node, mesh, peer, f)
        }
        Frame::Publish { realm, origin, msg } => {
            let Ok(Message::Publish {
                request,
                options,
                topic,
                payload,
            }) = Serializer::MsgPack.decode_fast(&msg)
            else {
                return rejected(mesh, &peer, "publication", "not a PUBLISH");
            };
            let Some(r) = realm_for_frame(node, mesh, &realm, false) else {
                return;
            };
            let o = match mesh.proofs.origin(node, peer, &realm, origin) {
                Ok(o) => o,
                Err(why) => return rejected(mesh, &peer, "publication", why),
            };
            node.metrics.mesh_events_in.fetch_add(1, Ordering::Relaxed);
            let res = r
                .lock()
                .link_publish(&o, request, &options, &topic, payload);
            if let Err(e) = res {
                rejected(mesh, &peer, "publication", e);
            }
        }
        Frame::Call { realm, origin, msg } => {
            let Ok(Message::Call {
                request,
                options,
                procedure,
                payload,
            }) = Serializer::MsgPack.decode(&msg)
            else {
                return rejected(mesh, &peer, "call", "not a CALL");
            };
            let Some(r) = realm_for_frame(node, mesh, &realm, false) else {
                return;
            };
            let o = match mesh.proofs.origin(node, peer, &realm, origin) {
                Ok(o) => o,
                Err(why) => return rejected(mesh, &peer, "call", why),
            };
            let link = link_for(mesh, &r, peer);
            let res = r.lock().link_call(
                link,
                &o,
                request,
                options,
                procedure,
                payload,
                Instant::now(),
            );
            if let Err(e) = res {
                rejected(mesh, &peer, "call", e);
            }
        }
        Frame::Reply { realm, msg } => {
            let Ok(m) = Serializer::MsgPack.decode(&msg) else {
                return rejected(mesh, &peer, "reply", "undecodable");
            };
            let Some(r) = realm_for_frame(node, mesh, &realm, false) else {
                return;
            };
            let link = link_for(mesh, &r, peer);
            let res = r.lock().link_reply(link, m);
            if let Err(e) = res {
                rejected(mesh, &peer, "reply", e);
            }
        }
    }
}

/// A peer's interest or registration (added, naming the session that holds it; or
/// withdrawn), held for the peer's link if the session's role justifies it.
pub(crate) fn on_announce(node: &Node, mesh: &MeshState, peer: PeerId, frame: Frame) {
    let (kind, realm, uri, policy, invoke, by) = match frame {
        Frame::Interest {
            realm,
            uri,
            policy,
            session,
            role,
            add,
        } => (
            Kind::Interest,
            realm,
            uri,
            policy,
            None,
            add.then_some((session, role)),
        ),
        Frame::Registration {
            realm,
            uri,
            policy,
            invoke,
            session,
            role,
            add,
        } => (
            Kind::Registration,
            realm,
            uri,
            policy,
            Some(invoke),
            add.then_some((session, role)),
        ),
        _ => return,
    };
    let invoke = match invoke {
        None => Some(InvokePolicy::Single),
        Some(i) => InvokePolicy::parse(Some(&i)),
    };
    let (Some(policy), Some(invoke)) = (MatchPolicy::parse(Some(&policy)), invoke) else {
        return rejected(mesh, &peer, kind.as_str(), "bad match or invoke policy");
    };
    let key = HoldKey {
        realm: Arc::from(realm.as_str()),
        kind,
        uri,
        policy,
    };
    mesh.proofs.announce(node, mesh, peer, key, invoke, by, || {
        let r = realm_for_frame(node, mesh, &realm, true)?;
        let link = link_for(mesh, &r, peer);
        Some((r, link))
    });
}

/// A peer's deploy record: taken and flooded on if it holds; a stale one is answered with the
/// newer record this node has (the peer is behind). Judged and written off the event loop.
fn on_workload(node: &Arc<Node>, mesh: &Arc<MeshState>, peer: PeerId, bytes: &[u8]) {
    use macula_workloads::record::{DeployRecord, Refused};
    let Ok(record) = serde_json::from_slice::<DeployRecord>(bytes) else {
        return rejected(mesh, &peer, "workload", "not a deploy record");
    };
    let (node, mesh) = (node.clone(), mesh.clone());
    tokio::task::spawn_blocking(move || {
        let (realm, name) = (record.realm.clone(), record.name.clone());
        match crate::workloads::accept(&node, record, false) {
            Ok(r) => flood_record(&mesh, &r, Some(&peer)),
            Err(Refused::Stale { .. }) => {
                // The peer is behind: it gets what this node has.
                let newer = node.workloads.records.lock().get(&realm, &name).cloned();
                if let Some(bytes) = newer.and_then(|r| serde_json::to_vec(&r).ok()) {
                    mesh.handle.send(
                        &peer,
                        &Frame::Workload {
                            record: bytes.into(),
                        },
                    );
                }
            }
            Err(e) => rejected(&mesh, &peer, "workload", format!("{e:?}")),
        }
    });
}

/// Sends a deploy record to every peer but `except`.
pub(crate) fn flood_record(
    mesh: &MeshState,
    r: &macula_workloads::record::DeployRecord,
    except: Option<&PeerId>,
) {
    if let Ok(bytes) = serde_json::to_vec(r) {
        mesh.handle.broadcast(
            &Frame::Workload {
                record: bytes.into(),
            },
            except,
        );
    }
}

/// The longest slot name an authority keeps (`realm/workload/index`).
const MAX_SLOT_LEN: usize = 512;

/// A peer asks this node, as an authority, for a lease on a slot it wants to hold itself: the
/// request must name the peer as holder, and the slot a realm this node knows and the peer may
/// serve. Answered off the event loop (the promise is written to disk first).
fn on_lease_request(node: &Arc<Node>, mesh: &Arc<MeshState>, peer: PeerId, bytes: &[u8]) {
    use macula_workloads::lease::{Answer, Ask};
    let Ok(ask) = serde_json::from_slice::<Ask>(bytes) else {
        return rejected(mesh, &peer, "lease_request", "not a lease request");
    };
    if !ask.sane() {
        return rejected(
            mesh,
            &peer,
            "lease_request",
            "a configuration or node id out of bounds",
        );
    }
    let (slot, holder) = ask.req.slot_holder();
    let me = peer.to_string();
    if *holder != me {
        return rejected(
            mesh,
            &peer,
            "lease_request",
            "a node asks for leases for itself only",
        );
    }
    let realm = slot.split('/').next().unwrap_or_default();
    if slot.len() > MAX_SLOT_LEN || node.policy_for(realm).is_none() {
        return rejected(
            mesh,
            &peer,
            "lease_request",
            "not a slot of a realm this node knows",
        );
    }
    if node.peer_may_serve(realm, &me) == Some(false) {
        return rejected(
            mesh,
            &peer,
            "lease_request",
            "not a dedicated node of the realm",
        );
    }
    let (node, mesh) = (node.clone(), mesh.clone());
    tokio::task::spawn_blocking(move || {
        crate::workloads::accept::adopt_for(&node, &ask);
        let answer = Answer {
            id: ask.id,
            reply: node.leases.answer(&ask),
        };
        if let Ok(bytes) = serde_json::to_vec(&answer) {
            mesh.handle.send(
                &peer,
                &Frame::LeaseReply {
                    reply: bytes.into(),
                },
            );
        }
    });
}
