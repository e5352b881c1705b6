//! Load mode: many simulated wearables publishing at a target rate, over
//! one MQTT connection each or over a few gateway connections, with
//! reconnect storms on demand; the end-to-end latency is measured by
//! reading the pipeline's output.
//!
//! - **Devices.** Wearables measure heart rate and SpO2 together and upload
//!   `batch` readings at a time (`batch / 2` instants, evenly spaced over
//!   the upload interval). The upload interval follows from the target:
//!   `devices × batch / rate`. Devices are spread evenly over the interval,
//!   so the broker sees a steady stream, not a pulse per second. Values
//!   follow a personal baseline, the circadian rhythm and noise
//!   ([`crate::model`]); no clinical events.
//! - **Sessions.** Every connection keeps its session (clean session off),
//!   as a device that holds a reading until the broker acknowledges it: a
//!   link that breaks sends its unacknowledged publishes again.
//! - **Storms.** Every `storm_every`, a share of the connections drop at
//!   once without a DISCONNECT and reconnect together, as after a network
//!   blip or a broker restart.
//! - **Publish to row.** Every `row_probe_interval` one upload is a probe:
//!   its publish instant is kept, and the database is polled every
//!   [`ROW_POLL`] for its newest heart-rate row. A figure is the time from
//!   the publish to the poll whose snapshot first held the row: an upper
//!   bound, at most one poll interval above the truth.
//! - **Publish to alert.** `alert_probes` extra patients have thermometers.
//!   Every `alert_probe_interval` one of them measures 39.0 °C (the default
//!   `fever` rule raises) or, once raised, 36.8 °C (it resolves). The
//!   simulator LISTENs for the engine's alert changes (the outbox's
//!   `vitalwatch_alert_events` notification) and times each raise and
//!   resolve from the publish. The first raise and resolve of each probe
//!   patient (its rebuild) are not counted.
//! - **No loss.** At the end the readings stored for the load devices are
//!   counted and compared with the readings the broker acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rumqttc::QoS;
use serde::Serialize;
use tokio::sync::mpsc;
use vitalwatch_core::{proto, topics};

use crate::Format;
use crate::model::{Baseline, Condition, noise, values};
use crate::replay::{Broker, Publisher};

/// How often the database is polled for row probes.
pub const ROW_POLL: Duration = Duration::from_millis(10);
/// Probe raises and resolves of each alert probe patient left uncounted.
const ALERT_WARMUP: u32 = 2;
/// How long a probe may take before it counts as not seen.
const PROBE_PATIENCE: Duration = Duration::from_secs(120);

/// What to run.
#[derive(Debug, Clone)]
pub struct Load {
    /// Simulated wearables.
    pub devices: usize,
    /// Readings per second across them.
    pub rate: f64,
    /// Readings per upload (even: heart rate and SpO2 pairs).
    pub batch: usize,
    /// Gateway connections sharing the devices; `None`: one per device.
    pub connections: Option<usize>,
    pub duration: Duration,
    /// Ids: devices `{prefix}-d000001`, patients `{prefix}-p000001`.
    pub prefix: String,
    pub seed: u64,
    pub format: Format,
    /// Drop `storm_share` of the connections at once every this often.
    pub storm_every: Option<Duration>,
    pub storm_share: f64,
    /// Patients with thermometers timing publish to alert; 0: none.
    pub alert_probes: usize,
    pub alert_probe_interval: Duration,
    /// One upload in this interval is timed from publish to row.
    pub row_probe_interval: Duration,
    /// Nothing is timed before this much of the run has passed (the
    /// engine's first sight of every patient rebuilds it from the store).
    pub warmup: Duration,
    /// Unacknowledged publishes one connection may have.
    pub inflight: u16,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            devices: 1000,
            rate: 2000.0,
            batch: 10,
            connections: Some(4),
            duration: Duration::from_secs(60),
            prefix: "load".into(),
            seed: 1,
            format: Format::Protobuf,
            storm_every: None,
            storm_share: 0.5,
            alert_probes: 4,
            alert_probe_interval: Duration::from_secs(1),
            row_probe_interval: Duration::from_millis(100),
            warmup: Duration::ZERO,
            inflight: 100,
        }
    }
}

