//! One simulated device: its own MQTT connection, event loop and publisher.
//!
//! Each device owns a rumqttc [`AsyncClient`] and [`EventLoop`] so that the
//! broker sees N independent clients, exactly like a real fleet. Two tasks
//! cooperate per device:
//!
//! * the *event loop* task drives the connection: it counts PUBACKs,
//!   connection errors and (re)connections, and reconnects after a short
//!   backoff when the connection drops;
//! * the *publisher* (the device task itself) waits for the first
//!   connection, publishes telemetry on the pacing schedule until told to
//!   stop or until `--count` messages, waits for outstanding QoS 1
//!   acknowledgements, and disconnects cleanly.
//!
//! A message counts as sent once the client accepted it into its bounded
//! request channel: that is when its `seq` is used, so `sent` per device is
//! exactly the range of `seq` values consumers should expect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::args::{Config, MAX_PACKET_BYTES};
use crate::misbehaviour::{self, MAX_OUTGOING_PACKET_BYTES};
use crate::pacing;
use crate::stats::{Stats, new_latency_histogram};
use crate::telemetry::{Profile, TelemetryGenerator};

/// MQTT keep-alive of every device.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// First wait before reconnecting after a connection error; doubles up to
/// [`MAX_BACKOFF`] while errors repeat, so a dead broker is not hammered.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// Least time granted to the clean disconnect at the end.
const MIN_CLOSE_TIME: Duration = Duration::from_secs(1);

/// Runs device `index` until it has published its messages (or `stop`
/// turned true), drained its acknowledgements and disconnected.
pub async fn run(
    index: u32,
    config: Arc<Config>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let id = config.device_id(index);
    let capacity = config.channel_capacity;
    let (client, eventloop) = AsyncClient::new(mqtt_options(&config, &id), capacity);

    let (acked_tx, mut acked_rx) = watch::channel(0u64);
    let (connected_tx, mut connected_rx) = watch::channel(false);
    // ConnAcks so far: a misbehaving device waits for its reconnection.
    let (connacks_tx, connacks_rx) = watch::channel(0u64);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut driver = tokio::spawn(drive(
        eventloop,
        id.clone(),
        Arc::clone(&stats),
        acked_tx,
        connected_tx,
        connacks_tx,
        closing_rx,
    ));

    // Publish only once connected: queueing into a dead connection would
    // just fill the channel, and a device that never connects must give up.
    let connected = tokio::select! {
        r = tokio::time::timeout(config.connect_timeout, connected_rx.wait_for(|c| *c)) => {
            matches!(r, Ok(Ok(_)))
        }
        _ = stop.wait_for(|s| *s) => false,
    };
    if !connected && !*stop.borrow() {
        eprintln!(
            "{id}: giving up, not connected after {:.1} s",
            config.connect_timeout.as_secs_f64()
        );
    }

    let sent = if connected {
        let links = Links {
            acked: acked_rx.clone(),
            connacks: connacks_rx,
        };
        publish(&client, &id, index, &config, &stats, &mut stop, links).await
    } else {
        0
    };

    if config.qos != QoS::AtMostOnce && sent > 0 {
        let all_acked = acked_rx.wait_for(|acked| *acked >= sent);
        // A timeout or a finished event loop both leave acks missing; the
        // summary reports how many.
        let _ = tokio::time::timeout(config.drain_timeout, all_acked).await;
    }

    // Disconnect cleanly: DISCONNECT queues behind any QoS 0 messages still
    // in the channel, so they go out first. Bounded, in case the broker is
    // gone.
    closing_tx.send_replace(true);
    let close_time = config.drain_timeout.max(MIN_CLOSE_TIME);
    let closed = tokio::time::timeout(close_time, async {
        if connected {
            let _ = client.disconnect().await;
        }
        let _ = (&mut driver).await;
    })
    .await;
    if closed.is_err() {
        driver.abort();
    }
}

/// Connection settings of one device.
fn mqtt_options(config: &Config, id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(id, config.host.clone(), config.port);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_inflight(config.inflight)
        .set_request_channel_capacity(config.channel_capacity)
        .set_max_packet_size(
            MAX_PACKET_BYTES,
            if config.profile == Profile::Misbehaving {
                MAX_OUTGOING_PACKET_BYTES
            } else {
                MAX_PACKET_BYTES
            },
        );
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    options
}

/// What the publisher sees of its event loop.
struct Links {
    /// PUBACKs received.
    acked: watch::Receiver<u64>,
    /// ConnAcks received.
    connacks: watch::Receiver<u64>,
}

