//! A patient's alert thresholds: every configured rule with its settings,
//! and the per-patient overrides nurses and clinicians set (a COPD patient
//! whose usual SpO2 is 88 should not alarm at 90 all day).
//!
//! - `GET /v1/patients/{patient_id}/thresholds`
//! - `PUT /v1/patients/{patient_id}/thresholds/{rule}` with
//!   `{"params": {"level": 88}, "reason": "..."}`
//! - `DELETE /v1/patients/{patient_id}/thresholds/{rule}`
//!
//! An override is checked against the rule as configured (the alerts
//! engine's own [`Override::apply`]) before it is stored, so the engine
//! never meets one it cannot use. Each change is audited in its
//! transaction with the old and new settings; the running engines rebuild
//! the patient with it (migration 6).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vitalwatch_alerts::rules::{Override, Rule, Settings};
use vitalwatch_store::StoreError;
use vitalwatch_store::tokio_postgres::GenericClient;

use crate::AppState;
use crate::audit::{self, Outcome, begin, finish};
use crate::auth::{Access, carer, check_patient_id, checked, require_patient};
use crate::error::{ApiError, Problem, json};

/// A rule's adjustable settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    /// Threshold rules: the level beyond which it raises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<f64>,
    /// Threshold and rate-of-change rules: back past this, it clears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<f64>,
    /// Rate-of-change rules: the change that raises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    /// NEWS2: the SpO2 scale (2 for patients with hypercapnic respiratory failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spo2_scale: Option<u8>,
}

impl From<&Settings> for SettingsBody {
    fn from(s: &Settings) -> Self {
        SettingsBody {
            level: s.level,
            clear: s.clear,
            limit: s.limit,
            spo2_scale: s.spo2_scale,
        }
    }
}

/// A stored override.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OverrideBody {
    /// Only what is overridden; the rule's configuration gives the rest.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub set_by: String,
    pub set_at: DateTime<Utc>,
}

/// One rule as it applies to the patient.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RuleThresholds {
    pub rule: String,
    /// `threshold`, `rate_of_change`, `missing` or `news2`.
    pub kind: String,
    /// `low` to `high`; absent for NEWS2, whose severity follows the risk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// `below`/`above` (thresholds), `rise`/`fall` (rate of change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// As configured for every patient.
    pub defaults: SettingsBody,
    /// What the engine uses for this patient.
    pub effective: SettingsBody,
    /// This patient's override, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#override: Option<OverrideBody>,
    /// Why a stored override is not used (the rule's configuration changed
    /// under it); the defaults apply until it is set again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_error: Option<String>,
}

/// Every configured rule, as it applies to one patient.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Thresholds {
    pub patient_id: String,
    pub rules: Vec<RuleThresholds>,
}

/// `PUT /v1/patients/{patient_id}/thresholds/{rule}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOverride {
    /// Any of `level`, `clear` (threshold rules), `limit` (rate of change),
    /// `spo2_scale` (NEWS2, 1 or 2).
    pub params: SettingsBody,
    /// Why (1 to 500 characters): kept with the override.
    pub reason: String,
}

fn describe(rule: &Rule, stored: Option<OverrideBody>) -> RuleThresholds {
    let defaults = rule.settings();
    let (effective, override_error) = match &stored {
        None => (defaults.clone(), None),
        Some(o) => match serde_json::from_value::<Override>(o.params.clone())
            .map_err(|e| e.to_string())
            .and_then(|ov| ov.apply(rule))
        {
            Ok(r) => (r.settings(), None),
            Err(e) => (defaults.clone(), Some(e)),
        },
    };
    RuleThresholds {
        rule: rule.name.clone(),
        kind: defaults.kind.to_owned(),
        severity: rule.severity.map(|s| s.as_str().to_owned()),
        metric: defaults.metric.map(str::to_owned),
        component: defaults.component.map(str::to_owned),
        direction: defaults.direction.map(str::to_owned),
        defaults: (&defaults).into(),
        effective: (&effective).into(),
        r#override: stored,
        override_error,
    }
}

async fn stored(
    client: &impl GenericClient,
    patient_id: &str,
    rule: Option<&str>,
) -> Result<Vec<(String, OverrideBody)>, ApiError> {
    let rows = client
        .query(
            "SELECT rule, params, reason, set_by, set_at FROM thresholds
              WHERE patient_id = $1 AND ($2::text IS NULL OR rule = $2)",
            &[&patient_id, &rule],
        )
        .await
        .map_err(StoreError::from)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                OverrideBody {
                    params: r.get(1),
                    reason: r.get(2),
                    set_by: r.get(3),
                    set_at: r.get(4),
                },
            )
        })
        .collect())
}

/// Every configured rule as it applies to the patient: its defaults, the
/// patient's override and what the engine uses (nurses and clinicians of
/// the patient's care teams).
#[utoipa::path(get, path = "/v1/patients/{patient_id}/thresholds", tag = "thresholds",
    params(("patient_id" = String, Path, description = "The patient")),
    responses(
        (status = 200, description = "The patient's thresholds", body = Thresholds),
        (status = 400, description = "A malformed patient id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a patient of the caller's care teams", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_thresholds(
    State(state): State<AppState>,
    access: Access,
    Path(patient_id): Path<String>,
) -> Result<Json<Thresholds>, ApiError> {
    const ACTION: &str = "thresholds.read";
    let access = access.about(&patient_id);
    let caller = carer(&state, &access, ACTION).await?;
    checked(&state, &access, ACTION, check_patient_id(&patient_id)).await?;
    let client = state.pool.get().await?;
    require_patient(&**client, &access, &caller, ACTION, &patient_id).await?;
    let mut overrides = stored(&**client, &patient_id, None).await?;
    let rules = state
        .rules
        .iter()
        .map(|rule| {
            let o = overrides
                .iter()
                .position(|(name, _)| *name == rule.name)
                .map(|i| overrides.swap_remove(i).1);
            describe(rule, o)
        })
        .collect();
    audit::record(
        &**client,
        &access,
        ACTION,
        Some(&patient_id),
        Outcome::Allowed,
        None,
    )
    .await?;
    Ok(Json(Thresholds { patient_id, rules }))
}

fn check_rule<'a>(state: &'a AppState, name: &str) -> Result<&'a Rule, ApiError> {
    state
        .rules
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("no alert rule {name:?} is configured")))
}

