//! `vitalwatch-sim`: simulated home devices. See `vitalwatch-sim --help`.

use std::time::Duration;

use clap::{Parser, Subcommand};
use vitalwatch_core::topics;
use vitalwatch_sim::Format;
use vitalwatch_sim::generate::Plan;
use vitalwatch_sim::load::Load;
use vitalwatch_sim::replay::{Broker as SimBroker, Pace, pipeline_alerts, replay, stored_readings};
use vitalwatch_sim::scenario::{RunFile, Scenario};
use vitalwatch_sim::score::{naive_over, score};

/// The plan of a run directory `generate` wrote.
fn load(dir: &std::path::Path) -> anyhow::Result<Plan> {
    let path = dir.join("run.toml");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let run: RunFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    run.scenario.check().map_err(anyhow::Error::msg)?;
    Ok(Plan::new(&run.scenario, run.start))
}

#[derive(Parser)]
#[command(
    name = "vitalwatch-sim",
    version,
    about = "Simulated home vitals devices publishing over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct BrokerArgs {
    #[arg(long, default_value = "127.0.0.1", env = "VITALWATCH_MQTT__HOST")]
    host: String,
    #[arg(long, default_value_t = 18830, env = "VITALWATCH_MQTT__PORT")]
    port: u16,
    /// Root of device topics.
    #[arg(long, default_value = topics::MQTT_DEVICE_ROOT)]
    topic_root: String,
    /// MQTT user name (a gateway account allowed to publish for the cohort).
    #[arg(long, env = "VITALWATCH_SIM_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "VITALWATCH_SIM_PASSWORD", default_value = "")]
    password: String,
}

