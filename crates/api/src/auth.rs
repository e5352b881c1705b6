//! Who is calling: OIDC bearer tokens (JWT) checked for signature, issuer,
//! audience and expiry, and the caller's roles; where they may look (the
//! patients of their care teams); and the request's identity for the audit
//! log.
//!
//! Keys come from the identity provider's JWKS URL (fetched when a token
//! names a key not seen yet, at most every 30 seconds, and again when the
//! set is older than `jwks_max_age_seconds`), from a configured public key
//! (PEM, RS256 or ES256), or for local runs and tests from an HS256 shared
//! secret. With none of them, every authenticated route answers 401.

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use vitalwatch_store::tokio_postgres::GenericClient;

use crate::AppState;
use crate::audit::{self, Outcome};
use crate::error::ApiError;

/// `[api.auth]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Expected `iss` claim. Default `vitalwatch-local`.
    pub issuer: String,
    /// Expected `aud` claim. Default `vitalwatch`.
    pub audience: String,
    /// HS256 shared secret, for local runs and tests only (32 bytes or more).
    pub hs256_secret: Option<String>,
    /// The identity provider's public key, PEM (RSA for RS256, EC P-256 for ES256).
    pub public_key_pem: Option<String>,
    /// The identity provider's JSON Web Key Set
    /// (`https://idp.example.org/.well-known/jwks.json`). Only asymmetric
    /// signatures (RS, PS, ES) are accepted from it.
    pub jwks_url: Option<String>,
    /// The key set is fetched again when older than this. Default 3600.
    pub jwks_max_age_seconds: u64,
    /// The claim listing the caller's roles. Default `roles`.
    pub roles_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Default 30.
    pub leeway_seconds: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: "vitalwatch-local".into(),
            audience: "vitalwatch".into(),
            hs256_secret: None,
            public_key_pem: None,
            jwks_url: None,
            jwks_max_age_seconds: 3600,
            roles_claim: "roles".into(),
            leeway_seconds: 30,
        }
    }
}

