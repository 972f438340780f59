//! `sluice rules …`: the rule author's commands.
//!
//! - `rules new` creates a ready-to-build rule project (see `rules_new`).
//! - `rules test` runs one module through the real engine (the same loader,
//!   limits and processor as `serve`) on messages from a JSON Lines file,
//!   with no broker and no database, and prints every output as a JSON line.
//!   Guest log lines go to stderr; a guest failure (trap, timeout, exhausted
//!   limit, a message the guest failed) makes the exit status non-zero.
//! - `rules deploy | list | show | enable | disable | delete` talk to a
//!   running server through `sluice.v1.Admin`.

use anyhow::Context;
use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_rules::{
    Limits, Message, Output, Processor, ProcessorConfig, RuleContext, RuleEngine, RuleLoader,
    device_id_from_topic,
};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum RulesCommand {
    /// Run a rule module on messages from a JSON Lines file and print its
    /// outputs (exit status 1 if the guest failed any message).
    ///
    /// Each input line is an object: `topic` (required), `payload` (a string,
    /// taken as is, or any other JSON value, taken as its JSON text),
    /// `payload_base64`, `device_id` (default: from `devices/{id}/…`),
    /// `qos`, `retain`, `received_at` (RFC 3339).
    Test {
        /// The WebAssembly module (ABI v1, see rules/ABI.md).
        module: PathBuf,
        /// Messages, one JSON object per line; `-` reads standard input.
        #[arg(long)]
        input: PathBuf,
        /// The rule's configuration, a JSON object (handed to `sluice_init`).
        #[arg(long)]
        config: Option<String>,
        /// The rule's topic filter; messages it does not match are skipped.
        #[arg(long, default_value = "#")]
        topic: String,
    },
    /// Create a rule project in ./NAME (or --dir) from the SDK of a language.
    New {
        /// The rule's name (also the project directory and module name).
        name: String,
        #[arg(long, value_enum)]
        lang: crate::rules_new::Lang,
        /// Where to create the project [default: ./NAME]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Deploy a module to a running server (stored there; survives restarts).
    ///
    /// PATH is a manifest (`NAME.toml`: topic, module, [config], [limits]) or
    /// a `.wasm` module, which then needs --topic.
    Deploy {
        path: PathBuf,
        /// Rule name [default: the file's stem]
        #[arg(long)]
        name: Option<String>,
        /// Topic filter (required with a .wasm; overrides the manifest's)
        #[arg(long)]
        topic: Option<String>,
        /// The rule's config as a JSON object (overrides the manifest's)
        #[arg(long)]
        config: Option<String>,
        /// Deploy it disabled.
        #[arg(long)]
        disabled: bool,
        #[command(flatten)]
        server: Server,
    },
    /// List the server's rules with status and counters.
    List {
        #[command(flatten)]
        server: Server,
    },
    /// Show one rule: status, limits, counters.
    Show {
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Enable a deployed rule (also lifts a suspension).
    Enable {
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Disable a deployed rule.
    Disable {
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Delete a deployed rule and its per-device state.
    Delete {
        name: String,
        #[command(flatten)]
        server: Server,
    },
}

#[derive(clap::Args)]
pub struct Server {
    /// The server's gRPC API.
    #[arg(long, env = "SLUICE_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// An admin API token (`sluice tokens create NAME --scope admin`); not
    /// needed by a server started with `--allow-anonymous`.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub fn run(command: RulesCommand, limits: &Limits) -> anyhow::Result<std::process::ExitCode> {
    match command {
        RulesCommand::Test {
            module,
            input,
            config,
            topic,
        } => test(&module, &input, config.as_deref(), &topic, limits),
        RulesCommand::New { name, lang, dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            crate::rules_new::create(&name, lang, &dir)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        remote => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::rules_admin::run(remote))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputMessage {
    topic: String,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    payload_base64: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    received_at: Option<DateTime<Utc>>,
}

fn test(
    module: &std::path::Path,
    input: &std::path::Path,
    config: Option<&str>,
    topic: &str,
    limits: &Limits,
) -> anyhow::Result<std::process::ExitCode> {
    let module = std::fs::canonicalize(module)
        .with_context(|| format!("cannot read the module {}", module.display()))?;
    let messages = read_messages(input)?;

    // The module goes through the same loader as in `serve`: a manifest in
    // a scratch rules directory.
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut manifest = toml::Table::new();
    manifest.insert("topic".into(), topic.into());
    manifest.insert("module".into(), module.display().to_string().into());
    if let Some(config) = config {
        let json: Value = serde_json::from_str(config).context("--config is not valid JSON")?;
        anyhow::ensure!(json.is_object(), "--config must be a JSON object");
        let table = toml::Table::try_from(json)
            .context("--config cannot hold null values (the manifest is TOML)")?;
        manifest.insert("config".into(), table.into());
    }
    std::fs::write(dir.path().join("rule.toml"), toml::to_string(&manifest)?)?;

    let mut loader = RuleLoader::new(RuleEngine::new()?, limits.clone(), false);
    let (rules, errors) = loader.load(Some(dir.path()), &[]);
    if let Some(e) = errors.first() {
        anyhow::bail!("the module was refused: {}", e.reason);
    }
    let mut processor = Processor::new(
        Arc::new(ArcSwap::from_pointee(rules)),
        ProcessorConfig {
            store_unmatched: false,
            // Every failure is reported; suspending would hide the rest.
            suspend: sluice_rules::SuspendPolicy {
                after_failures: 0,
                after_timeouts: 0,
            },
            ..Default::default()
        },
        // State lives in memory for the run: later lines see what earlier
        // lines stored, as they would on a server.
        RuleContext::default(),
    );
    let mut outputs = Vec::new();
    processor.process(&messages, &mut outputs);

    let (mut failed, mut printed, mut state_writes) = (0, 0, 0);
    let mut out = std::io::stdout().lock();
    for output in &outputs {
        match output {
            // State changes are not outputs a user sees; they are counted.
            Output::State(_) => {
                state_writes += 1;
                continue;
            }
            Output::DeadLetter { .. } => failed += 1,
            _ => {}
        }
        printed += 1;
        writeln!(out, "{}", output_json(output))?;
    }
    eprintln!(
        "{} messages in, {printed} outputs, {failed} failed, {state_writes} state writes",
        messages.len(),
    );
    Ok(if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn read_messages(path: &std::path::Path) -> anyhow::Result<Vec<Message>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .with_context(|| format!("cannot read the input {}", path.display()))?,
        ))
    };
    let mut messages = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let m: InputMessage = serde_json::from_str(&line)
            .with_context(|| format!("input line {}: not a message object", n + 1))?;
        let payload = match (m.payload, m.payload_base64) {
            (Some(_), Some(_)) => {
                anyhow::bail!("input line {}: both payload and payload_base64", n + 1)
            }
            (Some(Value::String(s)), None) => Bytes::from(s),
            (Some(v), None) => Bytes::from(v.to_string()),
            (None, Some(b)) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .with_context(|| format!("input line {}: payload_base64", n + 1))?,
            ),
            (None, None) => Bytes::new(),
        };
        let device_id = m
            .device_id
            .or_else(|| device_id_from_topic(&m.topic).map(str::to_owned));
        messages.push(Message {
            device_id: device_id.map(Arc::from),
            payload,
            received_at: m.received_at.unwrap_or_else(Utc::now),
            qos: m.qos,
            retain: m.retain,
            hops: 0,
            topic: m.topic,
        });
    }
    Ok(messages)
}

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Bytes as text when they are UTF-8, else base64 under another key.
fn bytes_field(object: &mut serde_json::Map<String, Value>, key: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert(key.into(), text.into()),
        Err(_) => object.insert(
            format!("{key}_base64"),
            base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into(),
        ),
    };
}

fn output_json(output: &Output) -> Value {
    let mut v = match output {
        Output::Point {
            device_id,
            metric,
            time: t,
            value,
        } => {
            json!({"kind": "point", "device_id": &**device_id, "metric": metric, "time": time(t), "value": value})
        }
        Output::Event {
            device_id,
            topic,
            time: t,
            ..
        } => {
            json!({"kind": "event", "device_id": device_id.as_deref(), "topic": topic, "time": time(t)})
        }
        Output::Publish {
            topic, qos, retain, ..
        } => json!({"kind": "publish", "topic": topic, "qos": qos, "retain": retain}),
        Output::DeadLetter {
            device_id,
            topic,
            reason,
            ..
        } => {
            json!({"kind": "dead_letter", "device_id": device_id.as_deref(), "topic": topic, "reason": reason})
        }
        Output::State(c) => {
            json!({"kind": "state", "rule": &*c.rule, "device_id": &*c.device_id, "key": c.key})
        }
    };
    let object = v.as_object_mut().expect("built as an object");
    match output {
        Output::Event { payload, .. } | Output::Publish { payload, .. } => {
            bytes_field(object, "payload", payload)
        }
        Output::DeadLetter { payload, .. } => bytes_field(object, "payload", payload),
        Output::Point { .. } | Output::State(_) => {}
    }
    v
}