impl Load {
    /// Refuses what cannot run as asked.
    pub fn check(&self) -> Result<(), String> {
        if self.devices == 0 {
            return Err("devices: at least 1".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err("rate: readings per second, above 0".into());
        }
        if self.batch < 2 || !self.batch.is_multiple_of(2) || self.batch > 2000 {
            return Err("batch: an even number of readings from 2 to 2000".into());
        }
        if self.connections == Some(0) {
            return Err("connections: at least 1 (or one per device)".into());
        }
        if !(0.0..=1.0).contains(&self.storm_share) {
            return Err("storm share: from 0 to 1".into());
        }
        if self.storm_every.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err("storm every: at least 1 s".into());
        }
        if self.prefix.is_empty()
            || !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("prefix: letters, digits, - and _".into());
        }
        if self.alert_probes > 0 && self.alert_probe_interval < Duration::from_millis(10) {
            return Err("alert probe interval: at least 10 ms".into());
        }
        if self.warmup >= self.duration {
            return Err("warm-up: shorter than the run".into());
        }
        if self.spacing_ms() < 1 {
            return Err(format!(
                "{} devices uploading {} readings each at {} readings/s would measure \
                 more than once a millisecond: add devices or lower the rate",
                self.devices, self.batch, self.rate
            ));
        }
        Ok(())
    }

    /// Milliseconds between one device's uploads.
    pub fn interval_ms(&self) -> u64 {
        ((self.devices * self.batch) as f64 * 1000.0 / self.rate).round() as u64
    }

    /// Milliseconds between one device's measurements.
    fn spacing_ms(&self) -> u64 {
        self.interval_ms() / (self.batch as u64 / 2)
    }

    /// The rate the whole-millisecond interval gives, readings/s.
    pub fn effective_rate(&self) -> f64 {
        (self.devices * self.batch) as f64 * 1000.0 / self.interval_ms().max(1) as f64
    }

    pub fn device_id(&self, i: usize) -> String {
        format!("{}-d{:06}", self.prefix, i + 1)
    }

    fn probe_device_id(&self, i: usize) -> String {
        format!("{}-t{:03}", self.prefix, i + 1)
    }

    /// The alert probe patients' ids.
    pub fn probe_patient_id(&self, i: usize) -> String {
        format!("{}-alert{:03}", self.prefix, i + 1)
    }

    /// The wearables, each with its baseline and its moment in the interval.
    fn cohort(&self, topic_root: &str) -> Vec<Device> {
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let conditions = [Condition::Healthy, Condition::Hypertension];
        let interval = self.interval_ms();
        (0..self.devices)
            .map(|i| {
                let id = self.device_id(i);
                Device {
                    topic: topics::mqtt_readings_topic(topic_root, &id),
                    id,
                    baseline: Baseline::draw(conditions[i % 2], &mut rng),
                    phase_ms: (i as u64 * interval) / self.devices as u64,
                }
            })
            .collect()
    }

    /// The first `count` uploads load mode would send, device after device
    /// and then round after round, each with its MQTT topic under
    /// `topic_root`: what the pipeline bench puts through one stage alone.
    pub fn sample_uploads(&self, topic_root: &str, count: usize) -> Vec<(String, Vec<u8>)> {
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let cohort = self.cohort(topic_root);
        let rounds = count.div_ceil(cohort.len().max(1)) as u64;
        // Ending about now, so that every reading is valid when it is read.
        let start = Utc::now().timestamp_millis() - (rounds * self.interval_ms()) as i64;
        (0..count)
            .map(|k| {
                let (d, round) = (&cohort[k % cohort.len()], (k / cohort.len()) as u64);
                let newest = start + (round * self.interval_ms() + d.phase_ms) as i64;
                let payload = encode(d, round + 1, &self.instants(newest), &mut rng, self.format);
                (d.topic.clone(), payload)
            })
            .collect()
    }

    /// The measurement instants of an upload whose newest is `newest_ms`
    /// (Unix milliseconds), oldest first, one spacing apart.
    fn instants(&self, newest_ms: i64) -> Vec<DateTime<Utc>> {
        let spacing = self.spacing_ms() as i64;
        (0..(self.batch / 2) as i64)
            .rev()
            .filter_map(|k| DateTime::from_timestamp_millis(newest_ms - k * spacing))
            .collect()
    }

    /// `device_id,patient_id,kind` lines for `vitalwatch devices import`.
    pub fn registry_csv(&self) -> String {
        let mut s = String::from("# device_id,patient_id,kind\n");
        for i in 0..self.devices {
            s.push_str(&format!(
                "{},{}-p{:06},wearable\n",
                self.device_id(i),
                self.prefix,
                i + 1
            ));
        }
        for i in 0..self.alert_probes {
            s.push_str(&format!(
                "{},{},thermometer\n",
                self.probe_device_id(i),
                self.probe_patient_id(i)
            ));
        }
        s
    }
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Some(Percentiles {
            samples: ms.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            p999_ms: rank(0.999),
            max_ms: ms[ms.len() - 1],
        })
    }
}

