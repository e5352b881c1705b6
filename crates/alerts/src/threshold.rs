//! Threshold rules on one series (one patient's metric, or one component
//! of it), judged on event time (`measured_at`), with no I/O.
//!
//! A rule fires when a reading is beyond its `level`: on a single reading,
//! when the condition holds for a `sustained` duration, or when `k` of the
//! last `n` readings are beyond it. Once raised, an episode clears only on
//! a reading back past the separate `clear` level (hysteresis): readings in
//! between keep it open, so a value hovering around the limit does not
//! flap. Readings flagged as artifacts (motion, low perfusion, cuff error)
//! neither raise, nor break a run, nor clear.
//!
//! Readings may arrive late and out of order. A [`Series`] keeps the
//! readings of the last `horizon` (behind the newest it has seen) and, on
//! every reading, replays them in event-time order from the state before
//! the oldest; the episodes that replay finds are compared with those
//! already told, by overlap, so an episode is raised once and cleared once
//! however its readings arrive. A reading older than the horizon is refused
//! ([`TooLate`]): the caller counts it; the store still has it.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Duration, Utc};

/// Which side of the level is abnormal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Abnormal below `level` (SpO2 < 90).
    Below,
    /// Abnormal above `level` (systolic > 180).
    Above,
}

/// How the condition must hold before an episode is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// One reading beyond the level.
    Single,
    /// Every reading beyond the level for this long (event time), with no
    /// gap between readings longer than the duration itself.
    Sustained(Duration),
    /// At least `k` of the last `n` readings beyond the level.
    Count { k: usize, n: usize },
}

/// A threshold rule's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub direction: Direction,
    pub level: f64,
    /// Back past this, an open episode clears. On the normal side of
    /// `level` (or equal to it: no hysteresis).
    pub clear: f64,
    pub persistence: Persistence,
}

impl Threshold {
    /// Checks the parameters; `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let ok = match self.direction {
            Direction::Below => self.clear >= self.level,
            Direction::Above => self.clear <= self.level,
        };
        if !ok || !self.level.is_finite() || !self.clear.is_finite() {
            return Err(format!(
                "clear level {} must be finite and on the normal side of level {} ({:?})",
                self.clear, self.level, self.direction
            ));
        }
        match self.persistence {
            Persistence::Sustained(d) if d <= Duration::zero() => Err("a sustained duration must be positive".into()),
            Persistence::Count { k, n } if k == 0 || n == 0 || k > n => Err(format!("{k} of {n} is not a valid count")),
            _ => Ok(()),
        }
    }

    fn beyond(&self, v: f64) -> bool {
        match self.direction {
            Direction::Below => v < self.level,
            Direction::Above => v > self.level,
        }
    }

    fn cleared(&self, v: f64) -> bool {
        match self.direction {
            Direction::Below => v >= self.clear,
            Direction::Above => v <= self.clear,
        }
    }
}

/// One reading of the series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: DateTime<Utc>,
    pub value: f64,
    /// Flagged as an artifact: ignored by the rule.
    pub artifact: bool,
}

/// What a reading changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// A new episode: `start` is the event time of its first abnormal
    /// reading (the alert's identity), `at` when the rule's condition was
    /// met, `value` the reading that met it.
    Raise { start: DateTime<Utc>, at: DateTime<Utc>, value: f64 },
    /// The episode that started at `start` cleared at `at`.
    Clear { start: DateTime<Utc>, at: DateTime<Utc> },
}

/// The reading is older than the series keeps: it cannot be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLate {
    pub oldest_kept: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Quiet,
    /// Abnormal since `since`, the last abnormal reading at `last`.
    Building { since: DateTime<Utc>, last: DateTime<Utc> },
    Active { start: DateTime<Utc> },
}

/// The rule's state machine over readings in event-time order.
#[derive(Debug, Clone, PartialEq)]
struct Machine {
    phase: Phase,
    /// Count rules: the last `n` judged readings (time, abnormal).
    recent: VecDeque<(DateTime<Utc>, bool)>,
}

enum Step {
    Raised { start: DateTime<Utc>, at: DateTime<Utc>, value: f64 },
    Cleared { at: DateTime<Utc> },
}

impl Machine {
    fn new() -> Machine {
        Machine { phase: Phase::Quiet, recent: VecDeque::new() }
    }

