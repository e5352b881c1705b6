//! Publishing a plan's batches over MQTT (QoS 1) through one gateway
//! connection, in real time or accelerated, and reading back what the
//! pipeline raised.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use vitalwatch_core::topics;

use crate::generate::{Plan, SendKind};
use crate::score::Alert;

/// Where and as whom to publish.
#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// A gateway account allowed to publish for every device of the cohort.
    pub username: Option<String>,
    pub password: String,
    /// Root of device topics.
    pub topic_root: String,
}

impl Broker {
    /// The local stack's gateway account (`sim-gateway` in
    /// `deploy/local/mosquitto.users`), allowed to publish for every device.
    pub fn local_gateway(host: String, port: u16, password: String, topic_root: String) -> Broker {
        Broker {
            host,
            port,
            username: Some("sim-gateway".into()),
            password,
            topic_root,
        }
    }
}

/// An MQTT connection publishing at QoS 1, counting the broker's
/// acknowledgements; it reconnects on errors.
#[derive(Debug)]
pub struct Publisher {
    pub client: AsyncClient,
    link: Arc<Link>,
    events: tokio::task::JoinHandle<()>,
}

/// What a connection's event loop shares with its owner.
#[derive(Debug, Default)]
struct Link {
    acked: AtomicU64,
    /// CONNACKs received: 1 after the first connect, more after reconnects.
    connects: AtomicU64,
    up: AtomicBool,
    sever: tokio::sync::Notify,
}

impl Publisher {
    /// Connects as `client_id`, with at most `inflight` unacknowledged
    /// publishes and `capacity` requests queued before `publish` waits.
    /// A clean session: publishes in flight when the link breaks are not
    /// sent again.
    pub fn connect(
        broker: &Broker,
        client_id: String,
        inflight: u16,
        capacity: usize,
    ) -> Publisher {
        Self::open(broker, client_id, inflight, capacity, true)
    }

    /// As [`Publisher::connect`], but with a persistent session (clean
    /// session off), as a device that keeps a reading until the broker
    /// acknowledges it: after a reconnect, what was in flight is sent again.
    /// The broker keeps the session after the run (Mosquitto until
    /// `persistent_client_expiration`).
    pub fn persistent(
        broker: &Broker,
        client_id: String,
        inflight: u16,
        capacity: usize,
    ) -> Publisher {
        Self::open(broker, client_id, inflight, capacity, false)
    }

