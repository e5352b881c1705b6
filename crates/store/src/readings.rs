//! Writing reading rows: one statement per batch of Kafka records, never a
//! query per reading, and idempotent through the `readings_identity` key.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use vitalwatch_core::reading::Batch;

use crate::StoreError;

/// Column-wise rows for one `INSERT ... SELECT FROM unnest(...)`.
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

/// Inserts `rows`, skipping those already stored. Returns how many were new.
pub async fn insert(client: &impl GenericClient, rows: &Rows) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let n = client
        .execute(
            "INSERT INTO readings (time, patient_id, device_id, metric, component, value, unit, seq, quality, received_at)
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::float8[], $7::text[], $8::int8[], $9::int2[], $10::timestamptz[])
             ON CONFLICT ON CONSTRAINT readings_identity DO NOTHING",
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
