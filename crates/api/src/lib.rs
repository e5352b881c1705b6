//! api: what care teams' dashboards read.
//!
//! - `GET /v1/patients/{patient_id}/vitals?metric=&from=&to=&bucket=`:
//!   bucketed min/avg/max/count of one metric ([`vitals`]).
//! - `GET /healthz`: the process is alive.
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

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use vitalwatch_store::Pool;

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
        ApiConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), max_buckets: 10_000 }
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
}

/// The router, without a socket.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .route("/v1/patients/{patient_id}/vitals", get(vitals::get_vitals))
        .with_state(state)
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
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
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let state = AppState { pool: vitalwatch_store::pool(db)?, metrics, max_buckets: cfg.max_buckets };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: cfg.listen, source })?;
    tracing::info!(addr = %cfg.listen, "api listening");
    axum::serve(listener, app(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    tracing::info!("api stopped");
    Ok(())
}
