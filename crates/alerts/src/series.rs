//! A rule judged on one series (one patient's metric, or one component of
//! it) on event time (`measured_at`), with late and out-of-order readings.
//!
//! A [`Series`] keeps the readings of the last `horizon` (behind the newest
//! it has seen) and, on every reading, replays them in event-time order
//! from the rule's state before the oldest. Episodes already told to nurses
//! are facts the replay must respect, whatever a late reading says:
//! - a told episode is open in the replay from the instant it was raised
//!   (forced open if the replayed readings alone would not open it), and
//!   stays open until the rule's own clear condition;
//! - a told clear is final: at that instant the replay closes the episode,
//!   and what came before it does not count towards the next one;
//! - an episode the replay finds that overlaps a told one *is* that one
//!   (it takes the told start, the alert's identity);
//! - a told episode still open that a late reading clears in the replay
//!   covers the next episode the replay raises: the nurse's alert was open
//!   through both, so there is no resolve and new alert for one stretch.
//!
//! So an episode is raised once and cleared once however its readings
//! arrive, and nothing told is retracted. A reading older than the horizon
//! is refused ([`TooLate`]): the caller counts it; the store still has it.
//! A series also keeps at most `max_points` readings: on a dense stream (a
//! 1 Hz wearable) the oldest beyond that are folded early, as if the
//! horizon had passed them, so memory per series is bounded whatever the
//! rate (a reading older than the oldest kept is then too late).
//! The rules on one series with the same horizon form a [`Group`]: its
//! readings are kept once for all of them (a patient's heart rate is kept
//! once, not once per heart-rate rule), and each rule keeps only its state
//! and its told episodes. [`Series`] is a group of one.
//! A reading newer than every kept
//! one (the common case) is stepped from the state after the last one (the
//! tip) instead of replaying the horizon; a test checks that this tells
//! exactly what full replays tell.
//!
//! **Known gap:** for k-of-n rules, a full replay (after a late reading)
//! that starts from a base state folded since the episode was told can find
//! the episode under another start (its first abnormal reading among the
//! last n) and tell it as a new one. Single and sustained rules are checked
//! free of this by the test above; k-of-n needs the episode's identity kept
//! in the folded state. The store closes the consequence: it refuses an
//! episode that overlaps one already alerted for the same patient and rule
//! (`store::alerts::raise`), so no nurse is alerted twice for one stretch.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Timelike, Utc};

use crate::packed::Packed;

/// A rule's judgement, one reading at a time, in event-time order.
pub trait Rule {
    /// What the rule remembers between readings.
    type State: Clone + Default + std::fmt::Debug;
    /// Judges `p`, the next reading in event-time order.
    fn step(&self, state: &mut Self::State, p: &Point) -> Option<Step>;
    /// The start of the episode open in `state`, if any.
    fn open_since(state: &Self::State) -> Option<DateTime<Utc>>;
    /// Makes the episode open in `state` the told one that started at
    /// `start`: opens it if the state is quiet, renames it if it is open.
    fn force_open(&self, state: &mut Self::State, start: DateTime<Utc>);
    /// Ends the open episode (a told clear is final) so that nothing before
    /// this instant counts towards a new one.
    fn force_quiet(&self, state: &mut Self::State);
}

/// What one step of a rule found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    Raised {
        start: DateTime<Utc>,
        at: DateTime<Utc>,
        value: f64,
    },
    Cleared {
        at: DateTime<Utc>,
    },
}

/// One reading of the series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: DateTime<Utc>,
    pub value: f64,
    /// Flagged as an artifact: ignored by the rule.
    pub artifact: bool,
}

/// A kept reading: its instant in microseconds, as the store keeps it,
/// and its value, NaN for a reading the rule ignores (an artifact: rules
/// skip artifacts and non-finite values alike). Kept packed
/// ([`crate::packed`]), a few bytes each.
#[derive(Debug, Clone, Copy)]
struct Kept {
    at: i64,
    value: f64,
}

