//! Runs messages through the active rules and turns them into outputs.
//!
//! Contract, per message: every rule whose filter matches runs on it. Each
//! (message, rule) pair ends in exactly one outcome, counted per rule:
//! `stored` (the rule produced outputs), `dropped` (the rule produced none, or
//! dropped it on purpose) or `dead_letter` (a dead-letter output says why). A
//! message no rule matches is stored as an event as received, or dropped when
//! the configuration says so; both are counted.

use crate::decoder::decode_telemetry;
use crate::ruleset::{Rule, RuleAction, RuleSet, WasmRuleVersion};
use crate::state::StateStore;
use crate::status::{OutputKind, RuleMonitor, RuleStats, SuspendPolicy};
use crate::wasm::host::MessageSlot;
use crate::wasm::host::{GuestOutput, TimeBounds, Verdict};
use crate::wasm::{BatchResult, GuestError, RuleInstance};
use crate::{Message, Output};
use arc_swap::ArcSwap;
use chrono::{DateTime, TimeZone, Utc};
use metrics::counter;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, debug_span, warn};

#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Messages per call into a WASM rule.
    pub batch_size: usize,
    /// Store unmatched messages as events (false: drop them, counted).
    pub store_unmatched: bool,
    /// Rule publishes may chain this many times; the next one is refused.
    pub max_hops: u8,
    /// When a failing rule is suspended.
    pub suspend: SuspendPolicy,
    /// How far from now output times may be.
    pub time_bounds: TimeBounds,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            store_unmatched: true,
            max_hops: 8,
            suspend: SuspendPolicy::default(),
            time_bounds: TimeBounds::default(),
        }
    }
}

/// What every processor of a server shares: committed rule state and the
/// per-rule counters and health.
#[derive(Clone, Default)]
pub struct RuleContext {
    pub state: Arc<StateStore>,
    pub monitor: Arc<RuleMonitor>,
}

/// Owns the live WASM instances. One processor per pipeline worker; it is
/// not shared, so instances need no locking.
pub struct Processor {
    rules: Arc<ArcSwap<RuleSet>>,
    config: ProcessorConfig,
    context: RuleContext,
    instances: HashMap<Arc<str>, LiveInstance>,
}

struct LiveInstance {
    version: Arc<WasmRuleVersion>,
    instance: Option<RuleInstance>,
}

#[derive(Default)]
struct Tally {
    stored: u64,
    dropped: u64,
    dead_letter: u64,
}

