//! NEWS2 (National Early Warning Score 2, Royal College of Physicians,
//! 2017): the score of each parameter and the aggregate's clinical risk.
//!
//! Pure functions, no I/O. Values are first rounded to the chart's
//! precision (whole breaths, beats, mmHg and percent; temperature to 0.1
//! °C), so a device value between two bands falls where a nurse writing it
//! on the chart would put it: 8.4 breaths/min is 8, 35.04 °C is 35.0.

pub use vitalwatch_core::catalogue::Acvpu;

/// Which SpO2 scale a patient is scored on. Scale 2 is for patients with
/// hypercapnic respiratory failure (often COPD) whose target range is
/// 88–92 %, set per patient by a clinician.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spo2Scale {
    #[default]
    Scale1,
    Scale2,
}

/// The clinical risk the aggregate score means (RCP 2017, chart 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Risk {
    /// Aggregate 0: routine monitoring.
    None,
    /// Aggregate 1–4.
    Low,
    /// A score of 3 in any single parameter (aggregate below 5).
    LowMedium,
    /// Aggregate 5–6: urgent response.
    Medium,
    /// Aggregate 7 or more: emergency response.
    High,
}

fn whole(v: f64) -> f64 {
    v.round()
}

/// Respiration rate, breaths/min: ≤8 3, 9–11 1, 12–20 0, 21–24 2, ≥25 3.
pub fn respiration(rate: f64) -> u8 {
    match whole(rate) {
        r if r <= 8.0 => 3,
        r if r <= 11.0 => 1,
        r if r <= 20.0 => 0,
        r if r <= 24.0 => 2,
        _ => 3,
    }
}

/// SpO2 %, scale 1: ≤91 3, 92–93 2, 94–95 1, ≥96 0.
pub fn spo2_scale1(spo2: f64) -> u8 {
    match whole(spo2) {
        s if s <= 91.0 => 3,
        s if s <= 93.0 => 2,
        s if s <= 95.0 => 1,
        _ => 0,
    }
}

/// SpO2 %, scale 2: ≤83 3, 84–85 2, 86–87 1, 88–92 0, ≥93 on air 0;
/// on oxygen 93–94 1, 95–96 2, ≥97 3.
pub fn spo2_scale2(spo2: f64, on_oxygen: bool) -> u8 {
    match whole(spo2) {
        s if s <= 83.0 => 3,
        s if s <= 85.0 => 2,
        s if s <= 87.0 => 1,
        s if s <= 92.0 => 0,
        _ if !on_oxygen => 0,
        s if s <= 94.0 => 1,
        s if s <= 96.0 => 2,
        _ => 3,
    }
}

/// Air or oxygen: supplemental oxygen scores 2.
pub fn oxygen(on_oxygen: bool) -> u8 {
    if on_oxygen { 2 } else { 0 }
}

/// Systolic blood pressure, mmHg: ≤90 3, 91–100 2, 101–110 1, 111–219 0, ≥220 3.
pub fn systolic(mmhg: f64) -> u8 {
    match whole(mmhg) {
        s if s <= 90.0 => 3,
        s if s <= 100.0 => 2,
        s if s <= 110.0 => 1,
        s if s <= 219.0 => 0,
        _ => 3,
    }
}

/// Pulse, beats/min: ≤40 3, 41–50 1, 51–90 0, 91–110 1, 111–130 2, ≥131 3.
pub fn pulse(bpm: f64) -> u8 {
    match whole(bpm) {
        p if p <= 40.0 => 3,
        p if p <= 50.0 => 1,
        p if p <= 90.0 => 0,
        p if p <= 110.0 => 1,
        p if p <= 130.0 => 2,
        _ => 3,
    }
}

/// Consciousness: alert 0; new confusion, voice, pain or unresponsive 3.
pub fn consciousness(level: Acvpu) -> u8 {
    if level == Acvpu::Alert { 0 } else { 3 }
}

