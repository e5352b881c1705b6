//! The device registry: devices, and which patient each was assigned to when.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::StoreError;

/// The channel `NOTIFY`d whenever `devices` or `device_assignments` change.
pub const CHANGE_CHANNEL: &str = "vitalwatch_registry";

/// One period during which a device belonged to a patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub patient_id: String,
    pub from: DateTime<Utc>,
    /// `None` while the assignment is open.
    pub until: Option<DateTime<Utc>>,
}

/// What ingest needs to know about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub kind: String,
    /// A deactivated device's readings are refused.
    pub active: bool,
    /// Every assignment, oldest first; periods do not overlap.
    pub assignments: Vec<Assignment>,
}

impl DeviceRecord {
    /// The patient who had the device at `t`, if anyone did.
    pub fn patient_at(&self, t: DateTime<Utc>) -> Option<&str> {
        self.assignments
            .iter()
            .rev()
            .find(|a| a.from <= t && a.until.is_none_or(|u| t < u))
            .map(|a| a.patient_id.as_str())
    }

    /// The patient who has the device now, if anyone.
    pub fn current_patient(&self) -> Option<&str> {
        self.assignments
            .last()
            .filter(|a| a.until.is_none())
            .map(|a| a.patient_id.as_str())
    }
}

/// Every registered device with its whole assignment history, in one query.
pub async fn load_devices(
    client: &impl GenericClient,
) -> Result<HashMap<String, DeviceRecord>, StoreError> {
    let rows = client
        .query(
            "SELECT d.device_id, d.kind, d.active, a.patient_id, a.assigned_at, a.unassigned_at
               FROM devices d
               LEFT JOIN device_assignments a ON a.device_id = d.device_id
              ORDER BY d.device_id, a.assigned_at",
            &[],
        )
        .await?;
    let mut out: HashMap<String, DeviceRecord> = HashMap::new();
    for r in &rows {
        let device: String = r.get(0);
        let rec = out.entry(device).or_insert_with(|| DeviceRecord {
            kind: r.get(1),
            active: r.get(2),
            assignments: Vec::new(),
        });
        if let Some(patient_id) = r.get::<_, Option<String>>(3) {
            rec.assignments.push(Assignment {
                patient_id,
                from: r.get(4),
                until: r.get(5),
            });
        }
    }
    Ok(out)
}

/// Longest device or patient id, in bytes: both are part of the readings'
/// unique key, whose index rows must stay well below PostgreSQL's limit.
pub const MAX_ID_LEN: usize = 128;

/// Registers a device (idempotent) and, when `patient_id` is given, assigns
/// it to that patient from `since` (default: now), closing any other open
/// assignment at that moment. The patient is created if it is new.
pub async fn register_device(
    client: &mut tokio_postgres::Client,
    device_id: &str,
    kind: &str,
    patient_id: Option<&str>,
    since: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    register_device_in(&tx, device_id, kind, patient_id, since).await?;
    tx.commit().await?;
    Ok(())
}

/// [`register_device`] inside the caller's transaction, so that many
/// devices (an import) commit together: one commit, and one registry
/// notification, instead of one each.
pub async fn register_device_in(
    tx: &tokio_postgres::Transaction<'_>,
    device_id: &str,
    kind: &str,
    patient_id: Option<&str>,
    since: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    if device_id.is_empty() || device_id.len() > MAX_ID_LEN || device_id.contains(['/', '+', '#']) {
        return Err(StoreError::Invalid(format!(
            "device id {device_id:?} must be 1 to {MAX_ID_LEN} bytes and contain no '/', '+' or '#'"
        )));
    }
    if let Some(p) = patient_id
        && (p.is_empty() || p.len() > MAX_ID_LEN)
    {
        return Err(StoreError::Invalid(format!(
            "patient id {p:?} must be 1 to {MAX_ID_LEN} bytes"
        )));
    }
    tx.execute(
        "INSERT INTO devices (device_id, kind) VALUES ($1, $2)
         ON CONFLICT (device_id) DO UPDATE SET kind = EXCLUDED.kind",
        &[&device_id, &kind],
    )
    .await?;
    if let Some(patient) = patient_id {
        tx.execute(
            "INSERT INTO patients (patient_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&patient],
        )
        .await?;
        assign(tx, device_id, patient, since.unwrap_or_else(Utc::now)).await?;
    }
    Ok(())
}

