//! The access matrix: every route the OpenAPI document lists (which is
//! every route the router serves) × every kind of caller → the right
//! status, an answer that fits the document, and exactly one audit row for
//! each attempt on patient data or the registry.

use axum::http::StatusCode;
use serde_json::{Value, json};
use vitalwatch_test_support as ts;

use crate::util::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    NoToken,
    Expired,
    Forged,
    /// A nurse on the patient's care team.
    Nurse,
    /// A clinician on the patient's care team.
    Clinician,
    /// A nurse on another team.
    OtherNurse,
    Admin,
    DeviceAdmin,
}

const EVERYONE: [Who; 8] = [
    Who::NoToken,
    Who::Expired,
    Who::Forged,
    Who::Nurse,
    Who::Clinician,
    Who::OtherNurse,
    Who::Admin,
    Who::DeviceAdmin,
];

impl Who {
    fn subject(self) -> &'static str {
        match self {
            Who::NoToken | Who::Expired | Who::Forged => "anonymous",
            Who::Nurse => "m-nurse",
            Who::Clinician => "m-clinician",
            Who::OtherNurse => "m-other-nurse",
            Who::Admin => "m-admin",
            Who::DeviceAdmin => "m-device-admin",
        }
    }

    fn bearer(self) -> Option<String> {
        let signed = |sub: &str, role: &str, exp_offset: i64, secret: &str| {
            let claims = json!({"sub": sub, "iss": "vitalwatch-local", "aud": "vitalwatch",
                                "exp": chrono::Utc::now().timestamp() + exp_offset, "roles": [role]});
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .expect("token")
        };
        Some(match self {
            Who::NoToken => return None,
            Who::Expired => signed("m-nurse", "nurse", -600, SECRET),
            Who::Forged => signed(
                "m-nurse",
                "nurse",
                600,
                "not-the-server-secret-but-32-bytes-long",
            ),
            Who::Nurse => signed(self.subject(), "nurse", 600, SECRET),
            Who::Clinician => signed(self.subject(), "clinician", 600, SECRET),
            Who::OtherNurse => signed(self.subject(), "nurse", 600, SECRET),
            Who::Admin => signed(self.subject(), "admin", 600, SECRET),
            Who::DeviceAdmin => signed(self.subject(), "device-admin", 600, SECRET),
        })
    }

    fn authenticated(self) -> bool {
        !matches!(self, Who::NoToken | Who::Expired | Who::Forged)
    }
}

/// Who may use a route, and how a refusal looks.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Anyone, unaudited (health, metrics, the documents).
    Public,
    /// The patient's own care team; another team's nurse gets 404.
    Care,
    /// Nurses and clinicians, scoped by content (the alert stream).
    Carers,
    /// Admins and carers (their own teams).
    Teams,
    /// Admins and the team's own carers; another team's nurse gets 404.
    Panel,
    Admins,
    Devices,
}

fn expected(access: Access, who: Who, ok: u16) -> u16 {
    use Who::*;
    if matches!(access, Access::Public) {
        return ok;
    }
    if !who.authenticated() {
        return 401;
    }
    match (access, who) {
        (Access::Care, Nurse | Clinician) => ok,
        (Access::Care, OtherNurse) => 404,
        (Access::Carers, Nurse | Clinician | OtherNurse) => ok,
        (Access::Teams, Nurse | Clinician | OtherNurse | Admin) => ok,
        (Access::Panel, Nurse | Clinician | Admin) => ok,
        (Access::Panel, OtherNurse) => 404,
        (Access::Admins, Admin) => ok,
        (Access::Devices, Admin | DeviceAdmin) => ok,
        _ => 403,
    }
}

/// What the matrix needs of the database.
struct World {
    cfg: vitalwatch::Config,
    patient: String,
    device: String,
    observation: String,
    n: std::sync::atomic::AtomicU32,
}

impl World {
    fn fresh(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}",
            self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    async fn db(&self) -> vitalwatch_store::tokio_postgres::Client {
        vitalwatch_store::connect(&self.cfg.database.url)
            .await
            .expect("db")
    }

