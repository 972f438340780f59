//! Opaque, tamper-evident page tokens: where the next page of a paginated
//! query starts.
//!
//! A token is the base64url encoding of a body (what the query needs to
//! resume) followed by the first 16 bytes of an HMAC-SHA256 over the token's
//! kind, the query it was issued for and the body. The key is the server's
//! own (`server_keys`, shared by every server on the database), so a token
//! cannot be forged or edited, and one issued for another kind of list or
//! another query (other device, metric, range, filter) is refused rather
//! than silently moving the caller's window.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{KeyInit, Mac};
use tonic::Status;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of the MAC kept in a token: 128 bits are far beyond guessing.
const MAC_LEN: usize = 16;

/// The purpose under which the signing key is kept in `server_keys`.
pub const KEY_PURPOSE: &str = "page_tokens";

/// What a token pages through; part of the MAC, so a token of one kind is
/// refused by the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Points = 1,
    Events = 2,
    Devices = 3,
    Rules = 4,
    Latest = 5,
    Metrics = 6,
    Aggregates = 7,
    DevicesWithData = 8,
}

/// Where a time-ordered page ended: the last row's time and its
/// tie-breaking key (series id or event id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    pub time: DateTime<Utc>,
    pub key: i64,
}

/// Signs and checks page tokens with the server's key.
#[derive(Clone)]
pub struct PageSigner {
    key: [u8; 32],
}

impl PageSigner {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn mac(&self, kind: Kind, query: &[u8], body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(&[kind as u8]);
        // Length-prefixed, so no (query, body) split can collide with another.
        mac.update(&(query.len() as u64).to_be_bytes());
        mac.update(query);
        mac.update(body);
        mac
    }

    fn seal(&self, kind: Kind, query: &[u8], body: &[u8]) -> String {
        let tag = self.mac(kind, query, body).finalize().into_bytes();
        let mut raw = Vec::with_capacity(body.len() + MAC_LEN);
        raw.extend_from_slice(body);
        raw.extend_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The body of a token this server sealed for `kind` and `query`;
    /// `None` for anything else (checked in constant time).
    fn open(&self, kind: Kind, query: &[u8], token: &str) -> Option<Vec<u8>> {
        let mut raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        if raw.len() < MAC_LEN {
            return None;
        }
        let tag = raw.split_off(raw.len() - MAC_LEN);
        self.mac(kind, query, &raw)
            .verify_truncated_left(&tag)
            .ok()?;
        Some(raw)
    }

    /// A token for a time-ordered query; `query` identifies the request's
    /// filters (see [`fingerprint`]).
    pub fn encode(&self, kind: Kind, query: &[u8], t: &PageToken) -> String {
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&t.time.timestamp_micros().to_be_bytes());
        body[8..].copy_from_slice(&t.key.to_be_bytes());
        self.seal(kind, query, &body)
    }

    /// `Ok(None)` for no token; `INVALID_ARGUMENT` for one this server did
    /// not issue for this kind of query with these filters.
    pub fn decode(
        &self,
        kind: Kind,
        query: &[u8],
        token: &str,
    ) -> Result<Option<PageToken>, Status> {
        self.decode_with(kind, query, token, |body| {
            let micros = i64::from_be_bytes(body.get(..8)?.try_into().ok()?);
            let key = i64::from_be_bytes(body.get(8..)?.try_into().ok()?);
            let time = Utc.timestamp_micros(micros).single()?;
            Some(PageToken { time, key })
        })
    }

