//! How `readings` is laid out, and the policies that keep it in shape.
//!
//! The layout is chosen once, by the migration that creates the time-series
//! table, and recorded in `storage_layout`:
//!
//! - [`Layout::TimescaleDb`] when the server has the extension (and
//!   `database.timescaledb` is not `off`): a hypertable on `time`,
//!   hierarchical continuous aggregates `readings_5m` → `readings_1h` →
//!   `readings_1d` (real-time, so the not-yet-materialized tail is included),
//!   compression segmented by patient and metric, and a retention policy.
//!   TimescaleDB's own job scheduler runs the policies.
//! - [`Layout::Native`] otherwise: `readings` range-partitioned by UTC day.
//!   Partitions are created ahead of time ([`maintain`], run at start-up and
//!   hourly by the writer) and on demand before a write that needs one
//!   ([`ensure_partitions`]); retention drops whole partitions.
//!
//! Both layouts keep the same unique key, so a duplicate is a no-op on
//! either, and [`crate::trends`] returns the same buckets on either.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio_postgres::GenericClient;

use crate::{DatabaseConfig, StoreError};

/// `database.timescaledb`: whether to use the extension.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TimescaleMode {
    /// Use TimescaleDB when the server has it (creating the extension if the
    /// role may), plain PostgreSQL otherwise.
    #[default]
    Auto,
    /// Plain PostgreSQL even where TimescaleDB is installed.
    Off,
    /// Refuse to migrate without TimescaleDB.
    Required,
}

/// How `readings` is stored in this database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    TimescaleDb,
    Native,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::TimescaleDb => "timescaledb",
            Layout::Native => "native",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The continuous aggregates, finest first: (bucket width in seconds, view).
pub const AGGREGATES: &[(i64, &str)] = &[
    (300, "readings_5m"),
    (3600, "readings_1h"),
    (86_400, "readings_1d"),
];

/// How far back the aggregate refresh policies look: late readings older
/// than this are not folded into the aggregates. Ingest refuses readings
/// older than `ingest.max_age_days` (90 by default), so this is larger, and
/// retention must keep raw rows at least this long.
pub const REFRESH_WINDOW_DAYS: u32 = 100;

/// The recorded layout, or `None` before the migration that decides it.
pub async fn recorded_layout(client: &impl GenericClient) -> Result<Option<Layout>, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('storage_layout') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT layout FROM storage_layout", &[])
        .await?;
    Ok(match row.map(|r| r.get::<_, String>(0)).as_deref() {
        Some("timescaledb") => Some(Layout::TimescaleDb),
        Some("native") => Some(Layout::Native),
        Some(other) => {
            return Err(StoreError::Schema(format!(
                "unknown storage layout {other:?} in storage_layout"
            )));
        }
        None => None,
    })
}

/// The layout of a migrated database.
pub async fn layout(client: &impl GenericClient) -> Result<Layout, StoreError> {
    recorded_layout(client).await?.ok_or_else(|| {
        StoreError::Schema("the database is not migrated: run `vitalwatch migrate`".into())
    })
}

