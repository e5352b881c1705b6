//! Each stage's own limit on this machine, measured alone before the
//! pipeline runs, on the same uploads: Mosquitto relaying them, Kafka
//! producing and consuming the records ingest makes of them, PostgreSQL
//! taking their rows by binary COPY. Every limit is also given in readings/s,
//! so that the pipeline's end-to-end rate reads as a share of its slowest
//! stage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;
use vitalwatch::Config;
use vitalwatch_bus::rdkafka::consumer::Consumer;
use vitalwatch_core::payload::{PayloadFormat, decode};
use vitalwatch_core::reading::Batch;
use vitalwatch_core::validate::{TimePolicy, validate};
use vitalwatch_sim::load::Load;
use vitalwatch_sim::replay::Broker;
use vitalwatch_store::readings::Rows;
use vitalwatch_test_support as ts;

type Error = Box<dyn std::error::Error>;

/// One stage's limit.
pub struct Limit {
    pub stage: &'static str,
    /// Messages, records or rows per second, and which.
    pub per_second: f64,
    pub unit: &'static str,
    pub readings_per_second: f64,
    /// The machine's busy share while it ran (of 100% per core).
    pub machine_busy: f64,
    /// How many times the pipeline goes through it (the readings are
    /// consumed twice: by the writer and by the alerts engine).
    pub times: u32,
}

/// Distinct uploads the stages cycle through.
const SAMPLES: usize = 10_000;