/// What a load run did and measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub devices: usize,
    pub connections: usize,
    pub seconds: f64,
    /// Readings/s asked for (as the whole-millisecond interval gives it).
    pub target_rate: f64,
    /// Readings published per second of the run.
    pub achieved_rate: f64,
    pub uploads_published: u64,
    pub uploads_acknowledged: u64,
    pub readings_published: u64,
    pub readings_acknowledged: u64,
    /// The most any upload went out after its time, ms.
    pub max_behind_ms: u64,
    pub storms: u64,
    /// Connections established after the first ones.
    pub reconnects: u64,
    /// Readings of the load devices in the database; `None` without one.
    pub stored: Option<u64>,
    /// Acknowledged readings not stored (`None` without a database).
    pub lost: Option<u64>,
    /// Seconds from the last publish until every acknowledged reading was
    /// counted in the database (an upper bound: the count is repeated
    /// every 2 s, after the probes are in); `None` if they never all were.
    pub stored_after_seconds: Option<f64>,
    /// Seconds at the start when nothing was timed.
    pub warmup_seconds: f64,
    pub row_latency: Option<Percentiles>,
    /// Row probes whose row never appeared.
    pub row_probes_unseen: u64,
    pub alert_latency: Option<Percentiles>,
    pub alert_probes_sent: u64,
    /// Alert probes whose raise or resolve never came.
    pub alert_probes_unseen: u64,
}

impl LoadReport {
    pub fn render(&self) -> String {
        let pct = |p: &Option<Percentiles>| match p {
            Some(p) => format!(
                "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({} samples)",
                p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms, p.samples
            ),
            None => "not measured".into(),
        };
        let stored = match (self.stored, self.lost) {
            (Some(s), Some(l)) => format!(
                "{s} stored, {l} acknowledged but not stored{}",
                self.stored_after_seconds
                    .map(|t| format!(" (all in {t:.1} s after the last publish)"))
                    .unwrap_or_default()
            ),
            _ => "not counted (no database)".into(),
        };
        format!(
            "load: {} devices over {} connections, {:.0} s\n\
             rate: {:.0} readings/s achieved of {:.0} asked (most behind schedule: {} ms)\n\
             uploads: {} published, {} acknowledged; readings: {} published, {} acknowledged\n\
             readings in the database: {stored}\n\
             storms: {}, reconnects: {}\n\
             publish to row: {} ({} unseen; polled every {} ms; timed after a {:.0} s warm-up)\n\
             publish to alert: {} ({} probes, {} unseen)\n",
            self.devices,
            self.connections,
            self.seconds,
            self.achieved_rate,
            self.target_rate,
            self.max_behind_ms,
            self.uploads_published,
            self.uploads_acknowledged,
            self.readings_published,
            self.readings_acknowledged,
            self.storms,
            self.reconnects,
            pct(&self.row_latency),
            self.row_probes_unseen,
            ROW_POLL.as_millis(),
            self.warmup_seconds,
            pct(&self.alert_latency),
            self.alert_probes_sent,
            self.alert_probes_unseen,
        )
    }
}

/// One simulated wearable.
struct Device {
    id: String,
    topic: String,
    baseline: Baseline,
    /// Milliseconds into each interval at which it uploads.
    phase_ms: u64,
}

/// Encodes one upload: heart rate and SpO2 at each of `instants`.
fn encode(
    device: &Device,
    seq: u64,
    instants: &[DateTime<Utc>],
    rng: &mut SmallRng,
    format: Format,
) -> Vec<u8> {
    let mut pairs = Vec::with_capacity(instants.len());
    for at in instants {
        let hour = at.timestamp() as f64 / 3600.0;
        let v = values(&device.baseline, &[], hour, hour.rem_euclid(24.0));
        let hr = (v.heart_rate + noise(rng, 2.0)).round();
        let spo2 = (v.spo2 + noise(rng, 0.6)).round().min(100.0);
        pairs.push((*at, hr, spo2));
    }
    match format {
        Format::Json => {
            let mut readings = Vec::with_capacity(pairs.len() * 2);
            for (at, hr, spo2) in pairs {
                let t = at.to_rfc3339_opts(SecondsFormat::Millis, true);
                readings.push(serde_json::json!({"metric": "heart_rate", "value": hr, "unit": "/min", "measured_at": t}));
                readings.push(serde_json::json!({"metric": "spo2", "value": spo2, "unit": "%", "measured_at": t}));
            }
            serde_json::json!({"device_id": device.id, "seq": seq, "readings": readings})
                .to_string()
                .into_bytes()
        }
        Format::Protobuf => {
            let mut readings = Vec::with_capacity(pairs.len() * 2);
            for (at, hr, spo2) in pairs {
                let ts = Some(prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: at.timestamp_subsec_nanos() as i32,
                });
                for (metric, value, unit) in [
                    (proto::Metric::HeartRate, hr, "/min"),
                    (proto::Metric::Spo2, spo2, "%"),
                ] {
                    readings.push(proto::Reading {
                        metric: metric as i32,
                        value,
                        unit: unit.into(),
                        measured_at: ts,
                        ..Default::default()
                    });
                }
            }
            proto::ReadingBatch {
                device_id: device.id.clone(),
                seq: Some(seq),
                readings,
                ..Default::default()
            }
            .encode_to_vec()
        }
    }
}

