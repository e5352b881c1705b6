//! The alerting service: the rules engine fed from `rpm.readings.v1`, its
//! changes stored, published and escalated.
//!
//! - **Judging** ([`run`]): a consumer group on the readings topic. Records
//!   are taken in small batches; each patient's state lives with the
//!   partition that carries the patient. The alert changes of a batch are
//!   written in one transaction (each change with its `alert_events` row,
//!   the outbox), and only then are the batch's offsets committed.
//! - **Rebuilding**: the first time a patient is seen (at start, after a
//!   rebalance, or after an offset jump), their overrides and open alerts
//!   are read from the store, and their readings of each rule's window are
//!   replayed from `readings` before the new ones are judged. The writer is
//!   a separate group: the rebuild first waits (bounded) until the writer
//!   has committed at least the offset being judged, so what this group
//!   consumed before a crash is in the store. Changes a replay finds again
//!   are no-ops in the store (deterministic ids, idempotent updates), so
//!   nothing is emitted twice.
//! - **Publishing** ([`relay`]): unpublished `alert_events` are published
//!   to `rpm.alerts.v1` in id order (one relay at a time, by an advisory
//!   lock), then marked published in the same transaction.
//! - **Escalating** ([`escalation`]): a raised alert nobody acknowledged is
//!   escalated one level every `escalate_after_minutes`.
//! - **Missing data** ([`crate::missing::check`]): on a timer, wall clock.
//! - **Webhooks** ([`crate::webhooks`]): every change to each configured
//!   endpoint, signed, in order, retried.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use vitalwatch_bus::rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use vitalwatch_bus::rdkafka::{Message, Offset, TopicPartitionList};
use vitalwatch_bus::{KafkaConfig, Producer};
use vitalwatch_core::health::Readiness;
use vitalwatch_core::payload::timestamp_to_proto;
use vitalwatch_core::proto;
use vitalwatch_core::reading::Batch;
use vitalwatch_store::{DatabaseConfig, Pool, StoreError};

use crate::engine::{AlertChange, Engine, OpenAlert, PatientSetup};
use crate::rules::{Override, Severity, compile, default_rules};
use crate::{AlertsConfig, AlertsError};

/// Notified on every change to `thresholds` (migration 6).
const THRESHOLDS_CHANNEL: &str = "vitalwatch_thresholds";
/// Notified on every insert into `alert_events` (migration 5).
pub const ALERT_EVENTS_CHANNEL: &str = "vitalwatch_alert_events";

