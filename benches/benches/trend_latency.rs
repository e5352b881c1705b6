//! A 30-day hourly trend for one patient on a table of BENCH_TREND_ROWS
//! readings (default 50 million), p50/p99 latency, on the native layout and
//! (where the server has it) on TimescaleDB, through the same
//! `vitalwatch_store::trends::buckets` the API calls.
//!
//! The loader fills a database per layout once (`vw_bench_trend_native`,
//! `vw_bench_trend_timescaledb`) and reuses it on later runs while it has
//! enough rows: BENCH_TREND_PATIENTS patients (default 2,000), each with a
//! wearable sending heart rate evenly over the last 30 days, loaded in time
//! order as a live system would receive them. On TimescaleDB the aggregates
//! are then refreshed and chunks older than 7 days compressed, as the
//! policies would have done.
//!
//! `deploy/local/bench --bench trend_latency`
//! (environment: BENCH_TREND_ROWS, BENCH_TREND_PATIENTS, BENCH_QUERIES
//! (default 200), BENCH_RELOAD=1 to refill)

use std::time::{Duration, Instant};
use vitalwatch_benches::env;

use chrono::{DateTime, DurationRound, Utc};
use vitalwatch_store::DatabaseConfig;
use vitalwatch_store::readings::{COLUMN_TYPES, COLUMNS, Rows};
use vitalwatch_store::storage::{self, Layout, TimescaleMode};
use vitalwatch_store::tokio_postgres::binary_copy::BinaryCopyInWriter;
use vitalwatch_store::trends;
use vitalwatch_test_support as ts;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

