//! The store against a real PostgreSQL: migrations, both storage layouts
//! (TimescaleDB where the server has it, native partitions always),
//! idempotent inserts, registry, and trend buckets checked against a
//! brute-force computation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::reading::{Batch, Measurement, Quality, Reading};
use vitalwatch_store::readings::{Rows, insert_unnest, write};
use vitalwatch_store::registry::{load_devices, register_device};
use vitalwatch_store::storage::{self, Layout, TimescaleMode};
use vitalwatch_store::{DatabaseConfig, migrate, trends};
use vitalwatch_test_support as ts;

fn native() -> DatabaseConfig {
    DatabaseConfig {
        timescaledb: TimescaleMode::Off,
        ..DatabaseConfig::default()
    }
}

/// The layouts this server can test: native always, TimescaleDB when it is
/// installed (else the test says so in its output).
async fn layouts() -> Vec<(Layout, DatabaseConfig)> {
    let mut all = vec![(Layout::Native, native())];
    match ts::timescaledb_available().await {
        Ok(()) => all.push((
            Layout::TimescaleDb,
            DatabaseConfig {
                timescaledb: TimescaleMode::Required,
                ..Default::default()
            },
        )),
        Err(why) => eprintln!("TimescaleDB layout NOT tested here: {why}"),
    }
    all
}

async fn insert_rows(db: &DatabaseConfig, rows: &Rows) -> u64 {
    let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
    let layout = storage::layout(&c).await.expect("layout");
    write(&mut c, layout, rows).await.expect("write")
}

async fn count(c: &vitalwatch_store::tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test]
async fn migrations_apply_once_even_when_run_concurrently() {
    let db = ts::database().await; // already migrated once
    let mut handles = Vec::new();
    for _ in 0..4 {
        let db = db.clone();
        handles.push(tokio::spawn(async move {
            let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
            migrate::migrate(&mut c, &db).await.expect("migrate")
        }));
    }
    for h in handles {
        assert_eq!(
            h.await.expect("join"),
            Vec::<i32>::new(),
            "nothing left to apply"
        );
    }
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    assert_eq!(
        migrate::current_version(&c).await.expect("version"),
        migrate::latest_version()
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM schema_migrations").await,
        migrate::MIGRATIONS.len() as i64
    );
}

#[tokio::test]
async fn a_fresh_database_migrates_concurrently_without_errors() {
    for (layout, cfg) in layouts().await {
        // An empty database by hand, so that four migrators race on it.
        let url = ts::empty_database().await;
        let mut applied = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..4 {
            let cfg = DatabaseConfig {
                url: url.clone(),
                ..cfg.clone()
            };
            handles.push(tokio::spawn(async move {
                let mut c = vitalwatch_store::connect(&cfg.url).await.expect("connect");
                migrate::migrate(&mut c, &cfg).await.expect("migrate")
            }));
        }
        for h in handles {
            applied.extend(h.await.expect("join"));
        }
        applied.sort_unstable();
        let all: Vec<i32> = migrate::MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(
            applied, all,
            "{layout}: each migration applied exactly once across the racers"
        );
        let c = vitalwatch_store::connect(&url).await.expect("connect");
        assert_eq!(storage::layout(&c).await.expect("layout"), layout);
        for table in [
            "patients",
            "devices",
            "device_assignments",
            "readings",
            "care_teams",
            "care_team_patients",
            "care_team_members",
            "thresholds",
            "alerts",
            "alert_events",
            "audit_log",
        ] {
            let exists: bool = c
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .expect("q")
                .get(0);
            assert!(exists, "{layout}: table {table}");
        }
    }
}

#[tokio::test]
async fn the_audit_log_is_append_only() {
    let db = ts::database().await;
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    c.execute("INSERT INTO audit_log (actor, action, patient_id, outcome) VALUES ('nurse-1', 'vitals.read', 'p-1', 'allowed')", &[])
        .await
        .expect("append");
    for sql in [
        "UPDATE audit_log SET actor = 'someone-else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let e = c.execute(sql, &[]).await.expect_err(sql);
        assert!(
            e.to_string().contains("append-only") || format!("{e:?}").contains("append-only"),
            "{sql}: {e:?}"
        );
    }
    assert_eq!(
        count(&c, "SELECT count(*) FROM audit_log WHERE actor = 'nurse-1'").await,
        1
    );
}

