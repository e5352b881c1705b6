//! The pure heart of ingest: one MQTT message in, what to send where out.
//!
//! No I/O: the registry record and the clock are passed in.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use vitalwatch_core::payload::{self, DecodeError, PayloadFormat};
use vitalwatch_core::reading::Batch;
use vitalwatch_core::validate::{self, Reason, Rejection, TimePolicy};
use vitalwatch_store::registry::DeviceRecord;

/// Input that goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub rejection: Rejection,
    /// The rejected reading's index in the batch; `None` when the whole
    /// payload was rejected.
    pub reading_index: Option<usize>,
}

/// What one message becomes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The valid readings for `rpm.readings.v1`: one batch per patient (a
    /// device handed over mid-batch gives two), keyed by `patient_id`.
    pub accepted: Vec<Batch>,
    /// Everything else, for `rpm.deadletter.v1`.
    pub rejected: Vec<Rejected>,
    /// Readings dropped because the same batch already held them (same
    /// metric, instant and value): the store would refuse them anyway. The
    /// same metric and instant with another value is a rejection
    /// (`conflicting_reading`), not a duplicate.
    pub duplicates: usize,
}

impl Outcome {
    fn whole(reason: Reason, detail: impl Into<String>) -> Outcome {
        Outcome {
            rejected: vec![Rejected {
                rejection: Rejection::new(reason, detail),
                reading_index: None,
            }],
            ..Outcome::default()
        }
    }

    /// How many readings were accepted.
    pub fn accepted_readings(&self) -> usize {
        self.accepted.iter().map(|b| b.readings.len()).sum()
    }
}

