//! `sluice serve`: start every part, wait for a signal, stop in order.
//!
//! Start-up order: the broker opens the spool and binds its listeners, the
//! pipeline replays whatever the spool held from before (a crash), and only
//! then does the broker accept connections.
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
use sluice_broker::Broker;
use sluice_rules::{
    DeployedRule, ParallelProcessor, ProcessorConfig, RuleCatalog, RuleContext, RuleEngine,
    RuleLoader, RulesWatcher, StateChange, StateStore,
};
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

pub async fn serve(config: Config) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(config.metrics_listen)
        .install()
        .with_context(|| format!("cannot serve metrics on {}", config.metrics_listen))?;

    let db = Database::open(&config).await?;
    let result = run(&config, db.pool.clone()).await;
    db.close().await;
    result
}

async fn run(config: &Config, pool: sqlx::PgPool) -> anyhow::Result<()> {
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
    let broker_cfg = config.broker.clone();
    let registry = Arc::new(PgDeviceRegistry::new(pool.clone()));
    let spool_dir = config.data_dir.join("spool");
    let spool_id = sluice_broker::spool::identity(&spool_dir)?;
    let (mut broker, spool) =
        tokio::task::spawn_blocking(move || Broker::start(&broker_cfg, registry, &spool_dir))
            .await??;
    let checkpoint = spool.checkpoint.clone();
    let stored = checkpoint.clone();
    // What the database already holds of this spool: its replay skips that,
    // even where the spool's checkpoint lagged behind the last commit.
    let sluice_ingest::Writer {
        sink,
        handle: mut writer,
        stored: already_stored,
        live,
    } = sluice_ingest::start_writer(
        pool.clone(),
        config.ingest.clone(),
        Some(Box::new(move |mark| stored.advance(mark))),
        &spool_id,
    )
    .await
    .context("cannot read the ingest progress")?;

    let rules_cfg = &config.rules;
    std::fs::create_dir_all(&rules_cfg.dir).with_context(|| {
        format!(
            "cannot create the rules directory {}",
            rules_cfg.dir.display()
        )
    })?;
    let engine = RuleEngine::with_pool(rules_cfg.pool.clone())?;
    let context = RuleContext {
        state: load_rule_state(&pool).await?,
        ..Default::default()
    };
    let loader = RuleLoader::new(
        engine,
        rules_cfg.limits.clone(),
        rules_cfg.builtin_telemetry,
    );
    let deployed = load_deployed_rules(&pool).await?;
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
    // New traffic waits until what the spool held from before is replayed.
    if let Ok(up_to) = pipeline.replayed.await
        && up_to > checkpoint.checkpointed()
    {
        info!(up_to, "spool replayed");
    }
    broker.accept();

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api_context = api::ApiContext {
        catalog,
        auth: api::Authenticator::new(pool.clone(), config.api.allow_anonymous),
        live,
        writer: config.ingest.clone(),
        config: config.api.clone(),
    };
    let mut grpc = tokio::spawn(api::serve(
        grpc_listener,
        pool.clone(),
        api_context,
        async {
            let _ = grpc_stop_rx.await;
        },
    ));

    info!(
        mqtt = %config.broker.mqtt_listen,
        anonymous = config.broker.allow_anonymous,
        grpc = %config.grpc_listen,
        metrics = %config.metrics_listen,
        "sluice is ready"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
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
    let _ = grpc_stop_tx.send(());
    grpc.await??;
    Ok(())
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
