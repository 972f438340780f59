//! The host side of ABI v1: the state a guest instance carries and the
//! `sluice` functions it may import.
//!
//! Host functions never trap on bad arguments: they return a negative status
//! (see [`abi::status`]) and record nothing, so a guest can recover. Outputs
//! are buffered per message and only become real once the whole batch call
//! returns successfully (a trap discards them all).

use super::abi::{self, status};
use crate::state::{MAX_KEY_BYTES, StateOverlay, StateStore};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, error, info, trace, warn};
use wasmtime::{Caller, Linker, Memory, ResourceLimiter};

/// An output as the guest asked for it, before the host attaches the message context.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestOutput {
    Point {
        metric: String,
        value: f64,
        time_ms: Option<i64>,
    },
    Event {
        document: Vec<u8>,
        time_ms: Option<i64>,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Verdict {
    /// Outputs (possibly none) stand.
    #[default]
    Processed,
    /// The guest dropped the message on purpose; its outputs are discarded.
    Dropped,
    /// The guest failed the message; it goes to the dead letters with this reason.
    Failed(String),
}

#[derive(Debug, Default)]
pub struct MessageSlot {
    pub outputs: Vec<GuestOutput>,
    pub verdict: Verdict,
    pub device: Option<Arc<str>>,
    /// The message's arrival time, the default time of its outputs.
    pub received_at_ms: i64,
    /// A per-message limit the guest ran into (outputs, state). It sends the
    /// message to the dead letters whatever the guest does afterwards.
    pub limit_exceeded: Option<String>,
}

impl MessageSlot {
    /// Whether the message ends anywhere but in the dead letters.
    pub fn succeeds(&self) -> bool {
        self.limit_exceeded.is_none() && !matches!(self.verdict, Verdict::Failed(_))
    }
}

pub struct HostState {
    pub(crate) rule: Arc<str>,
    pub(crate) memory: Option<Memory>,
    pub(crate) limiter: GuestLimiter,
    pub(crate) slots: Vec<MessageSlot>,
    pub(crate) max_outputs: u32,
    pub(crate) state: Arc<StateStore>,
    pub(crate) overlay: StateOverlay,
    pub(crate) state_bytes: usize,
    pub(crate) time_bounds: TimeBounds,
    /// Wall clock at the start of the current call, for the time bounds.
    pub(crate) now_ms: i64,
    log_budget: LogBudget,
}

/// How far from now output times may be: points and events become rows of
/// time partitions, and a clock gone wrong (or data older than retention)
/// must not create partitions nobody keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeBounds {
    pub max_future_ms: i64,
    /// `None`: any age.
    pub points_max_age_ms: Option<i64>,
    pub events_max_age_ms: Option<i64>,
}

impl Default for TimeBounds {
    fn default() -> Self {
        Self {
            max_future_ms: 24 * 3_600_000,
            points_max_age_ms: None,
            events_max_age_ms: None,
        }
    }
}

impl TimeBounds {
    /// Why `time_ms` is refused for an output of `kind` ("point", "event"), if it is.
    pub fn check(&self, kind: &str, time_ms: i64, now_ms: i64) -> Result<(), String> {
        let max_age = match kind {
            "point" => self.points_max_age_ms,
            _ => self.events_max_age_ms,
        };
        let show = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map_or_else(|| format!("{ms} ms"), |t| t.to_rfc3339())
        };
        if time_ms > now_ms.saturating_add(self.max_future_ms) {
            return Err(format!(
                "{kind} time {} is more than {} h in the future (ingest.partitions.max_future_hours)",
                show(time_ms),
                self.max_future_ms / 3_600_000
            ));
        }
        if let Some(age) = max_age
            && time_ms < now_ms.saturating_sub(age)
        {
            return Err(format!(
                "{kind} time {} is older than the {kind}s' retention of {} days",
                show(time_ms),
                age / 86_400_000
            ));
        }
        Ok(())
    }
}