/// Temperature, °C: ≤35.0 3, 35.1–36.0 1, 36.1–38.0 0, 38.1–39.0 1, ≥39.1 2.
pub fn temperature(celsius: f64) -> u8 {
    // Tenths, as integers, so 36.0 is exactly 360.
    match (celsius * 10.0).round() as i64 {
        t if t <= 350 => 3,
        t if t <= 360 => 1,
        t if t <= 380 => 0,
        t if t <= 390 => 1,
        _ => 2,
    }
}

/// The seven parameters of one NEWS2 observation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observations {
    pub respiration: f64,
    pub spo2: f64,
    pub scale: Spo2Scale,
    pub on_oxygen: bool,
    pub systolic: f64,
    pub pulse: f64,
    pub consciousness: Acvpu,
    pub temperature: f64,
}

/// A scored observation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Score {
    /// The aggregate: the sum of the seven parameter scores (0–20).
    pub total: u8,
    /// Some parameter scored 3 on its own.
    pub red: bool,
    pub risk: Risk,
}

/// Scores `obs` and maps the aggregate to its clinical risk.
pub fn score(obs: &Observations) -> Score {
    let spo2 = match obs.scale {
        Spo2Scale::Scale1 => spo2_scale1(obs.spo2),
        Spo2Scale::Scale2 => spo2_scale2(obs.spo2, obs.on_oxygen),
    };
    let parts = [
        respiration(obs.respiration),
        spo2,
        oxygen(obs.on_oxygen),
        systolic(obs.systolic),
        pulse(obs.pulse),
        consciousness(obs.consciousness),
        temperature(obs.temperature),
    ];
    let total = parts.iter().sum();
    let red = parts.contains(&3);
    Score {
        total,
        red,
        risk: risk(total, red),
    }
}

/// The clinical risk of an aggregate `total`, `red` when any single
/// parameter scored 3.
pub fn risk(total: u8, red: bool) -> Risk {
    match total {
        7.. => Risk::High,
        5..=6 => Risk::Medium,
        _ if red => Risk::LowMedium,
        1..=4 => Risk::Low,
        0 => Risk::None,
    }
}

/// One NEWS2 parameter, for saying which are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Parameter {
    Respiration,
    Spo2,
    Oxygen,
    Systolic,
    Pulse,
    Consciousness,
    Temperature,
}

/// The latest reading of each parameter: (event time, value). Consciousness
/// is the ACVPU code (0 alert .. 4 unresponsive), oxygen 1 on oxygen and 0
/// on air, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latest {
    pub respiration: Option<(chrono::DateTime<chrono::Utc>, f64)>,
    pub spo2: Option<(chrono::DateTime<chrono::Utc>, f64)>,
    pub oxygen: Option<(chrono::DateTime<chrono::Utc>, f64)>,
    pub systolic: Option<(chrono::DateTime<chrono::Utc>, f64)>,
    pub pulse: Option<(chrono::DateTime<chrono::Utc>, f64)>,
    pub consciousness: Option<(chrono::DateTime<chrono::Utc>, f64)>,
    pub temperature: Option<(chrono::DateTime<chrono::Utc>, f64)>,
}

/// How a patient's NEWS2 is assembled from home readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assembly {
    /// A reading older than this (before the instant judged) is stale.
    pub freshness: chrono::Duration,
    pub scale: Spo2Scale,
    /// Home patients rarely report consciousness or oxygen: when absent,
    /// take them as alert and on air. The score then says so
    /// ([`Assembled::assumed`]).
    pub assume_alert_and_air: bool,
}

/// Observations put together for one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    pub observations: Observations,
    /// Parameters taken as normal because no fresh reading had them.
    pub assumed: Vec<Parameter>,
}

