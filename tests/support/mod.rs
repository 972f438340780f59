//! Test harness: a throw-away PostgreSQL and a real `sluice serve` child
//! process on free ports, with real MQTT (rumqttc) and gRPC (tonic) clients.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod pki;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};
use sluice_ingest::managed::ManagedPostgres;
use sluice_proto::v1::telemetry_client::TelemetryClient;
use sluice_proto::v1::{QueryEventsRequest, QueryPointsRequest};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tonic::transport::Channel;

/// How to start Sluice in a test.
pub struct Options {
    /// `--allow-anonymous`: most pipeline tests publish without credentials.
    pub allow_anonymous: bool,
    /// Without `--allow-anonymous`, still serve gRPC calls without a token.
    pub api_anonymous: bool,
    /// Extra environment (e.g. `SLUICE_BROKER__…` settings).
    pub env: Vec<(String, String)>,
    /// Written to `sluice.toml` in Sluice's working directory.
    pub config_toml: Option<String>,
    /// The gRPC API serves TLS with a certificate for `localhost` signed
    /// by this CA (PEM): the harness connects over TLS.
    pub grpc_tls_ca_pem: Option<String>,
}

impl Options {
    /// MQTT authentication on (no `--allow-anonymous`). The gRPC API stays
    /// open (`api.allow_anonymous`), so these tests can read back what
    /// devices stored; the API's tokens are tested on their own
    /// (`tests/api_auth.rs`, with [`Options::api_tokens`]).
    pub fn authenticated() -> Self {
        Self {
            allow_anonymous: false,
            ..Default::default()
        }
    }

    /// Every door closed: MQTT and the gRPC API both need credentials.
    pub fn api_tokens() -> Self {
        Self {
            allow_anonymous: false,
            api_anonymous: false,
            ..Default::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            api_anonymous: true,
            env: Vec::new(),
            config_toml: None,
            grpc_tls_ca_pem: None,
        }
    }
}

/// What "started" means for the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// Health says Telemetry is SERVING (the database is there).
    Serving,
    /// The MQTT and gRPC listeners answer (the database may be away).
    Listening,
}

pub struct Sluice {
    child: Option<Child>,
    options: Options,
    pub mqtt_port: u16,
    pub mqtts_port: u16,
    pub ws_port: u16,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub rules_dir: PathBuf,
    pub log_path: PathBuf,
    pub pg: ManagedPostgres,
    pub db: sqlx::PgPool,
    tmp: TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sluice {
    /// Starts PostgreSQL and Sluice; `prepare_rules` may fill the rules
    /// directory before Sluice first reads it.
    pub async fn start(prepare_rules: impl FnOnce(&Path)) -> Self {
        Self::start_with(Options::default(), prepare_rules).await
    }

    pub async fn start_with(options: Options, prepare_rules: impl FnOnce(&Path)) -> Self {
        let mut s = Self::prepare(options, prepare_rules).await;
        s.spawn_until_ready().await;
        s
    }

    /// Starts Sluice while its PostgreSQL is stopped (`pg_ctl stop -m
    /// fast`; [`ManagedPostgres::resume`] brings it back). Returns once the
    /// MQTT listener accepts and the gRPC health service answers, whatever
    /// it says.
    pub async fn start_with_database_down(options: Options) -> Self {
        let mut s = Self::prepare(options, |_| {}).await;
        s.pg.suspend("fast").await.expect("stop PostgreSQL");
        s.spawn_until(Readiness::Listening).await;
        s
    }

    /// PostgreSQL up, directories made, nothing spawned yet.
    async fn prepare(options: Options, prepare_rules: impl FnOnce(&Path)) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("sluice-test-")
            .tempdir()
            .unwrap();
        let pg = ManagedPostgres::start_ephemeral(&tmp.path().join("pg"))
            .await
            .expect("throw-away PostgreSQL");
        let rules_dir = tmp.path().join("rules");
        std::fs::create_dir_all(&rules_dir).unwrap();
        prepare_rules(&rules_dir);
        let log_path = tmp.path().join("sluice.log");
        if let Some(toml) = &options.config_toml {
            std::fs::write(tmp.path().join("sluice.toml"), toml).unwrap();
        }
        let db = sqlx::PgPool::connect(&pg.database_url()).await.unwrap();
        Self {
            child: None,
            options,
            mqtt_port: free_port(),
            mqtts_port: free_port(),
            ws_port: free_port(),
            grpc_port: free_port(),
            metrics_port: free_port(),
            rules_dir,
            log_path,
            pg,
            db,
            tmp,
        }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Starts the `sluice serve` process; its output is appended to the log.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("serve")
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", self.mqtt_port)])
            .args(["--mqtts-listen", &format!("127.0.0.1:{}", self.mqtts_port)])
            .args(["--ws-listen", &format!("127.0.0.1:{}", self.ws_port)])
            .args(["--grpc-listen", &format!("127.0.0.1:{}", self.grpc_port)])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .arg("--rules")
            .arg(&self.rules_dir)
            .env("DATABASE_URL", self.pg.database_url())
            .env("RUST_LOG", "info,sluice=debug,sluice_rules=debug")
            .env("SLUICE_RULES__LIMITS__TIMEOUT_MS", "100")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if self.options.allow_anonymous {
            cmd.arg("--allow-anonymous");
        } else if self.options.api_anonymous {
            cmd.env("SLUICE_API__ALLOW_ANONYMOUS", "true");
        }
        self.child = Some(cmd.spawn().expect("spawn sluice"));
    }

