//! The live feed: what each committed batch stored, for API subscribers.
//!
//! A writer shard publishes its points and events right after its
//! transaction commits, so a subscriber never sees data that a crash could
//! still take back. Publishing never waits: the feed is a
//! [`tokio::sync::broadcast`] ring of the last `capacity` batches, shared
//! by every subscriber (one copy however many there are). A subscriber that
//! falls more than that behind loses the oldest batches; each batch carries
//! the running count of items published before it, so the subscriber can
//! say exactly how many it missed. With nobody subscribed, nothing is
//! published and nothing is copied.

use crate::record::{EventRecord, PointRecord};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::broadcast;

/// One committed batch's data.
#[derive(Debug)]
pub struct LiveBatch {
    /// Items (points plus events) published before this batch since the
    /// feed started.
    pub offset: u64,
    pub points: Vec<PointRecord>,
    pub events: Vec<EventRecord>,
    /// When it was committed.
    pub committed: Instant,
}

impl LiveBatch {
    pub fn items(&self) -> u64 {
        (self.points.len() + self.events.len()) as u64
    }
}

#[derive(Clone)]
pub struct LiveFeed {
    sender: broadcast::Sender<Arc<LiveBatch>>,
    /// Items published so far. Taken and sent under one lock, so offsets
    /// arrive in order although several shards publish.
    published: Arc<Mutex<u64>>,
}

impl LiveFeed {
    /// A feed that keeps the last `capacity` batches for slow subscribers.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            sender,
            published: Arc::new(Mutex::new(0)),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveBatch>> {
        self.sender.subscribe()
    }

    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Publishes a committed batch (dropped when nobody listens).
    pub fn publish(&self, points: Vec<PointRecord>, events: Vec<EventRecord>) {
        if points.is_empty() && events.is_empty() {
            return;
        }
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let batch = LiveBatch {
            offset: *published,
            points,
            events,
            committed: Instant::now(),
        };
        let items = batch.items();
        if self.sender.send(Arc::new(batch)).is_ok() {
            *published += items;
        }
    }

    /// Accounts for `items` stored but not published (the batch had rows the
    /// database refused, and which ones is not tracked): subscribers see
    /// them as missed rather than not at all.
    pub fn skip(&self, items: u64) {
        if self.has_subscribers() {
            *self.published.lock().unwrap_or_else(|e| e.into_inner()) += items;
        }
    }
}

/// Follows a feed for one subscriber, turning lag into a count of missed items.
pub struct LiveReceiver {
    receiver: broadcast::Receiver<Arc<LiveBatch>>,
    /// The offset the next batch should start at.
    next: u64,
}

impl LiveReceiver {
    pub fn new(feed: &LiveFeed) -> Self {
        // Subscribing under the lock publishers hold pins the offset the
        // first batch must start at. Without it, a receiver overtaken before
        // its first `recv` would take the first batch it sees as its start
        // and never report the batches it lost.
        let published = feed.published.lock().unwrap_or_else(|e| e.into_inner());
        Self {
            receiver: feed.subscribe(),
            next: *published,
        }
    }

    /// The next batch, with how many items were missed just before it
    /// (the ring overwrote them before this receiver read them). None once
    /// the feed has closed.
    pub async fn recv(&mut self) -> Option<(u64, Arc<LiveBatch>)> {
        loop {
            match self.receiver.recv().await {
                Ok(batch) => {
                    let missed = batch.offset.saturating_sub(self.next);
                    self.next = batch.offset + batch.items();
                    return Some((missed, batch));
                }
                // The next batch's offset says how many items were lost.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn points(n: usize) -> Vec<PointRecord> {
        (0..n)
            .map(|i| PointRecord {
                device_id: Arc::from("d"),
                metric: format!("m{i}"),
                time: Utc::now(),
                value: i as f64,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_lagging_receiver_learns_how_much_it_missed() {
        let feed = LiveFeed::new(2);
        let mut rx = LiveReceiver::new(&feed);
        feed.publish(points(3), vec![]);
        let (missed, batch) = rx.recv().await.unwrap();
        assert_eq!((missed, batch.points.len()), (0, 3));
        // Four batches into a ring of two: the first two are lost.
        for n in [5, 7, 11, 13] {
            feed.publish(points(n), vec![]);
        }
        let (missed, batch) = rx.recv().await.unwrap();
        assert_eq!((missed, batch.points.len()), (12, 11));
        let (missed, batch) = rx.recv().await.unwrap();
        assert_eq!((missed, batch.points.len()), (0, 13));
    }

    #[tokio::test]
    async fn a_receiver_overtaken_before_its_first_read_is_told_so() {
        let feed = LiveFeed::new(2);
        feed.publish(points(100), vec![]); // nobody listens: not counted
        let mut rx = LiveReceiver::new(&feed);
        for n in [2, 3, 5] {
            feed.publish(points(n), vec![]);
        }
        let (missed, batch) = rx.recv().await.unwrap();
        assert_eq!((missed, batch.points.len()), (2, 3));
    }

    #[test]
    fn nothing_is_published_without_subscribers() {
        let feed = LiveFeed::new(2);
        assert!(!feed.has_subscribers());
        feed.publish(points(1), vec![]);
        let _rx = LiveReceiver::new(&feed);
        assert!(feed.has_subscribers());
    }
}