impl Assembly {
    /// The observations as of `at` (event time), from the latest readings
    /// at or before it and no older than the freshness window. `Err` names
    /// the parameters that are missing or stale.
    pub fn assemble(
        &self,
        latest: &Latest,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Assembled, Vec<Parameter>> {
        let fresh = |r: Option<(chrono::DateTime<chrono::Utc>, f64)>| {
            r.filter(|(t, v)| *t <= at && at - *t <= self.freshness && v.is_finite())
                .map(|(_, v)| v)
        };
        let mut missing = Vec::new();
        let mut assumed = Vec::new();
        let mut need = |p: Parameter, v: Option<f64>| {
            if v.is_none() {
                missing.push(p);
            }
            v.unwrap_or(f64::NAN)
        };
        let respiration = need(Parameter::Respiration, fresh(latest.respiration));
        let spo2 = need(Parameter::Spo2, fresh(latest.spo2));
        let systolic = need(Parameter::Systolic, fresh(latest.systolic));
        let pulse = need(Parameter::Pulse, fresh(latest.pulse));
        let temperature = need(Parameter::Temperature, fresh(latest.temperature));
        let on_oxygen = match fresh(latest.oxygen) {
            Some(v) => v >= 0.5,
            None if self.assume_alert_and_air => {
                assumed.push(Parameter::Oxygen);
                false
            }
            None => {
                missing.push(Parameter::Oxygen);
                false
            }
        };
        let consciousness = match fresh(latest.consciousness).and_then(Acvpu::from_code) {
            Some(level) => level,
            None if self.assume_alert_and_air => {
                assumed.push(Parameter::Consciousness);
                Acvpu::Alert
            }
            None => {
                missing.push(Parameter::Consciousness);
                Acvpu::Alert
            }
        };
        if !missing.is_empty() {
            missing.sort();
            return Err(missing);
        }
        Ok(Assembled {
            observations: Observations {
                respiration,
                spo2,
                scale: self.scale,
                on_oxygen,
                systolic,
                pulse,
                consciousness,
                temperature,
            },
            assumed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter's name, its scoring function, and (value, score) pairs.
    type Chart = (&'static str, fn(f64) -> u8, &'static [(f64, u8)]);

    /// Every band edge of every parameter: the last value of one band and
    /// the first of the next.
    #[test]
    fn every_band_edge_scores_as_the_chart_says() {
        let cases: &[Chart] = &[
            (
                "respiration",
                respiration,
                &[
                    (0.0, 3),
                    (8.0, 3),
                    (9.0, 1),
                    (11.0, 1),
                    (12.0, 0),
                    (20.0, 0),
                    (21.0, 2),
                    (24.0, 2),
                    (25.0, 3),
                    (60.0, 3),
                ],
            ),
            (
                "spo2 scale 1",
                spo2_scale1,
                &[
                    (50.0, 3),
                    (91.0, 3),
                    (92.0, 2),
                    (93.0, 2),
                    (94.0, 1),
                    (95.0, 1),
                    (96.0, 0),
                    (100.0, 0),
                ],
            ),
            (
                "systolic",
                systolic,
                &[
                    (60.0, 3),
                    (90.0, 3),
                    (91.0, 2),
                    (100.0, 2),
                    (101.0, 1),
                    (110.0, 1),
                    (111.0, 0),
                    (219.0, 0),
                    (220.0, 3),
                    (260.0, 3),
                ],
            ),
            (
                "pulse",
                pulse,
                &[
                    (30.0, 3),
                    (40.0, 3),
                    (41.0, 1),
                    (50.0, 1),
                    (51.0, 0),
                    (90.0, 0),
                    (91.0, 1),
                    (110.0, 1),
                    (111.0, 2),
                    (130.0, 2),
                    (131.0, 3),
                    (200.0, 3),
                ],
            ),
            (
                "temperature",
                temperature,
                &[
                    (33.0, 3),
                    (35.0, 3),
                    (35.1, 1),
                    (36.0, 1),
                    (36.1, 0),
                    (38.0, 0),
                    (38.1, 1),
                    (39.0, 1),
                    (39.1, 2),
                    (41.0, 2),
                ],
            ),
        ];
        for (name, f, table) in cases {
            for (value, want) in *table {
                assert_eq!(f(*value), *want, "{name} {value}");
            }
        }
    }

    #[test]
    fn spo2_scale_2_on_air_and_on_oxygen() {
        let table: &[(f64, u8, u8)] = &[
            // value, on air, on oxygen
            (80.0, 3, 3),
            (83.0, 3, 3),
            (84.0, 2, 2),
            (85.0, 2, 2),
            (86.0, 1, 1),
            (87.0, 1, 1),
            (88.0, 0, 0),
            (92.0, 0, 0),
            (93.0, 0, 1),
            (94.0, 0, 1),
            (95.0, 0, 2),
            (96.0, 0, 2),
            (97.0, 0, 3),
            (100.0, 0, 3),
        ];
        for (value, air, o2) in table {
            assert_eq!(
                spo2_scale2(*value, false),
                *air,
                "scale 2 on air at {value}"
            );
            assert_eq!(
                spo2_scale2(*value, true),
                *o2,
                "scale 2 on oxygen at {value}"
            );
        }
    }

    #[test]
    fn values_between_bands_round_to_the_charts_precision() {
        assert_eq!(respiration(8.4), 3);
        assert_eq!(respiration(8.5), 1, "8.5 rounds to 9");
        assert_eq!(spo2_scale1(95.4), 1);
        assert_eq!(spo2_scale1(95.5), 0);
        assert_eq!(temperature(35.04), 3);
        assert_eq!(temperature(35.05), 1, "35.05 rounds to 35.1");
        assert_eq!(temperature(38.04), 0);
        assert_eq!(systolic(219.6), 3);
        assert_eq!(pulse(90.4), 0);
    }

    #[test]
    fn oxygen_and_consciousness() {
        assert_eq!(oxygen(false), 0);
        assert_eq!(oxygen(true), 2);
        assert_eq!(consciousness(Acvpu::Alert), 0);
        for level in [
            Acvpu::NewConfusion,
            Acvpu::Voice,
            Acvpu::Pain,
            Acvpu::Unresponsive,
        ] {
            assert_eq!(consciousness(level), 3, "{level:?}");
        }
    }

    fn normal() -> Observations {
        Observations {
            respiration: 16.0,
            spo2: 97.0,
            scale: Spo2Scale::Scale1,
            on_oxygen: false,
            systolic: 125.0,
            pulse: 72.0,
            consciousness: Acvpu::Alert,
            temperature: 37.0,
        }
    }

    #[test]
    fn aggregate_levels() {
        let s = score(&normal());
        assert_eq!((s.total, s.red, s.risk), (0, false, Risk::None));
        // 1–4: low.
        let s = score(&Observations {
            pulse: 95.0,
            ..normal()
        });
        assert_eq!((s.total, s.risk), (1, Risk::Low));
        let s = score(&Observations {
            pulse: 115.0,
            respiration: 22.0,
            ..normal()
        });
        assert_eq!((s.total, s.risk), (4, Risk::Low));
        // A single 3 with an aggregate under 5: low-medium.
        let s = score(&Observations {
            consciousness: Acvpu::NewConfusion,
            ..normal()
        });
        assert_eq!((s.total, s.red, s.risk), (3, true, Risk::LowMedium));
        let s = score(&Observations {
            spo2: 90.0,
            pulse: 95.0,
            ..normal()
        });
        assert_eq!((s.total, s.risk), (4, Risk::LowMedium));
        // 5–6: medium, whether or not a single 3 is among them.
        let s = score(&Observations {
            spo2: 90.0,
            respiration: 22.0,
            ..normal()
        });
        assert_eq!((s.total, s.risk), (5, Risk::Medium));
        let s = score(&Observations {
            on_oxygen: true,
            pulse: 115.0,
            systolic: 105.0,
            temperature: 38.5,
            ..normal()
        });
        assert_eq!((s.total, s.red, s.risk), (6, false, Risk::Medium));
        // 7 and more: high.
        let s = score(&Observations {
            spo2: 90.0,
            respiration: 26.0,
            pulse: 95.0,
            ..normal()
        });
        assert_eq!((s.total, s.risk), (7, Risk::High));
        let worst = Observations {
            respiration: 30.0,
            spo2: 80.0,
            scale: Spo2Scale::Scale1,
            on_oxygen: true,
            systolic: 80.0,
            pulse: 140.0,
            consciousness: Acvpu::Unresponsive,
            temperature: 34.0,
        };
        assert_eq!(score(&worst).total, 20, "the maximum aggregate");
    }

    #[test]
    fn the_scale_changes_only_the_spo2_score() {
        // A COPD patient at 89 % on air: 3 on scale 1, 0 on scale 2.
        let copd = Observations {
            spo2: 89.0,
            ..normal()
        };
        assert_eq!(score(&copd).total, 3);
        assert_eq!(
            score(&Observations {
                scale: Spo2Scale::Scale2,
                ..copd
            })
            .total,
            0
        );
        // On oxygen at 97 %: scale 2 scores the over-oxygenation 3, plus 2 for oxygen.
        let over = Observations {
            spo2: 97.0,
            on_oxygen: true,
            scale: Spo2Scale::Scale2,
            ..normal()
        };
        assert_eq!(score(&over).total, 5);
        assert_eq!(
            score(&Observations {
                scale: Spo2Scale::Scale1,
                ..over
            })
            .total,
            2
        );
    }

    #[test]
    fn risk_table() {
        for (total, red, want) in [
            (0, false, Risk::None),
            (1, false, Risk::Low),
            (4, false, Risk::Low),
            (3, true, Risk::LowMedium),
            (4, true, Risk::LowMedium),
            (5, false, Risk::Medium),
            (5, true, Risk::Medium),
            (6, true, Risk::Medium),
            (7, false, Risk::High),
            (7, true, Risk::High),
            (20, true, Risk::High),
        ] {
            assert_eq!(risk(total, red), want, "{total} red={red}");
        }
    }

    fn at(min: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000 + min * 60, 0).unwrap_or_default()
    }

    fn home() -> Assembly {
        Assembly {
            freshness: chrono::Duration::hours(1),
            scale: Spo2Scale::Scale1,
            assume_alert_and_air: true,
        }
    }

    fn vitals(min: i64) -> Latest {
        Latest {
            respiration: Some((at(min), 22.0)),
            spo2: Some((at(min), 93.0)),
            systolic: Some((at(min), 105.0)),
            pulse: Some((at(min), 112.0)),
            temperature: Some((at(min), 38.4)),
            ..Latest::default()
        }
    }

    #[test]
    fn assembled_from_fresh_readings_with_home_assumptions_said() {
        let a = home().assemble(&vitals(0), at(30)).expect("assembled");
        assert_eq!(a.assumed, vec![Parameter::Oxygen, Parameter::Consciousness]);
        // 22/min 2, 93 % 2, air 0, 105 mmHg 1, 112/min 2, alert 0, 38.4 °C 1.
        assert_eq!(score(&a.observations).total, 8);
        assert_eq!(score(&a.observations).risk, Risk::High);
        // Reported oxygen and confusion are used, not assumed.
        let reported = Latest {
            oxygen: Some((at(10), 1.0)),
            consciousness: Some((at(10), Acvpu::NewConfusion.code())),
            ..vitals(0)
        };
        let a = home().assemble(&reported, at(30)).expect("assembled");
        assert!(a.assumed.is_empty());
        assert_eq!(score(&a.observations).total, 13);
    }

    #[test]
    fn stale_future_or_missing_parameters_are_named() {
        // 61 minutes old is stale.
        assert_eq!(
            home().assemble(&vitals(0), at(61)),
            Err(vec![
                Parameter::Respiration,
                Parameter::Spo2,
                Parameter::Systolic,
                Parameter::Pulse,
                Parameter::Temperature
            ])
        );
        // A reading after the instant judged is not part of it.
        let later = Latest {
            pulse: Some((at(40), 70.0)),
            ..vitals(0)
        };
        assert_eq!(home().assemble(&later, at(30)), Err(vec![Parameter::Pulse]));
        // Without the home assumptions, oxygen and consciousness must be reported.
        let strict = Assembly {
            assume_alert_and_air: false,
            ..home()
        };
        assert_eq!(
            strict.assemble(&vitals(0), at(5)),
            Err(vec![Parameter::Oxygen, Parameter::Consciousness])
        );
    }
}
