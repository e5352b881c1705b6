//! Kafka plumbing shared by the vitalwatch services.
//!
//! - [`KafkaConfig`]: where the brokers are, the topic names, and extra
//!   librdkafka properties (TLS, SASL) passed through untouched.
//! - [`Producer`] / [`consumer`]: clients configured for our guarantees
//!   (idempotent `acks=all` producer, recreated when the broker stops
//!   accepting its sequence; consumers that commit only what the caller says
//!   is durable).
//! - [`ensure_topics`]: create topics through the Kafka admin API.
//! - [`DeadLetter`]: send rejected input to `rpm.deadletter.v1` with its reason.
//!
//! Nothing here depends on a particular broker: it runs against Apache Kafka
//! in production and tansu on a developer machine.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use vitalwatch_core::health::Readiness;
use vitalwatch_core::topics;

pub use rdkafka;

/// `[kafka]`: the Kafka cluster and topic names.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default: the local tansu broker.
    pub brokers: String,
    /// Validated reading batches, keyed by patient. Default `rpm.readings.v1`.
    pub readings_topic: String,
    /// Rejected input with its reason, keyed by device. Default `rpm.deadletter.v1`.
    pub deadletter_topic: String,
    /// Alert lifecycle events, keyed by patient. Default `rpm.alerts.v1`.
    pub alerts_topic: String,
    /// Partitions of each topic when vitalwatch creates it. Default 3.
    pub partitions: i32,
    /// Replication factor when vitalwatch creates a topic. Default 1 (one
    /// broker); use 3 on a production cluster.
    pub replication: i32,
    /// Extra librdkafka properties for every client (for example
    /// `"security.protocol" = "ssl"`). They override ours.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:19092".into(),
            readings_topic: topics::READINGS.into(),
            deadletter_topic: topics::DEADLETTER.into(),
            alerts_topic: topics::ALERTS.into(),
            partitions: 3,
            replication: 1,
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("shut down before the record was delivered")]
    Cancelled,
}

impl KafkaConfig {
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// The client settings, with `defaults` for what `properties` leaves unset.
    fn with_defaults(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = self.base();
        for (k, v) in defaults {
            if c.get(k).is_none() {
                c.set(*k, *v);
            }
        }
        c
    }
}

/// A producer for records that must not be lost or doubled by the producer
/// itself: idempotent, `acks=all`, small linger so records travel in batches.
fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, BusError> {
    let defaults = [
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
        // A delivery that fails after this is retried by the caller, which
        // holds the device's acknowledgement until it succeeds.
        ("message.timeout.ms", "30000"),
    ];
    Ok(cfg.with_defaults(&defaults).create()?)
}

/// The idempotent producer, replaceable. After a broker restart or a long
/// outage the broker may refuse the producer's sequence numbers for good
/// (librdkafka then reports errors on every send without marking itself
/// fatal). [`deliver`] then swaps in a new producer, with a new producer id;
/// records sent twice that way are turned into no-ops by the stores.
pub struct Producer {
    cfg: KafkaConfig,
    /// The current client and its generation (bumped on every replacement).
    current: std::sync::RwLock<(u64, FutureProducer)>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("brokers", &self.cfg.brokers)
            .finish_non_exhaustive()
    }
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> Result<Arc<Producer>, BusError> {
        Ok(Arc::new(Producer {
            cfg: cfg.clone(),
            current: std::sync::RwLock::new((0, producer(cfg)?)),
        }))
    }

    fn get(&self) -> (u64, FutureProducer) {
        let c = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (c.0, c.1.clone())
    }

    /// Replaces the client if it is still generation `generation` (so that
    /// a burst of failures replaces it once).
    fn replace(&self, generation: u64, why: &KafkaError) {
        let mut c = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.0 != generation {
            return;
        }
        match producer(&self.cfg) {
            Ok(p) => {
                let old = std::mem::replace(&mut *c, (generation + 1, p));
                // Dropping a client flushes and joins its threads: not on an
                // async worker.
                drop(c);
                tokio::task::spawn_blocking(move || drop(old));
                metrics::counter!("vitalwatch_kafka_producer_replaced_total").increment(1);
                tracing::warn!(error = %why, generation = generation + 1, "kafka refused the producer's records; replaced the producer");
            }
            Err(e) => tracing::error!(error = %e, "cannot create a new kafka producer"),
        }
    }
}

/// Errors after which the broker will not take this producer's records
/// again (its producer id or sequence is no longer accepted): only a new
/// producer helps. Every other error is retried with the same producer, and
/// shows in readiness while it lasts.
fn needs_new_producer(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::OutOfOrderSequenceNumber
                | C::DuplicateSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerEpoch
                | C::InvalidProducerIdMapping
                | C::ProducerFenced
                | C::Fatal
                // What tansu answers after its restart for a producer it lost.
                | C::Unknown
        )
    )
}

/// A consumer in `group_id` that never commits on its own: the caller commits
/// offsets once what they cover is durable.
pub fn consumer(cfg: &KafkaConfig, group_id: &str) -> Result<StreamConsumer, BusError> {
    consumer_with(cfg, group_id, &[])
}

