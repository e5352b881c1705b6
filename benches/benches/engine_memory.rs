//! The alerts engine's memory per patient: the default rule set judging
//! wearables that measure heart rate and SpO2 every second, uploaded a few
//! seconds at a time, in stream time (no I/O, no waiting), until every
//! series holds its cap of readings and beyond. Prints the process's
//! resident memory above what it was before the engine, per patient, every
//! few minutes of stream time, and how long judging took per reading.
//!
//! `cargo bench -p vitalwatch-benches --bench engine_memory`
//! (environment: BENCH_PATIENTS, default 5000; BENCH_MINUTES of stream
//! time, default 15; BENCH_UPLOAD_SECONDS, seconds of readings in one
//! upload, default 5; BENCH_MAX_POINTS, the engine's
//! `max_points_per_series`, default the service's)

use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use vitalwatch_alerts::AlertsConfig;
use vitalwatch_alerts::engine::Engine;
use vitalwatch_alerts::rules::{compile, default_rules};
use vitalwatch_benches::{env, rss_mib};
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::reading::{Batch, Measurement, Quality, Reading};

/// Resident memory of this process, in bytes.
fn rss() -> Option<u64> {
    rss_mib(std::process::id()).map(|mib| (mib * (1 << 20) as f64) as u64)
}

fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
}

fn main() {
    let patients = env("BENCH_PATIENTS", 5_000).max(1);
    let minutes = env("BENCH_MINUTES", 15).max(1) as i64;
    let upload_seconds = env("BENCH_UPLOAD_SECONDS", 5).max(1) as i64;
    let cfg = AlertsConfig::default();
    let max_points = env("BENCH_MAX_POINTS", cfg.max_points_per_series);
    let ids: Vec<String> = (0..patients).map(|p| format!("patient-{p:06}")).collect();
    let upload = |p: usize, from: i64| Batch {
        device_id: format!("dev-{p}"),
        patient_id: ids[p].clone(),
        seq: None,
        received_at: at(from + upload_seconds),
        readings: (from..from + upload_seconds)
            .flat_map(|s| {
                let k = s + p as i64 * 7;
                // SpO2 mostly 94-97 %, dipping to 88 % for eight minutes
                // in every forty, so that episodes open and close.
                let spo2 = if k % 2400 < 480 {
                    88.0
                } else {
                    94.0 + (k % 4) as f64
                };
                [
                    Reading {
                        metric: Metric::HeartRate,
                        measurement: Measurement::Scalar(64.0 + (k % 20) as f64),
                        measured_at: at(s),
                        quality: Quality::default(),
                    },
                    Reading {
                        metric: Metric::Spo2,
                        measurement: Measurement::Scalar(spo2),
                        measured_at: at(s),
                        quality: Quality::default(),
                    },
                ]
            })
            .collect(),
    };

    let before = rss().unwrap_or(0);
    let mut engine = Engine::new(
        compile(&default_rules()).unwrap_or_default(),
        Duration::minutes(i64::from(cfg.late_minutes)),
    )
    .with_max_points(max_points);
    println!(
        "alerts engine memory: default rules, {patients} patients each streaming heart rate and SpO2 every second, {upload_seconds} s per upload, at most {max_points} readings per series"
    );
    let mut changes = 0_usize;
    let mut readings = 0_u64;
    let mut judging = std::time::Duration::ZERO;
    for minute in 1..=minutes {
        for from in ((minute - 1) * 60..minute * 60).step_by(upload_seconds as usize) {
            for p in 0..patients {
                let batch = upload(p, from);
                readings += batch.readings.len() as u64;
                let started = Instant::now();
                let (c, _) = engine.observe(&batch);
                judging += started.elapsed();
                changes += c.len();
            }
        }
        if minute % 5 == 0 || minute == minutes {
            let grown = rss().unwrap_or(0).saturating_sub(before);
            println!(
                "  after {minute:>3} min of stream: {:>7.1} MiB above the start, {:>7.0} bytes per patient; {changes} alert changes; {:.2} µs per reading judged",
                grown as f64 / (1 << 20) as f64,
                grown as f64 / patients as f64,
                judging.as_secs_f64() * 1e6 / readings as f64
            );
        }
    }
}
