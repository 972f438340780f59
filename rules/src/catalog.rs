//! The catalog: every rule the server knows, from both sources, and the one
//! place that changes the active [`RuleSet`].
//!
//! Rules come from the rules directory (watched) and from the Admin API
//! (stored in PostgreSQL by the caller, handed here). Any change rebuilds
//! the whole set and swaps it in with one atomic pointer store, so every
//! message is handled by exactly one version of every rule. Names are unique
//! across sources; the directory wins a clash and the API refuses to deploy
//! over a directory rule.

use crate::processor::RuleContext;
use crate::ruleset::{DeployedRule, LoadError, RuleAction, RuleLoader, RuleSet, RuleSource};
use crate::status::{RuleStatsSnapshot, RuleStatus};
use crate::{Limits, RuleMonitor, StateStore};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tracing::info;

pub struct RuleCatalog {
    dir: Option<PathBuf>,
    inner: Mutex<Inner>,
    active: Arc<ArcSwap<RuleSet>>,
    monitor: Arc<RuleMonitor>,
    state: Arc<StateStore>,
}

struct Inner {
    loader: RuleLoader,
    deployed: BTreeMap<String, DeployedRule>,
    errors: Vec<LoadError>,
}

/// What the Admin API reports about one rule.
#[derive(Debug, Clone)]
pub struct RuleInfo {
    pub name: String,
    pub topic: String,
    pub source: RuleSource,
    /// `wasm` or `json-telemetry`.
    pub kind: &'static str,
    pub enabled: bool,
    pub status: RuleStatus,
    /// Why the current version did not load (an older one may still run).
    pub load_error: Option<String>,
    /// Effective limits of a WASM rule.
    pub limits: Option<Limits>,
    pub stats: RuleStatsSnapshot,
}

/// Why a catalog change was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Invalid(String),
    #[error("rule `{0}` comes from the rules directory; change its manifest there")]
    DirectoryRule(String),
    #[error("rule `{0}` does not exist")]
    NotFound(String),
}

impl RuleCatalog {
    /// Loads the directory and the `deployed` rules and makes them active.
    pub fn new(
        loader: RuleLoader,
        dir: Option<PathBuf>,
        deployed: Vec<DeployedRule>,
        context: &RuleContext,
    ) -> Arc<Self> {
        let catalog = Arc::new(Self {
            dir,
            inner: Mutex::new(Inner {
                loader,
                deployed: deployed.into_iter().map(|d| (d.name.clone(), d)).collect(),
                errors: Vec::new(),
            }),
            active: Arc::new(ArcSwap::from_pointee(RuleSet::default())),
            monitor: context.monitor.clone(),
            state: context.state.clone(),
        });
        catalog.reload();
        catalog
    }

    /// The active set, as the processors read it.
    pub fn active(&self) -> Arc<ArcSwap<RuleSet>> {
        self.active.clone()
    }

    pub fn dir(&self) -> Option<&PathBuf> {
        self.dir.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds the set from both sources and swaps it in; returns the errors.
    pub fn reload(&self) -> Vec<LoadError> {
        let mut inner = self.lock();
        self.reload_locked(&mut inner)
    }

    fn reload_locked(&self, inner: &mut Inner) -> Vec<LoadError> {
        let deployed: Vec<DeployedRule> = inner.deployed.values().cloned().collect();
        let (set, errors) = inner.loader.load(self.dir.as_deref(), &deployed);
        metrics::counter!("sluice_rule_reloads_total").increment(1);
        metrics::counter!("sluice_rule_load_errors_total").increment(errors.len() as u64);
        info!(rules = ?set.names(), errors = errors.len(), "rules loaded");
        self.active.store(Arc::new(set));
        inner.errors = errors.clone();
        errors
    }

    /// Checks and compiles a rule about to be deployed, changing nothing
    /// that runs: call before storing it, then [`Self::deploy`].
    pub fn check(&self, rule: &DeployedRule) -> Result<(), CatalogError> {
        let mut inner = self.lock();
        if self.is_directory_rule(&rule.name) {
            return Err(CatalogError::DirectoryRule(rule.name.clone()));
        }
        inner.loader.precompile(rule).map_err(CatalogError::Invalid)
    }

    /// Makes a (checked and stored) rule version active.
    pub fn deploy(&self, rule: DeployedRule) -> Result<(), CatalogError> {
        let mut inner = self.lock();
        let name = rule.name.clone();
        inner.deployed.insert(name.clone(), rule);
        let errors = self.reload_locked(&mut inner);
        match errors
            .into_iter()
            .find(|e| e.rule.as_deref() == Some(&name))
        {
            Some(e) => Err(CatalogError::Invalid(e.reason)),
            None => Ok(()),
        }
    }

    /// Enables or disables a deployed rule. Enabling also lifts a suspension.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), CatalogError> {
        let mut inner = self.lock();
        match inner.deployed.get_mut(name) {
            Some(d) => d.enabled = enabled,
            None if self.is_directory_rule(name) => {
                return Err(CatalogError::DirectoryRule(name.to_owned()));
            }
            None => return Err(CatalogError::NotFound(name.to_owned())),
        }
        if enabled {
            self.monitor.resume(name);
        }
        self.reload_locked(&mut inner);
        Ok(())
    }

