//! The whole pipeline under load, end to end: the simulator's load mode
//! publishes to Mosquitto; ingest, writer, alerts and the API run each in
//! a process of its own (this bench's binary started again as one
//! service), on the local stack's PostgreSQL, Mosquitto and the tests'
//! tansu. It reports the rate sustained from publish to committed row,
//! loss (acknowledged against stored), publish-to-row and publish-to-alert
//! latency, and the CPU and resident memory of every process.
//!
//! `deploy/local/bench --bench pipeline`, with the environment:
//! - `BENCH_RATE` readings/s (default 10,000), `BENCH_DEVICES` (default
//!   rate / 2: wearables measuring heart rate and SpO2 once a second),
//!   `BENCH_BATCH` readings per upload (default 10), `BENCH_CONNECTIONS`
//!   gateway connections (default 8), `BENCH_SECONDS` (default 600),
//!   `BENCH_WARMUP` seconds not timed (default 60), `BENCH_STORM_EVERY`
//!   seconds between reconnect storms (default 0: none);
//! - `BENCH_PARTITIONS` of the readings topic (default 3);
//! - `BENCH_KAFKA_PROPERTIES`: `key=value,key=value` set on every Kafka
//!   client, as `[kafka.properties]` would;
//! - `BENCH_PRIME` (default 1): before the timed run, every device uploads
//!   once (over a minute) and the bench waits until the writer and the
//!   alerts engine have taken it all, so that the run measures the steady
//!   state, not the engine's first sight of every patient; 0 skips it;
//! - `BENCH_STAGES` (default 1): first measure each stage alone on the
//!   same uploads (Mosquitto relay, Kafka produce, Kafka consume,
//!   PostgreSQL binary COPY), `BENCH_STAGE_SECONDS` each (default 20), and
//!   give the pipeline as a share of the slowest; 0 skips it;
//! - `BENCH_KEEP=1` keeps the database (dropped by default: 10 minutes at
//!   100,000 readings/s are 60 million rows).
//!
//! Nothing here asserts a speed; the figures go in the README.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vitalwatch_benches::env;
use vitalwatch_sim::load::{Load, LoadReport};
use vitalwatch_test_support as ts;

#[path = "pipeline/procs.rs"]
mod procs;
#[path = "pipeline/stages.rs"]
mod stages;

