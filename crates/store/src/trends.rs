//! Bucketed trends for charts: min, max, avg and count per bucket.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::StoreError;

/// One bucket of one series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// Start of the bucket; buckets are aligned to the Unix epoch.
    pub start: DateTime<Utc>,
    /// Blood-pressure component (`systolic`, `diastolic`), empty for scalars.
    #[serde(skip)]
    pub component: String,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub count: i64,
}

/// Buckets of `bucket_seconds` over `[from, to)` for one patient and metric,
/// ordered by component, then time. Empty buckets are absent.
pub async fn buckets(
    client: &impl GenericClient,
    patient_id: &str,
    metric: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket_seconds: i64,
) -> Result<Vec<Bucket>, StoreError> {
    let rows = client
        .query(
            "SELECT date_bin($5::int8 * interval '1 second', time, timestamptz '1970-01-01 00:00:00+00') AS bucket,
                    component, min(value), max(value), avg(value), count(*)
               FROM readings
              WHERE patient_id = $1 AND metric = $2 AND time >= $3 AND time < $4
              GROUP BY 1, 2
              ORDER BY 2, 1",
            &[&patient_id, &metric, &from, &to, &bucket_seconds],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Bucket {
            start: r.get(0),
            component: r.get(1),
            min: r.get(2),
            max: r.get(3),
            avg: r.get(4),
            count: r.get(5),
        })
        .collect())
}
