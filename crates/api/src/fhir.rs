//! FHIR R4 for EHRs: readings as vital-signs Observations.
//!
//! - `GET /fhir/r4/metadata`: the CapabilityStatement (no token needed).
//! - `GET /fhir/r4/Observation?patient=&code=&date=&_count=`: a searchset
//!   Bundle, oldest first, paged by a `next` link.
//! - `GET /fhir/r4/Observation/{id}`.
//!
//! Codes and units come from the catalogue ([`vitalwatch_core::catalogue`]):
//! LOINC for `code`, UCUM for `valueQuantity`. Blood pressure is the
//! 85354-9 panel with systolic (8480-6) and diastolic (8462-4) components;
//! pulse oximetry carries 59408-5 and 2708-6, as US Core asks. Glucose is a
//! `laboratory` Observation (it is not a FHIR vital sign); supplemental
//! oxygen and consciousness, which only feed NEWS2, are not served.
//!
//! An Observation's id names its reading: `{metric}-{microseconds since
//! 1970}-{16 hex digits of SHA-256 over patient and device}`, so it is
//! stable, at most 64 characters of FHIR's id alphabet, and reveals neither
//! patient nor device.
//!
//! Access is as for the rest of the API (nurses and clinicians, their care
//! teams' patients, every attempt audited); errors are OperationOutcomes.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, NaiveDate, SecondsFormat, Utc};
use serde_json::{Value, json};
use vitalwatch_core::catalogue::{DIASTOLIC, LOINC_DIASTOLIC, LOINC_SYSTOLIC, Metric, SYSTOLIC};
use vitalwatch_store::StoreError;

use crate::AppState;
use crate::audit::{self, Outcome};
use crate::auth::{Access, Caller, carer, check_patient_id, checked, refused, require_patient};
use crate::error::ApiError;

const FHIR_JSON: &str = "application/fhir+json";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";
const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
/// Most Observations per page.
const MAX_COUNT: i64 = 1000;

/// A FHIR answer: the resource as `application/fhir+json`.
#[derive(Debug)]
pub struct Fhir(pub Value);

impl IntoResponse for Fhir {
    fn into_response(self) -> Response {
        let mut resp = Json(self.0).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        resp
    }
}

/// A FHIR error: the status of the API's error, with an OperationOutcome.
#[derive(Debug)]
pub struct FhirError(pub ApiError);

impl From<ApiError> for FhirError {
    fn from(e: ApiError) -> Self {
        FhirError(e)
    }
}

impl From<StoreError> for FhirError {
    fn from(e: StoreError) -> Self {
        FhirError(e.into())
    }
}

impl From<vitalwatch_store::PoolError> for FhirError {
    fn from(e: vitalwatch_store::PoolError) -> Self {
        FhirError(e.into())
    }
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        // The status and headers (WWW-Authenticate) as the API gives them;
        // the body as FHIR expects it.
        let code = match &self.0 {
            ApiError::BadRequest(_) | ApiError::TooLarge(_) => "invalid",
            ApiError::MethodNotAllowed(_) => "not-supported",
            ApiError::Unauthorized(_) => "login",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Internal(_) | ApiError::Unavailable(_) => "exception",
        };
        let diagnostics = self.0.to_string();
        let mut resp = self.0.into_response();
        let body = json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
        });
        let headers = std::mem::take(resp.headers_mut());
        let mut out = (resp.status(), Json(body)).into_response();
        *out.headers_mut() = headers;
        out.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        out.headers_mut().remove(header::CONTENT_LENGTH);
        out
    }
}

/// What the FHIR facade serves of a metric: a short id token, the category,
/// the vital-signs profile, and the unit's human-readable name.
struct Served {
    metric: Metric,
    token: &'static str,
    category: &'static str,
    profile: Option<&'static str>,
    unit_display: &'static str,
}

