//! Publish-to-alert latency: from a device's MQTT publish of an abnormal
//! reading to the nurse's server-sent event, through the whole pipeline
//! (Mosquitto, ingest, tansu, the rules engine, PostgreSQL, the outbox
//! notification, the API's stream), while background devices send a steady
//! load of normal readings. Every service runs in this process, against the
//! local stack.
//!
//! `deploy/local/bench --bench alert_latency`
//! (environment: BENCH_PATIENTS, background patients, default 5000, each
//! wearing a monitor that measures heart rate and SpO2 every second and
//! uploads 5 seconds of them at a time, so 2 readings/s per patient and
//! 10,000 readings/s by default; BENCH_PROBES, default 100;
//! BENCH_PROBE_INTERVAL_MS, default 500; BENCH_FETCH_WAIT_MS and
//! BENCH_BATCH_WAIT_MS, the alerts engine's `fetch_wait_ms` and
//! `batch_max_wait_ms`, default theirs; BENCH_LINGER_MS, the producers'
//! `linger.ms`, default 5)
//!
//! Each probe is one body-temperature reading of a patient of the nurse's
//! care team: 39.0 °C raises the default `fever` rule, the next probe's
//! 36.8 °C resolves it; both changes are timed. The first 4 probes (the
//! patient's rebuild, cold caches) are not counted.

use std::time::{Duration, Instant};
use vitalwatch_benches::{env, metric};

use axum::body::Body;
use chrono::Utc;
use http_body_util::BodyExt;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use vitalwatch::{Config, Service};
use vitalwatch_core::health::Readiness;
use vitalwatch_core::topics::mqtt_readings_topic;
use vitalwatch_test_support::{self as ts, Device};

const SECRET: &str = "alert-latency-bench-secret-32-bytes+";
/// Seconds of readings in one upload.
const UPLOAD_SECONDS: i64 = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

/// Reads `alert` events of the stream; returns (patient, state) of the next one.
struct Stream {
    body: Body,
    buf: String,
}

