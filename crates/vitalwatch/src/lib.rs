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

    /// The `VITALWATCH_*` variables that point a `vitalwatch` process at
    /// the services and names of these settings: the database, the Kafka
    /// brokers, topics and client properties, the MQTT broker and account,
    /// and the consumer groups. Other settings (batching, limits) are left
    /// to that process's own environment and file. For tests and benches
    /// that start services as processes of their own.
    pub fn service_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("DATABASE__URL", self.database.url.clone()),
            ("KAFKA__BROKERS", self.kafka.brokers.clone()),
            ("KAFKA__READINGS_TOPIC", self.kafka.readings_topic.clone()),
            (
                "KAFKA__DEADLETTER_TOPIC",
                self.kafka.deadletter_topic.clone(),
            ),
            ("KAFKA__ALERTS_TOPIC", self.kafka.alerts_topic.clone()),
            ("MQTT__HOST", self.mqtt.host.clone()),
            ("MQTT__PORT", self.mqtt.port.to_string()),
            ("MQTT__CLIENT_ID", self.mqtt.client_id.clone()),
            ("MQTT__SHARE_GROUP", self.mqtt.share_group.clone()),
            ("MQTT__TOPIC_ROOT", self.mqtt.topic_root.clone()),
            ("WRITER__GROUP_ID", self.writer.group_id.clone()),
            ("ALERTS__GROUP_ID", self.alerts.group_id.clone()),
            (
                "ALERTS__WRITER_GROUP_ID",
                self.alerts.writer_group_id.clone(),
            ),
        ]
        .into_iter()
        .chain(self.mqtt.username.clone().map(|u| ("MQTT__USERNAME", u)))
        .chain(self.mqtt.password.clone().map(|p| ("MQTT__PASSWORD", p)))
        .map(|(key, value)| (format!("VITALWATCH_{key}"), value))
        .collect();
        // Keys are lower-cased by the loader, as librdkafka's are.
        env.extend(self.kafka.properties.iter().map(|(key, value)| {
            (
                format!("VITALWATCH_KAFKA__PROPERTIES__{key}"),
                value.clone(),
            )
        }));
        env
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_given_the_service_env_has_the_same_services_and_names() {
        let mut cfg = Config::default();
        cfg.database.url = "postgres://u:p@db.example:5433/vw".into();
        cfg.kafka.brokers = "k1:9092,k2:9092".into();
        cfg.kafka.readings_topic = "t.readings_1".into();
        cfg.kafka.deadletter_topic = "t.dead_1".into();
        cfg.kafka.alerts_topic = "t.alerts_1".into();
        cfg.kafka
            .properties
            .insert("session.timeout.ms".into(), "6000".into());
        cfg.mqtt.host = "mqtt.example".into();
        cfg.mqtt.port = 18830;
        cfg.mqtt.client_id = "ingest-7".into();
        cfg.mqtt.share_group = "g7".into();
        cfg.mqtt.topic_root = "test-7".into();
        cfg.mqtt.username = Some("vitalwatch-ingest".into());
        cfg.mqtt.password = Some("123456".into());
        cfg.writer.group_id = "writer_7".into();
        cfg.writer.batch_max_rows = 2;
        cfg.alerts.group_id = "alerts_7".into();
        cfg.alerts.writer_group_id = "writer_7".into();
        let got: Config = vitalwatch_core::config::load(None, cfg.service_env()).expect("loads");
        let expected = Config {
            database: cfg.database.clone(),
            kafka: cfg.kafka.clone(),
            mqtt: cfg.mqtt.clone(),
            writer: WriterConfig {
                group_id: cfg.writer.group_id.clone(),
                ..WriterConfig::default()
            },
            alerts: AlertsConfig {
                group_id: cfg.alerts.group_id.clone(),
                writer_group_id: cfg.alerts.writer_group_id.clone(),
                ..AlertsConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(got, expected, "batching is left to the process");
    }
}
