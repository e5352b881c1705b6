//! The alert lifecycle in `alerts` and `alert_events`, idempotent: applying
//! the same change twice (a replay after a crash) changes nothing, and the
//! partial unique index `alerts_one_open` keeps one open alert per patient
//! and rule whatever the ids. Each change and its event (the outbox row) are
//! written by one statement, so neither exists without the other.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::StoreError;

/// A new alert, as the rules engine raised it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlert<'a> {
    pub alert_id: &'a str,
    pub patient_id: &'a str,
    pub rule: &'a str,
    /// `low`, `low_medium`, `medium` or `high`.
    pub severity: &'a str,
    pub episode_start: DateTime<Utc>,
    /// Event time the condition was met.
    pub raised_at: DateTime<Utc>,
    pub news2_score: Option<i16>,
    /// What met the condition, for the nurse (JSON object).
    pub detail: serde_json::Value,
}

/// Inserts the alert and its `raised` event. `false` when it was already
/// there, or when the patient already has an open alert for the rule (that
/// one stands: a persisting condition never opens a second).
pub async fn raise(client: &impl GenericClient, a: &NewAlert<'_>) -> Result<bool, StoreError> {
    let n = client
        .execute(
            "WITH new AS (
                 INSERT INTO alerts (alert_id, patient_id, rule, severity, state, episode_start, raised_at, updated_at, news2_score, detail)
                 VALUES ($1, $2, $3, $4, 'raised', $5, $6, now(), $7, $8)
                 ON CONFLICT DO NOTHING
                 RETURNING alert_id, raised_at, severity
             )
             INSERT INTO alert_events (alert_id, at, state, severity) SELECT alert_id, raised_at, 'raised', severity FROM new",
            &[&a.alert_id, &a.patient_id, &a.rule, &a.severity, &a.episode_start, &a.raised_at, &a.news2_score, &a.detail],
        )
        .await?;
    Ok(n == 1)
}

/// Changes an open alert's severity (a NEWS2 risk moved). `false` when the
/// alert is not open or already has that severity.
pub async fn update_severity(
    client: &impl GenericClient,
    alert_id: &str,
    severity: &str,
    at: DateTime<Utc>,
    news2_score: Option<i16>,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            "WITH changed AS (
                 UPDATE alerts SET severity = $2, news2_score = coalesce($4, news2_score), updated_at = now()
                  WHERE alert_id = $1 AND state <> 'resolved' AND severity <> $2
                 RETURNING alert_id
             )
             INSERT INTO alert_events (alert_id, at, state, severity) SELECT alert_id, $3, 'updated', $2 FROM changed",
            &[&alert_id, &severity, &at, &news2_score],
        )
        .await?;
    Ok(n == 1)
}

/// Resolves an open alert: by the engine when its condition cleared
/// (`actor` `None`), or by a nurse. `false` when it was not open.
pub async fn resolve(
    client: &impl GenericClient,
    alert_id: &str,
    at: DateTime<Utc>,
    actor: Option<&str>,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            "WITH changed AS (
                 UPDATE alerts SET state = 'resolved', resolved_at = $2, resolved_by = $3, updated_at = now()
                  WHERE alert_id = $1 AND state <> 'resolved'
                 RETURNING alert_id
             )
             INSERT INTO alert_events (alert_id, at, state, actor) SELECT alert_id, $2, 'resolved', $3 FROM changed",
            &[&alert_id, &at, &actor],
        )
        .await?;
    Ok(n == 1)
}
