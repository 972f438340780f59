//! Write Sluice rule functions in Rust (ABI v1, see `rules/ABI.md`).
//!
//! A rule is a type implementing [`Rule`]; [`rule!`] turns it into a
//! WebAssembly module with the exports Sluice needs, so the rule itself is
//! safe code:
//!
//! ```no_run
//! #![no_std]
//! use sluice_rule::{json, Error, Message, Rule};
//!
//! struct Passthrough;
//!
//! impl Rule for Passthrough {
//!     fn new(_config: json::Object) -> Result<Self, Error> {
//!         Ok(Passthrough)
//!     }
//!
//!     fn on_message(&mut self, msg: &Message) -> Result<(), Error> {
//!         for (key, value) in msg.payload_object()?.fields() {
//!             if let (Some(metric), Some(v)) = (key.as_str(), value.as_number()) {
//!                 msg.emit_point(metric, v)?;
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! sluice_rule::rule!(Passthrough);
//! # fn main() {}
//! ```
//!
//! Build it as a `cdylib` for `wasm32-unknown-unknown` with `panic=abort`
//! (`build-examples.sh` shows the plain `rustc` commands; with cargo, see
//! `Cargo.toml`'s `[[example]]` entries). The module imports only from the
//! `sluice` host module.
//!
//! # Errors become dead letters
//!
//! Every host call returns `Result<_, Error>`. When `on_message` returns an
//! error, the message is failed with the error's text as the reason, so `?`
//! is the usual way to give up on a message. [`Message::payload_object`]
//! fails with "payload is not a JSON object".
//!
//! # Memory
//!
//! No allocator is needed: text and JSON are built in fixed-capacity
//! [`Text`] buffers on the stack. The host's input (the config during
//! `sluice_init`, each batch during `sluice_on_batch`) lands in one buffer
//! that `sluice_alloc` hands out again and again; see [`alloc_buffer`].
//! Nothing borrowed from a message or the config may outlive the call, and
//! the lifetimes make sure it does not: copy what you keep (into a [`Text`],
//! say).
//!
//! # `no_std`
//!
//! The crate is `no_std` and, on wasm32, provides the panic handler: a panic
//! logs its message at error level and traps, which fails the call (Sluice
//! then retries the messages of the batch one by one). A rule that links
//! `std` itself enables the `std` feature instead, and std's handler is used.
//!
//! Written for Rust 1.63 and later.

#![no_std]

#[cfg(any(feature = "std", test, not(target_arch = "wasm32")))]
extern crate std;

pub mod json;
pub mod sys;
mod text;

use core::fmt::{self, Write as _};

pub use text::Text;

/// The ABI version this crate implements; `sluice_abi_version` returns it.
pub const ABI_VERSION: i32 = 1;

/// A time argument meaning "the message's arrival time".
pub const TIME_OF_MESSAGE: i64 = i64::MIN;

/// Longest state key the host accepts, in bytes.
pub const MAX_STATE_KEY_BYTES: usize = 256;

/// Status codes returned by the host functions in [`sys`].
pub mod status {
    pub const OK: i32 = 0;
    /// `msg` is not an index of the current batch (or no batch is running).
    pub const BAD_MESSAGE: i32 = -1;
    /// A pointer/length pair is outside memory, or text is not UTF-8.
    pub const BAD_MEMORY: i32 = -2;
    /// The message reached its output limit, or the device's state would
    /// exceed the rule's state limit.
    pub const LIMIT: i32 = -3;
    /// Invalid argument (event not JSON, NaN value, wildcard topic, bad key…).
    pub const INVALID: i32 = -4;
    /// Points and state need a device; this message has none.
    pub const NO_DEVICE: i32 = -5;
    /// `state_get`: the key has no value.
    pub const NOT_FOUND: i32 = -6;
}

