//! api: what care teams' dashboards read.
//!
//! - `GET /v1/patients/{patient_id}/vitals?metric=&from=&to=&bucket=`:
//!   bucketed min/avg/max/count of one metric ([`vitals`]).
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
//! **Not yet here** (a later issue): authentication, care-team scoping and
//! the audit log. Until then the API listens on 127.0.0.1 only by default and
//! must not be exposed beyond the machine.
#![forbid(unsafe_code)]

pub mod error;
pub mod telemetry;
pub mod vitals;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
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
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_buckets: 10_000,
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
        }
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
}

/// Serves the API until `shutdown` fires, then finishes in-flight requests.
pub async fn run(
    cfg: &ApiConfig,
    db: &vitalwatch_store::DatabaseConfig,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let state = AppState::new(
        vitalwatch_store::pool(db)?,
        metrics,
        cfg.max_buckets,
        readiness,
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    tracing::info!(addr = %cfg.listen, "api listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    tracing::info!("api stopped");
    Ok(())
}