impl HostState {
    pub fn new(rule: Arc<str>, limits: &crate::Limits, state: Arc<StateStore>) -> Self {
        let memory_bytes =
            usize::try_from(limits.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        Self {
            rule,
            memory: None,
            limiter: GuestLimiter {
                memory_bytes,
                table_elements: limits.table_elements as usize,
                exceeded: None,
            },
            slots: Vec::new(),
            max_outputs: limits.max_outputs_per_message,
            state,
            overlay: StateOverlay::default(),
            state_bytes: limits.state_bytes as usize,
            time_bounds: TimeBounds::default(),
            now_ms: 0,
            log_budget: LogBudget::new(),
        }
    }

    fn slot(&mut self, msg: i32) -> Option<&mut MessageSlot> {
        usize::try_from(msg)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
    }

    /// Refuses an output time outside the bounds: the message then goes to
    /// the dead letters with the reason, whatever the guest does next.
    fn check_time(&mut self, msg: i32, kind: &str, time_ms: i64) -> Result<(), i32> {
        let (bounds, now) = (self.time_bounds.clone(), self.now_ms);
        let slot = self.slot(msg).ok_or(status::BAD_MESSAGE)?;
        let t = time_arg(time_ms).unwrap_or(slot.received_at_ms);
        bounds.check(kind, t, now).map_err(|reason| {
            slot.limit_exceeded.get_or_insert(reason);
            status::INVALID
        })
    }

    /// Records an output for message `msg`, enforcing the per-message limit.
    fn push(&mut self, msg: i32, output: GuestOutput) -> i32 {
        let max = self.max_outputs as usize;
        match self.slot(msg) {
            None => status::BAD_MESSAGE,
            Some(slot) if slot.outputs.len() >= max => {
                slot.limit_exceeded.get_or_insert_with(|| {
                    format!("output limit exceeded: the message asked for more than {max} outputs")
                });
                status::LIMIT
            }
            Some(slot) => {
                slot.outputs.push(output);
                status::OK
            }
        }
    }
}

/// Caps guest memory and tables, and remembers which cap was hit so the
/// failure can name it.
pub struct GuestLimiter {
    memory_bytes: usize,
    table_elements: usize,
    pub(crate) exceeded: Option<String>,
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            let msg = format!(
                "memory limit exceeded: the guest asked for {desired} bytes, the limit is {} bytes",
                self.memory_bytes
            );
            // Refuse the growth rather than trap: `memory.grow` returns -1 and
            // an allocator may retry smaller (AssemblyScript's asks for
            // double first). If the guest cannot cope it traps, and the
            // failure names this limit.
            self.exceeded = Some(msg);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            let msg = format!(
                "table limit exceeded: the guest asked for {desired} elements, the limit is {}",
                self.table_elements
            );
            self.exceeded = Some(msg);
            return Ok(false);
        }
        Ok(true)
    }
}

/// Guest log lines per second per instance; past it lines are counted, not printed.
const LOG_LINES_PER_SECOND: u32 = 50;
const MAX_LOG_LINE_BYTES: usize = 1024;

