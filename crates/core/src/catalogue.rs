//! The metric catalogue: what we accept, how it is coded (LOINC, UCUM, as FHIR
//! R4 vital signs use them), what unit we store, and what is physically
//! plausible.
//!
//! Plausible ranges are *not* alarm thresholds. They reject what cannot be a
//! living patient's measurement (a heart rate of 900 is a device or transport
//! fault), so that such a value never reaches a chart or an alert rule.

use std::fmt;
use std::str::FromStr;

use crate::proto;

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    HeartRate,
    Spo2,
    BloodPressure,
    RespiratoryRate,
    BodyTemperature,
    BodyWeight,
    BloodGlucose,
    SupplementalOxygen,
    Consciousness,
}

/// How a metric's value is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One number in the stored unit.
    Scalar,
    /// Systolic and diastolic components (blood pressure).
    BloodPressure,
    /// 0 (room air) or 1 (supplemental oxygen).
    Flag,
    /// An ACVPU level.
    Acvpu,
}

/// An inclusive plausible range, in the stored unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

impl Range {
    pub fn contains(&self, v: f64) -> bool {
        v >= self.min && v <= self.max
    }
}

/// A unit accepted on input, with its conversion to the stored unit.
#[derive(Debug, Clone, Copy)]
pub struct AcceptedUnit {
    /// UCUM code as the device sends it.
    pub ucum: &'static str,
    /// `stored = value * factor + offset`.
    pub factor: f64,
    pub offset: f64,
}

const fn unit(ucum: &'static str) -> AcceptedUnit {
    AcceptedUnit {
        ucum,
        factor: 1.0,
        offset: 0.0,
    }
}

/// Everything the pipeline knows about one metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    pub metric: Metric,
    /// The name on the wire and in storage (`heart_rate`).
    pub name: &'static str,
    /// Human-readable name, as FHIR's `display`.
    pub display: &'static str,
    /// LOINC codes; the first is the primary one (pulse oximetry carries two).
    pub loinc: &'static [&'static str],
    /// The UCUM unit values are stored in.
    pub unit: &'static str,
    /// Units accepted on input; the first is the stored unit.
    pub accepted: &'static [AcceptedUnit],
    pub shape: Shape,
    /// Plausible range of the value (for blood pressure: of systolic).
    pub range: Range,
    /// Plausible range of the second component (diastolic), when there is one.
    pub range2: Option<Range>,
}

/// Blood-pressure component names, as on the wire and in storage.
pub const SYSTOLIC: &str = "systolic";
pub const DIASTOLIC: &str = "diastolic";
/// LOINC codes of the blood-pressure components.
pub const LOINC_SYSTOLIC: &str = "8480-6";
pub const LOINC_DIASTOLIC: &str = "8462-4";

/// 1 mmol/L of glucose in mg/dL (molar mass 180.16 g/mol).
const GLUCOSE_MMOL_TO_MGDL: f64 = 18.016;
/// 1 international avoirdupois pound in kilograms (exact by definition).
const POUND_KG: f64 = 0.453_592_37;
/// 1 kPa in mmHg.
const KPA_MMHG: f64 = 7.500_615_75;

