//! The writer against PostgreSQL's own COPY limit, side by side in one run,
//! on each storage layout this server has (native always, TimescaleDB where
//! installed). Each method writes the same fresh rows into a fresh database:
//!
//! - `copy (limit)`: binary COPY straight into `readings`: no staging, no
//!   conflict handling. What PostgreSQL itself takes on this machine.
//! - `store insert`: the writer's store path (`readings::insert`): binary
//!   COPY into `readings` under a savepoint, in transactions of
//!   BENCH_BATCH_ROWS rows; `store replay`: the same rows again, where every
//!   COPY meets duplicates and falls back to the staged path.
//! - `staged insert`: the idempotent path alone, binary COPY into a staging
//!   table then `INSERT … ON CONFLICT DO NOTHING`.
//! - `unnest insert`: one `INSERT … SELECT FROM unnest(…) ON CONFLICT DO
//!   NOTHING` per batch, the alternative measured.
//! - `writer (kafka)`: the whole writer service, consuming records
//!   produced beforehand to tansu, decoding them and writing them; timed
//!   from its start to the last row committed.
//!
//! `deploy/local/bench --bench writer_throughput`
//! (environment: BENCH_ROWS, default 1000000; BENCH_BATCH_ROWS, default
//! 5000; BENCH_READINGS_PER_RECORD, default 20)

use std::time::{Duration, Instant};
use vitalwatch_benches::{copy_straight, env};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::health::Readiness;
use vitalwatch_core::reading::{Batch, Measurement, Quality, Reading};
use vitalwatch_store::readings::{self, Rows};
use vitalwatch_store::storage::{self, Layout, TimescaleMode};
use vitalwatch_store::{DatabaseConfig, Pool};
use vitalwatch_test_support as ts;
use vitalwatch_writer::WriterConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

/// `rows` heart-rate readings as device batches: 1,000 patients, one
/// wearable each, one reading per device every 10 s, ending now.
fn batches(rows: usize, per_record: usize) -> Vec<Batch> {
    let devices = 1000;
    let per_device = rows.div_ceil(devices);
    let start: DateTime<Utc> = Utc::now() - chrono::Duration::seconds(10 * per_device as i64);
    let mut out = Vec::with_capacity(rows / per_record + devices);
    let mut seq = 0;
    for chunk_start in (0..per_device).step_by(per_record) {
        for d in 0..devices {
            let n = per_record.min(per_device - chunk_start);
            seq += 1;
            out.push(Batch {
                device_id: format!("bench-dev-{d:04}"),
                patient_id: format!("bench-pat-{d:04}"),
                seq: Some(seq),
                received_at: Utc::now(),
                readings: (0..n)
                    .map(|i| Reading {
                        metric: Metric::HeartRate,
                        measurement: Measurement::Scalar(
                            55.0 + ((chunk_start + i + d) % 50) as f64,
                        ),
                        measured_at: start
                            + chrono::Duration::seconds(10 * (chunk_start + i) as i64),
                        quality: Quality::default(),
                    })
                    .collect(),
            });
        }
    }
    out
}

async fn fresh(layout: Layout) -> Result<(DatabaseConfig, Pool), Box<dyn std::error::Error>> {
    let mode = if layout == Layout::TimescaleDb {
        TimescaleMode::Required
    } else {
        TimescaleMode::Off
    };
    let db = ts::database_with(DatabaseConfig {
        timescaledb: mode,
        ..Default::default()
    })
    .await;
    let pool = vitalwatch_store::pool(&db)?;
    let client = pool.get().await?;
    storage::maintain(&**client, &db, Utc::now()).await?;
    if layout == Layout::Native {
        storage::ensure_partitions(
            &**client,
            Utc::now() - chrono::Duration::days(30),
            Utc::now(),
        )
        .await?;
    }
    Ok((db, pool))
}

