//! Versioned migrations embedded in the binary.
//!
//! Each migration runs once, in its own transaction, recorded in
//! `schema_migrations`. A session-level advisory lock serializes concurrent
//! runs (several services starting at once), so running twice or in parallel
//! is safe.

use tokio_postgres::Client;

use crate::StoreError;

/// Every migration, in order. Never edit one that has been released: add
/// the next.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "registry_and_readings", include_str!("../migrations/0001_registry_and_readings.sql")),
    (2, "registry_notify", include_str!("../migrations/0002_registry_notify.sql")),
];

/// Arbitrary, fixed key of the advisory lock that guards migrations.
const LOCK_KEY: i64 = 0x7669_7461_6c77; // "vitalw"

/// The latest migration version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies every migration not applied yet; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await?;
    let result = apply(client).await;
    // On error the lock is released with the session if this fails too.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    result
}

async fn apply(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let done: Vec<i32> =
        client.query("SELECT version FROM schema_migrations", &[]).await?.iter().map(|r| r.get(0)).collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
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
    Ok(client.query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[]).await?.get(0))
}
