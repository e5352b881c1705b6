//! criterion: decode + validate, per reading, for a protobuf and a JSON
//! device batch of 10 heart-rate readings.
//!
//! `cargo bench -p vitalwatch-benches --bench decode_validate`

use std::hint::black_box;

use chrono::{Duration, TimeZone, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use vitalwatch_core::payload::{PayloadFormat, decode};
use vitalwatch_core::proto;
use vitalwatch_core::validate::{TimePolicy, validate};

const READINGS: usize = 10;

fn payloads() -> (Vec<u8>, Vec<u8>, chrono::DateTime<Utc>) {
    let now = Utc
        .with_ymd_and_hms(2026, 11, 29, 8, 0, 0)
        .single()
        .unwrap_or_default();
    let times: Vec<_> = (0..READINGS)
        .map(|i| now - Duration::seconds(i as i64))
        .collect();
    let json = serde_json::json!({
        "device_id": "wearable-0042", "seq": 9001,
        "readings": times.iter().enumerate().map(|(i, t)| serde_json::json!(
            {"metric": "heart_rate", "value": 60 + i, "unit": "/min", "measured_at": t.to_rfc3339()}
        )).collect::<Vec<_>>()
    })
    .to_string()
    .into_bytes();
    let pb = proto::ReadingBatch {
        device_id: "wearable-0042".into(),
        seq: Some(9001),
        readings: times
            .iter()
            .enumerate()
            .map(|(i, t)| proto::Reading {
                metric: proto::Metric::HeartRate as i32,
                value: 60.0 + i as f64,
                unit: "/min".into(),
                measured_at: Some(prost_types_ts(*t)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec();
    (json, pb, now)
}

fn prost_types_ts(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

fn bench(c: &mut Criterion) {
    let (json, pb, now) = payloads();
    let policy = TimePolicy::default();
    let mut g = c.benchmark_group("decode_validate");
    g.throughput(Throughput::Elements(READINGS as u64));
    for (name, bytes, format) in [
        ("protobuf", &pb, PayloadFormat::Protobuf),
        ("json", &json, PayloadFormat::Json),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let batch = decode(black_box(bytes), format).ok();
                let ok = batch
                    .iter()
                    .flat_map(|b| &b.readings)
                    .filter(|r| validate(r, now, &policy).is_ok())
                    .count();
                black_box(ok)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
