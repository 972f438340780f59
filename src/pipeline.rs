//! The pipeline thread: broker → rules → writer (and rule publishes back to
//! the broker).
//!
//! One plain thread, because rule functions are synchronous CPU work that
//! must not stall the async runtime. It takes whatever messages are waiting
//! (up to a batch), runs them through the rules and hands the outputs to the
//! writer, blocking when the writer's queue is full: backpressure flows from
//! the database to the broker's consumer.

use sluice_broker::{InboundMessage, Publisher};
use sluice_ingest::{DeadLetterRecord, EventRecord, PointRecord, Record, Sink};
use sluice_rules::{Message, Output, Processor, device_id_from_topic};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug_span, error, warn};

pub fn spawn(
    rx: mpsc::Receiver<InboundMessage>,
    processor: Processor,
    sink: Sink,
    publisher: Publisher,
    batch_max: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || run(rx, processor, sink, publisher, batch_max.max(1)))
}

fn run(
    mut rx: mpsc::Receiver<InboundMessage>,
    mut processor: Processor,
    sink: Sink,
    publisher: Publisher,
    batch_max: usize,
) {
    let mut messages = Vec::with_capacity(batch_max);
    let mut outputs = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        messages.push(to_rule_message(first));
        while messages.len() < batch_max {
            match rx.try_recv() {
                Ok(m) => messages.push(to_rule_message(m)),
                Err(_) => break,
            }
        }
        let span = debug_span!("pipeline_batch", messages = messages.len()).entered();
        processor.process(&messages, &mut outputs);
        let records = route_outputs(&mut outputs, &messages, &publisher);
        drop(span);
        messages.clear();
        if sink.blocking_send(records).is_err() {
            // Only possible if the writer task died: nothing can be stored any more.
            error!("the writer has stopped; the pipeline stops");
            return;
        }
    }
}

fn to_rule_message(m: InboundMessage) -> Message {
    Message {
        device_id: device_id_from_topic(&m.topic).map(Arc::from),
        topic: m.topic,
        payload: m.payload,
        received_at: m.received_at,
        // rumqttd's local link does not expose the publish QoS or retain flag
        // (see shared notes); the device-edge work will carry them.
        qos: 0,
        retain: false,
        hops: m.hops,
    }
}

/// Turns outputs into records for the writer and performs rule publishes.
fn route_outputs(
    outputs: &mut Vec<Output>,
    messages: &[Message],
    publisher: &Publisher,
) -> Vec<Record> {
    let mut records = Vec::with_capacity(outputs.len());
    for output in outputs.drain(..) {
        match output {
            Output::Point {
                device_id,
                metric,
                time,
                value,
            } => records.push(Record::Point(PointRecord {
                device_id,
                metric,
                time,
                value,
            })),
            Output::Event {
                device_id,
                topic,
                time,
                rule,
                payload,
            } => records.push(Record::Event(EventRecord {
                device_id,
                topic,
                time,
                rule: rule.map(|r| r.to_string()),
                payload,
            })),
            Output::DeadLetter {
                device_id,
                topic,
                received_at,
                rule,
                reason,
                payload,
            } => records.push(Record::DeadLetter(DeadLetterRecord {
                device_id,
                topic,
                received_at,
                rule: rule.map(|r| r.to_string()),
                reason,
                payload: payload.to_vec(),
            })),
            Output::Publish {
                topic,
                payload,
                qos: _,
                retain,
                hops,
            } => {
                metrics::counter!("sluice_rule_publishes_total").increment(1);
                if let Err(e) = publisher.publish(&topic, payload.clone(), retain, hops) {
                    // Keep what the rule wanted to say rather than lose it.
                    warn!(%topic, error = %e, "rule publish failed; stored as a dead letter");
                    records.push(Record::DeadLetter(DeadLetterRecord {
                        device_id: None,
                        topic,
                        received_at: messages
                            .first()
                            .map(|m| m.received_at)
                            .unwrap_or_else(chrono::Utc::now),
                        rule: None,
                        reason: format!("rule publish failed: {e}"),
                        payload,
                    }));
                }
            }
        }
    }
    records
}
