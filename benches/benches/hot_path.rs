//! The per-message work of ingest, measured alone: decode a device payload
//! (JSON and protobuf), validate its readings, encode the Kafka record, and
//! decode that record again as the writer does.
//!
//! `cargo bench -p vitalwatch-benches --bench hot_path`

use std::hint::black_box;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use prost::Message;
use vitalwatch_benches::{measure, report};
use vitalwatch_core::payload::{self, PayloadFormat};
use vitalwatch_core::reading::Batch;
use vitalwatch_core::validate::{TimePolicy, validate};

const BUDGET: Duration = Duration::from_secs(2);

fn main() {
    let now = Utc
        .with_ymd_and_hms(2026, 11, 29, 8, 0, 0)
        .single()
        .unwrap_or_default();
    let json = br#"{"device_id": "bp-cuff-0042", "seq": 1187, "readings": [
        {"metric": "blood_pressure", "measured_at": "2026-11-29T07:45:12Z", "unit": "mm[Hg]",
         "components": {"systolic": 142, "diastolic": 91}},
        {"metric": "heart_rate", "value": 78, "unit": "/min", "measured_at": "2026-11-29T07:45:12Z"},
        {"metric": "spo2", "value": 93, "unit": "%", "measured_at": "2026-11-29T07:46:00Z", "flags": ["motion_artifact"]}]}"#;
    let raw = payload::decode(json, PayloadFormat::Json).unwrap_or_default();
    let policy = TimePolicy::default();
    let readings: Vec<_> = raw
        .readings
        .iter()
        .filter_map(|r| validate(r, now, &policy).ok())
        .collect();
    let batch = Batch {
        device_id: "bp-cuff-0042".into(),
        patient_id: "patient-0042".into(),
        seq: raw.seq,
        received_at: now,
        readings,
    };
    let mut device_pb = batch.to_proto();
    device_pb.patient_id.clear();
    device_pb.received_at = None;
    let device_pb = device_pb.encode_to_vec();
    let record = batch.encode();
    let n = raw.readings.len() as u64;

    println!(
        "hot path, one device batch of {n} readings (JSON {} B, protobuf {} B, record {} B)",
        json.len(),
        device_pb.len(),
        record.len()
    );
    report(
        "decode JSON batch",
        measure(BUDGET, || {
            black_box(payload::decode(black_box(json), PayloadFormat::Json).ok());
        }),
        n,
    );
    report(
        "decode protobuf batch",
        measure(BUDGET, || {
            black_box(payload::decode(black_box(&device_pb), PayloadFormat::Protobuf).ok());
        }),
        n,
    );
    report(
        "validate batch",
        measure(BUDGET, || {
            for r in &raw.readings {
                black_box(validate(black_box(r), now, &policy).ok());
            }
        }),
        n,
    );
    report(
        "encode Kafka record",
        measure(BUDGET, || {
            black_box(black_box(&batch).encode());
        }),
        n,
    );
    report(
        "decode Kafka record (writer)",
        measure(BUDGET, || {
            black_box(Batch::decode(black_box(&record)).ok());
        }),
        n,
    );
    report(
        "JSON payload to Kafka record (ingest total)",
        measure(BUDGET, || {
            let raw = payload::decode(black_box(json), PayloadFormat::Json).unwrap_or_default();
            let readings = raw
                .readings
                .iter()
                .filter_map(|r| validate(r, now, &policy).ok())
                .collect();
            let b = Batch {
                device_id: "bp-cuff-0042".into(),
                patient_id: "patient-0042".into(),
                seq: raw.seq,
                received_at: now,
                readings,
            };
            black_box(b.encode());
        }),
        n,
    );
}
