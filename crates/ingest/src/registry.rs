//! An in-memory copy of the device registry, so that ingest does not query
//! PostgreSQL per message.
//!
//! The copy is reloaded whole (one query) when PostgreSQL notifies a change
//! on `vitalwatch_registry` (triggers on `devices` and `device_assignments`),
//! every `refresh` interval as a safety net for missed notifications, and
//! when a device is not found in a copy loaded before its message arrived
//! (so a device registered a moment before it publishes is found, and a
//! burst of unknown devices costs one reload).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, RwLock, mpsc};
use tokio_util::sync::CancellationToken;
use vitalwatch_store::registry::{CHANGE_CHANNEL, DeviceRecord, load_devices};

use vitalwatch_store::{Pool, StoreError};

#[derive(Debug)]
pub struct RegistryCache {
    pool: Pool,
    /// The latest snapshot; replaced whole on reload.
    devices: RwLock<Arc<HashMap<String, DeviceRecord>>>,
    /// When the snapshot was last loaded: rate-limits reloads on misses.
    loaded_at: Mutex<Option<Instant>>,
}

impl RegistryCache {
    pub fn new(pool: Pool) -> RegistryCache {
        RegistryCache {
            pool,
            devices: RwLock::new(Arc::new(HashMap::new())),
            loaded_at: Mutex::new(None),
        }
    }

    /// Reloads the snapshot from the database.
    pub async fn reload(&self) -> Result<usize, StoreError> {
        let mut loaded_at = self.loaded_at.lock().await;
        self.reload_locked(&mut loaded_at).await
    }

    async fn reload_locked(&self, loaded_at: &mut Option<Instant>) -> Result<usize, StoreError> {
        let client = self.pool.get().await?;
        let map = load_devices(&**client).await?;
        let n = map.len();
        *self.devices.write().await = Arc::new(map);
        *loaded_at = Some(Instant::now());
        metrics::gauge!("vitalwatch_ingest_registry_devices").set(n as f64);
        metrics::counter!("vitalwatch_ingest_registry_reloads_total").increment(1);
        Ok(n)
    }

    /// The device's record, or `None` if it is not registered, for a message
    /// that arrived at `arrived`. An error means the registry could not be
    /// read: the caller must not decide yet.
    pub async fn device(
        &self,
        device_id: &str,
        arrived: Instant,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        if let Some(d) = self.devices.read().await.get(device_id) {
            return Ok(Some(d.clone()));
        }
        {
            // Decide under the lock, so a burst of unknown devices causes one
            // reload, not one each.
            let mut loaded_at = self.loaded_at.lock().await;
            if loaded_at.is_none_or(|t| t < arrived) {
                self.reload_locked(&mut loaded_at).await?;
            }
        }
        Ok(self.devices.read().await.get(device_id).cloned())
    }

    /// Keeps the snapshot fresh until `shutdown`: reloads on every change
    /// notification and every `every`. Reconnects the listener with backoff.
    pub async fn keep_fresh(
        self: Arc<Self>,
        url: String,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let (tx, mut changed) = mpsc::channel::<()>(1);
        let listener = tokio::spawn(vitalwatch_store::listen(
            url,
            CHANGE_CHANNEL,
            move || {
                // One pending signal is enough to cause a reload.
                let _ = tx.try_send(());
            },
            shutdown.clone(),
        ));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                Some(()) = changed.recv() => {
                    // Coalesce a burst of changes (a cohort import) into one reload.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while changed.try_recv().is_ok() {}
                }
                () = shutdown.cancelled() => break,
            }
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "device registry reload failed; keeping the last copy");
            }
        }
        listener.abort();
    }
}
