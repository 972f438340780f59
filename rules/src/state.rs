//! Per-device rule state: the committed key/value pairs each (rule, device)
//! owns, shared by every processor worker.
//!
//! Guests read and write state through `state_get` / `state_set` /
//! `state_delete` (ABI v1). Writes made during a call are buffered by the
//! instance ([`StateOverlay`]) and only reach this store when the call
//! succeeds, so a trapped or timed-out batch changes nothing, and its
//! one-message retries start from the same state. Committed changes also
//! leave the processor as [`crate::Output::State`], which the writer stores
//! in PostgreSQL in the same transaction as the batch's other outputs: state
//! on disk never runs ahead of, or behind, the data it was derived from.
//!
//! Bounds: keys are 1..=[`MAX_KEY_BYTES`] bytes of UTF-8; each (rule, device)
//! holds at most the rule's `state_bytes` (keys plus values).

use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::Arc;

/// Longest state key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

type Scope = (Arc<str>, Arc<str>);

#[derive(Default)]
struct DeviceState {
    entries: HashMap<String, Vec<u8>>,
    /// Sum of key and value lengths, the quantity the limit bounds.
    bytes: usize,
}

/// Committed state of every (rule, device). Sharded by the map, and each
/// device's messages are processed by one worker at a time, so contention is
/// between different devices only.
#[derive(Default)]
pub struct StateStore {
    scopes: DashMap<Scope, DeviceState>,
}

/// One committed change, as it is persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    pub rule: Arc<str>,
    pub device_id: Arc<str>,
    pub key: String,
    /// `None`: the key was deleted.
    pub value: Option<Vec<u8>>,
}

impl StateStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Calls `f` with the committed value of `key`, if any.
    pub fn with_value<R>(
        &self,
        rule: &Arc<str>,
        device: &Arc<str>,
        key: &str,
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> R {
        match self.scopes.get(&(rule.clone(), device.clone())) {
            Some(s) => f(s.entries.get(key).map(Vec::as_slice)),
            None => f(None),
        }
    }

    /// Bytes (keys plus values) committed for this (rule, device).
    pub fn bytes(&self, rule: &Arc<str>, device: &Arc<str>) -> usize {
        self.scopes
            .get(&(rule.clone(), device.clone()))
            .map_or(0, |s| s.bytes)
    }

    /// Applies committed changes, in order.
    pub fn apply(&self, changes: &[StateChange]) {
        for c in changes {
            let scope = (c.rule.clone(), c.device_id.clone());
            let mut state = self.scopes.entry(scope.clone()).or_default();
            if let Some(old) = state.entries.remove(&c.key) {
                state.bytes -= c.key.len() + old.len();
            }
            if let Some(value) = &c.value {
                state.bytes += c.key.len() + value.len();
                state.entries.insert(c.key.clone(), value.clone());
            }
            let empty = state.entries.is_empty();
            drop(state);
            if empty {
                self.scopes.remove(&scope);
            }
        }
    }

    /// Forgets every device's state of a rule (the rule was deleted).
    pub fn remove_rule(&self, rule: &str) {
        self.scopes.retain(|(r, _), _| &**r != rule);
    }

    /// Number of (rule, device) scopes holding state.
    pub fn scopes(&self) -> usize {
        self.scopes.len()
    }
}

/// The uncommitted changes of one call into a guest.
#[derive(Default)]
pub struct StateOverlay {
    changes: HashMap<Scope, ScopeChanges>,
    /// Every change in the order the guest made it, with the message it was
    /// made for, so the changes of messages that failed can be left out.
    log: Vec<LoggedChange>,
}

struct LoggedChange {
    scope: Scope,
    key: String,
    value: Option<Vec<u8>>,
    msg: usize,
}

struct ScopeChanges {
    values: HashMap<String, Option<Vec<u8>>>,
    /// Projected bytes of the scope if the call commits.
    bytes: usize,
}

/// Why a `state_set` was refused.
#[derive(Debug, PartialEq)]
pub struct StateLimitExceeded {
    pub would_be: usize,
    pub limit: usize,
}

impl StateOverlay {
    pub fn clear(&mut self) {
        self.changes.clear();
        self.log.clear();
    }