    /// An empty token is no position; any other must open and `parse`.
    fn decode_with<T>(
        &self,
        kind: Kind,
        query: &[u8],
        token: &str,
        parse: impl FnOnce(Vec<u8>) -> Option<T>,
    ) -> Result<Option<T>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        self.open(kind, query, token)
            .and_then(parse)
            .map(Some)
            .ok_or_else(bad_token)
    }

    /// A token for a list ordered by name (devices, rules): the page's last name.
    pub fn encode_after_name(&self, kind: Kind, query: &[u8], last: &str) -> String {
        self.seal(kind, query, last.as_bytes())
    }

    /// The name a token from [`Self::encode_after_name`] holds; `Ok(None)`
    /// for no token, `INVALID_ARGUMENT` for any other.
    pub fn decode_after_name(
        &self,
        kind: Kind,
        query: &[u8],
        token: &str,
    ) -> Result<Option<String>, Status> {
        self.decode_with(kind, query, token, |body| String::from_utf8(body).ok())
    }

    /// A token for a list ordered by series: the page's last (device, metric).
    pub fn encode_after_series(
        &self,
        kind: Kind,
        query: &[u8],
        device: &str,
        metric: &str,
    ) -> String {
        self.encode_after_name(kind, query, &series_position(device, metric))
    }

    /// The (device, metric) a token from [`Self::encode_after_series`] holds.
    pub fn decode_after_series(
        &self,
        kind: Kind,
        query: &[u8],
        token: &str,
    ) -> Result<Option<(String, String)>, Status> {
        self.decode_with(kind, query, token, |body| {
            let position = String::from_utf8(body).ok()?;
            let (device, metric) = position.split_once('\0')?;
            Some((device.to_owned(), metric.to_owned()))
        })
    }
}

/// A series' place in a list, as a token holds it (names never hold NUL:
/// requests with one are refused).
fn series_position(device: &str, metric: &str) -> String {
    format!("{device}\0{metric}")
}

fn bad_token() -> Status {
    Status::invalid_argument(
        "page_token is not a token this server issued for this call with these \
         arguments; pass back next_page_token unchanged, with the same request",
    )
}

/// The filters of a request, as MAC input: each part length-prefixed, so
/// ("ab", "c") and ("a", "bc") differ.
pub fn fingerprint(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> PageSigner {
        PageSigner::new([7; 32])
    }

    #[test]
    fn round_trips_and_rejects_foreign_tokens() {
        let s = signer();
        let t = PageToken {
            time: Utc.timestamp_micros(1_767_225_600_123_456).unwrap(),
            key: 42,
        };
        let q = fingerprint(&[b"dev-1", b"temperature"]);
        let token = s.encode(Kind::Points, &q, &t);
        assert_eq!(s.decode(Kind::Points, &q, &token).unwrap(), Some(t));
        assert_eq!(s.decode(Kind::Points, &q, "").unwrap(), None);
        // Another kind, another query, another server, garbage.
        assert!(s.decode(Kind::Events, &q, &token).is_err());
        let other = fingerprint(&[b"dev-2", b"temperature"]);
        assert!(s.decode(Kind::Points, &other, &token).is_err());
        assert!(
            PageSigner::new([8; 32])
                .decode(Kind::Points, &q, &token)
                .is_err()
        );
        assert!(s.decode(Kind::Points, &q, "garbage!").is_err());
        assert_eq!(
            s.decode(Kind::Points, &q, "AAAA").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn any_edit_of_a_token_is_detected() {
        let s = signer();
        let q = fingerprint(&[b"prefix"]);
        let token = s.encode_after_name(Kind::Devices, &q, "dev-0042");
        assert_eq!(
            s.decode_after_name(Kind::Devices, &q, &token).unwrap(),
            Some("dev-0042".to_owned())
        );
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..raw.len() {
            raw[i] ^= 1;
            let edited = URL_SAFE_NO_PAD.encode(&raw);
            assert!(
                s.decode_after_name(Kind::Devices, &q, &edited).is_err(),
                "byte {i}"
            );
            raw[i] ^= 1;
        }
        // A name token is no points token, even with a 16-byte body.
        let name16 = s.encode_after_name(Kind::Devices, &q, "0123456789abcdef");
        assert!(s.decode(Kind::Points, &q, &name16).is_err());
    }

    #[test]
    fn fingerprints_keep_parts_apart() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
    }
}