    fn step(&mut self, rule: &Threshold, p: &Point) -> Option<Step> {
        if p.artifact || !p.value.is_finite() {
            return None;
        }
        let abnormal = rule.beyond(p.value);
        if let Persistence::Count { n, .. } = rule.persistence {
            self.recent.push_back((p.at, abnormal));
            while self.recent.len() > n {
                self.recent.pop_front();
            }
        }
        match self.phase.clone() {
            Phase::Active { .. } => {
                let still_counting = match rule.persistence {
                    Persistence::Count { k, .. } => self.recent.iter().filter(|r| r.1).count() >= k,
                    _ => false,
                };
                if rule.cleared(p.value) && !still_counting {
                    self.phase = Phase::Quiet;
                    return Some(Step::Cleared { at: p.at });
                }
                None
            }
            phase => {
                let (start, met) = match rule.persistence {
                    Persistence::Single => (p.at, abnormal),
                    Persistence::Sustained(d) => {
                        if !abnormal {
                            self.phase = Phase::Quiet;
                            return None;
                        }
                        let since = match phase {
                            // A gap longer than the duration breaks the run.
                            Phase::Building { since, last } if p.at - last <= d => since,
                            _ => p.at,
                        };
                        self.phase = Phase::Building { since, last: p.at };
                        (since, p.at - since >= d)
                    }
                    Persistence::Count { k, .. } => {
                        let count = self.recent.iter().filter(|r| r.1).count();
                        let first = self.recent.iter().find(|r| r.1).map_or(p.at, |r| r.0);
                        (first, abnormal && count >= k)
                    }
                };
                if met {
                    self.phase = Phase::Active { start };
                    return Some(Step::Raised { start, at: p.at, value: p.value });
                }
                None
            }
        }
    }
}

/// An episode, as found by a replay or as told.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Episode {
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
}

impl Episode {
    fn overlaps(&self, other: &Episode) -> bool {
        let far = DateTime::<Utc>::MAX_UTC;
        self.start <= other.end.unwrap_or(far) && other.start <= self.end.unwrap_or(far)
    }
}

/// One rule on one series: the readings of the last `horizon`, the state
/// before them, and the episodes already told.
#[derive(Debug, Clone)]
pub struct Series {
    rule: Threshold,
    horizon: Duration,
    /// The state after every reading older than `points`.
    base: Machine,
    /// Readings are judged only after this instant; older ones were folded
    /// into `base`.
    folded_until: Option<DateTime<Utc>>,
    points: BTreeMap<DateTime<Utc>, Point>,
    told: Vec<Episode>,
}

impl Series {
    /// A series judged by `rule`, accepting readings up to `horizon` older
    /// than the newest it has seen. The horizon must cover the rule's own
    /// window (a sustained duration), or late readings cannot complete it.
    pub fn new(rule: Threshold, horizon: Duration) -> Series {
        Series { rule, horizon, base: Machine::new(), folded_until: None, points: BTreeMap::new(), told: Vec::new() }
    }

    /// Whether an episode is open (raised and not cleared).
    pub fn is_open(&self) -> bool {
        self.told.iter().any(|e| e.end.is_none())
    }

    /// Judges one reading; returns what it changed, in event-time order.
    /// The same reading twice changes nothing.
    pub fn observe(&mut self, p: Point) -> Result<Vec<Transition>, TooLate> {
        if let Some(newest) = self.points.keys().next_back()
            && p.at < *newest - self.horizon
        {
            return Err(TooLate { oldest_kept: *newest - self.horizon });
        }
        if let Some(f) = self.folded_until
            && p.at <= f
        {
            return Err(TooLate { oldest_kept: f });
        }
        if self.points.contains_key(&p.at) {
            return Ok(Vec::new()); // a redelivery, or a second device at the same instant: the first stands
        }
        self.points.insert(p.at, p);
        let found = self.replay();
        let mut out = Vec::new();
        for ep in &found.episodes {
            match self.told.iter_mut().find(|t| t.overlaps(ep)) {
                None => {
                    // Every untold episode was raised in this replay (one
                    // carried in from the base state was told before).
                    let (at, value) = found.raised.get(&ep.start).copied().unwrap_or((ep.start, f64::NAN));
                    out.push(Transition::Raise { start: ep.start, at, value });
                    if let Some(end) = ep.end {
                        out.push(Transition::Clear { start: ep.start, at: end });
                    }
                    self.told.push(*ep);
                }
                Some(t) => {
                    if t.end.is_none()
                        && let Some(end) = ep.end
                    {
                        // Cleared: told under the start it was raised with.
                        out.push(Transition::Clear { start: t.start, at: end });
                        t.end = Some(end);
                    }
                }
            }
        }
        self.told.sort_by_key(|e| e.start);
        self.fold();
        Ok(out)
    }

