//! Helpers shared by the pipeline tests.

use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, TimeZone, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::sync::CancellationToken as Token;
use vitalwatch::{Config, Service};
use vitalwatch_bus::rdkafka::consumer::Consumer;
use vitalwatch_bus::rdkafka::{Offset, TopicPartitionList};
use vitalwatch_bus::{KafkaConfig, Producer};
use vitalwatch_core::health::Readiness;
use vitalwatch_core::reading::Batch;
use vitalwatch_core::topics::mqtt_readings_topic;
use vitalwatch_test_support::{self as ts, Device};

pub const WAIT: Duration = Duration::from_secs(60);

/// A configuration whose database, topics, groups and MQTT root belong to
/// this test alone.
pub async fn config() -> Config {
    ts::logs();
    let mut cfg = Config {
        database: ts::database().await,
        kafka: ts::kafka().await,
        mqtt: ts::mqtt(),
        ..Config::default()
    };
    cfg.writer.group_id = ts::unique("writer");
    cfg.writer.batch_max_wait_ms = 50;
    cfg.alerts.group_id = ts::unique("alerts");
    cfg.alerts.writer_group_id = cfg.writer.group_id.clone();
    cfg
}

pub struct Running {
    pub token: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
    pub readiness: Readiness,
}

pub fn start(services: &[Service], cfg: &Config) -> Running {
    let token = CancellationToken::new();
    let readiness = Readiness::new();
    let (services, cfg, t, r) = (
        services.to_vec(),
        cfg.clone(),
        token.clone(),
        readiness.clone(),
    );
    let task = tokio::spawn(async move { vitalwatch::run_services(&services, &cfg, r, t).await });
    Running {
        token,
        task,
        readiness,
    }
}

/// A `vitalwatch <service>` process of its own, pointed at `cfg`'s
/// services and names ([`Config::service_env`]) with its writer batching,
/// for tests that crash a service for real (SIGKILL: no destructor, no
/// goodbye to the broker). It is killed when dropped.
pub fn spawn_process(service: &str, cfg: &Config) -> Process {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_vitalwatch"));
    c.arg(service)
        .envs(cfg.service_env())
        .env("VITALWATCH_LOG", "warn")
        .env(
            "VITALWATCH_WRITER__BATCH_MAX_ROWS",
            cfg.writer.batch_max_rows.to_string(),
        )
        .env(
            "VITALWATCH_WRITER__BATCH_MAX_WAIT_MS",
            cfg.writer.batch_max_wait_ms.to_string(),
        );
    Process(
        c.spawn()
            .unwrap_or_else(|e| panic!("start vitalwatch {service}: {e}")),
    )
}

/// A child process, SIGKILLed (and reaped) when dropped.
pub struct Process(pub std::process::Child);

impl Process {
    /// SIGKILL, then reap.
    pub fn kill(mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reaped");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("services stop within 30 s")
            .expect("services task joined")
            .expect("services ended cleanly");
    }
}

/// Registers `device` for a new patient, starts `services` (with ingest
/// among them) and waits until ingest is subscribed; returns the patient id.
pub async fn start_with_device(
    cfg: &Config,
    device: &str,
    services: &[Service],
) -> (String, Running) {
    let patient = ts::unique("pat");
    register(cfg, device, &patient).await;
    let running = start(services, cfg);
    wait_until_ingest_subscribed(cfg).await;
    (patient, running)
}

/// Registers `device` and assigns it to `patient` since 30 days ago.
pub async fn register(cfg: &Config, device: &str, patient: &str) {
    register_since(
        cfg,
        device,
        Some(patient),
        Some(Utc::now() - chrono::Duration::days(30)),
    )
    .await;
}

pub async fn register_since(
    cfg: &Config,
    device: &str,
    patient: Option<&str>,
    since: Option<DateTime<Utc>>,
) {
    let e = vitalwatch::devices::Entry {
        device_id: device.into(),
        patient_id: patient.map(Into::into),
        kind: "test".into(),
        since,
    };
    vitalwatch::devices::register(&cfg.database, &[e])
        .await
        .expect("register device");
}

pub async fn count_rows(cfg: &Config, patient: &str) -> i64 {
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.query_one(
        "SELECT count(*) FROM readings WHERE patient_id = $1",
        &[&patient],
    )
    .await
    .expect("count")
    .get(0)
}

/// Publishes probes as the unregistered device `probe` until one comes out
/// of the dead-letter topic: from then on ingest's subscription is live and
/// no publish of the test can fall between the broker and a missing
/// subscriber.
pub async fn wait_until_ingest_subscribed(cfg: &Config) {
    use vitalwatch_bus::rdkafka::consumer::Consumer;
    let mut probe = Device::connect("probe").await;
    let consumer = vitalwatch_bus::consumer(&cfg.kafka, &ts::unique("probe")).expect("consumer");
    consumer
        .subscribe(&[cfg.kafka.deadletter_topic.as_str()])
        .expect("subscribe");
    let topic = mqtt_readings_topic(&cfg.mqtt.topic_root, "probe");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingest never subscribed"
        );
        // Distinct payloads, so that ingest does not take them for redeliveries.
        let n = tokio::time::Instant::now().elapsed().as_nanos();
        probe
            .publish(&topic, format!("{{\"seq\": {n}}}").into_bytes())
            .await;
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
            && ts::key(&m.detach()) == "probe"
        {
            break;
        }
    }
    probe.disconnect().await;
}

/// A time aligned to a 5-minute boundary about an hour ago, plus `secs`.
pub fn at(secs: i64) -> DateTime<Utc> {
    let base = (Utc::now().timestamp() / 300 - 12) * 300;
    Utc.timestamp_opt(base + secs, 0)
        .single()
        .expect("valid time")
}