/// Runs the engine until `shutdown` fires. Readiness condition
/// `alerts.database`: not ready while alert changes cannot be stored.
pub async fn run(
    cfg: &AlertsConfig,
    kafka: &KafkaConfig,
    db: &DatabaseConfig,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), AlertsError> {
    let rules =
        compile(cfg.rules.as_deref().unwrap_or(&default_rules())).map_err(AlertsError::Config)?;
    let rules_for_missing = rules.clone();
    let pool = vitalwatch_store::pool(db)?;
    let consumer = vitalwatch_bus::low_latency_consumer(kafka, &cfg.group_id, cfg.fetch_wait_ms)?;
    consumer.subscribe(&[kafka.readings_topic.as_str()])?;
    // Only asked for the writer group's committed offsets; never subscribes.
    let writer = Arc::new(vitalwatch_bus::consumer(kafka, &cfg.writer_group_id)?);
    let producer = Producer::new(kafka)?;
    let wake = Arc::new(Notify::new());
    readiness.set_ready("alerts.database");

    // Every insert into alert_events (the engine's, escalations, a nurse's
    // acknowledgement through the API) wakes the relay.
    let hooks: Vec<(crate::webhooks::WebhookConfig, Arc<Notify>)> = cfg
        .webhooks
        .iter()
        .map(|w| (w.clone(), Arc::new(Notify::new())))
        .collect();
    let listener = {
        let mut woken: Vec<Arc<Notify>> = hooks.iter().map(|(_, n)| n.clone()).collect();
        woken.push(wake.clone());
        tokio::spawn(vitalwatch_store::listen(
            db.url.clone(),
            ALERT_EVENTS_CHANNEL,
            move || woken.iter().for_each(|n| n.notify_one()),
            shutdown.clone(),
        ))
    };
    // A nurse's threshold override: the patient is rebuilt with it.
    let thresholds_changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thresholds_listener = {
        let flag = thresholds_changed.clone();
        tokio::spawn(vitalwatch_store::listen(
            db.url.clone(),
            THRESHOLDS_CHANNEL,
            move || flag.store(true, std::sync::atomic::Ordering::Release),
            shutdown.clone(),
        ))
    };
    let threshold_cursor = {
        let client = pool.get().await.map_err(StoreError::from)?;
        vitalwatch_store::alerts::last_threshold_change(&**client).await?
    };
    let webhook_tasks: Vec<_> = hooks
        .into_iter()
        .map(|(hook, woken)| {
            tokio::spawn(crate::webhooks::deliver(
                hook,
                db.clone(),
                woken,
                shutdown.clone(),
            ))
        })
        .collect();
    let relay_task = tokio::spawn(relay(
        pool.clone(),
        producer,
        kafka.alerts_topic.clone(),
        wake.clone(),
        shutdown.clone(),
    ));
    let missing_task = tokio::spawn(missing_data(
        pool.clone(),
        rules_for_missing,
        writer.clone(),
        kafka.readings_topic.clone(),
        Duration::from_secs(cfg.missing_check_seconds.max(1)),
        wake.clone(),
        shutdown.clone(),
    ));
    let escalation_task = tokio::spawn(escalation(
        pool.clone(),
        cfg.clone(),
        wake.clone(),
        shutdown.clone(),
    ));

    let mut judge = Judge {
        engine: Engine::new(
            rules,
            chrono::Duration::minutes(i64::from(cfg.late_minutes)),
        )
        .with_max_points(cfg.max_points_per_series),
        pool: pool.clone(),
        writer,
        topic: kafka.readings_topic.clone(),
        rebuild_wait: Duration::from_millis(cfg.rebuild_wait_ms),
        rebuild_rows: cfg.max_points_per_series.saturating_mul(2),
        next_offset: HashMap::new(),
        patients_of: HashMap::new(),
        writer_done: HashMap::new(),
        writer_given_up: HashMap::new(),
        last_seen: HashMap::new(),
        idle_after: Duration::from_secs(u64::from(cfg.late_minutes.max(30)) * 120),
        swept_at: std::time::Instant::now(),
        thresholds_changed,
        threshold_cursor,
        thresholds_seen: HashSet::new(),
    };
    tracing::info!(group = %cfg.group_id, rules = judge.engine.rules().len(), "alerts engine started");
    let max_wait = Duration::from_millis(cfg.batch_max_wait_ms);
    let mut commits = Commits::new(&consumer, &kafka.readings_topic);

    'outer: while !shutdown.is_cancelled() {
        let mut records: Vec<(i32, i64, Option<Batch>)> = Vec::new();
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        while records.len() < cfg.batch_max_records.max(1) {
            let wait_until =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            // After the first record: whatever has arrived with it (the
            // rest of its fetch, what came in while the last batch was
            // judged), and then, with a batch wait, more until the deadline.
            let waiting = deadline.is_some_and(|d| d > tokio::time::Instant::now());
            let idle_commit = deadline.is_none() && commits.pending();
            let msg = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                m = vitalwatch_bus::recv(&consumer) => m,
                () = std::future::ready(()), if deadline.is_some() && !waiting => break,
                () = tokio::time::sleep_until(wait_until) => break,
                () = tokio::time::sleep_until(commits.next_due()), if idle_commit => break,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    continue;
                }
            };
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
            let (partition, offset) = (msg.partition(), msg.offset());
            offsets.insert(partition, offset);
            match Batch::decode(msg.payload().unwrap_or_default()) {
                Ok(batch) => {
                    // Ingest's receipt to here: the Kafka hop and any backlog.
                    let lag = (Utc::now() - batch.received_at)
                        .num_microseconds()
                        .unwrap_or(0);
                    metrics::histogram!("vitalwatch_alerts_record_lag_seconds")
                        .record(lag.max(0) as f64 / 1e6);
                    records.push((partition, offset, Some(batch)));
                }
                // The writer dead-letters it; nothing here to judge.
                Err(e) => {
                    tracing::warn!(partition, offset, error = %e, "record is not a valid batch; skipped");
                    records.push((partition, offset, None));
                }
            }
        }
        if offsets.is_empty() {
            commits.commit(CommitMode::Async);
            continue;
        }
        // Between batches, so that no change of a forgotten patient is
        // still waiting to be stored.
        if let Err(e) = judge.take_threshold_changes().await {
            tracing::warn!(error = %e, "cannot read threshold changes; retried before the next batch");
        }
        let mut changes = Vec::new();
        for (partition, offset, batch) in &records {
            let Some(batch) = batch else {
                judge.resume_check(*partition, *offset);
                continue;
            };
            match judge.judge(*partition, *offset, batch, &shutdown).await {
                Ok(c) => changes.extend(c),
                Err(_) => break 'outer, // shut down while the database was away: nothing committed
            }
        }
        if store_changes(&pool, &changes, &readiness, &shutdown)
            .await
            .is_err()
        {
            break;
        }
        if !changes.is_empty() {
            wake.notify_one();
        }
        commits.judged(&offsets);
        if commits.due() {
            commits.commit(CommitMode::Async);
        }
    }
    commits.finish();
    shutdown.cancel();
    let _ = relay_task.await;
    let _ = escalation_task.await;
    let _ = missing_task.await;
    let _ = listener.await;
    let _ = thresholds_listener.await;
    for t in webhook_tasks {
        let _ = t.await;
    }
    tracing::info!("alerts engine stopped");
    Ok(())
}

