//! Registry tools: register one device, or import a CSV cohort
//! (`device_id,patient_id,kind[,assigned_at]` per line, as `vitalwatch-sim
//! cohort` prints).

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use vitalwatch_store::DatabaseConfig;

/// One registry entry to create or update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub device_id: String,
    pub patient_id: Option<String>,
    pub kind: String,
    /// When the assignment starts (RFC 3339); default: now.
    pub since: Option<DateTime<Utc>>,
}

/// Parses `device_id,patient_id,kind[,assigned_at]` lines. Blank lines and
/// lines starting with `#` are skipped; an empty patient leaves the device
/// unassigned; `assigned_at` is RFC 3339 and defaults to now.
pub fn parse_csv(text: &str) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let (device, patient, kind, since) = match fields[..] {
            [d, p, k] => (d, p, k, None),
            [d, p, k, ""] => (d, p, k, None),
            [d, p, k, s] => {
                let t = DateTime::parse_from_rfc3339(s).with_context(|| {
                    format!("line {}: assigned_at {s:?} is not RFC 3339", n + 1)
                })?;
                (d, p, k, Some(t.with_timezone(&Utc)))
            }
            _ => anyhow::bail!(
                "line {}: expected device_id,patient_id,kind[,assigned_at], got {} fields",
                n + 1,
                fields.len()
            ),
        };
        if device.is_empty() {
            anyhow::bail!("line {}: empty device_id", n + 1);
        }
        out.push(Entry {
            device_id: device.to_owned(),
            patient_id: (!patient.is_empty()).then(|| patient.to_owned()),
            kind: if kind.is_empty() {
                "unknown".into()
            } else {
                kind.to_owned()
            },
            since,
        });
    }
    Ok(out)
}

/// Registers every entry, all or none (one transaction: an import of
/// 50,000 devices took minutes with a commit each); returns how many.
pub async fn register(db: &DatabaseConfig, entries: &[Entry]) -> anyhow::Result<usize> {
    let mut client = vitalwatch_store::connect(&db.url).await?;
    let tx = client.transaction().await?;
    for e in entries {
        vitalwatch_store::registry::register_device_in(
            &tx,
            &e.device_id,
            &e.kind,
            e.patient_id.as_deref(),
            e.since,
        )
        .await
        .with_context(|| format!("registering {}", e.device_id))?;
    }
    tx.commit().await?;
    Ok(entries.len())
}

/// Imports a CSV file.
pub async fn import(db: &DatabaseConfig, path: &Path) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    register(db, &parse_csv(&text)?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_parses_and_reports_bad_lines() {
        let e = parse_csv("# cohort\nsim-0001,p-0001,wearable\n\nsim-0002,,scale\nsim-0003,p-3,scale,2026-11-01T00:00:00Z\n")
            .expect("valid");
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            Entry {
                device_id: "sim-0001".into(),
                patient_id: Some("p-0001".into()),
                kind: "wearable".into(),
                since: None
            }
        );
        assert_eq!(e[1].patient_id, None);
        assert_eq!(
            e[2].since.map(|t| t.to_rfc3339()),
            Some("2026-11-01T00:00:00+00:00".to_owned())
        );
        assert!(parse_csv("a,b,c,yesterday\n").is_err());
        let err = parse_csv("a,b\n").expect_err("two fields");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
