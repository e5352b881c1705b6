//! The vitalwatch data contract, shared by every service.
//!
//! Nothing in this crate does I/O: it is the pure part of the pipeline, tested
//! exhaustively and benchmarked alone.
//!
//! - [`proto`]: the `rpm.v1` protobuf messages generated from `proto/rpm/v1`.
//! - [`catalogue`]: every metric we accept, with its LOINC code, stored UCUM
//!   unit, accepted units and plausible range.
//! - [`payload`]: decoding a device payload (protobuf or JSON) into a
//!   [`payload::DeviceBatch`] of unvalidated readings.
//! - [`validate`]: turning those into validated [`reading::Reading`]s in stored
//!   units, or a [`validate::Rejection`] with a machine-readable reason.
//! - [`reading`]: the validated domain types and their encoding as the value of
//!   a `rpm.readings.v1` record.
//! - [`topics`]: the names on the wire (MQTT and Kafka topics).
//! - [`health`]: readiness conditions shared by the services of a process.
//! - [`config`]: loading typed configuration from TOML plus `VITALWATCH_*`
//!   environment variables.
#![forbid(unsafe_code)]

pub mod catalogue;
pub mod config;
pub mod health;
pub mod payload;
pub mod reading;
pub mod topics;
pub mod validate;

/// Messages generated from `proto/rpm/v1/*.proto`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/rpm.v1.rs"));
}
