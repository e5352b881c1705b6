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
use vitalwatch_bus::rdkafka::consumer::{CommitMode, Consumer};
use vitalwatch_bus::rdkafka::message::Message as _;
use vitalwatch_bus::rdkafka::{Offset, TopicPartitionList};
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
    let consumer = vitalwatch_bus::consumer(&cfg.kafka, &cfg.alerts.group_id).expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..cfg.kafka.partitions {
        tpl.add_partition_offset(&cfg.kafka.readings_topic, p, Offset::Offset(0))
            .expect("offset");
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("reset offsets");
    drop(consumer);
    assert!(
        committed_and_end(&cfg.kafka, &cfg.alerts.group_id)
            .0
            .iter()
            .all(|o| *o == 0),
        "offsets reset"
    );

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
