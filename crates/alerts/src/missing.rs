//! Missing-data rules, on wall-clock time: a patient expected to send a
//! metric (a daily weighing, a wearable's stream) has sent nothing within
//! the expected interval; the device may be offline, or the patient unwell.
//! No I/O.
//!
//! The episode's identity is the instant the data became overdue, computed
//! from the last reading received (ingest's `received_at`, not the device
//! time: a backlog flushed after an outage is data arriving), so a restart
//! finds the same episode. A reading received afterwards clears it.

use chrono::{DateTime, Duration, Utc};

/// When `metric` data became overdue, if it is at `now`: `within` after the
/// last reading was received, or after monitoring began (`expected_since`,
/// the device's assignment) when nothing has arrived since.
pub fn overdue_since(
    last_received: Option<DateTime<Utc>>,
    expected_since: DateTime<Utc>,
    within: Duration,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let since = last_received.map_or(expected_since, |r| r.max(expected_since));
    let due = since.checked_add_signed(within)?;
    (now >= due).then_some(due)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(hours: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + hours * 3600, 0).unwrap_or_default()
    }

    #[test]
    fn overdue_after_the_interval_from_the_last_reading() {
        let within = Duration::hours(26); // a daily weighing, with slack
        assert_eq!(overdue_since(Some(h(0)), h(-100), within, h(25)), None);
        assert_eq!(
            overdue_since(Some(h(0)), h(-100), within, h(26)),
            Some(h(26))
        );
        assert_eq!(
            overdue_since(Some(h(0)), h(-100), within, h(40)),
            Some(h(26)),
            "the same episode start while overdue"
        );
        // A reading received at hour 30 clears it: next due at 56.
        assert_eq!(overdue_since(Some(h(30)), h(-100), within, h(40)), None);
    }

    #[test]
    fn counted_from_the_assignment_when_nothing_arrived() {
        let within = Duration::hours(6);
        assert_eq!(overdue_since(None, h(0), within, h(5)), None);
        assert_eq!(overdue_since(None, h(0), within, h(7)), Some(h(6)));
        // A reading from before this assignment (another patient's period) does not count.
        assert_eq!(overdue_since(Some(h(-50)), h(0), within, h(7)), Some(h(6)));
    }
}