impl From<BrokerArgs> for SimBroker {
    fn from(b: BrokerArgs) -> SimBroker {
        SimBroker {
            host: b.host,
            port: b.port,
            username: b.username,
            password: b.password,
            topic_root: b.topic_root,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Plan a scenario: write run.toml, registry.csv (for `vitalwatch
    /// devices import`) and truth.jsonl (the labelled events) to --out.
    Generate {
        /// The scenario (TOML); defaults for anything it leaves out.
        #[arg(long)]
        scenario: Option<std::path::PathBuf>,
        /// Overrides the scenario's patient count.
        #[arg(long)]
        patients: Option<usize>,
        /// Overrides the scenario's days.
        #[arg(long)]
        days: Option<f64>,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Overrides the scenario's id prefix (a fresh one per run keeps
        /// runs on one database apart).
        #[arg(long)]
        prefix: Option<String>,
        /// When patient time starts (RFC 3339); default: `days` before now,
        /// so an accelerated replay ends about now.
        #[arg(long)]
        start: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Publish a generated run's batches over MQTT, accelerated.
    Replay {
        /// The directory `generate` wrote.
        #[arg(long)]
        run: std::path::PathBuf,
        /// Scenario seconds per wall second; 0: as fast as the broker acknowledges.
        #[arg(long, default_value_t = 0.0, conflicts_with = "live")]
        speed: f64,
        /// Live: each batch when the clock reaches its own time (those
        /// already due at once); for a run generated with --start now.
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Score the alerts the pipeline raised for a run against its ground
    /// truth, beside a naive single-reading baseline on the same readings.
    Score {
        #[arg(long)]
        run: std::path::PathBuf,
        /// The pipeline's database.
        #[arg(long, env = "VITALWATCH_DATABASE__URL")]
        database_url: String,
        /// Also write the reports as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Leave these rules' alerts out (comma-separated): the wall-clock
        /// missing-data rules cannot be judged on an accelerated replay,
        /// whose readings all start out days old.
        #[arg(long, value_delimiter = ',')]
        exclude_rules: Vec<String>,
    },
    /// Load mode: many wearables at a target rate, over one connection
    /// each or a few gateways, with reconnect storms on demand; reports
    /// the rate achieved, acknowledgements, and (with --database-url)
    /// publish-to-row and publish-to-alert latency and the readings stored.
    Load {
        /// Simulated wearables (heart rate and SpO2).
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Readings per second across them.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Readings per upload (even).
        #[arg(long, default_value_t = 10)]
        batch: usize,
        /// Gateway connections sharing the devices.
        #[arg(long, default_value_t = 4, conflicts_with = "connection_per_device")]
        connections: usize,
        /// One MQTT connection per device instead of gateways.
        #[arg(long)]
        connection_per_device: bool,
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Ids: devices {prefix}-d000001…, patients {prefix}-p000001…
        #[arg(long, default_value = "load")]
        prefix: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Format::Protobuf)]
        format: Format,
        /// Every this many seconds, drop --storm-share of the connections
        /// at once (no DISCONNECT) and let them reconnect together.
        #[arg(long)]
        storm_every: Option<u64>,
        #[arg(long, default_value_t = 0.5)]
        storm_share: f64,
        /// Patients with thermometers timing publish to alert (0: none).
        #[arg(long, default_value_t = 4)]
        alert_probes: usize,
        /// Milliseconds between alert probes.
        #[arg(long, default_value_t = 1000)]
        alert_probe_ms: u64,
        /// One upload per this many milliseconds is timed from publish to row.
        #[arg(long, default_value_t = 100)]
        row_probe_ms: u64,
        /// Seconds at the start when nothing is timed (the engine rebuilds
        /// every patient it first sees from the store).
        #[arg(long, default_value_t = 0)]
        warmup: u64,
        /// The pipeline's database: latency probes and the stored count.
        #[arg(long, env = "VITALWATCH_DATABASE__URL")]
        database_url: Option<String>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Print the devices as `vitalwatch devices import` CSV and exit.
        #[arg(long)]
        registry: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate {
            scenario,
            patients,
            days,
            seed,
            prefix,
            start,
            out,
        } => {
            let mut s = match scenario {
                Some(path) => Scenario::from_toml(&std::fs::read_to_string(&path)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                None => Scenario::default(),
            };
            s.patients = patients.unwrap_or(s.patients);
            s.days = days.unwrap_or(s.days);
            s.seed = seed.unwrap_or(s.seed);
            s.prefix = prefix.unwrap_or(s.prefix);
            s.check().map_err(anyhow::Error::msg)?;
            let start = start.unwrap_or_else(|| {
                chrono::Utc::now() - chrono::Duration::milliseconds((s.days * 86_400_000.0) as i64)
            });
            let plan = Plan::new(&s, start);
            std::fs::create_dir_all(&out)?;
            let run = RunFile {
                start: plan.start,
                scenario: s,
            };
            std::fs::write(out.join("run.toml"), toml::to_string(&run)?)?;
            std::fs::write(out.join("registry.csv"), plan.registry_csv())?;
            std::fs::write(out.join("truth.jsonl"), plan.truth_jsonl())?;
            let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
            for t in &plan.truth {
                *kinds.entry(t.kind.name()).or_default() += 1;
            }
            println!(
                "vitalwatch-sim: {} patients, {} devices, {} days from {}; events: {kinds:?}; wrote {}",
                plan.patients.len(),
                plan.patients.iter().map(|p| p.devices.len()).sum::<usize>(),
                run.scenario.days,
                plan.start,
                out.display()
            );
            Ok(())
        }
        Command::Replay {
            run,
            speed,
            live,
            broker,
        } => {
            let plan = load(&run)?;
            let b = SimBroker::from(broker);
            anyhow::ensure!(speed >= 0.0 && speed.is_finite(), "--speed is 0 or more");
            let pace = match (live, speed) {
                (true, _) => Pace::WallClock,
                (false, 0.0) => Pace::Fast,
                (false, x) => Pace::Speed(x),
            };
            let r = replay(&plan, &b, pace, |r| {
                println!(
                    "vitalwatch-sim: published {} batches ({} readings), acknowledged {}, {:.0} batches/s",
                    r.published,
                    r.readings,
                    r.acknowledged,
                    r.published as f64 / r.seconds.max(0.001)
                );
            })
            .await
            .map_err(anyhow::Error::msg)?;
            println!(
                "vitalwatch-sim: done: published={} acknowledged={} readings={} duplicates={} malformed={} backlogs={} unknown={} seconds={:.1} rate={:.0} batches/s",
                r.published,
                r.acknowledged,
                r.readings,
                r.duplicates,
                r.malformed,
                r.backlogs,
                r.unknown,
                r.seconds,
                r.published as f64 / r.seconds.max(0.001)
            );
            Ok(())
        }
        Command::Score {
            run,
            database_url,
            json,
            exclude_rules,
        } => {
            let plan = load(&run)?;
            let (client, conn) =
                tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let mut alerts = pipeline_alerts(&client, &plan.scenario.prefix).await?;
            alerts.retain(|a| !exclude_rules.contains(&a.rule));
            let mut truth = plan.truth.clone();
            if !exclude_rules.is_empty() {
                // What only the left-out rules could catch is not scored either.
                truth.retain(|t| t.kind != vitalwatch_sim::model::EventKind::DeviceSilent);
            }
            let patient_days = plan.patients.len() as f64 * plan.scenario.days;
            let ours = score(&truth, &alerts, patient_days);
            // The baseline judges the same readings the pipeline stored.
            let stored = stored_readings(&client, &plan.scenario.prefix).await?;
            let base = score(&truth, &naive_over(stored), patient_days);
            if !exclude_rules.is_empty() {
                println!(
                    "left out: the alerts of {}, and device_silent events\n",
                    exclude_rules.join(", ")
                );
            }
            print!(
                "{}",
                ours.render("vitalwatch rules (the pipeline's alerts):")
            );
            println!();
            print!(
                "{}",
                base.render(
                    "naive baseline (an alarm whenever one stored reading crosses a limit):"
                )
            );
            if let Some(path) = json {
                let both = serde_json::json!({"vitalwatch": ours, "naive": base});
                std::fs::write(path, serde_json::to_string_pretty(&both)?)?;
            }
            Ok(())
        }
        Command::Load {
            devices,
            rate,
            batch,
            connections,
            connection_per_device,
            duration,
            prefix,
            seed,
            format,
            storm_every,
            storm_share,
            alert_probes,
            alert_probe_ms,
            row_probe_ms,
            warmup,
            database_url,
            json,
            registry,
            broker,
        } => {
            let load = Load {
                devices,
                rate,
                batch,
                connections: (!connection_per_device).then_some(connections),
                duration: Duration::from_secs(duration),
                prefix,
                seed,
                format,
                storm_every: storm_every.map(Duration::from_secs),
                storm_share,
                alert_probes,
                alert_probe_interval: Duration::from_millis(alert_probe_ms),
                row_probe_interval: Duration::from_millis(row_probe_ms),
                warmup: Duration::from_secs(warmup),
                ..Load::default()
            };
            load.check().map_err(anyhow::Error::msg)?;
            if registry {
                print!("{}", load.registry_csv());
                return Ok(());
            }
            let b = SimBroker::from(broker);
            println!(
                "vitalwatch-sim: load: {} devices, {:.0} readings/s ({} per upload, each device every {} ms), {} s",
                load.devices,
                load.effective_rate(),
                load.batch,
                load.interval_ms(),
                duration
            );
            let report = vitalwatch_sim::load::run(&load, &b, database_url.as_deref(), |line| {
                println!("vitalwatch-sim: {line}");
            })
            .await
            .map_err(anyhow::Error::msg)?;
            print!("{}", report.render());
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
            }
            anyhow::ensure!(
                report.uploads_acknowledged == report.uploads_published,
                "{} uploads were not acknowledged by the broker",
                report.uploads_published - report.uploads_acknowledged
            );
            anyhow::ensure!(
                report.lost.unwrap_or(0) == 0,
                "{} acknowledged readings are not in the database",
                report.lost.unwrap_or(0)
            );
            Ok(())
        }
    }
}