const SERVED: &[Served] = &[
    Served {
        metric: Metric::HeartRate,
        token: "hr",
        category: "vital-signs",
        profile: Some("http://hl7.org/fhir/StructureDefinition/heartrate"),
        unit_display: "beats/minute",
    },
    Served {
        metric: Metric::Spo2,
        token: "spo2",
        category: "vital-signs",
        profile: Some("http://hl7.org/fhir/StructureDefinition/oxygensat"),
        unit_display: "%",
    },
    Served {
        metric: Metric::BloodPressure,
        token: "bp",
        category: "vital-signs",
        profile: Some("http://hl7.org/fhir/StructureDefinition/bp"),
        unit_display: "mmHg",
    },
    Served {
        metric: Metric::RespiratoryRate,
        token: "rr",
        category: "vital-signs",
        profile: Some("http://hl7.org/fhir/StructureDefinition/resprate"),
        unit_display: "breaths/minute",
    },
    Served {
        metric: Metric::BodyTemperature,
        token: "temp",
        category: "vital-signs",
        profile: Some("http://hl7.org/fhir/StructureDefinition/bodytemp"),
        unit_display: "C",
    },
    Served {
        metric: Metric::BodyWeight,
        token: "wt",
        category: "vital-signs",
        profile: Some("http://hl7.org/fhir/StructureDefinition/bodyweight"),
        unit_display: "kg",
    },
    Served {
        metric: Metric::BloodGlucose,
        token: "glu",
        category: "laboratory",
        profile: None,
        unit_display: "mg/dL",
    },
];

fn served(m: Metric) -> Option<&'static Served> {
    SERVED.iter().find(|s| s.metric == m)
}

/// LOINC displays of the codes the catalogue names beyond a metric's first.
fn code_display(code: &str, metric: Metric) -> &'static str {
    match code {
        "2708-6" => "Oxygen saturation in Arterial blood",
        LOINC_SYSTOLIC => "Systolic blood pressure",
        LOINC_DIASTOLIC => "Diastolic blood pressure",
        _ => metric.info().display,
    }
}

/// FHIR's id alphabet and length.
fn is_fhir_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn owner_hash(patient_id: &str, device_id: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(patient_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(device_id.as_bytes());
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The id of the Observation of one reading.
pub fn observation_id(
    metric: Metric,
    time: DateTime<Utc>,
    patient_id: &str,
    device_id: &str,
) -> Option<String> {
    let s = served(metric)?;
    Some(format!(
        "{}-{}-{}",
        s.token,
        time.timestamp_micros(),
        owner_hash(patient_id, device_id)
    ))
}

/// An Observation id back: (metric, time, owner hash).
fn parse_id(id: &str) -> Option<(Metric, DateTime<Utc>, &str)> {
    let (token, rest) = id.split_once('-')?;
    let (micros, hash) = rest.rsplit_once('-')?;
    let s = SERVED.iter().find(|s| s.token == token)?;
    let t = DateTime::from_timestamp_micros(micros.parse().ok()?)
        .filter(|t| (1970..=9999).contains(&chrono::Datelike::year(t)))?;
    (hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit())).then_some((s.metric, t, hash))
}

/// One reading as the store has it, components together.
struct Row {
    patient_id: String,
    device_id: String,
    metric: Metric,
    time: DateTime<Utc>,
    received_at: DateTime<Utc>,
    quality: i16,
    /// `("", v)` for scalars; systolic and diastolic for blood pressure.
    values: Vec<(String, f64)>,
}

fn quantity(value: f64, metric: Metric, s: &Served) -> Value {
    json!({"value": value, "unit": s.unit_display, "system": UCUM, "code": metric.info().unit})
}

fn coding(code: &str, metric: Metric) -> Value {
    json!({"system": LOINC, "code": code, "display": code_display(code, metric)})
}

fn subject(patient_id: &str) -> Value {
    if is_fhir_id(patient_id) {
        json!({"reference": format!("Patient/{patient_id}")})
    } else {
        json!({"identifier": {"system": "urn:vitalwatch:patient", "value": patient_id}})
    }
}

fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A reading as a FHIR R4 Observation.
fn observation(r: &Row) -> Option<Value> {
    let s = served(r.metric)?;
    let info = r.metric.info();
    let mut profiles = Vec::new();
    if let Some(p) = s.profile {
        profiles.push("http://hl7.org/fhir/StructureDefinition/vitalsigns");
        profiles.push(p);
    }
    let category_display = if s.category == "vital-signs" {
        "Vital Signs"
    } else {
        "Laboratory"
    };
    let mut o = json!({
        "resourceType": "Observation",
        "id": observation_id(r.metric, r.time, &r.patient_id, &r.device_id)?,
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": s.category, "display": category_display}],
                      "text": category_display}],
        "code": {"coding": info.loinc.iter().map(|c| coding(c, r.metric)).collect::<Vec<_>>(),
                 "text": info.display},
        "subject": subject(&r.patient_id),
        "effectiveDateTime": instant(r.time),
        "issued": instant(r.received_at),
        "device": {"identifier": {"system": "urn:vitalwatch:device", "value": r.device_id},
                   "display": r.device_id},
    });
    if !profiles.is_empty() {
        o["meta"] = json!({"profile": profiles});
    }
    if r.metric == Metric::BloodPressure {
        let component = |name: &str, code: &str| {
            r.values
                .iter()
                .find(|(c, _)| c == name)
                .map(|(_, v)| json!({"code": {"coding": [coding(code, r.metric)], "text": code_display(code, r.metric)},
                                     "valueQuantity": quantity(*v, r.metric, s)}))
        };
        let parts: Vec<Value> = [
            component(SYSTOLIC, LOINC_SYSTOLIC),
            component(DIASTOLIC, LOINC_DIASTOLIC),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            return None; // a panel without values is no Observation
        }
        o["component"] = Value::Array(parts);
    } else {
        o["valueQuantity"] = quantity(r.values.first()?.1, r.metric, s);
    }
    let notes: Vec<Value> = [
        (1, "motion artifact"),
        (2, "low perfusion"),
        (4, "cuff error"),
    ]
    .iter()
    .filter(|(bit, _)| r.quality & bit != 0)
    .map(|(_, t)| json!({"text": format!("Device reported {t}")}))
    .collect();
    if !notes.is_empty() {
        o["note"] = Value::Array(notes);
    }
    Some(o)
}

