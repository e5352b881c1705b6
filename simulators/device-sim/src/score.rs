//! Alert quality: the alerts a run raised against its ground truth.
//!
//! An alert is **true** when it is about a patient with an event under way
//! (from the event's start to two hours after its end, when the patient is
//! recovering); every other alert is one nobody needed. Per event kind:
//! how many events at least one alert caught (sensitivity) and how long
//! after the event's start the first one came (median, p90). Over all:
//! precision (the share of alerts that were true) and alerts per
//! patient-day, the nurse's burden.
//!
//! [`naive`] is the baseline the rules are measured against: an alarm each
//! time a single reading crosses a fixed limit (SpO2 < 90, heart rate > 130
//! or < 40, systolic > 180 or < 90, respiration > 24, temperature > 38.2),
//! with no persistence, no hysteresis and no artifact filtering: what a
//! spot-check device with limits does on its own.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::generate::{Send, Truth};
use crate::model::EventKind;

/// One alert, from the pipeline or the baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub patient_id: String,
    pub rule: String,
    /// Event time the alert's condition was met.
    pub raised_at: DateTime<Utc>,
}

/// After an event's end, alerts still count as true for this long.
pub const GRACE: Duration = Duration::hours(2);

/// How well one kind of event was caught.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindScore {
    pub kind: EventKind,
    pub events: usize,
    pub detected: usize,
    pub sensitivity: f64,
    /// Minutes from the event's start to its first alert.
    pub median_minutes: Option<f64>,
    pub p90_minutes: Option<f64>,
}

/// The scoring report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub kinds: Vec<KindScore>,
    pub alerts: usize,
    pub true_alerts: usize,
    /// True alerts / alerts.
    pub precision: f64,
    pub patient_days: f64,
    pub alerts_per_patient_day: f64,
    /// Alerts nobody needed, by rule.
    pub unneeded_by_rule: BTreeMap<String, usize>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied()
}

/// Scores `alerts` against `truth` over `patient_days`.
pub fn score(truth: &[Truth], alerts: &[Alert], patient_days: f64) -> Report {
    let mut by_patient: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, t) in truth.iter().enumerate() {
        by_patient.entry(t.patient_id.as_str()).or_default().push(i);
    }
    // Per event (by index in `truth`), its first alert.
    let mut first: HashMap<usize, DateTime<Utc>> = HashMap::new();
    let mut true_alerts = 0;
    let mut unneeded: BTreeMap<String, usize> = BTreeMap::new();
    for a in alerts {
        let matching: Vec<usize> = by_patient
            .get(a.patient_id.as_str())
            .map(|ts| {
                ts.iter()
                    .copied()
                    .filter(|i| {
                        a.raised_at >= truth[*i].start && a.raised_at <= truth[*i].end + GRACE
                    })
                    .collect()
            })
            .unwrap_or_default();
        if matching.is_empty() {
            *unneeded.entry(a.rule.clone()).or_default() += 1;
            continue;
        }
        true_alerts += 1;
        for i in matching {
            let e = first.entry(i).or_insert(a.raised_at);
            *e = (*e).min(a.raised_at);
        }
    }
    let mut kinds = Vec::new();
    let mut all_kinds: Vec<EventKind> = truth.iter().map(|t| t.kind).collect();
    all_kinds.sort();
    all_kinds.dedup();
    for kind in all_kinds {
        let of_kind: Vec<usize> = (0..truth.len())
            .filter(|i| truth[*i].kind == kind)
            .collect();
        let mut delays: Vec<f64> = of_kind
            .iter()
            .filter_map(|i| {
                first
                    .get(i)
                    .map(|at| (*at - truth[*i].start).num_seconds() as f64 / 60.0)
            })
            .collect();
        delays.sort_by(f64::total_cmp);
        kinds.push(KindScore {
            kind,
            events: of_kind.len(),
            detected: delays.len(),
            sensitivity: delays.len() as f64 / of_kind.len().max(1) as f64,
            median_minutes: percentile(&delays, 0.5),
            p90_minutes: percentile(&delays, 0.9),
        });
    }
    Report {
        kinds,
        alerts: alerts.len(),
        true_alerts,
        precision: true_alerts as f64 / alerts.len().max(1) as f64,
        patient_days,
        alerts_per_patient_day: alerts.len() as f64 / patient_days.max(f64::MIN_POSITIVE),
        unneeded_by_rule: unneeded,
    }
}

