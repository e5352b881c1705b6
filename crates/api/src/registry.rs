//! The registry: patients, devices and their assignments, care teams, who
//! is on them and which patients are on their panels.
//!
//! - Admins create patients and care teams and decide who and what is on
//!   a team; admins and device admins register devices and assign them.
//! - Nurses and clinicians list their own care teams and read their panels.
//!
//! Every change is audited in the transaction that makes it; refusals are
//! audited too. A device's assignment reaches ingest through the registry's
//! change notifications (migration 2).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vitalwatch_store::StoreError;
use vitalwatch_store::registry::MAX_ID_LEN;
use vitalwatch_store::tokio_postgres::GenericClient;

use crate::AppState;
use crate::audit::{self, Outcome, begin, finish};
use crate::auth::{ADMIN, Access, Caller, DEVICES, check_patient_id, checked, with_role};
use crate::error::{ApiError, Problem, json};

const ADMINS_ONLY: &str = "patients and care teams are managed by admins";
const DEVICE_ADMINS_ONLY: &str = "devices are managed by admins and device admins";

fn db(e: impl Into<StoreError>) -> ApiError {
    ApiError::from(e.into())
}

/// A device id as the registry takes it (also an MQTT topic level).
fn check_device_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || id.contains(['/', '+', '#'])
        || id.trim() != id
        || id.chars().any(char::is_control)
    {
        return Err(ApiError::BadRequest(format!(
            "a device id is 1 to {MAX_ID_LEN} bytes without '/', '+', '#', control characters or surrounding spaces"
        )));
    }
    Ok(())
}

/// A care team id: 1 to 64 letters, digits, `.`, `_` or `-`.
fn check_team_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(ApiError::BadRequest(
            "a care team id is 1 to 64 letters, digits, '.', '_' or '-'".into(),
        ));
    }
    Ok(())
}

/// A member's subject, as the identity provider's tokens carry it.
fn check_subject(s: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "a subject is 1 to 256 characters without control characters".into(),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- patients

/// `POST /v1/patients`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPatient {
    /// The hospital's identifier (an MRN, a UUID): 1 to 128 bytes, never a name.
    pub patient_id: String,
}

/// A registered patient.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Patient {
    pub patient_id: String,
    pub created_at: DateTime<Utc>,
}

/// Registers a patient (admins).
#[utoipa::path(post, path = "/v1/patients", tag = "registry",
    request_body = NewPatient,
    responses(
        (status = 201, description = "Registered", body = Patient),
        (status = 400, description = "A malformed body or id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The patient is already registered", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_patient(
    State(state): State<AppState>,
    access: Access,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Patient>), ApiError> {
    const ACTION: &str = "patient.create";
    with_role(&state, &access, ACTION, ADMIN, ADMINS_ONLY).await?;
    let new: NewPatient = checked(
        &state,
        &access,
        ACTION,
        json(body).and_then(|p: NewPatient| check_patient_id(&p.patient_id).map(|()| p)),
    )
    .await?;
    let mut client = state.pool.get().await?;
    let tx = begin(&mut client).await?;
    let row = tx
        .query_opt(
            "INSERT INTO patients (patient_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING created_at",
            &[&new.patient_id],
        )
        .await
        .map_err(db)?;
    let result = row
        .map(|r| Patient {
            patient_id: new.patient_id.clone(),
            created_at: r.get(0),
        })
        .ok_or_else(|| {
            ApiError::Conflict(format!("patient {} is already registered", new.patient_id))
        });
    let p = finish(
        &state,
        tx,
        &access,
        ACTION,
        Some(&new.patient_id),
        None,
        result,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(p)))
}

// ----------------------------------------------------------------- devices

/// `POST /v1/devices`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// 1 to 128 bytes without `/`, `+` or `#` (it is the device's MQTT topic level).
    pub device_id: String,
    /// `bp_cuff`, `pulse_oximeter`, `scale`, `thermometer`, `wearable`, ...
    pub kind: String,
}

