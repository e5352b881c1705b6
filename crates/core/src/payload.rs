//! Decoding what a device publishes into one shape, whatever its encoding.
//!
//! A device payload is a `rpm.v1.ReadingBatch`, as protobuf or as JSON (see
//! `ARCHITECTURE.md` for the JSON form). Decoding only checks the *syntax*;
//! whether each reading makes sense is [`crate::validate`]'s job, so that one
//! bad reading never takes its batch-mates down with it.

use chrono::{DateTime, TimeZone, Utc};
use prost::Message;
use serde::Deserialize;

use crate::catalogue::Metric;
use crate::proto;

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    Protobuf,
    Json,
}

impl PayloadFormat {
    /// JSON when the topic says so (`.../readings/json`) or when the payload
    /// opens with `{`. A `ReadingBatch` in protobuf never starts with `{`
    /// (0x7B would be field 15 with the deprecated group wire type), so the
    /// sniff is unambiguous for devices on MQTT 3.1.1, which has no content
    /// type.
    pub fn detect(json_topic: bool, payload: &[u8]) -> PayloadFormat {
        let first = payload.iter().find(|b| !b.is_ascii_whitespace());
        if json_topic || first == Some(&b'{') {
            PayloadFormat::Json
        } else {
            PayloadFormat::Protobuf
        }
    }
}

/// A reading as the device sent it: syntactically sound, not yet validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawReading {
    /// Metric name as sent (`heart_rate`), or `code:N` for a protobuf enum
    /// value this build does not know.
    pub metric: String,
    pub value: Option<f64>,
    pub text_value: Option<String>,
    pub unit: Option<String>,
    pub measured_at: Option<DateTime<Utc>>,
    pub components: Vec<(String, f64)>,
    pub flags: Vec<String>,
}

/// A device's batch, as sent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceBatch {
    /// The device id inside the payload, if the device put one there.
    pub device_id: Option<String>,
    pub seq: Option<u64>,
    pub readings: Vec<RawReading>,
}

/// The payload as a whole could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not a valid protobuf ReadingBatch: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("payload is not a valid JSON reading batch: {0}")]
    Json(#[from] serde_json::Error),
    #[error("payload holds no readings")]
    Empty,
}

