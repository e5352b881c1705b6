//! End to end: a device publishes over MQTT (Mosquitto), ingest produces
//! to Kafka (tansu), the writer stores rows in PostgreSQL, and the API serves
//! the trend.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use prost::Message as _;
use vitalwatch::Service;
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::proto;
use vitalwatch_core::reading::{Batch, Reading};
use vitalwatch_core::topics::mqtt_readings_topic;
use vitalwatch_test_support::{self as ts, Device};

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_travels_from_device_to_trend() {
    let cfg = config().await;
    let device_id = "test-dev-1".to_owned();
    let (patient, pipeline) =
        start_with_device(&cfg, &device_id, &[Service::Ingest, Service::Writer]).await;
    let mut device = Device::connect(&device_id).await;

    // Heart rate over three 5-minute buckets, in JSON and protobuf, plus blood pressure.
    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, &device_id);
    let values: [(i64, f64); 7] = [
        (0, 60.0),
        (60, 70.0),
        (299, 80.0),
        (300, 90.0),
        (420, 100.0),
        (600, 55.0),
        (899, 65.0),
    ];
    let mut seq = 0;
    for chunk in values.chunks(2) {
        seq += 1;
        let readings: Vec<_> = chunk.iter().map(|(s, v)| hr(*v, at(*s))).collect();
        device
            .publish(&topic, json_batch(&device_id, seq, &readings))
            .await;
    }
    let pb = proto::ReadingBatch {
        device_id: device_id.clone(),
        seq: Some(99),
        readings: vec![proto::Reading {
            metric: proto::Metric::BloodPressure as i32,
            unit: "kPa".into(),
            measured_at: Some(prost_types_ts(at(30))),
            components: vec![
                proto::Component {
                    name: "systolic".into(),
                    value: 16.0,
                },
                proto::Component {
                    name: "diastolic".into(),
                    value: 10.0,
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    device.publish(&topic, pb.encode_to_vec()).await;
    device.wait_acked(WAIT).await;

    grant(&cfg, &patient).await;
    let want_rows = values.len() as i64 + 2;
    ts::eventually(WAIT, "every reading stored", || async {
        (count_rows(&cfg, &patient).await == want_rows).then_some(())
    })
    .await;

    let uri = format!(
        "/v1/patients/{patient}/vitals?metric=heart_rate&bucket=5m&from={}&to={}",
        urlenc(at(0)),
        urlenc(at(900))
    );
    let (status, body) = get_json(&cfg, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["unit"], "/min");
    assert_eq!(body["bucket_seconds"], 300);
    let points = body["series"][0]["points"]
        .as_array()
        .expect("points")
        .clone();
    assert!(body["series"][0].get("component").is_none());

    // The expected buckets, computed from the published values.
    let mut expected: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for (s, v) in values {
        expected.entry(s / 300).or_default().push(v);
    }
    assert_eq!(points.len(), expected.len(), "{points:?}");
    for (p, (bucket, vs)) in points.iter().zip(&expected) {
        let start: DateTime<Utc> = p["start"]
            .as_str()
            .expect("start")
            .parse()
            .expect("rfc3339");
        assert_eq!(start, at(bucket * 300));
        assert_eq!(p["count"], vs.len());
        assert_eq!(p["min"].as_f64(), vs.iter().copied().reduce(f64::min));
        assert_eq!(p["max"].as_f64(), vs.iter().copied().reduce(f64::max));
        let avg = vs.iter().sum::<f64>() / vs.len() as f64;
        assert!((p["avg"].as_f64().expect("avg") - avg).abs() < 1e-9);
    }

    // Blood pressure: two series, converted from kPa to mm[Hg].
    let uri = format!(
        "/v1/patients/{patient}/vitals?metric=blood_pressure&bucket=1h&from={}&to={}",
        urlenc(at(0)),
        urlenc(at(3600))
    );
    let (status, body) = get_json(&cfg, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let series = body["series"].as_array().expect("series");
    let comps: Vec<_> = series
        .iter()
        .map(|s| s["component"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(comps, vec!["diastolic", "systolic"]);
    let sys = series[1]["points"][0]["avg"].as_f64().expect("systolic");
    assert!((sys - 120.01).abs() < 0.01, "{sys}");

    // Bad requests get a problem body, not a crash.
    let (status, body) =
        get_json(&cfg, &format!("/v1/patients/{patient}/vitals?metric=pulse")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"].as_str().unwrap_or("").contains("pulse"),
        "{body}"
    );
    let (status, _) = get_json(
        &cfg,
        &format!("/v1/patients/{patient}/vitals?metric=heart_rate&bucket=7s"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The newest reading of every metric: heart rate at 899 s, both
    // blood-pressure components.
    let (status, body) = get_json(&cfg, &format!("/v1/patients/{patient}/latest")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let latest = body["latest"].as_array().expect("latest");
    let find = |metric: &str, component: Option<&str>| {
        latest
            .iter()
            .find(|l| l["metric"] == metric && l["component"].as_str() == component)
            .unwrap_or_else(|| panic!("{metric} {component:?} in {body}"))
    };
    let hr_latest = find("heart_rate", None);
    assert_eq!(
        (hr_latest["value"].as_f64(), hr_latest["unit"].as_str()),
        (Some(65.0), Some("/min"))
    );
    assert_eq!(
        hr_latest["time"]
            .as_str()
            .map(|t| t.parse::<DateTime<Utc>>().expect("time")),
        Some(at(899))
    );
    assert!(
        (find("blood_pressure", Some("systolic"))["value"]
            .as_f64()
            .expect("sys")
            - 120.01)
            .abs()
            < 0.01
    );
    assert!(
        find("blood_pressure", Some("diastolic"))["value"]
            .as_f64()
            .is_some()
    );
    assert_eq!(latest.len(), 3, "only the metrics the patient has: {body}");

    // Only the patient's care team reads their vitals; every attempt is audited.
    let app = api(&cfg);
    let uri = format!("/v1/patients/{patient}/vitals?metric=heart_rate");
    let (status, _) = call(
        &app,
        "GET",
        &uri,
        Some(&token("nurse-elsewhere", &["nurse"])),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another team's nurse");
    let (status, _) = call(
        &app,
        "GET",
        &uri,
        Some(&token("nurse-test", &["admin"])),
        "",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an admin manages, does not read care data"
    );
    let (status, _) = call(&app, "GET", &uri, None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let audit: Vec<(String, Option<String>, String)> = c
        .query("SELECT actor, patient_id, outcome FROM audit_log WHERE action = 'vitals.read' ORDER BY id", &[])
        .await
        .expect("audit")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let p = Some(patient.clone());
    let want = vec![
        ("nurse-test".to_owned(), p.clone(), "allowed".to_owned()),
        ("nurse-test".to_owned(), p.clone(), "allowed".to_owned()),
        // Refusals name the patient the request was about, too.
        ("nurse-test".to_owned(), p.clone(), "failed".to_owned()),
        ("nurse-test".to_owned(), p.clone(), "failed".to_owned()),
        ("nurse-elsewhere".to_owned(), p.clone(), "denied".to_owned()),
        ("nurse-test".to_owned(), p.clone(), "denied".to_owned()),
        ("anonymous".to_owned(), p, "denied".to_owned()),
    ];
    assert_eq!(audit, want);

    device.disconnect().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_crash_mid_stream_loses_and_doubles_nothing() {
    let mut cfg = config().await;
    // One record (two readings) per transaction, so the writer is still
    // mid-stream when the test sees its first rows and kills it.
    cfg.writer.batch_max_rows = 2;
    // A killed consumer never says goodbye: the group waits out its session
    // before handing its partitions on. Keep that wait short here.
    cfg.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka
        .properties
        .insert("heartbeat.interval.ms".into(), "1000".into());
    let device_id = "test-dev-1".to_owned();
    let (patient, ingest) = start_with_device(&cfg, &device_id, &[Service::Ingest]).await;
    let mut device = Device::connect(&device_id).await;

    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, &device_id);
    let batches = 1000;
    for i in 0..batches {
        let t = at(i * 2);
        let readings = [
            hr(60.0 + (i % 40) as f64, t),
            serde_json::json!({"metric": "spo2", "value": 95, "measured_at": t.to_rfc3339()}),
        ];
        device
            .publish(&topic, json_batch(&device_id, i as u64, &readings))
            .await;
    }
    device.wait_acked(WAIT).await;
    let total = batches * 2;

    // First writer: a process of its own, SIGKILLed once it has stored some
    // rows (a crash: no destructor runs, the group never hears goodbye).
    let first = spawn_process("writer", &cfg);
    let at_crash = ts::eventually(WAIT, "the first writer to store rows", || async {
        let n = count_rows(&cfg, &patient).await;
        (n > 0).then_some(n)
    })
    .await;
    first.kill();
    assert!(
        at_crash < total,
        "the writer finished before it could be killed mid-stream ({at_crash} rows)"
    );

    // A new writer in the same group picks up from the committed offsets.
    let second = start(&[Service::Writer], &cfg);
    let caught_up = ts::within(Duration::from_secs(120), || async {
        (count_rows(&cfg, &patient).await >= total).then_some(())
    })
    .await;
    if caught_up.is_none() {
        // Say what the broker thinks of the group, to tell an unassigned
        // writer from a stuck one.
        panic!(
            "the second writer stored {} of {total} rows in 120 s; the broker's view of its group: {:?}; committed and end offsets: {:?}",
            count_rows(&cfg, &patient).await,
            ts::group_state(&cfg.kafka, &cfg.writer.group_id),
            committed_and_end(&cfg.kafka, &cfg.writer.group_id),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT (metric, time)), count(DISTINCT seq) FROM readings WHERE patient_id = $1",
            &[&patient],
        )
        .await
        .expect("counts");
    let (rows, distinct, seqs): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(rows, total, "every published reading stored exactly once");
    assert_eq!(distinct, total);
    assert_eq!(seqs, batches);

    device.disconnect().await;
    second.stop().await;
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_counted_and_ingest_keeps_running() {
    let metrics = vitalwatch_api::telemetry::metrics_handle();
    let cfg = config().await;
    let device_id = "test-dev-1".to_owned();
    let (patient, ingest) = start_with_device(&cfg, &device_id, &[Service::Ingest]).await;
    let mut device = Device::connect(&device_id).await;

    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, &device_id);
    let garbage = b"\x08\x96\x01\xff\xff garbage".to_vec();
    device.publish(&topic, garbage.clone()).await;
    let t = at(0);
    let unknown = json_batch(
        &device_id,
        2,
        &[
            serde_json::json!({"metric": "pulse", "value": 70, "measured_at": t.to_rfc3339()}),
            hr(71.0, t),
        ],
    );
    device.publish(&topic, unknown.clone()).await;
    let impossible = json_batch(&device_id, 3, &[hr(900.0, at(1))]);
    device.publish(&topic, impossible.clone()).await;
    device
        .publish(&topic, json_batch(&device_id, 4, &[hr(72.0, at(2))]))
        .await;
    device.wait_acked(WAIT).await;

    let dead = ts::consume_matching(&cfg.kafka, &cfg.kafka.deadletter_topic, 3, WAIT, |m| {
        ts::key(m) == device_id
    })
    .await;
    let by_reason: BTreeMap<String, _> = dead
        .iter()
        .map(|m| (ts::header(m, "reason").unwrap_or_default(), m))
        .collect();
    let reasons: Vec<&str> = by_reason.keys().map(String::as_str).collect();
    assert_eq!(
        reasons,
        vec!["malformed_payload", "out_of_range", "unknown_metric"]
    );
    for (reason, payload, index) in [
        ("malformed_payload", &garbage, None),
        ("unknown_metric", &unknown, Some("0")),
        ("out_of_range", &impossible, Some("0")),
    ] {
        let m = by_reason[reason];
        use vitalwatch_bus::rdkafka::Message;
        assert_eq!(
            m.payload(),
            Some(&payload[..]),
            "{reason}: the raw payload is kept"
        );
        assert_eq!(ts::header(m, "topic").as_deref(), Some(topic.as_str()));
        assert_eq!(ts::header(m, "reading_index").as_deref(), index);
        let received: DateTime<Utc> = ts::header(m, "received_at")
            .expect("received_at")
            .parse()
            .expect("rfc3339");
        assert!((Utc::now() - received).num_seconds().abs() < 120);
        assert!(!ts::header(m, "detail").unwrap_or_default().is_empty());
    }

    // Ingest kept running: both valid readings reached the readings topic.
    let ok = ts::consume_matching(&cfg.kafka, &cfg.kafka.readings_topic, 2, WAIT, |_| true).await;
    let mut hrs: Vec<f64> = ok
        .iter()
        .flat_map(|m| {
            use vitalwatch_bus::rdkafka::Message;
            let b = vitalwatch_core::reading::Batch::decode(m.payload().unwrap_or_default())
                .expect("valid batch");
            assert_eq!(b.patient_id, patient);
            assert_eq!(ts::key(m), patient, "keyed by patient");
            b.readings
                .into_iter()
                .flat_map(|r| r.values().map(|(_, v)| v).collect::<Vec<_>>())
        })
        .collect();
    hrs.sort_by(f64::total_cmp);
    assert_eq!(hrs, vec![71.0, 72.0]);

    // …and counted every rejection by reason.
    let text = metrics.render();
    for reason in ["malformed_payload", "unknown_metric", "out_of_range"] {
        let series = format!("vitalwatch_ingest_rejected_total{{reason=\"{reason}\"}}");
        assert!(
            metric(&text, &series) >= 1.0,
            "{series} missing or zero in:\n{text}"
        );
    }

    device.disconnect().await;
    ingest.stop().await;
}

fn prost_types_ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_days_count_calendar_days_with_data_and_name_the_rpm_code() {
    use chrono::NaiveDate;
    let cfg = config().await;
    let patient = ts::unique("pat");
    grant(&cfg, &patient).await;
    let mut c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let layout = vitalwatch_store::storage::layout(&c).await.expect("layout");
    let today = Utc::now().date_naive();
    let day = |back: u64| today - chrono::Days::new(back);
    let at_utc = |d: NaiveDate, h: u32, m: u32| d.and_hms_opt(h, m, 0).expect("time").and_utc();
    // Readings on 20 of the last 30 days (days 1 to 20 back), three on some
    // days; one late on day 25 back, at 23:30 UTC.
    let mut readings = Vec::new();
    for back in 1..=20 {
        for h in [8, 12, 20].iter().take(if back % 2 == 0 { 3 } else { 1 }) {
            readings.push(Reading {
                metric: Metric::HeartRate,
                measurement: vitalwatch_core::reading::Measurement::Scalar(70.0),
                measured_at: at_utc(day(back), *h, 0),
                quality: vitalwatch_core::reading::Quality::default(),
            });
        }
    }
    readings.push(Reading {
        metric: Metric::BodyWeight,
        measurement: vitalwatch_core::reading::Measurement::Scalar(80.0),
        measured_at: at_utc(day(25), 23, 30),
        quality: vitalwatch_core::reading::Quality::default(),
    });
    let batch = Batch {
        device_id: "d".into(),
        patient_id: patient.clone(),
        seq: None,
        received_at: Utc::now(),
        readings,
    };
    let mut rows = vitalwatch_store::readings::Rows::default();
    rows.push(&batch);
    vitalwatch_store::readings::write(&mut c, layout, &rows)
        .await
        .expect("write");

    let uri = |q: &str| format!("/v1/patients/{patient}/monitoring-days{q}");
    let (status, body) = get_json(&cfg, &uri(&format!("?from={}&to={}", day(29), today))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["count"].as_u64(), body["cpt"].as_str()),
        (Some(21), Some("99454")),
        "{body}"
    );
    let days: Vec<String> = body["days"]
        .as_array()
        .expect("days")
        .iter()
        .map(|d| d.as_str().expect("day").to_owned())
        .collect();
    assert_eq!(
        days.first().map(String::as_str),
        Some(day(25).to_string().as_str())
    );
    assert_eq!(
        days.last().map(String::as_str),
        Some(day(1).to_string().as_str())
    );
    // Ten days holding four days of data (25, 20, 19 and 18 back): the lower code.
    let (_, body) = get_json(&cfg, &uri(&format!("?from={}&to={}", day(27), day(18)))).await;
    assert_eq!(
        (body["count"].as_u64(), body["cpt"].as_str()),
        (Some(4), Some("99445")),
        "{body}"
    );
    // One day: no code.
    let (_, body) = get_json(&cfg, &uri(&format!("?from={}&to={}", day(26), day(21)))).await;
    assert_eq!(body["count"].as_u64(), Some(1));
    assert!(body.get("cpt").is_none(), "{body}");
    // In Tokyo, 23:30 UTC is the next morning.
    let (_, body) = get_json(
        &cfg,
        &uri(&format!("?from={}&to={}&tz=Asia/Tokyo", day(26), day(21))),
    )
    .await;
    assert_eq!(
        body["days"],
        serde_json::json!([day(24).to_string()]),
        "{body}"
    );
    // Bad periods and zones are refused clearly.
    for bad in [
        format!("?from={}&to={}", today, day(1)),
        format!("?from={}&to={}", day(30), today),
        "?tz=Mars/Olympus_Mons".to_owned(),
        "?from=yesterday".to_owned(),
    ] {
        let (status, body) = get_json(&cfg, &uri(&bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let (status, _) = call(
        &api(&cfg),
        "GET",
        &uri(""),
        Some(&token("nurse-elsewhere", &["nurse"])),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_import_registers_all_or_nothing() {
    let cfg = config().await;
    let csv = "ok-1,pat-1,wearable\nok-2,pat-2,scale,2026-11-01T00:00:00Z\n";
    let entries = vitalwatch::devices::parse_csv(csv).expect("parses");
    assert_eq!(
        vitalwatch::devices::register(&cfg.database, &entries)
            .await
            .expect("registered"),
        2
    );
    // ok-2 handed to another patient before its assignment began: refused,
    // and with it the whole file, the new device ok-3 included.
    let bad = "ok-3,pat-3,wearable\nok-2,pat-9,scale,2026-10-01T00:00:00Z\n";
    let entries = vitalwatch::devices::parse_csv(bad).expect("parses");
    let err = vitalwatch::devices::register(&cfg.database, &entries)
        .await
        .expect_err("a hand-over before the assignment began");
    assert!(format!("{err:#}").contains("ok-2"), "{err:#}");
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM devices WHERE device_id IN ('ok-1', 'ok-2', 'ok-3')",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2, "ok-3 was not registered");
    let owner: String = c
        .query_one(
            "SELECT patient_id FROM device_assignments WHERE device_id = 'ok-2' AND unassigned_at IS NULL",
            &[],
        )
        .await
        .expect("assignment")
        .get(0);
    assert_eq!(owner, "pat-2");
}
