//! `sluice serve`: start every part, wait for a signal, stop in order.
//!
//! Start-up order: the broker opens the spool and binds its listeners, the
//! gRPC server starts (health only: Telemetry NOT_SERVING), then Sluice
//! waits for PostgreSQL. Once it answers, migrations run, the writer reads
//! what the database holds of the spool, rule state and deployed rules
//! load, and the pipeline replays whatever the spool held from before (a
//! crash); only then does the broker accept connections and the API serve.
//!
//! If PostgreSQL does not answer at the first attempt, the broker accepts
//! at once instead: devices publish into the spool, acknowledged once
//! durable there (and delayed once it is full), and the replay and the new
//! messages are stored in spool order when the database comes. Logins that
//! need the registry wait `auth_timeout_ms` and get CONNACK 3 meanwhile.
//!
//! Shutdown order is what makes "flush every batch" true: first the broker
//! stops accepting and closes client connections (after sending the acks of
//! what is durable), which closes the spool; the pipeline finishes what the
//! spool holds, the writer flushes its last batch, the spool's checkpoint is
//! saved, and only then do the API, the pool and the managed PostgreSQL go
//! away.

use crate::api;
use crate::config::Config;
use crate::database::Database;
use crate::pipeline;
use crate::registry::PgDeviceRegistry;
use anyhow::Context;
use sluice_broker::{Broker, SpoolCheckpoint};
use sluice_rules::{
    DeployedRule, ParallelProcessor, ProcessorConfig, RuleCatalog, RuleContext, RuleEngine,
    RuleLoader, RulesWatcher, StateChange, StateStore,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

/// How often `sluice_database_up` is refreshed once running.
const PROBE_EVERY: Duration = Duration::from_secs(5);

pub async fn serve(config: Config) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(config.metrics_listen)
        .install()
        .with_context(|| format!("cannot serve metrics on {}", config.metrics_listen))?;
    // Before anything waits: a SIGTERM while the database is awaited must
    // stop cleanly rather than kill the process.
    let mut signals = Signals::new()?;

    let mut db = Database::open_for_serving(&config).await?;
    let result = run(&config, &mut db, &mut signals).await;
    db.close().await;
    result
}

/// SIGTERM and SIGINT.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM: shutting down"),
            _ = self.int.recv() => info!("SIGINT: shutting down"),
        }
    }
}

