//! Catching up after an outage: the pipeline runs under load, then the
//! writer and the alerts engine stop while the load goes on (ingest keeps
//! taking readings into Kafka), then they start again and work off the
//! backlog while the load still goes on. It reports how long each took to
//! catch up, at what rate, the resident memory of every service before the
//! outage and while catching up, and loss (acknowledged against stored).
//!
//! This is where a consumer's memory is largest: librdkafka prefetches
//! into its queue as much as the consumer settings allow, and the writer's
//! and the engine's batches are full.
//!
//! `deploy/local/bench --bench catch_up`, with the environment:
//! - `BENCH_RATE` readings/s (default 10,000), `BENCH_DEVICES` (default
//!   rate / 2), `BENCH_BATCH` readings per upload (default 10),
//!   `BENCH_CONNECTIONS` (default 8), `BENCH_PARTITIONS` (default 3);
//! - `BENCH_BEFORE` seconds of steady load before the outage (default
//!   60), `BENCH_OUTAGE` seconds the writer and the engine are down
//!   (default 300), `BENCH_AFTER` seconds of load after they are back
//!   (default 300);
//! - `BENCH_KAFKA_PROPERTIES`: `key=value,key=value` set on every Kafka
//!   client, as `[kafka.properties]` would (to compare consumer settings);
//! - `BENCH_KEEP=1` keeps the database.
//!
//! Nothing here asserts a speed or a size; the figures go in the README.

use std::process::Child;
use std::time::{Duration, Instant};

use vitalwatch::Config;
use vitalwatch_benches::env;
use vitalwatch_sim::load::{Load, LoadReport};

#[path = "pipeline/procs.rs"]
mod procs;

use procs::{
    SERVICE_VAR, Watched, child, clock_ticks, cores, gateway, kafka_positions, keep_or_drop,
    machine_ticks, prime, spawn, stack_config, start, stop, watch,
};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match std::env::var(SERVICE_VAR) {
        Ok(service) => rt.block_on(child(&service)),
        Err(_) => rt.block_on(run()),
    }
}

/// The phases of the run, as the sampler saw them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Before,
    Outage,
    CatchingUp,
    CaughtUp,
}

/// What the sampler saw.
struct Sampled {
    watched: Vec<Watched>,
    /// The phase of each sample.
    phases: Vec<Phase>,
    /// The writer's and the engine's.
    catch_up: [CatchUp; 2],
    /// The machine's busy share while they caught up (of 100% per core).
    busy_catching_up: Option<f64>,
}

/// One consumer group's catch-up.
#[derive(Default, Debug)]
struct CatchUp {
    /// Records behind when its service started again.
    backlog: Option<i64>,
    /// Seconds from the restart until it was within a second of load.
    seconds: Option<f64>,
    /// Records it took while catching up.
    taken: i64,
}

