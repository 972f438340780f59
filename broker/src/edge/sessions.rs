//! Which connection holds each client id.
//!
//! MQTT 3.1.1 §3.1.4: a second connection with a client id that is already
//! connected takes over, and the server closes the first. The router does
//! this for connections that hold a router link, but most devices never
//! need one (see [`crate::publisher`]), so the edge keeps its own record.
//! The generation number also tells a closing connection whether it was
//! still the current one, so presence never reports "offline" after a
//! newer "online".

use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Sessions {
    next_generation: AtomicU64,
    live: DashMap<String, (u64, oneshot::Sender<()>)>,
}

/// A connection's claim on its client id.
pub struct Claim {
    pub generation: u64,
    /// Resolves (`Ok`) when a newer connection takes the id over.
    pub taken_over: oneshot::Receiver<()>,
}

impl Sessions {
    /// Claims `client_id` for a new connection, closing the previous holder.
    pub fn claim(&self, client_id: &str) -> Claim {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, taken_over) = oneshot::channel();
        if let Some((_, previous)) = self.live.insert(client_id.to_owned(), (generation, tx)) {
            let _ = previous.send(());
        }
        Claim {
            generation,
            taken_over,
        }
    }

    /// Gives the id up; true if this connection was still its holder.
    pub fn release(&self, client_id: &str, generation: u64) -> bool {
        self.live
            .remove_if(client_id, |_, (g, _)| *g == generation)
            .is_some()
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
        let mut old = s.claim("d:1");
        assert!(old.taken_over.try_recv().is_err());
        let new = s.claim("d:1");
        assert!(old.taken_over.try_recv().is_ok());
        assert!(!s.release("d:1", old.generation));
        assert!(s.release("d:1", new.generation));
        assert!(s.is_empty());
    }
}