/// Groups rows (ordered by time, metric, device, component) into readings.
fn group(rows: &[vitalwatch_store::tokio_postgres::Row]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for r in rows {
        let metric: String = r.get("metric");
        let Ok(metric) = metric.parse::<Metric>() else {
            continue;
        };
        let (patient_id, device_id, time): (String, String, DateTime<Utc>) =
            (r.get("patient_id"), r.get("device_id"), r.get("time"));
        let value = (r.get::<_, String>("component"), r.get::<_, f64>("value"));
        match out.last_mut() {
            Some(last)
                if last.time == time
                    && last.metric == metric
                    && last.device_id == device_id
                    && last.patient_id == patient_id =>
            {
                last.values.push(value);
            }
            _ => out.push(Row {
                patient_id,
                device_id,
                metric,
                time,
                received_at: r.get("received_at"),
                quality: r.get("quality"),
                values: vec![value],
            }),
        }
    }
    out
}

/// The base URL resources are named under (`fullUrl`, links): configured,
/// or from the request's Host.
fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(b) = &state.public_url {
        return format!("{}/fhir/r4", b.trim_end_matches('/'));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .unwrap_or("localhost");
    let scheme = if state.https { "https" } else { "http" };
    format!("{scheme}://{host}/fhir/r4")
}

/// The server's CapabilityStatement: Observation read and search.
#[utoipa::path(get, path = "/fhir/r4/metadata", tag = "fhir", security(()),
    responses((status = 200, description = "A FHIR R4 CapabilityStatement", body = Object, content_type = "application/fhir+json")))]
pub async fn metadata(State(state): State<AppState>, headers: HeaderMap) -> Fhir {
    let base = base_url(&state, &headers);
    let profiles: Vec<&str> = SERVED.iter().filter_map(|s| s.profile).collect();
    Fhir(json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(Utc::now()),
        "publisher": "vitalwatch",
        "kind": "instance",
        "software": {"name": "vitalwatch", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "vitalwatch remote patient monitoring: readings as Observations", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "OAuth", "display": "OAuth"}]}],
                "description": "Bearer tokens (OIDC JWT) of nurses and clinicians; a patient off the caller's care teams is not found."
            },
            "resource": [{
                "type": "Observation",
                "profile": "http://hl7.org/fhir/StructureDefinition/Observation",
                "supportedProfile": profiles,
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [
                    {"name": "patient", "type": "reference", "documentation": "Required: Patient/{id} or {id}"},
                    {"name": "code", "type": "token", "documentation": "LOINC codes, comma-separated, [http://loinc.org|]code"},
                    {"name": "date", "type": "date", "documentation": "Repeatable, with prefixes eq, ge, gt, le, lt"},
                    {"name": "_count", "type": "number", "documentation": "1 to 1000; default 50"}
                ]
            }]
        }]
    }))
}

