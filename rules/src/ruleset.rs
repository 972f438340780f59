//! The set of active rules, and loading it from a rules directory.

use crate::manifest::{LimitOverrides, Limits, Manifest};
use crate::router::FilterIndex;
use crate::topic::TopicFilter;
use crate::wasm::{RuleEngine, WasmModule};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{info, warn};

/// Name of the built-in rule that decodes `devices/+/telemetry`.
pub const BUILTIN_TELEMETRY_RULE: &str = "telemetry";
pub const BUILTIN_TELEMETRY_FILTER: &str = "devices/+/telemetry";
/// The `decoder` value that selects the built-in JSON telemetry decoder in a manifest.
pub const JSON_TELEMETRY_DECODER: &str = "json-telemetry";

pub struct Rule {
    pub name: Arc<str>,
    pub filter: TopicFilter,
    pub action: RuleAction,
    pub source: RuleSource,
}

/// Where a rule came from: each source owns its names.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleSource {
    Builtin,
    /// A manifest in the rules directory.
    Directory(PathBuf),
    /// Deployed through the Admin API; `version` counts its deploys.
    Api {
        version: i32,
    },
}

/// A rule deployed through the Admin API, as stored in the database.
#[derive(Debug, Clone)]
pub struct DeployedRule {
    pub name: String,
    pub topic: String,
    pub module: Arc<[u8]>,
    /// The `[config]` object handed to `sluice_init`, as JSON.
    pub config_json: Vec<u8>,
    pub limits: LimitOverrides,
    pub enabled: bool,
    pub version: i32,
}

pub enum RuleAction {
    JsonTelemetry,
    Wasm(Arc<WasmRuleVersion>),
}

/// One deployed version of a WASM rule: module, limits and config together,
/// so a change to any of them is a new version.
pub struct WasmRuleVersion {
    pub module: WasmModule,
    pub limits: Limits,
    pub config_json: Vec<u8>,
    digest: u64,
}

impl WasmRuleVersion {
    /// Identifies the version: a hash of module bytes, config and limits.
    pub fn digest(&self) -> u64 {
        self.digest
    }
}

/// An immutable snapshot of the active rules. The pipeline reads one snapshot
/// per batch, so every message is handled by exactly one version of the set.
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// The rules' filters, indexed: routing cost does not grow with the
    /// number of rules.
    index: FilterIndex,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Self {
        let index = FilterIndex::new(rules.iter().map(|r| &r.filter));
        Self { rules, index }
    }

    /// Appends the positions (in `rules`) of the rules matching `topic`.
    pub fn matching(&self, topic: &str, out: &mut Vec<usize>) {
        self.index.matches(topic, out);
    }

    pub fn names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| &*r.name).collect()
    }
}

/// Builds rule sets, reusing compiled modules whose bytes, config and limits
/// have not changed (compiling is the expensive part of a reload).
pub struct RuleLoader {
    engine: Arc<RuleEngine>,
    defaults: Limits,
    builtin_telemetry: bool,
    compiled: HashMap<String, Arc<WasmRuleVersion>>,
}

/// A rule that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct LoadError {
    /// The manifest's path, or `api:NAME` for a deployed rule.
    pub origin: String,
    /// The rule's name, when it is known.
    pub rule: Option<String>,
    pub reason: String,
}

impl RuleLoader {
    pub fn new(engine: Arc<RuleEngine>, defaults: Limits, builtin_telemetry: bool) -> Self {
        Self {
            engine,
            defaults,
            builtin_telemetry,
            compiled: HashMap::new(),
        }
    }

