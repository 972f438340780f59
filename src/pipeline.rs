//! The pipeline thread: spool → rules → writer (and rule publishes to the
//! broker's subscribers and back into the rules).
//!
//! One plain thread, because rule functions are synchronous CPU work that
//! must not stall the async runtime. It reads the spool in order, a batch
//! at a time, runs the batch through the rules (spread over the rule
//! workers by device, see `sluice_rules::parallel`), and hands the outputs
//! to the writer with the batch's last spool sequence number as a mark. The writer
//! reports the mark once those rows are committed, and only then may the
//! spool forget the messages: a crash in between replays them.
//!
//! After a crash the spool replays from its checkpoint, which may lag the
//! last commit. What the database already holds (`ingest_progress`, written
//! by each writer shard with its rows) keeps the replay from storing
//! anything twice: messages every shard holds are skipped, and the window
//! of messages only some shards hold is handed to the writer one message at
//! a time, so it can drop exactly the records already stored.
//!
//! A rule publish is delivered to MQTT subscribers through the router and
//! run through the rules again here, within the same batch, so its outputs
//! are covered by the same mark. The hop limit bounds how often that repeats.

use sluice_broker::{ORIGIN_DEVICE, Publisher, SpoolReader, SpoolRecord};
use sluice_ingest::{
    DeadLetterRecord, EventRecord, PointRecord, Record, Sink, StateRecord, StoredProgress,
};
use sluice_rules::{Message, Output, ParallelProcessor, device_id_from_topic};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug_span, error, info, warn};

/// How long one wait for spool records lasts before the loop checks again.
const SPOOL_WAIT: Duration = Duration::from_millis(200);

pub struct PipelineHandle {
    pub thread: std::thread::JoinHandle<()>,
    /// Fires once the records that were in the spool at start (a replay
    /// after a crash) have been handed to the writer.
    pub replayed: tokio::sync::oneshot::Receiver<u64>,
}

pub fn spawn(
    spool: SpoolReader,
    processor: ParallelProcessor,
    sink: Sink,
    publisher: Publisher,
    batch_max: usize,
    checkpointed: u64,
    already_stored: StoredProgress,
) -> std::io::Result<PipelineHandle> {
    let (replayed_tx, replayed) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || {
            run(
                spool,
                processor,
                sink,
                publisher,
                batch_max.max(1),
                Replay {
                    stored_everywhere: checkpointed.max(already_stored.stored_everywhere()),
                    window_end: already_stored.window_end(),
                },
                replayed_tx,
            )
        })?;
    Ok(PipelineHandle { thread, replayed })
}

/// What the database held of the spool at start.
struct Replay {
    /// Messages up to here are stored in every writer shard: skipped.
    stored_everywhere: u64,
    /// Messages up to here may be stored in some shards: sent one at a time.
    window_end: u64,
}

