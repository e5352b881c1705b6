//! Validated readings, and their encoding as `rpm.readings.v1` records.
//!
//! Everything here is in stored units and has passed [`crate::validate`].

use chrono::{DateTime, Utc};
use prost::Message;

use crate::catalogue::{Acvpu, DIASTOLIC, Metric, SYSTOLIC};
use crate::payload::{timestamp_from_proto, timestamp_to_proto};
use crate::proto;

/// A measured value, shaped by its metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measurement {
    /// One number in the metric's stored unit (also 0/1 for supplemental oxygen).
    Scalar(f64),
    /// mm[Hg].
    BloodPressure {
        systolic: f64,
        diastolic: f64,
    },
    Consciousness(Acvpu),
}

/// Signal-quality flags, as a small bit set (stored as `smallint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Quality(pub u8);

impl Quality {
    pub const MOTION_ARTIFACT: Quality = Quality(1);
    pub const LOW_PERFUSION: Quality = Quality(2);
    pub const CUFF_ERROR: Quality = Quality(4);

    pub fn from_name(name: &str) -> Option<Quality> {
        Some(match name {
            "motion_artifact" => Self::MOTION_ARTIFACT,
            "low_perfusion" => Self::LOW_PERFUSION,
            "cuff_error" => Self::CUFF_ERROR,
            _ => return None,
        })
    }

    pub fn contains(self, other: Quality) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Quality) {
        self.0 |= other.0;
    }

    fn to_proto(self) -> Vec<i32> {
        [
            (Self::MOTION_ARTIFACT, proto::QualityFlag::MotionArtifact),
            (Self::LOW_PERFUSION, proto::QualityFlag::LowPerfusion),
            (Self::CUFF_ERROR, proto::QualityFlag::CuffError),
        ]
        .into_iter()
        .filter(|(q, _)| self.contains(*q))
        .map(|(_, p)| p as i32)
        .collect()
    }

    fn from_proto(flags: &[i32]) -> Quality {
        let mut q = Quality::default();
        for f in flags {
            match proto::QualityFlag::try_from(*f) {
                Ok(proto::QualityFlag::MotionArtifact) => q.insert(Self::MOTION_ARTIFACT),
                Ok(proto::QualityFlag::LowPerfusion) => q.insert(Self::LOW_PERFUSION),
                Ok(proto::QualityFlag::CuffError) => q.insert(Self::CUFF_ERROR),
                _ => {}
            }
        }
        q
    }
}

/// One validated reading in stored units.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub metric: Metric,
    pub measurement: Measurement,
    /// Device time of the measurement: what rules and charts run on.
    pub measured_at: DateTime<Utc>,
    pub quality: Quality,
}

impl Reading {
    /// The stored series of this reading: `(component, value)`, where the
    /// component is empty except for panels (blood pressure gives two).
    pub fn values(&self) -> impl Iterator<Item = (&'static str, f64)> {
        let (a, b) = match self.measurement {
            Measurement::Scalar(v) => (("", v), None),
            Measurement::BloodPressure {
                systolic,
                diastolic,
            } => ((SYSTOLIC, systolic), Some((DIASTOLIC, diastolic))),
            Measurement::Consciousness(c) => (("", c.code()), None),
        };
        std::iter::once(a).chain(b)
    }
}

/// A batch of validated readings of one device, for one patient: the value of
/// a `rpm.readings.v1` record.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub device_id: String,
    pub patient_id: String,
    pub seq: Option<u64>,
    pub received_at: DateTime<Utc>,
    pub readings: Vec<Reading>,
}

