//! The device edge's reading of what a client sends: the raw-byte checks
//! and rumqttc's parser, exactly as a connection runs them
//! (`decode_client_bytes` is the code behind the socket), then the topic
//! checks a PUBLISH and a SUBSCRIBE go through, and the rules' topic
//! matching against the edge's.
//!
//! Input: one byte choosing the packet size limit, one byte seeding how the
//! stream is cut into socket reads, then the stream itself.
//!
//! Invariants, besides never panicking:
//! - an incomplete packet takes nothing from the buffer;
//! - a packet never spans more than the limit allows;
//! - the packets and the close reason do not depend on how the bytes were
//!   cut into reads (TCP may deliver any split).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;
use sluice_broker::BrokerConfig;
use sluice_broker::acl::filter_matches;
use sluice_broker::edge::connection::decode_client_bytes;
use sluice_broker::edge::presence;
use sluice_broker::limits::{TopicLimits, check_topic_filter, check_topic_name};
use sluice_rules::TopicFilter;

/// Fixed header: one type byte and at most four bytes of remaining length.
const MAX_FIXED_HEADER: usize = 5;

/// What the edge made of a stream: its packets, and why it closed (label
/// and text) or how many bytes of an incomplete packet were left.
#[derive(Debug, PartialEq)]
struct Outcome {
    packets: Vec<Packet>,
    end: End,
}

#[derive(Debug, PartialEq)]
enum End {
    Closed(&'static str, String),
    Waiting(usize),
}

/// Feeds `reads` to the edge one after the other, as a socket would.
fn run<'a>(reads: impl Iterator<Item = &'a [u8]>, max_packet: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            let before = buf.clone();
            match decode_client_bytes(&mut buf, max_packet) {
                Ok(Some(p)) => {
                    let taken = before.len() - buf.len();
                    assert!(taken >= 2, "a packet of {taken} bytes: {p:?}");
                    assert!(
                        taken <= max_packet + MAX_FIXED_HEADER,
                        "{taken} bytes taken with a limit of {max_packet}"
                    );
                    packets.push(p);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "an incomplete packet changed the buffer");
                    break;
                }
                Err((label, text)) => {
                    return Outcome {
                        packets,
                        end: End::Closed(label, text),
                    };
                }
            }
        }
    }
    Outcome {
        packets,
        end: End::Waiting(buf.len()),
    }
}

/// Read sizes from 1 to 64 bytes, from a small deterministic generator.
fn cuts(stream: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x100;
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        // xorshift32: cheap and enough to vary the splits.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state as usize % 64 + 1).min(rest.len());
        let (read, tail) = rest.split_at(n);
        out.push(read);
        rest = tail;
    }
    out
}

/// The checks a connection makes on a decoded packet's topics.
fn check_topics(packets: &[Packet]) {
    let defaults = BrokerConfig::default();
    let limits = TopicLimits {
        max_bytes: defaults.max_topic_bytes,
        max_levels: defaults.max_topic_levels,
    };
    let mut topics = Vec::new();
    let mut filters = Vec::new();
    for p in packets {
        match p {
            Packet::Publish(p) if check_topic_name(&p.topic, limits).is_ok() => {
                assert!(!p.topic.contains(['+', '#', '\0']), "{:?}", p.topic);
                topics.push(p.topic.as_str());
            }
            Packet::Subscribe(s) => {
                for f in &s.filters {
                    let inner = f
                        .path
                        .strip_prefix("$share/")
                        .and_then(|rest| rest.split_once('/'))
                        .map_or(f.path.as_str(), |(_, inner)| inner);
                    if check_topic_filter(inner, limits).is_ok() {
                        check_namespace(inner);
                        filters.push(inner);
                    }
                }
            }
            Packet::Unsubscribe(u) => u.topics.iter().for_each(|t| check_namespace(t)),
            _ => {}
        }
    }
    // Bounded: a stream of many small packets must not make this quadratic.
    for f in filters.iter().take(16) {
        // The rules route by the same filters: a rule must see what an MQTT
        // subscriber with that filter would.
        let rule_filter = TopicFilter::new(f).ok();
        for t in topics.iter().take(16) {
            let subscriber = filter_matches(f, t);
            if let Some(rule) = &rule_filter {
                assert_eq!(
                    subscriber,
                    rule.matches(t),
                    "filter {f:?}, topic {t:?}: the edge and the rules disagree"
                );
            }
        }
        // A filter without wildcards matches the topic of the same text.
        if !f.contains(['+', '#']) {
            assert!(filter_matches(f, f), "{f:?} does not match itself");
        }
    }
}

/// The `$sluice/` namespace maps to the router's and back unchanged.
fn check_namespace(topic: &str) {
    if let Some(inside) = presence::to_router(topic) {
        assert_eq!(presence::from_router(&inside).as_deref(), Some(topic));
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, seed, stream @ ..] = data else {
        return;
    };
    // The server's default limit, or a small one so that the oversize path
    // is reached with small inputs.
    let max_packet = match limit {
        0..=127 => BrokerConfig::default().max_packet_bytes(),
        n => 16 + usize::from(n - 128) * 4,
    };
    let whole = run(std::iter::once(stream), max_packet);
    let split = run(cuts(stream, *seed).into_iter(), max_packet);
    assert_eq!(
        whole, split,
        "the outcome depends on how the stream was cut"
    );
    check_topics(&whole.packets);
});
