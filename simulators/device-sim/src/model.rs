//! Physiology: a patient's baseline by condition, the circadian rhythm,
//! measurement noise, correlation between metrics, and what clinical events
//! do to them.
//!
//! A value is `baseline + circadian(hour) + event effects + noise`. Fever
//! drives heart rate (+10/min per °C) and respiration (+2/min per °C), as
//! in sepsis. The shapes are simple and documented here; they are meant to
//! exercise the rules as real deteriorations would (gradual onsets,
//! plateaus, recovery), not to be a physiological model.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A patient's main condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Healthy,
    Hypertension,
    HeartFailure,
    Copd,
    PostSurgical,
}

impl Condition {
    pub fn name(self) -> &'static str {
        match self {
            Condition::Healthy => "healthy",
            Condition::Hypertension => "hypertension",
            Condition::HeartFailure => "heart_failure",
            Condition::Copd => "copd",
            Condition::PostSurgical => "post_surgical",
        }
    }
}

/// A patient's resting values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub heart_rate: f64,
    pub spo2: f64,
    pub systolic: f64,
    pub diastolic: f64,
    pub respiratory_rate: f64,
    pub temperature: f64,
    pub weight: f64,
}

fn normal(rng: &mut impl Rng, mean: f64, sd: f64) -> f64 {
    // Box-Muller: two uniforms make one standard normal.
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Measurement noise: a normal deviate with this standard deviation.
pub fn noise(rng: &mut impl Rng, sd: f64) -> f64 {
    normal(rng, 0.0, sd)
}

impl Baseline {
    /// A baseline for a patient with `condition`.
    pub fn draw(condition: Condition, rng: &mut impl Rng) -> Baseline {
        let (hr, spo2, sys, dia, rr, weight) = match condition {
            Condition::Healthy => (
                (68.0, 7.0),
                (97.5, 0.8),
                (118.0, 9.0),
                (76.0, 6.0),
                (14.0, 1.5),
                (76.0, 13.0),
            ),
            Condition::Hypertension => (
                (74.0, 7.0),
                (96.5, 0.8),
                (146.0, 9.0),
                (90.0, 6.0),
                (15.0, 1.5),
                (86.0, 14.0),
            ),
            Condition::HeartFailure => (
                (78.0, 7.0),
                (95.0, 1.0),
                (116.0, 12.0),
                (72.0, 7.0),
                (17.0, 1.5),
                (88.0, 15.0),
            ),
            Condition::Copd => (
                (82.0, 7.0),
                (93.0, 1.0),
                (128.0, 10.0),
                (78.0, 6.0),
                (19.0, 1.5),
                (72.0, 13.0),
            ),
            Condition::PostSurgical => (
                (80.0, 7.0),
                (96.5, 0.8),
                (124.0, 10.0),
                (78.0, 6.0),
                (16.0, 1.5),
                (80.0, 14.0),
            ),
        };
        let n = |rng: &mut _, (m, sd): (f64, f64)| normal(rng, m, sd);
        Baseline {
            heart_rate: n(rng, hr).clamp(50.0, 100.0),
            spo2: n(rng, spo2).clamp(91.5, 99.5),
            systolic: n(rng, sys).clamp(100.0, 165.0),
            diastolic: n(rng, dia).clamp(60.0, 100.0),
            respiratory_rate: n(rng, rr).clamp(11.0, 21.0),
            temperature: n(rng, (36.7, 0.2)).clamp(36.2, 37.2),
            weight: n(rng, weight).clamp(45.0, 160.0),
        }
    }
}

/// A labelled clinical event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// SpO2 falls to the mid 80s for 20 to 90 minutes.
    Hypoxaemia,
    /// Blood pressure above 180/110 for 2 to 8 hours.
    HypertensiveCrisis,
    /// Weight up about 2.5 kg over four days, then SpO2 down, respiration
    /// and heart rate up for the last day and a half.
    HeartFailureDecompensation,
    /// Temperature, heart rate and respiration up, blood pressure and SpO2
    /// down, over a day or two.
    Sepsis,
    /// Heart rate 140 to 160 for half an hour to three hours.
    Tachycardia,
    /// A wearable or scale stops sending for good (a device fault a nurse
    /// must follow up: the missing-data rules should catch it).
    DeviceSilent,
}

