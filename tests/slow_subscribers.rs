//! Application subscribers that stop reading, end to end: gRPC `Subscribe`
//! streams whose client never polls (HTTP/2 flow control fills up) and MQTT
//! subscribers that send CONNECT and SUBSCRIBE over a raw socket and never
//! read it again. Meanwhile devices publish tens of megabytes at QoS 1.
//!
//! What must hold, with no speed measured:
//! - every device gets a PUBACK for every message while the subscribers
//!   are stalled (counted), and every message is stored exactly once;
//! - Sluice's resident memory grows by less than a bound made of the
//!   configured buffers, far below what the subscribers were sent;
//! - a gRPC subscriber that finally reads gets, for every item stored since
//!   it subscribed, either the item or a `gap` that counts it
//!   (ARCHITECTURE.md, "Live subscribers never slow ingestion"), and the
//!   misses are counted in `sluice_api_subscriber_missed_total`;
//! - an MQTT subscriber that finally reads gets each device's messages in
//!   order and without duplicates, then what is published after, having
//!   skipped what the router's bounded log no longer held.

mod support;

use bytes::BytesMut;
use rumqttc::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Subscribe};
use sluice_proto::v1::telemetry_client::TelemetryClient;
use sluice_proto::v1::{SubscribeRequest, SubscribeResponse};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use support::{MqttConn, Options, Sluice, metric_sum, mqtt_connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(120);
/// A subscriber that reads gets something this often while anything is due.
const QUIET: Duration = Duration::from_secs(30);
/// Published once the load is over; a subscriber that reads gets it.
const MARKER_TOPIC: &str = "devices/slow-marker/end";
const DEVICES: usize = 10;
const MESSAGES: usize = 2_000;
/// Numeric fields per message: each is a point.
const METRICS: usize = 8;
/// Padding per message, so the MQTT side carries ~40 MB in all.
const PAD: usize = 2_000;

// The limits this test configures (each bounds one buffer; see `bound_kib`).
const LOG_SEGMENT_BYTES: usize = 1 << 20;
const LOG_SEGMENT_COUNT: usize = 4;
const LIVE_FEED_BATCHES: usize = 4;
const BATCH_ROWS: usize = 1_000;
const READ_BATCH: usize = 256;
/// A smaller writer queue than the default 128 batches, so that the load's
/// own memory varies less and the bound can be tighter.
const QUEUE_BATCHES: usize = 16;

/// gRPC subscribers with 64 KiB HTTP/2 windows (a client's choice), and
/// one with tonic's defaults (megabytes).
const GRPC_SMALL_WINDOW: usize = 3;
const GRPC_DEFAULT_WINDOW: usize = 1;
/// MQTT subscribers and their filters: three filters, so three router logs.
const MQTT_SUBSCRIBERS: [(&str, QoS); 6] = [
    ("devices/#", QoS::AtLeastOnce),
    ("devices/#", QoS::AtLeastOnce),
    ("devices/#", QoS::AtMostOnce),
    ("devices/+/telemetry", QoS::AtMostOnce),
    ("devices/+/telemetry", QoS::AtLeastOnce),
    ("#", QoS::AtLeastOnce),
];
const MQTT_FILTERS: usize = 3;

fn device(d: usize) -> String {
    format!("slow-dev-{d}")
}

fn payload(seq: usize) -> String {
    let mut fields: Vec<String> = (0..METRICS).map(|m| format!("\"m{m}\":{seq}")).collect();
    fields.push(format!("\"seq\":{seq}"));
    fields.push(format!("\"pad\":\"{}\"", "x".repeat(PAD)));
    format!("{{{}}}", fields.join(","))
}

/// How much Sluice's resident memory may grow, in KiB, and why: each
/// buffer a stalled subscriber can fill is bounded by configuration.
fn bound_kib() -> u64 {
    // The router keeps one log per distinct filter; count its bytes twice
    // for the per-message bookkeeping beside the payloads.
    let router_logs = MQTT_FILTERS * LOG_SEGMENT_COUNT * LOG_SEGMENT_BYTES * 2;
    // Per MQTT subscriber: the router's outgoing buffer (200 packets) and
    // the edge's write buffer of one flush of them.
    let message = PAD + 200;
    let mqtt_subscribers = MQTT_SUBSCRIBERS.len() * 2 * 200 * message;
    // Per gRPC subscriber: 16 queued responses of up to 2,000 items (a
    // point with its strings ~150 bytes) and HTTP/2's send buffer
    // (400 KiB in hyper) plus its window.
    let grpc = (GRPC_SMALL_WINDOW + GRPC_DEFAULT_WINDOW) * (16 * 2_000 * 150 + (1 << 20));
    // The live ring: batches of up to BATCH_ROWS plus one pipeline batch.
    let ring = LIVE_FEED_BATCHES * (BATCH_ROWS + READ_BATCH * (METRICS + 1)) * 150;
    // The load itself, subscribers or not: the writer's queue (batches of
    // one spool read's points) and 96 MiB for the rest (spool and edge
    // buffers, sqlx, the runtime, the allocator's slack; the whole load
    // without any subscriber grew RSS by 65-68 MiB on the 2-core machine).
    let writer_queue = QUEUE_BATCHES * READ_BATCH * (METRICS + 1) * 150;
    let load = writer_queue + (96 << 20);
    ((router_logs + mqtt_subscribers + grpc + ring + load) / 1024) as u64
}

/// A client that connects over a raw socket with a small receive buffer,
/// subscribes, reads its CONNACK and SUBACK, and then stops reading.
async fn stalled_mqtt_subscriber(port: u16, id: &str, filter: &str, qos: QoS) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // Without this, loopback autotuning lets the kernel buffer up to
    // tcp_rmem's maximum (32 MiB here) for the client before Sluice notices.
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let mut out = BytesMut::new();
    let mut connect = Connect::new(id);
    connect.keep_alive = 600;
    connect.write(&mut out).unwrap();
    let mut subscribe = Subscribe::new(filter, qos);
    subscribe.pkid = 1; // 0 is not a valid packet id
    subscribe.write(&mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let connack = read_packet(&mut stream, &mut buf).await;
    assert!(matches!(connack, Packet::ConnAck(_)), "{connack:?}");
    let suback = read_packet(&mut stream, &mut buf).await;
    assert!(matches!(suback, Packet::SubAck(_)), "{suback:?}");
    assert!(buf.is_empty(), "nothing else before the load");
    stream
}

/// The next MQTT packet from a raw socket.
async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Packet {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(p) => return p,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                let n = tokio::time::timeout(WAIT, stream.read_buf(buf))
                    .await
                    .expect("the connection went quiet")
                    .unwrap();
                assert!(n > 0, "Sluice closed the connection");
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

async fn stalled_grpc_subscriber(port: u16, small_window: bool) -> Streaming<SubscribeResponse> {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    if small_window {
        endpoint = endpoint
            .initial_stream_window_size(Some(64 * 1024))
            .initial_connection_window_size(Some(64 * 1024));
    }
    // A connection of its own, so its stall holds back nobody else's calls.
    let channel = endpoint.connect().await.unwrap();
    TelemetryClient::new(channel)
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// One device publishes every message at QoS 1 and counts the PUBACKs.
async fn run_device(mut conn: MqttConn, d: usize) -> usize {
    let client = conn.client.clone();
    let publisher = tokio::spawn(async move {
        for seq in 0..MESSAGES {
            client
                .publish(
                    format!("devices/{}/telemetry", device(d)),
                    QoS::AtLeastOnce,
                    false,
                    payload(seq),
                )
                .await
                .unwrap();
        }
    });
    let mut acks = 0;
    while acks < MESSAGES {
        // `next` fails the test if nothing arrives for 15 s: a stalled ack.
        match conn.next().await {
            Ok(Packet::PubAck(_)) => acks += 1,
            Ok(_) => {}
            Err(e) => panic!("{}: connection ended after {acks} acks: {e}", device(d)),
        }
    }
    publisher.await.unwrap();
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscribers_hold_back_neither_memory_nor_devices() {
    let setting = |k: &str, v: usize| (k.to_owned(), v.to_string());
    let mut sluice = Sluice::start_with(
        Options {
            env: vec![
                setting("SLUICE_BROKER__LOG_SEGMENT_BYTES", LOG_SEGMENT_BYTES),
                setting("SLUICE_BROKER__LOG_SEGMENT_COUNT", LOG_SEGMENT_COUNT),
                setting("SLUICE_INGEST__LIVE_FEED_BATCHES", LIVE_FEED_BATCHES),
                setting("SLUICE_INGEST__BATCH_ROWS", BATCH_ROWS),
                setting("SLUICE_INGEST__BACKLOG_BATCH_ROWS", BATCH_ROWS),
                setting("SLUICE_RULES__READ_BATCH", READ_BATCH),
                setting("SLUICE_INGEST__QUEUE_BATCHES", QUEUE_BATCHES),
            ],
            ..Default::default()
        },
        |_| {},
    )
    .await;

    let mut grpc = Vec::new();
    for i in 0..GRPC_SMALL_WINDOW + GRPC_DEFAULT_WINDOW {
        grpc.push(stalled_grpc_subscriber(sluice.grpc_port, i < GRPC_SMALL_WINDOW).await);
    }
    let mut mqtt = Vec::new();
    for (i, (filter, qos)) in MQTT_SUBSCRIBERS.iter().enumerate() {
        mqtt.push(
            stalled_mqtt_subscriber(sluice.mqtt_port, &format!("slow-app-{i}"), filter, *qos).await,
        );
    }
    let mut conns = Vec::new();
    for d in 0..DEVICES {
        let mut opts = rumqttc::MqttOptions::new(device(d), "127.0.0.1", sluice.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30));
        conns.push(mqtt_connect(opts).await.unwrap());
    }
    let baseline = sluice.memory_kib("VmRSS");

    // Every device gets every PUBACK while no subscriber reads.
    let devices: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(d, conn)| tokio::spawn(run_device(conn, d)))
        .collect();
    for (d, task) in devices.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), MESSAGES, "{}: PUBACKs", device(d));
    }
    let sent_bytes = DEVICES * MESSAGES * payload(MESSAGES).len();

    // Every message stored exactly once.
    let points = (DEVICES * MESSAGES * (METRICS + 1)) as i64;
    sluice
        .eventually("every point stored", WAIT, || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM points")
                .fetch_one(&sluice.db)
                .await
                .unwrap();
            (n >= points).then_some(())
        })
        .await;
    let seqs: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT device_id, count(*), count(DISTINCT value), max(value)::int8 \
         FROM points_named WHERE metric = 'seq' GROUP BY device_id ORDER BY device_id",
    )
    .fetch_all(&sluice.db)
    .await
    .unwrap();
    assert_eq!(seqs.len(), DEVICES);
    for (device, n, distinct, max) in &seqs {
        let m = MESSAGES as i64;
        assert_eq!((*n, *distinct, *max), (m, m, m - 1), "{device}: seq points");
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM points")
        .fetch_one(&sluice.db)
        .await
        .unwrap();
    assert_eq!(total, points, "no point stored twice");

    // Memory, with every subscriber still stalled.
    let peak = sluice.memory_kib("VmHWM");
    let bound = bound_kib();
    println!(
        "devices sent {} MiB to {} MQTT and {} gRPC subscribers; RSS before {baseline} KiB, \
         peak {peak} KiB, growth {} KiB, bound {bound} KiB",
        sent_bytes >> 20,
        mqtt.len(),
        grpc.len(),
        peak.saturating_sub(baseline)
    );
    assert!(
        peak <= baseline + bound,
        "peak RSS {peak} KiB over the baseline {baseline} KiB + {bound} KiB"
    );

    // The gRPC subscribers read at last: every item is either received or
    // counted in a gap.
    let mut gaps = 0u64;
    for (i, stream) in grpc.iter_mut().enumerate() {
        let (received, missed) = drain_grpc(stream, points as u64).await;
        println!("gRPC subscriber {i}: {received} points received, {missed} counted as missed");
        if i < GRPC_SMALL_WINDOW {
            assert!(missed > 0, "subscriber {i} fell behind and was told so");
        }
        gaps += missed;
    }
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "sluice_api_subscriber_missed_total", &[]),
        gaps as f64,
        "the gaps the subscribers were told are the ones counted"
    );

    // An MQTT subscriber reads at last: in order, no duplicates, and then
    // a message published now; what the router's log dropped is skipped.
    // (A device's own last message may be among the dropped: the log keeps
    // the newest messages of all devices together.)
    let marker = sluice.mqtt("slow-marker").await;
    support::publish(&marker, MARKER_TOPIC, "{}").await;
    let (filter, _) = MQTT_SUBSCRIBERS[2];
    let received = drain_mqtt(&mut mqtt[2]).await;
    println!(
        "MQTT subscriber on {filter} (QoS 0) received {received} of {} messages after stalling",
        DEVICES * MESSAGES
    );
    assert!(received < DEVICES * MESSAGES, "it skipped ahead");
    // The skip is reported only by rumqttd's warning (no counter: the
    // router does not tell the edge, see RELIABILITY.md).
    assert!(
        sluice.log().contains("jumping to head"),
        "the router logged the skip"
    );

    // Still running, and it stops cleanly (exit 0) with the stalled
    // subscribers still connected.
    sluice.pid();
    sluice.stop();
    drop((mqtt, grpc));
}

