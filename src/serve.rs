//! `sluice serve`: start every part, wait for a signal, stop in order.
//!
//! Shutdown order is what makes "flush every batch" true: first the broker
//! stops accepting and closes device connections, then its consumer forwards
//! what the router still holds, the pipeline finishes those messages, the
//! writer flushes its last batch, and only then do the API, the pool and the
//! managed PostgreSQL go away.

use crate::api;
use crate::config::Config;
use crate::database::Database;
use crate::pipeline;
use anyhow::Context;
use arc_swap::ArcSwap;
use sluice_broker::Broker;
use sluice_rules::{Processor, ProcessorConfig, RuleEngine, RuleLoader, RulesWatcher};
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
    let (sink, mut writer) = sluice_ingest::spawn_writer(pool.clone(), config.ingest.clone());

    let rules_cfg = &config.rules;
    std::fs::create_dir_all(&rules_cfg.dir).with_context(|| {
        format!(
            "cannot create the rules directory {}",
            rules_cfg.dir.display()
        )
    })?;
    let engine = RuleEngine::new()?;
    let mut loader = RuleLoader::new(
        engine,
        rules_cfg.limits.clone(),
        rules_cfg.builtin_telemetry,
    );
    let (initial, errors) = loader.load(Some(&rules_cfg.dir));
    for e in &errors {
        warn!(path = %e.path.display(), reason = %e.reason, "rule not loaded");
    }
    info!(rules = ?initial.names(), dir = %rules_cfg.dir.display(), "rules loaded");
    let rules = Arc::new(ArcSwap::from_pointee(initial));
    let _watcher = RulesWatcher::spawn(rules_cfg.dir.clone(), loader, rules.clone())
        .context("cannot watch the rules directory")?;
    let processor = Processor::new(
        rules,
        ProcessorConfig {
            batch_size: rules_cfg.batch_size,
            store_unmatched: rules_cfg.store_unmatched,
            max_hops: rules_cfg.max_hops,
        },
    );

    let broker_cfg = config.broker.clone();
    let (broker, inbound) =
        tokio::task::spawn_blocking(move || Broker::start(&broker_cfg)).await??;
    let pipeline = pipeline::spawn(
        inbound,
        processor,
        sink,
        broker.publisher(),
        rules_cfg.batch_size,
    )?;

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut grpc = tokio::spawn(api::serve(grpc_listener, pool.clone(), async {
        let _ = grpc_stop_rx.await;
    }));

    info!(
        mqtt = %config.broker.mqtt_listen,
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

    tokio::task::spawn_blocking(move || {
        broker.shutdown();
        let _ = pipeline.join();
    })
    .await?;
    writer.await?;
    info!("every batch flushed");
    let _ = grpc_stop_tx.send(());
    grpc.await??;
    Ok(())
}