/// A role, from the token's roles claim (unknown roles are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Nurse,
    Clinician,
    Admin,
    DeviceAdmin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "nurse" => Role::Nurse,
            "clinician" => Role::Clinician,
            "admin" => Role::Admin,
            "device-admin" => Role::DeviceAdmin,
            _ => return None,
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The token's `sub`: the identity written to the audit log and matched
    /// against care-team membership.
    pub subject: String,
    pub roles: Vec<Role>,
    /// The token's `exp`: long-lived responses (streams) end there.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Caller {
    /// Whether the caller may see patient data at all (a nurse or a
    /// clinician; admins manage the registry and teams, not care).
    pub fn is_carer(&self) -> bool {
        self.has_any(CARE)
    }

    /// Whether `patient_id` is on one of the caller's care teams' panels.
    pub async fn can_see(
        &self,
        client: &impl GenericClient,
        patient_id: &str,
    ) -> Result<bool, ApiError> {
        if !self.is_carer() {
            return Ok(false);
        }
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM care_team_members m JOIN care_team_patients p USING (team_id)
                                 WHERE m.subject = $1 AND p.patient_id = $2)",
                &[&self.subject, &patient_id],
            )
            .await
            .map_err(vitalwatch_store::StoreError::from)?;
        Ok(row.get(0))
    }

    /// Every patient on the caller's care teams' panels.
    pub async fn patients(&self, client: &impl GenericClient) -> Result<Vec<String>, ApiError> {
        if !self.is_carer() {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                "SELECT DISTINCT p.patient_id FROM care_team_members m JOIN care_team_patients p USING (team_id)
                  WHERE m.subject = $1 ORDER BY 1",
                &[&self.subject],
            )
            .await
            .map_err(vitalwatch_store::StoreError::from)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// Checks tokens against the configured issuer, audience and key.
#[derive(Clone)]
pub struct Authenticator {
    key: Option<(DecodingKey, Validation)>,
    jwks: Option<std::sync::Arc<Jwks>>,
    /// Issuer, audience, required claims, leeway: what every token must meet.
    base: Validation,
    roles_claim: String,
}

/// Whether keys may be fetched from `url`: https, or http to this machine
/// only; never with user info (`http://127.0.0.1@elsewhere/`).
fn jwks_url_is_safe(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    if !u.username().is_empty() || u.password().is_some() {
        return false;
    }
    let Some(host) = u.host_str() else {
        return false;
    };
    match u.scheme() {
        "https" => true,
        "http" => {
            host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

/// Signatures accepted from a key set: asymmetric only, so a token can
/// never pass by being "signed" with a public key as an HMAC secret.
const ASYMMETRIC: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// The identity provider's key set, by key id.
struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: std::sync::RwLock<std::collections::HashMap<String, (DecodingKey, Algorithm)>>,
    /// When the set was last fetched; held while fetching.
    fetched: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// When a token with an unknown key last made it fetch (at most every
    /// 30 s, so made-up key ids cannot hammer the identity provider).
    forced: std::sync::Mutex<Option<std::time::Instant>>,
    max_age: std::time::Duration,
}

/// Why a token was refused.
#[derive(Debug)]
enum Refusal {
    /// Signed with a key the set does not have (yet).
    UnknownKey(String),
    Other(String),
}

impl Jwks {
    /// Fetches the set again unless it was fetched less than `min_interval`
    /// ago (by this or a concurrent call).
    async fn refresh(&self, min_interval: std::time::Duration) -> Result<(), String> {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|t| t.elapsed() < min_interval) {
            return Ok(());
        }
        let set: jsonwebtoken::jwk::JwkSet = self
            .client
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("cannot fetch the key set from {}: {e}", self.url))?
            .bytes()
            .await
            .map_err(|e| format!("cannot fetch the key set from {}: {e}", self.url))
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| format!("the key set at {} is not a JWKS: {e}", self.url))
            })?;
        let mut keys = std::collections::HashMap::new();
        for jwk in &set.keys {
            use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, PublicKeyUse};
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(a), _) => a.to_string().parse::<Algorithm>().ok(),
                (None, AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
                (None, AlgorithmParameters::EllipticCurve(p)) => match p.curve {
                    EllipticCurve::P256 => Some(Algorithm::ES256),
                    EllipticCurve::P384 => Some(Algorithm::ES384),
                    _ => None,
                },
                _ => None,
            };
            let (Some(alg), Some(kid)) =
                (alg.filter(|a| ASYMMETRIC.contains(a)), &jwk.common.key_id)
            else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid.clone(), (key, alg));
            }
        }
        tracing::info!(url = %self.url, keys = keys.len(), "identity provider keys fetched");
        // Only a successful fetch counts: after a failed one, a token with
        // a key not seen makes the next attempt (at most every 30 s).
        *fetched = Some(std::time::Instant::now());
        if let Ok(mut k) = self.keys.write() {
            *k = keys;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("configured", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// From `[api.auth]`; `Err` says what is wrong with it.
    pub fn new(cfg: &AuthConfig) -> Result<Authenticator, String> {
        let (key, algorithms) = match (&cfg.hs256_secret, &cfg.public_key_pem) {
            (Some(_), Some(_)) => {
                return Err("api.auth: give hs256_secret or public_key_pem, not both".into());
            }
            (Some(secret), None) => {
                if secret.len() < 32 {
                    return Err("api.auth.hs256_secret must be at least 32 bytes".into());
                }
                (
                    Some(DecodingKey::from_secret(secret.as_bytes())),
                    vec![Algorithm::HS256],
                )
            }
            (None, Some(pem)) => match DecodingKey::from_rsa_pem(pem.as_bytes()) {
                Ok(k) => (Some(k), vec![Algorithm::RS256]),
                Err(_) => match DecodingKey::from_ec_pem(pem.as_bytes()) {
                    Ok(k) => (Some(k), vec![Algorithm::ES256]),
                    Err(e) => {
                        return Err(format!(
                            "api.auth.public_key_pem is not an RSA or EC public key: {e}"
                        ));
                    }
                },
            },
            (None, None) => (None, Vec::new()),
        };
        let mut base = Validation::new(Algorithm::RS256);
        base.set_issuer(&[cfg.issuer.as_str()]);
        base.set_audience(&[cfg.audience.as_str()]);
        base.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        base.leeway = cfg.leeway_seconds;
        base.validate_nbf = true;
        let key = key.map(|k| {
            let mut v = base.clone();
            v.algorithms = algorithms;
            (k, v)
        });
        let jwks = match &cfg.jwks_url {
            None => None,
            Some(_) if key.is_some() => {
                return Err("api.auth: give jwks_url or a configured key, not both".into());
            }
            Some(url) if !jwks_url_is_safe(url) => {
                return Err(format!(
                    "api.auth.jwks_url {url:?} must be an https URL (plain http only to localhost \
                     or a loopback address), without user info"
                ));
            }
            Some(url) => Some(std::sync::Arc::new(Jwks {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(5))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| format!("api.auth.jwks_url: {e}"))?,
                keys: std::sync::RwLock::default(),
                fetched: tokio::sync::Mutex::new(None),
                forced: std::sync::Mutex::new(None),
                max_age: std::time::Duration::from_secs(cfg.jwks_max_age_seconds.max(60)),
            })),
        };
        Ok(Authenticator {
            key,
            jwks,
            base,
            roles_claim: cfg.roles_claim.clone(),
        })
    }

    /// The caller a bearer token identifies, fetching the identity
    /// provider's keys when the token names one not seen yet (or the set
    /// is old); `Err` says why not.
    pub async fn check(&self, token: &str) -> Result<Caller, String> {
        let Some(jwks) = &self.jwks else {
            return self.verify(token);
        };
        let stale = jwks
            .fetched
            .try_lock()
            .map(|f| f.is_none_or(|t| t.elapsed() >= jwks.max_age))
            .unwrap_or(false);
        if stale && let Err(e) = jwks.refresh(jwks.max_age).await {
            tracing::warn!(error = %e, "identity provider keys not refreshed");
        }
        match self.verify_jwks(jwks, token) {
            Err(Refusal::UnknownKey(kid)) => {
                // A rotated key: fetch the set again, at most every 30 s.
                let now = std::time::Instant::now();
                let may = jwks.forced.lock().is_ok_and(|mut f| {
                    let may = f.is_none_or(|t| {
                        now.duration_since(t) >= std::time::Duration::from_secs(30)
                    });
                    if may {
                        *f = Some(now);
                    }
                    may
                });
                if may && let Err(e) = jwks.refresh(std::time::Duration::ZERO).await {
                    tracing::warn!(error = %e, "identity provider keys not refreshed");
                }
                self.verify_jwks(jwks, token).map_err(|r| match r {
                    Refusal::UnknownKey(_) => {
                        format!("token refused: no key {kid:?} in the identity provider's set")
                    }
                    Refusal::Other(why) => why,
                })
            }
            r => r.map_err(|r| match r {
                Refusal::UnknownKey(why) | Refusal::Other(why) => why,
            }),
        }
    }

    fn verify_jwks(&self, jwks: &Jwks, token: &str) -> Result<Caller, Refusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Refusal::Other(format!("token refused: {e}")))?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(Refusal::Other(format!(
                "token refused: {:?} signatures are not accepted",
                header.alg
            )));
        }
        let keys = jwks
            .keys
            .read()
            .map_err(|_| Refusal::Other("key set unavailable".into()))?;
        let found = match &header.kid {
            Some(kid) => keys.get(kid),
            None if keys.len() == 1 => keys.values().next(),
            // No keys yet (the provider was away), or several: fetch again.
            None => None,
        };
        let Some((key, alg)) = found else {
            return Err(Refusal::UnknownKey(header.kid.unwrap_or_default()));
        };
        if *alg != header.alg {
            return Err(Refusal::Other(
                "token refused: the algorithm does not match the key's".into(),
            ));
        }
        let mut v = self.base.clone();
        v.algorithms = vec![*alg];
        self.claims(token, key, &v).map_err(Refusal::Other)
    }

    /// An authenticator that refuses every token.
    pub fn unconfigured() -> Authenticator {
        Authenticator {
            key: None,
            jwks: None,
            base: Validation::new(Algorithm::RS256),
            roles_claim: "roles".into(),
        }
    }

    /// The caller a bearer token identifies; `Err` says why not (for the
    /// log and the audit row; clients get a plain 401).
    pub fn verify(&self, token: &str) -> Result<Caller, String> {
        let Some((key, validation)) = &self.key else {
            return Err("authentication is not configured".into());
        };
        self.claims(token, key, validation)
    }

    /// The caller, from a token checked with `key` and `validation`.
    fn claims(
        &self,
        token: &str,
        key: &DecodingKey,
        validation: &Validation,
    ) -> Result<Caller, String> {
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, validation)
            .map_err(|e| format!("token refused: {e}"))?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty() && s.len() <= 256);
        let Some(subject) = subject else {
            return Err("token has no usable sub".into());
        };
        let roles = claims
            .get(&self.roles_claim)
            .and_then(|r| r.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().and_then(Role::parse))
                    .collect()
            })
            .unwrap_or_default();
        let expires_at = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .and_then(|e| chrono::DateTime::from_timestamp(e, 0));
        Ok(Caller {
            subject: subject.to_owned(),
            roles,
            expires_at,
        })
    }
}