/// The naive baseline's alerts over the readings `sends` carry: an alarm
/// whenever a reading crosses a fixed limit from the normal side.
pub fn naive(sends: impl Iterator<Item = Send>) -> Vec<Alert> {
    let mut readings: Vec<(DateTime<Utc>, String, &'static str, f64)> = Vec::new();
    for s in sends {
        let Some(p) = s.patient_id.clone() else {
            continue;
        };
        for r in s.readings {
            match (r.metric, r.value2) {
                ("blood_pressure", Some(dia)) => {
                    readings.push((r.at, p.clone(), "systolic", r.value));
                    readings.push((r.at, p.clone(), "diastolic", dia));
                }
                (m, _) => readings.push((r.at, p.clone(), m, r.value)),
            }
        }
    }
    naive_over(readings)
}

/// The naive baseline over readings as `(measured at, patient, metric or
/// blood-pressure component, value)`, in any order.
pub fn naive_over(mut readings: Vec<(DateTime<Utc>, String, &'static str, f64)>) -> Vec<Alert> {
    let mut abnormal: HashMap<(String, &'static str), bool> = HashMap::new();
    let mut out = Vec::new();
    // Judged in measurement order, as a device at the bedside would.
    readings.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
    for (at, patient, what, v) in readings {
        let beyond = match what {
            "spo2" => v < 90.0,
            "heart_rate" => !(40.0..=130.0).contains(&v),
            "systolic" => !(90.0..=180.0).contains(&v),
            "respiratory_rate" => v > 24.0,
            "body_temperature" => v > 38.2,
            _ => false,
        };
        let was = abnormal
            .insert((patient.clone(), what), beyond)
            .unwrap_or(false);
        if beyond && !was {
            out.push(Alert {
                patient_id: patient,
                rule: format!("naive_{what}"),
                raised_at: at,
            });
        }
    }
    out
}

impl Report {
    /// The report as a table.
    pub fn render(&self, title: &str) -> String {
        let mut s = format!("{title}\n");
        s.push_str(&format!(
            "{:<30} {:>7} {:>9} {:>11} {:>15} {:>12}\n",
            "event kind", "events", "detected", "sensitivity", "median to alert", "p90 to alert"
        ));
        let mins = |m: Option<f64>| m.map_or_else(|| "-".to_owned(), |m| format!("{m:.0} min"));
        for k in &self.kinds {
            s.push_str(&format!(
                "{:<30} {:>7} {:>9} {:>10.0}% {:>15} {:>12}\n",
                k.kind.name(),
                k.events,
                k.detected,
                k.sensitivity * 100.0,
                mins(k.median_minutes),
                mins(k.p90_minutes)
            ));
        }
        s.push_str(&format!(
            "alerts {}, true {}, precision {:.1}%, {:.3} alerts per patient-day ({:.0} patient-days)\n",
            self.alerts,
            self.true_alerts,
            self.precision * 100.0,
            self.alerts_per_patient_day,
            self.patient_days
        ));
        if !self.unneeded_by_rule.is_empty() {
            let list: Vec<String> = self
                .unneeded_by_rule
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            s.push_str(&format!(
                "alerts nobody needed, by rule: {}\n",
                list.join(", ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
            .single()
            .unwrap_or_default()
            + Duration::hours(h)
    }

    #[test]
    fn alerts_are_matched_to_events_and_counted() {
        let truth = vec![
            Truth {
                patient_id: "a".into(),
                kind: EventKind::Sepsis,
                start: at(10),
                end: at(20),
                device_id: None,
            },
            Truth {
                patient_id: "b".into(),
                kind: EventKind::Sepsis,
                start: at(10),
                end: at(20),
                device_id: None,
            },
            Truth {
                patient_id: "a".into(),
                kind: EventKind::Tachycardia,
                start: at(30),
                end: at(31),
                device_id: None,
            },
        ];
        let alert = |p: &str, rule: &str, h: i64| Alert {
            patient_id: p.into(),
            rule: rule.into(),
            raised_at: at(h),
        };
        let alerts = vec![
            alert("a", "news2", 12),
            alert("a", "fever", 11),
            alert("a", "news2", 21),   // recovering: within the grace
            alert("b", "spo2_low", 5), // before b's event: nobody needed it
            alert("a", "heart_rate_high", 40),
        ];
        let r = score(&truth, &alerts, 10.0);
        let sepsis = &r
            .kinds
            .iter()
            .find(|k| k.kind == EventKind::Sepsis)
            .expect("sepsis");
        assert_eq!((sepsis.events, sepsis.detected), (2, 1));
        assert_eq!(
            sepsis.median_minutes,
            Some(60.0),
            "the first alert, an hour in"
        );
        let tachy = r
            .kinds
            .iter()
            .find(|k| k.kind == EventKind::Tachycardia)
            .expect("tachycardia");
        assert_eq!(tachy.detected, 0);
        assert_eq!((r.alerts, r.true_alerts), (5, 3));
        assert!((r.precision - 0.6).abs() < 1e-9);
        assert!((r.alerts_per_patient_day - 0.5).abs() < 1e-9);
        assert_eq!(r.unneeded_by_rule.get("spo2_low"), Some(&1));
        assert!(r.render("t").contains("sepsis"));
    }
}
