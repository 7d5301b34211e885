//! What the runtime tests share.

use std::time::Duration;

use macula_workloads::runtime::supervisor::ReplicaState;

/// Waits (up to 60 s per change) until the supervised replica's state is `done`; that state.
pub async fn until(
    rx: &mut tokio::sync::watch::Receiver<ReplicaState>,
    done: impl Fn(&ReplicaState) -> bool,
) -> ReplicaState {
    loop {
        let s = rx.borrow_and_update().clone();
        if done(&s) {
            return s;
        }
        tokio::time::timeout(Duration::from_secs(60), rx.changed())
            .await
            .unwrap_or_else(|_| panic!("state changed in time (last {s:?})"))
            .expect("supervisor alive");
    }
}
