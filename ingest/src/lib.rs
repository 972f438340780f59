//! Storage: everything Sluice does with PostgreSQL.
//!
//! - [`managed`] runs a private PostgreSQL from the system's binaries when no
//!   database URL is given (and for tests' throw-away clusters).
//! - [`connect`] opens a pool and applies the schema in `migrations/`
//!   ([`connect_lazy`] and [`migrate`] do it in two steps).
//! - [`writer`] is the batching binary-COPY writer, the only inserter.
//! - [`partitions`] creates time partitions ahead of the writer and drops them for retention;
//!   [`compaction`] sorts closed points partitions and swaps their btree for BRIN.
//! - [`rollup`] keeps the 1-minute and 1-hour aggregates, merged by the writer.
//! - [`query`] holds the read queries the gRPC API serves.
//! - [`rules`] stores deployed rules and loads persisted rule state.

pub mod compaction;
pub mod devices;
pub mod live;
pub mod managed;
pub mod partitions;
pub mod pgcopy;
pub mod query;
pub mod record;
pub mod rollup;
pub mod rules;
pub mod tokens;
pub mod writer;

pub use record::{DeadLetterRecord, EventRecord, PointRecord, Record, StateRecord};
pub use writer::{
    OnStored, Sink, StoredProgress, Writer, WriterConfig, WriterStopped, create_series, shard_of,
    spawn_writer, start_writer,
};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The schema, embedded at build time from the workspace's `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens a connection pool and brings the schema up to date.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    // Connects at once, so an unreachable server fails here (a CLI command
    // should say so rather than wait out the pool's acquire timeout).
    let pool = pool_options(max_connections)
        .connect_with(connect_options(database_url)?)
        .await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// A pool that connects on first use: for a server that must start while
/// the database is still away (the broker serves meanwhile), then waits
/// for it with [`migrate`].
pub fn connect_lazy(database_url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    Ok(pool_options(max_connections).connect_lazy_with(connect_options(database_url)?))
}

fn connect_options(database_url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(database_url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .application_name("sluice"))
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| Box::pin(durable_commits(conn)))
}

/// A committed batch lets the spool forget its messages, so a commit must
/// survive a crash of PostgreSQL. With `synchronous_commit = off` the
/// server acknowledges commits it can lose when it crashes or is stopped
/// with `-m immediate` (seen in `tests/durability.rs`: acknowledged
/// messages gone after the restart), so this session turns it back on.
/// Every other setting (`local`, `remote_write`, `remote_apply`) keeps
/// local commits durable and is left alone.
async fn durable_commits(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let mode: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut *conn)
        .await?;
    if mode == "off" {
        sqlx::query("SET synchronous_commit = on")
            .execute(&mut *conn)
            .await?;
        WARNED.call_once(|| {
            tracing::warn!(
                "the server has synchronous_commit = off; Sluice's sessions use on, \
                 since the spool forgets what a commit covers"
            );
        });
    }
    Ok(())
}

/// Brings the schema up to date; fails if the database cannot be reached.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
