//! An encoder for PostgreSQL's binary COPY format ("PGCOPY").
//!
//! sqlx can stream COPY data but has no row encoder, and binary COPY is both
//! faster than CSV for PostgreSQL to parse and free of quoting rules. The format
//! is documented in the PostgreSQL manual, "COPY — Binary Format": a fixed
//! header, then per row a field count followed by length-prefixed big-endian
//! values, then a trailer of -1.

use chrono::{DateTime, Utc};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// 2000-01-01T00:00:00Z, PostgreSQL's timestamp epoch, in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Accumulates rows of one COPY stream in memory.
pub struct BinaryCopyWriter {
    buf: Vec<u8>,
    rows: usize,
}

impl BinaryCopyWriter {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        Self { buf, rows: 0 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn begin_row(&mut self, fields: i16) {
        self.rows += 1;
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    pub fn int4(&mut self, v: i32) {
        self.buf.extend_from_slice(&4i32.to_be_bytes());
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn float8(&mut self, v: f64) {
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
    }

    pub fn timestamptz(&mut self, t: DateTime<Utc>) {
        let micros = t.timestamp_micros() - PG_EPOCH_UNIX_MICROS;
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&micros.to_be_bytes());
    }

    /// A `text` value. PostgreSQL rejects NUL in text, so the caller must
    /// have removed it (see [`sanitize_text`]).
    pub fn text(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub fn bytes(&mut self, b: &[u8]) {
        let len = i32::try_from(b.len()).expect("a COPY field is limited to 1 GiB by PostgreSQL");
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(b);
    }

    pub fn opt_text(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => self.null(),
        }
    }

    pub fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// The complete stream, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

impl Default for BinaryCopyWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// PostgreSQL `text` cannot hold U+0000; replace it rather than fail a whole batch.
pub fn sanitize_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn header_row_and_trailer_follow_the_format() {
        let mut w = BinaryCopyWriter::new();
        w.begin_row(2);
        w.int4(7);
        w.null();
        let out = w.finish();
        assert_eq!(&out[..11], SIGNATURE);
        assert_eq!(&out[11..19], &[0u8; 8]);
        assert_eq!(&out[19..21], &2i16.to_be_bytes());
        assert_eq!(&out[21..25], &4i32.to_be_bytes());
        assert_eq!(&out[25..29], &7i32.to_be_bytes());
        assert_eq!(&out[29..33], &(-1i32).to_be_bytes());
        assert_eq!(&out[33..], &(-1i16).to_be_bytes());
    }

    #[test]
    fn timestamps_count_from_2000() {
        let mut w = BinaryCopyWriter::new();
        w.timestamptz(Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap());
        let out = w.finish();
        assert_eq!(&out[23..31], &1_000_000i64.to_be_bytes());
    }

    #[test]
    fn nul_is_replaced() {
        assert_eq!(sanitize_text("a\0b"), "a\u{FFFD}b");
        assert!(matches!(sanitize_text("ab"), std::borrow::Cow::Borrowed(_)));
    }
}
