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
/// there, when the patient already has an open alert for the rule (that
/// one stands: a persisting condition never opens a second), or when an
/// alert of the rule already covered part of this episode's stretch (from
/// its start to its resolution): a stretch a nurse was alerted to is never
/// alerted again, whatever identity a replay gives it.
pub async fn raise(client: &impl GenericClient, a: &NewAlert<'_>) -> Result<bool, StoreError> {
    let n = client
        .execute(
            "WITH new AS (
                 INSERT INTO alerts (alert_id, patient_id, rule, severity, state, episode_start, raised_at, updated_at, news2_score, detail)
                 SELECT $1, $2, $3, $4, 'raised', $5, $6, now(), $7, $8
                  WHERE NOT EXISTS (
                        SELECT 1 FROM alerts o
                         WHERE o.patient_id = $2 AND o.rule = $3 AND o.alert_id <> $1
                           AND o.episode_start <= $6 AND coalesce(o.resolved_at, 'infinity') > $5)
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
/// (`actor` `None`), or by a nurse (with an optional note). `false` when it
/// was not open.
pub async fn resolve(
    client: &impl GenericClient,
    alert_id: &str,
    at: DateTime<Utc>,
    actor: Option<&str>,
    note: Option<&str>,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            "WITH changed AS (
                 UPDATE alerts SET state = 'resolved', resolved_at = $2, resolved_by = $3, updated_at = now()
                  WHERE alert_id = $1 AND state <> 'resolved'
                 RETURNING alert_id, escalation_level
             )
             INSERT INTO alert_events (alert_id, at, state, escalation_level, actor, note)
             SELECT alert_id, $2, 'resolved', escalation_level, $3, $4 FROM changed",
            &[&alert_id, &at, &actor, &note],
        )
        .await?;
    Ok(n == 1)
}

/// An alert that is not resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAlert {
    pub alert_id: String,
    pub rule: String,
    pub severity: String,
    pub state: String,
    pub episode_start: DateTime<Utc>,
    pub raised_at: DateTime<Utc>,
}

/// The patient's open alerts (raised or acknowledged).
pub async fn open_for(
    client: &impl GenericClient,
    patient_id: &str,
) -> Result<Vec<OpenAlert>, StoreError> {
    let rows = client
        .query(
            "SELECT alert_id, rule, severity, state, episode_start, raised_at FROM alerts
              WHERE patient_id = $1 AND state <> 'resolved' ORDER BY rule",
            &[&patient_id],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(OpenAlert {
                alert_id: r.try_get(0)?,
                rule: r.try_get(1)?,
                severity: r.try_get(2)?,
                state: r.try_get(3)?,
                episode_start: r.try_get(4)?,
                raised_at: r.try_get(5)?,
            })
        })
        .collect()
}