fn report(layout: Layout, method: &str, rows: usize, took: Duration, limit: Option<f64>) -> f64 {
    let rate = rows as f64 / took.as_secs_f64();
    let ratio = limit
        .map(|l| format!("{:>5.0}% of the COPY limit", 100.0 * rate / l))
        .unwrap_or_default();
    println!(
        "{layout:<12} {method:<16} {rows:>9} rows in {:>6.2} s = {rate:>9.0} rows/s  {ratio}",
        took.as_secs_f64()
    );
    rate
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let rows = env("BENCH_ROWS", 1_000_000);
    let batch_rows = env("BENCH_BATCH_ROWS", 5000).max(1);
    let per_record = env("BENCH_READINGS_PER_RECORD", 20).max(1);
    let data = batches(rows, per_record);
    let total: usize = data.iter().map(|b| b.readings.len()).sum();
    // The same rows, cut into the writer's transactions.
    let mut chunks = vec![Rows::default()];
    for b in &data {
        if chunks.last().is_some_and(|c| c.len() >= batch_rows) {
            chunks.push(Rows::default());
        }
        if let Some(c) = chunks.last_mut() {
            c.push(b);
        }
    }
    let mut layouts = vec![Layout::Native];
    match ts::timescaledb_available().await {
        Ok(()) => layouts.push(Layout::TimescaleDb),
        Err(why) => println!("TimescaleDB not measured: {why}"),
    }
    println!(
        "{total} rows, {} per transaction, {per_record} readings per Kafka record",
        batch_rows
    );
    for layout in layouts {
        // PostgreSQL's own limit: one COPY per batch straight into the table.
        let (_, pool) = fresh(layout).await?;
        let mut client = pool.get().await?;
        let started = Instant::now();
        for c in &chunks {
            let tx = client.transaction().await?;
            copy_straight(&tx, c).await?;
            tx.commit().await?;
        }
        let limit = report(layout, "copy (limit)", total, started.elapsed(), None);
        drop(client);

        let (_, pool) = fresh(layout).await?;
        let mut client = pool.get().await?;
        let started = Instant::now();
        for c in &chunks {
            let mut tx = client.transaction().await?;
            readings::insert(&mut tx, c).await?;
            tx.commit().await?;
        }
        report(
            layout,
            "store insert",
            total,
            started.elapsed(),
            Some(limit),
        );
        // The same rows again: every batch a replay, all through staging.
        let started = Instant::now();
        for c in &chunks {
            let mut tx = client.transaction().await?;
            let new = readings::insert(&mut tx, c).await?;
            tx.commit().await?;
            assert_eq!(new, 0, "a replay stores nothing new");
        }
        report(
            layout,
            "store replay",
            total,
            started.elapsed(),
            Some(limit),
        );
        drop(client);

        let (_, pool) = fresh(layout).await?;
        let mut client = pool.get().await?;
        let started = Instant::now();
        for c in &chunks {
            let tx = client.transaction().await?;
            readings::insert_staged(&tx, c).await?;
            tx.commit().await?;
        }
        report(
            layout,
            "staged insert",
            total,
            started.elapsed(),
            Some(limit),
        );
        drop(client);

        let (_, pool) = fresh(layout).await?;
        let client = pool.get().await?;
        let started = Instant::now();
        for c in &chunks {
            readings::insert_unnest(&**client, c).await?;
        }
        report(
            layout,
            "unnest insert",
            total,
            started.elapsed(),
            Some(limit),
        );
        drop(client);

        // The whole writer, from Kafka.
        let (db, pool) = fresh(layout).await?;
        let kafka = ts::kafka().await;
        let producer = vitalwatch_bus::Producer::new(&kafka)?;
        let never = CancellationToken::new();
        let mut pending = futures_util::stream::FuturesUnordered::new();
        for b in &data {
            let (producer, topic, key, payload, never) = (
                producer.clone(),
                kafka.readings_topic.clone(),
                b.patient_id.clone(),
                b.encode(),
                never.clone(),
            );
            pending.push(async move {
                vitalwatch_bus::deliver(&producer, &topic, &key, &payload, None, None, &never).await
            });
            if pending.len() >= 1000 {
                use futures_util::StreamExt;
                if let Some(r) = pending.next().await {
                    r?;
                }
            }
        }
        use futures_util::StreamExt;
        while let Some(r) = pending.next().await {
            r?;
        }
        let cfg = WriterConfig {
            group_id: ts::unique("bench-writer"),
            batch_max_rows: batch_rows,
            ..WriterConfig::default()
        };
        let token = CancellationToken::new();
        let started = Instant::now();
        let writer = {
            let (cfg, kafka, db, token) = (cfg.clone(), kafka.clone(), db.clone(), token.clone());
            tokio::spawn(async move {
                vitalwatch_writer::run(&cfg, &kafka, &db, Readiness::new(), token).await
            })
        };
        let client = pool.get().await?;
        loop {
            let n: i64 = client
                .query_one("SELECT count(*) FROM readings", &[])
                .await?
                .get(0);
            if n as usize >= total {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(
                    format!("the writer stored only {n} of {total} rows in 10 minutes").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report(
            layout,
            "writer (kafka)",
            total,
            started.elapsed(),
            Some(limit),
        );
        token.cancel();
        writer.await??;
    }
    Ok(())
}