async fn run(config: &Config, db: &mut Database, signals: &mut Signals) -> anyhow::Result<()> {
    if config.broker.allow_anonymous {
        warn!("anonymous MQTT clients are allowed (--allow-anonymous): for development only");
    }
    if config.ingest.discard {
        warn!(
            "ingest.discard is on: telemetry is counted and thrown away, nothing is stored \
             (for benchmarking only)"
        );
    }
    if config.api.allow_anonymous {
        warn!(
            "gRPC calls are served without an API token (--allow-anonymous): for development only"
        );
    }
    let pool = db.pool.clone();
    let broker_cfg = config.broker.clone();
    let registry = Arc::new(PgDeviceRegistry::new(pool.clone()));
    // The identity lives beside the segments it names: `broker.spool.dir`
    // when set (the broker opens that one), else `{data_dir}/spool`.
    let spool_dir = config
        .broker
        .spool
        .dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("spool"));
    let spool_id = sluice_broker::spool::identity(&spool_dir)?;
    let (mut broker, spool) =
        tokio::task::spawn_blocking(move || Broker::start(&broker_cfg, registry, &spool_dir))
            .await??;
    let checkpoint = spool.checkpoint.clone();

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (api_ready, api_ready_rx) = tokio::sync::oneshot::channel();
    let mut grpc = tokio::spawn(api::serve(
        grpc_listener,
        api::Authenticator::new(pool.clone(), config.api.allow_anonymous),
        config.api.clone(),
        api_ready_rx,
        async {
            let _ = grpc_stop_rx.await;
        },
    ));

    // The database, and what it holds for this run. The first failed
    // attempt opens the broker: the spool keeps what devices send.
    let mut accepted = false;
    let storage = loop {
        let up = db
            .wait_until_up(signals.recv(), || {
                if !accepted {
                    broker.accept();
                    accepted = true;
                    info!(mqtt = %config.broker.mqtt_listen,
                        "MQTT clients accepted while PostgreSQL is away; storage starts when it answers");
                }
            })
            .await?;
        if !up {
            // Stopped before the database came: the connections send the
            // acks of what is durable and the spool closes; the next start
            // stores what it holds.
            tokio::task::spawn_blocking(move || broker.shutdown()).await?;
            let _ = grpc_stop_tx.send(());
            grpc.await??;
            info!("stopped before PostgreSQL was reachable; the spool keeps every message");
            return Ok(());
        }
        match open_storage(config, &pool, &spool_id, &checkpoint).await {
            Ok(storage) => break storage,
            // The server answers, so this is no outage: fail as loudly as
            // any other start-up error.
            Err(e) if Database::probe(&pool).await => return Err(e),
            Err(e) => warn!(
                error = format!("{e:#}"),
                "PostgreSQL went away during start; waiting for it again"
            ),
        }
    };
    let Storage {
        writer:
            sluice_ingest::Writer {
                sink,
                handle: mut writer,
                stored: already_stored,
                live,
            },
        state,
        deployed,
    } = storage;
    let probe = tokio::spawn(probe_database(pool.clone()));

    let rules_cfg = &config.rules;
    std::fs::create_dir_all(&rules_cfg.dir).with_context(|| {
        format!(
            "cannot create the rules directory {}",
            rules_cfg.dir.display()
        )
    })?;
    let engine = RuleEngine::with_pool(rules_cfg.pool.clone())?;
    let context = RuleContext {
        state,
        ..Default::default()
    };
    let loader = RuleLoader::new(
        engine,
        rules_cfg.limits.clone(),
        rules_cfg.builtin_telemetry,
    );
    let catalog = RuleCatalog::new(loader, Some(rules_cfg.dir.clone()), deployed, &context);
    for e in catalog
        .describe()
        .iter()
        .filter_map(|r| r.load_error.as_ref().map(|e| (r, e)))
    {
        warn!(rule = %e.0.name, reason = %e.1, "rule not loaded");
    }
    let _watcher =
        RulesWatcher::spawn(catalog.clone()).context("cannot watch the rules directory")?;
    let processor = ParallelProcessor::new(
        catalog.active(),
        ProcessorConfig {
            batch_size: rules_cfg.batch_size,
            store_unmatched: rules_cfg.store_unmatched,
            max_hops: rules_cfg.max_hops,
            suspend: sluice_rules::SuspendPolicy {
                after_failures: rules_cfg.suspend_after_failures,
                after_timeouts: rules_cfg.suspend_after_timeouts,
            },
            time_bounds: time_bounds(&config.ingest.partitions),
        },
        context.clone(),
        rules_cfg.workers,
    )?;

    let pipeline = pipeline::spawn(
        spool.reader,
        processor,
        sink,
        broker.publisher(),
        rules_cfg.read_batch,
        checkpoint.checkpointed(),
        already_stored,
    )?;
    if !accepted {
        // New traffic waits until what the spool held from before is replayed.
        if let Ok(up_to) = pipeline.replayed.await
            && up_to > checkpoint.checkpointed()
        {
            info!(up_to, "spool replayed");
        }
        broker.accept();
    }
    let _ = api_ready.send(api::ApiContext {
        pool: pool.clone(),
        catalog,
        live,
        writer: config.ingest.clone(),
    });

    info!(
        mqtt = %config.broker.mqtt_listen,
        anonymous = config.broker.allow_anonymous,
        grpc = %config.grpc_listen,
        metrics = %config.metrics_listen,
        "sluice is ready"
    );

    tokio::select! {
        () = signals.recv() => {}
        r = &mut grpc => {
            r??;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
        r = &mut writer => {
            // Only a bug stops the writer early; better to exit loudly than to
            // keep accepting messages that can no longer be stored.
            r?;
            anyhow::bail!("the writer stopped unexpectedly");
        }
    }

    tokio::task::spawn_blocking(move || broker.shutdown()).await?;
    // The spool is closed: the pipeline reads what it still holds and the
    // writer stores it, unless the database is away. Then there is no point
    // in waiting for ever: whatever is not stored stays in the spool, and
    // the next start replays it.
    let pipeline_thread = pipeline.thread;
    let drain_limit = std::time::Duration::from_millis(config.shutdown_drain_ms);
    let drained = tokio::time::timeout(drain_limit, async {
        let _ = tokio::task::spawn_blocking(move || pipeline_thread.join()).await;
        (&mut writer).await
    })
    .await;
    match drained {
        Ok(result) => {
            result?;
            info!("every batch flushed");
        }
        Err(_) => {
            writer.abort();
            warn!(
                unstored_bytes = checkpoint.pending_bytes(),
                "the database did not take the rest within shutdown_drain_ms; \
                 it stays in the spool and is stored at the next start"
            );
        }
    }
    if let Err(e) = checkpoint.flush() {
        warn!(error = %e, "cannot save the spool checkpoint; the next start replays more");
    }
    probe.abort();
    let _ = grpc_stop_tx.send(());
    grpc.await??;
    Ok(())
}