impl EventKind {
    pub const CLINICAL: [EventKind; 5] = [
        EventKind::Hypoxaemia,
        EventKind::HypertensiveCrisis,
        EventKind::HeartFailureDecompensation,
        EventKind::Sepsis,
        EventKind::Tachycardia,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Hypoxaemia => "hypoxaemia",
            EventKind::HypertensiveCrisis => "hypertensive_crisis",
            EventKind::HeartFailureDecompensation => "heart_failure_decompensation",
            EventKind::Sepsis => "sepsis",
            EventKind::Tachycardia => "tachycardia",
            EventKind::DeviceSilent => "device_silent",
        }
    }

    /// Who can have it.
    pub fn eligible(self, c: Condition) -> bool {
        match self {
            EventKind::Hypoxaemia => matches!(
                c,
                Condition::Copd | Condition::HeartFailure | Condition::PostSurgical
            ),
            EventKind::HypertensiveCrisis => c == Condition::Hypertension,
            EventKind::HeartFailureDecompensation => c == Condition::HeartFailure,
            EventKind::Sepsis => matches!(
                c,
                Condition::PostSurgical | Condition::Copd | Condition::HeartFailure
            ),
            EventKind::Tachycardia => true,
            EventKind::DeviceSilent => true,
        }
    }

    /// A duration, in hours.
    pub fn draw_hours(self, rng: &mut impl Rng) -> f64 {
        match self {
            EventKind::Hypoxaemia => rng.random_range(0.33..1.5),
            EventKind::HypertensiveCrisis => rng.random_range(2.0..8.0),
            EventKind::HeartFailureDecompensation => rng.random_range(96.0..132.0),
            EventKind::Sepsis => rng.random_range(24.0..48.0),
            EventKind::Tachycardia => rng.random_range(0.5..3.0),
            EventKind::DeviceSilent => 0.0,
        }
    }
}

/// One event of one patient, with its severity drawn once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// Hours since the scenario's start.
    pub start: f64,
    pub end: f64,
    /// 0.8 to 1.2: how hard this one hits.
    pub intensity: f64,
}

/// Deltas an event adds to a patient's values at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Effect {
    pub heart_rate: f64,
    pub spo2: f64,
    pub systolic: f64,
    pub diastolic: f64,
    pub respiratory_rate: f64,
    pub temperature: f64,
    pub weight: f64,
}

/// 0 before `a`, rising linearly to 1 at `b`.
fn ramp(t: f64, a: f64, b: f64) -> f64 {
    ((t - a) / (b - a)).clamp(0.0, 1.0)
}

impl Event {
    /// The event's effect at hour `t` (zero outside it, and after recovery).
    pub fn effect(&self, t: f64) -> Effect {
        if t < self.start || t >= self.end + 6.0 {
            return Effect::default();
        }
        let (s, e, k) = (self.start, self.end, self.intensity);
        let len = e - s;
        // Onset over a tenth of the event (at most 2 h), recovery over a
        // tenth after it (at most 2 h).
        let on = (len * 0.1).clamp(0.05, 2.0);
        let shape = ramp(t, s, s + on) * (1.0 - ramp(t, e, e + on));
        match self.kind {
            EventKind::Hypoxaemia => Effect {
                spo2: -10.0 * k * shape,
                heart_rate: 12.0 * k * shape,
                respiratory_rate: 5.0 * k * shape,
                ..Effect::default()
            },
            EventKind::HypertensiveCrisis => Effect {
                systolic: 72.0 * k * shape,
                diastolic: 36.0 * k * shape,
                heart_rate: 8.0 * shape,
                ..Effect::default()
            },
            EventKind::HeartFailureDecompensation => {
                // Fluid first (about 2.5 kg over the first days, gone again
                // by diuresis after), breathing last.
                let fluid = 2.6 * k * ramp(t, s, s + len * 0.7) * (1.0 - ramp(t, e, e + 6.0));
                let lungs = ramp(t, s + len * 0.65, s + len * 0.8) * (1.0 - ramp(t, e, e + on));
                Effect {
                    weight: fluid,
                    spo2: -6.0 * k * lungs,
                    respiratory_rate: 9.0 * k * lungs,
                    heart_rate: 22.0 * k * lungs,
                    ..Effect::default()
                }
            }
            EventKind::Sepsis => {
                let fever = 2.2 * k * shape;
                Effect {
                    temperature: fever,
                    // On top of the fever's own rise (see `values`).
                    heart_rate: 18.0 * k * shape,
                    respiratory_rate: 5.0 * k * shape,
                    systolic: -34.0 * k * shape,
                    diastolic: -18.0 * k * shape,
                    spo2: -4.0 * k * shape,
                    ..Effect::default()
                }
            }
            EventKind::Tachycardia => Effect {
                heart_rate: (66.0 + 10.0 * k) * shape,
                ..Effect::default()
            },
            EventKind::DeviceSilent => Effect::default(),
        }
    }
}