/// How often the engine commits the offsets it has judged, at most. A
/// crash replays what it judged since; replays change nothing.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// The engine's offset commits: offsets are committed only once what they
/// cover is stored, and at most every [`COMMIT_EVERY`], since a batch can
/// be a handful of records. A failed commit is logged: what it covered is
/// replayed, which changes nothing.
struct Commits<'a> {
    consumer: &'a StreamConsumer,
    topic: &'a str,
    /// Judged and stored, not committed yet: the next offset to read, by
    /// partition.
    uncommitted: HashMap<i32, i64>,
    /// The last commit's offsets.
    last: HashMap<i32, i64>,
    at: tokio::time::Instant,
}

impl<'a> Commits<'a> {
    fn new(consumer: &'a StreamConsumer, topic: &'a str) -> Commits<'a> {
        Commits {
            consumer,
            topic,
            uncommitted: HashMap::new(),
            last: HashMap::new(),
            at: tokio::time::Instant::now(),
        }
    }

    /// The records up to `offsets` (the last judged, by partition) are
    /// judged and their changes stored.
    fn judged(&mut self, offsets: &HashMap<i32, i64>) {
        self.uncommitted
            .extend(offsets.iter().map(|(p, o)| (*p, o + 1)));
    }

    fn pending(&self) -> bool {
        !self.uncommitted.is_empty()
    }

    fn next_due(&self) -> tokio::time::Instant {
        self.at + COMMIT_EVERY
    }

    fn due(&self) -> bool {
        tokio::time::Instant::now() >= self.next_due()
    }

    fn commit(&mut self, mode: CommitMode) {
        self.at = tokio::time::Instant::now();
        if self.uncommitted.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in &self.uncommitted {
            if let Err(e) = tpl.add_partition_offset(self.topic, *partition, Offset::Offset(*next))
            {
                tracing::warn!(error = %e, partition, "cannot commit this offset");
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "offset commit failed"); // replayed: changes nothing
        }
        self.last = std::mem::take(&mut self.uncommitted);
    }

    /// On the way out: the last commit again, synchronously (an async one
    /// may not have landed), with what was judged since.
    fn finish(&mut self) {
        let since = std::mem::take(&mut self.uncommitted);
        self.uncommitted = std::mem::take(&mut self.last);
        self.uncommitted.extend(since);
        self.commit(CommitMode::Sync);
    }
}