/// Why something a rule asked for did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A host function refused the call: its name and its (negative) status.
    Host(&'static str, i32),
    /// A fixed-capacity [`Text`] or [`json::ObjectWriter`] was too small,
    /// or a state value did not fit the buffer given to
    /// [`Message::state_get`].
    Capacity,
    /// The rule's own reason; returned from `on_message` it becomes the
    /// message's dead-letter reason.
    Rule(&'static str),
}

impl Error {
    /// The host status, if a host function refused the call.
    pub fn status(&self) -> Option<i32> {
        match *self {
            Error::Host(_, code) => Some(code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Host(call, code) => {
                let why = match code {
                    status::BAD_MESSAGE => "not a message of this batch",
                    status::BAD_MEMORY => "bad memory range or text that is not UTF-8",
                    status::LIMIT => "limit reached",
                    status::INVALID => "invalid argument",
                    status::NO_DEVICE => "the message has no device",
                    status::NOT_FOUND => "not found",
                    _ => "unknown status",
                };
                write!(f, "{} failed: {} ({})", call, why, code)
            }
            Error::Capacity => f.write_str("a fixed-size text buffer of the rule was too small"),
            Error::Rule(reason) => f.write_str(reason),
        }
    }
}

fn check(call: &'static str, code: i32) -> Result<(), Error> {
    if code == status::OK {
        Ok(())
    } else {
        Err(Error::Host(call, code))
    }
}

// Guest addresses and lengths are 32-bit in ABI v1.
fn addr(bytes: &[u8]) -> i32 {
    bytes.as_ptr() as usize as i32
}

fn len(bytes: &[u8]) -> i32 {
    bytes.len() as i32
}

/// Log levels of [`log()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
    Trace = 4,
}

/// Writes a line to Sluice's log under the rule's name. The host keeps up
/// to 1 KiB of it and rate-limits lines (50 a second), so logging cannot
/// fail in a way worth handling.
pub fn log(level: Level, text: &str) {
    unsafe {
        sys::log(level as i32, addr(text.as_bytes()), len(text.as_bytes()));
    }
}

/// Formats a log line (cut at 1 KiB, the host's limit):
/// `log!(Level::Info, "window {} closed", start)`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)*) => {{
        let mut line = $crate::Text::<1024>::new();
        let _ = ::core::fmt::Write::write_fmt(&mut line, ::core::format_args!($($arg)*));
        $crate::log($level, &line);
    }};
}

/// One message of the batch being processed: a view of its 40-byte
/// descriptor and of the bytes it points to, plus the host calls that
/// report results for it.
///
/// A message that gets none of `emit_*`, `publish` or `fail` counts as
/// dropped.
pub struct Message<'a> {
    index: i32,
    topic: &'a str,
    payload: &'a [u8],
    device_id: Option<&'a str>,
    received_at_ms: i64,
    qos: u8,
    retain: bool,
    hops: u8,
}

/// Size of a message descriptor in the batch.
pub const DESCRIPTOR_SIZE: usize = 40;