/// One period a device belonged to a patient.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AssignmentBody {
    pub patient_id: String,
    pub from: DateTime<Utc>,
    /// Absent while the assignment is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// A registered device and every patient it belonged to.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Device {
    pub device_id: String,
    pub kind: String,
    /// An inactive device's readings are refused (dead-lettered).
    pub active: bool,
    /// Who has it now, if anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
    /// Oldest first.
    pub assignments: Vec<AssignmentBody>,
}

async fn load_device(
    client: &impl GenericClient,
    device_id: &str,
) -> Result<Option<Device>, ApiError> {
    let rec = vitalwatch_store::registry::device(client, device_id).await?;
    Ok(rec.map(|d| Device {
        device_id: device_id.to_owned(),
        patient_id: d.current_patient().map(str::to_owned),
        kind: d.kind,
        active: d.active,
        assignments: d
            .assignments
            .into_iter()
            .map(|a| AssignmentBody {
                patient_id: a.patient_id,
                from: a.from,
                until: a.until,
            })
            .collect(),
    }))
}

fn no_device(device_id: &str) -> ApiError {
    ApiError::NotFound(format!("no device {device_id} is registered"))
}

/// Registers a device (admins and device admins).
#[utoipa::path(post, path = "/v1/devices", tag = "registry",
    request_body = NewDevice,
    responses(
        (status = 201, description = "Registered", body = Device),
        (status = 400, description = "A malformed body or id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin or device admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The device is already registered", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_device(
    State(state): State<AppState>,
    access: Access,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Device>), ApiError> {
    const ACTION: &str = "device.register";
    with_role(&state, &access, ACTION, DEVICES, DEVICE_ADMINS_ONLY).await?;
    let new: NewDevice = checked(
        &state,
        &access,
        ACTION,
        json(body).and_then(|d: NewDevice| {
            check_device_id(&d.device_id)?;
            if d.kind.is_empty()
                || d.kind.len() > 64
                || !d
                    .kind
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(ApiError::BadRequest(
                    "a device kind is 1 to 64 letters, digits or '_'".into(),
                ));
            }
            Ok(d)
        }),
    )
    .await?;
    let mut client = state.pool.get().await?;
    let tx = begin(&mut client).await?;
    let created = tx
        .execute(
            "INSERT INTO devices (device_id, kind) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&new.device_id, &new.kind],
        )
        .await
        .map_err(db)?;
    let result = if created == 1 {
        load_device(&tx, &new.device_id)
            .await?
            .ok_or_else(|| no_device(&new.device_id))
    } else {
        Err(ApiError::Conflict(format!(
            "device {} is already registered",
            new.device_id
        )))
    };
    let detail = format!("device {}", new.device_id);
    let d = finish(&state, tx, &access, ACTION, None, Some(&detail), result).await?;
    Ok((StatusCode::CREATED, Json(d)))
}

/// A device and its assignment history (admins and device admins).
#[utoipa::path(get, path = "/v1/devices/{device_id}", tag = "registry",
    params(("device_id" = String, Path, description = "The device")),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 400, description = "A malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin or device admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_device(
    State(state): State<AppState>,
    access: Access,
    Path(device_id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    const ACTION: &str = "device.read";
    with_role(&state, &access, ACTION, DEVICES, DEVICE_ADMINS_ONLY).await?;
    checked(&state, &access, ACTION, check_device_id(&device_id)).await?;
    let mut client = state.pool.get().await?;
    let tx = begin(&mut client).await?;
    let result = load_device(&tx, &device_id)
        .await?
        .ok_or_else(|| no_device(&device_id));
    let patient = result.as_ref().ok().and_then(|d| d.patient_id.clone());
    let detail = format!("device {device_id}");
    Ok(Json(
        finish(
            &state,
            tx,
            &access,
            ACTION,
            patient.as_deref(),
            Some(&detail),
            result,
        )
        .await?,
    ))
}

/// `PUT /v1/devices/{device_id}/assignment`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAssignment {
    /// A registered patient.
    pub patient_id: String,
    /// From when (default now); after the device's latest assignment began.
    pub since: Option<DateTime<Utc>>,
}

