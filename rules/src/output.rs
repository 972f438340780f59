//! What rules produce from messages.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Point {
        device_id: Arc<str>,
        metric: String,
        time: DateTime<Utc>,
        value: f64,
    },
    Event {
        device_id: Option<Arc<str>>,
        topic: String,
        time: DateTime<Utc>,
        /// `None` for an unmatched message stored as received.
        rule: Option<Arc<str>>,
        payload: Vec<u8>,
    },
    /// An MQTT message to send back through the broker (and so to its
    /// subscribers and, possibly, other rules).
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        /// The hop count the published message will carry.
        hops: u8,
    },
    DeadLetter {
        device_id: Option<Arc<str>>,
        topic: String,
        received_at: DateTime<Utc>,
        rule: Option<Arc<str>>,
        reason: String,
        payload: Bytes,
    },
    /// A committed change of a rule's per-device state, to persist with
    /// the outputs of the same batch.
    State(crate::state::StateChange),
}

impl Output {
    pub fn dead_letter(msg: &crate::Message, rule: Option<&Arc<str>>, reason: String) -> Self {
        Output::DeadLetter {
            device_id: msg.device_id.clone(),
            topic: msg.topic.clone(),
            received_at: msg.received_at,
            rule: rule.cloned(),
            reason,
            payload: msg.payload.clone(),
        }
    }
}
