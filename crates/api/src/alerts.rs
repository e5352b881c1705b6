//! Alerts for nurses: the live stream, one alert with its history, and the
//! lifecycle actions a person takes.
//!
//! - `GET /v1/alerts/stream`: server-sent events, one `alert` event per
//!   lifecycle change of an alert of the caller's patients, in commit order;
//!   the SSE id is the change's `seq`, so a client reconnecting with
//!   `Last-Event-ID` (or `?after=`) misses nothing. The stream ends when the
//!   caller's token expires (reconnect with a fresh one).
//! - `GET /v1/alerts?state=&severity=&patient=&limit=&after=`: the alerts of
//!   the caller's patients, open ones by default, newest opened first, paged.
//! - `GET /v1/alerts/{alert_id}`: the alert and its lifecycle history.
//! - `POST /v1/alerts/{alert_id}/acknowledge` and `.../resolve`, with an
//!   optional JSON body `{"note": "..."}`.
//!
//! All of them are for nurses and clinicians, for patients of their care
//! teams; an alert of another team's patient is answered as not found.
//! Every attempt is audited, refusals too.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use vitalwatch_store::alerts::Event;

use crate::AppState;
use crate::audit::{self, Outcome};
use crate::auth::{Access, Caller, carer, checked, deny_patient};
use crate::error::{ApiError, Problem};

/// Changes read per query while streaming.
const PAGE: i64 = 200;
/// A caller's care-team panel is read again this often while streaming.
const SCOPE_REFRESH: Duration = Duration::from_secs(30);

/// A lifecycle change, as streamed (the same JSON webhooks send):
/// `event_id`, `alert_id`, `patient_id`, `rule`, `state` (`raised`,
/// `updated`, `escalated`, `acknowledged` or `resolved`), `severity`,
/// `escalation_level`, `episode_start`, `at`, and when present `actor`,
/// `note`, `news2_score`.
pub type AlertEventBody = Event;

/// An alert and its history: the summary's fields, and the rest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AlertBody {
    #[serde(flatten)]
    pub summary: AlertSummary,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    /// What the rule saw (its values and limits).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    pub history: Vec<AlertEventBody>,
}