/// Assigns the device to a patient, ending any other patient's assignment
/// at that moment (admins and device admins). Readings are attributed by
/// when they were measured, so a hand-over never mixes two patients' data.
#[utoipa::path(put, path = "/v1/devices/{device_id}/assignment", tag = "registry",
    params(("device_id" = String, Path, description = "The device")),
    request_body = NewAssignment,
    responses(
        (status = 200, description = "The device after the change", body = Device),
        (status = 400, description = "A malformed body or id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin or device admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device or patient", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`since` is not after the device's latest assignment began", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn assign_device(
    State(state): State<AppState>,
    access: Access,
    Path(device_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Device>, ApiError> {
    const ACTION: &str = "device.assign";
    with_role(&state, &access, ACTION, DEVICES, DEVICE_ADMINS_ONLY).await?;
    let new: NewAssignment = checked(
        &state,
        &access,
        ACTION,
        check_device_id(&device_id)
            .and_then(|()| json(body))
            .and_then(|a: NewAssignment| check_patient_id(&a.patient_id).map(|()| a)),
    )
    .await?;
    let mut client = state.pool.get().await?;
    let tx = begin(&mut client).await?;
    let result = async {
        let patient_known = tx
            .query_opt(
                "SELECT 1 FROM patients WHERE patient_id = $1",
                &[&new.patient_id],
            )
            .await
            .map_err(db)?
            .is_some();
        if !patient_known {
            return Err(ApiError::NotFound(format!(
                "no patient {} is registered",
                new.patient_id
            )));
        }
        let known = tx
            .query_opt(
                "SELECT 1 FROM devices WHERE device_id = $1 FOR UPDATE",
                &[&device_id],
            )
            .await
            .map_err(db)?
            .is_some();
        if !known {
            return Err(no_device(&device_id));
        }
        match vitalwatch_store::registry::assign(
            &tx,
            &device_id,
            &new.patient_id,
            new.since.unwrap_or_else(Utc::now),
        )
        .await
        {
            Ok(()) => {}
            Err(StoreError::Invalid(why)) => return Err(ApiError::Conflict(why)),
            Err(e) => return Err(e.into()),
        }
        load_device(&tx, &device_id)
            .await?
            .ok_or_else(|| no_device(&device_id))
    }
    .await;
    let detail = format!("device {device_id}");
    Ok(Json(
        finish(
            &state,
            tx,
            &access,
            ACTION,
            Some(&new.patient_id),
            Some(&detail),
            result,
        )
        .await?,
    ))
}

/// `DELETE /v1/devices/{device_id}/assignment?at=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReturnQuery {
    /// When the patient gave the device back (default now).
    pub at: Option<DateTime<Utc>>,
}

/// Ends the device's current assignment: the device is returned (admins and
/// device admins). Its later readings belong to no one and are refused.
#[utoipa::path(delete, path = "/v1/devices/{device_id}/assignment", tag = "registry",
    params(("device_id" = String, Path, description = "The device"), ReturnQuery),
    responses(
        (status = 200, description = "The device after the change", body = Device),
        (status = 400, description = "A malformed id or time", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin or device admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The device is not assigned, or `at` is before its assignment began", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn unassign_device(
    State(state): State<AppState>,
    access: Access,
    Path(device_id): Path<String>,
    query: Result<Query<ReturnQuery>, QueryRejection>,
) -> Result<Json<Device>, ApiError> {
    const ACTION: &str = "device.unassign";
    with_role(&state, &access, ACTION, DEVICES, DEVICE_ADMINS_ONLY).await?;
    let q = checked(
        &state,
        &access,
        ACTION,
        check_device_id(&device_id).and_then(|()| {
            query
                .map(|Query(q)| q)
                .map_err(|e| ApiError::BadRequest(e.body_text()))
        }),
    )
    .await?;
    let mut client = state.pool.get().await?;
    let tx = begin(&mut client).await?;
    let before = load_device(&tx, &device_id).await?;
    let patient = before.as_ref().and_then(|d| d.patient_id.clone());
    let result = async {
        if before.is_none() {
            return Err(no_device(&device_id));
        }
        match vitalwatch_store::registry::unassign(&tx, &device_id, q.at.unwrap_or_else(Utc::now))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return Err(ApiError::Conflict(format!(
                    "device {device_id} is not assigned"
                )));
            }
            Err(StoreError::Invalid(why)) => return Err(ApiError::Conflict(why)),
            Err(e) => return Err(e.into()),
        }
        load_device(&tx, &device_id)
            .await?
            .ok_or_else(|| no_device(&device_id))
    }
    .await;
    let detail = format!("device {device_id}");
    Ok(Json(
        finish(
            &state,
            tx,
            &access,
            ACTION,
            patient.as_deref(),
            Some(&detail),
            result,
        )
        .await?,
    ))
}

// -------------------------------------------------------------- care teams

/// `POST /v1/care-teams`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCareTeam {
    /// 1 to 64 letters, digits, `.`, `_` or `-`.
    pub team_id: String,
    /// What the team is called (1 to 200 characters).
    pub name: String,
}

