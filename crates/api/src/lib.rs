//! api: what care teams' dashboards and hospital systems read.
//!
//! - [`vitals`]: bucketed trends, latest vitals, monitoring days.
//! - [`alerts`]: the filtered list, the SSE stream, one alert with its
//!   history, acknowledge, resolve.
//! - [`thresholds`]: a patient's rules, overrides set and cleared.
//! - [`registry`]: patients, devices and their assignments, care teams,
//!   members and panels (admins, device admins).
//! - [`fhir`]: FHIR R4 Observations (search, read) and the CapabilityStatement.
//! - [`audit`]: the audit log, written for every attempt on patient data or
//!   the registry, and read by admins (`GET /v1/audit`).
//! - [`auth`]: bearer tokens (a configured key or a JWKS URL), roles, the
//!   care-team scope.
//! - `GET /healthz`, `GET /readyz` (every readiness condition of the process
//!   and the database's schema), `GET /metrics` (Prometheus),
//!   `GET /openapi.json` (this router's OpenAPI 3.1 document).
//!
//! [`app`] builds the router apart from any socket, so tests call it with
//! `oneshot`; each route is registered with its `#[utoipa::path]`, so the
//! document lists exactly what is served. [`error::ApiError`] is the one
//! error type: a problem-details body for the client, details only in the
//! log. [`run`] serves it over HTTP, or HTTPS with `[api.tls]`, with a body
//! limit and a request timeout, and drains in-flight requests on shutdown.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod audit;
pub mod auth;
pub mod error;
pub mod fhir;
pub mod registry;
pub mod telemetry;
pub mod thresholds;
pub mod vitals;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
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
    /// Largest request body accepted, in bytes. Default 65,536.
    pub max_body_bytes: usize,
    /// A request that has not started its response after this long is
    /// answered 503, in milliseconds. Default 30,000.
    pub request_timeout_ms: u64,
    /// The URL clients reach this API at (`https://rpm.example.org`), for
    /// the absolute URLs FHIR Bundles carry. Default: from the request's
    /// `Host`, over http.
    pub public_url: Option<String>,
    /// `[api.tls]`: serve HTTPS with this certificate. Without it the API
    /// speaks plain HTTP: put it behind a TLS-terminating proxy, or keep
    /// it on 127.0.0.1 (the default).
    pub tls: Option<TlsConfig>,
    /// `[api.auth]`: how bearer tokens are checked.
    pub auth: auth::AuthConfig,
}

/// `[api.tls]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM.
    pub cert_file: std::path::PathBuf,
    /// Its private key, PEM.
    pub key_file: std::path::PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_buckets: 10_000,
            max_body_bytes: 65_536,
            request_timeout_ms: 30_000,
            public_url: None,
            tls: None,
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
    /// Bounds on a request.
    pub limits: Limits,
    /// The alert rules as configured: what a patient's thresholds are, and
    /// what an override is checked against.
    pub rules: Arc<Vec<vitalwatch_alerts::rules::Rule>>,
    /// Where clients reach the API (`[api] public_url`).
    pub public_url: Option<String>,
    /// Served over TLS: links built from `Host` say https.
    pub https: bool,
    /// The OpenAPI document, rendered once by [`app`].
    openapi: Arc<std::sync::OnceLock<String>>,
}

/// Bounds on a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let d = ApiConfig::default();
        Limits {
            max_body_bytes: d.max_body_bytes,
            request_timeout: Duration::from_millis(d.request_timeout_ms),
        }
    }
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
            limits: Limits::default(),
            rules: Arc::new(
                vitalwatch_alerts::rules::compile(&vitalwatch_alerts::rules::default_rules())
                    .unwrap_or_default(),
            ),
            public_url: None,
            https: false,
            openapi: Arc::default(),
        }
    }

    /// With the URL clients reach the API at.
    pub fn with_public_url(mut self, url: Option<String>) -> Self {
        self.public_url = url;
        self
    }

    /// Served over TLS (`[api.tls]`).
    pub fn with_https(mut self, https: bool) -> Self {
        self.https = https;
        self
    }

    /// With the alert rules as configured.
    pub fn with_rules(mut self, rules: Vec<vitalwatch_alerts::rules::Rule>) -> Self {
        self.rules = Arc::new(rules);
        self
    }

    /// With these bounds on a request.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
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

/// The OpenAPI document's frame; every path in it comes from a handler's
/// own `#[utoipa::path]` through [`app`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "vitalwatch care-team API",
        description = "Vitals trends, alerts, FHIR R4 Observations and the registry, for care teams. \
Every route with patient data takes a bearer token (OIDC, JWT) and is audited; a patient \
who is not on one of the caller's care teams is answered as not found."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "vitals", description = "A patient's readings: trends, latest, monitoring days."),
        (name = "alerts", description = "Alerts for nurses: list, stream, lifecycle."),
        (name = "thresholds", description = "A patient's alert thresholds and their overrides."),
        (name = "registry", description = "Patients, devices, care teams: for admins and device admins."),
        (name = "fhir", description = "FHIR R4: readings as vital-signs Observations, for EHRs."),
        (name = "service", description = "Health, readiness, metrics and this document."),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The router and its OpenAPI document, without a socket. Every route is
