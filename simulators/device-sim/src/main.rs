//! `vitalwatch-sim`: simulated home devices. See `vitalwatch-sim --help`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use vitalwatch_core::topics;
use vitalwatch_sim::{Cohort, Format};

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
struct CohortArgs {
    /// Number of simulated patients (one device each).
    #[arg(long, default_value_t = 20)]
    patients: usize,
    /// Prefix of patient and device ids.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Random seed: the same seed gives the same cohort and readings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Print the cohort as `device_id,patient_id,kind` CSV for `vitalwatch devices import`.
    Cohort(CohortArgs),
    /// Publish readings over MQTT (QoS 1) and report how many the broker acknowledged.
    Run {
        #[command(flatten)]
        cohort: CohortArgs,
        /// Batches per second across the cohort (each carries 2-3 readings).
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Seconds to run; 0 runs until interrupted.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        #[arg(long, default_value = "127.0.0.1", env = "VITALWATCH_MQTT__HOST")]
        host: String,
        #[arg(long, default_value_t = 18830, env = "VITALWATCH_MQTT__PORT")]
        port: u16,
        /// Root of device topics.
        #[arg(long, default_value = topics::MQTT_DEVICE_ROOT)]
        topic_root: String,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// MQTT user name (a gateway account allowed to publish for the cohort).
        #[arg(long, env = "VITALWATCH_SIM_USERNAME")]
        username: Option<String>,
        #[arg(long, env = "VITALWATCH_SIM_PASSWORD", default_value = "")]
        password: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Cohort(c) => {
            print!(
                "{}",
                Cohort::new(c.patients, &c.prefix, c.seed).registry_csv()
            );
            Ok(())
        }
        Command::Run {
            cohort,
            rate,
            duration,
            host,
            port,
            topic_root,
            format,
            username,
            password,
        } => {
            let broker = Broker {
                host,
                port,
                username,
                password,
            };
            run(cohort, rate, duration, broker, topic_root, format).await
        }
    }
}

struct Broker {
    host: String,
    port: u16,
    username: Option<String>,
    password: String,
}

async fn run(
    c: CohortArgs,
    rate: f64,
    duration: u64,
    broker: Broker,
    root: String,
    format: Format,
) -> anyhow::Result<()> {
    let Broker {
        host,
        port,
        username,
        password,
    } = broker;
    anyhow::ensure!(c.patients > 0, "--patients must be at least 1");
    anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
    let mut cohort = Cohort::new(c.patients, &c.prefix, c.seed);
    let mut opts = MqttOptions::new(
        format!("{}-sim-{}", c.prefix, std::process::id()),
        host.clone(),
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = username {
        opts.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 2000);
    let acked = Arc::new(AtomicU64::new(0));
    let acked_in_loop = acked.clone();
    let events = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked_in_loop.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("vitalwatch-sim: mqtt: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });

    println!(
        "vitalwatch-sim: {} patients, {rate} batches/s, to {host}:{port} under {root}/",
        c.patients
    );
    let started = Instant::now();
    let stop_at = (duration > 0).then(|| started + Duration::from_secs(duration));
    let (mut published, mut readings) = (0u64, 0u64);
    let mut next_patient = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut last_report = Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
            _ = sigterm.recv() => break,
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while published < due {
            let (payload, n) = cohort.next_batch(next_patient, chrono::Utc::now(), format);
            let topic =
                topics::mqtt_readings_topic(&root, &cohort.patients[next_patient].device_id);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?;
            published += 1;
            readings += n as u64;
            next_patient = (next_patient + 1) % cohort.patients.len();
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            println!(
                "vitalwatch-sim: published {published} batches ({readings} readings), acknowledged {}",
                acked.load(Ordering::Relaxed)
            );
            last_report = Instant::now();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), events).await;
    let secs = started.elapsed().as_secs_f64();
    let acked = acked.load(Ordering::Relaxed);
    println!(
        "vitalwatch-sim: done: published={published} acknowledged={acked} readings={readings} seconds={secs:.1} rate={:.1} batches/s",
        published as f64 / secs
    );
    anyhow::ensure!(
        acked == published,
        "{} publishes were not acknowledged by the broker",
        published - acked
    );
    Ok(())
}