/// Nurses and clinicians: patient data, for the patients of their care teams.
pub const CARE: &[Role] = &[Role::Nurse, Role::Clinician];
/// Admins: patients, care teams and their members, devices, the audit log.
pub const ADMIN: &[Role] = &[Role::Admin];
/// Admins and device admins: devices and their assignments.
pub const DEVICES: &[Role] = &[Role::Admin, Role::DeviceAdmin];

impl Caller {
    /// Whether the caller holds one of `roles`.
    pub fn has_any(&self, roles: &[Role]) -> bool {
        self.roles.iter().any(|r| roles.contains(r))
    }
}

/// The caller, if they may see patient data at all; a refusal is audited.
pub async fn carer(state: &AppState, access: &Access, action: &str) -> Result<Caller, ApiError> {
    with_role(
        state,
        access,
        action,
        CARE,
        "patient data is for the nurses and clinicians of the patient's care team",
    )
    .await
}

/// The caller, if they hold one of `roles`: 401 without a valid token, 403
/// (saying `why`) without the role; a refusal is audited.
pub async fn with_role(
    state: &AppState,
    access: &Access,
    action: &str,
    roles: &[Role],
    why: &str,
) -> Result<Caller, ApiError> {
    let refusal = match &access.caller {
        Ok(c) if c.has_any(roles) => return Ok(c.clone()),
        Ok(_) => ApiError::Forbidden(why.to_owned()),
        Err(why) => ApiError::Unauthorized(format!("a valid bearer token is required: {why}")),
    };
    let client = state.pool.get().await?;
    audit::record(
        &**client,
        access,
        action,
        access.patient.as_deref(),
        Outcome::Denied,
        Some(&refusal.to_string()),
    )
    .await?;
    Err(refusal)
}

