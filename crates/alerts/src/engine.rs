//! The rules engine's judgement, without I/O: per patient, every rule's
//! state, fed the readings of `rpm.readings.v1` batches; out come alert
//! changes with their deterministic ids.
//!
//! (Wall-clock missing-data rules are judged by [`crate::missing`] from the
//! registry's expectations; they are not fed readings here.)

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::reading::{Batch, Quality};

use crate::news2::{self, Assembly, Latest, Risk};
use crate::packed::{self, Packed};
use crate::rate::RateOfChange;
use crate::rules::{Compiled, Override, Rule, Severity, alert_id};
use crate::series::{Group, Point, Series, Transition, micros, truncated};
use crate::threshold::{Direction, Persistence, Threshold};

/// A change of an alert, for the alert store and the alerts topic.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertChange {
    Raised {
        alert_id: String,
        patient_id: String,
        rule: String,
        severity: Severity,
        episode_start: DateTime<Utc>,
        /// When (event time) the condition was met.
        at: DateTime<Utc>,
        /// The value that met it (the aggregate score for NEWS2).
        value: f64,
        /// NEWS2 alerts: the aggregate score.
        news2_score: Option<u8>,
    },
    /// A NEWS2 episode's risk moved (up or down) while it is open.
    SeverityChanged {
        alert_id: String,
        patient_id: String,
        rule: String,
        severity: Severity,
        at: DateTime<Utc>,
        value: f64,
    },
    Cleared {
        alert_id: String,
        patient_id: String,
        rule: String,
        at: DateTime<Utc>,
    },
}

/// Readings the engine could not judge, for the caller's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// Older than a series' late-reading horizon.
    pub too_late: u64,
}

/// A reading flagged as an artifact does not raise an alert by itself.
fn artifact(q: Quality) -> bool {
    q.contains(Quality::MOTION_ARTIFACT)
        || q.contains(Quality::LOW_PERFUSION)
        || q.contains(Quality::CUFF_ERROR)
}

fn ordinal(risk: Risk) -> f64 {
    match risk {
        Risk::None => 0.0,
        Risk::Low => 1.0,
        Risk::LowMedium => 2.0,
        Risk::Medium => 3.0,
        Risk::High => 4.0,
    }
}

fn risk_of(ordinal: f64) -> Risk {
    match ordinal as i64 {
        4 => Risk::High,
        3 => Risk::Medium,
        2 => Risk::LowMedium,
        1 => Risk::Low,
        _ => Risk::None,
    }
}

/// The NEWS2 parameters' readings of the horizon, by event time, so a
/// score can be assembled as of any instant (a late reading is scored with
/// what was true then, not with newer values).
#[derive(Debug, Default, Clone)]
struct News2History {
    /// By slot (see [`News2History::slot`]), only the parameters the
    /// patient has sent: a wearable sends two of the seven, and seven
    /// empty ones were 280 bytes of every patient.
    params: Vec<(usize, Param)>,
}

/// One NEWS2 parameter's readings, oldest first, one per instant (the
/// first stands), packed ([`crate::packed`]).
#[derive(Debug, Default, Clone)]
struct Param(Packed);

impl Param {
    fn insert(&mut self, at: DateTime<Utc>, value: f64) {
        self.0.keep(at.timestamp_micros(), value);
    }

    #[cfg(test)]
    fn latest_as_of(&self, at: DateTime<Utc>) -> Option<(DateTime<Utc>, f64)> {
        let (t, v) = self.0.split_at_instant(at.timestamp_micros()).0?;
        Some((micros(t), v))
    }

    /// Forgets what is older than `cutoff` but the newest reading before
    /// it (it may still be fresh), and all but the newest `max_points`.
    fn forget_before(&mut self, cutoff: DateTime<Utc>, max_points: usize) {
        let before = self.0.count_before(cutoff.timestamp_micros());
        let drop = before
            .saturating_sub(1)
            .max(self.0.len().saturating_sub(max_points));
        self.0.drain_front(drop);
    }
}

impl News2History {
    /// The parameter slot of a reading, if it is one of NEWS2's.
    fn slot(metric: Metric, component: &str) -> Option<usize> {
        Some(match (metric, component) {
            (Metric::RespiratoryRate, _) => 0,
            (Metric::Spo2, _) => 1,
            (Metric::SupplementalOxygen, _) => 2,
            (Metric::BloodPressure, "systolic") => 3,
            (Metric::HeartRate, _) => 4,
            (Metric::Consciousness, _) => 5,
            (Metric::BodyTemperature, _) => 6,
            _ => return None,
        })
    }

    /// The parameter in `slot`, if the patient has sent it.
    fn param(&self, slot: usize) -> Option<&Param> {
        self.params.iter().find(|(s, _)| *s == slot).map(|(_, p)| p)
    }

    /// The parameter in `slot`, kept from now on if it was not.
    fn param_mut(&mut self, slot: usize) -> &mut Param {
        let i = match self.params.iter().position(|(s, _)| *s == slot) {
            Some(i) => i,
            None => {
                // Once per parameter and patient: no room to spare.
                self.params.reserve_exact(1);
                self.params.push((slot, Param::default()));
                self.params.len() - 1
            }
        };
        &mut self.params[i].1
    }

    /// The parameters' latest readings as of `from` and of instants after
    /// it, in order.
    fn scan(&self, from: DateTime<Utc>) -> Scan<'_> {
        static NONE: Packed = Packed::new();
        let from = from.timestamp_micros();
        Scan(std::array::from_fn(|i| {
            let kept = self.param(i).map_or(&NONE, |p| &p.0);
            let (latest, next) = kept.split_at_instant(from);
            (latest, next.peekable())
        }))
    }

    /// Forgets what is older than `cutoff`, and all but the newest
    /// `max_points` of each parameter.
    fn forget_before(&mut self, cutoff: DateTime<Utc>, max_points: usize) {
        for (_, p) in &mut self.params {
            p.forget_before(cutoff, max_points);
        }
    }
}

/// The NEWS2 parameters' latest readings as of instants in ascending
/// order, each parameter's readings decoded once for all of them (a
/// batch's instants are most often within one packed chunk).
struct Scan<'a>([ParamScan<'a>; 7]);

/// A parameter's latest reading as of the instant asked last, and its
/// readings after that instant.
type ParamScan<'a> = (Option<(i64, f64)>, std::iter::Peekable<packed::Iter<'a>>);

