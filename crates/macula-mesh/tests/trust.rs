//! Mesh trust over real QUIC sockets (isolation finding 19): certificates expire and can be
//! revoked, and a peer whose certificate stops being valid is disconnected and refused; a renewed
//! certificate keeps a link up; Kademlia stores records only from certified peers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use futures_util::StreamExt;
use libp2p::kad;
use macula_mesh::identity::Keypair;
use macula_mesh::{cert, MeshConfig, MeshEvent, MeshEvents, MeshHandle};

async fn node_with(
    operator: &SigningKey,
    valid_for: u64,
    bootstrap: Vec<macula_mesh::Addr>,
) -> (MeshHandle, MeshEvents) {
    let kp = Keypair::generate_ed25519();
    let c = cert::issue_for(operator, &kp.public().to_peer_id(), valid_for);
    let cfg = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        bootstrap,
        discovery_interval: Duration::from_millis(200),
        ..MeshConfig::default()
    };
    macula_mesh::start(
        cfg,
        kp,
        c,
        Arc::new(cert::Trust::new(operator.verifying_key())),
    )
    .await
    .unwrap()
}

/// Waits for `want` (a peer up or down) on `ev`; other events are skipped.
async fn wait_for(ev: &mut MeshEvents, within: Duration, want: impl Fn(&MeshEvent) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ev.recv()).await {
            Ok(Some(e)) if want(&e) => return,
            Ok(Some(_)) => {}
            other => panic!("the awaited mesh event did not come: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_or_revoked_peers_are_cut_off_and_a_renewed_one_stays() {
    let op = SigningKey::from_bytes(&[7; 32]);
    let (a, mut a_ev) = node_with(&op, 3600, vec![]).await;
    let addr = a.listen_addrs().await.remove(0);
    // B's certificate lasts 4 s and is not renewed; D's lasts 4 s and is renewed; C's lasts.
    let (b, _b_ev) = node_with(&op, 4, vec![addr.clone()]).await;
    let (d, _d_ev) = node_with(&op, 4, vec![addr.clone()]).await;
    let (c, _c_ev) = node_with(&op, 3600, vec![addr]).await;
    let started = Instant::now();
    let (b_id, c_id, d_id) = (b.peer_id(), c.peer_id(), d.peer_id());
    for _ in 0..3 {
        wait_for(&mut a_ev, Duration::from_secs(10), |e| {
            matches!(e, MeshEvent::PeerUp(_))
        })
        .await;
    }
    let renewed = cert::issue_for(&op, &d_id, 3600);
    d.set_cert(renewed).expect("a valid certificate is taken");
    // A forged "renewal" is refused and changes nothing.
    let rogue = SigningKey::from_bytes(&[8; 32]);
    assert_eq!(
        d.set_cert(cert::issue_for(&rogue, &d_id, 3600)),
        Err(cert::CertError::Signature)
    );

    // B is cut off once its certificate expires (the sweep runs every second)...
    wait_for(
        &mut a_ev,
        Duration::from_secs(10),
        |e| matches!(e, MeshEvent::PeerDown(p) if *p == b_id),
    )
    .await;
    let cut = started.elapsed();
    assert!(
        cut >= Duration::from_secs(2) && cut < Duration::from_secs(7),
        "cut off at {cut:?}, expected shortly after the 4 s expiry"
    );
    assert!(
        a.stats()
            .peers_cut_off
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // ...while D, renewed in time, stays linked past its first certificate's expiry.
    tokio::time::sleep(
        Duration::from_secs(5).saturating_sub(started.elapsed()) + Duration::from_millis(1500),
    )
    .await;
    let peers = a.peers();
    assert!(peers.contains(&d_id), "the renewed peer stays linked");
    assert!(
        !peers.contains(&b_id),
        "the expired peer does not come back"
    );
    assert_eq!(
        a.peer_cert(&d_id).map(|c| c.lifetime()),
        Some(3600),
        "A holds D's renewed certificate"
    );

    // Revocation: C is cut off at once and refused when it dials again.
    let revoked_at = Instant::now();
    assert!(a.revoke(cert::Revocation::issue(&op, &c_id, cert::now_secs())));
    wait_for(
        &mut a_ev,
        Duration::from_secs(5),
        |e| matches!(e, MeshEvent::PeerDown(p) if *p == c_id),
    )
    .await;
    assert!(
        revoked_at.elapsed() < Duration::from_secs(2),
        "cut off {:?} after the revocation",
        revoked_at.elapsed()
    );
    let rejected = a
        .stats()
        .peers_rejected
        .load(std::sync::atomic::Ordering::Relaxed);
    // C redials (it keeps wanting its bootstrap node): every attempt is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .stats()
        .peers_rejected
        .load(std::sync::atomic::Ordering::Relaxed)
        == rejected
    {
        assert!(
            Instant::now() < deadline,
            "the revoked node never tried again"
        );
        assert!(!a.peers().contains(&c_id));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!a.peers().contains(&c_id), "the revoked peer stays out");
    assert!(a.peers().contains(&d_id));
}

/// A bare Kademlia node speaking the mesh's DHT protocol without a certificate: it can connect,
/// but what it announces (a provider record for a realm, a record) is never stored, and its
/// connection is closed after 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kademlia_takes_records_only_from_certified_peers() {
    let op = SigningKey::from_bytes(&[7; 32]);
    let (a, _a_ev) = node_with(&op, 3600, vec![]).await;
    let mut a_addr = a.listen_addrs().await.remove(0);
    let (legit, _l_ev) = node_with(&op, 3600, vec![a_addr.clone()]).await;
    legit.provide("com.legit");

    let kp = Keypair::generate_ed25519();
    let rogue_id = kp.public().to_peer_id();
    let mut rogue = libp2p::SwarmBuilder::with_existing_identity(kp)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| {
            kad::Behaviour::with_config(
                rogue_id,
                kad::store::MemoryStore::new(rogue_id),
                kad::Config::new(libp2p::StreamProtocol::new("/macula/kad/1")),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    rogue.behaviour_mut().set_mode(Some(kad::Mode::Server));
    // The rogue announces a reachable address, so a stored record of it would be answered.
    rogue
        .listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        .unwrap();
    let rogue_addr = loop {
        if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
            rogue.select_next_some().await
        {
            break address;
        }
    };
    rogue.add_external_address(rogue_addr);
    a_addr.pop();
    rogue.behaviour_mut().add_address(&a.peer_id(), a_addr);
    let key = kad::RecordKey::new(&"/macula/realm/com.rogue");
    rogue.behaviour_mut().start_providing(key).unwrap();
    // Drive the rogue until its announcement went out (the query ends either way).
    let announced = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let libp2p::swarm::SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(r),
                ..
            }) = rogue.select_next_some().await
            {
                return r;
            }
        }
    })
    .await
    .expect("the rogue's announcement completes");
    assert!(announced.is_ok(), "A answered the rogue: {announced:?}");
    // Keep the rogue's connection up while we look.
    let rogue_task = tokio::spawn(async move {
        loop {
            rogue.select_next_some().await;
        }
    });

    // A certified observer asks the DHT: the legitimate provider is there, the rogue is not.
    let (observer, _o_ev) = node_with(&op, 3600, vec![a.listen_addrs().await.remove(0)]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = observer.providers("com.legit").await;
        if found.contains(&legit.peer_id()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the certified provider was never found"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        observer.providers("com.rogue").await.is_empty(),
        "a provider record from an uncertified peer was stored"
    );
    // What the rogue sent was held for its certificate, then refused.
    let deadline = Instant::now() + Duration::from_secs(15);
    while a
        .stats()
        .dht_refused
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the rogue's record was never refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(observer.providers("com.rogue").await.is_empty());
    // A connection that never presents a certificate does not stay: closed after 10 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    while a
        .peer_status()
        .iter()
        .any(|p| p.peer_id == rogue_id.to_string())
    {
        assert!(
            Instant::now() < deadline,
            "the uncertified connection stayed up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rogue_task.abort();
}