/// A timed upload: its newest heart-rate reading, and when it was published.
struct RowProbe {
    device_id: String,
    at: DateTime<Utc>,
    sent: Instant,
}

/// Counters the connection tasks share with the display.
#[derive(Default)]
struct Counters {
    uploads: AtomicU64,
    behind_ms: AtomicU64,
    /// Milliseconds since the start at which the next row probe is due.
    next_probe_ms: AtomicU64,
}

/// Runs the load. `database`: the pipeline's database, for the latency
/// probes and the final count; without it only the broker's side is
/// measured. `progress` gets a line every five seconds.
pub async fn run(
    load: &Load,
    broker: &Broker,
    database: Option<&str>,
    mut progress: impl FnMut(&str),
) -> Result<LoadReport, String> {
    load.check()?;
    let interval = load.interval_ms();
    let batch = load.batch as u64;
    let devices = load.cohort(&broker.topic_root);
    let links = load.connections.unwrap_or(load.devices).min(load.devices);
    // Connection c takes devices c, c + links, …: every link's devices
    // spread over the whole interval.
    let mut groups: Vec<Vec<Device>> = (0..links).map(|_| Vec::new()).collect();
    for (i, d) in devices.into_iter().enumerate() {
        groups[i % links].push(d);
    }
    // Per-device connections keep a modest window each; gateways a large one.
    let (inflight, capacity) = if load.connections.is_some() {
        (load.inflight.max(10), 1000)
    } else {
        (load.inflight.clamp(1, 20), 20)
    };
    let publishers: Vec<Arc<Publisher>> = (0..links)
        .map(|c| {
            Arc::new(Publisher::persistent(
                broker,
                format!("{}-load-{c}", load.prefix),
                inflight,
                capacity,
            ))
        })
        .collect();

    let db = match database {
        Some(url) => Some(Probes::start(url, load, broker).await?),
        None => None,
    };
    let row_tx = db.as_ref().map(|p| p.rows.clone());

    let started = Instant::now();
    let wall_start = Utc::now();
    // Whole milliseconds from here on: stored times then match exactly.
    let wall_ms = wall_start.timestamp_millis();
    let counters = Arc::new(Counters::default());
    counters
        .next_probe_ms
        .store(load.warmup.as_millis() as u64, Ordering::Relaxed);
    let stop_at = started + load.duration;
    let mut tasks = Vec::with_capacity(links);
    for (c, group) in groups.into_iter().enumerate() {
        let publisher = publishers[c].clone();
        let counters = counters.clone();
        let row_tx = row_tx.clone();
        let probe_every = load.row_probe_interval.as_millis() as u64;
        let load = load.clone();
        let mut rng = SmallRng::seed_from_u64(load.seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9));
        tasks.push(tokio::spawn(async move {
            let mut round: u64 = 0;
            'run: loop {
                for d in &group {
                    let due_ms = round * interval + d.phase_ms;
                    let due = started + Duration::from_millis(due_ms);
                    if due >= stop_at {
                        break 'run;
                    }
                    let now = Instant::now();
                    if due > now + Duration::from_millis(1) {
                        tokio::time::sleep_until(due.into()).await;
                    } else {
                        let behind = now.saturating_duration_since(due).as_millis() as u64;
                        counters.behind_ms.fetch_max(behind, Ordering::Relaxed);
                    }
                    let times = load.instants(wall_ms + due_ms as i64);
                    // Sequence numbers carry on from run to run, as a device's
                    // do: this run's start in Unix ms, plus the upload's round.
                    let seq = wall_ms as u64 + round;
                    let payload = encode(d, seq, &times, &mut rng, load.format);
                    // One upload per probe interval is timed (whichever
                    // connection gets there first).
                    let elapsed = started.elapsed().as_millis() as u64;
                    let next = counters.next_probe_ms.load(Ordering::Relaxed);
                    let probe = row_tx.is_some()
                        && elapsed >= next
                        && counters
                            .next_probe_ms
                            .compare_exchange(
                                next,
                                elapsed + probe_every,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            )
                            .is_ok();
                    let sent = Instant::now();
                    if publisher
                        .client
                        .publish(d.topic.as_str(), QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        return; // the event loop is gone
                    }
                    counters.uploads.fetch_add(1, Ordering::Relaxed);
                    if probe && let (Some(tx), Some(at)) = (&row_tx, times.last()) {
                        let _ = tx.send(RowProbe {
                            device_id: d.id.clone(),
                            at: *at,
                            sent,
                        });
                    }
                }
                round += 1;
            }
        }));
    }

    // Storms and the display, until the time is up.
    let mut storms = 0u64;
    let mut next_storm = load.storm_every.map(|e| started + e);
    let mut next_report = started + Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut storm_rng = SmallRng::seed_from_u64(load.seed.wrapping_add(7));
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        if let Some(at) = next_storm.filter(|at| now >= *at) {
            let n = (((links as f64) * load.storm_share).round() as usize).clamp(1, links);
            // A random share of the links, severed together.
            for i in rand::seq::index::sample(&mut storm_rng, links, n) {
                publishers[i].sever();
            }
            storms += 1;
            next_storm = load.storm_every.map(|e| at + e);
        }
        if now >= next_report {
            next_report += Duration::from_secs(5);
            let secs = started.elapsed().as_secs_f64();
            let readings = counters.uploads.load(Ordering::Relaxed) * batch;
            let acked: u64 = publishers.iter().map(|p| p.acknowledged()).sum();
            let up = publishers.iter().filter(|p| p.is_up()).count();
            let mut line = format!(
                "{secs:>5.0} s  {:>10} readings  {:>8.0}/s  acked {:.1}%  behind {} ms  links up {up}/{links}",
                readings,
                readings as f64 / secs,
                100.0 * acked as f64 / counters.uploads.load(Ordering::Relaxed).max(1) as f64,
                counters.behind_ms.swap(0, Ordering::Relaxed),
            );
            if let Some(db) = &db {
                line.push_str(&db.summary());
            }
            progress(&line);
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(row_tx); // the row prober ends once the connection tasks' copies are gone
    let published_at = Instant::now();
    if let Some(db) = &db {
        let _ = db.stop.send(true);
    }
    let seconds = started.elapsed().as_secs_f64();
    let uploads = counters.uploads.load(Ordering::Relaxed);
    let readings = uploads * batch;
    // Every publish waits for its acknowledgement (a minute at most).
    let deadline = Instant::now() + Duration::from_secs(60);
    while publishers.iter().map(|p| p.acknowledged()).sum::<u64>() < uploads
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked: u64 = publishers.iter().map(|p| p.acknowledged()).sum();
    let reconnects: u64 = publishers
        .iter()
        .map(|p| p.connects().saturating_sub(1))
        .sum();
    let mut report = LoadReport {
        devices: load.devices,
        connections: links,
        seconds,
        target_rate: load.effective_rate(),
        achieved_rate: readings as f64 / seconds,
        uploads_published: uploads,
        uploads_acknowledged: acked,
        readings_published: readings,
        readings_acknowledged: acked * batch,
        max_behind_ms: counters.behind_ms.load(Ordering::Relaxed),
        storms,
        reconnects,
        warmup_seconds: load.warmup.as_secs_f64(),
        ..LoadReport::default()
    };
    for p in publishers {
        if let Ok(p) = Arc::try_unwrap(p) {
            p.close().await;
        }
    }
    if let Some(db) = db {
        db.finish(load, wall_start, published_at, &mut report)
            .await?;
    }
    Ok(report)
}

