//! Integration tests of the whole pipeline, through the real services that
//! `deploy/local/test` starts: Mosquitto, tansu and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod alerts;
mod api;
mod ingest;
mod pipeline;
mod sim;
mod util;
mod writer;
