//! writer: `rpm.readings.v1` into the `readings` table.
//!
//! ```text
//! consumer group ──▶ collect up to batch_max_rows rows or batch_max_wait_ms
//!                ──▶ (native layout: make sure the day partitions exist)
//!                ──▶ one transaction: binary COPY into `readings` (a
//!                    duplicate sends the batch through a staging table and
//!                    INSERT … SELECT … ON CONFLICT DO NOTHING instead)
//!                ──▶ COMMIT ──▶ commit the Kafka offsets the batch covered
//! ```
//!
//! Up to `concurrent_writes` batches are written at once, each in its own
//! transaction, while the next is collected; offsets are committed in
//! batch order, each once its batch and every earlier one have committed.
//!
//! On the native layout the writer also runs [`storage::maintain`] at start
//! and every hour: partitions ahead of time, and retention.
//!
//! Delivery guarantee: offsets are committed only after the transaction that
//! holds their rows committed, so a crash replays records rather than losing
//! them; replayed rows hit the `readings_identity` key and change nothing. A
//! database outage is waited out with backoff: no offset moves, nothing is
//! dropped. A record the database refuses for good, or that is not a valid
//! batch, goes to the dead-letter topic with its reason before its offset is
//! committed.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use vitalwatch_bus::rdkafka::consumer::{CommitMode, Consumer};
use vitalwatch_bus::rdkafka::{Message, Offset, TopicPartitionList};
use vitalwatch_bus::{BusError, DeadLetter, DeadLetterInfo, KafkaConfig};
use vitalwatch_core::health::Readiness;
use vitalwatch_core::reading::Batch;
use vitalwatch_store::readings::{self, Rows};
use vitalwatch_store::storage::{self, Layout};
use vitalwatch_store::{DatabaseConfig, Pool, StoreError};

/// `[writer]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WriterConfig {
    /// Consumer group; writers in one group split the partitions. Default
    /// `vitalwatch-writer`.
    pub group_id: String,
    /// A batch is written when it holds this many rows. Default 5000.
    pub batch_max_rows: usize,
    /// …or when its first record is this old, in milliseconds. Default 200.
    pub batch_max_wait_ms: u64,
    /// Batches written at once, each in its own transaction on its own
    /// connection, while the next is collected; offsets are still committed
    /// in order, each once its batch and every earlier one are durable.
    /// Default 2; 1 writes one batch after another.
    pub concurrent_writes: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            group_id: "vitalwatch-writer".into(),
            batch_max_rows: 5000,
            batch_max_wait_ms: 200,
            concurrent_writes: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Kafka(#[from] vitalwatch_bus::rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One consumed record, decoded.
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
    batch: Batch,
}