/// The database side: row probes, alert probes and the final count.
struct Probes {
    client: tokio_postgres::Client,
    rows: mpsc::UnboundedSender<RowProbe>,
    row_task: tokio::task::JoinHandle<u64>,
    row_samples: Arc<std::sync::Mutex<Vec<Duration>>>,
    alert_task: Option<tokio::task::JoinHandle<Result<(u64, u64), String>>>,
    alert_samples: Arc<std::sync::Mutex<Vec<Duration>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Probes {
    async fn start(url: &str, load: &Load, broker: &Broker) -> Result<Probes, String> {
        let connect = || async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("database: {e}"))?;
            tokio::spawn(conn);
            Ok::<_, String>(client)
        };
        let client = connect().await?;
        let rows_client = connect().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let row_samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let row_task = tokio::spawn(poll_rows(rows_client, rx, row_samples.clone()));
        let alert_samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let alert_task = (load.alert_probes > 0).then(|| {
            tokio::spawn(alert_probes(
                load.clone(),
                broker.clone(),
                url.to_owned(),
                alert_samples.clone(),
                stopped,
            ))
        });
        Ok(Probes {
            client,
            rows: tx,
            row_task,
            row_samples,
            alert_task,
            alert_samples,
            stop,
        })
    }

    /// The latency figures so far, for the display.
    fn summary(&self) -> String {
        let rows = self
            .row_samples
            .lock()
            .map(|s| Percentiles::of(&s))
            .unwrap_or(None);
        let alerts = self
            .alert_samples
            .lock()
            .map(|s| Percentiles::of(&s))
            .unwrap_or(None);
        let mut s = String::new();
        if let Some(p) = rows {
            s.push_str(&format!("  row p50 {:.0} p99 {:.0} ms", p.p50_ms, p.p99_ms));
        }
        if let Some(p) = alerts {
            s.push_str(&format!(
                "  alert p50 {:.0} p99 {:.0} ms",
                p.p50_ms, p.p99_ms
            ));
        }
        s
    }

    /// Waits for the probes still out, then counts what was stored.
    async fn finish(
        self,
        load: &Load,
        wall_start: DateTime<Utc>,
        published_at: Instant,
        report: &mut LoadReport,
    ) -> Result<(), String> {
        drop(self.rows);
        report.row_probes_unseen = self.row_task.await.map_err(|e| e.to_string())?;
        report.row_latency = self
            .row_samples
            .lock()
            .map(|s| Percentiles::of(&s))
            .unwrap_or(None);
        let _ = self.stop.send(true);
        if let Some(task) = self.alert_task {
            let (sent, unseen) = task.await.map_err(|e| e.to_string())??;
            report.alert_probes_sent = sent;
            report.alert_probes_unseen = unseen;
            report.alert_latency = self
                .alert_samples
                .lock()
                .map(|s| Percentiles::of(&s))
                .unwrap_or(None);
        }
        // Count until it reaches what the broker acknowledged, or has not
        // moved for STORE_PATIENCE (a backlog drains in bursts). This
        // run's sequence numbers start at its start in Unix ms; an earlier
        // run's, of the same devices, end before that.
        let from = wall_start - chrono::Duration::milliseconds(load.interval_ms() as i64 + 1000);
        let prefix = format!("{}-d", load.prefix);
        let mut last: Option<(u64, Instant)> = None;
        loop {
            let n: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM readings
                      WHERE time >= $1 AND seq >= $2 AND starts_with(device_id, $3)",
                    &[&from, &wall_start.timestamp_millis(), &prefix],
                )
                .await
                .map_err(|e| format!("counting stored readings: {e}"))?
                .get(0);
            let n = n as u64;
            let stuck = last.is_some_and(|(m, since)| m == n && since.elapsed() >= STORE_PATIENCE);
            if n >= report.readings_acknowledged || stuck {
                report.stored = Some(n);
                report.stored_after_seconds = (n >= report.readings_acknowledged)
                    .then(|| published_at.elapsed().as_secs_f64());
                report.lost = Some(report.readings_acknowledged.saturating_sub(n));
                return Ok(());
            }
            if last.is_none_or(|(m, _)| m != n) {
                last = Some((n, Instant::now()));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// How long the stored count may stand still before the readings not yet
/// stored are reported as lost.
const STORE_PATIENCE: Duration = Duration::from_secs(30);

/// Polls for the row probes' rows every [`ROW_POLL`], adding each latency
/// to `samples`; returns how many never appeared.
async fn poll_rows(
    client: tokio_postgres::Client,
    mut rx: mpsc::UnboundedReceiver<RowProbe>,
    samples: Arc<std::sync::Mutex<Vec<Duration>>>,
) -> u64 {
    let mut pending: Vec<RowProbe> = Vec::new();
    let mut unseen = 0u64;
    let mut open = true;
    let mut drained_at: Option<Instant> = None;
    let statement = "SELECT device_id, time FROM readings
        WHERE metric = 'heart_rate' AND component = ''
          AND (device_id, time) IN (SELECT * FROM unnest($1::text[], $2::timestamptz[]))";
    loop {
        while open {
            match rx.try_recv() {
                Ok(p) => pending.push(p),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    drained_at = Some(Instant::now());
                }
            }
        }
        if !open && (pending.is_empty() || drained_at.is_some_and(|t| t.elapsed() > PROBE_PATIENCE))
        {
            return unseen + pending.len() as u64;
        }
        if !pending.is_empty() {
            let asked = Instant::now();
            let ids: Vec<&str> = pending.iter().map(|p| p.device_id.as_str()).collect();
            let times: Vec<DateTime<Utc>> = pending.iter().map(|p| p.at).collect();
            match client.query(statement, &[&ids, &times]).await {
                Ok(rows) => {
                    let found: std::collections::HashSet<(String, DateTime<Utc>)> = rows
                        .iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, DateTime<Utc>>(1)))
                        .collect();
                    let mut got = Vec::new();
                    pending.retain(|p| {
                        if found.contains(&(p.device_id.clone(), p.at)) {
                            got.push(asked.saturating_duration_since(p.sent));
                            false
                        } else if p.sent.elapsed() > PROBE_PATIENCE {
                            unseen += 1;
                            false
                        } else {
                            true
                        }
                    });
                    if let Ok(mut s) = samples.lock() {
                        s.extend(got);
                    }
                }
                Err(e) => eprintln!("vitalwatch-sim: row probe query: {e}"),
            }
        }
        tokio::time::sleep(ROW_POLL).await;
    }
}