struct LogBudget {
    window_start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    fn new() -> Self {
        Self {
            window_start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// Returns whether a line may be printed now, and how many were
    /// suppressed in the window that just ended (to report once).
    fn take(&mut self) -> (bool, u64) {
        let mut reported = 0;
        if self.window_start.elapsed().as_secs() >= 1 {
            reported = std::mem::take(&mut self.suppressed);
            self.window_start = Instant::now();
            self.used = 0;
        }
        if self.used < LOG_LINES_PER_SECOND {
            self.used += 1;
            (true, reported)
        } else {
            self.suppressed += 1;
            metrics::counter!("sluice_rule_log_lines_suppressed_total").increment(1);
            (false, reported)
        }
    }
}

fn guest_bytes(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let memory = caller.data().memory?;
    let data = memory.data(caller);
    let start = usize::try_from(ptr as u32).ok()?;
    let len = usize::try_from(len).ok()?;
    data.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
}

fn guest_str(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> Option<String> {
    String::from_utf8(guest_bytes(caller, ptr, len)?).ok()
}

fn time_arg(time_ms: i64) -> Option<i64> {
    (time_ms != abi::TIME_OF_MESSAGE).then_some(time_ms)
}

/// Builds the linker that provides every ABI v1 host function.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    let m = abi::HOST_MODULE;

    linker.func_wrap(
        m,
        "emit_point",
        |mut caller: Caller<'_, HostState>,
         msg: i32,
         name_ptr: i32,
         name_len: i32,
         value: f64,
         time_ms: i64|
         -> i32 {
            let Some(metric) = guest_str(&caller, name_ptr, name_len) else {
                return status::BAD_MEMORY;
            };
            if metric.is_empty() || !value.is_finite() {
                return status::INVALID;
            }
            let state = caller.data_mut();
            match state.slot(msg) {
                None => return status::BAD_MESSAGE,
                Some(slot) if slot.device.is_none() => return status::NO_DEVICE,
                Some(_) => {}
            }
            if let Err(code) = state.check_time(msg, "point", time_ms) {
                return code;
            }
            state.push(
                msg,
                GuestOutput::Point {
                    metric,
                    value,
                    time_ms: time_arg(time_ms),
                },
            )
        },
    )?;

    linker.func_wrap(
        m,
        "emit_event",
        |mut caller: Caller<'_, HostState>, msg: i32, ptr: i32, len: i32, time_ms: i64| -> i32 {
            let Some(document) = guest_bytes(&caller, ptr, len) else {
                return status::BAD_MEMORY;
            };
            if serde_json::from_slice::<serde::de::IgnoredAny>(&document).is_err() {
                return status::INVALID;
            }
            if let Err(code) = caller.data_mut().check_time(msg, "event", time_ms) {
                return code;
            }
            caller.data_mut().push(
                msg,
                GuestOutput::Event {
                    document,
                    time_ms: time_arg(time_ms),
                },
            )
        },
    )?;

    linker.func_wrap(
        m,
        "publish",
        |mut caller: Caller<'_, HostState>,
         msg: i32,
         topic_ptr: i32,
         topic_len: i32,
         payload_ptr: i32,
         payload_len: i32,
         qos: i32,
         retain: i32|
         -> i32 {
            let (Some(topic), Some(payload)) = (
                guest_str(&caller, topic_ptr, topic_len),
                guest_bytes(&caller, payload_ptr, payload_len),
            ) else {
                return status::BAD_MEMORY;
            };
            if topic.is_empty() || topic.contains(['+', '#', '\0']) || !(0..=2).contains(&qos) {
                return status::INVALID;
            }
            caller.data_mut().push(
                msg,
                GuestOutput::Publish {
                    topic,
                    payload,
                    qos: qos as u8,
                    retain: retain != 0,
                },
            )
        },
    )?;

    linker.func_wrap(
        m,
        "drop_message",
        |mut caller: Caller<'_, HostState>, msg: i32| -> i32 {
            match caller.data_mut().slot(msg) {
                None => status::BAD_MESSAGE,
                Some(slot) => {
                    slot.verdict = Verdict::Dropped;
                    status::OK
                }
            }
        },
    )?;