/// Like [`consumer`], for a latency-sensitive reader: a fetch waits at most
/// `fetch_wait_ms` for data (librdkafka's default is 500 ms). Apache Kafka
/// answers a fetch as soon as data is there anyway; tansu 0.6 holds it for
/// the whole wait, which measured as 0.5 s of every alert's latency.
/// `[kafka.properties]` still overrides it.
pub fn low_latency_consumer(
    cfg: &KafkaConfig,
    group_id: &str,
    fetch_wait_ms: u64,
) -> Result<StreamConsumer, BusError> {
    let wait = fetch_wait_ms.to_string();
    consumer_with(cfg, group_id, &[("fetch.wait.max.ms", &wait)])
}

fn consumer_with(
    cfg: &KafkaConfig,
    group_id: &str,
    extra: &[(&str, &str)],
) -> Result<StreamConsumer, BusError> {
    Ok(consumer_config(cfg, group_id, extra).create()?)
}

/// A consumer's settings: ours, then `extra`, for what `[kafka.properties]`
/// leaves unset.
fn consumer_config(cfg: &KafkaConfig, group_id: &str, extra: &[(&str, &str)]) -> ClientConfig {
    let mut defaults = vec![
        ("group.id", group_id),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
        // Prefetch: librdkafka keeps up to 64 MiB of fetched records in a
        // consumer's queue by default, and a consumer catching up after an
        // outage fills it (`benches/benches/catch_up.rs`: the writer grew
        // from 15 to 72-110 MiB, the alerts engine from 30 to 127-142 MiB).
        // 4 MiB is about ten thousand records, seconds of work for either.
        ("queued.max.messages.kbytes", "4096"),
        // With the queue full, a partition's next fetch waits this long
        // (librdkafka's default is a second, meant for its larger queue).
        ("fetch.queue.backoff.ms", "100"),
    ];
    defaults.extend_from_slice(extra);
    cfg.with_defaults(&defaults)
}

/// How long [`recv`] waits for librdkafka to wake it before it looks at the
/// consumer's queue again by itself.
const REPOLL: Duration = Duration::from_secs(1);

/// The consumer's next record: `consumer.recv()`, which never waits more
/// than [`REPOLL`] for its wake-up. `StreamConsumer` sleeps until
/// librdkafka calls back that its queue went from empty to non-empty, and
/// only then; a wake-up lost on the way leaves its reader asleep while the
/// queue holds records. rust-rdkafka has had such reports (issues 638,
/// 665, 848; whether 0.39 still loses one is not known), and the writer's
/// unexplained stall looked like one (ARCHITECTURE.md). A record found by
/// the look after the timeout is counted and logged: it would be one.
/// Cancel-safe, as `recv` is: a record is taken only when it is returned.
pub async fn recv(consumer: &StreamConsumer) -> KafkaResult<BorrowedMessage<'_>> {
    use futures_util::FutureExt;
    loop {
        if let Ok(m) = tokio::time::timeout(REPOLL, consumer.recv()).await {
            return m;
        }
        if let Some(m) = consumer.recv().now_or_never() {
            metrics::counter!("vitalwatch_kafka_unwoken_records_total").increment(1);
            tracing::warn!(
                wait_ms = REPOLL.as_millis() as u64,
                "a record waited in the kafka consumer's queue without waking its reader; taken on a re-poll"
            );
            return m;
        }
    }
}

/// Per partition of `topic`: its end offset, and the committed offset of
/// `probe`'s group (a consumer that never subscribes, made only to ask
/// this). `None` when the broker does not answer. Blocking.
pub fn group_progress(probe: &StreamConsumer, topic: &str) -> Option<(Vec<i64>, Vec<i64>)> {
    let timeout = Duration::from_secs(5);
    let metadata = probe.fetch_metadata(Some(topic), timeout).ok()?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()?
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = probe.committed_offsets(tpl, timeout).ok()?;
    let mut ends = Vec::with_capacity(partitions.len());
    let mut done = Vec::with_capacity(partitions.len());
    for p in &partitions {
        ends.push(probe.fetch_watermarks(topic, *p, timeout).ok()?.1);
        let c = committed
            .find_partition(topic, *p)
            .map_or(0, |e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            });
        done.push(c);
    }
    Some((ends, done))
}

