//! Recently delivered batches, so that a QoS 1 redelivery or a device's
//! retry of a batch Kafka already has is acknowledged without producing it
//! again.
//!
//! The identity of a batch is a 128-bit keyed hash of the MQTT topic (which
//! names the device and the encoding) and the exact payload bytes: a redelivery or retry is byte-identical, while a
//! device that restarts its sequence numbers sends new bytes and is never
//! mistaken for a duplicate. The set is bounded (oldest evicted first) and
//! per process; what it misses (another instance of the shared subscription,
//! an older batch) the store's unique key still turns into a no-op.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};

/// A bounded set of batch identities.
#[derive(Debug)]
pub struct RecentBatches {
    capacity: usize,
    order: VecDeque<u128>,
    set: HashSet<u128>,
    keys: (RandomState, RandomState),
}

impl RecentBatches {
    pub fn new(capacity: usize) -> RecentBatches {
        RecentBatches {
            capacity,
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            set: HashSet::with_capacity(capacity.min(1 << 16)),
            keys: (RandomState::new(), RandomState::new()),
        }
    }

    /// The identity of a batch published on `topic`.
    pub fn identity(&self, topic: &str, payload: &[u8]) -> u128 {
        let half = |s: &RandomState| {
            let mut h = s.build_hasher();
            h.write(topic.as_bytes());
            h.write_u8(0xff);
            h.write(payload);
            h.finish()
        };
        (u128::from(half(&self.keys.0)) << 64) | u128::from(half(&self.keys.1))
    }

    pub fn contains(&self, id: u128) -> bool {
        self.set.contains(&id)
    }

    /// Remembers a batch Kafka has acknowledged.
    pub fn insert(&mut self, id: u128) {
        if self.capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_evicted() {
        let mut r = RecentBatches::new(2);
        let a = r.identity("d", b"one");
        let b = r.identity("d", b"two");
        let c = r.identity("d", b"three");
        assert_ne!(a, b);
        assert_ne!(
            r.identity("d", b"one"),
            r.identity("e", b"one"),
            "the topic is part of the identity"
        );
        assert_eq!(a, r.identity("d", b"one"));
        r.insert(a);
        r.insert(b);
        r.insert(b);
        assert!(r.contains(a) && r.contains(b));
        r.insert(c);
        assert!(!r.contains(a), "oldest evicted");
        assert!(r.contains(b) && r.contains(c));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut r = RecentBatches::new(0);
        let a = r.identity("d", b"x");
        r.insert(a);
        assert!(!r.contains(a));
        assert!(r.is_empty());
    }
}