static CATALOGUE: [MetricInfo; 9] = [
    MetricInfo {
        metric: Metric::HeartRate,
        name: "heart_rate",
        display: "Heart rate",
        loinc: &["8867-4"],
        unit: "/min",
        accepted: &[unit("/min"), unit("{beats}/min")],
        shape: Shape::Scalar,
        range: Range {
            min: 20.0,
            max: 300.0,
        },
        range2: None,
    },
    MetricInfo {
        metric: Metric::Spo2,
        name: "spo2",
        display: "Oxygen saturation in Arterial blood by Pulse oximetry",
        loinc: &["59408-5", "2708-6"],
        unit: "%",
        accepted: &[unit("%")],
        shape: Shape::Scalar,
        range: Range {
            min: 50.0,
            max: 100.0,
        },
        range2: None,
    },
    MetricInfo {
        metric: Metric::BloodPressure,
        name: "blood_pressure",
        display: "Blood pressure panel with all children optional",
        loinc: &["85354-9"],
        unit: "mm[Hg]",
        accepted: &[
            unit("mm[Hg]"),
            AcceptedUnit {
                ucum: "kPa",
                factor: KPA_MMHG,
                offset: 0.0,
            },
        ],
        shape: Shape::BloodPressure,
        range: Range {
            min: 40.0,
            max: 300.0,
        },
        range2: Some(Range {
            min: 20.0,
            max: 200.0,
        }),
    },
    MetricInfo {
        metric: Metric::RespiratoryRate,
        name: "respiratory_rate",
        display: "Respiratory rate",
        loinc: &["9279-1"],
        unit: "/min",
        accepted: &[unit("/min"), unit("{breaths}/min")],
        shape: Shape::Scalar,
        range: Range {
            min: 2.0,
            max: 80.0,
        },
        range2: None,
    },
    MetricInfo {
        metric: Metric::BodyTemperature,
        name: "body_temperature",
        display: "Body temperature",
        loinc: &["8310-5"],
        unit: "Cel",
        accepted: &[
            unit("Cel"),
            AcceptedUnit {
                ucum: "[degF]",
                factor: 5.0 / 9.0,
                offset: -32.0 * 5.0 / 9.0,
            },
        ],
        shape: Shape::Scalar,
        range: Range {
            min: 25.0,
            max: 45.0,
        },
        range2: None,
    },
    MetricInfo {
        metric: Metric::BodyWeight,
        name: "body_weight",
        display: "Body weight",
        loinc: &["29463-7"],
        unit: "kg",
        accepted: &[
            unit("kg"),
            AcceptedUnit {
                ucum: "[lb_av]",
                factor: POUND_KG,
                offset: 0.0,
            },
            AcceptedUnit {
                ucum: "g",
                factor: 0.001,
                offset: 0.0,
            },
        ],
        shape: Shape::Scalar,
        range: Range {
            min: 0.5,
            max: 500.0,
        },
        range2: None,
    },
    MetricInfo {
        metric: Metric::BloodGlucose,
        name: "blood_glucose",
        display: "Glucose [Mass/volume] in Blood",
        loinc: &["2339-0"],
        unit: "mg/dL",
        accepted: &[
            unit("mg/dL"),
            AcceptedUnit {
                ucum: "mmol/L",
                factor: GLUCOSE_MMOL_TO_MGDL,
                offset: 0.0,
            },
        ],
        shape: Shape::Scalar,
        range: Range {
            min: 10.0,
            max: 1500.0,
        },
        range2: None,
    },
    MetricInfo {
        metric: Metric::SupplementalOxygen,
        name: "supplemental_oxygen",
        display: "Inhaled oxygen (on supplemental oxygen)",
        loinc: &["3150-0"],
        unit: "1",
        accepted: &[unit("1")],
        shape: Shape::Flag,
        range: Range { min: 0.0, max: 1.0 },
        range2: None,
    },
    MetricInfo {
        metric: Metric::Consciousness,
        name: "consciousness",
        display: "Level of consciousness (ACVPU)",
        loinc: &["80288-4"],
        unit: "{ACVPU}",
        accepted: &[unit("{ACVPU}")],
        shape: Shape::Acvpu,
        range: Range { min: 0.0, max: 4.0 },
        range2: None,
    },
];

impl Metric {
    /// Every metric, in catalogue order.
    pub fn all() -> impl Iterator<Item = Metric> {
        CATALOGUE.iter().map(|m| m.metric)
    }

