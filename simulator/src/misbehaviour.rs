//! The bad messages of the misbehaving profile.
//!
//! A misbehaving device is an environmental sensor that, on a fixed
//! schedule, also sends what a broken firmware would: a payload that is not
//! JSON, a message to a topic outside `devices/{id}/…`, and a payload
//! larger than the broker accepts (which costs it its connection: the
//! device reconnects, as real ones do, in a loop if many misbehave). Bad
//! messages go at QoS 0 and are counted apart from the telemetry, so the
//! telemetry's sequence numbers and acknowledgements still add up exactly.

use crate::args::MAX_PACKET_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadMessage {
    /// Cut-off JSON: the rule pipeline's decoder must dead-letter it.
    TruncatedJson,
    /// `{id}/telemetry`: no `devices/` level, as from a typo in firmware.
    WrongTopic,
    /// Larger than any broker limit the devices are configured for.
    Oversized,
}

/// The bad message sent alongside telemetry message `n` of a device, if
/// any: one in ten is preceded by bad JSON, one in ten by a wrong topic, one
/// in fifty by an oversized payload.
pub fn scheduled(n: u64) -> Option<BadMessage> {
    match (n % 10, n % 50) {
        (3, _) => Some(BadMessage::TruncatedJson),
        (_, 45) => Some(BadMessage::Oversized),
        (7, _) => Some(BadMessage::WrongTopic),
        _ => None,
    }
}

/// Largest packet a misbehaving device will send: room for an oversized
/// payload.
pub const MAX_OUTGOING_PACKET_BYTES: usize = 2 * MAX_PACKET_BYTES;

/// Topic and payload of a bad message of device `id`.
pub fn message(bad: BadMessage, id: &str, telemetry_topic: &str) -> (String, Vec<u8>) {
    match bad {
        BadMessage::TruncatedJson => (
            telemetry_topic.to_owned(),
            br#"{"seq": 1, "temper"#.to_vec(),
        ),
        BadMessage::WrongTopic => (
            format!("{id}/telemetry"),
            br#"{"temperature": 20.5}"#.to_vec(),
        ),
        BadMessage::Oversized => (
            telemetry_topic.to_owned(),
            vec![b' '; MAX_PACKET_BYTES + 1024],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_mixes_every_kind_at_its_share() {
        let kinds: Vec<_> = (0..100).filter_map(scheduled).collect();
        let count = |k| kinds.iter().filter(|&&x| x == k).count();
        assert_eq!(count(BadMessage::TruncatedJson), 10);
        assert_eq!(count(BadMessage::WrongTopic), 10);
        assert_eq!(count(BadMessage::Oversized), 2);
        assert_eq!(scheduled(0), None, "a device starts well behaved");
    }

    #[test]
    fn bad_messages_are_what_they_claim() {
        let topic = "devices/d1/telemetry";
        let (t, p) = message(BadMessage::TruncatedJson, "d1", topic);
        assert_eq!(t, topic);
        assert!(serde_json::from_slice::<serde_json::Value>(&p).is_err());
        let (t, _) = message(BadMessage::WrongTopic, "d1", topic);
        assert!(!t.starts_with("devices/"));
        let (_, p) = message(BadMessage::Oversized, "d1", topic);
        assert!(p.len() > MAX_PACKET_BYTES && p.len() < MAX_OUTGOING_PACKET_BYTES);
    }
}