impl Kept {
    fn of(p: &Point) -> Kept {
        Kept {
            at: p.at.timestamp_micros(),
            value: if p.artifact { f64::NAN } else { p.value },
        }
    }

    fn at(self) -> DateTime<Utc> {
        micros(self.at)
    }

    fn from_packed((at, value): (i64, f64)) -> Kept {
        Kept { at, value }
    }

    fn point(self) -> Point {
        self.point_at(self.at())
    }

    /// The reading back, at `at` (its instant, however it was turned back
    /// from microseconds).
    fn point_at(self, at: DateTime<Utc>) -> Point {
        Point {
            at,
            value: self.value,
            artifact: self.value.is_nan(),
        }
    }

    fn same(self, other: Kept) -> bool {
        self.at == other.at && self.value.to_bits() == other.value.to_bits()
    }
}

/// The instant `t` microseconds after the epoch (every kept `t` came from
/// one).
pub(crate) fn micros(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t).unwrap_or_default()
}

const DAY_MICROS: i64 = 86_400_000_000;

/// Turns kept instants back into instants, keeping the calendar date of
/// the last one: a replay's readings are in order, most of them on one
/// day, so the calendar arithmetic of [`micros`] is done once a day rather
/// than once a reading.
#[derive(Debug)]
struct Instants {
    day: i64,
    date: NaiveDate,
}

impl Instants {
    fn new() -> Instants {
        Instants {
            day: i64::MIN,
            date: NaiveDate::MIN,
        }
    }

    fn at(&mut self, t: i64) -> DateTime<Utc> {
        let day = t.div_euclid(DAY_MICROS);
        if day != self.day {
            let Some(midnight) = DateTime::from_timestamp_micros(day * DAY_MICROS) else {
                return micros(t);
            };
            (self.day, self.date) = (day, midnight.date_naive());
        }
        let in_day = t.rem_euclid(DAY_MICROS);
        match NaiveTime::from_num_seconds_from_midnight_opt(
            (in_day / 1_000_000) as u32,
            (in_day % 1_000_000) as u32 * 1_000,
        ) {
            Some(time) => self.date.and_time(time).and_utc(),
            None => micros(t),
        }
    }

    fn point(&mut self, k: Kept) -> Point {
        k.point_at(self.at(k.at))
    }
}

/// What a reading changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// A new episode: `start` is the event time of its first abnormal
    /// reading (the alert's identity), `at` when the rule's condition was
    /// met, `value` the reading that met it.
    Raise {
        start: DateTime<Utc>,
        at: DateTime<Utc>,
        value: f64,
    },
    /// The episode that started at `start` cleared at `at`.
    Clear {
        start: DateTime<Utc>,
        at: DateTime<Utc>,
    },
}

/// The reading is older than the series keeps: it cannot be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLate {
    pub oldest_kept: DateTime<Utc>,
}

/// An episode told to nurses.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Told {
    /// Its identity: the event time of its first abnormal reading.
    start: DateTime<Utc>,
    /// The event time the rule's condition was met.
    raised_at: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
}

/// An episode found by a replay.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Found {
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    /// Raise time and value, when the replay's own readings raised it.
    raised: Option<(DateTime<Utc>, f64)>,
}

/// Where a told fact or a reading falls in a replay: a told raise applies
/// before the reading at its instant, a reading next, a told clear after
/// it (the reading at a clear's instant is the one that cleared).
type Key = (DateTime<Utc>, u8);

fn point_key(at: DateTime<Utc>) -> Key {
    (at, 1)
}

#[derive(Debug, Clone, Copy)]
enum Fact {
    Open { start: DateTime<Utc> },
    Close { at: DateTime<Utc> },
}

/// One rule's judgement of a [`Group`]'s readings: the state before them,
/// and the episodes already told.
#[derive(Debug, Clone)]
struct Track<R: Rule> {
    rule: R,
    /// The state after every reading the group has folded.
    base: R::State,
    /// The last episode the folded readings found (it may still take in
    /// an episode the kept readings raise).
    base_last: Option<Found>,
    /// Sorted by start; they never overlap.
    told: Vec<Told>,
    /// The state and the episodes found after the last judgement (every
    /// kept reading and told fact applied): a reading newer than every kept
    /// one is stepped from here instead of replaying the horizon.
    tip: Option<(R::State, Vec<Found>)>,
}

