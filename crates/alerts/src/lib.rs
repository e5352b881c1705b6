//! alerts: the rules engine that tells nurses when a patient needs
//! attention.
//!
//! Pure parts (no I/O; tested and benchmarked alone):
//! - [`series`]: a rule judged on one series on event time, with late and
//!   out-of-order readings, respecting what was already told;
//! - `packed` (private): the readings a series keeps, delta-encoded in a
//!   few bytes each;
//! - [`threshold`]: single, sustained and k-of-n thresholds with
//!   hysteresis, artifacts ignored;
//! - [`rate`]: rate of change within a window;
//! - [`missing`]: overdue data on wall-clock time;
//! - [`news2`]: the NEWS2 chart, and assembling a patient's observations
//!   from fresh readings;
//! - [`rules`]: the configured rule set, checked and compiled, its
//!   defaults, per-patient overrides, and deterministic alert ids;
//! - [`engine`]: every patient's rule states fed `rpm.readings.v1`
//!   batches, giving alert changes (raised, severity changed, cleared).
//!
//! The service ([`service`]): consumes the readings topic, rebuilds a
//! patient's windows from the store before judging them, writes alert
//! changes with their outbox rows, commits offsets after, publishes the
//! outbox to `rpm.alerts.v1`, escalates unacknowledged alerts, and sends
//! every change to signed webhooks ([`webhooks`]).
#![forbid(unsafe_code)]

pub mod engine;
pub mod missing;
pub mod news2;
mod packed;
pub mod rate;
pub mod rules;
pub mod series;
pub mod service;
pub mod threshold;
pub mod webhooks;

use serde::Deserialize;
use vitalwatch_bus::BusError;

/// `[alerts]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Consumer group. Default `vitalwatch-alerts`.
    pub group_id: String,
    /// The writer's consumer group: before rebuilding a patient from the
    /// store, the engine waits until the writer has stored what this group
    /// has consumed. Default `vitalwatch-writer`.
    pub writer_group_id: String,
    /// How long to wait for the writer before rebuilding from what is
    /// stored, in milliseconds. Default 10000.
    pub rebuild_wait_ms: u64,
    /// How late (event time, behind the newest reading of a series) a
    /// reading may arrive and still be judged, in minutes. Rules with longer
    /// windows keep those. Default 60.
    pub late_minutes: u32,
    /// A raised alert nobody acknowledged is escalated one level after this
    /// many minutes, and again after as many more. Default 15.
    pub escalate_after_minutes: u32,
    /// Highest escalation level. Default 2.
    pub max_escalation_level: i16,
    /// How often missing-data rules are checked, in seconds. Default 60.
    pub missing_check_seconds: u64,
    /// Readings kept per patient of each series, at most, once for all
    /// the rules judging it with the same horizon (and of each NEWS2
    /// parameter and NEWS2's score): a reading is judged late only against
    /// what is kept, so on a dense stream this, not `late_minutes`, bounds
    /// how late it may be (600 readings are 10 minutes of a 1 Hz wearable,
    /// 50 hours of a reading every 5 minutes). It bounds the engine's
    /// memory per patient whatever the devices' rate (but for a
    /// rate-of-change rule's state, which holds its window's readings).
    /// Default 600.
    pub max_points_per_series: usize,
    /// How long a fetch of the readings waits for records, at most, in
    /// milliseconds. Apache Kafka answers as soon as records are there;
    /// tansu 0.6 holds every fetch this long, which is then part of every
    /// alert's latency. Default 10.
    pub fetch_wait_ms: u64,
    /// Records judged together (one transaction of alert changes), at
    /// most. A batch takes the records that have arrived by the time it
    /// starts (so under load batches grow by themselves). Default 500.
    pub batch_max_records: usize,
    /// How long a batch waits for more records after its first, in
    /// milliseconds. Default 0: none, since every millisecond here is part
    /// of every alert's latency.
    pub batch_max_wait_ms: u64,
    /// The rules (`[[alerts.rules]]`); [`rules::default_rules`] when absent.
    pub rules: Option<Vec<rules::RuleConfig>>,
    /// Signed webhooks (`[[alerts.webhooks]]`), each sent every alert change.
    pub webhooks: Vec<webhooks::WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            group_id: "vitalwatch-alerts".into(),
            writer_group_id: "vitalwatch-writer".into(),
            rebuild_wait_ms: 10_000,
            late_minutes: 60,
            escalate_after_minutes: 15,
            max_escalation_level: 2,
            missing_check_seconds: 60,
            max_points_per_series: 600,
            fetch_wait_ms: 10,
            batch_max_records: 500,
            batch_max_wait_ms: 0,
            rules: None,
            webhooks: Vec::new(),
        }
    }
}

impl AlertsConfig {
    /// Checks the settings and compiles the rules; `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.escalate_after_minutes == 0 {
            return Err("alerts.escalate_after_minutes must be at least 1".into());
        }
        if self.max_points_per_series == 0 {
            return Err("alerts.max_points_per_series must be at least 1".into());
        }
        if self.max_escalation_level < 0 {
            return Err("alerts.max_escalation_level must not be negative".into());
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate()?;
            if self.webhooks[..i].iter().any(|o| o.name == w.name) {
                return Err(format!("alerts webhook {:?} is defined twice", w.name));
            }
        }
        rules::compile(self.rules.as_deref().unwrap_or(&rules::default_rules())).map(|_| ())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Kafka(#[from] vitalwatch_bus::rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] vitalwatch_store::StoreError),
    #[error("{0}")]
    Config(String),
}

pub use service::run;
