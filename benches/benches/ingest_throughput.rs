//! Ingest alone: MQTT in, Kafka out, against the local stack's Mosquitto and
//! tansu. Prints readings/s and the latency ingest adds (from receiving a
//! publish to Kafka acknowledging its record), p50 and p99.
//!
//! `deploy/local/bench --bench ingest_throughput`
//! (environment: BENCH_BATCHES, default 20000; BENCH_READINGS_PER_BATCH,
//! default 10; BENCH_DEVICES, 1 to 8, default 4; BENCH_RATE, batches/s
//! across all devices, default 0 = as fast as the broker takes them)

use std::time::{Duration, Instant};
use vitalwatch_benches::{env, metric};

use chrono::Utc;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;
use vitalwatch_core::health::Readiness;
use vitalwatch_core::topics::mqtt_readings_topic;
use vitalwatch_ingest::IngestConfig;
use vitalwatch_test_support::{self as ts, Device};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let batches = env("BENCH_BATCHES", 20_000);
    let per_batch = env("BENCH_READINGS_PER_BATCH", 10).max(1);
    let devices = env("BENCH_DEVICES", 4).clamp(1, 8);
    let rate = env("BENCH_RATE", 0);
    // Summaries (quantiles) rather than histograms: this run wants p50/p99.
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder)?;

    let db = ts::database().await;
    let kafka = ts::kafka().await;
    let mqtt = ts::mqtt();
    let mut client = vitalwatch_store::connect(&db.url).await?;
    let since = Some(Utc::now() - chrono::Duration::days(2));
    for d in 1..=devices {
        vitalwatch_store::registry::register_device(
            &mut client,
            &format!("test-dev-{d}"),
            "wearable",
            Some(&format!("bench-p{d}")),
            since,
        )
        .await?;
    }
    let token = CancellationToken::new();
    let readiness = Readiness::new();
    let ingest = {
        let (db, kafka, mqtt, token, readiness) = (
            db.clone(),
            kafka.clone(),
            mqtt.clone(),
            token.clone(),
            readiness.clone(),
        );
        tokio::spawn(async move {
            vitalwatch_ingest::run(
                &IngestConfig::default(),
                &mqtt,
                &kafka,
                &db,
                readiness,
                token,
            )
            .await
        })
    };
    while readiness.is_ready("ingest.mqtt") != Some(true) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // SubAck

    // Payloads built before the clock starts: distinct readings 100 ms apart,
    // all within the last day.
    let base = Utc::now() - chrono::Duration::days(1);
    let mut work: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); devices];
    for i in 0..batches {
        let d = i % devices + 1;
        let device = format!("test-dev-{d}");
        let readings: Vec<_> = (0..per_batch)
            .map(|k| {
                let t = base + chrono::Duration::milliseconds(100 * (i * per_batch + k) as i64);
                serde_json::json!({"metric": "heart_rate", "value": 60 + (k % 40), "measured_at": t.to_rfc3339()})
            })
            .collect();
        let payload = serde_json::json!({"device_id": device, "seq": i, "readings": readings})
            .to_string()
            .into_bytes();
        work[d - 1].push((mqtt_readings_topic(&mqtt.topic_root, &device), payload));
    }

    let total = (batches * per_batch) as f64;
    let started = Instant::now();
    let mut publishers = Vec::new();
    for (d, msgs) in work.into_iter().enumerate() {
        publishers.push(tokio::spawn(async move {
            let mut device = Device::connect(&format!("test-dev-{}", d + 1)).await;
            let per_device = rate as f64 / devices as f64;
            let start = Instant::now();
            for (n, (topic, payload)) in msgs.into_iter().enumerate() {
                if per_device > 0.0 {
                    let due = start + Duration::from_secs_f64(n as f64 / per_device);
                    tokio::time::sleep_until(due.into()).await;
                }
                device.publish(&topic, payload).await;
            }
            device.wait_acked(Duration::from_secs(600)).await;
            device.disconnect().await;
        }));
    }
    for p in publishers {
        p.await?;
    }
    eprintln!("  published and acknowledged by the broker");
    let published = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_report = Instant::now();
    let mut max_in_flight: f64 = 0.0;
    loop {
        let text = metrics.render();
        max_in_flight =
            max_in_flight.max(metric(&text, "vitalwatch_ingest_in_flight").unwrap_or(0.0));
        let done = metric(&text, "vitalwatch_ingest_accepted_readings_total").unwrap_or(0.0);
        if done >= total {
            break;
        }
        let rejected: f64 = text
            .lines()
            .filter(|l| l.starts_with("vitalwatch_ingest_rejected_total{"))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum();
        if rejected > 0.0 {
            return Err(format!(
                "{rejected} readings were rejected: the benchmark's payloads are wrong"
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err(format!("only {done} of {total} readings reached Kafka in time").into());
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            let received = metric(&text, "vitalwatch_ingest_received_total").unwrap_or(0.0);
            eprintln!("  … {done} of {total} readings in Kafka, {received} publishes received");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let text = metrics.render();
    let q = |p: &str| {
        metric(
            &text,
            &format!("vitalwatch_ingest_mqtt_to_kafka_seconds{{quantile=\"{p}\"}}"),
        )
        .unwrap_or(f64::NAN)
            * 1e3
    };
    let offered = if rate > 0 {
        format!("offered at {rate} batches/s")
    } else {
        "offered as fast as the broker takes them".into()
    };
    println!(
        "ingest alone: {batches} batches x {per_batch} readings from {devices} devices, JSON, MQTT QoS 1 -> Kafka acks=all, {offered}"
    );
    println!(
        "  all published and acknowledged by the broker in {:.2} s",
        published.as_secs_f64()
    );
    println!("  all in Kafka after {:.2} s", elapsed.as_secs_f64());
    println!(
        "  throughput: {:.0} readings/s ({:.0} batches/s)",
        total / elapsed.as_secs_f64(),
        batches as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  added latency (publish received -> Kafka ack): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        q("0.5"),
        q("0.99"),
        q("1")
    );
    println!("  most messages in ingest's window at once (sampled): {max_in_flight}");
    token.cancel();
    ingest.await??;
    Ok(())
}
