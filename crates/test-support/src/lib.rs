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

/// PostgreSQL URL of a role allowed to create databases.
pub fn admin_database_url() -> String {
    std::env::var("VITALWATCH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://vitalwatch:vitalwatch@127.0.0.1:5432/postgres".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("VITALWATCH_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
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

/// Kafka settings with this test's own topics, created.
pub async fn kafka() -> KafkaConfig {
    let cfg = KafkaConfig {
        brokers: kafka_brokers(),
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
    pub async fn connect() -> Device {
        let (host, port) = mqtt_host_port();
        let mut opts = MqttOptions::new(unique("device"), host, port);
        opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
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
