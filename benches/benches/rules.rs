//! criterion: judging one reading by a rule, through the event-time
//! `Series` that handles late readings, for a wearable streaming SpO2 every
//! 5 seconds. The series keeps its horizon of readings and replays them on
//! every reading, so the cost grows with the horizon: measured at 10
//! minutes (120 readings kept) and 1 hour (720).
//!
//! `cargo bench -p vitalwatch-benches --bench rules`

use std::hint::black_box;

use chrono::{DateTime, Duration, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vitalwatch_alerts::news2::{self, Acvpu, Observations, Spo2Scale};
use vitalwatch_alerts::series::{Point, Series};
use vitalwatch_alerts::threshold::{Direction, Persistence, Threshold};

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
    for horizon_min in [10_i64, 60] {
        let mut s = Series::new(rule, Duration::minutes(horizon_min));
        // Fill the horizon first, so every measured reading replays it whole.
        let mut i = 0_i64;
        while i < horizon_min * 12 + 10 {
            let _ = s.observe(Point {
                at: at(i),
                value: spo2(i),
                artifact: false,
            });
            i += 1;
        }
        group.bench_with_input(
            BenchmarkId::new("in order, horizon minutes", horizon_min),
            &horizon_min,
            |b, _| {
                b.iter(|| {
                    i += 1;
                    black_box(s.observe(Point {
                        at: at(i),
                        value: spo2(i),
                        artifact: false,
                    }))
                })
            },
        );
    }
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

criterion_group!(benches, series, news2_score);
criterion_main!(benches);
