//! Closing the connections of devices revoked while connected.
//!
//! A login is checked against the registry once, at CONNECT. Every
//! `credential_check_ms` this task reads the registry entries of all
//! connected devices again and closes each connection whose device was
//! disabled, deleted, or given a new secret since it logged in, so an
//! operator's `sluice devices disable` (or a rotation after a leak) reaches
//! open connections within one interval plus one query.
//!
//! Why a poll and not PostgreSQL LISTEN/NOTIFY: notifications sent while
//! the listening connection is down are lost, so a full re-read would be
//! needed after every reconnect anyway; a poll is that re-read, it also sees
//! changes made with plain SQL, and it costs one indexed query per interval
//! (the API's token revocations take effect the same way).

use super::EdgeShared;
use super::auth::{DeviceCredential, REGISTRY_TIMEOUT};
use super::presence::DisconnectReason;
use super::sessions::LiveDevice;
use metrics::counter;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Ids per registry query: bounds one query's size when many devices are
/// connected.
const IDS_PER_QUERY: usize = 10_000;

/// Runs until the broker shuts down.
pub(crate) async fn run(shared: Arc<EdgeShared>) {
    let every = Duration::from_millis(shared.config.credential_check_ms.max(100));
    let mut shutdown = shared.shutdown.subscribe();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticks.tick() => check_once(&shared).await,
        }
    }
}

/// One pass over every connected device.
async fn check_once(shared: &EdgeShared) {
    let live = shared.sessions.devices();
    for chunk in live.chunks(IDS_PER_QUERY) {
        let ids: Vec<String> = chunk.iter().map(|d| d.login.device_id.clone()).collect();
        let lookup = shared.auth.registry().credentials_of(&ids);
        let found = match tokio::time::timeout(REGISTRY_TIMEOUT, lookup).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return skipped(&e),
            Err(_) => return skipped("no answer from the registry in time"),
        };
        for device in chunk {
            let Some(reason) = verdict(device, &found) else {
                continue;
            };
            // Counted when the connection ends, under
            // `sluice_disconnects_total{reason}`.
            if shared
                .sessions
                .close(&device.client_id, device.generation, reason)
            {
                info!(
                    device = device.login.device_id,
                    reason = reason.as_str(),
                    "closing the connection of a revoked device"
                );
            }
        }
    }
}

/// The database is away: nobody can change a device meanwhile either, so
/// the connections stay, and the next pass tries again.
fn skipped(error: &str) {
    counter!("sluice_credential_checks_failed_total").increment(1);
    warn!(
        error,
        "cannot re-check connected devices against the registry"
    );
}

/// Why a connection must close, if it must.
fn verdict(
    device: &LiveDevice,
    registry: &HashMap<String, DeviceCredential>,
) -> Option<DisconnectReason> {
    match registry.get(&device.login.device_id) {
        None => Some(DisconnectReason::DeviceDeleted),
        Some(c) if !c.enabled => Some(DisconnectReason::DeviceDisabled),
        Some(c)
            if device
                .login
                .secret_hash
                .as_ref()
                .is_some_and(|h| *h != c.secret_hash) =>
        {
            Some(DisconnectReason::SecretRotated)
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::sessions::DeviceLogin;

    fn live(id: &str, hash: Option<&str>) -> LiveDevice {
        LiveDevice {
            client_id: format!("d:{id}"),
            generation: 1,
            login: DeviceLogin {
                device_id: id.into(),
                secret_hash: hash.map(Into::into),
            },
        }
    }

    #[test]
    fn disabled_deleted_and_rotated_devices_are_closed() {
        let cred = |hash: &str, enabled| DeviceCredential {
            secret_hash: hash.into(),
            enabled,
        };
        let registry = HashMap::from([
            ("ok".to_string(), cred("h", true)),
            ("off".to_string(), cred("h", false)),
            ("rotated".to_string(), cred("h2", true)),
            ("cert".to_string(), cred("h2", true)),
        ]);
        assert_eq!(verdict(&live("ok", Some("h")), &registry), None);
        assert_eq!(
            verdict(&live("off", Some("h")), &registry),
            Some(DisconnectReason::DeviceDisabled)
        );
        assert_eq!(
            verdict(&live("gone", Some("h")), &registry),
            Some(DisconnectReason::DeviceDeleted)
        );
        assert_eq!(
            verdict(&live("rotated", Some("h")), &registry),
            Some(DisconnectReason::SecretRotated)
        );
        // A certificate login has no secret to rotate.
        assert_eq!(verdict(&live("cert", None), &registry), None);
    }
}
