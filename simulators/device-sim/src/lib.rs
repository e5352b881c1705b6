//! The device simulator: cohorts that behave like home-monitored patients,
//! and a score for how well the alert engine served them.
//!
//! - [`scenario`]: what a run is (cohort, devices, events, faults), from TOML.
//! - [`model`]: baselines by condition, circadian rhythm, noise, what each
//!   kind of clinical event does to the values.
//! - [`generate`]: the plan (patients, devices, events, ground truth) and
//!   the batches the devices send, lazily, in send order, byte-identical
//!   for a seed.
//! - [`replay`]: publishing a plan over MQTT, accelerated; reading back the
//!   pipeline's alerts.
//! - [`score`]: alerts against the ground truth, and the naive baseline.
//! - [`load`]: many devices at a target rate over many connections, with
//!   reconnect storms; publish-to-row and publish-to-alert latency read
//!   from the pipeline's database; stored against acknowledged readings.
//! - [`Cohort`]: the simple live cohort `deploy/local/up` and the latency
//!   bench publish (one wearable per patient, a baseline and noise).
#![forbid(unsafe_code)]

pub mod generate;
pub mod load;
pub mod model;
pub mod replay;
pub mod scenario;
pub mod score;

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vitalwatch_core::proto;

/// Payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Protobuf,
}

/// One simulated patient with one device.
#[derive(Debug, Clone)]
pub struct SimPatient {
    pub patient_id: String,
    pub device_id: String,
    /// Resting heart rate, /min.
    pub hr_base: f64,
    /// Resting SpO2, %.
    pub spo2_base: f64,
    /// Resting systolic, mm[Hg]; diastolic follows.
    pub sys_base: f64,
    /// Next batch sequence number.
    pub seq: u64,
}

#[derive(Debug)]
pub struct Cohort {
    pub patients: Vec<SimPatient>,
    rng: SmallRng,
}

impl Cohort {
    /// `n` patients named `{prefix}-patient-0001`… with devices `{prefix}-0001`….
    pub fn new(n: usize, prefix: &str, seed: u64) -> Cohort {
        let mut rng = SmallRng::seed_from_u64(seed);
        let patients = (1..=n)
            .map(|i| SimPatient {
                patient_id: format!("{prefix}-patient-{i:04}"),
                device_id: format!("{prefix}-{i:04}"),
                hr_base: rng.random_range(58.0..88.0),
                spo2_base: rng.random_range(94.0..99.0),
                sys_base: rng.random_range(105.0..150.0),
                seq: 1,
            })
            .collect();
        Cohort { patients, rng }
    }

    /// `device_id,patient_id,kind` lines.
    pub fn registry_csv(&self) -> String {
        let mut s = String::from("# device_id,patient_id,kind\n");
        for p in &self.patients {
            s.push_str(&format!("{},{},wearable\n", p.device_id, p.patient_id));
        }
        s
    }

    /// The next batch of patient `i` measured at `at`: heart rate and SpO2,
    /// plus blood pressure every tenth batch. Returns the payload and how
    /// many readings it carries.
    pub fn next_batch(&mut self, i: usize, at: DateTime<Utc>, format: Format) -> (Vec<u8>, usize) {
        let rng = &mut self.rng;
        let p = &mut self.patients[i];
        let seq = p.seq;
        p.seq += 1;
        let hr = (p.hr_base + rng.random_range(-4.0..4.0)).round();
        let spo2 = (p.spo2_base + rng.random_range(-1.0..1.0))
            .round()
            .min(100.0);
        let bp = (seq % 10 == 1).then(|| {
            let sys = (p.sys_base + rng.random_range(-6.0..6.0)).round();
            (sys, (sys * 0.65 + rng.random_range(-3.0..3.0)).round())
        });
        let n = 2 + usize::from(bp.is_some());
        let payload = match format {
            Format::Json => {
                let t = at.to_rfc3339_opts(SecondsFormat::Millis, true);
                let mut readings = vec![
                    serde_json::json!({"metric": "heart_rate", "value": hr, "unit": "/min", "measured_at": t}),
                    serde_json::json!({"metric": "spo2", "value": spo2, "unit": "%", "measured_at": t}),
                ];
                if let Some((sys, dia)) = bp {
                    readings.push(serde_json::json!({"metric": "blood_pressure", "unit": "mm[Hg]", "measured_at": t,
                        "components": {"systolic": sys, "diastolic": dia}}));
                }
                serde_json::json!({"device_id": p.device_id, "seq": seq, "readings": readings})
                    .to_string()
                    .into_bytes()
            }
            Format::Protobuf => {
                let ts = Some(prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: at.timestamp_subsec_nanos() as i32,
                });
                let scalar = |metric: proto::Metric, value: f64, unit: &str| proto::Reading {
                    metric: metric as i32,
                    value,
                    unit: unit.into(),
                    measured_at: ts,
                    ..Default::default()
                };
                let mut readings = vec![
                    scalar(proto::Metric::HeartRate, hr, "/min"),
                    scalar(proto::Metric::Spo2, spo2, "%"),
                ];
                if let Some((sys, dia)) = bp {
                    readings.push(proto::Reading {
                        metric: proto::Metric::BloodPressure as i32,
                        unit: "mm[Hg]".into(),
                        measured_at: ts,
                        components: vec![
                            proto::Component {
                                name: "systolic".into(),
                                value: sys,
                            },
                            proto::Component {
                                name: "diastolic".into(),
                                value: dia,
                            },
                        ],
                        ..Default::default()
                    });
                }
                proto::ReadingBatch {
                    device_id: p.device_id.clone(),
                    seq: Some(seq),
                    readings,
                    ..Default::default()
                }
                .encode_to_vec()
            }
        };
        (payload, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use vitalwatch_core::payload::{PayloadFormat, decode};
    use vitalwatch_core::validate::{TimePolicy, validate};

    #[test]
    fn same_seed_same_bytes() {
        let at = Utc
            .with_ymd_and_hms(2026, 11, 29, 8, 0, 0)
            .single()
            .unwrap_or_default();
        let mut a = Cohort::new(3, "sim", 7);
        let mut b = Cohort::new(3, "sim", 7);
        assert_eq!(a.registry_csv(), b.registry_csv());
        for i in 0..3 {
            assert_eq!(
                a.next_batch(i, at, Format::Json),
                b.next_batch(i, at, Format::Json)
            );
            assert_eq!(
                a.next_batch(i, at, Format::Protobuf),
                b.next_batch(i, at, Format::Protobuf)
            );
        }
        let mut c = Cohort::new(3, "sim", 8);
        assert_ne!(
            a.next_batch(0, at, Format::Json),
            c.next_batch(0, at, Format::Json)
        );
    }

    #[test]
    fn every_generated_reading_is_valid() {
        let at = Utc
            .with_ymd_and_hms(2026, 11, 29, 8, 0, 0)
            .single()
            .unwrap_or_default();
        let mut cohort = Cohort::new(20, "sim", 1);
        for round in 0..30 {
            for i in 0..20 {
                let format = if round % 2 == 0 {
                    Format::Json
                } else {
                    Format::Protobuf
                };
                let (bytes, n) = cohort.next_batch(i, at, format);
                let batch = decode(&bytes, PayloadFormat::detect(false, &bytes)).expect("decodes");
                assert_eq!(batch.readings.len(), n);
                assert_eq!(
                    batch.device_id.as_deref(),
                    Some(cohort.patients[i].device_id.as_str())
                );
                for r in &batch.readings {
                    validate(r, at, &TimePolicy::default()).expect("simulated reading is valid");
                }
            }
        }
    }
}
