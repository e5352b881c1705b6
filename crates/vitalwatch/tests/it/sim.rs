//! The simulator through the real pipeline: every injected kind of
//! clinical event is caught and the scoring report is produced; load mode
//! loses nothing through a reconnect storm and times what it measures.

use std::time::Duration;

use chrono::Utc;
use vitalwatch::Service;
use vitalwatch_sim::generate::Plan;
use vitalwatch_sim::load::Load;
use vitalwatch_sim::model::EventKind;
use vitalwatch_sim::replay::{Broker, Pace, pipeline_alerts, replay};
use vitalwatch_sim::scenario::{Conditions, EventRates, Faults, PlacedEvent, Scenario};
use vitalwatch_sim::score::{naive, score};
use vitalwatch_test_support as ts;

use crate::util::*;

/// Registers a simulated cohort's devices (`registry` CSV), starts ingest,
/// writer and alerts, and returns them with the simulator's gateway account.
async fn start_cohort(cfg: &vitalwatch::Config, registry: &str) -> (Running, Broker) {
    let entries = vitalwatch::devices::parse_csv(registry).expect("the registry CSV parses");
    vitalwatch::devices::register(&cfg.database, &entries)
        .await
        .expect("register");
    let running = start(&[Service::Ingest, Service::Writer, Service::Alerts], cfg);
    wait_until_ingest_subscribed(cfg).await;
    let (host, port) = ts::mqtt_host_port();
    let broker =
        Broker::local_gateway(host, port, ts::mqtt_password(), cfg.mqtt.topic_root.clone());
    (running, broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accelerated_cohort_has_every_event_kind_detected_and_scored() {
    let mut cfg = config().await;
    cfg.alerts.missing_check_seconds = 5;
    let start = Utc::now() - chrono::Duration::days(6);
    // Events at fixed hours of the patients' day, whatever the time the
    // test runs: values follow the circadian rhythm (systolic ±7 mmHg), so
    // an event placed by scenario hour alone crossed its rule's threshold
    // at some times of day and not at others.
    let start_of_day = start.timestamp().rem_euclid(86_400) as f64 / 3600.0;
    let placed = |patient, kind, day: f64, hour_of_day: f64| PlacedEvent {
        patient,
        kind,
        start_hours: day * 24.0 + (hour_of_day - start_of_day).rem_euclid(24.0),
    };
    let scenario = Scenario {
        seed: 42,
        patients: 5,
        days: 6.0,
        prefix: ts::unique("sim").replace('_', "-"),
        // Heart failure: every patient has every device.
        conditions: Conditions {
            healthy: 0.0,
            hypertension: 0.0,
            heart_failure: 1.0,
            copd: 0.0,
            post_surgical: 0.0,
        },
        events: EventRates {
            hypoxaemia: 0.0,
            hypertensive_crisis: 0.0,
            heart_failure_decompensation: 0.0,
            sepsis: 0.0,
            tachycardia: 0.0,
        },
        event: vec![
            placed(0, EventKind::Hypoxaemia, 1.0, 4.0),
            placed(1, EventKind::HypertensiveCrisis, 1.0, 12.0),
            placed(2, EventKind::HeartFailureDecompensation, 0.0, 12.0),
            placed(3, EventKind::Sepsis, 2.0, 0.0),
            placed(4, EventKind::Tachycardia, 2.0, 12.0),
        ],
        faults: Faults {
            silent: 0.0,
            ..Faults::default()
        },
        ..Scenario::default()
    };
    let plan = Plan::new(&scenario, start);
    let (running, broker) = start_cohort(&cfg, &plan.registry_csv()).await;
    let replayed = replay(&plan, &broker, Pace::Fast, |_| {})
        .await
        .expect("replayed");
    assert!(
        replayed.published > 5_000 && replayed.duplicates > 0 && replayed.unknown > 0,
        "{replayed:?}"
    );
    ts::eventually(
        WAIT * 3,
        "writer and engine to take every record",
        || async {
            let (w, we) = committed_and_end(&cfg.kafka, &cfg.writer.group_id);
            let (a, ae) = committed_and_end(&cfg.kafka, &cfg.alerts.group_id);
            (w == we && a == ae && we.iter().sum::<i64>() > 0).then_some(())
        },
    )
    .await;

    let c = vitalwatch_store::connect(&cfg.database.url)
        .await
        .expect("db");
    let alerts = pipeline_alerts(&c, &scenario.prefix).await.expect("alerts");
    let patient_days = 5.0 * 6.0;
    let report = score(&plan.truth, &alerts, patient_days);
    let baseline = score(&plan.truth, &naive(plan.sends()), patient_days);
    let text = format!(
        "{}\n{}",
        report.render("vitalwatch"),
        baseline.render("naive")
    );
    for kind in [
        EventKind::Hypoxaemia,
        EventKind::HypertensiveCrisis,
        EventKind::HeartFailureDecompensation,
        EventKind::Sepsis,
        EventKind::Tachycardia,
    ] {
        let k = report
            .kinds
            .iter()
            .find(|k| k.kind == kind)
            .unwrap_or_else(|| panic!("{kind:?} scored\n{text}"));
        assert_eq!((k.events, k.detected), (1, 1), "{kind:?} detected\n{text}");
        assert!(k.median_minutes.is_some_and(|m| m >= 0.0), "{text}");
    }
    assert!(report.alerts >= 5 && report.true_alerts >= 5, "{text}");
    assert!(
        (0.0..=1.0).contains(&report.precision) && report.alerts_per_patient_day > 0.0,
        "{text}"
    );
    let json = serde_json::to_value(&report).expect("json");
    for field in [
        "kinds",
        "alerts",
        "true_alerts",
        "precision",
        "patient_days",
        "alerts_per_patient_day",
        "unneeded_by_rule",
    ] {
        assert!(json.get(field).is_some(), "{field} in the report");
    }
    assert!(baseline.alerts > 0, "the naive baseline alarms too\n{text}");
    println!("{text}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_mode_over_one_connection_per_device_survives_a_reconnect_storm_without_loss() {
    let cfg = config().await;
    let load = Load {
        devices: 40,
        rate: 400.0,
        batch: 4,
        connections: None,
        duration: Duration::from_secs(12),
        prefix: ts::unique("load").replace('_', "-"),
        storm_every: Some(Duration::from_secs(5)),
        storm_share: 0.5,
        alert_probes: 2,
        alert_probe_interval: Duration::from_millis(300),
        row_probe_interval: Duration::from_millis(50),
        ..Load::default()
    };
    let (running, broker) = start_cohort(&cfg, &load.registry_csv()).await;
    let mut lines = 0;
    let report = vitalwatch_sim::load::run(&load, &broker, Some(&cfg.database.url), |_| lines += 1)
        .await
        .expect("the load ran");
    let text = report.render();
    println!("{text}");
    assert_eq!(report.connections, 40, "{text}");
    assert!(lines >= 2, "a progress line every 5 s");
    // 40 devices × 4 readings every 400 ms for 12 s.
    assert_eq!(
        report.readings_published,
        report.uploads_published * 4,
        "{text}"
    );
    assert!((1000..=1300).contains(&report.uploads_published), "{text}");
    assert!(report.achieved_rate > 300.0, "{text}");
    assert_eq!(
        report.uploads_acknowledged, report.uploads_published,
        "{text}"
    );
    assert_eq!(report.storms, 2, "{text}");
    assert!(report.reconnects >= 20, "half of 40 links, twice: {text}");
    assert_eq!(report.stored, Some(report.readings_acknowledged), "{text}");
    assert_eq!(report.lost, Some(0), "{text}");
    let rows = report.row_latency.clone().expect("row probes timed");
    assert!(
        rows.samples >= 100 && report.row_probes_unseen == 0,
        "{text}"
    );
    assert!(
        rows.p50_ms > 0.0 && rows.p50_ms <= rows.p99_ms && rows.p99_ms <= rows.max_ms,
        "{text}"
    );
    let alerts = report.alert_latency.clone().expect("alert probes timed");
    assert!(
        alerts.samples >= 5 && report.alert_probes_unseen == 0,
        "{text}"
    );

    // Again, on the same devices and probe patients: what the first run
    // left (alerts, rows, sequence numbers) neither confuses the probes nor
    // counts as stored.
    let again = Load {
        duration: Duration::from_secs(5),
        storm_every: None,
        connections: Some(3),
        ..load
    };
    let report = vitalwatch_sim::load::run(&again, &broker, Some(&cfg.database.url), |_| {})
        .await
        .expect("the second load ran");
    let text = report.render();
    println!("{text}");
    assert_eq!(report.connections, 3, "{text}");
    assert_eq!(report.stored, Some(report.readings_acknowledged), "{text}");
    assert!(report.readings_acknowledged >= 1500, "{text}");
    assert!(
        report.alert_probes_unseen == 0 && report.alert_latency.is_some_and(|p| p.samples >= 2),
        "{text}"
    );
    running.stop().await;
}