impl Scan<'_> {
    /// The latest readings as of `at`, not before the instant asked last.
    fn latest_as_of(&mut self, at: DateTime<Utc>) -> Latest {
        let t = at.timestamp_micros();
        let mut get = |i: usize| {
            let (latest, next) = &mut self.0[i];
            while let Some(r) = next.next_if(|r| r.0 <= t) {
                *latest = Some(r);
            }
            latest.map(|(t, v)| (micros(t), v))
        };
        Latest {
            respiration: get(0),
            spo2: get(1),
            oxygen: get(2),
            systolic: get(3),
            pulse: get(4),
            consciousness: get(5),
            temperature: get(6),
        }
    }
}

/// Where a patient's rule is judged.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// As `track` of the patient's threshold group `group`.
    Threshold { group: usize, track: usize },
    /// As `track` of the patient's rate-of-change group `group`.
    Rate { group: usize, track: usize },
    /// By the patient's NEWS2 state `n`.
    News2(usize),
    /// On wall-clock time elsewhere.
    Missing,
}

/// Which of a patient's groups judges each of their rules. It depends on
/// the rules alone, so every patient without an override shares the
/// engine's: a copy per patient was about a kilobyte each, five megabytes
/// at 5,000 patients.
#[derive(Debug)]
struct Layout {
    /// The rules (the engine's, or the patient's own where an override
    /// applies), and where each is judged.
    rules: Vec<(Arc<Rule>, Slot)>,
    /// The groups' rules: the readings of each series are kept once for
    /// the rules judging it with the same horizon.
    thresholds: Vec<Judged>,
    rates: Vec<Judged>,
    /// The NEWS2 rules, in order.
    news2: Vec<News2Rule>,
}

/// A NEWS2 rule as a patient's state uses it: its risk as a threshold rule
/// on the risk ordinal, its series' horizon, and its assembly (SpO2 scale,
/// freshness).
#[derive(Debug, Clone, Copy)]
struct News2Rule {
    risk: Threshold,
    horizon: Duration,
    assembly: Assembly,
}

impl Layout {
    /// The layout of `rules`, each with its series' horizon.
    fn new(rules: Vec<(Arc<Rule>, Duration)>) -> Layout {
        let mut layout = Layout {
            rules: Vec::with_capacity(rules.len()),
            thresholds: Vec::new(),
            rates: Vec::new(),
            news2: Vec::new(),
        };
        for (index, (rule, horizon)) in rules.into_iter().enumerate() {
            let slot = match &rule.compiled {
                Compiled::Threshold {
                    metric, component, ..
                } => {
                    let (group, track) =
                        join(&mut layout.thresholds, *metric, component, index, horizon);
                    Slot::Threshold { group, track }
                }
                Compiled::RateOfChange {
                    metric, component, ..
                } => {
                    let (group, track) =
                        join(&mut layout.rates, *metric, component, index, horizon);
                    Slot::Rate { group, track }
                }
                Compiled::News2 { min_risk, assembly } => {
                    let level = ordinal(*min_risk) - 0.5;
                    // Hysteresis: an open NEWS2 alert clears one risk level
                    // below the one that raised it (medium clears at low).
                    let clear = if level >= 1.5 { level - 1.0 } else { level };
                    let risk = Threshold {
                        direction: Direction::Above,
                        level,
                        clear,
                        persistence: Persistence::Single,
                    };
                    layout.news2.push(News2Rule {
                        risk,
                        horizon,
                        assembly: *assembly,
                    });
                    Slot::News2(layout.news2.len() - 1)
                }
                Compiled::Missing { .. } => Slot::Missing,
            };
            layout.rules.push((rule, slot));
        }
        layout
    }
}

/// A NEWS2 rule's state: the risk ordinal as a series, and the episode
/// told with the risk last told for it.
#[derive(Debug, Clone, Default)]
struct News2State {
    /// Made at the first score (or an adopted alert): most patients of a
    /// home-monitoring ward send a wearable's heart rate and SpO2 and never
    /// the rest of a score, and the series was 400 bytes of each of them.
    series: Option<Box<Series<Threshold>>>,
    told: Option<(DateTime<Utc>, Risk)>,
}

/// The series of `slot` (a NEWS2 state's), made as `rule`'s if it is not
/// yet.
fn news2_series<'a>(
    slot: &'a mut Option<Box<Series<Threshold>>>,
    rule: &News2Rule,
    max_points: usize,
) -> &'a mut Series<Threshold> {
    slot.get_or_insert_with(|| {
        Box::new(Series::new(rule.risk, rule.horizon).with_max_points(max_points))
    })
}

/// A patient's groups, by their index in the layout, each made when it is
/// first needed: a patient pays only for the series their devices measure.
type Groups<R> = Box<[Option<Box<Group<R>>>]>;

#[derive(Debug, Clone)]
struct Patient {
    layout: Arc<Layout>,
    thresholds: Groups<Threshold>,
    rates: Groups<RateOfChange>,
    /// By the NEWS2 rules' order in the layout.
    news2: Box<[News2State]>,
    history: News2History,
}

/// A rule of a kind that a [`Group`] judges, as compiled.
trait Grouped: crate::series::Rule + Copy {
    fn of(compiled: &Compiled) -> Option<Self>;
}

impl Grouped for Threshold {
    fn of(compiled: &Compiled) -> Option<Threshold> {
        match compiled {
            Compiled::Threshold { rule, .. } => Some(*rule),
            _ => None,
        }
    }
}

impl Grouped for RateOfChange {
    fn of(compiled: &Compiled) -> Option<RateOfChange> {
        match compiled {
            Compiled::RateOfChange { rule, .. } => Some(*rule),
            _ => None,
        }
    }
}

/// The rules on one metric's component with one horizon: their indices in
/// the layout's rules, in track order.
#[derive(Debug)]
struct Judged {
    metric: Metric,
    component: &'static str,
    horizon: Duration,
    rules: Vec<usize>,
}

/// The group `slot` holds, made with the rules of `judged` if it is not yet.
fn group<'a, R: Grouped>(
    slot: &'a mut Option<Box<Group<R>>>,
    judged: &Judged,
    rules: &[(Arc<Rule>, Slot)],
    max_points: usize,
) -> &'a mut Group<R> {
    slot.get_or_insert_with(|| {
        let mut group = Group::new(judged.horizon).with_max_points(max_points);
        for i in &judged.rules {
            if let Some(rule) = rules.get(*i).and_then(|(r, _)| R::of(&r.compiled)) {
                // A new group has judged nothing: adding never fails.
                group.add(rule);
            }
        }
        // One track per rule, in order: track i is rule `judged.rules[i]`.
        debug_assert_eq!(group.tracks(), judged.rules.len());
        Box::new(group)
    })
}

