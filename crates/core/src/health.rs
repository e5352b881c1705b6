//! Readiness: named conditions that services set, and `/readyz` reports.
//!
//! A service registers each condition it depends on (Kafka reachable, MQTT
//! connected, registry loaded) and flips it as things change. The process is
//! ready when every condition is.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Shared readiness conditions of one process. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    /// Condition name → `None` when ready, `Some(why)` when not.
    conditions: Arc<Mutex<BTreeMap<String, Option<String>>>>,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    pub fn set_ready(&self, name: &str) {
        self.set(name, None);
    }

    pub fn set_not_ready(&self, name: &str, why: impl Into<String>) {
        self.set(name, Some(why.into()));
    }

    /// Sets a condition: `None` ready, `Some(why)` not ready.
    pub fn set(&self, name: &str, state: Option<String>) {
        let mut c = self
            .conditions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match c.get_mut(name) {
            Some(v) => *v = state,
            None => {
                c.insert(name.to_owned(), state);
            }
        }
    }

    /// Whether every condition is ready, and each condition's state.
    pub fn report(&self) -> (bool, BTreeMap<String, Option<String>>) {
        let c = self
            .conditions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (c.values().all(Option::is_none), c)
    }

    /// Whether the named condition is currently ready (`None` if unknown).
    pub fn is_ready(&self, name: &str) -> Option<bool> {
        self.conditions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(Option::is_none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_is() {
        let r = Readiness::new();
        assert!(r.report().0, "no conditions: ready");
        r.set_not_ready("kafka", "broker unreachable");
        r.set_ready("mqtt");
        let (ready, c) = r.report();
        assert!(!ready);
        assert_eq!(c["kafka"].as_deref(), Some("broker unreachable"));
        assert_eq!(r.is_ready("mqtt"), Some(true));
        r.clone().set_ready("kafka");
        assert!(r.report().0, "clones share state");
        assert_eq!(r.is_ready("nope"), None);
    }
}