#[tokio::test]
async fn upgrading_a_version_2_database_keeps_its_readings_and_their_trends() {
    let now = Utc::now();
    let old = now - Duration::days(200);
    let mut trends_by_layout = Vec::new();
    for (layout, cfg) in layouts().await {
        let url = ts::empty_database().await;
        let cfg = DatabaseConfig { url, ..cfg };
        let mut c = vitalwatch_store::connect(&cfg.url).await.expect("connect");
        assert_eq!(
            migrate::migrate_to(&mut c, &cfg, 2).await.expect("to v2"),
            vec![1, 2]
        );
        // History in the v2 table: far older than any refresh policy looks back.
        for (i, at) in [
            old,
            old + Duration::minutes(7),
            old + Duration::hours(30),
            now - Duration::days(2),
        ]
        .iter()
        .enumerate()
        {
            c.execute(
                "INSERT INTO readings (time, patient_id, device_id, metric, value, unit, seq, received_at)
                 VALUES ($1, 'p', 'd', 'heart_rate', $2, '/min', 1, $1)",
                &[at, &(60.0 + i as f64)],
            )
            .await
            .expect("insert into the v2 table");
        }
        assert_eq!(
            migrate::migrate(&mut c, &cfg).await.expect("upgrade"),
            (3..=migrate::latest_version()).collect::<Vec<_>>(),
            "every migration after 2, once"
        );
        assert_eq!(storage::layout(&c).await.expect("layout"), layout);
        assert_eq!(
            count(&c, "SELECT count(*) FROM readings WHERE patient_id = 'p'").await,
            4,
            "{layout}"
        );
        if layout == Layout::TimescaleDb {
            // The refresh policies run as in production, moving the
            // real-time watermark up to now.
            for r in c
                .query("SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = 'policy_refresh_continuous_aggregate'
                         ORDER BY hypertable_name DESC", &[])
                .await
                .expect("jobs")
            {
                c.batch_execute(&format!("CALL run_job({})", r.get::<_, i32>(0))).await.expect("refresh job");
            }
        }
        let pool = vitalwatch_store::pool(&cfg).expect("pool");
        let client = pool.get().await.expect("client");
        let mut got = Vec::new();
        for bucket in [3600, 86_400] {
            let b = trends::buckets(
                &client,
                layout,
                "p",
                "heart_rate",
                old - Duration::days(1),
                now,
                bucket,
            )
            .await
            .expect("trend");
            got.push(
                b.iter()
                    .map(|b| (b.start, b.count, b.min, b.max))
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(
            got[1].iter().map(|b| b.1).sum::<i64>(),
            4,
            "{layout}: every moved reading is on the daily chart"
        );
        trends_by_layout.push((layout, got));
        // And the unique key still holds after the move.
        let mut rows = Rows::default();
        rows.push(&batch_at("p", "d", 1, &[(old, 60.0)]));
        assert_eq!(insert_rows(&cfg, &rows).await, 0, "{layout}");
    }
    for (layout, got) in &trends_by_layout[1..] {
        assert_eq!(
            got, &trends_by_layout[0].1,
            "{layout} gives the native layout's trends"
        );
    }
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .expect("time")
        + Duration::seconds(secs)
}

fn batch(patient: &str, device: &str, seq: u64, values: &[(i64, f64)]) -> Batch {
    batch_at(
        patient,
        device,
        seq,
        &values.iter().map(|(s, v)| (t(*s), *v)).collect::<Vec<_>>(),
    )
}

fn batch_at(patient: &str, device: &str, seq: u64, values: &[(DateTime<Utc>, f64)]) -> Batch {
    Batch {
        device_id: device.into(),
        patient_id: patient.into(),
        seq: Some(seq),
        received_at: t(100_000),
        readings: values
            .iter()
            .map(|(at, v)| Reading {
                metric: Metric::HeartRate,
                measurement: Measurement::Scalar(*v),
                measured_at: *at,
                quality: Quality::default(),
            })
            .collect(),
    }
}

#[tokio::test]
async fn inserting_the_same_rows_twice_changes_nothing() {
    for (layout, cfg) in layouts().await {
        let db = ts::database_with(cfg).await;
        let c = vitalwatch_store::connect(&db.url).await.expect("connect");
        let mut rows = Rows::default();
        rows.push(&batch("p", "d", 1, &[(0, 60.0), (1, 61.0)]));
        rows.push(&batch("p", "d", 2, &[(2, 62.0)]));
        // A record delivered twice within one batch is written once.
        rows.push(&batch("p", "d", 2, &[(2, 62.0)]));
        assert_eq!(insert_rows(&db, &rows).await, 3, "{layout}");
        assert_eq!(insert_rows(&db, &rows).await, 0, "{layout}: again");
        assert_eq!(
            insert_unnest(&c, &rows).await.expect("unnest"),
            0,
            "{layout}: the unnest path agrees"
        );
        // The same reading from another device is another reading.
        let mut other = Rows::default();
        other.push(&batch("p", "d2", 1, &[(0, 60.0)]));
        assert_eq!(insert_rows(&db, &other).await, 1, "{layout}");
        assert_eq!(
            count(&c, "SELECT count(*) FROM readings").await,
            4,
            "{layout}"
        );
    }
}

#[tokio::test]
async fn native_layout_makes_partitions_ahead_and_drops_them_for_retention() {
    let db = ts::database_with(DatabaseConfig {
        retain_days: 120,
        ..native()
    })
    .await;
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    let partitions =
        || async {
            let rows = c
            .query("SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'readings'::regclass ORDER BY 1", &[])
            .await
            .expect("partitions");
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        };
    // A day well away from today (migrate already made today's partitions).
    let now = Utc
        .with_ymd_and_hms(2027, 6, 15, 13, 0, 0)
        .single()
        .expect("now");
    let m = storage::maintain(&c, &db, now).await.expect("maintain");
    assert_eq!(m.created, 9, "yesterday, today and 7 days ahead");
    let made = partitions().await;
    assert!(
        made.contains(&"readings_p20270614".to_owned())
            && made.contains(&"readings_p20270622".to_owned()),
        "{made:?}"
    );
    assert!(!made.contains(&"readings_p20270623".to_owned()));
    assert_eq!(
        storage::maintain(&c, &db, now)
            .await
            .expect("again")
            .created,
        0
    );

    // A late reading 60 days back gets its partition on demand; concurrent
    // callers do not trip over each other.
    let old = now - Duration::days(60);
    let mut handles = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        handles.push(tokio::spawn(async move {
            let c = vitalwatch_store::connect(&url).await.expect("connect");
            storage::ensure_partitions(&c, old, old + Duration::hours(30))
                .await
                .expect("ensure")
        }));
    }
    let mut created = 0;
    for h in handles {
        created += h.await.expect("join");
    }
    assert_eq!(created, 2, "two days, each made once");
    let mut rows = Rows::default();
    rows.push(&batch_at("p", "d", 1, &[(old, 70.0), (now, 71.0)]));
    assert_eq!(insert_rows(&db, &rows).await, 2);
    assert_eq!(
        partitions().await.len(),
        made.len() + 2,
        "a write creates only its own days' partitions"
    );

    // 100 days later the 60-day-old partitions are past 120 days (cutoff
    // 2027-05-26): dropped, with their row; the newer ones stay.
    let later = storage::maintain(&c, &db, now + Duration::days(100))
        .await
        .expect("retention");
    assert!(
        later.dropped.contains(&"readings_p20270416".to_owned())
            && later.dropped.contains(&"readings_p20270417".to_owned())
    );
    assert!(
        later
            .dropped
            .iter()
            .all(|p| p.as_str() < "readings_p20270526"),
        "{:?}",
        later.dropped
    );
    assert!(
        partitions()
            .await
            .contains(&"readings_p20270614".to_owned())
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM readings").await,
        1,
        "the recent reading stays"
    );
    // The attached partitions carry the unique key.
    let mut again = Rows::default();
    again.push(&batch_at("p", "d", 1, &[(now, 71.0)]));
    assert_eq!(insert_rows(&db, &again).await, 0);
}

#[tokio::test]
async fn timescaledb_layout_has_hypertable_aggregates_compression_and_retention() {
    if let Err(why) = ts::timescaledb_available().await {
        eprintln!(
            "SKIPPED: TimescaleDB is not available on the test PostgreSQL ({why}); the native layout is tested instead"
        );
        return;
    }
    let cfg = DatabaseConfig {
        timescaledb: TimescaleMode::Required,
        compress_after_days: 7,
        retain_days: 730,
        ..Default::default()
    };
    let db = ts::database_with(cfg).await;
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    assert_eq!(
        storage::layout(&c).await.expect("layout"),
        Layout::TimescaleDb
    );
    assert_eq!(count(&c, "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'readings'").await, 1);
    let aggs = c
        .query(
            "SELECT view_name::text, materialized_only FROM timescaledb_information.continuous_aggregates ORDER BY 1",
            &[],
        )
        .await
        .expect("aggregates");
    let aggs: Vec<(String, bool)> = aggs.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        aggs,
        vec![
            ("readings_1d".into(), false),
            ("readings_1h".into(), false),
            ("readings_5m".into(), false)
        ],
        "real-time continuous aggregates"
    );
    let segmentby: Vec<String> = c
        .query(
            "SELECT attname::text FROM timescaledb_information.compression_settings
              WHERE hypertable_name = 'readings' AND segmentby_column_index IS NOT NULL ORDER BY segmentby_column_index",
            &[],
        )
        .await
        .expect("compression settings")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(segmentby, ["patient_id", "metric"]);
    let job = |proc: &'static str| {
        let c = &c;
        async move {
            c.query(
                "SELECT job_id, config::text FROM timescaledb_information.jobs WHERE proc_name = $1 ORDER BY hypertable_name",
                &[&proc],
            )
            .await
            .expect("jobs")
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        job("policy_refresh_continuous_aggregate").await.len(),
        3,
        "a refresh policy per aggregate"
    );
    let compression = job("policy_compression").await;
    assert!(
        compression.len() == 1 && compression[0].1.contains("7 days"),
        "{compression:?}"
    );
    let retention = job("policy_retention").await;
    assert!(
        retention.len() == 1 && retention[0].1.contains("730 days"),
        "{retention:?}"
    );

    // The policies do their work (run here, not left to the scheduler).
    let now = Utc::now();
    let (recent, week_old, ancient) = (
        now - Duration::hours(1),
        now - Duration::days(10),
        now - Duration::days(800),
    );
    let mut rows = Rows::default();
    rows.push(&batch_at(
        "p",
        "d",
        1,
        &[(recent, 70.0), (week_old, 71.0), (ancient, 72.0)],
    ));
    assert_eq!(insert_rows(&db, &rows).await, 3);
    c.batch_execute(&format!("CALL run_job({})", compression[0].0))
        .await
        .expect("compression job");
    let compressed = c
        .query_one(
            "SELECT count(*) FILTER (WHERE is_compressed AND range_end <= now() - interval '7 days'),
                    count(*) FILTER (WHERE is_compressed AND range_end > now() - interval '7 days')
               FROM timescaledb_information.chunks WHERE hypertable_name = 'readings'",
            &[],
        )
        .await
        .expect("chunks");
    assert_eq!(
        (compressed.get::<_, i64>(0), compressed.get::<_, i64>(1)),
        (2, 0),
        "old chunks compressed, the recent one not"
    );
    // A duplicate landing in a compressed chunk is still a no-op.
    assert_eq!(insert_rows(&db, &rows).await, 0);
    c.batch_execute(&format!("CALL run_job({})", retention[0].0))
        .await
        .expect("retention job");
    assert_eq!(
        count(&c, "SELECT count(*) FROM readings").await,
        2,
        "the 800-day-old reading is dropped"
    );

    // Changing the configuration replaces the policy at the next start.
    let changed = DatabaseConfig {
        compress_after_days: 14,
        retain_days: 0,
        ..db.clone()
    };
    let mut c2 = vitalwatch_store::connect(&db.url).await.expect("connect");
    migrate::migrate(&mut c2, &changed)
        .await
        .expect("migrate again");
    let compression = job("policy_compression").await;
    assert!(
        compression.len() == 1 && compression[0].1.contains("14 days"),
        "{compression:?}"
    );
    assert!(
        job("policy_retention").await.is_empty(),
        "retain_days = 0 removes the retention policy"
    );
}

/// 3 days of pseudo-random heart rate and blood pressure, from a fixed seed.
fn cohort_rows(
    first: i64,
    seconds: i64,
    n: usize,
    seed: u64,
) -> (Rows, Vec<(i64, &'static str, f64)>) {
    let mut x = seed;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut truth = Vec::new();
    let mut rows = Rows::default();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let s = first + (next() % seconds as u64) as i64;
        if !seen.insert(s) {
            continue;
        }
        let hr = 40.0 + (next() % 1000) as f64 / 10.0;
        let (sys, dia) = (90.0 + (next() % 80) as f64, 50.0 + (next() % 50) as f64);
        let mut b = batch("p", "d", 1, &[(s, hr)]);
        b.readings.push(Reading {
            metric: Metric::BloodPressure,
            measurement: Measurement::BloodPressure {
                systolic: sys,
                diastolic: dia,
            },
            measured_at: t(s),
            quality: Quality::default(),
        });
        rows.push(&b);
        truth.push((s, "heart_rate", hr));
        truth.push((s, "blood_pressure/systolic", sys));
        truth.push((s, "blood_pressure/diastolic", dia));
    }
    (rows, truth)
}

#[tokio::test]
async fn trend_buckets_equal_a_brute_force_computation_on_both_layouts() {
    for (layout, cfg) in layouts().await {
        let db = ts::database_with(cfg).await;
        let pool = vitalwatch_store::pool(&db).expect("pool");
        let c = vitalwatch_store::connect(&db.url).await.expect("connect");
        // Three days of readings, then (TimescaleDB) the aggregates are
        // materialized up to the end of day 2, then a tail arrives.
        let (rows, mut truth) = cohort_rows(0, 2 * 86_400, 3000, 0x9E37_79B9_7F4A_7C15);
        insert_rows(&db, &rows).await;
        if layout == Layout::TimescaleDb {
            for view in ["readings_5m", "readings_1h", "readings_1d"] {
                c.batch_execute(&format!(
                    "CALL refresh_continuous_aggregate('{view}', NULL, '{}')",
                    t(2 * 86_400).to_rfc3339()
                ))
                .await
                .expect("refresh");
            }
            // Each level holds materialized rows, so the aggregate path is the one exercised.
            for r in c
                .query("SELECT format('%I.%I', materialization_hypertable_schema, materialization_hypertable_name)
                          FROM timescaledb_information.continuous_aggregates", &[])
                .await
                .expect("aggregates")
            {
                let table: String = r.get(0);
                assert!(count(&c, &format!("SELECT count(*) FROM {table}")).await > 0, "{table} is materialized");
            }
            // The aggregates' own avg column, for direct readers, agrees with the raw rows.
            for (view, width) in [
                ("readings_5m", 300),
                ("readings_1h", 3600),
                ("readings_1d", 86_400),
            ] {
                let row = c
                    .query_one(
                        &format!(
                            "SELECT count(*) FILTER (WHERE abs(a.avg - r.avg) > 1e-9 * greatest(abs(r.avg), 1)), count(*)
                               FROM {view} a
                               JOIN (SELECT date_bin({width} * interval '1 second', time, timestamptz '1970-01-01') AS b,
                                            patient_id, metric, component, avg(value) AS avg
                                       FROM readings GROUP BY 1, 2, 3, 4) r
                                 ON r.b = a.bucket AND r.patient_id = a.patient_id AND r.metric = a.metric AND r.component = a.component"
                        ),
                        &[],
                    )
                    .await
                    .expect("avg check");
                let (off, matched): (i64, i64) = (row.get(0), row.get(1));
                assert!(matched > 0, "{view}: buckets compared");
                assert_eq!(off, 0, "{view}.avg");
            }
        }
        let (tail, tail_truth) = cohort_rows(2 * 86_400, 86_400, 1000, 0xDEAD_BEEF_CAFE_F00D);
        insert_rows(&db, &tail).await;
        truth.extend(tail_truth);
        let mut other = Rows::default();
        other.push(&batch("someone-else", "d9", 1, &[(10, 200.0)]));
        insert_rows(&db, &other).await;

        let client = pool.get().await.expect("client");
        let ranges = [
            (t(0), t(3 * 86_400)),
            (t(1799), t(2 * 86_400 + 4000)),
            (t(-86_400), t(5 * 86_400)),
            (t(3 * 3600 + 17), t(3 * 3600 + 400)),
        ];
        for bucket in [60_i64, 300, 900, 3600, 7200, 86_400] {
            for (from, to) in ranges {
                let hr = trends::buckets(&client, layout, "p", "heart_rate", from, to, bucket)
                    .await
                    .expect("buckets");
                let bp = trends::buckets(&client, layout, "p", "blood_pressure", from, to, bucket)
                    .await
                    .expect("buckets");
                let got: Vec<_> = hr
                    .iter()
                    .map(|b| ("heart_rate".to_owned(), b))
                    .chain(
                        bp.iter()
                            .map(|b| (format!("blood_pressure/{}", b.component), b)),
                    )
                    .collect();
                let mut want: BTreeMap<(String, i64), Vec<f64>> = BTreeMap::new();
                for (s, series, v) in &truth {
                    let time = t(*s);
                    if time >= from && time < to {
                        want.entry((
                            (*series).to_owned(),
                            time.timestamp().div_euclid(bucket) * bucket,
                        ))
                        .or_default()
                        .push(*v);
                    }
                }
                let ctx = format!("{layout}, bucket {bucket}, {from}..{to}");
                assert_eq!(got.len(), want.len(), "{ctx}");
                let mut got_sorted: Vec<_> = got
                    .iter()
                    .map(|(s, b)| ((s.clone(), b.start.timestamp()), *b))
                    .collect();
                got_sorted.sort_by(|a, b| a.0.cmp(&b.0));
                for ((key, g), (wkey, vs)) in got_sorted.iter().zip(&want) {
                    assert_eq!(key, wkey, "{ctx}");
                    assert_eq!(g.count, vs.len() as i64, "{ctx} {key:?}");
                    assert_eq!(
                        g.min,
                        vs.iter().copied().fold(f64::INFINITY, f64::min),
                        "{ctx} {key:?}"
                    );
                    assert_eq!(
                        g.max,
                        vs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                        "{ctx} {key:?}"
                    );
                    let avg = vs.iter().sum::<f64>() / vs.len() as f64;
                    assert!(
                        (g.avg - avg).abs() < 1e-9 * avg.abs().max(1.0),
                        "{ctx} {key:?}: {} vs {avg}",
                        g.avg
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn registry_tracks_assignment_history() {
    let db = ts::database().await;
    let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-1"), Some(t(0)))
        .await
        .expect("register");
    register_device(&mut c, "scale-1", "scale", None, None)
        .await
        .expect("register unassigned");
    let d = load_devices(&c).await.expect("devices");
    assert_eq!(d["cuff-1"].current_patient(), Some("p-1"));
    assert_eq!(d["cuff-1"].kind, "bp_cuff");
    assert!(d["scale-1"].assignments.is_empty());
    assert!(d["scale-1"].active);

    // Registering again is a no-op; moving the device closes the old assignment at the hand-over.
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-1"), Some(t(50)))
        .await
        .expect("again");
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-2"), Some(t(100)))
        .await
        .expect("move");
    let d = load_devices(&c).await.expect("devices");
    let cuff = &d["cuff-1"];
    assert_eq!(cuff.assignments.len(), 2);
    assert_eq!(cuff.patient_at(t(99)), Some("p-1"));
    assert_eq!(cuff.patient_at(t(100)), Some("p-2"));
    assert_eq!(cuff.patient_at(t(-1)), None);
    // A hand-over cannot be dated before the assignment it ends.
    assert!(
        register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(10)))
            .await
            .is_err()
    );
    assert!(
        register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(100)))
            .await
            .is_err(),
        "a zero-length period"
    );
    // A returned device (closed by hand) cannot be given out inside its last period.
    c.execute("UPDATE device_assignments SET unassigned_at = $1 WHERE device_id = 'cuff-1' AND unassigned_at IS NULL", &[&t(200)])
        .await
        .expect("return the device");
    assert!(
        register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(150)))
            .await
            .is_err(),
        "overlap"
    );
    register_device(&mut c, "cuff-1", "bp_cuff", Some("p-3"), Some(t(200)))
        .await
        .expect("after the return");
    let d = load_devices(&c).await.expect("devices");
    assert_eq!(d["cuff-1"].patient_at(t(199)), Some("p-2"));
    assert_eq!(d["cuff-1"].patient_at(t(200)), Some("p-3"));

    c.execute(
        "UPDATE devices SET active = false WHERE device_id = 'cuff-1'",
        &[],
    )
    .await
    .expect("deactivate");
    assert!(!load_devices(&c).await.expect("devices")["cuff-1"].active);
    assert!(
        register_device(&mut c, "bad/id", "x", None, None)
            .await
            .is_err(),
        "MQTT wildcards and separators are refused"
    );
}

#[tokio::test]
async fn registry_changes_are_notified() {
    let db = ts::database().await;
    let (client, mut conn) =
        vitalwatch_store::tokio_postgres::connect(&db.url, vitalwatch_store::tokio_postgres::NoTls)
            .await
            .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(futures_util::stream::poll_fn(
            move |cx| conn.poll_message(cx)
        ));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let vitalwatch_store::tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.channel().to_owned());
            }
        }
    });
    client
        .batch_execute("LISTEN vitalwatch_registry")
        .await
        .expect("listen");
    let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
    register_device(&mut c, "ox-1", "pulse_oximeter", Some("p-9"), None)
        .await
        .expect("register");
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("notified in time");
    assert_eq!(
        got.as_deref(),
        Some(vitalwatch_store::registry::CHANGE_CHANNEL)
    );
}