    /// The `sluice serve` process id; panics if it is not running (it
    /// exited or crashed), with its log.
    pub fn pid(&mut self) -> u32 {
        let child = self.child.as_mut().expect("sluice is not started");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("sluice exited with {status}:\n{}", self.log());
        }
        child.id()
    }

    /// A `/proc/PID/status` field in KiB: `VmRSS` (resident now) or
    /// `VmHWM` (the peak resident size since the process started).
    pub fn memory_kib(&mut self, field: &str) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// SIGKILL: no shutdown code runs, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Sluice again on the same ports, data directory and database.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill sluice first");
        self.spawn_until_ready().await;
    }

    /// Starts Sluice again without waiting for it to be ready, so a test
    /// can kill it while it starts (opening and replaying the spool,
    /// connecting to the database). If its ports were taken meanwhile it
    /// exits at once; the next [`Sluice::restart`] picks new ones.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "stop or kill sluice first");
        self.spawn();
    }

    /// Spawns and waits until ready. A port picked by `free_port` can be
    /// taken by someone else before Sluice binds it (tests run in
    /// parallel); then Sluice exits at once, and it is tried again on fresh
    /// ports.
    async fn spawn_until_ready(&mut self) {
        self.spawn_until(Readiness::Serving).await;
    }

    async fn spawn_until(&mut self, want: Readiness) {
        for _ in 0..5 {
            let log_before = self.log().len();
            self.spawn();
            match self.wait_ready(want).await {
                Ok(()) => return,
                Err(log) if log[log_before..].contains("Address already in use") => {
                    self.child = None;
                    self.mqtt_port = free_port();
                    self.mqtts_port = free_port();
                    self.ws_port = free_port();
                    self.grpc_port = free_port();
                    self.metrics_port = free_port();
                }
                Err(log) => panic!("sluice exited early:\n{log}"),
            }
        }
        panic!("no free ports for sluice after 5 attempts:\n{}", self.log());
    }

    /// Ok once ready; Err(log) if the process exited first.
    async fn wait_ready(&mut self, want: Readiness) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return Err(self.log());
            }
            if let Some(status) = self.telemetry_health().await
                && (want == Readiness::Listening
                    || status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                && std::net::TcpStream::connect(("127.0.0.1", self.mqtt_port)).is_ok()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not become ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the gRPC health service says of `sluice.v1.Telemetry` (a
    /// `ServingStatus` as i32); None if it does not answer.
    pub async fn telemetry_health(&self) -> Option<i32> {
        let channel = self.grpc_channel().await.ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let req = tonic_health::pb::HealthCheckRequest {
            service: "sluice.v1.Telemetry".into(),
        };
        Some(health.check(req).await.ok()?.into_inner().status)
    }

    /// Runs a `sluice` command on this server's database and data
    /// directory (as an operator would beside it); returns its stdout and
    /// fails the test if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .env("DATABASE_URL", self.pg.database_url())
            .current_dir(self.dir())
            .output()
            .expect("run sluice");
        assert!(
            out.status.success(),
            "sluice {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn telemetry(&self) -> TelemetryClient<Channel> {
        TelemetryClient::new(self.grpc_channel().await.unwrap())
    }

    /// A channel to the gRPC API: plain, or TLS trusting the test's CA.
    pub async fn grpc_channel(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.options.grpc_tls_ca_pem {
            None => {
                Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc_port))
                    .unwrap()
                    .connect()
                    .await
            }
            Some(ca) => {
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .domain_name("localhost");
                Channel::from_shared(format!("https://127.0.0.1:{}", self.grpc_port))
                    .unwrap()
                    .tls_config(tls)?
                    .connect()
                    .await
            }
        }
    }

    /// Registers a device; returns its secret.
    pub async fn create_device(&self, id: &str) -> String {
        let (_, secret) = sluice_ingest::devices::create(&self.db, id, serde_json::json!({}))
            .await
            .unwrap();
        secret
    }

    /// A device that authenticates with its id and secret.
    pub fn device_options(&self, id: &str, secret: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(id, "127.0.0.1", self.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_credentials(id, secret);
        opts
    }

    /// A connected MQTT client whose event loop runs in the background.
    pub async fn mqtt(&self, client_id: &str) -> AsyncClient {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", self.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = AsyncClient::new(opts, 1000);
        tokio::spawn(drive(eventloop));
        client
    }

    pub async fn metrics(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    }

    /// SIGTERM, then the process must exit 0 within the timeout.
    pub fn stop(mut self) -> String {
        self.terminate();
        self.log()
    }

    /// SIGTERM and wait for a clean exit, keeping the harness for a restart.
    pub fn terminate(&mut self) {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not stop after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "sluice exited with {status}:\n{}",
            self.log()
        );
    }

    /// Polls until `check` returns Some, or panics with the log after `timeout`.
    pub async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; sluice log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        sqlx::query_as(
            "SELECT device_id, topic, rule, reason, payload FROM dead_letters ORDER BY id",
        )
        .fetch_all(&self.db)
        .await
        .unwrap()
    }

    /// Every point of a device, walking all pages of `page_size`.
    pub async fn points_paged(
        &self,
        device_id: &str,
        page_size: u32,
    ) -> Vec<sluice_proto::v1::Point> {
        let client = self.telemetry().await;
        collect_pages(|page_token| {
            let mut client = client.clone();
            let request = QueryPointsRequest {
                device_id: device_id.into(),
                page_token,
                limit: page_size,
                ..Default::default()
            };
            async move {
                let r = client.query_points(request).await.unwrap().into_inner();
                assert!(r.points.len() <= page_size as usize);
                (r.points, r.next_page_token)
            }
        })
        .await
    }

    pub async fn all_points(&self, device_id: &str) -> Vec<sluice_proto::v1::Point> {
        self.points_paged(device_id, 1000).await
    }

    pub async fn all_events(&self, topic_filter: &str) -> Vec<sluice_proto::v1::Event> {
        let client = self.telemetry().await;
        collect_pages(|page_token| {
            let mut client = client.clone();
            let request = QueryEventsRequest {
                topic_filter: topic_filter.into(),
                page_token,
                limit: 1000,
                ..Default::default()
            };
            async move {
                let r = client.query_events(request).await.unwrap().into_inner();
                (r.events, r.next_page_token)
            }
        })
        .await
    }
}