impl Tally {
    fn record(&self, stats: &RuleStats) {
        stats.stored.fetch_add(self.stored, Ordering::Relaxed);
        stats.dropped.fetch_add(self.dropped, Ordering::Relaxed);
        stats
            .dead_letters
            .fetch_add(self.dead_letter, Ordering::Relaxed);
        let m = &stats.metrics;
        for (counter, n) in [
            (&m.stored, self.stored),
            (&m.dropped, self.dropped),
            (&m.dead_letter, self.dead_letter),
        ] {
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

impl Processor {
    pub fn new(
        rules: Arc<ArcSwap<RuleSet>>,
        config: ProcessorConfig,
        context: RuleContext,
    ) -> Self {
        Self {
            rules,
            config,
            context,
            instances: HashMap::new(),
        }
    }

    /// Processes a batch, appending outputs to `out`.
    pub fn process(&mut self, messages: &[Message], out: &mut Vec<Output>) {
        let refs: Vec<&Message> = messages.iter().collect();
        self.process_refs(&refs, out);
    }

    /// [`Self::process`] on borrowed messages (the parallel processor's
    /// shards), so splitting a batch copies no message.
    pub fn process_refs(&mut self, messages: &[&Message], out: &mut Vec<Output>) {
        let set = self.rules.load_full();
        let mut matched: Vec<Vec<&Message>> = (0..set.rules.len()).map(|_| Vec::new()).collect();
        let (mut unmatched_stored, mut unmatched_dropped) = (0u64, 0u64);
        let mut hits = Vec::new();
        for &m in messages {
            hits.clear();
            set.matching(&m.topic, &mut hits);
            for &i in &hits {
                matched[i].push(m);
            }
            if hits.is_empty() {
                if self.config.store_unmatched {
                    unmatched_stored += 1;
                    out.push(Output::Event {
                        device_id: m.device_id.clone(),
                        topic: m.topic.clone(),
                        time: m.received_at,
                        rule: None,
                        payload: m.payload.to_vec(),
                    });
                } else {
                    unmatched_dropped += 1;
                }
            }
        }
        counter!("sluice_messages_unmatched_total", "action" => "stored")
            .increment(unmatched_stored);
        counter!("sluice_messages_unmatched_total", "action" => "dropped")
            .increment(unmatched_dropped);

        for (rule, msgs) in set.rules.iter().zip(matched) {
            if msgs.is_empty() {
                continue;
            }
            let _span = debug_span!("rule", rule = &*rule.name, messages = msgs.len()).entered();
            let stats = self.context.monitor.stats(&rule.name);
            stats.add_messages_in(msgs.len() as u64);
            match &rule.action {
                RuleAction::JsonTelemetry => {
                    run_decoder(rule, &msgs, out, &stats, &self.config.time_bounds)
                }
                RuleAction::Wasm(version) => {
                    for chunk in msgs.chunks(self.config.batch_size.max(1)) {
                        self.run_wasm(rule, version, chunk, out, &stats);
                    }
                }
            }
        }
        // Instances of rules that are gone are freed with the rule.
        if self.instances.len() > set.rules.len() {
            self.instances
                .retain(|name, _| set.rules.iter().any(|r| &r.name == name));
        }
    }

    fn run_wasm(
        &mut self,
        rule: &Rule,
        version: &Arc<WasmRuleVersion>,
        msgs: &[&Message],
        out: &mut Vec<Output>,
        stats: &RuleStats,
    ) {
        let name = &rule.name;
        let mut tally = Tally::default();
        if let Some(reason) = stats.suspension(version.digest()) {
            // Its messages are not lost: they wait in the dead letters, with
            // the reason, for whoever fixes the rule.
            for m in msgs {
                tally.dead_letter += 1;
                out.push(Output::dead_letter(m, Some(name), format!("rule {reason}")));
            }
            tally.record(stats);
            return;
        }
        let started = Instant::now();
        stats.metrics.invocations.increment(1);
        stats.invocations.fetch_add(1, Ordering::Relaxed);
        let result = self.call(name, version, msgs);
        let elapsed = started.elapsed();
        stats.metrics.batch_seconds.record(elapsed.as_secs_f64());
        stats.record_batch(elapsed);
        match result {
            Ok(BatchResult {
                slots,
                state_changes,
            }) => {
                stats.record_success();
                for (m, slot) in msgs.iter().zip(slots) {
                    self.convert(name, m, slot, out, &mut tally, stats);
                }
                if !state_changes.is_empty() {
                    stats.add_outputs(OutputKind::StateWrite, state_changes.len() as u64);
                    self.context.state.apply(&state_changes);
                    out.extend(state_changes.into_iter().map(Output::State));
                }
            }
            Err(e) => {
                counter!("sluice_rule_failures_total", "rule" => name.to_string(), "kind" => e.kind()).increment(1);
                let message = e.to_string();
                if stats.record_failure(e.kind(), &message, self.config.suspend, version.digest()) {
                    warn!(rule = &**name, error = %e, "rule suspended after repeated failures");
                }
                // A trap or error status in a batch of several may be one bad
                // message: run each alone, so only the culprits fail. A timeout
                // is not retried: it would cost the time limit once per message.
                let retry = msgs.len() > 1 && !matches!(e, GuestError::Timeout(_));
                if retry {
                    debug!(rule = &**name, error = %e, "batch failed; retrying its messages one by one");
                    for m in msgs {
                        self.run_wasm(rule, version, std::slice::from_ref(m), out, stats);
                    }
                    return;
                }
                warn!(rule = &**name, error = %e, messages = msgs.len(), "rule failed; messages go to dead letters");
                for m in msgs {
                    tally.dead_letter += 1;
                    out.push(Output::dead_letter(m, Some(name), message.clone()));
                }
            }
        }
        tally.record(stats);
    }

    fn call(
        &mut self,
        name: &Arc<str>,
        version: &Arc<WasmRuleVersion>,
        msgs: &[&Message],
    ) -> Result<BatchResult, GuestError> {
        let live = self
            .instances
            .entry(name.clone())
            .or_insert_with(|| LiveInstance {
                version: version.clone(),
                instance: None,
            });
        if !Arc::ptr_eq(&live.version, version) {
            *live = LiveInstance {
                version: version.clone(),
                instance: None,
            };
        }
        let instance = match &mut live.instance {
            Some(i) => i,
            None => {
                let mut fresh = RuleInstance::new(
                    &version.module,
                    name.clone(),
                    &version.limits,
                    &version.config_json,
                    self.context.state.clone(),
                )?;
                fresh.set_time_bounds(self.config.time_bounds.clone());
                live.instance.insert(fresh)
            }
        };
        let result = instance.run(msgs);
        if result.is_err() {
            // Never run a batch on an instance that trapped or timed out.
            live.instance = None;
        }
        result
    }

    fn convert(
        &self,
        rule: &Arc<str>,
        m: &Message,
        slot: MessageSlot,
        out: &mut Vec<Output>,
        tally: &mut Tally,
        stats: &RuleStats,
    ) {
        if let Some(limit) = slot.limit_exceeded {
            counter!("sluice_rule_failures_total", "rule" => rule.to_string(), "kind" => "limit")
                .increment(1);
            tally.dead_letter += 1;
            out.push(Output::dead_letter(m, Some(rule), limit));
            return;
        }
        match slot.verdict {
            Verdict::Failed(reason) => {
                tally.dead_letter += 1;
                out.push(Output::dead_letter(
                    m,
                    Some(rule),
                    format!("rule failed the message: {reason}"),
                ));
                return;
            }
            Verdict::Dropped => {
                tally.dropped += 1;
                return;
            }
            Verdict::Processed if slot.outputs.is_empty() => {
                tally.dropped += 1;
                return;
            }
            Verdict::Processed => {}
        }
        let mut refused_publish = None;
        for o in slot.outputs {
            match o {
                GuestOutput::Point {
                    metric,
                    value,
                    time_ms,
                } => {
                    stats.add_outputs(OutputKind::Point, 1);
                    out.push(Output::Point {
                        // The host refused points for messages without a device.
                        device_id: m.device_id.clone().expect("checked by emit_point"),
                        metric,
                        time: time_or(time_ms, m.received_at),
                        value,
                    })
                }
                GuestOutput::Event { document, time_ms } => {
                    stats.add_outputs(OutputKind::Event, 1);
                    out.push(Output::Event {
                        device_id: m.device_id.clone(),
                        topic: m.topic.clone(),
                        time: time_or(time_ms, m.received_at),
                        rule: Some(rule.clone()),
                        payload: document,
                    })
                }
                GuestOutput::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                } => {
                    if m.hops >= self.config.max_hops {
                        refused_publish = Some(topic);
                        continue;
                    }
                    stats.add_outputs(OutputKind::Publish, 1);
                    out.push(Output::Publish {
                        topic,
                        payload,
                        qos,
                        retain,
                        hops: m.hops + 1,
                    });
                }
            }
        }
        if let Some(topic) = refused_publish {
            counter!("sluice_rule_publishes_refused_total", "rule" => rule.to_string(), "reason" => "hop_limit").increment(1);
            tally.dead_letter += 1;
            out.push(Output::dead_letter(
                m,
                Some(rule),
                format!(
                    "publish to `{topic}` refused: the message already went through {} rule publishes (hop limit)",
                    m.hops
                ),
            ));
        } else {
            tally.stored += 1;
        }
    }
}

fn time_or(time_ms: Option<i64>, fallback: DateTime<Utc>) -> DateTime<Utc> {
    time_ms
        .and_then(|t| Utc.timestamp_millis_opt(t).single())
        .unwrap_or(fallback)
}

fn run_decoder(
    rule: &Rule,
    msgs: &[&Message],
    out: &mut Vec<Output>,
    stats: &RuleStats,
    bounds: &TimeBounds,
) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    stats.metrics.invocations.increment(1);
    stats.invocations.fetch_add(1, Ordering::Relaxed);
    let mut tally = Tally::default();
    for m in msgs {
        let Some(device_id) = &m.device_id else {
            tally.dead_letter += 1;
            out.push(Output::dead_letter(
                m,
                Some(&rule.name),
                "the topic names no device (expected devices/{device_id}/…)".into(),
            ));
            continue;
        };
        match decode_telemetry(&m.payload, m.received_at).and_then(|t| {
            bounds
                .check("point", t.time.timestamp_millis(), now_ms)
                .map(|()| t)
                .map_err(crate::decoder::DecodeError::Time)
        }) {
            Ok(t) => {
                tally.stored += 1;
                stats.add_outputs(OutputKind::Point, t.values.len() as u64);
                out.extend(t.values.into_iter().map(|(metric, value)| Output::Point {
                    device_id: device_id.clone(),
                    metric,
                    time: t.time,
                    value,
                }));
            }
            Err(e) => {
                tally.dead_letter += 1;
                out.push(Output::dead_letter(m, Some(&rule.name), e.to_string()));
            }
        }
    }
    if tally.dead_letter > 0 {
        counter!("sluice_rule_failures_total", "rule" => rule.name.to_string(), "kind" => "decode")
            .increment(tally.dead_letter);
    }
    tally.record(stats);
}
