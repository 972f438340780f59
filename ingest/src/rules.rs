//! Rules deployed through the Admin API, and persisted per-device rule state.
//!
//! The `rules` table holds what `DeployRule` was given (module bytes, topic
//! filter, config, limits), so deployed rules survive restarts. Rule state
//! is written by the writer with the batches that change it; here it is only
//! read back at start and deleted with its rule.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Rule names are used in metric labels, log fields and file names.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid rule name `{name}`: 1–128 characters of A–Z a–z 0–9 _ . -, starting with a letter or digit"
        ))
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredRule {
    pub name: String,
    pub topic: String,
    pub module: Vec<u8>,
    pub module_sha256: String,
    pub config: serde_json::Value,
    pub limits: serde_json::Value,
    pub enabled: bool,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What `DeployRule` stores.
#[derive(Debug, Clone)]
pub struct NewRule<'a> {
    pub name: &'a str,
    pub topic: &'a str,
    pub module: &'a [u8],
    pub module_sha256: &'a str,
    pub config: &'a serde_json::Value,
    pub limits: &'a serde_json::Value,
    pub enabled: bool,
}

pub async fn list(pool: &PgPool) -> Result<Vec<StoredRule>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM rules ORDER BY name")
        .fetch_all(pool)
        .await
}

pub async fn get(pool: &PgPool, name: &str) -> Result<Option<StoredRule>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM rules WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// Inserts the rule or replaces it, counting the version up; returns the row.
pub async fn upsert(pool: &PgPool, rule: &NewRule<'_>) -> Result<StoredRule, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO rules (name, topic, module, module_sha256, config, limits, enabled) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (name) DO UPDATE SET topic = EXCLUDED.topic, module = EXCLUDED.module, \
           module_sha256 = EXCLUDED.module_sha256, config = EXCLUDED.config, \
           limits = EXCLUDED.limits, enabled = EXCLUDED.enabled, \
           version = rules.version + 1, updated_at = now() \
         RETURNING *",
    )
    .bind(rule.name)
    .bind(rule.topic)
    .bind(rule.module)
    .bind(rule.module_sha256)
    .bind(rule.config)
    .bind(rule.limits)
    .bind(rule.enabled)
    .fetch_one(pool)
    .await
}

/// Returns false when no such rule exists.
pub async fn set_enabled(pool: &PgPool, name: &str, enabled: bool) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE rules SET enabled = $2, updated_at = now() WHERE name = $1")
        .bind(name)
        .bind(enabled)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Deletes the rule and its per-device state; false when no such rule exists.
pub async fn delete(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query("DELETE FROM rules WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    delete_state_in(&mut tx, name).await?;
    tx.commit().await?;
    Ok(done.rows_affected() > 0)
}

/// Forgets every device's state of a rule.
pub async fn delete_state(pool: &PgPool, rule: &str) -> Result<u64, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    delete_state_in(&mut conn, rule).await
}

async fn delete_state_in(conn: &mut sqlx::PgConnection, rule: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM rule_state WHERE rule = $1")
        .bind(rule)
        .execute(conn)
        .await?
        .rows_affected())
}

/// One persisted state entry.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StateRow {
    pub rule: String,
    pub device_id: String,
    pub key: String,
    pub value: Vec<u8>,
}

/// Every persisted state entry, to load into memory at start. Bounded by
/// each rule's per-device state limit times the devices that have state.
pub async fn load_state(pool: &PgPool) -> Result<Vec<StateRow>, sqlx::Error> {
    sqlx::query_as("SELECT rule, device_id, key, value FROM rule_state")
        .fetch_all(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn rule_names() {
        for ok in ["a", "threshold", "avg-1m", "v2.rule_x"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