use procs::{
    SERVICE_VAR, Watched, child, clock_ticks, cores, gateway, kafka_positions, keep_or_drop,
    machine_ticks, prime, stack_config, start, stop, watch,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match std::env::var(SERVICE_VAR) {
        Ok(service) => rt.block_on(child(&service)),
        Err(_) => rt.block_on(run()),
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let rate = env("BENCH_RATE", 10_000).max(2) as f64;
    let devices = env("BENCH_DEVICES", (rate / 2.0) as usize).max(1);
    let seconds = env("BENCH_SECONDS", 600).max(10) as u64;
    let warmup = (env("BENCH_WARMUP", 60) as u64).min(seconds - 5);
    let storm_every = env("BENCH_STORM_EVERY", 0) as u64;
    let partitions = env("BENCH_PARTITIONS", 3).max(1) as i32;

    let cfg = stack_config(partitions).await?;

    let load = Load {
        devices,
        rate,
        batch: env("BENCH_BATCH", 10).max(2),
        connections: Some(env("BENCH_CONNECTIONS", 8).max(1)),
        duration: Duration::from_secs(seconds),
        prefix: "bench".into(),
        storm_every: (storm_every > 0).then(|| Duration::from_secs(storm_every)),
        warmup: Duration::from_secs(warmup),
        ..Load::default()
    };
    load.check()?;
    let broker = gateway(&cfg);
    let limits = if env("BENCH_STAGES", 1) == 1 {
        let seconds = env("BENCH_STAGE_SECONDS", 20).max(2) as u64;
        eprintln!("  each stage alone, {seconds} s each");
        let limits = stages::measure(&load, &broker, &cfg, seconds).await?;
        for l in &limits {
            eprintln!("  {:<40} {:>9.0} {}/s", l.stage, l.per_second, l.unit);
        }
        limits
    } else {
        Vec::new()
    };
    let entries = vitalwatch::devices::parse_csv(&load.registry_csv())?;
    vitalwatch::devices::register(&cfg.database, &entries).await?;
    eprintln!(
        "  {} devices registered; {:.0} readings/s for {seconds} s ({warmup} s not timed), {} partitions",
        devices,
        load.effective_rate(),
        partitions
    );

    let mut children = start(&["ingest", "writer", "alerts", "api"], &cfg).await?;

    if env("BENCH_PRIME", 1) == 1 {
        prime(&load, &broker, &cfg).await?;
    }
    let ticks = clock_ticks();
    let mut watched = watch(&children);
    watched.push(Watched::new("load generator", vec![std::process::id()]));
    let machine_before = machine_ticks();
    let cores = cores();
    let sampling = CancellationToken::new();
    let sampler = {
        let stop = sampling.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            let mut samples = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                for w in watched.iter_mut() {
                    w.sample(ticks);
                }
                // Every 5 minutes, memory so far: is it flat?
                samples += 1;
                if samples.is_multiple_of(60) {
                    let rss: Vec<String> = watched
                        .iter()
                        .map(|w| {
                            let mib = w.rss_mib.last().copied().unwrap_or(0.0);
                            format!("{} {mib:.0}", w.name)
                        })
                        .collect();
                    eprintln!("  RSS (MiB) at {} min: {}", samples / 12, rss.join(", "));
                }
            }
            watched
        })
    };

    // Where the records are: produced by ingest, taken by writer and alerts.
    let positions = {
        let (stop, cfg) = (sampling.clone(), cfg.clone());
        tokio::spawn(async move {
            let mut last: [Option<i64>; 2] = [None, None];
            let mut since = [Instant::now(); 2];
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let c = cfg.clone();
                let got = tokio::task::spawn_blocking(move || {
                    kafka_positions(&c, &[&c.writer.group_id, &c.alerts.group_id])
                })
                .await;
                if let Ok(Some((end, c))) = got {
                    eprintln!(
                        "  kafka: {end} records produced; writer {} behind, alerts {} behind",
                        end - c[0],
                        end - c[1]
                    );
                    // A group behind whose commits have not moved for 30 s:
                    // what does the broker say of it?
                    for (i, group) in [&cfg.writer.group_id, &cfg.alerts.group_id]
                        .iter()
                        .enumerate()
                    {
                        let moved = last[i] != Some(c[i]);
                        if moved {
                            (last[i], since[i]) = (Some(c[i]), Instant::now());
                        } else if c[i] < end && since[i].elapsed() > Duration::from_secs(30) {
                            let (kafka, group) = (cfg.kafka.clone(), (*group).clone());
                            let state = tokio::task::spawn_blocking(move || {
                                ts::group_state(&kafka, &group)
                            })
                            .await;
                            eprintln!(
                                "  {} has not committed for {:.0} s: group {:?}",
                                ["writer", "alerts"][i],
                                since[i].elapsed().as_secs_f64(),
                                state
                            );
                        }
                    }
                }
            }
        })
    };
    let report = vitalwatch_sim::load::run(&load, &broker, Some(&cfg.database.url), |line| {
        eprintln!("  {line}");
    })
    .await;
    sampling.cancel();
    let watched = sampler.await?;
    positions.abort();
    stop(&mut children);
    let report: LoadReport = report?;

    println!("{}", report.render());
    match report.stored_after_seconds {
        Some(after) => println!(
            "end to end: {:.0} readings/s from first publish to last committed row ({} rows in {:.0} s of publishing + {:.1} s)",
            report.stored.unwrap_or(0) as f64 / (report.seconds + after),
            report.stored.unwrap_or(0),
            report.seconds,
            after
        ),
        None => println!("end to end: NOT every acknowledged reading was stored"),
    }
    if let Some(slowest) = limits
        .iter()
        .min_by(|a, b| a.readings_per_second.total_cmp(&b.readings_per_second))
    {
        let rate = load.effective_rate();
        println!(
            "\n{:<40} {:>16} {:>13} {:>13} {:>17}",
            "each stage alone", "per second", "readings/s", "machine busy", "CPU at the rate"
        );
        // What each stage would take of the machine at the load's rate, if
        // its CPU grew with the rate: the pipeline needs them all at once.
        let mut needed = 0.0;
        for l in &limits {
            let at_rate = l.machine_busy * rate / l.readings_per_second;
            needed += at_rate * f64::from(l.times);
            println!(
                "{:<40} {:>8.0} {:<7} {:>13.0} {:>12.0}% {:>10.0}%{}",
                l.stage,
                l.per_second,
                l.unit,
                l.readings_per_second,
                l.machine_busy,
                at_rate,
                if l.times > 1 {
                    format!(" x{}", l.times)
                } else {
                    String::new()
                }
            );
        }
        println!(
            "the stages need {needed:.0}% of the machine at {rate:.0} readings/s (it has {:.0}%), before the load generator and the rules: at most {:.0} readings/s fit",
            cores * 100.0,
            rate * (cores * 100.0 / needed).min(1.0)
        );
        if let (Some(stored), Some(after)) = (report.stored, report.stored_after_seconds) {
            let end_to_end = stored as f64 / (report.seconds + after);
            println!(
                "the pipeline: {end_to_end:.0} readings/s end to end = {:.0}% of the slowest stage alone ({})",
                100.0 * end_to_end / slowest.readings_per_second,
                slowest.stage
            );
        }
    }
    println!(
        "\n{:<16} {:>9} {:>9} {:>13} {:>13} {:>13}",
        "process", "CPU avg", "CPU max", "RSS first", "RSS max", "RSS last"
    );
    for w in &watched {
        let avg = w.cpu_percent.iter().sum::<f64>() / w.cpu_percent.len().max(1) as f64;
        let max = w.cpu_percent.iter().copied().fold(0.0, f64::max);
        let first = w.rss_mib.get(1).copied().unwrap_or(0.0);
        let rss_max = w.rss_mib.iter().copied().fold(0.0, f64::max);
        let last = w.rss_mib.last().copied().unwrap_or(0.0);
        println!(
            "{:<16} {avg:>8.0}% {max:>8.0}% {first:>9.1} MiB {rss_max:>9.1} MiB {last:>9.1} MiB",
            w.name
        );
    }
    println!("(CPU: % of one core, sampled every 5 s; 200% is the whole machine)");
    if let (Some(a), Some(b)) = (machine_before, machine_ticks()) {
        let total = (b.3 - a.3).max(1.0);
        println!(
            "machine, from the start of the timed run: busy {:.0}%, idle {:.0}%, iowait {:.0}% (of {:.0}%; busy includes what no process above is charged: kernel threads, interrupts, anything else running)",
            cores * 100.0 * (b.0 - a.0) / total,
            cores * 100.0 * (b.1 - a.1) / total,
            cores * 100.0 * (b.2 - a.2) / total,
            cores * 100.0
        );
    }

    keep_or_drop(&cfg.database.url).await;
    Ok(())
}
