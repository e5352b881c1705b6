//! Signed webhooks: every alert change POSTed, in order, to each configured
//! endpoint (a paging system, a nurse-call integration), retried with
//! backoff until the endpoint takes it, every attempt in
//! `webhook_deliveries`.
//!
//! ```toml
//! [[alerts.webhooks]]
//! name = "pager"                       # in the delivery log
//! url = "https://pager.example.org/vitalwatch"
//! secret = "…"                         # HMAC-SHA256 key, 32 bytes or more
//! care_team = "ward-3"                 # optional: only these patients' alerts
//! ```
//!
//! The body is the change as JSON (the same object the API streams). Headers:
//! `X-Vitalwatch-Event-Id`, `X-Vitalwatch-Timestamp` (Unix seconds) and
//! `X-Vitalwatch-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
//! A receiver checks the signature, refuses old timestamps (replays), and
//! skips an event id it has handled: delivery is at least once (a crash
//! between the endpoint's 2xx and recording it sends that change again).
//!
//! One instance delivers to an endpoint at a time (a session advisory lock
//! on a connection of its own); its cursor (`webhook_cursors`) starts at the
//! newest change when the endpoint is first configured. An endpoint that
//! keeps failing holds back only its own queue.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use vitalwatch_store::tokio_postgres::Client;
use vitalwatch_store::{DatabaseConfig, StoreError};

/// One `[[alerts.webhooks]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The endpoint's name in the delivery log; unique.
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// HMAC-SHA256 key the receiver shares; 32 bytes or more.
    pub secret: String,
    /// Only the alerts of this care team's patients; every alert when absent.
    pub care_team: Option<String>,
    /// Per attempt, in milliseconds. Default 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5000
}

impl WebhookConfig {
    /// Checks the entry; `Err` names it and says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |why: &str| Err(format!("alerts webhook {:?}: {why}", self.name));
        if self.name.is_empty() || self.name.len() > 64 {
            return fail("a name is 1 to 64 characters");
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return fail("the url must start with http:// or https://");
        }
        if self.secret.len() < 32 {
            return fail("the secret must be at least 32 bytes");
        }
        if self.timeout_ms == 0 {
            return fail("timeout_ms must be positive");
        }
        Ok(())
    }
}

/// The signature header's value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

/// Delivers to `hook` until `shutdown`: waits to hold the endpoint's lock,
/// then sends every change after its cursor, woken by `wake`.
pub async fn deliver(
    hook: WebhookConfig,
    db: DatabaseConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_millis(hook.timeout_ms))
        // A redirect is an answer to fix, not to follow (a 302 to a page
        // that answers 200 is not a delivery).
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(webhook = %hook.name, error = %e, "cannot build the webhook HTTP client");
            return;
        }
    };
    while !shutdown.is_cancelled() {
        match run_as_leader(&hook, &db, &http, &wake, &shutdown).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(webhook = %hook.name, error = %e, "webhook delivery interrupted; retrying")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// Key of the endpoint's advisory lock.
fn lock_key(name: &str) -> i64 {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("vitalwatch.webhook.{name}").as_bytes(),
    );
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    i64::from_be_bytes(b)
}

