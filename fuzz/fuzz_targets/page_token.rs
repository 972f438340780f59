//! Page tokens: what a caller sends back as `page_token`, and the tokens
//! the server issues.
//!
//! Input: structured (`arbitrary`): a key, kinds, a query fingerprint, the
//! positions to encode and a token string as a caller could send it.
//!
//! Invariants, besides never panicking:
//! - every position round-trips: decode(encode(x)) == x, for time-ordered
//!   (microsecond times, as PostgreSQL keeps them), name and series tokens;
//! - a token is refused by another kind of list and by another query;
//! - a token from a caller opens only if it is exactly the string the
//!   server would issue for what it holds, and a refusal is always
//!   `INVALID_ARGUMENT`.

#![no_main]

use arbitrary::Arbitrary;
use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use sluice_proto::page_token::{Kind, PageSigner, PageToken, fingerprint};
use tonic::Code;

const KINDS: [Kind; 8] = [
    Kind::Points,
    Kind::Events,
    Kind::Devices,
    Kind::Rules,
    Kind::Latest,
    Kind::Metrics,
    Kind::Aggregates,
    Kind::DevicesWithData,
];

#[derive(Debug, Arbitrary)]
struct Input {
    key: [u8; 32],
    kind: u8,
    other_kind: u8,
    query: Vec<Vec<u8>>,
    other_query: Vec<Vec<u8>>,
    micros: i64,
    row_key: i64,
    name: String,
    device: String,
    metric: String,
    token: String,
}

fn kind(n: u8) -> Kind {
    KINDS[usize::from(n) % KINDS.len()]
}

fn query(parts: &[Vec<u8>]) -> Vec<u8> {
    fingerprint(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

fuzz_target!(|input: Input| {
    let signer = PageSigner::new(input.key);
    let (kind, other_kind) = (kind(input.kind), kind(input.other_kind));
    let (q, other_q) = (query(&input.query), query(&input.other_query));
    let foreign = |token: &str| {
        if other_kind != kind {
            assert!(signer.decode_after_name(other_kind, &q, token).is_err());
        }
        if other_q != q {
            assert!(signer.decode_after_name(kind, &other_q, token).is_err());
        }
    };

    if let Some(time) = Utc.timestamp_micros(input.micros).single() {
        let position = PageToken {
            time,
            key: input.row_key,
        };
        let token = signer.encode(kind, &q, &position);
        assert_eq!(signer.decode(kind, &q, &token).unwrap(), Some(position));
        foreign(&token);
    }

    let token = signer.encode_after_name(kind, &q, &input.name);
    assert_eq!(
        signer.decode_after_name(kind, &q, &token).unwrap(),
        Some(input.name.clone())
    );
    foreign(&token);

    // Names with NUL are refused before any token is made (see
    // `series_position`).
    if !input.device.contains('\0') {
        let token = signer.encode_after_series(kind, &q, &input.device, &input.metric);
        assert_eq!(
            signer.decode_after_series(kind, &q, &token).unwrap(),
            Some((input.device.clone(), input.metric.clone()))
        );
    }

    // What a caller sends.
    match signer.decode(kind, &q, &input.token) {
        Ok(None) => assert!(input.token.is_empty()),
        Ok(Some(position)) => assert_eq!(signer.encode(kind, &q, &position), input.token),
        Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
    }
    match signer.decode_after_name(kind, &q, &input.token) {
        Ok(None) => assert!(input.token.is_empty()),
        Ok(Some(name)) => assert_eq!(signer.encode_after_name(kind, &q, &name), input.token),
        Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
    }
    match signer.decode_after_series(kind, &q, &input.token) {
        Ok(None) => assert!(input.token.is_empty()),
        Ok(Some((device, metric))) => assert_eq!(
            signer.encode_after_series(kind, &q, &device, &metric),
            input.token
        ),
        Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
    }
});