/// A malformed request from a carer, audited as failed before answering.
pub async fn refused(state: &AppState, access: &Access, action: &str, e: ApiError) -> ApiError {
    let logged = async {
        let client = state.pool.get().await?;
        audit::record(
            &**client,
            access,
            action,
            access.patient.as_deref(),
            Outcome::Failed,
            Some(&e.to_string()),
        )
        .await
    }
    .await;
    match logged {
        Ok(()) => e,
        Err(audit_error) => audit_error, // no answer without its audit row
    }
}

/// `r`'s value, or its problem refused as [`refused`] does (audited as
/// failed before the answer): every handler checks its request this way.
pub async fn checked<T>(
    state: &AppState,
    access: &Access,
    action: &str,
    r: Result<T, ApiError>,
) -> Result<T, ApiError> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => Err(refused(state, access, action, e).await),
    }
}

/// Checks the shape of a patient id in a path (the registry's bound).
pub fn check_patient_id(patient_id: &str) -> Result<(), ApiError> {
    if patient_id.is_empty() || patient_id.len() > 128 || patient_id.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "a patient id is 1 to 128 characters, none of them control characters".into(),
        ));
    }
    Ok(())
}

/// Audits a request about a patient who is not on the caller's panel and
/// returns the answer to give: not found, so that another team's patient
/// is not disclosed.
pub async fn deny_patient(
    client: &impl GenericClient,
    access: &Access,
    action: &str,
    patient_id: &str,
) -> Result<ApiError, ApiError> {
    audit::record(
        client,
        access,
        action,
        Some(patient_id),
        Outcome::Denied,
        Some("not on the caller's care teams"),
    )
    .await?;
    Ok(ApiError::NotFound(format!(
        "no patient {patient_id} among your patients"
    )))
}

/// `Ok` when `patient_id` is on the caller's panel; otherwise the refusal
/// is audited and answered as not found ([`deny_patient`]).
pub async fn require_patient(
    client: &impl GenericClient,
    access: &Access,
    caller: &Caller,
    action: &str,
    patient_id: &str,
) -> Result<(), ApiError> {
    if caller.can_see(client, patient_id).await? {
        return Ok(());
    }
    Err(deny_patient(client, access, action, patient_id).await?)
}

