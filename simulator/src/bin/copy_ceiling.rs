//! `sluice-copy-ceiling`: what PostgreSQL alone can take into Sluice's
//! `points` table, to set beside the end-to-end rate.
//!
//! It writes synthetic points straight into the `points` table of a Sluice
//! database (schema already applied by `sluice serve`) the way the writer
//! does: binary COPY (`sluice_ingest::pgcopy::BinaryCopyWriter`) of
//! `(series_id, time, value)`, `--batch-rows` rows per transaction, on
//! `--connections` connections in parallel; with `--sorted`, each
//! transaction's rows sorted by (series, time) as the writer sends them
//! (without it, in arrival order, which PostgreSQL takes 1.4-1.8x more
//! slowly when there are many series). Series are real rows of the
//! `series` table (`ceiling-{d}` / `m{m}`); partitions for the whole time
//! range are created before the clock starts, through the same
//! `Partitions::ensure` the writer uses. Rows arrive like live telemetry:
//! every series' k-th point, then every series' (k+1)-th, each series a
//! random walk.
//!
//! Measured: encoding, COPY and commit of every transaction, from the
//! moment all connections are open and all values are generated until the
//! last commit. Not measured: series lookup, partition creation, value
//! generation, and the rollups and progress the writer also puts into its
//! transactions.
//!
//! Prints one JSON object on stdout:
//! `{"rows", "connections", "batch_rows", "sorted", "seconds", "rows_per_sec"}`;
//! progress goes to stderr.

use std::collections::HashMap;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, TimeDelta, Utc};
use clap::Parser;
use rand::Rng;
use serde_json::json;
use sluice_ingest::partitions::{PartitionConfig, Partitions, Table};
use sluice_ingest::pgcopy::BinaryCopyWriter;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

// The same allocator as `sluice`, so the ceiling's client side is not the
// slower of the two.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COPY_POINTS: &str = "COPY points (series_id, time, value) FROM STDIN (FORMAT binary)";

/// Binary COPY of synthetic points into Sluice's `points` table: the
/// PostgreSQL ceiling for the writer.
#[derive(Debug, Parser)]
#[command(name = "sluice-copy-ceiling", version)]
struct Args {
    /// PostgreSQL URL of a Sluice database (schema already migrated).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// Total rows to copy.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    rows: u64,

    /// Devices: series are `ceiling-{d}` × `m{m}`, d from 0.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,

    /// Metrics per device (`m0`, `m1`, …).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    metrics: u32,

    /// Connections copying in parallel; series i goes to connection i % C.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// Rows per transaction (the writer's default is 10000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    batch_rows: u64,

    /// Time of every series' first point, RFC 3339 [default: now minus 1 hour,
    /// truncated to the second].
    #[arg(long, value_parser = parse_rfc3339)]
    start: Option<DateTime<Utc>>,

    /// Milliseconds between a series' consecutive points.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    step_ms: u32,

    /// Sort each transaction's rows by (series, time) before encoding them,
    /// as the writer does (time spent sorting is measured).
    #[arg(long)]
    sorted: bool,
}

fn parse_rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time ({e})"))
}

/// One pre-generated row, as the writer holds it before encoding.
struct Row {
    series_id: i32,
    time: DateTime<Utc>,
    value: f64,
}

/// A bounded, mean-reverting random walk: plausible sensor values.
struct Walk {
    value: f64,
    centre: f64,
    step: f64,
}

impl Walk {
    fn new(metric: u32, rng: &mut impl Rng) -> Self {
        // A different level and scale per metric, like temperature,
        // humidity, pressure, ...
        let centre = 20.0 + 100.0 * f64::from(metric % 10);
        let step = 0.1 * f64::from(metric % 10 + 1);
        Walk {
            value: centre + rng.random_range(-10.0..10.0) * step,
            centre,
            step,
        }
    }

