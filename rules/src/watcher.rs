//! Hot reload: watches the rules directory and swaps in a new rule set when
//! it changes.
//!
//! Changes are debounced (a copy of a large module arrives as many write
//! events), then the whole directory is reloaded and the new set is stored
//! with one atomic pointer swap. The pipeline picks up the new set at its next
//! batch; batches already running finish on the old one. So every message is
//! handled by exactly one version, and none waits for a compile.

use crate::ruleset::{RuleLoader, RuleSet};
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use tracing::{error, info};

const QUIET_PERIOD: Duration = Duration::from_millis(200);

/// Stops watching when dropped.
pub struct RulesWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl RulesWatcher {
    pub fn spawn(
        dir: PathBuf,
        mut loader: RuleLoader,
        rules: Arc<ArcSwap<RuleSet>>,
    ) -> notify::Result<Self> {
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
                    let (set, errors) = loader.load(Some(&dir));
                    metrics::counter!("sluice_rule_reloads_total").increment(1);
                    metrics::counter!("sluice_rule_load_errors_total")
                        .increment(errors.len() as u64);
                    info!(rules = ?set.names(), errors = errors.len(), "rules reloaded");
                    rules.store(Arc::new(set));
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(Self { _watcher: watcher })
    }
}
