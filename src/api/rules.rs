//! The rule calls of `sluice.v1.Admin`: deploy, list, get, enable, disable,
//! delete. The database is the record of deployed rules and the catalog is
//! what runs; every change is checked first, stored second and made active
//! last, so a failure at any step leaves both as they were. The caller
//! serializes the changing calls, so the database and the catalog see them
//! in the same order.

use super::page_token::{Kind, PageSigner, fingerprint};
// `db_error`: a value PostgreSQL refuses (SQLSTATE class 22) is
// INVALID_ARGUMENT, not "try again".
use super::telemetry::{
    check_json_no_nul, check_no_nul, checked_page_size, db_error, to_timestamp,
};
use sha2::Digest;
use sluice_ingest::rules::{self as stored, NewRule, StoredRule};
use sluice_proto::v1::{
    DeployRuleRequest, ListRulesRequest, ListRulesResponse, Rule, RuleCounters, RuleLimits,
    rule::{Source, Status as RuleStatusProto},
};
use sluice_rules::{
    CatalogError, DeployedRule, LimitOverrides, Limits, RuleCatalog, RuleInfo, RuleSource,
    RuleStatus,
};
use sqlx::PgPool;
use std::sync::Arc;
use tonic::Status;
use tracing::info;

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1_000;
/// Modules above this are refused before anything else happens.
pub const MAX_MODULE_BYTES: usize = 32 << 20;

pub async fn deploy(
    pool: &PgPool,
    catalog: &Arc<RuleCatalog>,
    r: DeployRuleRequest,
) -> Result<Rule, Status> {
    stored::validate_name(&r.name).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
    sluice_rules::TopicFilter::new(&r.topic_filter)
        .map_err(|e| Status::invalid_argument(format!("topic_filter: {e}")))?;
    if r.module.is_empty() {
        return Err(Status::invalid_argument("module: empty"));
    }
    if r.module.len() > MAX_MODULE_BYTES {
        return Err(Status::invalid_argument(format!(
            "module: {} bytes, the maximum is {MAX_MODULE_BYTES}",
            r.module.len()
        )));
    }
    let config: serde_json::Value = if r.config_json.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(&r.config_json)
            .map_err(|e| Status::invalid_argument(format!("config_json is not JSON: {e}")))?
    };
    if !config.is_object() {
        return Err(Status::invalid_argument(
            "config_json must be a JSON object",
        ));
    }
    check_json_no_nul(&config, "config_json")?;
    let limits = from_proto_limits(r.limits.unwrap_or_default());
    let limits_json = serde_json::to_value(&limits).expect("limits serialize");
    let sha = hex_sha256(&r.module);
    let mut rule = DeployedRule {
        name: r.name.clone(),
        topic: r.topic_filter.clone(),
        module: r.module.clone().into(),
        config_json: config.to_string().into_bytes(),
        limits,
        enabled: !r.disabled,
        // Counted by the database on store; checking does not need it.
        version: 0,
    };
    // Compile and check first: a module that cannot run is never stored.
    // Compiling is seconds of CPU for a large module: off the async workers.
    let checked = {
        let (catalog, rule) = (catalog.clone(), rule.clone());
        tokio::task::spawn_blocking(move || catalog.check(&rule))
            .await
            .map_err(|e| Status::internal(format!("the compile task failed: {e}")))?
    };
    checked.map_err(catalog_status)?;
    let row = stored::upsert(
        pool,
        &NewRule {
            name: &rule.name,
            topic: &rule.topic,
            module: &r.module,
            module_sha256: &sha,
            config: &config,
            limits: &limits_json,
            enabled: rule.enabled,
        },
    )
    .await
    .map_err(db_error)?;
    rule.version = row.version;
    catalog.deploy(rule).map_err(catalog_status)?;
    info!(rule = %row.name, version = row.version, bytes = r.module.len(), "rule deployed");
    describe(pool, catalog, &row.name).await
}

pub async fn list(
    pool: &PgPool,
    catalog: &RuleCatalog,
    pages: &PageSigner,
    r: ListRulesRequest,
) -> Result<ListRulesResponse, Status> {
    let limit = checked_page_size(r.limit, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)? as usize;
    let query = fingerprint(&[r.name_prefix.as_bytes()]);
    let after = pages.decode_after_name(Kind::Rules, &query, &r.page_token)?;
    let rows: Vec<StoredRule> = stored::list(pool).await.map_err(db_error)?;
    let mut infos: Vec<RuleInfo> = catalog
        .describe()
        .into_iter()
        .filter(|i| i.name.starts_with(&r.name_prefix))
        .filter(|i| after.as_ref().is_none_or(|a| i.name > *a))
        .collect();
    let next_page_token = if infos.len() > limit {
        infos.truncate(limit);
        pages.encode_after_name(Kind::Rules, &query, &infos.last().expect("limit ≥ 1").name)
    } else {
        String::new()
    };
    Ok(ListRulesResponse {
        rules: infos
            .into_iter()
            .map(|i| {
                let row = rows.iter().find(|row| row.name == i.name);
                to_proto(i, row)
            })
            .collect(),
        next_page_token,
    })
}

