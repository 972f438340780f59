//! Connection storms and half-open sockets against a real `sluice serve`:
//! 10,000 connects at once, a client that goes silent, one that stalls half
//! way through a packet, one that stops reading, and one that Sluice itself
//! stops reading (throttled). Packets are written as raw bytes where a
//! library would hide what is being tested (or be too heavy: 10,000
//! rumqttc event loops).

mod support;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4 as wire;
use rumqttc::{MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{MqttConn, Options, Sluice, metric, mqtt_connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Safety net for anything a test waits for; never a pass/fail threshold.
const PATIENCE: Duration = Duration::from_secs(60);

fn encode(packet: wire::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, usize::MAX).unwrap();
    out.to_vec()
}

fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut c = wire::Connect::new(client_id);
    c.keep_alive = keep_alive;
    encode(wire::Packet::Connect(c))
}

/// Connects, sends CONNECT and returns the socket with the CONNACK's code.
async fn raw_connect(port: u16, client_id: &str, keep_alive: u16) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&connect_packet(client_id, keep_alive))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut connack))
        .await
        .expect("a CONNACK")
        .expect("a CONNACK");
    assert_eq!(connack[..2], [0x20, 0x02], "not a CONNACK: {connack:?}");
    (s, connack[3])
}

/// Reads until the server closes; returns what arrived. Panics if the
/// connection is still open after [`PATIENCE`].
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, s.read(&mut buf)).await {
            Err(_) => panic!("the server did not close the connection"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The soft open-file limit up to the hard one: this process holds one
/// socket per storm connection, and `sluice serve` inherits the limit (it
/// also raises its own at start).
fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= STORM as u64 + 1_000,
        "this test holds {STORM} sockets on each side: it needs an open-file hard \
         limit of at least {} (`ulimit -Hn` is {hard})",
        STORM + 1_000
    );
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    hard
}

async fn wait_puback(conn: &mut MqttConn) {
    loop {
        match conn.next().await {
            Ok(Packet::PubAck(_)) => return,
            Ok(_) => {}
            Err(e) => panic!("closed before PUBACK: {e}"),
        }
    }
}

const STORM: usize = 10_000;
/// Room above the storm for the real device and a few refused extras.
const MAX_CONNECTIONS: usize = STORM + 100;

