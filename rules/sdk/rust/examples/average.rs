//! Per-device 1-minute averages of every numeric metric, kept in rule state
//! and emitted as `<metric>_avg_1m` when the device's next value for that
//! metric falls in a later minute. Values older than the open window are
//! ignored.
#![no_std]

use sluice_rule::{json, text, Error, Message, Rule, Text};

const MINUTE_MS: i64 = 60_000;

/// One metric's open window, as stored in state: 24 bytes, little endian.
struct Window {
    start_ms: i64,
    sum: f64,
    count: u64,
}

impl Window {
    fn open(start_ms: i64, v: f64) -> Window {
        Window {
            start_ms,
            sum: v,
            count: 1,
        }
    }

    fn decode(bytes: &[u8]) -> Option<Window> {
        if bytes.len() != 24 {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            w
        };
        Some(Window {
            start_ms: i64::from_le_bytes(word(0)),
            sum: f64::from_le_bytes(word(8)),
            count: u64::from_le_bytes(word(16)),
        })
    }

    fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.start_ms.to_le_bytes());
        b[8..16].copy_from_slice(&self.sum.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b
    }
}

struct Average;

impl Rule for Average {
    fn new(_config: json::Object) -> Result<Self, Error> {
        Ok(Average)
    }

    fn on_message(&mut self, msg: &Message) -> Result<(), Error> {
        let t = msg.received_at_ms();
        let minute = t - t.rem_euclid(MINUTE_MS);
        for (key, value) in msg.payload_object()?.fields() {
            let v = match value.as_number() {
                Some(v) => v,
                None => continue,
            };
            let metric: Text<256> = key.to_text()?;
            let mut buf = [0u8; 24];
            let next = match msg.state_get(&metric, &mut buf)?.and_then(Window::decode) {
                None => Window::open(minute, v),
                Some(w) if w.start_ms == minute => Window {
                    sum: w.sum + v,
                    count: w.count + 1,
                    ..w
                },
                Some(w) if w.start_ms < minute => {
                    let name: Text<264> = text!("{}_avg_1m", metric)?;
                    msg.emit_point_at(&name, w.sum / w.count as f64, w.start_ms)?;
                    Window::open(minute, v)
                }
                Some(_) => continue, // late: its window was already emitted
            };
            msg.state_set(&metric, &next.encode())?;
        }
        Ok(())
    }
}

sluice_rule::rule!(Average);