/// A token signed with the configured HS256 secret, for local runs
/// (`vitalwatch token`); `Err` when no shared secret is configured.
pub fn mint_local(
    cfg: &AuthConfig,
    subject: &str,
    roles: &[String],
    ttl: chrono::Duration,
) -> Result<String, String> {
    let Some(secret) = &cfg.hs256_secret else {
        return Err(
            "api.auth.hs256_secret is not set: tokens come from the identity provider".into(),
        );
    };
    let claims = serde_json::json!({
        "sub": subject,
        "iss": cfg.issuer,
        "aud": cfg.audience,
        "iat": chrono::Utc::now().timestamp(),
        "exp": (chrono::Utc::now() + ttl).timestamp(),
        cfg.roles_claim.clone(): roles,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// Where a request came from, for the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestMeta {
    /// The caller's `x-request-id` (sanitized), or a new one.
    pub request_id: String,
    /// The client's address, when the server knows it.
    pub source: Option<String>,
}

/// The outcome of authentication, always extracted: handlers audit a
/// refusal before answering it.
#[derive(Debug, Clone)]
pub struct Access {
    pub caller: Result<Caller, String>,
    pub meta: RequestMeta,
    /// The patient the request is about, once known from its path or
    /// query: a refusal's audit row names them.
    pub patient: Option<String>,
}

impl Access {
    /// This request is about `patient_id` (ignored unless it has the shape
    /// of a patient id).
    pub fn about(mut self, patient_id: &str) -> Access {
        if check_patient_id(patient_id).is_ok() {
            self.patient = Some(patient_id.to_owned());
        }
        self
    }

    /// The actor's name for the audit log.
    pub fn actor(&self) -> &str {
        self.caller
            .as_ref()
            .map_or("anonymous", |c| c.subject.as_str())
    }
}

impl FromRequestParts<AppState> for Access {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            })
            .map_or_else(new_request_id, str::to_owned);
        let source = parts
            .extensions
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        let caller = match parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.to_str())
        {
            None => Err("no bearer token".to_owned()),
            Some(Err(_)) => Err("authorization header is not text".to_owned()),
            Some(Ok(v)) => match v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
            {
                Some(token) => state.auth.check(token.trim()).await,
                None => Err("authorization is not a bearer token".to_owned()),
            },
        };
        Ok(Access {
            caller,
            meta: RequestMeta { request_id, source },
            patient: None,
        })
    }
}