    fn open(
        broker: &Broker,
        client_id: String,
        inflight: u16,
        capacity: usize,
        clean: bool,
    ) -> Publisher {
        let mut opts = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(inflight)
            .set_clean_session(clean)
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some(user) = &broker.username {
            opts.set_credentials(user.clone(), broker.password.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(opts, capacity);
        let link = Arc::new(Link::default());
        let shared = link.clone();
        let events = tokio::spawn(async move {
            loop {
                let polled = tokio::select! {
                    polled = eventloop.poll() => polled,
                    () = shared.sever.notified() => {
                        // The link drops without a DISCONNECT, as when a
                        // network fails; the next poll connects again.
                        eventloop.clean();
                        shared.up.store(false, Ordering::Relaxed);
                        continue;
                    }
                };
                match polled {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        shared.connects.fetch_add(1, Ordering::Relaxed);
                        shared.up.store(true, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        if shared.up.swap(false, Ordering::Relaxed) {
                            eprintln!("vitalwatch-sim: mqtt: {e}; reconnecting");
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Publisher {
            client,
            link,
            events,
        }
    }

    /// Whether the connection is up.
    pub fn is_up(&self) -> bool {
        self.link.up.load(Ordering::Relaxed)
    }

    /// Times the connection has been (re)established.
    pub fn connects(&self) -> u64 {
        self.link.connects.load(Ordering::Relaxed)
    }

    /// Drops the connection at once, without a DISCONNECT; it reconnects
    /// straight away.
    pub fn sever(&self) {
        self.link.sever.notify_one();
    }

    /// Publishes the broker has acknowledged so far.
    pub fn acknowledged(&self) -> u64 {
        self.link.acked.load(Ordering::Relaxed)
    }

    /// Waits up to `patience` for `published` acknowledgements, then
    /// disconnects; returns how many came.
    pub async fn finish(self, published: u64, patience: Duration) -> u64 {
        let deadline = Instant::now() + patience;
        while self.acknowledged() < published && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let link = self.link.clone();
        self.close().await; // acknowledgements still coming count too
        link.acked.load(Ordering::Relaxed)
    }

    /// Disconnects at once, without waiting for acknowledgements.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.events).await;
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replayed {
    pub published: u64,
    pub acknowledged: u64,
    pub readings: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub backlogs: u64,
    pub unknown: u64,
    pub seconds: f64,
}

/// How fast a replay publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as the broker acknowledges.
    Fast,
    /// Scenario seconds per wall second from the start of the replay
    /// (1: real time, shifted to begin now).
    Speed(f64),
    /// Each batch when the wall clock reaches its own send time; batches
    /// already due go at once. A plan starting now, or a little before,
    /// runs live.
    WallClock,
}

/// Publishes every batch of `plan` at `pace`. `progress` is called every
/// few seconds with the counts so far.
pub async fn replay(
    plan: &Plan,
    broker: &Broker,
    pace: Pace,
    mut progress: impl FnMut(&Replayed),
) -> Result<Replayed, String> {
    let publisher = Publisher::connect(
        broker,
        format!("{}-replay-{}", plan.scenario.prefix, std::process::id()),
        500,
        1000,
    );
    let started = Instant::now();
    let mut out = Replayed::default();
    let mut reported = Instant::now();
    for send in plan.sends() {
        let wait = match pace {
            Pace::Fast => 0.0,
            Pace::Speed(speed) => {
                let due = (send.at - plan.start).num_milliseconds().max(0) as f64 / 1000.0 / speed;
                due - started.elapsed().as_secs_f64()
            }
            Pace::WallClock => (send.at - chrono::Utc::now()).num_milliseconds() as f64 / 1000.0,
        };
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let topic = topics::mqtt_readings_topic(&broker.topic_root, &send.device_id);
        publisher
            .client
            .publish(topic, QoS::AtLeastOnce, false, send.payload)
            .await
            .map_err(|e| format!("publish: {e}"))?;
        out.published += 1;
        out.readings += send.readings.len() as u64;
        match send.kind {
            SendKind::Duplicate => out.duplicates += 1,
            SendKind::Malformed => out.malformed += 1,
            SendKind::Backlog => out.backlogs += 1,
            SendKind::Unknown => out.unknown += 1,
            SendKind::Normal => {}
        }
        if reported.elapsed() >= Duration::from_secs(5) {
            out.acknowledged = publisher.acknowledged();
            out.seconds = started.elapsed().as_secs_f64();
            progress(&out);
            reported = Instant::now();
        }
    }
    out.acknowledged = publisher
        .finish(out.published, Duration::from_secs(60))
        .await;
    out.seconds = started.elapsed().as_secs_f64();
    if out.acknowledged < out.published {
        return Err(format!(
            "{} of {} publishes were not acknowledged by the broker",
            out.published - out.acknowledged,
            out.published
        ));
    }
    Ok(out)
}

/// The alerts the pipeline raised for the cohort (patients `{prefix}-p…`).
pub async fn pipeline_alerts(
    client: &tokio_postgres::Client,
    prefix: &str,
) -> Result<Vec<Alert>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT patient_id, rule, raised_at FROM alerts
              WHERE starts_with(patient_id, $1) ORDER BY raised_at, alert_id",
            &[&format!("{prefix}-p")],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Alert {
            patient_id: r.get(0),
            rule: r.get(1),
            raised_at: r.get(2),
        })
        .collect())
}

/// The cohort's readings as the pipeline stored them, for the naive
/// baseline: `(measured at, patient, metric or component, value)`, flagged
/// readings included (a bedside device with limits does not know better).
pub async fn stored_readings(
    client: &tokio_postgres::Client,
    prefix: &str,
) -> Result<Vec<(chrono::DateTime<chrono::Utc>, String, &'static str, f64)>, tokio_postgres::Error>
{
    let rows = client
        .query(
            "SELECT time, patient_id, CASE WHEN component = '' THEN metric ELSE component END, value
               FROM readings WHERE starts_with(patient_id, $1)
                AND metric IN ('spo2', 'heart_rate', 'blood_pressure', 'respiratory_rate', 'body_temperature')",
            &[&format!("{prefix}-p")],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let what: String = r.get(2);
            let what: &'static str = match what.as_str() {
                "spo2" => "spo2",
                "heart_rate" => "heart_rate",
                "systolic" => "systolic",
                "diastolic" => "diastolic",
                "respiratory_rate" => "respiratory_rate",
                "body_temperature" => "body_temperature",
                _ => return None,
            };
            Some((r.get(0), r.get(1), what, r.get(3)))
        })
        .collect())
}
