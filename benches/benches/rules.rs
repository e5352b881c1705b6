//! criterion: judging readings by the rules engine, with no I/O.
//! - one rule through the event-time `Series`, for a wearable streaming
//!   SpO2 every 5 seconds: in order (stepped from the series' tip), and with
//!   one reading in ten arriving 30 s late (a full replay of the horizon,
//!   10 minutes or 1 hour);
//! - the whole engine with the default rule set (10 rules), 1,000 patients
//!   each uploading 5 s of heart rate and SpO2 at a time, per reading;
//! - one NEWS2 score.
//!
//! `cargo bench -p vitalwatch-benches --bench rules`

use std::hint::black_box;

use chrono::{DateTime, Duration, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vitalwatch_alerts::engine::Engine;
use vitalwatch_alerts::news2::{self, Acvpu, Observations, Spo2Scale};
use vitalwatch_alerts::rules::{compile, default_rules};
use vitalwatch_alerts::series::{Point, Series};
use vitalwatch_alerts::threshold::{Direction, Persistence, Threshold};
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::reading::{Batch, Measurement, Quality, Reading};

fn at(i: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + i * 5, 0).unwrap_or_default()
}

fn spo2(i: i64) -> f64 {
    // Mostly 94-97 %, with a dip below 90 for two minutes every hour.
    if i % 720 < 24 {
        88.0
    } else {
        94.0 + (i % 4) as f64
    }
}

fn series(c: &mut Criterion) {
    let rule = Threshold {
        direction: Direction::Below,
        level: 90.0,
        clear: 92.0,
        persistence: Persistence::Sustained {
            duration: Duration::minutes(1),
            max_gap: Duration::minutes(1),
        },
    };
    let mut group = c.benchmark_group("threshold series, SpO2 every 5 s");
    group.throughput(Throughput::Elements(1));
    // In order, then with every tenth reading measured about 30 s ago
    // (between two kept ones) and arriving only now.
    for (name, late) in [
        ("in order, horizon minutes", false),
        ("one in ten 30 s late, horizon minutes", true),
    ] {
        for horizon_min in [10_i64, 60] {
            let mut s = Series::new(rule, Duration::minutes(horizon_min));
            // Fill the horizon first: a late reading replays it whole.
            let mut i = 0_i64;
            while i < horizon_min * 12 + 10 {
                let _ = s.observe(Point {
                    at: at(i),
                    value: spo2(i),
                    artifact: false,
                });
                i += 1;
            }
            group.bench_with_input(BenchmarkId::new(name, horizon_min), &horizon_min, |b, _| {
                b.iter(|| {
                    i += 1;
                    let t = if late && i % 10 == 0 {
                        at(i - 6) + Duration::seconds(2)
                    } else {
                        at(i)
                    };
                    black_box(s.observe(Point {
                        at: t,
                        value: spo2(i),
                        artifact: false,
                    }))
                })
            });
        }
    }
    group.finish();
}

fn engine(c: &mut Criterion) {
    let mut e = Engine::new(
        compile(&default_rules()).unwrap_or_default(),
        Duration::minutes(60),
    );
    let patients: Vec<String> = (0..1000).map(|p| format!("patient-{p:04}")).collect();
    let upload = |p: usize, n: i64| Batch {
        device_id: format!("dev-{p}"),
        patient_id: patients[p].clone(),
        seq: None,
        received_at: at(n * 5),
        readings: (0..5)
            .flat_map(|s| {
                let t = DateTime::from_timestamp(1_800_000_000 + n * 5 + s, 0).unwrap_or_default();
                [
                    Reading {
                        metric: Metric::HeartRate,
                        measurement: Measurement::Scalar(64.0 + ((n + s) % 20) as f64),
                        measured_at: t,
                        quality: Quality::default(),
                    },
                    Reading {
                        metric: Metric::Spo2,
                        measurement: Measurement::Scalar(spo2(n * 5 + s)),
                        measured_at: t,
                        quality: Quality::default(),
                    },
                ]
            })
            .collect(),
    };
    // Ten minutes of uploads for every patient first.
    let mut n = 0_i64;
    for _ in 0..120 {
        for p in 0..patients.len() {
            let _ = e.observe(&upload(p, n));
        }
        n += 1;
    }
    let mut group = c.benchmark_group("engine, default rules, 1,000 patients");
    group.throughput(Throughput::Elements(10));
    let mut p = 0_usize;
    group.bench_function("upload of 10 readings (heart rate and SpO2)", |b| {
        b.iter_batched(
            || {
                p += 1;
                if p == patients.len() {
                    p = 0;
                    n += 1;
                }
                upload(p, n)
            },
            |batch| black_box(e.observe(&batch)),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn news2_score(c: &mut Criterion) {
    let obs = Observations {
        respiration: 22.0,
        spo2: 93.0,
        scale: Spo2Scale::Scale1,
        on_oxygen: false,
        systolic: 105.0,
        pulse: 112.0,
        consciousness: Acvpu::Alert,
        temperature: 38.4,
    };
    c.bench_function("NEWS2 score of one observation set", |b| {
        b.iter(|| news2::score(black_box(&obs)))
    });
}

criterion_group!(benches, series, engine, news2_score);
criterion_main!(benches);