/// A patient's true values at one instant (before measurement noise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Values {
    pub heart_rate: f64,
    pub spo2: f64,
    pub systolic: f64,
    pub diastolic: f64,
    pub respiratory_rate: f64,
    pub temperature: f64,
    pub weight: f64,
}

/// The patient's values at hour `t` of the scenario, `hour_of_day` local.
pub fn values(b: &Baseline, events: &[Event], t: f64, hour_of_day: f64) -> Values {
    let mut e = Effect::default();
    for ev in events {
        let x = ev.effect(t);
        e.heart_rate += x.heart_rate;
        e.spo2 += x.spo2;
        e.systolic += x.systolic;
        e.diastolic += x.diastolic;
        e.respiratory_rate += x.respiratory_rate;
        e.temperature += x.temperature;
        e.weight += x.weight;
    }
    // Circadian: lowest before dawn, highest in the afternoon.
    let day = (std::f64::consts::TAU * (hour_of_day - 10.0) / 24.0).sin();
    let fever = e.temperature.max(0.0);
    Values {
        heart_rate: b.heart_rate + 5.0 * day + e.heart_rate + 10.0 * fever,
        spo2: (b.spo2 + e.spo2).min(100.0),
        systolic: b.systolic + 7.0 * day + e.systolic,
        diastolic: b.diastolic + 4.0 * day + e.diastolic,
        respiratory_rate: b.respiratory_rate + e.respiratory_rate + 2.0 * fever,
        temperature: b.temperature + 0.3 * day + e.temperature,
        weight: b.weight + e.weight,
    }
}

/// Where values must stay (the catalogue's plausible ranges, tightened to
/// what a living patient shows), except under an event that says otherwise.
pub const PLAUSIBLE: [(&str, f64, f64); 7] = [
    ("heart_rate", 35.0, 190.0),
    ("spo2", 70.0, 100.0),
    ("systolic", 70.0, 250.0),
    ("diastolic", 40.0, 150.0),
    ("respiratory_rate", 6.0, 45.0),
    ("temperature", 34.5, 41.5),
    ("weight", 40.0, 170.0),
];

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn events_move_the_values_their_kind_says_and_then_recover() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let b = Baseline::draw(Condition::Hypertension, &mut rng);
        let crisis = Event {
            kind: EventKind::HypertensiveCrisis,
            start: 10.0,
            end: 14.0,
            intensity: 1.0,
        };
        let mid = values(&b, &[crisis], 12.0, 12.0);
        let before = values(&b, &[crisis], 9.0, 12.0);
        let after = values(&b, &[crisis], 30.0, 12.0);
        assert!(mid.systolic > 180.0 && mid.diastolic > 110.0, "{mid:?}");
        assert_eq!(before, after, "recovered");
        let sepsis = Event {
            kind: EventKind::Sepsis,
            start: 0.0,
            end: 30.0,
            intensity: 1.0,
        };
        let s = values(&b, &[sepsis], 15.0, 12.0);
        assert!(
            s.temperature > 38.5 && s.heart_rate > 110.0 && s.respiratory_rate > 22.0,
            "{s:?}"
        );
        let hf = Event {
            kind: EventKind::HeartFailureDecompensation,
            start: 0.0,
            end: 100.0,
            intensity: 1.0,
        };
        let early = values(&b, &[hf], 40.0, 8.0);
        let late = values(&b, &[hf], 90.0, 8.0);
        assert!(
            early.weight > b.weight + 1.0 && (early.spo2 - b.spo2).abs() < 0.01,
            "fluid before breath"
        );
        assert!(
            late.weight > b.weight + 2.4 && late.spo2 < b.spo2 - 5.0,
            "{late:?}"
        );
    }
}