/// The rules of one series (a patient's metric, or a component of it) that
/// keep the same window: its readings of the last `horizon` (at most
/// `max_points` of them) are kept once, for all of them, and each rule
/// keeps its own state before them and its own told episodes. Rules with
/// the same horizon and cap fold the same readings at the same moment, so
/// a reading is too late for all of them or for none.
#[derive(Debug, Clone)]
pub struct Group<R: Rule> {
    horizon: Duration,
    /// Readings are judged only after this instant; older ones were folded
    /// into every track's base.
    folded_until: Option<DateTime<Utc>>,
    /// The kept readings, oldest first, one per instant.
    points: Packed,
    /// At most this many are kept.
    max_points: usize,
    tracks: Vec<Track<R>>,
    /// Off in tests that compare the incremental path with full replays.
    incremental: bool,
}

impl<R: Rule> Group<R> {
    /// A group with no rule yet, accepting readings up to `horizon` older
    /// than the newest it has seen. The horizon must cover each rule's own
    /// window (a sustained duration), or late readings cannot complete it.
    pub fn new(horizon: Duration) -> Group<R> {
        Group {
            horizon,
            folded_until: None,
            points: Packed::default(),
            max_points: usize::MAX,
            tracks: Vec::new(),
            incremental: true,
        }
    }

    /// The same group keeping at most `max` readings (at least one).
    pub fn with_max_points(mut self, max: usize) -> Group<R> {
        self.max_points = max.max(1);
        self
    }

    /// Adds `rule`, judged from the next reading on; returns its track, the
    /// index its transitions are told under. For a group that has judged
    /// nothing yet (`None` otherwise: the rule would miss what was folded).
    pub fn add(&mut self, rule: R) -> Option<usize> {
        if !self.points.is_empty() || self.folded_until.is_some() {
            return None;
        }
        // Rules are added once, at a patient's start: no room to spare
        // (a track is some 300 bytes, and most groups hold one or two).
        self.tracks.reserve_exact(1);
        self.tracks.push(Track {
            rule,
            base: R::State::default(),
            base_last: None,
            told: Vec::new(),
            tip: None,
        });
        Some(self.tracks.len() - 1)
    }

    /// How many rules it judges.
    pub fn tracks(&self) -> usize {
        self.tracks.len()
    }

    /// How many readings it keeps now.
    pub fn kept(&self) -> usize {
        self.points.len()
    }

    /// Whether `track`'s rule has an episode open (raised and not cleared).
    pub fn is_open(&self, track: usize) -> bool {
        self.open_start(track).is_some()
    }

    /// The start of `track`'s open episode, if any.
    pub fn open_start(&self, track: usize) -> Option<DateTime<Utc>> {
        self.tracks
            .get(track)?
            .told
            .iter()
            .find(|e| e.end.is_none())
            .map(|e| e.start)
    }

    /// Takes as `track`'s told an episode that is open elsewhere (an alert
    /// the store has open after a restart): it is never raised again, and it
    /// clears under `start` when the rule's clear condition is met. For a
    /// group that has judged nothing yet; `false` (and nothing changes)
    /// otherwise, or when an episode is already open.
    pub fn adopt(&mut self, track: usize, start: DateTime<Utc>, raised_at: DateTime<Utc>) -> bool {
        if !self.points.is_empty() || self.folded_until.is_some() || self.is_open(track) {
            return false;
        }
        let Some(t) = self.tracks.get_mut(track) else {
            return false;
        };
        // In whole microseconds, as every instant the replays compare.
        let (start, raised_at) = (truncated(start), truncated(raised_at));
        t.told.push(Told {
            start,
            raised_at: raised_at.max(start),
            end: None,
        });
        true
    }