    pub fn info(self) -> &'static MetricInfo {
        // The catalogue lists every variant exactly once, in declaration order
        // (checked by a unit test), so the index is always in bounds.
        &CATALOGUE[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The protobuf enum value.
    pub fn to_proto(self) -> proto::Metric {
        match self {
            Metric::HeartRate => proto::Metric::HeartRate,
            Metric::Spo2 => proto::Metric::Spo2,
            Metric::BloodPressure => proto::Metric::BloodPressure,
            Metric::RespiratoryRate => proto::Metric::RespiratoryRate,
            Metric::BodyTemperature => proto::Metric::BodyTemperature,
            Metric::BodyWeight => proto::Metric::BodyWeight,
            Metric::BloodGlucose => proto::Metric::BloodGlucose,
            Metric::SupplementalOxygen => proto::Metric::SupplementalOxygen,
            Metric::Consciousness => proto::Metric::Consciousness,
        }
    }

    /// From the protobuf enum; `None` for `METRIC_UNSPECIFIED`.
    pub fn from_proto(m: proto::Metric) -> Option<Metric> {
        Some(match m {
            proto::Metric::Unspecified => return None,
            proto::Metric::HeartRate => Metric::HeartRate,
            proto::Metric::Spo2 => Metric::Spo2,
            proto::Metric::BloodPressure => Metric::BloodPressure,
            proto::Metric::RespiratoryRate => Metric::RespiratoryRate,
            proto::Metric::BodyTemperature => Metric::BodyTemperature,
            proto::Metric::BodyWeight => Metric::BodyWeight,
            proto::Metric::BloodGlucose => Metric::BloodGlucose,
            proto::Metric::SupplementalOxygen => Metric::SupplementalOxygen,
            proto::Metric::Consciousness => Metric::Consciousness,
        })
    }

    /// Converts `value` given in `unit` (empty or `None`: the stored unit) to
    /// the stored unit. `None` when the unit is not accepted for this metric.
    pub fn to_stored_unit(self, value: f64, unit: Option<&str>) -> Option<f64> {
        let info = self.info();
        let unit = match unit {
            None | Some("") => return Some(value),
            Some(u) => u,
        };
        let a = info.accepted.iter().find(|a| a.ucum == unit)?;
        Some(value * a.factor + a.offset)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown metric {0:?}")]
pub struct UnknownMetric(pub String);

impl FromStr for Metric {
    type Err = UnknownMetric;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CATALOGUE
            .iter()
            .find(|m| m.name == s)
            .map(|m| m.metric)
            .ok_or_else(|| UnknownMetric(s.to_owned()))
    }
}

/// Level of consciousness on the ACVPU scale (NEWS2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Acvpu {
    Alert = 0,
    NewConfusion = 1,
    Voice = 2,
    Pain = 3,
    Unresponsive = 4,
}

impl Acvpu {
    pub fn parse(s: &str) -> Option<Acvpu> {
        Some(match s {
            "A" => Acvpu::Alert,
            "C" => Acvpu::NewConfusion,
            "V" => Acvpu::Voice,
            "P" => Acvpu::Pain,
            "U" => Acvpu::Unresponsive,
            _ => return None,
        })
    }

    pub fn letter(self) -> &'static str {
        ["A", "C", "V", "P", "U"][self as usize]
    }

    /// The stored numeric code (0 = alert .. 4 = unresponsive).
    pub fn code(self) -> f64 {
        f64::from(self as u8)
    }

