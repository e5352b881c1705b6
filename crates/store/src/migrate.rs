//! Versioned migrations embedded in the binary.
//!
//! Each migration runs once, in its own transaction, recorded in
//! `schema_migrations`. A session-level advisory lock serializes concurrent
//! runs (several services starting at once), so running twice or in parallel
//! is safe.

use tokio_postgres::Client;

use crate::storage::{self, Layout};
use crate::{DatabaseConfig, StoreError};

/// One versioned migration.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: Sql,
}

/// A migration's SQL: the same everywhere, or one text per storage layout.
#[derive(Debug)]
pub enum Sql {
    Any(&'static str),
    /// The first such migration chooses the layout (see [`storage`]).
    ByLayout {
        timescaledb: &'static str,
        native: &'static str,
    },
}

/// Every migration, in order. Never edit one that has been released: add
/// the next.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "registry_and_readings",
        sql: Sql::Any(include_str!("../migrations/0001_registry_and_readings.sql")),
    },
    Migration {
        version: 2,
        name: "registry_notify",
        sql: Sql::Any(include_str!("../migrations/0002_registry_notify.sql")),
    },
    Migration {
        version: 3,
        name: "readings_timeseries",
        sql: Sql::ByLayout {
            timescaledb: include_str!("../migrations/0003_readings_timeseries.timescaledb.sql"),
            native: include_str!("../migrations/0003_readings_timeseries.native.sql"),
        },
    },
    Migration {
        version: 4,
        name: "care_teams_alerts_audit",
        sql: Sql::Any(include_str!(
            "../migrations/0004_care_teams_alerts_audit.sql"
        )),
    },
    Migration {
        version: 5,
        name: "alert_delivery",
        sql: Sql::Any(include_str!("../migrations/0005_alert_delivery.sql")),
    },
    Migration {
        version: 6,
        name: "threshold_changes",
        sql: Sql::Any(include_str!("../migrations/0006_threshold_changes.sql")),
    },
];

/// Arbitrary, fixed key of the advisory lock that guards migrations.
const LOCK_KEY: i64 = 0x7669_7461_6c77; // "vitalw"

/// The latest migration version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies every migration not applied yet, then brings the storage
/// policies in line with `cfg`; returns the versions applied now.
pub async fn migrate(client: &mut Client, cfg: &DatabaseConfig) -> Result<Vec<i32>, StoreError> {
    migrate_to(client, cfg, latest_version()).await
}

/// [`migrate`], stopping after version `target` (tests of upgrades).
pub async fn migrate_to(
    client: &mut Client,
    cfg: &DatabaseConfig,
    target: i32,
) -> Result<Vec<i32>, StoreError> {
    cfg.validate()?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply(client, cfg, target).await;
    let result = match result {
        Ok(applied) => storage::apply_policies(client, cfg).await.map(|()| applied),
        Err(e) => Err(e),
    };
    // On error the lock is released with the session if this fails too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    result
}

async fn apply(
    client: &mut Client,
    cfg: &DatabaseConfig,
    target: i32,
) -> Result<Vec<i32>, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let done: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for Migration { version, name, sql } in MIGRATIONS {
        if done.contains(version) || *version > target {
            continue;
        }
        let mut tx = client.transaction().await?;
        let text = match sql {
            Sql::Any(text) => text,
            Sql::ByLayout {
                timescaledb,
                native,
            } => {
                let layout = match storage::recorded_layout(&tx).await? {
                    Some(l) => l,
                    None => storage::choose_layout(&mut tx, cfg).await?,
                };
                match layout {
                    Layout::TimescaleDb => timescaledb,
                    Layout::Native => native,
                }
            }
        };
        tx.batch_execute(text)
            .await
            .map_err(|e| migration_error(*version, name, e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "migration applied");
        applied.push(*version);
    }
    Ok(applied)
}

/// The highest applied version, or 0 on an empty database.
pub async fn current_version(client: &Client) -> Result<i32, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .get(0))
}

/// Names the migration in the error, with the server's message and position.
fn migration_error(version: i32, name: &str, e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Invalid(format!(
            "migration {version} ({name}) failed: {} ({}){}",
            db.message(),
            db.code().code(),
            db.where_().map(|w| format!(", at {w}")).unwrap_or_default()
        )),
        None => StoreError::Db(e),
    }
}