    /// Loads every `*.toml` manifest of `dir`, then the enabled `deployed`
    /// rules. A rule that fails to load keeps its previously loaded version,
    /// if any, so a bad deploy does not take a working rule away; the errors
    /// are returned to be reported.
    pub fn load(
        &mut self,
        dir: Option<&Path>,
        deployed: &[DeployedRule],
    ) -> (RuleSet, Vec<LoadError>) {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        if self.builtin_telemetry {
            rules.push(Rule {
                name: BUILTIN_TELEMETRY_RULE.into(),
                filter: TopicFilter::new(BUILTIN_TELEMETRY_FILTER).expect("valid built-in filter"),
                action: RuleAction::JsonTelemetry,
                source: RuleSource::Builtin,
            });
        }
        let mut manifests = match dir.map(list_manifests).transpose() {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                errors.push(LoadError {
                    origin: dir.unwrap_or(Path::new("")).display().to_string(),
                    rule: None,
                    reason: e.to_string(),
                });
                Vec::new()
            }
        };
        manifests.sort();
        let mut kept = HashMap::new();
        for path in manifests {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            match self.load_rule(&path, &stem) {
                Ok(rule) => {
                    if rules.iter().any(|r| r.name == rule.name) {
                        errors.push(LoadError {
                            origin: path.display().to_string(),
                            rule: Some(rule.name.to_string()),
                            reason: format!("a rule named `{}` already exists", rule.name),
                        });
                        continue;
                    }
                    if let RuleAction::Wasm(v) = &rule.action {
                        kept.insert(rule.name.to_string(), v.clone());
                    }
                    rules.push(rule);
                }
                Err(reason) => {
                    warn!(path = %path.display(), %reason, "rule not loaded");
                    errors.push(LoadError {
                        origin: path.display().to_string(),
                        rule: Some(stem.clone()),
                        reason,
                    });
                    // Keep the last good version under the same name, if there is one.
                    if let (Some(old), Ok(filter)) =
                        (self.compiled.get(&stem), self.previous_filter(&path))
                    {
                        kept.insert(stem.clone(), old.clone());
                        rules.push(Rule {
                            name: stem.as_str().into(),
                            filter,
                            action: RuleAction::Wasm(old.clone()),
                            source: RuleSource::Directory(path.clone()),
                        });
                    }
                }
            }
        }
        for d in deployed.iter().filter(|d| d.enabled) {
            let origin = format!("api:{}", d.name);
            if rules.iter().any(|r| *r.name == *d.name) {
                errors.push(LoadError {
                    origin,
                    rule: Some(d.name.clone()),
                    reason: format!(
                        "a rule named `{}` is also in the rules directory, which wins",
                        d.name
                    ),
                });
                continue;
            }
            match self.deployed_rule(d) {
                Ok(rule) => {
                    if let RuleAction::Wasm(v) = &rule.action {
                        kept.insert(d.name.clone(), v.clone());
                    }
                    rules.push(rule);
                }
                Err(reason) => {
                    warn!(rule = %d.name, %reason, "deployed rule not loaded");
                    errors.push(LoadError {
                        origin,
                        rule: Some(d.name.clone()),
                        reason,
                    });
                }
            }
        }
        self.compiled = kept;
        (RuleSet::new(rules), errors)
    }

    /// Compiles a deployed rule (or reuses its compiled version).
    pub fn deployed_rule(&mut self, d: &DeployedRule) -> Result<Rule, String> {
        let filter =
            TopicFilter::new(&d.topic).map_err(|e| format!("invalid topic filter: {e}"))?;
        let limits = self.defaults.with_overrides(&d.limits);
        let version = self.version(&d.name, &d.module, limits, d.config_json.clone())?;
        Ok(Rule {
            name: d.name.as_str().into(),
            filter,
            action: RuleAction::Wasm(version),
            source: RuleSource::Api { version: d.version },
        })
    }

    /// Compiles a rule about to be deployed and keeps the result, so the
    /// reload that follows the deploy does not compile it again.
    pub fn precompile(&mut self, d: &DeployedRule) -> Result<(), String> {
        let rule = self.deployed_rule(d)?;
        if let RuleAction::Wasm(v) = rule.action {
            self.compiled.insert(d.name.clone(), v);
        }
        Ok(())
    }

    pub fn defaults(&self) -> &Limits {
        &self.defaults
    }

    fn previous_filter(&self, path: &Path) -> Result<TopicFilter, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let manifest = Manifest::parse(&text).map_err(|e| e.to_string())?;
        TopicFilter::new(&manifest.topic).map_err(|e| e.to_string())
    }

    fn load_rule(&mut self, path: &Path, stem: &str) -> Result<Rule, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read manifest: {e}"))?;
        let manifest = Manifest::parse(&text).map_err(|e| format!("invalid manifest: {e}"))?;
        let name: Arc<str> = manifest.name.as_deref().unwrap_or(stem).into();
        let filter =
            TopicFilter::new(&manifest.topic).map_err(|e| format!("invalid topic filter: {e}"))?;
        if !manifest.enabled {
            return Err("disabled in its manifest".into());
        }
        let action = match (&manifest.decoder, &manifest.module) {
            (Some(_), Some(_)) => return Err("set either `module` or `decoder`, not both".into()),
            (Some(d), None) if d == JSON_TELEMETRY_DECODER => RuleAction::JsonTelemetry,
            (Some(d), None) => {
                return Err(format!(
                    "unknown decoder `{d}` (known: {JSON_TELEMETRY_DECODER})"
                ));
            }
            (None, module) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let module_path = dir.join(
                    module
                        .clone()
                        .unwrap_or_else(|| format!("{stem}.wasm").into()),
                );
                let wasm = std::fs::read(&module_path)
                    .map_err(|e| format!("cannot read module {}: {e}", module_path.display()))?;
                let limits = self.defaults.with_overrides(&manifest.limits);
                let config_json = serde_json::to_vec(&manifest.config.clone().unwrap_or_default())
                    .map_err(|e| format!("config is not representable as JSON: {e}"))?;
                RuleAction::Wasm(self.version(&name, &wasm, limits, config_json)?)
            }
        };
        Ok(Rule {
            name,
            filter,
            action,
            source: RuleSource::Directory(path.to_owned()),
        })
    }

    /// Returns the compiled version for these inputs, compiling only when they changed.
    pub fn version(
        &mut self,
        name: &str,
        wasm: &[u8],
        limits: Limits,
        config_json: Vec<u8>,
    ) -> Result<Arc<WasmRuleVersion>, String> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (wasm, &config_json, &limits).hash(&mut h);
        let digest = h.finish();
        if let Some(v) = self.compiled.get(name).filter(|v| v.digest == digest) {
            return Ok(v.clone());
        }
        let pool = self.engine.pool();
        if limits.memory_mb > pool.max_memory_mb {
            return Err(format!(
                "memory_mb {} is above the server's maximum (rules.pool.max_memory_mb = {})",
                limits.memory_mb, pool.max_memory_mb
            ));
        }
        if limits.table_elements > pool.max_table_elements {
            return Err(format!(
                "table_elements {} is above the server's maximum (rules.pool.max_table_elements = {})",
                limits.table_elements, pool.max_table_elements
            ));
        }
        let module = self.engine.compile(wasm)?;
        info!(rule = name, bytes = wasm.len(), "compiled rule module");
        Ok(Arc::new(WasmRuleVersion {
            module,
            limits,
            config_json,
            digest,
        }))
    }
}

fn list_manifests(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            out.push(path);
        }
    }
    Ok(out)
}
