//! The pure heart of ingest: one MQTT message in, what to send where out.
//!
//! No I/O: the registry answer and the clock are passed in.

use chrono::{DateTime, Utc};
use vitalwatch_core::payload::{self, DecodeError, PayloadFormat};
use vitalwatch_core::reading::Batch;
use vitalwatch_core::validate::{self, Reason, Rejection, TimePolicy};
use vitalwatch_store::registry::DeviceStatus;

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
    /// The valid readings, for `rpm.readings.v1`, keyed by `patient_id`.
    pub accepted: Option<Batch>,
    /// Everything else, for `rpm.deadletter.v1`.
    pub rejected: Vec<Rejected>,
}

impl Outcome {
    fn whole(reason: Reason, detail: impl Into<String>) -> Outcome {
        Outcome { accepted: None, rejected: vec![Rejected { rejection: Rejection::new(reason, detail), reading_index: None }] }
    }
}

/// Classifies one message published on `device_id`'s readings topic.
pub fn classify(
    device_id: &str,
    json_topic: bool,
    payload: &[u8],
    status: Option<&DeviceStatus>,
    received_at: DateTime<Utc>,
    policy: &TimePolicy,
) -> Outcome {
    let patient_id = match status {
        None => return Outcome::whole(Reason::UnknownDevice, format!("device {device_id:?} is not registered")),
        Some(DeviceStatus::Inactive) => {
            return Outcome::whole(Reason::UnknownDevice, format!("device {device_id:?} is deactivated"));
        }
        Some(DeviceStatus::Unassigned) => {
            return Outcome::whole(Reason::UnassignedDevice, format!("device {device_id:?} is not assigned to a patient"));
        }
        Some(DeviceStatus::Assigned { patient_id }) => patient_id,
    };
    let batch = match payload::decode(payload, PayloadFormat::detect(json_topic, payload)) {
        Ok(b) => b,
        Err(DecodeError::Empty) => return Outcome::whole(Reason::EmptyBatch, "the batch holds no readings"),
        Err(e) => return Outcome::whole(Reason::MalformedPayload, e.to_string()),
    };
    if let Some(inner) = batch.device_id.as_deref()
        && inner != device_id
    {
        return Outcome::whole(
            Reason::DeviceMismatch,
            format!("payload names device {inner:?} but was published on device {device_id:?}'s topic"),
        );
    }
    let mut readings = Vec::with_capacity(batch.readings.len());
    let mut rejected = Vec::new();
    for (i, raw) in batch.readings.iter().enumerate() {
        match validate::validate(raw, received_at, policy) {
            Ok(r) => readings.push(r),
            Err(rejection) => rejected.push(Rejected { rejection, reading_index: Some(i) }),
        }
    }
    let accepted = (!readings.is_empty()).then(|| Batch {
        device_id: device_id.to_owned(),
        patient_id: patient_id.clone(),
        seq: batch.seq,
        received_at,
        readings,
    });
    Outcome { accepted, rejected }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 29, 8, 0, 0).single().unwrap_or_default()
    }

    fn assigned() -> DeviceStatus {
        DeviceStatus::Assigned { patient_id: "p-1".into() }
    }

    fn reasons(o: &Outcome) -> Vec<(Reason, Option<usize>)> {
        o.rejected.iter().map(|r| (r.rejection.reason, r.reading_index)).collect()
    }

    const GOOD_AND_BAD: &str = r#"{"device_id": "d-1", "seq": 3, "readings": [
        {"metric": "heart_rate", "value": 72, "measured_at": "2026-11-29T07:59:00Z"},
        {"metric": "heart_rate", "value": 900, "measured_at": "2026-11-29T07:59:01Z"},
        {"metric": "pulse", "value": 70, "measured_at": "2026-11-29T07:59:02Z"}
    ]}"#;

    #[test]
    fn bad_readings_do_not_take_the_batch_down() {
        let o = classify("d-1", false, GOOD_AND_BAD.as_bytes(), Some(&assigned()), now(), &TimePolicy::default());
        let b = o.accepted.as_ref().expect("one good reading");
        assert_eq!(b.patient_id, "p-1");
        assert_eq!(b.device_id, "d-1");
        assert_eq!(b.seq, Some(3));
        assert_eq!(b.received_at, now());
        assert_eq!(b.readings.len(), 1);
        assert_eq!(reasons(&o), vec![(Reason::OutOfRange, Some(1)), (Reason::UnknownMetric, Some(2))]);
    }

    #[test]
    fn identity_is_checked_before_anything_else() {
        let p = GOOD_AND_BAD.as_bytes();
        let policy = TimePolicy::default();
        assert_eq!(reasons(&classify("d-1", false, p, None, now(), &policy)), vec![(Reason::UnknownDevice, None)]);
        assert_eq!(
            reasons(&classify("d-1", false, p, Some(&DeviceStatus::Inactive), now(), &policy)),
            vec![(Reason::UnknownDevice, None)]
        );
        assert_eq!(
            reasons(&classify("d-1", false, p, Some(&DeviceStatus::Unassigned), now(), &policy)),
            vec![(Reason::UnassignedDevice, None)]
        );
        let o = classify("d-2", false, p, Some(&assigned()), now(), &policy);
        assert_eq!(reasons(&o), vec![(Reason::DeviceMismatch, None)]);
        assert_eq!(o.accepted, None);
    }

    #[test]
    fn garbage_is_malformed() {
        let o = classify("d-1", false, b"\x08\xff\xff\xff", Some(&assigned()), now(), &TimePolicy::default());
        assert_eq!(reasons(&o), vec![(Reason::MalformedPayload, None)]);
        let o = classify("d-1", true, b"not json", Some(&assigned()), now(), &TimePolicy::default());
        assert_eq!(reasons(&o), vec![(Reason::MalformedPayload, None)]);
        let o = classify("d-1", false, b"{\"readings\":[]}", Some(&assigned()), now(), &TimePolicy::default());
        assert_eq!(reasons(&o), vec![(Reason::EmptyBatch, None)]);
    }
}