/// Runs the writer until `shutdown` fires. The batch in hand when it fires
/// is still written if the database is up, then its offsets are committed.
///
/// Readiness condition `writer.database`: not ready while writes fail.
pub async fn run(
    cfg: &WriterConfig,
    kafka: &KafkaConfig,
    db: &DatabaseConfig,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), WriterError> {
    // A 50 ms fetch wait: on tansu, which holds every fetch for the whole
    // wait, librdkafka's 500 ms default was most of publish-to-row latency.
    let consumer = vitalwatch_bus::low_latency_consumer(kafka, &cfg.group_id, 50)?;
    consumer.subscribe(&[kafka.readings_topic.as_str()])?;
    let deadletter = DeadLetter::new(
        vitalwatch_bus::Producer::new(kafka)?,
        kafka.deadletter_topic.clone(),
        None,
    );
    readiness.set_ready("writer.database");
    let pool = vitalwatch_store::pool(db)?;
    let store = Store {
        pool: pool.clone(),
        layout: tokio::sync::OnceCell::new(),
    };
    tokio::spawn(maintenance(pool.clone(), db.clone(), shutdown.clone()));
    tokio::spawn(watchdog(
        vitalwatch_bus::consumer(kafka, &cfg.group_id)?,
        kafka.readings_topic.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));
    tracing::info!(group = %cfg.group_id, topic = %kafka.readings_topic, "writer started");
    let max_wait = Duration::from_millis(cfg.batch_max_wait_ms);
    let concurrent = cfg.concurrent_writes.max(1);
    let mut last_commit: Option<TopicPartitionList> = None;
    // Writes under way, oldest first: each yields the offsets its batch
    // covered, or `None` when shutdown stopped it. After a `None` nothing
    // more is committed: a later batch's offsets would skip its rows.
    let mut writes = futures_util::stream::FuturesOrdered::new();
    let mut gave_up = false;
    // Commits the offsets of a write that has finished, if it has.
    let commit = |done: Option<TopicPartitionList>, last: &mut Option<TopicPartitionList>| {
        let Some(tpl) = done else {
            return false;
        };
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            // Harmless: the records are replayed and change nothing.
            tracing::warn!(error = %e, "offset commit failed");
        }
        *last = Some(tpl);
        true
    };

    'outer: while !shutdown.is_cancelled() {
        let mut records = Vec::new();
        let mut rows = 0usize;
        let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        while rows < cfg.batch_max_rows.max(1) {
            let wait_until =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let msg = tokio::select! {
                m = vitalwatch_bus::recv(&consumer) => m,
                () = tokio::time::sleep_until(wait_until) => break,
                () = shutdown.cancelled() => break,
                Some(done) = writes.next(), if !writes.is_empty() => {
                    if !commit(done, &mut last_commit) {
                        gave_up = true; // shut down while the database was away
                        break 'outer;
                    }
                    continue;
                }
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    metrics::counter!("vitalwatch_writer_consume_errors_total").increment(1);
                    continue;
                }
            };
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
            let topic = msg.topic().to_owned();
            let (partition, offset) = (msg.partition(), msg.offset());
            let payload = msg.payload().unwrap_or_default().to_vec();
            let key = msg
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            drop(msg);
            offsets.insert((topic.clone(), partition), offset);
            match Batch::decode(&payload) {
                Ok(batch) => {
                    rows += batch
                        .readings
                        .iter()
                        .map(|r| r.values().count())
                        .sum::<usize>();
                    records.push(Record {
                        topic,
                        partition,
                        offset,
                        payload,
                        batch,
                    });
                }
                Err(e) => {
                    let info = DeadLetterInfo {
                        reason: "invalid_record",
                        detail: &e.to_string(),
                        source_topic: &topic,
                        received_at: Utc::now(),
                        reading_index: None,
                    };
                    tracing::warn!(topic, partition, offset, error = %e, "record is not a valid batch; dead-lettering");
                    if deadletter
                        .send(&key, &payload, info, &shutdown)
                        .await
                        .is_err()
                    {
                        break 'outer; // shutting down; its offset is not committed
                    }
                    metrics::counter!("vitalwatch_writer_deadlettered_total").increment(1);
                }
            }
        }
        if offsets.is_empty() {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
        }
        // Room for this write: wait for the oldest when all are busy.
        while writes.len() >= concurrent {
            if let Some(done) = writes.next().await
                && !commit(done, &mut last_commit)
            {
                gave_up = true;
                break 'outer;
            }
        }
        let (store, deadletter, readiness, shutdown) = (&store, &deadletter, &readiness, &shutdown);
        writes.push_back(async move {
            write(store, &records, deadletter, readiness, shutdown)
                .await
                .ok()
                .map(|()| tpl)
        });
    }
    // The batches in hand are still written if the database is up; a write
    // stopped by shutdown commits nothing, and neither does any after it.
    while !gave_up && let Some(done) = writes.next().await {
        gave_up = !commit(done, &mut last_commit);
    }
    if let Some(tpl) = last_commit
        && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
    {
        tracing::warn!(error = %e, "final offset commit failed");
    }
    tracing::info!("writer stopped");
    Ok(())
}

