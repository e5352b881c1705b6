//! The device simulator: cohorts that behave like home-monitored patients,
//! and a score for how well the alert engine served them.
//!
//! - [`scenario`]: what a run is (cohort, devices, events, faults), from TOML.
//! - [`model`]: baselines by condition, circadian rhythm, noise, what each
//!   kind of clinical event does to the values.
//! - [`generate`]: the plan (patients, devices, events, ground truth) and
//!   the batches the devices send, lazily, in send order, byte-identical
//!   for a seed.
//! - [`replay`]: publishing a plan over MQTT, accelerated or live; reading back the
//!   pipeline's alerts.
//! - [`score`]: alerts against the ground truth, and the naive baseline.
//! - [`load`]: many devices at a target rate over many connections, with
//!   reconnect storms; publish-to-row and publish-to-alert latency read
//!   from the pipeline's database; stored against acknowledged readings.
#![forbid(unsafe_code)]

pub mod generate;
pub mod load;
pub mod model;
pub mod replay;
pub mod scenario;
pub mod score;

/// Payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Protobuf,
}