impl<'a> Message<'a> {
    /// Reads descriptor `index` of the batch at `batch`.
    ///
    /// # Safety
    /// `batch` must be the address the host passed to `sluice_on_batch`,
    /// `index` below its count, and the batch must stay untouched for `'a`.
    pub unsafe fn from_batch(batch: *const u8, index: i32) -> Message<'a> {
        let d = core::slice::from_raw_parts(
            batch.add(index as usize * DESCRIPTOR_SIZE),
            DESCRIPTOR_SIZE,
        );
        let u32_at = |o: usize| u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]) as usize;
        let bytes = |o: usize| -> &'a [u8] {
            let (ptr, len) = (u32_at(o), u32_at(o + 4));
            if len == 0 {
                &[] // the pointer may be 0 then, which a slice must not be
            } else {
                core::slice::from_raw_parts(ptr as *const u8, len)
            }
        };
        let mut time = [0u8; 8];
        time.copy_from_slice(&d[24..32]);
        let device = bytes(16);
        // The host writes UTF-8 topics and device ids; checking costs little
        // and keeps `&str` honest even if it did not.
        Message {
            index,
            topic: core::str::from_utf8(bytes(0)).unwrap_or(""),
            payload: bytes(8),
            device_id: if device.is_empty() {
                None
            } else {
                core::str::from_utf8(device).ok()
            },
            received_at_ms: i64::from_le_bytes(time),
            qos: d[32],
            retain: d[33] != 0,
            hops: d[34],
        }
    }

    /// The message's index in the batch (the `msg` of the raw host calls).
    pub fn index(&self) -> i32 {
        self.index
    }

    /// The MQTT topic.
    pub fn topic(&self) -> &'a str {
        self.topic
    }

    /// The payload as received (any bytes).
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The payload as a JSON object, or [`Error::Rule`]`("payload is not a
    /// JSON object")`, which fails the message when returned with `?`.
    pub fn payload_object(&self) -> Result<json::Object<'a>, Error> {
        json::Object::parse(self.payload).ok_or(Error::Rule("payload is not a JSON object"))
    }

    /// The device id, `None` if the message has no device.
    pub fn device_id(&self) -> Option<&'a str> {
        self.device_id
    }

    /// Arrival time, Unix epoch milliseconds.
    pub fn received_at_ms(&self) -> i64 {
        self.received_at_ms
    }

    /// MQTT QoS (0 until the broker exposes it).
    pub fn qos(&self) -> u8 {
        self.qos
    }

    /// MQTT retain flag (false until the broker exposes it).
    pub fn retain(&self) -> bool {
        self.retain
    }

    /// How many rule publishes led to this message.
    pub fn hops(&self) -> u8 {
        self.hops
    }

    /// A point `(device, metric, arrival time, value)`.
    pub fn emit_point(&self, metric: &str, value: f64) -> Result<(), Error> {
        self.emit_point_at(metric, value, TIME_OF_MESSAGE)
    }

    /// A point at `time_ms` (Unix epoch milliseconds).
    pub fn emit_point_at(&self, metric: &str, value: f64, time_ms: i64) -> Result<(), Error> {
        let m = metric.as_bytes();
        check("emit_point", unsafe {
            sys::emit_point(self.index, addr(m), len(m), value, time_ms)
        })
    }

    /// An event (a JSON document) at the message's arrival time.
    pub fn emit_event(&self, json: &str) -> Result<(), Error> {
        self.emit_event_at(json, TIME_OF_MESSAGE)
    }

    /// An event at `time_ms` (Unix epoch milliseconds).
    pub fn emit_event_at(&self, json: &str, time_ms: i64) -> Result<(), Error> {
        let j = json.as_bytes();
        check("emit_event", unsafe {
            sys::emit_event(self.index, addr(j), len(j), time_ms)
        })
    }

    /// An MQTT message sent back through the broker (and the rules).
    pub fn publish(
        &self,
        topic: &str,
        payload: impl AsRef<[u8]>,
        qos: u8,
        retain: bool,
    ) -> Result<(), Error> {
        let (t, p) = (topic.as_bytes(), payload.as_ref());
        let code = unsafe {
            sys::publish(
                self.index,
                addr(t),
                len(t),
                addr(p),
                len(p),
                i32::from(qos),
                i32::from(retain),
            )
        };
        check("publish", code)
    }

    /// Drops the message on purpose: its outputs of this call are discarded.
    pub fn drop_message(&self) -> Result<(), Error> {
        check("drop_message", unsafe { sys::drop_message(self.index) })
    }

    /// Sends the message to the dead letters with `reason` (up to 4 KiB).
    pub fn fail(&self, reason: &str) -> Result<(), Error> {
        let r = reason.as_bytes();
        check("fail", unsafe { sys::fail(self.index, addr(r), len(r)) })
    }

    /// Reads the device's state value for `key` into `buf`: `Ok(None)` when
    /// there is none, [`Error::Capacity`] when it is longer than `buf`.
    pub fn state_get<'b>(&self, key: &str, buf: &'b mut [u8]) -> Result<Option<&'b [u8]>, Error> {
        match self.state_len(key, buf)? {
            None => Ok(None),
            Some(n) if n <= buf.len() => Ok(Some(&buf[..n])),
            Some(_) => Err(Error::Capacity),
        }
    }

    /// Like [`state_get`](Message::state_get), but gives the value's length
    /// even when it did not fit (then nothing was copied), so a caller can
    /// retry with a bigger buffer.
    pub fn state_len(&self, key: &str, buf: &mut [u8]) -> Result<Option<usize>, Error> {
        let k = key.as_bytes();
        let code = unsafe {
            sys::state_get(
                self.index,
                addr(k),
                len(k),
                buf.as_mut_ptr() as usize as i32,
                len(buf),
            )
        };
        match code {
            n if n >= 0 => Ok(Some(n as usize)),
            status::NOT_FOUND => Ok(None),
            code => Err(Error::Host("state_get", code)),
        }
    }

    /// Stores `value` under `key` for the message's device. Over the rule's
    /// state limit the host refuses it and dead-letters the message.
    pub fn state_set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        let k = key.as_bytes();
        check("state_set", unsafe {
            sys::state_set(self.index, addr(k), len(k), addr(value), len(value))
        })
    }

    /// Removes `key` from the device's state (fine if it was absent).
    pub fn state_delete(&self, key: &str) -> Result<(), Error> {
        let k = key.as_bytes();
        check("state_delete", unsafe {
            sys::state_delete(self.index, addr(k), len(k))
        })
    }
}

