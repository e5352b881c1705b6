//! Validation: a [`RawReading`] becomes a [`Reading`] in stored units, or a
//! [`Rejection`] whose [`Reason`] is what the dead-letter record carries.
//!
//! Pure and synchronous; `now` is passed in so tests and replays control time.

use std::fmt;

use chrono::{DateTime, Duration, Utc};

use crate::catalogue::{Acvpu, DIASTOLIC, Metric, SYSTOLIC, Shape};
use crate::payload::RawReading;
use crate::reading::{Measurement, Quality, Reading};

/// Why input was rejected. The string form (`as_str`) is the `reason` header
/// of the dead-letter record and the `reason` label of the rejection metric,
/// so it never changes once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The payload is neither a protobuf nor a JSON reading batch.
    MalformedPayload,
    /// The payload decoded but holds no readings.
    EmptyBatch,
    /// The topic does not name a device readings topic.
    BadTopic,
    /// The device is not in the registry, or not active.
    UnknownDevice,
    /// The device is registered but not assigned to a patient.
    UnassignedDevice,
    /// The device id inside the payload is not the one in the topic.
    DeviceMismatch,
    UnknownMetric,
    /// The unit is not one accepted for the metric.
    BadUnit,
    /// A value, component or ACVPU letter is missing or not understood.
    MissingValue,
    /// Outside the metric's plausible range (or not a finite number).
    OutOfRange,
    /// Systolic not above diastolic.
    InconsistentBloodPressure,
    UnknownFlag,
    MissingTimestamp,
    /// Dated further in the future than the allowed clock skew.
    FutureTimestamp,
    /// Older than the retention window.
    TooOld,
    /// The batch already holds this metric at this instant with another value.
    ConflictingReading,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::MalformedPayload,
        Reason::EmptyBatch,
        Reason::BadTopic,
        Reason::UnknownDevice,
        Reason::UnassignedDevice,
        Reason::DeviceMismatch,
        Reason::UnknownMetric,
        Reason::BadUnit,
        Reason::MissingValue,
        Reason::OutOfRange,
        Reason::InconsistentBloodPressure,
        Reason::UnknownFlag,
        Reason::MissingTimestamp,
        Reason::FutureTimestamp,
        Reason::TooOld,
        Reason::ConflictingReading,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedPayload => "malformed_payload",
            Reason::EmptyBatch => "empty_batch",
            Reason::BadTopic => "bad_topic",
            Reason::UnknownDevice => "unknown_device",
            Reason::UnassignedDevice => "unassigned_device",
            Reason::DeviceMismatch => "device_mismatch",
            Reason::UnknownMetric => "unknown_metric",
            Reason::BadUnit => "bad_unit",
            Reason::MissingValue => "missing_value",
            Reason::OutOfRange => "out_of_range",
            Reason::InconsistentBloodPressure => "inconsistent_blood_pressure",
            Reason::UnknownFlag => "unknown_flag",
            Reason::MissingTimestamp => "missing_timestamp",
            Reason::FutureTimestamp => "future_timestamp",
            Reason::TooOld => "too_old",
            Reason::ConflictingReading => "conflicting_reading",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected reading or payload: the reason, and a short detail for people.
/// The detail names fields and limits, never patient data beyond the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Limits on timestamps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimePolicy {
    /// How far ahead of our clock a device's clock may run.
    pub max_future_skew: Duration,
    /// How old a reading may be: the retention window.
    pub max_age: Duration,
}

impl Default for TimePolicy {
    fn default() -> Self {
        TimePolicy {
            max_future_skew: Duration::minutes(5),
            max_age: Duration::days(90),
        }
    }
}