/// Decodes a device payload.
pub fn decode(payload: &[u8], format: PayloadFormat) -> Result<DeviceBatch, DecodeError> {
    let batch = match format {
        PayloadFormat::Protobuf => from_proto(proto::ReadingBatch::decode(payload)?),
        PayloadFormat::Json => from_json(serde_json::from_slice(payload)?),
    };
    if batch.readings.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(batch)
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

pub fn timestamp_from_proto(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(t.nanos).ok()?;
    Utc.timestamp_opt(t.seconds, nanos).single()
}

pub fn timestamp_to_proto(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn from_proto(b: proto::ReadingBatch) -> DeviceBatch {
    let readings = b
        .readings
        .into_iter()
        .map(|r| {
            let metric = match proto::Metric::try_from(r.metric)
                .ok()
                .and_then(Metric::from_proto)
            {
                Some(m) => m.name().to_owned(),
                None => format!("code:{}", r.metric),
            };
            let shape_has_value = r.components.is_empty() && r.text_value.is_empty();
            RawReading {
                metric,
                // proto3 cannot tell 0 from unset; a scalar reading always has a value.
                value: shape_has_value.then_some(r.value),
                text_value: non_empty(r.text_value),
                unit: non_empty(r.unit),
                measured_at: r.measured_at.as_ref().and_then(timestamp_from_proto),
                components: r
                    .components
                    .into_iter()
                    .map(|c| (c.name, c.value))
                    .collect(),
                flags: r
                    .flags
                    .into_iter()
                    .map(|f| match proto::QualityFlag::try_from(f) {
                        Ok(proto::QualityFlag::MotionArtifact) => "motion_artifact".to_owned(),
                        Ok(proto::QualityFlag::LowPerfusion) => "low_perfusion".to_owned(),
                        Ok(proto::QualityFlag::CuffError) => "cuff_error".to_owned(),
                        _ => format!("code:{f}"),
                    })
                    .collect(),
            }
        })
        .collect();
    DeviceBatch {
        device_id: non_empty(b.device_id),
        seq: b.seq,
        readings,
    }
}

#[derive(Deserialize)]
struct JsonBatch {
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    readings: Vec<JsonReading>,
}

#[derive(Deserialize)]
struct JsonReading {
    metric: String,
    #[serde(default)]
    value: Option<serde_json::Value>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    measured_at: Option<DateTime<Utc>>,
    #[serde(default)]
    components: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    flags: Vec<String>,
}

fn from_json(b: JsonBatch) -> DeviceBatch {
    let readings = b
        .readings
        .into_iter()
        .map(|r| {
            let (value, text_value) = match r.value {
                Some(serde_json::Value::Number(n)) => (n.as_f64(), None),
                Some(serde_json::Value::String(s)) => (None, Some(s)),
                _ => (None, None),
            };
            RawReading {
                metric: r.metric,
                value,
                text_value,
                unit: r.unit.and_then(non_empty),
                measured_at: r.measured_at,
                // A component that is not a number becomes NaN, which validation
                // rejects as out of range with the rest of the batch unharmed.
                components: r
                    .components
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.as_f64().unwrap_or(f64::NAN)))
                    .collect(),
                flags: r.flags,
            }
        })
        .collect();
    DeviceBatch {
        device_id: b.device_id.and_then(non_empty),
        seq: b.seq,
        readings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"{
      "device_id": "bp-cuff-0042",
      "seq": 1187,
      "readings": [
        {"metric": "blood_pressure", "measured_at": "2026-11-29T07:45:12Z", "unit": "mm[Hg]",
         "components": {"systolic": 142, "diastolic": 91}},
        {"metric": "heart_rate", "value": 78, "unit": "/min", "measured_at": "2026-11-29T07:45:12Z"},
        {"metric": "spo2", "value": 93, "unit": "%", "measured_at": "2026-11-29T07:46:00Z",
         "flags": ["motion_artifact"]}
      ]
    }"#;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn decodes_the_design_json_example() {
        let format = PayloadFormat::detect(false, DESIGN_EXAMPLE.as_bytes());
        assert_eq!(format, PayloadFormat::Json);
        let b = decode(DESIGN_EXAMPLE.as_bytes(), format).expect("valid json");
        assert_eq!(b.device_id.as_deref(), Some("bp-cuff-0042"));
        assert_eq!(b.seq, Some(1187));
        assert_eq!(b.readings.len(), 3);
        let bp = &b.readings[0];
        assert_eq!(bp.metric, "blood_pressure");
        assert_eq!(bp.value, None);
        let mut comps = bp.components.clone();
        comps.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            comps,
            vec![
                ("diastolic".to_owned(), 91.0),
                ("systolic".to_owned(), 142.0)
            ]
        );
        assert_eq!(b.readings[1].value, Some(78.0));
        assert_eq!(b.readings[1].unit.as_deref(), Some("/min"));
        assert_eq!(b.readings[2].measured_at, Some(at("2026-11-29T07:46:00Z")));
        assert_eq!(b.readings[2].flags, vec!["motion_artifact".to_owned()]);
    }

    #[test]
    fn decodes_protobuf() {
        let msg = proto::ReadingBatch {
            device_id: "ox-1".into(),
            patient_id: String::new(),
            seq: Some(7),
            received_at: None,
            readings: vec![
                proto::Reading {
                    metric: proto::Metric::Spo2 as i32,
                    value: 95.0,
                    unit: "%".into(),
                    measured_at: Some(timestamp_to_proto(at("2026-11-29T07:46:00Z"))),
                    components: vec![],
                    flags: vec![proto::QualityFlag::LowPerfusion as i32],
                    text_value: String::new(),
                },
                proto::Reading {
                    metric: 99,
                    value: 1.0,
                    measured_at: Some(timestamp_to_proto(at("2026-11-29T07:46:00Z"))),
                    ..Default::default()
                },
            ],
        };
        let bytes = msg.encode_to_vec();
        assert_eq!(
            PayloadFormat::detect(false, &bytes),
            PayloadFormat::Protobuf
        );
        let b = decode(&bytes, PayloadFormat::Protobuf).expect("valid protobuf");
        assert_eq!(b.device_id.as_deref(), Some("ox-1"));
        assert_eq!(b.seq, Some(7));
        assert_eq!(b.readings[0].metric, "spo2");
        assert_eq!(b.readings[0].value, Some(95.0));
        assert_eq!(b.readings[0].flags, vec!["low_perfusion".to_owned()]);
        assert_eq!(b.readings[0].measured_at, Some(at("2026-11-29T07:46:00Z")));
        assert_eq!(b.readings[1].metric, "code:99");
    }

    #[test]
    fn garbage_is_a_decode_error_in_either_format() {
        let garbage = b"\xff\xfe\x00 not a reading";
        assert!(matches!(
            decode(garbage, PayloadFormat::Protobuf),
            Err(DecodeError::Protobuf(_))
        ));
        assert!(matches!(
            decode(garbage, PayloadFormat::Json),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode(b"{\"readings\": 5}", PayloadFormat::Json),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn a_batch_without_readings_is_refused() {
        assert!(matches!(
            decode(b"{\"readings\": []}", PayloadFormat::Json),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            decode(b"", PayloadFormat::Protobuf),
            Err(DecodeError::Empty)
        ));
    }

    #[test]
    fn json_topic_forces_json() {
        assert_eq!(
            PayloadFormat::detect(true, b"\x0a\x01x"),
            PayloadFormat::Json
        );
        assert_eq!(PayloadFormat::detect(false, b"  \n{}"), PayloadFormat::Json);
    }
}