/// One alert probe patient.
#[derive(Debug, Default)]
struct ProbePatient {
    /// Probes sent to it.
    sent: u32,
    /// Its fever alert is open, as far as the probes know.
    open: bool,
    /// The change awaited, and when the reading that should make it was
    /// published.
    awaiting: Option<(&'static str, Instant)>,
    /// Awaited changes seen.
    seen: u32,
}

/// How long an alert probe may wait for its change.
const ALERT_PATIENCE: Duration = Duration::from_secs(30);

/// Sends thermometer probes every `alert_probe_interval` until `stop`,
/// and times the engine's raise or resolve of each from its publish;
/// returns (probes sent, probes whose change never came).
async fn alert_probes(
    load: Load,
    broker: Broker,
    url: String,
    samples: Arc<std::sync::Mutex<Vec<Duration>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(u64, u64), String> {
    let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("database: {e}"))?;
    let changed = Arc::new(tokio::sync::Notify::new());
    let on_notify = changed.clone();
    tokio::spawn(async move {
        // Drives the connection and passes its notifications on.
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if matches!(m, tokio_postgres::AsyncMessage::Notification(_)) {
                on_notify.notify_one();
            }
        }
    });
    client
        .batch_execute("LISTEN vitalwatch_alert_events")
        .await
        .map_err(|e| format!("LISTEN vitalwatch_alert_events: {e}"))?;
    let mut cursor: i64 = client
        .query_one("SELECT coalesce(max(id), 0) FROM alert_events", &[])
        .await
        .map_err(|e| format!("alert_events: {e}"))?
        .get(0);
    let floor = cursor;
    let ids: Vec<String> = (0..load.alert_probes)
        .map(|i| load.probe_patient_id(i))
        .collect();
    let publisher = Publisher::persistent(&broker, format!("{}-load-probes", load.prefix), 20, 100);
    let mut patients: Vec<ProbePatient> = ids.iter().map(|_| ProbePatient::default()).collect();
    let mut seen_ids = std::collections::HashSet::new();
    let (mut sent, mut unseen, mut next) = (0u64, 0u64, 0usize);
    let mut probe_tick = tokio::time::interval(load.alert_probe_interval);
    let mut fallback = tokio::time::interval(Duration::from_millis(250));
    let mut stopping: Option<Instant> = None;
    let prefix = format!("{}-alert", load.prefix);
    let timed_from = Instant::now() + load.warmup;
    loop {
        let woke = tokio::select! {
            _ = probe_tick.tick(), if stopping.is_none() => {
                // The next patient not waiting for a change.
                let Some(i) = (0..patients.len())
                    .map(|k| (next + k) % patients.len())
                    .find(|&i| patients[i].awaiting.is_none())
                else {
                    continue;
                };
                next = i + 1;
                let p = &mut patients[i];
                // A patient's first probe is normal: it resolves whatever an
                // earlier run left open, and awaits nothing.
                let (celsius, awaiting) = match (p.sent, p.open) {
                    (0, _) => (36.8, None),
                    (_, false) => (39.0, Some("raised")),
                    (_, true) => (36.8, Some("resolved")),
                };
                p.sent += 1;
                let at = Utc::now();
                let at = DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at);
                let payload = thermometer(&load.probe_device_id(i), p.sent.into(), at, celsius, load.format);
                let topic = topics::mqtt_readings_topic(&broker.topic_root, &load.probe_device_id(i));
                p.awaiting = awaiting.map(|a| (a, Instant::now()));
                if publisher.client.publish(topic, QoS::AtLeastOnce, false, payload).await.is_err() {
                    return Err("the alert probes' MQTT client stopped".into());
                }
                sent += 1;
                continue;
            }
            () = changed.notified() => Instant::now(),
            _ = fallback.tick() => Instant::now(),
            _ = stop.changed(), if stopping.is_none() => {
                stopping = Some(Instant::now());
                continue;
            }
        };
        // Commit order can differ from id order: look a little behind the
        // cursor, never at what was there before the probes began.
        let rows = client
            .query(
                "SELECT e.id, a.patient_id, e.state FROM alert_events e JOIN alerts a USING (alert_id)
                  WHERE e.id > $1 AND a.rule = 'fever' AND starts_with(a.patient_id, $2)
                  ORDER BY e.id",
                &[&(cursor - 1000).max(floor), &prefix],
            )
            .await
            .map_err(|e| format!("alert_events: {e}"))?;
        for r in rows {
            let id: i64 = r.get(0);
            cursor = cursor.max(id);
            if !seen_ids.insert(id) {
                continue;
            }
            let (patient, state): (String, String) = (r.get(1), r.get(2));
            let Some(i) = ids.iter().position(|x| *x == patient) else {
                continue;
            };
            let p = &mut patients[i];
            match state.as_str() {
                "raised" => p.open = true,
                "resolved" => p.open = false,
                _ => continue,
            }
            if let Some((_, at)) = p.awaiting.filter(|(want, _)| *want == state) {
                p.awaiting = None;
                p.seen += 1;
                if p.seen > ALERT_WARMUP
                    && at >= timed_from
                    && let Ok(mut s) = samples.lock()
                {
                    s.push(woke.saturating_duration_since(at));
                }
            }
        }
        for p in patients.iter_mut() {
            if let Some((_, at)) = p.awaiting.filter(|(_, at)| at.elapsed() > ALERT_PATIENCE) {
                p.awaiting = None;
                p.sent = 0; // start again from a normal reading
                if at >= timed_from {
                    unseen += 1;
                }
            }
        }
        if let Some(since) = stopping {
            let settled = patients.iter().all(|p| p.awaiting.is_none());
            if settled || since.elapsed() > ALERT_PATIENCE {
                unseen += patients.iter().filter(|p| p.awaiting.is_some()).count() as u64;
                publisher.finish(sent, Duration::from_secs(5)).await;
                return Ok((sent, unseen));
            }
        }
    }
}