fn new_request_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return format!(
            "t{}",
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn token(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        })
        .expect("config")
    }

    fn claims(exp_offset: i64) -> serde_json::Value {
        serde_json::json!({
            "sub": "nurse-1", "iss": "vitalwatch-local", "aud": "vitalwatch",
            "exp": chrono::Utc::now().timestamp() + exp_offset, "roles": ["nurse", "pilot"]
        })
    }

    #[test]
    fn a_good_token_gives_the_caller_and_known_roles() {
        let c = auth().verify(&token(claims(600), SECRET)).expect("valid");
        assert_eq!(
            (c.subject.as_str(), c.roles.as_slice()),
            ("nurse-1", [Role::Nurse].as_slice())
        );
        let exp = c.expires_at.expect("exp");
        assert!(
            exp > chrono::Utc::now() + chrono::Duration::seconds(590),
            "{exp}"
        );
        assert!(c.is_carer());
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth();
        assert!(
            a.verify(&token(claims(-600), SECRET))
                .expect_err("expired")
                .contains("Expired")
        );
        assert!(
            a.verify(&token(claims(600), "another-secret-of-at-least-32-bytes!"))
                .is_err(),
            "wrong key"
        );
        let mut wrong_aud = claims(600);
        wrong_aud["aud"] = "someone-else".into();
        assert!(a.verify(&token(wrong_aud, SECRET)).is_err());
        let mut wrong_iss = claims(600);
        wrong_iss["iss"] = "evil".into();
        assert!(a.verify(&token(wrong_iss, SECRET)).is_err());
        let mut no_sub = claims(600);
        no_sub.as_object_mut().expect("object").remove("sub");
        assert!(a.verify(&token(no_sub, SECRET)).is_err());
        assert!(a.verify("not.a.token").is_err());
        assert!(
            Authenticator::unconfigured()
                .verify(&token(claims(600), SECRET))
                .is_err()
        );
    }

    #[test]
    fn a_locally_minted_token_verifies() {
        let cfg = AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        let t = mint_local(
            &cfg,
            "nurse-local",
            &["nurse".into()],
            chrono::Duration::minutes(5),
        )
        .expect("mint");
        assert_eq!(auth().verify(&t).expect("verifies").subject, "nurse-local");
        assert!(
            mint_local(
                &AuthConfig::default(),
                "x",
                &[],
                chrono::Duration::minutes(5)
            )
            .is_err(),
            "no secret, no token"
        );
    }

    #[test]
    fn configuration_is_checked() {
        assert!(
            Authenticator::new(&AuthConfig {
                hs256_secret: Some("short".into()),
                ..AuthConfig::default()
            })
            .is_err()
        );
        assert!(
            Authenticator::new(&AuthConfig {
                public_key_pem: Some("nonsense".into()),
                ..AuthConfig::default()
            })
            .is_err()
        );
        assert!(
            Authenticator::new(&AuthConfig::default()).is_ok(),
            "unconfigured is allowed: every call is then 401"
        );
    }

    /// An ES256 key pair: (key id, signing key, its public JWK).
    fn es256(kid: &str) -> (String, EncodingKey, serde_json::Value) {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        let public = pair.public_key().as_ref(); // 0x04 | x | y
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "use": "sig", "kid": kid,
            "x": b64url(&public[1..33]), "y": b64url(&public[33..65])});
        (
            kid.to_owned(),
            EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
        )
    }

    fn b64url(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn signed(kid: Option<&str>, key: &EncodingKey, alg: Algorithm) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims(600), key).expect("encode")
    }

    #[tokio::test]
    async fn keys_come_from_the_jwks_url_and_a_rotated_key_is_fetched() {
        use std::sync::{Arc, Mutex};
        let (kid_a, key_a, jwk_a) = es256("a");
        let (kid_b, key_b, jwk_b) = es256("b");
        let (_, key_c, _) = es256("c");
        let served = Arc::new(Mutex::new(serde_json::json!({"keys": [jwk_a]})));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = {
            let (served, fetches) = (served.clone(), fetches.clone());
            axum::Router::new().route(
                "/jwks.json",
                axum::routing::get(move || {
                    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = served.lock().expect("lock").clone();
                    async move { axum::Json(body) }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let auth = Authenticator::new(&AuthConfig {
            jwks_url: Some(format!("http://127.0.0.1:{}/jwks.json", addr.port())),
            ..AuthConfig::default()
        })
        .expect("config");

        let c = auth
            .check(&signed(Some(&kid_a), &key_a, Algorithm::ES256))
            .await
            .expect("key a");
        assert_eq!(c.subject, "nurse-1");
        // The provider rotates to key b: a token signed with it fetches the set again.
        *served.lock().expect("lock") = serde_json::json!({"keys": [jwk_b]});
        let before = fetches.load(std::sync::atomic::Ordering::SeqCst);
        auth.check(&signed(Some(&kid_b), &key_b, Algorithm::ES256))
            .await
            .expect("key b after a refetch");
        assert_eq!(
            fetches.load(std::sync::atomic::Ordering::SeqCst),
            before + 1
        );
        // An unknown key is refused, and does not make every request refetch.
        let e = auth
            .check(&signed(Some("c"), &key_c, Algorithm::ES256))
            .await
            .expect_err("unknown key");
        assert!(e.contains("no key"), "{e}");
        auth.check(&signed(Some("c"), &key_c, Algorithm::ES256))
            .await
            .expect_err("still unknown");
        assert_eq!(
            fetches.load(std::sync::atomic::Ordering::SeqCst),
            before + 1,
            "at most one fetch per 30 s"
        );
        // Key b's id on a token signed by another key, and HMAC tokens, are refused.
        assert!(
            auth.check(&signed(Some(&kid_b), &key_c, Algorithm::ES256))
                .await
                .is_err()
        );
        let hs = jsonwebtoken::encode(
            &Header {
                kid: Some(kid_b.clone()),
                ..Header::new(Algorithm::HS256)
            },
            &claims(600),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode");
        let e = auth.check(&hs).await.expect_err("no HMAC from a key set");
        assert!(e.contains("not accepted"), "{e}");
        assert!(
            Authenticator::new(&AuthConfig {
                jwks_url: Some("http://idp.example.org/jwks".into()),
                ..AuthConfig::default()
            })
            .is_err(),
            "a key set over plain http from elsewhere is refused"
        );
        for bad in [
            "http://localhost.example.org/jwks",
            "http://127.0.0.1@idp.example.org/jwks",
            "https://user:pw@idp.example.org/jwks",
            "ftp://localhost/jwks",
            "not a url",
        ] {
            assert!(!jwks_url_is_safe(bad), "{bad}");
        }
        for good in [
            "https://idp.example.org/jwks",
            "http://localhost:8080/jwks",
            "http://127.0.0.1:1/j",
            "http://[::1]:1/j",
        ] {
            assert!(jwks_url_is_safe(good), "{good}");
        }
    }
}