/// The patient's rule overrides (`thresholds`): (rule, params).
pub async fn overrides_for(
    client: &impl GenericClient,
    patient_id: &str,
) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
    let rows = client
        .query(
            "SELECT rule, params FROM thresholds WHERE patient_id = $1",
            &[&patient_id],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Changes to `thresholds` (migration 6) after `after`, or in the last five
/// minutes, oldest first: `(change id, patient)`. The five minutes cover a
/// change whose transaction committed after a later id's (identities are
/// handed out at insert, not commit); a reader skips the ids it has seen.
pub async fn threshold_changes(
    client: &impl GenericClient,
    after: i64,
) -> Result<Vec<(i64, String)>, StoreError> {
    let rows = client
        .query(
            "SELECT id, patient_id FROM threshold_changes
              WHERE id > $1 OR at > now() - interval '5 minutes' ORDER BY id",
            &[&after],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// The newest threshold change's id (0 when there is none).
pub async fn last_threshold_change(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client
        .query_one("SELECT coalesce(max(id), 0) FROM threshold_changes", &[])
        .await?
        .try_get(0)?)
}

/// A lifecycle change, joined with its alert, as published and streamed
/// (its JSON is what the API's stream and webhooks send).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// The change's place in the order of all changes.
    #[serde(rename = "event_id")]
    pub id: i64,
    /// The change's place in commit order (see migration 5); readers follow it.
    pub seq: i64,
    pub alert_id: String,
    pub patient_id: String,
    pub rule: String,
    /// `raised`, `updated`, `escalated`, `acknowledged` or `resolved`.
    pub state: String,
    /// The severity with this change (the alert's, for a change that kept it).
    pub severity: String,
    pub escalation_level: i16,
    pub episode_start: DateTime<Utc>,
    /// Event time for the engine's changes, wall clock for people's and escalations.
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub news2_score: Option<i16>,
}

const EVENT_COLUMNS: &str =
    "e.id, coalesce(e.seq, 0), e.alert_id, a.patient_id, a.rule, e.state, coalesce(e.severity, a.severity),
    e.escalation_level, a.episode_start, e.at, e.actor, e.note, a.news2_score";

fn event(r: &tokio_postgres::Row) -> Result<Event, StoreError> {
    Ok(Event {
        id: r.try_get(0)?,
        seq: r.try_get(1)?,
        alert_id: r.try_get(2)?,
        patient_id: r.try_get(3)?,
        rule: r.try_get(4)?,
        state: r.try_get(5)?,
        severity: r.try_get(6)?,
        escalation_level: r.try_get(7)?,
        episode_start: r.try_get(8)?,
        at: r.try_get(9)?,
        actor: r.try_get(10)?,
        note: r.try_get(11)?,
        news2_score: r.try_get(12)?,
    })
}

/// Every change of one alert, in order (`seq` 0 for one not sequenced yet).
pub async fn history(
    client: &impl GenericClient,
    alert_id: &str,
) -> Result<Vec<Event>, StoreError> {
    let rows = client
        .query(
            &format!("SELECT {EVENT_COLUMNS} FROM alert_events e JOIN alerts a USING (alert_id) WHERE e.alert_id = $1 ORDER BY e.id"),
            &[&alert_id],
        )
        .await?;
    rows.iter().map(event).collect()
}

/// Key of the transaction-scoped advisory lock that makes one outbox relay
/// at a time publish, so events go out in id order.
const OUTBOX_LOCK: i64 = 0x7677_6f75_7462; // "vwoutb"

/// In the caller's transaction: waits for the outbox lock, then returns up
/// to `limit` unpublished changes in id order. Publish them, then
/// [`mark_published`] in the same transaction and commit.
pub async fn lock_unpublished(
    tx: &impl GenericClient,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&OUTBOX_LOCK])
        .await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM alert_events e JOIN alerts a USING (alert_id)
                  WHERE e.published_at IS NULL AND e.seq IS NOT NULL ORDER BY e.seq LIMIT $1"
            ),
            &[&limit],
        )
        .await?;
    rows.iter().map(event).collect()
}

/// Marks changes as published.
pub async fn mark_published(tx: &impl GenericClient, ids: &[i64]) -> Result<u64, StoreError> {
    Ok(tx
        .execute(
            "UPDATE alert_events SET published_at = now() WHERE id = ANY($1)",
            &[&ids],
        )
        .await?)
}

/// Key of the transaction-scoped advisory lock of the sequencer.
const SEQUENCER_LOCK: i64 = 0x7677_7365_7171; // "vwseqq"

/// In the caller's transaction: gives every committed, unsequenced change
/// its `seq`, in id order, unless another sequencer is at it (then it
/// returns 0 and that one does it). Commit right after; listeners are
/// notified at commit.
pub async fn sequence_pending(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, StoreError> {
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&SEQUENCER_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(0);
    }
    let n = tx
        .execute(
            "WITH base AS (SELECT coalesce(max(seq), 0) AS b FROM alert_events),
                  pending AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM alert_events WHERE seq IS NULL)
             UPDATE alert_events e SET seq = base.b + pending.n FROM base, pending WHERE e.id = pending.id",
            &[],
        )
        .await?;
    if n > 0 {
        tx.execute("SELECT pg_notify('vitalwatch_alert_events', '')", &[])
            .await?;
    }
    Ok(n)
}

/// Sequences what is pending (see [`sequence_pending`]) in a transaction of
/// its own.
pub async fn sequence(client: &mut tokio_postgres::Client) -> Result<u64, StoreError> {
    let tx = client.transaction().await?;
    let n = sequence_pending(&tx).await?;
    tx.commit().await?;
    Ok(n)
}

/// The newest `seq` (0 when there is none). Every change up to it is
/// visible: the sequencer commits its numbers together.
pub async fn last_seq(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client
        .query_one("SELECT coalesce(max(seq), 0) FROM alert_events", &[])
        .await?
        .try_get(0)?)
}