impl Stream {
    async fn next(&mut self, timeout: Duration) -> Option<(String, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let v: serde_json::Value = serde_json::from_str(data).ok()?;
                    return Some((
                        v["patient_id"].as_str()?.to_owned(),
                        v["state"].as_str()?.to_owned(),
                    ));
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

/// The alerts service alone, so that the bench can restart it.
fn start_alerts(
    cfg: &Config,
    readiness: Readiness,
    token: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let cfg = cfg.clone();
    tokio::spawn(async move {
        vitalwatch::run_services(&[Service::Alerts], &cfg, readiness, token).await
    })
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let patients = env("BENCH_PATIENTS", 5_000).max(1);
    let rate = patients * 2;
    let probes = env("BENCH_PROBES", 100).max(6);
    let interval = Duration::from_millis(env("BENCH_PROBE_INTERVAL_MS", 500) as u64);
    // Summaries over the last 30 s (3 buckets of 10 s), kept up to date
    // every second, so the hop figures are those of the probing.
    let recorder = PrometheusBuilder::new()
        .set_bucket_duration(Duration::from_secs(10))?
        .build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                metrics.run_upkeep();
            }
        });
    }

    let mut cfg = Config {
        database: ts::database().await,
        kafka: ts::kafka().await,
        mqtt: ts::mqtt(),
        ..Config::default()
    };
    cfg.writer.group_id = ts::unique("writer");
    cfg.alerts.group_id = ts::unique("alerts");
    cfg.alerts.writer_group_id = cfg.writer.group_id.clone();
    cfg.alerts.fetch_wait_ms = env("BENCH_FETCH_WAIT_MS", cfg.alerts.fetch_wait_ms as usize) as u64;
    cfg.alerts.batch_max_wait_ms =
        env("BENCH_BATCH_WAIT_MS", cfg.alerts.batch_max_wait_ms as usize) as u64;
    if let Ok(linger) = std::env::var("BENCH_LINGER_MS") {
        // Every producer's, ingest's among them.
        cfg.kafka.properties.insert("linger.ms".into(), linger);
    }
    cfg.api.auth.hs256_secret = Some(SECRET.into());
    let mut client = vitalwatch_store::connect(&cfg.database.url).await?;
    vitalwatch_store::registry::register_device(
        &mut client,
        "test-dev-1",
        "thermometer",
        Some("bench-probe"),
        Some(Utc::now() - chrono::Duration::days(2)),
    )
    .await?;
    // The background cohort, in three statements.
    client
        .execute(
            "WITH p AS (SELECT format('bench-p-%s', i) AS patient, format('bench-d-%s', i) AS device FROM generate_series(1, $1::int) i),
                  pat AS (INSERT INTO patients (patient_id) SELECT patient FROM p),
                  dev AS (INSERT INTO devices (device_id, kind) SELECT device, 'wearable' FROM p)
             INSERT INTO device_assignments (device_id, patient_id, assigned_at) SELECT device, patient, now() - interval '2 days' FROM p",
            &[&(patients as i32)],
        )
        .await?;
    client
        .batch_execute(
            "INSERT INTO care_teams VALUES ('bench', 'bench');
             INSERT INTO care_team_patients (team_id, patient_id) VALUES ('bench', 'bench-probe');
             INSERT INTO care_team_members (team_id, subject) VALUES ('bench', 'nurse-bench');",
        )
        .await?;

    let token = CancellationToken::new();
    let readiness = Readiness::new();
    let services = {
        let (cfg, token, readiness) = (cfg.clone(), token.clone(), readiness.clone());
        tokio::spawn(async move {
            vitalwatch::run_services(&[Service::Ingest, Service::Writer], &cfg, readiness, token)
                .await
        })
    };
    let alerts_token = token.child_token();
    let alerts = start_alerts(&cfg, readiness.clone(), alerts_token.clone());
    while readiness.is_ready("ingest.mqtt") != Some(true) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // SubAck
    eprintln!("  services up");

    let auth = vitalwatch_api::auth::Authenticator::new(&cfg.api.auth)?;
    let state = vitalwatch_api::AppState::new(
        vitalwatch_store::pool(&cfg.database)?,
        metrics.clone(),
        10_000,
        readiness.clone(),
    )
    .with_auth(auth)
    .with_listen_url(cfg.database.url.clone())
    .with_shutdown(token.clone());
    let bearer = vitalwatch_api::auth::mint_local(
        &cfg.api.auth,
        "nurse-bench",
        &["nurse".into()],
        chrono::Duration::hours(1),
    )?;
    let request = axum::http::Request::get("/v1/alerts/stream")
        .header("authorization", format!("Bearer {bearer}"))
        .body(Body::empty())?;
    let response = vitalwatch_api::app(state).oneshot(request).await?;
    if !response.status().is_success() {
        return Err(format!("the alert stream answered {}", response.status()).into());
    }
    let mut stream = Stream {
        body: response.into_body(),
        buf: String::new(),
    };
    eprintln!("  alert stream open");

    // Background load: every patient's monitor uploads its last 5 seconds
    // (heart rate and SpO2 each second) every 5 seconds, the uploads spread
    // evenly, through one gateway connection.
    let load = CancellationToken::new();
    let loader = {
        let (load, root) = (load.clone(), cfg.mqtt.topic_root.clone());
        tokio::spawn(async move {
            let mut gateway = Device::connect("sim-gateway").await;
            let uploads_per_second = patients as f64 / UPLOAD_SECONDS as f64;
            let start = Instant::now();
            let mut n = 0_u64;
            while !load.is_cancelled() {
                let due = start + Duration::from_secs_f64(n as f64 / uploads_per_second);
                tokio::time::sleep_until(due.into()).await;
                let device_id = format!("bench-d-{}", n as usize % patients + 1);
                let end = Utc::now() - chrono::Duration::seconds(1);
                let mut readings = Vec::with_capacity(2 * UPLOAD_SECONDS as usize);
                for s in 0..UPLOAD_SECONDS {
                    let t = (end - chrono::Duration::seconds(s)).to_rfc3339();
                    readings.push(serde_json::json!({"metric": "heart_rate", "value": 64 + (n + s as u64) % 20, "measured_at": t}));
                    readings.push(serde_json::json!({"metric": "spo2", "value": 95 + (n + s as u64) % 4, "measured_at": t}));
                }
                let payload =
                    serde_json::json!({"device_id": device_id, "seq": n, "readings": readings})
                        .to_string();
                gateway
                    .publish(&mqtt_readings_topic(&root, &device_id), payload)
                    .await;
                n += 1;
            }
            gateway.wait_acked(Duration::from_secs(120)).await;
            gateway.disconnect().await;
            n
        })
    };
    tokio::time::sleep(Duration::from_secs(10)).await; // every patient rebuilt once, the load settled
    eprintln!("  background load running");

    let probe_id = "test-dev-1".to_owned();
    let probe_topic = mqtt_readings_topic(&cfg.mqtt.topic_root, &probe_id);
    let mut probe = Device::connect(&probe_id).await;
    let accepted_before = metric(
        &metrics.render(),
        "vitalwatch_ingest_accepted_readings_total",
    )
    .unwrap_or(0.0);
    let load_started = Instant::now();
    let mut latencies = Vec::with_capacity(probes);
    for i in 0..probes {
        let (value, want) = if i % 2 == 0 {
            (39.0, "raised")
        } else {
            (36.8, "resolved")
        };
        let payload = serde_json::json!({"device_id": probe_id, "seq": i,
            "readings": [{"metric": "body_temperature", "value": value, "unit": "Cel", "measured_at": Utc::now().to_rfc3339()}]})
        .to_string();
        let sent = Instant::now();
        probe.publish(&probe_topic, payload).await;
        loop {
            match stream.next(Duration::from_secs(60)).await {
                Some((patient, state)) if patient == "bench-probe" && state == want => break,
                Some(_) => {}
                None => return Err(format!("probe {i}: no {want} event within 60 s").into()),
            }
        }
        eprintln!(
            "  probe {i}: {want} after {:.1} ms",
            sent.elapsed().as_secs_f64() * 1e3
        );
        if i >= 4 {
            latencies.push(sent.elapsed());
        }
        tokio::time::sleep_until((sent + interval).into()).await;
    }
    let measured = load_started.elapsed();
    // Where the time goes, over the background load's records too, during
    // the last 30 s of probing.
    let hops = {
        let text = metrics.render();
        let q = |name: &str, p: &str| {
            metric(&text, &format!("{name}{{quantile=\"{p}\"}}")).map_or(f64::NAN, |s| s * 1e3)
        };
        [
            (
                "device publish -> Kafka ack (ingest)",
                "vitalwatch_ingest_mqtt_to_kafka_seconds",
            ),
            (
                "ingest receipt -> engine's fetch",
                "vitalwatch_alerts_record_lag_seconds",
            ),
            (
                "storing a batch's changes",
                "vitalwatch_alerts_store_seconds",
            ),
        ]
        .map(|(what, name)| {
            format!(
                "{what}: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
                q(name, "0.5"),
                q(name, "0.99"),
                q(name, "0.999")
            )
        })
    };
    let accepted = metric(
        &metrics.render(),
        "vitalwatch_ingest_accepted_readings_total",
    )
    .unwrap_or(0.0)
        - accepted_before;

    // Restart the engine under load: every patient is rebuilt from the
    // store (overrides, open alerts, the readings of each rule's window)
    // when their next upload arrives.
    let rebuilds =
        |text: &str| metric(text, "vitalwatch_alerts_rebuild_seconds_count").unwrap_or(0.0);
    let replayed =
        |text: &str| metric(text, "vitalwatch_alerts_rebuild_readings_total").unwrap_or(0.0);
    alerts_token.cancel();
    let _ = alerts.await;
    let before = metrics.render();
    let restarted = Instant::now();
    let alerts_token = token.child_token();
    let alerts = start_alerts(&cfg, readiness.clone(), alerts_token.clone());
    let target = rebuilds(&before) + patients as f64;
    let rebuilt_in = loop {
        let text = metrics.render();
        if rebuilds(&text) >= target {
            break restarted.elapsed();
        }
        if restarted.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "only {} of {patients} patients rebuilt in 300 s",
                rebuilds(&text) - rebuilds(&before)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after = metrics.render();
    let replayed_readings = replayed(&after) - replayed(&before);
    alerts_token.cancel();
    let _ = alerts.await;
    load.cancel();
    let sent_batches = loader.await?;
    probe.disconnect().await;
    token.cancel();
    let _ = services.await;

    latencies.sort();
    let q = |p: f64| {
        latencies[((latencies.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
    };
    println!(
        "publish-to-alert latency (device MQTT publish -> nurse's SSE event), ingest + writer + alerts + API in one process, {patients} background patients; alerts fetch wait {} ms, batch wait {} ms",
        cfg.alerts.fetch_wait_ms, cfg.alerts.batch_max_wait_ms
    );
    println!(
        "  background load offered {rate} readings/s; ingest accepted {:.0} readings/s while probing ({sent_batches} uploads sent in all)",
        accepted / measured.as_secs_f64()
    );
    println!(
        "  {} changes timed (raise and resolve alternately): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
    for hop in hops {
        println!("  {hop}");
    }
    println!(
        "  engine restarted under load: all {patients} patients rebuilt from the store in {:.1} s ({replayed_readings:.0} readings replayed, {:.0} per patient; each patient's first upload after the restart waits for its rebuild)",
        rebuilt_in.as_secs_f64(),
        replayed_readings / patients as f64
    );
    Ok(())
}