/// Adds the rule `index` to the group of `groups` on the same component
/// with the same horizon, or to a new one; returns the group and the track.
fn join(
    groups: &mut Vec<Judged>,
    metric: Metric,
    component: &'static str,
    index: usize,
    horizon: Duration,
) -> (usize, usize) {
    let g = match groups
        .iter()
        .position(|j| j.metric == metric && j.component == component && j.horizon == horizon)
    {
        Some(g) => g,
        None => {
            groups.push(Judged {
                metric,
                component,
                horizon,
                rules: Vec::new(),
            });
            groups.len() - 1
        }
    };
    groups[g].rules.push(index);
    (g, groups[g].rules.len() - 1)
}

/// One value of a reading (`point`, of `metric`'s `component`), for the
/// patient's groups to judge.
struct Value<'a> {
    pid: &'a str,
    rules: &'a [(Arc<Rule>, Slot)],
    max_points: usize,
    metric: Metric,
    component: &'a str,
    point: Point,
}

/// Judges `v` by every group of `groups` (laid out as `judged`) on its
/// series; the changes go to `changes` with their rule's index, refusals
/// (one per rule) to `skipped`.
fn judge<R: Grouped>(
    judged: &[Judged],
    groups: &mut [Option<Box<Group<R>>>],
    v: &Value<'_>,
    changes: &mut Vec<(usize, AlertChange)>,
    skipped: &mut Skipped,
) {
    for (j, slot) in judged
        .iter()
        .zip(groups.iter_mut())
        .filter(|(j, _)| j.metric == v.metric && j.component == v.component)
    {
        match group(slot, j, v.rules, v.max_points).observe(v.point) {
            Ok(ts) => changes.extend(ts.into_iter().map(|(track, t)| {
                let index = j.rules[track];
                let rule = &v.rules[index].0;
                (
                    index,
                    change(v.pid, rule, rule.severity.unwrap_or(Severity::Low), t),
                )
            })),
            Err(_) => skipped.too_late += j.rules.len() as u64,
        }
    }
}

/// Adopts `open` as track `track` of group `g` of `groups` (laid out as
/// `judged`); `false` when it cannot be (see [`Group::adopt`]).
fn adopt<R: Grouped>(
    judged: &[Judged],
    groups: &mut [Option<Box<Group<R>>>],
    (g, track): (usize, usize),
    rules: &[(Arc<Rule>, Slot)],
    max_points: usize,
    open: &OpenAlert,
) -> bool {
    match (judged.get(g), groups.get_mut(g)) {
        (Some(j), Some(slot)) => {
            group(slot, j, rules, max_points).adopt(track, open.episode_start, open.raised_at)
        }
        _ => false,
    }
}

/// An alert the store has open when the engine starts judging a patient
/// (after a restart or a rebalance): the engine continues it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAlert {
    pub rule: String,
    pub episode_start: DateTime<Utc>,
    pub raised_at: DateTime<Utc>,
    pub severity: Severity,
}

/// What the engine is told about a patient before judging their readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatientSetup {
    /// Per-patient overrides, by rule name (the `thresholds` table).
    pub overrides: HashMap<String, Override>,
    /// The patient's open alerts.
    pub open: Vec<OpenAlert>,
}

/// Every patient's state for one rule set.
#[derive(Debug)]
pub struct Engine {
    /// Shared by every patient without an override of them.
    rules: Vec<Arc<Rule>>,
    /// The layout of `rules`, shared likewise.
    layout: Arc<Layout>,
    horizon: Duration,
    /// Readings kept per series (a group of rules on one component with
    /// one horizon) and per NEWS2 parameter, at most.
    max_points: usize,
    /// Boxed: the map keeps a pointer per slot, its spare slots included,
    /// rather than a patient's whole record.
    patients: HashMap<String, Box<Patient>>,
}

fn risk_of_severity(s: Severity) -> Risk {
    match s {
        Severity::Low => Risk::Low,
        Severity::LowMedium => Risk::LowMedium,
        Severity::Medium => Risk::Medium,
        Severity::High => Risk::High,
    }
}

impl Engine {
    /// An engine judging `rules`, accepting readings up to `horizon` late.
    /// Each rule's series keeps at least its own window (a sustained
    /// duration and gap, a rate window, NEWS2 freshness), and no more than
    /// it needs: a series replays what it keeps on every reading.
    pub fn new(rules: Vec<Rule>, horizon: Duration) -> Engine {
        let mut engine = Engine {
            rules: rules.into_iter().map(Arc::new).collect(),
            layout: Arc::new(Layout::new(Vec::new())),
            horizon,
            max_points: usize::MAX,
            patients: HashMap::new(),
        };
        engine.layout = Arc::new(engine.layout_of(engine.rules.clone()));
        engine
    }

    /// The layout of `rules`.
    fn layout_of(&self, rules: Vec<Arc<Rule>>) -> Layout {
        Layout::new(
            rules
                .into_iter()
                .map(|r| {
                    let h = self.horizon_of(&r);
                    (r, h)
                })
                .collect(),
        )
    }

    /// The same engine keeping at most `max` readings per series and per
    /// NEWS2 parameter: on dense streams the oldest are folded early, so a
    /// patient's memory is bounded whatever their devices' rate (but for a
    /// rate-of-change rule's state, which holds its window); a reading
    /// older than the oldest kept is too late.
    pub fn with_max_points(mut self, max: usize) -> Engine {
        self.max_points = max.max(1);
        self
    }

    /// The rules, as configured.
    pub fn rules(&self) -> impl ExactSizeIterator<Item = &Rule> {
        self.rules.iter().map(|r| &**r)
    }

    /// How far back, by metric, a patient's readings must be replayed to
    /// rebuild every rule's window.
    pub fn lookback(&self) -> HashMap<Metric, Duration> {
        let mut out: HashMap<Metric, Duration> = HashMap::new();
        let mut put = |m: Metric, d: Duration| {
            let e = out.entry(m).or_insert(d);
            *e = (*e).max(d);
        };
        for r in &self.rules {
            let h = self.horizon_of(r);
            match &r.compiled {
                Compiled::Threshold { metric, .. } | Compiled::RateOfChange { metric, .. } => {
                    put(*metric, h)
                }
                Compiled::News2 { .. } => {
                    for m in [
                        Metric::RespiratoryRate,
                        Metric::Spo2,
                        Metric::SupplementalOxygen,
                        Metric::BloodPressure,
                        Metric::HeartRate,
                        Metric::Consciousness,
                        Metric::BodyTemperature,
                    ] {
                        put(m, h);
                    }
                }
                Compiled::Missing { .. } => {}
            }
        }
        out
    }