/// registered together with its documentation (`routes!`), so the document
/// lists exactly what the router serves.
pub fn app(state: AppState) -> Router {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(render_metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(vitals::get_vitals))
        .routes(routes!(vitals::get_latest))
        .routes(routes!(vitals::get_monitoring_days))
        .routes(routes!(alerts::list))
        .routes(routes!(alerts::stream))
        .routes(routes!(alerts::get_alert))
        .routes(routes!(alerts::acknowledge))
        .routes(routes!(alerts::resolve))
        .routes(routes!(thresholds::get_thresholds))
        .routes(routes!(
            thresholds::set_override,
            thresholds::clear_override
        ))
        .routes(routes!(audit::list))
        .routes(routes!(fhir::metadata))
        .routes(routes!(fhir::search))
        .routes(routes!(fhir::read))
        .routes(routes!(registry::create_patient))
        .routes(routes!(registry::create_device))
        .routes(routes!(registry::get_device))
        .routes(routes!(registry::assign_device, registry::unassign_device))
        .routes(routes!(registry::create_team, registry::list_teams))
        .routes(routes!(registry::panel))
        .routes(routes!(registry::add_patient, registry::remove_patient))
        .routes(routes!(registry::add_member, registry::remove_member))
        .split_for_parts();
    let doc = serde_json::to_string(&doc).unwrap_or_else(|_| "{}".into());
    let _ = state.openapi.set(doc);
    let limits = state.limits;
    router
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(axum::middleware::from_fn(move |req, next| {
            limit_time(limits.request_timeout, req, next)
        }))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::map_response(error::as_problem))
        .with_state(state)
}

/// Answers a request that takes longer than `timeout` to start its response
/// with 503 (a stream's body, once started, is not cut).
async fn limit_time(
    timeout: Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than {} ms",
            timeout.as_millis()
        ))
        .into_response(),
    }
}

async fn no_route() -> ApiError {
    ApiError::NotFound("no such route: /openapi.json lists the routes".into())
}

async fn no_method() -> ApiError {
    ApiError::MethodNotAllowed(
        "this route does not take that method: /openapi.json lists the methods".into(),
    )
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "service", security(()),
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this server", body = Object)))]
async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.get().cloned().unwrap_or_default(),
    )
}

/// Readiness: each condition of the process and the database's schema.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ready {
    pub ready: bool,
    /// Each condition: `ok`, or why not.
    pub checks: std::collections::BTreeMap<String, String>,
}

/// Every readiness condition of the process holds and the database answers
/// with the schema this build expects; 503 otherwise, with each condition.
#[utoipa::path(get, path = "/readyz", tag = "service", security(()),
    responses(
        (status = 200, description = "Ready", body = Ready),
        (status = 503, description = "Not ready: the checks say why", body = Ready),
    ))]
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
    let checks = checks
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_else(|| "ok".into())))
        .collect();
    (status, Json(Ready { ready, checks }))
}

/// Prometheus text of every vitalwatch metric in the process.
#[utoipa::path(get, path = "/metrics", tag = "service", security(()),
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")))]
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
    rules: Vec<vitalwatch_alerts::rules::Rule>,
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
    .with_rules(rules)
    .with_public_url(cfg.public_url.clone())
    .with_https(cfg.tls.is_some())
    .with_listen_url(db.url.clone())
    .with_shutdown(shutdown.clone())
    .with_limits(Limits {
        max_body_bytes: cfg.max_body_bytes,
        request_timeout: Duration::from_millis(cfg.request_timeout_ms),
    });
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    if let Some(tls) = &cfg.tls {
        let rustls =
            axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert_file, &tls.key_file)
                .await
                .map_err(|e| {
                    ServeError::Config(format!(
                        "api.tls: cannot load {} and {}: {e}",
                        tls.cert_file.display(),
                        tls.key_file.display()
                    ))
                })?;
        let handle = axum_server::Handle::new();
        let stop = handle.clone();
        let grace = Duration::from_millis(cfg.request_timeout_ms);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.graceful_shutdown(Some(grace));
        });
        let std_listener =
            std::net::TcpListener::bind(cfg.listen).map_err(|source| ServeError::Bind {
                addr: cfg.listen,
                source,
            })?;
        std_listener.set_nonblocking(true)?;
        tracing::info!(addr = %cfg.listen, "api listening (https)");
        axum_server::from_tcp_rustls(std_listener, rustls)?
            .handle(handle)
            .serve(app)
            .await?;
    } else {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.listen,
                source,
            })?;
        tracing::info!(addr = %cfg.listen, "api listening");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
    }
    tracing::info!("api stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AppState {
        let db = vitalwatch_store::DatabaseConfig {
            url: "postgres://nobody@127.0.0.1:1/none".into(),
            ..Default::default()
        };
        AppState::new(
            vitalwatch_store::pool(&db).expect("a pool connects lazily"),
            telemetry::metrics_handle(),
            10_000,
            Readiness::new(),
        )
    }

    /// Every `$ref` in `v`.
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[tokio::test]
    async fn the_document_is_openapi_3_and_every_reference_resolves() {
        let doc: serde_json::Value = serde_json::from_str(&state_doc()).expect("json");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} does not resolve"
            );
        }
    }

    fn state_doc() -> String {
        let s = state();
        let _ = app(s.clone());
        s.openapi.get().cloned().expect("rendered by app")
    }
}
