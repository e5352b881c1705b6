//! Ingest's promises: every rejection dead-lettered with its reason,
//! duplicates collapsed, Kafka outages and crashes survived without loss,
//! and the broker's ACL keeps devices in their lane.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vitalwatch::Service;
use vitalwatch_bus::rdkafka::Message;
use vitalwatch_core::topics::mqtt_readings_topic;
use vitalwatch_test_support::{self as ts, Device, PrivateKafka};

use crate::util::*;

fn reading(metric: &str, value: serde_json::Value, t: DateTime<Utc>) -> serde_json::Value {
    serde_json::json!({"metric": metric, "value": value, "measured_at": t.to_rfc3339()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_reason_is_dead_lettered_with_its_headers() {
    let cfg = config().await;
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    register(&cfg, "test-dev-1", "pat-1").await;
    register_since(&cfg, "test-dev-2", None, None).await; // never assigned
    register_since(&cfg, "test-dev-3", Some("pat-3"), Some(now - hour)).await; // assigned an hour ago
    register(&cfg, "test-dev-4", "pat-4").await;
    let db = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    db.execute(
        "UPDATE devices SET active = false WHERE device_id = 'test-dev-4'",
        &[],
    )
    .await
    .expect("deactivate");
    let ingest = start(&[Service::Ingest], &cfg);
    wait_until_ingest_subscribed(&cfg).await;

    let root = &cfg.mqtt.topic_root;
    let t = now - chrono::Duration::minutes(1);
    let good = json_batch("", 1, &[hr(70.0, t)]);
    let mixed = serde_json::json!({"seq": 2, "readings": [
        reading("pulse", 70.into(), t),                                                     // 0
        serde_json::json!({"metric": "heart_rate", "value": 70, "unit": "Hz", "measured_at": t.to_rfc3339()}), // 1
        serde_json::json!({"metric": "heart_rate", "measured_at": t.to_rfc3339()}),         // 2
        reading("spo2", 120.into(), t),                                                     // 3
        serde_json::json!({"metric": "blood_pressure", "measured_at": t.to_rfc3339(),
                           "components": {"systolic": 80, "diastolic": 95}}),               // 4
        serde_json::json!({"metric": "spo2", "value": 95, "measured_at": t.to_rfc3339(), "flags": ["wobbly"]}), // 5
        serde_json::json!({"metric": "spo2", "value": 95}),                                 // 6
        reading("spo2", 95.into(), now + hour),                                             // 7
        reading("spo2", 95.into(), now - chrono::Duration::days(365)),                      // 8
        reading("body_temperature", 37.1.into(), t),                                        // 9: valid
        reading("body_temperature", 38.0.into(), t),                                        // 10
    ]})
    .to_string()
    .into_bytes();
    let before_assignment = json_batch("", 3, &[hr(70.0, now - hour * 2)]);
    let mismatch = json_batch("test-dev-8", 4, &[hr(70.0, t)]);

    // (device, topic, payload, reason, reading index)
    type Case<'a> = (&'a str, String, Vec<u8>, &'a str, Option<usize>);
    let dev1 = mqtt_readings_topic(root, "test-dev-1");
    let cases: Vec<Case> = vec![
        (
            "test-dev-1",
            dev1.clone(),
            b"\x08\xff\xff\xff\xff".to_vec(),
            "malformed_payload",
            None,
        ),
        (
            "test-dev-1",
            format!("{dev1}/json"),
            b"{\"readings\": []}".to_vec(),
            "empty_batch",
            None,
        ),
        ("", format!("{dev1}/xml"), good.clone(), "bad_topic", None),
        (
            "test-dev-5",
            mqtt_readings_topic(root, "test-dev-5"),
            good.clone(),
            "unknown_device",
            None,
        ),
        (
            "test-dev-4",
            mqtt_readings_topic(root, "test-dev-4"),
            good.clone(),
            "unknown_device",
            None,
        ),
        (
            "test-dev-2",
            mqtt_readings_topic(root, "test-dev-2"),
            good.clone(),
            "unassigned_device",
            None,
        ),
        (
            "test-dev-3",
            mqtt_readings_topic(root, "test-dev-3"),
            before_assignment,
            "unassigned_device",
            Some(0),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mismatch,
            "device_mismatch",
            None,
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "unknown_metric",
            Some(0),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "bad_unit",
            Some(1),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "missing_value",
            Some(2),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "out_of_range",
            Some(3),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "inconsistent_blood_pressure",
            Some(4),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "unknown_flag",
            Some(5),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "missing_timestamp",
            Some(6),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "future_timestamp",
            Some(7),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "too_old",
            Some(8),
        ),
        (
            "test-dev-1",
            dev1.clone(),
            mixed.clone(),
            "conflicting_reading",
            Some(10),
        ),
    ];
    // Each device publishes its own messages (the broker ACL demands it); the
    // mixed batch is published once and yields ten dead letters.
    let mut published = std::collections::HashSet::new();
    for (device, topic, payload, _, _) in &cases {
        let user = if device.is_empty() {
            "test-dev-1"
        } else {
            device
        };
        if published.insert((topic.clone(), payload.clone())) {
            let mut d = Device::connect(user).await;
            d.publish(topic, payload.clone()).await;
            d.wait_acked(WAIT).await;
            d.disconnect().await;
        }
    }

    let dead = ts::consume_matching(
        &cfg.kafka,
        &cfg.kafka.deadletter_topic,
        cases.len(),
        WAIT,
        |m| ts::key(m) != "probe",
    )
    .await;
    let mut got: BTreeMap<(String, String, Option<String>), &_> = BTreeMap::new();
    for m in &dead {
        let k = (
            ts::key(m),
            ts::header(m, "reason").unwrap_or_default(),
            ts::header(m, "reading_index"),
        );
        assert!(
            got.insert(k.clone(), m).is_none(),
            "dead-lettered twice: {k:?}"
        );
    }
    for (device, topic, payload, reason, index) in &cases {
        let k = (
            device.to_string(),
            reason.to_string(),
            index.map(|i| i.to_string()),
        );
        let m = got.get(&k).unwrap_or_else(|| {
            panic!(
                "no dead letter {k:?}; got {:?}",
                got.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(m.payload(), Some(&payload[..]), "{k:?}: the raw payload");
        assert_eq!(
            ts::header(m, "topic").as_deref(),
            Some(topic.as_str()),
            "{k:?}"
        );
        let received: DateTime<Utc> = ts::header(m, "received_at")
            .expect("received_at")
            .parse()
            .expect("rfc3339");
        assert!((Utc::now() - received).num_seconds().abs() < 120, "{k:?}");
        assert!(
            !ts::header(m, "detail").unwrap_or_default().is_empty(),
            "{k:?}: a detail for people"
        );
    }

    // The one valid reading of the mixed batch went on, for its patient.
    let ok = ts::consume_matching(&cfg.kafka, &cfg.kafka.readings_topic, 1, WAIT, |_| true).await;
    let batch = vitalwatch_core::reading::Batch::decode(ok[0].payload().unwrap_or_default())
        .expect("batch");
    assert_eq!(batch.patient_id, "pat-1");
    assert_eq!(batch.readings.len(), 1);
    assert_eq!(
        batch.readings[0].metric,
        vitalwatch_core::catalogue::Metric::BodyTemperature
    );
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_published_three_times_is_stored_once() {
    let metrics = vitalwatch_api::telemetry::metrics_handle();
    let cfg = config().await;
    let (patient, pipeline) =
        start_with_device(&cfg, "test-dev-1", &[Service::Ingest, Service::Writer]).await;

    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, "test-dev-1");
    let batch = json_batch(
        "test-dev-1",
        7,
        &[hr(70.0, at(0)), hr(71.0, at(1)), hr(72.0, at(2))],
    );
    let mut device = Device::connect("test-dev-1").await;
    for _ in 0..3 {
        device.publish(&topic, batch.clone()).await;
    }
    device
        .publish(&topic, json_batch("test-dev-1", 8, &[hr(80.0, at(3))]))
        .await;
    device.wait_acked(WAIT).await;
    ts::eventually(WAIT, "the last batch stored", || async {
        (count_rows(&cfg, &patient).await >= 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count_rows(&cfg, &patient).await, 4, "each reading once");

    // Ingest itself recognised the two copies: it did not produce them again.
    let dups = metric(
        &metrics.render(),
        "vitalwatch_ingest_duplicates_total{kind=\"batch\"}",
    );
    assert_eq!(dups, 2.0);
    device.disconnect().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_outage_is_waited_out_without_loss_or_duplicates() {
    let mut kafka = PrivateKafka::start().await;
    let mut cfg = config().await;
    cfg.kafka = ts::kafka_on(&kafka.brokers()).await;
    // Fail attempts fast so the outage shows in readiness within seconds.
    cfg.kafka
        .properties
        .insert("message.timeout.ms".into(), "3000".into());
    // tansu 0.6.0 panics (storage/src/lite.rs:503, "more or less than one
    // row") when a producer id from before its restart sends again, and its
    // storage is dead from then on. Apache Kafka answers such a producer
    // properly; here the outage is exercised with a plain acks=all producer.
    // The exactly-once result below comes from the store either way.
    cfg.kafka
        .properties
        .insert("enable.idempotence".into(), "false".into());
    let (patient, pipeline) =
        start_with_device(&cfg, "test-dev-1", &[Service::Ingest, Service::Writer]).await;

    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, "test-dev-1");
    let mut device = Device::connect("test-dev-1").await;
    let batches = 300i64;
    for i in 0..batches {
        if i == 100 {
            device.wait_acked(WAIT).await;
            kafka.stop();
        }
        device
            .publish(
                &topic,
                json_batch("test-dev-1", i as u64, &[hr(60.0 + (i % 50) as f64, at(i))]),
            )
            .await;
    }
    // The broker acknowledged every publish: it holds what ingest could not yet deliver.
    device.wait_acked(WAIT).await;
    let readiness = pipeline.readiness.clone();
    ts::eventually(WAIT, "ingest reporting Kafka as failing", || async {
        (readiness.is_ready("ingest.kafka") == Some(false)).then_some(())
    })
    .await;
    let during = count_rows(&cfg, &patient).await;
    assert!(
        during < batches,
        "an outage that stored everything tested nothing ({during})"
    );

    kafka.resume().await;
    ts::eventually(
        Duration::from_secs(120),
        "every reading after Kafka returned",
        || async { (count_rows(&cfg, &patient).await >= batches).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count_rows(&cfg, &patient).await,
        batches,
        "every acknowledged reading exactly once"
    );
    ts::eventually(WAIT, "ingest ready again", || async {
        (readiness.is_ready("ingest.kafka") == Some(true)).then_some(())
    })
    .await;
    device.disconnect().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_mid_stream_loses_nothing() {
    let cfg = config().await;
    let patient = ts::unique("pat");
    register(&cfg, "test-dev-1", &patient).await;
    let writer = start(&[Service::Writer], &cfg);
    let spawn_ingest = || spawn_process("ingest", &cfg);
    let ingest = spawn_ingest();
    wait_until_ingest_subscribed(&cfg).await;

    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, "test-dev-1");
    let batches = 2000i64;
    let publisher = tokio::spawn(async move {
        let mut device = Device::connect("test-dev-1").await;
        for i in 0..batches {
            device
                .publish(
                    &topic,
                    json_batch("test-dev-1", i as u64, &[hr(60.0 + (i % 50) as f64, at(i))]),
                )
                .await;
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        device.wait_acked(WAIT).await;
        device.disconnect().await;
    });
    ts::eventually(WAIT, "some rows before the kill", || async {
        (count_rows(&cfg, &patient).await > 100).then_some(())
    })
    .await;
    ingest.kill();
    let at_kill = count_rows(&cfg, &patient).await;
    publisher.await.expect("publisher");
    assert!(
        at_kill < batches,
        "ingest finished before it was killed ({at_kill} rows)"
    );

    // Same client id: the broker hands the new process the old session's messages.
    let _ingest = spawn_ingest();
    ts::eventually(
        Duration::from_secs(120),
        "every reading after the restart",
        || async { (count_rows(&cfg, &patient).await >= batches).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count_rows(&cfg, &patient).await,
        batches,
        "nothing lost, nothing doubled"
    );
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_under_another_devices_topic() {
    let cfg = config().await;
    let (mine, theirs) = (ts::unique("pat"), ts::unique("pat"));
    register(&cfg, "test-dev-1", &mine).await;
    register(&cfg, "test-dev-2", &theirs).await;
    let pipeline = start(&[Service::Ingest, Service::Writer], &cfg);
    wait_until_ingest_subscribed(&cfg).await;

    let mut intruder = Device::connect("test-dev-1").await;
    let spoofed = json_batch("test-dev-2", 1, &[hr(150.0, at(0))]);
    intruder
        .publish(
            &mqtt_readings_topic(&cfg.mqtt.topic_root, "test-dev-2"),
            spoofed,
        )
        .await;
    intruder
        .publish(
            &mqtt_readings_topic(&cfg.mqtt.topic_root, "test-dev-1"),
            json_batch("test-dev-1", 1, &[hr(70.0, at(0))]),
        )
        .await;
    intruder.wait_acked(WAIT).await;

    ts::eventually(WAIT, "the device's own reading", || async {
        (count_rows(&cfg, &mine).await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count_rows(&cfg, &theirs).await,
        0,
        "the broker must refuse a publish under another device's id"
    );
    intruder.disconnect().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_reads_the_broker_over_tls() {
    let mut cfg = config().await;
    let tls =
        std::env::var("VITALWATCH_TEST_MQTT_TLS").unwrap_or_else(|_| "127.0.0.1:18831".into());
    let (host, port) = tls.rsplit_once(':').expect("host:port");
    cfg.mqtt.host = host.to_owned();
    cfg.mqtt.port = port.parse().expect("port");
    let ca =
        std::env::var("VITALWATCH_TEST_MQTT_CA").unwrap_or_else(|_| ".local/tls/ca.crt".into());
    cfg.mqtt.tls = Some(vitalwatch_ingest::MqttTls {
        ca_file: ca.into(),
        client_cert_file: None,
        client_key_file: None,
    });
    let (patient, pipeline) =
        start_with_device(&cfg, "test-dev-1", &[Service::Ingest, Service::Writer]).await;

    let mut device = Device::connect("test-dev-1").await;
    device
        .publish(
            &mqtt_readings_topic(&cfg.mqtt.topic_root, "test-dev-1"),
            json_batch("test-dev-1", 1, &[hr(70.0, at(0))]),
        )
        .await;
    device.wait_acked(WAIT).await;
    ts::eventually(
        WAIT,
        "the reading, through ingest's TLS connection",
        || async { (count_rows(&cfg, &patient).await == 1).then_some(()) },
    )
    .await;
    device.disconnect().await;
    pipeline.stop().await;

    // A CA that did not sign the broker's certificate: no connection, and
    // readiness says why.
    let mut wrong = cfg.clone();
    let bogus = std::env::temp_dir().join(ts::unique("bogus-ca"));
    std::fs::write(&bogus, include_str!("bogus_ca.pem")).expect("write CA");
    wrong.mqtt.tls = Some(vitalwatch_ingest::MqttTls {
        ca_file: bogus.clone(),
        client_cert_file: None,
        client_key_file: None,
    });
    wrong.mqtt.client_id = ts::unique("ingest");
    let refused = start(&[Service::Ingest], &wrong);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        refused.readiness.is_ready("ingest.mqtt"),
        Some(false),
        "{:?}",
        refused.readiness.report()
    );
    refused.stop().await;
    let _ = std::fs::remove_file(bogus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingest_instances_share_the_work_without_doubling_it() {
    let cfg = config().await;
    let mut second = cfg.clone();
    second.mqtt.client_id = ts::unique("ingest"); // same share group, own session
    let patient = ts::unique("pat");
    register(&cfg, "test-dev-1", &patient).await;
    let a = start(&[Service::Ingest, Service::Writer], &cfg);
    let b = start(&[Service::Ingest], &second);
    wait_until_ingest_subscribed(&cfg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, "test-dev-1");
    let mut device = Device::connect("test-dev-1").await;
    let batches = 400i64;
    for i in 0..batches {
        device
            .publish(
                &topic,
                json_batch("test-dev-1", i as u64, &[hr(60.0 + (i % 50) as f64, at(i))]),
            )
            .await;
    }
    device.wait_acked(WAIT).await;
    ts::eventually(WAIT, "every reading", || async {
        (count_rows(&cfg, &patient).await >= batches).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count_rows(&cfg, &patient).await, batches);
    device.disconnect().await;
    b.stop().await;
    a.stop().await;
}