    pub fn from_code(code: f64) -> Option<Acvpu> {
        [
            Acvpu::Alert,
            Acvpu::NewConfusion,
            Acvpu::Voice,
            Acvpu::Pain,
            Acvpu::Unresponsive,
        ]
        .into_iter()
        .find(|a| a.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn catalogue_is_indexed_by_variant() {
        for (i, m) in CATALOGUE.iter().enumerate() {
            assert_eq!(m.metric as usize, i, "{} is out of place", m.name);
            assert_eq!(
                m.accepted[0].ucum, m.unit,
                "{}: first accepted unit must be the stored one",
                m.name
            );
            assert_eq!(m.name.parse::<Metric>(), Ok(m.metric));
            assert_eq!(Metric::from_proto(m.metric.to_proto()), Some(m.metric));
        }
        assert_eq!(Metric::all().count(), 9);
    }

    #[test]
    fn loinc_codes_follow_fhir_vital_signs() {
        assert_eq!(Metric::HeartRate.info().loinc, &["8867-4"]);
        assert_eq!(Metric::Spo2.info().loinc, &["59408-5", "2708-6"]);
        assert_eq!(Metric::BloodPressure.info().loinc, &["85354-9"]);
        assert_eq!(Metric::RespiratoryRate.info().loinc, &["9279-1"]);
        assert_eq!(Metric::BodyTemperature.info().loinc, &["8310-5"]);
        assert_eq!(Metric::BodyWeight.info().loinc, &["29463-7"]);
        assert_eq!(Metric::BloodGlucose.info().loinc, &["2339-0"]);
    }

    #[test]
    fn fahrenheit_converts_to_celsius() {
        let c = Metric::BodyTemperature.to_stored_unit(98.6, Some("[degF]"));
        assert!(close(c.unwrap_or(f64::NAN), 37.0, 1e-9), "{c:?}");
        let c = Metric::BodyTemperature.to_stored_unit(32.0, Some("[degF]"));
        assert!(close(c.unwrap_or(f64::NAN), 0.0, 1e-9), "{c:?}");
        assert_eq!(
            Metric::BodyTemperature.to_stored_unit(37.2, Some("Cel")),
            Some(37.2)
        );
    }

    #[test]
    fn pounds_and_grams_convert_to_kilograms() {
        let kg = Metric::BodyWeight
            .to_stored_unit(154.0, Some("[lb_av]"))
            .unwrap_or(f64::NAN);
        assert!(close(kg, 69.85, 0.005), "{kg}");
        let kg = Metric::BodyWeight
            .to_stored_unit(70_500.0, Some("g"))
            .unwrap_or(f64::NAN);
        assert!(close(kg, 70.5, 1e-9), "{kg}");
    }

    #[test]
    fn glucose_and_pressure_convert() {
        let mg = Metric::BloodGlucose
            .to_stored_unit(5.5, Some("mmol/L"))
            .unwrap_or(f64::NAN);
        assert!(close(mg, 99.09, 0.01), "{mg}");
        let mm = Metric::BloodPressure
            .to_stored_unit(16.0, Some("kPa"))
            .unwrap_or(f64::NAN);
        assert!(close(mm, 120.0, 0.01), "{mm}");
    }

    #[test]
    fn missing_unit_means_stored_unit_and_unknown_unit_is_refused() {
        assert_eq!(Metric::HeartRate.to_stored_unit(72.0, None), Some(72.0));
        assert_eq!(Metric::HeartRate.to_stored_unit(72.0, Some("")), Some(72.0));
        assert_eq!(Metric::HeartRate.to_stored_unit(72.0, Some("Hz")), None);
        // A valid UCUM unit of another metric is still wrong here.
        assert_eq!(Metric::Spo2.to_stored_unit(97.0, Some("kg")), None);
    }

    #[test]
    fn ranges_reject_the_impossible() {
        assert!(Metric::HeartRate.info().range.contains(72.0));
        assert!(!Metric::HeartRate.info().range.contains(900.0));
        assert!(!Metric::Spo2.info().range.contains(101.0));
        assert!(!Metric::BodyTemperature.info().range.contains(f64::NAN));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            "glucose".parse::<Metric>(),
            Err(UnknownMetric("glucose".into()))
        );
    }

    #[test]
    fn acvpu_round_trips() {
        for l in ["A", "C", "V", "P", "U"] {
            let a = Acvpu::parse(l).unwrap_or(Acvpu::Alert);
            assert_eq!(a.letter(), l);
            assert_eq!(Acvpu::from_code(a.code()), Some(a));
        }
        assert_eq!(Acvpu::parse("X"), None);
    }
}