    /// The event times of the readings kept after `after`, oldest first.
    pub fn instants_after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let from = self
            .points
            .count_before(after.timestamp_micros().saturating_add(1));
        let mut instants = Instants::new();
        self.points.iter_from(from).map(move |p| instants.at(p.0))
    }

    /// The newest instant judged.
    pub fn newest(&self) -> Option<DateTime<Utc>> {
        self.points.back().map(|p| micros(p.0))
    }

    /// Judges one reading by every rule; returns what it changed, in
    /// event-time order for each track. The same reading twice changes
    /// nothing.
    pub fn observe(&mut self, p: Point) -> Result<Vec<(usize, Transition)>, TooLate> {
        let (k, p) = kept(p);
        self.within_horizon(p.at)?;
        let Some(i) = self.points.keep(k.at, k.value) else {
            return Ok(Vec::new()); // a redelivery, or a second device at the same instant: the first stands
        };
        let newest = i + 1 == self.points.len();
        Ok(self.judge(newest.then_some(p)))
    }

    /// Like [`Group::observe`], but a reading at an instant already held
    /// replaces it: for derived series (a score recomputed as more of the
    /// same instant's readings arrive).
    pub fn revise(&mut self, p: Point) -> Result<Vec<(usize, Transition)>, TooLate> {
        let (k, p) = kept(p);
        self.within_horizon(p.at)?;
        let newest = match self.points.find(k.at) {
            Ok(i)
                if self
                    .points
                    .get(i)
                    .is_some_and(|kept| Kept::from_packed(kept).same(k)) =>
            {
                return Ok(Vec::new());
            }
            Ok(i) => {
                self.points.set(i, k.at, k.value);
                false
            }
            Err(_) => self
                .points
                .keep(k.at, k.value)
                .is_some_and(|i| i + 1 == self.points.len()),
        };
        Ok(self.judge(newest.then_some(p)))
    }

    /// `Err` when `at` is older than what this group keeps.
    fn within_horizon(&self, at: DateTime<Utc>) -> Result<(), TooLate> {
        if let Some((newest, _)) = self.points.back()
            && let Some(h) = self.horizon.num_microseconds()
            && at.timestamp_micros() < newest.saturating_sub(h)
        {
            return Err(TooLate {
                oldest_kept: micros(newest) - self.horizon,
            });
        }
        match self.folded_until {
            Some(f) if at <= f => Err(TooLate { oldest_kept: f }),
            _ => Ok(()),
        }
    }

    /// Every track judges the kept readings: stepped from its tip with
    /// `next`, a reading newer than every other kept one, else by a full
    /// replay. Then the group folds.
    fn judge(&mut self, next: Option<Point>) -> Vec<(usize, Transition)> {
        let mut out = Vec::new();
        for (i, track) in self.tracks.iter_mut().enumerate() {
            let ts = match (next, track.tip.take()) {
                (Some(p), Some((mut state, mut found))) if self.incremental => {
                    track.step(&mut state, &p, &mut found);
                    track.settle(state, found)
                }
                _ => track.replay(&self.points, self.folded_until),
            };
            out.extend(ts.into_iter().map(|t| (i, t)));
        }
        self.fold();
        out
    }

    /// Folds readings older than the horizon, or beyond `max_points`, into
    /// every track's base state.
    fn fold(&mut self) {
        let Some((newest, _)) = self.points.back() else {
            return;
        };
        let cutoff = self
            .horizon
            .num_microseconds()
            .map_or(i64::MIN, |h| newest.saturating_sub(h));
        let len = self.points.len();
        let n = self
            .points
            .iter()
            .enumerate()
            .take_while(|(i, p)| len - i > self.max_points || p.0 < cutoff)
            .count();
        let Some(last) = n
            .checked_sub(1)
            .and_then(|i| self.points.get(i))
            .map(|p| micros(p.0))
        else {
            return;
        };
        for track in &mut self.tracks {
            track.fold(
                self.points
                    .iter()
                    .take(n)
                    .map(|k| Kept::from_packed(k).point()),
                self.folded_until,
                last,
            );
        }
        self.points.drain_front(n);
        self.folded_until = Some(last);
    }
}