/// A rule function. See the crate docs for an example, and [`rule!`].
pub trait Rule: Sized {
    /// Makes the rule from the manifest's `[config]` (`{}` when there is
    /// none), once per instance. An error fails the instance (it is logged).
    fn new(config: json::Object) -> Result<Self, Error>;

    /// Handles one message. Messages of a batch come in order; changes to
    /// state are seen by later messages. An error fails the message with the
    /// error's text as the reason.
    fn on_message(&mut self, msg: &Message) -> Result<(), Error>;
}

/// Exports `sluice_abi_version` and `sluice_alloc` (see [`alloc_buffer`]).
/// [`rule!`] includes it; use it alone only with a hand-written
/// `sluice_on_batch`.
#[macro_export]
macro_rules! exports {
    () => {
        #[no_mangle]
        pub extern "C" fn sluice_abi_version() -> i32 {
            $crate::ABI_VERSION
        }

        #[no_mangle]
        pub extern "C" fn sluice_alloc(size: i32) -> i32 {
            $crate::alloc_buffer(size)
        }
    };
}

/// Makes a [`Rule`] type the module's rule: exports `sluice_abi_version`,
/// `sluice_alloc`, `sluice_init` and `sluice_on_batch`. Use it once, in the
/// crate built as the module.
#[macro_export]
macro_rules! rule {
    ($rule:ty) => {
        $crate::exports!();

        static mut SLUICE_RULE_INSTANCE: ::core::option::Option<$rule> =
            ::core::option::Option::None;

        #[no_mangle]
        pub extern "C" fn sluice_init(ptr: i32, len: i32) -> i32 {
            // Safety: the host is single-threaded and never re-enters the guest.
            unsafe {
                $crate::__private::init(::core::ptr::addr_of_mut!(SLUICE_RULE_INSTANCE), ptr, len)
            }
        }

        #[no_mangle]
        pub extern "C" fn sluice_on_batch(ptr: i32, count: i32) -> i32 {
            // Safety: as above; `ptr` and `count` describe the batch.
            unsafe {
                $crate::__private::on_batch(
                    ::core::ptr::addr_of_mut!(SLUICE_RULE_INSTANCE),
                    ptr,
                    count,
                )
            }
        }
    };
}