/// A bound on `date`: `(from inclusive, to exclusive)`.
type Window = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Narrows `w` by one `date` parameter (`ge2026-11-01`, `lt2026-11-30T12:00:00Z`).
fn narrow(w: Window, param: &str) -> Result<Window, String> {
    let (prefix, value) = match param.get(..2) {
        Some(p @ ("eq" | "ge" | "gt" | "le" | "lt")) => (p, &param[2..]),
        Some("ne" | "sa" | "eb" | "ap") => {
            return Err(format!(
                "date prefix {:?} is not supported (eq, ge, gt, le, lt are)",
                &param[..2]
            ));
        }
        _ => ("eq", param),
    };
    // A value is the range its precision implies (FHIR R4 search): a day
    // is the whole UTC day, `08:00:00Z` the whole second, `08:00:00.5Z`
    // the tenth of a second.
    let unparsable = || {
        format!(
            "date {value:?} is not YYYY-MM-DD or an RFC 3339 instant with a time zone, in the years 1970 to 9999"
        )
    };
    let digits = |r: std::ops::Range<usize>| {
        value
            .get(r)
            .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
    };
    if !(digits(0..4) && value.get(4..5) == Some("-")) {
        return Err(unparsable());
    }
    let (start, width) = if value.len() == 10 {
        let d = NaiveDate::parse_from_str(value, "%Y-%m-%d").map_err(|_| unparsable())?;
        let s = d
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc())
            .ok_or_else(unparsable)?;
        (s, Duration::days(1))
    } else {
        let t = DateTime::parse_from_rfc3339(value)
            .map_err(|_| unparsable())?
            .with_timezone(&Utc);
        let fraction = value
            .get(19..)
            .and_then(|rest| rest.strip_prefix('.'))
            .map_or(0, |f| f.bytes().take_while(u8::is_ascii_digit).count());
        let width =
            Duration::microseconds(10_i64.pow(6_u32.saturating_sub(fraction.min(6) as u32)));
        (t, width)
    };
    if !(1970..=9999).contains(&chrono::Datelike::year(&start)) {
        return Err(unparsable());
    }
    let end = start.checked_add_signed(width).ok_or_else(unparsable)?;
    let (mut from, mut to) = w;
    let later = |a: Option<DateTime<Utc>>, b| Some(a.map_or(b, |a: DateTime<Utc>| a.max(b)));
    let earlier = |a: Option<DateTime<Utc>>, b| Some(a.map_or(b, |a: DateTime<Utc>| a.min(b)));
    match prefix {
        "eq" => {
            from = later(from, start);
            to = earlier(to, end);
        }
        "ge" => from = later(from, start),
        "gt" => from = later(from, end),
        "le" => to = earlier(to, end),
        _ => to = earlier(to, start), // lt
    }
    Ok((from, to))
}

