//! What the writer stores: the sink's input contract.

use chrono::{DateTime, Utc};
use std::sync::Arc;

/// One numeric sample of one metric of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct PointRecord {
    pub device_id: Arc<str>,
    pub metric: String,
    pub time: DateTime<Utc>,
    pub value: f64,
}

/// A document a rule emitted, or an unmatched message stored as received.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub device_id: Option<Arc<str>>,
    pub topic: String,
    pub time: DateTime<Utc>,
    /// `None` for an unmatched message stored as received.
    pub rule: Option<String>,
    pub payload: Vec<u8>,
}

/// A message Sluice could not turn into data, kept with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRecord {
    pub device_id: Option<Arc<str>>,
    pub topic: String,
    pub received_at: DateTime<Utc>,
    pub rule: Option<String>,
    pub reason: String,
    pub payload: Vec<u8>,
}

/// A change of one key of a rule's per-device state.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRecord {
    pub rule: Arc<str>,
    pub device_id: Arc<str>,
    pub key: String,
    /// `None`: delete the key.
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Point(PointRecord),
    Event(EventRecord),
    DeadLetter(DeadLetterRecord),
    State(StateRecord),
}