/// The bench database of `layout`, filled with at least `rows` readings.
async fn filled(
    layout: Layout,
    rows: usize,
    patients: usize,
) -> Result<(DatabaseConfig, DateTime<Utc>), Error> {
    let name = format!("vw_bench_trend_{layout}");
    let admin = vitalwatch_store::connect(&ts::admin_database_url()).await?;
    let base = ts::admin_database_url()
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .ok_or("database URL without /dbname")?;
    let mode = if layout == Layout::TimescaleDb {
        TimescaleMode::Required
    } else {
        TimescaleMode::Off
    };
    let cfg = DatabaseConfig {
        url: format!("{base}/{name}"),
        timescaledb: mode,
        ..Default::default()
    };
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&name],
        )
        .await?
        .get(0);
    if exists && std::env::var("BENCH_RELOAD").is_err() {
        let c = vitalwatch_store::connect(&cfg.url).await?;
        if let Ok(r) = c
            .query_one("SELECT rows, loaded_until FROM bench_fill", &[])
            .await
            && r.get::<_, i64>(0) as usize >= rows
        {
            println!("{layout}: reusing {name} ({} rows)", r.get::<_, i64>(0));
            return Ok((cfg, r.get(1)));
        }
    }
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let mut c = vitalwatch_store::connect(&cfg.url).await?;
    vitalwatch_store::migrate::migrate(&mut c, &cfg).await?;
    // Only the loader writes here: no background policy runs mid-load.
    if layout == Layout::TimescaleDb {
        c.batch_execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs WHERE job_id >= 1000")
            .await?;
    }
    let until = Utc::now().duration_trunc(chrono::Duration::hours(1))?;
    let from = until - chrono::Duration::days(30);
    if layout == Layout::Native {
        storage::ensure_partitions(&c, from, until).await?;
    }

    let per_patient = rows.div_ceil(patients);
    let step_ms = (30 * 86_400_000 / per_patient as i64).max(1);
    let patient_ids: Vec<String> = (0..patients).map(|p| format!("bench-pat-{p:05}")).collect();
    let device_ids: Vec<String> = (0..patients).map(|p| format!("bench-dev-{p:05}")).collect();
    let started = Instant::now();
    let mut loaded = 0usize;
    let mut k = 0usize;
    while k < per_patient {
        // About a million rows per COPY, in time order.
        let steps = (1_000_000 / patients).max(1).min(per_patient - k);
        let mut chunk = Rows::default();
        for s in k..k + steps {
            let base_t = from + chrono::Duration::milliseconds(step_ms * s as i64);
            for p in 0..patients {
                let t = base_t + chrono::Duration::milliseconds((p as i64 * 7919) % step_ms);
                let v = 60.0 + ((s * 31 + p * 17) % 400) as f64 / 10.0;
                chunk.push_row(
                    t,
                    &patient_ids[p],
                    &device_ids[p],
                    "heart_rate",
                    "",
                    v,
                    "/min",
                    Some(s as i64),
                    0,
                    t,
                );
            }
        }
        let tx = c.transaction().await?;
        let sink = tx
            .copy_in(&format!("COPY readings ({COLUMNS}) FROM STDIN BINARY"))
            .await?;
        loaded += chunk
            .copy_into(BinaryCopyInWriter::new(sink, COLUMN_TYPES))
            .await? as usize;
        tx.commit().await?;
        k += steps;
        if loaded % 10_000_000 < chunk.len() {
            println!(
                "{layout}: {loaded} rows loaded, {:.0} rows/s",
                loaded as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "{layout}: loaded {loaded} rows in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if layout == Layout::TimescaleDb {
        let t = Instant::now();
        for view in ["readings_5m", "readings_1h", "readings_1d"] {
            c.batch_execute(&format!(
                "CALL refresh_continuous_aggregate('{view}', NULL, '{}')",
                until.to_rfc3339()
            ))
            .await?;
        }
        println!(
            "{layout}: aggregates refreshed in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        c.batch_execute("SELECT count(compress_chunk(ch, if_not_compressed => true)) FROM show_chunks('readings', older_than => interval '7 days') ch")
            .await?;
        let size: String = c
            .query_one("SELECT pg_size_pretty(hypertable_size('readings'))", &[])
            .await?
            .get(0);
        println!(
            "{layout}: chunks older than 7 days compressed in {:.0} s; hypertable now {size}",
            t.elapsed().as_secs_f64()
        );
    } else {
        let size: String = c
            .query_one(
                "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits WHERE inhparent = 'readings'::regclass",
                &[],
            )
            .await?
            .get(0);
        println!("{layout}: partitions total {size}");
    }
    c.batch_execute("VACUUM ANALYZE").await?;
    c.batch_execute("CREATE TABLE bench_fill (rows bigint, loaded_until timestamptz)")
        .await?;
    c.execute(
        "INSERT INTO bench_fill VALUES ($1, $2)",
        &[&(loaded as i64), &until],
    )
    .await?;
    Ok((cfg, until))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn measure(
    label: &str,
    cfg: &DatabaseConfig,
    layout: Layout,
    until: DateTime<Utc>,
    patients: usize,
    queries: usize,
) -> Result<(), Error> {
    let pool = vitalwatch_store::pool(cfg)?;
    let client = pool.get().await?;
    // A dashboard's "last 30 days, hourly": to = the newest data, not aligned.
    let to = until - chrono::Duration::minutes(17);
    let from = to - chrono::Duration::days(30);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut times = Vec::with_capacity(queries);
    let mut buckets = 0;
    for i in 0..queries + 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let patient = format!("bench-pat-{:05}", x as usize % patients);
        let started = Instant::now();
        let b = trends::buckets(&client, layout, &patient, "heart_rate", from, to, 3600).await?;
        let took = started.elapsed();
        if i >= 10 {
            // The first ten warm the cache and the statement cache.
            times.push(took);
            buckets = b.len();
        }
        if b.is_empty() {
            return Err(format!("{label}: no buckets for {patient}").into());
        }
    }
    times.sort_unstable();
    let mean = times.iter().map(Duration::as_secs_f64).sum::<f64>() / times.len() as f64 * 1000.0;
    println!(
        "{label:<34} {queries} queries: p50 {:>7.2} ms  p99 {:>7.2} ms  mean {mean:>7.2} ms  ({buckets} buckets each)",
        pct(&times, 0.50),
        pct(&times, 0.99)
    );
    Ok(())
}

async fn run() -> Result<(), Error> {
    let rows = env("BENCH_TREND_ROWS", 50_000_000);
    let patients = env("BENCH_TREND_PATIENTS", 2000).max(1);
    let queries = env("BENCH_QUERIES", 200).max(1);
    let mut layouts = vec![Layout::Native];
    match ts::timescaledb_available().await {
        Ok(()) => layouts.push(Layout::TimescaleDb),
        Err(why) => println!("TimescaleDB not measured: {why}"),
    }
    let mut dbs = Vec::new();
    for layout in layouts {
        dbs.push((layout, filled(layout, rows, patients).await?));
    }
    println!("30-day hourly trend of one of {patients} patients, {rows} readings in the table:");
    for (layout, (cfg, until)) in &dbs {
        measure(
            &format!("{layout}"),
            cfg,
            *layout,
            *until,
            patients,
            queries,
        )
        .await?;
        if *layout == Layout::TimescaleDb {
            // The same hypertable read without the aggregates.
            measure(
                "timescaledb, raw rows (no aggregate)",
                cfg,
                Layout::Native,
                *until,
                patients,
                queries,
            )
            .await?;
        }
    }
    Ok(())
}
