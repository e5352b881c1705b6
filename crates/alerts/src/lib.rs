//! alerts: **placeholder**. The rules engine (thresholds, sustained and
//! rate-of-change rules, missing data, NEWS2, the alert lifecycle) is not
//! built yet and raises no alerts. Built so far, as pure functions not yet
//! wired to the service:
//! - [`series`]: a rule judged on one series on event time, with late and
//!   out-of-order readings (see its known gaps: not ready to wire yet);
//! - [`threshold`]: single, sustained and k-of-n thresholds with
//!   hysteresis, artifacts ignored;
//! - [`rate`]: rate of change within a window;
//! - [`missing`]: overdue data on wall-clock time;
//! - [`news2`]: the NEWS2 chart, and assembling a patient's observations
//!   from fresh readings;
//! - [`rules`]: the configured rule set, checked and compiled, its
//!   defaults, and deterministic alert ids;
//! - [`engine`]: every patient's rule states fed `rpm.readings.v1`
//!   batches, giving alert changes (raised, severity changed, cleared).
//!
//! What it does now: joins its own consumer group on `rpm.readings.v1`,
//! decodes every batch, counts readings per metric
//! (`vitalwatch_alerts_readings_seen_total`), and commits offsets about once
//! a second, so that the service, its group and its lag exist and can be
//! watched while the engine is written.
#![forbid(unsafe_code)]

pub mod engine;
pub mod missing;
pub mod news2;
pub mod rate;
pub mod rules;
pub mod series;
pub mod threshold;

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use vitalwatch_bus::rdkafka::consumer::{CommitMode, Consumer};
use vitalwatch_bus::rdkafka::{Message, Offset, TopicPartitionList};
use vitalwatch_bus::{BusError, KafkaConfig};
use vitalwatch_core::reading::Batch;

/// `[alerts]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Consumer group. Default `vitalwatch-alerts`.
    pub group_id: String,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            group_id: "vitalwatch-alerts".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Kafka(#[from] vitalwatch_bus::rdkafka::error::KafkaError),
}

/// Consumes until `shutdown` fires; commits what it has seen.
pub async fn run(
    cfg: &AlertsConfig,
    kafka: &KafkaConfig,
    shutdown: CancellationToken,
) -> Result<(), AlertsError> {
    let consumer = vitalwatch_bus::consumer(kafka, &cfg.group_id)?;
    consumer.subscribe(&[kafka.readings_topic.as_str()])?;
    tracing::warn!(
        "alerts is a placeholder: it consumes readings but evaluates no rules and raises no alerts"
    );
    let mut seen: HashMap<(String, i32), i64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            m = consumer.recv() => match m {
                Ok(m) => {
                    seen.insert((m.topic().to_owned(), m.partition()), m.offset());
                    match Batch::decode(m.payload().unwrap_or_default()) {
                        Ok(b) => for r in &b.readings {
                            metrics::counter!("vitalwatch_alerts_readings_seen_total", "metric" => r.metric.name()).increment(1);
                        },
                        Err(e) => tracing::warn!(error = %e, "record is not a valid batch (the writer dead-letters it)"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "kafka consume error"),
            },
            _ = tick.tick() => commit(&consumer, &mut seen, CommitMode::Async)?,
            () = shutdown.cancelled() => break,
        }
    }
    commit(&consumer, &mut seen, CommitMode::Sync)?;
    Ok(())
}

fn commit(
    consumer: &impl Consumer,
    seen: &mut HashMap<(String, i32), i64>,
    mode: CommitMode,
) -> Result<(), AlertsError> {
    if seen.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in seen.drain() {
        tpl.add_partition_offset(&t, p, Offset::Offset(o + 1))?;
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "offset commit failed");
    }
    Ok(())
}
