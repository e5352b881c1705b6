//! Shared pieces of the vitalwatch benchmarks.
//!
//! Benchmarks print their figures; they assert nothing about speed. Run
//! `cargo bench -p vitalwatch-benches` and copy the figures, with the
//! machine, into the README.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Runs `f` repeatedly for about `budget` after a short warm-up and returns
/// the mean time per call.
pub fn measure(budget: Duration, mut f: impl FnMut()) -> Duration {
    let warm = Instant::now();
    while warm.elapsed() < budget / 10 {
        f();
    }
    let mut calls: u64 = 0;
    let start = Instant::now();
    while start.elapsed() < budget {
        for _ in 0..64 {
            f();
        }
        calls += 64;
    }
    black_box(calls);
    start.elapsed() / calls.max(1) as u32
}

/// One line of a benchmark report: name, ns per call, calls per second, and
/// the items per second when a call handles `items` items.
pub fn report(name: &str, per_call: Duration, items: u64) {
    let ns = per_call.as_secs_f64() * 1e9;
    let calls = 1e9 / ns.max(f64::MIN_POSITIVE);
    println!(
        "{name:<44} {ns:>10.0} ns/call {calls:>12.0} calls/s {:>12.0} items/s",
        calls * items as f64
    );
}

/// A setting from the environment (`BENCH_*`), or `default` when unset or
/// not a number.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// PostgreSQL's own limit, what the writer is measured against: `rows` by
/// binary COPY straight into `readings` in `tx`, with no staging and no
/// conflict handling. Returns the rows written.
pub async fn copy_straight(
    tx: &vitalwatch_store::tokio_postgres::Transaction<'_>,
    rows: &vitalwatch_store::readings::Rows,
) -> Result<u64, vitalwatch_store::StoreError> {
    use vitalwatch_store::readings::{COLUMN_TYPES, COLUMNS};
    let sink = tx
        .copy_in(&format!("COPY readings ({COLUMNS}) FROM STDIN BINARY"))
        .await?;
    rows.copy_into(
        vitalwatch_store::tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, COLUMN_TYPES),
    )
    .await
}

/// Resident memory of process `pid`, MiB (Linux).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The value of one series in Prometheus text (`name{labels} value`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}
