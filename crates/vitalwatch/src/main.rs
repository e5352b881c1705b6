//! `vitalwatch`: remote patient monitoring pipeline. See `vitalwatch --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vitalwatch::{Config, Service};

#[derive(Parser)]
#[command(
    name = "vitalwatch",
    version,
    about = "Remote patient monitoring: MQTT devices -> Kafka -> PostgreSQL -> care teams"
)]
struct Cli {
    /// TOML configuration file; `VITALWATCH_*` variables override it.
    #[arg(long, short, env = "VITALWATCH_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// MQTT -> rpm.readings.v1 (and rpm.deadletter.v1).
    Ingest,
    /// rpm.readings.v1 -> the readings table.
    Writer,
    /// The rules engine: rpm.readings.v1 -> alerts, rpm.alerts.v1.
    Alerts,
    /// The care-team HTTP API.
    Api,
    /// Every service in this process, for a single machine.
    All,
    /// Apply database migrations, then exit.
    Migrate,
    /// Create the Kafka topics if they are missing, then exit.
    Topics,
    /// Device registry.
    #[command(subcommand)]
    Devices(Devices),
    /// Print a bearer token signed with `api.auth.hs256_secret`, for trying
    /// the API locally (refused when no shared secret is configured).
    Token {
        /// The `sub` claim: who the caller is (matched against care-team members).
        #[arg(long)]
        subject: String,
        /// A role (`nurse`, `clinician`, `admin`, `device-admin`); repeatable.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Minutes until it expires.
        #[arg(long, default_value_t = 60)]
        minutes: u32,
    },
}

#[derive(Subcommand)]
enum Devices {
    /// Register a device and assign it to a patient.
    Register {
        #[arg(long)]
        device: String,
        #[arg(long)]
        patient: Option<String>,
        #[arg(long, default_value = "unknown")]
        kind: String,
        /// When the assignment starts (RFC 3339); default: now.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Import `device_id,patient_id,kind[,assigned_at]` lines from a CSV file.
    Import { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VITALWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vitalwatch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vitalwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    cfg.validate()?;
    let services: &[Service] = match cli.command {
        Command::Migrate => {
            let applied = vitalwatch::migrate(&cfg.database, Duration::from_secs(60)).await?;
            println!("migrations applied: {applied:?}");
            return Ok(());
        }
        Command::Topics => return vitalwatch::create_topics(&cfg.kafka).await,
        Command::Devices(Devices::Register {
            device,
            patient,
            kind,
            since,
        }) => {
            let entry = vitalwatch::devices::Entry {
                device_id: device,
                patient_id: patient,
                kind,
                since,
            };
            vitalwatch::devices::register(&cfg.database, &[entry]).await?;
            return Ok(());
        }
        Command::Devices(Devices::Import { file }) => {
            let n = vitalwatch::devices::import(&cfg.database, &file).await?;
            println!("{n} devices registered");
            return Ok(());
        }
        Command::Token {
            subject,
            roles,
            minutes,
        } => {
            let ttl = chrono::Duration::minutes(i64::from(minutes));
            let token = vitalwatch_api::auth::mint_local(&cfg.api.auth, &subject, &roles, ttl)
                .map_err(anyhow::Error::msg)?;
            println!("{token}");
            return Ok(());
        }
        Command::Ingest => &[Service::Ingest],
        Command::Writer => &[Service::Writer],
        Command::Alerts => &[Service::Alerts],
        Command::Api => &[Service::Api],
        Command::All => &[
            Service::Ingest,
            Service::Writer,
            Service::Alerts,
            Service::Api,
        ],
    };
    // Metrics recorder first, so every service's metrics reach /metrics.
    let _ = vitalwatch_api::telemetry::metrics_handle();
    if services.contains(&Service::Writer)
        || services.contains(&Service::Api)
        || services.contains(&Service::Ingest)
    {
        vitalwatch::migrate(&cfg.database, Duration::from_secs(60)).await?;
    }
    if services.len() > 1 {
        vitalwatch::create_topics(&cfg.kafka).await?;
    }
    let readiness = vitalwatch_core::health::Readiness::new();
    vitalwatch::run_services(services, &cfg, readiness, vitalwatch::shutdown_on_signals()).await
}
