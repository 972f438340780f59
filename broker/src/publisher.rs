//! Publishing into the router through shared local links: Sluice's own
//! messages (rule outputs, presence, wills) and every client publish the
//! edge accepted. (Rule publishes reach the rules again inside the pipeline,
//! not through the router.)
//!
//! Client publishes go through a few shared links rather than each client's
//! own: most devices only publish, and a rumqttd link costs tens of KiB, so
//! a device gets a link of its own only once it subscribes.

use crate::BrokerError;
use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use std::sync::{Arc, Mutex};
use tracing::{debug, error};

#[derive(Clone)]
pub struct Publisher {
    link: Arc<Mutex<LinkTx>>,
}

impl Publisher {
    pub(crate) fn new((link_tx, link_rx): (LinkTx, LinkRx)) -> Result<Self, BrokerError> {
        std::thread::Builder::new()
            .name("mqtt-publisher-rx".into())
            .spawn(move || keep_scheduled(link_rx))?;
        Ok(Self {
            link: Arc::new(Mutex::new(link_tx)),
        })
    }

    /// Publishes at QoS 0 (rumqttd's local links cannot publish at QoS 1/2);
    /// subscribers receive it at their subscription's QoS.
    ///
    /// Blocks only while the router's inbound queue is full.
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        let payload = Bytes::from(payload);
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

    /// Hands several publishes to the router at once (one wake-up), in order.
    pub(crate) fn publish_batch(&self, packets: &mut Vec<Packet>) -> Result<(), String> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        let mut link = self
            .link
            .lock()
            .map_err(|_| "publisher lock poisoned".to_string())?;
        link.buffer().extend(packets.drain(..));
        futures_executor::block_on(link.send(last))
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
