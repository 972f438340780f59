//! Which connection holds each client id.
//!
//! MQTT 3.1.1 §3.1.4: a second connection with a client id that is already
//! connected takes over, and the server closes the first. The router does
//! this for connections that hold a router link, but most devices never
//! need one (see [`crate::publisher`]), so the edge keeps its own record.
//! The generation number also tells a closing connection whether it was
//! still the current one, so presence never reports "offline" after a
//! newer "online".
//!
//! The same record lets the credential check ([`super::revocation`]) find
//! and close the connection of a device revoked in the registry.

use super::presence::DisconnectReason;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;

/// What a device logged in with, to be checked against the registry later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLogin {
    pub device_id: String,
    /// The stored hash its secret was verified against; `None` for a
    /// client certificate, which no secret rotation concerns.
    pub secret_hash: Option<String>,
}

struct Holder {
    generation: u64,
    /// Taken when the connection is told to close; the entry stays until
    /// the connection releases it, so presence still knows it was current.
    close: Option<oneshot::Sender<DisconnectReason>>,
    login: Option<DeviceLogin>,
}

#[derive(Default)]
pub struct Sessions {
    next_generation: AtomicU64,
    live: DashMap<String, Holder>,
}

/// A connection's claim on its client id.
pub struct Claim {
    pub generation: u64,
    /// Resolves with the reason when the edge closes this connection from
    /// outside: a newer connection took the id over, or the device's
    /// credentials were revoked.
    pub closed: oneshot::Receiver<DisconnectReason>,
}

/// A live device connection, as the credential check sees it.
#[derive(Debug, Clone)]
pub struct LiveDevice {
    pub client_id: String,
    pub generation: u64,
    pub login: DeviceLogin,
}

impl Sessions {
    /// Claims `client_id` for a new connection, closing the previous holder.
    pub fn claim(&self, client_id: &str, login: Option<DeviceLogin>) -> Claim {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (close, closed) = oneshot::channel();
        let holder = Holder {
            generation,
            close: Some(close),
            login,
        };
        if let Some(close) = self
            .live
            .insert(client_id.to_owned(), holder)
            .and_then(|previous| previous.close)
        {
            let _ = close.send(DisconnectReason::TakenOver);
        }
        Claim { generation, closed }
    }

    /// Gives the id up; true if this connection was still its holder.
    pub fn release(&self, client_id: &str, generation: u64) -> bool {
        self.live
            .remove_if(client_id, |_, h| h.generation == generation)
            .is_some()
    }

    /// Every connected device (a snapshot).
    pub fn devices(&self) -> Vec<LiveDevice> {
        self.live
            .iter()
            .filter(|e| e.value().close.is_some())
            .filter_map(|e| {
                e.value().login.as_ref().map(|login| LiveDevice {
                    client_id: e.key().clone(),
                    generation: e.value().generation,
                    login: login.clone(),
                })
            })
            .collect()
    }

    /// Closes the connection holding `client_id` for `reason`, if it is
    /// still the one of `generation` (a newer one logged in afresh and is
    /// judged on its own). True if a connection was told to close.
    pub fn close(&self, client_id: &str, generation: u64, reason: DisconnectReason) -> bool {
        let Some(mut holder) = self.live.get_mut(client_id) else {
            return false;
        };
        if holder.generation != generation {
            return false;
        }
        holder
            .close
            .take()
            .is_some_and(|close| close.send(reason).is_ok())
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_claim_closes_the_old_one_and_only_the_newest_releases() {
        let s = Sessions::default();
        let mut old = s.claim("d:1", None);
        assert!(old.closed.try_recv().is_err());
        let new = s.claim("d:1", None);
        assert_eq!(old.closed.try_recv(), Ok(DisconnectReason::TakenOver));
        assert!(!s.release("d:1", old.generation));
        assert!(s.release("d:1", new.generation));
        assert!(s.is_empty());
    }

    #[test]
    fn only_the_generation_judged_is_closed() {
        let s = Sessions::default();
        let login = |hash: &str| {
            Some(DeviceLogin {
                device_id: "1".into(),
                secret_hash: Some(hash.into()),
            })
        };
        let first = s.claim("d:1", login("h1"));
        let _app = s.claim("a:dash:ui", None);
        let seen = s.devices();
        assert_eq!(seen.len(), 1, "applications are not devices");
        assert_eq!(seen[0].generation, first.generation);
        // The device reconnected after the snapshot: the verdict on the old
        // connection does not touch the new one.
        let mut second = s.claim("d:1", login("h2"));
        assert!(!s.close("d:1", first.generation, DisconnectReason::DeviceDisabled));
        assert!(second.closed.try_recv().is_err());
        assert!(s.close("d:1", second.generation, DisconnectReason::DeviceDisabled));
        assert_eq!(
            second.closed.try_recv(),
            Ok(DisconnectReason::DeviceDisabled)
        );
        // Told once; it still holds the id until its end releases it.
        assert!(!s.close("d:1", second.generation, DisconnectReason::DeviceDisabled));
        assert!(s.release("d:1", second.generation));
    }
}
