//! api: what care teams' dashboards read.
//!
//! - `GET /v1/patients/{patient_id}/vitals?metric=&from=&to=&bucket=`:
//!   bucketed min/avg/max/count of one metric ([`vitals`]), and
//!   `GET /v1/patients/{patient_id}/latest`: the newest reading of every
//!   metric; `GET /v1/patients/{patient_id}/monitoring-days`: days with
//!   device data in a period and the RPM code they support; all for the
//!   patient's care team.
//! - Alerts ([`alerts`]), for the nurses and clinicians of the patient's
//!   care team, authenticated by bearer token ([`auth`]) and audited
//!   ([`audit`]): `GET /v1/alerts` (a filtered, paged list),
//!   `GET /v1/alerts/stream` (server-sent events),
//!   `GET /v1/alerts/{alert_id}`, `POST /v1/alerts/{alert_id}/acknowledge`
//!   and `POST /v1/alerts/{alert_id}/resolve`.
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: every readiness condition of the process holds and the
//!   database answers with the schema this build expects; 503 otherwise, with
//!   each condition's state.
//! - `GET /metrics`: Prometheus text of every vitalwatch metric in the process.
//!
//! [`app`] builds the router apart from any socket, so tests call it with
//! `oneshot`. [`error::ApiError`] is the one error type: a problem-details
//! body for the client, details only in the log.
//!
//! Every route with patient data authenticates the caller by bearer token,
//! allows the nurses and clinicians of the patient's care teams only, and
//! audits the attempt ([`auth::carer`], [`auth::Caller::can_see`], [`audit`]).
//!
//! **Not yet here** (issue 6): registry, thresholds and audit endpoints,
//! FHIR, OpenAPI, key sets from a JWKS URL, TLS. Until then the API listens
//! on 127.0.0.1 only by default.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod audit;
pub mod auth;
pub mod error;
pub mod telemetry;
pub mod vitals;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use vitalwatch_core::health::Readiness;
use vitalwatch_store::Pool;
use vitalwatch_store::storage::Layout;

/// `[api]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Most buckets one trend request may ask for. Default 10,000.
    pub max_buckets: i64,
    /// `[api.auth]`: how bearer tokens are checked.
    pub auth: auth::AuthConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_buckets: 10_000,
            auth: auth::AuthConfig::default(),
        }
    }
}

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Database connections for queries.
    pub pool: Pool,
    /// Renders the process's metrics for `/metrics`.
    pub metrics: PrometheusHandle,
    /// Bound on the size of a trend response.
    pub max_buckets: i64,
    /// The readiness conditions of every service in the process.
    pub readiness: Readiness,
    /// How `readings` is stored, read from the database at first use.
    pub layout: Arc<tokio::sync::OnceCell<Layout>>,
    /// Checks bearer tokens.
    pub auth: Arc<auth::Authenticator>,
    /// Where to LISTEN for new alert changes (the database URL); without
    /// it, alert streams poll.
    pub listen_url: Option<String>,
    /// Bumped on every notified alert change, once a stream needs it.
    alert_feed: Arc<std::sync::OnceLock<tokio::sync::watch::Receiver<u64>>>,
    /// Fires when the server shuts down: long-lived streams end.
    pub shutdown: CancellationToken,
}

impl AppState {
    pub fn new(
        pool: Pool,
        metrics: PrometheusHandle,
        max_buckets: i64,
        readiness: Readiness,
    ) -> Self {
        AppState {
            pool,
            metrics,
            max_buckets,
            readiness,
            layout: Arc::default(),
            auth: Arc::new(auth::Authenticator::unconfigured()),
            listen_url: None,
            alert_feed: Arc::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// With bearer tokens checked by `auth`.
    pub fn with_auth(mut self, auth: auth::Authenticator) -> Self {
        self.auth = Arc::new(auth);
        self
    }

    /// With alert streams woken by notifications from the database at `url`.
    pub fn with_listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }

    /// With long-lived streams ending when `shutdown` fires.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// A receiver that changes on every new alert change, when the state
    /// has a listen URL (one listener for the process, started on first use).
    pub fn alert_feed(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        let url = self.listen_url.clone()?;
        let rx = self.alert_feed.get_or_init(|| {
            let (tx, rx) = tokio::sync::watch::channel(0_u64);
            tokio::spawn(vitalwatch_store::listen(
                url,
                "vitalwatch_alert_events",
                move || tx.send_modify(|n| *n = n.wrapping_add(1)),
                self.shutdown.clone(),
            ));
            rx
        });
        Some(rx.clone())
    }

    /// The storage layout (TimescaleDB or native).
    pub async fn layout(
        &self,
        client: &vitalwatch_store::tokio_postgres::Client,
    ) -> Result<Layout, vitalwatch_store::StoreError> {
        self.layout
            .get_or_try_init(|| vitalwatch_store::storage::layout(client))
            .await
            .copied()
    }
}

/// The router, without a socket.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .route("/readyz", get(readyz))
        .route("/v1/patients/{patient_id}/vitals", get(vitals::get_vitals))
        .route("/v1/patients/{patient_id}/latest", get(vitals::get_latest))
        .route(
            "/v1/patients/{patient_id}/monitoring-days",
            get(vitals::get_monitoring_days),
        )
        .route("/v1/alerts", get(alerts::list))
        .route("/v1/alerts/stream", get(alerts::stream))
        .route("/v1/alerts/{alert_id}", get(alerts::get_alert))
        .route(
            "/v1/alerts/{alert_id}/acknowledge",
            post(alerts::acknowledge),
        )
        .route("/v1/alerts/{alert_id}/resolve", post(alerts::resolve))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let db = match state.pool.get().await {
        Ok(client) => match vitalwatch_store::migrate::current_version(&client).await {
            Ok(v) if v >= vitalwatch_store::migrate::latest_version() => None,
            Ok(v) => Some(format!(
                "database schema is at version {v}, this build needs {}",
                vitalwatch_store::migrate::latest_version()
            )),
            Err(e) => Some(format!("database query failed: {e}")),
        },
        Err(e) => Some(format!("database unreachable: {e}")),
    };
    state.readiness.set("api.database", db);
    let (ready, checks) = state.readiness.report();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.map_or(
                    serde_json::Value::String("ok".into()),
                    serde_json::Value::String,
                ),
            )
        })
        .collect();
    (
        status,
        Json(serde_json::json!({ "ready": ready, "checks": checks })),
    )
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] vitalwatch_store::StoreError),
    #[error("{0}")]
    Config(String),
}

/// Serves the API until `shutdown` fires, then finishes in-flight requests.
pub async fn run(
    cfg: &ApiConfig,
    db: &vitalwatch_store::DatabaseConfig,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let auth = auth::Authenticator::new(&cfg.auth).map_err(ServeError::Config)?;
    let state = AppState::new(
        vitalwatch_store::pool(db)?,
        metrics,
        cfg.max_buckets,
        readiness,
    )
    .with_auth(auth)
    .with_listen_url(db.url.clone())
    .with_shutdown(shutdown.clone());
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    tracing::info!(addr = %cfg.listen, "api listening");
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await?;
    tracing::info!("api stopped");
    Ok(())
}