/// Validates one reading as received at `now`.
pub fn validate(
    raw: &RawReading,
    now: DateTime<Utc>,
    policy: &TimePolicy,
) -> Result<Reading, Rejection> {
    use Reason::*;
    let metric: Metric = raw
        .metric
        .parse()
        .map_err(|_| Rejection::new(UnknownMetric, format!("metric {:?}", raw.metric)))?;
    let info = metric.info();

    let measured_at = raw
        .measured_at
        .ok_or_else(|| Rejection::new(MissingTimestamp, "measured_at is missing"))?;
    if measured_at > now + policy.max_future_skew {
        return Err(Rejection::new(
            FutureTimestamp,
            format!(
                "measured_at {measured_at} is ahead of received time {now} by more than {}s",
                policy.max_future_skew.num_seconds()
            ),
        ));
    }
    if measured_at < now - policy.max_age {
        return Err(Rejection::new(
            TooOld,
            format!(
                "measured_at {measured_at} is older than {} days",
                policy.max_age.num_days()
            ),
        ));
    }

    let mut quality = Quality::default();
    for f in &raw.flags {
        quality.insert(
            Quality::from_name(f)
                .ok_or_else(|| Rejection::new(UnknownFlag, format!("flag {f:?}")))?,
        );
    }

    let convert = |v: f64| -> Result<f64, Rejection> {
        metric
            .to_stored_unit(v, raw.unit.as_deref())
            .ok_or_else(|| {
                Rejection::new(
                    BadUnit,
                    format!(
                        "unit {:?} is not accepted for {metric} (stored as {:?})",
                        raw.unit.as_deref().unwrap_or(""),
                        info.unit
                    ),
                )
            })
    };
    let check = |what: &str, v: f64, range: crate::catalogue::Range| -> Result<f64, Rejection> {
        if range.contains(v) {
            Ok(v)
        } else {
            Err(Rejection::new(
                OutOfRange,
                format!(
                    "{what} {v} {} is outside {}..={}",
                    info.unit, range.min, range.max
                ),
            ))
        }
    };

    let measurement = match info.shape {
        Shape::Scalar | Shape::Flag => {
            let v = raw.value.ok_or_else(|| {
                Rejection::new(MissingValue, format!("{metric} needs a numeric value"))
            })?;
            let v = check(metric.name(), convert(v)?, info.range)?;
            if info.shape == Shape::Flag && v != 0.0 && v != 1.0 {
                return Err(Rejection::new(
                    OutOfRange,
                    format!("{metric} must be 0 or 1, got {v}"),
                ));
            }
            Measurement::Scalar(v)
        }
        Shape::BloodPressure => {
            let get = |name: &str| {
                raw.components
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| {
                        Rejection::new(
                            MissingValue,
                            format!("blood_pressure needs a {name} component"),
                        )
                    })
            };
            let systolic = check(SYSTOLIC, convert(get(SYSTOLIC)?)?, info.range)?;
            let diastolic = check(
                DIASTOLIC,
                convert(get(DIASTOLIC)?)?,
                info.range2.unwrap_or(info.range),
            )?;
            if systolic <= diastolic {
                return Err(Rejection::new(
                    InconsistentBloodPressure,
                    format!("systolic {systolic} is not above diastolic {diastolic}"),
                ));
            }
            Measurement::BloodPressure {
                systolic,
                diastolic,
            }
        }
        Shape::Acvpu => {
            let letter = raw.text_value.as_deref().unwrap_or("");
            let a = Acvpu::parse(letter).ok_or_else(|| {
                Rejection::new(
                    MissingValue,
                    format!("consciousness needs one of A, C, V, P, U, got {letter:?}"),
                )
            })?;
            Measurement::Consciousness(a)
        }
    };
    Ok(Reading {
        metric,
        measurement,
        measured_at,
        quality,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 29, 8, 0, 0)
            .single()
            .unwrap_or_default()
    }

    fn raw(metric: &str, value: f64, unit: Option<&str>) -> RawReading {
        RawReading {
            metric: metric.into(),
            value: Some(value),
            unit: unit.map(Into::into),
            measured_at: Some(now() - Duration::minutes(1)),
            ..Default::default()
        }
    }

    fn reason(r: &RawReading) -> Option<Reason> {
        validate(r, now(), &TimePolicy::default())
            .err()
            .map(|e| e.reason)
    }

    #[test]
    fn a_plain_reading_passes_and_converts() {
        let r = validate(
            &raw("body_temperature", 98.6, Some("[degF]")),
            now(),
            &TimePolicy::default(),
        )
        .expect("valid");
        match r.measurement {
            Measurement::Scalar(c) => assert!((c - 37.0).abs() < 1e-9, "{c}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn each_reason_is_reported() {
        assert_eq!(
            reason(&raw("heart_rate", 900.0, None)),
            Some(Reason::OutOfRange)
        );
        assert_eq!(
            reason(&raw("heart_rate", f64::NAN, None)),
            Some(Reason::OutOfRange)
        );
        assert_eq!(
            reason(&raw("pulse", 70.0, None)),
            Some(Reason::UnknownMetric)
        );
        assert_eq!(
            reason(&raw("heart_rate", 70.0, Some("Hz"))),
            Some(Reason::BadUnit)
        );
        assert_eq!(
            reason(&raw("supplemental_oxygen", 0.5, None)),
            Some(Reason::OutOfRange)
        );
        let mut r = raw("heart_rate", 70.0, None);
        r.value = None;
        assert_eq!(reason(&r), Some(Reason::MissingValue));
        let mut r = raw("heart_rate", 70.0, None);
        r.measured_at = None;
        assert_eq!(reason(&r), Some(Reason::MissingTimestamp));
        let mut r = raw("heart_rate", 70.0, None);
        r.measured_at = Some(now() + Duration::minutes(6));
        assert_eq!(reason(&r), Some(Reason::FutureTimestamp));
        r.measured_at = Some(now() + Duration::minutes(4));
        assert_eq!(reason(&r), None, "within the allowed skew");
        r.measured_at = Some(now() - Duration::days(91));
        assert_eq!(reason(&r), Some(Reason::TooOld));
        let mut r = raw("spo2", 93.0, None);
        r.flags = vec!["shaky".into()];
        assert_eq!(reason(&r), Some(Reason::UnknownFlag));
    }

    #[test]
    fn blood_pressure_needs_both_components_in_order() {
        let mut r = raw("blood_pressure", 0.0, Some("mm[Hg]"));
        r.value = None;
        r.components = vec![("systolic".into(), 142.0), ("diastolic".into(), 91.0)];
        let ok = validate(&r, now(), &TimePolicy::default()).expect("valid");
        assert_eq!(
            ok.measurement,
            Measurement::BloodPressure {
                systolic: 142.0,
                diastolic: 91.0
            }
        );
        r.components = vec![("systolic".into(), 80.0), ("diastolic".into(), 91.0)];
        assert_eq!(reason(&r), Some(Reason::InconsistentBloodPressure));
        r.components = vec![("systolic".into(), 120.0)];
        assert_eq!(reason(&r), Some(Reason::MissingValue));
    }

    #[test]
    fn flags_are_kept() {
        let mut r = raw("spo2", 84.0, Some("%"));
        r.flags = vec!["motion_artifact".into()];
        let ok = validate(&r, now(), &TimePolicy::default()).expect("valid");
        assert!(ok.quality.contains(Quality::MOTION_ARTIFACT));
        assert!(!ok.quality.contains(Quality::LOW_PERFUSION));
    }

    #[test]
    fn consciousness_takes_acvpu_letters() {
        let mut r = raw("consciousness", 0.0, None);
        r.value = None;
        r.text_value = Some("V".into());
        let ok = validate(&r, now(), &TimePolicy::default()).expect("valid");
        assert_eq!(ok.measurement, Measurement::Consciousness(Acvpu::Voice));
        r.text_value = Some("asleep".into());
        assert_eq!(reason(&r), Some(Reason::MissingValue));
    }

    #[test]
    fn reason_strings_are_unique() {
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
