//! One simulated device: its own MQTT connection, event loop and publisher.
//!
//! Each device owns a rumqttc [`AsyncClient`] and [`EventLoop`] so that the
//! broker sees N independent clients, exactly like a real fleet. Two tasks
//! cooperate per device:
//!
//! * the *event loop* task ([`drive`]) drives the connection: it counts
//!   PUBACKs, connection errors and (re)connections, and reconnects after a
//!   short backoff when the connection drops (unless a reconnect storm
//!   holds it back);
//! * the *publisher* (the device task itself) waits for the first
//!   connection, publishes telemetry on the pacing schedule until told to
//!   stop or until `--count` messages, waits for outstanding QoS 1
//!   acknowledgements, and disconnects cleanly.
//!
//! A message counts as sent once the client accepted it into its bounded
//! request channel: that is when its `seq` is used, so `sent` per device is
//! exactly the range of `seq` values consumers should expect. rumqttc drops
//! whatever is still queued when a clean-session connection is replaced,
//! so wherever the device itself makes the broker close its connection
//! (misbehaving profile) it first lets its telemetry reach the broker and
//! waits for the connection to be back afterwards: what is missing at the
//! end is then the server's doing, not the simulator's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::args::{Config, MAX_PACKET_BYTES};
use crate::misbehaviour::{self, BadMessage, MAX_OUTGOING_PACKET_BYTES, Misbehaviour};
use crate::pacing;
use crate::sent_log::SentLog;
use crate::stats::{Stats, new_latency_histogram};
use crate::storm;
use crate::telemetry::{Profile, TelemetryGenerator};

/// MQTT keep-alive of every device.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// First wait before reconnecting after a connection error; doubles up to
/// [`MAX_BACKOFF`] while errors repeat, so a dead broker is not hammered.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// Least time granted to the clean disconnect at the end.
const MIN_CLOSE_TIME: Duration = Duration::from_secs(1);

/// What a device did, for the summary and `--verify`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceOutcome {
    /// Messages sent: seqs `0..sent`.
    pub sent: u64,
    /// PUBACKs received.
    pub acked: u64,
    /// `ts` of the last message sent.
    pub last_ts_ms: Option<i64>,
}

/// The state of a device's connection, as its event loop reports it.
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    /// PUBACKs received.
    acked: u64,
    /// ConnAcks received.
    connacks: u64,
    /// UNSUBACKs received (the barrier, see [`Publisher::barrier`]).
    unsubacks: u64,
    /// Connections lost or closed by the broker.
    drops: u64,
    /// Connected right now.
    connected: bool,
}

/// Runs device `index` until it has published its messages (or `stop`
/// turned true), drained its acknowledgements and disconnected.
pub async fn run(
    index: u32,
    config: Arc<Config>,
    stats: Arc<Stats>,
    log: Option<Arc<SentLog>>,
    mut stop: watch::Receiver<bool>,
) -> DeviceOutcome {
    let id = config.device_id(index);
    let options = match mqtt_options(&config, index, &id) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{id}: cannot set up the connection: {e:#}");
            stats.add_error(&format_args!("{id}: {e:#}"));
            return DeviceOutcome::default();
        }
    };
    let (client, eventloop) = AsyncClient::new(options.clone(), config.channel_capacity);
    let (link_tx, mut link) = watch::channel(Link::default());
    let (hold_tx, hold_rx) = watch::channel(false);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut driver = tokio::spawn(drive(
        eventloop,
        id.clone(),
        Arc::clone(&stats),
        link_tx,
        hold_rx,
        closing_rx,
    ));

    // Publish only once connected: queueing into a dead connection would
    // just fill the channel, and a device that never connects must give up.
    let connected = tokio::select! {
        r = tokio::time::timeout(config.connect_timeout, link.wait_for(|l| l.connacks > 0)) => {
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

    let mut outcome = DeviceOutcome::default();
    if connected {
        let mut publisher = Publisher {
            client: &client,
            barrier_topic: format!("devices/{id}/sim-barrier"),
            id: &id,
            index,
            config: &config,
            stats: &stats,
            link: link.clone(),
            hold: hold_tx,
            options,
            log,
        };
        (outcome.sent, outcome.last_ts_ms) = publisher.publish(&mut stop).await;
    }
    let sent = outcome.sent;

    if config.qos != QoS::AtMostOnce && sent > 0 {
        let all_acked = link.wait_for(|l| l.acked >= sent);
        // A timeout or a finished event loop both leave acks missing; the
        // summary reports how many.
        let _ = tokio::time::timeout(config.drain_timeout, all_acked).await;
    }
    outcome.acked = link.borrow().acked;

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
    outcome
}

/// Connection settings of one device.
fn mqtt_options(config: &Config, index: u32, id: &str) -> Result<MqttOptions> {
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
    if let Some((user, password)) = config.login(index) {
        options.set_credentials(user, password);
    }
    if let Some(tls) = &config.tls {
        let client_config = tls.client_config(id)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            client_config,
        )));
    }
    Ok(options)
}

