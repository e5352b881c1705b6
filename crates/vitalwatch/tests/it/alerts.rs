//! The alerts service against real Kafka (tansu) and PostgreSQL: each
//! alert change exactly once in the table and on `rpm.alerts.v1`, across an
//! offset reset, a rebalance between two engines, and engine crashes in the
//! middle of an episode.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use prost::Message as _;
use vitalwatch::{Config, Service};
use vitalwatch_bus::Producer;
use vitalwatch_bus::rdkafka::message::Message as _;
use vitalwatch_core::catalogue::Metric;
use vitalwatch_core::proto;
use vitalwatch_core::reading::{Batch, Measurement, Quality, Reading};
use vitalwatch_test_support as ts;

use crate::util::*;

/// Minute `m` of the test's clinical timeline (an hour ago, on the minute).
fn minute(base: DateTime<Utc>, m: i64) -> DateTime<Utc> {
    base + chrono::Duration::minutes(m)
}

fn base() -> DateTime<Utc> {
    (Utc::now() - chrono::Duration::hours(1))
        .duration_trunc(chrono::Duration::minutes(1))
        .expect("truncates")
}

/// One SpO2 reading at minute `m`, as its own record (a pulse oximeter
/// sending each spot check as it is taken).
fn spo2(patient: &str, base: DateTime<Utc>, m: i64, value: f64) -> Batch {
    Batch {
        device_id: format!("ox-{patient}"),
        patient_id: patient.into(),
        seq: Some(m as u64),
        received_at: Utc::now(),
        readings: vec![Reading {
            metric: Metric::Spo2,
            measurement: Measurement::Scalar(value),
            measured_at: minute(base, m),
            quality: Quality::default(),
        }],
    }
}

async fn send(
    cfg: &Config,
    producer: &Producer,
    patient: &str,
    base: DateTime<Utc>,
    minutes: std::ops::RangeInclusive<i64>,
    value: f64,
) {
    for m in minutes {
        produce(&cfg.kafka, producer, &spo2(patient, base, m, value)).await;
    }
}