/// What `sluice_alloc` does: returns a buffer of at least `size` bytes,
/// the same one each time while it is big enough.
///
/// The host never holds two buffers at once and only hands one back to the
/// guest in the call that follows, so one reusable buffer is enough: it
/// holds the config during `sluice_init` and then each batch in turn. It
/// lives in pages taken with `memory.grow`, never from the stack or the
/// statics, and not from any allocator either (allocators such as std's
/// also take fresh pages with `memory.grow`, so the two never overlap).
/// When a bigger batch comes, the buffer is extended in place if it is at
/// the end of memory, else moved to new pages (the old ones are not reused;
/// sizes at least double, so at most half of what it took is idle). Memory
/// therefore tracks the largest batch seen, never the number of batches.
///
/// Returns 0 (which fails the host's call) when memory cannot grow, or for
/// a negative size.
pub fn alloc_buffer(size: i32) -> i32 {
    if size < 0 {
        return 0;
    }
    buffer::get(size as usize) as i32
}

#[cfg(target_arch = "wasm32")]
mod buffer {
    use core::arch::wasm32::{memory_grow, memory_size};

    const PAGE: usize = 65536;
    static mut START: usize = 0;
    static mut CAPACITY: usize = 0;

    pub fn get(size: usize) -> usize {
        // Safety: single-threaded; only this function touches the statics.
        unsafe {
            if START != 0 && size <= CAPACITY {
                return START;
            }
            let end = memory_size(0) * PAGE;
            let at_end = START != 0 && START + CAPACITY == end;
            let want = size.max(CAPACITY.saturating_mul(2)).max(PAGE);
            let missing = if at_end { want - CAPACITY } else { want };
            let pages = (missing + PAGE - 1) / PAGE;
            if memory_grow(0, pages) == usize::MAX {
                return 0;
            }
            if !at_end {
                START = end;
                CAPACITY = 0;
            }
            CAPACITY += pages * PAGE;
            START
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod buffer {
    /// There is no host off wasm32.
    pub fn get(_size: usize) -> usize {
        0
    }
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    unsafe fn bytes<'a>(ptr: i32, len: i32) -> &'a [u8] {
        if len <= 0 {
            &[]
        } else {
            core::slice::from_raw_parts(ptr as u32 as usize as *const u8, len as usize)
        }
    }

    fn make<R: Rule>(slot: &mut Option<R>, config: &[u8]) -> i32 {
        let config = match json::Object::parse(config) {
            Some(c) => c,
            None => {
                log(Level::Error, "sluice_init: the config is not a JSON object");
                return 1;
            }
        };
        match R::new(config) {
            Ok(rule) => {
                *slot = Some(rule);
                0
            }
            Err(e) => {
                crate::log!(Level::Error, "sluice_init: {}", e);
                1
            }
        }
    }

    pub unsafe fn init<R: Rule>(slot: *mut Option<R>, ptr: i32, len: i32) -> i32 {
        make(&mut *slot, bytes(ptr, len))
    }

    pub unsafe fn on_batch<R: Rule>(slot: *mut Option<R>, ptr: i32, count: i32) -> i32 {
        let slot = &mut *slot;
        // The host calls sluice_init first; this covers a host that does not.
        if slot.is_none() && make(slot, b"{}") != 0 {
            return 1;
        }
        let rule = match slot.as_mut() {
            Some(rule) => rule,
            None => return 1,
        };
        let batch = ptr as u32 as usize as *const u8;
        for i in 0..count.max(0) {
            let msg = Message::from_batch(batch, i);
            if let Err(e) = rule.on_message(&msg) {
                let mut reason = Text::<512>::new();
                let _ = write!(reason, "{}", e);
                let _ = msg.fail(&reason);
            }
        }
        0
    }
}

#[cfg(all(target_arch = "wasm32", not(feature = "std"), not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    log!(Level::Error, "rule panicked: {}", info);
    core::arch::wasm32::unreachable()
}
