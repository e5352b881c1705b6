//! PostgreSQL storage for vitalwatch (TimescaleDB when the extension is
//! present; see `ARCHITECTURE.md`).
//!
//! - [`DatabaseConfig`] and [`pool`]: connections.
//! - [`migrate`]: versioned, embedded migrations, safe to run concurrently
//!   and twice.
//! - [`registry`]: devices and their assignment to patients.
//! - [`storage`]: the `readings` layout (TimescaleDB or native partitions)
//!   and the policies that keep it in shape.
//! - [`readings`]: idempotent batched writes of reading rows.
//! - [`trends`]: bucketed min/avg/max/count for charts.
//! - [`alerts`]: the alert lifecycle, idempotent.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod migrate;
pub mod readings;
pub mod registry;
pub mod storage;
pub mod trends;

use serde::Deserialize;

pub use deadpool_postgres::{Pool, PoolError};
pub use tokio_postgres;

/// `[database]`: where PostgreSQL is.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq-style URL. Default: the local stack's database.
    pub url: String,
    /// Connections in each service's pool. Default 8.
    pub pool_size: usize,
    /// `auto` (default): TimescaleDB when the server has it; `off`: plain
    /// PostgreSQL; `required`: refuse to migrate without it. Read once, by
    /// the migration that creates the readings table.
    pub timescaledb: storage::TimescaleMode,
    /// TimescaleDB chunk width in hours (native partitions are one UTC day).
    /// Default 24.
    pub chunk_hours: u32,
    /// TimescaleDB compresses chunks older than this. 0: never. Default 7.
    pub compress_after_days: u32,
    /// Raw readings older than this are dropped, on both layouts. 0: kept
    /// forever. Must be 0 or more than the aggregates' refresh window
    /// (100 days). Default 730. The continuous aggregates are kept.
    pub retain_days: u32,
    /// Native layout: partitions are created this many days ahead. Default 7.
    pub premake_days: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://vitalwatch:vitalwatch@127.0.0.1:5432/vitalwatch".into(),
            pool_size: 8,
            timescaledb: storage::TimescaleMode::Auto,
            chunk_hours: 24,
            compress_after_days: 7,
            retain_days: 730,
            premake_days: 7,
        }
    }
}

impl DatabaseConfig {
    /// Checks the settings that the database would otherwise refuse late.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.chunk_hours == 0 {
            return Err(StoreError::Invalid(
                "database.chunk_hours must be at least 1".into(),
            ));
        }
        if self.retain_days != 0 && self.retain_days <= storage::REFRESH_WINDOW_DAYS {
            return Err(StoreError::Invalid(format!(
                "database.retain_days = {} must be 0 (keep forever) or more than {} days, \
                 the window in which late readings are still folded into the aggregates",
                self.retain_days,
                storage::REFRESH_WINDOW_DAYS
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database pool configuration: {0}")]
    CreatePool(#[from] deadpool_postgres::CreatePoolError),
    #[error("{0}")]
    Invalid(String),
    /// The schema is not (yet) what this build needs: worth waiting for a
    /// migration, never a reason to give data up.
    #[error("{0}")]
    Schema(String),
}

impl StoreError {
    /// True when the database refused the *data* (SQLSTATE class 22, data
    /// exception, or 23, integrity constraint violation): retrying the same
    /// rows cannot succeed. Every other error may be the server's state
    /// (down, read-only after a failover, a missing grant) and is worth
    /// waiting out rather than giving the data up.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Db(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            StoreError::Invalid(_) => true,
            StoreError::Pool(_) | StoreError::CreatePool(_) | StoreError::Schema(_) => false,
        }
    }

    /// True when retrying later may succeed (the server is down or
    /// restarting), false for errors that retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Pool(_) | StoreError::Schema(_) => true,
            StoreError::Db(e) => match e.code() {
                None => true, // I/O or connection closed
                Some(code) => {
                    let c = code.code();
                    // 08: connection exception, 53: insufficient resources,
                    // 57P: operator intervention (shutdown), 40: rollback (serialization, deadlock).
                    c.starts_with("08")
                        || c.starts_with("53")
                        || c.starts_with("57P")
                        || c.starts_with("40")
                }
            },
            StoreError::CreatePool(_) | StoreError::Invalid(_) => false,
        }
    }
}

/// A connection pool. Connections are opened lazily, so this succeeds while
/// the database is down; the first query reports it.
pub fn pool(cfg: &DatabaseConfig) -> Result<Pool, StoreError> {
    let mut pc = deadpool_postgres::Config::new();
    pc.url = Some(cfg.url.clone());
    pc.pool = Some(deadpool_postgres::PoolConfig::new(cfg.pool_size.max(1)));
    pc.manager = Some(deadpool_postgres::ManagerConfig {
        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
    });
    Ok(pc.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )?)
}

/// One connection outside any pool (migrations, tools).
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// LISTENs on `channel` until `shutdown`, calling `on_notify` for every
/// notification and once after every (re)connection, so that changes made
/// while nobody listened are picked up too. Reconnects with backoff; never
/// fails.
pub async fn listen(
    url: String,
    channel: &'static str,
    on_notify: impl Fn() + Send + Sync + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures_util::StreamExt;
    use std::time::Duration;
    let on_notify = std::sync::Arc::new(on_notify);
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, mut conn)) => {
                let (up_tx, up_rx) = tokio::sync::oneshot::channel::<()>();
                let notify = on_notify.clone();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        std::pin::pin!(futures_util::stream::poll_fn(
                            move |cx| conn.poll_message(cx)
                        ));
                    while let Some(Ok(m)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(_) = m {
                            notify();
                        }
                    }
                    drop(up_tx);
                });
                match client.batch_execute(&format!("LISTEN {channel}")).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(200);
                        on_notify();
                        tokio::select! {
                            _ = up_rx => tracing::warn!(channel, "listener connection lost; reconnecting"),
                            () = shutdown.cancelled() => {}
                        }
                    }
                    Err(e) => tracing::warn!(channel, error = %e, "cannot LISTEN"),
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(channel, error = %e, "listener cannot connect; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
