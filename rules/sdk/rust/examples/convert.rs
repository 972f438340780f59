//! Rewrites telemetry into SI units: `*_f` -> `*_c`, `*_psi` -> `*_kpa`,
//! `*_mph` -> `*_kmh`; other numeric fields become points unchanged.
#![no_std]

use sluice_rule::{json, text, Error, Message, Rule, Text};

struct Convert;

impl Rule for Convert {
    fn new(_config: json::Object) -> Result<Self, Error> {
        Ok(Convert)
    }

    fn on_message(&mut self, msg: &Message) -> Result<(), Error> {
        for (key, value) in msg.payload_object()?.fields() {
            if let Some(v) = value.as_number() {
                let (metric, si) = to_si(&key.to_text::<256>()?, v)?;
                msg.emit_point(&metric, si)?;
            }
        }
        Ok(())
    }
}

/// The metric name and value a field becomes.
fn to_si(key: &str, v: f64) -> Result<(Text<256>, f64), Error> {
    let (metric, si) = if let Some(base) = key.strip_suffix("_f") {
        (text!("{}_c", base), (v - 32.0) * 5.0 / 9.0)
    } else if let Some(base) = key.strip_suffix("_psi") {
        (text!("{}_kpa", base), v * 6.894757)
    } else if let Some(base) = key.strip_suffix("_mph") {
        (text!("{}_kmh", base), v * 1.609344)
    } else {
        (Text::try_from(key), v)
    };
    Ok((metric?, si))
}

sluice_rule::rule!(Convert);
