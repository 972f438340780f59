//! Sends rule outputs back through the router, so they reach MQTT
//! subscribers and, like any message, the rules.
//!
//! Loop protection: rumqttd 3.1.1 messages carry no metadata, so the hop count
//! of a rule publish travels beside it in the [`HopLedger`], keyed by a hash
//! of topic and payload; the consumer takes it back when the message comes
//! round. The rules refuse a publish past the hop limit.

use crate::BrokerError;
use bytes::Bytes;
use dashmap::DashMap;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use tracing::{debug, error};

#[derive(Clone)]
pub struct Publisher {
    link: Arc<Mutex<LinkTx>>,
    hops: Arc<HopLedger>,
}

impl Publisher {
    pub(crate) fn new(
        (link_tx, link_rx): (LinkTx, LinkRx),
        hops: Arc<HopLedger>,
    ) -> Result<Self, BrokerError> {
        std::thread::Builder::new()
            .name("mqtt-publisher-rx".into())
            .spawn(move || keep_scheduled(link_rx))?;
        Ok(Self {
            link: Arc::new(Mutex::new(link_tx)),
            hops,
        })
    }

    /// Publishes at QoS 0 (rumqttd's local links cannot publish at QoS 1/2);
    /// subscribers receive it at their subscription's QoS.
    ///
    /// Must be called from a plain thread, not from inside a tokio runtime.
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        hops: u8,
    ) -> Result<(), String> {
        let payload = Bytes::from(payload);
        // `$` topics never reach the `#` consumer, so there is nothing to carry.
        if !topic.starts_with('$') {
            self.hops.put(topic, &payload, hops);
        }
        let packet = Packet::Publish(
            Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload, retain),
            None,
        );
        let mut link = self
            .link
            .lock()
            .map_err(|_| "publisher lock poisoned".to_string())?;
        // `LinkTx::send` is async in name only (it pushes to a buffer and
        // does a blocking channel send), so a minimal executor suffices and
        // works during shutdown, when no runtime may be left.
        futures_executor::block_on(link.send(packet))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The publisher's link receives nothing useful, but rumqttd still expects
/// every link to answer `Unschedule`.
fn keep_scheduled(mut link_rx: LinkRx) {
    loop {
        match link_rx.recv() {
            Ok(Some(Notification::Unschedule)) => {
                if link_rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(LinkError::Recv(_)) => {
                debug!("publisher link closed");
                return;
            }
            Err(e) => {
                error!(error = %e, "publisher link failed");
                return;
            }
        }
    }
}

/// Hop counts of rule publishes on their way round the router.
#[derive(Default)]
pub struct HopLedger {
    pending: DashMap<u64, VecDeque<u8>>,
}

impl HopLedger {
    /// Past this many entries (publishes the consumer never saw, e.g. lost
    /// to a router log jump) the ledger is cleared rather than grow.
    const MAX_ENTRIES: usize = 100_000;

    fn key(topic: &str, payload: &[u8]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    pub(crate) fn put(&self, topic: &str, payload: &[u8], hops: u8) {
        if self.pending.len() >= Self::MAX_ENTRIES {
            self.pending.clear();
        }
        self.pending
            .entry(Self::key(topic, payload))
            .or_default()
            .push_back(hops);
    }

    /// The hop count of a message coming round, 0 for one from a client.
    pub(crate) fn take(&self, topic: &str, payload: &[u8]) -> u8 {
        if self.pending.is_empty() {
            return 0;
        }
        let key = Self::key(topic, payload);
        let Some(mut entry) = self.pending.get_mut(&key) else {
            return 0;
        };
        let hops = entry.pop_front().unwrap_or(0);
        let now_empty = entry.is_empty();
        drop(entry);
        if now_empty {
            self.pending.remove_if(&key, |_, q| q.is_empty());
        }
        hops
    }
}

#[cfg(test)]
mod tests {
    use super::HopLedger;

    #[test]
    fn hop_counts_come_back_in_order_and_default_to_zero() {
        let l = HopLedger::default();
        assert_eq!(l.take("a", b"x"), 0);
        l.put("a", b"x", 1);
        l.put("a", b"x", 3);
        assert_eq!(l.take("a", b"y"), 0);
        assert_eq!(l.take("a", b"x"), 1);
        assert_eq!(l.take("a", b"x"), 3);
        assert_eq!(l.take("a", b"x"), 0);
        assert!(l.pending.is_empty());
    }
}