    /// The value as the guest should see it now: its own uncommitted write,
    /// else the committed one.
    pub fn with_value<R>(
        &self,
        store: &StateStore,
        rule: &Arc<str>,
        device: &Arc<str>,
        key: &str,
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> R {
        let pending = self
            .changes
            .get(&(rule.clone(), device.clone()))
            .and_then(|c| c.values.get(key));
        match pending {
            Some(v) => f(v.as_deref()),
            None => store.with_value(rule, device, key, f),
        }
    }

    /// Records a set (`Some`) or delete (`None`) made for message `msg` of
    /// the call, refusing a set that would take the scope past `limit` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        store: &StateStore,
        rule: &Arc<str>,
        device: &Arc<str>,
        key: &str,
        value: Option<&[u8]>,
        limit: usize,
        msg: usize,
    ) -> Result<(), StateLimitExceeded> {
        let old_len = self.with_value(store, rule, device, key, |v| v.map(<[u8]>::len));
        let scope = (rule.clone(), device.clone());
        let changes = self
            .changes
            .entry(scope.clone())
            .or_insert_with(|| ScopeChanges {
                values: HashMap::new(),
                bytes: store.bytes(rule, device),
            });
        let without = changes.bytes - old_len.map_or(0, |l| key.len() + l);
        let would_be = without + value.map_or(0, |v| key.len() + v.len());
        if value.is_some() && would_be > limit {
            return Err(StateLimitExceeded { would_be, limit });
        }
        changes.bytes = would_be;
        changes
            .values
            .insert(key.to_owned(), value.map(<[u8]>::to_vec));
        self.log.push(LoggedChange {
            scope,
            key: key.to_owned(),
            value: value.map(<[u8]>::to_vec),
            msg,
        });
        Ok(())
    }

    /// The call succeeded: returns the changes made for the messages `keep`
    /// accepts (those not sent to the dead letters), the last one per key,
    /// in the order they were made.
    pub fn take_changes(&mut self, keep: impl Fn(usize) -> bool) -> Vec<StateChange> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in self.log.drain(..).rev() {
            // Later writes to a key win; earlier ones are dropped here.
            if !keep(c.msg) || !seen.insert((c.scope.clone(), c.key.clone())) {
                continue;
            }
            out.push(StateChange {
                rule: c.scope.0,
                device_id: c.scope.1,
                key: c.key,
                value: c.value,
            });
        }
        self.changes.clear();
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (Arc<str>, Arc<str>) {
        ("rule".into(), "dev".into())
    }

    #[test]
    fn writes_are_visible_in_the_call_and_committed_once() {
        let store = StateStore::default();
        let (rule, dev) = ids();
        let mut overlay = StateOverlay::default();
        overlay
            .write(&store, &rule, &dev, "k", Some(b"v1"), 100, 0)
            .unwrap();
        overlay
            .write(&store, &rule, &dev, "k", Some(b"v22"), 100, 1)
            .unwrap();
        assert_eq!(
            overlay.with_value(&store, &rule, &dev, "k", |v| v.map(<[u8]>::to_vec)),
            Some(b"v22".to_vec())
        );
        assert!(store.with_value(&rule, &dev, "k", |v| v.is_none()));
        let changes = overlay.take_changes(|_| true);
        assert_eq!(changes.len(), 1);
        store.apply(&changes);
        assert_eq!(store.bytes(&rule, &dev), 4);
    }

    #[test]
    fn the_limit_counts_keys_and_values_after_replacement() {
        let store = StateStore::default();
        let (rule, dev) = ids();
        let mut overlay = StateOverlay::default();
        overlay
            .write(&store, &rule, &dev, "ab", Some(&[0; 8]), 10, 0)
            .unwrap();
        // Replacing the value frees the old one first: 2 + 8 again fits.
        overlay
            .write(&store, &rule, &dev, "ab", Some(&[1; 8]), 10, 0)
            .unwrap();
        let err = overlay
            .write(&store, &rule, &dev, "c", Some(&[0]), 10, 0)
            .unwrap_err();
        assert_eq!(
            err,
            StateLimitExceeded {
                would_be: 12,
                limit: 10
            }
        );
        overlay
            .write(&store, &rule, &dev, "ab", None, 10, 0)
            .unwrap();
        overlay
            .write(&store, &rule, &dev, "c", Some(&[0]), 10, 0)
            .unwrap();
        store.apply(&overlay.take_changes(|_| true));
        assert_eq!(store.bytes(&rule, &dev), 2);
    }

    #[test]
    fn changes_of_failed_messages_are_left_out() {
        let store = StateStore::default();
        let (rule, dev) = ids();
        let mut overlay = StateOverlay::default();
        overlay
            .write(&store, &rule, &dev, "k", Some(b"good"), 100, 0)
            .unwrap();
        overlay
            .write(&store, &rule, &dev, "k", Some(b"bad"), 100, 1)
            .unwrap();
        let changes = overlay.take_changes(|msg| msg != 1);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].value.as_deref(), Some(&b"good"[..]));
    }

    #[test]
    fn deleting_the_last_key_forgets_the_scope() {
        let store = StateStore::default();
        let (rule, dev) = ids();
        let set = StateChange {
            rule: rule.clone(),
            device_id: dev.clone(),
            key: "k".into(),
            value: Some(vec![1]),
        };
        store.apply(std::slice::from_ref(&set));
        assert_eq!(store.scopes(), 1);
        store.apply(&[StateChange { value: None, ..set }]);
        assert_eq!(store.scopes(), 0);
    }
}