pub fn json_batch(device: &str, seq: u64, readings: &[serde_json::Value]) -> Vec<u8> {
    serde_json::json!({"device_id": device, "seq": seq, "readings": readings})
        .to_string()
        .into_bytes()
}

pub fn hr(value: f64, t: DateTime<Utc>) -> serde_json::Value {
    serde_json::json!({"metric": "heart_rate", "value": value, "unit": "/min", "measured_at": t.to_rfc3339()})
}

/// GET `uri` from the API as nurse `nurse-test` (see [`grant`]).
pub async fn get_json(cfg: &Config, uri: &str) -> (StatusCode, serde_json::Value) {
    call(
        &api(cfg),
        "GET",
        uri,
        Some(&token("nurse-test", &["nurse"])),
        "",
    )
    .await
}

/// Puts `patient` on the panel of care team `test-ward`, whose member is
/// `nurse-test`.
pub async fn grant(cfg: &Config, patient: &str) {
    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    c.execute(
        "INSERT INTO patients (patient_id) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&patient],
    )
    .await
    .expect("patient");
    c.execute(
        "INSERT INTO care_teams VALUES ('test-ward', 'test ward') ON CONFLICT DO NOTHING",
        &[],
    )
    .await
    .expect("team");
    c.execute(
        "INSERT INTO care_team_members (team_id, subject) VALUES ('test-ward', 'nurse-test') ON CONFLICT DO NOTHING",
        &[],
    )
    .await
    .expect("member");
    c.execute(
        "INSERT INTO care_team_patients (team_id, patient_id) VALUES ('test-ward', $1) ON CONFLICT DO NOTHING",
        &[&patient],
    )
    .await
    .expect("panel");
}

pub const SECRET: &str = "the-integration-tests-shared-secret-32+";

pub fn token(subject: &str, roles: &[&str]) -> String {
    let claims = serde_json::json!({
        "sub": subject, "iss": "vitalwatch-local", "aud": "vitalwatch",
        "exp": Utc::now().timestamp() + 600, "roles": roles,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

pub fn api(cfg: &Config) -> axum::Router {
    let auth = vitalwatch_api::auth::Authenticator::new(&vitalwatch_api::auth::AuthConfig {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    })
    .expect("auth");
    let state = vitalwatch_api::AppState::new(
        vitalwatch_store::pool(&cfg.database).expect("pool"),
        vitalwatch_api::telemetry::metrics_handle(),
        10_000,
        vitalwatch_core::health::Readiness::new(),
    )
    .with_auth(auth)
    .with_listen_url(cfg.database.url.clone());
    vitalwatch_api::app(state)
}

pub async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    bearer: Option<&str>,
    body: &str,
) -> (axum::http::StatusCode, serde_json::Value) {
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
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// The API with its OpenAPI document: every answer is checked against
/// what the document says of that route and status.
pub struct Documented {
    pub app: axum::Router,
    pub doc: serde_json::Value,
}

impl Documented {
    pub async fn new(cfg: &Config) -> Documented {
        let app = api(cfg);
        let (status, doc) = call(&app, "GET", "/openapi.json", None, "").await;
        assert_eq!(status, 200, "the document is served");
        Documented { app, doc }
    }

    /// Calls `uri`, an instance of the document's `template`, and checks
    /// the status is documented and the body fits its schema.
    pub async fn call(
        &self,
        method: &str,
        template: &str,
        uri: &str,
        bearer: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let (status, v) = call(&self.app, method, uri, bearer, body).await;
        if let Err(e) =
            ts::openapi::check_response(&self.doc, method, template, status.as_u16(), &v)
        {
            panic!("{uri}: the answer is not what the document says: {e}\n{v}");
        }
        (status, v)
    }
}

/// The value of a Prometheus counter or gauge line, 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
}

pub fn urlenc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        .replace('+', "%2B")
}

/// Produces one batch to the readings topic, keyed by patient.
pub async fn produce(kafka: &KafkaConfig, producer: &Producer, b: &Batch) {
    vitalwatch_bus::deliver(
        producer,
        &kafka.readings_topic,
        &b.patient_id,
        &b.encode(),
        None,
        None,
        &Token::new(),
    )
    .await
    .expect("produce");
}

/// Commits offset 0 for `group` on every partition of the readings topic,
/// as an operator resetting the group would, and checks it took.
pub fn reset_offsets(kafka: &KafkaConfig, group: &str) {
    use vitalwatch_bus::rdkafka::consumer::CommitMode;
    let consumer = vitalwatch_bus::consumer(kafka, group).expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.partitions {
        tpl.add_partition_offset(&kafka.readings_topic, p, Offset::Offset(0))
            .expect("offset");
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("reset offsets");
    drop(consumer);
    assert!(
        committed_and_end(kafka, group).0.iter().all(|o| *o == 0),
        "offsets reset"
    );
}

/// The group's committed offset of every partition of the readings topic,
/// and the partitions' high watermarks.
pub fn committed_and_end(kafka: &KafkaConfig, group: &str) -> (Vec<i64>, Vec<i64>) {
    vitalwatch_test_support::committed_and_end(kafka, group)
        .expect("committed offsets and watermarks")
}

/// Records on the dead-letter topic (the sum of its high watermarks).
pub fn deadletters(kafka: &KafkaConfig) -> i64 {
    records_on(kafka, &kafka.deadletter_topic)
}

/// Records on `topic` (the sum of its high watermarks).
pub fn records_on(kafka: &KafkaConfig, topic: &str) -> i64 {
    let consumer = vitalwatch_bus::consumer(kafka, &ts::unique("probe")).expect("consumer");
    (0..kafka.partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .sum()
}
