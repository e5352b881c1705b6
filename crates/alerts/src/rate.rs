//! Rate-of-change rules: a value that moved too far within a window of
//! event time, such as a heart-failure patient's weight rising more than
//! 2 kg in 3 days, or more than 1 kg in a day. No I/O; judged through a
//! [`crate::series::Group`], which handles late and out-of-order readings.
//!
//! For a reading at `t`, the change is measured against the lowest value
//! (for a rise; the highest, for a fall) among the readings in
//! `[t - window - slack, t]`, the slack being a tenth of the window: a
//! daily weighing at 07:10 after one at 07:05 the day before is "a day"
//! apart, not 24 h 5 min. An episode is raised when the change exceeds `limit`
//! and clears when it is back to `clear` or less (hysteresis). Artifact
//! readings are ignored.

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};

use crate::series::{Point, Rule, Step};

/// Which way is abnormal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trend {
    Rise,
    Fall,
}

/// A rate-of-change rule's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateOfChange {
    pub trend: Trend,
    /// The change (in the metric's stored unit) that raises, exclusive.
    pub limit: f64,
    /// An open episode clears when the change is this or less.
    pub clear: f64,
    pub window: Duration,
}

impl RateOfChange {
    /// Checks the parameters; `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.limit.is_finite() && self.limit > 0.0) {
            return Err(format!(
                "a rate-of-change limit must be positive, not {}",
                self.limit
            ));
        }
        if !(self.clear.is_finite() && self.clear <= self.limit) {
            return Err(format!(
                "the clear level {} must not exceed the limit {}",
                self.clear, self.limit
            ));
        }
        if self.window <= Duration::zero() {
            return Err("a rate-of-change window must be positive".into());
        }
        Ok(())
    }
}

/// A rate-of-change rule's state between readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The readings of the last window, in event-time order.
    window: VecDeque<(DateTime<Utc>, f64)>,
    open: Option<DateTime<Utc>>,
}

impl Rule for RateOfChange {
    type State = State;

    fn open_since(state: &State) -> Option<DateTime<Utc>> {
        state.open
    }

    fn force_open(&self, state: &mut State, start: DateTime<Utc>) {
        state.open = Some(start);
    }

    fn force_quiet(&self, state: &mut State) {
        state.open = None;
    }

