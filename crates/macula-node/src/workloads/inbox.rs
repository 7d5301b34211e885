//! The controller's inbox: workload messages from peers (placement, status, logs) and lease
//! authorities' answers, and those this node sends itself. Bounded: a peer that floods it
//! loses its own messages (each exchange tolerates loss: tenders and acquisitions time out).
//! Imports nothing of the node.

use macula_workloads::lease::Answer;
use macula_workloads::wire::Work;
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// One message for the controller.
#[derive(Debug)]
pub enum InMsg {
    Work(Work),
    Lease(Answer),
}

/// Messages and who sent them (a peer id, or this node's own).
pub type Inbound = (String, InMsg);

pub struct Inbox {
    tx: mpsc::Sender<Inbound>,
    rx: Mutex<Option<mpsc::Receiver<Inbound>>>,
}

impl Inbox {
    pub fn new(capacity: usize) -> Inbox {
        let (tx, rx) = mpsc::channel(capacity);
        Inbox {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Queues `msg` from `from`; false (dropped) when the inbox is full or nobody reads it.
    pub fn push(&self, from: String, msg: InMsg) -> bool {
        self.tx.try_send((from, msg)).is_ok()
    }

    /// The receiving end, for the one controller.
    pub fn take(&self) -> Option<mpsc::Receiver<Inbound>> {
        self.rx.lock().take()
    }
}