/// Publishes telemetry until `--count` is reached or `stop` turns true.
/// Returns how many messages the client accepted.
async fn publish(
    client: &AsyncClient,
    id: &str,
    index: u32,
    config: &Config,
    stats: &Stats,
    stop: &mut watch::Receiver<bool>,
    mut links: Links,
) -> u64 {
    let topic = format!("devices/{id}/telemetry");
    let seed = config.seed.map(|s| s.wrapping_add(u64::from(index)));
    let mut telemetry = TelemetryGenerator::for_profile(config.profile, config.metrics, seed);
    let mut ticker = pacing::ticker(config.rate, Instant::now());
    let mut sent = 0u64;

    while config.count.is_none_or(|count| sent < count) {
        if let Some(ticker) = ticker.as_mut() {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                _ = ticker.tick() => {}
            }
        } else if *stop.borrow() {
            break;
        }

        if config.profile == Profile::Misbehaving
            && let Some(bad) = misbehaviour::scheduled(sent)
        {
            let (bad_topic, bad_payload) = misbehaviour::message(bad, id, &topic);
            // The broker drops the connection over an oversized payload, and
            // telemetry written behind it on the same socket would be lost
            // with it (the broker never acknowledged it, so this is the
            // device's loss, not Sluice's). So: no telemetry in flight
            // before it, and none sent until the device is back.
            let cut_off = bad == misbehaviour::BadMessage::Oversized;
            let connacks = *links.connacks.borrow();
            if cut_off && config.qos != QoS::AtMostOnce {
                let all_acked = links.acked.wait_for(|a| *a >= sent);
                let _ = tokio::time::timeout(config.drain_timeout, all_acked).await;
            }
            // QoS 0, so it takes no part in the telemetry's ack count.
            if client
                .publish(bad_topic, QoS::AtMostOnce, false, bad_payload)
                .await
                .is_ok()
            {
                stats.add_misbehaved();
            }
            if cut_off {
                let back = links.connacks.wait_for(|n| *n > connacks);
                let _ = tokio::time::timeout(config.connect_timeout, back).await;
            }
        }
        let payload = telemetry.next_payload(chrono::Utc::now().timestamp_millis());
        let publish = client.publish(topic.as_str(), config.qos, false, payload);
        tokio::pin!(publish);
        let mut stopping = false;
        let result = tokio::select! {
            biased;
            r = &mut publish => r,
            // The async block drops the watch guard before the await below.
            _ = async { drop(stop.wait_for(|s| *s).await) } => {
                // Dropping a pending publish does not reliably withdraw the
                // message: the event loop may already have taken it, and it
                // would then be sent (and acked) without being counted. So
                // let it complete, bounded in case the broker is gone.
                stopping = true;
                match tokio::time::timeout(config.drain_timeout, publish).await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
        };
        match result {
            Ok(()) => {
                sent += 1;
                stats.add_sent();
                if stopping {
                    break;
                }
            }
            Err(e) => {
                // Only happens when the event loop has ended for good.
                eprintln!("{id}: publish failed, stopping this device: {e}");
                stats.add_error(&format_args!("{id}: {e}"));
                break;
            }
        }
    }
    sent
}

/// Drives the device's event loop until the clean disconnect went out, or
/// until `closing` is set while the connection is down.
async fn drive(
    mut eventloop: EventLoop,
    id: String,
    stats: Arc<Stats>,
    acked: watch::Sender<u64>,
    connected_once: watch::Sender<bool>,
    connacks: watch::Sender<u64>,
    mut closing: watch::Receiver<bool>,
) {
    let mut connected = false;
    let mut logged_error = false;
    let mut backoff = MIN_BACKOFF;
    // Packet id → when the publish went out; ids are reused, so an entry
    // lives only until its PUBACK.
    let mut in_flight: HashMap<u16, Instant> = HashMap::new();
    let mut latency = new_latency_histogram();
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                in_flight.insert(pkid, Instant::now());
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                stats.device_connected(!*connected_once.borrow());
                connected = true;
                backoff = MIN_BACKOFF;
                connected_once.send_replace(true);
                connacks.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(sent_at) = in_flight.remove(&ack.pkid) {
                    let micros = sent_at.elapsed().as_micros().max(1);
                    latency.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
                }
                stats.add_acked();
                acked.send_modify(|n| *n += 1);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if connected {
                    stats.device_disconnected();
                }
                break;
            }
            Ok(_) => {}
            Err(e) => {
                stats.add_error(&format_args!("{id}: {e}"));
                // Publishes in flight at a drop are retransmitted: their
                // times would measure the outage, not the broker.
                in_flight.clear();
                if connected {
                    connected = false;
                    stats.device_disconnected();
                }
                if *closing.borrow() {
                    break;
                }
                // One line per device: with thousands of devices against a
                // dead broker, more would drown the progress output.
                if !logged_error {
                    logged_error = true;
                    eprintln!(
                        "{id}: connection error: {e}; reconnecting (further errors of this \
                         device are only counted)"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closing.wait_for(|c| *c) => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    stats.merge_latency(&latency);
}
