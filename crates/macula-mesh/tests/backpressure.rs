//! Two real meshes over loopback QUIC: a receiver that stops processing makes the sender's peer
//! queue congested (the sender is told to pause) instead of losing frames; once the receiver
//! catches up the sender is released and every frame arrives, in order.

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use macula_mesh::identity::Keypair;
use macula_mesh::{cert, Frame, MeshConfig, MeshEvent, MeshEvents, MeshHandle, Origin, Sent};

async fn node(
    operator: &SigningKey,
    bootstrap: Vec<macula_mesh::Addr>,
) -> (MeshHandle, MeshEvents) {
    let kp = Keypair::generate_ed25519();
    let c = cert::issue_for(operator, &kp.public().to_peer_id(), 3600);
    let cfg = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        bootstrap,
        peer_queue_bytes: 64 << 10,
        peer_queue_max_bytes: 64 << 20,
        inbound_queue_bytes: 64 << 10,
        ..MeshConfig::default()
    };
    macula_mesh::start(
        cfg,
        kp,
        c,
        std::sync::Arc::new(cert::Trust::new(operator.verifying_key())),
    )
    .await
    .unwrap()
}

async fn next_up(ev: &mut MeshEvents) -> macula_mesh::Peer {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.recv()).await {
            Ok(Some(MeshEvent::PeerUp(p))) => return p,
            Ok(Some(_)) => {}
            other => panic!("no peer came up: {other:?}"),
        }
    }
}

fn publish(n: u64) -> Frame {
    Frame::Publish {
        realm: "com.acme".into(),
        origin: Origin {
            session: n,
            authid: "k".into(),
            authrole: "r".into(),
        },
        msg: Bytes::from(vec![0xa5; 1000]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_congests_the_sender_without_loss() {
    let operator = SigningKey::from_bytes(&[7; 32]);
    let (a, mut a_ev) = node(&operator, vec![]).await;
    let addr = a.listen_addrs().await.remove(0);
    let (b, mut b_ev) = node(&operator, vec![addr]).await;
    let b_id = next_up(&mut a_ev).await;
    assert_eq!(b_id, b.peer_id());
    next_up(&mut b_ev).await;

    // B does not read its events: its inbound budget fills, its reader stops, QUIC flow control
    // stops A's writer, and A's queue for B grows past peer_queue_bytes.
    let mut sent = 0u64;
    let mut congested = false;
    while sent < 100_000 {
        match a.send(&b_id, &publish(sent)) {
            Sent::Queued => {}
            Sent::Congested => congested = true,
            other => panic!("frame {sent} not queued: {other:?}"),
        }
        sent += 1;
        if congested && sent.is_multiple_of(64) {
            // Give the writer a chance to prove it is really stuck, not just behind.
            tokio::time::sleep(Duration::from_millis(1)).await;
            if a.is_congested() && sent > 2_000 {
                break;
            }
        }
    }
    assert!(congested, "a stalled receiver never congested the sender");
    assert!(a.is_congested());
    assert!(
        macula_mesh::take_pressure(),
        "the sending thread was not told to pause"
    );
    assert_eq!(
        a.stats()
            .frames_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // The sender's wait ends once B catches up; every frame arrives once, in order.
    let waiter = tokio::spawn({
        let a = a.clone();
        async move { a.writable().await }
    });
    let mut next = 0u64;
    while next < sent {
        match tokio::time::timeout(Duration::from_secs(10), b_ev.recv()).await {
            Ok(Some(MeshEvent::Frame(_, Frame::Publish { origin, .. }))) => {
                assert_eq!(origin.session, next, "frames out of order");
                next += 1;
            }
            Ok(Some(_)) => {}
            other => panic!("stream ended after {next} of {sent} frames: {other:?}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the sender stayed paused after the receiver drained")
        .unwrap();
    assert!(!a.is_congested());
}
