//! The device registry: devices, and which patient each is assigned to.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use crate::StoreError;

/// What ingest needs to know about a device right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Registered, active and assigned to this patient.
    Assigned { patient_id: String },
    /// Registered and active, but not assigned to anyone.
    Unassigned,
    /// Registered but deactivated.
    Inactive,
}

/// The current status of every registered device, in one query.
pub async fn device_statuses(client: &impl GenericClient) -> Result<HashMap<String, DeviceStatus>, StoreError> {
    let rows = client
        .query(
            "SELECT d.device_id, d.active, a.patient_id
               FROM devices d
               LEFT JOIN device_assignments a ON a.device_id = d.device_id AND a.unassigned_at IS NULL",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let device: String = r.get(0);
            let active: bool = r.get(1);
            let patient: Option<String> = r.get(2);
            let status = match (active, patient) {
                (false, _) => DeviceStatus::Inactive,
                (true, None) => DeviceStatus::Unassigned,
                (true, Some(patient_id)) => DeviceStatus::Assigned { patient_id },
            };
            (device, status)
        })
        .collect())
}

/// Registers a device (idempotent) and, when `patient_id` is given, assigns
/// it to that patient, closing any other open assignment. The patient is
/// created if it is new.
pub async fn register_device(
    client: &mut tokio_postgres::Client,
    device_id: &str,
    kind: &str,
    patient_id: Option<&str>,
) -> Result<(), StoreError> {
    if device_id.is_empty() || device_id.contains(['/', '+', '#']) {
        return Err(StoreError::Invalid(format!("device id {device_id:?} must be non-empty and contain no '/', '+' or '#'")));
    }
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO devices (device_id, kind) VALUES ($1, $2)
         ON CONFLICT (device_id) DO UPDATE SET kind = EXCLUDED.kind",
        &[&device_id, &kind],
    )
    .await?;
    if let Some(patient) = patient_id {
        tx.execute("INSERT INTO patients (patient_id) VALUES ($1) ON CONFLICT DO NOTHING", &[&patient]).await?;
        let open: Option<String> = tx
            .query_opt(
                "SELECT patient_id FROM device_assignments WHERE device_id = $1 AND unassigned_at IS NULL FOR UPDATE",
                &[&device_id],
            )
            .await?
            .map(|r| r.get(0));
        if open.as_deref() != Some(patient) {
            tx.execute(
                "UPDATE device_assignments SET unassigned_at = now() WHERE device_id = $1 AND unassigned_at IS NULL",
                &[&device_id],
            )
            .await?;
            tx.execute("INSERT INTO device_assignments (device_id, patient_id) VALUES ($1, $2)", &[&device_id, &patient])
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
