//! A realm's handle on this node: the lock around its router core, and the realms to tick.

#[allow(unused_imports)]
use super::*;

/// A realm and the lock around its router core.
pub struct RealmHandle {
    pub name: String,
    pub(super) core: Mutex<Realm<NodePeer>>,
    /// This handle, for the list of realms to tick.
    pub(super) me: std::sync::Weak<RealmHandle>,
    /// Whether the handle is in `ticking` (its dealer has call deadlines).
    pub(super) in_ticking: std::sync::atomic::AtomicBool,
    pub(super) ticking: Arc<Ticking>,
    /// The member answering the node's own procedures (`macula.dht.*`), when the mesh is on.
    pub service: Option<Id>,
    /// Whether this node announced itself as serving the realm (a DHT provider record, which
    /// makes the realm's other serving nodes connect to it). Only nodes with sessions of their
    /// own do: a node that merely holds a peer's interest does not pull the whole realm in.
    pub(super) provided: std::sync::atomic::AtomicBool,
}

impl RealmHandle {
    /// Whether sessions of this node joined the realm (it is then a provider of it).
    pub fn serves_sessions(&self) -> bool {
        self.provided.load(Ordering::Acquire)
    }

    /// Locks the realm's core; a poisoned lock (a panic elsewhere) is recovered, not propagated.
    /// When the guard is dropped, a realm that now has call deadlines joins the node's list of
    /// realms to tick (one atomic load otherwise).
    pub fn lock(&self) -> RealmGuard<'_> {
        let guard = match self.core.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        RealmGuard {
            guard,
            handle: self,
        }
    }
}

/// The realms whose dealers have call deadlines: the only ones the node's timer visits, so
/// that idle realms cost no periodic work.
#[derive(Default)]
pub struct Ticking(pub(super) Mutex<Vec<std::sync::Weak<RealmHandle>>>);

/// A locked realm (see [`RealmHandle::lock`]).
pub struct RealmGuard<'a> {
    guard: std::sync::MutexGuard<'a, Realm<NodePeer>>,
    handle: &'a RealmHandle,
}

impl std::ops::Deref for RealmGuard<'_> {
    type Target = Realm<NodePeer>;
    fn deref(&self) -> &Realm<NodePeer> {
        &self.guard
    }
}

impl std::ops::DerefMut for RealmGuard<'_> {
    fn deref_mut(&mut self) -> &mut Realm<NodePeer> {
        &mut self.guard
    }
}

impl Drop for RealmGuard<'_> {
    fn drop(&mut self) {
        // Under the realm's lock, so the timer's removal (also under it) cannot race this.
        if !self.handle.in_ticking.load(Ordering::Relaxed) && self.guard.has_deadlines() {
            self.handle.in_ticking.store(true, Ordering::Relaxed);
            self.handle
                .ticking
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(self.handle.me.clone());
        }
    }
}
