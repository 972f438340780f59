//! Opaque page tokens: where the next page of a keyset-paginated query starts.
//!
//! A token is the base64url encoding of a kind byte, the last row's time (µs
//! since the Unix epoch) and its tie-breaking key. The kind byte keeps a
//! points token from being used on events and the other way round. (Signing
//! tokens so they are tamper-evident is the API issue's work; a forged token
//! can only move the caller's own window.)

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Points = 1,
    Events = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    pub time: DateTime<Utc>,
    pub key: i64,
}

const LEN: usize = 1 + 8 + 8;

impl PageToken {
    pub fn encode(&self, kind: Kind) -> String {
        let mut raw = [0u8; LEN];
        raw[0] = kind as u8;
        raw[1..9].copy_from_slice(&self.time.timestamp_micros().to_be_bytes());
        raw[9..17].copy_from_slice(&self.key.to_be_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// `None` for anything this server did not issue for this kind of query.
    pub fn decode(token: &str, kind: Kind) -> Option<Self> {
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        if raw.len() != LEN || raw[0] != kind as u8 {
            return None;
        }
        let micros = i64::from_be_bytes(raw[1..9].try_into().ok()?);
        let key = i64::from_be_bytes(raw[9..17].try_into().ok()?);
        let time = Utc.timestamp_micros(micros).single()?;
        Some(Self { time, key })
    }
}

/// Tokens of lists ordered by name (devices, rules): the tagged last name
/// of the page. The tag keeps one list's token from being used on another.
pub fn encode_after_name(tag: &str, last: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{tag}{last}"))
}

/// The name a token from [`encode_after_name`] holds; `Ok(None)` for no
/// token, `INVALID_ARGUMENT` naming `call` for any other.
pub fn decode_after_name(
    token: &str,
    tag: &str,
    call: &str,
) -> Result<Option<String>, tonic::Status> {
    if token.is_empty() {
        return Ok(None);
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| s.strip_prefix(tag).map(str::to_owned))
        .map(Some)
        .ok_or_else(|| {
            tonic::Status::invalid_argument(format!(
                "page_token is not a token this server issued for {call}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_foreign_tokens() {
        let t = PageToken {
            time: Utc.timestamp_micros(1_767_225_600_123_456).unwrap(),
            key: 42,
        };
        let s = t.encode(Kind::Points);
        assert_eq!(PageToken::decode(&s, Kind::Points), Some(t));
        assert_eq!(PageToken::decode(&s, Kind::Events), None);
        assert_eq!(PageToken::decode("garbage!", Kind::Points), None);
        assert_eq!(PageToken::decode("", Kind::Points), None);
    }
}
