//! The store against a real PostgreSQL: migrations, idempotent inserts,
//! registry, and trend buckets checked against a brute-force computation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::reading::{Batch, Measurement, Quality, Reading};
use vitalwatch_store::readings::{Rows, insert};
use vitalwatch_store::registry::{load_devices, register_device};
use vitalwatch_store::{migrate, trends};
use vitalwatch_test_support as ts;

#[tokio::test]
async fn migrations_apply_once_even_when_run_concurrently() {
    let db = ts::database().await; // already migrated once
    let mut handles = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        handles.push(tokio::spawn(async move {
            let mut c = vitalwatch_store::connect(&url).await.expect("connect");
            migrate::migrate(&mut c).await.expect("migrate")
        }));
    }
    for h in handles {
        assert_eq!(h.await.expect("join"), Vec::<i32>::new(), "nothing left to apply");
    }
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    assert_eq!(migrate::current_version(&c).await.expect("version"), migrate::latest_version());
    let n: i64 = c.query_one("SELECT count(*) FROM schema_migrations", &[]).await.expect("count").get(0);
    assert_eq!(n, migrate::MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn a_fresh_database_migrates_concurrently_without_errors() {
    // Create an empty database by hand so that four migrators race on it.
    let name = ts::unique("vw_test_empty");
    let admin = vitalwatch_store::connect(&ts::admin_database_url()).await.expect("admin");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create");
    let url = format!("{}/{name}", ts::admin_database_url().rsplit_once('/').expect("url").0);
    let mut applied = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let mut c = vitalwatch_store::connect(&url).await.expect("connect");
            migrate::migrate(&mut c).await.expect("migrate")
        }));
    }
    for h in handles {
        applied.extend(h.await.expect("join"));
    }
    applied.sort_unstable();
    let all: Vec<i32> = migrate::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(applied, all, "each migration applied exactly once across the racers");
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().expect("time") + Duration::seconds(secs)
}

fn batch(patient: &str, device: &str, seq: u64, values: &[(i64, f64)]) -> Batch {
    Batch {
        device_id: device.into(),
        patient_id: patient.into(),
        seq: Some(seq),
        received_at: t(100_000),
        readings: values
            .iter()
            .map(|(s, v)| Reading {
                metric: Metric::HeartRate,
                measurement: Measurement::Scalar(*v),
                measured_at: t(*s),
                quality: Quality::default(),
            })
            .collect(),
    }
}

#[tokio::test]
async fn inserting_the_same_rows_twice_changes_nothing() {
    let db = ts::database().await;
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    let mut rows = Rows::default();
    rows.push(&batch("p", "d", 1, &[(0, 60.0), (1, 61.0)]));
    rows.push(&batch("p", "d", 2, &[(2, 62.0)]));
    assert_eq!(insert(&c, &rows).await.expect("insert"), 3);
    assert_eq!(insert(&c, &rows).await.expect("insert again"), 0);
    // The same reading from another device is another reading.
    let mut other = Rows::default();
    other.push(&batch("p", "d2", 1, &[(0, 60.0)]));
    assert_eq!(insert(&c, &other).await.expect("insert other"), 1);
    let n: i64 = c.query_one("SELECT count(*) FROM readings", &[]).await.expect("count").get(0);
    assert_eq!(n, 4);
}