/// Server-sent events: one `alert` event per lifecycle change of an alert
/// of the caller's patients, in commit order. The SSE id is the change's
/// `seq`: reconnect with `Last-Event-ID` (or `?after=`) to miss nothing.
/// The stream ends when the token expires.
#[utoipa::path(get, path = "/v1/alerts/stream", tag = "alerts",
    params(StreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this change")),
    responses(
        (status = 200, description = "`text/event-stream` of `alert` events whose data is an AlertEvent", body = Event, content_type = "text/event-stream"),
        (status = 400, description = "A malformed Last-Event-ID", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn stream(
    State(state): State<AppState>,
    access: Access,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let caller = carer(&state, &access, "alerts.stream").await?;
    let resume = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::parse::<i64>))
    {
        Some(Ok(Ok(id))) if id >= 0 => Some(id),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "Last-Event-ID must be an event id (a non-negative integer)".into(),
            ));
        }
        None => q.after,
    };
    let client = state.pool.get().await?;
    let patients = caller.patients(&**client).await?;
    let start = match resume {
        Some(id) => id,
        None => vitalwatch_store::alerts::last_seq(&**client).await?,
    };
    let detail = format!("{} patients, after event {start}", patients.len());
    audit::record(
        &**client,
        &access,
        "alerts.stream",
        None,
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    drop(client);
    let (tx, mut rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(feed(state, caller, patients, start, tx));
    let events = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Resume after this change id (as `Last-Event-ID` does).
    pub after: Option<i64>,
}

/// Sends the changes after `last` of `patients` to `tx` until the client
/// goes away or the server shuts down.
async fn feed(
    state: AppState,
    caller: Caller,
    mut patients: Vec<String>,
    mut last: i64,
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let mut wake = state.alert_feed();
    let idle = if wake.is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(1)
    };
    // The stream ends when the caller's token expires: the client
    // reconnects with a fresh one (and `Last-Event-ID`), and is checked again.
    let expires = caller
        .expires_at
        .map(|t| (t - Utc::now()).to_std().unwrap_or_default());
    let deadline = tokio::time::Instant::now() + expires.unwrap_or(Duration::from_secs(86_400));
    let mut scoped_at = tokio::time::Instant::now();
    loop {
        if scoped_at.elapsed() >= SCOPE_REFRESH {
            // A panel that cannot be read again ends the stream rather than
            // keep serving one that may be out of date.
            let Ok(client) = state.pool.get().await else {
                return;
            };
            let Ok(p) = caller.patients(&**client).await else {
                return;
            };
            patients = p;
            scoped_at = tokio::time::Instant::now();
        }
        let page = async {
            let mut client = state.pool.get().await?;
            vitalwatch_store::alerts::sequence(&mut client).await?;
            let upto = vitalwatch_store::alerts::last_seq(&**client).await?;
            let events = vitalwatch_store::alerts::events_between(
                &**client,
                last,
                upto,
                Some(&patients),
                PAGE,
            )
            .await?;
            Ok::<_, ApiError>((upto, events))
        }
        .await;
        let full = match page {
            Ok((upto, events)) => {
                let full = events.len() as i64 == PAGE;
                for body in events {
                    last = body.seq;
                    let event = match SseEvent::default()
                        .id(body.seq.to_string())
                        .event("alert")
                        .json_data(&body)
                    {
                        Ok(ev) => ev,
                        Err(err) => {
                            tracing::error!(error = %err, "cannot encode an alert event");
                            continue;
                        }
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return; // the client went away
                    }
                }
                if !full {
                    last = last.max(upto); // nothing else of ours up to there
                }
                full
            }
            Err(e) => {
                tracing::warn!(error = %e, "alert stream query failed; retrying");
                false
            }
        };
        if full {
            continue;
        }
        tokio::select! {
            () = async {
                match wake.as_mut() {
                    Some(w) => { let _ = w.changed().await; }
                    None => std::future::pending().await,
                }
            } => {}
            () = tokio::time::sleep(idle) => {}
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// The columns [`summary`] reads, first in every query of alerts.
const SUMMARY_COLUMNS: &str = "alert_id, patient_id, rule, severity, state, escalation_level, episode_start, raised_at, opened_at,
    acknowledged_by, news2_score";

fn summary(r: &vitalwatch_store::tokio_postgres::Row) -> AlertSummary {
    AlertSummary {
        alert_id: r.get(0),
        patient_id: r.get(1),
        rule: r.get(2),
        severity: r.get(3),
        state: r.get(4),
        escalation_level: r.get(5),
        episode_start: r.get(6),
        raised_at: r.get(7),
        opened_at: r.get(8),
        acknowledged_by: r.get(9),
        news2_score: r.get(10),
    }
}

async fn load_alert(
    client: &impl vitalwatch_store::tokio_postgres::GenericClient,
    alert_id: &str,
) -> Result<Option<AlertBody>, ApiError> {
    let row = client
        .query_opt(
            &format!("SELECT {SUMMARY_COLUMNS}, acknowledged_at, resolved_at, resolved_by, detail FROM alerts WHERE alert_id = $1"),
            &[&alert_id],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    let Some(r) = row else { return Ok(None) };
    let history = vitalwatch_store::alerts::history(client, alert_id).await?;
    Ok(Some(AlertBody {
        summary: summary(&r),
        acknowledged_at: r.get(11),
        resolved_at: r.get(12),
        resolved_by: r.get(13),
        detail: r.get(14),
        history,
    }))
}

fn check_id(alert_id: &str) -> Result<(), ApiError> {
    if alert_id.is_empty()
        || alert_id.len() > 64
        || !alert_id.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(ApiError::BadRequest(
            "an alert id is 1 to 64 hexadecimal digits".into(),
        ));
    }
    Ok(())
}

/// One alert in a list (no history).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AlertSummary {
    pub alert_id: String,
    pub patient_id: String,
    pub rule: String,
    pub severity: String,
    pub state: String,
    pub escalation_level: i16,
    pub episode_start: DateTime<Utc>,
    pub raised_at: DateTime<Utc>,
    pub opened_at: DateTime<Utc>,
    pub acknowledged_by: Option<String>,
    pub news2_score: Option<i16>,
}

/// A page of alerts, newest opened first; `next` asks for the page after.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AlertPage {
    pub alerts: Vec<AlertSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `open` (raised or acknowledged; the default), `raised`,
    /// `acknowledged`, `resolved` or `all`.
    pub state: Option<String>,
    /// `low`, `low_medium`, `medium` or `high`.
    pub severity: Option<String>,
    /// One patient of the caller's panel.
    pub patient: Option<String>,
    /// 1 to 200; default 50.
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

/// Checks a list query: (states, severity, patient, limit, cursor).
type ListFilter = (
    Vec<&'static str>,
    Option<String>,
    Option<String>,
    i64,
    Option<(DateTime<Utc>, String)>,
);

fn check_list(q: ListQuery) -> Result<ListFilter, ApiError> {
    let states = match q.state.as_deref().unwrap_or("open") {
        "open" => vec!["raised", "acknowledged"],
        "raised" => vec!["raised"],
        "acknowledged" => vec!["acknowledged"],
        "resolved" => vec!["resolved"],
        "all" => vec!["raised", "acknowledged", "resolved"],
        other => {
            return Err(ApiError::BadRequest(format!(
                "state {other:?} is not open, raised, acknowledged, resolved or all"
            )));
        }
    };
    if let Some(sev) = &q.severity
        && !["low", "low_medium", "medium", "high"].contains(&sev.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "severity {sev:?} is not low, low_medium, medium or high"
        )));
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::BadRequest("limit is 1 to 200".into()));
    }
    let cursor = match q.after.as_deref() {
        None => None,
        Some(c) => {
            let bad = || ApiError::BadRequest("after must be the next of a previous page".into());
            let (t, id) = c.split_once('_').ok_or_else(bad)?;
            let micros: i64 = t.parse().map_err(|_| bad())?;
            check_id(id).map_err(|_| bad())?;
            Some((
                DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
                id.to_owned(),
            ))
        }
    };
    Ok((states, q.severity, q.patient, limit, cursor))
}

