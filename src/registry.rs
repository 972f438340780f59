//! The device registry as the broker's edge sees it: credentials and
//! presence, backed by the `devices` table.

use sluice_broker::{BoxFuture, DeviceCredential, DeviceRegistry};
use sluice_ingest::devices;
use sqlx::PgPool;
use std::collections::HashMap;

pub struct PgDeviceRegistry {
    pool: PgPool,
}

impl PgDeviceRegistry {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl DeviceRegistry for PgDeviceRegistry {
    fn credential<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceCredential>, String>> {
        Box::pin(async move {
            devices::credentials(&self.pool, id)
                .await
                .map(|found| {
                    found.map(|(secret_hash, enabled)| DeviceCredential {
                        secret_hash,
                        enabled,
                    })
                })
                .map_err(|e| e.to_string())
        })
    }

    fn credentials_of<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<HashMap<String, DeviceCredential>, String>> {
        Box::pin(async move {
            let rows = devices::credentials_of(&self.pool, ids)
                .await
                .map_err(|e| e.to_string())?;
            Ok(rows
                .into_iter()
                .map(|(id, secret_hash, enabled)| {
                    (
                        id,
                        DeviceCredential {
                            secret_hash,
                            enabled,
                        },
                    )
                })
                .collect())
        })
    }

    fn verify_secret(&self, secret: &str, hash: &str) -> bool {
        devices::verify_secret(secret, hash)
    }

    fn record_presence<'a>(
        &'a self,
        id: &'a str,
        online: bool,
        at: chrono::DateTime<chrono::Utc>,
        connected_at: chrono::DateTime<chrono::Utc>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            devices::record_presence(&self.pool, id, online, at, connected_at)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
