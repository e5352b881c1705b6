//! A scenario: who the cohort is, what happens to them, and how their
//! devices misbehave. Read from TOML (`vitalwatch-sim generate --scenario
//! cohort.toml`); every field has a default, unknown keys are errors.
//!
//! ```toml
//! seed = 7
//! patients = 1000
//! days = 30
//! [conditions]          # shares of the cohort
//! heart_failure = 0.2
//! [events]              # chance that a patient who can have it has one
//! hypoxaemia = 0.3
//! [[event]]             # or exactly this one
//! patient = 3
//! kind = "sepsis"
//! start_hours = 40
//! [faults]
//! duplicate = 0.01
//! ```

use serde::{Deserialize, Serialize};

/// A scenario.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// The same seed gives byte-identical readings and ground truth.
    pub seed: u64,
    pub patients: usize,
    /// Patient time covered, in days.
    pub days: f64,
    /// Prefix of patient and device ids (`{prefix}-p00001`, `{prefix}-p00001-wearable`).
    pub prefix: String,
    pub conditions: Conditions,
    pub devices: Devices,
    /// Chance per patient (who can have it) of one event of each kind.
    pub events: EventRates,
    /// Events placed by hand, in addition.
    pub event: Vec<PlacedEvent>,
    pub faults: Faults,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            seed: 1,
            patients: 20,
            days: 3.0,
            prefix: "sim".into(),
            conditions: Conditions::default(),
            devices: Devices::default(),
            events: EventRates::default(),
            event: Vec::new(),
            faults: Faults::default(),
        }
    }
}

/// Shares of the cohort with each condition (normalised to sum to 1).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Conditions {
    pub healthy: f64,
    pub hypertension: f64,
    pub heart_failure: f64,
    pub copd: f64,
    pub post_surgical: f64,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            healthy: 0.25,
            hypertension: 0.3,
            heart_failure: 0.2,
            copd: 0.15,
            post_surgical: 0.1,
        }
    }
}

/// How often devices measure.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Devices {
    /// Seconds between a wearable's readings of heart rate, SpO2 and
    /// respiratory rate (real wearables: a few seconds; long accelerated
    /// cohorts: minutes).
    pub wearable_interval_seconds: u32,
    /// Minutes a wearable collects readings before uploading them in one
    /// batch (phones sync wearables in bursts); 0 uploads each at once.
    pub wearable_upload_minutes: u32,
    /// Spot checks a day on a pulse oximeter.
    pub oximeter_checks_per_day: u32,
    /// Chance a patient skips a scheduled measurement (forgets, travels).
    pub skip: f64,
}

impl Default for Devices {
    fn default() -> Self {
        Devices {
            wearable_interval_seconds: 300,
            wearable_upload_minutes: 0,
            oximeter_checks_per_day: 3,
            skip: 0.05,
        }
    }
}

/// Chance per eligible patient of one event of each kind over the run.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventRates {
    pub hypoxaemia: f64,
    pub hypertensive_crisis: f64,
    pub heart_failure_decompensation: f64,
    pub sepsis: f64,
    pub tachycardia: f64,
}

impl Default for EventRates {
    fn default() -> Self {
        EventRates {
            hypoxaemia: 0.15,
            hypertensive_crisis: 0.1,
            heart_failure_decompensation: 0.15,
            sepsis: 0.05,
            tachycardia: 0.05,
        }
    }
}

/// One event placed by hand.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlacedEvent {
    /// Patient index, from 0.
    pub patient: usize,
    pub kind: crate::model::EventKind,
    /// Hours after the scenario's start.
    pub start_hours: f64,
}