/// (alert id, state, episode start, raised at) of the patient's alerts.
async fn alerts_of(
    cfg: &Config,
    patient: &str,
) -> Vec<(String, String, DateTime<Utc>, DateTime<Utc>)> {
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.query(
        "SELECT alert_id, state, episode_start, raised_at FROM alerts WHERE patient_id = $1 ORDER BY episode_start",
        &[&patient],
    )
    .await
    .expect("alerts")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// The patient's lifecycle events in order: (event id, alert id, state).
async fn events_of(cfg: &Config, patient: &str) -> Vec<(i64, String, String)> {
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.query(
        "SELECT e.id, e.alert_id, e.state FROM alert_events e JOIN alerts a USING (alert_id)
          WHERE a.patient_id = $1 ORDER BY e.id",
        &[&patient],
    )
    .await
    .expect("events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

async fn unpublished(cfg: &Config) -> i64 {
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.query_one(
        "SELECT count(*) FROM alert_events WHERE published_at IS NULL",
        &[],
    )
    .await
    .expect("count")
    .get(0)
}

/// Every record on the alerts topic, decoded.
async fn published(cfg: &Config, n: usize) -> Vec<proto::AlertEvent> {
    let records =
        ts::consume_matching(&cfg.kafka, &cfg.kafka.alerts_topic, n, WAIT, |_| true).await;
    assert_eq!(
        records_on(&cfg.kafka, &cfg.kafka.alerts_topic),
        n as i64,
        "exactly {n} records on the alerts topic"
    );
    records
        .iter()
        .map(|m| {
            let e =
                proto::AlertEvent::decode(m.payload().unwrap_or_default()).expect("an AlertEvent");
            assert_eq!(ts::key(m), e.patient_id, "keyed by patient");
            e
        })
        .collect()
}

/// Waits until the alerts group has consumed and committed everything.
async fn caught_up(cfg: &Config) {
    ts::eventually(WAIT, "the alerts group to commit every offset", || async {
        let (committed, ends) = committed_and_end(&cfg.kafka, &cfg.alerts.group_id);
        (committed == ends).then_some(())
    })
    .await;
}

/// Each patient's states of one episode that was raised and resolved.
async fn assert_one_episode(cfg: &Config, patient: &str, start: DateTime<Utc>) {
    let alerts = alerts_of(cfg, patient).await;
    assert_eq!(alerts.len(), 1, "{patient}: one alert: {alerts:?}");
    assert_eq!(
        (alerts[0].1.as_str(), alerts[0].2),
        ("resolved", start),
        "{patient}: {alerts:?}"
    );
    let states: Vec<String> = events_of(cfg, patient)
        .await
        .into_iter()
        .map(|e| e.2)
        .collect();
    assert_eq!(states, ["raised", "resolved"], "{patient}");
}

fn pipeline() -> [Service; 2] {
    [Service::Writer, Service::Alerts]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_consumed_again_after_an_offset_reset_raise_nothing_new() {
    let cfg = config().await;
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let base = base();
    let patients: Vec<String> = (0..3).map(|_| ts::unique("pat")).collect();
    for p in &patients {
        // Below 90 for six minutes (the default `spo2_low`: five), then 96.
        send(&cfg, &producer, p, base, 0..=6, 88.0).await;
        send(&cfg, &producer, p, base, 7..=7, 96.0).await;
    }
    let first = start(&pipeline(), &cfg);
    for p in &patients {
        ts::eventually(WAIT, "the episode raised and resolved", || async {
            (events_of(&cfg, p).await.len() == 2).then_some(())
        })
        .await;
    }
    caught_up(&cfg).await;
    ts::eventually(WAIT, "every change published", || async {
        (unpublished(&cfg).await == 0).then_some(())
    })
    .await;
    first.stop().await;
    for p in &patients {
        assert_one_episode(&cfg, p, minute(base, 0)).await;
    }
    let before: Vec<_> = futures_join(&cfg, &patients).await;

    // An operator resets the alerts group to the beginning.
    reset_offsets(&cfg.kafka, &cfg.alerts.group_id);

    let second = start(&[Service::Alerts], &cfg);
    caught_up(&cfg).await;
    // Give the relay a moment: it would publish anything new.
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.stop().await;
    assert_eq!(
        futures_join(&cfg, &patients).await,
        before,
        "the replay changed no alert and added no event"
    );
    let events = published(&cfg, 6).await;
    let mut seen: HashMap<(String, i32), usize> = HashMap::new();
    for e in &events {
        *seen.entry((e.alert_id.clone(), e.state)).or_default() += 1;
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "each change once on the topic: {seen:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| e.rule == "spo2_low" && e.event_id > 0)
    );
}

/// Every patient's alerts and events, for comparing before and after.
async fn futures_join(
    cfg: &Config,
    patients: &[String],
) -> Vec<(
    Vec<(String, String, DateTime<Utc>, DateTime<Utc>)>,
    Vec<(i64, String, String)>,
)> {
    let mut out = Vec::new();
    for p in patients {
        out.push((alerts_of(cfg, p).await, events_of(cfg, p).await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_in_one_group_raise_each_alert_once_across_rebalances() {
    let cfg = config().await;
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let base = base();
    // Enough patients that every partition carries some.
    let patients: Vec<String> = (0..9).map(|_| ts::unique("pat")).collect();
    let writer = start(&[Service::Writer], &cfg);
    let a = start(&[Service::Alerts], &cfg);
    for p in &patients {
        send(&cfg, &producer, p, base, 0..=3, 88.0).await;
    }
    caught_up(&cfg).await;
    // A second engine joins: partitions move while episodes are building.
    let b = start(&[Service::Alerts], &cfg);
    for m in 4..=8 {
        for p in &patients {
            send(&cfg, &producer, p, base, m..=m, 88.0).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    caught_up(&cfg).await;
    // The first leaves: the second takes over open alerts it did not raise.
    a.stop().await;
    for p in &patients {
        send(&cfg, &producer, p, base, 9..=10, 97.0).await;
    }
    for p in &patients {
        ts::eventually(WAIT, "the episode resolved", || async {
            (events_of(&cfg, p).await.len() >= 2).then_some(())
        })
        .await;
    }
    caught_up(&cfg).await;
    ts::eventually(WAIT, "every change published", || async {
        (unpublished(&cfg).await == 0).then_some(())
    })
    .await;
    b.stop().await;
    writer.stop().await;
    for p in &patients {
        assert_one_episode(&cfg, p, minute(base, 0)).await;
    }
    let events = published(&cfg, 2 * patients.len()).await;
    let raised = events
        .iter()
        .filter(|e| e.state == proto::AlertState::Raised as i32)
        .count();
    assert_eq!(raised, patients.len(), "one raise per patient on the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_episode_continues_it_after_restart() {
    let cfg = config().await;
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let base = base();
    let patient = ts::unique("pat");
    let writer = start(&[Service::Writer], &cfg);

    // Four minutes below 90: not yet the five the rule needs.
    let first = start(&[Service::Alerts], &cfg);
    send(&cfg, &producer, &patient, base, 0..=3, 88.0).await;
    caught_up(&cfg).await;
    ts::eventually(WAIT, "the readings stored", || async {
        (count_rows(&cfg, &patient).await == 4).then_some(())
    })
    .await;
    kill(first).await;
    assert!(
        alerts_of(&cfg, &patient).await.is_empty(),
        "nothing raised before the duration"
    );

    // After the restart, two more low minutes cross the duration: the
    // episode that began before the crash is raised, from minute 0.
    let second = start(&[Service::Alerts], &cfg);
    send(&cfg, &producer, &patient, base, 4..=5, 88.0).await;
    let alerts = ts::eventually(WAIT, "the alert raised", || async {
        let a = alerts_of(&cfg, &patient).await;
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(
        (alerts[0].2, alerts[0].3),
        (minute(base, 0), minute(base, 5)),
        "episode from minute 0, raised at minute 5"
    );
    caught_up(&cfg).await;
    kill(second).await;

    // Killed with the alert open; after the restart more low readings
    // continue it (no second alert), and a normal one resolves it.
    let third = start(&[Service::Alerts], &cfg);
    send(&cfg, &producer, &patient, base, 6..=7, 87.0).await;
    send(&cfg, &producer, &patient, base, 8..=8, 95.0).await;
    ts::eventually(WAIT, "the alert resolved", || async {
        (alerts_of(&cfg, &patient)
            .await
            .iter()
            .any(|a| a.1 == "resolved"))
        .then_some(())
    })
    .await;
    caught_up(&cfg).await;
    ts::eventually(WAIT, "every change published", || async {
        (unpublished(&cfg).await == 0).then_some(())
    })
    .await;
    third.stop().await;
    writer.stop().await;
    assert_one_episode(&cfg, &patient, minute(base, 0)).await;
    let events = published(&cfg, 2).await;
    assert_eq!(events[0].alert_id, events[1].alert_id);
}

/// Ends the services abruptly: no drain, no final commit (the background
/// tasks are stopped too, as a dead process's would be).
async fn kill(running: Running) {
    running.task.abort();
    let _ = running.task.await;
    running.token.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// An open server-sent event stream, read frame by frame.
struct EventStream {
    body: axum::body::Body,
    buf: String,
}

impl EventStream {
    async fn open(app: &axum::Router, bearer: &str) -> EventStream {
        use tower::ServiceExt;
        let req = axum::http::Request::get("/v1/alerts/stream")
            .header("authorization", format!("Bearer {bearer}"))
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("response");
        assert_eq!(resp.status(), axum::http::StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        EventStream {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next `alert` event within `timeout`, if any.
    async fn next(&mut self, timeout: Duration) -> Option<vitalwatch_api::alerts::AlertEventBody> {
        use http_body_util::BodyExt;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut is_alert = false;
                let mut data = String::new();
                let mut id = None;
                for line in frame.lines() {
                    if line == "event: alert" {
                        is_alert = true;
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    } else if let Some(i) = line.strip_prefix("id: ") {
                        id = i.parse::<i64>().ok();
                    }
                }
                if is_alert {
                    let e: vitalwatch_api::alerts::AlertEventBody =
                        serde_json::from_str(&data).expect("alert event JSON");
                    assert_eq!(id, Some(e.seq), "the SSE id is the change's seq");
                    return Some(e);
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(bytes) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nurse_sees_a_low_spo2_alert_live_acknowledges_it_and_sees_the_acknowledgement() {
    use vitalwatch_core::topics::mqtt_readings_topic;
    let cfg = config().await;
    let device_id = "test-dev-1";
    let (patient, running) = start_with_device(
        &cfg,
        device_id,
        &[Service::Ingest, Service::Writer, Service::Alerts],
    )
    .await;
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.batch_execute(&format!(
        "INSERT INTO care_teams VALUES ('ward-3', 'Ward 3 home monitoring'), ('ward-9', 'Another team');
         INSERT INTO care_team_patients (team_id, patient_id) VALUES ('ward-3', '{patient}');
         INSERT INTO care_team_members (team_id, subject) VALUES ('ward-3', 'nurse-ana'), ('ward-9', 'nurse-bob');"
    ))
    .await
    .expect("care teams");
    let app = api(&cfg);
    let (ana, bob) = (
        token("nurse-ana", &["nurse"]),
        token("nurse-bob", &["nurse"]),
    );
    let mut ana_stream = EventStream::open(&app, &ana).await;
    let mut bob_stream = EventStream::open(&app, &bob).await;

    // The oximeter sends SpO2 88 % each minute for six minutes (the rule: below 90 for five).
    let mut device = ts::Device::connect(device_id).await;
    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, device_id);
    let first = (Utc::now() - chrono::Duration::minutes(10))
        .duration_trunc(chrono::Duration::seconds(1))
        .expect("truncates");
    for m in 0..=6_i64 {
        let reading = serde_json::json!({"metric": "spo2", "value": 88, "unit": "%",
            "measured_at": (first + chrono::Duration::minutes(m)).to_rfc3339()});
        device
            .publish(&topic, json_batch(device_id, m as u64 + 1, &[reading]))
            .await;
    }
    device.wait_acked(WAIT).await;

    let raised = ana_stream
        .next(WAIT)
        .await
        .expect("the alert reaches the nurse's stream");
    assert_eq!(
        (
            raised.state.as_str(),
            raised.rule.as_str(),
            raised.patient_id.as_str()
        ),
        ("raised", "spo2_low", patient.as_str())
    );
    assert_eq!(
        (raised.severity.as_str(), raised.episode_start),
        ("medium", first)
    );

    // Another team's nurse can neither act on it nor see it.
    let (status, _) = call(
        &app,
        "POST",
        &format!("/v1/alerts/{}/acknowledge", raised.alert_id),
        Some(&bob),
        "",
    )
    .await;
    assert_eq!(status, axum::http::StatusCode::NOT_FOUND);
    let (status, _) = call(
        &app,
        "POST",
        &format!("/v1/alerts/{}/acknowledge", raised.alert_id),
        None,
        "",
    )
    .await;
    assert_eq!(status, axum::http::StatusCode::UNAUTHORIZED);

    let (status, body) = call(
        &app,
        "POST",
        &format!("/v1/alerts/{}/acknowledge", raised.alert_id),
        Some(&ana),
        r#"{"note": "calling the patient"}"#,
    )
    .await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert_eq!(
        (body["state"].as_str(), body["acknowledged_by"].as_str()),
        (Some("acknowledged"), Some("nurse-ana"))
    );
    let ack = ana_stream
        .next(WAIT)
        .await
        .expect("the acknowledgement reaches the stream");
    assert_eq!(
        (ack.alert_id.as_str(), ack.state.as_str()),
        (raised.alert_id.as_str(), "acknowledged")
    );
    assert_eq!(
        (ack.actor.as_deref(), ack.note.as_deref()),
        (Some("nurse-ana"), Some("calling the patient"))
    );
    assert!(ack.id > raised.id && ack.seq > raised.seq);
    // Acknowledging twice is a conflict, not a second event.
    let (status, _) = call(
        &app,
        "POST",
        &format!("/v1/alerts/{}/acknowledge", raised.alert_id),
        Some(&ana),
        "",
    )
    .await;
    assert_eq!(status, axum::http::StatusCode::CONFLICT);
    assert!(
        bob_stream.next(Duration::from_secs(2)).await.is_none(),
        "nothing of ward 3 reaches ward 9"
    );

    // The alert's history, and the audit log of every attempt.
    let (status, body) = call(
        &app,
        "GET",
        &format!("/v1/alerts/{}", raised.alert_id),
        Some(&ana),
        "",
    )
    .await;
    assert_eq!(status, axum::http::StatusCode::OK);
    let states: Vec<&str> = body["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["state"].as_str())
        .collect();
    assert_eq!(states, ["raised", "acknowledged"]);
    let audit: Vec<(String, String, String)> = c
        .query(
            "SELECT actor, action, outcome FROM audit_log WHERE action LIKE 'alert.%' ORDER BY id",
            &[],
        )
        .await
        .expect("audit")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = [
        ("nurse-bob", "alert.acknowledge", "denied"),
        ("anonymous", "alert.acknowledge", "denied"),
        ("nurse-ana", "alert.acknowledge", "allowed"),
        ("nurse-ana", "alert.acknowledge", "failed"),
        ("nurse-ana", "alert.read", "allowed"),
    ];
    assert_eq!(
        audit,
        want.map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
    );
    // A malformed id is refused with a clear message, and audited too.
    let (status, body) = call(&app, "GET", "/v1/alerts/not-an-id", Some(&ana), "").await;
    assert_eq!(status, axum::http::StatusCode::BAD_REQUEST);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("hexadecimal")),
        "{body}"
    );
    let refused: i64 = c
        .query_one("SELECT count(*) FROM audit_log WHERE action = 'alert.read' AND outcome = 'failed' AND actor = 'nurse-ana'", &[])
        .await
        .expect("audit")
        .get(0);
    assert_eq!(refused, 1);
    // …and on the alerts topic, in order.
    let events = published(&cfg, 2).await;
    assert_eq!(
        events.iter().map(|e| e.state).collect::<Vec<_>>(),
        [
            proto::AlertState::Raised as i32,
            proto::AlertState::Acknowledged as i32
        ]
    );
    assert_eq!(events[1].actor, "nurse-ana");
    device.disconnect().await;
    running.stop().await;
}

type Received = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, Vec<u8>, u16)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_receive_every_change_signed_in_order_after_retries() {
    const HOOK_SECRET: &str = "the-pager-systems-shared-secret-32+";
    // A receiver that answers 503 twice, then takes everything.
    let received: Received = Default::default();
    let receiver = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(r): axum::extract::State<Received>,
                 headers: axum::http::HeaderMap,
                 body: axum::body::Bytes| async move {
                    let mut r = r.lock().expect("lock");
                    let status = if r.len() < 2 { 503 } else { 200 };
                    r.push((headers, body.to_vec(), status));
                    axum::http::StatusCode::from_u16(status).expect("status")
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let mut cfg = config().await;
    cfg.alerts.webhooks = vec![vitalwatch_alerts::webhooks::WebhookConfig {
        name: "pager".into(),
        url: format!("http://127.0.0.1:{port}/hook"),
        secret: HOOK_SECRET.into(),
        care_team: None,
        timeout_ms: 2000,
    }];
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let base = base();
    let patient = ts::unique("pat");
    let running = start(&pipeline(), &cfg);
    // Let the webhook worker set its cursor before the first change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    send(&cfg, &producer, &patient, base, 0..=6, 88.0).await;
    send(&cfg, &producer, &patient, base, 7..=7, 96.0).await;
    let got = ts::eventually(WAIT, "both changes delivered", || async {
        let r = received.lock().expect("lock").clone();
        (r.iter().filter(|x| x.2 == 200).count() == 2).then_some(r)
    })
    .await;
    running.stop().await;

    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HOOK_SECRET.as_bytes());
    let mut delivered = Vec::new();
    for (headers, body, status) in &got {
        let h = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let signature = h("x-vitalwatch-signature");
        let hex = signature.strip_prefix("v1=").expect("v1 signature");
        let tag: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let signed = [h("x-vitalwatch-timestamp").as_bytes(), b".", body].concat();
        assert!(
            ring::hmac::verify(&key, &signed, &tag).is_ok(),
            "the signature checks out"
        );
        let event: vitalwatch_store::alerts::Event =
            serde_json::from_slice(body).expect("an alert change as JSON");
        assert_eq!(h("x-vitalwatch-event-id"), event.id.to_string());
        assert_eq!(event.patient_id, patient);
        if *status == 200 {
            delivered.push(event.state);
        }
    }
    assert_eq!(
        delivered,
        ["raised", "resolved"],
        "in order, once each once taken"
    );
    assert_eq!(got.len(), 4, "two refused attempts, then the two changes");
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let log: Vec<(i32, String, Option<i32>)> = c
        .query("SELECT attempt, outcome, http_status FROM webhook_deliveries WHERE endpoint = 'pager' ORDER BY id", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = [
        (1, "failed", Some(503)),
        (2, "failed", Some(503)),
        (3, "delivered", Some(200)),
        (1, "delivered", Some(200)),
    ];
    assert_eq!(log, want.map(|(a, o, s)| (a, o.to_owned(), s)));
}

fn weight(patient: &str, at: DateTime<Utc>, kg: f64) -> Batch {
    Batch {
        device_id: format!("scale-{patient}"),
        patient_id: patient.into(),
        seq: None,
        received_at: Utc::now(),
        readings: vec![Reading {
            metric: Metric::BodyWeight,
            measurement: Measurement::Scalar(kg),
            measured_at: at,
            quality: Quality::default(),
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_gone_quiet_raises_a_missing_data_alert_that_the_next_weighing_resolves() {
    let mut cfg = config().await;
    cfg.alerts.missing_check_seconds = 1;
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let now = Utc::now()
        .duration_trunc(chrono::Duration::seconds(1))
        .expect("truncates");
    let (quiet, weighed) = (ts::unique("pat"), ts::unique("pat"));
    let mut c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let since = now - chrono::Duration::hours(30);
    for p in [&quiet, &weighed] {
        vitalwatch_store::registry::register_device(
            &mut c,
            &format!("scale-{p}"),
            "scale",
            Some(p),
            Some(since),
        )
        .await
        .expect("register");
    }
    // One patient weighed an hour ago; the other's scale has sent nothing in 30 hours.
    produce(
        &cfg.kafka,
        &producer,
        &weight(&weighed, now - chrono::Duration::hours(1), 81.0),
    )
    .await;
    let running = start(&pipeline(), &cfg);
    let alerts = ts::eventually(WAIT, "the missing-data alert", || async {
        let a = alerts_of(&cfg, &quiet).await;
        (!a.is_empty()).then_some(a)
    })
    .await;
    // Overdue 26 hours after monitoring began.
    assert_eq!(
        (alerts.len(), alerts[0].1.as_str(), alerts[0].2),
        (1, "raised", since + chrono::Duration::hours(26))
    );
    let rule: String = c
        .query_one(
            "SELECT rule FROM alerts WHERE alert_id = $1",
            &[&alerts[0].0],
        )
        .await
        .expect("rule")
        .get(0);
    assert_eq!(rule, "weight_missing");
    tokio::time::sleep(Duration::from_secs(2)).await; // more checks: still one alert
    assert_eq!(alerts_of(&cfg, &quiet).await.len(), 1);
    assert!(
        alerts_of(&cfg, &weighed).await.is_empty(),
        "the patient who weighed in is not overdue"
    );
    // The scale sends again: resolved.
    produce(&cfg.kafka, &producer, &weight(&quiet, Utc::now(), 80.0)).await;
    ts::eventually(WAIT, "the alert resolved", || async {
        (alerts_of(&cfg, &quiet)
            .await
            .iter()
            .all(|a| a.1 == "resolved"))
        .then_some(())
    })
    .await;
    running.stop().await;
    let states: Vec<String> = events_of(&cfg, &quiet)
        .await
        .into_iter()
        .map(|e| e.2)
        .collect();
    assert_eq!(states, ["raised", "resolved"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_list_shows_the_callers_patients_filtered_and_paged() {
    use vitalwatch_store::alerts::{NewAlert, acknowledge, raise, resolve};
    let cfg = config().await;
    let (mine, theirs) = (ts::unique("pat"), ts::unique("pat"));
    grant(&cfg, &mine).await;
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let t0 = base();
    for (id, patient, rule, severity) in [
        ("a1", &mine, "spo2_low", "medium"),
        ("b2", &mine, "fever", "medium"),
        ("c3", &mine, "systolic_high", "high"),
        ("d4", &theirs, "systolic_high", "high"),
    ] {
        let a = NewAlert {
            alert_id: id,
            patient_id: patient,
            rule,
            severity,
            episode_start: t0,
            raised_at: t0,
            news2_score: None,
            detail: serde_json::json!({}),
        };
        assert!(raise(&c, &a).await.expect("raise"));
    }
    assert!(
        acknowledge(&c, "b2", "nurse-test", None)
            .await
            .expect("ack")
    );
    assert!(resolve(&c, "c3", t0, None, None).await.expect("resolve"));
    // Opened a minute apart: a1 first, c3 last.
    c.batch_execute(
        "UPDATE alerts SET opened_at = now() - interval '10 minutes' + (CASE alert_id WHEN 'a1' THEN 0 WHEN 'b2' THEN 1 ELSE 2 END) * interval '1 minute'",
    )
    .await
    .expect("opened_at");
    let app = api(&cfg);
    let nurse = token("nurse-test", &["nurse"]);
    let ids = |body: &serde_json::Value| -> Vec<String> {
        body["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .map(|a| a["alert_id"].as_str().expect("id").to_owned())
            .collect()
    };
    let (status, body) = call(&app, "GET", "/v1/alerts", Some(&nurse), "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert_eq!(
        ids(&body),
        ["b2", "a1"],
        "open ones, newest first, and none of another team's"
    );
    let (_, body) = call(
        &app,
        "GET",
        "/v1/alerts?state=all&severity=high",
        Some(&nurse),
        "",
    )
    .await;
    assert_eq!(ids(&body), ["c3"]);
    // Pages of two.
    let (_, first) = call(
        &app,
        "GET",
        "/v1/alerts?state=all&limit=2",
        Some(&nurse),
        "",
    )
    .await;
    assert_eq!(ids(&first), ["c3", "b2"]);
    let next = first["next"].as_str().expect("a next page");
    let (_, second) = call(
        &app,
        "GET",
        &format!("/v1/alerts?state=all&limit=2&after={next}"),
        Some(&nurse),
        "",
    )
    .await;
    assert_eq!(ids(&second), ["a1"]);
    assert!(second.get("next").is_none(), "{second}");
    // Another team's patient, and bad filters.
    let (status, _) = call(
        &app,
        "GET",
        &format!("/v1/alerts?patient={theirs}"),
        Some(&nurse),
        "",
    )
    .await;
    assert_eq!(status, axum::http::StatusCode::NOT_FOUND);
    for bad in [
        "state=closed",
        "severity=urgent",
        "limit=0",
        "limit=201",
        "after=yesterday",
        "colour=red",
    ] {
        let (status, body) =
            call(&app, "GET", &format!("/v1/alerts?{bad}"), Some(&nurse), "").await;
        assert_eq!(status, axum::http::StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let outcomes: Vec<String> = c
        .query(
            "SELECT outcome FROM audit_log WHERE action = 'alerts.list' ORDER BY id",
            &[],
        )
        .await
        .expect("audit")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<&str> = [vec!["allowed"; 4], vec!["denied"], vec!["failed"; 6]].concat();
    assert_eq!(outcomes, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nurses_threshold_override_takes_effect_in_the_running_engine() {
    let cfg = config().await;
    let producer = Producer::new(&cfg.kafka).expect("producer");
    let base = base();
    let patient = ts::unique("pat");
    grant(&cfg, &patient).await;
    let running = start(&pipeline(), &cfg);
    // SpO2 91 for eleven minutes: above the default `spo2_low` (below 90).
    send(&cfg, &producer, &patient, base, 0..=10, 91.0).await;
    caught_up(&cfg).await;
    assert!(
        alerts_of(&cfg, &patient).await.is_empty(),
        "91 % alarms nobody by default"
    );

    // This patient's usual SpO2 is higher: the nurse raises the level to 92.
    let app = api(&cfg);
    let nurse = token("nurse-test", &["nurse"]);
    let (status, body) = call(
        &app,
        "PUT",
        &format!("/v1/patients/{patient}/thresholds/spo2_low"),
        Some(&nurse),
        r#"{"params": {"level": 92}, "reason": "usual SpO2 95-97 %"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["effective"]["level"], 92.0);

    // The engine knows the patient; the next readings are judged with 92.
    send(&cfg, &producer, &patient, base, 11..=12, 91.0).await;
    let raised = ts::eventually(WAIT, "spo2_low raised under the override", || async {
        let a = alerts_of(&cfg, &patient).await;
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(
        raised[0].2,
        minute(base, 0),
        "the episode starts at the first reading below the new level"
    );
    running.stop().await;
}