/// A care team.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CareTeam {
    pub team_id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// How many patients are on its panel.
    pub patients: i64,
    /// Who is on it (identity-provider subjects), in order.
    pub members: Vec<String>,
}

/// Care teams, by id.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CareTeams {
    pub teams: Vec<CareTeam>,
}

const TEAM_SELECT: &str = "SELECT t.team_id, t.name, t.created_at,
        (SELECT count(*) FROM care_team_patients p WHERE p.team_id = t.team_id),
        coalesce((SELECT array_agg(m.subject ORDER BY m.subject) FROM care_team_members m WHERE m.team_id = t.team_id), '{}')
   FROM care_teams t";

fn team(r: &vitalwatch_store::tokio_postgres::Row) -> CareTeam {
    CareTeam {
        team_id: r.get(0),
        name: r.get(1),
        created_at: r.get(2),
        patients: r.get(3),
        members: r.get(4),
    }
}

/// Creates a care team (admins).
#[utoipa::path(post, path = "/v1/care-teams", tag = "registry",
    request_body = NewCareTeam,
    responses(
        (status = 201, description = "Created", body = CareTeam),
        (status = 400, description = "A malformed body or id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The team exists", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_team(
    State(state): State<AppState>,
    access: Access,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<CareTeam>), ApiError> {
    const ACTION: &str = "team.create";
    with_role(&state, &access, ACTION, ADMIN, ADMINS_ONLY).await?;
    let new: NewCareTeam = checked(
        &state,
        &access,
        ACTION,
        json(body).and_then(|t: NewCareTeam| {
            check_team_id(&t.team_id)?;
            if t.name.trim().is_empty() || t.name.chars().count() > 200 {
                return Err(ApiError::BadRequest(
                    "a team name is 1 to 200 characters".into(),
                ));
            }
            Ok(t)
        }),
    )
    .await?;
    let mut client = state.pool.get().await?;
    let tx = begin(&mut client).await?;
    let created = tx
        .execute(
            "INSERT INTO care_teams (team_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&new.team_id, &new.name],
        )
        .await
        .map_err(db)?;
    let result = if created == 1 {
        let r = tx
            .query_one(
                &format!("{TEAM_SELECT} WHERE t.team_id = $1"),
                &[&new.team_id],
            )
            .await
            .map_err(db)?;
        Ok(team(&r))
    } else {
        Err(ApiError::Conflict(format!(
            "care team {} exists",
            new.team_id
        )))
    };
    let detail = format!("team {}", new.team_id);
    let t = finish(&state, tx, &access, ACTION, None, Some(&detail), result).await?;
    Ok((StatusCode::CREATED, Json(t)))
}

fn is_admin(caller: &Caller) -> bool {
    caller.has_any(ADMIN)
}

/// Care teams: every team for admins, their own for nurses and clinicians.
#[utoipa::path(get, path = "/v1/care-teams", tag = "registry",
    responses(
        (status = 200, description = "The teams", body = CareTeams),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin, nurse or clinician", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_teams(
    State(state): State<AppState>,
    access: Access,
) -> Result<Json<CareTeams>, ApiError> {
    const ACTION: &str = "teams.list";
    let roles = [
        crate::auth::Role::Admin,
        crate::auth::Role::Nurse,
        crate::auth::Role::Clinician,
    ];
    let caller = with_role(
        &state,
        &access,
        ACTION,
        &roles,
        "care teams are for admins and their own members",
    )
    .await?;
    let client = state.pool.get().await?;
    let rows = if is_admin(&caller) {
        client.query(&format!("{TEAM_SELECT} ORDER BY t.team_id"), &[]).await
    } else {
        client
            .query(
                &format!(
                    "{TEAM_SELECT} WHERE EXISTS (SELECT 1 FROM care_team_members m WHERE m.team_id = t.team_id AND m.subject = $1)
                     ORDER BY t.team_id"
                ),
                &[&caller.subject],
            )
            .await
    }
    .map_err(db)?;
    let teams: Vec<CareTeam> = rows.iter().map(team).collect();
    let detail = format!("{} teams", teams.len());
    audit::record(
        &**client,
        &access,
        ACTION,
        None,
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    Ok(Json(CareTeams { teams }))
}

/// `GET /v1/care-teams/{team_id}/patients?limit=&after=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PanelQuery {
    /// 1 to 500; default 100.
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

/// A device a patient has now.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PanelDevice {
    pub device_id: String,
    pub kind: String,
    pub since: DateTime<Utc>,
}

/// A patient on a panel, with the devices they have now.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PanelPatient {
    pub patient_id: String,
    pub added_at: DateTime<Utc>,
    pub devices: Vec<PanelDevice>,
}

/// A page of a care team's panel, by patient id; `next` asks for the page after.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Panel {
    pub team_id: String,
    pub patients: Vec<PanelPatient>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A care team's panel: its patients and their devices (admins, and the
/// team's own nurses and clinicians).
#[utoipa::path(get, path = "/v1/care-teams/{team_id}/patients", tag = "registry",
    params(("team_id" = String, Path, description = "The care team"), PanelQuery),
    responses(
        (status = 200, description = "A page of the panel", body = Panel),
        (status = 400, description = "A malformed id, limit or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin, nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such team among the caller's", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn panel(
    State(state): State<AppState>,
    access: Access,
    Path(team_id): Path<String>,
    query: Result<Query<PanelQuery>, QueryRejection>,
) -> Result<Json<Panel>, ApiError> {
    const ACTION: &str = "team.panel";
    let roles = [
        crate::auth::Role::Admin,
        crate::auth::Role::Nurse,
        crate::auth::Role::Clinician,
    ];
    let caller = with_role(
        &state,
        &access,
        ACTION,
        &roles,
        "a panel is for admins and the team's own members",
    )
    .await?;
    let (limit, after) = checked(
        &state,
        &access,
        ACTION,
        check_team_id(&team_id)
            .and_then(|()| {
                query
                    .map(|Query(q)| q)
                    .map_err(|e| ApiError::BadRequest(e.body_text()))
            })
            .and_then(|q| {
                let limit = q.limit.unwrap_or(100);
                if !(1..=500).contains(&limit) {
                    return Err(ApiError::BadRequest("limit is 1 to 500".into()));
                }
                if let Some(a) = &q.after {
                    check_patient_id(a).map_err(|_| {
                        ApiError::BadRequest("after must be the next of a previous page".into())
                    })?;
                }
                Ok((limit, q.after))
            }),
    )
    .await?;
    let client = state.pool.get().await?;
    let visible = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM care_teams WHERE team_id = $1)
                AND ($3 OR EXISTS (SELECT 1 FROM care_team_members WHERE team_id = $1 AND subject = $2))",
            &[&team_id, &caller.subject, &is_admin(&caller)],
        )
        .await
        .map_err(db)?
        .get::<_, bool>(0);
    let detail = format!("team {team_id}");
    if !visible {
        audit::record(
            &**client,
            &access,
            ACTION,
            None,
            Outcome::Denied,
            Some(&format!("{detail}: not found or not a member")),
        )
        .await?;
        return Err(ApiError::NotFound(format!(
            "no care team {team_id} among yours"
        )));
    }
    let rows = client
        .query(
            "SELECT p.patient_id, p.added_at, d.device_id, d.kind, a.assigned_at
               FROM (SELECT patient_id, added_at FROM care_team_patients
                      WHERE team_id = $1 AND ($2::text IS NULL OR patient_id > $2)
                      ORDER BY patient_id LIMIT $3) p
               LEFT JOIN device_assignments a ON a.patient_id = p.patient_id AND a.unassigned_at IS NULL
               LEFT JOIN devices d ON d.device_id = a.device_id
              ORDER BY p.patient_id, d.device_id",
            &[&team_id, &after, &(limit + 1)],
        )
        .await
        .map_err(db)?;
    let mut patients: Vec<PanelPatient> = Vec::new();
    for r in &rows {
        let id: String = r.get(0);
        if patients.last().is_none_or(|p| p.patient_id != id) {
            patients.push(PanelPatient {
                patient_id: id,
                added_at: r.get(1),
                devices: Vec::new(),
            });
        }
        if let (Some(device_id), Some(p)) = (r.get::<_, Option<String>>(2), patients.last_mut()) {
            p.devices.push(PanelDevice {
                device_id,
                kind: r.get(3),
                since: r.get(4),
            });
        }
    }
    let next = (patients.len() as i64 > limit).then(|| {
        patients.truncate(limit as usize);
        patients.last().map(|p| p.patient_id.clone())
    });
    let detail = format!("{detail}: {} patients", patients.len());
    audit::record(
        &**client,
        &access,
        ACTION,
        None,
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    Ok(Json(Panel {
        team_id,
        patients,
        next: next.flatten(),
    }))
}

/// Whether a team exists, for a change to it.
async fn team_exists(client: &impl GenericClient, team_id: &str) -> Result<bool, ApiError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM care_teams WHERE team_id = $1 FOR UPDATE",
            &[&team_id],
        )
        .await
        .map_err(db)?
        .is_some())
}