/// Measures every stage for `seconds` each.
pub async fn measure(
    load: &Load,
    broker: &Broker,
    cfg: &Config,
    seconds: u64,
) -> Result<Vec<Limit>, Error> {
    let window = Duration::from_secs(seconds);
    let topic_root = format!("{}/rpm/v1/devices", ts::unique("stage"));
    let uploads = load.sample_uploads(&topic_root, SAMPLES.min(load.devices));
    let per_upload = load.batch as f64;
    // The records ingest makes of them (one per upload: a wearable belongs to
    // one patient).
    let now = Utc::now();
    let mut records = Vec::with_capacity(uploads.len());
    for (_, payload) in &uploads {
        let device = decode(payload, PayloadFormat::detect(false, payload))?;
        let readings = device
            .readings
            .iter()
            .map(|r| validate(r, now, &TimePolicy::default()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a sample upload does not validate: {e:?}"))?;
        let device_id = device.device_id.unwrap_or_default();
        records.push(Batch {
            patient_id: format!("{device_id}-patient"),
            device_id,
            seq: device.seq,
            received_at: now,
            readings,
        });
    }

    let mut limits = Vec::new();
    let (msgs, busy) = busy_while(mqtt_relay(load, broker, &topic_root, &uploads, window)).await?;
    limits.push(Limit {
        stage: "MQTT relay (Mosquitto, QoS 1)",
        per_second: msgs,
        unit: "uploads",
        readings_per_second: msgs * per_upload,
        machine_busy: busy,
        times: 1,
    });
    let topic = ts::unique("t.stage");
    vitalwatch_bus::ensure_topics(&cfg.kafka, &[&topic]).await?;
    let ((produced, count), busy) =
        busy_while(kafka_produce(cfg, &topic, &records, window)).await?;
    limits.push(Limit {
        stage: "Kafka produce (ingest's producer)",
        per_second: produced,
        unit: "records",
        readings_per_second: produced * per_upload,
        machine_busy: busy,
        times: 1,
    });
    let (consumed, busy) = busy_while(kafka_consume(cfg, &topic, count)).await?;
    limits.push(Limit {
        stage: "Kafka consume (the writer's consumer)",
        per_second: consumed,
        unit: "records",
        readings_per_second: consumed * per_upload,
        machine_busy: busy,
        times: 2,
    });
    let (rows, busy) = busy_while(postgres_copy(cfg, &records, window)).await?;
    limits.push(Limit {
        stage: "PostgreSQL binary COPY into readings",
        per_second: rows,
        unit: "rows",
        readings_per_second: rows,
        machine_busy: busy,
        times: 1,
    });
    Ok(limits)
}

/// `f`'s result and the machine's busy share (% of one core) while it ran.
async fn busy_while<T>(f: impl Future<Output = Result<T, Error>>) -> Result<(T, f64), Error> {
    let before = super::machine_ticks();
    let out = f.await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = match (before, super::machine_ticks()) {
        (Some(a), Some(b)) => cores * 100.0 * (b.0 - a.0) / (b.3 - a.3).max(1.0),
        _ => f64::NAN,
    };
    Ok((out, busy))
}

/// The load's gateways publish its uploads as fast as Mosquitto takes them
/// (QoS 1, as load mode does) to one QoS 1 subscriber, as ingest is one:
/// uploads/s the subscriber received over `window`, after a second's start.
/// The uploads are under `topic_root`.
async fn mqtt_relay(
    load: &Load,
    broker: &Broker,
    topic_root: &str,
    uploads: &[(String, Vec<u8>)],
    window: Duration,
) -> Result<f64, Error> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut opts = MqttOptions::new(ts::unique("stage-sub"), broker.host.clone(), broker.port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_credentials("vitalwatch-ingest", ts::mqtt_password());
    let (sub, mut events) = AsyncClient::new(opts, 100);
    sub.subscribe(format!("{topic_root}/#"), QoS::AtLeastOnce)
        .await?;
    let subscribed = Arc::new(AtomicBool::new(false));
    let subscriber = {
        let (received, stop, subscribed) = (received.clone(), stop.clone(), subscribed.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed.store(true, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("  relay subscriber: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    };
    let started = Instant::now();
    while !subscribed.load(Ordering::Relaxed) {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("the relay subscriber was not subscribed in 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let connections = load.connections.unwrap_or(8).clamp(1, 64);
    let mut publishers = Vec::new();
    for c in 0..connections {
        let mut opts = MqttOptions::new(ts::unique("stage-pub"), broker.host.clone(), broker.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(load.inflight.max(1))
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some(user) = &broker.username {
            opts.set_credentials(user.clone(), broker.password.clone());
        }
        let (client, mut events) = AsyncClient::new(opts, 1000);
        let stop_events = stop.clone();
        publishers.push(tokio::spawn(async move {
            while !stop_events.is_cancelled() {
                if let Err(e) = events.poll().await {
                    eprintln!("  relay publisher: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
        let (stop, mine): (_, Vec<(String, Vec<u8>)>) = (
            stop.clone(),
            uploads
                .iter()
                .skip(c)
                .step_by(connections)
                .cloned()
                .collect(),
        );
        publishers.push(tokio::spawn(async move {
            for (topic, payload) in mine.iter().cycle() {
                if stop.is_cancelled() {
                    break;
                }
                if client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (from, at) = (received.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(window).await;
    let rate = (received.load(Ordering::Relaxed) - from) as f64 / at.elapsed().as_secs_f64();
    stop.cancel();
    let _ = sub.disconnect().await;
    for p in publishers {
        p.abort();
    }
    subscriber.abort();
    Ok(rate)
}

/// Ingest's producer (idempotent, `acks=all`, its linger and compression)
/// sending the records as fast as tansu takes them, 1,000 in flight (ingest's
/// window): records/s, and how many were sent.
async fn kafka_produce(
    cfg: &Config,
    topic: &str,
    records: &[Batch],
    window: Duration,
) -> Result<(f64, u64), Error> {
    let producer = vitalwatch_bus::Producer::new(&cfg.kafka)?;
    let payloads: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|b| (b.patient_id.clone(), b.encode()))
        .collect();
    let never = CancellationToken::new();
    let mut pending = FuturesUnordered::new();
    let mut sent = 0u64;
    let started = Instant::now();
    for (key, payload) in payloads.iter().cycle() {
        if started.elapsed() >= window {
            break;
        }
        let (producer, never) = (producer.clone(), never.clone());
        pending.push(async move {
            vitalwatch_bus::deliver(&producer, topic, key, payload, None, None, &never).await
        });
        if pending.len() >= 1000
            && let Some(r) = pending.next().await
        {
            r?;
            sent += 1;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
        sent += 1;
    }
    Ok((sent as f64 / started.elapsed().as_secs_f64(), sent))
}

/// The writer's consumer reading `count` records from the start of `topic`:
/// records/s from the first record to the last.
async fn kafka_consume(cfg: &Config, topic: &str, count: u64) -> Result<f64, Error> {
    let consumer = vitalwatch_bus::low_latency_consumer(&cfg.kafka, &ts::unique("stage"), 50)?;
    consumer.subscribe(&[topic])?;
    let mut first = None;
    let mut got = 0u64;
    while got < count {
        match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
            Ok(Ok(_)) => {
                first.get_or_insert_with(Instant::now);
                got += 1;
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(
                    format!("consumed {got} of {count} records, then none for 60 s").into(),
                );
            }
        }
    }
    let took = first.map_or(Duration::ZERO, |f| f.elapsed());
    Ok(got as f64 / took.as_secs_f64().max(f64::MIN_POSITIVE))
}

/// Binary COPY of the records' rows straight into `readings` of a fresh
/// database of the pipeline's layout, in transactions of the writer's batch
/// size, over as many connections as the writer writes concurrently:
/// rows/s. The records are cycled, each pass a microsecond later, so every
/// row is new.
async fn postgres_copy(cfg: &Config, records: &[Batch], window: Duration) -> Result<f64, Error> {
    let db = ts::database_with(cfg.database.clone()).await;
    let streams = cfg.writer.concurrent_writes.max(1);
    let result = async {
        let pool = vitalwatch_store::pool(&db)?;
        let started = Instant::now();
        let copies = (0..streams).map(|stream| {
            let pool = pool.clone();
            async move {
                let mut client = pool.get().await?;
                let mut rows = 0usize;
                // Stream s takes passes s, s + streams, …: no two rows alike.
                let mut pass = stream as i64;
                let mut chunk = Rows::default();
                'copy: loop {
                    for b in records {
                        let mut b = b.clone();
                        for r in &mut b.readings {
                            r.measured_at += chrono::Duration::microseconds(pass);
                        }
                        chunk.push(&b);
                        if chunk.len() >= cfg.writer.batch_max_rows {
                            let tx = client.transaction().await?;
                            vitalwatch_benches::copy_straight(&tx, &chunk).await?;
                            tx.commit().await?;
                            rows += chunk.len();
                            chunk = Rows::default();
                            if started.elapsed() >= window {
                                break 'copy;
                            }
                        }
                    }
                    pass += streams as i64;
                }
                Ok::<_, Error>(rows)
            }
        });
        let mut rows = 0;
        for r in futures_util::future::join_all(copies).await {
            rows += r?;
        }
        Ok::<_, Error>(rows as f64 / started.elapsed().as_secs_f64())
    }
    .await;
    super::procs::drop_database(&db.url).await;
    result
}
