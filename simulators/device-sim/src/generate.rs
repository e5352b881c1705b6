//! From a scenario to a plan (patients, their devices and events, the
//! ground truth) and from the plan to the stream of batches the devices
//! send, in the order they send them.
//!
//! Each device is a stream with its own random generator (seeded from the
//! scenario's seed, the patient and the device kind), and the streams are
//! merged by send time: the same seed gives the same bytes, whatever is
//! read or skipped, and a 30-day cohort is generated lazily, never held in
//! memory.
//!
//! Habits: a cuff at about 08:00 and 20:00, a scale at about 07:00, a
//! pulse oximeter a few times a day, a thermometer weekly, wearables every
//! `wearable_interval_seconds`. Symptoms change habits: a quarter hour into
//! an event the patient reaches for the relevant device, and keeps
//! measuring while it lasts (the cuff every quarter hour in a hypertensive
//! crisis and every 4 h in sepsis, cuff and oximeter every 5 minutes with
//! palpitations, the oximeter every 10 minutes while breathless, the
//! thermometer every 3 h with a fever). Scheduled measurements are skipped now and
//! then (`devices.skip`). Times are UTC.

use std::collections::{BinaryHeap, VecDeque};

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{Baseline, Condition, Event, EventKind, Values, noise, values};
use crate::scenario::Scenario;

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceKind {
    Wearable,
    BpCuff,
    Scale,
    PulseOximeter,
    Thermometer,
}

impl DeviceKind {
    /// The registry's kind (`devices.kind`).
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Wearable => "wearable",
            DeviceKind::BpCuff => "bp_cuff",
            DeviceKind::Scale => "scale",
            DeviceKind::PulseOximeter => "pulse_oximeter",
            DeviceKind::Thermometer => "thermometer",
        }
    }
}

/// One simulated patient.
#[derive(Debug, Clone)]
pub struct PatientPlan {
    pub patient_id: String,
    pub condition: Condition,
    pub baseline: Baseline,
    pub events: Vec<Event>,
    pub devices: Vec<DeviceKind>,
}

/// One labelled event: the ground truth the alerts are scored against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Truth {
    pub patient_id: String,
    pub kind: EventKind,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// For `device_silent`: which device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// A reading as measured (before any fault changes how it travels).
#[derive(Debug, Clone, PartialEq)]
pub struct SimReading {
    pub metric: &'static str,
    /// Systolic for blood pressure.
    pub value: f64,
    /// Diastolic for blood pressure.
    pub value2: Option<f64>,
    /// When it was truly measured.
    pub at: DateTime<Utc>,
    pub flag: Option<&'static str>,
}

/// How a batch travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    Normal,
    /// The same bytes again (a QoS 1 resend).
    Duplicate,
    /// Readings held while offline, sent at once on reconnecting.
    Backlog,
    /// Bytes that are not a payload.
    Malformed,
    /// From a device the registry does not know.
    Unknown,
}

/// One batch a device sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    /// When it is sent (scenario time).
    pub at: DateTime<Utc>,
    pub device_id: String,
    pub patient_id: Option<String>,
    pub payload: Vec<u8>,
    /// What it carries (empty when malformed).
    pub readings: Vec<SimReading>,
    pub kind: SendKind,
}

/// A cohort, its devices and what will happen to them.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub start: DateTime<Utc>,
    pub patients: Vec<PatientPlan>,
    pub truth: Vec<Truth>,
    /// Devices that stop for good, and when (hours after the start).
    silent: Vec<(String, f64)>,
}

