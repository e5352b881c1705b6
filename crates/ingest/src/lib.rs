//! ingest: device readings from MQTT to Kafka, with nothing lost.
//!
//! ```text
//! MQTT $share/{group}/{root}/+/readings/#  ──▶  event loop task ──(bounded)──▶ processor
//!     processor: registry check, decode, validate (classify.rs, pure)
//!                ├─ valid readings ──▶ rpm.readings.v1 (key: patient id)
//!                └─ rejections     ──▶ rpm.deadletter.v1 (key: device id, headers: reason, …)
//!     PUBACK to the device only after Kafka acknowledged every record the
//!     message produced, in the order the messages arrived.
//! ```
//!
//! - [`classify`]: the pure decision for one message.
//! - [`dedup`]: recently delivered batches, to drop redeliveries early.
//! - [`registry`]: the in-memory device registry, refreshed on change.
//! - [`run`]: the service.
//!
//! Delivery guarantee: the MQTT session is persistent (`clean_session =
//! false`, fixed client id) and acknowledgements are manual, so a message we
//! have not acknowledged stays with the broker and is delivered again after a
//! crash or disconnect. We acknowledge only after `acks=all` from Kafka.
//! A redelivery of a batch this instance already delivered is acknowledged
//! without producing it again; anything that slips past (another instance,
//! an evicted entry) the stores downstream turn into a no-op (see
//! ARCHITECTURE.md).
//!
//! Readiness conditions: `ingest.mqtt` (connected), `ingest.registry`
//! (loaded), `ingest.kafka` (deliveries succeeding), `ingest.broker_drops`
//! (the broker's `$SYS` dropped-messages counter is not rising).
#![forbid(unsafe_code)]

pub mod classify;
pub mod dedup;
pub mod registry;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vitalwatch_bus::{BusError, DeadLetter, DeadLetterInfo, DeliveryHealth, KafkaConfig};
use vitalwatch_core::health::Readiness;
use vitalwatch_core::topics;
use vitalwatch_core::validate::{Reason, TimePolicy};
use vitalwatch_store::{DatabaseConfig, StoreError};

use crate::classify::classify;
use crate::dedup::RecentBatches;
use crate::registry::RegistryCache;

/// The broker's counter of messages it dropped (queue limits reached).
const SYS_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

/// `[mqtt]`: the broker devices publish to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Default `127.0.0.1`.
    pub host: String,
    /// Default 18830, the local stack's Mosquitto.
    pub port: u16,
    /// Fixed client id, so the broker keeps our session (and the messages
    /// queued for it) across restarts. Each ingest instance needs its own.
    /// Default `vitalwatch-ingest`.
    pub client_id: String,
    /// Shared-subscription group: instances in one group split the messages.
    /// Default `rpm-ingest`.
    pub share_group: String,
    /// Root of device topics. Default `rpm/v1/devices`.
    pub topic_root: String,
    /// Default 30 s.
    pub keep_alive_secs: u64,
    /// Largest MQTT packet accepted, in bytes. Default 1 MiB.
    pub max_packet_bytes: usize,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to the broker; plain TCP when absent.
    pub tls: Option<MqttTls>,
}

/// `[mqtt.tls]`: files in PEM.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// CA certificate(s) the broker's certificate must chain to.
    pub ca_file: std::path::PathBuf,
    /// Client certificate, when the broker authenticates clients by certificate.
    pub client_cert_file: Option<std::path::PathBuf>,
    /// Its private key.
    pub client_key_file: Option<std::path::PathBuf>,
}

impl MqttTls {
    /// rumqttc's transport for these files. Installs ring as the process's
    /// rustls crypto provider if none is installed yet.
    pub fn transport(&self) -> Result<rumqttc::Transport, IngestError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                IngestError::Config(format!("mqtt.tls: cannot read {}: {e}", p.display()))
            })
        };
        let client_auth = match (&self.client_cert_file, &self.client_key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(IngestError::Config(
                    "mqtt.tls: client_cert_file and client_key_file go together".into(),
                ));
            }
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca: read(&self.ca_file)?,
                alpn: None,
                client_auth,
            },
        ))
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 18830,
            client_id: "vitalwatch-ingest".into(),
            share_group: "rpm-ingest".into(),
            topic_root: topics::MQTT_DEVICE_ROOT.into(),
            keep_alive_secs: 30,
            max_packet_bytes: 1 << 20,
            username: None,
            password: None,
            tls: None,
        }
    }
}

