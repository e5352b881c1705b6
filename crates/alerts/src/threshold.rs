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
//! Judged through a [`crate::series::Group`] (with the other rules on the
//! same series), which handles late and out-of-order readings.

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};

use crate::series::{Point, Rule, Step};

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
    /// Every reading beyond the level for `duration` (event time), with no
    /// gap between readings longer than `max_gap`: a gap proves nothing
    /// about what happened in it, so it breaks the run.
    Sustained {
        duration: Duration,
        max_gap: Duration,
    },
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
            Persistence::Sustained { duration, max_gap }
                if duration <= Duration::zero() || max_gap <= Duration::zero() =>
            {
                Err("a sustained duration and its maximum gap must be positive".into())
            }
            Persistence::Count { k, n } if k == 0 || n == 0 || k > n => {
                Err(format!("{k} of {n} is not a valid count"))
            }
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

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Phase {
    #[default]
    Quiet,
    /// Abnormal since `since`, the last abnormal reading at `last`.
    Building {
        since: DateTime<Utc>,
        last: DateTime<Utc>,
    },
    Active {
        start: DateTime<Utc>,
    },
}

/// A threshold rule's state between readings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    phase: Phase,
    /// Count rules: the last `n` judged readings (time, abnormal).
    recent: VecDeque<(DateTime<Utc>, bool)>,
}

impl Rule for Threshold {
    type State = State;

    fn open_since(state: &State) -> Option<DateTime<Utc>> {
        match state.phase {
            Phase::Active { start } => Some(start),
            _ => None,
        }
    }

    fn force_open(&self, state: &mut State, start: DateTime<Utc>) {
        state.phase = Phase::Active { start };
    }

    fn force_quiet(&self, state: &mut State) {
        state.phase = Phase::Quiet;
        for r in &mut state.recent {
            r.1 = false;
        }
    }

