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
//! Then the same databases through the API over HTTP, as dashboards use it:
//! BENCH_API_CLIENTS concurrent clients (default 16) for BENCH_API_SECONDS
//! (default 20), each asking in turn for a random patient's 30-day hourly
//! trend and latest vitals, authenticated, scoped and audited like any
//! nurse's request; p50/p99 per route and requests per second.
//!
//! `deploy/local/bench --bench trend_latency`
//! (environment: BENCH_TREND_ROWS, BENCH_TREND_PATIENTS, BENCH_QUERIES
//! (default 200), BENCH_RELOAD=1 to refill, BENCH_API_CLIENTS,
//! BENCH_API_SECONDS)

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
    let clients = env("BENCH_API_CLIENTS", 16).max(1);
    let seconds = env("BENCH_API_SECONDS", 20).max(1) as u64;
    println!(
        "Through the API (HTTP on 127.0.0.1, bearer token, care-team scope, audit row per request), \
         {clients} concurrent clients for {seconds} s:"
    );
    for (layout, (cfg, until)) in &dbs {
        through_api(
            *layout,
            cfg,
            *until,
            patients,
            clients,
            Duration::from_secs(seconds),
        )
        .await?;
    }
    println!("Store only (one connection, one query at a time):");
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

const SECRET: &str = "the-bench-shared-secret-at-least-32-bytes";

/// Dashboards through the API: concurrent clients asking for 30-day hourly
/// trends and latest vitals.
async fn through_api(
    layout: Layout,
    cfg: &DatabaseConfig,
    until: DateTime<Utc>,
    patients: usize,
    clients: usize,
    run_for: Duration,
) -> Result<(), Error> {
    let mut c = vitalwatch_store::connect(&cfg.url).await?;
    vitalwatch_store::migrate::migrate(&mut c, cfg).await?;
    // Every bench patient on one team, whose nurse the clients are.
    c.execute(
        "INSERT INTO patients (patient_id)
              SELECT 'bench-pat-' || lpad(g::text, 5, '0') FROM generate_series(0, $1::int - 1) g
         ON CONFLICT DO NOTHING",
        &[&(patients as i32)],
    )
    .await?;
    c.batch_execute(
        "INSERT INTO care_teams (team_id, name) VALUES ('bench', 'bench') ON CONFLICT DO NOTHING;
         INSERT INTO care_team_members (team_id, subject) VALUES ('bench', 'bench-nurse') ON CONFLICT DO NOTHING;",
    )
    .await?;
    c.execute(
        "INSERT INTO care_team_patients (team_id, patient_id)
              SELECT 'bench', 'bench-pat-' || lpad(g::text, 5, '0') FROM generate_series(0, $1::int - 1) g
         ON CONFLICT DO NOTHING",
        &[&(patients as i32)],
    )
    .await?;
    let auth_cfg = vitalwatch_api::auth::AuthConfig {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let state = vitalwatch_api::AppState::new(
        vitalwatch_store::pool(&DatabaseConfig {
            pool_size: clients.max(8),
            ..cfg.clone()
        })?,
        vitalwatch_api::telemetry::metrics_handle(),
        10_000,
        vitalwatch_core::health::Readiness::new(),
    )
    .with_auth(vitalwatch_api::auth::Authenticator::new(&auth_cfg)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(
                listener,
                vitalwatch_api::app(state)
                    .into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        })
    };
    let token = vitalwatch_api::auth::mint_local(
        &auth_cfg,
        "bench-nurse",
        &["nurse".into()],
        chrono::Duration::hours(1),
    )?;
    let to = until - chrono::Duration::minutes(17);
    let from = to - chrono::Duration::days(30);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let deadline = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (http, token) = (http.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (k as u64 + 1);
            let (mut trend, mut latest) = (Vec::new(), Vec::new());
            let mut i = 0u64;
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let patient = format!("bench-pat-{:05}", x as usize % patients);
                let url = if i.is_multiple_of(2) {
                    format!(
                        "http://{addr}/v1/patients/{patient}/vitals?metric=heart_rate&bucket=1h&from={}&to={}",
                        from.format("%Y-%m-%dT%H:%M:%SZ"),
                        to.format("%Y-%m-%dT%H:%M:%SZ")
                    )
                } else {
                    format!("http://{addr}/v1/patients/{patient}/latest")
                };
                let started = Instant::now();
                let resp = http.get(&url).bearer_auth(&token).send().await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp.bytes().await.map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("{url}: {status}: {}", String::from_utf8_lossy(&body)));
                }
                if i.is_multiple_of(2) { trend.push(started.elapsed()) } else { latest.push(started.elapsed()) }
                i += 1;
            }
            Ok::<_, String>((trend, latest))
        }));
    }
    let (mut trend, mut latest) = (Vec::new(), Vec::new());
    for t in tasks {
        let (a, b) = t.await??;
        trend.extend(a);
        latest.extend(b);
    }
    stop.cancel();
    let _ = server.await;
    for (what, mut times) in [("30-day hourly trend", trend), ("latest vitals", latest)] {
        times.sort_unstable();
        println!(
            "{:<34} {what:<20} {:>6} requests ({:>6.0}/s): p50 {:>7.2} ms  p99 {:>7.2} ms",
            format!("{layout}"),
            times.len(),
            times.len() as f64 / run_for.as_secs_f64(),
            pct(&times, 0.50),
            pct(&times, 0.99)
        );
    }
    Ok(())
}
