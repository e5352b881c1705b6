//! Missing-data rules, on wall-clock time: a patient expected to send a
//! metric (a daily weighing, a wearable's stream) has sent nothing within
//! the expected interval; the device may be offline, or the patient unwell.
//! No I/O.
//!
//! The episode's identity is the instant the data became overdue, computed
//! from the last reading received (ingest's `received_at`, not the device
//! time: a backlog flushed after an outage is data arriving), so a restart
//! finds the same episode. A reading received afterwards clears it.
//!
//! [`check`] applies every missing-data rule against the store (run on a
//! timer by the service): it raises the overdue, resolves those whose data
//! came back or who are no longer monitored. Every instance may run it:
//! deterministic ids and idempotent changes make concurrent checks agree.

use chrono::{DateTime, Duration, Utc};
use vitalwatch_store::StoreError;
use vitalwatch_store::tokio_postgres::GenericClient;

use crate::rules::{Compiled, Rule, alert_id};

/// Applies the missing-data rules among `rules` at `now`; returns how many
/// alerts it raised or resolved.
pub async fn check(
    client: &impl GenericClient,
    rules: &[Rule],
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut changed = 0;
    for rule in rules {
        let Compiled::Missing {
            metric,
            within,
            device_kinds,
        } = &rule.compiled
        else {
            continue;
        };
        // Readings measured long before the interval cannot be the newest.
        let recent = now - *within - *within - Duration::days(1);
        let monitored =
            vitalwatch_store::alerts::monitored(client, metric.name(), device_kinds, recent)
                .await?;
        let open = vitalwatch_store::alerts::open_of_rule(client, &rule.name).await?;
        let severity = rule.severity.unwrap_or(crate::rules::Severity::Low);
        for m in &monitored {
            let is_open = open.iter().find(|(_, p)| *p == m.patient_id);
            match (
                overdue_since(m.last_received, m.since, *within, now),
                is_open,
            ) {
                (Some(due), None) => {
                    let id = alert_id(&m.patient_id, &rule.name, due);
                    let a = vitalwatch_store::alerts::NewAlert {
                        alert_id: &id,
                        patient_id: &m.patient_id,
                        rule: &rule.name,
                        severity: severity.as_str(),
                        episode_start: due,
                        raised_at: due,
                        news2_score: None,
                        detail: serde_json::json!({ "metric": metric.name(), "last_received": m.last_received }),
                    };
                    changed += u64::from(vitalwatch_store::alerts::raise(client, &a).await?);
                }
                (None, Some((id, _))) => {
                    changed += u64::from(
                        vitalwatch_store::alerts::resolve(client, id, now, None, None).await?,
                    );
                }
                _ => {}
            }
        }
        // No longer monitored (the device was returned or deactivated).
        for (id, patient) in &open {
            if !monitored.iter().any(|m| m.patient_id == *patient) {
                changed += u64::from(
                    vitalwatch_store::alerts::resolve(
                        client,
                        id,
                        now,
                        None,
                        Some("monitoring ended"),
                    )
                    .await?,
                );
            }
        }
    }
    Ok(changed)
}

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