/// Classifies one message published on `device_id`'s readings topic.
pub fn classify(
    device_id: &str,
    json_topic: bool,
    payload: &[u8],
    device: Option<&DeviceRecord>,
    received_at: DateTime<Utc>,
    policy: &TimePolicy,
) -> Outcome {
    let device = match device {
        None => {
            return Outcome::whole(
                Reason::UnknownDevice,
                format!("device {device_id:?} is not registered"),
            );
        }
        Some(d) if !d.active => {
            return Outcome::whole(
                Reason::UnknownDevice,
                format!("device {device_id:?} is deactivated"),
            );
        }
        Some(d) if d.assignments.is_empty() => {
            return Outcome::whole(
                Reason::UnassignedDevice,
                format!("device {device_id:?} was never assigned to a patient"),
            );
        }
        Some(d) => d,
    };
    let batch = match payload::decode(payload, PayloadFormat::detect(json_topic, payload)) {
        Ok(b) => b,
        Err(DecodeError::Empty) => {
            return Outcome::whole(Reason::EmptyBatch, "the batch holds no readings");
        }
        Err(e) => return Outcome::whole(Reason::MalformedPayload, e.to_string()),
    };
    if let Some(inner) = batch.device_id.as_deref()
        && inner != device_id
    {
        return Outcome::whole(
            Reason::DeviceMismatch,
            format!(
                "payload names device {inner:?} but was published on device {device_id:?}'s topic"
            ),
        );
    }
    let mut by_patient: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    let mut seen = HashMap::new();
    let mut out = Outcome::default();
    for (i, raw) in batch.readings.iter().enumerate() {
        let reading = match validate::validate(raw, received_at, policy) {
            Ok(r) => r,
            Err(rejection) => {
                out.rejected.push(Rejected {
                    rejection,
                    reading_index: Some(i),
                });
                continue;
            }
        };
        let Some(patient) = device.patient_at(reading.measured_at) else {
            let detail = format!(
                "device {device_id:?} was not assigned to anyone at {}",
                reading.measured_at
            );
            out.rejected.push(Rejected {
                rejection: Rejection::new(Reason::UnassignedDevice, detail),
                reading_index: Some(i),
            });
            continue;
        };
        match seen.get(&(reading.metric, reading.measured_at)) {
            Some(first) if *first == reading.measurement => {
                out.duplicates += 1;
                continue;
            }
            Some(_) => {
                let detail = format!(
                    "{} at {} appears earlier in the batch with another value",
                    reading.metric, reading.measured_at
                );
                out.rejected.push(Rejected {
                    rejection: Rejection::new(Reason::ConflictingReading, detail),
                    reading_index: Some(i),
                });
                continue;
            }
            None => {
                seen.insert((reading.metric, reading.measured_at), reading.measurement);
            }
        }
        by_patient.entry(patient).or_default().push(reading);
    }
    out.accepted = by_patient
        .into_iter()
        .map(|(patient, readings)| Batch {
            device_id: device_id.to_owned(),
            patient_id: patient.to_owned(),
            seq: batch.seq,
            received_at,
            readings,
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use vitalwatch_store::registry::Assignment;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 29, 8, 0, 0)
            .single()
            .unwrap_or_default()
    }

    fn assigned() -> DeviceRecord {
        DeviceRecord {
            kind: "wearable".into(),
            active: true,
            assignments: vec![Assignment {
                patient_id: "p-1".into(),
                from: now() - Duration::days(30),
                until: None,
            }],
        }
    }

    fn reasons(o: &Outcome) -> Vec<(Reason, Option<usize>)> {
        o.rejected
            .iter()
            .map(|r| (r.rejection.reason, r.reading_index))
            .collect()
    }

    const GOOD_AND_BAD: &str = r#"{"device_id": "d-1", "seq": 3, "readings": [
        {"metric": "heart_rate", "value": 72, "measured_at": "2026-11-29T07:59:00Z"},
        {"metric": "heart_rate", "value": 900, "measured_at": "2026-11-29T07:59:01Z"},
        {"metric": "pulse", "value": 70, "measured_at": "2026-11-29T07:59:02Z"}
    ]}"#;

    #[test]
    fn bad_readings_do_not_take_the_batch_down() {
        let o = classify(
            "d-1",
            false,
            GOOD_AND_BAD.as_bytes(),
            Some(&assigned()),
            now(),
            &TimePolicy::default(),
        );
        assert_eq!(o.accepted.len(), 1);
        let b = &o.accepted[0];
        assert_eq!(b.patient_id, "p-1");
        assert_eq!(b.device_id, "d-1");
        assert_eq!(b.seq, Some(3));
        assert_eq!(b.received_at, now());
        assert_eq!(b.readings.len(), 1);
        assert_eq!(
            reasons(&o),
            vec![
                (Reason::OutOfRange, Some(1)),
                (Reason::UnknownMetric, Some(2))
            ]
        );
    }

    #[test]
    fn identity_is_checked_before_anything_else() {
        let p = GOOD_AND_BAD.as_bytes();
        let policy = TimePolicy::default();
        assert_eq!(
            reasons(&classify("d-1", false, p, None, now(), &policy)),
            vec![(Reason::UnknownDevice, None)]
        );
        let inactive = DeviceRecord {
            active: false,
            ..assigned()
        };
        assert_eq!(
            reasons(&classify("d-1", false, p, Some(&inactive), now(), &policy)),
            vec![(Reason::UnknownDevice, None)]
        );
        let never = DeviceRecord {
            assignments: vec![],
            ..assigned()
        };
        assert_eq!(
            reasons(&classify("d-1", false, p, Some(&never), now(), &policy)),
            vec![(Reason::UnassignedDevice, None)]
        );
        let o = classify("d-2", false, p, Some(&assigned()), now(), &policy);
        assert_eq!(reasons(&o), vec![(Reason::DeviceMismatch, None)]);
        assert!(o.accepted.is_empty());
    }

    #[test]
    fn readings_go_to_whoever_had_the_device_when_they_were_measured() {
        let handover = Utc
            .with_ymd_and_hms(2026, 11, 29, 7, 0, 0)
            .single()
            .unwrap_or_default();
        let dev = DeviceRecord {
            kind: "scale".into(),
            active: true,
            assignments: vec![
                Assignment {
                    patient_id: "p-old".into(),
                    from: handover - Duration::days(10),
                    until: Some(handover),
                },
                Assignment {
                    patient_id: "p-new".into(),
                    from: handover,
                    until: None,
                },
            ],
        };
        let payload = br#"{"readings": [
            {"metric": "body_weight", "value": 80.1, "measured_at": "2026-11-29T06:59:59Z"},
            {"metric": "body_weight", "value": 62.0, "measured_at": "2026-11-29T07:00:00Z"},
            {"metric": "body_weight", "value": 70.0, "measured_at": "2026-11-10T00:00:00Z"}
        ]}"#;
        let o = classify(
            "s-1",
            false,
            payload,
            Some(&dev),
            now(),
            &TimePolicy::default(),
        );
        let patients: Vec<_> = o
            .accepted
            .iter()
            .map(|b| (b.patient_id.as_str(), b.readings.len()))
            .collect();
        assert_eq!(patients, vec![("p-new", 1), ("p-old", 1)]);
        assert_eq!(
            reasons(&o),
            vec![(Reason::UnassignedDevice, Some(2))],
            "before any assignment"
        );
    }

    #[test]
    fn the_same_reading_twice_in_a_batch_is_kept_once() {
        let payload = br#"{"readings": [
            {"metric": "heart_rate", "value": 72, "measured_at": "2026-11-29T07:59:00Z"},
            {"metric": "heart_rate", "value": 72, "measured_at": "2026-11-29T07:59:00Z"},
            {"metric": "spo2", "value": 97, "measured_at": "2026-11-29T07:59:00Z"},
            {"metric": "heart_rate", "value": 75, "measured_at": "2026-11-29T07:59:00Z"}
        ]}"#;
        let o = classify(
            "d-1",
            false,
            payload,
            Some(&assigned()),
            now(),
            &TimePolicy::default(),
        );
        assert_eq!(o.duplicates, 1);
        assert_eq!(o.accepted_readings(), 2);
        assert_eq!(
            reasons(&o),
            vec![(Reason::ConflictingReading, Some(3))],
            "another value is not a duplicate"
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let o = classify(
            "d-1",
            false,
            b"\x08\xff\xff\xff",
            Some(&assigned()),
            now(),
            &TimePolicy::default(),
        );
        assert_eq!(reasons(&o), vec![(Reason::MalformedPayload, None)]);
        let o = classify(
            "d-1",
            true,
            b"not json",
            Some(&assigned()),
            now(),
            &TimePolicy::default(),
        );
        assert_eq!(reasons(&o), vec![(Reason::MalformedPayload, None)]);
        let o = classify(
            "d-1",
            false,
            b"{\"readings\":[]}",
            Some(&assigned()),
            now(),
            &TimePolicy::default(),
        );
        assert_eq!(reasons(&o), vec![(Reason::EmptyBatch, None)]);
    }
}