/// Creates the topics that do not exist yet; existing ones are left alone.
pub async fn ensure_topics(cfg: &KafkaConfig, names: &[&str]) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = cfg.base().create()?;
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, cfg.partitions, TopicReplication::Fixed(cfg.replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(BusError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// What a dead-letter record says about the input it carries.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterInfo<'a> {
    /// Machine-readable reason (`unknown_metric`): the `reason` header.
    pub reason: &'a str,
    /// Human-readable detail: the `detail` header.
    pub detail: &'a str,
    /// Where the input came from (an MQTT or Kafka topic): the `topic` header.
    pub source_topic: &'a str,
    /// When we received it: the `received_at` header (RFC 3339).
    pub received_at: DateTime<Utc>,
    /// Which reading of the batch was rejected, when one was: `reading_index`.
    pub reading_index: Option<usize>,
}

/// Whether deliveries to Kafka currently succeed, kept as a readiness
/// condition: not ready from the first failed attempt until the next success.
#[derive(Debug, Clone)]
pub struct DeliveryHealth {
    readiness: Readiness,
    name: String,
    /// Mirrors the condition so the hot path takes no lock unless it flips.
    failing: Arc<AtomicBool>,
}

impl DeliveryHealth {
    pub fn new(readiness: Readiness, name: impl Into<String>) -> DeliveryHealth {
        let name = name.into();
        readiness.set_ready(&name);
        DeliveryHealth {
            readiness,
            name,
            failing: Arc::new(AtomicBool::new(false)),
        }
    }

    fn failed(&self, err: &KafkaError) {
        if !self.failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(condition = %self.name, error = %err, "kafka deliveries failing; holding records and retrying");
            self.readiness
                .set_not_ready(&self.name, format!("kafka deliveries failing: {err}"));
        }
    }

    fn succeeded(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!(condition = %self.name, "kafka deliveries succeed again");
            self.readiness.set_ready(&self.name);
        }
    }
}

/// Sends rejected input to the dead-letter topic, retrying until Kafka has
/// it: a rejection is data too, and is never silently dropped.
#[derive(Clone)]
pub struct DeadLetter {
    producer: Arc<Producer>,
    topic: String,
    health: Option<DeliveryHealth>,
}

impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetter")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl DeadLetter {
    pub fn new(
        producer: Arc<Producer>,
        topic: impl Into<String>,
        health: Option<DeliveryHealth>,
    ) -> DeadLetter {
        DeadLetter {
            producer,
            topic: topic.into(),
            health,
        }
    }

    /// Delivers one dead-letter record keyed by `key` (the device id), with the
    /// raw payload as value. Returns once Kafka acknowledged it, or
    /// [`BusError::Cancelled`] if `shutdown` fires first.
    pub async fn send(
        &self,
        key: &str,
        payload: &[u8],
        info: DeadLetterInfo<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), BusError> {
        let received_at = info
            .received_at
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let index = info.reading_index.map(|i| i.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some(info.reason),
            })
            .insert(Header {
                key: "detail",
                value: Some(info.detail),
            })
            .insert(Header {
                key: "topic",
                value: Some(info.source_topic),
            })
            .insert(Header {
                key: "received_at",
                value: Some(received_at.as_str()),
            });
        if let Some(i) = &index {
            headers = headers.insert(Header {
                key: "reading_index",
                value: Some(i.as_str()),
            });
        }
        deliver(
            &self.producer,
            &self.topic,
            key,
            payload,
            Some(headers),
            self.health.as_ref(),
            shutdown,
        )
        .await
    }
}

/// Produces one record and waits until Kafka acknowledged it, retrying with
/// backoff (capped at 5 s) while the broker is unreachable. Gives up only when
/// `shutdown` fires; the caller then must not treat the record as delivered.
/// `health`, when given, records failures and recovery.
pub async fn deliver(
    producer: &Producer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: Option<OwnedHeaders>,
    health: Option<&DeliveryHealth>,
    shutdown: &CancellationToken,
) -> Result<(), BusError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(h) = &headers {
            record = record.headers(h.clone());
        }
        let (generation, client) = producer.get();
        let attempt = client.send(record, Duration::from_secs(5));
        let err = tokio::select! {
            r = attempt => match r {
                Ok(_) => {
                    if let Some(h) = health {
                        h.succeeded();
                    }
                    return Ok(());
                }
                Err((e, _)) => e,
            },
            () = shutdown.cancelled() => return Err(BusError::Cancelled),
        };
        metrics::counter!("vitalwatch_kafka_delivery_retries_total").increment(1);
        match health {
            // The health condition logs the outage once, not once per record.
            Some(h) => h.failed(&err),
            None => tracing::warn!(topic, error = %err, "kafka delivery failed; retrying"),
        }
        tracing::debug!(topic, error = %err, retry_in_ms = backoff.as_millis() as u64, "kafka delivery failed; retrying");
        let fatal = rdkafka::producer::Producer::client(&client).fatal_error();
        drop(client);
        if fatal.is_some() || needs_new_producer(&err) {
            producer.replace(generation, &err);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return Err(BusError::Cancelled),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_bound_their_prefetch_unless_the_properties_say_otherwise() {
        let mut cfg = KafkaConfig::default();
        let c = consumer_config(&cfg, "g", &[("fetch.wait.max.ms", "10")]);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("4096"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("100"));
        assert_eq!(c.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));

        cfg.properties
            .insert("queued.max.messages.kbytes".into(), "65536".into());
        cfg.properties
            .insert("fetch.wait.max.ms".into(), "100".into());
        let c = consumer_config(&cfg, "g", &[("fetch.wait.max.ms", "10")]);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("65536"));
        assert_eq!(c.get("fetch.wait.max.ms"), Some("100"));
    }
}
