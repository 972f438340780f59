//! API tokens of the gRPC API: created, listed and revoked by `sluice tokens`,
//! looked up by the API on each call (through its cache).
//!
//! A token is `slc_` followed by 43 base64url characters (256 random bits).
//! Only its SHA-256 is stored: a stolen database does not hand out working
//! tokens, and a fast hash suffices because the token has full entropy.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// Every token starts with this, so secret scanners and people can tell one.
pub const PREFIX: &str = "slc_";

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every `sluice.v1.Telemetry` call.
    Read,
    /// `Telemetry` and `sluice.v1.Admin`.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub name: String,
    pub scope: Scope,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl Token {
    /// Why the token may not be used at `now`, if it may not.
    pub fn refusal(&self, now: DateTime<Utc>) -> Option<&'static str> {
        if self.revoked_at.is_some() {
            Some("the API token was revoked")
        } else if self.expires_at.is_some_and(|t| t <= now) {
            Some("the API token has expired")
        } else {
            None
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token name must be 1-128 characters of A-Z a-z 0-9 _ . -")]
    BadName,
    #[error("a token named {0:?} exists already")]
    Exists(String),
    #[error("no token named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The SHA-256 of a presented token: the key it is stored and looked up by.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn generate() -> String {
    format!(
        "{PREFIX}{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    )
}

fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

type Row = (
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

fn from_row((name, scope, created_at, expires_at, revoked_at, last_used_at): Row) -> Token {
    Token {
        name,
        // The table's CHECK allows only the two scopes; an unknown one
        // (a newer server's) gets the lesser.
        scope: Scope::parse(&scope).unwrap_or(Scope::Read),
        created_at,
        expires_at,
        revoked_at,
        last_used_at,
    }
}

const COLUMNS: &str = "name, scope, created_at, expires_at, revoked_at, last_used_at";

/// Creates a token; returns it with its secret text, which exists nowhere
/// else from now on.
pub async fn create(
    pool: &PgPool,
    name: &str,
    scope: Scope,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(Token, String), TokenError> {
    if !valid_name(name) {
        return Err(TokenError::BadName);
    }
    let secret = generate();
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_tokens (name, scope, token_sha256, expires_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO NOTHING RETURNING {COLUMNS}"
    )))
    .bind(name)
    .bind(scope.as_str())
    .bind(digest(&secret).as_slice())
    .bind(expires_at)
    .fetch_optional(pool)
    .await?;
    let row = row.ok_or_else(|| TokenError::Exists(name.to_owned()))?;
    Ok((from_row(row), secret))
}

pub async fn list(pool: &PgPool) -> Result<Vec<Token>, TokenError> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM api_tokens ORDER BY name"
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Revokes the token for good (it stays listed, marked revoked).
pub async fn revoke(pool: &PgPool, name: &str) -> Result<(), TokenError> {
    let done = sqlx::query(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE name = $1",
    )
    .bind(name)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(TokenError::NotFound(name.to_owned()));
    }
    Ok(())
}

/// The token whose SHA-256 is `digest`, whatever its state.
pub async fn find(pool: &PgPool, digest: &[u8; 32]) -> Result<Option<Token>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM api_tokens WHERE token_sha256 = $1"
    )))
    .bind(digest.as_slice())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(from_row))
}

/// Records that the token was used (coarsely: the API calls this at most
/// once per cache refresh, not per call).
pub async fn touch(pool: &PgPool, digest: &[u8; 32]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE api_tokens SET last_used_at = now() WHERE token_sha256 = $1")
        .bind(digest.as_slice())
        .execute(pool)
        .await?;
    Ok(())
}

/// The server's secret key for `purpose`, made (256 random bits) by
/// whichever server asks first.
pub async fn server_key(pool: &PgPool, purpose: &str) -> Result<[u8; 32], sqlx::Error> {
    sqlx::query("INSERT INTO server_keys (purpose, secret) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(purpose)
        .bind(rand::random::<[u8; 32]>().as_slice())
        .execute(pool)
        .await?;
    let (secret,): (Vec<u8>,) = sqlx::query_as("SELECT secret FROM server_keys WHERE purpose = $1")
        .bind(purpose)
        .fetch_one(pool)
        .await?;
    // The CHECK keeps it at least 32 bytes; the first 32 are the key.
    let mut key = [0u8; 32];
    key.copy_from_slice(&secret[..32]);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hash_to_32_bytes() {
        let (a, b) = (generate(), generate());
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 43, "{a}");
        assert_ne!(a, b);
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest(&a), digest(&a.clone()));
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("grafana-read.1"));
        assert!(!valid_name(""));
        assert!(!valid_name("has space"));
        assert!(!valid_name(&"x".repeat(129)));
    }

    #[test]
    fn revoked_and_expired_tokens_are_refused() {
        let now = Utc::now();
        let t = Token {
            name: "t".into(),
            scope: Scope::Read,
            created_at: now,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        };
        assert_eq!(t.refusal(now), None);
        let expired = Token {
            expires_at: Some(now),
            ..t.clone()
        };
        assert!(expired.refusal(now).is_some());
        let revoked = Token {
            revoked_at: Some(now),
            ..t
        };
        assert!(revoked.refusal(now).is_some());
    }
}
