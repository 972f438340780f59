//! ABI v1 constants and the batch encoding. `rules/ABI.md` is the normative
//! description; keep the two in step.

use crate::Message;

pub const ABI_VERSION: i32 = 1;
/// The only module a guest may import from.
pub const HOST_MODULE: &str = "sluice";

/// Exports a guest must have, with their (params, results) as i32 counts.
pub const EXPORT_MEMORY: &str = "memory";
pub const EXPORT_ABI_VERSION: &str = "sluice_abi_version";
pub const EXPORT_ALLOC: &str = "sluice_alloc";
pub const EXPORT_ON_BATCH: &str = "sluice_on_batch";
/// Optional: receives the manifest's `[config]` as JSON once per instance.
pub const EXPORT_INIT: &str = "sluice_init";

/// Every host function of ABI v1, by import name.
pub const HOST_FUNCTIONS: &[&str] = &[
    "emit_point",
    "emit_event",
    "publish",
    "drop_message",
    "fail",
    "log",
    "state_get",
    "state_set",
    "state_delete",
];

/// A time argument with this value means "the message's arrival time".
pub const TIME_OF_MESSAGE: i64 = i64::MIN;

/// Return codes of host functions.
pub mod status {
    pub const OK: i32 = 0;
    /// The message index is not in the current batch.
    pub const BAD_MESSAGE: i32 = -1;
    /// A pointer/length pair is outside linear memory, or text is not UTF-8.
    pub const BAD_MEMORY: i32 = -2;
    /// The message has reached its output limit; the output was not recorded.
    pub const LIMIT: i32 = -3;
    /// An argument is invalid (event not JSON, NaN value, bad QoS, wildcard topic…).
    pub const INVALID: i32 = -4;
    /// Points need a device, and this message has none.
    pub const NO_DEVICE: i32 = -5;
    /// `state_get`: the key has no value.
    pub const NOT_FOUND: i32 = -6;
}

/// Size of one message descriptor in the batch buffer.
///
/// ```text
/// offset size field
///  0     4    topic_ptr      u32  absolute address of the topic (UTF-8)
///  4     4    topic_len      u32
///  8     4    payload_ptr    u32
/// 12     4    payload_len    u32
/// 16     4    device_ptr     u32  (0 with device_len 0: no device)
/// 20     4    device_len     u32
/// 24     8    received_at_ms i64  Unix epoch milliseconds
/// 32     1    qos            u8
/// 33     1    retain         u8   0 or 1
/// 34     1    hops           u8
/// 35     5    reserved       zero
/// ```
pub const DESCRIPTOR_SIZE: usize = 40;

/// Bytes the batch needs in guest memory: the descriptors, then the strings.
pub fn batch_len(messages: &[&Message]) -> usize {
    messages.len() * DESCRIPTOR_SIZE
        + messages
            .iter()
            .map(|m| m.topic.len() + m.payload.len() + m.device_id.as_deref().map_or(0, str::len))
            .sum::<usize>()
}

/// Lays the batch out for a buffer that starts at guest address `base`.
pub fn encode_batch(base: u32, messages: &[&Message]) -> Vec<u8> {
    let mut out = vec![0u8; batch_len(messages)];
    let mut data = messages.len() * DESCRIPTOR_SIZE;
    for (i, m) in messages.iter().enumerate() {
        let mut put_bytes = |bytes: &[u8], out: &mut [u8]| -> (u32, u32) {
            let start = data;
            out[start..start + bytes.len()].copy_from_slice(bytes);
            data += bytes.len();
            (base + start as u32, bytes.len() as u32)
        };
        let topic = put_bytes(m.topic.as_bytes(), &mut out);
        let payload = put_bytes(&m.payload, &mut out);
        let device = match m.device_id.as_deref() {
            Some(d) => put_bytes(d.as_bytes(), &mut out),
            None => (0, 0),
        };
        let d = &mut out[i * DESCRIPTOR_SIZE..(i + 1) * DESCRIPTOR_SIZE];
        d[0..4].copy_from_slice(&topic.0.to_le_bytes());
        d[4..8].copy_from_slice(&topic.1.to_le_bytes());
        d[8..12].copy_from_slice(&payload.0.to_le_bytes());
        d[12..16].copy_from_slice(&payload.1.to_le_bytes());
        d[16..20].copy_from_slice(&device.0.to_le_bytes());
        d[20..24].copy_from_slice(&device.1.to_le_bytes());
        d[24..32].copy_from_slice(&m.received_at.timestamp_millis().to_le_bytes());
        d[32] = m.qos;
        d[33] = u8::from(m.retain);
        d[34] = m.hops;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[test]
    fn descriptors_point_at_their_bytes() {
        let m = Message {
            topic: "devices/d/t".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            device_id: Some("d".into()),
            received_at: Utc.timestamp_millis_opt(5).unwrap(),
            qos: 1,
            retain: true,
            hops: 2,
        };
        let base = 1000;
        let buf = encode_batch(base, &[&m]);
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
        let slice = |p: u32, l: u32| &buf[(p - base) as usize..(p - base + l) as usize];
        assert_eq!(slice(u32_at(0), u32_at(4)), b"devices/d/t");
        assert_eq!(slice(u32_at(8), u32_at(12)), b"{}");
        assert_eq!(slice(u32_at(16), u32_at(20)), b"d");
        assert_eq!(i64::from_le_bytes(buf[24..32].try_into().unwrap()), 5);
        assert_eq!(&buf[32..35], &[1, 1, 2]);
        assert_eq!(buf.len(), DESCRIPTOR_SIZE + 11 + 2 + 1);
    }
}