async fn run() -> Result<(), Error> {
    let rate = env("BENCH_RATE", 10_000).max(2) as f64;
    let devices = env("BENCH_DEVICES", (rate / 2.0) as usize).max(1);
    let before = env("BENCH_BEFORE", 60).max(5) as u64;
    let outage = env("BENCH_OUTAGE", 300).max(1) as u64;
    let after = env("BENCH_AFTER", 300).max(10) as u64;
    let partitions = env("BENCH_PARTITIONS", 3).max(1) as i32;

    let cfg = stack_config(partitions).await?;

    let load = Load {
        devices,
        rate,
        batch: env("BENCH_BATCH", 10).max(2),
        connections: Some(env("BENCH_CONNECTIONS", 8).max(1)),
        duration: Duration::from_secs(before + outage + after),
        prefix: "bench".into(),
        // The engine is down for minutes: probes would time out.
        alert_probes: 0,
        warmup: Duration::ZERO,
        ..Load::default()
    };
    load.check()?;
    let broker = gateway(&cfg);
    let entries = vitalwatch::devices::parse_csv(&load.registry_csv())?;
    vitalwatch::devices::register(&cfg.database, &entries).await?;
    eprintln!(
        "  {devices} devices registered; {:.0} readings/s: {before} s steady, {outage} s with the writer and the alerts engine down, {after} s after; {partitions} partitions; kafka properties {:?}",
        load.effective_rate(),
        cfg.kafka.properties
    );

    let mut children = start(&["ingest", "writer", "alerts"], &cfg).await?;
    prime(&load, &broker, &cfg).await?;

    let db_url = cfg.database.url.clone();
    let load_run = vitalwatch_sim::load::run(&load, &broker, Some(&db_url), |line| {
        eprintln!("  {line}");
    });
    let control = control(&cfg, &mut children, rate, before, outage, after);
    let (report, sampled) = tokio::join!(load_run, control);
    stop(&mut children);
    let report: LoadReport = report?;
    let Sampled {
        watched,
        phases,
        catch_up,
        busy_catching_up,
    } = sampled?;

    println!("{}", report.render());
    println!(
        "\n{:<10} {:>16} {:>14} {:>16} {:>13}",
        "group", "backlog, records", "caught up in", "taken meanwhile", "rate"
    );
    for (name, c) in ["writer", "alerts"].iter().zip(&catch_up) {
        match (c.backlog, c.seconds) {
            (Some(backlog), Some(secs)) => println!(
                "{name:<10} {backlog:>16} {secs:>12.0} s {:>16} {:>8.0} rec/s",
                c.taken,
                c.taken as f64 / secs.max(0.001)
            ),
            (backlog, _) => println!(
                "{name:<10} {:>16} {:>14} {:>16}",
                backlog.map_or("?".into(), |b| b.to_string()),
                "NOT caught up",
                c.taken
            ),
        }
    }
    println!(
        "\n{:<16} {:>18} {:>22} {:>18} {:>13}",
        "process", "RSS max before", "RSS max catching up", "RSS max after", "RSS last"
    );
    for w in &watched {
        let max_in = |phase: Phase| {
            w.rss_mib
                .iter()
                .zip(&phases)
                .filter(|(_, p)| **p == phase)
                .map(|(r, _)| *r)
                .fold(0.0, f64::max)
        };
        println!(
            "{:<16} {:>14.1} MiB {:>18.1} MiB {:>14.1} MiB {:>9.1} MiB",
            w.name,
            max_in(Phase::Before),
            max_in(Phase::CatchingUp),
            max_in(Phase::CaughtUp),
            w.rss_mib.last().copied().unwrap_or(0.0)
        );
    }
    println!("(sampled every second; the writer and the engine are not running during the outage)");
    if let Some(busy) = busy_catching_up {
        println!(
            "machine busy while catching up: {busy:.0}% of {:.0}%",
            cores() * 100.0
        );
    }

    keep_or_drop(&cfg.database.url).await;
    Ok(())
}

