//! `GET /v1/patients/{patient_id}/vitals`: bucketed trends of one metric,
//! for the nurses and clinicians of the patient's care team (bearer token;
//! another team's patient answers 404), every attempt audited.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use vitalwatch_core::catalogue::Metric;
use vitalwatch_store::trends::{self, Bucket};

use crate::AppState;
use crate::audit::{self, Outcome};
use crate::auth::{Access, carer, check_patient_id, checked, refused, require_patient};
use crate::error::{ApiError, Problem};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VitalsQuery {
    /// A catalogue metric name (`heart_rate`, `blood_pressure`, …).
    pub metric: String,
    /// Start, inclusive (RFC 3339). Default: 24 hours before `to`.
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (RFC 3339). Default: now.
    pub to: Option<DateTime<Utc>>,
    /// Bucket width: `1m` to `1d` (`30m`, `1h`, `90s` is refused). Default `1h`.
    pub bucket: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Series {
    /// `systolic` or `diastolic` for blood pressure, absent for scalars.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    pub points: Vec<Bucket>,
}

/// Bucketed trends of one metric.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VitalsResponse {
    pub patient_id: String,
    pub metric: &'static str,
    pub unit: &'static str,
    pub bucket: String,
    pub bucket_seconds: i64,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub series: Vec<Series>,
}

/// A checked trend request: metric, bucket as asked, its seconds, from, to.
type Checked = (Metric, String, i64, DateTime<Utc>, DateTime<Utc>);

fn check_request(
    state: &AppState,
    patient_id: &str,
    query: Result<Query<VitalsQuery>, QueryRejection>,
) -> Result<Checked, ApiError> {
    check_patient_id(patient_id)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let metric: Metric =
        q.metric
            .parse()
            .map_err(|e: vitalwatch_core::catalogue::UnknownMetric| {
                ApiError::BadRequest(e.to_string())
            })?;
    let bucket = q.bucket.unwrap_or_else(|| "1h".into());
    let bucket_seconds = parse_bucket(&bucket).map_err(ApiError::BadRequest)?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = match q.from {
        Some(f) => f,
        None => to
            .checked_sub_signed(Duration::hours(24))
            .ok_or_else(|| ApiError::BadRequest("to is out of range".into()))?,
    };
    for (name, t) in [("from", from), ("to", to)] {
        if !(1970..=9999).contains(&chrono::Datelike::year(&t)) {
            return Err(ApiError::BadRequest(format!(
                "{name} must be between the years 1970 and 9999"
            )));
        }
    }
    if from >= to {
        return Err(ApiError::BadRequest("from must be before to".into()));
    }
    let span = (to - from).num_seconds();
    if span / bucket_seconds > state.max_buckets {
        return Err(ApiError::BadRequest(format!(
            "{} buckets requested; at most {} per request: widen the bucket or narrow the range",
            span / bucket_seconds,
            state.max_buckets
        )));
    }
    Ok((metric, bucket, bucket_seconds, from, to))
}

/// Parses `15m`, `1h`, `1d` into seconds; whole minutes from 1 minute to 1 day.
pub fn parse_bucket(s: &str) -> Result<i64, String> {
    let err = || {
        format!("bucket {s:?} must be a whole number of minutes from 1m to 1d, like 5m, 1h or 1d")
    };
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?);
    let n: i64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(err)?;
    if (60..=86_400).contains(&secs) {
        Ok(secs)
    } else {
        Err(err())
    }
}