/// Opens [`STORM`] connections at once (every connect its own task) and
/// returns them, each answered CONNACK 0. What goes wrong is recorded, not
/// panicked on, so every connection is accounted for.
async fn storm(port: u16, prefix: &'static str) -> Vec<TcpStream> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..STORM)
        .map(|i| {
            tokio::spawn(async move {
                let attempt = async {
                    let mut s = TcpStream::connect(("127.0.0.1", port))
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    s.write_all(&connect_packet(&format!("{prefix}-{i}"), 0))
                        .await
                        .map_err(|e| format!("write: {e}"))?;
                    let mut connack = [0u8; 4];
                    s.read_exact(&mut connack)
                        .await
                        .map_err(|e| format!("read: {e}"))?;
                    Ok::<_, String>((s, connack, started.elapsed()))
                };
                tokio::time::timeout(PATIENCE, attempt)
                    .await
                    .unwrap_or_else(|_| Err("no CONNACK in time".into()))
            })
        })
        .collect();
    let mut held = Vec::with_capacity(STORM);
    let mut refused = 0;
    let mut failures = Vec::new();
    let mut last_connack = Duration::ZERO;
    for task in tasks {
        match task.await.unwrap() {
            Ok((s, [0x20, 0x02, _, 0], at)) => {
                last_connack = last_connack.max(at);
                held.push(s);
            }
            Ok((_, [0x20, 0x02, _, 3], _)) => refused += 1,
            Ok((_, other, _)) => failures.push(format!("unexpected reply {other:?}")),
            Err(e) => failures.push(e),
        }
    }
    let first_failures: Vec<_> = failures.iter().take(5).collect();
    assert!(
        failures.is_empty(),
        "{} of {STORM} connects failed, e.g. {first_failures:?}",
        failures.len()
    );
    assert_eq!(refused, 0, "below max_connections nobody is refused");
    assert_eq!(held.len(), STORM);
    eprintln!(
        "{prefix}: {STORM} connects answered CONNACK 0 within {:.2} s",
        last_connack.as_secs_f64()
    );
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connects_at_once_are_all_served() {
    let hard = raise_open_file_limit();
    assert!(
        hard as usize > STORM + 1_000,
        "the hard open-file limit ({hard}) cannot hold {STORM} connections"
    );
    // Anonymous clients (no hash per login: the storm measures the edge,
    // not Argon2id) beside one real, authenticated device.
    let mut sluice = Sluice::start_with(
        Options {
            env: vec![(
                "SLUICE_BROKER__MAX_CONNECTIONS".into(),
                MAX_CONNECTIONS.to_string(),
            )],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let secret = sluice.create_device("real").await;
    sluice
        .eventually(
            "no connection left from the readiness probe",
            PATIENCE,
            || async {
                (metric(&sluice.metrics().await, "sluice_connections{") == 0.0).then_some(())
            },
        )
        .await;
    let rss_before = sluice.memory_kib("VmRSS");

    let port = sluice.mqtt_port;
    let mut held = storm(port, "storm").await;

    let metrics = sluice.metrics().await;
    assert_eq!(
        metric(&metrics, "sluice_connections{"),
        STORM as f64,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "sluice_connections_accepted_total{kind=\"anonymous\"}"
        ),
        STORM as f64
    );
    let rss_held = sluice.memory_kib("VmRSS");
    let per_connection = (rss_held.saturating_sub(rss_before)) as f64 / STORM as f64;
    eprintln!(
        "storm: RSS {rss_before} KiB before, {rss_held} KiB with {STORM} connections held: \
         {per_connection:.1} KiB per connection"
    );
    // BENCHMARKS.md measured ~13–16 KiB per idle connection; 64 KiB leaves
    // room for allocator slack while still catching a per-connection
    // router link or an unbounded buffer (tens of KiB each and more).
    assert!(
        per_connection <= 64.0,
        "{per_connection:.1} KiB per connection"
    );

    // While the storm's connections are held, a real device still gets in
    // and its QoS 1 publish is acknowledged (durable).
    let mut real = mqtt_connect(sluice.device_options("real", &secret))
        .await
        .expect("the real device connects while 10,000 others are held");
    real.client
        .publish(
            "devices/real/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"t":1}"#,
        )
        .await
        .unwrap();
    wait_puback(&mut real).await;

    // Past max_connections the rest are refused with CONNACK 3, and counted.
    // One at a time, so the count of free places is exact.
    let free = MAX_CONNECTIONS - STORM - 1;
    let extra = free + 20;
    let (mut accepted, mut over) = (0, 0);
    for i in 0..extra {
        let (s, code) = raw_connect(port, &format!("extra-{i}"), 0).await;
        match code {
            0 => {
                accepted += 1;
                held.push(s);
            }
            3 => over += 1,
            other => panic!("CONNACK {other}"),
        }
    }
    assert_eq!((accepted, over), (free, 20));
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sluice_connections_refused_total{reason=\"max_connections\"}"
        ),
        20.0
    );

    // All close; every place is given back.
    drop(held);
    real.client.disconnect().await.unwrap();
    real.closed().await;
    sluice
        .eventually("every connection closed", PATIENCE, || async {
            (metric(&sluice.metrics().await, "sluice_connections{") == 0.0).then_some(())
        })
        .await;
    let rss_closed = sluice.memory_kib("VmRSS");
    eprintln!("storm: RSS {rss_closed} KiB after all closed");

    // The same again: memory kept after the first round (allocator pages,
    // map capacity) is reused, not added to; a per-connection leak would
    // show here.
    let again = storm(port, "again").await;
    let rss_again = sluice.memory_kib("VmRSS");
    eprintln!("storm: RSS {rss_again} KiB with {STORM} connections held again");
    assert!(
        rss_again <= rss_held + rss_held / 4,
        "RSS grew from {rss_held} KiB to {rss_again} KiB for the same {STORM} connections"
    );
    drop(again);
    sluice
        .eventually("every connection closed again", PATIENCE, || async {
            (metric(&sluice.metrics().await, "sluice_connections{") == 0.0).then_some(())
        })
        .await;
    // The real device's message was stored.
    let points = sluice
        .eventually("the real device's point", PATIENCE, || async {
            let p = sluice.all_points("real").await;
            (!p.is_empty()).then_some(p)
        })
        .await;
    assert_eq!(points.len(), 1);
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_silent_is_closed_after_one_and_a_half_keep_alives() {
    let sluice = Sluice::start(|_| {}).await;
    let port = sluice.mqtt_port;
    let sent = Instant::now();
    let (mut silent, code) = raw_connect(port, "silent", 2).await;
    assert_eq!(code, 0);
    // The same keep-alive with a PINGREQ every second stays connected.
    let (mut pinger, code) = raw_connect(port, "pinger", 2).await;
    assert_eq!(code, 0);
    let pinging = tokio::spawn(async move {
        let mut pongs = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            pinger.write_all(&[0xc0, 0x00]).await.unwrap();
            let mut pong = [0u8; 2];
            tokio::time::timeout(PATIENCE, pinger.read_exact(&mut pong))
                .await
                .expect("PINGRESP")
                .expect("still connected");
            assert_eq!(pong, [0xd0, 0x00]);
            pongs += 1;
        }
        pinger.write_all(&[0xe0, 0x00]).await.unwrap(); // DISCONNECT
        pongs
    });

    // [MQTT-3.1.2-24]: closed once 1.5 × 2 s pass without a packet; never
    // before (the server's clock starts after the CONNECT was sent).
    assert!(until_closed(&mut silent).await.is_empty());
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "closed after {:?}, before 1.5 × the keep-alive",
        sent.elapsed()
    );
    assert_eq!(pinging.await.unwrap(), 5);

    let metrics = sluice.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sluice_disconnects_total{reason=\"keep_alive_timeout\"}"
        ),
        1.0,
        "{metrics}"
    );
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_that_stalls_half_way_is_closed() {
    let sluice = Sluice::start_with(
        Options {
            env: vec![("SLUICE_BROKER__PACKET_TIMEOUT_MS".into(), "1000".into())],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let port = sluice.mqtt_port;
    // Keep-alive 0 (off): only the packet timeout can close these.
    let (mut stalled, code) = raw_connect(port, "stalled", 0).await;
    assert_eq!(code, 0);
    let (mut idle, code) = raw_connect(port, "idle", 0).await;
    assert_eq!(code, 0);

    // A PUBLISH header announcing 100 bytes, then 7 of them, then nothing.
    let started = Instant::now();
    stalled
        .write_all(&[0x30, 100, 0x00, 0x03, b't', b'/', b'x', b'{', b'"'])
        .await
        .unwrap();
    assert!(until_closed(&mut stalled).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed after {:?}, before the packet timeout",
        started.elapsed()
    );

    // An idle client with no packet begun is not affected (keep-alive 0
    // means the client asked for no timeout).
    idle.write_all(&[0xc0, 0x00]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(PATIENCE, idle.read_exact(&mut pong))
        .await
        .expect("PINGRESP")
        .expect("the idle client is still connected");
    assert_eq!(pong, [0xd0, 0x00]);

    // Nothing of the half packet was stored or acknowledged.
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sluice_disconnects_total{reason=\"packet_timeout\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "sluice_messages_received_total"), 0.0);
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_blocks_no_one() {
    let sluice = Sluice::start_with(
        Options {
            env: vec![("SLUICE_BROKER__WRITE_TIMEOUT_MS".into(), "2000".into())],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let port = sluice.mqtt_port;

    // It subscribes, then never reads again; its receive buffer is small so
    // its window fills early.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    stuck.write_all(&connect_packet("stuck", 0)).await.unwrap();
    let mut connack = [0u8; 4];
    stuck.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    // QoS 0: the router's limit of 100 unacknowledged QoS 1 deliveries
    // would stop sending before the socket's buffers are full.
    let mut subscribe = wire::Subscribe::new("load/#", QoS::AtMostOnce);
    subscribe.pkid = 1;
    stuck
        .write_all(&encode(wire::Packet::Subscribe(subscribe)))
        .await
        .unwrap();
    let mut suback = [0u8; 5];
    stuck.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x00]);

    let opts = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1024 * 1024, 1024 * 1024);
        o
    };
    let mut reader = mqtt_connect(opts("reader")).await.unwrap();
    reader
        .client
        .subscribe("load/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match reader.next().await {
            Ok(Packet::SubAck(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }

    // Far more than the stuck client's socket buffers and Sluice's send
    // buffer towards it can hold (tcp_wmem allows up to 4 MiB).
    const MESSAGES: usize = 600;
    let payload = Arc::new(vec![b'x'; 16 * 1024]);
    let mut publisher = mqtt_connect(opts("publisher")).await.unwrap();
    let sender = {
        let client = publisher.client.clone();
        let payload = payload.clone();
        tokio::spawn(async move {
            for i in 0..MESSAGES {
                client
                    .publish(
                        format!("load/{i}"),
                        QoS::AtLeastOnce,
                        false,
                        payload.to_vec(),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut acked = 0;
    while acked < MESSAGES {
        match publisher.next().await {
            Ok(Packet::PubAck(_)) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("the publisher was closed after {acked} acks: {e}"),
        }
    }
    sender.await.unwrap();
    let mut delivered = 0;
    while delivered < MESSAGES {
        let p = reader.next_publish().await;
        assert_eq!(p.payload.len(), payload.len());
        delivered += 1;
    }

    // The stuck client is closed once a write to it made no progress for
    // write_timeout_ms, counted.
    sluice
        .eventually("the stuck subscriber closed", PATIENCE, || async {
            let metrics = sluice.metrics().await;
            (metric(
                &metrics,
                "sluice_disconnects_total{reason=\"write_timeout\"}",
            ) == 1.0)
                .then_some(())
        })
        .await;
    sluice
        .eventually("its place given back", PATIENCE, || async {
            (metric(&sluice.metrics().await, "sluice_connections{") == 2.0).then_some(())
        })
        .await;
    drop(stuck);
    sluice.stop();
}

/// Regression: the keep-alive ran while Sluice itself was not reading (a
/// throttled or backpressured client), so a client Sluice kept waiting
/// longer than 1.5 × its keep-alive was closed as silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sluice_keeps_waiting_is_not_timed_out() {
    let sluice = Sluice::start_with(
        Options {
            env: vec![
                // One publish every 2 s, against a keep-alive of 1 s (1.5 s).
                ("SLUICE_BROKER__MAX_PUBLISH_RATE".into(), "0.5".into()),
                ("SLUICE_BROKER__PUBLISH_BURST".into(), "1".into()),
            ],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let (mut s, code) = raw_connect(sluice.mqtt_port, "patient", 1).await;
    assert_eq!(code, 0);
    let mut burst = Vec::new();
    for pkid in 1..=3u16 {
        let mut p = wire::Publish::new("devices/patient/telemetry", QoS::AtLeastOnce, "{}");
        p.pkid = pkid;
        burst.extend(encode(wire::Packet::Publish(p)));
    }
    s.write_all(&burst).await.unwrap();
    for pkid in 1..=3u8 {
        let mut ack = [0u8; 4];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut ack))
            .await
            .expect("a PUBACK")
            .unwrap_or_else(|e| panic!("closed before PUBACK {pkid}: {e}"));
        assert_eq!(ack, [0x40, 0x02, 0x00, pkid]);
    }
    s.write_all(&[0xe0, 0x00]).await.unwrap();
    let metrics = sluice.metrics().await;
    assert!(metric(&metrics, "sluice_publish_throttled_total") >= 2.0);
    assert_eq!(
        metric(
            &metrics,
            "sluice_disconnects_total{reason=\"keep_alive_timeout\"}"
        ),
        0.0,
        "{metrics}"
    );
    sluice.stop();
}