/// Reads a subscription until every stored item is accounted for; returns
/// (points received, items counted in gaps). Points are checked unique.
async fn drain_grpc(stream: &mut Streaming<SubscribeResponse>, items: u64) -> (u64, u64) {
    let (mut received, mut missed) = (0u64, 0u64);
    let mut seen = HashSet::new();
    while received + missed < items {
        let r = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("the subscription went quiet before accounting for every item")
            .expect("the stream ended")
            .expect("a response, not an error");
        assert!(r.events.is_empty(), "no events in this test");
        for p in &r.points {
            let time = p.time.as_ref().map(|t| (t.seconds, t.nanos));
            assert!(
                seen.insert((
                    p.device_id.clone(),
                    p.metric.clone(),
                    p.value.to_bits(),
                    time
                )),
                "a point delivered twice: {p:?}"
            );
        }
        received += r.points.len() as u64;
        missed += r.gap;
    }
    assert_eq!(
        received + missed,
        items,
        "nothing delivered beyond what was stored"
    );
    (received, missed)
}

/// Reads a QoS 0 subscription until the message on [`MARKER_TOPIC`]
/// arrives; checks each device's messages arrive in order without
/// duplicates; returns how many devices' messages arrived.
async fn drain_mqtt(stream: &mut TcpStream) -> usize {
    let mut buf = BytesMut::new();
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    let mut received = 0;
    loop {
        let packet = match tokio::time::timeout(QUIET, read_packet(stream, &mut buf)).await {
            Ok(p) => p,
            Err(_) => panic!(
                "nothing for {QUIET:?} after {received} messages; the last seq per device: {last:?}"
            ),
        };
        let Packet::Publish(p) = packet else {
            continue;
        };
        if p.topic == MARKER_TOPIC {
            return received;
        }
        let device = p.topic.split('/').nth(1).unwrap().to_owned();
        let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        let seq = body["seq"].as_u64().unwrap() as usize;
        if let Some(&before) = last.get(&device) {
            assert!(seq > before, "{device}: {seq} after {before}");
        }
        last.insert(device, seq);
        received += 1;
    }
}
