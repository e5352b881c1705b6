//! What the whole-pipeline benches share: each service in a process of
//! its own (the bench's binary started again as that service), watched
//! for CPU and resident memory; where the Kafka groups stand; the
//! database dropped afterwards.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vitalwatch::{Config, Service};
use vitalwatch_benches::rss_mib;
use vitalwatch_core::health::Readiness;
use vitalwatch_sim::load::Load;
use vitalwatch_sim::replay::Broker;
use vitalwatch_test_support as ts;

/// Set in a child: the service it runs.
pub const SERVICE_VAR: &str = "VITALWATCH_BENCH_SERVICE";

/// A child process: one service, configured by the environment the parent
/// set, until SIGTERM.
pub async fn child(service: &str) -> Result<(), Box<dyn std::error::Error>> {
    let service = match service {
        "ingest" => Service::Ingest,
        "writer" => Service::Writer,
        "alerts" => Service::Alerts,
        "api" => Service::Api,
        other => return Err(format!("unknown service {other}").into()),
    };
    // The services' warnings (VITALWATCH_LOG overrides), on stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_env("VITALWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cfg = Config::load(None)?;
    let token = CancellationToken::new();
    let stop = token.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        stop.cancel();
    });
    if let Err(e) = vitalwatch::run_service(service, &cfg, Readiness::new(), token).await {
        eprintln!("  {service:?} failed: {e:#}");
        return Err(e.into());
    }
    Ok(())
}

/// The services' settings for a run: the tests' database (a new one),
/// Mosquitto and Kafka broker, a readings topic of `partitions` and
/// consumer groups of its own; `BENCH_KAFKA_PROPERTIES` (`key=value,...`)
/// set on every Kafka client as `[kafka.properties]` would.
pub async fn stack_config(partitions: i32) -> Result<Config, Box<dyn std::error::Error>> {
    let mut cfg = Config {
        database: ts::database().await,
        mqtt: ts::mqtt(),
        ..Config::default()
    };
    let mut kafka = ts::kafka().await;
    kafka.readings_topic = ts::unique("t.readings");
    kafka.partitions = partitions;
    if let Ok(props) = std::env::var("BENCH_KAFKA_PROPERTIES") {
        for pair in props.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("BENCH_KAFKA_PROPERTIES: {pair:?} is not key=value"))?;
            kafka
                .properties
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    vitalwatch_bus::ensure_topics(&kafka, &[&kafka.readings_topic]).await?;
    cfg.kafka = kafka;
    cfg.writer.group_id = ts::unique("writer");
    cfg.alerts.group_id = ts::unique("alerts");
    cfg.alerts.writer_group_id = cfg.writer.group_id.clone();
    Ok(cfg)
}

/// The load's gateways' way into the local Mosquitto.
pub fn gateway(cfg: &Config) -> Broker {
    let (host, port) = ts::mqtt_host_port();
    Broker::local_gateway(host, port, ts::mqtt_password(), cfg.mqtt.topic_root.clone())
}

/// Starts each of `services` in a process of its own and gives them time
/// to subscribe, load the registry and join their groups; an error if one
/// exits meanwhile.
pub async fn start(
    services: &[&str],
    cfg: &Config,
) -> Result<Vec<(String, Child)>, Box<dyn std::error::Error>> {
    let mut children = Vec::new();
    for service in services {
        children.push(((*service).to_owned(), spawn(service, cfg)?));
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    for (name, c) in children.iter_mut() {
        if let Some(status) = c.try_wait()? {
            return Err(format!("{name} exited at start-up: {status}").into());
        }
    }
    Ok(children)
}

/// The processes a run watches: `children`, then Mosquitto, tansu and
/// every PostgreSQL process.
pub fn watch(children: &[(String, Child)]) -> Vec<Watched> {
    let mut watched: Vec<Watched> = children
        .iter()
        .map(|(name, c)| Watched::new(name, vec![c.id()]))
        .collect();
    watched.push(Watched::named("mosquitto", "mosquitto"));
    watched.push(Watched::named("tansu", "tansu"));
    watched.push(Watched::named("postgres (all)", "postgres"));
    watched
}

/// The machine's cores.
pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// Keeps the run's database with `BENCH_KEEP=1`, else drops it.
pub async fn keep_or_drop(url: &str) {
    if std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1") {
        println!("kept the database: {url}");
    } else {
        drop_database(url).await;
    }
}

/// Records on the readings topic (the sum of its high watermarks) and the
/// offsets `groups` have committed on it: where a backlog builds.
pub fn kafka_positions(cfg: &Config, groups: &[&str]) -> Option<(i64, Vec<i64>)> {
    let mut end = 0;
    let mut committed = Vec::new();
    for group in groups {
        let (got, ends) = ts::committed_and_end(&cfg.kafka, group).ok()?;
        end = ends.iter().sum();
        committed.push(got.iter().sum());
    }
    Some((end, committed))
}