    fn replay(&self) -> Replay {
        let mut m = self.base.clone();
        let mut episodes = Vec::new();
        let mut raised = BTreeMap::new();
        if let Phase::Active { start } = m.phase {
            episodes.push(Episode { start, end: None });
        }
        for p in self.points.values() {
            match m.step(&self.rule, p) {
                Some(Step::Raised { start, at, value }) => {
                    episodes.push(Episode { start, end: None });
                    raised.insert(start, (at, value));
                }
                Some(Step::Cleared { at }) => {
                    if let Some(last) = episodes.last_mut() {
                        last.end = Some(at);
                    }
                }
                None => {}
            }
        }
        Replay { episodes, raised }
    }

    /// Folds readings older than the horizon into the base state, and
    /// forgets told episodes that ended before what is kept.
    fn fold(&mut self) {
        let Some(newest) = self.points.keys().next_back().copied() else { return };
        let cutoff = newest - self.horizon;
        while let Some(entry) = self.points.first_entry() {
            if *entry.key() >= cutoff {
                break;
            }
            let p = entry.remove();
            self.base.step(&self.rule, &p);
            self.folded_until = Some(p.at);
        }
        if let Some(f) = self.folded_until {
            self.told.retain(|e| e.end.is_none_or(|end| end > f));
        }
    }
}