/// `p` as kept, and `p` with its instant truncated to microseconds as the
/// kept reading has it (no calendar arithmetic: the engine has usually
/// truncated it already).
fn kept(p: Point) -> (Kept, Point) {
    let k = Kept::of(&p);
    (k, k.point_at(truncated(p.at)))
}

/// `at` in whole microseconds, the instant a kept reading has: cheap when
/// only the fraction changes; a leap second (chrono's `23:59:59` with a
/// second's worth of extra nanoseconds) becomes the next second, as
/// [`micros`] makes it, so one reading never has two instants.
pub(crate) fn truncated(at: DateTime<Utc>) -> DateTime<Utc> {
    match at.timestamp_subsec_nanos() {
        n if n >= 1_000_000_000 => micros(at.timestamp_micros()),
        n if n % 1_000 == 0 => at,
        n => at.with_nanosecond(n - n % 1_000).unwrap_or(at),
    }
}

impl<R: Rule> Track<R> {
    /// The told facts after `after`, in replay order.
    fn facts(&self, after: Option<Key>) -> Vec<(Key, Fact)> {
        let mut facts: Vec<(Key, Fact)> = Vec::with_capacity(self.told.len() * 2);
        for t in &self.told {
            facts.push(((t.raised_at, 0), Fact::Open { start: t.start }));
            if let Some(end) = t.end {
                facts.push(((end, 2), Fact::Close { at: end }));
            }
        }
        facts.retain(|(k, _)| after.is_none_or(|a| *k > a));
        facts.sort_by_key(|(k, _)| *k);
        facts
    }

    fn apply(&self, state: &mut R::State, fact: Fact, found: &mut Vec<Found>) {
        match fact {
            Fact::Open { start } => {
                self.rule.force_open(state, start);
                match found.last_mut() {
                    Some(last) if last.end.is_none() => last.start = start,
                    _ => found.push(Found {
                        start,
                        end: None,
                        raised: None,
                    }),
                }
            }
            Fact::Close { at } => {
                if R::open_since(state).is_some() {
                    self.rule.force_quiet(state);
                    if let Some(last) = found.last_mut()
                        && last.end.is_none()
                    {
                        last.end = Some(at);
                    }
                }
            }
        }
    }

    fn step(&self, state: &mut R::State, p: &Point, found: &mut Vec<Found>) {
        match self.rule.step(state, p) {
            Some(Step::Raised { start, at, value }) => match found.last_mut() {
                // The episode before was cleared only in the replay (by a
                // late reading) while nurses were told it was open at this
                // instant: it covers this one, rather than a resolve and a
                // new alert.
                Some(last)
                    if last.end.is_some()
                        && self.told.iter().any(|t| {
                            t.start == last.start && t.end.is_none_or(|end| end >= at)
                        }) =>
                {
                    self.rule.force_open(state, last.start);
                    last.end = None;
                }
                _ => found.push(Found {
                    start,
                    end: None,
                    raised: Some((at, value)),
                }),
            },
            Some(Step::Cleared { at }) => {
                if let Some(last) = found.last_mut()
                    && last.end.is_none()
                {
                    last.end = Some(at);
                }
            }
            None => {}
        }
    }

    /// Replays `points` (kept after `folded_until`) and the told facts,
    /// and tells what changed.
    fn replay(&mut self, points: &Packed, folded_until: Option<DateTime<Utc>>) -> Vec<Transition> {
        let mut state = self.base.clone();
        let mut found: Vec<Found> = self.base_last.into_iter().collect();
        let facts = self.facts(folded_until.map(point_key));
        let mut next = 0;
        let mut instants = Instants::new();
        for p in points.iter().map(|k| instants.point(Kept::from_packed(k))) {
            while let Some((k, fact)) = facts.get(next)
                && *k < point_key(p.at)
            {
                self.apply(&mut state, *fact, &mut found);
                next += 1;
            }
            self.step(&mut state, &p, &mut found);
        }
        // A told fact after the newest reading (an adopted alert raised
        // later than the history replayed so far) must not be applied
        // before readings that come between: no tip then.
        let newest = points.back().map(|k| k.0);
        let ahead = facts[next..]
            .iter()
            .any(|(k, _)| newest.is_some_and(|n| k.0.timestamp_micros() > n));
        for (_, fact) in &facts[next..] {
            self.apply(&mut state, *fact, &mut found);
        }
        let out = self.settle(state, found);
        if ahead {
            self.tip = None;
        }
        out
    }