    fn horizon_of(&self, rule: &Rule) -> Duration {
        let own = match &rule.compiled {
            Compiled::Threshold {
                rule:
                    Threshold {
                        persistence: Persistence::Sustained { duration, max_gap },
                        ..
                    },
                ..
            } => *duration + *max_gap,
            Compiled::RateOfChange { rule, .. } => rule.window + rule.window / 10,
            Compiled::News2 { assembly, .. } => assembly.freshness,
            _ => Duration::zero(),
        };
        self.horizon.max(own)
    }

    /// Whether the engine has state for `patient_id`.
    pub fn knows(&self, patient_id: &str) -> bool {
        self.patients.contains_key(patient_id)
    }

    /// Forgets a patient (their partition was revoked, or they went idle).
    pub fn forget(&mut self, patient_id: &str) {
        self.patients.remove(patient_id);
    }

    /// Starts judging `patient_id` with `setup`, replacing any state held.
    /// Returns what was refused (an override that does not fit its rule,
    /// an open alert for an unknown rule); the rest applies.
    pub fn start_patient(&mut self, patient_id: &str, setup: &PatientSetup) -> Vec<String> {
        let mut refused = Vec::new();
        let layout = if setup.overrides.is_empty() {
            Arc::clone(&self.layout)
        } else {
            let rules = self
                .rules
                .iter()
                .map(|configured| {
                    match setup
                        .overrides
                        .get(&configured.name)
                        .map(|o| o.apply(configured))
                    {
                        Some(Ok(r)) => Arc::new(r),
                        Some(Err(why)) => {
                            refused.push(why);
                            Arc::clone(configured)
                        }
                        None => Arc::clone(configured),
                    }
                })
                .collect();
            Arc::new(self.layout_of(rules))
        };
        let max = self.max_points;
        let mut patient = Patient {
            thresholds: layout.thresholds.iter().map(|_| None).collect(),
            rates: layout.rates.iter().map(|_| None).collect(),
            news2: layout.news2.iter().map(|_| News2State::default()).collect(),
            history: News2History::default(),
            layout,
        };
        for open in &setup.open {
            let Some(slot) = patient
                .layout
                .rules
                .iter()
                .find(|(r, _)| r.name == open.rule)
                .map(|(_, slot)| *slot)
            else {
                refused.push(format!(
                    "open alert for rule {:?}, which is not configured",
                    open.rule
                ));
                continue;
            };
            let Patient {
                layout,
                thresholds,
                rates,
                news2,
                ..
            } = &mut patient;
            let adopted = match slot {
                Slot::Threshold { group, track } => adopt(
                    &layout.thresholds,
                    thresholds,
                    (group, track),
                    &layout.rules,
                    max,
                    open,
                ),
                Slot::Rate { group, track } => adopt(
                    &layout.rates,
                    rates,
                    (group, track),
                    &layout.rules,
                    max,
                    open,
                ),
                Slot::News2(n) => match (layout.news2.get(n), news2.get_mut(n)) {
                    (Some(rule), Some(n)) => {
                        n.told = Some((open.episode_start, risk_of_severity(open.severity)));
                        news2_series(&mut n.series, rule, max)
                            .adopt(open.episode_start, open.raised_at)
                    }
                    _ => false,
                },
                Slot::Missing => true,
            };
            if !adopted {
                refused.push(format!("a second open alert for rule {:?}", open.rule));
            }
        }
        self.patients
            .insert(patient_id.to_owned(), Box::new(patient));
        refused
    }

    /// How many patients have state.
    pub fn patients(&self) -> usize {
        self.patients.len()
    }