/// A checked search.
struct Search {
    patient_id: String,
    metrics: Vec<Metric>,
    window: Window,
    count: i64,
    /// After this reading: (time, metric, device).
    cursor: Option<(DateTime<Utc>, String, String)>,
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn parse_search(pairs: &[(String, String)]) -> Result<Search, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let (mut patient, mut metrics, mut window, mut count, mut cursor) =
        (None, Vec::new(), (None, None), 50, None);
    for (k, v) in pairs {
        match k.as_str() {
            "patient" | "subject" => {
                let id = v.strip_prefix("Patient/").unwrap_or(v);
                check_patient_id(id)?;
                if patient.replace(id.to_owned()).is_some() {
                    return Err(bad("give patient once".into()));
                }
            }
            "code" => {
                for token in v.split(',') {
                    let code = match token.split_once('|') {
                        Some((LOINC, c)) => c,
                        Some((system, _)) => {
                            return Err(bad(format!(
                                "code system {system:?} is not LOINC ({LOINC})"
                            )));
                        }
                        None => token,
                    };
                    let m = SERVED
                        .iter()
                        .map(|s| s.metric)
                        .find(|m| {
                            m.info().loinc.contains(&code)
                                || (*m == Metric::BloodPressure && [LOINC_SYSTOLIC, LOINC_DIASTOLIC].contains(&code))
                        })
                        .ok_or_else(|| bad(format!("code {code:?} is not one this server records (see /fhir/r4/metadata)")))?;
                    if !metrics.contains(&m) {
                        metrics.push(m);
                    }
                }
            }
            "date" => window = narrow(window, v).map_err(bad)?,
            "_count" => {
                count = v
                    .parse()
                    .map_err(|_| bad(format!("_count {v:?} is not a number")))?;
                if !(1..=MAX_COUNT).contains(&count) {
                    return Err(bad(format!("_count is 1 to {MAX_COUNT}")));
                }
            }
            "_cursor" => {
                let parse = || {
                    let mut it = v.splitn(3, '.');
                    let t = DateTime::from_timestamp_micros(it.next()?.parse().ok()?)
                        .filter(|t| (1970..=9999).contains(&chrono::Datelike::year(t)))?;
                    let m = it.next()?.to_owned();
                    let d = unhex(it.next()?)?;
                    Some((t, m, d))
                };
                cursor =
                    Some(parse().ok_or_else(|| bad("_cursor must come from a next link".into()))?);
            }
            "_format" if v == "json" || v.contains("fhir+json") || v == "application/json" => {}
            other => {
                return Err(bad(format!(
                    "search parameter {other:?} is not supported (see /fhir/r4/metadata)"
                )));
            }
        }
    }
    let patient_id =
        patient.ok_or_else(|| bad("patient is required: Observation?patient={id}".into()))?;
    if let (Some(f), Some(t)) = window
        && f >= t
    {
        return Err(bad(
            "the date range is empty: the lower bound is not before the upper".into(),
        ));
    }
    if metrics.is_empty() {
        metrics = SERVED.iter().map(|s| s.metric).collect();
    }
    Ok(Search {
        patient_id,
        metrics,
        window,
        count,
        cursor,
    })
}

/// A query's `key=value` pairs, percent-decoded; a malformed escape or
/// bytes that are not UTF-8 are refused (400), not guessed at.
fn query_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest("a malformed percent-escape in the query".into())
                    })?;
                out.push(h);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::BadRequest("the query is not UTF-8".into()))
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const ROW_COLUMNS: &str =
    "patient_id, device_id, metric, component, time, value, received_at, quality";

/// Observations of one patient: a searchset Bundle, oldest first.
#[utoipa::path(get, path = "/fhir/r4/Observation", tag = "fhir",
    params(
        ("patient" = String, Query, description = "Required: `Patient/{id}` or `{id}`"),
        ("code" = Option<String>, Query, description = "LOINC codes, comma-separated, `[http://loinc.org|]code`"),
        ("date" = Option<String>, Query, description = "Repeatable: `[eq|ge|gt|le|lt]` and `YYYY-MM-DD` or an RFC 3339 instant"),
        ("_count" = Option<i64>, Query, description = "Observations per page, 1 to 1000; default 50"),
        ("_cursor" = Option<String>, Query, description = "From a `next` link"),
    ),
    responses(
        (status = 200, description = "A searchset Bundle", body = Object, content_type = "application/fhir+json"),
        (status = 400, description = "A malformed search: OperationOutcome", body = Object, content_type = "application/fhir+json"),
        (status = 401, description = "No valid bearer token: OperationOutcome", body = Object, content_type = "application/fhir+json"),
        (status = 403, description = "Not a nurse or clinician: OperationOutcome", body = Object, content_type = "application/fhir+json"),
        (status = 404, description = "Not a patient of the caller's care teams: OperationOutcome", body = Object, content_type = "application/fhir+json"),
    ))]