/// One body-temperature reading.
fn thermometer(
    device_id: &str,
    seq: u64,
    at: DateTime<Utc>,
    celsius: f64,
    format: Format,
) -> Vec<u8> {
    match format {
        Format::Json => serde_json::json!({"device_id": device_id, "seq": seq, "readings": [
            {"metric": "body_temperature", "value": celsius, "unit": "Cel",
             "measured_at": at.to_rfc3339_opts(SecondsFormat::Millis, true)}]})
        .to_string()
        .into_bytes(),
        Format::Protobuf => proto::ReadingBatch {
            device_id: device_id.into(),
            seq: Some(seq),
            readings: vec![proto::Reading {
                metric: proto::Metric::BodyTemperature as i32,
                value: celsius,
                unit: "Cel".into(),
                measured_at: Some(prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: at.timestamp_subsec_nanos() as i32,
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitalwatch_core::payload::{PayloadFormat, decode};
    use vitalwatch_core::validate::{TimePolicy, validate};

    #[test]
    fn uploads_decode_validate_and_never_measure_the_same_instant_twice() {
        let load = Load {
            devices: 30,
            rate: 600.0,
            batch: 6,
            ..Load::default()
        };
        load.check().expect("valid");
        assert_eq!(load.interval_ms(), 300);
        let now = Utc::now().timestamp_millis();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut cohort = load.cohort("rpm/v1/devices");
        for (i, d) in cohort.iter_mut().enumerate() {
            let mut last: Option<DateTime<Utc>> = None;
            for round in 0..5u64 {
                let newest = now - 10_000 + (round * load.interval_ms() + d.phase_ms) as i64;
                let times = load.instants(newest);
                assert_eq!(times.len(), 3);
                assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
                assert!(last.is_none_or(|l| l < times[0]), "uploads do not overlap");
                last = times.last().copied();
                let format = if i % 2 == 0 {
                    Format::Json
                } else {
                    Format::Protobuf
                };
                let bytes = encode(d, round + 1, &times, &mut rng, format);
                let batch = decode(&bytes, PayloadFormat::detect(false, &bytes)).expect("decodes");
                assert_eq!(batch.device_id.as_deref(), Some(d.id.as_str()));
                assert_eq!(batch.readings.len(), load.batch);
                for r in &batch.readings {
                    validate(r, Utc::now(), &TimePolicy::default()).expect("a valid reading");
                }
            }
        }
        let csv = load.registry_csv();
        assert_eq!(csv.lines().filter(|l| l.ends_with(",wearable")).count(), 30);
        assert_eq!(
            csv.lines().filter(|l| l.ends_with(",thermometer")).count(),
            4
        );
    }

    #[test]
    fn load_refuses_what_cannot_run() {
        let ok = Load::default();
        ok.check().expect("the defaults run");
        for (bad, why) in [
            (
                Load {
                    batch: 3,
                    ..ok.clone()
                },
                "odd batch",
            ),
            (
                Load {
                    devices: 0,
                    ..ok.clone()
                },
                "no devices",
            ),
            (
                Load {
                    rate: f64::NAN,
                    ..ok.clone()
                },
                "NaN rate",
            ),
            (
                Load {
                    connections: Some(0),
                    ..ok.clone()
                },
                "no connections",
            ),
            (
                Load {
                    storm_share: 1.5,
                    ..ok.clone()
                },
                "share above 1",
            ),
            (
                Load {
                    prefix: "a/b".into(),
                    ..ok.clone()
                },
                "a topic separator in ids",
            ),
            // 10 devices × 10 readings at 1,000,000/s: a measurement every 0.5 µs.
            (
                Load {
                    devices: 10,
                    rate: 1_000_000.0,
                    ..ok.clone()
                },
                "sub-millisecond spacing",
            ),
        ] {
            assert!(bad.check().is_err(), "{why}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(Percentiles::of(&[]), None);
        let ms: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        let p = Percentiles::of(&ms).expect("some");
        assert_eq!(
            (p.samples, p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms),
            (1000, 500.0, 990.0, 999.0, 1000.0)
        );
        let one = Percentiles::of(&[Duration::from_millis(7)]).expect("one");
        assert_eq!((one.p50_ms, one.p999_ms), (7.0, 7.0));
    }
}