/// A change to a team's panel or members.
#[derive(Debug, Clone, Copy)]
enum Membership {
    AddPatient,
    RemovePatient,
    AddMember,
    RemoveMember,
}

impl Membership {
    fn action(self) -> &'static str {
        match self {
            Membership::AddPatient => "team.patient.add",
            Membership::RemovePatient => "team.patient.remove",
            Membership::AddMember => "team.member.add",
            Membership::RemoveMember => "team.member.remove",
        }
    }
}

async fn change_team(
    state: AppState,
    access: Access,
    team_id: String,
    who: String,
    change: Membership,
) -> Result<Json<CareTeam>, ApiError> {
    let action = change.action();
    with_role(&state, &access, action, ADMIN, ADMINS_ONLY).await?;
    let patient_change = matches!(change, Membership::AddPatient | Membership::RemovePatient);
    checked(
        &state,
        &access,
        action,
        check_team_id(&team_id).and_then(|()| {
            if patient_change {
                check_patient_id(&who)
            } else {
                check_subject(&who)
            }
        }),
    )
    .await?;
    let mut client = state.pool.get().await?;
    let tx = begin(&mut client).await?;
    let result = async {
        if !team_exists(&tx, &team_id).await? {
            return Err(ApiError::NotFound(format!("no care team {team_id}")));
        }
        let sql = match change {
            Membership::AddPatient => {
                let known = tx
                    .query_opt("SELECT 1 FROM patients WHERE patient_id = $1", &[&who])
                    .await
                    .map_err(db)?
                    .is_some();
                if !known {
                    return Err(ApiError::NotFound(format!("no patient {who} is registered")));
                }
                "INSERT INTO care_team_patients (team_id, patient_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            }
            Membership::RemovePatient => "DELETE FROM care_team_patients WHERE team_id = $1 AND patient_id = $2",
            Membership::AddMember => {
                "INSERT INTO care_team_members (team_id, subject) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            }
            Membership::RemoveMember => "DELETE FROM care_team_members WHERE team_id = $1 AND subject = $2",
        };
        tx.execute(sql, &[&team_id, &who]).await.map_err(db)?;
        let r = tx
            .query_one(&format!("{TEAM_SELECT} WHERE t.team_id = $1"), &[&team_id])
            .await
            .map_err(db)?;
        Ok(team(&r))
    }
    .await;
    let (patient, detail) = if patient_change {
        (Some(who.as_str()), format!("team {team_id}"))
    } else {
        (None, format!("team {team_id}, member {who}"))
    };
    Ok(Json(
        finish(&state, tx, &access, action, patient, Some(&detail), result).await?,
    ))
}

/// Puts a patient on a care team's panel (admins); idempotent.
#[utoipa::path(put, path = "/v1/care-teams/{team_id}/patients/{patient_id}", tag = "registry",
    params(("team_id" = String, Path, description = "The care team"), ("patient_id" = String, Path, description = "A registered patient")),
    responses(
        (status = 200, description = "The team after the change", body = CareTeam),
        (status = 400, description = "A malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such team or patient", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn add_patient(
    State(state): State<AppState>,
    access: Access,
    Path((team_id, patient_id)): Path<(String, String)>,
) -> Result<Json<CareTeam>, ApiError> {
    change_team(state, access, team_id, patient_id, Membership::AddPatient).await
}

/// Takes a patient off a care team's panel (admins); idempotent.
#[utoipa::path(delete, path = "/v1/care-teams/{team_id}/patients/{patient_id}", tag = "registry",
    params(("team_id" = String, Path, description = "The care team"), ("patient_id" = String, Path, description = "The patient")),
    responses(
        (status = 200, description = "The team after the change", body = CareTeam),
        (status = 400, description = "A malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such team", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn remove_patient(
    State(state): State<AppState>,
    access: Access,
    Path((team_id, patient_id)): Path<(String, String)>,
) -> Result<Json<CareTeam>, ApiError> {
    change_team(
        state,
        access,
        team_id,
        patient_id,
        Membership::RemovePatient,
    )
    .await
}

/// Puts a person (their identity-provider subject) on a care team (admins); idempotent.
#[utoipa::path(put, path = "/v1/care-teams/{team_id}/members/{subject}", tag = "registry",
    params(("team_id" = String, Path, description = "The care team"), ("subject" = String, Path, description = "The person's `sub`")),
    responses(
        (status = 200, description = "The team after the change", body = CareTeam),
        (status = 400, description = "A malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such team", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn add_member(
    State(state): State<AppState>,
    access: Access,
    Path((team_id, subject)): Path<(String, String)>,
) -> Result<Json<CareTeam>, ApiError> {
    change_team(state, access, team_id, subject, Membership::AddMember).await
}

/// Takes a person off a care team (admins); idempotent. Their open alert
/// streams stop showing the team's patients within 30 seconds.
#[utoipa::path(delete, path = "/v1/care-teams/{team_id}/members/{subject}", tag = "registry",
    params(("team_id" = String, Path, description = "The care team"), ("subject" = String, Path, description = "The person's `sub`")),
    responses(
        (status = 200, description = "The team after the change", body = CareTeam),
        (status = 400, description = "A malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such team", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn remove_member(
    State(state): State<AppState>,
    access: Access,
    Path((team_id, subject)): Path<(String, String)>,
) -> Result<Json<CareTeam>, ApiError> {
    change_team(state, access, team_id, subject, Membership::RemoveMember).await
}
