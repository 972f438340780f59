//! Storage: everything Sluice does with PostgreSQL.
//!
//! - [`managed`] runs a private PostgreSQL from the system's binaries when no
//!   database URL is given (and for tests' throw-away clusters).
//! - [`connect`] opens a pool and applies the schema in `migrations/`.
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
    let options = PgConnectOptions::from_str(database_url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .application_name("sluice");
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
