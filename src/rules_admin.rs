//! `sluice rules deploy | list | show | enable | disable | delete`: the rule
//! calls of `sluice.v1.Admin`, from the command line.

use crate::rules_cmd::{RulesCommand, Server};
use anyhow::Context;
use sluice_proto::BearerToken;
use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::rule::{Source, Status};
use sluice_proto::v1::{
    DeleteRuleRequest, DeployRuleRequest, DisableRuleRequest, EnableRuleRequest, GetRuleRequest,
    ListRulesRequest, Rule, RuleLimits,
};
use sluice_rules::manifest::Manifest;
use std::path::Path;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub async fn run(command: RulesCommand) -> anyhow::Result<()> {
    match command {
        RulesCommand::Deploy {
            path,
            name,
            topic,
            config,
            disabled,
            server,
        } => {
            let request = deploy_request(&path, name, topic, config, disabled)?;
            let rule = client(&server)
                .await?
                .deploy_rule(request)
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "deployed {} version {} ({} bytes, sha256 {})",
                rule.name,
                rule.version,
                std::fs::metadata(&path).map_or(0, |m| m.len()),
                rule.module_sha256
            );
            print_rule(&rule);
        }
        RulesCommand::List { server } => {
            let mut admin = client(&server).await?;
            let mut page_token = String::new();
            println!(
                "{:<24} {:<9} {:<10} {:>10} {:>8} {:>8} {:>9} {:>9}  TOPIC",
                "NAME", "SOURCE", "STATUS", "MESSAGES", "DROPPED", "DEAD", "P50", "P99"
            );
            loop {
                let page = admin
                    .list_rules(ListRulesRequest {
                        page_token,
                        ..Default::default()
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for r in &page.rules {
                    let c = r.counters.clone().unwrap_or_default();
                    println!(
                        "{:<24} {:<9} {:<10} {:>10} {:>8} {:>8} {:>9} {:>9}  {}",
                        r.name,
                        source(r),
                        status(r),
                        c.messages_in,
                        c.dropped,
                        c.dead_letters,
                        duration(c.batch_p50.as_ref()),
                        duration(c.batch_p99.as_ref()),
                        r.topic_filter
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        RulesCommand::Show { name, server } => {
            let rule = client(&server)
                .await?
                .get_rule(GetRuleRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            print_rule(&rule);
        }
        RulesCommand::Enable { name, server } => {
            let rule = client(&server)
                .await?
                .enable_rule(EnableRuleRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            print_rule(&rule);
        }
        RulesCommand::Disable { name, server } => {
            let rule = client(&server)
                .await?
                .disable_rule(DisableRuleRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            print_rule(&rule);
        }
        RulesCommand::Delete { name, server } => {
            client(&server)
                .await?
                .delete_rule(DeleteRuleRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            println!("deleted {name}");
        }
        RulesCommand::Test { .. } | RulesCommand::New { .. } => {
            unreachable!("local commands are run by rules_cmd")
        }
    }
    Ok(())
}

type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;

async fn client(server: &Server) -> anyhow::Result<Admin> {
    let address = &server.server;
    let channel = Channel::from_shared(address.clone())
        .with_context(|| format!("--server {address} is not a URL"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the server's gRPC API at {address}"))?;
    let token = BearerToken::new(server.token.as_deref())
        .context("--token holds characters a header cannot")?;
    Ok(AdminClient::with_interceptor(channel, token))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Builds the request from a manifest or a bare module plus flags.
fn deploy_request(
    path: &Path,
    name: Option<String>,
    topic: Option<String>,
    config: Option<String>,
    disabled: bool,
) -> anyhow::Result<DeployRuleRequest> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .context("the path has no file name")?
        .to_owned();
    let is_manifest = path.extension().is_some_and(|e| e == "toml");
    let (module_path, manifest) = if is_manifest {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let manifest = Manifest::parse(&text)
            .with_context(|| format!("{} is not a valid manifest", path.display()))?;
        anyhow::ensure!(
            manifest.decoder.is_none(),
            "the manifest names a built-in decoder; only WASM rules are deployed"
        );
        let module = manifest
            .module
            .clone()
            .unwrap_or_else(|| format!("{stem}.wasm").into());
        (
            path.parent().unwrap_or(Path::new(".")).join(module),
            Some(manifest),
        )
    } else {
        (path.to_owned(), None)
    };
    let module = std::fs::read(&module_path)
        .with_context(|| format!("cannot read the module {}", module_path.display()))?;
    let topic = topic
        .or_else(|| manifest.as_ref().map(|m| m.topic.clone()))
        .context("--topic is needed when deploying a bare .wasm")?;
    let config_json = match (config, manifest.as_ref().and_then(|m| m.config.as_ref())) {
        (Some(json), _) => json,
        (None, Some(table)) => serde_json::to_string(table)?,
        (None, None) => String::new(),
    };
    let limits = manifest.as_ref().map(|m| RuleLimits {
        timeout_ms: m.limits.timeout_ms,
        memory_mb: m.limits.memory_mb,
        max_outputs_per_message: m.limits.max_outputs_per_message,
        table_elements: m.limits.table_elements,
        state_bytes: m.limits.state_bytes,
    });
    let name = name
        .or_else(|| manifest.as_ref().and_then(|m| m.name.clone()))
        .unwrap_or(stem);
    let disabled = disabled || manifest.as_ref().is_some_and(|m| !m.enabled);
    Ok(DeployRuleRequest {
        name,
        topic_filter: topic,
        module,
        config_json,
        limits,
        disabled,
    })
}

fn source(r: &Rule) -> &'static str {
    match Source::try_from(r.source).unwrap_or_default() {
        Source::Api => "api",
        Source::Directory => "directory",
        Source::Builtin => "builtin",
        Source::Unspecified => "?",
    }
}

fn status(r: &Rule) -> &'static str {
    match Status::try_from(r.status).unwrap_or_default() {
        Status::Active => "active",
        Status::Disabled => "disabled",
        Status::Suspended => "suspended",
        Status::LoadError => "load_error",
        Status::Unspecified => "?",
    }
}

fn duration(d: Option<&prost_types::Duration>) -> String {
    match d {
        Some(d) => {
            let micros = d.seconds as f64 * 1e6 + f64::from(d.nanos) / 1e3;
            if micros >= 1000.0 {
                format!("{:.1}ms", micros / 1000.0)
            } else {
                format!("{micros:.0}µs")
            }
        }
        None => "-".into(),
    }
}

fn print_rule(r: &Rule) {
    println!("name:     {}", r.name);
    println!(
        "source:   {} {}",
        source(r),
        if r.version > 0 {
            format!("(version {})", r.version)
        } else {
            String::new()
        }
    );
    println!("kind:     {}", r.kind);
    println!("topic:    {}", r.topic_filter);
    println!("status:   {}", status(r));
    if !r.status_reason.is_empty() {
        println!("reason:   {}", r.status_reason);
    }
    if let Some(l) = &r.limits {
        println!(
            "limits:   timeout {} ms, memory {} MiB, {} outputs/message, {} table elements, {} state bytes/device",
            l.timeout_ms.unwrap_or_default(),
            l.memory_mb.unwrap_or_default(),
            l.max_outputs_per_message.unwrap_or_default(),
            l.table_elements.unwrap_or_default(),
            l.state_bytes.unwrap_or_default()
        );
    }
    if let Some(c) = &r.counters {
        println!(
            "counters: {} invocations, {} messages in: {} stored, {} dropped, {} dead letters",
            c.invocations, c.messages_in, c.stored, c.dropped, c.dead_letters
        );
        println!(
            "outputs:  {} points, {} events, {} publishes, {} state writes",
            c.points, c.events, c.publishes, c.state_writes
        );
        if !c.failures.is_empty() {
            let mut f: Vec<_> = c.failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
            f.sort();
            println!("failures: {}", f.join(", "));
        }
        println!(
            "batches:  p50 {}, p99 {}",
            duration(c.batch_p50.as_ref()),
            duration(c.batch_p99.as_ref())
        );
    }
}