    fn step(&self, state: &mut State, p: &Point) -> Option<Step> {
        let rule = self;
        if p.artifact || !p.value.is_finite() {
            return None;
        }
        let abnormal = rule.beyond(p.value);
        if let Persistence::Count { n, .. } = rule.persistence {
            state.recent.push_back((p.at, abnormal));
            while state.recent.len() > n {
                state.recent.pop_front();
            }
        }
        match state.phase.clone() {
            Phase::Active { .. } => {
                let still_counting = match rule.persistence {
                    Persistence::Count { k, .. } => {
                        state.recent.iter().filter(|r| r.1).count() >= k
                    }
                    _ => false,
                };
                if rule.cleared(p.value) && !still_counting {
                    state.phase = Phase::Quiet;
                    return Some(Step::Cleared { at: p.at });
                }
                None
            }
            phase => {
                let (start, met) = match rule.persistence {
                    Persistence::Single => (p.at, abnormal),
                    Persistence::Sustained {
                        duration: d,
                        max_gap,
                    } => {
                        if !abnormal {
                            state.phase = Phase::Quiet;
                            return None;
                        }
                        let since = match phase {
                            Phase::Building { since, last } if p.at - last <= max_gap => since,
                            _ => p.at,
                        };
                        state.phase = Phase::Building { since, last: p.at };
                        (since, p.at - since >= d)
                    }
                    Persistence::Count { k, .. } => {
                        let count = state.recent.iter().filter(|r| r.1).count();
                        let first = state.recent.iter().find(|r| r.1).map_or(p.at, |r| r.0);
                        (first, abnormal && count >= k)
                    }
                };
                if met {
                    state.phase = Phase::Active { start };
                    return Some(Step::Raised {
                        start,
                        at: p.at,
                        value: p.value,
                    });
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::{Group, Series, TooLate, Transition};

    fn t(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + min * 60, 0).unwrap_or_default()
    }

    fn p(min: i64, value: f64) -> Point {
        Point {
            at: t(min),
            value,
            artifact: false,
        }
    }

    /// SpO2 below 90, clearing at 92.
    fn spo2(persistence: Persistence) -> Threshold {
        Threshold {
            direction: Direction::Below,
            level: 90.0,
            clear: 92.0,
            persistence,
        }
    }

    /// Sustained for `min` minutes, a gap of more than `min` breaking the run.
    fn sustained(min: i64) -> Persistence {
        Persistence::Sustained {
            duration: Duration::minutes(min),
            max_gap: Duration::minutes(min),
        }
    }

    fn run(series: &mut Series<Threshold>, points: &[Point]) -> Vec<Transition> {
        points
            .iter()
            .flat_map(|p| series.observe(*p).unwrap_or_default())
            .collect()
    }

    fn raise(start: i64, at: i64, value: f64) -> Transition {
        Transition::Raise {
            start: t(start),
            at: t(at),
            value,
        }
    }

    fn clear(start: i64, at: i64) -> Transition {
        Transition::Clear {
            start: t(start),
            at: t(at),
        }
    }

    #[test]
    fn parameters_are_checked() {
        assert!(spo2(Persistence::Single).validate().is_ok());
        assert!(
            Threshold {
                clear: 88.0,
                ..spo2(Persistence::Single)
            }
            .validate()
            .is_err(),
            "clear on the abnormal side"
        );
        assert!(spo2(Persistence::Count { k: 4, n: 3 }).validate().is_err());
        assert!(
            spo2(Persistence::Sustained {
                duration: Duration::zero(),
                max_gap: Duration::minutes(1)
            })
            .validate()
            .is_err()
        );
        let high = Threshold {
            direction: Direction::Above,
            level: 180.0,
            clear: 170.0,
            persistence: Persistence::Single,
        };
        assert!(high.validate().is_ok());
        assert!(
            Threshold {
                clear: 185.0,
                ..high
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn a_single_reading_raises_once_and_hysteresis_does_not_flap() {
        let mut s = Series::new(spo2(Persistence::Single), Duration::hours(1));
        let got = run(
            &mut s,
            &[
                p(0, 95.0),
                p(1, 89.0),
                p(2, 88.0),
                p(3, 90.5),
                p(4, 89.5),
                p(5, 91.9),
                p(6, 92.0),
                p(7, 93.0),
            ],
        );
        // 90.5, 89.5 and 91.9 sit between the level and the clear level: one episode.
        assert_eq!(got, vec![raise(1, 1, 89.0), clear(1, 6)]);
        assert!(!s.is_open());
        assert_eq!(
            run(&mut s, &[p(8, 85.0)]),
            vec![raise(8, 8, 85.0)],
            "a new episode after clearing"
        );
        assert!(s.is_open());
    }

    #[test]
    fn a_capped_series_keeps_at_most_its_points_and_tells_what_full_replays_tell() {
        let mut capped = Series::new(spo2(sustained(5)), Duration::hours(1)).with_max_points(4);
        let mut full = Series::new(spo2(sustained(5)), Duration::hours(1)).replaying_always();
        // Low from minute 0 (raised at minute 5, from minute 0); at minute
        // 10, with the episode open and its start folded out of the capped
        // series, a late normal reading of 9:30; then normal.
        let mut points: Vec<Point> = (0..=10).map(|m| p(m, 85.0)).collect();
        points.push(Point {
            at: t(9) + Duration::seconds(30),
            ..p(0, 97.0)
        });
        points.extend((11..20).map(|m| p(m, 97.0)));
        let told = run(&mut full, &points);
        assert_eq!(told.first(), Some(&raise(0, 5, 85.0)), "{told:?}");
        assert!(
            told.iter().any(|t| matches!(t, Transition::Clear { .. })),
            "{told:?}"
        );
        assert_eq!(run(&mut capped, &points), told);
        assert_eq!(capped.kept(), 4);
        assert_eq!(full.kept(), 21);
        // Five minutes late: within the horizon, but older than the capped
        // series keeps (minutes 16 to 19).
        let late = Point {
            at: t(14) + Duration::seconds(30),
            ..p(0, 97.0)
        };
        assert!(full.observe(late).is_ok());
        assert!(capped.observe(late).is_err());
        // Within what it keeps, a late reading is still judged.
        let within = Point {
            at: t(18) + Duration::seconds(30),
            ..p(0, 97.0)
        };
        assert!(capped.observe(within).is_ok());
        assert_eq!(capped.kept(), 4);
    }

    #[test]
    fn a_sustained_rule_waits_for_its_duration() {
        let mut s = Series::new(spo2(sustained(5)), Duration::hours(1));
        // Four minutes below, then a normal reading: the run breaks, nothing raised.
        assert!(
            run(
                &mut s,
                &[
                    p(0, 89.0),
                    p(1, 88.0),
                    p(2, 89.0),
                    p(3, 89.0),
                    p(4, 89.0),
                    p(5, 91.0)
                ]
            )
            .is_empty()
        );
        // Five minutes below: raised at minute 15, episode from minute 10.
        let got = run(
            &mut s,
            &[
                p(10, 89.0),
                p(11, 88.0),
                p(12, 87.0),
                p(13, 88.0),
                p(14, 89.0),
                p(15, 89.0),
                p(16, 88.0),
            ],
        );
        assert_eq!(got, vec![raise(10, 15, 89.0)]);
        // Only back to 92 clears it.
        assert_eq!(
            run(&mut s, &[p(17, 91.0), p(18, 92.5)]),
            vec![clear(10, 18)]
        );
    }

    #[test]
    fn a_gap_longer_than_the_duration_breaks_a_sustained_run() {
        let mut s = Series::new(spo2(sustained(5)), Duration::hours(1));
        assert!(
            run(&mut s, &[p(0, 89.0), p(20, 89.0)]).is_empty(),
            "two readings 20 minutes apart prove nothing in between"
        );
        assert_eq!(
            run(&mut s, &[p(24, 89.0), p(25, 89.0)]),
            vec![raise(20, 25, 89.0)]
        );
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
        assert_eq!(
            run(&mut s, &[p(0, 89.0), p(1, 89.0)]),
            vec![raise(0, 1, 89.0)]
        );
        assert!(
            run(&mut s, &[p(2, 95.0), p(3, 95.0)]).is_empty(),
            "89, 89, 95, 95: still 2 of the last 4"
        );
        assert_eq!(run(&mut s, &[p(4, 95.0)]), vec![clear(0, 4)]);
    }

    #[test]
    fn artifacts_neither_raise_nor_break_nor_clear() {
        let artifact = |min, value| Point {
            at: t(min),
            value,
            artifact: true,
        };
        let mut s = Series::new(spo2(Persistence::Single), Duration::hours(1));
        assert!(
            run(&mut s, &[artifact(0, 70.0), artifact(1, 72.0)]).is_empty(),
            "motion artifact lows raise nothing"
        );
        let mut s = Series::new(spo2(sustained(3)), Duration::hours(1));
        let got = run(
            &mut s,
            &[
                p(0, 89.0),
                artifact(1, 97.0),
                p(2, 89.0),
                p(3, 88.0),
                artifact(4, 99.0),
                p(5, 89.0),
            ],
        );
        assert_eq!(
            got,
            vec![raise(0, 3, 88.0)],
            "an artifact high neither breaks the run nor clears"
        );
    }

    #[test]
    fn out_of_order_readings_give_the_same_episodes() {
        let readings: Vec<Point> = [
            95.0, 89.0, 88.0, 89.0, 87.0, 89.0, 91.0, 93.0, 95.0, 89.0, 88.0, 88.0, 89.0, 86.0,
            94.0,
        ]
        .iter()
        .enumerate()
        .map(|(i, v)| p(i as i64, *v))
        .collect();
        let rule = spo2(sustained(3));
        let mut in_order = Series::new(rule, Duration::hours(1));
        let want = run(&mut in_order, &readings);
        assert_eq!(
            want,
            vec![
                raise(1, 4, 87.0),
                clear(1, 7),
                raise(9, 12, 89.0),
                clear(9, 14)
            ]
        );
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
            let mut raises: Vec<DateTime<Utc>> = got
                .iter()
                .filter_map(|tr| {
                    if let Transition::Raise { start, .. } = tr {
                        Some(*start)
                    } else {
                        None
                    }
                })
                .collect();
            let mut clears: Vec<DateTime<Utc>> = got
                .iter()
                .filter_map(|tr| {
                    if let Transition::Clear { start, .. } = tr {
                        Some(*start)
                    } else {
                        None
                    }
                })
                .collect();
            raises.sort();
            clears.sort();
            assert_eq!(
                raises, clears,
                "seed {seed}: every raised episode cleared, under its start: {got:?}"
            );
            assert!(
                (t(1)..=t(4)).contains(&raises[0]),
                "seed {seed}: {raises:?}"
            );
            // When the reading that ended the first episode arrives after the
            // second began, the first alert was still open through the
            // second: it covers both, and no second alert is raised for a
            // stretch a nurse was already alerted to.
            match raises.len() {
                1 => {}
                2 => assert!(
                    (t(9)..=t(12)).contains(&raises[1]),
                    "seed {seed}: {raises:?}"
                ),
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
                assert!(
                    told.iter().any(|(a, b)| (*a..=*b).contains(&instant)),
                    "seed {seed}: {instant} not covered by {told:?}"
                );
            }
            assert!(!s.is_open());
        }
    }

    #[test]
    fn a_late_reading_can_complete_or_reveal_an_episode_in_the_past() {
        let mut s = Series::new(spo2(sustained(3)), Duration::hours(1));
        assert!(run(&mut s, &[p(0, 89.0), p(1, 89.0), p(2, 89.0), p(10, 95.0)]).is_empty());
        // Minute 3 arrives late: the run 0..3 was long enough, and minute 10 cleared it.
        assert_eq!(
            run(&mut s, &[p(3, 88.0)]),
            vec![raise(0, 3, 88.0), clear(0, 10)]
        );
        // The same late reading again changes nothing.
        assert!(run(&mut s, &[p(3, 88.0)]).is_empty());
    }

    #[test]
    fn a_late_reading_does_not_retract_or_duplicate_a_told_episode() {
        let mut s = Series::new(spo2(sustained(3)), Duration::hours(1));
        assert_eq!(
            run(&mut s, &[p(0, 89.0), p(1, 89.0), p(2, 89.0), p(3, 89.0)]),
            vec![raise(0, 3, 89.0)]
        );
        // A late normal reading inside the run: the replay no longer finds
        // the episode, but it was told and stays open until cleared.
        assert!(
            run(
                &mut s,
                &[Point {
                    at: t(1) + Duration::seconds(30),
                    value: 95.0,
                    artifact: false
                }]
            )
            .is_empty()
        );
        assert!(
            run(&mut s, &[p(4, 89.0), p(5, 89.0)]).is_empty(),
            "the run that follows is the same episode"
        );
        // A late low reading before the start overlaps the told episode: no second raise.
        assert!(
            run(
                &mut s,
                &[Point {
                    at: t(0) - Duration::seconds(30),
                    value: 89.0,
                    artifact: false
                }]
            )
            .is_empty()
        );
        assert_eq!(
            run(&mut s, &[p(6, 93.0)]),
            vec![clear(0, 6)],
            "cleared under the start it was raised with"
        );
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

    fn at(min: i64, secs: i64, value: f64) -> Point {
        Point {
            at: t(min) + Duration::seconds(secs),
            value,
            artifact: false,
        }
    }

    #[test]
    fn a_told_episode_that_a_late_reading_unmakes_still_clears_and_the_next_one_is_raised() {
        let mut s = Series::new(spo2(sustained(3)), Duration::hours(1));
        assert_eq!(
            run(&mut s, &[p(0, 89.0), p(1, 89.0), p(2, 89.0), p(3, 89.0)]),
            vec![raise(0, 3, 89.0)]
        );
        // A late normal reading breaks the run in the replay; the nurse was
        // told, so the episode stays open until the rule's clear condition.
        assert!(run(&mut s, &[at(1, 30, 95.0)]).is_empty());
        assert_eq!(run(&mut s, &[p(4, 95.0)]), vec![clear(0, 4)]);
        // A later episode is its own alert, not hidden behind the first.
        assert_eq!(
            run(
                &mut s,
                &[p(10, 88.0), p(11, 88.0), p(12, 88.0), p(13, 88.0)]
            ),
            vec![raise(10, 13, 88.0)]
        );
        assert_eq!(run(&mut s, &[p(14, 96.0)]), vec![clear(10, 14)]);
    }

    #[test]
    fn a_count_rule_raises_again_after_a_told_clear_whatever_arrives_late() {
        let mut s = Series::new(spo2(Persistence::Count { k: 2, n: 3 }), Duration::hours(1));
        assert_eq!(
            run(&mut s, &[p(0, 89.0), p(1, 89.0)]),
            vec![raise(0, 1, 89.0)]
        );
        assert_eq!(run(&mut s, &[p(2, 95.0), p(3, 95.0)]), vec![clear(0, 3)]);
        // A late low reading between the two normal ones: the told clear at
        // minute 3 stands, and two lows afterwards are a new episode.
        assert!(run(&mut s, &[at(2, 30, 89.0)]).is_empty());
        let got = run(&mut s, &[p(4, 89.0), p(5, 89.0)]);
        assert_eq!(got.len(), 1, "{got:?}");
        let Transition::Raise {
            start, at: raised, ..
        } = got[0]
        else {
            panic!("{got:?}")
        };
        assert!(
            start > t(0) && raised == t(4),
            "a new identity, raised at minute 4: {got:?}"
        );
        assert!(s.is_open());
    }

    #[test]
    fn a_revision_that_would_merge_two_told_episodes_keeps_them_apart() {
        let mut s = Series::new(spo2(Persistence::Single), Duration::hours(1));
        assert_eq!(
            run(&mut s, &[p(0, 89.0), p(4, 95.0)]),
            vec![raise(0, 0, 89.0), clear(0, 4)]
        );
        assert_eq!(run(&mut s, &[p(10, 88.0)]), vec![raise(10, 10, 88.0)]);
        // The reading that cleared the first episode is revised to a low
        // value (a derived series recomputed): the first clear stands, and the
        // second episode still clears on its own.
        assert!(s.revise(p(4, 89.0)).unwrap_or_default().is_empty());
        assert_eq!(run(&mut s, &[p(20, 97.0)]), vec![clear(10, 20)]);
        assert!(!s.is_open());
    }

    #[test]
    fn an_adopted_episode_is_never_raised_again_and_clears_under_its_start() {
        let mut s = Series::new(spo2(sustained(3)), Duration::hours(1));
        // Open in the store since minute 0 (raised at minute 3) when the
        // engine restarted; the readings of that run are replayed.
        assert!(s.adopt(t(0), t(3)));
        assert!(
            run(
                &mut s,
                &[p(0, 89.0), p(1, 89.0), p(2, 89.0), p(3, 89.0), p(4, 89.0)]
            )
            .is_empty()
        );
        assert_eq!(run(&mut s, &[p(5, 93.0)]), vec![clear(0, 5)]);
        // Only a fresh series adopts.
        assert!(!s.adopt(t(6), t(6)));
        // Adopted without its readings (older than what is replayed): the
        // first normal reading clears it.
        let mut s = Series::new(spo2(sustained(3)), Duration::hours(1));
        assert!(s.adopt(t(-100), t(-97)));
        assert!(
            run(&mut s, &[p(0, 91.0)]).is_empty(),
            "between the level and the clear level: still open"
        );
        assert_eq!(run(&mut s, &[p(1, 92.0)]), vec![clear(-100, 1)]);
    }

    #[test]
    fn spot_checks_further_apart_than_the_duration_can_sustain_a_run_within_the_maximum_gap() {
        // One minute below 85, spot checks every two minutes, gaps up to 5 tolerated.
        let rule = spo2(Persistence::Sustained {
            duration: Duration::minutes(1),
            max_gap: Duration::minutes(5),
        });
        let mut s = Series::new(rule, Duration::hours(1));
        assert_eq!(
            run(&mut s, &[p(0, 84.0), p(2, 84.0)]),
            vec![raise(0, 2, 84.0)]
        );
        let mut s = Series::new(rule, Duration::hours(1));
        assert!(
            run(&mut s, &[p(0, 84.0), p(6, 84.0)]).is_empty(),
            "six minutes apart: beyond the maximum gap"
        );
    }

    #[test]
    fn a_late_normal_reading_inside_an_open_episode_neither_resolves_nor_splits_it() {
        // The horizon is short so that the episode is also folded into the base state.
        let mut s = Series::new(spo2(Persistence::Single), Duration::minutes(5));
        assert_eq!(
            run(&mut s, &[p(0, 89.0), p(3, 89.0)]),
            vec![raise(0, 0, 89.0)]
        );
        // Minute 1 was normal, but minute 3 was low again: one alert, open throughout.
        assert!(run(&mut s, &[p(1, 95.0)]).is_empty());
        assert!(
            run(&mut s, &[p(9, 89.0)]).is_empty(),
            "minutes 0 to 3 folded: still the same episode"
        );
        assert_eq!(run(&mut s, &[p(10, 95.0)]), vec![clear(0, 10)]);
    }

    /// Readings mostly in order, one in seven late by up to 20 minutes,
    /// values wandering across the level and the clear level, a few
    /// artifacts.
    fn wandering(n: usize) -> Vec<Point> {
        let mut x = 0x9e37_79b9_u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut points = Vec::new();
        let mut minute = 0_i64;
        for _ in 0..n {
            minute += 1;
            let at = if rand() % 7 == 0 {
                minute - (rand() % 20) as i64
            } else {
                minute
            };
            let value = 84.0 + (rand() % 120) as f64 / 10.0;
            points.push(Point {
                at: t(at) + Duration::seconds((rand() % 50) as i64),
                value,
                artifact: rand() % 23 == 0,
            });
        }
        points
    }

    #[test]
    fn stepping_from_the_tip_tells_exactly_what_full_replays_tell() {
        let points = wandering(600);
        // k-of-n rules are left out: a full replay after a fold can give a
        // k-of-n episode another start (its first abnormal reading among the
        // last n depends on what was folded), a known gap (series.rs).
        for persistence in [Persistence::Single, sustained(3)] {
            let rule = spo2(persistence);
            let mut fast = Series::new(rule, Duration::minutes(30));
            let mut full = Series::new(rule, Duration::minutes(30)).replaying_always();
            for p in &points {
                assert_eq!(
                    fast.observe(*p),
                    full.observe(*p),
                    "{persistence:?} at {}",
                    p.at
                );
            }
            assert_eq!(fast.is_open(), full.is_open());
        }
    }

    #[test]
    fn rules_sharing_a_group_tell_what_each_tells_on_a_series_of_its_own() {
        // The readings are kept once for the group; each rule must still
        // tell exactly what it tells alone, late readings, folds (a cap of
        // 40 readings) and an adopted alert included.
        let rules = [
            spo2(Persistence::Single),
            spo2(sustained(3)),
            spo2(Persistence::Count { k: 2, n: 3 }),
        ];
        let horizon = Duration::minutes(30);
        let mut group = Group::new(horizon).with_max_points(40);
        let mut alone: Vec<Series<Threshold>> = rules
            .iter()
            .map(|r| Series::new(*r, horizon).with_max_points(40))
            .collect();
        for r in rules {
            assert!(group.add(r).is_some());
        }
        assert!(group.adopt(1, t(0), t(0)));
        assert!(alone[1].adopt(t(0), t(0)));
        let mut told = 0;
        for p in wandering(600) {
            let mut expected: Vec<(usize, Transition)> = Vec::new();
            let mut late = 0;
            for (i, s) in alone.iter_mut().enumerate() {
                match s.observe(p) {
                    Ok(ts) => expected.extend(ts.into_iter().map(|t| (i, t))),
                    Err(_) => late += 1,
                }
            }
            match group.observe(p) {
                Ok(got) => {
                    assert_eq!(late, 0, "at {}", p.at);
                    // As text: a k-of-n episode found again after a fold
                    // is told with a NaN value (series.rs, known gap), and
                    // NaN is not equal to itself.
                    assert_eq!(format!("{got:?}"), format!("{expected:?}"), "at {}", p.at);
                    told += got.len();
                }
                Err(_) => assert_eq!(late, rules.len(), "at {}", p.at),
            }
            assert!(group.kept() <= 40);
        }
        assert!(told > 20, "the readings raise and clear episodes ({told})");
        for (i, s) in alone.iter().enumerate() {
            assert_eq!(group.open_start(i), s.open_start());
        }
        assert!(
            group.add(spo2(Persistence::Single)).is_none(),
            "too late to add a rule"
        );
    }

    #[test]
    fn normal_readings_replayed_before_an_adopted_alert_do_not_resolve_it() {
        // Open in the store since minute 20, raised at minute 25; the rebuild
        // replays the hour before, normal until minute 20.
        let mut s = Series::new(spo2(sustained(5)), Duration::hours(1));
        assert!(s.adopt(t(20), t(25)));
        let history: Vec<Point> = (0..30)
            .map(|m| p(m, if m < 20 { 96.0 } else { 88.0 }))
            .collect();
        assert!(
            run(&mut s, &history).is_empty(),
            "nothing resolved, nothing raised again"
        );
        assert!(s.is_open());
        assert_eq!(run(&mut s, &[p(31, 95.0)]), vec![clear(20, 31)]);
    }
}