/// Bucketed min, max, average and count of one metric (each
/// blood-pressure component a series of its own), from the continuous
/// aggregates where they fit.
#[utoipa::path(get, path = "/v1/patients/{patient_id}/vitals", tag = "vitals",
    params(("patient_id" = String, Path, description = "The patient"), VitalsQuery),
    responses(
        (status = 200, description = "The trend", body = VitalsResponse),
        (status = 400, description = "A malformed or too large request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a patient of the caller's care teams", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_vitals(
    State(state): State<AppState>,
    access: Access,
    Path(patient_id): Path<String>,
    query: Result<Query<VitalsQuery>, QueryRejection>,
) -> Result<Json<VitalsResponse>, ApiError> {
    const ACTION: &str = "vitals.read";
    let access = access.about(&patient_id);
    let caller = carer(&state, &access, ACTION).await?;
    let request = checked(
        &state,
        &access,
        ACTION,
        check_request(&state, &patient_id, query),
    )
    .await?;
    let (metric, bucket, bucket_seconds, from, to) = request;
    let client = state.pool.get().await?;
    require_patient(&**client, &access, &caller, ACTION, &patient_id).await?;
    let layout = state.layout(&client).await?;
    let rows = trends::buckets(
        &client,
        layout,
        &patient_id,
        metric.name(),
        from,
        to,
        bucket_seconds,
    )
    .await?;
    let mut series: Vec<Series> = Vec::new();
    for b in rows {
        let component = (!b.component.is_empty()).then(|| b.component.clone());
        match series.last_mut() {
            Some(s) if s.component == component => s.points.push(b),
            _ => series.push(Series {
                component,
                points: vec![b],
            }),
        }
    }
    audit::record(
        &**client,
        &access,
        ACTION,
        Some(&patient_id),
        Outcome::Allowed,
        Some(metric.name()),
    )
    .await?;
    Ok(Json(VitalsResponse {
        patient_id,
        metric: metric.name(),
        unit: metric.info().unit,
        bucket,
        bucket_seconds,
        from,
        to,
        series,
    }))
}

/// One metric's newest reading.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LatestReading {
    pub metric: String,
    /// `systolic` or `diastolic` for blood pressure, absent for scalars.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    pub time: DateTime<Utc>,
    pub value: f64,
    pub unit: String,
    pub device_id: String,
    /// Signal-quality flags (`motion_artifact`, `low_perfusion`, `cuff_error`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub flags: Vec<String>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LatestResponse {
    pub patient_id: String,
    /// Every metric the patient has a reading of, in catalogue order.
    pub latest: Vec<LatestReading>,
}

/// The newest reading of every metric (each blood-pressure component).
#[utoipa::path(get, path = "/v1/patients/{patient_id}/latest", tag = "vitals",
    params(("patient_id" = String, Path, description = "The patient")),
    responses(
        (status = 200, description = "The newest readings", body = LatestResponse),
        (status = 400, description = "A malformed patient id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a patient of the caller's care teams", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_latest(
    State(state): State<AppState>,
    access: Access,
    Path(patient_id): Path<String>,
) -> Result<Json<LatestResponse>, ApiError> {
    const ACTION: &str = "vitals.latest";
    let access = access.about(&patient_id);
    let caller = carer(&state, &access, ACTION).await?;
    checked(&state, &access, ACTION, check_patient_id(&patient_id)).await?;
    let client = state.pool.get().await?;
    require_patient(&**client, &access, &caller, ACTION, &patient_id).await?;
    let mut metrics = Vec::new();
    let mut components = Vec::new();
    for m in Metric::all() {
        if m == Metric::BloodPressure {
            for c in ["systolic", "diastolic"] {
                metrics.push(m.name());
                components.push(c);
            }
        } else {
            metrics.push(m.name());
            components.push("");
        }
    }
    // One index probe per metric (newest first on the identity key).
    let rows = client
        .query(
            "SELECT k.metric, k.component, r.time, r.value, r.unit, r.device_id, r.quality
               FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS k(metric, component, n)
               CROSS JOIN LATERAL (
                     SELECT time, value, unit, device_id, quality FROM readings
                      WHERE patient_id = $1 AND metric = k.metric AND component = k.component
                      ORDER BY time DESC LIMIT 1) r
              ORDER BY k.n",
            &[&patient_id, &metrics, &components],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    let latest = rows
        .iter()
        .map(|r| {
            let component: String = r.get(1);
            let quality: i16 = r.get(6);
            let flags = [
                (1, "motion_artifact"),
                (2, "low_perfusion"),
                (4, "cuff_error"),
            ]
            .iter()
            .filter(|(bit, _)| quality & bit != 0)
            .map(|(_, name)| (*name).to_owned())
            .collect();
            LatestReading {
                metric: r.get(0),
                component: (!component.is_empty()).then_some(component),
                time: r.get(2),
                value: r.get(3),
                unit: r.get(4),
                device_id: r.get(5),
                flags,
            }
        })
        .collect::<Vec<_>>();
    let detail = format!("{} metrics", latest.len());
    audit::record(
        &**client,
        &access,
        ACTION,
        Some(&patient_id),
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    Ok(Json(LatestResponse { patient_id, latest }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DaysQuery {
    /// The period's first day (`YYYY-MM-DD`); default 29 days before `to`.
    pub from: Option<chrono::NaiveDate>,
    /// The period's last day, inclusive (`YYYY-MM-DD`); default today.
    pub to: Option<chrono::NaiveDate>,
    /// The time zone days are counted in (IANA name); default `UTC`.
    pub tz: Option<String>,
}

/// Days with device data in a period, and the RPM device-supply code they
/// support.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct MonitoringDays {
    pub patient_id: String,
    pub from: chrono::NaiveDate,
    pub to: chrono::NaiveDate,
    pub tz: String,
    /// The days with at least one reading, in order.
    pub days: Vec<chrono::NaiveDate>,
    pub count: usize,
    /// `99454` for 16 to 30 days, `99445` for 2 to 15, absent below 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpt: Option<String>,
}

/// The CPT code a count of monitoring days in a 30-day period supports.
pub fn cpt_for(days: usize) -> Option<&'static str> {
    match days {
        16.. => Some("99454"),
        2..=15 => Some("99445"),
        _ => None,
    }
}

/// The days of a period of at most 30 days with device data, and the RPM
/// code the count supports (CPT 99454 at 16 to 30 days, 99445 at 2 to 15).
#[utoipa::path(get, path = "/v1/patients/{patient_id}/monitoring-days", tag = "vitals",
    params(("patient_id" = String, Path, description = "The patient"), DaysQuery),
    responses(
        (status = 200, description = "The days with data", body = MonitoringDays),
        (status = 400, description = "A malformed request, a reversed or longer than 30-day period, an unknown time zone", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a nurse or clinician", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a patient of the caller's care teams", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_monitoring_days(
    State(state): State<AppState>,
    access: Access,
    Path(patient_id): Path<String>,
    query: Result<Query<DaysQuery>, QueryRejection>,
) -> Result<Json<MonitoringDays>, ApiError> {
    const ACTION: &str = "monitoring_days.read";
    let access = access.about(&patient_id);
    let caller = carer(&state, &access, ACTION).await?;
    let request = query
        .map_err(|e| ApiError::BadRequest(e.body_text()))
        .and_then(|Query(q)| {
            check_patient_id(&patient_id)?;
            let to = q.to.unwrap_or_else(|| Utc::now().date_naive());
            let from = q.from.unwrap_or(to - chrono::Days::new(29));
            if from > to {
                return Err(ApiError::BadRequest("from must not be after to".into()));
            }
            if (to - from).num_days() >= 30 {
                return Err(ApiError::BadRequest("a period is at most 30 days".into()));
            }
            let tz = q.tz.unwrap_or_else(|| "UTC".into());
            if tz.is_empty()
                || tz.len() > 64
                || !tz
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_-+".contains(c))
            {
                return Err(ApiError::BadRequest(format!(
                    "tz {tz:?} is not a time zone name"
                )));
            }
            Ok((from, to, tz))
        });
    let (from, to, tz) = checked(&state, &access, ACTION, request).await?;
    let client = state.pool.get().await?;
    let known: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1)",
            &[&tz],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?
        .get(0);
    if !known {
        let e = ApiError::BadRequest(format!("tz {tz:?} is not a known time zone"));
        return Err(refused(&state, &access, ACTION, e).await);
    }
    require_patient(&**client, &access, &caller, ACTION, &patient_id).await?;
    let metrics: Vec<&str> = Metric::all().map(Metric::name).collect();
    // One probe per day (and metric) on the identity index, however many
    // readings a day holds.
    let rows = client
        .query(
            "SELECT d::date FROM generate_series($2::date, $3::date, interval '1 day') AS d
              WHERE EXISTS (SELECT 1 FROM readings r
                             WHERE r.patient_id = $1 AND r.metric = ANY($5)
                               AND r.time >= (d::date)::timestamp AT TIME ZONE $4
                               AND r.time < (d::date + 1)::timestamp AT TIME ZONE $4)
              ORDER BY 1",
            &[&patient_id, &from, &to, &tz, &metrics],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    let days: Vec<chrono::NaiveDate> = rows.iter().map(|r| r.get(0)).collect();
    let count = days.len();
    let cpt = cpt_for(count).map(str::to_owned);
    let detail = format!("{from}..{to} {tz}: {count} days");
    audit::record(
        &**client,
        &access,
        ACTION,
        Some(&patient_id),
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    Ok(Json(MonitoringDays {
        patient_id,
        from,
        to,
        tz,
        days,
        count,
        cpt,
    }))
}

#[cfg(test)]
mod tests {
    use super::cpt_for;

    #[test]
    fn monitoring_day_counts_map_to_the_rpm_codes() {
        let cases = [
            (0, None),
            (1, None),
            (2, Some("99445")),
            (15, Some("99445")),
            (16, Some("99454")),
            (30, Some("99454")),
        ];
        for (days, want) in cases {
            assert_eq!(cpt_for(days), want, "{days} days");
        }
    }

    use super::parse_bucket;

    #[test]
    fn buckets_parse_within_bounds() {
        assert_eq!(parse_bucket("1m"), Ok(60));
        assert_eq!(parse_bucket("15m"), Ok(900));
        assert_eq!(parse_bucket("1h"), Ok(3600));
        assert_eq!(parse_bucket("1d"), Ok(86_400));
        for bad in [
            "",
            "m",
            "0m",
            "30s",
            "2d",
            "1w",
            "-1h",
            "1.5h",
            "99999999999999999999m",
        ] {
            assert!(parse_bucket(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
