//! One reconnect storm of a misbehaving device.
//!
//! The device opens [`STORM_CONNECTIONS`] connections with its own client
//! id, one after the other, each waiting for its CONNACK. Per MQTT 3.1.1
//! §3.1.4 each is a session takeover: the broker closes the previous
//! holder of the id, the device's main connection first, then each storm
//! connection in turn. The last one leaves with a DISCONNECT, so the main
//! connection comes back to a free client id.
//!
//! The device's publisher quiesces before (`device.rs`) and holds its main
//! connection's reconnection until the storm is over, so no telemetry is in
//! flight on a connection the storm closes.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet};

use crate::misbehaviour::STORM_CONNECTIONS;
use crate::stats::Stats;

/// Runs a storm with the device's connection `options`; returns how many
/// of its connections the broker accepted (each counted in the stats).
/// Each connection waits at most `timeout` for its CONNACK; a refused or
/// failed one ends the storm (as an error in the stats).
pub async fn run(options: &MqttOptions, timeout: Duration, stats: &Stats) -> u32 {
    let id = options.client_id();
    // Every connection stays open on this side until the storm is over, so
    // each is closed by the broker's takeover, not by the device leaving.
    let mut opened_connections: Vec<(AsyncClient, EventLoop)> = Vec::new();
    for _ in 0..STORM_CONNECTIONS {
        let (client, mut eventloop) = AsyncClient::new(options.clone(), 10);
        match tokio::time::timeout(timeout, connack(&mut eventloop)).await {
            Ok(Ok(())) => {
                stats.add_storm_connect();
                opened_connections.push((client, eventloop));
            }
            Ok(Err(e)) => {
                stats.add_error(&format_args!("{id}: storm connection: {e}"));
                break;
            }
            Err(_) => {
                stats.add_error(&format_args!(
                    "{id}: storm connection: no CONNACK within {timeout:?}"
                ));
                break;
            }
        }
    }
    let opened = opened_connections.len() as u32;
    // The last one holds the id: it leaves with a DISCONNECT.
    if let Some((client, mut eventloop)) = opened_connections.pop() {
        let leave = async {
            if client.disconnect().await.is_err() {
                return;
            }
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        // Bounded: a broker that went away must not hold the device.
        let _ = tokio::time::timeout(timeout, leave).await;
    }
    opened
}

/// Polls a fresh event loop until its connection is accepted.
async fn connack(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            return Ok(());
        }
    }
}