/// The engine and what it needs to rebuild patients.
struct Judge {
    engine: Engine,
    pool: Pool,
    writer: Arc<StreamConsumer>,
    topic: String,
    rebuild_wait: Duration,
    /// Rows of each metric read to rebuild a patient, at most.
    rebuild_rows: usize,
    /// The offset expected next from each partition: another one means the
    /// partition was elsewhere in between (or was rewound), and the state of
    /// its patients is rebuilt.
    next_offset: HashMap<i32, i64>,
    patients_of: HashMap<i32, HashSet<String>>,
    /// Per partition, an offset the writer group is known to have committed.
    writer_done: HashMap<i32, i64>,
    /// When a rebuild last stopped waiting for a lagging writer, per partition.
    writer_given_up: HashMap<i32, std::time::Instant>,
    /// When each patient's last record arrived (wall clock): patients idle
    /// for `idle_after` are forgotten, and rebuilt from the store when they
    /// send again, so memory follows the active patients.
    last_seen: HashMap<String, std::time::Instant>,
    idle_after: Duration,
    swept_at: std::time::Instant,
    /// Set on every notification of a threshold change.
    thresholds_changed: Arc<std::sync::atomic::AtomicBool>,
    /// The newest threshold change read.
    threshold_cursor: i64,
    /// The changes of the last few minutes already applied.
    thresholds_seen: HashSet<i64>,
}

impl Judge {
    /// Forgets the patients of `partition` when `offset` is not the one
    /// expected next (the partition was elsewhere in between, or rewound).
    /// Called for every record, judged or not (an undecodable one).
    fn resume_check(&mut self, partition: i32, offset: i64) {
        if self
            .next_offset
            .get(&partition)
            .is_some_and(|next| *next != offset)
        {
            for patient in self.patients_of.remove(&partition).unwrap_or_default() {
                self.engine.forget(&patient);
                self.last_seen.remove(&patient);
            }
            metrics::counter!("vitalwatch_alerts_partition_resumed_total").increment(1);
        }
        self.next_offset.insert(partition, offset + 1);
    }

    async fn judge(
        &mut self,
        partition: i32,
        offset: i64,
        batch: &Batch,
        shutdown: &CancellationToken,
    ) -> Result<Vec<AlertChange>, StoreError> {
        self.resume_check(partition, offset);
        self.sweep_idle();
        self.last_seen
            .insert(batch.patient_id.clone(), std::time::Instant::now());
        let mut changes = Vec::new();
        if !self.engine.knows(&batch.patient_id) {
            changes = self.rebuild(partition, offset, batch, shutdown).await?;
            self.patients_of
                .entry(partition)
                .or_default()
                .insert(batch.patient_id.clone());
        }
        let (found, skipped) = self.engine.observe(batch);
        if skipped.too_late > 0 {
            metrics::counter!("vitalwatch_alerts_readings_too_late_total")
                .increment(skipped.too_late);
        }
        metrics::counter!("vitalwatch_alerts_readings_judged_total")
            .increment(batch.readings.len() as u64);
        changes.extend(found);
        Ok(changes)
    }

    /// Forgets the patients whose thresholds changed since the last look:
    /// their next reading rebuilds them from the store, with the new
    /// overrides (adopting their open alerts).
    async fn take_threshold_changes(&mut self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if !self.thresholds_changed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let read = async {
            let client = self.pool.get().await?;
            vitalwatch_store::alerts::threshold_changes(&**client, self.threshold_cursor).await
        }
        .await;
        let changes = match read {
            Ok(c) => c,
            Err(e) => {
                self.thresholds_changed.store(true, Ordering::Release); // try again
                return Err(e);
            }
        };
        let recent: HashSet<i64> = changes.iter().map(|(id, _)| *id).collect();
        for (id, patient) in &changes {
            if self.thresholds_seen.contains(id) {
                continue;
            }
            self.threshold_cursor = self.threshold_cursor.max(*id);
            if self.engine.knows(patient) {
                self.engine.forget(patient);
                self.last_seen.remove(patient);
                for patients in self.patients_of.values_mut() {
                    patients.remove(patient);
                }
                tracing::info!(
                    change = id,
                    "thresholds changed; the patient is rebuilt at their next reading"
                );
            }
        }
        self.thresholds_seen = recent;
        Ok(())
    }

    /// Forgets patients idle for `idle_after` (checked once a minute).
    fn sweep_idle(&mut self) {
        if self.swept_at.elapsed() < Duration::from_secs(60) {
            return;
        }
        self.swept_at = std::time::Instant::now();
        let idle_after = self.idle_after;
        let idle: Vec<String> = self
            .last_seen
            .iter()
            .filter(|(_, t)| t.elapsed() >= idle_after)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &idle {
            self.last_seen.remove(p);
            self.engine.forget(p);
            for patients in self.patients_of.values_mut() {
                patients.remove(p);
            }
        }
        if !idle.is_empty() {
            metrics::counter!("vitalwatch_alerts_patients_evicted_total")
                .increment(idle.len() as u64);
        }
        metrics::gauge!("vitalwatch_alerts_patients").set(self.engine.patients() as f64);
    }

