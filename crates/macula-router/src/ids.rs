//! Hash maps keyed by WAMP ids. Ids are integers chosen by the router (random or sequential), so a
//! multiply-rotate hash is enough and much cheaper than SipHash on the message path. Maps keyed
//! by client-chosen values keep the default hasher.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use macula_wamp::Id;

/// Fibonacci-style hasher for integer keys.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by router-assigned ids.
pub type IdMap<V> = HashMap<Id, V, BuildHasherDefault<IdHasher>>;
/// A map keyed by pairs of ids.
pub type IdPairMap<V> = HashMap<(Id, Id), V, BuildHasherDefault<IdHasher>>;

/// A map keyed by client-chosen strings (topics, procedures): a fast hash with a random seed per
/// map, so crafted URIs cannot force collisions.
pub type UriMap<V> = HashMap<String, V, foldhash::fast::RandomState>;