    /// Compares the episodes found with those told, tells what changed,
    /// and keeps the state as the new tip.
    fn settle(&mut self, state: R::State, found: Vec<Found>) -> Vec<Transition> {
        let mut out = Vec::new();
        for ep in &found {
            match self.told.iter_mut().find(|t| t.start == ep.start) {
                Some(t) => {
                    if t.end.is_none()
                        && let Some(end) = ep.end
                    {
                        out.push(Transition::Clear {
                            start: t.start,
                            at: end,
                        });
                        t.end = Some(end);
                    }
                }
                None => {
                    let (at, value) = ep.raised.unwrap_or((ep.start, f64::NAN));
                    out.push(Transition::Raise {
                        start: ep.start,
                        at,
                        value,
                    });
                    if let Some(end) = ep.end {
                        out.push(Transition::Clear {
                            start: ep.start,
                            at: end,
                        });
                    }
                    self.told.push(Told {
                        start: ep.start,
                        raised_at: at,
                        end: ep.end,
                    });
                }
            }
        }
        self.told.sort_by_key(|e| e.start);
        self.tip = Some((state, found));
        out
    }

    /// Folds `points`, the oldest kept readings (after `before`, up to and
    /// including `until`), and the told facts before them, into the base
    /// state, and forgets told episodes that ended before what is kept.
    fn fold(
        &mut self,
        points: impl Iterator<Item = Point>,
        before: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) {
        let facts = self.facts(before.map(point_key));
        let mut next = 0;
        let mut base = self.base.clone();
        let mut scratch: Vec<Found> = self.base_last.into_iter().collect();
        for p in points {
            while let Some((k, fact)) = facts.get(next)
                && *k < point_key(p.at)
            {
                self.apply(&mut base, *fact, &mut scratch);
                next += 1;
            }
            self.step(&mut base, &p, &mut scratch);
        }
        self.base = base;
        self.base_last = scratch.pop();
        self.told.retain(|e| e.end.is_none_or(|end| end >= until));
        self.base_last = self
            .base_last
            .filter(|e| e.end.is_none_or(|end| end >= until));
        // The tip's state is unchanged by folding; its old episodes are
        // forgotten like the told ones.
        if let Some((_, found)) = &mut self.tip {
            found.retain(|e| e.end.is_none_or(|end| end >= until));
        }
    }
}

/// One rule on one series: a [`Group`] of one.
#[derive(Debug, Clone)]
pub struct Series<R: Rule>(Group<R>);

impl<R: Rule> Series<R> {
    /// A series judged by `rule`, accepting readings up to `horizon` older
    /// than the newest it has seen (see [`Group::new`]).
    pub fn new(rule: R, horizon: Duration) -> Series<R> {
        let mut group = Group::new(horizon);
        group.add(rule);
        Series(group)
    }

    /// The same series keeping at most `max` readings (at least one).
    pub fn with_max_points(self, max: usize) -> Series<R> {
        Series(self.0.with_max_points(max))
    }

    /// How many readings it keeps now.
    pub fn kept(&self) -> usize {
        self.0.kept()
    }

    /// The same series judging every reading by a full replay (for tests
    /// that check the incremental path against it).
    #[doc(hidden)]
    pub fn replaying_always(mut self) -> Series<R> {
        self.0.incremental = false;
        self
    }

    /// Whether an episode is open (raised and not cleared).
    pub fn is_open(&self) -> bool {
        self.0.is_open(0)
    }

