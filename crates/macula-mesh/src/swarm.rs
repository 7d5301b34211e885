//! The swarm task: commands from the handle, swarm events, periodic upkeep.

use super::*;

pub(crate) enum Pending {
    Put(oneshot::Sender<Result<usize, String>>),
    Get(oneshot::Sender<Result<Lookup, String>>, Instant),
    Providers(oneshot::Sender<Vec<PeerId>>, HashSet<PeerId>),
    /// A provider record being stored, then a lookup for [`Cmd::Discover`].
    Provided(String, oneshot::Sender<Vec<PeerId>>),
}

/// The swarm's event loop.
pub(crate) async fn run(
    mut swarm: Swarm<Behaviour>,
    shared: Arc<Shared>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    mut links: Links,
) {
    let mut provided: HashSet<String> = HashSet::new();
    let mut pending: HashMap<kad::QueryId, Pending> = HashMap::new();
    let bootstrap = shared.config.bootstrap.clone();
    let mut tick = tokio::time::interval(shared.config.discovery_interval);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut gate = KadGate::default();
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                let kad = &mut swarm.behaviour_mut().kad;
                match cmd {
                    Cmd::Provide(realm) => {
                        if provided.insert(realm.clone()) {
                            let _ = kad.start_providing(realm_key(&realm));
                            kad.get_providers(realm_key(&realm));
                        }
                    }
                    Cmd::Unprovide(realm) => {
                        if provided.remove(&realm) {
                            kad.stop_providing(&realm_key(&realm));
                        }
                    }
                    Cmd::Dial(a) => {
                        if let Err(e) = links.dial(&mut swarm, DialOpts::from(a.clone())) {
                            tracing::debug!("dial {a}: {e}");
                        }
                    }
                    Cmd::Want(p) => links.want(&mut swarm, p, &shared, &cmd_tx),
                    Cmd::Disconnect(p) => {
                        let _ = swarm.disconnect_peer_id(p);
                    }
                    Cmd::Put(key, value, ttl, reply) => {
                        let mut r = kad::Record::new(key, value);
                        r.publisher = Some(shared.local);
                        r.expires = Some(Instant::now() + ttl);
                        // Every one of the k closest nodes, as Kademlia intends: a lookup from
                        // anywhere then meets a replica on its way to the key.
                        match kad.put_record(r, Quorum::All) {
                            Ok(id) => {
                                pending.insert(id, Pending::Put(reply));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(format!("cannot store the record: {e:?}")));
                            }
                        }
                    }
                    Cmd::Get(key, reply) => {
                        let id = kad.get_record(kad::RecordKey::new(&key));
                        pending.insert(id, Pending::Get(reply, Instant::now()));
                    }
                    Cmd::Providers(realm, reply) => {
                        let id = kad.get_providers(realm_key(&realm));
                        pending.insert(id, Pending::Providers(reply, HashSet::new()));
                    }
                    Cmd::Discover(realm, reply) => {
                        let started = provided
                            .insert(realm.clone())
                            .then(|| kad.start_providing(realm_key(&realm)).ok())
                            .flatten();
                        match started {
                            Some(id) => {
                                pending.insert(id, Pending::Provided(realm, reply));
                            }
                            None => {
                                let id = kad.get_providers(realm_key(&realm));
                                pending.insert(id, Pending::Providers(reply, HashSet::new()));
                            }
                        }
                    }
                    Cmd::Listen(reply) => {
                        let _ = reply.send(swarm.listeners().cloned().collect());
                    }
                    Cmd::Certified(p) => gate.certified(&mut swarm, &shared, p),
                    Cmd::Revoked(p) => gate.revoked(&mut swarm, &shared, p),
                    Cmd::Superseded(p, since) => {
                        for c in links.older(p, since) {
                            tracing::debug!(local = %shared.local, peer = %p, "closing a connection of a superseded link");
                            swarm.close_connection(c);
                        }
                    }
                }
            }
            _ = sweep.tick() => gate.sweep(&mut swarm, &shared, true),
            _ = tick.tick() => {
                let kad = &mut swarm.behaviour_mut().kad;
                for realm in &provided {
                    kad.get_providers(realm_key(realm));
                }
                links.redial(&mut swarm);
                // Not joined (no certified peer, though connections may be up, e.g. ones that
                // others' lookups opened): dial the bootstrap nodes again.
                if shared.up.read().is_empty() {
                    for b in &bootstrap {
                        let _ = links.dial(&mut swarm, DialOpts::from(b.clone()));
                    }
                }
            }
            ev = swarm.select_next_some() => {
                handle_event(&mut swarm, ev, &shared, &mut pending, &mut links, &mut gate, &cmd_tx);
            }
        }
    }
}

