//! The audit log: who read or changed which patient's data, when, from
//! where, and whether it was allowed. Rows are written before the response
//! (in the same transaction as a change); `audit_log` refuses updates and
//! deletes.

use vitalwatch_store::tokio_postgres::GenericClient;

use crate::auth::{Access, checked};
use crate::error::ApiError;

/// What became of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// Writes one audit row.
pub async fn record(
    client: &impl GenericClient,
    access: &Access,
    action: &str,
    patient_id: Option<&str>,
    outcome: Outcome,
    detail: Option<&str>,
) -> Result<(), ApiError> {
    client
        .execute(
            "INSERT INTO audit_log (actor, action, patient_id, request_id, source, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &access.actor(),
                &action,
                &patient_id,
                &access.meta.request_id,
                &access.meta.source,
                &outcome.as_str(),
                &detail,
            ],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    Ok(())
}

/// Ends a change made in `tx`. Allowed: the audit row is written in `tx`
/// and both commit together. Failed: the change is rolled back and the
/// failure is audited on another connection before the answer.
pub async fn finish<T>(
    state: &crate::AppState,
    tx: vitalwatch_store::tokio_postgres::Transaction<'_>,
    access: &Access,
    action: &str,
    patient_id: Option<&str>,
    detail: Option<&str>,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    match result {
        Ok(v) => {
            record(&tx, access, action, patient_id, Outcome::Allowed, detail).await?;
            tx.commit()
                .await
                .map_err(vitalwatch_store::StoreError::from)?;
            Ok(v)
        }
        Err(e) => {
            tx.rollback()
                .await
                .map_err(vitalwatch_store::StoreError::from)?;
            if matches!(e, ApiError::Internal(_) | ApiError::Unavailable(_)) {
                return Err(e); // not the caller's doing; logged when answered
            }
            let client = state.pool.get().await?;
            record(
                &**client,
                access,
                action,
                patient_id,
                Outcome::Failed,
                Some(&e.to_string()),
            )
            .await?;
            Err(e)
        }
    }
}

/// A transaction on a pooled connection, for a change and its audit row.
pub async fn begin(
    client: &mut vitalwatch_store::tokio_postgres::Client,
) -> Result<vitalwatch_store::tokio_postgres::Transaction<'_>, ApiError> {
    client
        .transaction()
        .await
        .map_err(|e| vitalwatch_store::StoreError::from(e).into())
}

/// `GET /v1/audit?patient=&actor=&action=&outcome=&from=&to=&limit=&after=`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only rows about this patient.
    pub patient: Option<String>,
    /// Only rows of this actor (a token's `sub`, or `anonymous`).
    pub actor: Option<String>,
    /// Only this action (`vitals.read`, `alert.acknowledge`, ...).
    pub action: Option<String>,
    /// `allowed`, `denied` or `failed`.
    pub outcome: Option<String>,
    /// From this instant, inclusive (RFC 3339).
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Before this instant (RFC 3339).
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// 1 to 500; default 100.
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub after: Option<i64>,
}

/// One audited attempt.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `allowed`, `denied` or `failed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A page of the audit log, newest first; `next` asks for the page after.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<i64>,
}

/// The audit log, newest first, filtered (admins). Reading it is audited too.
#[utoipa::path(get, path = "/v1/audit", tag = "registry",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of the audit log", body = AuditPage),
        (status = 400, description = "A malformed filter, a reversed range, a bad limit", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    access: Access,
    query: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<AuditPage>, ApiError> {
    const ACTION: &str = "audit.read";
    crate::auth::with_role(
        &state,
        &access,
        ACTION,
        crate::auth::ADMIN,
        "the audit log is for admins",
    )
    .await?;
    let request = query
        .map_err(|e| ApiError::BadRequest(e.body_text()))
        .and_then(|axum::extract::Query(q)| {
            let limit = q.limit.unwrap_or(100);
            if !(1..=500).contains(&limit) {
                return Err(ApiError::BadRequest("limit is 1 to 500".into()));
            }
            if let Some(o) = &q.outcome
                && !["allowed", "denied", "failed"].contains(&o.as_str())
            {
                return Err(ApiError::BadRequest(format!(
                    "outcome {o:?} is not allowed, denied or failed"
                )));
            }
            for t in [q.from, q.to].into_iter().flatten() {
                if !(1970..=9999).contains(&chrono::Datelike::year(&t)) {
                    return Err(ApiError::BadRequest(
                        "from and to are between the years 1970 and 9999".into(),
                    ));
                }
            }
            for (name, v) in [("actor", &q.actor), ("action", &q.action)] {
                if v.as_deref()
                    .is_some_and(|v| v.len() > 256 || v.chars().any(char::is_control))
                {
                    return Err(ApiError::BadRequest(format!(
                        "{name} is at most 256 characters, none of them control characters"
                    )));
                }
            }
            if let (Some(f), Some(t)) = (q.from, q.to)
                && f >= t
            {
                return Err(ApiError::BadRequest("from must be before to".into()));
            }
            if let Some(p) = &q.patient {
                crate::auth::check_patient_id(p)?;
            }
            Ok((q, limit))
        });
    let (q, limit) = checked(&state, &access, ACTION, request).await?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, at, actor, action, patient_id, request_id, source, outcome, detail FROM audit_log
              WHERE ($1::text IS NULL OR patient_id = $1) AND ($2::text IS NULL OR actor = $2)
                AND ($3::text IS NULL OR action = $3) AND ($4::text IS NULL OR outcome = $4)
                AND ($5::timestamptz IS NULL OR at >= $5) AND ($6::timestamptz IS NULL OR at < $6)
                AND ($7::bigint IS NULL OR id < $7)
              ORDER BY id DESC LIMIT $8",
            &[&q.patient, &q.actor, &q.action, &q.outcome, &q.from, &q.to, &q.after, &(limit + 1)],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    let mut entries: Vec<AuditEntry> = rows
        .iter()
        .map(|r| AuditEntry {
            id: r.get(0),
            at: r.get(1),
            actor: r.get(2),
            action: r.get(3),
            patient_id: r.get(4),
            request_id: r.get(5),
            source: r.get(6),
            outcome: r.get(7),
            detail: r.get(8),
        })
        .collect();
    let next = (entries.len() as i64 > limit).then(|| {
        entries.truncate(limit as usize);
        entries.last().map(|e| e.id)
    });
    let detail = format!("{} entries", entries.len());
    record(
        &**client,
        &access,
        ACTION,
        q.patient.as_deref(),
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    Ok(axum::Json(AuditPage {
        entries,
        next: next.flatten(),
    }))
}