    /// The start of the open episode, if any.
    pub fn open_start(&self) -> Option<DateTime<Utc>> {
        self.0.open_start(0)
    }

    /// See [`Group::adopt`].
    pub fn adopt(&mut self, start: DateTime<Utc>, raised_at: DateTime<Utc>) -> bool {
        self.0.adopt(0, start, raised_at)
    }

    /// The event times of the readings kept after `after`, oldest first.
    pub fn instants_after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        self.0.instants_after(after)
    }

    /// The newest instant judged.
    pub fn newest(&self) -> Option<DateTime<Utc>> {
        self.0.newest()
    }

    /// Judges one reading; returns what it changed, in event-time order.
    /// The same reading twice changes nothing.
    pub fn observe(&mut self, p: Point) -> Result<Vec<Transition>, TooLate> {
        self.0.observe(p).map(untracked)
    }

    /// See [`Group::revise`].
    pub fn revise(&mut self, p: Point) -> Result<Vec<Transition>, TooLate> {
        self.0.revise(p).map(untracked)
    }
}

fn untracked(ts: Vec<(usize, Transition)>) -> Vec<Transition> {
    ts.into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_turn_back_as_the_calendar_does() {
        let mut instants = Instants::new();
        // Across days, years, leap days and the epoch, forwards and back.
        let day = DAY_MICROS;
        let mut ts = vec![0, -1, 1, day - 1, day, -day, -day - 1];
        for base in [
            1_709_164_800_000_000_i64,
            1_800_000_000_123_456,
            4_102_444_799_999_999,
        ] {
            ts.extend([
                base,
                base + 1,
                base + day / 2,
                base + day,
                base - 7,
                base + 400 * day,
            ]);
        }
        for t in ts {
            assert_eq!(instants.at(t), micros(t), "{t}");
        }
    }

    #[test]
    fn an_instant_is_truncated_as_it_is_kept() {
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_999))
            .map(|t| t.and_utc())
            .expect("a leap second");
        for at in [
            leap,
            micros(1_800_000_000_123_456),
            DateTime::from_timestamp(1_800_000_000, 123_456_789).unwrap_or_default(),
            DateTime::from_timestamp(-1, 999_999_999).unwrap_or_default(),
        ] {
            let t = truncated(at);
            assert_eq!(t, micros(at.timestamp_micros()), "{at:?}");
            assert!(t.timestamp_subsec_nanos() < 1_000_000_000, "{at:?}: {t:?}");
        }
        // A leap-second reading stepped from the tip and the same reading
        // replayed are one instant: a late reading does not tell its
        // episode again.
        let rule = crate::threshold::Threshold {
            direction: crate::threshold::Direction::Below,
            level: 90.0,
            clear: 92.0,
            persistence: crate::threshold::Persistence::Single,
        };
        let mut s = Series::new(rule, Duration::hours(1));
        let p = |at: DateTime<Utc>, value: f64| Point {
            at,
            value,
            artifact: false,
        };
        let raised = s.observe(p(leap, 85.0)).expect("judged");
        assert_eq!(raised.len(), 1, "{raised:?}");
        let late = s
            .observe(p(leap - Duration::seconds(30), 95.0))
            .expect("judged");
        assert!(late.is_empty(), "told again: {late:?}");
    }

    #[test]
    fn a_kept_reading_is_the_reading_to_the_microsecond() {
        let at = DateTime::from_timestamp(1_800_000_000, 123_456_789).unwrap_or_default();
        let p = Kept::of(&Point {
            at,
            value: 37.3,
            artifact: false,
        })
        .point();
        assert_eq!(p.at.timestamp_micros(), at.timestamp_micros());
        assert_eq!(p.at.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(p.value, 37.3);
        assert!(!p.artifact);
        let artifact = Kept::of(&Point {
            at,
            value: 70.0,
            artifact: true,
        });
        assert!(artifact.point().artifact, "an artifact stays one");
        assert!(artifact.same(artifact) && !artifact.same(Kept::of(&p)));
    }
}
