//! `sluice devices …`: the device registry from the command line.
//!
//! Secrets go to standard output alone, so scripts can capture them; the
//! explanation goes to standard error.

use crate::config::Config;
use crate::database::Database;
use clap::Subcommand;
use sluice_ingest::devices;

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// Register a device; prints its generated secret once.
    Create {
        id: String,
        /// Free-form JSON object stored with the device.
        #[arg(long, default_value = "{}")]
        metadata: String,
    },
    /// List every device.
    List,
    /// Refuse the device's connections from now on.
    Disable { id: String },
    /// Allow a disabled device again.
    Enable { id: String },
    /// Remove the device and its secret.
    Delete { id: String },
    /// Replace the device's secret; prints the new one once.
    RotateSecret { id: String },
}

pub async fn run(config: &Config, command: DevicesCommand) -> anyhow::Result<()> {
    let db = Database::open(config).await?;
    let result = execute(&db, command).await;
    db.close().await;
    result
}

async fn execute(db: &Database, command: DevicesCommand) -> anyhow::Result<()> {
    let pool = &db.pool;
    match command {
        DevicesCommand::Create { id, metadata } => {
            let metadata: serde_json::Value = serde_json::from_str(&metadata)
                .map_err(|e| anyhow::anyhow!("--metadata is not JSON: {e}"))?;
            let (device, secret) = devices::create(pool, &id, metadata).await?;
            eprintln!(
                "created device {}; its secret follows and will not be shown again",
                device.id
            );
            println!("{secret}");
        }
        DevicesCommand::List => {
            println!(
                "{:<32} {:<8} {:<7} {:<25} {:<25} METADATA",
                "ID", "ENABLED", "ONLINE", "CREATED", "LAST CONNECT"
            );
            for d in devices::list(pool).await? {
                let last = d
                    .last_connect_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<32} {:<8} {:<7} {:<25} {:<25} {}",
                    d.id,
                    d.enabled,
                    d.online,
                    d.created_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    last,
                    d.metadata
                );
            }
        }
        DevicesCommand::Disable { id } => {
            devices::set_enabled(pool, &id, false).await?;
            eprintln!("device {id} disabled");
        }
        DevicesCommand::Enable { id } => {
            devices::set_enabled(pool, &id, true).await?;
            eprintln!("device {id} enabled");
        }
        DevicesCommand::Delete { id } => {
            devices::delete(pool, &id).await?;
            eprintln!("device {id} deleted");
        }
        DevicesCommand::RotateSecret { id } => {
            let secret = devices::rotate_secret(pool, &id).await?;
            eprintln!(
                "device {id} has a new secret; the old one no longer works. It follows and will not be shown again"
            );
            println!("{secret}");
        }
    }
    Ok(())
}
