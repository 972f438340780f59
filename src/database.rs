//! Finding the database, the same way for `serve` and every CLI command:
//! `--database-url`/`DATABASE_URL` if given, else the managed PostgreSQL under
//! `--data-dir`, started if it is not already running (and stopped again on
//! close only if this process started it).

use crate::config::Config;
use anyhow::Context;
use sluice_ingest::managed::ManagedPostgres;
use sqlx::PgPool;
use tracing::{info, warn};

pub struct Database {
    pub pool: PgPool,
    managed: Option<ManagedPostgres>,
}

impl Database {
    /// Connects (starting the managed server if needed) and applies migrations.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let (url, managed) = match &config.database_url {
            Some(url) => (url.clone(), None),
            None => {
                let pg = ManagedPostgres::start(&config.data_dir)
                    .await
                    .context("cannot start the managed PostgreSQL")?;
                info!(data_dir = %config.data_dir.display(), port = pg.port(), "managed PostgreSQL running");
                (pg.database_url(), Some(pg))
            }
        };
        match sluice_ingest::connect(&url, config.database_max_connections).await {
            Ok(pool) => Ok(Self { pool, managed }),
            Err(e) => {
                if let Some(pg) = managed {
                    let _ = pg.stop().await;
                }
                Err(e.context("cannot connect to PostgreSQL"))
            }
        }
    }

    pub async fn close(self) {
        self.pool.close().await;
        if let Some(pg) = self.managed
            && let Err(e) = pg.stop().await
        {
            warn!(error = %e, "stopping the managed PostgreSQL failed");
        }
    }
}
