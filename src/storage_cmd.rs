//! `sluice storage …`: what the telemetry tables hold and cost, and their
//! upkeep on demand (the server runs the same upkeep every minute).

use crate::config::Config;
use crate::database::Database;
use clap::Subcommand;
use sluice_ingest::compaction;
use sluice_ingest::partitions::Partitions;
use sqlx::PgPool;

#[derive(Subcommand)]
pub enum StorageCommand {
    /// Rows, bytes and bytes per row of each table, indexes included.
    Stats,
    /// Create partitions ahead, apply retention and compact every closed
    /// points partition now.
    Maintain,
}

pub async fn run(config: &Config, command: StorageCommand) -> anyhow::Result<()> {
    let db = Database::open(config).await?;
    let result = match command {
        StorageCommand::Stats => stats(&db.pool).await,
        StorageCommand::Maintain => maintain(&db.pool, config).await,
    };
    db.close().await;
    result
}

/// A table, or a subset of a partitioned table's partitions.
struct Usage {
    name: String,
    rows: i64,
    table_bytes: i64,
    index_bytes: i64,
}

/// The table itself if it is not partitioned, else its partitions.
const LEAVES: &str = "(SELECT relid FROM pg_partition_tree($1::regclass) WHERE isleaf \
     UNION SELECT $1::regclass WHERE NOT EXISTS \
       (SELECT 1 FROM pg_partition_tree($1::regclass) WHERE level > 0))";

async fn usage(pool: &PgPool, name: &str, leaves: &str) -> anyhow::Result<Usage> {
    // `leaves` is one of the constant filters below; the table is bound.
    let (table_bytes, index_bytes): (Option<i64>, Option<i64>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT sum(pg_table_size(relid))::int8, sum(pg_indexes_size(relid))::int8 \
             FROM {LEAVES} t WHERE {leaves}"
        )))
        .bind(name)
        .fetch_one(pool)
        .await?;
    let mut rows = 0;
    let parts: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT relid::regclass::text FROM {LEAVES} t WHERE {leaves}"
    )))
    .bind(name)
    .fetch_all(pool)
    .await?;
    for part in parts {
        // Catalog names, quoted by regclass::text already.
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {part}")))
                .fetch_one(pool)
                .await?;
        rows += n;
    }
    Ok(Usage {
        name: name.to_string(),
        rows,
        table_bytes: table_bytes.unwrap_or(0),
        index_bytes: index_bytes.unwrap_or(0),
    })
}

const ALL: &str = "true";
const COMPACTED: &str = "EXISTS (SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
     JOIN pg_am am ON am.oid = i.relam WHERE x.indrelid = t.relid AND am.amname = 'brin')";

async fn stats(pool: &PgPool) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for table in [
        "points",
        "events",
        "dead_letters",
        "rollup_1m",
        "rollup_1h",
        "series",
    ] {
        lines.push(usage(pool, table, ALL).await?);
    }
    let mut compacted = usage(pool, "points", COMPACTED).await?;
    compacted.name = "  points, compacted partitions".into();
    let mut open = usage(pool, "points", &format!("NOT {COMPACTED}")).await?;
    open.name = "  points, other partitions".into();
    lines.insert(1, compacted);
    lines.insert(2, open);
    println!(
        "{:<32} {:>12} {:>14} {:>14} {:>14} {:>10}",
        "TABLE", "ROWS", "TABLE BYTES", "INDEX BYTES", "TOTAL BYTES", "BYTES/ROW"
    );
    for u in lines {
        let total = u.table_bytes + u.index_bytes;
        let per_row = if u.rows > 0 {
            format!("{:.1}", total as f64 / u.rows as f64)
        } else {
            "-".into()
        };
        println!(
            "{:<32} {:>12} {:>14} {:>14} {:>14} {:>10}",
            u.name, u.rows, u.table_bytes, u.index_bytes, total, per_row
        );
    }
    Ok(())
}

async fn maintain(pool: &PgPool, config: &Config) -> anyhow::Result<()> {
    let partitions = &config.ingest.partitions;
    let now = chrono::Utc::now();
    let dropped = Partitions::new(partitions.clone())
        .maintain(pool, now)
        .await?;
    for name in &dropped {
        println!("dropped {name} (retention)");
    }
    if compaction::reorder_latest(pool, true).await? {
        println!("rewrote series_latest in (device_id, metric) order");
    }
    if partitions.compact_after_hours == 0 {
        println!("compaction is off (ingest.partitions.compact_after_hours = 0)");
        return Ok(());
    }
    for name in compaction::compact_closed(pool, now, partitions.compact_after_hours).await? {
        println!("compacted {name}");
    }
    Ok(())
}