/// A seed for one purpose of one patient (or device).
fn sub_seed(seed: u64, patient: usize, what: u64) -> u64 {
    // SplitMix64 of the three: well spread, stable across platforms.
    let mut z = seed
        ^ (patient as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ what.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hours(start: DateTime<Utc>, h: f64) -> DateTime<Utc> {
    start + Duration::milliseconds((h * 3_600_000.0).round() as i64)
}

impl Plan {
    /// The plan of `scenario`, starting at `start` (rounded to the minute).
    pub fn new(scenario: &Scenario, start: DateTime<Utc>) -> Plan {
        let start = DateTime::from_timestamp(start.timestamp() / 60 * 60, 0).unwrap_or(start);
        let c = &scenario.conditions;
        let shares = [
            (Condition::Healthy, c.healthy),
            (Condition::Hypertension, c.hypertension),
            (Condition::HeartFailure, c.heart_failure),
            (Condition::Copd, c.copd),
            (Condition::PostSurgical, c.post_surgical),
        ];
        let total: f64 = shares.iter().map(|(_, s)| s).sum();
        let span = scenario.days * 24.0;
        let mut patients = Vec::with_capacity(scenario.patients);
        let mut truth = Vec::new();
        let mut silent = Vec::new();
        for i in 0..scenario.patients {
            let mut rng = SmallRng::seed_from_u64(sub_seed(scenario.seed, i, 1));
            let patient_id = format!("{}-p{:05}", scenario.prefix, i);
            let mut pick = rng.random_range(0.0..total);
            let condition = shares
                .iter()
                .find(|(_, s)| {
                    pick -= s;
                    pick < 0.0
                })
                .map_or(Condition::Healthy, |(c, _)| *c);
            let baseline = Baseline::draw(condition, &mut rng);
            let mut devices = vec![DeviceKind::Thermometer];
            let has = |rng: &mut SmallRng, p: f64| rng.random_range(0.0..1.0) < p;
            let (wearable, cuff, scale, oximeter) = match condition {
                Condition::Healthy => (0.5, 0.5, 0.4, 0.1),
                Condition::Hypertension => (0.3, 1.0, 0.5, 0.1),
                Condition::HeartFailure => (1.0, 1.0, 1.0, 1.0),
                Condition::Copd => (1.0, 0.5, 0.4, 1.0),
                Condition::PostSurgical => (1.0, 1.0, 0.4, 1.0),
            };
            for (kind, p) in [
                (DeviceKind::Wearable, wearable),
                (DeviceKind::BpCuff, cuff),
                (DeviceKind::Scale, scale),
                (DeviceKind::PulseOximeter, oximeter),
            ] {
                if has(&mut rng, p) {
                    devices.push(kind);
                }
            }
            devices.sort();
            let rates = &scenario.events;
            let mut events = Vec::new();
            for (kind, p) in [
                (EventKind::Hypoxaemia, rates.hypoxaemia),
                (EventKind::HypertensiveCrisis, rates.hypertensive_crisis),
                (
                    EventKind::HeartFailureDecompensation,
                    rates.heart_failure_decompensation,
                ),
                (EventKind::Sepsis, rates.sepsis),
                (EventKind::Tachycardia, rates.tachycardia),
            ] {
                let roll = rng.random_range(0.0..1.0);
                let len = kind.draw_hours(&mut rng);
                let at = rng.random_range(0.0..1.0);
                let intensity = rng.random_range(0.85..1.2);
                // Room for the whole event within the scenario, after a
                // first half day of ordinary readings.
                if kind.eligible(condition) && roll < p && span - len > 12.0 {
                    let start = 12.0 + at * (span - len - 12.0);
                    events.push(Event {
                        kind,
                        start,
                        end: start + len,
                        intensity,
                    });
                }
            }
            for placed in scenario.event.iter().filter(|e| e.patient == i) {
                let len = placed.kind.draw_hours(&mut rng);
                let end = (placed.start_hours + len).min(span);
                events.push(Event {
                    kind: placed.kind,
                    start: placed.start_hours,
                    end,
                    intensity: 1.0,
                });
            }
            events.sort_by(|a, b| a.start.total_cmp(&b.start));
            for e in &events {
                truth.push(Truth {
                    patient_id: patient_id.clone(),
                    kind: e.kind,
                    start: hours(start, e.start),
                    end: hours(start, e.end),
                    device_id: None,
                });
            }
            for d in &devices {
                let roll = rng.random_range(0.0..1.0);
                let when = rng.random_range(0.3..0.85) * span;
                if matches!(d, DeviceKind::Wearable | DeviceKind::Scale)
                    && roll < scenario.faults.silent
                {
                    let device_id = device_id(&scenario.prefix, i, *d);
                    truth.push(Truth {
                        patient_id: patient_id.clone(),
                        kind: EventKind::DeviceSilent,
                        start: hours(start, when),
                        end: hours(start, span),
                        device_id: Some(device_id.clone()),
                    });
                    silent.push((device_id, when));
                }
            }
            patients.push(PatientPlan {
                patient_id,
                condition,
                baseline,
                events,
                devices,
            });
        }
        truth.sort_by(|a, b| {
            (&a.patient_id, a.start, a.kind).cmp(&(&b.patient_id, b.start, b.kind))
        });
        Plan {
            scenario: scenario.clone(),
            start,
            patients,
            truth,
            silent,
        }
    }

    /// When the scenario ends.
    pub fn end(&self) -> DateTime<Utc> {
        hours(self.start, self.scenario.days * 24.0)
    }

    /// `device_id,patient_id,kind,assigned_at` lines for `vitalwatch devices
    /// import`, assigned a day before the scenario starts.
    pub fn registry_csv(&self) -> String {
        let since = (self.start - Duration::days(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut s = String::from("# device_id,patient_id,kind,assigned_at\n");
        for (i, p) in self.patients.iter().enumerate() {
            for d in &p.devices {
                s.push_str(&format!(
                    "{},{},{},{since}\n",
                    device_id(&self.scenario.prefix, i, *d),
                    p.patient_id,
                    d.name()
                ));
            }
        }
        s
    }

    /// The ground truth, one JSON object per line.
    pub fn truth_jsonl(&self) -> String {
        self.truth
            .iter()
            .filter_map(|t| serde_json::to_string(t).ok())
            .map(|l| l + "\n")
            .collect()
    }

    /// Every batch every device sends, in send order.
    pub fn sends(&self) -> Sends<'_> {
        let mut streams = Vec::new();
        for (i, p) in self.patients.iter().enumerate() {
            for d in &p.devices {
                let id = device_id(&self.scenario.prefix, i, *d);
                let silent = self.silent.iter().find(|(s, _)| *s == id).map(|(_, t)| *t);
                streams.push(Stream::new(self, Some(i), *d, id, silent));
            }
        }
        for u in 0..self.scenario.faults.unknown_devices {
            let id = format!("{}-unknown-{u:03}", self.scenario.prefix);
            streams.push(Stream::new(self, None, DeviceKind::Wearable, id, None));
        }
        let mut heap = BinaryHeap::new();
        for (k, s) in streams.iter_mut().enumerate() {
            s.advance(self);
            if let Some(next) = s.queue.front() {
                heap.push(std::cmp::Reverse((next.at, k)));
            }
        }
        Sends {
            plan: self,
            streams,
            heap,
        }
    }
}

/// A device's id.
pub fn device_id(prefix: &str, patient: usize, kind: DeviceKind) -> String {
    format!("{prefix}-p{patient:05}-{}", kind.name())
}

/// The batches of all devices, merged by send time.
#[allow(missing_debug_implementations)] // holds every device's generator
pub struct Sends<'a> {
    plan: &'a Plan,
    streams: Vec<Stream>,
    heap: BinaryHeap<std::cmp::Reverse<(DateTime<Utc>, usize)>>,
}

impl Iterator for Sends<'_> {
    type Item = Send;

    fn next(&mut self) -> Option<Send> {
        let std::cmp::Reverse((_, k)) = self.heap.pop()?;
        let stream = &mut self.streams[k];
        let out = stream.queue.pop_front()?;
        if stream.queue.is_empty() {
            stream.advance(self.plan);
        }
        if let Some(next) = stream.queue.front() {
            self.heap.push(std::cmp::Reverse((next.at, k)));
        }
        Some(out)
    }
}

/// One device's readings over time.
#[derive(Debug)]
struct Stream {
    device_id: String,
    patient: Option<usize>,
    kind: DeviceKind,
    rng: SmallRng,
    /// The next measurement, hours after the start.
    next: f64,
    seq: u64,
    /// The device clock's error, seconds.
    skew: i64,
    silent_from: Option<f64>,
    offline_until: Option<f64>,
    backlog: Vec<SimReading>,
    queue: VecDeque<Send>,
    /// The last send's time: a device sends one batch after another.
    last_at: Option<DateTime<Utc>>,
    /// A wearable's readings waiting for the next upload, and since when.
    unsent: Vec<SimReading>,
    unsent_since: Option<f64>,
}

impl Stream {
    fn new(
        plan: &Plan,
        patient: Option<usize>,
        kind: DeviceKind,
        device_id: String,
        silent_from: Option<f64>,
    ) -> Stream {
        let salt = 100 + kind as u64 + if patient.is_none() { 1000 } else { 0 };
        let mut rng = SmallRng::seed_from_u64(sub_seed(
            plan.scenario.seed,
            patient.unwrap_or(usize::MAX / 2) ^ device_id.len(),
            salt,
        ));
        let skew = if rng.random_range(0.0..1.0) < plan.scenario.faults.clock_skew {
            rng.random_range(-120..=120)
        } else {
            0
        };
        let first = rng.random_range(0.0..0.5);
        Stream {
            device_id,
            patient,
            kind,
            rng,
            next: first,
            seq: 1,
            skew,
            silent_from,
            offline_until: None,
            backlog: Vec::new(),
            queue: VecDeque::new(),
            last_at: None,
            unsent: Vec::new(),
            unsent_since: None,
        }
    }

    /// Whether one of the patient's events of these kinds is under way at `t`.
    fn unwell(plan: &Plan, patient: Option<usize>, t: f64, kinds: &[EventKind]) -> bool {
        patient.is_some_and(|p| {
            plan.patients[p]
                .events
                .iter()
                .any(|e| kinds.contains(&e.kind) && t >= e.start && t < e.end)
        })
    }

    /// A quarter hour after the next start of one of the patient's events
    /// of these kinds after `t`: when symptoms send the patient to the
    /// device, whatever the habit says.
    fn onset(plan: &Plan, patient: Option<usize>, t: f64, kinds: &[EventKind]) -> f64 {
        patient
            .and_then(|p| {
                plan.patients[p]
                    .events
                    .iter()
                    .filter(|e| kinds.contains(&e.kind) && e.start + 0.25 > t)
                    .map(|e| e.start + 0.25)
                    .min_by(f64::total_cmp)
            })
            .unwrap_or(f64::INFINITY)
    }

    /// The next time a habit says to measure, after `t` (hours), with
    /// `slots` the usual hours of the day and `jitter` their spread (hours).
    fn habit(&mut self, t: f64, slots: &[f64], jitter: f64) -> f64 {
        let day = (t / 24.0).floor();
        for d in [day, day + 1.0, day + 2.0] {
            for s in slots {
                let at = d * 24.0 + s + self.rng.random_range(-jitter..jitter);
                if at > t + 0.05 {
                    return at;
                }
            }
        }
        t + 24.0
    }

    /// Fills `queue` with the next send(s), if the device has any left.
    fn advance(&mut self, plan: &Plan) {
        let span = plan.scenario.days * 24.0;
        while self.queue.is_empty() {
            let t = self.next;
            if t >= span || self.silent_from.is_some_and(|s| t >= s) {
                if let Some(until) = self.offline_until.take() {
                    self.flush(plan, until.min(span));
                    continue;
                }
                if self.unsent_since.take().is_some() {
                    let held = std::mem::take(&mut self.unsent);
                    self.emit(plan, t.min(span), held, SendKind::Normal);
                    continue;
                }
                return;
            }
            // Symptom-driven measurements are never skipped; habits are, sometimes.
            let (next, symptom) = self.schedule(plan, t);
            self.next = next;
            if !symptom
                && self.kind != DeviceKind::Wearable
                && self.rng.random_range(0.0..1.0) < plan.scenario.devices.skip
            {
                continue;
            }
            let readings = self.measure(plan, t);
            // Offline spells: readings are held, then flushed together.
            if let Some(until) = self.offline_until {
                if t >= until {
                    self.offline_until = None;
                    self.flush(plan, until);
                } else {
                    self.backlog.extend(readings);
                    continue;
                }
            }
            let per_hour = plan.scenario.faults.offline_per_day / 24.0;
            let gap = (next - t).max(1.0 / 3600.0);
            if self.rng.random_range(0.0..1.0) < per_hour * gap {
                self.offline_until = Some(t + self.rng.random_range(2.0..12.0));
                self.backlog.extend(readings);
                continue;
            }
            let upload = f64::from(plan.scenario.devices.wearable_upload_minutes) / 60.0;
            if self.kind == DeviceKind::Wearable && upload > 0.0 {
                let since = *self.unsent_since.get_or_insert(t);
                self.unsent.extend(readings);
                if t - since >= upload - 1e-6 {
                    self.unsent_since = None;
                    let held = std::mem::take(&mut self.unsent);
                    self.emit(plan, t, held, SendKind::Normal);
                }
                continue;
            }
            self.emit(plan, t, readings, SendKind::Normal);
        }
    }

    /// When to measure after `t`, and whether that is for symptoms.
    fn schedule(&mut self, plan: &Plan, t: f64) -> (f64, bool) {
        use EventKind::*;
        let devices = &plan.scenario.devices;
        let p = self.patient;
        let unwell = |kinds: &[EventKind]| Self::unwell(plan, p, t, kinds);
        let onset = |kinds: &[EventKind]| Self::onset(plan, p, t, kinds);
        match self.kind {
            DeviceKind::Wearable => (
                t + f64::from(devices.wearable_interval_seconds) / 3600.0,
                false,
            ),
            DeviceKind::BpCuff => {
                let habit = self.habit(t, &[8.0, 20.0], 0.5);
                let first = onset(&[HypertensiveCrisis, Sepsis, Tachycardia]);
                if unwell(&[Tachycardia]) {
                    // Palpitations: the pulse checked again and again.
                    (habit.min(t + 5.0 / 60.0), true)
                } else if unwell(&[HypertensiveCrisis]) {
                    // A headache: measured again every quarter hour, as
                    // patients are told to confirm a high reading.
                    (habit.min(t + 0.25), true)
                } else if unwell(&[Sepsis]) {
                    (habit.min(t + 4.0).min(first), true)
                } else if first < habit {
                    (first, true)
                } else {
                    (habit, false)
                }
            }
            DeviceKind::Scale => (self.habit(t, &[7.0], 0.4), false),
            DeviceKind::PulseOximeter => {
                let n = devices.oximeter_checks_per_day.max(1);
                let slots: Vec<f64> = (0..n)
                    .map(|k| 8.0 + 14.0 * f64::from(k) / f64::from(n))
                    .collect();
                let habit = self.habit(t, &slots, 0.75);
                let first = onset(&[Hypoxaemia, Sepsis, Tachycardia]);
                if unwell(&[Tachycardia]) {
                    (habit.min(t + 5.0 / 60.0), true)
                } else if unwell(&[Hypoxaemia]) {
                    // Breathless: checked every ten minutes.
                    (habit.min(t + 10.0 / 60.0), true)
                } else if unwell(&[Sepsis, HeartFailureDecompensation]) {
                    (habit.min(t + 1.0).min(first), true)
                } else if first < habit {
                    (first, true)
                } else {
                    (habit, false)
                }
            }
            DeviceKind::Thermometer => {
                if unwell(&[Sepsis]) {
                    (t + 3.0, true)
                } else {
                    let habit = t + self.rng.random_range(100.0..236.0);
                    let first = onset(&[Sepsis]);
                    if first < habit {
                        (first, true)
                    } else {
                        (habit, false)
                    }
                }
            }
        }
    }

    /// What the device measures at `t`.
    fn measure(&mut self, plan: &Plan, t: f64) -> Vec<SimReading> {
        let at = hours(plan.start, t);
        let hour_of_day =
            (t + plan.start.timestamp().rem_euclid(86_400) as f64 / 3600.0).rem_euclid(24.0);
        let v: Values = match self.patient {
            Some(p) => {
                let pp = &plan.patients[p];
                values(&pp.baseline, &pp.events, t, hour_of_day)
            }
            None => values(
                &Baseline::draw(Condition::Healthy, &mut self.rng),
                &[],
                t,
                hour_of_day,
            ),
        };
        let faults = &plan.scenario.faults;
        let rng = &mut self.rng;
        let r = |metric, value: f64, value2: Option<f64>, flag| SimReading {
            metric,
            value,
            value2,
            at,
            flag,
        };
        let hr = |rng: &mut SmallRng| (v.heart_rate + noise(rng, 2.5)).round().clamp(30.0, 220.0);
        let spo2 = |rng: &mut SmallRng| (v.spo2 + noise(rng, 0.7)).round().clamp(60.0, 100.0);
        match self.kind {
            DeviceKind::Wearable => {
                let mut s = spo2(rng);
                let mut flag = None;
                if rng.random_range(0.0..1.0) < faults.motion_artifact {
                    s = (s - rng.random_range(5.0..15.0)).round();
                    flag = Some("motion_artifact");
                }
                vec![
                    r("heart_rate", hr(rng), None, None),
                    r("spo2", s, None, flag),
                    r(
                        "respiratory_rate",
                        (v.respiratory_rate + noise(rng, 1.0))
                            .round()
                            .clamp(5.0, 60.0),
                        None,
                        None,
                    ),
                ]
            }
            DeviceKind::PulseOximeter => vec![
                r("spo2", spo2(rng), None, None),
                r("heart_rate", hr(rng), None, None),
            ],
            DeviceKind::BpCuff => {
                if rng.random_range(0.0..1.0) < faults.cuff_error {
                    return vec![r("blood_pressure", 72.0, Some(45.0), Some("cuff_error"))];
                }
                let sys = (v.systolic + noise(rng, 5.0)).round().clamp(60.0, 260.0);
                let dia = (v.diastolic + noise(rng, 4.0))
                    .round()
                    .clamp(35.0, (sys - 10.0).max(36.0));
                vec![
                    r("blood_pressure", sys, Some(dia), None),
                    r("heart_rate", hr(rng), None, None),
                ]
            }
            DeviceKind::Scale => vec![r(
                "body_weight",
                ((v.weight + noise(rng, 0.2)) * 10.0).round() / 10.0,
                None,
                None,
            )],
            DeviceKind::Thermometer => {
                vec![r(
                    "body_temperature",
                    ((v.temperature + noise(rng, 0.1)) * 10.0).round() / 10.0,
                    None,
                    None,
                )]
            }
        }
    }

    /// Sends the backlog held while offline, at `at` (hours).
    fn flush(&mut self, plan: &Plan, at: f64) {
        let held = std::mem::take(&mut self.backlog);
        for chunk in held.chunks(200) {
            self.emit(plan, at, chunk.to_vec(), SendKind::Backlog);
        }
    }

    /// Queues a batch of `readings` sent at `t` (hours), with its faults.
    fn emit(&mut self, plan: &Plan, t: f64, readings: Vec<SimReading>, kind: SendKind) {
        if readings.is_empty() {
            return;
        }
        let faults = &plan.scenario.faults;
        let at = hours(plan.start, t) + Duration::milliseconds(self.rng.random_range(0..2000));
        let at = self.last_at.map_or(at, |last| at.max(last));
        self.last_at = Some(at);
        let seq = self.seq;
        self.seq += 1;
        let kind = if self.patient.is_none() {
            SendKind::Unknown
        } else {
            kind
        };
        let skew = Duration::seconds(self.skew);
        let json: Vec<serde_json::Value> = readings
            .iter()
            .map(|r| {
                let t = (r.at + skew).to_rfc3339_opts(SecondsFormat::Millis, true);
                let mut o = match (r.metric, r.value2) {
                    ("blood_pressure", Some(dia)) => {
                        serde_json::json!({"metric": r.metric, "unit": "mm[Hg]", "measured_at": t,
                        "components": {"systolic": r.value, "diastolic": dia}})
                    }
                    (m, _) => serde_json::json!({"metric": m, "value": r.value, "measured_at": t}),
                };
                if let Some(f) = r.flag {
                    o["flags"] = serde_json::json!([f]);
                }
                o
            })
            .collect();
        let payload =
            serde_json::json!({"device_id": self.device_id, "seq": seq, "readings": json})
                .to_string()
                .into_bytes();
        let patient_id = self.patient.map(|p| plan.patients[p].patient_id.clone());
        if self.rng.random_range(0.0..1.0) < faults.malformed {
            let cut = payload.len() / 2;
            self.queue.push_back(Send {
                at,
                device_id: self.device_id.clone(),
                patient_id,
                payload: payload[..cut].to_vec(),
                readings: Vec::new(),
                kind: SendKind::Malformed,
            });
            return;
        }
        let send = Send {
            at,
            device_id: self.device_id.clone(),
            patient_id,
            payload,
            readings,
            kind,
        };
        if self.rng.random_range(0.0..1.0) < faults.duplicate {
            let mut again = send.clone();
            again.at = at + Duration::seconds(self.rng.random_range(2..30));
            again.kind = SendKind::Duplicate;
            again.readings = Vec::new(); // the pipeline keeps the first
            self.queue.push_back(send);
            self.queue.push_back(again);
        } else {
            self.queue.push_back(send);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use vitalwatch_core::payload::{PayloadFormat, decode};
    use vitalwatch_core::validate::{TimePolicy, validate};

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
            .single()
            .unwrap_or_default()
    }

    fn scenario(seed: u64) -> Scenario {
        Scenario {
            seed,
            patients: 30,
            days: 4.0,
            events: crate::scenario::EventRates {
                hypoxaemia: 0.5,
                hypertensive_crisis: 0.5,
                heart_failure_decompensation: 0.0,
                sepsis: 0.5,
                tachycardia: 0.3,
            },
            faults: crate::scenario::Faults {
                duplicate: 0.05,
                malformed: 0.01,
                offline_per_day: 0.2,
                silent: 0.2,
                ..Default::default()
            },
            ..Scenario::default()
        }
    }

    /// Everything a run produces, as bytes.
    fn bytes(s: &Scenario) -> (Vec<u8>, String, String) {
        let plan = Plan::new(s, start());
        let mut all = Vec::new();
        for send in plan.sends() {
            all.extend(send.at.timestamp_millis().to_le_bytes());
            all.extend(send.device_id.as_bytes());
            all.extend(&send.payload);
        }
        (all, plan.truth_jsonl(), plan.registry_csv())
    }

    #[test]
    fn the_same_seed_gives_byte_identical_readings_and_truth() {
        let a = bytes(&scenario(7));
        assert_eq!(a, bytes(&scenario(7)));
        assert!(
            a.0.len() > 100_000 && !a.1.is_empty(),
            "a real run: {} bytes, truth {}",
            a.0.len(),
            a.1.len()
        );
        let b = bytes(&scenario(8));
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
    }

    #[test]
    fn sends_come_in_time_order_and_valid_payloads_decode_and_validate() {
        let s = scenario(3);
        let plan = Plan::new(&s, start());
        let mut last = plan.start - Duration::days(1);
        let mut kinds = std::collections::HashMap::new();
        for send in plan.sends() {
            assert!(
                send.at >= last,
                "in order: {} after {last}: {:?} {}",
                send.at,
                send.kind,
                send.device_id
            );
            last = send.at;
            *kinds.entry(format!("{:?}", send.kind)).or_insert(0) += 1;
            let decoded = decode(&send.payload, PayloadFormat::detect(false, &send.payload));
            if send.kind == SendKind::Malformed {
                assert!(decoded.is_err());
                continue;
            }
            let batch = decoded.expect("decodes");
            assert_eq!(batch.device_id.as_deref(), Some(send.device_id.as_str()));
            let policy = TimePolicy {
                max_age: Duration::days(90),
                ..TimePolicy::default()
            };
            for r in &batch.readings {
                validate(r, send.at + Duration::minutes(5), &policy)
                    .expect("every simulated reading is valid");
            }
        }
        for k in ["Normal", "Duplicate", "Backlog", "Malformed", "Unknown"] {
            assert!(kinds.get(k).is_some_and(|n| *n > 0), "{k} in {kinds:?}");
        }
    }

    #[test]
    fn physiology_stays_plausible_except_where_an_event_says_otherwise() {
        let s = Scenario {
            events: crate::scenario::EventRates {
                hypoxaemia: 0.0,
                hypertensive_crisis: 0.0,
                heart_failure_decompensation: 0.0,
                sepsis: 0.0,
                tachycardia: 0.0,
            },
            ..scenario(11)
        };
        let plan = Plan::new(&s, start());
        let normal = |metric: &str, v: f64| match metric {
            "heart_rate" => (40.0..=130.0).contains(&v),
            "spo2" => (85.0..=100.0).contains(&v),
            "blood_pressure" => (85.0..=190.0).contains(&v),
            "respiratory_rate" => (8.0..=28.0).contains(&v),
            "body_temperature" => (35.0..=38.0).contains(&v),
            "body_weight" => (40.0..=170.0).contains(&v),
            _ => false,
        };
        let mut n = 0;
        for send in plan.sends().filter(|s| s.kind != SendKind::Unknown) {
            for r in send.readings.iter().filter(|r| r.flag.is_none()) {
                assert!(
                    normal(r.metric, r.value),
                    "without events, {} {} is out of range",
                    r.metric,
                    r.value
                );
                n += 1;
            }
        }
        assert!(n > 10_000, "{n} readings");
        // With events, each kind's metric leaves the normal range during it.
        let with = Plan::new(&scenario(11), start());
        let mut out_of_range = std::collections::HashSet::new();
        for send in with.sends() {
            for r in send
                .readings
                .iter()
                .filter(|r| r.flag.is_none() && !normal(r.metric, r.value))
            {
                let p = send.patient_id.as_deref().unwrap_or_default();
                let during = with.truth.iter().find(|t| {
                    t.patient_id == p && r.at >= t.start && r.at < t.end + Duration::hours(8)
                });
                let kind = during.map(|t| t.kind);
                assert!(
                    kind.is_some(),
                    "{} {} at {} outside every event of {p}",
                    r.metric,
                    r.value,
                    r.at
                );
                out_of_range.extend(kind);
            }
        }
        for k in [
            EventKind::Hypoxaemia,
            EventKind::HypertensiveCrisis,
            EventKind::Sepsis,
        ] {
            assert!(
                out_of_range.contains(&k),
                "{k:?} changed nothing: {out_of_range:?}"
            );
        }
    }

    #[test]
    fn a_wearable_uploads_what_it_measured_in_bursts() {
        let s = Scenario {
            devices: crate::scenario::Devices {
                wearable_interval_seconds: 900,
                wearable_upload_minutes: 45,
                ..Default::default()
            },
            faults: crate::scenario::Faults {
                offline_per_day: 0.0,
                malformed: 0.0,
                duplicate: 0.0,
                ..Default::default()
            },
            ..scenario(5)
        };
        let plan = Plan::new(&s, start());
        let mut sizes = std::collections::BTreeMap::new();
        for send in plan
            .sends()
            .filter(|s| s.device_id.ends_with("-wearable") && s.kind == SendKind::Normal)
        {
            // Three readings (heart rate, SpO2, respiration) per measurement.
            *sizes.entry(send.readings.len() / 3).or_insert(0) += 1;
            let oldest = send.readings.iter().map(|r| r.at).min().expect("readings");
            assert!(
                send.at - oldest <= Duration::minutes(46),
                "held at most one upload interval: {} at {} ({:?})",
                send.at - oldest,
                send.at,
                send.device_id
            );
        }
        let (most, _) = sizes.iter().max_by_key(|(_, n)| **n).expect("sizes");
        assert_eq!(*most, 4, "measurements per upload: {sizes:?}");
    }
}
