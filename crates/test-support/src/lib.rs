//! Helpers for integration tests against the real services that
//! `deploy/local/test` starts: PostgreSQL, Mosquitto and a Kafka-protocol
//! broker (tansu).
//!
//! Every test gets its own database, Kafka topics, consumer groups, MQTT
//! topic root and client ids, with unique names, so tests run in parallel
//! and rerun cleanly. Where the services are is read from
//! `VITALWATCH_TEST_DATABASE_URL`, `VITALWATCH_TEST_KAFKA` and
//! `VITALWATCH_TEST_MQTT`, with the local stack's addresses as defaults.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should stop the test loudly

pub mod openapi;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use vitalwatch_bus::KafkaConfig;
use vitalwatch_bus::rdkafka::Message;
use vitalwatch_bus::rdkafka::consumer::Consumer;
use vitalwatch_bus::rdkafka::message::OwnedMessage;
use vitalwatch_ingest::MqttConfig;
use vitalwatch_store::DatabaseConfig;

/// Sends the services' logs to the test's output (shown for failing tests),
/// filtered by `VITALWATCH_TEST_LOG` (default `warn`). Safe to call often.
pub fn logs() {
    let filter = std::env::var("VITALWATCH_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// PostgreSQL URL of a role allowed to create databases.
pub fn admin_database_url() -> String {
    std::env::var("VITALWATCH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://vitalwatch:vitalwatch@127.0.0.1:5432/postgres".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("VITALWATCH_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// Password of the broker accounts (`deploy/local/mosquitto.users`).
pub fn mqtt_password() -> String {
    std::env::var("VITALWATCH_TEST_MQTT_PASSWORD").unwrap_or_else(|_| "vitalwatch-local".into())
}

pub fn mqtt_host_port() -> (String, u16) {
    let addr = std::env::var("VITALWATCH_TEST_MQTT").unwrap_or_else(|_| "127.0.0.1:18830".into());
    let (host, port) = addr
        .rsplit_once(':')
        .expect("VITALWATCH_TEST_MQTT is host:port");
    (
        host.to_owned(),
        port.parse().expect("VITALWATCH_TEST_MQTT port"),
    )
}

/// A name no other test (in this run or an earlier one) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000_000
    )
}

/// A new, migrated database (named `vw_test_…`; `deploy/local/test` drops
/// old ones before each run).
///
/// TimescaleDB is used where the server has it, unless
/// `VITALWATCH_TEST_TIMESCALEDB=off` asks for the native layout (to run the
/// whole suite on it where TimescaleDB is installed).
pub async fn database() -> DatabaseConfig {
    let mut settings = DatabaseConfig::default();
    if std::env::var("VITALWATCH_TEST_TIMESCALEDB").is_ok_and(|v| v == "off") {
        settings.timescaledb = vitalwatch_store::storage::TimescaleMode::Off;
    }
    database_with(settings).await
}

/// A fresh, migrated database of its own, with `settings`' storage options
/// (its `url` and `pool_size` are replaced).
pub async fn database_with(settings: DatabaseConfig) -> DatabaseConfig {
    let name = unique("vw_test");
    let admin = vitalwatch_store::connect(&admin_database_url())
        .await
        .expect("connect to the test PostgreSQL");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let url = match admin_database_url().rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("VITALWATCH_TEST_DATABASE_URL must end in /dbname"),
    };
    let cfg = DatabaseConfig {
        url,
        pool_size: 4,
        ..settings
    };
    let mut client = vitalwatch_store::connect(&cfg.url)
        .await
        .expect("connect to the test database");
    vitalwatch_store::migrate::migrate(&mut client, &cfg)
        .await
        .expect("migrate");
    cfg
}

/// Kafka settings with this test's own topics, created on the shared broker.
pub async fn kafka() -> KafkaConfig {
    kafka_on(&kafka_brokers()).await
}

/// Kafka settings with this test's own topics, created on `brokers`.
pub async fn kafka_on(brokers: &str) -> KafkaConfig {
    let cfg = KafkaConfig {
        brokers: brokers.to_owned(),
        readings_topic: unique("t.readings"),
        deadletter_topic: unique("t.deadletter"),
        alerts_topic: unique("t.alerts"),
        partitions: 3,
        ..KafkaConfig::default()
    };
    vitalwatch_bus::ensure_topics(
        &cfg,
        &[
            &cfg.readings_topic,
            &cfg.deadletter_topic,
            &cfg.alerts_topic,
        ],
    )
    .await
    .expect("create test topics");
    cfg
}

/// MQTT settings with this test's own topic root, share group and client id.
pub fn mqtt() -> MqttConfig {
    let (host, port) = mqtt_host_port();
    MqttConfig {
        host,
        port,
        client_id: unique("ingest"),
        share_group: unique("g"),
        topic_root: format!("{}/rpm/v1/devices", unique("t")),
        username: Some("vitalwatch-ingest".into()),
        password: Some(mqtt_password()),
        ..MqttConfig::default()
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match within(timeout, f).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Like [`eventually`], but `None` after `timeout` instead of a panic, for a
/// test that says more about what it found before it fails.
pub async fn within<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A device-side MQTT client: publishes with QoS 1 and waits for every PUBACK.
#[derive(Debug)]
pub struct Device {
    client: AsyncClient,
    acked: tokio::sync::watch::Receiver<u64>,
    published: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects as the broker account `user` (a device id listed in
    /// `deploy/local/mosquitto.users`).
    pub async fn connect(user: &str) -> Device {
        let (host, port) = mqtt_host_port();
        let mut opts = MqttOptions::new(unique(user), host, port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_credentials(user, mqtt_password());
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, acked) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        n += 1;
                        let _ = tx.send(n);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Device {
            client,
            acked,
            published: 0,
            task,
        }
    }

    /// Publishes with QoS 1 (the broker's PUBACK is counted, not awaited).
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue publish");
        self.published += 1;
    }

    /// Waits until the broker acknowledged everything published so far.
    pub async fn wait_acked(&mut self, timeout: Duration) {
        let want = self.published;
        tokio::time::timeout(timeout, self.acked.wait_for(|n| *n >= want))
            .await
            .expect("broker acknowledged every publish in time")
            .expect("device event loop alive");
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Reads `topic` from the beginning (own consumer group) until `n` records
/// passing `keep` arrived, and returns those; panics after `timeout`.
pub async fn consume_matching(
    kafka: &KafkaConfig,
    topic: &str,
    n: usize,
    timeout: Duration,
    mut keep: impl FnMut(&OwnedMessage) -> bool,
) -> Vec<OwnedMessage> {
    let consumer = vitalwatch_bus::consumer(kafka, &unique("reader")).expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => {
                let m = m.detach();
                if keep(&m) {
                    out.push(m);
                }
            }
            Ok(Err(e)) => panic!("consuming {topic}: {e}"),
            Err(_) => panic!(
                "only {} of {n} records arrived on {topic} within {timeout:?}",
                out.len()
            ),
        }
    }
    out
}

/// The record's key as text.
pub fn key(m: &OwnedMessage) -> String {
    m.key()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default()
}

/// A header of a record as text.
pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    use vitalwatch_bus::rdkafka::message::Headers;
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A Kafka-protocol broker of the test's own (tansu, sqlite storage in a
/// temporary directory) that the test may stop and start again, on the same
/// port and with the same data. The binary comes from `VITALWATCH_TEST_TANSU`.
#[derive(Debug)]
pub struct PrivateKafka {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateKafka {
    pub async fn start() -> PrivateKafka {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(unique("tansu"));
        std::fs::create_dir_all(&dir).expect("tansu dir");
        let mut k = PrivateKafka {
            port,
            dir,
            child: None,
        };
        k.resume().await;
        k
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker process (again) and waits until it accepts connections.
    pub async fn resume(&mut self) {
        let bin = std::env::var("VITALWATCH_TEST_TANSU")
            .expect("VITALWATCH_TEST_TANSU names the tansu binary");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("log");
        let child = std::process::Command::new(bin)
            .current_dir(&self.dir)
            .env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "private tansu did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the broker process (its data stays on disk).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("private tansu data and log kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether the test PostgreSQL can give a database TimescaleDB (installed,
/// preloaded, and the role may create it): tried in a scratch database.
/// `Err` says why not, for the test's output.
pub async fn timescaledb_available() -> Result<(), String> {
    let url = empty_database().await;
    let c = vitalwatch_store::connect(&url)
        .await
        .expect("connect to the scratch database");
    match c.batch_execute("CREATE EXTENSION timescaledb").await {
        Ok(()) => Ok(()),
        Err(e) => Err(e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned())),
    }
}

/// An empty database of its own (not migrated); returns its URL.
pub async fn empty_database() -> String {
    let name = unique("vw_test_empty");
    let admin = vitalwatch_store::connect(&admin_database_url())
        .await
        .expect("connect to the test PostgreSQL");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    match admin_database_url().rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("VITALWATCH_TEST_DATABASE_URL must end in /dbname"),
    }
}

/// A PostgreSQL server of the test's own, in a temporary directory, that
/// the test may stop (as a crash would: `pg_ctl stop -m immediate`) and
/// start again with the same data. Binaries from `VITALWATCH_TEST_PG_BIN`
/// (else the newest `/usr/lib/postgresql/*/bin`); run as the `postgres` user
/// when the tests run as root, since PostgreSQL refuses root.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    as_postgres: bool,
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let bin = match std::env::var("VITALWATCH_TEST_PG_BIN") {
            Ok(b) => std::path::PathBuf::from(b),
            Err(_) => {
                let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
                    .expect("PostgreSQL binaries in /usr/lib/postgresql (or set VITALWATCH_TEST_PG_BIN)")
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .collect();
                versions.sort_unstable();
                let v = versions
                    .last()
                    .expect("a PostgreSQL version in /usr/lib/postgresql");
                std::path::PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))
            }
        };
        let uid = std::process::Command::new("id")
            .arg("-u")
            .output()
            .expect("id -u");
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(unique("postgres"));
        std::fs::create_dir_all(&dir).expect("postgres dir");
        let pg = PrivatePostgres {
            port,
            dir,
            bin,
            as_postgres,
        };
        if as_postgres {
            pg.run(
                "chown",
                &["-R", "postgres:postgres", &pg.dir.to_string_lossy()],
                false,
            );
        }
        let data = pg.dir.join("data");
        pg.run(
            &pg.bin.join("initdb").to_string_lossy(),
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            true,
        );
        pg.resume().await;
        pg
    }

    /// URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn run(&self, program: &str, args: &[&str], as_postgres: bool) {
        let mut cmd = if as_postgres && self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            std::process::Command::new(program)
        };
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let mut all = vec!["-D", &data];
        all.extend_from_slice(args);
        self.run(&self.bin.join("pg_ctl").to_string_lossy(), &all, true);
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub async fn resume(&self) {
        let log = self.dir.join("postgres.log").to_string_lossy().into_owned();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.display()
        );
        self.pg_ctl(&["-l", &log, "-o", &opts, "-w", "-t", "60", "start"]);
    }

    /// Stops the server at once, without a checkpoint, as a crash would; its
    /// data stays, and the next start recovers from the WAL.
    pub fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let _ = cmd
            .args(["-D", &data.to_string_lossy(), "-m", "immediate", "stop"])
            .output();
        if std::thread::panicking() {
            eprintln!(
                "private PostgreSQL data and log kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The state of consumer group `group` as the broker has it: its state and,
/// per member, its member id, host and the size of its assignment in bytes
/// (0: no partitions). For telling a stalled consumer from an unassigned one.
pub fn group_state(kafka: &KafkaConfig, group: &str) -> Result<String, vitalwatch_bus::BusError> {
    let consumer = vitalwatch_bus::consumer(kafka, &unique("probe"))?;
    let groups = consumer
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .map_err(vitalwatch_bus::BusError::from)?;
    let mut out = Vec::new();
    for g in groups.groups() {
        let members: Vec<String> = g
            .members()
            .iter()
            .map(|m| {
                format!(
                    "{} ({}) assignment {} B",
                    m.id(),
                    m.client_host(),
                    m.assignment().map_or(0, <[u8]>::len)
                )
            })
            .collect();
        out.push(format!("{} [{}]", g.state(), members.join("; ")));
    }
    Ok(out.join(", "))
}

/// `group`'s committed offset of every partition of the readings topic, and
/// the partitions' high watermarks (a partition with nothing committed: 0).
pub fn committed_and_end(
    kafka: &KafkaConfig,
    group: &str,
) -> Result<(Vec<i64>, Vec<i64>), vitalwatch_bus::BusError> {
    use vitalwatch_bus::rdkafka::{Offset, TopicPartitionList};
    let consumer = vitalwatch_bus::consumer(kafka, group)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.partitions {
        tpl.add_partition(&kafka.readings_topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(vitalwatch_bus::BusError::from)?;
    let mut got = Vec::new();
    let mut ends = Vec::new();
    for e in committed.elements() {
        got.push(match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        });
        let (_, high) = consumer
            .fetch_watermarks(
                &kafka.readings_topic,
                e.partition(),
                Duration::from_secs(10),
            )
            .map_err(vitalwatch_bus::BusError::from)?;
        ends.push(high);
    }
    Ok((got, ends))
}
