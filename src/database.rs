//! Finding the database, the same way for `serve` and every CLI command:
//! `--database-url`/`DATABASE_URL` if given, else the managed PostgreSQL under
//! `--data-dir`, started if it is not already running (and stopped again on
//! close only if this process started it).
//!
//! A CLI command fails at once if the database cannot be reached. `serve`
//! opens it with [`Database::open_for_serving`] instead: with a database URL
//! it gets a pool that connects on first use and waits for the server with
//! [`Database::wait_until_up`], so the broker can take (and spool)
//! telemetry through an outage that began before the start.

use crate::config::Config;
use anyhow::Context;
use sluice_ingest::managed::ManagedPostgres;
use sqlx::{Connection, PgPool};
use std::future::Future;
use std::time::Duration;
use tracing::{info, warn};

/// The first pause between attempts to reach the database; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Attempts never come further apart than this, so the database is found
/// soon after it comes back, and a log line per attempt stays rare.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one attempt to connect may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an attempt to reach the database failed.
enum Failure {
    /// The server is away (or went away meanwhile): wait for it.
    Away(anyhow::Error),
    /// The server answers but the migrations failed.
    Schema(anyhow::Error),
}

pub struct Database {
    pub pool: PgPool,
    managed: Option<ManagedPostgres>,
    /// Whether the schema is known to be up to date (the pool connected and migrated).
    migrated: bool,
}

impl Database {
    /// Connects (starting the managed server if needed) and applies migrations.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        match &config.database_url {
            Some(url) => {
                let pool = sluice_ingest::connect(url, config.database_max_connections)
                    .await
                    .context("cannot connect to PostgreSQL")?;
                Ok(Self {
                    pool,
                    managed: None,
                    migrated: true,
                })
            }
            None => Self::open_for_serving(config).await,
        }
    }

    /// For `serve`: with a database URL, a pool that connects on first use
    /// (call [`Database::wait_until_up`] before relying on it). The managed
    /// server is started and connected at once, and a failure is returned:
    /// a managed server that cannot start is a local setup error (binaries,
    /// permissions, the data directory), not an outage to wait out.
    pub async fn open_for_serving(config: &Config) -> anyhow::Result<Self> {
        if let Some(url) = &config.database_url {
            let pool = sluice_ingest::connect_lazy(url, config.database_max_connections)
                .context("invalid database URL")?;
            return Ok(Self {
                pool,
                managed: None,
                migrated: false,
            });
        }
        let pg = ManagedPostgres::start(&config.data_dir)
            .await
            .context("cannot start the managed PostgreSQL")?;
        info!(data_dir = %config.data_dir.display(), port = pg.port(), "managed PostgreSQL running");
        match sluice_ingest::connect(&pg.database_url(), config.database_max_connections).await {
            Ok(pool) => Ok(Self {
                pool,
                managed: Some(pg),
                migrated: true,
            }),
            Err(e) => {
                let _ = pg.stop().await;
                Err(e.context("cannot connect to PostgreSQL"))
            }
        }
    }

    /// Waits until the database answers and its schema is up to date,
    /// retrying with capped exponential backoff and logging each failed
    /// attempt with the next delay. `sluice_database_up` says which it is.
    /// `on_failure` runs after each failed attempt. Returns `false` if
    /// `stop` completes first, and an error if the migrations fail while
    /// the server answers (that is no outage to wait out).
    pub async fn wait_until_up(
        &mut self,
        stop: impl Future<Output = ()>,
        mut on_failure: impl FnMut(),
    ) -> anyhow::Result<bool> {
        tokio::pin!(stop);
        let mut delay = RETRY_FIRST;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = tokio::select! {
                r = self.try_up() => r,
                () = &mut stop => return Ok(false),
            };
            match attempt {
                Ok(()) => {
                    metrics::gauge!("sluice_database_up").set(1.0);
                    if attempts > 1 {
                        info!(attempts, "PostgreSQL is reachable");
                    }
                    return Ok(true);
                }
                Err(Failure::Schema(e)) => return Err(e),
                Err(Failure::Away(e)) => {
                    metrics::gauge!("sluice_database_up").set(0.0);
                    metrics::counter!("sluice_database_connect_failures_total").increment(1);
                    warn!(
                        error = format!("{e:#}"),
                        attempt = attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        "PostgreSQL is not reachable; MQTT clients are served and their \
                         messages kept in the spool until it is"
                    );
                    on_failure();
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut stop => return Ok(false),
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// One attempt: a connection of its own first (fails fast when the
    /// server is away, where the pool would retry until its acquire
    /// timeout), then the migrations through the pool.
    async fn try_up(&mut self) -> Result<(), Failure> {
        let options = self.pool.connect_options();
        let conn =
            tokio::time::timeout(ATTEMPT_TIMEOUT, sqlx::PgConnection::connect_with(&options))
                .await
                .map_err(|_| {
                    Failure::Away(anyhow::anyhow!("no connection within {ATTEMPT_TIMEOUT:?}"))
                })?
                .map_err(|e| Failure::Away(e.into()))?;
        let _ = conn.close().await;
        if !self.migrated {
            if let Err(e) = sluice_ingest::migrate(&self.pool).await {
                let e = e.context("cannot apply the schema migrations");
                // Still answering: the schema is the problem, and waiting
                // will not fix it.
                return Err(if Self::probe(&self.pool).await {
                    Failure::Schema(e)
                } else {
                    Failure::Away(e)
                });
            }
            self.migrated = true;
        }
        Ok(())
    }

    /// True if the database answers a trivial query within a few seconds.
    pub async fn probe(pool: &PgPool) -> bool {
        let query = sqlx::query("SELECT 1").execute(pool);
        matches!(
            tokio::time::timeout(ATTEMPT_TIMEOUT, query).await,
            Ok(Ok(_))
        )
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