/// A `rpm.readings.v1` record that does not hold a valid batch.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record is not a ReadingBatch: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("record is missing {0}")]
    Missing(&'static str),
    #[error("record reading {index} is invalid: {why}")]
    Reading { index: usize, why: &'static str },
}

impl Batch {
    pub fn to_proto(&self) -> proto::ReadingBatch {
        proto::ReadingBatch {
            device_id: self.device_id.clone(),
            patient_id: self.patient_id.clone(),
            seq: self.seq,
            received_at: Some(timestamp_to_proto(self.received_at)),
            readings: self
                .readings
                .iter()
                .map(|r| {
                    let (value, components, text_value) = match r.measurement {
                        Measurement::Scalar(v) => (v, vec![], String::new()),
                        Measurement::BloodPressure {
                            systolic,
                            diastolic,
                        } => (
                            0.0,
                            vec![
                                proto::Component {
                                    name: SYSTOLIC.into(),
                                    value: systolic,
                                },
                                proto::Component {
                                    name: DIASTOLIC.into(),
                                    value: diastolic,
                                },
                            ],
                            String::new(),
                        ),
                        Measurement::Consciousness(c) => (0.0, vec![], c.letter().to_owned()),
                    };
                    proto::Reading {
                        metric: r.metric.to_proto() as i32,
                        value,
                        unit: r.metric.info().unit.to_owned(),
                        measured_at: Some(timestamp_to_proto(r.measured_at)),
                        components,
                        flags: r.quality.to_proto(),
                        text_value,
                    }
                })
                .collect(),
        }
    }

    /// The record value: protobuf `rpm.v1.ReadingBatch`.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// Decodes a record value written by [`Batch::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Batch, RecordError> {
        let p = proto::ReadingBatch::decode(bytes)?;
        if p.device_id.is_empty() {
            return Err(RecordError::Missing("device_id"));
        }
        if p.patient_id.is_empty() {
            return Err(RecordError::Missing("patient_id"));
        }
        let received_at = p
            .received_at
            .as_ref()
            .and_then(timestamp_from_proto)
            .ok_or(RecordError::Missing("received_at"))?;
        let readings = p
            .readings
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let bad = |why| RecordError::Reading { index, why };
                let metric = proto::Metric::try_from(r.metric)
                    .ok()
                    .and_then(Metric::from_proto)
                    .ok_or_else(|| bad("unknown metric"))?;
                let measured_at = r
                    .measured_at
                    .as_ref()
                    .and_then(timestamp_from_proto)
                    .ok_or_else(|| bad("no measured_at"))?;
                let measurement = match metric {
                    Metric::BloodPressure => {
                        let get =
                            |n: &str| r.components.iter().find(|c| c.name == n).map(|c| c.value);
                        Measurement::BloodPressure {
                            systolic: get(SYSTOLIC).ok_or_else(|| bad("no systolic"))?,
                            diastolic: get(DIASTOLIC).ok_or_else(|| bad("no diastolic"))?,
                        }
                    }
                    Metric::Consciousness => Measurement::Consciousness(
                        Acvpu::parse(&r.text_value).ok_or_else(|| bad("bad ACVPU"))?,
                    ),
                    _ => Measurement::Scalar(r.value),
                };
                Ok::<_, RecordError>(Reading {
                    metric,
                    measurement,
                    measured_at,
                    quality: Quality::from_proto(&r.flags),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            device_id: p.device_id,
            patient_id: p.patient_id,
            seq: p.seq,
            received_at,
            readings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_764_400_000 + s, 123_000_000)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn record_round_trips() {
        let mut q = Quality::default();
        q.insert(Quality::MOTION_ARTIFACT);
        let batch = Batch {
            device_id: "bp-1".into(),
            patient_id: "p-1".into(),
            seq: Some(42),
            received_at: t(10),
            readings: vec![
                Reading {
                    metric: Metric::BloodPressure,
                    measurement: Measurement::BloodPressure {
                        systolic: 142.0,
                        diastolic: 91.0,
                    },
                    measured_at: t(0),
                    quality: Quality::default(),
                },
                Reading {
                    metric: Metric::Spo2,
                    measurement: Measurement::Scalar(93.0),
                    measured_at: t(1),
                    quality: q,
                },
                Reading {
                    metric: Metric::Consciousness,
                    measurement: Measurement::Consciousness(Acvpu::Voice),
                    measured_at: t(2),
                    quality: Quality::default(),
                },
            ],
        };
        let back = Batch::decode(&batch.encode()).expect("round trip");
        assert_eq!(back, batch);
        let rows: Vec<_> = back.readings[0].values().collect();
        assert_eq!(rows, vec![(SYSTOLIC, 142.0), (DIASTOLIC, 91.0)]);
        assert_eq!(
            back.readings[2].values().collect::<Vec<_>>(),
            vec![("", 2.0)]
        );
    }

    #[test]
    fn records_without_identity_are_refused() {
        let p = proto::ReadingBatch {
            device_id: "d".into(),
            ..Default::default()
        };
        assert!(matches!(
            Batch::decode(&p.encode_to_vec()),
            Err(RecordError::Missing("patient_id"))
        ));
        assert!(matches!(
            Batch::decode(b"\xff\xff\xff"),
            Err(RecordError::Decode(_))
        ));
    }
}