#[tokio::test]
async fn the_alert_lifecycle_is_idempotent_with_one_open_alert_per_patient_and_rule() {
    use vitalwatch_store::alerts::{NewAlert, raise, resolve, update_severity};
    let db = ts::database().await;
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    let a = NewAlert {
        alert_id: "a1",
        patient_id: "p",
        rule: "spo2_low",
        severity: "medium",
        episode_start: t(0),
        raised_at: t(300),
        news2_score: None,
        detail: serde_json::json!({"value": 88.0}),
    };
    assert!(raise(&c, &a).await.expect("raise"));
    assert!(
        !raise(&c, &a).await.expect("replay"),
        "the same alert again changes nothing"
    );
    // Another id for the same patient and rule while one is open: refused.
    assert!(
        !raise(
            &c,
            &NewAlert {
                alert_id: "a2",
                episode_start: t(60),
                ..a.clone()
            }
        )
        .await
        .expect("second open")
    );
    // Another rule is another alert.
    assert!(
        raise(
            &c,
            &NewAlert {
                alert_id: "b1",
                rule: "news2",
                severity: "medium",
                ..a.clone()
            }
        )
        .await
        .expect("other rule")
    );
    assert!(
        update_severity(&c, "b1", "high", t(400), Some(8))
            .await
            .expect("escalate")
    );
    assert!(
        !update_severity(&c, "b1", "high", t(400), Some(8))
            .await
            .expect("again")
    );
    // Two changes at one event time are both kept, in order.
    assert!(
        update_severity(&c, "b1", "medium", t(400), Some(6))
            .await
            .expect("down again")
    );
    assert!(resolve(&c, "a1", t(900), None, None).await.expect("clear"));
    assert!(
        !resolve(&c, "a1", t(900), None, None)
            .await
            .expect("clear again")
    );
    assert!(
        !update_severity(&c, "a1", "high", t(950), None)
            .await
            .expect("resolved alerts stay")
    );
    // An episode overlapping the resolved one's stretch (t(0) to t(900))
    // under another identity is the same stretch: not raised again.
    assert!(
        !raise(
            &c,
            &NewAlert {
                alert_id: "a1-again",
                episode_start: t(600),
                raised_at: t(700),
                ..a.clone()
            }
        )
        .await
        .expect("overlapping")
    );
    // Once resolved, a new episode opens a new alert.
    assert!(
        raise(
            &c,
            &NewAlert {
                alert_id: "a3",
                episode_start: t(1000),
                raised_at: t(1300),
                ..a.clone()
            }
        )
        .await
        .expect("new episode")
    );
    let events: Vec<(String, String)> = c
        .query(
            "SELECT alert_id, state FROM alert_events ORDER BY alert_id, id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want = [
        ("a1", "raised"),
        ("a1", "resolved"),
        ("a3", "raised"),
        ("b1", "raised"),
        ("b1", "updated"),
        ("b1", "updated"),
    ];
    assert_eq!(events, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
    let open: i64 = c
        .query_one("SELECT count(*) FROM alerts WHERE state <> 'resolved'", &[])
        .await
        .expect("open")
        .get(0);
    assert_eq!(open, 2);
    let severity: String = c
        .query_one("SELECT severity FROM alerts WHERE alert_id = 'b1'", &[])
        .await
        .expect("b1")
        .get(0);
    assert_eq!(severity, "medium", "the row and its last event agree");
}

#[tokio::test]
async fn escalation_acknowledgement_and_the_outbox() {
    use vitalwatch_store::alerts::{
        NewAlert, acknowledge, escalate, events_between, last_seq, lock_unpublished,
        mark_published, open_for, raise, sequence,
    };
    let db = ts::database().await;
    let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
    let new = |id: &'static str, patient: &'static str| NewAlert {
        alert_id: id,
        patient_id: patient,
        rule: "spo2_low",
        severity: "medium",
        episode_start: t(0),
        raised_at: t(300),
        news2_score: None,
        detail: serde_json::json!({}),
    };
    assert!(raise(&c, &new("a", "p1")).await.expect("raise a"));
    assert!(raise(&c, &new("b", "p2")).await.expect("raise b"));
    // Nobody acknowledged either for 10 minutes (wall clock).
    c.execute(
        "UPDATE alerts SET opened_at = now() - interval '10 minutes'",
        &[],
    )
    .await
    .expect("age");
    assert!(
        acknowledge(&c, "b", "nurse-1", Some("called the patient"))
            .await
            .expect("ack")
    );
    assert!(
        !acknowledge(&c, "b", "nurse-2", None)
            .await
            .expect("ack twice"),
        "acknowledged once"
    );
    let five = std::time::Duration::from_secs(300);
    assert_eq!(
        escalate(&c, five, 2).await.expect("escalate"),
        1,
        "only the unacknowledged one"
    );
    assert_eq!(
        escalate(&c, five, 2).await.expect("again"),
        1,
        "10 minutes: level 2 is due too"
    );
    assert_eq!(
        escalate(&c, five, 2).await.expect("again"),
        0,
        "the highest level is 2"
    );
    let level: i16 = c
        .query_one(
            "SELECT escalation_level FROM alerts WHERE alert_id = 'a'",
            &[],
        )
        .await
        .expect("level")
        .get(0);
    assert_eq!(level, 2);
    assert_eq!(
        escalate(&c, std::time::Duration::from_secs(3600), 5)
            .await
            .expect("later"),
        0,
        "level 3 would be due after 3 hours"
    );
    let open = open_for(&c, "p2").await.expect("open");
    assert_eq!((open.len(), open[0].state.as_str()), (1, "acknowledged"));

    // Nothing is read before it is sequenced.
    let tx = c.transaction().await.expect("tx");
    assert!(
        lock_unpublished(&tx, 100)
            .await
            .expect("unsequenced")
            .is_empty()
    );
    assert_eq!(last_seq(&tx).await.expect("seq"), 0);
    drop(tx);
    assert_eq!(sequence(&mut c).await.expect("sequence"), 5);
    assert_eq!(
        sequence(&mut c).await.expect("again"),
        0,
        "each change once"
    );
    // The outbox: every change, in order, then nothing once published.
    let tx = c.transaction().await.expect("tx");
    let events = lock_unpublished(&tx, 100).await.expect("unpublished");
    let states: Vec<(&str, &str, i16)> = events
        .iter()
        .map(|e| (e.alert_id.as_str(), e.state.as_str(), e.escalation_level))
        .collect();
    assert_eq!(
        states,
        [
            ("a", "raised", 0),
            ("b", "raised", 0),
            ("b", "acknowledged", 0),
            ("a", "escalated", 1),
            ("a", "escalated", 2)
        ]
    );
    assert_eq!(events[2].actor.as_deref(), Some("nurse-1"));
    assert_eq!(events[2].note.as_deref(), Some("called the patient"));
    assert!(
        events
            .windows(2)
            .all(|w| w[0].id < w[1].id && w[0].seq + 1 == w[1].seq)
    );
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(mark_published(&tx, &ids).await.expect("mark"), 5);
    tx.commit().await.expect("commit");
    let tx = c.transaction().await.expect("tx");
    assert!(
        lock_unpublished(&tx, 100)
            .await
            .expect("none left")
            .is_empty()
    );
    drop(tx);
    // A stream resumes after any seq, filtered to some patients.
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let upto = last_seq(&c).await.expect("last");
    assert_eq!(upto, seqs[4]);
    let p2 = ["p2".to_owned()];
    let after: Vec<String> = events_between(&c, seqs[0], upto, Some(&p2), 10)
        .await
        .expect("after")
        .into_iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(after, ["raised", "acknowledged"]);
    assert!(
        events_between(&c, seqs[4], upto, None, 10)
            .await
            .expect("none")
            .is_empty()
    );
}

#[tokio::test]
async fn a_change_committed_late_is_sequenced_after_those_already_read() {
    use vitalwatch_store::alerts::{NewAlert, events_between, last_seq, raise, sequence};
    let db = ts::database().await;
    let mut c = vitalwatch_store::connect(&db.url).await.expect("connect");
    let mut slow = vitalwatch_store::connect(&db.url).await.expect("connect");
    let new = |id: &'static str| NewAlert {
        alert_id: id,
        patient_id: "p",
        rule: id,
        severity: "medium",
        episode_start: t(0),
        raised_at: t(0),
        news2_score: None,
        detail: serde_json::json!({}),
    };
    // A slow transaction inserts a change (the lower id) and has not committed...
    let late = slow.transaction().await.expect("tx");
    assert!(raise(&late, &new("first")).await.expect("raise"));
    // ...while a later change commits, is sequenced and read.
    assert!(raise(&c, &new("second")).await.expect("raise"));
    sequence(&mut c).await.expect("sequence");
    let upto = last_seq(&c).await.expect("last");
    let read: Vec<String> = events_between(&c, 0, upto, None, 10)
        .await
        .expect("read")
        .into_iter()
        .map(|e| e.alert_id)
        .collect();
    assert_eq!(read, ["second"]);
    // The slow one commits: it comes after what was read, not lost before it.
    late.commit().await.expect("commit");
    sequence(&mut c).await.expect("sequence");
    let more: Vec<String> = events_between(&c, upto, last_seq(&c).await.expect("last"), None, 10)
        .await
        .expect("more")
        .into_iter()
        .map(|e| e.alert_id)
        .collect();
    assert_eq!(more, ["first"]);
}