pub async fn search(
    State(state): State<AppState>,
    access: Access,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Fhir, FhirError> {
    const ACTION: &str = "fhir.observation.search";
    // Decoded once: for the audit's patient, the search, and the links.
    let pairs = query_pairs(raw.as_deref().unwrap_or_default());
    let patient = pairs.as_ref().ok().and_then(|pairs| {
        pairs
            .iter()
            .find(|(k, _)| k == "patient" || k == "subject")
            .map(|(_, v)| v.strip_prefix("Patient/").unwrap_or(v).to_owned())
    });
    let access = match &patient {
        Some(p) => access.about(p),
        None => access,
    };
    let caller = carer(&state, &access, ACTION).await?;
    let (pairs, s) = checked(
        &state,
        &access,
        ACTION,
        pairs.and_then(|p| parse_search(&p).map(|s| (p, s))),
    )
    .await?;
    let client = state.pool.get().await?;
    require_patient(&**client, &access, &caller, ACTION, &s.patient_id).await?;
    let names: Vec<&str> = s.metrics.iter().map(|m| m.name()).collect();
    let (after_t, after_m, after_d) = match &s.cursor {
        Some((t, m, d)) => (Some(*t), Some(m.clone()), Some(d.clone())),
        None => (None, None, None),
    };
    let rows = client
        .query(
            &format!(
                "SELECT {ROW_COLUMNS} FROM readings
                  WHERE patient_id = $1 AND metric = ANY($2)
                    AND ($3::timestamptz IS NULL OR time >= $3) AND ($4::timestamptz IS NULL OR time < $4)
                    AND ($5::timestamptz IS NULL OR (time, metric, device_id) > ($5, $6, $7))
                  ORDER BY time, metric, device_id, component
                  LIMIT $8"
            ),
            &[&s.patient_id, &names, &s.window.0, &s.window.1, &after_t, &after_m, &after_d, &((s.count + 1) * 2)],
        )
        .await
        .map_err(StoreError::from)?;
    let mut readings = group(&rows);
    // A panel cut by the row limit is left for the next page.
    let more = readings.len() as i64 > s.count;
    readings.truncate(s.count as usize);
    let base = base_url(&state, &headers);
    let query_without_cursor: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    let self_url = format!("{base}/Observation?{}", raw.as_deref().unwrap_or_default());
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if more && let Some(last) = readings.last() {
        let cursor = format!(
            "{}.{}.{}",
            last.time.timestamp_micros(),
            last.metric.name(),
            hex(&last.device_id)
        );
        let mut q = query_without_cursor.clone();
        q.push(format!("_cursor={cursor}"));
        links.push(
            json!({"relation": "next", "url": format!("{base}/Observation?{}", q.join("&"))}),
        );
    }
    let entries: Vec<Value> = readings
        .iter()
        .filter_map(observation)
        .map(|o| {
            json!({"fullUrl": format!("{base}/Observation/{}", o["id"].as_str().unwrap_or_default()),
                   "resource": o, "search": {"mode": "match"}})
        })
        .collect();
    let detail = format!("{} observations", entries.len());
    audit::record(
        &**client,
        &access,
        ACTION,
        Some(&s.patient_id),
        Outcome::Allowed,
        Some(&detail),
    )
    .await?;
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": instant(Utc::now()),
        "link": links,
    });
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries); // FHIR JSON has no empty arrays
    }
    Ok(Fhir(bundle))
}

/// One Observation by id.
#[utoipa::path(get, path = "/fhir/r4/Observation/{id}", tag = "fhir",
    params(("id" = String, Path, description = "An Observation id from a search")),
    responses(
        (status = 200, description = "The Observation", body = Object, content_type = "application/fhir+json"),
        (status = 400, description = "Not an Observation id of this server: OperationOutcome", body = Object, content_type = "application/fhir+json"),
        (status = 401, description = "No valid bearer token: OperationOutcome", body = Object, content_type = "application/fhir+json"),
        (status = 403, description = "Not a nurse or clinician: OperationOutcome", body = Object, content_type = "application/fhir+json"),
        (status = 404, description = "No such Observation among the caller's patients': OperationOutcome", body = Object, content_type = "application/fhir+json"),
    ))]
