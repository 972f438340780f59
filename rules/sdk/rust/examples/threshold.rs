//! Raises an alert when a metric goes above a threshold: an event, and the
//! same document published on `alerts/{device_id}`.
//! Config: {"metric": "temperature", "threshold": 30} (also the defaults).
#![no_std]

use sluice_rule::json::{self, ObjectWriter};
use sluice_rule::{text, Error, Message, Rule, Text};

struct Threshold {
    // Copied out of the config: its buffer is reused for the batches.
    metric: Text<256>,
    threshold: f64,
}

impl Rule for Threshold {
    fn new(config: json::Object) -> Result<Self, Error> {
        let metric = match config.str("metric") {
            Some(m) => m.to_text()?,
            None => Text::try_from("temperature")?,
        };
        let threshold = config.number("threshold").unwrap_or(30.0);
        Ok(Threshold { metric, threshold })
    }

    fn on_message(&mut self, msg: &Message) -> Result<(), Error> {
        let value = match msg.payload_object()?.number(&self.metric) {
            Some(v) if v > self.threshold => v,
            _ => return msg.drop_message(),
        };
        let alert = ObjectWriter::<512>::new()
            .string("metric", &self.metric)
            .number("value", value)
            .number("threshold", self.threshold)
            .finish()?;
        msg.emit_event(&alert)?;
        let topic: Text<300> = text!("alerts/{}", msg.device_id().unwrap_or("unknown"))?;
        msg.publish(&topic, &alert, 1, false)
    }
}

sluice_rule::rule!(Threshold);