pub async fn describe(pool: &PgPool, catalog: &RuleCatalog, name: &str) -> Result<Rule, Status> {
    let info = catalog
        .get(name)
        .ok_or_else(|| Status::not_found(format!("rule `{name}` does not exist")))?;
    let row = stored::get(pool, name).await.map_err(db_error)?;
    Ok(to_proto(info, row.as_ref()))
}

pub async fn set_enabled(
    pool: &PgPool,
    catalog: &RuleCatalog,
    name: &str,
    enabled: bool,
) -> Result<Rule, Status> {
    if catalog.get(name).is_none() {
        return Err(Status::not_found(format!("rule `{name}` does not exist")));
    }
    // Known to the catalog but not stored: a directory or built-in rule.
    if !stored::set_enabled(pool, name, enabled)
        .await
        .map_err(db_error)?
    {
        return Err(catalog_status(CatalogError::DirectoryRule(name.to_owned())));
    }
    catalog.set_enabled(name, enabled).map_err(catalog_status)?;
    info!(rule = %name, enabled, "rule {}", if enabled { "enabled" } else { "disabled" });
    describe(pool, catalog, name).await
}

pub async fn delete(pool: &PgPool, catalog: &RuleCatalog, name: &str) -> Result<(), Status> {
    check_no_nul(name, "name")?;
    if !stored::delete(pool, name).await.map_err(db_error)? {
        return Err(catalog_status(match catalog.get(name) {
            Some(_) => CatalogError::DirectoryRule(name.to_owned()),
            None => CatalogError::NotFound(name.to_owned()),
        }));
    }
    catalog.remove(name).map_err(catalog_status)?;
    info!(rule = %name, "rule deleted");
    Ok(())
}

/// A stored rule as the catalog takes it.
pub fn deployed_rule(row: StoredRule) -> anyhow::Result<DeployedRule> {
    let limits: LimitOverrides = serde_json::from_value(row.limits)
        .map_err(|e| anyhow::anyhow!("rule `{}` has unreadable limits: {e}", row.name))?;
    Ok(DeployedRule {
        config_json: row.config.to_string().into_bytes(),
        module: row.module.into(),
        name: row.name,
        topic: row.topic,
        limits,
        enabled: row.enabled,
        version: row.version,
    })
}

fn to_proto(i: RuleInfo, row: Option<&StoredRule>) -> Rule {
    let (status, status_reason) = match (&i.load_error, &i.status, i.enabled) {
        (Some(e), _, _) => (RuleStatusProto::LoadError, e.clone()),
        (None, _, false) => (RuleStatusProto::Disabled, String::new()),
        (None, RuleStatus::Suspended { reason, since }, true) => (
            RuleStatusProto::Suspended,
            format!("{reason} (since {})", since.to_rfc3339()),
        ),
        (None, RuleStatus::Active, true) => (RuleStatusProto::Active, String::new()),
    };
    let (source, version) = match i.source {
        RuleSource::Api { version } => (Source::Api, version),
        RuleSource::Directory(_) => (Source::Directory, 0),
        RuleSource::Builtin => (Source::Builtin, 0),
    };
    let s = i.stats;
    Rule {
        name: i.name,
        topic_filter: i.topic,
        source: source as i32,
        kind: i.kind.into(),
        enabled: i.enabled,
        status: status as i32,
        status_reason,
        version,
        module_sha256: row.map(|r| r.module_sha256.clone()).unwrap_or_default(),
        config_json: row.map(|r| r.config.to_string()).unwrap_or_default(),
        limits: i.limits.as_ref().map(to_proto_limits),
        counters: Some(RuleCounters {
            invocations: s.invocations,
            messages_in: s.messages_in,
            stored: s.stored,
            dropped: s.dropped,
            dead_letters: s.dead_letters,
            points: s.points,
            events: s.events,
            publishes: s.publishes,
            state_writes: s.state_writes,
            failures: s.failures.into_iter().collect(),
            batch_p50: prost_types::Duration::try_from(s.batch_p50).ok(),
            batch_p99: prost_types::Duration::try_from(s.batch_p99).ok(),
        }),
        updated_at: row.map(|r| to_timestamp(r.updated_at)),
    }
}

fn to_proto_limits(l: &Limits) -> RuleLimits {
    RuleLimits {
        timeout_ms: Some(l.timeout_ms),
        memory_mb: Some(l.memory_mb),
        max_outputs_per_message: Some(l.max_outputs_per_message),
        table_elements: Some(l.table_elements),
        state_bytes: Some(l.state_bytes),
    }
}

fn from_proto_limits(l: RuleLimits) -> LimitOverrides {
    LimitOverrides {
        timeout_ms: l.timeout_ms,
        memory_mb: l.memory_mb,
        max_outputs_per_message: l.max_outputs_per_message,
        table_elements: l.table_elements,
        state_bytes: l.state_bytes,
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn catalog_status(e: CatalogError) -> Status {
    match e {
        CatalogError::Invalid(reason) if reason.contains(" is above the server's maximum") => {
            Status::invalid_argument(format!("limits.{reason}"))
        }
        CatalogError::Invalid(reason) => Status::invalid_argument(format!("module: {reason}")),
        CatalogError::DirectoryRule(_) => Status::failed_precondition(e.to_string()),
        CatalogError::NotFound(_) => Status::not_found(e.to_string()),
    }
}