    fn step(&self, state: &mut State, p: &Point) -> Option<Step> {
        if p.artifact || !p.value.is_finite() {
            return None;
        }
        state.window.push_back((p.at, p.value));
        let reach = self.window + self.window / 10;
        while state
            .window
            .front()
            .is_some_and(|(at, _)| *at < p.at - reach)
        {
            state.window.pop_front();
        }
        let values = state.window.iter().map(|(_, v)| *v);
        let change = match self.trend {
            Trend::Rise => p.value - values.fold(f64::INFINITY, f64::min),
            Trend::Fall => values.fold(f64::NEG_INFINITY, f64::max) - p.value,
        };
        match state.open {
            Some(_) if change <= self.clear => {
                state.open = None;
                Some(Step::Cleared { at: p.at })
            }
            None if change > self.limit => {
                state.open = Some(p.at);
                Some(Step::Raised {
                    start: p.at,
                    at: p.at,
                    value: p.value,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::{Series, Transition};

    fn day(d: i64, hour: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + d * 86_400 + hour * 3600, 0).unwrap_or_default()
    }

    fn weight(d: i64, kg: f64) -> Point {
        Point {
            at: day(d, 7),
            value: kg,
            artifact: false,
        }
    }

    /// Heart failure: more than 2 kg in 3 days, clearing at 1 kg.
    fn gain() -> RateOfChange {
        RateOfChange {
            trend: Trend::Rise,
            limit: 2.0,
            clear: 1.0,
            window: Duration::days(3),
        }
    }

    fn run(s: &mut Series<RateOfChange>, points: &[Point]) -> Vec<Transition> {
        points
            .iter()
            .flat_map(|p| s.observe(*p).unwrap_or_default())
            .collect()
    }

    #[test]
    fn parameters_are_checked() {
        assert!(gain().validate().is_ok());
        assert!(
            RateOfChange {
                clear: 3.0,
                ..gain()
            }
            .validate()
            .is_err()
        );
        assert!(
            RateOfChange {
                limit: 0.0,
                ..gain()
            }
            .validate()
            .is_err()
        );
        assert!(
            RateOfChange {
                window: Duration::zero(),
                ..gain()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn a_gain_within_the_window_raises_and_a_slow_gain_does_not() {
        let mut s = Series::new(gain(), Duration::days(7));
        // 0.5 kg a day: 1.5 kg over any 3 days, never more than 2.
        assert!(
            run(
                &mut s,
                &[
                    weight(0, 80.0),
                    weight(1, 80.5),
                    weight(2, 81.0),
                    weight(3, 81.5),
                    weight(4, 82.0),
                    weight(5, 82.5)
                ]
            )
            .is_empty()
        );
        // Then 1.9 kg over days 3-6 (81.5 -> 83.4: not yet), and 2.8 kg over days 4-7 (82.0 -> 84.8).
        let got = run(&mut s, &[weight(6, 83.4), weight(7, 84.8)]);
        assert_eq!(
            got,
            vec![Transition::Raise {
                start: day(7, 7),
                at: day(7, 7),
                value: 84.8
            }]
        );
        // Still above 1 kg over three days: open. Then stable for three days: cleared.
        assert!(run(&mut s, &[weight(8, 84.9), weight(9, 84.7)]).is_empty());
        assert_eq!(
            run(&mut s, &[weight(10, 84.6)]),
            vec![Transition::Clear {
                start: day(7, 7),
                at: day(10, 7)
            }]
        );
    }

    #[test]
    fn the_window_bounds_the_comparison() {
        let mut s = Series::new(gain(), Duration::days(7));
        // 2.5 kg over 4 days is not more than 2 kg within any 3.
        assert!(run(&mut s, &[weight(0, 80.0), weight(4, 82.5)]).is_empty());
    }

    #[test]
    fn a_late_weighing_reveals_the_gain() {
        let mut s = Series::new(gain(), Duration::days(7));
        assert!(run(&mut s, &[weight(0, 80.0), weight(4, 82.5)]).is_empty());
        // The scale was offline: day 2's weighing (80.1) arrives late. Day 4 is 2.4 kg above it.
        assert_eq!(
            run(&mut s, &[weight(2, 80.1)]),
            vec![Transition::Raise {
                start: day(4, 7),
                at: day(4, 7),
                value: 82.5
            }]
        );
        assert!(
            run(&mut s, &[weight(2, 80.1)]).is_empty(),
            "the same late reading again changes nothing"
        );
    }

    #[test]
    fn a_fall_and_artifacts() {
        let drop = RateOfChange {
            trend: Trend::Fall,
            limit: 20.0,
            clear: 10.0,
            window: Duration::hours(6),
        };
        let mut s = Series::new(drop, Duration::days(1));
        let at = |h: i64, v: f64, artifact: bool| Point {
            at: day(0, h),
            value: v,
            artifact,
        };
        // An artifact reading of 100 does not make a 25 mmHg drop.
        assert!(
            run(
                &mut s,
                &[at(0, 125.0, false), at(1, 150.0, true), at(2, 110.0, false)]
            )
            .is_empty()
        );
        assert_eq!(
            run(&mut s, &[at(3, 100.0, false)]),
            vec![Transition::Raise {
                start: day(0, 3),
                at: day(0, 3),
                value: 100.0
            }]
        );
    }

    #[test]
    fn weigh_ins_that_drift_by_minutes_are_still_a_day_apart() {
        let day_gain = RateOfChange {
            trend: Trend::Rise,
            limit: 1.0,
            clear: 0.5,
            window: Duration::days(1),
        };
        let mut s = Series::new(day_gain, Duration::days(3));
        let at = |d: i64, minutes: i64, kg: f64| Point {
            at: day(d, 7) + Duration::minutes(minutes),
            value: kg,
            artifact: false,
        };
        assert_eq!(
            run(&mut s, &[at(0, 5, 80.0), at(1, 20, 81.2)]),
            vec![Transition::Raise {
                start: at(1, 20, 0.0).at,
                at: at(1, 20, 0.0).at,
                value: 81.2
            }]
        );
        // Two days apart is not a day's gain.
        let mut s = Series::new(day_gain, Duration::days(3));
        assert!(run(&mut s, &[at(0, 0, 80.0), at(2, 0, 81.2)]).is_empty());
    }
}