/// The alerts of the caller's patients, newest opened first, paged.
#[utoipa::path(get, path = "/v1/alerts", tag = "alerts",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of alerts", body = AlertPage),
        (status = 400, description = "A malformed filter or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The patient filter names a patient off the caller's panel", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    access: Access,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AlertPage>, ApiError> {
    const ACTION: &str = "alerts.list";
    let caller = carer(&state, &access, ACTION).await?;
    let request = query
        .map_err(|e| ApiError::BadRequest(e.body_text()))
        .and_then(|Query(q)| check_list(q));
    let (states, severity, patient, limit, cursor) =
        checked(&state, &access, ACTION, request).await?;
    let client = state.pool.get().await?;
    let mut patients = caller.patients(&**client).await?;
    if let Some(p) = &patient {
        if !patients.contains(p) {
            return Err(deny_patient(&**client, &access, ACTION, p).await?);
        }
        patients = vec![p.clone()];
    }
    let (after_t, after_id) = cursor.map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let rows = client
        .query(
            &format!(
                "SELECT {SUMMARY_COLUMNS} FROM alerts
              WHERE patient_id = ANY($1) AND state = ANY($2) AND ($3::text IS NULL OR severity = $3)
                AND ($4::timestamptz IS NULL OR (opened_at, alert_id) < ($4, $5))
              ORDER BY opened_at DESC, alert_id DESC
              LIMIT $6"
            ),
            &[
                &patients,
                &states,
                &severity,
                &after_t,
                &after_id,
                &(limit + 1),
            ],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    let mut alerts: Vec<AlertSummary> = rows.iter().map(summary).collect();
    let next = (alerts.len() as i64 > limit).then(|| {
        alerts.truncate(limit as usize);
        alerts
            .last()
            .map(|a| format!("{}_{}", a.opened_at.timestamp_micros(), a.alert_id))
    });
    let detail = format!("{} alerts", alerts.len());
    audit::record(
        &**client,
        &access,
        ACTION,
        patient.as_deref(),
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    Ok(Json(AlertPage {
        alerts,
        next: next.flatten(),
    }))
}

/// One alert and its lifecycle history.
#[utoipa::path(get, path = "/v1/alerts/{alert_id}", tag = "alerts",
    params(("alert_id" = String, Path, description = "The alert")),
    responses(
        (status = 200, description = "The alert", body = AlertBody),
        (status = 400, description = "A malformed alert id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such alert among the caller's patients'", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_alert(
    State(state): State<AppState>,
    access: Access,
    Path(alert_id): Path<String>,
) -> Result<Json<AlertBody>, ApiError> {
    let caller = carer(&state, &access, "alert.read").await?;
    checked(&state, &access, "alert.read", check_id(&alert_id)).await?;
    let client = state.pool.get().await?;
    let alert = visible(&**client, &access, &caller, &alert_id, "alert.read").await?;
    audit::record(
        &**client,
        &access,
        "alert.read",
        Some(&alert.summary.patient_id),
        Outcome::Allowed,
        None,
    )
    .await?;
    Ok(Json(alert))
}

/// The alert, when it exists and its patient is on the caller's panel;
/// not found otherwise (another team's alert is not disclosed), audited.
async fn visible(
    client: &impl vitalwatch_store::tokio_postgres::GenericClient,
    access: &Access,
    caller: &Caller,
    alert_id: &str,
    action: &str,
) -> Result<AlertBody, ApiError> {
    let not_found = || ApiError::NotFound(format!("no alert {alert_id} among your patients'"));
    match load_alert(client, alert_id).await? {
        None => {
            audit::record(
                client,
                access,
                action,
                None,
                Outcome::Failed,
                Some("no such alert"),
            )
            .await?;
            Err(not_found())
        }
        Some(a) if !caller.can_see(client, &a.summary.patient_id).await? => {
            audit::record(
                client,
                access,
                action,
                Some(&a.summary.patient_id),
                Outcome::Denied,
                Some("not on the caller's care teams"),
            )
            .await?;
            Err(not_found())
        }
        Some(a) => Ok(a),
    }
}

/// A person's note on a lifecycle action.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// At most 1000 characters.
    pub note: Option<String>,
}

fn parse_action(body: &Bytes) -> Result<ActionBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ActionBody::default());
    }
    let parsed: ActionBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be {{\"note\": \"...\"}} or empty: {e}"
        ))
    })?;
    if parsed
        .note
        .as_ref()
        .is_some_and(|n| n.chars().count() > 1000)
    {
        return Err(ApiError::BadRequest(
            "a note is at most 1000 characters".into(),
        ));
    }
    Ok(parsed)
}