/// Decides the layout inside the migration transaction `tx` and records it.
/// Creating the extension is tried under a savepoint, so a role that may not
/// create it (or a server that does not preload it) falls back cleanly.
pub(crate) async fn choose_layout(
    tx: &mut tokio_postgres::Transaction<'_>,
    cfg: &DatabaseConfig,
) -> Result<Layout, StoreError> {
    let layout = match cfg.timescaledb {
        TimescaleMode::Off => Layout::Native,
        TimescaleMode::Auto | TimescaleMode::Required => {
            let installed: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
                    &[],
                )
                .await?
                .get(0);
            let available: bool = tx
                .query_one("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')", &[])
                .await?
                .get(0);
            // The loader defines this setting only when the library is
            // preloaded; CREATE EXTENSION without it ends the session (FATAL).
            let preloaded: bool = tx
                .query_one(
                    "SELECT current_setting('timescaledb.disable_load', true) IS NOT NULL",
                    &[],
                )
                .await?
                .get(0);
            let mut why_not = String::from("the server does not have the timescaledb extension");
            let mut usable = if installed {
                true
            } else if available && !preloaded {
                why_not = "timescaledb is installed but not in shared_preload_libraries".into();
                false
            } else if available {
                let sp = tx.transaction().await?;
                match sp
                    .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                    .await
                {
                    Ok(()) => {
                        sp.commit().await?;
                        true
                    }
                    Err(e) => {
                        why_not =
                            format!("CREATE EXTENSION timescaledb failed: {}", db_message(&e));
                        sp.rollback().await?;
                        false
                    }
                }
            } else {
                false
            };
            if usable {
                // Continuous aggregates and compression are in the Timescale
                // License edition only, and `by_range` needs 2.13.
                let row = tx
                    .query_one(
                        "SELECT coalesce(current_setting('timescaledb.license', true), ''),
                                (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb')",
                        &[],
                    )
                    .await?;
                let (license, version): (String, String) = (row.get(0), row.get(1));
                let parts: Vec<u32> = version
                    .split(['.', '-'])
                    .filter_map(|p| p.parse().ok())
                    .collect();
                let recent = parts.first().copied().unwrap_or(0) > 2
                    || (parts.first() == Some(&2) && parts.get(1).copied().unwrap_or(0) >= 13);
                if license != "timescale" || !recent {
                    why_not = format!(
                        "TimescaleDB {version} ({license} license) lacks what this needs: continuous aggregates and compression (timescale license), by_range (2.13 or later)"
                    );
                    usable = false;
                }
            }
            match (usable, cfg.timescaledb) {
                (true, _) => Layout::TimescaleDb,
                (false, TimescaleMode::Required) => {
                    return Err(StoreError::Invalid(format!(
                        "database.timescaledb = \"required\", but {why_not}"
                    )));
                }
                (false, _) => {
                    tracing::warn!(reason = %why_not, "TimescaleDB not used: readings go to natively partitioned tables");
                    Layout::Native
                }
            }
        }
    };
    tx.batch_execute(
        "CREATE TABLE storage_layout (
             layout     text PRIMARY KEY CHECK (layout IN ('timescaledb', 'native')),
             decided_at timestamptz NOT NULL DEFAULT now(),
             -- TimescaleDB: whether the aggregates were refreshed over all
             -- history once (the refresh policies look back 100 days only).
             aggregates_backfilled boolean NOT NULL DEFAULT false
         )",
    )
    .await?;
    tx.execute(
        "INSERT INTO storage_layout (layout) VALUES ($1)",
        &[&layout.as_str()],
    )
    .await?;
    tracing::info!(%layout, "storage layout chosen");
    Ok(layout)
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

/// Brings the storage in line with the configuration. TimescaleDB: chunk
/// width, compression age and retention policies (a policy already as
/// configured is left alone, a changed one replaced), refresh policies for
/// the aggregates (added when missing), and once, the aggregates refreshed
/// over all history. Native: [`maintain`] (partitions ahead, retention).
/// Runs under the migration lock, after the migrations, outside any
/// transaction.
pub async fn apply_policies(
    client: &tokio_postgres::Client,
    cfg: &DatabaseConfig,
) -> Result<(), StoreError> {
    cfg.validate()?;
    match recorded_layout(client).await? {
        None => return Ok(()),
        Some(Layout::Native) => {
            maintain(client, cfg, Utc::now()).await?;
            return Ok(());
        }
        Some(Layout::TimescaleDb) => {}
    }
    let chunk = format!("{} hours", cfg.chunk_hours);
    client
        .execute(
            "SELECT set_chunk_time_interval('readings', $1::text::interval)",
            &[&chunk],
        )
        .await?;

    replace_policy(
        client,
        "policy_compression",
        "readings",
        "compress_after",
        (cfg.compress_after_days > 0).then(|| format!("{} days", cfg.compress_after_days)),
        "SELECT remove_compression_policy('readings', if_exists => true)",
        "SELECT add_compression_policy('readings', compress_after => $1::text::interval)",
    )
    .await?;
    replace_policy(
        client,
        "policy_retention",
        "readings",
        "drop_after",
        (cfg.retain_days > 0).then(|| format!("{} days", cfg.retain_days)),
        "SELECT remove_retention_policy('readings', if_exists => true)",
        "SELECT add_retention_policy('readings', drop_after => $1::text::interval)",
    )
    .await?;
    // Refresh policies are fixed by the design, not configured; they are
    // added here, when missing. (A later change of schedule must remove the
    // old policies in a migration.)
    for (width, view) in AGGREGATES {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM timescaledb_information.jobs
                                 WHERE proc_name = 'policy_refresh_continuous_aggregate' AND hypertable_name = $1)",
                &[view],
            )
            .await?
            .get(0);
        if exists {
            continue;
        }
        // The newest bucket is left to real-time aggregation; older ones are
        // materialized, and re-materialized when late readings land in them.
        let end_offset = format!("{width} seconds");
        let schedule = match width {
            300 => "1 minute",
            3600 => "5 minutes",
            _ => "30 minutes",
        };
        client
            .execute(
                &format!(
                    "SELECT add_continuous_aggregate_policy('{view}',
                         start_offset => $1::text::interval, end_offset => $2::text::interval,
                         schedule_interval => $3::text::interval)"
                ),
                &[
                    &format!("{REFRESH_WINDOW_DAYS} days"),
                    &end_offset,
                    &schedule,
                ],
            )
            .await?;
    }
    // Rows that predate the aggregates (moved in from an older schema)
    // reach back further than any refresh policy looks: refresh all of
    // history once, finest level first. Cannot run inside a transaction.
    let backfilled: bool = client
        .query_one("SELECT aggregates_backfilled FROM storage_layout", &[])
        .await?
        .get(0);
    if !backfilled {
        for (width, view) in AGGREGATES {
            client
                .batch_execute(&format!(
                    "CALL refresh_continuous_aggregate('{view}', NULL, now() - interval '{width} seconds')"
                ))
                .await?;
        }
        client
            .batch_execute("UPDATE storage_layout SET aggregates_backfilled = true")
            .await?;
        tracing::info!("continuous aggregates refreshed over all history");
    }
    Ok(())
}