/// The publishing side of one device.
struct Publisher<'a> {
    client: &'a AsyncClient,
    /// Never subscribed: unsubscribing from it is a harmless round trip.
    barrier_topic: String,
    id: &'a str,
    index: u32,
    config: &'a Config,
    stats: &'a Stats,
    link: watch::Receiver<Link>,
    /// True while a reconnect storm holds the main connection down.
    hold: watch::Sender<bool>,
    /// For the storm's connections.
    options: MqttOptions,
    log: Option<Arc<SentLog>>,
}

impl Publisher<'_> {
    /// Publishes telemetry until `--count` is reached or `stop` turns true.
    /// Returns how many messages the client accepted and the last one's `ts`.
    async fn publish(&mut self, stop: &mut watch::Receiver<bool>) -> (u64, Option<i64>) {
        let config = self.config;
        let topic = format!("devices/{}/telemetry", self.id);
        let seed = config.seed.map(|s| s.wrapping_add(u64::from(self.index)));
        let mut telemetry = TelemetryGenerator::for_profile(config.profile, config.metrics, seed);
        let mut ticker = pacing::ticker(config.rate, Instant::now());
        let mut sent = 0u64;
        let mut last_ts_ms = None;

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

            if config.profile == Profile::Misbehaving {
                match misbehaviour::scheduled(sent) {
                    Some(Misbehaviour::Send(bad)) => self.send_bad(bad, &topic, sent).await,
                    Some(Misbehaviour::ReconnectStorm) => self.storm(sent).await,
                    None => {}
                }
            }
            let seq = telemetry.next_seq();
            let payload = telemetry.next_payload(chrono::Utc::now().timestamp_millis());
            if let Some(log) = &self.log {
                log.record(self.index, seq);
            }
            let publish = self
                .client
                .publish(topic.as_str(), config.qos, false, payload);
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
                    last_ts_ms = telemetry.last_ts_ms();
                    self.stats.add_sent();
                    if stopping {
                        break;
                    }
                }
                Err(e) => {
                    // Only happens when the event loop has ended for good.
                    eprintln!("{}: publish failed, stopping this device: {e}", self.id);
                    self.stats.add_error(&format_args!("{}: {e}", self.id));
                    break;
                }
            }
        }
        (sent, last_ts_ms)
    }

    /// Sends one bad message (at QoS 0, so it takes no part in the
    /// telemetry's ack count).
    async fn send_bad(&mut self, bad: BadMessage, topic: &str, sent: u64) {
        let (bad_topic, bad_payload) = misbehaviour::message(bad, self.id, topic);
        // The broker may drop the connection over it, and telemetry written
        // behind it on the same socket would be lost with it (never
        // acknowledged, so the device's loss, not the server's). So: no
        // telemetry in flight before it, and none sent until it is known
        // whether the connection survived.
        let cut_off = bad.may_cut_off();
        if cut_off {
            self.quiesce(sent).await;
        }
        let before = *self.link.borrow();
        if self
            .client
            .publish(bad_topic, QoS::AtMostOnce, false, bad_payload)
            .await
            .is_ok()
        {
            self.stats.add_misbehaved();
        }
        if cut_off {
            self.barrier(before).await;
        }
    }

    /// Waits until the broker has everything sent so far: acknowledged at
    /// QoS 1; at QoS 0, read by the broker (a barrier).
    async fn quiesce(&mut self, sent: u64) {
        if self.config.qos == QoS::AtMostOnce {
            let before = *self.link.borrow();
            self.barrier(before).await;
        } else {
            let all_acked = self.link.wait_for(|l| l.acked >= sent);
            let _ = tokio::time::timeout(self.config.drain_timeout, all_acked).await;
        }
    }

    /// Sends an UNSUBSCRIBE and waits for its UNSUBACK, or for a new
    /// connection since `before` if this one is closed meanwhile. A broker
    /// handles a connection's packets in order, so the UNSUBACK proves that
    /// everything written before was read and accepted. Sluice answers it
    /// at once, without creating any state for the client.
    async fn barrier(&mut self, before: Link) {
        if self
            .client
            .unsubscribe(self.barrier_topic.as_str())
            .await
            .is_err()
        {
            return; // the event loop has ended
        }
        let answered = self
            .link
            .wait_for(|l| l.unsubacks > before.unsubacks || l.connacks > before.connacks);
        let _ = tokio::time::timeout(self.config.connect_timeout, answered).await;
    }

    /// A reconnect storm (see `storm.rs`), then the main connection back.
    async fn storm(&mut self, sent: u64) {
        let connect_timeout = self.config.connect_timeout;
        self.quiesce(sent).await;
        let before = *self.link.borrow();
        self.hold.send_replace(true);
        let opened = storm::run(&self.options, connect_timeout, self.stats).await;
        if opened > 0 && before.connected {
            // The first storm connection took the session over: wait until
            // the event loop noticed, so it reconnects only after the storm.
            let dropped = self.link.wait_for(|l| l.drops > before.drops);
            let _ = tokio::time::timeout(connect_timeout, dropped).await;
        }
        self.hold.send_replace(false);
        let back = self.link.wait_for(|l| l.connected);
        let _ = tokio::time::timeout(connect_timeout, back).await;
    }
}