/// Acknowledges the alert, with an optional note (`{"note": "..."}`, at most 1000 characters).
#[utoipa::path(post, path = "/v1/alerts/{alert_id}/acknowledge", tag = "alerts",
    params(("alert_id" = String, Path, description = "The alert")),
    request_body(content = Option<ActionBody>, description = "An optional note", content_type = "application/json"),
    responses(
        (status = 200, description = "The alert after the change", body = AlertBody),
        (status = 400, description = "A malformed alert id or body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such alert among the caller's patients'", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The alert's state does not allow it", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn acknowledge(
    State(state): State<AppState>,
    access: Access,
    Path(alert_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AlertBody>, ApiError> {
    act(state, access, alert_id, body, Action::Acknowledge).await
}

/// Resolves the alert, with an optional note (`{"note": "..."}`, at most 1000 characters).
#[utoipa::path(post, path = "/v1/alerts/{alert_id}/resolve", tag = "alerts",
    params(("alert_id" = String, Path, description = "The alert")),
    request_body(content = Option<ActionBody>, description = "An optional note", content_type = "application/json"),
    responses(
        (status = 200, description = "The alert after the change", body = AlertBody),
        (status = 400, description = "A malformed alert id or body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such alert among the caller's patients'", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The alert's state does not allow it", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resolve(
    State(state): State<AppState>,
    access: Access,
    Path(alert_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AlertBody>, ApiError> {
    act(state, access, alert_id, body, Action::Resolve).await
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Acknowledge,
    Resolve,
}

async fn act(
    state: AppState,
    access: Access,
    alert_id: String,
    body: Result<Bytes, BytesRejection>,
    action: Action,
) -> Result<Json<AlertBody>, ApiError> {
    let name = match action {
        Action::Acknowledge => "alert.acknowledge",
        Action::Resolve => "alert.resolve",
    };
    let caller = carer(&state, &access, name).await?;
    let body = checked(
        &state,
        &access,
        name,
        check_id(&alert_id)
            .and_then(|()| crate::error::body(body))
            .and_then(|b| parse_action(&b)),
    )
    .await?;
    let mut client = state.pool.get().await?;
    let tx = client
        .transaction()
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    let alert = match visible(&*tx, &access, &caller, &alert_id, name).await {
        Ok(a) => a,
        Err(e) => {
            tx.commit()
                .await
                .map_err(vitalwatch_store::StoreError::from)?; // keep the audit row
            return Err(e);
        }
    };
    let note = body.note.as_deref();
    let changed = match action {
        Action::Acknowledge => {
            vitalwatch_store::alerts::acknowledge(&*tx, &alert_id, &caller.subject, note).await?
        }
        Action::Resolve => {
            vitalwatch_store::alerts::resolve(
                &*tx,
                &alert_id,
                Utc::now(),
                Some(&caller.subject),
                note,
            )
            .await?
        }
    };
    if !changed {
        let why = format!("the alert is {}", alert.summary.state);
        audit::record(
            &*tx,
            &access,
            name,
            Some(&alert.summary.patient_id),
            Outcome::Failed,
            Some(&why),
        )
        .await?;
        tx.commit()
            .await
            .map_err(vitalwatch_store::StoreError::from)?;
        return Err(ApiError::Conflict(why));
    }
    audit::record(
        &*tx,
        &access,
        name,
        Some(&alert.summary.patient_id),
        Outcome::Allowed,
        note.map(|_| "with a note"),
    )
    .await?;
    let updated = load_alert(&*tx, &alert_id)
        .await?
        .ok_or_else(|| ApiError::Internal("alert vanished".into()))?;
    tx.commit()
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    Ok(Json(updated))
}
