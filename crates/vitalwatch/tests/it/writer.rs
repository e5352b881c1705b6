//! The writer against real Kafka (tansu) and PostgreSQL: idempotence under
//! replay, and a PostgreSQL crash in the middle of writing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use vitalwatch::Service;
use vitalwatch_bus::Producer;
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::reading::{Batch, Measurement, Quality, Reading};
use vitalwatch_store::storage::TimescaleMode;
use vitalwatch_test_support as ts;

use crate::util::*;

/// A batch of `n` heart-rate readings one second apart, from `first`.
fn batch(patient: &str, device: &str, seq: u64, first: DateTime<Utc>, n: i64) -> Batch {
    Batch {
        device_id: device.into(),
        patient_id: patient.into(),
        seq: Some(seq),
        received_at: Utc::now(),
        readings: (0..n)
            .map(|i| Reading {
                metric: Metric::HeartRate,
                measurement: Measurement::Scalar(60.0 + (i % 30) as f64),
                measured_at: first + chrono::Duration::seconds(i),
                quality: Quality::default(),
            })
            .collect(),
    }
}

/// Every column of every row, as one digest: equal digests, equal tables.
async fn digest(url: &str) -> (i64, String) {
    let c = vitalwatch_store::connect(url).await.expect("db");
    let row = c
        .query_one(
            "SELECT count(*), coalesce(md5(string_agg(r::text, ',' ORDER BY device_id, metric, component, time)), '')
               FROM readings r",
            &[],
        )
        .await
        .expect("digest");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_consumed_again_after_an_offset_reset_leave_the_table_unchanged() {
    let cfg = config().await;
    let producer = Producer::new(&cfg.kafka).expect("producer");
    // 60 records for 6 patients (so every partition gets some), 10 readings each.
    let start = Utc::now() - chrono::Duration::hours(2);
    for i in 0..60_u64 {
        let b = batch(
            &format!("pat-{}", i % 6),
            &format!("dev-{}", i % 6),
            i,
            start + chrono::Duration::minutes(i as i64),
            10,
        );
        produce(&cfg.kafka, &producer, &b).await;
    }
    let first = start_writer(&cfg);
    ts::eventually(WAIT, "all 600 rows", || async {
        (digest(&cfg.database.url).await.0 == 600).then_some(())
    })
    .await;
    first.stop().await;
    let before = digest(&cfg.database.url).await;

    // Reset the group's offsets to the beginning, as an operator would.
    let (committed, ends) = committed_and_end(&cfg.kafka, &cfg.writer.group_id);
    assert_eq!(
        committed, ends,
        "the first writer committed everything it wrote"
    );
    reset_offsets(&cfg.kafka, &cfg.writer.group_id);

    // The second writer consumes every record again, to the end.
    let second = start_writer(&cfg);
    ts::eventually(
        WAIT,
        "the second writer to consume every record again",
        || async {
            let (committed, ends) = committed_and_end(&cfg.kafka, &cfg.writer.group_id);
            (committed == ends).then_some(())
        },
    )
    .await;
    second.stop().await;
    assert_eq!(
        digest(&cfg.database.url).await,
        before,
        "the replay changed nothing, not even received_at"
    );
}

fn start_writer(cfg: &vitalwatch::Config) -> Running {
    start(&[Service::Writer], cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_during_writing_loses_and_doubles_nothing() {
    let mut cfg = config().await;
    // A PostgreSQL of this test's own, so crashing it disturbs no other test.
    let pg = ts::PrivatePostgres::start().await;
    let admin = vitalwatch_store::connect(&pg.url("postgres"))
        .await
        .expect("private postgres");
    admin
        .batch_execute("CREATE DATABASE vitalwatch")
        .await
        .expect("create database");
    cfg.database.url = pg.url("vitalwatch");
    // `auto` on a server without TimescaleDB preloaded (where it is
    // installed, creating the extension fails under a savepoint): native.
    cfg.database.timescaledb = TimescaleMode::Auto;
    vitalwatch::migrate(&cfg.database, Duration::from_secs(30))
        .await
        .expect("migrate");
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    assert_eq!(
        vitalwatch_store::storage::layout(&c).await.expect("layout"),
        vitalwatch_store::storage::Layout::Native
    );
    drop(c);
    cfg.writer.batch_max_rows = 50;

    let (records, per_record) = (400_u64, 5_i64);
    let total = (records as i64) * per_record;
    let producing = {
        let kafka = cfg.kafka.clone();
        tokio::spawn(async move {
            let producer = Producer::new(&kafka).expect("producer");
            let start = Utc::now() - chrono::Duration::days(3);
            for i in 0..records {
                let b = batch(
                    "pat-1",
                    "dev-1",
                    i,
                    start + chrono::Duration::seconds(i as i64 * per_record),
                    per_record,
                );
                produce(&kafka, &producer, &b).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let writer = start_writer(&cfg);
    let stored = || async {
        match vitalwatch_store::connect(&cfg.database.url).await {
            Ok(c) => c
                .query_one("SELECT count(*) FROM readings", &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1),
            Err(_) => -1,
        }
    };
    ts::eventually(WAIT, "the writer to store some rows", || async {
        (stored().await > 0).then_some(())
    })
    .await;

    pg.crash();
    ts::eventually(WAIT, "the writer to report the database down", || async {
        (writer.readiness.is_ready("writer.database") == Some(false)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !writer.task.is_finished(),
        "the writer waits out the outage instead of exiting"
    );
    pg.resume().await;

    producing.await.expect("producer task");
    ts::eventually(
        Duration::from_secs(120),
        "every row after the restart",
        || async { (stored().await >= total).then_some(()) },
    )
    .await;
    assert_eq!(
        writer.readiness.is_ready("writer.database"),
        Some(true),
        "ready again"
    );
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let row = c
        .query_one("SELECT count(*), count(DISTINCT time), count(DISTINCT seq) FROM readings WHERE patient_id = 'pat-1'", &[])
        .await
        .expect("counts");
    assert_eq!(row.get::<_, i64>(0), total, "every reading exactly once");
    assert_eq!(row.get::<_, i64>(1), total);
    assert_eq!(row.get::<_, i64>(2), records as i64);
    assert_eq!(
        deadletters(&cfg.kafka),
        0,
        "the outage dead-lettered nothing"
    );
    writer.stop().await;
}

/// A writer started against a database whose schema is older than it
/// needs (migrated to version 2 only) waits, dead-letters nothing, and
/// writes everything once the database is migrated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waits_for_migrations_instead_of_dead_lettering() {
    let mut cfg = config().await;
    cfg.database.url = ts::empty_database().await;
    let mut c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    vitalwatch_store::migrate::migrate_to(&mut c, &cfg.database, 2)
        .await
        .expect("to v2");
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let start = Utc::now() - chrono::Duration::hours(1);
    for i in 0..5_u64 {
        produce(
            &cfg.kafka,
            &producer,
            &batch(
                "pat-1",
                "dev-1",
                i,
                start + chrono::Duration::minutes(i as i64),
                10,
            ),
        )
        .await;
    }
    let writer = start_writer(&cfg);
    ts::eventually(
        WAIT,
        "the writer to report the database not ready",
        || async { (writer.readiness.is_ready("writer.database") == Some(false)).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        deadletters(&cfg.kafka),
        0,
        "nothing dead-lettered while the schema is behind"
    );
    vitalwatch_store::migrate::migrate(&mut c, &cfg.database)
        .await
        .expect("migrate");
    ts::eventually(WAIT, "all 50 rows", || async {
        (digest(&cfg.database.url).await.0 == 50).then_some(())
    })
    .await;
    assert_eq!(deadletters(&cfg.kafka), 0);
    writer.stop().await;
}

/// Two writers run at once in one group, one of them joining while records
/// flow, so the group rebalances mid-stream: every row is stored once and
/// every offset is committed. (Which partitions each member held is not
/// asserted: tansu 0.6 answers no DescribeGroups request.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_in_one_group_store_every_row_once_across_a_rebalance() {
    let cfg = config().await;
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let start = Utc::now() - chrono::Duration::hours(1);
    let record = |i: u64| {
        batch(
            &format!("pat-{}", i % 6),
            &format!("dev-{}", i % 6),
            i,
            start + chrono::Duration::minutes(i as i64),
            10,
        )
    };
    let first = start_writer(&cfg);
    for i in 0..30_u64 {
        produce(&cfg.kafka, &producer, &record(i)).await;
    }
    ts::eventually(WAIT, "the first writer to store rows", || async {
        (digest(&cfg.database.url).await.0 > 0).then_some(())
    })
    .await;
    let second = start_writer(&cfg);
    for i in 30..90_u64 {
        produce(&cfg.kafka, &producer, &record(i)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ts::eventually(WAIT, "all 900 rows", || async {
        (digest(&cfg.database.url).await.0 >= 900).then_some(())
    })
    .await;
    ts::eventually(WAIT, "every offset committed", || async {
        let (committed, ends) = committed_and_end(&cfg.kafka, &cfg.writer.group_id);
        (committed == ends).then_some(())
    })
    .await;
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT (patient_id, time)) FROM readings",
            &[],
        )
        .await
        .expect("counts");
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (900, 900),
        "every reading once"
    );
    first.stop().await;
    second.stop().await;
}
