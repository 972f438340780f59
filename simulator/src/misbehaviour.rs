//! The bad messages of the misbehaving profile.
//!
//! A misbehaving device is an environmental sensor that, on a fixed
//! schedule, also sends what a broken firmware would: a payload that is not
//! JSON, a message to a topic outside `devices/{id}/…`, and a payload
//! larger than the broker accepts (which costs it its connection: the
//! device reconnects, as real ones do, in a loop if many misbehave). Bad
//! messages go at QoS 0 and are counted apart from the telemetry, so the
//! telemetry's sequence numbers and acknowledgements still add up exactly.
//!
//! Once in a while it also has a *reconnect storm*, as a device with a
//! confused network stack or a restarting firmware does: it opens several
//! connections with its own client id in quick succession. Each one takes
//! the session over at the broker, which closes the previous holder,
//! including the device's own main connection (see `storm.rs`).

use crate::args::MAX_PACKET_BYTES;

/// What a misbehaving device does before one of its telemetry messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    Send(BadMessage),
    ReconnectStorm,
}

/// Extra connections opened by one reconnect storm.
pub const STORM_CONNECTIONS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadMessage {
    /// Cut-off JSON: the rule pipeline's decoder must dead-letter it.
    TruncatedJson,
    /// `{id}/telemetry`: no `devices/` level, as from a typo in firmware.
    WrongTopic,
    /// Larger than any broker limit the devices are configured for.
    Oversized,
}

/// What precedes telemetry message `n` of a device, if anything: one in
/// ten is preceded by bad JSON, one in ten by a wrong topic, one in fifty
/// by an oversized payload, one in a hundred by a reconnect storm. At most
/// one thing per message, and the storm at 11 (mod 100) comes early enough
/// that even a short run has one.
pub fn scheduled(n: u64) -> Option<Misbehaviour> {
    match (n % 10, n % 50, n % 100) {
        (3, _, _) => Some(Misbehaviour::Send(BadMessage::TruncatedJson)),
        (_, 45, _) => Some(Misbehaviour::Send(BadMessage::Oversized)),
        (7, _, _) => Some(Misbehaviour::Send(BadMessage::WrongTopic)),
        (_, _, 11) => Some(Misbehaviour::ReconnectStorm),
        _ => None,
    }
}

impl BadMessage {
    /// Whether the broker may close the connection over this message:
    /// Sluice does for an oversized packet, and for a publish outside the
    /// device's ACL (the wrong topic, for an authenticated device).
    pub fn may_cut_off(self) -> bool {
        matches!(self, BadMessage::Oversized | BadMessage::WrongTopic)
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
        for window in [0..100, 100..200, 12_300..12_400] {
            let kinds: Vec<_> = window.filter_map(scheduled).collect();
            let count = |k| kinds.iter().filter(|&&x| x == k).count();
            assert_eq!(count(Misbehaviour::Send(BadMessage::TruncatedJson)), 10);
            assert_eq!(count(Misbehaviour::Send(BadMessage::WrongTopic)), 10);
            assert_eq!(count(Misbehaviour::Send(BadMessage::Oversized)), 2);
            assert_eq!(count(Misbehaviour::ReconnectStorm), 1);
        }
        assert_eq!(scheduled(0), None, "a device starts well behaved");
    }

    #[test]
    fn the_storm_collides_with_no_bad_message() {
        // `scheduled` can only return one thing: check the storm's slots
        // would have been free, so no bad message is crowded out.
        let storms: Vec<u64> = (0..1000)
            .filter(|&n| scheduled(n) == Some(Misbehaviour::ReconnectStorm))
            .collect();
        assert_eq!(storms, [11, 111, 211, 311, 411, 511, 611, 711, 811, 911]);
        for n in storms {
            assert!(n % 10 != 3 && n % 10 != 7 && n % 50 != 45, "{n}");
        }
    }

    #[test]
    fn only_what_the_broker_may_refuse_cuts_off() {
        assert!(BadMessage::Oversized.may_cut_off());
        assert!(BadMessage::WrongTopic.may_cut_off());
        assert!(!BadMessage::TruncatedJson.may_cut_off());
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
