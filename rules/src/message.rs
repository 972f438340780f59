//! The rules engine's input: one MQTT message as the broker accepted it.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// The device the message belongs to (today: from the `devices/{id}/…` topic
    /// convention; with authentication, the authenticated client).
    pub device_id: Option<Arc<str>>,
    pub received_at: DateTime<Utc>,
    pub qos: u8,
    pub retain: bool,
    /// How many rule publishes led to this message (0: it came from a client).
    pub hops: u8,
}