    /// Judges every reading of `batch`, in event-time order; returns the
    /// alert changes, in order, and what could not be judged. A patient not
    /// started yet is started with no overrides and no open alerts.
    pub fn observe(&mut self, batch: &Batch) -> (Vec<AlertChange>, Skipped) {
        let mut changes = Vec::new();
        let mut skipped = Skipped::default();
        if !self.patients.contains_key(&batch.patient_id) {
            self.start_patient(&batch.patient_id, &PatientSetup::default());
        }
        // How long NEWS2 parameter readings are kept: twice the widest
        // NEWS2 horizon, so a late reading still finds what was fresh then.
        let keep = self
            .rules
            .iter()
            .filter(|r| matches!(r.compiled, Compiled::News2 { .. }))
            .map(|r| self.horizon_of(r))
            .max()
            .unwrap_or(self.horizon);
        let max_points = self.max_points;
        let Some(patient) = self.patients.get_mut(&batch.patient_id) else {
            return (changes, skipped);
        };
        let pid = batch.patient_id.as_str();
        let mut readings: Vec<_> = batch.readings.iter().collect();
        readings.sort_by_key(|r| r.measured_at);
        let mut news2_instants = BTreeSet::new();
        // One value's changes, by rule: told in the rules' configured
        // order, whichever group judged them.
        let mut by_rule: Vec<(usize, AlertChange)> = Vec::new();
        for reading in readings {
            let is_artifact = artifact(reading.quality);
            // Microseconds, as PostgreSQL stores them: a reading replayed
            // from the store after a restart is the same instant as the one
            // from Kafka, not a second reading.
            let at = truncated(reading.measured_at);
            for (component, value) in reading.values() {
                if !is_artifact && let Some(slot) = News2History::slot(reading.metric, component) {
                    patient.history.param_mut(slot).insert(at, value);
                    news2_instants.insert(at);
                }
                let point = Point {
                    at,
                    value,
                    artifact: is_artifact,
                };
                let layout = &*patient.layout;
                let v = Value {
                    pid,
                    rules: &layout.rules,
                    max_points,
                    metric: reading.metric,
                    component,
                    point,
                };
                let (th, rt) = (&mut patient.thresholds, &mut patient.rates);
                judge(&layout.thresholds, th, &v, &mut by_rule, &mut skipped);
                judge(&layout.rates, rt, &v, &mut by_rule, &mut skipped);
                // Stable: a rule's own changes stay in event-time order.
                by_rule.sort_by_key(|(i, _)| *i);
                changes.extend(by_rule.drain(..).map(|(_, c)| c));
            }
        }
        if let Some(first) = news2_instants.first().copied() {
            let history = &patient.history;
            for (rule, slot) in &patient.layout.rules {
                let Slot::News2(n) = *slot else {
                    continue;
                };
                let (Some(news2_rule), Some(state)) =
                    (patient.layout.news2.get(n), patient.news2.get_mut(n))
                else {
                    continue;
                };
                // Each instant is scored once, with the whole batch in the
                // history; a late reading re-scores the instants after it.
                let mut instants = news2_instants.clone();
                if let Some(series) = &state.series {
                    instants.extend(series.instants_after(first));
                }
                let newest = instants
                    .last()
                    .copied()
                    .into_iter()
                    .chain(state.series.as_ref().and_then(|s| s.newest()))
                    .max();
                // `first` is the earliest of `instants`: the rest are after it.
                let mut scan = history.scan(first);
                for at in instants {
                    let latest = scan.latest_as_of(at);
                    let Ok(assembled) = news2_rule.assembly.assemble(&latest, at) else {
                        continue;
                    };
                    let score = news2::score(&assembled.observations);
                    let point = Point {
                        at,
                        value: ordinal(score.risk),
                        artifact: false,
                    };
                    let series = news2_series(&mut state.series, news2_rule, max_points);
                    let told = &mut state.told;
                    let ts = match series.revise(point) {
                        Ok(ts) => ts,
                        Err(_) => {
                            skipped.too_late += 1;
                            continue;
                        }
                    };
                    for t in ts {
                        match t {
                            Transition::Raise { start, at, value } => {
                                let risk = risk_of(value);
                                *told = Some((start, risk));
                                changes.push(AlertChange::Raised {
                                    alert_id: alert_id(pid, &rule.name, start),
                                    patient_id: pid.into(),
                                    rule: rule.name.clone(),
                                    severity: Severity::of_risk(risk).unwrap_or(Severity::Low),
                                    episode_start: start,
                                    at,
                                    value: f64::from(score.total),
                                    news2_score: Some(score.total),
                                });
                            }
                            Transition::Clear { start, at } => {
                                if told.is_some_and(|(s, _)| s == start) {
                                    *told = None;
                                }
                                changes.push(change(
                                    pid,
                                    rule,
                                    Severity::Low,
                                    Transition::Clear { start, at },
                                ));
                            }
                        }
                    }
                    // The open episode's severity follows the newest score only.
                    if Some(at) == newest
                        && let Some((start, risk)) = *told
                        && series.open_start() == Some(start)
                        && score.risk != risk
                        && let Some(severity) = Severity::of_risk(score.risk)
                    {
                        *told = Some((start, score.risk));
                        changes.push(AlertChange::SeverityChanged {
                            alert_id: alert_id(pid, &rule.name, start),
                            patient_id: pid.into(),
                            rule: rule.name.clone(),
                            severity,
                            at,
                            value: f64::from(score.total),
                        });
                    }
                }
            }
        }
        if let Some(newest) = batch.readings.iter().map(|r| r.measured_at).max() {
            patient
                .history
                .forget_before(newest - keep - keep, max_points);
        }
        (changes, skipped)
    }
}

