//! PostgreSQL storage for vitalwatch (TimescaleDB when the extension is
//! present; see `ARCHITECTURE.md`).
//!
//! - [`DatabaseConfig`] and [`pool`]: connections.
//! - [`migrate`]: versioned, embedded migrations, safe to run concurrently
//!   and twice.
//! - [`registry`]: devices and their assignment to patients.
//! - [`readings`]: idempotent batched inserts of reading rows.
//! - [`trends`]: bucketed min/avg/max/count for charts.
#![forbid(unsafe_code)]

pub mod migrate;
pub mod readings;
pub mod registry;
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
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig { url: "postgres://vitalwatch:vitalwatch@127.0.0.1:5432/vitalwatch".into(), pool_size: 8 }
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
}

impl StoreError {
    /// True when the database refused the *data* (SQLSTATE class 22, data
    /// exception, or 23, integrity constraint violation): retrying the same
    /// rows cannot succeed. Every other error may be the server's state
    /// (down, read-only after a failover, a missing grant) and is worth
    /// waiting out rather than giving the data up.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Db(e) => e.code().is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            StoreError::Invalid(_) => true,
            StoreError::Pool(_) | StoreError::CreatePool(_) => false,
        }
    }

    /// True when retrying later may succeed (the server is down or
    /// restarting), false for errors that retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Db(e) => match e.code() {
                None => true, // I/O or connection closed
                Some(code) => {
                    let c = code.code();
                    // 08: connection exception, 53: insufficient resources,
                    // 57P: operator intervention (shutdown), 40: rollback (serialization, deadlock).
                    c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c.starts_with("40")
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
    Ok(pc.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?)
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