struct Replay {
    episodes: Vec<Episode>,
    /// Raise time and value by episode start (episodes found in the kept
    /// readings; one carried in from the base state is already told).
    raised: BTreeMap<DateTime<Utc>, (DateTime<Utc>, f64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + min * 60, 0).unwrap_or_default()
    }

    fn p(min: i64, value: f64) -> Point {
        Point { at: t(min), value, artifact: false }
    }

    /// SpO2 below 90, clearing at 92.
    fn spo2(persistence: Persistence) -> Threshold {
        Threshold { direction: Direction::Below, level: 90.0, clear: 92.0, persistence }
    }

    fn run(series: &mut Series, points: &[Point]) -> Vec<Transition> {
        points.iter().flat_map(|p| series.observe(*p).unwrap_or_default()).collect()
    }

    fn raise(start: i64, at: i64, value: f64) -> Transition {
        Transition::Raise { start: t(start), at: t(at), value }
    }

    fn clear(start: i64, at: i64) -> Transition {
        Transition::Clear { start: t(start), at: t(at) }
    }

    #[test]
    fn parameters_are_checked() {
        assert!(spo2(Persistence::Single).validate().is_ok());
        assert!(Threshold { clear: 88.0, ..spo2(Persistence::Single) }.validate().is_err(), "clear on the abnormal side");
        assert!(spo2(Persistence::Count { k: 4, n: 3 }).validate().is_err());
        assert!(spo2(Persistence::Sustained(Duration::zero())).validate().is_err());
        let high = Threshold { direction: Direction::Above, level: 180.0, clear: 170.0, persistence: Persistence::Single };
        assert!(high.validate().is_ok());
        assert!(Threshold { clear: 185.0, ..high }.validate().is_err());
    }

    #[test]
    fn a_single_reading_raises_once_and_hysteresis_does_not_flap() {
        let mut s = Series::new(spo2(Persistence::Single), Duration::hours(1));
        let got = run(&mut s, &[p(0, 95.0), p(1, 89.0), p(2, 88.0), p(3, 90.5), p(4, 89.5), p(5, 91.9), p(6, 92.0), p(7, 93.0)]);
        // 90.5, 89.5 and 91.9 sit between the level and the clear level: one episode.
        assert_eq!(got, vec![raise(1, 1, 89.0), clear(1, 6)]);
        assert!(!s.is_open());
        assert_eq!(run(&mut s, &[p(8, 85.0)]), vec![raise(8, 8, 85.0)], "a new episode after clearing");
        assert!(s.is_open());
    }

    #[test]
    fn a_sustained_rule_waits_for_its_duration() {
        let mut s = Series::new(spo2(Persistence::Sustained(Duration::minutes(5))), Duration::hours(1));
        // Four minutes below, then a normal reading: the run breaks, nothing raised.
        assert!(run(&mut s, &[p(0, 89.0), p(1, 88.0), p(2, 89.0), p(3, 89.0), p(4, 89.0), p(5, 91.0)]).is_empty());
        // Five minutes below: raised at minute 15, episode from minute 10.
        let got = run(&mut s, &[p(10, 89.0), p(11, 88.0), p(12, 87.0), p(13, 88.0), p(14, 89.0), p(15, 89.0), p(16, 88.0)]);
        assert_eq!(got, vec![raise(10, 15, 89.0)]);
        // Only back to 92 clears it.
        assert_eq!(run(&mut s, &[p(17, 91.0), p(18, 92.5)]), vec![clear(10, 18)]);
    }

    #[test]
    fn a_gap_longer_than_the_duration_breaks_a_sustained_run() {
        let mut s = Series::new(spo2(Persistence::Sustained(Duration::minutes(5))), Duration::hours(1));
        assert!(run(&mut s, &[p(0, 89.0), p(20, 89.0)]).is_empty(), "two readings 20 minutes apart prove nothing in between");
        assert_eq!(run(&mut s, &[p(24, 89.0), p(25, 89.0)]), vec![raise(20, 25, 89.0)]);
    }

    #[test]
    fn k_of_the_last_n() {
        let mut s = Series::new(spo2(Persistence::Count { k: 3, n: 5 }), Duration::hours(1));
        assert!(run(&mut s, &[p(0, 89.0), p(1, 95.0), p(2, 89.0), p(3, 95.0)]).is_empty());
        assert_eq!(run(&mut s, &[p(4, 88.0)]), vec![raise(0, 4, 88.0)]);
        // 95 at minute 5: the last five are 95, 89, 95, 88, 95, two low.
        assert_eq!(run(&mut s, &[p(5, 95.0)]), vec![clear(0, 5)]);

        // A normal reading clears only once fewer than k of the last n are low.
        let mut s = Series::new(spo2(Persistence::Count { k: 2, n: 4 }), Duration::hours(1));
        assert_eq!(run(&mut s, &[p(0, 89.0), p(1, 89.0)]), vec![raise(0, 1, 89.0)]);
        assert!(run(&mut s, &[p(2, 95.0), p(3, 95.0)]).is_empty(), "89, 89, 95, 95: still 2 of the last 4");
        assert_eq!(run(&mut s, &[p(4, 95.0)]), vec![clear(0, 4)]);
    }

    #[test]
    fn artifacts_neither_raise_nor_break_nor_clear() {
        let artifact = |min, value| Point { at: t(min), value, artifact: true };
        let mut s = Series::new(spo2(Persistence::Single), Duration::hours(1));
        assert!(run(&mut s, &[artifact(0, 70.0), artifact(1, 72.0)]).is_empty(), "motion artifact lows raise nothing");
        let mut s = Series::new(spo2(Persistence::Sustained(Duration::minutes(3))), Duration::hours(1));
        let got = run(&mut s, &[p(0, 89.0), artifact(1, 97.0), p(2, 89.0), p(3, 88.0), artifact(4, 99.0), p(5, 89.0)]);
        assert_eq!(got, vec![raise(0, 3, 88.0)], "an artifact high neither breaks the run nor clears");
    }

    #[test]
    fn out_of_order_readings_give_the_same_episodes() {
        let readings: Vec<Point> = [95.0, 89.0, 88.0, 89.0, 87.0, 89.0, 91.0, 93.0, 95.0, 89.0, 88.0, 88.0, 89.0, 86.0, 94.0]
            .iter()
            .enumerate()
            .map(|(i, v)| p(i as i64, *v))
            .collect();
        let rule = spo2(Persistence::Sustained(Duration::minutes(3)));
        let mut in_order = Series::new(rule, Duration::hours(1));
        let want = run(&mut in_order, &readings);
        assert_eq!(want, vec![raise(1, 4, 87.0), clear(1, 7), raise(9, 12, 89.0), clear(9, 14)]);
        // Shuffled arrivals (deterministic): each episode is raised once and
        // cleared once. Its start is the first abnormal reading seen in its
        // run when it was raised, so a reading of the run arriving after the
        // raise can leave it later than in order, never before the run nor
        // after the raise; the clear comes under the same start.
        for seed in [3_u64, 17, 99, 12_345, 7, 2024] {
            let mut shuffled = readings.clone();
            let mut x = seed;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut s = Series::new(rule, Duration::hours(1));
            let got = run(&mut s, &shuffled);
            let mut raises: Vec<DateTime<Utc>> =
                got.iter().filter_map(|tr| if let Transition::Raise { start, .. } = tr { Some(*start) } else { None }).collect();
            let mut clears: Vec<DateTime<Utc>> =
                got.iter().filter_map(|tr| if let Transition::Clear { start, .. } = tr { Some(*start) } else { None }).collect();
            raises.sort();
            clears.sort();
            assert_eq!(raises, clears, "seed {seed}: every raised episode cleared, under its start: {got:?}");
            assert!((t(1)..=t(4)).contains(&raises[0]), "seed {seed}: {raises:?}");
            // When the reading that ended the first episode arrives after the
            // second began, the first alert was still open through the
            // second: it covers both, and no second alert is raised for a
            // stretch a nurse was already alerted to.
            match raises.len() {
                1 => {}
                2 => assert!((t(9)..=t(12)).contains(&raises[1]), "seed {seed}: {raises:?}"),
                n => panic!("seed {seed}: {n} episodes: {got:?}"),
            }
            let told: Vec<(DateTime<Utc>, DateTime<Utc>)> = got
                .iter()
                .filter_map(|tr| match tr {
                    Transition::Clear { start, at } => Some((*start, *at)),
                    Transition::Raise { .. } => None,
                })
                .collect();
            for instant in [t(4), t(12)] {
                assert!(told.iter().any(|(a, b)| (*a..=*b).contains(&instant)), "seed {seed}: {instant} not covered by {told:?}");
            }
            assert!(!s.is_open());
        }
    }

    #[test]
    fn a_late_reading_can_complete_or_reveal_an_episode_in_the_past() {
        let mut s = Series::new(spo2(Persistence::Sustained(Duration::minutes(3))), Duration::hours(1));
        assert!(run(&mut s, &[p(0, 89.0), p(1, 89.0), p(2, 89.0), p(10, 95.0)]).is_empty());
        // Minute 3 arrives late: the run 0..3 was long enough, and minute 10 cleared it.
        assert_eq!(run(&mut s, &[p(3, 88.0)]), vec![raise(0, 3, 88.0), clear(0, 10)]);
        // The same late reading again changes nothing.
        assert!(run(&mut s, &[p(3, 88.0)]).is_empty());
    }

    #[test]
    fn a_late_reading_does_not_retract_or_duplicate_a_told_episode() {
        let mut s = Series::new(spo2(Persistence::Sustained(Duration::minutes(3))), Duration::hours(1));
        assert_eq!(run(&mut s, &[p(0, 89.0), p(1, 89.0), p(2, 89.0), p(3, 89.0)]), vec![raise(0, 3, 89.0)]);
        // A late normal reading inside the run: the replay no longer finds
        // the episode, but it was told and stays open until cleared.
        assert!(run(&mut s, &[Point { at: t(1) + Duration::seconds(30), value: 95.0, artifact: false }]).is_empty());
        assert!(run(&mut s, &[p(4, 89.0), p(5, 89.0)]).is_empty(), "the run that follows is the same episode");
        // A late low reading before the start overlaps the told episode: no second raise.
        assert!(run(&mut s, &[Point { at: t(0) - Duration::seconds(30), value: 89.0, artifact: false }]).is_empty());
        assert_eq!(run(&mut s, &[p(6, 93.0)]), vec![clear(0, 6)], "cleared under the start it was raised with");
    }

    #[test]
    fn readings_older_than_the_horizon_are_refused_and_state_survives_folding() {
        let mut s = Series::new(spo2(Persistence::Single), Duration::minutes(10));
        assert_eq!(run(&mut s, &[p(0, 85.0)]), vec![raise(0, 0, 85.0)]);
        // Minute 0 folds into the base state once minute 30 arrives; the
        // episode stays open across the fold.
        assert!(run(&mut s, &[p(30, 91.0)]).is_empty());
        assert_eq!(s.observe(p(5, 95.0)), Err(TooLate { oldest_kept: t(20) }));
        assert_eq!(s.observe(p(0, 95.0)), Err(TooLate { oldest_kept: t(20) }));
        assert!(s.is_open());
        assert_eq!(run(&mut s, &[p(31, 96.0)]), vec![clear(0, 31)]);
        assert!(!s.is_open());
    }
}