async fn run_as_leader(
    hook: &WebhookConfig,
    db: &DatabaseConfig,
    http: &reqwest::Client,
    wake: &Notify,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    // A connection of its own: the session lock lives as long as it does.
    let client = vitalwatch_store::connect(&db.url).await?;
    let held: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(&hook.name)])
        .await?
        .get(0);
    if !held {
        return Ok(()); // another instance delivers to this endpoint
    }
    // The client is not a pool's: sequence with a transaction of its own.
    let mut client = client;
    client
        .execute(
            "INSERT INTO webhook_cursors (endpoint, last_seq)
             SELECT $1, coalesce(max(seq), 0) FROM alert_events ON CONFLICT DO NOTHING",
            &[&hook.name],
        )
        .await?;
    tracing::info!(webhook = %hook.name, "delivering alert changes");
    loop {
        vitalwatch_store::alerts::sequence(&mut client).await?;
        let cursor: i64 = client
            .query_one(
                "SELECT last_seq FROM webhook_cursors WHERE endpoint = $1",
                &[&hook.name],
            )
            .await?
            .get(0);
        let patients = match &hook.care_team {
            Some(team) => Some(
                client
                    .query(
                        "SELECT patient_id FROM care_team_patients WHERE team_id = $1",
                        &[team],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect::<Vec<String>>(),
            ),
            None => None,
        };
        // Everything up to `upto` is committed and sequenced: a page short
        // of the limit means nothing else of ours is before it.
        let upto = vitalwatch_store::alerts::last_seq(&client).await?;
        let events = vitalwatch_store::alerts::events_between(
            &client,
            cursor,
            upto,
            patients.as_deref(),
            PAGE,
        )
        .await?;
        let full = events.len() as i64 == PAGE;
        for e in events {
            let body =
                serde_json::to_vec(&e).map_err(|err| StoreError::Invalid(err.to_string()))?;
            if !send(hook, http, &client, e.id, &body, shutdown).await? {
                return Ok(()); // shutting down: the cursor stays before this change
            }
            advance(&client, &hook.name, e.seq).await?;
        }
        if full {
            continue;
        }
        if upto > cursor {
            advance(&client, &hook.name, upto).await?;
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Changes read per query.
const PAGE: i64 = 100;

async fn advance(client: &Client, endpoint: &str, seq: i64) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE webhook_cursors SET last_seq = greatest(last_seq, $2) WHERE endpoint = $1",
            &[&endpoint, &seq],
        )
        .await?;
    Ok(())
}

/// Sends one change until the endpoint answers 2xx or refuses it for good
/// (`true`: move on), or `shutdown` fires (`false`), logging every attempt.
async fn send(
    hook: &WebhookConfig,
    http: &reqwest::Client,
    client: &Client,
    event_id: i64,
    body: &[u8],
    shutdown: &CancellationToken,
) -> Result<bool, StoreError> {
    let mut backoff = Duration::from_secs(1);
    for attempt in 1_i32.. {
        let timestamp = chrono::Utc::now().timestamp();
        let request = http
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("x-vitalwatch-event-id", event_id.to_string())
            .header("x-vitalwatch-timestamp", timestamp.to_string())
            .header(
                "x-vitalwatch-signature",
                signature(&hook.secret, timestamp, body),
            )
            .body(body.to_vec())
            .send();
        let result = tokio::select! {
            r = request => r,
            () = shutdown.cancelled() => return Ok(false),
        };
        let (mut outcome, status, error) = match &result {
            Ok(r) if r.status().is_success() => {
                ("delivered", Some(i32::from(r.status().as_u16())), None)
            }
            Ok(r) => ("failed", Some(i32::from(r.status().as_u16())), None),
            Err(e) => ("failed", None, Some(e.to_string())),
        };
        // Refused for good (a client error other than timeout or rate
        // limit, three times over): skip this change rather than hold back
        // every later one; the log says so.
        if outcome == "failed"
            && attempt >= 3
            && status.is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429)
        {
            outcome = "abandoned";
        }
        client
            .execute(
                "INSERT INTO webhook_deliveries (endpoint, event_id, attempt, outcome, http_status, error)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&hook.name, &event_id, &attempt, &outcome, &status, &error],
            )
            .await?;
        metrics::counter!("vitalwatch_alerts_webhook_attempts_total", "webhook" => hook.name.clone(), "outcome" => outcome).increment(1);
        if outcome == "delivered" {
            return Ok(true);
        }
        if outcome == "abandoned" {
            tracing::error!(webhook = %hook.name, event_id, status = ?status, "the endpoint refuses this change; skipped, see webhook_deliveries");
            return Ok(true);
        }
        tracing::warn!(webhook = %hook.name, event_id, attempt, status = ?status, error = ?error, retry_in_s = backoff.as_secs(), "webhook delivery failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return Ok(false),
        }
        backoff = (backoff * 2).min(Duration::from_secs(300));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Known answer computed independently, with Python:
        // hmac.new(b"k" * 32, b"1800000000.{}", hashlib.sha256).hexdigest()
        let sig = signature(&"k".repeat(32), 1_800_000_000, b"{}");
        assert_eq!(
            sig,
            "v1=724b379a5efd76c30d6bed85a07a8e2b9b8b6ef15e94c73b8f67d4ed35412105"
        );
        assert_ne!(
            sig,
            signature(&"k".repeat(32), 1_800_000_001, b"{}"),
            "the timestamp is signed"
        );
        assert_ne!(sig, signature(&"j".repeat(32), 1_800_000_000, b"{}"));
    }

    #[test]
    fn entries_are_checked() {
        let ok = WebhookConfig {
            name: "pager".into(),
            url: "https://pager.example.org/hook".into(),
            secret: "s".repeat(32),
            care_team: None,
            timeout_ms: 5000,
        };
        assert!(ok.validate().is_ok());
        assert!(
            WebhookConfig {
                url: "ftp://x".into(),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            WebhookConfig {
                secret: "short".into(),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            WebhookConfig {
                name: String::new(),
                ..ok
            }
            .validate()
            .is_err()
        );
    }
}
