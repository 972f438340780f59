//! `sluice tokens …`: API tokens of the gRPC API from the command line.
//!
//! The token goes to standard output alone, so scripts can capture it; the
//! explanation goes to standard error.

use crate::config::Config;
use crate::database::Database;
use clap::{Subcommand, ValueEnum};
use sluice_ingest::tokens::{self, Scope};

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Create a token; prints it once (only its hash is stored).
    Create {
        /// A name to list and revoke it by: 1-128 of A-Z a-z 0-9 _ . -
        name: String,
        /// `read`: every Telemetry call; `admin`: Telemetry and Admin.
        #[arg(long, value_enum)]
        scope: ScopeArg,
        /// Days until the token stops working [default: never].
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List every token (never the tokens themselves).
    List,
    /// Stop a token working (running servers notice within a few seconds).
    Revoke { name: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    Read,
    Admin,
}

pub async fn run(config: &Config, command: TokensCommand) -> anyhow::Result<()> {
    let db = Database::open(config).await?;
    let result = execute(&db.pool, command).await;
    db.close().await;
    result
}

async fn execute(pool: &sqlx::PgPool, command: TokensCommand) -> anyhow::Result<()> {
    match command {
        TokensCommand::Create {
            name,
            scope,
            expires_in_days,
        } => {
            let scope = match scope {
                ScopeArg::Read => Scope::Read,
                ScopeArg::Admin => Scope::Admin,
            };
            let expires_at =
                expires_in_days.map(|d| chrono::Utc::now() + chrono::Duration::days(i64::from(d)));
            let (token, secret) = tokens::create(pool, &name, scope, expires_at).await?;
            eprintln!(
                "created API token {} with scope {}; it follows and will not be shown again. \
                 Send it as the metadata `authorization: Bearer <token>`.",
                token.name,
                token.scope.as_str()
            );
            println!("{secret}");
        }
        TokensCommand::List => {
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{:<32} {:<6} {:<21} {:<21} {:<21} LAST USED",
                "NAME", "SCOPE", "CREATED", "EXPIRES", "REVOKED"
            );
            for t in tokens::list(pool).await? {
                println!(
                    "{:<32} {:<6} {:<21} {:<21} {:<21} {}",
                    t.name,
                    t.scope.as_str(),
                    when(Some(t.created_at)),
                    when(t.expires_at),
                    when(t.revoked_at),
                    when(t.last_used_at)
                );
            }
        }
        TokensCommand::Revoke { name } => {
            tokens::revoke(pool, &name).await?;
            eprintln!("API token {name} revoked");
        }
    }
    Ok(())
}
