//! The audit log: who read or changed which patient's data, when, from
//! where, and whether it was allowed. Rows are written before the response
//! (in the same transaction as a change); `audit_log` refuses updates and
//! deletes.

use vitalwatch_store::tokio_postgres::GenericClient;

use crate::auth::Access;
use crate::error::ApiError;

/// What became of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// Writes one audit row.
pub async fn record(
    client: &impl GenericClient,
    access: &Access,
    action: &str,
    patient_id: Option<&str>,
    outcome: Outcome,
    detail: Option<&str>,
) -> Result<(), ApiError> {
    client
        .execute(
            "INSERT INTO audit_log (actor, action, patient_id, request_id, source, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &access.actor(),
                &action,
                &patient_id,
                &access.meta.request_id,
                &access.meta.source,
                &outcome.as_str(),
                &detail,
            ],
        )
        .await
        .map_err(vitalwatch_store::StoreError::from)?;
    Ok(())
}
