//! Writing reading rows: a few statements per batch of Kafka records, never
//! a query per reading, and idempotent through the `readings_identity` key.
//!
//! [`insert`] (the writer's path): binary `COPY` straight into `readings`
//! under a savepoint, and only when that meets a duplicate, `COPY` into a
//! session-local staging table then `INSERT … SELECT … ON CONFLICT DO
//! NOTHING` ([`insert_staged`]). [`insert_unnest`] is the same with array
//! parameters; `benches/benches/writer_throughput.rs` measures each against
//! PostgreSQL's own `COPY` limit.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use vitalwatch_core::reading::Batch;

use crate::StoreError;
use crate::storage::{self, Layout};

/// The columns written, in the order of [`COLUMN_TYPES`].
pub const COLUMNS: &str =
    "time, patient_id, device_id, metric, component, value, unit, seq, quality, received_at";

/// Binary COPY types of [`COLUMNS`].
pub const COLUMN_TYPES: &[Type] = &[
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::FLOAT8,
    Type::TEXT,
    Type::INT8,
    Type::INT2,
    Type::TIMESTAMPTZ,
];

/// Column-wise rows for one batched write.
#[derive(Debug, Default)]
pub struct Rows {
    time: Vec<DateTime<Utc>>,
    patient_id: Vec<String>,
    device_id: Vec<String>,
    metric: Vec<&'static str>,
    component: Vec<&'static str>,
    value: Vec<f64>,
    unit: Vec<&'static str>,
    seq: Vec<Option<i64>>,
    quality: Vec<i16>,
    received_at: Vec<DateTime<Utc>>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.time.is_empty()
    }

    /// The distinct UTC days of `time`, in order.
    pub fn days(&self) -> Vec<chrono::NaiveDate> {
        let days: std::collections::BTreeSet<_> =
            self.time.iter().map(|t| t.date_naive()).collect();
        days.into_iter().collect()
    }

    /// Appends one row (benchmarks and loaders; the writer uses [`Rows::push`]).
    #[allow(clippy::too_many_arguments)]
    pub fn push_row(
        &mut self,
        time: DateTime<Utc>,
        patient_id: &str,
        device_id: &str,
        metric: &'static str,
        component: &'static str,
        value: f64,
        unit: &'static str,
        seq: Option<i64>,
        quality: i16,
        received_at: DateTime<Utc>,
    ) {
        self.time.push(time);
        self.patient_id.push(patient_id.to_owned());
        self.device_id.push(device_id.to_owned());
        self.metric.push(metric);
        self.component.push(component);
        self.value.push(value);
        self.unit.push(unit);
        self.seq.push(seq);
        self.quality.push(quality);
        self.received_at.push(received_at);
    }

    /// Writes every row into an open binary `COPY … FROM STDIN` of
    /// [`COLUMNS`].
    pub async fn copy_into(&self, writer: BinaryCopyInWriter) -> Result<u64, StoreError> {
        let mut writer = std::pin::pin!(writer);
        for i in 0..self.len() {
            let row: [&(dyn ToSql + Sync); 10] = [
                &self.time[i],
                &self.patient_id[i],
                &self.device_id[i],
                &self.metric[i],
                &self.component[i],
                &self.value[i],
                &self.unit[i],
                &self.seq[i],
                &self.quality[i],
                &self.received_at[i],
            ];
            writer.as_mut().write(&row).await?;
        }
        Ok(writer.finish().await?)
    }

    /// Adds every value of every reading of `batch`.
    pub fn push(&mut self, batch: &Batch) {
        // A sequence number beyond i64 is kept as unknown rather than wrapped.
        let seq = batch.seq.and_then(|s| i64::try_from(s).ok());
        for r in &batch.readings {
            let info = r.metric.info();
            for (component, value) in r.values() {
                self.time.push(r.measured_at);
                self.patient_id.push(batch.patient_id.clone());
                self.device_id.push(batch.device_id.clone());
                self.metric.push(info.name);
                self.component.push(component);
                self.value.push(value);
                self.unit.push(info.unit);
                self.seq.push(seq);
                self.quality.push(i16::from(r.quality.0));
                self.received_at.push(batch.received_at);
            }
        }
    }
}