    linker.func_wrap(
        m,
        "fail",
        |mut caller: Caller<'_, HostState>, msg: i32, ptr: i32, len: i32| -> i32 {
            let Some(bytes) = guest_bytes(&caller, ptr, len.min(4096)) else {
                return status::BAD_MEMORY;
            };
            let reason = String::from_utf8_lossy(&bytes).into_owned();
            match caller.data_mut().slot(msg) {
                None => status::BAD_MESSAGE,
                Some(slot) => {
                    slot.verdict = Verdict::Failed(reason);
                    status::OK
                }
            }
        },
    )?;

    linker.func_wrap(
        m,
        "log",
        |mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| -> i32 {
            let Some(bytes) = guest_bytes(&caller, ptr, len.min(MAX_LOG_LINE_BYTES as i32)) else {
                return status::BAD_MEMORY;
            };
            let state = caller.data_mut();
            let (allowed, suppressed) = state.log_budget.take();
            let rule = &*state.rule;
            if suppressed > 0 {
                warn!(
                    rule,
                    suppressed, "guest log lines suppressed by the rate limit"
                );
            }
            if allowed {
                let text = String::from_utf8_lossy(&bytes);
                match level {
                    ..=0 => error!(rule, "{text}"),
                    1 => warn!(rule, "{text}"),
                    2 => info!(rule, "{text}"),
                    3 => debug!(rule, "{text}"),
                    _ => trace!(rule, "{text}"),
                }
            }
            status::OK
        },
    )?;

    linker.func_wrap(
        m,
        "state_get",
        |mut caller: Caller<'_, HostState>,
         msg: i32,
         key_ptr: i32,
         key_len: i32,
         buf_ptr: i32,
         buf_cap: i32|
         -> i32 {
            let (device, key) = match state_scope(&caller, msg, key_ptr, key_len) {
                Ok(scope) => scope,
                Err(code) => return code,
            };
            let state = caller.data();
            let value = state
                .overlay
                .with_value(&state.state, &state.rule, &device, &key, |v| {
                    v.map(<[u8]>::to_vec)
                });
            let Some(value) = value else {
                return status::NOT_FOUND;
            };
            let Ok(len) = i32::try_from(value.len()) else {
                return status::INVALID;
            };
            if len <= buf_cap {
                let Some(memory) = caller.data().memory else {
                    return status::BAD_MEMORY;
                };
                if memory
                    .write(&mut caller, buf_ptr as u32 as usize, &value)
                    .is_err()
                {
                    return status::BAD_MEMORY;
                }
            }
            len
        },
    )?;

    linker.func_wrap(
        m,
        "state_set",
        |mut caller: Caller<'_, HostState>,
         msg: i32,
         key_ptr: i32,
         key_len: i32,
         value_ptr: i32,
         value_len: i32|
         -> i32 {
            let (device, key) = match state_scope(&caller, msg, key_ptr, key_len) {
                Ok(scope) => scope,
                Err(code) => return code,
            };
            let Some(value) = guest_bytes(&caller, value_ptr, value_len) else {
                return status::BAD_MEMORY;
            };
            write_state(caller.data_mut(), msg, &device, &key, Some(&value))
        },
    )?;

    linker.func_wrap(
        m,
        "state_delete",
        |mut caller: Caller<'_, HostState>, msg: i32, key_ptr: i32, key_len: i32| -> i32 {
            let (device, key) = match state_scope(&caller, msg, key_ptr, key_len) {
                Ok(scope) => scope,
                Err(code) => return code,
            };
            write_state(caller.data_mut(), msg, &device, &key, None)
        },
    )?;

    Ok(linker)
}

/// The device whose state message `msg` addresses, and the key, checked.
fn state_scope(
    caller: &Caller<'_, HostState>,
    msg: i32,
    key_ptr: i32,
    key_len: i32,
) -> Result<(Arc<str>, String), i32> {
    let slot = usize::try_from(msg)
        .ok()
        .and_then(|i| caller.data().slots.get(i))
        .ok_or(status::BAD_MESSAGE)?;
    let device = slot.device.clone().ok_or(status::NO_DEVICE)?;
    if key_len <= 0 || key_len as usize > MAX_KEY_BYTES {
        return Err(status::INVALID);
    }
    let key = guest_str(caller, key_ptr, key_len).ok_or(status::BAD_MEMORY)?;
    Ok((device, key))
}

fn write_state(
    state: &mut HostState,
    msg: i32,
    device: &Arc<str>,
    key: &str,
    value: Option<&[u8]>,
) -> i32 {
    let HostState {
        state: store,
        overlay,
        rule,
        state_bytes,
        ..
    } = state;
    match overlay.write(store, rule, device, key, value, *state_bytes, msg as usize) {
        Ok(()) => status::OK,
        Err(e) => {
            if let Some(slot) = state.slot(msg) {
                slot.limit_exceeded.get_or_insert_with(|| {
                    format!(
                        "state limit exceeded: the device's state in this rule would be {} bytes, the limit is {} bytes",
                        e.would_be, e.limit
                    )
                });
            }
            status::LIMIT
        }
    }
}