    /// A new open alert of the patient.
    async fn alert(&self) -> String {
        // Alert ids are hexadecimal (a digest, as the engine makes them).
        let id = format!(
            "{:032x}",
            self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let now = chrono::Utc::now();
        vitalwatch_store::alerts::raise(
            &self.db().await,
            &vitalwatch_store::alerts::NewAlert {
                alert_id: &id,
                patient_id: &self.patient,
                rule: &id,
                severity: "medium",
                episode_start: now,
                raised_at: now,
                news2_score: None,
                detail: json!({}),
            },
        )
        .await
        .expect("raise");
        id
    }

    /// A new device assigned to the patient.
    async fn assigned_device(&self) -> String {
        let id = self.fresh("dev");
        register(&self.cfg, &id, &self.patient).await;
        id
    }

    /// The route's URI and body for one call (fresh resources where a call
    /// changes them, so every caller meets the same state), its access and
    /// its success status.
    async fn instance(&self, method: &str, template: &str) -> (String, String, Access, u16) {
        let p = &self.patient;
        match (method, template) {
            (
                "GET",
                "/healthz" | "/readyz" | "/metrics" | "/openapi.json" | "/fhir/r4/metadata",
            ) => (template.into(), String::new(), Access::Public, 200),
            ("GET", "/v1/patients/{patient_id}/vitals") => (
                format!("/v1/patients/{p}/vitals?metric=heart_rate"),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/v1/patients/{patient_id}/latest") => (
                format!("/v1/patients/{p}/latest"),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/v1/patients/{patient_id}/monitoring-days") => (
                format!("/v1/patients/{p}/monitoring-days"),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/v1/patients/{patient_id}/thresholds") => (
                format!("/v1/patients/{p}/thresholds"),
                String::new(),
                Access::Care,
                200,
            ),
            ("PUT", "/v1/patients/{patient_id}/thresholds/{rule}") => (
                format!("/v1/patients/{p}/thresholds/spo2_low"),
                r#"{"params": {"level": 88}, "reason": "matrix"}"#.into(),
                Access::Care,
                200,
            ),
            ("DELETE", "/v1/patients/{patient_id}/thresholds/{rule}") => (
                format!("/v1/patients/{p}/thresholds/spo2_low"),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/v1/alerts") => (
                format!("/v1/alerts?patient={p}"),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/v1/alerts/stream") => (
                "/v1/alerts/stream".into(),
                String::new(),
                Access::Carers,
                200,
            ),
            ("GET", "/v1/alerts/{alert_id}") => (
                format!("/v1/alerts/{}", self.alert().await),
                String::new(),
                Access::Care,
                200,
            ),
            ("POST", "/v1/alerts/{alert_id}/acknowledge") => (
                format!("/v1/alerts/{}/acknowledge", self.alert().await),
                r#"{"note": "called the patient"}"#.into(),
                Access::Care,
                200,
            ),
            ("POST", "/v1/alerts/{alert_id}/resolve") => (
                format!("/v1/alerts/{}/resolve", self.alert().await),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/fhir/r4/Observation") => (
                format!("/fhir/r4/Observation?patient={p}"),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/fhir/r4/Observation/{id}") => (
                format!("/fhir/r4/Observation/{}", self.observation),
                String::new(),
                Access::Care,
                200,
            ),
            ("GET", "/v1/audit") => (
                "/v1/audit?limit=5".into(),
                String::new(),
                Access::Admins,
                200,
            ),
            ("POST", "/v1/patients") => (
                "/v1/patients".into(),
                json!({"patient_id": self.fresh("mrn")}).to_string(),
                Access::Admins,
                201,
            ),
            ("POST", "/v1/care-teams") => (
                "/v1/care-teams".into(),
                json!({"team_id": self.fresh("team"), "name": "A team"}).to_string(),
                Access::Admins,
                201,
            ),
            ("GET", "/v1/care-teams") => {
                ("/v1/care-teams".into(), String::new(), Access::Teams, 200)
            }
            ("GET", "/v1/care-teams/{team_id}/patients") => (
                "/v1/care-teams/m-ward/patients".into(),
                String::new(),
                Access::Panel,
                200,
            ),
            ("PUT" | "DELETE", "/v1/care-teams/{team_id}/patients/{patient_id}") => (
                format!("/v1/care-teams/m-spare/patients/{p}"),
                String::new(),
                Access::Admins,
                200,
            ),
            ("PUT" | "DELETE", "/v1/care-teams/{team_id}/members/{subject}") => (
                "/v1/care-teams/m-spare/members/someone".into(),
                String::new(),
                Access::Admins,
                200,
            ),
            ("POST", "/v1/devices") => (
                "/v1/devices".into(),
                json!({"device_id": self.fresh("dev"), "kind": "scale"}).to_string(),
                Access::Devices,
                201,
            ),
            ("GET", "/v1/devices/{device_id}") => (
                format!("/v1/devices/{}", self.device),
                String::new(),
                Access::Devices,
                200,
            ),
            ("PUT", "/v1/devices/{device_id}/assignment") => (
                format!("/v1/devices/{}/assignment", self.device),
                json!({"patient_id": p}).to_string(),
                Access::Devices,
                200,
            ),
            ("DELETE", "/v1/devices/{device_id}/assignment") => (
                format!("/v1/devices/{}/assignment", self.assigned_device().await),
                String::new(),
                Access::Devices,
                200,
            ),
            _ => panic!("the access matrix does not cover {method} {template}: add it"),
        }
    }
}

/// Whether the route names the patient before anything is looked up.
fn patient_in_request(template: &str) -> bool {
    template.starts_with("/v1/patients/{patient_id}/") || template == "/fhir/r4/Observation"
}

/// Calls the router; an event stream's status is taken without reading
/// its endless body.
async fn request(
    app: &axum::Router,
    method: &str,
    uri: &str,
    bearer: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(
            req.body(axum::body::Body::from(body.to_owned()))
                .expect("request"),
        )
        .await
        .expect("response");
    let status = resp.status();
    let streaming = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        return (status, Value::Null);
    }
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn audit_rows(
    c: &vitalwatch_store::tokio_postgres::Client,
) -> Vec<(String, String, Option<String>, String)> {
    c.query(
        "SELECT actor, action, patient_id, outcome FROM audit_log ORDER BY id",
        &[],
    )
    .await
    .expect("audit")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_by_every_kind_of_caller_answers_as_it_should_and_is_audited() {
    let cfg = config().await;
    let patient = ts::unique("pat").replace('_', "-");
    let device = ts::unique("dev");
    register(&cfg, &device, &patient).await;
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.batch_execute(&format!(
        "INSERT INTO care_teams (team_id, name) VALUES ('m-ward', 'Ward'), ('m-other', 'Other'), ('m-spare', 'Spare');
         INSERT INTO care_team_patients (team_id, patient_id) VALUES ('m-ward', '{patient}');
         INSERT INTO care_team_members (team_id, subject) VALUES
             ('m-ward', 'm-nurse'), ('m-ward', 'm-clinician'), ('m-other', 'm-other-nurse');"
    ))
    .await
    .expect("teams");
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-20T08:00:00Z")
        .expect("t")
        .with_timezone(&chrono::Utc);
    let mut rows = vitalwatch_store::readings::Rows::default();
    rows.push(&vitalwatch_core::reading::Batch {
        device_id: device.clone(),
        patient_id: patient.clone(),
        seq: None,
        received_at: chrono::Utc::now(),
        readings: vec![vitalwatch_core::reading::Reading {
            metric: vitalwatch_core::catalogue::Metric::HeartRate,
            measurement: vitalwatch_core::reading::Measurement::Scalar(70.0),
            measured_at: t,
            quality: vitalwatch_core::reading::Quality::default(),
        }],
    });
    let mut w = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let layout = vitalwatch_store::storage::layout(&w).await.expect("layout");
    vitalwatch_store::readings::write(&mut w, layout, &rows)
        .await
        .expect("write");
    let observation = vitalwatch_api::fhir::observation_id(
        vitalwatch_core::catalogue::Metric::HeartRate,
        t,
        &patient,
        &device,
    )
    .expect("served");
    let world = World {
        cfg: cfg.clone(),
        patient: patient.clone(),
        device,
        observation,
        n: std::sync::atomic::AtomicU32::new(0),
    };
    let api = Documented::new(&cfg).await;
    let operations = ts::openapi::operations(&api.doc);
    assert!(operations.len() >= 30, "{operations:?}");

    let mut failures = Vec::new();
    for (method, template) in &operations {
        for who in EVERYONE {
            let (uri, body, access, ok) = world.instance(method, template).await;
            let want = expected(access, who, ok);
            let before = audit_rows(&c).await.len();
            let (status, answer) =
                request(&api.app, method, &uri, who.bearer().as_deref(), &body).await;
            let case = format!("{method} {uri} as {who:?}");
            if status.as_u16() != want {
                failures.push(format!("{case}: {status}, expected {want}: {answer}"));
                continue;
            }
            if let Err(e) =
                ts::openapi::check_response(&api.doc, method, template, status.as_u16(), &answer)
            {
                failures.push(format!("{case}: {e}"));
            }
            let after = audit_rows(&c).await;
            let new = &after[before..];
            if matches!(access, Access::Public) {
                if !new.is_empty() {
                    failures.push(format!("{case}: public routes are not audited: {new:?}"));
                }
                continue;
            }
            // An Observation of another team's patient cannot be told from
            // one that does not exist (its id hides the patient): failed.
            let fhir_read = template == "/fhir/r4/Observation/{id}";
            let outcome = match want {
                200 | 201 => "allowed",
                404 if fhir_read => "failed",
                _ => "denied",
            };
            // Who the row must name: the patient of a route that names them
            // in its path or search (for every caller), or of the alert a
            // carer asked about.
            let names_patient = matches!(access, Access::Care)
                && (patient_in_request(template)
                    || (matches!(who, Who::Nurse | Who::Clinician | Who::OtherNurse)
                        && !(fhir_read && who == Who::OtherNurse)));
            match new {
                [(actor, action, patient_id, got)] => {
                    if actor != who.subject() || action.is_empty() || got != outcome {
                        failures.push(format!(
                            "{case}: audit row {actor} {action} {got}, expected {} {outcome}",
                            who.subject()
                        ));
                    }
                    if names_patient && patient_id.as_deref() != Some(&patient) {
                        failures.push(format!(
                            "{case}: the audit row does not name the patient: {patient_id:?}"
                        ));
                    }
                }
                other => failures.push(format!(
                    "{case}: {} audit rows, expected exactly one: {other:?}",
                    other.len()
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        operations.len() * EVERYONE.len(),
        failures.join("\n")
    );
}