/// Drives the device's event loop until the clean disconnect went out, or
/// until `closing` is set while the connection is down. While `hold` is
/// set (a reconnect storm), a lost connection is expected: it is neither
/// counted as an error nor reconnected until the hold ends.
async fn drive(
    mut eventloop: EventLoop,
    id: String,
    stats: Arc<Stats>,
    link: watch::Sender<Link>,
    mut hold: watch::Receiver<bool>,
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
                stats.device_connected(link.borrow().connacks == 0);
                connected = true;
                backoff = MIN_BACKOFF;
                link.send_modify(|l| {
                    l.connacks += 1;
                    l.connected = true;
                });
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(sent_at) = in_flight.remove(&ack.pkid) {
                    let micros = sent_at.elapsed().as_micros().max(1);
                    latency.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
                }
                stats.add_acked();
                link.send_modify(|l| l.acked += 1);
            }
            Ok(Event::Incoming(Packet::UnsubAck(_))) => {
                link.send_modify(|l| l.unsubacks += 1);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if connected {
                    stats.device_disconnected();
                }
                break;
            }
            Ok(_) => {}
            Err(e) => {
                let expected = *hold.borrow();
                if !expected {
                    stats.add_error(&format_args!("{id}: {e}"));
                }
                // Publishes in flight at a drop are retransmitted: their
                // times would measure the outage, not the broker.
                in_flight.clear();
                if connected {
                    connected = false;
                    stats.device_disconnected();
                    link.send_modify(|l| {
                        l.drops += 1;
                        l.connected = false;
                    });
                }
                if *closing.borrow() {
                    break;
                }
                // One line per device: with thousands of devices against a
                // dead broker, more would drown the progress output.
                if !expected && !logged_error {
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
                // Not while a storm uses the client id.
                tokio::select! {
                    _ = hold.wait_for(|h| !*h) => {}
                    _ = closing.wait_for(|c| *c) => break,
                }
                backoff = if expected {
                    MIN_BACKOFF
                } else {
                    (backoff * 2).min(MAX_BACKOFF)
                };
            }
        }
    }
    stats.merge_latency(&latency);
}