/// `[ingest]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Messages received but not yet acknowledged, at most. Keep the broker's
    /// own in-flight window (Mosquitto `max_inflight_messages`) at or below
    /// half of this. Default 1000.
    pub max_in_flight: usize,
    /// Seconds between registry reloads. Default 30.
    pub registry_refresh_secs: u64,
    /// How far a device clock may run ahead, in seconds. Default 300.
    pub max_future_skew_secs: i64,
    /// Oldest reading accepted, in days: the retention window. Default 90.
    pub max_age_days: i64,
    /// On shutdown, how long in-flight messages may take to reach Kafka
    /// before we stop waiting (they are then redelivered later). Default 10 s.
    pub drain_secs: u64,
    /// Batches remembered to recognise redeliveries. Default 100,000
    /// (about 3 MiB).
    pub dedup_capacity: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_in_flight: 1000,
            registry_refresh_secs: 30,
            max_future_skew_secs: 300,
            max_age_days: 90,
            drain_secs: 10,
            dedup_capacity: 100_000,
        }
    }
}

impl IngestConfig {
    fn time_policy(&self) -> TimePolicy {
        TimePolicy {
            max_future_skew: chrono::Duration::seconds(self.max_future_skew_secs),
            max_age: chrono::Duration::days(self.max_age_days),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("mqtt: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A publish as it came off the event loop.
struct Incoming {
    publish: Publish,
    received_at: DateTime<Utc>,
    /// Connection epoch it arrived on; acks for older epochs are not sent,
    /// because the broker redelivers those on the new connection and a stale
    /// packet id could acknowledge a different message.
    epoch: u64,
    since: Instant,
}

type Pending = Pin<Box<dyn Future<Output = (Incoming, bool)> + Send>>;

/// Runs ingest until `shutdown` fires, then drains: in-flight messages get
/// up to `drain_secs` to reach Kafka and be acknowledged.
pub async fn run(
    cfg: &IngestConfig,
    mqtt: &MqttConfig,
    kafka: &KafkaConfig,
    db: &DatabaseConfig,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    if cfg.max_in_flight == 0 {
        return Err(IngestError::Config(
            "ingest.max_in_flight must be at least 1".into(),
        ));
    }
    readiness.set_not_ready("ingest.mqtt", "not connected yet");
    readiness.set_not_ready("ingest.registry", "not loaded yet");
    readiness.set_ready("ingest.broker_drops");
    let producer = vitalwatch_bus::Producer::new(kafka)?;
    let kafka_health = DeliveryHealth::new(readiness.clone(), "ingest.kafka");
    let deadletter = DeadLetter::new(
        producer.clone(),
        kafka.deadletter_topic.clone(),
        Some(kafka_health.clone()),
    );
    let registry = Arc::new(RegistryCache::new(vitalwatch_store::pool(db)?));
    load_registry(&registry, &shutdown).await;
    readiness.set_ready("ingest.registry");
    let every = Duration::from_secs(cfg.registry_refresh_secs.max(1));
    let refresher = tokio::spawn(registry.clone().keep_fresh(
        db.url.clone(),
        every,
        shutdown.clone(),
    ));

    let mut opts = MqttOptions::new(&mqtt.client_id, &mqtt.host, mqtt.port);
    opts.set_keep_alive(Duration::from_secs(mqtt.keep_alive_secs.max(5)))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(mqtt.max_packet_bytes, mqtt.max_packet_bytes);
    if let Some(user) = &mqtt.username {
        opts.set_credentials(user, mqtt.password.as_deref().unwrap_or(""));
    }
    if let Some(tls) = &mqtt.tls {
        opts.set_transport(tls.transport()?);
    }
    let (client, eventloop) = AsyncClient::new(opts, cfg.max_in_flight * 2);
    let filter = format!(
        "$share/{}/{}",
        mqtt.share_group,
        topics::mqtt_readings_filter(&mqtt.topic_root)
    );
    let epoch = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel(cfg.max_in_flight);
    let events = tokio::spawn(event_loop(
        eventloop,
        client.clone(),
        filter,
        epoch.clone(),
        tx,
        readiness.clone(),
        shutdown.clone(),
    ));
    tracing::info!(broker = %format!("{}:{}", mqtt.host, mqtt.port), client_id = %mqtt.client_id, "ingest started");

    let ctx = Arc::new(Context {
        producer,
        deadletter,
        readings_topic: kafka.readings_topic.clone(),
        topic_root: mqtt.topic_root.clone(),
        registry,
        policy: cfg.time_policy(),
        give_up: CancellationToken::new(),
        kafka_health,
        recent: std::sync::Mutex::new(RecentBatches::new(cfg.dedup_capacity)),
        in_flight: std::sync::Mutex::new(HashMap::new()),
    });
    process(ctx, cfg, rx, &client, &epoch, &shutdown).await;

    // Acks are queued in the client; disconnect after them so they are sent.
    if let Err(e) = client.disconnect().await {
        tracing::debug!(error = %e, "mqtt disconnect");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), events).await;
    refresher.abort();
    tracing::info!("ingest stopped");
    Ok(())
}

async fn load_registry(registry: &RegistryCache, shutdown: &CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match registry.reload().await {
            Ok(n) => {
                tracing::info!(devices = n, "device registry loaded");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot load the device registry yet; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Polls the MQTT connection forever (rumqttc reconnects on the next poll
/// after an error), forwarding publishes to the processor. Ends after our
/// own disconnect.
async fn event_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    epoch: Arc<AtomicU64>,
    tx: mpsc::Sender<Incoming>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    let mut dropped: Option<u64> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == SYS_DROPPED => {
                watch_drops(&publish.payload, &mut dropped, &readiness);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                backoff = Duration::from_millis(200);
                metrics::counter!("vitalwatch_ingest_received_total").increment(1);
                if shutdown.is_cancelled() {
                    // Not acknowledged: the broker keeps it for our next session.
                    continue;
                }
                let msg = Incoming {
                    publish,
                    received_at: Utc::now(),
                    epoch: epoch.load(Ordering::Acquire),
                    since: Instant::now(),
                };
                tokio::select! {
                    r = tx.send(msg) => if r.is_err() { return },
                    () = shutdown.cancelled() => {}
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let e = epoch.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::info!(
                    session_present = ack.session_present,
                    epoch = e,
                    "mqtt connected"
                );
                if !ack.session_present && e > 1 {
                    // Our session (and any messages queued for it) is gone:
                    // the broker restarted without persistence, or expired it.
                    tracing::error!(
                        "the broker did not keep ingest's session; messages queued for it may be lost"
                    );
                    metrics::counter!("vitalwatch_ingest_mqtt_sessions_lost_total").increment(1);
                }
                metrics::counter!("vitalwatch_ingest_mqtt_connects_total").increment(1);
                readiness.set_ready("ingest.mqtt");
                // Subscribe on every connection: a new session has no
                // subscription, and a resumed one may predate a changed
                // share group or root (subscribing again is harmless). The
                // $SYS counter is QoS 0. try_subscribe cannot block this
                // loop, which alone drains the request queue.
                let subs = [
                    rumqttc::SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce),
                    rumqttc::SubscribeFilter::new(SYS_DROPPED.to_owned(), QoS::AtMostOnce),
                ];
                if let Err(err) = client.try_subscribe_many(subs) {
                    tracing::error!(error = %err, "cannot queue the mqtt subscriptions");
                    readiness.set_not_ready("ingest.mqtt", format!("cannot subscribe: {err}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::SubscribeReasonCode::{Failure, Success};
                match ack.return_codes.first() {
                    Some(Success(QoS::AtLeastOnce | QoS::ExactlyOnce)) => {}
                    Some(Failure) => {
                        tracing::error!(filter = %filter, "the broker refused the readings subscription (ACL?); ingest receives nothing");
                        readiness.set_not_ready(
                            "ingest.mqtt",
                            format!("subscription to {filter} refused by the broker"),
                        );
                    }
                    other => {
                        // QoS 0 would mean no redelivery: not acceptable for readings.
                        tracing::error!(filter = %filter, granted = ?other, "the broker downgraded the readings subscription below QoS 1");
                        readiness.set_not_ready(
                            "ingest.mqtt",
                            format!("subscription to {filter} granted as {other:?}, not QoS 1"),
                        );
                    }
                }
                if ack.return_codes.get(1) == Some(&Failure) {
                    tracing::warn!("the broker refused $SYS; dropped-message monitoring is off");
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if shutdown.is_cancelled() {
                    return;
                }
                // Publishes rumqttc read before the error would come out after
                // the next ConnAck, under the new epoch, and their acks would
                // name packet ids of the old connection. The broker redelivers
                // them; drop these copies.
                eventloop.state.events.clear();
                // Acks of this connection must not be queued while we
                // reconnect: the next connection may start a new session.
                epoch.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "mqtt connection error; reconnecting");
                metrics::counter!("vitalwatch_ingest_mqtt_errors_total").increment(1);
                readiness.set_not_ready("ingest.mqtt", format!("mqtt connection error: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Follows the broker's dropped-messages counter: a metric, and not ready
/// while it rises (Mosquitto reports it every `sys_interval`, 10 s by default).
fn watch_drops(payload: &[u8], last: &mut Option<u64>, readiness: &Readiness) {
    let Some(now) = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    metrics::gauge!("vitalwatch_ingest_broker_dropped_messages").set(now as f64);
    match *last {
        Some(before) if now > before => {
            tracing::error!(
                dropped = now - before,
                total = now,
                "the MQTT broker is dropping messages: its queue limits are reached"
            );
            readiness.set_not_ready(
                "ingest.broker_drops",
                format!(
                    "broker dropped {} messages since the last report",
                    now - before
                ),
            );
        }
        _ => readiness.set_ready("ingest.broker_drops"),
    }
    *last = Some(now);
}

/// What every in-flight message needs.
struct Context {
    producer: Arc<vitalwatch_bus::Producer>,
    deadletter: DeadLetter,
    readings_topic: String,
    topic_root: String,
    registry: Arc<RegistryCache>,
    policy: TimePolicy,
    /// Fired when the drain period is over: pending deliveries stop retrying.
    give_up: CancellationToken,
    /// Readiness condition `ingest.kafka`.
    kafka_health: DeliveryHealth,
    /// Batches Kafka already has, to acknowledge their redeliveries at once.
    recent: std::sync::Mutex<RecentBatches>,
    /// Batches being delivered now, by identity: a copy that arrives while
    /// its twin is in flight waits for it instead of producing it again.
    in_flight: std::sync::Mutex<HashMap<u128, Arc<tokio::sync::Mutex<()>>>>,
}

/// Takes messages off the channel, keeps up to `max_in_flight` of them
/// travelling to Kafka at once, and acknowledges them in arrival order.
async fn process(
    ctx: Arc<Context>,
    cfg: &IngestConfig,
    mut rx: mpsc::Receiver<Incoming>,
    client: &AsyncClient,
    epoch: &AtomicU64,
    shutdown: &CancellationToken,
) {
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    // Acks the client's request queue had no room for, oldest first. Never
    // awaiting room keeps this loop from blocking on the event loop while the
    // event loop blocks on us.
    let mut unsent: std::collections::VecDeque<Incoming> = std::collections::VecDeque::new();
    let mut draining = false;
    loop {
        metrics::gauge!("vitalwatch_ingest_in_flight").set(pending.len() as f64);
        metrics::gauge!("vitalwatch_ingest_backpressure").set(
            if pending.len() >= cfg.max_in_flight {
                1.0
            } else {
                0.0
            },
        );
        tokio::select! {
            biased;
            Some((msg, delivered)) = pending.next(), if !pending.is_empty() => {
                if delivered {
                    unsent.push_back(msg);
                    flush_acks(client, &mut unsent, epoch);
                }
            }
            () = tokio::time::sleep(Duration::from_millis(5)), if !unsent.is_empty() => {
                flush_acks(client, &mut unsent, epoch);
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                tracing::info!(in_flight = pending.len(), "ingest draining");
                let give_up = ctx.give_up.clone();
                let grace = Duration::from_secs(cfg.drain_secs);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    give_up.cancel();
                });
            }
            msg = rx.recv(), if !draining && pending.len() < cfg.max_in_flight => match msg {
                Some(msg) => pending.push_back(Box::pin(handle(ctx.clone(), msg))),
                None => draining = true,
            },
        }
        if draining && pending.is_empty() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !unsent.is_empty() && tokio::time::Instant::now() < deadline {
                flush_acks(client, &mut unsent, epoch);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            break;
        }
    }
    ctx.give_up.cancel();
}

/// Queues the acks in `unsent`, in order, as far as the client has room.
fn flush_acks(
    client: &AsyncClient,
    unsent: &mut std::collections::VecDeque<Incoming>,
    epoch: &AtomicU64,
) {
    while let Some(msg) = unsent.front() {
        if msg.epoch != epoch.load(Ordering::Acquire) {
            metrics::counter!("vitalwatch_ingest_stale_acks_skipped_total").increment(1);
            unsent.pop_front();
            continue;
        }
        match client.try_ack(&msg.publish) {
            Ok(()) => {
                metrics::histogram!("vitalwatch_ingest_mqtt_to_kafka_seconds")
                    .record(msg.since.elapsed().as_secs_f64());
                unsent.pop_front();
            }
            // The request queue is full (or the event loop is gone, which
            // rumqttc reports the same way): try again shortly; unacked
            // messages are the broker's to redeliver.
            Err(rumqttc::ClientError::TryRequest(rumqttc::Request::PubAck(_))) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot queue mqtt ack; the broker will redeliver");
                unsent.pop_front();
            }
        }
    }
}

/// Sends everything one message produces to Kafka. Returns `true` once all
/// of it is acknowledged by Kafka, `false` if we gave up (shutdown).
async fn handle(ctx: Arc<Context>, msg: Incoming) -> (Incoming, bool) {
    let delivered = deliver_message(&ctx, &msg).await;
    (msg, delivered)
}

async fn deliver_message(ctx: &Context, msg: &Incoming) -> bool {
    let topic = msg.publish.topic.as_str();
    let payload = &msg.publish.payload[..];
    let Some((device_id, json_topic)) = topics::parse_readings_topic(&ctx.topic_root, topic) else {
        return dead_letter(
            ctx,
            msg,
            "",
            Reason::BadTopic,
            &format!("{topic:?} is not a readings topic"),
            None,
        )
        .await;
    };
    let identity = lock(&ctx.recent).identity(topic, payload);
    let twin = Arc::clone(lock(&ctx.in_flight).entry(identity).or_default());
    let guard = twin.lock().await;
    let delivered = if lock(&ctx.recent).contains(identity) {
        metrics::counter!("vitalwatch_ingest_duplicates_total", "kind" => "batch").increment(1);
        tracing::debug!(
            device_id,
            dup = msg.publish.dup,
            "batch already delivered; acknowledging the redelivery"
        );
        true
    } else {
        deliver_new(ctx, msg, device_id, json_topic, identity).await
    };
    drop(guard);
    let mut in_flight = lock(&ctx.in_flight);
    // Clones are made only under this lock: two left (the map's and ours)
    // means no twin is waiting, and the entry can go.
    if Arc::strong_count(&twin) == 2 {
        in_flight.remove(&identity);
    }
    delivered
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Delivers a batch not seen before; remembers it once Kafka has it all.
async fn deliver_new(
    ctx: &Context,
    msg: &Incoming,
    device_id: &str,
    json_topic: bool,
    identity: u128,
) -> bool {
    let payload = &msg.publish.payload[..];
    let device = loop {
        match ctx.registry.device(device_id, msg.since).await {
            Ok(d) => break d,
            Err(e) => {
                tracing::warn!(error = %e, "device registry unavailable; holding the message");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = ctx.give_up.cancelled() => return false,
                }
            }
        }
    };
    let outcome = classify(
        device_id,
        json_topic,
        payload,
        device.as_ref(),
        msg.received_at,
        &ctx.policy,
    );
    if outcome.duplicates > 0 {
        metrics::counter!("vitalwatch_ingest_duplicates_total", "kind" => "reading")
            .increment(outcome.duplicates as u64);
    }
    for r in &outcome.rejected {
        if !dead_letter(
            ctx,
            msg,
            device_id,
            r.rejection.reason,
            &r.rejection.detail,
            r.reading_index,
        )
        .await
        {
            return false;
        }
    }
    for batch in &outcome.accepted {
        let started = Instant::now();
        let value = batch.encode();
        let health = Some(&ctx.kafka_health);
        if vitalwatch_bus::deliver(
            &ctx.producer,
            &ctx.readings_topic,
            &batch.patient_id,
            &value,
            None,
            health,
            &ctx.give_up,
        )
        .await
        .is_err()
        {
            return false;
        }
        metrics::histogram!("vitalwatch_ingest_kafka_produce_seconds")
            .record(started.elapsed().as_secs_f64());
    }
    metrics::counter!("vitalwatch_ingest_accepted_readings_total")
        .increment(outcome.accepted_readings() as u64);
    // A payload refused whole (unknown device, bad topic, …) may be sent
    // again once the cause is fixed (the device registered): that copy must
    // be judged afresh, not taken for a redelivery.
    if outcome.rejected.iter().all(|r| r.reading_index.is_some()) {
        lock(&ctx.recent).insert(identity);
    }
    true
}

async fn dead_letter(
    ctx: &Context,
    msg: &Incoming,
    device_id: &str,
    reason: Reason,
    detail: &str,
    reading_index: Option<usize>,
) -> bool {
    tracing::info!(
        device_id,
        reason = reason.as_str(),
        detail,
        reading_index,
        "input rejected"
    );
    metrics::counter!("vitalwatch_ingest_rejected_total", "reason" => reason.as_str()).increment(1);
    let info = DeadLetterInfo {
        reason: reason.as_str(),
        detail,
        source_topic: &msg.publish.topic,
        received_at: msg.received_at,
        reading_index,
    };
    match ctx
        .deadletter
        .send(device_id, &msg.publish.payload, info, &ctx.give_up)
        .await
    {
        Ok(()) => {
            metrics::counter!("vitalwatch_ingest_deadlettered_total").increment(1);
            true
        }
        Err(_) => false,
    }
}
