//! MQTT 3.1.1 conformance of the device edge, byte by byte.
//!
//! Modelled on Mosquitto's broker tests (`test/broker/*.py`): each case
//! writes literal packets to a real `sluice serve` over a plain TCP socket
//! (no MQTT library in between, so malformed packets are possible) and
//! checks the normative response of the OASIS MQTT 3.1.1 standard, cited by
//! its conformance statement id: an exact reply while the connection stays
//! open, or exact bytes followed by the server closing the connection.
//!
//! The server runs with `--allow-anonymous` (`Sluice::start`), so a CONNECT
//! without credentials is accepted under the built-in `anonymous` policy
//! (publish and subscribe to `#`).

mod support;

use rumqttc::{MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::time::Duration;
use support::{Sluice, mqtt_connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any expected reply or close may take.
const BOUND: Duration = Duration::from_secs(10);

/// A valid CONNECT, sent first when a case has `connect: true`.
const CONNECT: &[u8] = &[
    0x10, 0x0E, // CONNECT, remaining length 14
    0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
    0x04, // protocol level 4 (3.1.1)
    0x02, // connect flags: clean session
    0x00, 0x3C, // keep alive 60 s
    0x00, 0x02, b'c', b'f', // client id "cf"
];
/// CONNACK, session present 0, return code 0 (accepted).
const CONNACK_OK: &[u8] = &[0x20, 0x02, 0x00, 0x00];
/// PINGREQ / PINGRESP, used to prove that a connection is still open.
const PINGREQ: &[u8] = &[0xC0, 0x00];
const PINGRESP: &[u8] = &[0xD0, 0x00];
/// DISCONNECT, to end an open case cleanly.
const DISCONNECT: &[u8] = &[0xE0, 0x00];

/// What the server must answer to one step's bytes.
#[derive(Debug)]
enum Expect {
    /// Exactly these bytes, and the connection stays open (checked with a
    /// PINGREQ after the last step).
    Open(&'static [u8]),
    /// Exactly these bytes (possibly none), then the server closes.
    Closed(&'static [u8]),
}

struct Step {
    send: &'static [u8],
    expect: Expect,
}

struct Case {
    name: &'static str,
    /// The conformance statement(s) of MQTT 3.1.1 the case checks.
    spec: &'static str,
    /// Send [`CONNECT`] first and expect [`CONNACK_OK`].
    connect: bool,
    steps: &'static [Step],
    /// The `reason` label of `sluice_connections_closed_total` the close
    /// is counted under, if the edge counts it.
    reason: Option<&'static str>,
    /// Where Sluice does not conform yet: `steps` then describe what it
    /// does now (still a close or a clean refusal), and the test prints
    /// this instead of failing.
    known_deviation: Option<&'static str>,
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // 1. Remaining length.
    Case {
        name: "remaining length with 5 bytes, before CONNECT",
        spec: "§2.2.3 (at most 4 bytes), [MQTT-4.8.0-1]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, // CONNECT
                0xFF, 0xFF, 0xFF, 0xFF, 0x01, // remaining length: 5 bytes, 4 continuation bits
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "remaining length with 5 bytes, after CONNECT",
        spec: "§2.2.3 (at most 4 bytes), [MQTT-4.8.0-1]",
        connect: true,
        steps: &[Step {
            send: &[
                0x30, // PUBLISH QoS 0
                0xFF, 0xFF, 0xFF, 0xFF, 0x7F, // remaining length: 5 bytes
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    // 2. Reserved fixed-header flags.
    Case {
        name: "SUBSCRIBE with fixed-header flags 0000",
        spec: "[MQTT-2.2.2-2] [MQTT-3.8.1-1]",
        connect: true,
        steps: &[Step {
            send: &[
                0x80, 0x08, // SUBSCRIBE with flags 0000 (must be 0010), remaining length 8
                0x00, 0x01, // packet id 1
                0x00, 0x03, b'a', b'/', b'b', // filter "a/b"
                0x00, // requested QoS 0
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "UNSUBSCRIBE with fixed-header flags 0000",
        spec: "[MQTT-2.2.2-2] [MQTT-3.10.1-1]",
        connect: true,
        steps: &[Step {
            send: &[
                0xA0, 0x07, // UNSUBSCRIBE with flags 0000 (must be 0010), remaining length 7
                0x00, 0x01, // packet id 1
                0x00, 0x03, b'a', b'/', b'b', // filter "a/b"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "PUBREL with fixed-header flags 0000",
        spec: "[MQTT-2.2.2-2] [MQTT-3.6.1-1]",
        connect: true,
        steps: &[Step {
            send: &[
                0x60, 0x02, // PUBREL with flags 0000 (must be 0010), remaining length 2
                0x00, 0x01, // packet id 1
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT with fixed-header flags 0001",
        spec: "[MQTT-2.2.2-2]",
        connect: false,
        steps: &[Step {
            send: &[
                0x11, 0x0E, // CONNECT with flags 0001 (must be 0000), remaining length 14
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x02, // clean session
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "PINGREQ with fixed-header flags 0001",
        spec: "[MQTT-2.2.2-2]",
        connect: true,
        steps: &[Step {
            send: &[
                0xC1, 0x00, // PINGREQ with flags 0001 (must be 0000), remaining length 0
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    // 3. Zero-length client id.
    Case {
        name: "zero-length client id with clean session 0",
        spec: "[MQTT-3.1.3-8]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0C, // CONNECT, remaining length 12
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x00, // flags: clean session 0
                0x00, 0x3C, // keep alive 60
                0x00, 0x00, // client id "" (zero length)
            ],
            // CONNACK, return code 2 (identifier rejected), then close.
            expect: Expect::Closed(&[0x20, 0x02, 0x00, 0x02]),
        }],
        reason: None,
        known_deviation: None,
    },
    Case {
        name: "zero-length client id with clean session 1",
        spec: "[MQTT-3.1.3-6] [MQTT-3.1.3-7]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0C, // CONNECT, remaining length 12
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x02, // flags: clean session 1
                0x00, 0x3C, // keep alive 60
                0x00, 0x00, // client id "" (zero length)
            ],
            // CONNACK, accepted.
            expect: Expect::Open(&[0x20, 0x02, 0x00, 0x00]),
        }],
        reason: None,
        known_deviation: None,
    },
    // 4. Wildcards in a PUBLISH topic.
    Case {
        name: "PUBLISH topic with +",
        spec: "[MQTT-3.3.2-2]",
        connect: true,
        steps: &[Step {
            send: &[
                0x30, 0x07, // PUBLISH QoS 0, remaining length 7
                0x00, 0x05, b'a', b'/', b'+', b'/', b'b', // topic "a/+/b"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("bad_topic"),
        known_deviation: None,
    },
    Case {
        name: "PUBLISH topic with #",
        spec: "[MQTT-3.3.2-2]",
        connect: true,
        steps: &[Step {
            send: &[
                0x30, 0x05, // PUBLISH QoS 0, remaining length 5
                0x00, 0x03, b'a', b'/', b'#', // topic "a/#"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("bad_topic"),
        known_deviation: None,
    },
    // 5. UTF-8 in topics.
    Case {
        name: "PUBLISH topic not UTF-8",
        spec: "[MQTT-1.5.3-1]",
        connect: true,
        steps: &[Step {
            send: &[
                0x30, 0x04, // PUBLISH QoS 0, remaining length 4
                0x00, 0x02, 0xC3, 0x28, // topic: 0xC3 0x28 (invalid 2-byte sequence)
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "PUBLISH topic with an encoded surrogate",
        spec: "[MQTT-1.5.3-1]",
        connect: true,
        steps: &[Step {
            send: &[
                0x30, 0x05, // PUBLISH QoS 0, remaining length 5
                0x00, 0x03, 0xED, 0xA0, 0x80, // topic: U+D800 encoded (not allowed in UTF-8)
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "PUBLISH topic with U+0000",
        spec: "[MQTT-1.5.3-2]",
        connect: true,
        steps: &[Step {
            send: &[
                0x30, 0x05, // PUBLISH QoS 0, remaining length 5
                0x00, 0x03, b'a', 0x00, b'b', // topic "a\0b"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("bad_topic"),
        known_deviation: None,
    },
    // 6. A packet before CONNECT.
    Case {
        name: "PUBLISH before CONNECT",
        spec: "[MQTT-3.1.0-1]",
        connect: false,
        steps: &[Step {
            send: &[
                0x30, 0x05, // PUBLISH QoS 0, remaining length 5
                0x00, 0x03, b'a', b'/', b'b', // topic "a/b"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("not_connect"),
        known_deviation: None,
    },
    Case {
        name: "SUBSCRIBE before CONNECT",
        spec: "[MQTT-3.1.0-1]",
        connect: false,
        steps: &[Step {
            send: &[
                0x82, 0x08, // SUBSCRIBE, remaining length 8
                0x00, 0x01, // packet id 1
                0x00, 0x03, b'a', b'/', b'b', // filter "a/b"
                0x00, // requested QoS 0
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("not_connect"),
        known_deviation: None,
    },
    Case {
        name: "PINGREQ before CONNECT",
        spec: "[MQTT-3.1.0-1]",
        connect: false,
        steps: &[Step {
            send: &[0xC0, 0x00], // PINGREQ
            expect: Expect::Closed(&[]),
        }],
        reason: Some("not_connect"),
        known_deviation: None,
    },
    // 7. A second CONNECT.
    Case {
        name: "second CONNECT",
        spec: "[MQTT-3.1.0-2]",
        connect: true,
        steps: &[Step {
            send: CONNECT, // the same valid CONNECT again
            expect: Expect::Closed(&[]),
        }],
        reason: Some("second_connect"),
        known_deviation: None,
    },
    // 8. Size limit: broker.max_payload_bytes (256 KiB) + max_topic_bytes
    // (256) + 16 = 262,416 bytes of remaining length at most.
    Case {
        name: "PUBLISH over the maximum packet size",
        spec: "broker.max_payload_bytes (§4.8 allows the server to close)",
        connect: true,
        steps: &[Step {
            send: &[
                0x30, // PUBLISH QoS 0
                0x91, 0x82, 0x10, // remaining length 17 + 2*128 + 16*16384 = 262,417
                0x00, 0x03, b'a', b'/', b'b', // topic "a/b" (the rest never comes)
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("oversized"),
        known_deviation: None,
    },
    // 9. SUBSCRIBE / UNSUBSCRIBE payloads.
    Case {
        name: "SUBSCRIBE requesting QoS 3",
        spec: "[MQTT-3.8.3-4]",
        connect: true,
        steps: &[Step {
            send: &[
                0x82, 0x08, // SUBSCRIBE, remaining length 8
                0x00, 0x01, // packet id 1
                0x00, 0x03, b'a', b'/', b'b', // filter "a/b"
                0x03, // requested QoS 3
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "SUBSCRIBE with reserved option bits set",
        spec: "[MQTT-3.8.3-4]",
        connect: true,
        steps: &[Step {
            send: &[
                0x82, 0x08, // SUBSCRIBE, remaining length 8
                0x00, 0x01, // packet id 1
                0x00, 0x03, b'a', b'/', b'b', // filter "a/b"
                0x04, // requested QoS 0 with reserved bit 2 set
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "SUBSCRIBE without a topic filter",
        spec: "[MQTT-3.8.3-3]",
        connect: true,
        steps: &[Step {
            send: &[
                0x82, 0x02, // SUBSCRIBE, remaining length 2
                0x00, 0x01, // packet id 1, no payload
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "UNSUBSCRIBE without a topic filter",
        spec: "[MQTT-3.10.3-2]",
        connect: true,
        steps: &[Step {
            send: &[
                0xA2, 0x02, // UNSUBSCRIBE, remaining length 2
                0x00, 0x01, // packet id 1, no payload
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    // 10. PUBLISH QoS 3.
    Case {
        name: "PUBLISH with QoS 3",
        spec: "[MQTT-3.3.1-4]",
        connect: true,
        steps: &[Step {
            send: &[
                0x36, 0x07, // PUBLISH with both QoS bits set, remaining length 7
                0x00, 0x03, b'a', b'/', b'b', // topic "a/b"
                0x00, 0x01, // packet id 1
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    // 11. CONNECT's variable header.
    Case {
        name: "CONNECT protocol level 3",
        spec: "[MQTT-3.1.2-2]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0E, // CONNECT, remaining length 14
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x03, // level 3
                0x02, // clean session
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
            ],
            // CONNACK, return code 1 (unacceptable protocol level), then close.
            expect: Expect::Closed(&[0x20, 0x02, 0x00, 0x01]),
        }],
        reason: Some("protocol_level"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT protocol level 5",
        spec: "[MQTT-3.1.2-2]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0F, // CONNECT, remaining length 15
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x05, // level 5
                0x02, // clean start
                0x00, 0x3C, // keep alive 60
                0x00, // properties length 0 (MQTT 5)
                0x00, 0x02, b'c', b'f', // client id "cf"
            ],
            // CONNACK, return code 1 (unacceptable protocol level), then close.
            expect: Expect::Closed(&[0x20, 0x02, 0x00, 0x01]),
        }],
        reason: Some("protocol_level"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT protocol name MQTX",
        spec: "[MQTT-3.1.2-1]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0E, // CONNECT, remaining length 14
                0x00, 0x04, b'M', b'Q', b'T', b'X', // protocol name "MQTX"
                0x04, // level 4
                0x02, // clean session
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT reserved flag set",
        spec: "[MQTT-3.1.2-3]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0E, // CONNECT, remaining length 14
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x03, // flags: clean session + reserved bit 0
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT will QoS 3",
        spec: "[MQTT-3.1.2-14]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x13, // CONNECT, remaining length 19
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x1E, // flags: will QoS 3 (0x18) + will flag (0x04) + clean session (0x02)
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
                0x00, 0x01, b'w', // will topic "w"
                0x00, 0x00, // will message, empty
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT will QoS 1 without the will flag",
        spec: "[MQTT-3.1.2-11] [MQTT-3.1.2-13]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0E, // CONNECT, remaining length 14
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x0A, // flags: will QoS 1 (0x08) + clean session, will flag 0
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT will retain without the will flag",
        spec: "[MQTT-3.1.2-11] [MQTT-3.1.2-15]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x0E, // CONNECT, remaining length 14
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x22, // flags: will retain (0x20) + clean session, will flag 0
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    Case {
        name: "CONNECT password flag without user name flag",
        spec: "[MQTT-3.1.2-22]",
        connect: false,
        steps: &[Step {
            send: &[
                0x10, 0x11, // CONNECT, remaining length 17
                0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
                0x04, // level 4
                0x42, // flags: password (0x40) + clean session, user name 0
                0x00, 0x3C, // keep alive 60
                0x00, 0x02, b'c', b'f', // client id "cf"
                0x00, 0x01, b'p', // password "p"
            ],
            expect: Expect::Closed(&[]),
        }],
        reason: Some("malformed"),
        known_deviation: None,
    },
    // 12. Positive controls.
    Case {
        name: "PINGREQ",
        spec: "[MQTT-3.12.4-1]",
        connect: true,
        steps: &[Step {
            send: PINGREQ,
            expect: Expect::Open(PINGRESP), // PINGRESP
        }],
        reason: None,
        known_deviation: None,
    },
    Case {
        name: "SUBSCRIBE to a valid filter",
        spec: "[MQTT-3.8.4-1] [MQTT-3.8.4-2] [MQTT-3.9.3-1]",
        connect: true,
        steps: &[Step {
            send: &[
                0x82, 0x08, // SUBSCRIBE, remaining length 8
                0x00, 0x05, // packet id 5
                0x00, 0x03, b'a', b'/', b'b', // filter "a/b"
                0x01, // requested QoS 1
            ],
            expect: Expect::Open(&[
                0x90, 0x03, // SUBACK, remaining length 3
                0x00, 0x05, // packet id 5
                0x01, // granted QoS 1
            ]),
        }],
        reason: None,
        known_deviation: None,
    },
    Case {
        name: "UNSUBSCRIBE a filter",
        spec: "[MQTT-3.10.4-4] [MQTT-3.10.4-5]",
        connect: true,
        steps: &[Step {
            send: &[
                0xA2, 0x07, // UNSUBSCRIBE, remaining length 7
                0x00, 0x06, // packet id 6
                0x00, 0x03, b'a', b'/', b'b', // filter "a/b"
            ],
            expect: Expect::Open(&[
                0xB0, 0x02, // UNSUBACK, remaining length 2
                0x00, 0x06, // packet id 6
            ]),
        }],
        reason: None,
        known_deviation: None,
    },
    Case {
        name: "QoS 1 PUBLISH",
        spec: "[MQTT-4.3.2-2]",
        connect: true,
        steps: &[Step {
            send: &[
                0x32, 0x1E, // PUBLISH QoS 1, remaining length 30
                0x00, 0x13, // topic length 19
                b'd', b'e', b'v', b'i', b'c', b'e', b's', b'/', b'x', b'/', // "devices/x/"
                b't', b'e', b'l', b'e', b'm', b'e', b't', b'r', b'y', // "telemetry"
                0x00, 0x07, // packet id 7
                b'{', b'"', b'v', b'"', b':', b'1', b'}', // payload {"v":1}
            ],
            expect: Expect::Open(&[
                0x40, 0x02, // PUBACK, remaining length 2
                0x00, 0x07, // packet id 7
            ]),
        }],
        reason: None,
        known_deviation: None,
    },
    Case {
        name: "QoS 2 PUBLISH, PUBREL",
        spec: "[MQTT-4.3.3-2] [MQTT-3.6.4-1]",
        connect: true,
        steps: &[
            Step {
                send: &[
                    0x34, 0x1E, // PUBLISH QoS 2, remaining length 30
                    0x00, 0x13, // topic length 19
                    b'd', b'e', b'v', b'i', b'c', b'e', b's', b'/', b'x', b'/', // "devices/x/"
                    b't', b'e', b'l', b'e', b'm', b'e', b't', b'r', b'y', // "telemetry"
                    0x00, 0x08, // packet id 8
                    b'{', b'"', b'v', b'"', b':', b'2', b'}', // payload {"v":2}
                ],
                expect: Expect::Open(&[
                    0x50, 0x02, // PUBREC, remaining length 2
                    0x00, 0x08, // packet id 8
                ]),
            },
            Step {
                send: &[
                    0x62, 0x02, // PUBREL, remaining length 2
                    0x00, 0x08, // packet id 8
                ],
                expect: Expect::Open(&[
                    0x70, 0x02, // PUBCOMP, remaining length 2
                    0x00, 0x08, // packet id 8
                ]),
            },
        ],
        reason: None,
        known_deviation: None,
    },
    Case {
        name: "DISCONNECT",
        spec: "[MQTT-3.14.4-1] (the server closes, no reply)",
        connect: true,
        steps: &[Step {
            send: DISCONNECT,
            expect: Expect::Closed(&[]),
        }],
        reason: None,
        known_deviation: None,
    },
];

/// Reads until the server closes, within [`BOUND`]; a reset counts as the
/// close (what arrived before it is kept).
async fn read_until_close(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut received = Vec::new();
    match tokio::time::timeout(BOUND, s.read_to_end(&mut received)).await {
        Ok(_) => Ok(received),
        Err(_) => Err(format!(
            "still open after {BOUND:?}; received {received:02X?}"
        )),
    }
}

/// Reads exactly `n` bytes within [`BOUND`].
async fn read_exactly(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, String> {
    let mut received = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(BOUND, s.read(&mut received[got..])).await {
            Err(_) => return Err(format!("timed out; received {:02X?}", &received[..got])),
            Ok(Ok(0)) => return Err(format!("closed; received {:02X?}", &received[..got])),
            Ok(Ok(k)) => got += k,
            Ok(Err(e)) => return Err(format!("{e}; received {:02X?}", &received[..got])),
        }
    }
    Ok(received)
}

/// Runs one case; Err describes how the server's answer differed.
async fn run(port: u16, case: &Case) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    if case.connect {
        s.write_all(CONNECT).await.map_err(|e| e.to_string())?;
        let connack = read_exactly(&mut s, CONNACK_OK.len()).await?;
        if connack != CONNACK_OK {
            return Err(format!(
                "CONNACK {connack:02X?}, expected {CONNACK_OK:02X?}"
            ));
        }
    }
    let mut open = true;
    for (i, step) in case.steps.iter().enumerate() {
        // The server may close before reading everything: ignore write errors.
        let _ = s.write_all(step.send).await;
        match step.expect {
            Expect::Open(expected) => {
                let got = read_exactly(&mut s, expected.len())
                    .await
                    .map_err(|e| format!("step {i}: expected {expected:02X?}: {e}"))?;
                if got != expected {
                    return Err(format!(
                        "step {i}: received {got:02X?}, expected {expected:02X?}"
                    ));
                }
            }
            Expect::Closed(expected) => {
                let got = read_until_close(&mut s)
                    .await
                    .map_err(|e| format!("step {i}: expected {expected:02X?} and a close: {e}"))?;
                if got != expected {
                    return Err(format!(
                        "step {i}: received {got:02X?} before the close, expected {expected:02X?}"
                    ));
                }
                open = false;
                break;
            }
        }
    }
    if open {
        // Still open and answering: PINGREQ → PINGRESP, then a clean end.
        s.write_all(PINGREQ).await.map_err(|e| e.to_string())?;
        let got = read_exactly(&mut s, PINGRESP.len())
            .await
            .map_err(|e| format!("not open after the last step: {e}"))?;
        if got != PINGRESP {
            return Err(format!(
                "after the last step: received {got:02X?}, expected PINGRESP"
            ));
        }
        s.write_all(DISCONNECT).await.map_err(|e| e.to_string())?;
        let rest = read_until_close(&mut s).await?;
        if !rest.is_empty() {
            return Err(format!("after DISCONNECT: received {rest:02X?}"));
        }
    }
    Ok(())
}

/// `sluice_connections_closed_total` by reason, from the metrics page.
fn closed_by_reason(metrics: &str) -> BTreeMap<String, u64> {
    let prefix = "sluice_connections_closed_total{reason=\"";
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_conformance() {
    let sluice = Sluice::start(|_| {}).await;
    let before = closed_by_reason(&sluice.metrics().await);

    let mut failures = Vec::new();
    let mut deviations = Vec::new();
    let mut expected_closes: BTreeMap<String, u64> = BTreeMap::new();
    for case in CASES {
        let result = run(sluice.mqtt_port, case).await;
        let verdict = match (&result, case.known_deviation) {
            (Ok(()), None) => "conforms".to_owned(),
            (Ok(()), Some(why)) => {
                deviations.push(format!("{} {}: {why}", case.name, case.spec));
                format!("KNOWN DEVIATION: {why}")
            }
            (Err(e), _) => {
                failures.push(format!("{} {}: {e}", case.name, case.spec));
                format!("FAILED: {e}")
            }
        };
        println!("{:<50} {:<40} {verdict}", case.name, case.spec);
        if let Some(reason) = case.reason {
            *expected_closes.entry(reason.to_owned()).or_default() += 1;
        }
    }
    for d in &deviations {
        println!("deviation from MQTT 3.1.1: {d}");
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}\nsluice log:\n{}",
        failures.len(),
        failures.join("\n"),
        sluice.log()
    );

    // Each counted close moved its counter by exactly the cases' number.
    let after = closed_by_reason(&sluice.metrics().await);
    for (reason, n) in &expected_closes {
        let moved =
            after.get(reason).copied().unwrap_or(0) - before.get(reason).copied().unwrap_or(0);
        assert_eq!(
            moved, *n,
            "sluice_connections_closed_total{{reason=\"{reason}\"}}: {after:?}"
        );
    }

    // The server survived all of it: a healthy client still connects,
    // publishes and gets its PUBACK.
    let mut opts = MqttOptions::new("healthy", "127.0.0.1", sluice.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    let mut healthy = mqtt_connect(opts).await.expect("a healthy client connects");
    healthy
        .client
        .publish("devices/h/telemetry", QoS::AtLeastOnce, false, r#"{"x":1}"#)
        .await
        .unwrap();
    loop {
        match healthy.next().await {
            Ok(Packet::PubAck(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("healthy client closed before PUBACK: {e}"),
        }
    }
    sluice.stop();
}
