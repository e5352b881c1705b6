//! The care-team API against a real PostgreSQL: the registry, thresholds,
//! the audit log; every answer checked against the OpenAPI document.

use serde_json::{Value, json};
use vitalwatch_test_support as ts;

use crate::util::*;

/// The audit rows of `actor`, oldest first: (action, patient, outcome).
async fn audit_of(cfg: &vitalwatch::Config, actor: &str) -> Vec<(String, Option<String>, String)> {
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.query(
        "SELECT action, patient_id, outcome FROM audit_log WHERE actor = $1 ORDER BY id",
        &[&actor],
    )
    .await
    .expect("audit")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn row(action: &str, patient: Option<&str>, outcome: &str) -> (String, Option<String>, String) {
    (action.into(), patient.map(Into::into), outcome.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_build_a_care_team_whose_nurse_then_sees_the_panel() {
    let cfg = config().await;
    let api = Documented::new(&cfg).await;
    let admin = token("admin-ada", &["admin"]);
    let devices = token("logistics-lee", &["device-admin"]);
    let nurse = token("nurse-nia", &["nurse"]);
    let stranger = token("nurse-sam", &["nurse"]);
    let patient = ts::unique("mrn");
    let device = ts::unique("cuff");

    // Admin: a patient, a team with the nurse on it, the patient on its panel.
    let (s, p) = api
        .call(
            "POST",
            "/v1/patients",
            "/v1/patients",
            Some(&admin),
            &json!({"patient_id": patient}).to_string(),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["patient_id"], patient.as_str());
    let (s, _) = api
        .call(
            "POST",
            "/v1/patients",
            "/v1/patients",
            Some(&admin),
            &json!({"patient_id": patient}).to_string(),
        )
        .await;
    assert_eq!(s, 409, "registered once");
    let (s, t) = api
        .call(
            "POST",
            "/v1/care-teams",
            "/v1/care-teams",
            Some(&admin),
            r#"{"team_id": "heart-failure", "name": "Heart failure clinic"}"#,
        )
        .await;
    assert_eq!(s, 201, "{t}");
    let member = "/v1/care-teams/{team_id}/members/{subject}";
    let (s, t) = api
        .call(
            "PUT",
            member,
            "/v1/care-teams/heart-failure/members/nurse-nia",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(
        (s.as_u16(), t["members"].clone()),
        (200, json!(["nurse-nia"]))
    );
    let on_panel = "/v1/care-teams/{team_id}/patients/{patient_id}";
    let (s, t) = api
        .call(
            "PUT",
            on_panel,
            &format!("/v1/care-teams/heart-failure/patients/{patient}"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!((s.as_u16(), t["patients"].clone()), (200, json!(1)));

    // Device admin: a cuff, assigned to the patient.
    let (s, d) = api
        .call(
            "POST",
            "/v1/devices",
            "/v1/devices",
            Some(&devices),
            &json!({"device_id": device, "kind": "bp_cuff"}).to_string(),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    assert!(d.get("patient_id").is_none(), "not assigned yet: {d}");
    let assignment = "/v1/devices/{device_id}/assignment";
    let (s, d) = api
        .call(
            "PUT",
            assignment,
            &format!("/v1/devices/{device}/assignment"),
            Some(&devices),
            &json!({"patient_id": patient}).to_string(),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["patient_id"], patient.as_str());
    let (s, e) = api
        .call(
            "PUT",
            assignment,
            &format!("/v1/devices/{device}/assignment"),
            Some(&devices),
            &json!({"patient_id": patient, "since": "2020-01-01T00:00:00Z"}).to_string(),
        )
        .await;
    assert_eq!(s, 200, "the same patient again changes nothing: {e}");
    let (s, e) = api
        .call(
            "PUT",
            assignment,
            &format!("/v1/devices/{device}/assignment"),
            Some(&devices),
            r#"{"patient_id": "nobody-registered"}"#,
        )
        .await;
    assert_eq!(s, 404, "{e}");

    // The nurse sees the team and the panel with the cuff; another nurse does not.
    let (s, teams) = api
        .call("GET", "/v1/care-teams", "/v1/care-teams", Some(&nurse), "")
        .await;
    assert_eq!(s, 200);
    assert_eq!(teams["teams"].as_array().map(Vec::len), Some(1), "{teams}");
    let panel = "/v1/care-teams/{team_id}/patients";
    let (s, p) = api
        .call(
            "GET",
            panel,
            "/v1/care-teams/heart-failure/patients",
            Some(&nurse),
            "",
        )
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["patients"][0]["patient_id"], patient.as_str());
    assert_eq!(p["patients"][0]["devices"][0]["device_id"], device.as_str());
    assert_eq!(p["patients"][0]["devices"][0]["kind"], "bp_cuff");
    let (s, _) = api
        .call(
            "GET",
            panel,
            "/v1/care-teams/heart-failure/patients",
            Some(&stranger),
            "",
        )
        .await;
    assert_eq!(s, 404, "another team's panel is not disclosed");
    let (s, teams) = api
        .call(
            "GET",
            "/v1/care-teams",
            "/v1/care-teams",
            Some(&stranger),
            "",
        )
        .await;
    assert_eq!((s.as_u16(), teams["teams"].clone()), (200, json!([])));

    // The cuff comes back: the panel shows no device, the history keeps the period.
    let (s, d) = api
        .call(
            "DELETE",
            assignment,
            &format!("/v1/devices/{device}/assignment"),
            Some(&devices),
            "",
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert!(d.get("patient_id").is_none());
    assert_eq!(d["assignments"].as_array().map(Vec::len), Some(1));
    assert!(d["assignments"][0]["until"].is_string(), "{d}");
    let (s, _) = api
        .call(
            "DELETE",
            assignment,
            &format!("/v1/devices/{device}/assignment"),
            Some(&devices),
            "",
        )
        .await;
    assert_eq!(s, 409, "not assigned any more");
    let (_, p) = api
        .call(
            "GET",
            panel,
            "/v1/care-teams/heart-failure/patients",
            Some(&nurse),
            "",
        )
        .await;
    assert_eq!(p["patients"][0]["devices"], json!([]));

    // Roles: a nurse cannot manage the registry, a device admin cannot make teams.
    let (s, _) = api
        .call(
            "POST",
            "/v1/patients",
            "/v1/patients",
            Some(&nurse),
            r#"{"patient_id": "x"}"#,
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call(
            "POST",
            "/v1/care-teams",
            "/v1/care-teams",
            Some(&devices),
            r#"{"team_id": "x", "name": "x"}"#,
        )
        .await;
    assert_eq!(s, 403);

    // Off the panel, the patient's data is gone from the nurse's view.
    let (s, _) = api
        .call(
            "DELETE",
            on_panel,
            &format!("/v1/care-teams/heart-failure/patients/{patient}"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .call(
            "GET",
            "/v1/patients/{patient_id}/latest",
            &format!("/v1/patients/{patient}/latest"),
            Some(&nurse),
            "",
        )
        .await;
    assert_eq!(s, 404);

    // Every change is in the audit log, which admins read, newest first.
    assert_eq!(
        audit_of(&cfg, "admin-ada").await,
        [
            row("patient.create", Some(&patient), "allowed"),
            row("patient.create", Some(&patient), "failed"),
            row("team.create", None, "allowed"),
            row("team.member.add", None, "allowed"),
            row("team.patient.add", Some(&patient), "allowed"),
            row("team.patient.remove", Some(&patient), "allowed"),
        ]
    );
    assert_eq!(
        audit_of(&cfg, "logistics-lee").await,
        [
            row("device.register", None, "allowed"),
            row("device.assign", Some(&patient), "allowed"),
            row("device.assign", Some(&patient), "allowed"),
            row("device.assign", Some("nobody-registered"), "failed"),
            row("device.unassign", Some(&patient), "allowed"),
            row("device.unassign", None, "failed"),
            row("team.create", None, "denied"),
        ]
    );
    let (s, log) = api
        .call(
            "GET",
            "/v1/audit",
            &format!("/v1/audit?patient={patient}&limit=2"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(s, 200, "{log}");
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["vitals.latest", "team.patient.remove"],
        "newest first"
    );
    let next = log["next"].as_i64().expect("a next page");
    let (_, page2) = api
        .call(
            "GET",
            "/v1/audit",
            &format!("/v1/audit?patient={patient}&limit=2&after={next}"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(page2["entries"][0]["action"], "device.unassign", "{page2}");
    let (s, _) = api
        .call("GET", "/v1/audit", "/v1/audit", Some(&nurse), "")
        .await;
    assert_eq!(s, 403, "the audit log is for admins");
    assert_eq!(
        audit_of(&cfg, "admin-ada").await.last(),
        Some(&row("audit.read", Some(&patient), "allowed")),
        "reading the log is audited too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_are_read_overridden_and_cleared_by_the_patients_care_team_only() {
    let cfg = config().await;
    let api = Documented::new(&cfg).await;
    let patient = ts::unique("pat");
    grant(&cfg, &patient).await;
    let nurse = token("nurse-test", &["nurse"]);
    let other = token("nurse-elsewhere", &["nurse"]);
    let admin = token("admin-ada", &["admin"]);
    let all = "/v1/patients/{patient_id}/thresholds";
    let one = "/v1/patients/{patient_id}/thresholds/{rule}";
    let list_uri = format!("/v1/patients/{patient}/thresholds");
    let spo2_uri = format!("/v1/patients/{patient}/thresholds/spo2_low");

    let (s, t) = api.call("GET", all, &list_uri, Some(&nurse), "").await;
    assert_eq!(s, 200, "{t}");
    let spo2 = |t: &Value| {
        t["rules"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["rule"] == "spo2_low").cloned())
            .expect("spo2_low is configured")
    };
    let r = spo2(&t);
    assert_eq!(
        (r["kind"].clone(), r["direction"].clone()),
        (json!("threshold"), json!("below"))
    );
    assert_eq!(r["defaults"], json!({"level": 90.0, "clear": 92.0}));
    assert_eq!(r["effective"], r["defaults"]);
    assert!(r.get("override").is_none());

    // A COPD patient: alarm below 88 instead of 90 (the clear level moves with it).
    let (s, r) = api
        .call(
            "PUT",
            one,
            &spo2_uri,
            Some(&nurse),
            r#"{"params": {"level": 88}, "reason": "COPD, usual SpO2 88-92 %"}"#,
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["effective"], json!({"level": 88.0, "clear": 90.0}));
    assert_eq!(r["override"]["set_by"], "nurse-test");
    assert_eq!(r["override"]["params"], json!({"level": 88.0}));
    let (_, t) = api.call("GET", all, &list_uri, Some(&nurse), "").await;
    assert_eq!(spo2(&t)["effective"]["level"], 88.0, "stored");

    // What does not fit the rule is refused, with why.
    for (body, status, why) in [
        (
            r#"{"params": {"limit": 5}, "reason": "x"}"#,
            400,
            "does not apply",
        ),
        (
            r#"{"params": {"level": 95, "clear": 93}, "reason": "x"}"#,
            400,
            "",
        ),
        (r#"{"params": {}, "reason": "x"}"#, 400, "at least one"),
        (r#"{"params": {"level": 88}}"#, 400, "reason"),
        (r#"{"params": {"level": 88}, "reason": " "}"#, 400, "reason"),
        (r#"{"params": {"level": "low"}, "reason": "x"}"#, 400, ""),
        ("not json", 400, ""),
    ] {
        let (s, p) = api.call("PUT", one, &spo2_uri, Some(&nurse), body).await;
        assert_eq!(s, status, "{body}: {p}");
        assert!(
            p["detail"].as_str().is_some_and(|d| d.contains(why)),
            "{body}: {p}"
        );
    }
    let (s, _) = api
        .call(
            "PUT",
            one,
            &format!("/v1/patients/{patient}/thresholds/no_such_rule"),
            Some(&nurse),
            r#"{"params": {"level": 1}, "reason": "x"}"#,
        )
        .await;
    assert_eq!(s, 404);

    // Another team's nurse and an admin change nothing.
    let (s, _) = api
        .call(
            "PUT",
            one,
            &spo2_uri,
            Some(&other),
            r#"{"params": {"level": 80}, "reason": "x"}"#,
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = api.call("GET", all, &list_uri, Some(&admin), "").await;
    assert_eq!(s, 403);

    // Cleared: the defaults apply again.
    let (s, r) = api.call("DELETE", one, &spo2_uri, Some(&nurse), "").await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["effective"], json!({"level": 90.0, "clear": 92.0}));
    assert!(r.get("override").is_none());

    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let details: Vec<(String, String, Option<String>)> = c
        .query(
            "SELECT action, outcome, detail FROM audit_log WHERE patient_id = $1 AND action LIKE 'thresholds.%' AND outcome <> 'failed' ORDER BY id",
            &[&patient],
        )
        .await
        .expect("audit")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        details,
        [
            ("thresholds.read".into(), "allowed".into(), None),
            (
                "thresholds.override".into(),
                "allowed".into(),
                Some(r#"rule spo2_low: defaults -> {"level":88.0}"#.into())
            ),
            ("thresholds.read".into(), "allowed".into(), None),
            (
                "thresholds.override".into(),
                "denied".into(),
                Some("not on the caller's care teams".into())
            ),
            (
                "thresholds.read".into(),
                "denied".into(),
                Some(
                    "patient data is for the nurses and clinicians of the patient's care team"
                        .into()
                ),
            ),
            (
                "thresholds.clear".into(),
                "allowed".into(),
                Some(r#"rule spo2_low: {"level":88.0} -> defaults"#.into())
            ),
        ]
    );
    let changes: i64 = c
        .query_one(
            "SELECT count(*) FROM threshold_changes WHERE patient_id = $1",
            &[&patient],
        )
        .await
        .expect("changes")
        .get(0);
    assert_eq!(
        changes, 2,
        "each change is there for the engines to pick up"
    );
}

/// Stores readings as the writer would.
async fn store(
    cfg: &vitalwatch::Config,
    patient: &str,
    device: &str,
    readings: Vec<vitalwatch_core::reading::Reading>,
) {
    let mut c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let layout = vitalwatch_store::storage::layout(&c).await.expect("layout");
    let batch = vitalwatch_core::reading::Batch {
        device_id: device.into(),
        patient_id: patient.into(),
        seq: None,
        received_at: chrono::Utc::now(),
        readings,
    };
    let mut rows = vitalwatch_store::readings::Rows::default();
    rows.push(&batch);
    vitalwatch_store::readings::write(&mut c, layout, &rows)
        .await
        .expect("write");
}

/// Checks what FHIR R4 and the vital-signs profiles require of an
/// Observation of `metric`, with codes and units exactly as the catalogue has them.
fn check_observation(o: &Value, metric: vitalwatch_core::catalogue::Metric, patient: &str) {
    use vitalwatch_core::catalogue::Metric;
    let info = metric.info();
    assert_eq!(o["resourceType"], "Observation");
    let id = o["id"].as_str().expect("id");
    assert!(
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
        "a FHIR id: {id}"
    );
    assert!(
        ["registered", "preliminary", "final", "amended"]
            .contains(&o["status"].as_str().unwrap_or_default()),
        "status: {o}"
    );
    let category = if metric == Metric::BloodGlucose {
        "laboratory"
    } else {
        "vital-signs"
    };
    assert_eq!(
        o["category"][0]["coding"][0],
        json!({"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category,
               "display": if category == "laboratory" { "Laboratory" } else { "Vital Signs" }}),
    );
    let codes: Vec<(&str, &str)> = o["code"]["coding"]
        .as_array()
        .expect("coding")
        .iter()
        .map(|c| {
            (
                c["system"].as_str().unwrap_or_default(),
                c["code"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let want: Vec<(&str, &str)> = info
        .loinc
        .iter()
        .map(|c| ("http://loinc.org", *c))
        .collect();
    assert_eq!(codes, want, "LOINC as the catalogue says");
    assert!(
        o["code"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|c| c["display"].is_string())
    );
    assert_eq!(
        o["subject"],
        json!({"reference": format!("Patient/{patient}")})
    );
    let effective = o["effectiveDateTime"].as_str().expect("effectiveDateTime");
    assert!(
        chrono::DateTime::parse_from_rfc3339(effective).is_ok(),
        "{effective}"
    );
    let quantity = |q: &Value| {
        assert!(q["value"].is_number(), "{q}");
        assert_eq!(q["system"], "http://unitsofmeasure.org");
        assert_eq!(q["code"], info.unit, "UCUM as the catalogue says");
        assert!(q["unit"].is_string());
    };
    if metric == Metric::BloodPressure {
        assert!(
            o.get("valueQuantity").is_none(),
            "a panel's values are its components"
        );
        let comps = o["component"].as_array().expect("components");
        let codes: Vec<&str> = comps
            .iter()
            .map(|c| c["code"]["coding"][0]["code"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(codes, ["8480-6", "8462-4"]);
        for c in comps {
            assert_eq!(c["code"]["coding"][0]["system"], "http://loinc.org");
            quantity(&c["valueQuantity"]);
        }
    } else {
        quantity(&o["valueQuantity"]);
    }
    if category == "vital-signs" {
        let profiles = o["meta"]["profile"].as_array().expect("profiles");
        assert!(
            profiles.contains(&json!("http://hl7.org/fhir/StructureDefinition/vitalsigns")),
            "{o}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_observations_are_valid_r4_coded_from_the_catalogue_and_page_stably() {
    use vitalwatch_core::catalogue::Acvpu;
    use vitalwatch_core::catalogue::Metric;
    use vitalwatch_core::reading::{Measurement, Quality, Reading};
    let cfg = config().await;
    let api = Documented::new(&cfg).await;
    let patient = ts::unique("mrn").replace('_', "-");
    grant(&cfg, &patient).await;
    let nurse = token("nurse-test", &["nurse"]);
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-20T08:00:00.123456Z")
        .expect("t0")
        .with_timezone(&chrono::Utc);
    let at = |m: i64| t0 + chrono::Duration::minutes(m);
    let r = |metric, measurement, m, quality| Reading {
        metric,
        measurement,
        measured_at: at(m),
        quality,
    };
    store(
        &cfg,
        &patient,
        "cuff-1",
        vec![
            r(
                Metric::BloodPressure,
                Measurement::BloodPressure {
                    systolic: 132.0,
                    diastolic: 84.0,
                },
                0,
                Quality::default(),
            ),
            r(
                Metric::HeartRate,
                Measurement::Scalar(72.0),
                2,
                Quality::default(),
            ),
        ],
    )
    .await;
    store(
        &cfg,
        &patient,
        "ox-1",
        vec![
            r(
                Metric::Spo2,
                Measurement::Scalar(97.0),
                1,
                Quality::LOW_PERFUSION,
            ),
            r(
                Metric::RespiratoryRate,
                Measurement::Scalar(16.0),
                3,
                Quality::default(),
            ),
            r(
                Metric::Consciousness,
                Measurement::Consciousness(Acvpu::Alert),
                3,
                Quality::default(),
            ),
        ],
    )
    .await;
    store(
        &cfg,
        &patient,
        "home-hub",
        vec![
            r(
                Metric::BodyTemperature,
                Measurement::Scalar(37.2),
                4,
                Quality::default(),
            ),
            r(
                Metric::BodyWeight,
                Measurement::Scalar(80.5),
                5,
                Quality::default(),
            ),
            r(
                Metric::BloodGlucose,
                Measurement::Scalar(110.0),
                6,
                Quality::default(),
            ),
        ],
    )
    .await;
    let search = "/fhir/r4/Observation";
    let read = "/fhir/r4/Observation/{id}";

    let (s, bundle) = api
        .call(
            "GET",
            search,
            &format!("{search}?patient=Patient/{patient}"),
            Some(&nurse),
            "",
        )
        .await;
    assert_eq!(s, 200, "{bundle}");
    assert_eq!(
        (bundle["resourceType"].clone(), bundle["type"].clone()),
        (json!("Bundle"), json!("searchset"))
    );
    let entries = bundle["entry"].as_array().expect("entries").clone();
    let order = [
        Metric::BloodPressure,
        Metric::Spo2,
        Metric::HeartRate,
        Metric::RespiratoryRate,
        Metric::BodyTemperature,
        Metric::BodyWeight,
        Metric::BloodGlucose,
    ];
    assert_eq!(
        entries.len(),
        order.len(),
        "oldest first; consciousness is not served: {bundle}"
    );
    for (e, m) in entries.iter().zip(order) {
        check_observation(&e["resource"], m, &patient);
        let id = e["resource"]["id"].as_str().expect("id");
        assert!(
            e["fullUrl"].as_str().is_some_and(
                |u| u.starts_with("http") && u.ends_with(&format!("/Observation/{id}"))
            ),
            "{e}"
        );
        assert_eq!(e["search"]["mode"], "match");
        let (s, one) = api
            .call(
                "GET",
                read,
                &format!("/fhir/r4/Observation/{id}"),
                Some(&nurse),
                "",
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(one, e["resource"], "read gives what search gave");
    }
    let bp = &entries[0]["resource"];
    assert_eq!(bp["component"][0]["valueQuantity"]["value"], 132.0);
    assert_eq!(bp["component"][1]["valueQuantity"]["value"], 84.0);
    assert_eq!(bp["effectiveDateTime"], "2026-11-20T08:00:00.123456Z");
    assert_eq!(
        entries[1]["resource"]["note"][0]["text"],
        "Device reported low perfusion"
    );

    // Codes, dates.
    let ids = |b: &Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
            .collect()
    };
    let (_, b) = api
        .call(
            "GET",
            search,
            &format!("{search}?patient={patient}&code=http://loinc.org|85354-9"),
            Some(&nurse),
            "",
        )
        .await;
    assert_eq!(ids(&b).len(), 1);
    assert!(ids(&b)[0].starts_with("bp-"));
    let (_, b) = api
        .call(
            "GET",
            search,
            &format!("{search}?patient={patient}&code=2708-6,8867-4"),
            Some(&nurse),
            "",
        )
        .await;
    assert_eq!(
        ids(&b).iter().map(|i| &i[..3]).collect::<Vec<_>>(),
        ["spo", "hr-"]
    );
    let (_, b) = api
        .call(
            "GET",
            search,
            &format!(
                "{search}?patient={patient}&date=ge2026-11-20T08:01:00Z&date=lt2026-11-20T08:03:00Z"
            ),
            Some(&nurse),
            "",
        )
        .await;
    assert_eq!(
        ids(&b).len(),
        2,
        "SpO2 at 08:01 and heart rate at 08:02: {b}"
    );
    let (_, b) = api
        .call(
            "GET",
            search,
            &format!("{search}?patient={patient}&date=2026-11-21"),
            Some(&nurse),
            "",
        )
        .await;
    assert!(ids(&b).is_empty());

    // Pages of 3 follow `next` links to the same set, none twice.
    let all = ids(&bundle);
    let mut paged = Vec::new();
    let mut uri = format!("{search}?patient={patient}&_count=3");
    for _ in 0..5 {
        let (s, page) = api.call("GET", search, &uri, Some(&nurse), "").await;
        assert_eq!(s, 200, "{page}");
        let got = ids(&page);
        assert!(got.len() <= 3);
        paged.extend(got);
        let next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next");
        match next {
            Some(l) => {
                let url = l["url"].as_str().expect("url");
                uri = url[url.find("/fhir/r4/").expect("path")..].to_owned();
            }
            None => break,
        }
    }
    assert_eq!(paged, all);

    // Refusals are OperationOutcomes, audited.
    let outcome =
        |b: &Value| b["resourceType"] == "OperationOutcome" && b["issue"][0]["severity"] == "error";
    let (s, b) = api
        .call(
            "GET",
            search,
            &format!("{search}?patient={patient}"),
            None,
            "",
        )
        .await;
    assert!(s == 401 && outcome(&b), "{b}");
    let (s, b) = api
        .call(
            "GET",
            search,
            &format!("{search}?patient={patient}"),
            Some(&token("nurse-elsewhere", &["nurse"])),
            "",
        )
        .await;
    assert!(s == 404 && outcome(&b), "another team's patient: {b}");
    let (s, b) = api
        .call(
            "GET",
            read,
            &format!("/fhir/r4/Observation/{}", all[0]),
            Some(&token("nurse-elsewhere", &["nurse"])),
            "",
        )
        .await;
    assert!(s == 404 && outcome(&b), "another team's Observation: {b}");
    for bad in [
        "code=8867-4",
        &format!("patient={patient}&code=0000-0"),
        &format!("patient={patient}&date=ge2026-11-21&date=le2026-11-20"),
    ] {
        let (s, b) = api
            .call("GET", search, &format!("{search}?{bad}"), Some(&nurse), "")
            .await;
        assert!(s == 400 && outcome(&b), "{bad}: {b}");
    }
    let (s, b) = api
        .call(
            "GET",
            read,
            "/fhir/r4/Observation/not-an-id",
            Some(&nurse),
            "",
        )
        .await;
    assert!(s == 400 && outcome(&b), "{b}");

    let (s, cap) = api
        .call("GET", "/fhir/r4/metadata", "/fhir/r4/metadata", None, "")
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (
            cap["resourceType"].clone(),
            cap["fhirVersion"].clone(),
            cap["kind"].clone()
        ),
        (
            json!("CapabilityStatement"),
            json!("4.0.1"),
            json!("instance")
        )
    );
    assert!(cap["date"].is_string() && cap["status"] == "active");
    let obs = &cap["rest"][0]["resource"][0];
    assert_eq!(obs["type"], "Observation");
    let params: Vec<&str> = obs["searchParam"]
        .as_array()
        .expect("params")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(params, ["patient", "code", "date", "_count"]);

    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let (allowed, denied): (i64, i64) = c
        .query_one(
            "SELECT count(*) FILTER (WHERE outcome = 'allowed'), count(*) FILTER (WHERE outcome = 'denied')
               FROM audit_log WHERE patient_id = $1 AND action LIKE 'fhir.%'",
            &[&patient],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("audit");
    assert_eq!(
        (allowed, denied),
        (1 + 7 + 4 + 3, 2), // search, 7 reads, 4 filtered searches, 3 pages; no token, another team
        "every read and search of the patient is audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_the_api_speaks_https_only_and_stops_gracefully() {
    let mut cfg = config().await;
    // The local stack's certificate for localhost, signed by its CA.
    let ca = std::path::PathBuf::from(
        std::env::var("VITALWATCH_TEST_MQTT_CA").expect("deploy/local/test sets the CA"),
    );
    let dir = ca.parent().expect("tls dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    cfg.api.listen = ([127, 0, 0, 1], port).into();
    cfg.api.tls = Some(vitalwatch_api::TlsConfig {
        cert_file: dir.join("server.crt"),
        key_file: dir.join("server.key"),
    });
    let running = start(&[vitalwatch::Service::Api], &cfg);
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca).expect("ca")).expect("pem"),
        )
        .build()
        .expect("client");
    let url = format!("https://localhost:{port}/healthz");
    let body = ts::eventually(WAIT, "the API to answer over TLS", || async {
        client.get(&url).send().await.ok()?.text().await.ok()
    })
    .await;
    assert_eq!(body, "ok");
    let plain = reqwest::Client::new()
        .get(format!("http://localhost:{port}/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()),
        "no plain HTTP on the TLS port"
    );
    running.stop().await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_never_a_5xx() {
    let cfg = config().await;
    let api = Documented::new(&cfg).await;
    let patient = ts::unique("pat");
    grant(&cfg, &patient).await;
    let nurse = token("nurse-test", &["nurse"]);
    let admin = token("admin-ada", &["admin"]);
    let long = "x".repeat(129);
    let huge_note = json!({"note": "x".repeat(70_000)}).to_string();
    let alert = "/v1/alerts/{alert_id}";
    let vitals = "/v1/patients/{patient_id}/vitals";
    let days = "/v1/patients/{patient_id}/monitoring-days";
    let p = &patient;
    let cases: Vec<(&str, &str, String, &str, &str, u16, &str)> = vec![
        (
            "GET",
            "/v1/patients/{patient_id}/latest",
            format!("/v1/patients/{long}/latest"),
            "",
            &nurse,
            400,
            "1 to 128",
        ),
        (
            "GET",
            vitals,
            format!("/v1/patients/{p}/vitals?metric=blood_sugar"),
            "",
            &nurse,
            400,
            "blood_sugar",
        ),
        (
            "GET",
            vitals,
            format!("/v1/patients/{p}/vitals"),
            "",
            &nurse,
            400,
            "metric",
        ),
        (
            "GET",
            vitals,
            format!(
                "/v1/patients/{p}/vitals?metric=spo2&from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z"
            ),
            "",
            &nurse,
            400,
            "before",
        ),
        (
            "GET",
            vitals,
            format!(
                "/v1/patients/{p}/vitals?metric=spo2&from=2016-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&bucket=1m"
            ),
            "",
            &nurse,
            400,
            "buckets",
        ),
        (
            "GET",
            vitals,
            format!("/v1/patients/{p}/vitals?metric=spo2&from=yesterday"),
            "",
            &nurse,
            400,
            "from",
        ),
        (
            "GET",
            vitals,
            format!("/v1/patients/{p}/vitals?metric=spo2&bucket=7s"),
            "",
            &nurse,
            400,
            "bucket",
        ),
        (
            "GET",
            vitals,
            format!("/v1/patients/{p}/vitals?metric=spo2&colour=red"),
            "",
            &nurse,
            400,
            "colour",
        ),
        (
            "GET",
            days,
            format!("/v1/patients/{p}/monitoring-days?from=2026-01-01&to=2026-03-01"),
            "",
            &nurse,
            400,
            "30 days",
        ),
        (
            "GET",
            days,
            format!("/v1/patients/{p}/monitoring-days?from=2026-03-01&to=2026-01-01"),
            "",
            &nurse,
            400,
            "after",
        ),
        (
            "GET",
            days,
            format!("/v1/patients/{p}/monitoring-days?tz=Mars/Olympus_Mons"),
            "",
            &nurse,
            400,
            "time zone",
        ),
        (
            "GET",
            alert,
            "/v1/alerts/not-hex!".into(),
            "",
            &nurse,
            400,
            "hexadecimal",
        ),
        (
            "GET",
            "/v1/alerts",
            "/v1/alerts?limit=100000".into(),
            "",
            &nurse,
            400,
            "limit",
        ),
        (
            "GET",
            "/v1/alerts",
            "/v1/alerts?state=sleeping".into(),
            "",
            &nurse,
            400,
            "sleeping",
        ),
        (
            "GET",
            "/v1/alerts",
            "/v1/alerts?after=garbage".into(),
            "",
            &nurse,
            400,
            "after",
        ),
        (
            "POST",
            "/v1/alerts/{alert_id}/acknowledge",
            "/v1/alerts/00ff/acknowledge".into(),
            "{",
            &nurse,
            400,
            "note",
        ),
        (
            "POST",
            "/v1/alerts/{alert_id}/acknowledge",
            "/v1/alerts/00ff/acknowledge".into(),
            &huge_note,
            &nurse,
            413,
            "too large",
        ),
        (
            "POST",
            "/v1/patients",
            "/v1/patients".into(),
            &huge_note,
            &admin,
            413,
            "too large",
        ),
        (
            "POST",
            "/v1/patients",
            "/v1/patients".into(),
            r#"{"patient_id": ""}"#,
            &admin,
            400,
            "1 to 128",
        ),
        (
            "POST",
            "/v1/patients",
            "/v1/patients".into(),
            r#"{"patient_id": "a", "name": "Jane"}"#,
            &admin,
            400,
            "name",
        ),
        (
            "GET",
            "/v1/devices/{device_id}",
            "/v1/devices/a%2Fb".into(),
            "",
            &admin,
            400,
            "device id",
        ),
        (
            "POST",
            "/v1/care-teams",
            "/v1/care-teams".into(),
            r#"{"team_id": "a b", "name": "x"}"#,
            &admin,
            400,
            "care team id",
        ),
        (
            "PUT",
            "/v1/patients/{patient_id}/thresholds/{rule}",
            format!("/v1/patients/{p}/thresholds/spo2_low"),
            r#"{"params": {"level": 1e400}, "reason": "x"}"#,
            &nurse,
            400,
            "number",
        ),
        (
            "GET",
            "/v1/audit",
            "/v1/audit?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z".into(),
            "",
            &admin,
            400,
            "before",
        ),
        (
            "GET",
            "/v1/audit",
            "/v1/audit?outcome=maybe".into(),
            "",
            &admin,
            400,
            "maybe",
        ),
        (
            "GET",
            "/fhir/r4/Observation",
            format!("/fhir/r4/Observation?patient={p}&date=soon"),
            "",
            &nurse,
            400,
            "soon",
        ),
        (
            "GET",
            "/fhir/r4/Observation",
            format!("/fhir/r4/Observation?patient={p}&_count=0"),
            "",
            &nurse,
            400,
            "_count",
        ),
        (
            "GET",
            "/fhir/r4/Observation/{id}",
            format!("/fhir/r4/Observation/{long}"),
            "",
            &nurse,
            400,
            "not an Observation id",
        ),
        // Values PostgreSQL cannot hold, and chrono's far years.
        (
            "GET",
            "/v1/patients/{patient_id}/thresholds",
            "/v1/patients/a%00b/thresholds".into(),
            "",
            &nurse,
            400,
            "control",
        ),
        (
            "GET",
            "/v1/devices/{device_id}",
            "/v1/devices/a%00b".into(),
            "",
            &admin,
            400,
            "control",
        ),
        (
            "GET",
            "/fhir/r4/Observation",
            format!("/fhir/r4/Observation?patient={p}&date=%2B262142-12-31"),
            "",
            &nurse,
            400,
            "1970 to 9999",
        ),
        (
            "GET",
            "/fhir/r4/Observation",
            format!("/fhir/r4/Observation?patient={p}&date=ge-5000-01-01"),
            "",
            &nurse,
            400,
            "1970 to 9999",
        ),
        (
            "GET",
            "/fhir/r4/Observation",
            format!("/fhir/r4/Observation?patient={p}&_cursor=-200000000000000000.x.61"),
            "",
            &nurse,
            400,
            "_cursor",
        ),
        (
            "GET",
            "/fhir/r4/Observation/{id}",
            "/fhir/r4/Observation/hr--200000000000000000-0123456789abcdef".into(),
            "",
            &nurse,
            400,
            "not an Observation id",
        ),
        (
            "GET",
            "/v1/audit",
            "/v1/audit?from=-5000-01-01T00:00:00Z".into(),
            "",
            &admin,
            400,
            "1970 and 9999",
        ),
        (
            "PUT",
            "/v1/patients/{patient_id}/thresholds/{rule}",
            format!("/v1/patients/{p}/thresholds/spo2_low"),
            r#"{"params": {"level": 88, "clera": 90}, "reason": "typo"}"#,
            &nurse,
            400,
            "clera",
        ),
    ];
    for (method, template, uri, body, bearer, want, says) in &cases {
        let (status, answer) = api.call(method, template, uri, Some(bearer), body).await;
        assert_eq!(status.as_u16(), *want, "{method} {uri}: {answer}");
        let message = answer["detail"]
            .as_str()
            .or_else(|| answer["issue"][0]["diagnostics"].as_str())
            .unwrap_or_default();
        assert!(
            message.contains(says),
            "{method} {uri}: the message should say {says:?}: {answer}"
        );
    }
    // A path that is not UTF-8 never reaches a handler: problem details all the same.
    let (s, b) = call(&api.app, "GET", "/v1/patients/%FF/latest", Some(&nurse), "").await;
    assert_eq!((s.as_u16(), b["status"].clone()), (400, json!(400)), "{b}");
    // Off the map: problem details too.
    let (s, b) = call(&api.app, "GET", "/v1/nothing-here", Some(&nurse), "").await;
    assert_eq!((s.as_u16(), b["status"].clone()), (404, json!(404)), "{b}");
    let (s, b) = call(&api.app, "PATCH", "/v1/alerts", Some(&nurse), "").await;
    assert_eq!((s.as_u16(), b["status"].clone()), (405, json!(405)), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panel_pages_by_patient_without_gaps_or_repeats_while_it_changes() {
    let cfg = config().await;
    let api = Documented::new(&cfg).await;
    let admin = token("admin-ada", &["admin"]);
    let panel = "/v1/care-teams/{team_id}/patients";
    let on_panel = "/v1/care-teams/{team_id}/patients/{patient_id}";
    let (s, _) = api
        .call(
            "POST",
            "/v1/care-teams",
            "/v1/care-teams",
            Some(&admin),
            r#"{"team_id": "paging", "name": "Paging"}"#,
        )
        .await;
    assert_eq!(s, 201);
    let mut all: Vec<String> = (0..7).map(|i| format!("pg-{i:02}")).collect();
    for p in &all {
        let (s, _) = api
            .call(
                "POST",
                "/v1/patients",
                "/v1/patients",
                Some(&admin),
                &json!({"patient_id": p}).to_string(),
            )
            .await;
        assert_eq!(s, 201);
        let (s, _) = api
            .call(
                "PUT",
                on_panel,
                &format!("/v1/care-teams/paging/patients/{p}"),
                Some(&admin),
                "",
            )
            .await;
        assert_eq!(s, 200);
    }
    let mut seen = Vec::new();
    let mut uri = "/v1/care-teams/paging/patients?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let (s, page) = api.call("GET", panel, &uri, Some(&admin), "").await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        seen.extend(
            page["patients"]
                .as_array()
                .expect("patients")
                .iter()
                .filter_map(|p| p["patient_id"].as_str().map(str::to_owned)),
        );
        if pages == 1 {
            // A patient joins behind the cursor and one ahead of it: the
            // pages after it show the one ahead, and nothing twice.
            for p in ["pg-00a", "pg-99"] {
                api.call(
                    "POST",
                    "/v1/patients",
                    "/v1/patients",
                    Some(&admin),
                    &json!({"patient_id": p}).to_string(),
                )
                .await;
                api.call(
                    "PUT",
                    on_panel,
                    &format!("/v1/care-teams/paging/patients/{p}"),
                    Some(&admin),
                    "",
                )
                .await;
            }
            all.push("pg-99".into());
        }
        match page["next"].as_str() {
            Some(next) => uri = format!("/v1/care-teams/paging/patients?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, all, "in order, each once");
    assert_eq!(pages, 3);
}