fn run(
    mut spool: SpoolReader,
    mut processor: ParallelProcessor,
    sink: Sink,
    publisher: Publisher,
    batch_max: usize,
    stored: Replay,
    replayed: tokio::sync::oneshot::Sender<u64>,
) {
    let Replay {
        stored_everywhere: already_stored,
        window_end,
    } = stored;
    let replay_end = spool.replay_end();
    let mut replayed = Some(replayed);
    if replay_end <= already_stored {
        finish_replay(&mut replayed, replay_end);
    }
    let mut outputs = Vec::new();
    loop {
        let batch = match spool.next_batch(batch_max, SPOOL_WAIT) {
            Ok(batch) => batch,
            Err(sluice_broker::spool::SpoolError::Closed) => return,
            Err(e) => {
                // The spool cannot be read past this point; retrying keeps
                // everything after it on disk rather than skipping it.
                error!(error = %e, "cannot read the spool; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let Some(mark) = batch.last().map(|r| r.seq) else {
            continue;
        };
        // A replay after a crash: what the database already holds is
        // skipped, so no message is stored twice. Its mark still goes to
        // the writer, so the checkpoint moves past it.
        let before = batch.len();
        let mut batch = batch;
        batch.retain(|r| r.seq > already_stored);
        if batch.len() < before {
            metrics::counter!("sluice_spool_replay_skipped_total")
                .increment((before - batch.len()) as u64);
        }
        // The replay window: one message per send, so the writer can tell
        // which of its records some shard already stored.
        let in_window = batch.partition_point(|r| r.seq <= window_end);
        let rest = batch.split_off(in_window);
        let mut sends: Vec<(Vec<SpoolRecord>, u64)> = batch
            .into_iter()
            .map(|r| {
                let seq = r.seq;
                (vec![r], seq)
            })
            .collect();
        if !rest.is_empty() || sends.is_empty() {
            sends.push((rest, mark));
        }
        for (part, mark) in sends {
            let records = run_rules(part, mark, &mut processor, &mut outputs, &publisher);
            if sink.blocking_send_marked(records, mark).is_err() {
                // Only possible if the writer task died: nothing can be stored any more.
                error!("the writer has stopped; the pipeline stops");
                return;
            }
        }
        if replayed.is_some() && mark >= replay_end {
            info!(up_to = replay_end, "spool replay handed to the writer");
            finish_replay(&mut replayed, replay_end);
        }
    }
}

/// Runs spool records through the rules (and their publishes through them
/// again); returns the records for the writer.
fn run_rules(
    part: Vec<SpoolRecord>,
    mark: u64,
    processor: &mut ParallelProcessor,
    outputs: &mut Vec<Output>,
    publisher: &Publisher,
) -> Vec<Record> {
    let mut messages: Vec<Message> = part.into_iter().map(to_rule_message).collect();
    let _span = debug_span!("pipeline_batch", messages = messages.len(), mark).entered();
    let mut records = Vec::new();
    while !messages.is_empty() {
        processor.process(&messages, outputs);
        // Sized once: a read batch makes tens of thousands of records, and
        // growing by doubling copies them and touches fresh pages each step.
        records.reserve(outputs.len());
        let received_at = messages[0].received_at;
        messages = route_outputs(outputs, received_at, publisher, &mut records);
    }
    records
}

fn finish_replay(replayed: &mut Option<tokio::sync::oneshot::Sender<u64>>, up_to: u64) {
    if let Some(tx) = replayed.take() {
        let _ = tx.send(up_to);
    }
}

fn to_rule_message(r: SpoolRecord) -> Message {
    // A device's messages belong to the device that authenticated, whatever
    // the topic says; the ACL kept it to its own topics anyway. Applications
    // and (development-mode) anonymous clients speak for the device their
    // topic names.
    let device_id = if r.origin_kind == ORIGIN_DEVICE {
        Some(Arc::from(r.origin_id.as_str()))
    } else {
        device_id_from_topic(&r.topic).map(Arc::from)
    };
    Message {
        device_id,
        received_at: chrono::DateTime::from_timestamp_micros(r.received_at_us)
            .unwrap_or_else(chrono::Utc::now),
        topic: r.topic,
        payload: r.payload,
        qos: r.qos,
        retain: r.retain,
        hops: r.hops,
    }
}

/// Turns outputs into records for the writer and performs rule publishes;
/// returns the published messages, which go through the rules next.
fn route_outputs(
    outputs: &mut Vec<Output>,
    received_at: chrono::DateTime<chrono::Utc>,
    publisher: &Publisher,
    records: &mut Vec<Record>,
) -> Vec<Message> {
    let mut published = Vec::new();
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
            Output::State(change) => records.push(Record::State(StateRecord {
                rule: change.rule,
                device_id: change.device_id,
                key: change.key,
                value: change.value,
            })),
            Output::Publish {
                topic,
                payload,
                qos,
                retain,
                hops,
            } => {
                metrics::counter!("sluice_rule_publishes_total").increment(1);
                published.push(Message {
                    device_id: device_id_from_topic(&topic).map(Arc::from),
                    topic: topic.clone(),
                    payload: bytes::Bytes::from(payload.clone()),
                    received_at: chrono::Utc::now(),
                    qos,
                    retain,
                    hops,
                });
                if let Err(e) = publisher.publish(&topic, payload.clone(), retain) {
                    // Keep what the rule wanted to say rather than lose it.
                    warn!(%topic, error = %e, "rule publish failed; stored as a dead letter");
                    records.push(Record::DeadLetter(DeadLetterRecord {
                        device_id: None,
                        topic,
                        received_at,
                        rule: None,
                        reason: format!("rule publish failed: {e}"),
                        payload,
                    }));
                }
            }
        }
    }
    published
}
