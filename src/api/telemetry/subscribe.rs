//! `Subscribe`: live points and events from the writer's feed.
//!
//! Each subscriber has a task that reads the shared feed, keeps what its
//! filter wants, and hands responses to the gRPC stream through a small
//! bounded channel. When the client reads slowly the channel fills, the
//! task waits, and the feed's ring moves on without it: the next response
//! carries `gap`, the number of items it missed. Nothing here can make the
//! writer wait.

use super::TelemetryService;
use super::events::event;
use super::points::point;
use super::request::{MAX_LISTED_DEVICES, MAX_LISTED_METRICS, check_names};
use metrics::{counter, gauge, histogram};
use sluice_ingest::live::{LiveBatch, LiveReceiver};
use sluice_proto::v1::{Event, Point, SubscribeRequest, SubscribeResponse};
use sluice_rules::TopicFilter;
use std::collections::HashSet;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::debug;

/// Responses a subscriber may have waiting for the client.
const SUBSCRIBER_QUEUE: usize = 16;
/// Items per response, so one large batch does not make one huge message.
const RESPONSE_ITEMS: usize = 2_000;

struct Filter {
    devices: HashSet<String>,
    metrics: HashSet<String>,
    topic: Option<TopicFilter>,
    points: bool,
    events: bool,
}

impl Filter {
    fn from_request(r: SubscribeRequest) -> Result<Self, Status> {
        check_names(&r.device_ids, "device_ids", MAX_LISTED_DEVICES)?;
        check_names(&r.metrics, "metrics", MAX_LISTED_METRICS)?;
        let topic = if r.topic_filter.is_empty() {
            None
        } else {
            Some(
                TopicFilter::new(&r.topic_filter)
                    .map_err(|e| Status::invalid_argument(format!("topic_filter: {e}")))?,
            )
        };
        // Neither flag: both kinds.
        let both = !r.points && !r.events;
        Ok(Self {
            devices: r.device_ids.into_iter().collect(),
            metrics: r.metrics.into_iter().collect(),
            topic,
            points: r.points || both,
            events: r.events || both,
        })
    }

    fn device(&self, id: Option<&str>) -> bool {
        self.devices.is_empty() || id.is_some_and(|d| self.devices.contains(d))
    }

    fn select(&self, batch: &LiveBatch) -> (Vec<Point>, Vec<Event>) {
        let points = if self.points {
            batch
                .points
                .iter()
                .filter(|p| self.device(Some(&p.device_id)))
                .filter(|p| self.metrics.is_empty() || self.metrics.contains(&p.metric))
                .map(|p| point(p.device_id.to_string(), p.metric.clone(), p.time, p.value))
                .collect()
        } else {
            Vec::new()
        };
        let events = if self.events {
            batch
                .events
                .iter()
                .filter(|e| self.device(e.device_id.as_deref()))
                .filter(|e| self.topic.as_ref().is_none_or(|f| f.matches(&e.topic)))
                .map(|e| {
                    event(sluice_ingest::query::StoredEvent {
                        id: 0,
                        device_id: e.device_id.as_deref().map(str::to_owned),
                        topic: e.topic.clone(),
                        time: e.time,
                        rule: e.rule.clone(),
                        payload: e.payload.clone(),
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        (points, events)
    }
}

/// Splits a batch's selection into responses of bounded size; the first
/// carries the gap before it.
fn responses(gap: u64, mut points: Vec<Point>, mut events: Vec<Event>) -> Vec<SubscribeResponse> {
    let mut out = Vec::new();
    let mut gap = gap;
    while gap > 0 || !points.is_empty() || !events.is_empty() {
        let p: Vec<Point> = points.drain(..points.len().min(RESPONSE_ITEMS)).collect();
        let room = RESPONSE_ITEMS - p.len();
        let e: Vec<Event> = events.drain(..events.len().min(room)).collect();
        out.push(SubscribeResponse {
            points: p,
            events: e,
            gap,
        });
        gap = 0;
    }
    out
}

impl TelemetryService {
    pub(super) fn subscribe_stream(
        &self,
        r: SubscribeRequest,
    ) -> Result<ReceiverStream<Result<SubscribeResponse, Status>>, Status> {
        let filter = Filter::from_request(r)?;
        let permit = self.subscribers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} live subscriptions are open, the server's limit (api.max_subscribers)",
                self.limits.max_subscribers
            ))
        })?;
        let mut feed = LiveReceiver::new(&self.live);
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let stop_tx = tx.clone();
        let follow = async move {
            let _permit = permit;
            gauge!("sluice_api_subscribers").increment(1.0);
            while let Some((missed, batch)) = feed.recv().await {
                if missed > 0 {
                    counter!("sluice_api_subscriber_missed_total").increment(missed);
                    debug!(missed, "a subscriber fell behind");
                }
                let (points, events) = filter.select(&batch);
                for response in responses(missed, points, events) {
                    if tx.send(Ok(response)).await.is_err() {
                        gauge!("sluice_api_subscribers").decrement(1.0);
                        return; // the client left
                    }
                }
                histogram!("sluice_api_subscribe_delivery_seconds")
                    .record(batch.committed.elapsed().as_secs_f64());
            }
            gauge!("sluice_api_subscribers").decrement(1.0);
        };
        super::spawn_stream(&self.stopping, &stop_tx, follow);
        Ok(ReceiverStream::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_comes_first_and_responses_stay_small() {
        let p = |i| point("d".into(), "m".into(), chrono::Utc::now(), i as f64);
        let out = responses(7, (0..RESPONSE_ITEMS + 5).map(p).collect(), vec![]);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].gap, out[0].points.len()), (7, RESPONSE_ITEMS));
        assert_eq!((out[1].gap, out[1].points.len()), (0, 5));
        let only_gap = responses(3, vec![], vec![]);
        assert_eq!(only_gap.len(), 1);
        assert!(responses(0, vec![], vec![]).is_empty());
    }
}