/// Writes `rows` durably, in a transaction of their own, on either layout;
/// returns how many were new. On the native layout the partitions of the
/// rows' days are made first, in their own short transaction: creating a
/// partition locks `readings`, which must not be held across the write.
///
/// `readings` has no CHECK constraint, so a check violation means a row
/// found no partition (retention dropped it meanwhile, or an older writer
/// did not make it): that is [`StoreError::Schema`], worth a retry (which
/// makes it), never a reason to give the readings up.
pub async fn write(
    client: &mut tokio_postgres::Client,
    layout: Layout,
    rows: &Rows,
) -> Result<u64, StoreError> {
    if layout == Layout::Native {
        storage::ensure_partitions_for(&*client, &rows.days()).await?;
    }
    let mut tx = client.transaction().await?;
    let n = match insert(&mut tx, rows).await {
        Err(StoreError::Db(e))
            if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) =>
        {
            return Err(StoreError::Schema(format!(
                "no partition for a row yet: {e}"
            )));
        }
        other => other?,
    };
    tx.commit().await?;
    Ok(n)
}

/// Inserts `rows` inside the transaction `tx`, skipping those already
/// stored (and repeats within `rows`). Returns how many were new.
///
/// First, under a savepoint, a binary `COPY` straight into `readings`: the
/// fastest write PostgreSQL has, taken whenever no row is a duplicate
/// (every batch but a replay). A duplicate makes the `COPY` fail on the
/// unique key; then the savepoint is rolled back and the rows go through
/// the idempotent path: `COPY` into `readings_staging`, a temporary table
/// private to the connection and emptied at every commit, then
/// `INSERT … SELECT … ON CONFLICT DO NOTHING` from it.
pub async fn insert(
    tx: &mut tokio_postgres::Transaction<'_>,
    rows: &Rows,
) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let direct = tx.savepoint("readings_copy").await?;
    match copy_direct(&direct, rows).await {
        Ok(n) => {
            direct.commit().await?;
            return Ok(n);
        }
        Err(StoreError::Db(e))
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            direct.rollback().await?;
            tracing::debug!(
                rows = rows.len(),
                "batch holds stored readings; writing it idempotently"
            );
        }
        Err(e) => return Err(e),
    }
    insert_staged(tx, rows).await
}

async fn copy_direct(tx: &tokio_postgres::Transaction<'_>, rows: &Rows) -> Result<u64, StoreError> {
    let sink = tx
        .copy_in(&format!("COPY readings ({COLUMNS}) FROM STDIN BINARY"))
        .await?;
    rows.copy_into(BinaryCopyInWriter::new(sink, COLUMN_TYPES))
        .await
}

/// The idempotent path alone (see [`insert`]).
pub async fn insert_staged(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &Rows,
) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS readings_staging (
             time timestamptz, patient_id text, device_id text, metric text, component text,
             value float8, unit text, seq int8, quality int2, received_at timestamptz
         ) ON COMMIT DELETE ROWS",
    )
    .await?;
    let sink = tx
        .copy_in(&format!(
            "COPY readings_staging ({COLUMNS}) FROM STDIN BINARY"
        ))
        .await?;
    rows.copy_into(BinaryCopyInWriter::new(sink, COLUMN_TYPES))
        .await?;
    let n = tx
        .execute(
            &format!(
                "INSERT INTO readings ({COLUMNS}) SELECT {COLUMNS} FROM readings_staging
                 ORDER BY patient_id, metric, time
                 ON CONFLICT (patient_id, metric, time, component, device_id) DO NOTHING"
            ),
            &[],
        )
        .await?;
    Ok(n)
}