/// Writes every record's rows durably. Waits out transient database errors;
/// if the database refuses the batch for good, writes record by record and
/// dead-letters the ones it refuses. `Err` only when `shutdown` fired first.
async fn write(
    store: &Store,
    records: &[Record],
    deadletter: &DeadLetter,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<(), ()> {
    let mut rows = Rows::default();
    for r in records {
        rows.push(&r.batch);
    }
    match insert_retrying(store, &rows, readiness, shutdown).await? {
        Ok(()) => return Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "database refused a batch; writing its records one by one")
        }
    }
    for r in records {
        let mut one = Rows::default();
        one.push(&r.batch);
        if let Err(e) = insert_retrying(store, &one, readiness, shutdown).await? {
            let detail = e.to_string();
            let info = DeadLetterInfo {
                reason: "store_rejected",
                detail: &detail,
                source_topic: &r.topic,
                received_at: Utc::now(),
                reading_index: None,
            };
            tracing::error!(partition = r.partition, offset = r.offset, error = %e, "database refused a record; dead-lettering");
            deadletter
                .send(&r.batch.device_id, &r.payload, info, shutdown)
                .await
                .map_err(|_| ())?;
            metrics::counter!("vitalwatch_writer_deadlettered_total").increment(1);
        }
    }
    Ok(())
}