pub async fn read(
    State(state): State<AppState>,
    access: Access,
    Path(id): Path<String>,
) -> Result<Fhir, FhirError> {
    const ACTION: &str = "fhir.observation.read";
    let caller: Caller = carer(&state, &access, ACTION).await?;
    let Some((metric, time, hash)) = parse_id(&id) else {
        let e = ApiError::BadRequest(format!("{id:?} is not an Observation id of this server"));
        return Err(refused(&state, &access, ACTION, e).await.into());
    };
    let client = state.pool.get().await?;
    // Only the caller's patients are looked at: another team's reading is
    // not found, like one that does not exist.
    let patients = caller.patients(&**client).await?;
    let rows = client
        .query(
            &format!(
                "SELECT {ROW_COLUMNS} FROM readings
                  WHERE patient_id = ANY($1) AND metric = $2 AND time = $3
                  ORDER BY patient_id, device_id, component"
            ),
            &[&patients, &metric.name(), &time],
        )
        .await
        .map_err(StoreError::from)?;
    let found = group(&rows)
        .into_iter()
        .find(|r| owner_hash(&r.patient_id, &r.device_id) == hash);
    let Some(reading) = found else {
        audit::record(
            &**client,
            &access,
            ACTION,
            None,
            Outcome::Failed,
            Some("no such observation among the caller's patients"),
        )
        .await?;
        return Err(ApiError::NotFound(format!("no Observation {id} among your patients'")).into());
    };
    audit::record(
        &**client,
        &access,
        ACTION,
        Some(&reading.patient_id),
        Outcome::Allowed,
        None,
    )
    .await?;
    let o = observation(&reading)
        .ok_or_else(|| ApiError::Internal("a served metric has no Observation".into()))?;
    Ok(Fhir(o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn observation_ids_round_trip_and_fit_fhir() {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 30, 8, 15, 0)
            .single()
            .unwrap_or_default()
            + Duration::microseconds(123_456);
        for s in SERVED {
            let id = observation_id(s.metric, t, "MRN/0042 with spaces", "cuff-7").expect("served");
            assert!(is_fhir_id(&id), "{id}");
            let (m, back, hash) = parse_id(&id).expect("parses");
            assert_eq!(
                (m, back, hash),
                (
                    s.metric,
                    t,
                    owner_hash("MRN/0042 with spaces", "cuff-7").as_str()
                )
            );
        }
        assert_ne!(
            owner_hash("a", "bc"),
            owner_hash("ab", "c"),
            "the separator keeps owners apart"
        );
        for bad in [
            "",
            "hr",
            "hr-1",
            "xx-1-0123456789abcdef",
            "hr-x-0123456789abcdef",
            "hr-1-0123",
        ] {
            assert!(parse_id(bad).is_none(), "{bad:?}");
        }
        assert!(
            observation_id(Metric::Consciousness, t, "p", "d").is_none(),
            "not served"
        );
    }

    #[test]
    fn date_parameters_narrow_the_window() {
        let day = |d: u32| Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).single();
        let w = narrow((None, None), "ge2026-11-01").and_then(|w| narrow(w, "le2026-11-30"));
        assert_eq!(
            w,
            Ok((
                day(1),
                Some(
                    Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
                        .single()
                        .unwrap_or_default()
                )
            ))
        );
        assert_eq!(narrow((None, None), "2026-11-05"), Ok((day(5), day(6))));
        assert_eq!(narrow((None, None), "gt2026-11-05"), Ok((day(6), None)));
        assert_eq!(narrow((None, None), "lt2026-11-05"), Ok((None, day(5))));
        let t = "2026-11-05T10:00:00+01:00";
        let at = Utc.with_ymd_and_hms(2026, 11, 5, 9, 0, 0).single();
        assert_eq!(narrow((None, None), &format!("ge{t}")), Ok((at, None)));
        for bad in [
            "ne2026-11-01",
            "ge2026-13-01",
            "ge2026-11-05T10:00:00",
            "yesterday",
        ] {
            assert!(narrow((None, None), bad).is_err(), "{bad}");
        }
    }

    fn search_of(raw: Option<&str>) -> Result<Search, ApiError> {
        query_pairs(raw.unwrap_or_default()).and_then(|p| parse_search(&p))
    }

    #[test]
    fn searches_are_checked() {
        let ok = search_of(Some(
            "patient=Patient%2Fp-1&code=http%3A%2F%2Floinc.org%7C8480-6,59408-5&_count=10",
        ))
        .map_err(|e| e.to_string());
        let s = ok.expect("valid");
        assert_eq!(
            (s.patient_id.as_str(), s.metrics.as_slice(), s.count),
            ("p-1", [Metric::BloodPressure, Metric::Spo2].as_slice(), 10)
        );
        for (bad, why) in [
            ("code=8867-4", "patient is required"),
            ("patient=p&code=1234-5", "not one this server records"),
            ("patient=p&code=http://snomed.info/sct|123", "not LOINC"),
            ("patient=p&_count=0", "_count"),
            ("patient=p&_count=5000", "_count"),
            ("patient=p&date=ge2026-11-30&date=le2026-11-01", "empty"),
            ("patient=p&status=final", "not supported"),
            ("patient=p&_cursor=zzz", "_cursor"),
            ("patient=p&patient=q", "once"),
        ] {
            let e = search_of(Some(bad))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(why), "{bad}: {e:?}");
        }
    }
}