    /// Removes a deployed rule with its in-memory state and counters.
    pub fn remove(&self, name: &str) -> Result<(), CatalogError> {
        let mut inner = self.lock();
        if inner.deployed.remove(name).is_none() {
            return Err(if self.is_directory_rule(name) {
                CatalogError::DirectoryRule(name.to_owned())
            } else {
                CatalogError::NotFound(name.to_owned())
            });
        }
        self.reload_locked(&mut inner);
        self.state.remove_rule(name);
        self.monitor.remove(name);
        Ok(())
    }

    fn is_directory_rule(&self, name: &str) -> bool {
        self.active
            .load()
            .rules
            .iter()
            .any(|r| &*r.name == name && !matches!(r.source, RuleSource::Api { .. }))
    }

    /// Every rule: active ones, disabled deployed ones, and the ones that
    /// failed to load, by name.
    pub fn describe(&self) -> Vec<RuleInfo> {
        let inner = self.lock();
        let set = self.active.load();
        let mut out: BTreeMap<String, RuleInfo> = BTreeMap::new();
        for rule in &set.rules {
            let (kind, limits) = match &rule.action {
                RuleAction::JsonTelemetry => ("json-telemetry", None),
                RuleAction::Wasm(v) => ("wasm", Some(v.limits.clone())),
            };
            let stats = self.monitor.stats(&rule.name);
            out.insert(
                rule.name.to_string(),
                RuleInfo {
                    name: rule.name.to_string(),
                    topic: rule.filter.as_str().to_owned(),
                    source: rule.source.clone(),
                    kind,
                    enabled: true,
                    status: stats.status(),
                    load_error: None,
                    limits,
                    stats: stats.snapshot(),
                },
            );
        }
        for d in inner.deployed.values() {
            // Shadowed by a directory rule of the same name: that one runs.
            if out
                .get(&d.name)
                .is_some_and(|i| !matches!(i.source, RuleSource::Api { .. }))
            {
                continue;
            }
            let entry = out.entry(d.name.clone()).or_insert_with(|| RuleInfo {
                name: d.name.clone(),
                topic: d.topic.clone(),
                source: RuleSource::Api { version: d.version },
                kind: "wasm",
                enabled: d.enabled,
                status: RuleStatus::Active,
                load_error: None,
                limits: Some(inner.loader.defaults().with_overrides(&d.limits)),
                stats: self
                    .monitor
                    .get(&d.name)
                    .map(|s| s.snapshot())
                    .unwrap_or_default(),
            });
            entry.enabled = d.enabled;
        }
        for e in &inner.errors {
            let Some(name) = &e.rule else { continue };
            if let Some(info) = out.get_mut(name) {
                info.load_error = Some(e.reason.clone());
            } else if e.origin.ends_with(".toml") {
                out.insert(
                    name.clone(),
                    RuleInfo {
                        name: name.clone(),
                        topic: String::new(),
                        source: RuleSource::Directory(PathBuf::from(&e.origin)),
                        kind: "wasm",
                        enabled: false,
                        status: RuleStatus::Active,
                        load_error: Some(e.reason.clone()),
                        limits: None,
                        stats: RuleStatsSnapshot::default(),
                    },
                );
            }
        }
        out.into_values().collect()
    }

    pub fn get(&self, name: &str) -> Option<RuleInfo> {
        self.describe().into_iter().find(|r| r.name == name)
    }
}
