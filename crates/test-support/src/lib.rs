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
    let (host, port) = addr.rsplit_once(':').expect("VITALWATCH_TEST_MQTT is host:port");
    (host.to_owned(), port.parse().expect("VITALWATCH_TEST_MQTT port"))
}

/// A name no other test (in this run or an earlier one) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), nanos % 1_000_000_000_000)
}

/// A new, migrated database (named `vw_test_…`; `deploy/local/test` drops
/// old ones before each run).
pub async fn database() -> DatabaseConfig {
    let name = unique("vw_test");
    let admin = vitalwatch_store::connect(&admin_database_url()).await.expect("connect to the test PostgreSQL");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    let url = match admin_database_url().rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("VITALWATCH_TEST_DATABASE_URL must end in /dbname"),
    };
    let mut client = vitalwatch_store::connect(&url).await.expect("connect to the test database");
    vitalwatch_store::migrate::migrate(&mut client).await.expect("migrate");
    DatabaseConfig { url, pool_size: 4 }
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
    vitalwatch_bus::ensure_topics(&cfg, &[&cfg.readings_topic, &cfg.deadletter_topic, &cfg.alerts_topic])
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
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
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
        Device { client, acked, published: 0, task }
    }

    /// Publishes with QoS 1 (the broker's PUBACK is counted, not awaited).
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).await.expect("queue publish");
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
            Err(_) => panic!("only {} of {n} records arrived on {topic} within {timeout:?}", out.len()),
        }
    }
    out
}

/// The record's key as text.
pub fn key(m: &OwnedMessage) -> String {
    m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()
}

/// A header of a record as text.
pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    use vitalwatch_bus::rdkafka::message::Headers;
    let h = m.headers()?;
    h.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
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
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let dir = std::env::temp_dir().join(unique("tansu"));
        std::fs::create_dir_all(&dir).expect("tansu dir");
        let mut k = PrivateKafka { port, dir, child: None };
        k.resume().await;
        k
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker process (again) and waits until it accepts connections.
    pub async fn resume(&mut self) {
        let bin = std::env::var("VITALWATCH_TEST_TANSU").expect("VITALWATCH_TEST_TANSU names the tansu binary");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("tansu.log")).expect("log");
        let child = std::process::Command::new(bin)
            .current_dir(&self.dir)
            .env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "sqlite://tansu.db"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
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