/// `Ok(Ok)` written, `Ok(Err)` the data was refused for good (SQLSTATE 22 or
/// 23), `Err` shut down while waiting. Any other error is waited out.
async fn insert_retrying(
    store: &Store,
    rows: &Rows,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<Result<(), StoreError>, ()> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match store.insert(rows).await {
            Ok(new) => {
                if readiness.is_ready("writer.database") != Some(true) {
                    readiness.set_ready("writer.database");
                }
                metrics::histogram!("vitalwatch_writer_batch_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("vitalwatch_writer_rows_total").increment(new);
                metrics::counter!("vitalwatch_writer_duplicate_rows_total")
                    .increment(rows.len() as u64 - new);
                return Ok(Ok(()));
            }
            Err(e) if !e.is_data_error() => {
                readiness.set_not_ready("writer.database", format!("database writes failing: {e}"));
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "database unavailable; holding the batch");
                metrics::counter!("vitalwatch_writer_retries_total").increment(1);
            }
            Err(e) => return Ok(Err(e)),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return Err(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The database as the writer uses it.
struct Store {
    pool: Pool,
    /// Read from the database at the first write.
    layout: tokio::sync::OnceCell<Layout>,
}

impl Store {
    /// Writes `rows` in one transaction; returns how many were new.
    async fn insert(&self, rows: &Rows) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await?;
        let layout = *self
            .layout
            .get_or_try_init(|| storage::layout(&**client))
            .await?;
        readings::write(&mut client, layout, rows).await
    }
}

/// How long the writer group may commit nothing while records wait on the
/// readings topic before the writer says it is stalled. A restarted writer
/// was seen to commit nothing for its first 20-35 s while it joined its
/// group and took its first batches after an outage (`catch_up` bench).
const STALL_AFTER: Duration = Duration::from_secs(120);
const STALL_CHECK_EVERY: Duration = Duration::from_secs(15);

/// Whether a consumer group is getting on: fed its committed offsets and
/// the topic's end offsets, per partition, it tells how long the group has
/// committed nothing while records were waiting.
#[derive(Debug, Default)]
struct Progress {
    committed: Vec<i64>,
    /// Since when the committed offsets have not moved while behind.
    since: Option<Instant>,
}

impl Progress {
    /// Records behind, and for how long nothing has been committed although
    /// records were waiting (zero while it moves or has nothing to do).
    fn observe(&mut self, now: Instant, ends: &[i64], committed: &[i64]) -> (i64, Duration) {
        let behind: i64 = ends
            .iter()
            .zip(committed)
            .map(|(end, c)| (end - c).max(0))
            .sum();
        if behind == 0 || self.committed != committed {
            self.committed = committed.to_vec();
            self.since = None;
            return (behind, Duration::ZERO);
        }
        let since = *self.since.get_or_insert(now);
        (behind, now.saturating_duration_since(since))
    }
}

/// Readiness condition `writer.progress`: not ready while the writer group
/// has committed nothing for [`STALL_AFTER`] although records wait on the
/// readings topic. Nothing is lost then (the records stay in Kafka), but
/// nothing more is stored, and without this only the group's lag would
/// show it: a writer was seen to stop so, idle, under heavy load (see
/// ARCHITECTURE.md). `probe` is a consumer in the writer's group that never
/// subscribes. Gauge `vitalwatch_writer_lag_records`: records behind.
async fn watchdog(
    probe: vitalwatch_bus::rdkafka::consumer::StreamConsumer,
    topic: String,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let probe = std::sync::Arc::new(probe);
    let mut progress = Progress::default();
    let mut stalled = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(STALL_CHECK_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        let (p, t) = (probe.clone(), topic.clone());
        let Ok(Some((ends, committed))) =
            tokio::task::spawn_blocking(move || vitalwatch_bus::group_progress(&p, &t)).await
        else {
            continue; // the broker is away: the Kafka readiness tells
        };
        let (behind, still) = progress.observe(Instant::now(), &ends, &committed);
        metrics::gauge!("vitalwatch_writer_lag_records").set(behind as f64);
        if still >= STALL_AFTER {
            metrics::counter!("vitalwatch_writer_stall_checks_total").increment(1);
            tracing::error!(
                behind,
                seconds = still.as_secs(),
                "the writer has stored nothing although records wait on the readings topic"
            );
            readiness.set_not_ready(
                "writer.progress",
                format!(
                    "nothing committed for {} s while {behind} records wait",
                    still.as_secs()
                ),
            );
            stalled = true;
        } else if stalled || readiness.is_ready("writer.progress").is_none() {
            if stalled {
                tracing::info!(behind, "the writer is committing again");
            }
            readiness.set_ready("writer.progress");
            stalled = false;
        }
    }
}

/// Native layout: partitions ahead of time and retention, at start and
/// every hour. Failures are logged and retried at the next run.
async fn maintenance(pool: Pool, db: DatabaseConfig, shutdown: CancellationToken) {
    loop {
        let result = match pool.get().await {
            Ok(client) => storage::maintain(&**client, &db, Utc::now()).await,
            Err(e) => Err(e.into()),
        };
        let next = match result {
            Ok(_) => Duration::from_secs(3600),
            Err(e) => {
                tracing::warn!(error = %e, "storage maintenance failed; retrying in a minute");
                metrics::counter!("vitalwatch_writer_maintenance_errors_total").increment(1);
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_tells_a_group_that_commits_nothing_while_records_wait() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = Progress::default();
        // Moving: each look sees new commits.
        assert_eq!(
            p.observe(at(0), &[100, 100], &[10, 20]),
            (170, Duration::ZERO)
        );
        assert_eq!(
            p.observe(at(15), &[200, 200], &[90, 80]),
            (230, Duration::ZERO)
        );
        // Stuck behind: counted from the first look that saw no change.
        assert_eq!(
            p.observe(at(30), &[300, 300], &[90, 80]),
            (430, Duration::ZERO)
        );
        assert_eq!(
            p.observe(at(45), &[400, 400], &[90, 80]),
            (630, Duration::from_secs(15))
        );
        assert_eq!(
            p.observe(at(150), &[500, 500], &[90, 80]),
            (830, Duration::from_secs(120))
        );
        // One partition moves: no longer stuck.
        assert_eq!(
            p.observe(at(165), &[500, 500], &[90, 81]),
            (829, Duration::ZERO)
        );
        // Nothing to do is not a stall, however long the commits stand.
        let mut idle = Progress::default();
        for s in [0, 100, 200, 300] {
            assert_eq!(
                idle.observe(at(s), &[50, 60], &[50, 60]),
                (0, Duration::ZERO)
            );
        }
        // A committed offset ahead of a stale end counts as nothing behind.
        assert_eq!(
            idle.observe(at(400), &[50, 60], &[51, 60]),
            (0, Duration::ZERO)
        );
    }
}