/// What an override changes, in its stored form (only the given settings).
fn params_of(s: &SettingsBody) -> Result<(Override, serde_json::Value), ApiError> {
    let v = serde_json::to_value(s).map_err(|e| ApiError::Internal(e.to_string()))?;
    if v.as_object().is_none_or(serde_json::Map::is_empty) {
        return Err(ApiError::BadRequest(
            "params must set at least one of level, clear, limit, spo2_scale".into(),
        ));
    }
    let o: Override =
        serde_json::from_value(v.clone()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok((o, v))
}

/// Sets the patient's override of one rule (nurses and clinicians of the
/// patient's care teams). The running engines rebuild the patient with it.
#[utoipa::path(put, path = "/v1/patients/{patient_id}/thresholds/{rule}", tag = "thresholds",
    params(("patient_id" = String, Path, description = "The patient"), ("rule" = String, Path, description = "A configured rule's name")),
    request_body = NewOverride,
    responses(
        (status = 200, description = "The rule as it now applies to the patient", body = RuleThresholds),
        (status = 400, description = "A malformed body, or settings the rule does not take or that contradict it", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a patient of the caller's care teams, or no such rule", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_override(
    State(state): State<AppState>,
    access: Access,
    Path((patient_id, rule)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RuleThresholds>, ApiError> {
    const ACTION: &str = "thresholds.override";
    let access = access.about(&patient_id);
    let caller = carer(&state, &access, ACTION).await?;
    let request = check_patient_id(&patient_id)
        .and_then(|()| json::<NewOverride>(body))
        .and_then(|o| {
            let reason = o.reason.trim().to_owned();
            if reason.is_empty() || reason.chars().count() > 500 {
                return Err(ApiError::BadRequest(
                    "a reason (1 to 500 characters) is required".into(),
                ));
            }
            let (ov, params) = params_of(&o.params)?;
            let r = check_rule(&state, &rule)?;
            ov.apply(r).map_err(ApiError::BadRequest)?;
            Ok((r, params, reason))
        });
    let (r, params, reason) = checked(&state, &access, ACTION, request).await?;
    let mut client = state.pool.get().await?;
    require_patient(&**client, &access, &caller, ACTION, &patient_id).await?;
    let tx = begin(&mut client).await?;
    let before = stored(&tx, &patient_id, Some(&rule)).await?;
    tx.execute(
        "INSERT INTO thresholds (patient_id, rule, params, reason, set_by) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (patient_id, rule)
         DO UPDATE SET params = EXCLUDED.params, reason = EXCLUDED.reason, set_by = EXCLUDED.set_by, set_at = now()",
        &[&patient_id, &rule, &params, &reason, &caller.subject],
    )
    .await
    .map_err(StoreError::from)?;
    let after = stored(&tx, &patient_id, Some(&rule)).await?;
    let detail = format!(
        "rule {rule}: {} -> {params}",
        before
            .first()
            .map_or_else(|| "defaults".to_owned(), |(_, o)| o.params.to_string())
    );
    let body = describe(r, after.into_iter().next().map(|(_, o)| o));
    let body = finish(
        &state,
        tx,
        &access,
        ACTION,
        Some(&patient_id),
        Some(&detail),
        Ok(body),
    )
    .await?;
    Ok(Json(body))
}

/// Removes the patient's override of one rule: the configured settings
/// apply again (nurses and clinicians of the patient's care teams).
#[utoipa::path(delete, path = "/v1/patients/{patient_id}/thresholds/{rule}", tag = "thresholds",
    params(("patient_id" = String, Path, description = "The patient"), ("rule" = String, Path, description = "A configured rule's name")),
    responses(
        (status = 200, description = "The rule as it now applies to the patient", body = RuleThresholds),
        (status = 400, description = "A malformed patient id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a patient of the caller's care teams, or no such rule", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn clear_override(
    State(state): State<AppState>,
    access: Access,
    Path((patient_id, rule)): Path<(String, String)>,
) -> Result<Json<RuleThresholds>, ApiError> {
    const ACTION: &str = "thresholds.clear";
    let access = access.about(&patient_id);
    let caller = carer(&state, &access, ACTION).await?;
    let r = checked(
        &state,
        &access,
        ACTION,
        check_patient_id(&patient_id).and_then(|()| check_rule(&state, &rule)),
    )
    .await?;
    let mut client = state.pool.get().await?;
    require_patient(&**client, &access, &caller, ACTION, &patient_id).await?;
    let tx = begin(&mut client).await?;
    let before = stored(&tx, &patient_id, Some(&rule)).await?;
    tx.execute(
        "DELETE FROM thresholds WHERE patient_id = $1 AND rule = $2",
        &[&patient_id, &rule],
    )
    .await
    .map_err(StoreError::from)?;
    let detail = format!(
        "rule {rule}: {} -> defaults",
        before
            .first()
            .map_or_else(|| "defaults".to_owned(), |(_, o)| o.params.to_string())
    );
    let body = finish(
        &state,
        tx,
        &access,
        ACTION,
        Some(&patient_id),
        Some(&detail),
        Ok(describe(r, None)),
    )
    .await?;
    Ok(Json(body))
}