/// Replaces a TimescaleDB policy when its setting differs from `want`
/// (`None`: no policy).
async fn replace_policy(
    client: &tokio_postgres::Client,
    proc_name: &str,
    table: &str,
    key: &str,
    want: Option<String>,
    remove: &str,
    add: &str,
) -> Result<(), StoreError> {
    let current: Option<String> = client
        .query_opt(
            "SELECT config->>$3 FROM timescaledb_information.jobs WHERE proc_name = $1 AND hypertable_name = $2",
            &[&proc_name, &table, &key],
        )
        .await?
        .and_then(|r| r.get(0));
    let same = match (&current, &want) {
        (None, None) => true,
        (Some(c), Some(w)) => client
            .query_one("SELECT $1::text::interval = $2::text::interval", &[c, w])
            .await?
            .get::<_, bool>(0),
        _ => false,
    };
    if same {
        return Ok(());
    }
    client.execute(remove, &[]).await?;
    if let Some(w) = &want {
        client.execute(add, &[w]).await?;
    }
    tracing::info!(policy = proc_name, from = ?current, to = ?want, "TimescaleDB policy updated");
    Ok(())
}

/// What one [`maintain`] run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Partitions created ahead of time.
    pub created: i32,
    /// Partitions dropped by retention.
    pub dropped: Vec<String>,
}

/// Native layout: creates the partitions from yesterday to
/// `premake_days` ahead, and drops those wholly older than `retain_days`.
/// Nothing to do under TimescaleDB, whose jobs do the same.
pub async fn maintain(
    client: &impl GenericClient,
    cfg: &DatabaseConfig,
    now: DateTime<Utc>,
) -> Result<Maintenance, StoreError> {
    if layout(client).await? != Layout::Native {
        return Ok(Maintenance::default());
    }
    let from = now - chrono::Duration::days(1);
    let to = now + chrono::Duration::days(i64::from(cfg.premake_days));
    let created = ensure_partitions(client, from, to).await?;
    let mut dropped = Vec::new();
    if cfg.retain_days > 0 {
        let cutoff = now - chrono::Duration::days(i64::from(cfg.retain_days));
        for row in client
            .query("SELECT vitalwatch_drop_partitions_before($1)", &[&cutoff])
            .await?
        {
            dropped.push(row.get(0));
        }
        if !dropped.is_empty() {
            tracing::info!(?dropped, %cutoff, "retention dropped partitions");
        }
    }
    Ok(Maintenance { created, dropped })
}

/// Native layout: makes sure a partition exists for every UTC day in
/// `[from, to]`; returns how many were created. Safe to run concurrently.
/// (Before a write, [`ensure_partitions_for`] the rows' own days.)
pub async fn ensure_partitions(
    client: &impl GenericClient,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<i32, StoreError> {
    Ok(client
        .query_one("SELECT vitalwatch_ensure_partitions($1, $2)", &[&from, &to])
        .await?
        .get(0))
}

/// Native layout: makes sure a partition exists for each of `days` (UTC);
/// returns how many were created. Safe to run concurrently.
pub async fn ensure_partitions_for(
    client: &impl GenericClient,
    days: &[chrono::NaiveDate],
) -> Result<i32, StoreError> {
    if days.is_empty() {
        return Ok(0);
    }
    Ok(client
        .query_one("SELECT vitalwatch_ensure_partitions($1::date[])", &[&days])
        .await?
        .get(0))
}
