//! The device edge from the outside: real MQTT clients against `sluice
//! serve` with authentication on (no `--allow-anonymous`).

mod support;

use rumqttc::{ConnectReturnCode, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde_json::Value;
use std::time::Duration;
use support::{MqttConn, Options, Sluice, metric, mqtt_connect};

fn refused_with(result: Result<MqttConn, String>, code: ConnectReturnCode) {
    match result {
        Ok(_) => panic!("connected, expected refusal {code:?}"),
        Err(e) => assert!(
            e.contains(&format!("ConnectionRefused({code:?})")),
            "expected {code:?}, got {e}"
        ),
    }
}

async fn suback_codes(conn: &mut MqttConn) -> Vec<SubscribeReasonCode> {
    loop {
        match conn.next().await {
            Ok(Packet::SubAck(a)) => return a.return_codes,
            Ok(_) => {}
            Err(e) => panic!("closed before SUBACK: {e}"),
        }
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_decide_who_connects() {
    let sluice = Sluice::start_with(Options::authenticated(), |_| {}).await;
    let secret = sluice.create_device("d1").await;
    let off_secret = sluice.create_device("off").await;
    sluice_ingest::devices::set_enabled(&sluice.db, "off", false)
        .await
        .unwrap();

    let good = mqtt_connect(sluice.device_options("d1", &secret)).await;
    assert!(good.is_ok(), "{:?}", good.err());

    refused_with(
        mqtt_connect(sluice.device_options("d1", "wrong-secret")).await,
        ConnectReturnCode::BadUserNamePassword,
    );
    refused_with(
        mqtt_connect(sluice.device_options("nobody", &secret)).await,
        ConnectReturnCode::BadUserNamePassword,
    );
    let mut no_login = MqttOptions::new("d1", "127.0.0.1", sluice.mqtt_port);
    no_login.set_keep_alive(Duration::from_secs(30));
    refused_with(
        mqtt_connect(no_login).await,
        ConnectReturnCode::NotAuthorized,
    );
    refused_with(
        mqtt_connect(sluice.device_options("off", &off_secret)).await,
        ConnectReturnCode::NotAuthorized,
    );
    // After rotation the old secret is refused and the new one works,
    // although the old one was cached by the first connect.
    let rotated = sluice_ingest::devices::rotate_secret(&sluice.db, "d1")
        .await
        .unwrap();
    refused_with(
        mqtt_connect(sluice.device_options("d1", &secret)).await,
        ConnectReturnCode::BadUserNamePassword,
    );
    assert!(
        mqtt_connect(sluice.device_options("d1", &rotated))
            .await
            .is_ok()
    );
    // Disabled by an operator after it connected (its secret verified and
    // cached): refused from its next connect on, until enabled again.
    sluice.cli(&["devices", "disable", "d1"]);
    refused_with(
        mqtt_connect(sluice.device_options("d1", &rotated)).await,
        ConnectReturnCode::NotAuthorized,
    );
    sluice.cli(&["devices", "enable", "d1"]);
    assert!(
        mqtt_connect(sluice.device_options("d1", &rotated))
            .await
            .is_ok()
    );

    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_auth_refused_total{reason=\"bad_secret\"}"),
        "{metrics}"
    );
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_confined_to_its_own_topics() {
    let sluice = Sluice::start_with(Options::authenticated(), |_| {}).await;
    let s1 = sluice.create_device("d1").await;
    sluice.create_device("d2").await;

    let mut d1 = mqtt_connect(sluice.device_options("d1", &s1))
        .await
        .unwrap();
    d1.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("devices/d2/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("devices/d1/commands".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("#".into(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    assert_eq!(
        suback_codes(&mut d1).await,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
        ]
    );

    d1.client
        .publish(
            "devices/d1/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"temp": 20.5}"#,
        )
        .await
        .unwrap();
    wait_puback(&mut d1).await;

    // Another device's topic: the connection is closed, nothing is acked.
    d1.client
        .publish(
            "devices/d2/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"temp": 99}"#,
        )
        .await
        .unwrap();
    loop {
        match d1.next().await {
            Ok(Packet::PubAck(_)) => panic!("a forbidden publish was acknowledged"),
            Ok(_) => {}
            Err(_) => break,
        }
    }

    let d1_points = sluice
        .eventually("d1's point", Duration::from_secs(20), || async {
            let p = sluice.all_points("d1").await;
            (!p.is_empty()).then_some(p)
        })
        .await;
    assert_eq!(d1_points.len(), 1);
    assert_eq!(d1_points[0].value, 20.5);
    // Give the forbidden message every chance to show up before checking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sluice.all_points("d2").await.is_empty());
    let stored: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events WHERE topic LIKE 'devices/d2/%') \
              + (SELECT count(*) FROM dead_letters WHERE topic LIKE 'devices/d2/%')",
    )
    .fetch_one(&sluice.db)
    .await
    .unwrap();
    assert_eq!(stored, 0);

    let metrics = sluice.metrics().await;
    for line in [
        "sluice_acl_denied_total{action=\"publish\"} 1",
        "sluice_acl_denied_total{action=\"subscribe\"} 2",
        "sluice_connections_closed_total{reason=\"publish_denied\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    sluice.stop();
}

const APP_CONFIG: &str = r#"
[broker.acl.policies.dashboard]
subscribe = ["devices/+/telemetry", "devices/+/status", "$sluice/presence/+"]
publish = ["devices/+/commands"]

[broker.applications.dash]
policy = "dashboard"
secret_hash = "HASH"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_presence_and_wills() {
    let app_secret = "app-secret-123";
    let hash = sluice_ingest::devices::hash_secret(app_secret).unwrap();
    let sluice = Sluice::start_with(
        Options {
            config_toml: Some(APP_CONFIG.replace("HASH", &hash)),
            ..Options::authenticated()
        },
        |_| {},
    )
    .await;
    let s1 = sluice.create_device("d1").await;

    let mut app_opts = MqttOptions::new("ui-1", "127.0.0.1", sluice.mqtt_port);
    app_opts.set_keep_alive(Duration::from_secs(30));
    app_opts.set_credentials("dash", app_secret);
    let mut app = mqtt_connect(app_opts.clone()).await.unwrap();
    app.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("$sluice/presence/+".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("devices/+/telemetry".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("devices/+/status".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("devices/#".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    assert_eq!(
        suback_codes(&mut app).await,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
        ]
    );
    let mut wrong = app_opts.clone();
    wrong.set_credentials("dash", "not-it");
    refused_with(
        mqtt_connect(wrong).await,
        ConnectReturnCode::BadUserNamePassword,
    );

    // The device connects with a will; the application sees it come online.
    let mut dev_opts = sluice.device_options("d1", &s1);
    dev_opts.set_last_will(rumqttc::LastWill::new(
        "devices/d1/status",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let mut d1 = mqtt_connect(dev_opts).await.unwrap();
    let online = app.next_publish().await;
    assert_eq!(online.topic, "$sluice/presence/d1");
    let body: Value = serde_json::from_slice(&online.payload).unwrap();
    assert_eq!(body["online"], true, "{body}");
    assert_eq!(body["device_id"], "d1");

    // Device → application, and application → device.
    d1.client
        .subscribe("devices/d1/commands", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback_codes(&mut d1).await;
    d1.client
        .publish(
            "devices/d1/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"v":1}"#,
        )
        .await
        .unwrap();
    let seen = app.next_publish().await;
    assert_eq!(seen.topic, "devices/d1/telemetry");
    app.client
        .publish("devices/d1/commands", QoS::AtLeastOnce, false, "reboot")
        .await
        .unwrap();
    let command = d1.next_publish().await;
    assert_eq!(&command.payload[..], b"reboot");

    let device = sluice_ingest::devices::get(&sluice.db, "d1").await.unwrap();
    assert!(device.online);
    assert!(device.last_connect_at.is_some());

    // The device dies without DISCONNECT: its will and "offline" arrive,
    // and the registry records it.
    d1.kill();
    let mut got_will = false;
    let mut got_offline = false;
    while !(got_will && got_offline) {
        let p = app.next_publish().await;
        match p.topic.as_str() {
            "devices/d1/status" => {
                assert_eq!(&p.payload[..], b"gone");
                got_will = true;
            }
            "$sluice/presence/d1" => {
                let body: Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(body["online"], false, "{body}");
                assert_eq!(body["reason"], "connection_lost", "{body}");
                got_offline = true;
            }
            other => panic!("unexpected publish on {other}"),
        }
    }
    let device = sluice
        .eventually("registry offline", Duration::from_secs(10), || async {
            let d = sluice_ingest::devices::get(&sluice.db, "d1").await.unwrap();
            (!d.online).then_some(d)
        })
        .await;
    assert!(device.last_disconnect_at.is_some());

    // A late subscriber learns the current state from the retained message.
    app.kill();
    let mut late = mqtt_connect(app_opts).await.unwrap();
    late.client
        .subscribe("$sluice/presence/d1", QoS::AtMostOnce)
        .await
        .unwrap();
    let retained = late.next_publish().await;
    let body: Value = serde_json::from_slice(&retained.payload).unwrap();
    assert_eq!(body["online"], false);

    // A device that goes silent is dropped after 1.5 × its keep-alive.
    {
        use tokio::io::AsyncWriteExt;
        let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", sluice.mqtt_port))
            .await
            .unwrap();
        let mut connect = rumqttc::mqttbytes::v4::Connect::new("d1");
        connect.keep_alive = 1;
        connect.set_login("d1", &s1);
        let mut out = bytes::BytesMut::new();
        rumqttc::mqttbytes::v4::Packet::Connect(connect)
            .write(&mut out, usize::MAX)
            .unwrap();
        silent.write_all(&out).await.unwrap();
        let online = late.next_publish().await;
        let body: Value = serde_json::from_slice(&online.payload).unwrap();
        assert_eq!(body["online"], true, "{body}");
        let offline = late.next_publish().await;
        let body: Value = serde_json::from_slice(&offline.payload).unwrap();
        assert_eq!(body["online"], false, "{body}");
        assert_eq!(body["reason"], "keep_alive_timeout", "{body}");
    }
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packets_close_only_their_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sluice = Sluice::start(|_| {}).await;
    let mut healthy = mqtt_connect({
        let mut o = MqttOptions::new("healthy", "127.0.0.1", sluice.mqtt_port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    })
    .await
    .unwrap();

    // A PUBLISH before CONNECT, garbage, and a remaining length that never ends.
    for bytes in [
        &b"\x30\x05\x00\x01ab"[..],
        &b"\xff\xff\xff\xff\xff"[..],
        &b"\x10\xff\xff\xff\xff\x01"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sluice.mqtt_port))
            .await
            .unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the server closes the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "expected a close, got {:?}", &buf[..n]);
    }

    // A topic with a wildcard in PUBLISH closes that client (rumqttc
    // refuses to send one, so the packets are written by hand).
    {
        use rumqttc::mqttbytes::v4 as wire;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sluice.mqtt_port))
            .await
            .unwrap();
        let mut out = bytes::BytesMut::new();
        let mut connect = wire::Connect::new("bad");
        connect.keep_alive = 30;
        wire::Packet::Connect(connect)
            .write(&mut out, usize::MAX)
            .unwrap();
        let mut publish = wire::Publish::new("devices/+/telemetry", QoS::AtLeastOnce, "{}");
        publish.pkid = 1;
        wire::Packet::Publish(publish)
            .write(&mut out, usize::MAX)
            .unwrap();
        s.write_all(&out).await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut received))
            .await
            .expect("the server closes the connection")
            .unwrap();
        // CONNACK (accepted), then nothing: no PUBACK.
        assert_eq!(received, vec![0x20, 0x02, 0x00, 0x00]);
    }

    // After a good CONNECT: a second CONNECT, a topic that is not UTF-8,
    // and a PUBLISH over the size limit each close that connection.
    {
        use rumqttc::mqttbytes::v4 as wire;
        let connect = |id: &str| {
            let mut c = wire::Connect::new(id);
            c.keep_alive = 30;
            let mut out = bytes::BytesMut::new();
            wire::Packet::Connect(c)
                .write(&mut out, usize::MAX)
                .unwrap();
            out.to_vec()
        };
        let mut bad_utf8 = vec![0x32, 0x08, 0x00, 0x02, 0xc3, 0x28, 0x00, 0x01, b'x', b'y'];
        let mut oversized = {
            let mut p = wire::Publish::new("t/big", QoS::AtLeastOnce, vec![0u8; 300 * 1024]);
            p.pkid = 1;
            let mut out = bytes::BytesMut::new();
            wire::Packet::Publish(p)
                .write(&mut out, usize::MAX)
                .unwrap();
            out.to_vec()
        };
        for (name, mut tail) in [
            ("second", connect("second")),
            ("utf8", std::mem::take(&mut bad_utf8)),
            ("big", std::mem::take(&mut oversized)),
        ] {
            let mut bytes = connect(name);
            bytes.append(&mut tail);
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sluice.mqtt_port))
                .await
                .unwrap();
            // The server may close before reading everything: ignore write errors.
            let _ = s.write_all(&bytes).await;
            let mut received = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut received))
                .await
                .expect("the server closes the connection");
            assert_eq!(
                received,
                vec![0x20, 0x02, 0x00, 0x00],
                "{name}: only a CONNACK"
            );
        }
    }

    // The healthy client is unaffected.
    healthy
        .client
        .publish("devices/h/telemetry", QoS::AtLeastOnce, false, r#"{"x":1}"#)
        .await
        .unwrap();
    wait_puback(&mut healthy).await;
    let metrics = sluice.metrics().await;
    for reason in ["bad_topic", "second_connect", "oversized"] {
        assert!(
            metrics.contains(&format!(
                "sluice_connections_closed_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_throttle_refuse_and_time_out() {
    use tokio::io::AsyncReadExt;
    let sluice = Sluice::start_with(
        Options {
            env: vec![
                ("SLUICE_BROKER__MAX_PUBLISH_RATE".into(), "20".into()),
                ("SLUICE_BROKER__PUBLISH_BURST".into(), "5".into()),
                ("SLUICE_BROKER__MAX_CONNECTIONS".into(), "2".into()),
                ("SLUICE_BROKER__CONNECT_TIMEOUT_MS".into(), "500".into()),
            ],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let opts = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", sluice.mqtt_port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    // The harness's readiness probe (a bare TCP connect) counts against the
    // limit until the server has seen it close; on a busy machine that can
    // take a moment, so wait for it.
    sluice
        .eventually(
            "no connection left from the readiness probe",
            Duration::from_secs(10),
            || async {
                let metrics = sluice.metrics().await;
                (!metrics
                    .lines()
                    .any(|l| l.starts_with("sluice_connections{") && !l.ends_with(" 0")))
                .then_some(())
            },
        )
        .await;
    let mut a = mqtt_connect(opts("a")).await.unwrap();
    let b = mqtt_connect(opts("b")).await.unwrap();
    refused_with(
        mqtt_connect(opts("c")).await,
        ConnectReturnCode::ServiceUnavailable,
    );
    b.kill();
    sluice
        .eventually("b's connection gone", Duration::from_secs(10), || async {
            sluice
                .metrics()
                .await
                .contains("sluice_connections{transport=\"tcp\"} 1\n")
                .then_some(())
        })
        .await;

    // Connections that come and go free their place, in Sluice and in the
    // router behind it (whose own limit is max_connections + 16).
    // (A connection counts until its teardown ends, a moment after the
    // client sees the close, so a refusal right then is retried.)
    for i in 0..40 {
        let mut attempt = 0;
        let mut c = loop {
            match mqtt_connect(opts(&format!("cycle-{i}"))).await {
                Ok(c) => break c,
                Err(e) if attempt < 50 && e.contains("ServiceUnavailable") => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("connection {i}: {e}"),
            }
        };
        c.client.disconnect().await.unwrap();
        c.closed().await;
    }

    // Over the rate the client is slowed down, never dropped: all acked.
    for i in 0..30 {
        a.client
            .publish(
                "devices/a/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"i":{i}}}"#),
            )
            .await
            .unwrap();
    }
    for _ in 0..30 {
        wait_puback(&mut a).await;
    }
    let points = sluice
        .eventually("30 points", Duration::from_secs(20), || async {
            let p = sluice.all_points("a").await;
            (p.len() == 30).then_some(p)
        })
        .await;
    assert_eq!(points.len(), 30);

    // A socket that never sends CONNECT is closed after the connect timeout.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", sluice.mqtt_port))
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("closed by the server")
        .unwrap_or(0);
    assert_eq!(n, 0);

    let metrics = sluice.metrics().await;
    for needle in [
        "sluice_publish_throttled_total",
        "sluice_connections_refused_total{reason=\"max_connections\"} 1",
        "sluice_connect_timeouts_total 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle}:\n{metrics}");
    }
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_and_persistent_sessions_through_the_router() {
    let sluice = Sluice::start(|_| {}).await;
    let opts = |id: &str, clean: bool| {
        let mut o = MqttOptions::new(id, "127.0.0.1", sluice.mqtt_port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(clean);
        o
    };
    // A persistent subscriber goes away...
    let mut sub = mqtt_connect(opts("s1", false)).await.unwrap();
    sub.client.subscribe("t/x", QoS::AtLeastOnce).await.unwrap();
    suback_codes(&mut sub).await;
    sub.client.disconnect().await.unwrap();
    sub.closed().await;

    // ...a QoS 2 message is published (PUBREC only once stored)...
    let mut publisher = mqtt_connect(opts("p1", true)).await.unwrap();
    publisher
        .client
        .publish("t/x", QoS::ExactlyOnce, false, "m1")
        .await
        .unwrap();
    loop {
        match publisher.next().await {
            Ok(Packet::PubComp(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("closed before PUBCOMP: {e}"),
        }
    }

    // ...and the subscriber gets it when it comes back.
    let mut sub = mqtt_connect(opts("s1", false)).await.unwrap();
    let p = sub.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("t/x", &b"m1"[..]));

    // Stored once (no rule matches `t/x`, so it is kept as an event).
    let events = sluice
        .eventually("the event", Duration::from_secs(20), || async {
            let e = sluice.all_events("t/x").await;
            (!e.is_empty()).then_some(e)
        })
        .await;
    assert_eq!(events.len(), 1);
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_id_takes_over() {
    let sluice = Sluice::start_with(Options::authenticated(), |_| {}).await;
    let secret = sluice.create_device("twin").await;
    // The first one only publishes (no router link of its own), the second
    // one also subscribes: takeover must work either way.
    let mut first = mqtt_connect(sluice.device_options("twin", &secret))
        .await
        .unwrap();
    let mut second = mqtt_connect(sluice.device_options("twin", &secret))
        .await
        .unwrap();
    first.closed().await;
    second
        .client
        .subscribe("devices/twin/commands", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback_codes(&mut second).await;
    let mut third = mqtt_connect(sluice.device_options("twin", &secret))
        .await
        .unwrap();
    second.closed().await;
    third
        .client
        .publish(
            "devices/twin/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"n":1}"#,
        )
        .await
        .unwrap();
    wait_puback(&mut third).await;
    // The replaced connections did not mark the device offline.
    let device = sluice_ingest::devices::get(&sluice.db, "twin")
        .await
        .unwrap();
    assert!(device.online);
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_logins_does_not_lock_out_the_real_device() {
    // One hash slot, a short queue and a short wait for it, so the flood
    // overflows.
    let sluice = Sluice::start_with(
        Options {
            env: vec![
                ("SLUICE_BROKER__AUTH_CONCURRENCY".into(), "1".into()),
                ("SLUICE_BROKER__AUTH_QUEUE".into(), "8".into()),
                ("SLUICE_BROKER__AUTH_TIMEOUT_MS".into(), "300".into()),
            ],
            ..Options::authenticated()
        },
        |_| {},
    )
    .await;
    let secret = sluice.create_device("real").await;
    // The first good login is hashed and cached.
    mqtt_connect(sluice.device_options("real", &secret))
        .await
        .unwrap()
        .kill();
    let hashes_before = metric(&sluice.metrics().await, "sluice_auth_hash_checks_total");
    assert_eq!(hashes_before, 1.0);

    // 40 wrong passwords for the real id and 20 logins as ids that do not
    // exist, all at once.
    const WRONG: usize = 40;
    const UNKNOWN: usize = 20;
    let flood: Vec<_> = (0..WRONG)
        .map(|i| sluice.device_options("real", &format!("guess-{i}")))
        .chain((0..UNKNOWN).map(|i| sluice.device_options(&format!("nobody-{i}"), "x")))
        .map(|opts| tokio::spawn(async move { mqtt_connect(opts).await.err() }))
        .collect();
    // Meanwhile the real device reconnects: a cache hit needs no slot.
    for _ in 0..5 {
        let c = mqtt_connect(sluice.device_options("real", &secret)).await;
        assert!(c.is_ok(), "the real device was refused: {:?}", c.err());
        c.unwrap().kill();
    }
    let (mut bad, mut overloaded) = (0, 0);
    for attempt in flood {
        let refusal = attempt
            .await
            .unwrap()
            .expect("a wrong password was accepted");
        if refusal.contains("BadUserNamePassword") {
            bad += 1;
        } else if refusal.contains("ServiceUnavailable") {
            overloaded += 1;
        } else {
            panic!("unexpected refusal {refusal}");
        }
    }
    eprintln!("flood: {bad} refused with CONNACK 4, {overloaded} with CONNACK 3 (overloaded)");

    // Every attempt is accounted for, under its reason: unknown ids cost
    // no hash; wrong secrets cost one each only if they got a hash slot,
    // the rest (queue full, or waited too long) were told to come back
    // later; the real device's reconnects cost none.
    let metrics = sluice.metrics().await;
    let refused = |reason: &str| {
        metric(
            &metrics,
            &format!("sluice_auth_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refused("unknown_device"), UNKNOWN as f64, "{metrics}");
    assert_eq!(
        refused("bad_secret") + refused("unknown_device"),
        bad as f64
    );
    assert_eq!(refused("auth_overloaded"), overloaded as f64);
    assert_eq!(bad + overloaded, WRONG + UNKNOWN);
    assert_eq!(
        metric(&metrics, "sluice_auth_hash_checks_total"),
        hashes_before + refused("bad_secret"),
        "{metrics}"
    );
    assert!(metric(&metrics, "sluice_auth_cache_hits_total") >= 5.0);
    sluice.stop();
}

/// Connects a device and checks it is let in.
async fn connected(sluice: &Sluice, id: &str, secret: &str) -> MqttConn {
    mqtt_connect(sluice.device_options(id, secret))
        .await
        .unwrap_or_else(|e| panic!("{id} was refused: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_revoked_while_connected_are_closed() {
    let sluice = Sluice::start_with(
        Options {
            env: vec![("SLUICE_BROKER__CREDENTIAL_CHECK_MS".into(), "500".into())],
            ..Options::authenticated()
        },
        |_| {},
    )
    .await;
    let s1 = sluice.create_device("d1").await;
    let s2 = sluice.create_device("d2").await;
    let s3 = sluice.create_device("d3").await;
    let bystander_secret = sluice.create_device("bystander").await;
    let mut d1 = connected(&sluice, "d1", &s1).await;
    let mut d2 = connected(&sluice, "d2", &s2).await;
    let mut d3 = connected(&sluice, "d3", &s3).await;
    let mut bystander = connected(&sluice, "bystander", &bystander_secret).await;

    // Disabled by an operator while connected: the open connection is
    // closed (within credential_check_ms plus one query), refused while
    // disabled, and let in again once enabled.
    sluice.cli(&["devices", "disable", "d1"]);
    d1.closed().await;
    refused_with(
        mqtt_connect(sluice.device_options("d1", &s1)).await,
        ConnectReturnCode::NotAuthorized,
    );
    let device = sluice
        .eventually("d1 recorded offline", Duration::from_secs(10), || async {
            let d = sluice_ingest::devices::get(&sluice.db, "d1").await.unwrap();
            (!d.online).then_some(d)
        })
        .await;
    assert!(device.last_disconnect_at.is_some());
    sluice.cli(&["devices", "enable", "d1"]);
    let mut d1 = connected(&sluice, "d1", &s1).await;

    // A rotated secret closes the session opened with the old one (it may
    // have leaked); the new secret gets in, the old one no longer does.
    let rotated = sluice_ingest::devices::rotate_secret(&sluice.db, "d2")
        .await
        .unwrap();
    d2.closed().await;
    refused_with(
        mqtt_connect(sluice.device_options("d2", &s2)).await,
        ConnectReturnCode::BadUserNamePassword,
    );
    let _d2 = connected(&sluice, "d2", &rotated).await;

    // A deleted device is closed too.
    sluice_ingest::devices::delete(&sluice.db, "d3")
        .await
        .unwrap();
    d3.closed().await;

    // The others were never disturbed: the re-enabled d1 and the bystander
    // publish as before.
    for (id, conn) in [("d1", &mut d1), ("bystander", &mut bystander)] {
        conn.client
            .publish(
                format!("devices/{id}/telemetry"),
                QoS::AtLeastOnce,
                false,
                r#"{"ok":1}"#,
            )
            .await
            .unwrap();
        wait_puback(conn).await;
    }

    let metrics = sluice.metrics().await;
    for line in [
        "sluice_disconnects_total{reason=\"device_disabled\"} 1",
        "sluice_disconnects_total{reason=\"secret_rotated\"} 1",
        "sluice_disconnects_total{reason=\"device_deleted\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    sluice.stop();
}
