//! The `vitalwatch` command: configuration, and the glue that runs one
//! service or all of them.
//!
//! - [`Config`]: the whole typed configuration, one section per service.
//! - [`run_service`]: runs a [`Service`] until the shutdown token fires.
//! - [`migrate`], [`create_topics`], [`devices`]: set-up tasks.
//!
//! `main.rs` only parses arguments, starts logging, and maps errors to exit
//! codes.
#![forbid(unsafe_code)]

pub mod devices;

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use vitalwatch_alerts::AlertsConfig;
use vitalwatch_api::ApiConfig;
use vitalwatch_bus::KafkaConfig;
use vitalwatch_core::health::Readiness;
use vitalwatch_ingest::{IngestConfig, MqttConfig};
use vitalwatch_store::DatabaseConfig;
use vitalwatch_writer::WriterConfig;

/// Every setting, from a TOML file and `VITALWATCH_*` variables (see
/// `vitalwatch_core::config`). Each section's defaults fit the local stack
/// that `deploy/local/up` starts.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub mqtt: MqttConfig,
    pub ingest: IngestConfig,
    pub writer: WriterConfig,
    pub alerts: AlertsConfig,
    pub api: ApiConfig,
}

impl Config {
    /// Loads from `file` (if any) and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, vitalwatch_core::config::ConfigError> {
        vitalwatch_core::config::load(file, std::env::vars())
    }

    /// Checks settings that depend on each other.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.database.validate()?;
        self.alerts.validate().map_err(anyhow::Error::msg)?;
        vitalwatch_api::auth::Authenticator::new(&self.api.auth).map_err(anyhow::Error::msg)?;
        let window = i64::from(vitalwatch_store::storage::REFRESH_WINDOW_DAYS);
        if self.ingest.max_age_days >= window {
            anyhow::bail!(
                "ingest.max_age_days = {} must be below {window}: older readings would miss the trend aggregates' refresh window",
                self.ingest.max_age_days
            );
        }
        Ok(())
    }
}

/// One of the long-running services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ingest,
    Writer,
    Alerts,
    Api,
}

/// Runs `service` until `shutdown` fires or it fails.
/// `readiness` collects the conditions of every service in the process.
pub async fn run_service(
    service: Service,
    cfg: &Config,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match service {
        Service::Ingest => {
            vitalwatch_ingest::run(
                &cfg.ingest,
                &cfg.mqtt,
                &cfg.kafka,
                &cfg.database,
                readiness,
                shutdown,
            )
            .await?;
        }
        Service::Writer => {
            vitalwatch_writer::run(&cfg.writer, &cfg.kafka, &cfg.database, readiness, shutdown)
                .await?
        }
        Service::Alerts => {
            vitalwatch_alerts::run(&cfg.alerts, &cfg.kafka, &cfg.database, readiness, shutdown)
                .await?
        }
        Service::Api => {
            let metrics = vitalwatch_api::telemetry::metrics_handle();
            let rules = vitalwatch_alerts::rules::compile(
                cfg.alerts
                    .rules
                    .as_deref()
                    .unwrap_or(&vitalwatch_alerts::rules::default_rules()),
            )
            .map_err(|e| anyhow::anyhow!("alerts.rules: {e}"))?;
            vitalwatch_api::run(&cfg.api, &cfg.database, rules, metrics, readiness, shutdown)
                .await?;
        }
    }
    Ok(())
}

/// Runs several services in this process, sharing one [`Readiness`]. The
/// first to fail stops the rest.
pub async fn run_services(
    services: &[Service],
    cfg: &Config,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for &s in services {
        let cfg = cfg.clone();
        let token = shutdown.clone();
        let readiness = readiness.clone();
        set.spawn(async move { (s, run_service(s, &cfg, readiness, token).await) });
    }
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let (service, result) = joined?;
        if let Err(e) = result {
            tracing::error!(?service, error = %e, "service failed; stopping the others");
            shutdown.cancel();
            first_error.get_or_insert(e.context(format!("{service:?} failed")));
        } else if !shutdown.is_cancelled() {
            tracing::error!(?service, "service ended on its own; stopping the others");
            shutdown.cancel();
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Applies pending migrations, waiting (with backoff, up to `wait`) for the
/// database to accept connections first.
pub async fn migrate(db: &DatabaseConfig, wait: Duration) -> anyhow::Result<Vec<i32>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = Duration::from_millis(200);
    loop {
        match vitalwatch_store::connect(&db.url).await {
            Ok(mut client) => return Ok(vitalwatch_store::migrate::migrate(&mut client, db).await?),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Creates the readings, dead-letter and alerts topics if they are missing.
pub async fn create_topics(kafka: &KafkaConfig) -> anyhow::Result<()> {
    let names = [
        kafka.readings_topic.as_str(),
        kafka.deadletter_topic.as_str(),
        kafka.alerts_topic.as_str(),
    ];
    vitalwatch_bus::ensure_topics(kafka, &names).await?;
    Ok(())
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            () = term => tracing::info!("SIGTERM: shutting down"),
        }
        t.cancel();
    });
    token
}