/// The same as [`insert`] with one `INSERT … SELECT FROM unnest($1, …)`:
/// no staging table, and it needs no transaction of its own.
pub async fn insert_unnest(client: &impl GenericClient, rows: &Rows) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let n = client
        .execute(
            "INSERT INTO readings (time, patient_id, device_id, metric, component, value, unit, seq, quality, received_at)
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::float8[], $7::text[], $8::int8[], $9::int2[], $10::timestamptz[])
             ON CONFLICT (patient_id, metric, time, component, device_id) DO NOTHING",
            &[
                &rows.time,
                &rows.patient_id,
                &rows.device_id,
                &rows.metric,
                &rows.component,
                &rows.value,
                &rows.unit,
                &rows.seq,
                &rows.quality,
                &rows.received_at,
            ],
        )
        .await?;
    Ok(n)
}

/// A patient's readings of `since`'s metrics from each one's instant on and
/// up to `until`, oldest first, rebuilt as core readings (a blood pressure's two rows as
/// one panel): what the rules engine replays to rebuild a patient's windows
/// after a restart or a rebalance. At most `limit` rows of each metric are
/// read (its newest up to `until`), so a dense stream (a 1 Hz wearable)
/// costs a rebuild no more than the engine keeps. Readings after `until`
/// are left out: the rebuild is of the history before the record being
/// judged, whatever the writer has stored since (after a restart of the
/// engine, Kafka delivers those again, in order).
pub async fn history(
    client: &impl GenericClient,
    patient_id: &str,
    since: &[(vitalwatch_core::catalogue::Metric, DateTime<Utc>)],
    until: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<vitalwatch_core::reading::Reading>, StoreError> {
    use std::collections::BTreeMap;
    use vitalwatch_core::catalogue::{Acvpu, Metric};
    use vitalwatch_core::reading::{Measurement, Quality, Reading};

    let metrics: Vec<&str> = since.iter().map(|(m, _)| m.name()).collect();
    let instants: Vec<DateTime<Utc>> = since.iter().map(|(_, t)| *t).collect();
    let rows = client
        .query(
            "SELECT * FROM (
                 SELECT r.*
                   FROM unnest($2::text[], $3::timestamptz[]) AS h(metric, since)
                  CROSS JOIN LATERAL (
                        SELECT time, device_id, metric, component, value, quality
                          FROM readings
                         WHERE patient_id = $1 AND metric = h.metric
                           AND time >= h.since AND time <= $5
                         ORDER BY time DESC
                         LIMIT $4
                  ) r
             ) newest ORDER BY time",
            &[&patient_id, &metrics, &instants, &limit, &until],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    // Blood pressure rows by (time, device): systolic, diastolic, quality.
    type Panel = (Option<f64>, Option<f64>, i16);
    let mut panels: BTreeMap<(DateTime<Utc>, String), Panel> = BTreeMap::new();
    for row in rows {
        let time: DateTime<Utc> = row.try_get(0)?;
        let device: String = row.try_get(1)?;
        let metric: &str = row.try_get(2)?;
        let component: &str = row.try_get(3)?;
        let value: f64 = row.try_get(4)?;
        let quality: i16 = row.try_get(5)?;
        let Ok(metric) = metric.parse::<Metric>() else {
            continue;
        };
        let measurement = match metric {
            Metric::BloodPressure => {
                let p = panels
                    .entry((time, device))
                    .or_insert((None, None, quality));
                match component {
                    "systolic" => p.0 = Some(value),
                    "diastolic" => p.1 = Some(value),
                    _ => {}
                }
                continue;
            }
            Metric::Consciousness => match Acvpu::from_code(value) {
                Some(a) => Measurement::Consciousness(a),
                None => continue,
            },
            _ => Measurement::Scalar(value),
        };
        out.push(Reading {
            metric,
            measurement,
            measured_at: time,
            quality: Quality(u8::try_from(quality).unwrap_or(0)),
        });
    }
    for ((time, _), (systolic, diastolic, quality)) in panels {
        if let (Some(systolic), Some(diastolic)) = (systolic, diastolic) {
            out.push(Reading {
                metric: Metric::BloodPressure,
                measurement: Measurement::BloodPressure {
                    systolic,
                    diastolic,
                },
                measured_at: time,
                quality: Quality(u8::try_from(quality).unwrap_or(0)),
            });
        }
    }
    out.sort_by_key(|r| r.measured_at);
    Ok(out)
}