/// Device faults and artifacts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Share of wearable SpO2 readings that are motion artifacts (a drop,
    /// flagged `motion_artifact`).
    pub motion_artifact: f64,
    /// Share of cuff readings that fail (nonsense values flagged `cuff_error`).
    pub cuff_error: f64,
    /// Share of batches sent twice (a QoS 1 resend: same seq, same bytes).
    pub duplicate: f64,
    /// Share of batches sent as bytes that are not a payload.
    pub malformed: f64,
    /// Chance per device and day of going offline for 2 to 12 hours, then
    /// flushing the backlog in one batch (late, out of order).
    pub offline_per_day: f64,
    /// Share of devices whose clock is off, by up to two minutes.
    pub clock_skew: f64,
    /// Share of wearables and scales that stop for good at a random time
    /// (ground truth: `device_silent`, which missing-data rules should catch).
    pub silent: f64,
    /// Devices not in the registry that publish anyway.
    pub unknown_devices: usize,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            motion_artifact: 0.02,
            cuff_error: 0.02,
            duplicate: 0.01,
            malformed: 0.001,
            offline_per_day: 0.01,
            clock_skew: 0.05,
            silent: 0.01,
            unknown_devices: 1,
        }
    }
}

impl Scenario {
    /// From TOML text; `Err` says what is wrong.
    pub fn from_toml(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.check()?;
        Ok(s)
    }

    /// Checks the numbers make sense.
    pub fn check(&self) -> Result<(), String> {
        if self.patients == 0 || self.patients > 1_000_000 {
            return Err("patients is 1 to 1,000,000".into());
        }
        if !(self.days > 0.0 && self.days <= 365.0) {
            return Err("days is more than 0 and at most 365".into());
        }
        if self.prefix.is_empty()
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err("prefix is letters, digits and '-'".into());
        }
        if self.devices.wearable_interval_seconds == 0 {
            return Err("devices.wearable_interval_seconds is at least 1".into());
        }
        let c = &self.conditions;
        let shares = [
            c.healthy,
            c.hypertension,
            c.heart_failure,
            c.copd,
            c.post_surgical,
        ];
        if shares.iter().any(|s| !(s.is_finite() && *s >= 0.0)) || shares.iter().sum::<f64>() <= 0.0
        {
            return Err("condition shares are non-negative and not all 0".into());
        }
        let f = &self.faults;
        let e = &self.events;
        for (name, p) in [
            ("devices.skip", self.devices.skip),
            ("faults.motion_artifact", f.motion_artifact),
            ("faults.cuff_error", f.cuff_error),
            ("faults.duplicate", f.duplicate),
            ("faults.malformed", f.malformed),
            ("faults.offline_per_day", f.offline_per_day),
            ("faults.clock_skew", f.clock_skew),
            ("faults.silent", f.silent),
            ("events.hypoxaemia", e.hypoxaemia),
            ("events.hypertensive_crisis", e.hypertensive_crisis),
            (
                "events.heart_failure_decompensation",
                e.heart_failure_decompensation,
            ),
            ("events.sepsis", e.sepsis),
            ("events.tachycardia", e.tachycardia),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} is a share or chance, 0 to 1"));
            }
        }
        for ev in &self.event {
            if ev.patient >= self.patients {
                return Err(format!(
                    "event for patient {}: there are {} patients",
                    ev.patient, self.patients
                ));
            }
            if !(ev.start_hours >= 0.0 && ev.start_hours < self.days * 24.0) {
                return Err(format!(
                    "event start {} h is outside the scenario's {} days",
                    ev.start_hours, self.days
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_with_defaults_and_refuse_nonsense() {
        let s = Scenario::from_toml(
            "seed = 3\npatients = 5\ndays = 2\n[faults]\nduplicate = 0.5\n[[event]]\npatient = 1\nkind = \"sepsis\"\nstart_hours = 10\n",
        )
        .expect("valid");
        assert_eq!((s.seed, s.patients, s.faults.duplicate), (3, 5, 0.5));
        assert_eq!(s.devices, Devices::default());
        for bad in [
            "patients = 0",
            "days = -1",
            "colour = 1",
            "[faults]\nduplicate = 2",
            "[[event]]\npatient = 99\nkind = \"sepsis\"\nstart_hours = 1",
            "[[event]]\npatient = 0\nkind = \"flu\"\nstart_hours = 1",
        ] {
            assert!(Scenario::from_toml(bad).is_err(), "{bad}");
        }
    }
}

/// A generated run: its scenario and when it starts, so that replaying and
/// scoring regenerate exactly what was planned (`run.toml`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    pub start: chrono::DateTime<chrono::Utc>,
    pub scenario: Scenario,
}
