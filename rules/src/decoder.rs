//! The built-in JSON telemetry decoder.
//!
//! Contract: the payload is a JSON object. Every number becomes a point named
//! by its key, nested objects are flattened with `.` (`{"gps":{"lat":1}}` →
//! `gps.lat`), booleans become 0/1. Strings, arrays and nulls carry no
//! numeric value and are skipped. `ts` is not a point but the time of all of
//! them: Unix epoch milliseconds or an RFC 3339 string; without it, the time
//! of arrival.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

/// Names longer than this are refused rather than stored: they are a sign of
/// keys carrying data, which would explode the series dictionary.
pub const MAX_METRIC_NAME_BYTES: usize = 256;
/// Deeper nesting is refused; telemetry is not that deep.
pub const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub time: DateTime<Utc>,
    pub values: Vec<(String, f64)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload is JSON but not an object")]
    NotAnObject,
    #[error("`ts` must be Unix epoch milliseconds or an RFC 3339 string")]
    BadTimestamp,
    #[error("the telemetry object has no numeric or boolean fields")]
    NoValues,
    #[error("metric name longer than {MAX_METRIC_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("objects nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The time is outside the bounds the storage keeps (see `TimeBounds`).
    #[error("{0}")]
    Time(String),
}

pub fn decode_telemetry(
    payload: &[u8],
    received_at: DateTime<Utc>,
) -> Result<Telemetry, DecodeError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(DecodeError::NotAnObject);
    };
    let time = match object.get("ts") {
        None => received_at,
        Some(ts) => parse_timestamp(ts).ok_or(DecodeError::BadTimestamp)?,
    };
    let mut values = Vec::with_capacity(object.len());
    flatten(&object, "", 0, &mut values)?;
    if values.is_empty() {
        return Err(DecodeError::NoValues);
    }
    Ok(Telemetry { time, values })
}

fn parse_timestamp(ts: &Value) -> Option<DateTime<Utc>> {
    match ts {
        Value::Number(n) => {
            let millis = n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))?;
            Utc.timestamp_millis_opt(millis).single()
        }
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        _ => None,
    }
}

fn flatten(
    object: &Map<String, Value>,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, f64)>,
) -> Result<(), DecodeError> {
    if depth >= MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    for (key, value) in object {
        if depth == 0 && key == "ts" {
            continue;
        }
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let number = match value {
            Value::Number(n) => n.as_f64(),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Object(inner) => {
                flatten(inner, &name, depth + 1, out)?;
                None
            }
            Value::String(_) | Value::Array(_) | Value::Null => None,
        };
        if let Some(v) = number {
            if name.len() > MAX_METRIC_NAME_BYTES {
                return Err(DecodeError::NameTooLong);
            }
            out.push((name, v));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_700_000_000_000).unwrap()
    }

    #[test]
    fn numbers_become_points_at_ts() {
        let t = decode_telemetry(
            br#"{"temperature": 21.5, "humidity": 40, "ts": 1767225600000}"#,
            now(),
        )
        .unwrap();
        assert_eq!(t.time, Utc.timestamp_millis_opt(1_767_225_600_000).unwrap());
        assert_eq!(
            t.values,
            vec![("humidity".into(), 40.0), ("temperature".into(), 21.5)]
        );
    }

    #[test]
    fn nesting_booleans_and_rfc3339() {
        let t = decode_telemetry(
            br#"{"gps": {"lat": 1.5, "fix": true}, "name": "x", "tags": [1], "ts": "2026-01-01T00:00:00+01:00"}"#,
            now(),
        )
        .unwrap();
        assert_eq!(t.time, Utc.timestamp_millis_opt(1_767_222_000_000).unwrap());
        assert_eq!(
            t.values,
            vec![("gps.fix".into(), 1.0), ("gps.lat".into(), 1.5)]
        );
    }

    #[test]
    fn arrival_time_without_ts() {
        assert_eq!(decode_telemetry(br#"{"a": 1}"#, now()).unwrap().time, now());
    }

    #[test]
    fn bad_input_says_why() {
        assert!(matches!(
            decode_telemetry(b"{nope", now()),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(
            decode_telemetry(b"[1,2]", now()),
            Err(DecodeError::NotAnObject)
        );
        assert_eq!(
            decode_telemetry(br#"{"a":1,"ts":"yesterday"}"#, now()),
            Err(DecodeError::BadTimestamp)
        );
        assert_eq!(
            decode_telemetry(br#"{"s":"x"}"#, now()),
            Err(DecodeError::NoValues)
        );
        let deep = "{\"a\":".repeat(20) + "1" + &"}".repeat(20);
        assert_eq!(
            decode_telemetry(deep.as_bytes(), now()),
            Err(DecodeError::TooDeep)
        );
    }
}