    /// Starts a patient from the store: overrides, open alerts, and the
    /// readings of every rule's window before `batch`.
    async fn rebuild(
        &mut self,
        partition: i32,
        offset: i64,
        batch: &Batch,
        shutdown: &CancellationToken,
    ) -> Result<Vec<AlertChange>, StoreError> {
        let started = std::time::Instant::now();
        self.wait_for_writer(partition, offset).await;
        let mut backoff = Duration::from_millis(200);
        let (setup, history) = loop {
            match self.load(batch).await {
                Ok(loaded) => break loaded,
                Err(e) if !shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, "cannot read a patient's history; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return Err(e),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        };
        for refused in self.engine.start_patient(&batch.patient_id, &setup) {
            tracing::warn!(reason = %refused, "patient setup partly refused");
        }
        let replayed = history.len();
        let mut changes = Vec::new();
        if !history.is_empty() {
            let past = Batch {
                readings: history,
                ..batch.clone()
            };
            changes = self.engine.observe(&past).0;
        }
        metrics::histogram!("vitalwatch_alerts_rebuild_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("vitalwatch_alerts_rebuild_readings_total").increment(replayed as u64);
        Ok(changes)
    }

    async fn load(
        &self,
        batch: &Batch,
    ) -> Result<(PatientSetup, Vec<vitalwatch_core::reading::Reading>), StoreError> {
        let client = self.pool.get().await?;
        let mut setup = PatientSetup::default();
        for (rule, params) in
            vitalwatch_store::alerts::overrides_for(&**client, &batch.patient_id).await?
        {
            match serde_json::from_value::<Override>(params) {
                Ok(o) => {
                    setup.overrides.insert(rule, o);
                }
                Err(e) => {
                    tracing::warn!(rule, error = %e, "an override is not valid; the configured rule applies")
                }
            }
        }
        for open in vitalwatch_store::alerts::open_for(&**client, &batch.patient_id).await? {
            let Some(severity) = Severity::parse(&open.severity) else {
                continue;
            };
            setup.open.push(OpenAlert {
                rule: open.rule,
                episode_start: open.episode_start,
                raised_at: open.raised_at,
                severity,
            });
        }
        let from = batch
            .readings
            .iter()
            .map(|r| r.measured_at)
            .min()
            .unwrap_or_else(Utc::now);
        // Up to the record being judged: what the writer stored after it
        // comes again from Kafka, in order, and must not crowd out the
        // readings before it under the per-metric limit.
        let until = batch
            .readings
            .iter()
            .map(|r| r.measured_at)
            .max()
            .unwrap_or(from);
        let since: Vec<_> = self
            .engine
            .lookback()
            .into_iter()
            .map(|(m, d)| (m, from - d))
            .collect();
        let history = vitalwatch_store::readings::history(
            &**client,
            &batch.patient_id,
            &since,
            until,
            // A blood pressure is two rows; more than a series keeps is
            // folded anyway.
            i64::try_from(self.rebuild_rows).unwrap_or(i64::MAX),
        )
        .await?;
        Ok((setup, history))
    }

    /// Waits (up to `rebuild_wait`) until the writer group has committed
    /// `offset` of `partition`: everything this group consumed before it is
    /// then in `readings`.
    async fn wait_for_writer(&mut self, partition: i32, offset: i64) {
        if self
            .writer_done
            .get(&partition)
            .is_some_and(|done| *done >= offset)
            || self
                .writer_given_up
                .get(&partition)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.rebuild_wait;
        loop {
            let writer = self.writer.clone();
            let topic = self.topic.clone();
            let committed = tokio::task::spawn_blocking(move || {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&topic, partition);
                writer
                    .committed_offsets(tpl, Duration::from_secs(5))
                    .ok()
                    .and_then(|t| {
                        t.elements().first().and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                    })
            })
            .await
            .ok()
            .flatten();
            if let Some(c) = committed {
                self.writer_done.insert(partition, c);
                if c >= offset {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(partition, offset, writer = ?committed, "the writer is behind; rebuilding from what is stored");
                metrics::counter!("vitalwatch_alerts_rebuild_writer_behind_total").increment(1);
                // Not again for every patient of the partition: a minute's grace.
                self.writer_given_up
                    .insert(partition, std::time::Instant::now());
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Writes `changes` in one transaction, retrying while the database is
/// away. `Err` only when `shutdown` fired first.
async fn store_changes(
    pool: &Pool,
    changes: &[AlertChange],
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        match try_store(pool, changes).await {
            Ok(()) => {
                metrics::histogram!("vitalwatch_alerts_store_seconds")
                    .record(started.elapsed().as_secs_f64());
                readiness.set_ready("alerts.database");
                return Ok(());
            }
            Err(e) => {
                readiness.set_not_ready("alerts.database", e.to_string());
                tracing::warn!(error = %e, "cannot store alert changes; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return Err(e),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn try_store(pool: &Pool, changes: &[AlertChange]) -> Result<(), StoreError> {
    use vitalwatch_store::alerts::{NewAlert, raise, resolve, update_severity};
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    for c in changes {
        let applied = match c {
            AlertChange::Raised {
                alert_id,
                patient_id,
                rule,
                severity,
                episode_start,
                at,
                value,
                news2_score,
            } => {
                let news2 = news2_score.map(i16::from);
                let detail = serde_json::json!({ "value": value, "at": at });
                raise(
                    &*tx,
                    &NewAlert {
                        alert_id,
                        patient_id,
                        rule,
                        severity: severity.as_str(),
                        episode_start: *episode_start,
                        raised_at: *at,
                        news2_score: news2,
                        detail,
                    },
                )
                .await?
            }
            AlertChange::SeverityChanged {
                alert_id,
                severity,
                at,
                value,
                ..
            } => {
                update_severity(&*tx, alert_id, severity.as_str(), *at, Some(*value as i16)).await?
            }
            AlertChange::Cleared { alert_id, at, .. } => {
                resolve(&*tx, alert_id, *at, None, None).await?
            }
        };
        if !applied && let AlertChange::Raised { alert_id, rule, .. } = c {
            let exists = tx
                .query_opt("SELECT 1 FROM alerts WHERE alert_id = $1", &[alert_id])
                .await?
                .is_some();
            if !exists {
                // Another alert of this rule is open for the patient: the
                // nurse is already on it; this episode is not raised apart.
                tracing::warn!(
                    rule,
                    alert_id,
                    "an alert of this rule is already open for the patient; episode folded into it"
                );
                metrics::counter!("vitalwatch_alerts_raise_conflicts_total").increment(1);
            }
        }
        let kind = match c {
            AlertChange::Raised { .. } => "raised",
            AlertChange::SeverityChanged { .. } => "updated",
            AlertChange::Cleared { .. } => "resolved",
        };
        let outcome = if applied { "applied" } else { "already" };
        metrics::counter!("vitalwatch_alerts_changes_total", "change" => kind, "outcome" => outcome).increment(1);
    }
    tx.commit().await?;
    Ok(())
}

/// Publishes unpublished alert changes to `topic` in commit (`seq`) order whenever
/// woken (by this process, or by a notification of any insert), and every
/// few seconds in case a notification was missed, until `shutdown`.
pub async fn relay(
    pool: Pool,
    producer: Arc<Producer>,
    topic: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match publish_pending(&pool, &producer, &topic, &shutdown).await {
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish alert changes; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5).max(backoff)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Publishes every unpublished change; returns how many.
pub async fn publish_pending(
    pool: &Pool,
    producer: &Producer,
    topic: &str,
    shutdown: &CancellationToken,
) -> Result<usize, StoreError> {
    let mut total = 0;
    loop {
        let mut client = pool.get().await?;
        vitalwatch_store::alerts::sequence(&mut client).await?;
        let tx = client.transaction().await?;
        let events = vitalwatch_store::alerts::lock_unpublished(&*tx, 500).await?;
        if events.is_empty() {
            tx.commit().await?;
            return Ok(total);
        }
        let encoded: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| (e.patient_id.clone(), encode(e)))
            .collect();
        // One after the other: a retried record must not land behind a
        // later change of the same patient. Alert changes are few.
        for (key, payload) in &encoded {
            if vitalwatch_bus::deliver(producer, topic, key, payload, None, None, shutdown)
                .await
                .is_err()
            {
                return Ok(total); // shutting down: rolled back, published after restart
            }
        }
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        vitalwatch_store::alerts::mark_published(&*tx, &ids).await?;
        tx.commit().await?;
        total += events.len();
        metrics::counter!("vitalwatch_alerts_published_total").increment(events.len() as u64);
    }
}

/// The `rpm.alerts.v1` record of a change.
pub fn encode(e: &vitalwatch_store::alerts::Event) -> Vec<u8> {
    use prost::Message as _;
    use proto::{AlertState, Severity as S};
    let severity = match e.severity.as_str() {
        "low" => S::Low,
        "low_medium" => S::LowMedium,
        "medium" => S::Medium,
        "high" => S::High,
        _ => S::Unspecified,
    };
    let state = match e.state.as_str() {
        "raised" => AlertState::Raised,
        "updated" => AlertState::Updated,
        "escalated" => AlertState::Escalated,
        "acknowledged" => AlertState::Acknowledged,
        "resolved" => AlertState::Resolved,
        _ => AlertState::Unspecified,
    };
    proto::AlertEvent {
        alert_id: e.alert_id.clone(),
        patient_id: e.patient_id.clone(),
        rule: e.rule.clone(),
        severity: severity as i32,
        state: state as i32,
        readings: Vec::new(),
        news2_score: e.news2_score.and_then(|s| u32::try_from(s).ok()),
        episode_start: Some(timestamp_to_proto(e.episode_start)),
        event_time: Some(timestamp_to_proto(e.at)),
        actor: e.actor.clone().unwrap_or_default(),
        event_id: u64::try_from(e.id).unwrap_or_default(),
        escalation_level: u32::try_from(e.escalation_level).unwrap_or_default(),
    }
    .encode_to_vec()
}

/// Runs the missing-data rules every `every` until `shutdown`, but only
/// while the writer keeps up: a round runs when the writer group has
/// committed everything that was on the readings topic at the round before,
/// so a reading is never missed because it was still on its way to the
/// store (a writer that lags after an outage would otherwise cause false
/// alarms).
async fn missing_data(
    pool: Pool,
    rules: Vec<crate::rules::Rule>,
    writer: Arc<StreamConsumer>,
    topic: String,
    every: Duration,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    if !rules
        .iter()
        .any(|r| matches!(r.compiled, crate::rules::Compiled::Missing { .. }))
    {
        return;
    }
    let mut previous: Option<Vec<i64>> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let (w, t) = (writer.clone(), topic.clone());
        let progress = tokio::task::spawn_blocking(move || vitalwatch_bus::group_progress(&w, &t))
            .await
            .ok()
            .flatten();
        let Some((ends, committed)) = progress else {
            tracing::warn!("cannot read the writer's progress; missing-data check skipped");
            continue;
        };
        let caught_up = previous.as_ref().is_some_and(|p| {
            p.len() == committed.len() && p.iter().zip(&committed).all(|(end, c)| c >= end)
        });
        previous = Some(ends);
        if !caught_up {
            metrics::counter!("vitalwatch_alerts_missing_checks_skipped_total").increment(1);
            continue;
        }
        let result = async {
            let client = pool.get().await?;
            crate::missing::check(&**client, &rules, Utc::now()).await
        }
        .await;
        tell(
            result,
            "vitalwatch_alerts_missing_changes_total",
            "missing-data check",
            &wake,
        );
    }
}

/// The outcome of a periodic round that changes alerts: counted under
/// `counter`, and the relay woken when something changed; a failure is
/// logged and the next round retries.
fn tell(result: Result<u64, StoreError>, counter: &'static str, what: &str, wake: &Notify) {
    match result {
        Ok(0) => {}
        Ok(n) => {
            metrics::counter!(counter).increment(n);
            wake.notify_one();
        }
        Err(e) => tracing::warn!(error = %e, "{what} failed; retrying"),
    }
}

/// Escalates unacknowledged alerts on wall-clock time until `shutdown`.
pub async fn escalation(
    pool: Pool,
    cfg: AlertsConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let after = Duration::from_secs(u64::from(cfg.escalate_after_minutes) * 60);
    let every = (after / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let result = async {
            let client = pool.get().await?;
            vitalwatch_store::alerts::escalate(&**client, after, cfg.max_escalation_level).await
        }
        .await;
        tell(
            result,
            "vitalwatch_alerts_escalated_total",
            "escalation check",
            &wake,
        );
    }
}
