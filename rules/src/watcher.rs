//! Hot reload: watches the rules directory and has the catalog rebuild the
//! active rule set when it changes.
//!
//! Changes are debounced (a copy of a large module arrives as many write
//! events), then the catalog reloads and swaps the new set in with one
//! atomic pointer store. The pipeline picks up the new set at its next
//! batch; batches already running finish on the old one. So every message is
//! handled by exactly one version, and none waits for a compile.

use crate::catalog::RuleCatalog;
use notify::{RecursiveMode, Watcher};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use tracing::error;

const QUIET_PERIOD: Duration = Duration::from_millis(200);

/// Stops watching when dropped.
pub struct RulesWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl RulesWatcher {
    /// Watches the catalog's directory; an error if it has none.
    pub fn spawn(catalog: Arc<RuleCatalog>) -> notify::Result<Self> {
        let dir = catalog
            .dir()
            .cloned()
            .ok_or_else(|| notify::Error::generic("the catalog has no rules directory"))?;
        let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(tx)?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        std::thread::Builder::new()
            .name("rules-watch".into())
            .spawn(move || {
                // Ends when the watcher (and so the sender) is dropped.
                while let Ok(first) = rx.recv() {
                    if let Err(e) = first {
                        error!(error = %e, "watching the rules directory failed");
                    }
                    while rx.recv_timeout(QUIET_PERIOD).is_ok() {}
                    catalog.reload();
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(Self { _watcher: watcher })
    }
}