/// Assigns a registered device to an existing patient from `since`, closing
/// any other open assignment at that moment. Assigning it again to the
/// patient who has it changes nothing. `Invalid` when `since` is not after
/// the latest period's start (or end).
pub async fn assign(
    client: &impl GenericClient,
    device_id: &str,
    patient: &str,
    since: DateTime<Utc>,
) -> Result<(), StoreError> {
    // The latest period, open or closed: a new one may not overlap it.
    let latest: Option<(String, DateTime<Utc>, Option<DateTime<Utc>>)> = client
        .query_opt(
            "SELECT patient_id, assigned_at, unassigned_at FROM device_assignments
              WHERE device_id = $1 ORDER BY assigned_at DESC LIMIT 1 FOR UPDATE",
            &[&device_id],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2)));
    match latest {
        // Already assigned to this patient: nothing to do (`since` does
        // not move the start of an open assignment).
        Some((p, _, None)) if p == patient => {}
        Some((_, from, None)) if since <= from => {
            return Err(StoreError::Invalid(format!(
                "device {device_id} is assigned since {from}; a hand-over must come after that"
            )));
        }
        Some((_, _, Some(until))) if since < until => {
            return Err(StoreError::Invalid(format!(
                "device {device_id} was assigned until {until}; a new assignment cannot start before that"
            )));
        }
        _ => {
            client.execute(
                "UPDATE device_assignments SET unassigned_at = $2 WHERE device_id = $1 AND unassigned_at IS NULL",
                &[&device_id, &since],
            )
            .await?;
            client.execute(
                "INSERT INTO device_assignments (device_id, patient_id, assigned_at) VALUES ($1, $2, $3)",
                &[&device_id, &patient, &since],
            )
            .await?;
        }
    }
    Ok(())
}

/// Ends the device's open assignment at `at`; `false` when it had none.
/// `Invalid` when `at` is before the assignment's start.
pub async fn unassign(
    client: &impl GenericClient,
    device_id: &str,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let open: Option<DateTime<Utc>> = client
        .query_opt(
            "SELECT assigned_at FROM device_assignments
              WHERE device_id = $1 AND unassigned_at IS NULL FOR UPDATE",
            &[&device_id],
        )
        .await?
        .map(|r| r.get(0));
    match open {
        None => Ok(false),
        Some(from) if at < from => Err(StoreError::Invalid(format!(
            "device {device_id} is assigned since {from}; it cannot be returned before that"
        ))),
        Some(_) => {
            client
                .execute(
                    "UPDATE device_assignments SET unassigned_at = $2
                      WHERE device_id = $1 AND unassigned_at IS NULL",
                    &[&device_id, &at],
                )
                .await?;
            Ok(true)
        }
    }
}

/// One device with its whole assignment history, oldest first.
pub async fn device(
    client: &impl GenericClient,
    device_id: &str,
) -> Result<Option<DeviceRecord>, StoreError> {
    let rows = client
        .query(
            "SELECT d.kind, d.active, a.patient_id, a.assigned_at, a.unassigned_at
               FROM devices d
               LEFT JOIN device_assignments a ON a.device_id = d.device_id
              WHERE d.device_id = $1
              ORDER BY a.assigned_at",
            &[&device_id],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut rec = DeviceRecord {
        kind: first.get(0),
        active: first.get(1),
        assignments: Vec::new(),
    };
    for r in &rows {
        if let Some(patient_id) = r.get::<_, Option<String>>(2) {
            rec.assignments.push(Assignment {
                patient_id,
                from: r.get(3),
                until: r.get(4),
            });
        }
    }
    Ok(Some(rec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, h, 0, 0)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn the_patient_is_whoever_had_the_device_then() {
        let rec = DeviceRecord {
            kind: "bp_cuff".into(),
            active: true,
            assignments: vec![
                Assignment {
                    patient_id: "a".into(),
                    from: t(1),
                    until: Some(t(5)),
                },
                Assignment {
                    patient_id: "b".into(),
                    from: t(5),
                    until: None,
                },
            ],
        };
        assert_eq!(rec.patient_at(t(0)), None, "before the first assignment");
        assert_eq!(rec.patient_at(t(1)), Some("a"));
        assert_eq!(rec.patient_at(t(4)), Some("a"));
        assert_eq!(
            rec.patient_at(t(5)),
            Some("b"),
            "the hand-over instant belongs to the new patient"
        );
        assert_eq!(rec.patient_at(t(23)), Some("b"));
        assert_eq!(rec.current_patient(), Some("b"));
        let returned = DeviceRecord {
            assignments: vec![Assignment {
                patient_id: "a".into(),
                from: t(1),
                until: Some(t(5)),
            }],
            ..rec
        };
        assert_eq!(
            returned.patient_at(t(6)),
            None,
            "returned devices belong to no one"
        );
        assert_eq!(returned.current_patient(), None);
    }
}