/// The secret hash the registry stored for a device.
pub async fn stored_secret_hash(db: &sqlx::PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT secret_hash FROM devices WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

/// Follows `next_page_token` until the last page.
async fn collect_pages<T, F, Fut>(mut fetch: F) -> Vec<T>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = (Vec<T>, String)>,
{
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let (items, next) = fetch(page_token).await;
        out.extend(items);
        if next.is_empty() {
            return out;
        }
        page_token = next;
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct DeadLetter {
    pub device_id: Option<String>,
    pub topic: String,
    pub rule: Option<String>,
    pub reason: String,
    pub payload: Vec<u8>,
}

/// An MQTT connection driven in the background, whose incoming packets
/// (and its end) the test reads one by one.
pub struct MqttConn {
    pub client: AsyncClient,
    incoming: tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

/// Connects and waits for the CONNACK; Err carries the refusal or failure.
pub async fn mqtt_connect(opts: MqttOptions) -> Result<MqttConn, String> {
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), eventloop.poll()).await {
            Err(_) => return Err("no CONNACK within 15 s".into()),
            Ok(Err(e)) => return Err(format!("{e:?}")),
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
        }
    }
    let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // No reconnect: the test wants to see the end.
                    let _ = tx.send(Err(format!("{e:?}")));
                    return;
                }
            }
        }
    });
    Ok(MqttConn {
        client,
        incoming,
        task,
    })
}

impl MqttConn {
    /// The next incoming packet other than PINGRESP; Err when the connection ended.
    pub async fn next(&mut self) -> Result<rumqttc::Packet, String> {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.incoming.recv()).await {
                Err(_) => panic!("nothing arrived within 15 s"),
                Ok(None) => return Err("connection task ended".into()),
                Ok(Some(Ok(rumqttc::Packet::PingResp))) => {}
                Ok(Some(p)) => return p,
            }
        }
    }

    /// Skips acks until a PUBLISH arrives.
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        loop {
            match self.next().await {
                Ok(rumqttc::Packet::Publish(p)) => return p,
                Ok(_) => {}
                Err(e) => panic!("connection ended while waiting for a publish: {e}"),
            }
        }
    }

    /// Skips everything until the connection ends; returns why.
    pub async fn closed(&mut self) -> String {
        loop {
            if let Err(e) = self.next().await {
                return e;
            }
        }
    }

    /// Drops the socket without DISCONNECT, as a crashed device would.
    pub fn kill(self) {
        self.task.abort();
    }
}

async fn drive(mut eventloop: EventLoop) {
    loop {
        if eventloop.poll().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Publishes and waits until the broker acknowledged (QoS 1).
pub async fn publish(client: &AsyncClient, topic: &str, payload: impl Into<Vec<u8>>) {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.into())
        .await
        .unwrap();
}

/// Compiles WAT text into a module file.
pub fn write_wat(path: &Path, wat_text: &str) {
    let wasm = wat::parse_str(wat_text).expect("valid WAT");
    std::fs::write(path, wasm).unwrap();
}

/// Replaces a file atomically (write beside it, then rename), as a deploy should.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A metric's value: the sum over the sample lines that start with `name`
/// (a bare name, or a name with the start of its labels, like
/// `sluice_connections{`).
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of the Prometheus samples of `name` (in the text `/metrics`
/// serves) whose labels include every `(label, value)` of `labels`, in any
/// order; 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let has = |(k, v): &(&str, &str)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            };
            (metric == name && labels.iter().all(has)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