#[tokio::test]
async fn trend_buckets_equal_a_brute_force_computation() {
    let db = ts::database().await;
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    // 500 pseudo-random readings over 10 hours, from a fixed seed.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut values = Vec::new();
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values.push(((x % 36_000) as i64, 40.0 + (x % 1000) as f64 / 10.0));
    }
    values.sort_by_key(|v| v.0);
    values.dedup_by_key(|v| v.0);
    let mut rows = Rows::default();
    rows.push(&batch("p", "d", 1, &values));
    insert(&c, &rows).await.expect("insert");
    rows = Rows::default();
    rows.push(&batch("someone-else", "d9", 1, &[(10, 200.0)]));
    insert(&c, &rows).await.expect("insert");

    for bucket in [60_i64, 900, 3600, 86_400] {
        let (from, to) = (t(1800), t(30_000));
        let got = trends::buckets(&c, "p", "heart_rate", from, to, bucket).await.expect("buckets");
        let mut want: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
        for (s, v) in &values {
            let time = t(*s);
            if time >= from && time < to {
                want.entry(time.timestamp().div_euclid(bucket) * bucket).or_default().push(*v);
            }
        }
        assert_eq!(got.len(), want.len(), "bucket {bucket}");
        for (g, (start, vs)) in got.iter().zip(&want) {
            assert_eq!(g.start.timestamp(), *start);
            assert_eq!(g.count, vs.len() as i64);
            assert_eq!(g.min, vs.iter().copied().fold(f64::INFINITY, f64::min));
            assert_eq!(g.max, vs.iter().copied().fold(f64::NEG_INFINITY, f64::max));
            let avg = vs.iter().sum::<f64>() / vs.len() as f64;
            assert!((g.avg - avg).abs() < 1e-9, "bucket {bucket} at {start}: {} vs {avg}", g.avg);
        }
    }
}

#[tokio::test]
async fn registry_tracks_assignment_history() {
    let db = ts::database().await;
    let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-1"), Some(t(0))).await.expect("register");
    register_device(&mut c, "scale-1", "scale", None, None).await.expect("register unassigned");
    let d = load_devices(&c).await.expect("devices");
    assert_eq!(d["cuff-1"].current_patient(), Some("p-1"));
    assert_eq!(d["cuff-1"].kind, "bp_cuff");
    assert!(d["scale-1"].assignments.is_empty());
    assert!(d["scale-1"].active);

    // Registering again is a no-op; moving the device closes the old assignment at the hand-over.
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-1"), Some(t(50))).await.expect("again");
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-2"), Some(t(100))).await.expect("move");
    let d = load_devices(&c).await.expect("devices");
    let cuff = &d["cuff-1"];
    assert_eq!(cuff.assignments.len(), 2);
    assert_eq!(cuff.patient_at(t(99)), Some("p-1"));
    assert_eq!(cuff.patient_at(t(100)), Some("p-2"));
    assert_eq!(cuff.patient_at(t(-1)), None);
    // A hand-over cannot be dated before the assignment it ends.
    assert!(register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(10))).await.is_err());
    assert!(register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(100))).await.is_err(), "a zero-length period");
    // A returned device (closed by hand) cannot be given out inside its last period.
    c.execute("UPDATE device_assignments SET unassigned_at = $1 WHERE device_id = 'cuff-1' AND unassigned_at IS NULL", &[&t(200)])
        .await
        .expect("return the device");
    assert!(register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(150))).await.is_err(), "overlap");
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(200))).await.expect("after the return");
    let d = load_devices(&c).await.expect("devices");
    assert_eq!(d["cuff-1"].patient_at(t(199)), Some("p-2"));
    assert_eq!(d["cuff-1"].patient_at(t(200)), Some("p-3"));

    c.execute("UPDATE devices SET active = false WHERE device_id = 'cuff-1'", &[]).await.expect("deactivate");
    assert!(!load_devices(&c).await.expect("devices")["cuff-1"].active);
    assert!(register_device(&mut c, "bad/id", "x", None, None).await.is_err(), "MQTT wildcards and separators are refused");
}

#[tokio::test]
async fn registry_changes_are_notified() {
    let db = ts::database().await;
    let (client, mut conn) = vitalwatch_store::tokio_postgres::connect(&db.url, vitalwatch_store::tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(futures_util::stream::poll_fn(move |cx| conn.poll_message(cx)));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let vitalwatch_store::tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.channel().to_owned());
            }
        }
    });
    client.batch_execute("LISTEN vitalwatch_registry").await.expect("listen");
    let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
    register_device(&mut c, "ox-1", "pulse_oximeter", Some("p-9"), None).await.expect("register");
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await.expect("notified in time");
    assert_eq!(got.as_deref(), Some(vitalwatch_store::registry::CHANGE_CHANNEL));
}