/// Changes with `after < seq <= upto`, in seq order, at most `limit`; only
/// those of `patients` when given. Take `upto` from [`last_seq`] first: a
/// reader that saw fewer than `limit` has seen everything up to it.
pub async fn events_between(
    client: &impl GenericClient,
    after: i64,
    upto: i64,
    patients: Option<&[String]>,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    let rows = client
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM alert_events e JOIN alerts a USING (alert_id)
                  WHERE e.seq > $1 AND e.seq <= $2 AND ($3::text[] IS NULL OR a.patient_id = ANY($3))
                  ORDER BY e.seq LIMIT $4"
            ),
            &[&after, &upto, &patients, &limit],
        )
        .await?;
    rows.iter().map(event).collect()
}

/// Escalates every alert still `raised` (nobody acknowledged it) for
/// `after` since it was opened or last escalated, one level at a time up to
/// `max_level`. Returns how many were escalated. Safe to run from several
/// instances at once: each escalation is one row update with its event.
pub async fn escalate(
    client: &impl GenericClient,
    after: std::time::Duration,
    max_level: i16,
) -> Result<u64, StoreError> {
    let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
    Ok(client
        .execute(
            "WITH due AS (
                 UPDATE alerts SET escalation_level = escalation_level + 1, updated_at = now()
                  WHERE state = 'raised' AND escalation_level < $2
                    AND opened_at + (escalation_level + 1) * ($1::int8 * interval '1 millisecond') <= now()
                 RETURNING alert_id, escalation_level, severity
             )
             INSERT INTO alert_events (alert_id, at, state, escalation_level, severity)
             SELECT alert_id, now(), 'escalated', escalation_level, severity FROM due",
            &[&after_ms, &max_level],
        )
        .await?)
}

/// A nurse acknowledges a raised alert. `false` when it was not `raised`
/// (already acknowledged, or resolved).
pub async fn acknowledge(
    client: &impl GenericClient,
    alert_id: &str,
    actor: &str,
    note: Option<&str>,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            "WITH changed AS (
                 UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(), acknowledged_by = $2, updated_at = now()
                  WHERE alert_id = $1 AND state = 'raised'
                 RETURNING alert_id, escalation_level
             )
             INSERT INTO alert_events (alert_id, at, state, escalation_level, actor, note)
             SELECT alert_id, now(), 'acknowledged', escalation_level, $2, $3 FROM changed",
            &[&alert_id, &actor, &note],
        )
        .await?;
    Ok(n == 1)
}

/// A monitored patient, for missing-data rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Monitored {
    pub patient_id: String,
    /// When monitoring began: the earliest of the patient's open device
    /// assignments.
    pub since: DateTime<Utc>,
    /// When the newest reading of the metric (by event time, measured on or
    /// after `recent`) was received.
    pub last_received: Option<DateTime<Utc>>,
}

/// Patients with an active device (of `kinds`, any kind when empty), with
/// when their newest reading of `metric` measured since `recent` arrived.
pub async fn monitored(
    client: &impl GenericClient,
    metric: &str,
    kinds: &[String],
    recent: DateTime<Utc>,
) -> Result<Vec<Monitored>, StoreError> {
    let rows = client
        .query(
            "SELECT a.patient_id, min(a.assigned_at),
                    (SELECT r.received_at FROM readings r
                      WHERE r.patient_id = a.patient_id AND r.metric = $1 AND r.time >= $3
                      ORDER BY r.time DESC LIMIT 1)
               FROM device_assignments a JOIN devices d USING (device_id)
              WHERE a.unassigned_at IS NULL AND d.active AND (cardinality($2::text[]) = 0 OR d.kind = ANY($2))
              GROUP BY a.patient_id",
            &[&metric, &kinds, &recent],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Monitored {
                patient_id: r.try_get(0)?,
                since: r.try_get(1)?,
                last_received: r.try_get(2)?,
            })
        })
        .collect()
}

/// Open alerts of `rule`: (alert id, patient id).
pub async fn open_of_rule(
    client: &impl GenericClient,
    rule: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let rows = client
        .query(
            "SELECT alert_id, patient_id FROM alerts WHERE rule = $1 AND state <> 'resolved'",
            &[&rule],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}