    fn next(&mut self, rng: &mut impl Rng) -> f64 {
        self.value += rng.random_range(-self.step..self.step) + (self.centre - self.value) * 0.002;
        // Two decimals, like a sensor's resolution.
        (self.value * 100.0).round() / 100.0
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = tokio::runtime::Runtime::new()
        .context("starting the tokio runtime")
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<serde_json::Value> {
    let series_count = u64::from(args.devices) * u64::from(args.metrics);
    if u64::from(args.connections) > series_count {
        bail!(
            "--connections ({}) is more than the {series_count} series (devices × metrics): \
             some connections would have nothing to copy",
            args.connections
        );
    }
    let rows = usize::try_from(args.rows).context("--rows does not fit in memory")?;
    let batch_rows = usize::try_from(args.batch_rows).context("--batch-rows is too large")?;
    let start = match args.start {
        Some(t) => t,
        None => {
            let hour_ago = Utc::now().timestamp() - 3600;
            DateTime::from_timestamp(hour_ago, 0).context("the clock is out of range")?
        }
    };
    let step = TimeDelta::milliseconds(i64::from(args.step_ms));
    // Row r is point r / S of series r % S.
    let last_k = (args.rows - 1) / series_count;
    let end = i32::try_from(last_k)
        .ok()
        .and_then(|k| step.checked_mul(k))
        .and_then(|span| start.checked_add_signed(span))
        .context("the last point's time is out of range; lower --rows or --step-ms")?;

    let options = PgConnectOptions::from_str(&args.database_url)
        .context("parsing --database-url")?
        .application_name("sluice-copy-ceiling");
    let mut conns = Vec::with_capacity(args.connections as usize);
    for i in 0..args.connections {
        let conn = PgConnection::connect_with(&options)
            .await
            .with_context(|| format!("opening connection {} of {}", i + 1, args.connections))?;
        conns.push(conn);
    }

    let ids = series_ids(&mut conns[0], args.devices, args.metrics).await?;
    eprintln!("{} series ready", ids.len());

    let mut partitions = Partitions::new(PartitionConfig::default());
    let width = TimeDelta::hours(i64::from(partitions.config().interval_hours.max(1)));
    let mut times = Vec::new();
    let mut t = start;
    while t < end {
        times.push(t);
        t = t
            .checked_add_signed(width)
            .context("partition times out of range")?;
    }
    times.push(end);
    partitions
        .ensure(&mut conns[0], Table::Points, times.into_iter())
        .await
        .with_context(|| format!("creating the points partitions for {start} .. {end}"))?;
    eprintln!("partitions ready for {start} .. {end}");

    let per_conn = generate(
        &ids,
        args.metrics,
        rows,
        args.connections as usize,
        start,
        step,
    )?;
    eprintln!(
        "{rows} rows generated; copying on {} connection(s), {batch_rows} rows per transaction",
        args.connections
    );

    let began = Instant::now();
    let sorted = args.sorted;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (conn, rows)) in conns.into_iter().zip(per_conn).enumerate() {
        tasks.spawn(async move {
            copy_all(conn, &rows, batch_rows, sorted)
                .await
                .with_context(|| format!("copying on connection {}", i + 1))
        });
    }
    let mut copied = 0u64;
    while let Some(joined) = tasks.join_next().await {
        copied += joined.context("a copy task failed")??;
    }
    let seconds = began.elapsed().as_secs_f64();
    if copied != args.rows {
        bail!(
            "PostgreSQL reports {copied} rows copied, expected {}",
            args.rows
        );
    }
    eprintln!("{copied} rows in {seconds:.3} s");
    Ok(json!({
        "rows": copied,
        "connections": args.connections,
        "batch_rows": args.batch_rows,
        "sorted": args.sorted,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "rows_per_sec": (copied as f64 / seconds).round() as u64,
    }))
}

/// Creates the series `ceiling-{d}` / `m{m}` if needed and returns their
/// ids, series i = d × metrics + m.
async fn series_ids(conn: &mut PgConnection, devices: u32, metrics: u32) -> Result<Vec<i32>> {
    let mut device_names = Vec::new();
    let mut metric_names = Vec::new();
    for d in 0..devices {
        for m in 0..metrics {
            device_names.push(format!("ceiling-{d}"));
            metric_names.push(format!("m{m}"));
        }
    }
    let found = sluice_ingest::create_series(conn, &device_names, &metric_names)
        .await
        .context("creating the series")?;
    let by_name: HashMap<(String, String), i32> = found
        .into_iter()
        .map(|(id, device, metric)| ((device, metric), id))
        .collect();
    device_names
        .into_iter()
        .zip(metric_names)
        .map(|key| {
            by_name
                .get(&key)
                .copied()
                .with_context(|| format!("series {key:?} is missing after its insert"))
        })
        .collect()
}

/// Generates every row, in arrival order, split by connection (series i
/// goes to connection i % connections).
fn generate(
    ids: &[i32],
    metrics: u32,
    rows: usize,
    connections: usize,
    start: DateTime<Utc>,
    step: TimeDelta,
) -> Result<Vec<Vec<Row>>> {
    let mut rng = rand::rng();
    let series = ids.len();
    // Series i is metric i % metrics of its device.
    let mut walks: Vec<Walk> = (0..series)
        .map(|i| Walk::new((i % metrics as usize) as u32, &mut rng))
        .collect();
    let mut out: Vec<Vec<Row>> = (0..connections)
        .map(|_| Vec::with_capacity(rows / connections + series))
        .collect();
    let mut time = start;
    for r in 0..rows {
        let i = r % series;
        if i == 0 && r > 0 {
            time = time
                .checked_add_signed(step)
                .context("point time out of range")?;
        }
        out[i % connections].push(Row {
            series_id: ids[i],
            time,
            value: walks[i].next(&mut rng),
        });
    }
    Ok(out)
}

/// Copies `rows` in transactions of `batch_rows`, encoding each as the
/// writer does; returns the rows PostgreSQL reports copied.
async fn copy_all(
    mut conn: PgConnection,
    rows: &[Row],
    batch_rows: usize,
    sorted: bool,
) -> Result<u64> {
    let mut copied = 0;
    let mut order: Vec<&Row> = Vec::with_capacity(batch_rows);
    for batch in rows.chunks(batch_rows) {
        order.clear();
        order.extend(batch);
        if sorted {
            order.sort_by_key(|r| (r.series_id, r.time));
        }
        let mut tx = conn.begin().await.context("BEGIN")?;
        let mut w = BinaryCopyWriter::new();
        for row in &order {
            w.begin_row(3);
            w.int4(row.series_id);
            w.timestamptz(row.time);
            w.float8(row.value);
        }
        let mut copy = tx.copy_in_raw(COPY_POINTS).await.context("starting COPY")?;
        copy.send(w.finish()).await.context("sending COPY data")?;
        copied += copy.finish().await.context("finishing COPY")?;
        tx.commit().await.context("COMMIT")?;
    }
    conn.close().await.context("closing the connection")?;
    Ok(copied)
}