#[tokio::test]
async fn a_patients_history_comes_back_as_readings_with_panels_whole() {
    use vitalwatch_store::readings::history;
    let db = ts::database().await;
    let c = vitalwatch_store::connect(&db.url).await.expect("connect");
    let layout = storage::layout(&c).await.expect("layout");
    let now = Utc.timestamp_opt(Utc::now().timestamp() - 3600, 0).unwrap();
    let reading = |metric, m: i64, measurement| Reading {
        metric,
        measurement,
        measured_at: now + Duration::minutes(m),
        quality: Quality::default(),
    };
    let batch = Batch {
        device_id: "d".into(),
        patient_id: "p".into(),
        seq: None,
        received_at: Utc::now(),
        readings: vec![
            reading(Metric::Spo2, 0, Measurement::Scalar(91.0)),
            reading(
                Metric::BloodPressure,
                1,
                Measurement::BloodPressure {
                    systolic: 150.0,
                    diastolic: 90.0,
                },
            ),
            Reading {
                quality: Quality::MOTION_ARTIFACT,
                ..reading(Metric::Spo2, 2, Measurement::Scalar(80.0))
            },
            reading(
                Metric::Consciousness,
                3,
                Measurement::Consciousness(vitalwatch_core::catalogue::Acvpu::Voice),
            ),
            reading(Metric::HeartRate, 4, Measurement::Scalar(70.0)),
            reading(Metric::Spo2, -120, Measurement::Scalar(99.0)),
        ],
    };
    let mut rows = Rows::default();
    rows.push(&batch);
    let mut c = c;
    write(&mut c, layout, &rows).await.expect("write");
    let since = [
        (Metric::Spo2, now - Duration::minutes(30)),
        (Metric::BloodPressure, now - Duration::minutes(30)),
        (Metric::Consciousness, now - Duration::minutes(30)),
    ];
    let end = now + Duration::minutes(10);
    let got = history(&c, "p", &since, end, 1000).await.expect("history");
    // Heart rate was not asked for; the SpO2 of two hours before is older than asked.
    let want: Vec<Reading> = batch.readings[..4].to_vec();
    assert_eq!(got, want);
    // The limit keeps each metric's newest rows.
    let newest = history(&c, "p", &since[..1], end, 1)
        .await
        .expect("limited");
    assert_eq!(newest, batch.readings[2..3].to_vec());
    let each = history(&c, "p", &[since[0], since[2]], end, 1)
        .await
        .expect("limited per metric");
    assert_eq!(each, batch.readings[2..4].to_vec());
    // Nothing after `until`: the newest SpO2 up to minute 1 is minute 0's.
    let before = history(&c, "p", &since[..1], now + Duration::minutes(1), 1)
        .await
        .expect("until");
    assert_eq!(before, batch.readings[..1].to_vec());
    assert!(
        history(&c, "other", &since, end, 1000)
            .await
            .expect("other")
            .is_empty()
    );
}
