//! {{name}}: a Sluice rule function (ABI v1) in Rust.
//!
//! Every numeric top-level field of a message's JSON payload becomes a point
//! named after the field, at the message's arrival time, and each message
//! gets a line in Sluice's log. A payload that is not a JSON object goes to
//! the dead letters; a message with no numeric field produces nothing (it is
//! counted as dropped).
//!
//! The SDK, `sluice-rule` (vendored in `sluice-rule/`), documents the rest:
//! `publish`, `emit_event`, state, the JSON writer, and the `[config]` table
//! that `Rule::new` receives.
#![no_std]

use sluice_rule::{json, log, Error, Level, Message, Rule};

struct Hello;

impl Rule for Hello {
    /// Called once per instance with the manifest's `[config]` (`{}` here).
    fn new(_config: json::Object) -> Result<Self, Error> {
        Ok(Hello)
    }

    /// Called for each message, in order. An `Err` sends the message to the
    /// dead letters with the error's text as the reason.
    fn on_message(&mut self, msg: &Message) -> Result<(), Error> {
        let mut points = 0;
        for (key, value) in msg.payload_object()?.fields() {
            if let Some(v) = value.as_number() {
                msg.emit_point(&key.to_text::<256>()?, v)?;
                points += 1;
            }
        }
        let device = msg.device_id().unwrap_or("(no device)");
        let unit = if points == 1 { "point" } else { "points" };
        log!(Level::Info, "{}: {} {}", device, points, unit);
        Ok(())
    }
}

sluice_rule::rule!(Hello);