/// Samples every process each second; stops the writer and the engine
/// after `before` seconds and starts them again after `outage` more; then
/// follows their groups until both are within a second of load of the end
/// of the topic, and samples on until the load's `after` seconds are over.
/// Returns the processes' samples, the phase of each sample, and each
/// group's catch-up.
async fn control(
    cfg: &Config,
    children: &mut [(String, Child)],
    rate: f64,
    before: u64,
    outage: u64,
    after: u64,
) -> Result<Sampled, Error> {
    let ticks = clock_ticks();
    let mut watched = watch(children);
    let mut phases = Vec::new();
    let mut catch_up: [CatchUp; 2] = Default::default();
    let mut committed_at_restart = [0i64; 2];
    let groups = [cfg.writer.group_id.clone(), cfg.alerts.group_id.clone()];
    let started = Instant::now();
    let mut restarted: Option<Instant> = None;
    let mut machine_at_restart = None;
    let mut busy_catching_up = None;
    let mut phase = Phase::Before;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Where the groups stand, asked in the background from the restart on
    // (a query can take seconds when the broker is busy, and must not hold
    // up the samples; before the restart it would only load the broker).
    let (report, positions) = tokio::sync::watch::channel(None);
    let asking = {
        let (cfg, groups) = (cfg.clone(), groups.clone());
        let from = tokio::time::Instant::now() + Duration::from_secs(before + outage);
        tokio::spawn(async move {
            tokio::time::sleep_until(from).await;
            loop {
                let (c, g) = (cfg.clone(), groups.clone());
                if let Ok(got) =
                    tokio::task::spawn_blocking(move || kafka_positions(&c, &[&g[0], &g[1]])).await
                    && got.is_some()
                {
                    let _ = report.send(got);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let mut moved = [(0i64, Instant::now()); 2];
    let mut reported = [false; 2];
    let mut last_print = Instant::now();
    // The load runs for before + outage + after; sample until it is done
    // (the children then exit, and sampling stops).
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        if phase == Phase::Before && elapsed >= Duration::from_secs(before) {
            eprintln!("  outage: stopping the writer and the alerts engine");
            stop(&mut children[1..3]);
            phase = Phase::Outage;
        }
        if phase == Phase::Outage && elapsed >= Duration::from_secs(before + outage) {
            for (i, service) in ["writer", "alerts"].iter().enumerate() {
                let c = spawn(service, cfg)?;
                watched[i + 1].pids = vec![c.id()];
                children[i + 1].1 = c;
            }
            restarted = Some(Instant::now());
            machine_at_restart = machine_ticks();
            phase = Phase::CatchingUp;
            eprintln!("  restarted the writer and the alerts engine");
        }
        if matches!(phase, Phase::CatchingUp | Phase::CaughtUp)
            && let (Some((end, committed)), Some(at)) = (positions.borrow().clone(), restarted)
        {
            for i in 0..2 {
                let cu = &mut catch_up[i];
                if cu.backlog.is_none() {
                    cu.backlog = Some(end - committed[i]);
                    committed_at_restart[i] = committed[i];
                }
                if cu.seconds.is_none() {
                    cu.taken = committed[i] - committed_at_restart[i];
                    if ((end - committed[i]) as f64) <= rate {
                        cu.seconds = Some(at.elapsed().as_secs_f64());
                    }
                }
                // A group behind whose commits have not moved for 30 s
                // after it had caught up: where is its service? (Once a
                // run: the threads' stacks and the database's sessions.)
                if moved[i].0 != committed[i] {
                    moved[i] = (committed[i], Instant::now());
                } else if cu.seconds.is_some()
                    && !reported[i]
                    && (end - committed[i]) as f64 > rate
                    && moved[i].1.elapsed() >= Duration::from_secs(30)
                {
                    reported[i] = true;
                    let name = ["writer", "alerts"][i];
                    eprintln!(
                        "  {name} has not committed for {:.0} s ({} behind)",
                        moved[i].1.elapsed().as_secs_f64(),
                        end - committed[i]
                    );
                    stalled(name, children[i + 1].1.id(), &cfg.database.url).await;
                }
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                last_print = Instant::now();
                eprintln!(
                    "  {:.0} s after the restart: writer {} behind, alerts {} behind",
                    at.elapsed().as_secs_f64(),
                    end - committed[0],
                    end - committed[1]
                );
            }
            if phase == Phase::CatchingUp && catch_up.iter().all(|c| c.seconds.is_some()) {
                phase = Phase::CaughtUp;
                if let (Some(a), Some(b)) = (machine_at_restart, machine_ticks()) {
                    busy_catching_up = Some(cores() * 100.0 * (b.0 - a.0) / (b.3 - a.3).max(1.0));
                }
                eprintln!("  both caught up");
            }
        }
        let mut alive = false;
        for w in watched.iter_mut() {
            w.sample(ticks);
        }
        for (_, c) in children.iter_mut() {
            alive |= matches!(c.try_wait(), Ok(None));
        }
        phases.push(phase);
        if !alive {
            return Err("every service exited during the run".into());
        }
        if elapsed >= Duration::from_secs(before + outage + after) {
            asking.abort();
            return Ok(Sampled {
                watched,
                phases,
                catch_up,
                busy_catching_up,
            });
        }
    }
}

/// What a stalled service is doing: its threads' stacks (gdb, if the
/// machine has it) and the database's sessions, to stderr.
async fn stalled(name: &str, pid: u32, url: &str) {
    let stacks = std::process::Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .output();
    match stacks {
        Ok(out) => eprintln!(
            "  {name}'s threads:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => eprintln!("  no stacks of {name} (gdb: {e})"),
    }
    let sessions = async {
        let client = vitalwatch_store::connect(url).await?;
        let rows = client
            .query(
                "SELECT pid, application_name, state, coalesce(wait_event_type, ''),
                        coalesce(wait_event, ''), coalesce(extract(epoch FROM now() - xact_start), 0)::float8,
                        left(query, 100)
                   FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(
            rows.iter()
                .map(|r| {
                    format!(
                        "    {} {:?} {} {}/{} in transaction {:.1} s: {}",
                        r.get::<_, i32>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, Option<String>>(2).unwrap_or_default(),
                        r.get::<_, String>(3),
                        r.get::<_, String>(4),
                        r.get::<_, f64>(5),
                        r.get::<_, Option<String>>(6).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        )
    };
    match sessions.await {
        Ok(s) => eprintln!("  the database's sessions:\n{s}"),
        Err(e) => eprintln!("  no sessions: {e}"),
    }
}