/// Every device uploads once, over a minute; then waits until the writer
/// and the alerts engine have taken every record.
pub async fn prime(
    load: &Load,
    broker: &Broker,
    cfg: &Config,
) -> Result<(), Box<dyn std::error::Error>> {
    let once = Load {
        rate: load.devices as f64 * 2.0 / 60.0,
        batch: 2,
        duration: Duration::from_secs(61),
        alert_probes: 0,
        storm_every: None,
        warmup: Duration::ZERO,
        ..load.clone()
    };
    let started = Instant::now();
    eprintln!("  priming: every device uploads once");
    vitalwatch_sim::load::run(&once, broker, None, |_| {}).await?;
    loop {
        let c = cfg.clone();
        let got = tokio::task::spawn_blocking(move || {
            kafka_positions(&c, &[&c.writer.group_id, &c.alerts.group_id])
        })
        .await?;
        if let Some((end, committed)) = got {
            if end > 0 && committed.iter().all(|&c| c == end) {
                eprintln!(
                    "  primed in {:.0} s: {end} records taken by the writer and the alerts engine",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            eprintln!(
                "  priming: {end} records; writer at {}, alerts at {}",
                committed[0], committed[1]
            );
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err("priming: the services did not catch up in 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// A process (or every process of one name) watched for CPU and memory.
pub struct Watched {
    pub name: String,
    pub pids: Vec<u32>,
    /// Looked up again at every sample (PostgreSQL forks a backend per
    /// connection).
    comm: Option<&'static str>,
    /// CPU ticks of each pid at the last sample, and when it was taken.
    ticks: std::collections::HashMap<u32, f64>,
    last: Option<Instant>,
    pub cpu_percent: Vec<f64>,
    pub rss_mib: Vec<f64>,
}

/// Clock ticks per second of /proc/*/stat times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
}

/// The machine's CPU time so far, in ticks: (busy, idle, iowait, total).
pub fn machine_ticks() -> Option<(f64, f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = f.iter().take(8).sum();
    let (idle, iowait) = (*f.get(3)?, *f.get(4)?);
    Some((total - idle - iowait, idle, iowait, total))
}

/// Pids of processes whose command name is `comm`.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

impl Watched {
    pub fn new(name: &str, pids: Vec<u32>) -> Watched {
        Watched {
            name: name.into(),
            pids,
            comm: None,
            ticks: Default::default(),
            last: None,
            cpu_percent: Vec::new(),
            rss_mib: Vec::new(),
        }
    }

    pub fn named(name: &str, comm: &'static str) -> Watched {
        Watched {
            comm: Some(comm),
            ..Watched::new(name, pids_named(comm))
        }
    }

    pub fn sample(&mut self, ticks: f64) {
        if let Some(comm) = self.comm {
            self.pids = pids_named(comm);
        }
        let now = Instant::now();
        // A process born since the last sample counts all its CPU.
        let mut used = 0.0;
        let mut seen = std::collections::HashMap::new();
        for &p in &self.pids {
            if let Some(t) = cpu_ticks(p) {
                used += t - self.ticks.get(&p).copied().unwrap_or(0.0);
                seen.insert(p, t);
            }
        }
        self.ticks = seen;
        if let Some(at) = self.last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 {
                self.cpu_percent.push(100.0 * used / ticks / secs);
            }
        }
        self.last = Some(now);
        // Memory of one process; for PostgreSQL's many, their sum (shared
        // buffers are counted in each that touched them).
        let rss: f64 = self.pids.iter().filter_map(|&p| rss_mib(p)).sum();
        self.rss_mib.push(rss);
    }
}

pub fn spawn(service: &str, cfg: &Config) -> Result<Child, Box<dyn std::error::Error>> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(SERVICE_VAR, service)
        .envs(cfg.service_env())
        .env("VITALWATCH_API__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null());
    Ok(cmd.spawn()?)
}

pub fn stop(children: &mut [(String, Child)]) {
    for (_, c) in children.iter() {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (name, c) in children.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !matches!(c.try_wait(), Ok(Some(_))) {
            eprintln!("  {name} did not stop in time; killing it");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Drops the database at `url`, retrying while connections to it close
/// (the services are gone; the probes' connections close shortly).
pub async fn drop_database(url: &str) {
    let Some((_, name)) = url.rsplit_once('/') else {
        return;
    };
    let admin = match vitalwatch_store::connect(&ts::admin_database_url()).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("  could not drop {name}: {e}");
            return;
        }
    };
    let drop = format!("DROP DATABASE IF EXISTS {name}");
    let mut tries = 0;
    while let Err(e) = admin.batch_execute(&drop).await {
        tries += 1;
        if tries == 20 {
            eprintln!("  could not drop {name}: {e}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
