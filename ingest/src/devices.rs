//! The device registry: who may connect, with which secret.
//!
//! Secrets are generated here, shown to the operator once, and stored only as
//! Argon2id hashes (PHC strings, so parameters can change without a
//! migration). Checking a secret is deliberately expensive; the device edge
//! caches successful checks and bounds how many run at once.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use sqlx::PgPool;

/// Length of generated secrets: 32 alphanumerics ≈ 190 bits.
const SECRET_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Device {
    pub id: String,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub last_connect_at: Option<DateTime<Utc>>,
    pub last_disconnect_at: Option<DateTime<Utc>>,
    pub online: bool,
    pub metadata: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device `{0}` already exists")]
    Exists(String),
    #[error("device `{0}` does not exist")]
    NotFound(String),
    #[error("invalid device id `{0}`: 1–256 characters, none of `/ + # $` or control characters")]
    InvalidId(String),
    #[error("metadata must be a JSON object")]
    InvalidMetadata,
    #[error("hashing the secret failed: {0}")]
    Hash(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Device ids are MQTT client ids and topic levels: keep them to what both allow.
pub fn validate_id(id: &str) -> Result<(), DeviceError> {
    let ok = !id.is_empty()
        && id.chars().count() <= 256
        && !id
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '$') || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(DeviceError::InvalidId(id.to_owned()))
    }
}

pub fn generate_secret() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(SECRET_LEN)
        .map(char::from)
        .collect()
}

pub fn hash_secret(secret: &str) -> Result<String, DeviceError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| DeviceError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DeviceError::Hash(e.to_string()))
}

/// Constant-time check of a secret against a stored PHC hash; a malformed hash never matches.
pub fn verify_secret(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok()
    })
}

/// The columns of [`Device`]; a macro so queries stay static strings.
macro_rules! columns {
    () => {
        "id, enabled, created_at, last_connect_at, last_disconnect_at, online, metadata"
    };
}

/// Creates a device and returns it with its secret, which is not stored anywhere in clear.
pub async fn create(
    pool: &PgPool,
    id: &str,
    metadata: serde_json::Value,
) -> Result<(Device, String), DeviceError> {
    validate_id(id)?;
    if !metadata.is_object() {
        return Err(DeviceError::InvalidMetadata);
    }
    let secret = generate_secret();
    let hash = hash_secret(&secret)?;
    let device = sqlx::query_as::<_, Device>(concat!(
        "INSERT INTO devices (id, secret_hash, metadata) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO NOTHING RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(hash)
    .bind(metadata)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| DeviceError::Exists(id.to_owned()))?;
    Ok((device, secret))
}

pub async fn list(pool: &PgPool) -> Result<Vec<Device>, DeviceError> {
    Ok(
        sqlx::query_as(concat!("SELECT ", columns!(), " FROM devices ORDER BY id"))
            .fetch_all(pool)
            .await?,
    )
}

/// One page of devices in id order: those whose id starts with `prefix`,
/// strictly after `after`.
pub async fn list_page(
    pool: &PgPool,
    prefix: &str,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Device>, DeviceError> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM devices WHERE starts_with(id, $1) AND ($2::text IS NULL OR id > $2) ORDER BY id LIMIT $3"
    ))
    .bind(prefix)
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?)
}

/// Changes the given fields; `None` leaves a field as it is.
pub async fn update(
    pool: &PgPool,
    id: &str,
    enabled: Option<bool>,
    metadata: Option<serde_json::Value>,
) -> Result<Device, DeviceError> {
    if metadata.as_ref().is_some_and(|m| !m.is_object()) {
        return Err(DeviceError::InvalidMetadata);
    }
    sqlx::query_as(concat!(
        "UPDATE devices SET enabled = COALESCE($2, enabled), metadata = COALESCE($3, metadata) \
         WHERE id = $1 RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(enabled)
    .bind(metadata)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| DeviceError::NotFound(id.to_owned()))
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Device, DeviceError> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM devices WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| DeviceError::NotFound(id.to_owned()))
}

pub async fn set_enabled(pool: &PgPool, id: &str, enabled: bool) -> Result<Device, DeviceError> {
    update(pool, id, Some(enabled), None).await
}

pub async fn delete(pool: &PgPool, id: &str) -> Result<(), DeviceError> {
    let done = sqlx::query("DELETE FROM devices WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(DeviceError::NotFound(id.to_owned()));
    }
    Ok(())
}

/// Replaces the secret; the old one stops working at once. Returns the new secret.
pub async fn rotate_secret(pool: &PgPool, id: &str) -> Result<String, DeviceError> {
    let secret = generate_secret();
    let hash = hash_secret(&secret)?;
    let done = sqlx::query("UPDATE devices SET secret_hash = $2 WHERE id = $1")
        .bind(id)
        .bind(hash)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(DeviceError::NotFound(id.to_owned()));
    }
    Ok(secret)
}

/// The stored hash and enabled flag, for authentication.
pub async fn credentials(pool: &PgPool, id: &str) -> Result<Option<(String, bool)>, DeviceError> {
    Ok(
        sqlx::query_as("SELECT secret_hash, enabled FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// The stored hash and enabled flag of each of `ids` that exists, for
/// re-checking devices that are connected.
pub async fn credentials_of(
    pool: &PgPool,
    ids: &[String],
) -> Result<Vec<(String, String, bool)>, DeviceError> {
    Ok(
        sqlx::query_as("SELECT id, secret_hash, enabled FROM devices WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await?,
    )
}

/// Records a connect (`online`) or a disconnect. A disconnect is ignored if
/// the device connected again after `connected_at` (its newer connection
/// is the one that counts).
pub async fn record_presence(
    pool: &PgPool,
    id: &str,
    online: bool,
    at: DateTime<Utc>,
    connected_at: DateTime<Utc>,
) -> Result<(), DeviceError> {
    if online {
        sqlx::query("UPDATE devices SET online = true, last_connect_at = $2 WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(pool)
            .await?;
    } else {
        sqlx::query(
            "UPDATE devices SET online = (last_connect_at > $3), last_disconnect_at = $2 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(at)
        .bind(connected_at)
        .execute(pool)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_hash_and_verify() {
        let secret = generate_secret();
        assert_eq!(secret.len(), SECRET_LEN);
        assert_ne!(secret, generate_secret());
        let hash = hash_secret(&secret).unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains(&secret));
        assert!(verify_secret(&secret, &hash));
        assert!(!verify_secret("wrong", &hash));
        assert!(!verify_secret(&secret, "not a hash"));
    }

    #[test]
    fn ids_must_fit_mqtt() {
        assert!(validate_id("dev-1").is_ok());
        for bad in ["", "a/b", "a+b", "a#", "$sys", "a\nb", &"x".repeat(257)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }
}
