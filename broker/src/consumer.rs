//! The in-process subscriber that takes every message off the router.
//!
//! It runs on its own thread, subscribed to `#`, and pushes each message into
//! a bounded channel towards the pipeline. Two rumqttd behaviours shape it:
//! - the router parks a link that has filled its buffer and sends
//!   `Unschedule`; unless the link answers with `ready()` it is never
//!   scheduled again, and ingestion would stop silently;
//! - when a subscriber falls further behind than the router's log holds, the
//!   router jumps it ahead. Every forwarded message carries its log offset,
//!   so a jump shows up as a gap, which is counted and logged as an error.

use crate::BrokerError;
use crate::publisher::HopLedger;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use metrics::counter;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, error, trace};

/// How long the consumer must see nothing new before a drain counts as done.
const DRAIN_IDLE: Duration = Duration::from_millis(300);

/// A message as the broker accepted it.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    pub topic: String,
    pub payload: Bytes,
    pub received_at: DateTime<Utc>,
    /// Rule publishes that led to this message (0: from a client).
    pub hops: u8,
}

pub(crate) struct ConsumerHandle {
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConsumerHandle {
    /// Asks the consumer to stop once the router has nothing more for it, and waits.
    pub(crate) fn drain_and_stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// Starts the consumer on a link the caller built (rumqttd does not export
/// the router sender's type, so links are built where it is inferred).
pub(crate) fn spawn(
    (mut link_tx, link_rx): (LinkTx, LinkRx),
    tx: mpsc::Sender<InboundMessage>,
    hops: Arc<HopLedger>,
) -> Result<ConsumerHandle, BrokerError> {
    link_tx
        .subscribe("#")
        .map_err(|e| BrokerError::Link(e.to_string()))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    let thread = std::thread::Builder::new()
        .name("mqtt-consumer".into())
        .spawn(move || {
            // The link must outlive the loop: dropping its sender half disconnects it.
            let _link_tx = link_tx;
            run(link_rx, tx, hops, flag);
        })?;
    Ok(ConsumerHandle {
        stopping,
        thread: Some(thread),
    })
}

fn run(
    mut link_rx: LinkRx,
    tx: mpsc::Sender<InboundMessage>,
    hops: Arc<HopLedger>,
    stopping: Arc<AtomicBool>,
) {
    let mut next_offset: Option<u64> = None;
    let mut last_activity = Instant::now();
    loop {
        let wait = Instant::now() + Duration::from_millis(50);
        match link_rx.recv_deadline(wait) {
            Ok(Some(Notification::Forward(forward))) => {
                last_activity = Instant::now();
                if let Some((_, offset)) = forward.cursor {
                    if let Some(expected) = next_offset
                        && offset > expected
                    {
                        let skipped = offset - expected;
                        counter!("sluice_broker_messages_skipped_total").increment(skipped);
                        error!(
                            skipped,
                            "the pipeline fell behind the broker's log bound and the router skipped messages; \
                             raise broker.log_segment_bytes/log_segment_count or add capacity"
                        );
                    }
                    next_offset = Some(offset + 1);
                }
                let publish = forward.publish;
                let topic = match String::from_utf8(publish.topic.to_vec()) {
                    Ok(t) => t,
                    // rumqttd validates UTF-8 on the way in; this cannot
                    // happen for client messages, but never panic on it.
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                };
                let hop_count = hops.take(&topic, &publish.payload);
                let msg = InboundMessage {
                    topic,
                    payload: publish.payload,
                    received_at: Utc::now(),
                    hops: hop_count,
                };
                counter!("sluice_messages_received_total").increment(1);
                trace!(topic = %msg.topic, bytes = msg.payload.len(), "message received");
                if tx.blocking_send(msg).is_err() {
                    debug!("pipeline closed; consumer stops");
                    return;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if let Err(e) = link_rx.ready() {
                    error!(error = %e, "cannot reschedule the consumer link");
                    return;
                }
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(LinkError::RecvTimeout(_)) => {
                if stopping.load(Ordering::SeqCst) && last_activity.elapsed() >= DRAIN_IDLE {
                    debug!("consumer drained");
                    return;
                }
            }
            Err(e) => {
                error!(error = %e, "the broker's router went away; consumer stops");
                return;
            }
        }
    }
}