fn change(patient_id: &str, rule: &Rule, severity: Severity, t: Transition) -> AlertChange {
    match t {
        Transition::Raise { start, at, value } => AlertChange::Raised {
            alert_id: alert_id(patient_id, &rule.name, start),
            patient_id: patient_id.into(),
            rule: rule.name.clone(),
            severity,
            episode_start: start,
            at,
            value,
            news2_score: None,
        },
        Transition::Clear { start, at } => AlertChange::Cleared {
            alert_id: alert_id(patient_id, &rule.name, start),
            patient_id: patient_id.into(),
            rule: rule.name.clone(),
            at,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, default_rules};
    use vitalwatch_core::catalogue::Acvpu;
    use vitalwatch_core::reading::{Measurement, Reading};

    fn t(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + min * 60, 0).unwrap_or_default()
    }

    fn reading(metric: Metric, min: i64, measurement: Measurement) -> Reading {
        Reading {
            metric,
            measurement,
            measured_at: t(min),
            quality: Quality::default(),
        }
    }

    #[test]
    fn a_news2_parameter_keeps_the_first_reading_of_an_instant_and_forgets_the_old() {
        let mut p = Param::default();
        for (min, v) in [(5, 95.0), (1, 91.0), (3, 93.0), (3, 80.0), (9, 99.0)] {
            p.insert(t(min), v);
        }
        assert_eq!(p.latest_as_of(t(0)), None);
        assert_eq!(p.latest_as_of(t(3)), Some((t(3), 93.0)), "the first stands");
        assert_eq!(p.latest_as_of(t(4)), Some((t(3), 93.0)));
        assert_eq!(p.latest_as_of(t(20)), Some((t(9), 99.0)));
        // The newest before the cutoff stays (it may still be fresh), and
        // no more than the cap.
        p.forget_before(t(4), 3);
        assert_eq!(p.latest_as_of(t(2)), None, "minute 1 forgotten");
        assert_eq!(p.latest_as_of(t(4)), Some((t(3), 93.0)));
        p.forget_before(t(0), 2);
        assert_eq!(p.latest_as_of(t(4)), None, "beyond the cap of 2");
        assert_eq!(p.latest_as_of(t(6)), Some((t(5), 95.0)));
        // A burst gives its memory back once forgotten.
        for s in 0..1000 {
            p.insert(t(10) + Duration::seconds(s), 90.0);
        }
        p.forget_before(t(0), 10);
        assert!(p.0.heap_bytes() < 1024, "{}", p.0.heap_bytes());
        assert_eq!(p.0.len(), 10);
    }

    #[test]
    fn a_scan_finds_what_each_parameter_s_latest_is_at_every_instant() {
        let mut h = News2History::default();
        // Pulse every minute, SpO2 every three, temperature once; one late.
        for min in 0..40 {
            h.param_mut(4).insert(t(min), 60.0 + min as f64);
            if min % 3 == 0 {
                h.param_mut(1).insert(t(min), 90.0 + (min % 7) as f64);
            }
        }
        h.param_mut(6).insert(t(17), 37.5);
        h.param_mut(1).insert(t(10) + Duration::seconds(30), 88.0);
        for from in [-5, 0, 10, 39, 45] {
            let mut scan = h.scan(t(from));
            for s in (from * 60..50 * 60).step_by(20) {
                let at = t(0) + Duration::seconds(s);
                let latest = scan.latest_as_of(at);
                let of = |slot: usize| h.param(slot).and_then(|p| p.latest_as_of(at));
                assert_eq!(latest.pulse, of(4), "{s}");
                assert_eq!(latest.spo2, of(1), "{s}");
                assert_eq!(latest.temperature, of(6), "{s}");
                assert_eq!(latest.respiration, None);
            }
        }
    }

    fn batch(patient: &str, readings: Vec<Reading>) -> Batch {
        Batch {
            device_id: "dev".into(),
            patient_id: patient.into(),
            seq: None,
            received_at: t(0),
            readings,
        }
    }

    fn engine() -> Engine {
        Engine::new(
            compile(&default_rules()).expect("defaults"),
            Duration::hours(1),
        )
    }

    fn raised(changes: &[AlertChange]) -> Vec<(&str, Severity)> {
        changes
            .iter()
            .filter_map(|c| match c {
                AlertChange::Raised { rule, severity, .. } => Some((rule.as_str(), *severity)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_cap_of_one_to_three_readings_tells_what_an_uncapped_engine_tells() {
        // `max_points_per_series` 1 to 3 is valid configuration: an
        // in-order stream is judged from the folded state, as without a
        // cap, and nothing panics.
        let run = |mut e: Engine| {
            let mut changes = Vec::new();
            for s in 0..900 {
                let value = if s < 600 { 84.0 } else { 97.0 };
                let r = Reading {
                    measured_at: t(0) + Duration::seconds(s),
                    ..reading(Metric::Spo2, 0, Measurement::Scalar(value))
                };
                changes.extend(e.observe(&batch("p-1", vec![r])).0);
            }
            changes
        };
        let uncapped = run(engine());
        let names: Vec<&str> = raised(&uncapped).into_iter().map(|(r, _)| r).collect();
        assert!(
            names.contains(&"spo2_low") && names.contains(&"spo2_critical"),
            "{names:?}"
        );
        assert!(
            uncapped
                .iter()
                .any(|c| matches!(c, AlertChange::Cleared { rule, .. } if rule == "spo2_low")),
            "{uncapped:?}"
        );
        for cap in 1..=3 {
            assert_eq!(run(engine().with_max_points(cap)), uncapped, "cap {cap}");
        }
    }

    #[test]
    fn one_reading_s_changes_come_in_the_rules_order_whichever_group_judged_them() {
        use crate::rules::{DirectionConfig, RuleConfig, TrendConfig};
        let below = |name: &str, count| RuleConfig::Threshold {
            name: name.into(),
            severity: Severity::Medium,
            metric: "spo2".into(),
            component: None,
            direction: DirectionConfig::Below,
            level: 90.0,
            clear: None,
            sustained_minutes: None,
            max_gap_minutes: None,
            count,
        };
        // `a` and `c` share a group (one series, one horizon); `b` is a
        // rate-of-change rule, in a group of its own, between them.
        let rules = vec![
            below("a", None),
            RuleConfig::RateOfChange {
                name: "b".into(),
                severity: Severity::Medium,
                metric: "spo2".into(),
                component: None,
                trend: TrendConfig::Fall,
                limit: 5.0,
                clear: None,
                window_hours: 1,
            },
            below("c", Some([1, 1])),
        ];
        let mut e = Engine::new(compile(&rules).expect("rules"), Duration::hours(1));
        let spo2 = |min, v| reading(Metric::Spo2, min, Measurement::Scalar(v));
        assert!(e.observe(&batch("p-1", vec![spo2(0, 97.0)])).0.is_empty());
        let (changes, _) = e.observe(&batch("p-1", vec![spo2(1, 84.0)]));
        let names: Vec<&str> = raised(&changes).into_iter().map(|(r, _)| r).collect();
        assert_eq!(names, vec!["a", "b", "c"]);
    }

    #[test]
    fn sustained_low_spo2_raises_once_per_patient_with_a_stable_id() {
        let mut e = engine();
        let low: Vec<Reading> = (0..=6)
            .map(|m| reading(Metric::Spo2, m, Measurement::Scalar(88.0)))
            .collect();
        let (changes, _) = e.observe(&batch("p-1", low.clone()));
        assert_eq!(raised(&changes), vec![("spo2_low", Severity::Medium)]);
        let AlertChange::Raised {
            alert_id: id,
            episode_start,
            at,
            ..
        } = &changes[0]
        else {
            panic!("{changes:?}")
        };
        assert_eq!((*episode_start, *at), (t(0), t(5)));
        assert_eq!(*id, alert_id("p-1", "spo2_low", t(0)));
        // The same batch again (a redelivery) changes nothing.
        assert!(e.observe(&batch("p-1", low.clone())).0.is_empty());
        // Another patient's readings are judged apart.
        assert_eq!(
            raised(&e.observe(&batch("p-2", low)).0),
            vec![("spo2_low", Severity::Medium)]
        );
        assert_eq!(e.patients(), 2);
        // Back to 93: cleared, under the same id.
        let (changes, _) = e.observe(&batch(
            "p-1",
            vec![reading(Metric::Spo2, 7, Measurement::Scalar(93.0))],
        ));
        assert_eq!(
            changes,
            vec![AlertChange::Cleared {
                alert_id: id.clone(),
                patient_id: "p-1".into(),
                rule: "spo2_low".into(),
                at: t(7)
            }]
        );
    }

    #[test]
    fn motion_artifacts_raise_nothing() {
        let mut e = engine();
        let flagged: Vec<Reading> = (0..=10)
            .map(|m| Reading {
                quality: Quality::MOTION_ARTIFACT,
                ..reading(Metric::Spo2, m, Measurement::Scalar(80.0))
            })
            .collect();
        assert!(e.observe(&batch("p", flagged)).0.is_empty());
    }

    #[test]
    fn blood_pressure_components_are_judged_apart() {
        let mut e = engine();
        let bp = |m, s, d| {
            reading(
                Metric::BloodPressure,
                m,
                Measurement::BloodPressure {
                    systolic: s,
                    diastolic: d,
                },
            )
        };
        // Two of three systolic readings above 180: hypertensive.
        let (changes, _) = e.observe(&batch(
            "p",
            vec![
                bp(0, 185.0, 95.0),
                bp(10, 150.0, 90.0),
                bp(20, 190.0, 100.0),
            ],
        ));
        assert_eq!(raised(&changes), vec![("systolic_high", Severity::High)]);
    }

    #[test]
    fn news2_rises_with_deterioration_and_reports_its_severity() {
        let mut e = engine();
        let scalar = |metric, m, v| reading(metric, m, Measurement::Scalar(v));
        let bp = |m, s| {
            reading(
                Metric::BloodPressure,
                m,
                Measurement::BloodPressure {
                    systolic: s,
                    diastolic: 70.0,
                },
            )
        };
        // Normal: 16/min, 97 %, 125 mmHg, 72/min, 37.0 °C: aggregate 0.
        let normal = vec![
            scalar(Metric::RespiratoryRate, 0, 16.0),
            scalar(Metric::Spo2, 0, 97.0),
            bp(0, 125.0),
            scalar(Metric::HeartRate, 0, 72.0),
            scalar(Metric::BodyTemperature, 0, 37.0),
        ];
        assert!(e.observe(&batch("p", normal)).0.is_empty());
        // Sepsis-like: 22/min (2), 38.5 °C (1), 112/min (2): aggregate 5, medium.
        let worse = vec![
            scalar(Metric::RespiratoryRate, 10, 22.0),
            scalar(Metric::BodyTemperature, 10, 38.5),
            scalar(Metric::HeartRate, 10, 112.0),
        ];
        let (changes, _) = e.observe(&batch("p", worse));
        // 38.5 °C is also a fever on its own rule.
        assert_eq!(
            raised(&changes),
            vec![("fever", Severity::Medium), ("news2", Severity::Medium)],
            "{changes:?}"
        );
        // Then 26/min (3) and new confusion (3): aggregate 9, high: the same alert, escalated.
        let (changes, _) = e.observe(&batch(
            "p",
            vec![
                scalar(Metric::RespiratoryRate, 20, 26.0),
                reading(
                    Metric::Consciousness,
                    20,
                    Measurement::Consciousness(Acvpu::NewConfusion),
                ),
            ],
        ));
        assert!(raised(&changes).is_empty(), "{changes:?}");
        assert!(
            changes.iter().any(|c| matches!(
                c,
                AlertChange::SeverityChanged {
                    severity: Severity::High,
                    ..
                }
            )),
            "{changes:?}"
        );
        // Stale readings give no score at all: nothing is raised from them.
        let mut e = engine();
        assert!(
            e.observe(&batch("q", vec![scalar(Metric::HeartRate, 0, 140.0)]))
                .0
                .iter()
                .all(|c| !matches!(c, AlertChange::Raised { rule, .. } if rule == "news2"))
        );
    }

    #[test]
    fn a_weight_gain_raises_the_rate_rule() {
        let mut e = engine();
        let w = |day: i64, kg| Reading {
            metric: Metric::BodyWeight,
            measurement: Measurement::Scalar(kg),
            measured_at: t(day * 1440),
            quality: Quality::default(),
        };
        let (changes, _) = e.observe(&batch("p", vec![w(0, 80.0), w(1, 80.4), w(2, 82.6)]));
        // 2.6 kg in 2 days: the 3-day rule; 2.2 kg in one day: the 1-day rule too.
        let mut got = raised(&changes);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("weight_gain_1d", Severity::Low),
                ("weight_gain_3d", Severity::Medium)
            ]
        );
    }

    #[test]
    fn readings_beyond_the_horizon_are_counted_not_judged() {
        let mut e = engine();
        e.observe(&batch(
            "p",
            vec![reading(
                Metric::Spo2,
                24 * 60 * 10,
                Measurement::Scalar(97.0),
            )],
        ));
        let (changes, skipped) = e.observe(&batch(
            "p",
            vec![reading(Metric::Spo2, 0, Measurement::Scalar(80.0))],
        ));
        assert!(changes.is_empty());
        assert!(
            skipped.too_late >= 2,
            "every SpO2 rule refused it: {skipped:?}"
        );
    }

    fn vitals(min: i64, rr: f64, spo2: f64, sys: f64, hr: f64, temp: f64) -> Vec<Reading> {
        let scalar = |metric, v| reading(metric, min, Measurement::Scalar(v));
        vec![
            scalar(Metric::RespiratoryRate, rr),
            scalar(Metric::Spo2, spo2),
            reading(
                Metric::BloodPressure,
                min,
                Measurement::BloodPressure {
                    systolic: sys,
                    diastolic: 70.0,
                },
            ),
            scalar(Metric::HeartRate, hr),
            scalar(Metric::BodyTemperature, temp),
        ]
    }

    fn news2_changes(changes: &[AlertChange]) -> Vec<&AlertChange> {
        changes
            .iter()
            .filter(|c| match c {
                AlertChange::Raised { rule, .. }
                | AlertChange::SeverityChanged { rule, .. }
                | AlertChange::Cleared { rule, .. } => rule == "news2",
            })
            .collect()
    }

    #[test]
    fn news2_scores_an_instant_once_with_the_whole_batch_whatever_its_order() {
        // Aggregate 5 (medium) only with every parameter of minute 10; the
        // batch lists them in reverse, after a reading of minute 20.
        let mut e = engine();
        let mut readings = vitals(10, 22.0, 97.0, 125.0, 112.0, 38.5);
        readings.reverse();
        readings.insert(
            0,
            reading(Metric::HeartRate, 20, Measurement::Scalar(112.0)),
        );
        let (changes, _) = e.observe(&batch("p", readings));
        let n = news2_changes(&changes);
        assert_eq!(n.len(), 1, "one raise, no severity churn: {changes:?}");
        assert!(
            matches!(n[0], AlertChange::Raised { severity: Severity::Medium, episode_start, .. } if *episode_start == t(10)),
            "{n:?}"
        );
    }

    #[test]
    fn a_late_news2_parameter_rescores_later_instants_and_only_the_newest_sets_the_severity() {
        let mut e = engine();
        // Minutes 0 and 10: medium (5).
        e.observe(&batch("p", vitals(0, 22.0, 97.0, 125.0, 112.0, 38.5)));
        let (changes, _) = e.observe(&batch("p", vitals(10, 22.0, 97.0, 125.0, 112.0, 38.5)));
        assert!(news2_changes(&changes).is_empty(), "{changes:?}");
        // A late confusion report at minute 5 (+3: high) re-scores minutes 5
        // and 10; minute 10 is the newest, so the alert is now high.
        let (changes, _) = e.observe(&batch(
            "p",
            vec![reading(
                Metric::Consciousness,
                5,
                Measurement::Consciousness(Acvpu::NewConfusion),
            )],
        ));
        let n = news2_changes(&changes);
        assert!(
            matches!(n.as_slice(), [AlertChange::SeverityChanged { severity: Severity::High, at, .. }] if *at == t(10)),
            "{n:?}"
        );
        // A late normal set at minute 2 changes no severity: it is not the newest instant.
        let (changes, _) = e.observe(&batch("p", vitals(2, 16.0, 97.0, 125.0, 72.0, 37.0)));
        assert!(news2_changes(&changes).is_empty(), "{changes:?}");
    }

    /// A NEWS2 series is made at a patient's first score: a wearable's
    /// heart rate and SpO2 alone never make one. An open NEWS2 alert from
    /// the store makes it at once, and is continued, not raised again.
    #[test]
    fn a_news2_series_is_made_at_the_first_score_or_for_an_adopted_alert() {
        let mut e = engine();
        let wearable: Vec<Reading> = (0..30)
            .flat_map(|m| {
                [
                    reading(Metric::HeartRate, m, Measurement::Scalar(72.0)),
                    reading(Metric::Spo2, m, Measurement::Scalar(97.0)),
                ]
            })
            .collect();
        let (changes, _) = e.observe(&batch("w", wearable));
        assert!(news2_changes(&changes).is_empty());
        assert!(e.patients["w"].news2.iter().all(|n| n.series.is_none()));
        // A whole score makes it.
        e.observe(&batch("w", vitals(31, 16.0, 97.0, 125.0, 72.0, 37.0)));
        assert!(e.patients["w"].news2.iter().all(|n| n.series.is_some()));

        let open = vec![OpenAlert {
            rule: "news2".into(),
            episode_start: t(-30),
            raised_at: t(-30),
            severity: Severity::Medium,
        }];
        let refused = e.start_patient(
            "adopted",
            &PatientSetup {
                open,
                ..PatientSetup::default()
            },
        );
        assert!(refused.is_empty(), "{refused:?}");
        // Still medium: nothing new. Then normal: cleared under its start.
        let (changes, _) = e.observe(&batch("adopted", vitals(0, 22.0, 97.0, 125.0, 112.0, 38.5)));
        assert!(news2_changes(&changes).is_empty(), "{changes:?}");
        let (changes, _) = e.observe(&batch("adopted", vitals(10, 16.0, 97.0, 125.0, 72.0, 37.0)));
        assert_eq!(
            news2_changes(&changes),
            [&AlertChange::Cleared {
                alert_id: alert_id("adopted", "news2", t(-30)),
                patient_id: "adopted".into(),
                rule: "news2".into(),
                at: t(10),
            }]
        );
    }

    #[test]
    fn news2_clears_one_risk_level_below_the_one_that_raised_it() {
        let mut e = engine();
        let (changes, _) = e.observe(&batch("p", vitals(0, 22.0, 97.0, 125.0, 112.0, 38.5)));
        assert_eq!(news2_changes(&changes).len(), 1);
        // 26/min alone is a single 3: low-medium. Still open, severity down.
        let (changes, _) = e.observe(&batch("p", vitals(10, 26.0, 97.0, 125.0, 72.0, 37.0)));
        let n = news2_changes(&changes);
        assert!(
            matches!(
                n.as_slice(),
                [AlertChange::SeverityChanged {
                    severity: Severity::LowMedium,
                    ..
                }]
            ),
            "{n:?}"
        );
        // Normal: cleared.
        let (changes, _) = e.observe(&batch("p", vitals(20, 16.0, 97.0, 125.0, 72.0, 37.0)));
        assert!(
            matches!(
                news2_changes(&changes).as_slice(),
                [AlertChange::Cleared { .. }]
            ),
            "{changes:?}"
        );
    }

    #[test]
    fn a_started_patient_continues_open_alerts_and_uses_their_overrides() {
        let mut e = engine();
        let mut overrides = HashMap::new();
        overrides.insert(
            "spo2_low".to_owned(),
            Override {
                level: Some(88.0),
                ..Override::default()
            },
        );
        overrides.insert(
            "fever".to_owned(),
            Override {
                spo2_scale: Some(2),
                ..Override::default()
            },
        );
        let open = vec![OpenAlert {
            rule: "systolic_high".into(),
            episode_start: t(-30),
            raised_at: t(-20),
            severity: Severity::High,
        }];
        let refused = e.start_patient("copd", &PatientSetup { overrides, open });
        assert_eq!(
            refused.len(),
            1,
            "the fever override does not fit: {refused:?}"
        );
        assert!(refused[0].contains("fever"));
        // 89 % for ten minutes: normal for this patient (limit 88).
        let low: Vec<Reading> = (0..=10)
            .map(|m| reading(Metric::Spo2, m, Measurement::Scalar(89.0)))
            .collect();
        assert!(raised(&e.observe(&batch("copd", low.clone())).0).is_empty());
        // Patients without overrides share the engine's layout and judge
        // by the configured rules: the same readings raise for them.
        e.start_patient("other", &PatientSetup::default());
        for p in ["other", "another"] {
            let changes = e.observe(&batch(p, low.clone())).0;
            assert!(raised(&changes).contains(&("spo2_low", Severity::Medium)));
        }
        let layout = |p: &str| Arc::clone(&e.patients[p].layout);
        assert!(Arc::ptr_eq(&layout("other"), &layout("another")));
        assert!(Arc::ptr_eq(&layout("other"), &e.layout));
        assert!(!Arc::ptr_eq(&layout("copd"), &e.layout));
        // The open systolic alert is continued: high readings raise nothing
        // new, normal ones clear it under its stored identity.
        let bp = |m, s| {
            reading(
                Metric::BloodPressure,
                m,
                Measurement::BloodPressure {
                    systolic: s,
                    diastolic: 90.0,
                },
            )
        };
        assert!(
            e.observe(&batch("copd", vec![bp(11, 190.0), bp(12, 185.0)]))
                .0
                .is_empty()
        );
        let (changes, _) = e.observe(&batch("copd", vec![bp(13, 150.0), bp(14, 150.0)]));
        assert_eq!(
            changes,
            vec![AlertChange::Cleared {
                alert_id: alert_id("copd", "systolic_high", t(-30)),
                patient_id: "copd".into(),
                rule: "systolic_high".into(),
                at: t(14)
            }]
        );
    }
}