/// What the run needs from the database before the pipeline can start.
struct Storage {
    writer: sluice_ingest::Writer,
    state: Arc<StateStore>,
    deployed: Vec<DeployedRule>,
}

/// Reads rule state and deployed rules, then starts the writer (which
/// reads what the database holds of this spool: its replay skips that,
/// even where the spool's checkpoint lagged behind the last commit). The
/// writer comes last, so a failure leaves nothing running.
async fn open_storage(
    config: &Config,
    pool: &sqlx::PgPool,
    spool_id: &str,
    checkpoint: &SpoolCheckpoint,
) -> anyhow::Result<Storage> {
    let state = load_rule_state(pool).await?;
    let deployed = load_deployed_rules(pool).await?;
    let stored = checkpoint.clone();
    let writer = sluice_ingest::start_writer(
        pool.clone(),
        config.ingest.clone(),
        Some(Box::new(move |mark| stored.advance(mark))),
        spool_id,
    )
    .await
    .context("cannot read the ingest progress")?;
    Ok(Storage {
        writer,
        state,
        deployed,
    })
}

/// Keeps `sluice_database_up` current while running (the writer's own
/// errors say which writes failed; this says whether the server answers).
async fn probe_database(pool: sqlx::PgPool) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let up = Database::probe(&pool).await;
        metrics::gauge!("sluice_database_up").set(if up { 1.0 } else { 0.0 });
    }
}

/// Per-device rule state as the last committed batch left it.
async fn load_rule_state(pool: &sqlx::PgPool) -> anyhow::Result<Arc<StateStore>> {
    let rows = sluice_ingest::rules::load_state(pool)
        .await
        .context("cannot load rule state")?;
    let store = StateStore::new();
    let changes: Vec<StateChange> = rows
        .into_iter()
        .map(|r| StateChange {
            rule: r.rule.into(),
            device_id: r.device_id.into(),
            key: r.key,
            value: Some(r.value),
        })
        .collect();
    store.apply(&changes);
    info!(
        entries = changes.len(),
        scopes = store.scopes(),
        "rule state loaded"
    );
    Ok(store)
}

/// Rules deployed through the Admin API, as stored.
async fn load_deployed_rules(pool: &sqlx::PgPool) -> anyhow::Result<Vec<DeployedRule>> {
    let rows = sluice_ingest::rules::list(pool)
        .await
        .context("cannot load deployed rules")?;
    rows.into_iter().map(crate::api::deployed_rule).collect()
}

/// Output times the storage keeps: not beyond `max_future_hours` from now,
/// not older than a table's retention.
fn time_bounds(p: &sluice_ingest::partitions::PartitionConfig) -> sluice_rules::TimeBounds {
    let days = |d: u32| (d > 0).then(|| i64::from(d) * 86_400_000);
    sluice_rules::TimeBounds {
        max_future_ms: i64::from(p.max_future_hours) * 3_600_000,
        points_max_age_ms: days(p.points_retention_days),
        events_max_age_ms: days(p.events_retention_days),
    }
}
