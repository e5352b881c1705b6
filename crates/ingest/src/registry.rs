//! An in-memory copy of the device registry, so that ingest does not query
//! PostgreSQL per message.
//!
//! The copy is reloaded every `refresh` interval, and also when a device is
//! not found (at most once a second), so a newly registered device is
//! recognised within a second rather than after the next periodic reload.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, RwLock};
use vitalwatch_store::registry::{DeviceStatus, device_statuses};
use vitalwatch_store::{Pool, StoreError};

/// Minimum time between two reloads caused by unknown devices.
const MISS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct RegistryCache {
    pool: Pool,
    /// The latest snapshot; replaced whole on reload.
    devices: RwLock<Arc<HashMap<String, DeviceStatus>>>,
    /// When the snapshot was last loaded: rate-limits reloads on misses.
    loaded_at: Mutex<Option<Instant>>,
}

impl RegistryCache {
    pub fn new(pool: Pool) -> RegistryCache {
        RegistryCache { pool, devices: RwLock::new(Arc::new(HashMap::new())), loaded_at: Mutex::new(None) }
    }

    /// Reloads the snapshot from the database.
    pub async fn reload(&self) -> Result<usize, StoreError> {
        let mut loaded_at = self.loaded_at.lock().await;
        let client = self.pool.get().await?;
        let map = device_statuses(&**client).await?;
        let n = map.len();
        *self.devices.write().await = Arc::new(map);
        *loaded_at = Some(Instant::now());
        metrics::gauge!("vitalwatch_ingest_registry_devices").set(n as f64);
        Ok(n)
    }

    /// The device's status, or `None` if it is not registered. An error means
    /// the registry could not be read: the caller must not decide yet.
    pub async fn status(&self, device_id: &str) -> Result<Option<DeviceStatus>, StoreError> {
        if let Some(s) = self.devices.read().await.get(device_id) {
            return Ok(Some(s.clone()));
        }
        let stale = {
            let loaded_at = self.loaded_at.lock().await;
            loaded_at.is_none_or(|t| t.elapsed() >= MISS_RELOAD_INTERVAL)
        };
        if stale {
            self.reload().await?;
        }
        Ok(self.devices.read().await.get(device_id).cloned())
    }
}
