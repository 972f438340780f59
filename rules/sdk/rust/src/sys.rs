//! The raw `sluice` host functions of ABI v1, exactly as `rules/ABI.md`
//! lists them. Pointers are guest addresses, lengths are byte counts, and
//! every function returns a status from [`status`](crate::status).
//!
//! Prefer the safe methods of [`Message`](crate::Message) and
//! [`log`](crate::log()); these are here for rules that need something the
//! wrappers do not offer.
//!
//! Off wasm32 (unit tests, `cargo check` on the host) there is no host: the
//! functions exist so that rule code compiles, and report `BAD_MESSAGE`
//! ("no batch is running").

#[cfg(target_arch = "wasm32")]
mod imports {
    // rustc mangles the symbols of wasm imports that name a module, so this
    // `log` cannot collide with libm's `log` in compiler-builtins.
    #[link(wasm_import_module = "sluice")]
    extern "C" {
        pub fn emit_point(
            msg: i32,
            metric_ptr: i32,
            metric_len: i32,
            value: f64,
            time_ms: i64,
        ) -> i32;
        pub fn emit_event(msg: i32, json_ptr: i32, json_len: i32, time_ms: i64) -> i32;
        pub fn publish(
            msg: i32,
            topic_ptr: i32,
            topic_len: i32,
            payload_ptr: i32,
            payload_len: i32,
            qos: i32,
            retain: i32,
        ) -> i32;
        pub fn drop_message(msg: i32) -> i32;
        pub fn fail(msg: i32, reason_ptr: i32, reason_len: i32) -> i32;
        pub fn log(level: i32, ptr: i32, len: i32) -> i32;
        pub fn state_get(msg: i32, key_ptr: i32, key_len: i32, buf_ptr: i32, buf_cap: i32) -> i32;
        pub fn state_set(
            msg: i32,
            key_ptr: i32,
            key_len: i32,
            value_ptr: i32,
            value_len: i32,
        ) -> i32;
        pub fn state_delete(msg: i32, key_ptr: i32, key_len: i32) -> i32;
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[allow(
    unused_variables,
    clippy::missing_safety_doc,
    clippy::too_many_arguments
)]
mod imports {
    use crate::status::BAD_MESSAGE;

    pub unsafe fn emit_point(
        msg: i32,
        metric_ptr: i32,
        metric_len: i32,
        value: f64,
        time_ms: i64,
    ) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn emit_event(msg: i32, json_ptr: i32, json_len: i32, time_ms: i64) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn publish(
        msg: i32,
        topic_ptr: i32,
        topic_len: i32,
        payload_ptr: i32,
        payload_len: i32,
        qos: i32,
        retain: i32,
    ) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn drop_message(msg: i32) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn fail(msg: i32, reason_ptr: i32, reason_len: i32) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn log(level: i32, ptr: i32, len: i32) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn state_get(
        msg: i32,
        key_ptr: i32,
        key_len: i32,
        buf_ptr: i32,
        buf_cap: i32,
    ) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn state_set(
        msg: i32,
        key_ptr: i32,
        key_len: i32,
        value_ptr: i32,
        value_len: i32,
    ) -> i32 {
        BAD_MESSAGE
    }
    pub unsafe fn state_delete(msg: i32, key_ptr: i32, key_len: i32) -> i32 {
        BAD_MESSAGE
    }
}

pub use imports::*;