pub(crate) fn handle_event(
    swarm: &mut Swarm<Behaviour>,
    ev: SwarmEvent<BehaviourEvent>,
    shared: &Arc<Shared>,
    pending: &mut HashMap<kad::QueryId, Pending>,
    links: &mut Links,
    gate: &mut KadGate,
    cmd: &mpsc::UnboundedSender<Cmd>,
) {
    match ev {
        SwarmEvent::ConnectionEstablished {
            peer_id,
            endpoint,
            connection_id,
            ..
        } => {
            let addr = endpoint.get_remote_address().clone();
            tracing::debug!(local = %shared.local, peer = %peer_id, dialer = endpoint.is_dialer(), "connection up");
            gate.since.entry(peer_id).or_insert_with(Instant::now);
            gate.addresses(swarm, shared, peer_id, vec![addr.clone()]);
            tokio::spawn(send_cert(
                shared.control.clone(),
                peer_id,
                shared.cert.read().0.clone(),
            ));
            shared.conns.write().insert(peer_id, (addr, None));
            links.established(peer_id, connection_id, shared, cmd);
        }
        SwarmEvent::OutgoingConnectionError {
            connection_id,
            peer_id,
            error,
        } => {
            tracing::debug!(local = %shared.local, peer = ?peer_id, "dial failed: {error}");
            links.dialing.remove(&connection_id);
        }
        SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            num_established,
            ..
        } if num_established > 0 => links.closed(peer_id, connection_id),
        SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            cause,
            ..
        } => {
            tracing::debug!(local = %shared.local, peer = %peer_id, "connection closed: {cause:?}");
            links.closed(peer_id, connection_id);
            if let Some(q) = shared.writers.write().remove(&peer_id) {
                q.relieve(shared);
            }
            shared.conns.write().remove(&peer_id);
            shared.certified.write().remove(&peer_id);
            gate.gone(&peer_id, shared);
            let mut up = shared.up.write();
            if up.remove(&peer_id).is_some() {
                let _ = shared.events.send((MeshEvent::PeerDown(peer_id), 0));
            }
            links.lost(peer_id);
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
            peer_id,
            info,
            ..
        })) => gate.addresses(swarm, shared, peer_id, info.listen_addrs),
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest { request })) => {
            match request {
                kad::InboundRequest::PutRecord {
                    source,
                    record: Some(r),
                    ..
                } => gate.inbound(swarm, shared, source, Inbound::Record(r)),
                kad::InboundRequest::AddProvider { record: Some(r) } => {
                    gate.inbound(swarm, shared, r.provider, Inbound::Provider(r))
                }
                _ => {}
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
            peer,
            result: Ok(rtt),
            ..
        })) => {
            if let Some(c) = shared.conns.write().get_mut(&peer) {
                c.1 = Some(rtt);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            result,
            stats,
            step,
        })) => match result {
            QueryResult::GetProviders(res) => {
                let found = match res {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
                    _ => HashSet::new(),
                };
                if let Some(Pending::Providers(_, all)) = pending.get_mut(&id) {
                    all.extend(found.iter().copied().take(MAX_REALM_NODES));
                }
                for p in found.into_iter().take(MAX_REALM_NODES) {
                    if p != shared.local {
                        links.want(swarm, p, shared, cmd);
                    }
                }
                if step.last {
                    if let Some(Pending::Providers(reply, all)) = pending.remove(&id) {
                        let _ = reply.send(all.into_iter().collect());
                    }
                }
            }
            QueryResult::StartProviding(_) => {
                if let Some(Pending::Provided(realm, reply)) = pending.remove(&id) {
                    let q = swarm.behaviour_mut().kad.get_providers(realm_key(&realm));
                    pending.insert(q, Pending::Providers(reply, HashSet::new()));
                }
            }
            QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(r))) => {
                if let Some(Pending::Get(reply, started)) = pending.remove(&id) {
                    let _ = reply.send(Ok(Lookup {
                        value: Some(r.record.value),
                        requests: stats.num_requests(),
                        elapsed: started.elapsed(),
                    }));
                    if let Some(mut q) = swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
            }
            QueryResult::GetRecord(_) if step.last => {
                if let Some(Pending::Get(reply, started)) = pending.remove(&id) {
                    let _ = reply.send(Ok(Lookup {
                        value: None,
                        requests: stats.num_requests(),
                        elapsed: started.elapsed(),
                    }));
                }
            }
            QueryResult::PutRecord(res) if step.last => {
                if let Some(Pending::Put(reply)) = pending.remove(&id) {
                    // The record is stored here first; a put that reached fewer nodes than asked
                    // (a mesh of one) or timed out reports how many others stored it.
                    let stored = match res {
                        // Quorum::All met: the replication factor.
                        Ok(_) => kad::K_VALUE.get(),
                        Err(
                            kad::PutRecordError::QuorumFailed { success, .. }
                            | kad::PutRecordError::Timeout { success, .. },
                        ) => success.len(),
                    };
                    let _ = reply.send(Ok(stored));
                }
            }
            _ => {}
        },
        _ => {}
    }
}
