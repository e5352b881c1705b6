//! Bucketed trends for charts: min, max, avg and count per bucket.
//!
//! Buckets are aligned to the Unix epoch (`date_bin` with origin
//! 1970-01-01 UTC) on both layouts, so both return the same buckets.
//!
//! On TimescaleDB, the range is split in three: the middle, aligned to the
//! coarsest continuous aggregate whose width divides the requested bucket,
//! is read from that aggregate; the unaligned head and tail come from raw
//! rows. The aggregates are real-time, so buckets newer than their last
//! refresh are computed at query time from the level below. Partial
//! aggregates (min, max, sum, count) are then combined into the requested
//! buckets, which is exact: the average is `sum / count` over every reading.
//! On plain PostgreSQL every bucket comes from raw rows.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;

use crate::StoreError;
use crate::storage::{AGGREGATES, Layout};

/// One bucket of one series.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Where a query's rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The aggregate read for `[agg_from, agg_to)`, when one fits.
    pub aggregate: Option<&'static str>,
    pub agg_from: DateTime<Utc>,
    pub agg_to: DateTime<Utc>,
}

/// Chooses the coarsest aggregate whose width divides `bucket_seconds`, and
/// the part of `[from, to)` aligned to it. `None` aggregate: raw rows only.
pub fn plan(layout: Layout, from: DateTime<Utc>, to: DateTime<Utc>, bucket_seconds: i64) -> Plan {
    let raw = Plan {
        aggregate: None,
        agg_from: to,
        agg_to: to,
    };
    if layout != Layout::TimescaleDb || bucket_seconds <= 0 {
        return raw;
    }
    let Some(&(width, view)) = AGGREGATES
        .iter()
        .rev()
        .find(|(w, _)| bucket_seconds % w == 0)
    else {
        return raw;
    };
    let (f, t) = (from.timestamp(), to.timestamp());
    // First aligned instant at or after `from` (sub-second parts count).
    let mut a = f.div_euclid(width) * width;
    if a < f || (a == f && from.timestamp_subsec_nanos() > 0) {
        a += width;
    }
    let b = t.div_euclid(width) * width;
    match (
        DateTime::from_timestamp(a, 0),
        DateTime::from_timestamp(b, 0),
    ) {
        (Some(agg_from), Some(agg_to)) if a < b => Plan {
            aggregate: Some(view),
            agg_from,
            agg_to,
        },
        _ => raw,
    }
}

/// Buckets of `bucket_seconds` over `[from, to)` for one patient and metric,
/// ordered by component, then time. Empty buckets are absent.
pub async fn buckets(
    client: &impl GenericClient,
    layout: Layout,
    patient_id: &str,
    metric: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket_seconds: i64,
) -> Result<Vec<Bucket>, StoreError> {
    let plan = plan(layout, from, to, bucket_seconds);
    let rows = match plan.aggregate {
        None => {
            let stmt = client
                .prepare_cached(
                    "SELECT date_bin($5::int8 * interval '1 second', time, timestamptz '1970-01-01 00:00:00+00') AS bucket,
                            component, min(value), max(value), avg(value), count(*)
                       FROM readings
                      WHERE patient_id = $1 AND metric = $2 AND time >= $3 AND time < $4
                      GROUP BY 1, 2
                      ORDER BY 2, 1",
                )
                .await?;
            client
                .query(&stmt, &[&patient_id, &metric, &from, &to, &bucket_seconds])
                .await?
        }
        Some(view) => {
            // $3..$4 raw head, $5..$6 aggregate, $6..$7 raw tail.
            let stmt = client
                .prepare_cached(&format!(
                    "WITH parts (t, component, lo, hi, total, n) AS (
                         SELECT bucket, component, min, max, sum, count
                           FROM {view}
                          WHERE patient_id = $1 AND metric = $2 AND bucket >= $5 AND bucket < $6
                         UNION ALL
                         SELECT time, component, value, value, value, 1
                           FROM readings
                          WHERE patient_id = $1 AND metric = $2 AND time >= $3 AND time < $4
                         UNION ALL
                         SELECT time, component, value, value, value, 1
                           FROM readings
                          WHERE patient_id = $1 AND metric = $2 AND time >= $6 AND time < $7
                     )
                     SELECT date_bin($8::int8 * interval '1 second', t, timestamptz '1970-01-01 00:00:00+00') AS bucket,
                            component, min(lo), max(hi), sum(total) / sum(n)::float8, sum(n)::int8
                       FROM parts
                      GROUP BY 1, 2
                      ORDER BY 2, 1"
                ))
                .await?;
            client
                .query(
                    &stmt,
                    &[
                        &patient_id,
                        &metric,
                        &from,
                        &plan.agg_from,
                        &plan.agg_from,
                        &plan.agg_to,
                        &to,
                        &bucket_seconds,
                    ],
                )
                .await?
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap_or_default()
    }

    #[test]
    fn the_coarsest_dividing_aggregate_over_the_aligned_middle() {
        let day = 86_400;
        let p = plan(
            Layout::TimescaleDb,
            at(10 * day + 100),
            at(40 * day + 7200 + 5),
            3600,
        );
        assert_eq!(p.aggregate, Some("readings_1h"));
        assert_eq!(
            (p.agg_from, p.agg_to),
            (at(10 * day + 3600), at(40 * day + 7200))
        );
        assert_eq!(
            plan(Layout::TimescaleDb, at(0), at(30 * day), 7 * day).aggregate,
            Some("readings_1d")
        );
        assert_eq!(
            plan(Layout::TimescaleDb, at(0), at(day), 900).aggregate,
            Some("readings_5m")
        );
        // 90 s is not a multiple of 5 minutes; 7 minutes neither.
        assert_eq!(
            plan(Layout::TimescaleDb, at(0), at(day), 420).aggregate,
            None
        );
        // A range shorter than one aggregate bucket is read raw.
        assert_eq!(
            plan(Layout::TimescaleDb, at(100), at(3000), 3600).aggregate,
            None
        );
        // An aligned start with a sub-second part starts at the next bucket.
        let from = at(3600) + chrono::Duration::milliseconds(1);
        assert_eq!(
            plan(Layout::TimescaleDb, from, at(5 * 3600), 3600).agg_from,
            at(7200)
        );
        assert_eq!(
            plan(Layout::Native, at(0), at(30 * day), 3600).aggregate,
            None
        );
    }
}
