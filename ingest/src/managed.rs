//! A private PostgreSQL server run from the system's binaries, so Sluice works out of the box
//! without an operator having to provision a database first.
//!
//! Layout of the data directory handed to [`ManagedPostgres::start`]:
//!
//! * `pg/` — the cluster itself (owned by the user the server runs as);
//! * `pg-password` — the superuser password (mode 0600, owned by the invoking user);
//! * `pg.log` — the server's log;
//! * `pg.lock` — serialises concurrent starts on the same directory.
//!
//! The server is started with `pg_ctl` in its own session, so it outlives a crash of ours; the next
//! start on the same directory finds it through `postmaster.pid` and reuses it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User};
use rand::Rng;
use rand::distr::Alphanumeric;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{Connection, Executor, PgConnection};

/// The database the rest of Sluice works in.
const DATABASE: &str = "sluice";
const SUPERUSER: &str = "postgres";
const LISTEN_ADDRESS: &str = "127.0.0.1";
const REQUIRED_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
const VERSIONED_ROOT: &str = "/usr/lib/postgresql";

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A freshly picked port can be taken by someone else before the server binds it; a few fresh
/// picks make that race practically harmless.
const START_ATTEMPTS: u32 = 3;
/// Enough of the log to show why a start failed without flooding the error.
const LOG_TAIL_BYTES: u64 = 4096;

const CLUSTER_DIR: &str = "pg";
const STAGING_DIR: &str = "pg.initdb";
const PASSWORD_FILE: &str = "pg-password";
const INITDB_PASSWORD_FILE: &str = "pg.initdb-password";
const LOG_FILE: &str = "pg.log";
const LOCK_FILE: &str = "pg.lock";

#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error(
        "no PostgreSQL server binaries found ({0}); install PostgreSQL server binaries \
         (e.g. `apt-get install postgresql`) or set DATABASE_URL / --database-url to use an existing server"
    )]
    NoBinaries(String),
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` system user \
         to run it as; create one (e.g. `useradd --system postgres`) or set DATABASE_URL / --database-url"
    )]
    NoPostgresUser,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error(
        "the cluster in {} exists but its password file {} is missing or empty, so it cannot be \
         connected to; restore the file or remove the data directory to start afresh",
        cluster.display(),
        password_file.display()
    )]
    MissingPassword {
        cluster: PathBuf,
        password_file: PathBuf,
    },
    #[error("{context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ManagedError {
    let context = context.into();
    move |source| ManagedError::Io { context, source }
}

/// Finds the directory holding initdb/pg_ctl/postgres: first $PATH (resolve symlinks, require the
/// three binaries side by side in the resolved dir), else the highest version under
/// /usr/lib/postgresql/*/bin.
pub fn find_postgres_bin_dir() -> Result<PathBuf, ManagedError> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // An empty entry means the current directory, which is no place to pick a server from.
            if dir.as_os_str().is_empty() {
                continue;
            }
            for name in REQUIRED_BINARIES {
                // Distribution wrappers (Debian's pg_wrapper) and /usr/local/bin links point
                // elsewhere; only the directory they resolve to holds the real, matching set.
                let Ok(resolved) = fs::canonicalize(dir.join(name)) else {
                    continue;
                };
                if let Some(parent) = resolved.parent()
                    && has_required_binaries(parent)
                {
                    return Ok(parent.to_path_buf());
                }
            }
        }
    }

    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir(VERSIONED_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(parse_version) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if !has_required_binaries(&bin) {
                continue;
            }
            if best.as_ref().is_none_or(|(found, _)| version > *found) {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or_else(|| {
        ManagedError::NoBinaries(format!(
            "no directory with {} side by side on $PATH or under {VERSIONED_ROOT}/*/bin",
            REQUIRED_BINARIES.join(", ")
        ))
    })
}

/// "15" -> [15], "9.6" -> [9, 6]; compared as vectors so 15 outranks 9.6.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn has_required_binaries(dir: &Path) -> bool {
    REQUIRED_BINARIES.iter().all(|name| {
        fs::metadata(dir.join(name))
            .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Everything needed to run the PostgreSQL tools against one cluster; cheap to clone so blocking
/// work can move to another thread.
#[derive(Clone, Debug)]
struct Cluster {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    /// `None` when the tools run as ourselves.
    run_as: Option<(Uid, Gid)>,
}

pub struct ManagedPostgres {
    cluster: Cluster,
    port: u16,
    password: String,
    started_by_us: bool,
    stopped: bool,
    ephemeral: bool,
}

impl fmt::Debug for ManagedPostgres {
    // Hand-written so the password never ends up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedPostgres")
            .field("data_dir", &self.cluster.data_dir)
            .field("bin_dir", &self.cluster.bin_dir)
            .field("run_as", &self.cluster.run_as)
            .field("port", &self.port)
            .field("started_by_us", &self.started_by_us)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl ManagedPostgres {
    /// Ensure a cluster exists under `data_dir` (the cluster itself lives in `data_dir/pg`), start
    /// it if it is not running (reusing a server left running by an earlier process), and ensure
    /// the `sluice` database exists. The server listens on 127.0.0.1 only, on a free port, and
    /// on a Unix socket in its cluster directory (see [`Self::database_url`]); the superuser
    /// password is kept in `data_dir/pg-password`.
    pub async fn start(data_dir: &Path) -> Result<ManagedPostgres, ManagedError> {
        Self::start_with(data_dir, false).await
    }

    /// For throw-away test clusters: same as [`start`](Self::start), but with `fsync`,
    /// `synchronous_commit` and `full_page_writes` off for speed. A server that is already
    /// running is reused with whatever settings it was started with.
    pub async fn start_ephemeral(data_dir: &Path) -> Result<ManagedPostgres, ManagedError> {
        Self::start_with(data_dir, true).await
    }

    async fn start_with(data_dir: &Path, ephemeral: bool) -> Result<ManagedPostgres, ManagedError> {
        let data_dir = data_dir.to_path_buf();
        let server = run_blocking(move || start_blocking(data_dir, ephemeral)).await?;
        // Should this fail, dropping `server` stops it again if we were the ones to start it.
        server.ensure_database().await?;
        tracing::info!(
            data_dir = %server.cluster.data_dir.display(),
            port = server.port,
            started_by_us = server.started_by_us,
            "managed PostgreSQL ready"
        );
        Ok(server)
    }

    /// How Sluice connects: through the server's Unix socket when it has one, else TCP.
    ///
    /// The socket matters for speed: sqlx sends a COPY's data and its end
    /// (CopyDone) as two writes and does not set TCP_NODELAY, so on TCP
    /// Nagle's algorithm holds the small second write until the server
    /// acknowledges the first, which a delayed ACK stretches to 40 ms: every
    /// writer transaction paid it (measured: 45 ms per COPY of a few hundred
    /// rows). A Unix socket has no Nagle. TCP remains for other tools, and
    /// for a server started by an older Sluice without the socket.
    pub fn database_url(&self) -> String {
        // The password is alphanumeric, so it needs no percent-encoding.
        match self
            .cluster
            .socket_dir(self.port)
            .filter(|dir| dir.join(format!(".s.PGSQL.{}", self.port)).exists())
        {
            Some(dir) => format!(
                "postgres://{SUPERUSER}:{}@localhost:{}/{DATABASE}?host={}",
                self.password,
                self.port,
                percent_encode_path(&dir)
            ),
            None => format!(
                "postgres://{SUPERUSER}:{}@{LISTEN_ADDRESS}:{}/{DATABASE}",
                self.password, self.port
            ),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stop with `pg_ctl stop -m fast -w` if we started the server; a no-op for a server that
    /// an earlier process left running, since others may rely on it.
    pub async fn stop(mut self) -> Result<(), ManagedError> {
        if !self.started_by_us || self.stopped {
            return Ok(());
        }
        let cluster = self.cluster.clone();
        run_blocking(move || cluster.stop_server("fast")).await?;
        // Only now: if the fast stop failed, Drop still gets to try an immediate one.
        self.stopped = true;
        Ok(())
    }

    /// Stops the server (`fast` or `immediate`), keeping everything needed
    /// to [`resume`](Self::resume) it on the same port: for outage tests.
    pub async fn suspend(&self, mode: &'static str) -> Result<(), ManagedError> {
        let cluster = self.cluster.clone();
        run_blocking(move || cluster.stop_server(mode)).await
    }

    /// Starts a [`suspend`](Self::suspend)ed server again on its old port.
    pub async fn resume(&self) -> Result<(), ManagedError> {
        let (cluster, port, ephemeral) = (self.cluster.clone(), self.port, self.ephemeral);
        run_blocking(move || cluster.ensure_running(ephemeral, Some(port)).map(|_| ())).await
    }

    async fn ensure_database(&self) -> Result<(), ManagedError> {
        let context = |what: &str| {
            format!(
                "{what} (managed server on {LISTEN_ADDRESS}:{}, password from {})",
                self.port,
                self.cluster.data_dir.join(PASSWORD_FILE).display()
            )
        };
        // Built field by field, without pgpass, so no PG* environment variable of the caller can
        // redirect us to another server or database.
        let options = PgConnectOptions::new_without_pgpass()
            .host(LISTEN_ADDRESS)
            .port(self.port)
            .username(SUPERUSER)
            .password(&self.password)
            .database("postgres")
            .ssl_mode(PgSslMode::Disable)
            .application_name("sluice-managed");
        let mut conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(source)) => {
                    return Err(ManagedError::Database {
                        context: context("connecting as the superuser"),
                        source,
                    });
                }
                Err(_) => {
                    return Err(ManagedError::Database {
                        context: context("connecting as the superuser"),
                        source: sqlx::Error::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
                        )),
                    });
                }
            };
        let exists =
            sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = 'sluice'")
                .fetch_optional(&mut conn)
                .await
                .map_err(|source| ManagedError::Database {
                    context: context("looking up the sluice database"),
                    source,
                })?
                .is_some();
        if !exists {
            // Simple-query protocol: CREATE DATABASE must not end up in an implicit transaction block.
            match conn.execute(sqlx::raw_sql("CREATE DATABASE sluice")).await {
                Ok(_) => {}
                // Another process starting on the same directory got there first.
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
                Err(source) => {
                    return Err(ManagedError::Database {
                        context: context("creating the sluice database"),
                        source,
                    });
                }
            }
        }
        // A failed goodbye does not matter; the database is there.
        let _ = conn.close().await;
        Ok(())
    }
}

impl Drop for ManagedPostgres {
    fn drop(&mut self) {
        if !self.started_by_us || self.stopped {
            return;
        }
        self.stopped = true;
        // Blocking on purpose: tests (and crash paths) rely on the server being gone once the
        // handle is, and there may be no runtime left to run async work on.
        if let Err(error) = self.cluster.stop_server("immediate") {
            tracing::warn!(%error, data_dir = %self.cluster.data_dir.display(), "could not stop managed PostgreSQL");
        }
    }
}

async fn run_blocking<T, F>(work: F) -> Result<T, ManagedError>
where
    F: FnOnce() -> Result<T, ManagedError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join_error) => match join_error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(join_error) => Err(ManagedError::Command {
                what: "managed PostgreSQL task".into(),
                detail: join_error.to_string(),
            }),
        },
    }
}

fn start_blocking(data_dir: PathBuf, ephemeral: bool) -> Result<ManagedPostgres, ManagedError> {
    let bin_dir = find_postgres_bin_dir()?;
    fs::create_dir_all(&data_dir).map_err(io_error(format!(
        "creating data directory {}",
        data_dir.display()
    )))?;
    // pg_ctl runs with the cluster as its working directory, so relative paths would break.
    let data_dir = fs::canonicalize(&data_dir).map_err(io_error(format!(
        "resolving data directory {}",
        data_dir.display()
    )))?;

    // Two processes starting on one directory at once must not both run initdb or both start a
    // server; the lock is released when `lock` is dropped at the end of this function.
    let lock_path = data_dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_error(format!("opening {}", lock_path.display())))?;
    lock.lock()
        .map_err(io_error(format!("locking {}", lock_path.display())))?;

    let run_as = choose_run_as(&data_dir.join(CLUSTER_DIR))?;
    if run_as.is_some() {
        make_traversable(&data_dir)?;
    }
    let cluster = Cluster {
        data_dir,
        bin_dir,
        run_as,
    };
    let password = cluster.ensure_initialized(ephemeral)?;
    let (port, started_by_us) = cluster.ensure_running(ephemeral, None)?;
    drop(lock);
    Ok(ManagedPostgres {
        cluster,
        port,
        password,
        started_by_us,
        stopped: false,
        ephemeral,
    })
}

/// PostgreSQL refuses to run as root, so root hands the server to the user owning an existing
/// cluster, or else to the `postgres` system user.
fn choose_run_as(cluster_dir: &Path) -> Result<Option<(Uid, Gid)>, ManagedError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    if let Ok(meta) = fs::metadata(cluster_dir)
        && meta.uid() != 0
    {
        return Ok(Some((Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()))));
    }
    match User::from_name(SUPERUSER) {
        Ok(Some(user)) => Ok(Some((user.uid, user.gid))),
        Ok(None) => Err(ManagedError::NoPostgresUser),
        Err(errno) => Err(ManagedError::Io {
            context: "looking up the `postgres` system user".into(),
            source: errno.into(),
        }),
    }
}

/// The server user has to reach `pg/` and `pg.log` inside the data directory, which may have
/// been created 0700 (tempfile does that). Search permission suffices; the directory's listing
/// stays private.
fn make_traversable(dir: &Path) -> Result<(), ManagedError> {
    let meta = fs::metadata(dir).map_err(io_error(format!("inspecting {}", dir.display())))?;
    let mode = meta.permissions().mode();
    if mode & 0o011 != 0o011 {
        fs::set_permissions(dir, fs::Permissions::from_mode((mode | 0o011) & 0o7777))
            .map_err(io_error(format!("making {} traversable", dir.display())))?;
    }
    Ok(())
}

enum ServerState {
    Running,
    NotRunning,
}

/// The parts of `postmaster.pid` we care about.
struct PidFile {
    port: u16,
    status: String,
}

impl Cluster {
    fn cluster_dir(&self) -> PathBuf {
        self.data_dir.join(CLUSTER_DIR)
    }

    /// The directory of the server's Unix socket: the cluster directory
    /// (owned by the server's user), when the socket's path fits in a
    /// socket address (107 bytes on Linux).
    fn socket_dir(&self, port: u16) -> Option<PathBuf> {
        let dir = std::path::absolute(self.cluster_dir()).ok()?;
        let socket = dir.join(format!(".s.PGSQL.{port}"));
        (socket.as_os_str().len() < 107).then_some(dir)
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    /// A PostgreSQL tool, run as the server user, with a working directory (and HOME) that user
    /// can access — otherwise the tools complain about not being able to find themselves.
    fn command(&self, program: &str, cwd: &Path) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(cwd)
            .env("HOME", cwd)
            // Deterministic messages, and no failure over a locale the system lacks.
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        // PGDATA, PGPORT and friends would otherwise silently change which cluster or port the
        // tools use.
        for (key, _) in std::env::vars_os() {
            if key.as_encoded_bytes().starts_with(b"PG") {
                cmd.env_remove(key);
            }
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<Output, ManagedError> {
        let program = Path::new(cmd.get_program()).display().to_string();
        cmd.output().map_err(|error| {
            // The child changes to the cluster directory before exec, so a data directory the
            // server user cannot reach shows up here as a bare "Permission denied".
            match self.traversal_hint() {
                Some(hint) if error.kind() == io::ErrorKind::PermissionDenied => {
                    ManagedError::Command {
                        what: format!("running {what} ({program})"),
                        detail: format!("{error}\n{hint}"),
                    }
                }
                _ => io_error(format!("running {what} ({program})"))(error),
            }
        })
    }

    fn chown_to_server_user(&self, path: &Path) -> Result<(), ManagedError> {
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|errno| ManagedError::Io {
                context: format!("handing {} to uid {uid}", path.display()),
                source: errno.into(),
            })?;
        }
        Ok(())
    }

    /// Creates the cluster unless it exists, and returns the superuser password.
    fn ensure_initialized(&self, ephemeral: bool) -> Result<String, ManagedError> {
        let cluster_dir = self.cluster_dir();
        let password_path = self.data_dir.join(PASSWORD_FILE);
        if cluster_dir.exists() {
            return match fs::read_to_string(&password_path) {
                Ok(password) if !password.trim().is_empty() => Ok(password.trim().to_owned()),
                Ok(_) => Err(self.missing_password()),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    Err(self.missing_password())
                }
                Err(error) => Err(io_error(format!("reading {}", password_path.display()))(
                    error,
                )),
            };
        }

        // initdb runs in a staging directory that is renamed into place only once complete, so
        // an interrupted initdb never leaves behind a `pg/` that looks usable.
        let staging = self.data_dir.join(STAGING_DIR);
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_error(format!(
                "removing leftovers of an interrupted initdb in {}",
                staging.display()
            )))?;
        }

        // Recorded before the cluster exists, so there is never a cluster without its password.
        let password = generate_password();
        write_private_file(&password_path, &password)?;

        fs::create_dir(&staging).map_err(io_error(format!("creating {}", staging.display())))?;
        self.chown_to_server_user(&staging)?;

        // initdb reads the password from a file; it must be readable by the server user, which
        // the invoking user's password file is not.
        let initdb_password_path = self.data_dir.join(INITDB_PASSWORD_FILE);
        let _ = fs::remove_file(&initdb_password_path);
        write_new_private_file(&initdb_password_path, &password)?;
        let initdb_result = self
            .chown_to_server_user(&initdb_password_path)
            .and_then(|()| {
                let mut cmd = self.command("initdb", &staging);
                cmd.arg("--pgdata")
                    .arg(&staging)
                    .arg(format!("--username={SUPERUSER}"))
                    .arg("--pwfile")
                    .arg(&initdb_password_path)
                    .arg("--auth=scram-sha-256")
                    .arg("--encoding=UTF8")
                    // C collation exists everywhere and sorts bytewise, which is all we need.
                    .arg("--locale=C");
                if ephemeral {
                    cmd.arg("--no-sync");
                }
                self.run("initdb", &mut cmd)
            });
        let _ = fs::remove_file(&initdb_password_path);
        let output = initdb_result?;
        if !output.status.success() {
            return Err(ManagedError::Command {
                what: format!("initdb in {}", staging.display()),
                detail: self.describe_failure(&output, None),
            });
        }

        fs::rename(&staging, &cluster_dir).map_err(io_error(format!(
            "moving {} to {}",
            staging.display(),
            cluster_dir.display()
        )))?;
        sync_dir(&self.data_dir)?;
        tracing::info!(cluster = %cluster_dir.display(), "initialised managed PostgreSQL cluster");
        Ok(password)
    }

    fn missing_password(&self) -> ManagedError {
        ManagedError::MissingPassword {
            cluster: self.cluster_dir(),
            password_file: self.data_dir.join(PASSWORD_FILE),
        }
    }

    /// Returns the port and whether we started the server (as opposed to finding it running).
    fn ensure_running(
        &self,
        ephemeral: bool,
        port: Option<u16>,
    ) -> Result<(u16, bool), ManagedError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.status()? {
                ServerState::NotRunning => break,
                ServerState::Running => match self.read_pid_file() {
                    Some(pid_file) if pid_file.status == "ready" => {
                        return Ok((pid_file.port, false));
                    }
                    // Still starting (or recovering), or shutting down: wait until it settles
                    // either way.
                    pid_file => {
                        if Instant::now() >= deadline {
                            return Err(ManagedError::Command {
                                what: format!(
                                    "waiting for the server in {}",
                                    self.cluster_dir().display()
                                ),
                                detail: format!(
                                    "it is running but did not become ready within {} s (status: {}){}",
                                    START_TIMEOUT.as_secs(),
                                    pid_file.map_or_else(|| "unknown".into(), |p| p.status),
                                    self.log_tail_section(0)
                                ),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                },
            }
        }

        let mut attempt = 1;
        loop {
            let port = match port {
                Some(p) => p,
                None => pick_free_port()?,
            };
            let log_offset = self.prepare_log()?;
            // pg_ctl hands these to a shell: the directory is quoted, and
            // left out (no socket) when quoting cannot be trusted.
            let sockets = self
                .socket_dir(port)
                .and_then(|dir| dir.to_str().map(str::to_owned))
                .filter(|dir| !dir.contains('\''))
                .unwrap_or_default();
            // random_page_cost: the cluster lives on this machine's disk and
            // its hot tables stay cached, so an index read costs about what a
            // sequential one does (1.1 is the usual figure for SSDs). At the
            // default 4.0 PostgreSQL sorts all 10,000 rows of a LatestPoints
            // page rather than read them in index order, twice as slow.
            let mut options = format!(
                "-p {port} -c listen_addresses={LISTEN_ADDRESS} -c unix_socket_directories='{sockets}' \
                 -c random_page_cost=1.1"
            );
            if ephemeral {
                options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
            }
            let cluster_dir = self.cluster_dir();
            let mut cmd = self.command("pg_ctl", &cluster_dir);
            // -l keeps the server's output away from our pipes; otherwise `output()` would wait
            // for the server to exit. pg_ctl also puts the server in its own session, so it
            // outlives us if we crash.
            cmd.arg("start")
                .arg("--pgdata")
                .arg(&cluster_dir)
                .arg("--wait")
                .arg(format!("--timeout={}", START_TIMEOUT.as_secs()))
                .arg("--log")
                .arg(self.log_path())
                .arg("-o")
                .arg(&options);
            let output = self.run("pg_ctl start", &mut cmd)?;
            if output.status.success() {
                return Ok((port, true));
            }

            // pg_ctl may give up waiting while the server carries on starting; nobody would
            // track such a server, so take it down.
            if matches!(self.status(), Ok(ServerState::Running)) {
                let _ = self.stop_server("immediate");
            }
            let log = read_log_tail(&self.log_path(), log_offset);
            let port_taken =
                log.contains("could not bind") || log.contains("Address already in use");
            if port_taken && attempt < START_ATTEMPTS {
                tracing::warn!(
                    port,
                    attempt,
                    "port was taken before PostgreSQL could bind it; retrying"
                );
                attempt += 1;
                continue;
            }
            return Err(ManagedError::Command {
                what: format!("starting PostgreSQL in {}", cluster_dir.display()),
                detail: self.describe_failure(&output, Some(log_offset)),
            });
        }
    }

    fn status(&self) -> Result<ServerState, ManagedError> {
        let cluster_dir = self.cluster_dir();
        let mut cmd = self.command("pg_ctl", &cluster_dir);
        cmd.arg("status").arg("--pgdata").arg(&cluster_dir);
        let output = self.run("pg_ctl status", &mut cmd)?;
        // pg_ctl status: 0 = running, 3 = not running (including a stale postmaster.pid).
        match output.status.code() {
            Some(0) => Ok(ServerState::Running),
            Some(3) => Ok(ServerState::NotRunning),
            _ => Err(ManagedError::Command {
                what: format!("pg_ctl status in {}", cluster_dir.display()),
                detail: self.describe_failure(&output, None),
            }),
        }
    }

    fn stop_server(&self, mode: &str) -> Result<(), ManagedError> {
        let cluster_dir = self.cluster_dir();
        let mut cmd = self.command("pg_ctl", &cluster_dir);
        cmd.arg("stop")
            .arg("--pgdata")
            .arg(&cluster_dir)
            .arg(format!("--mode={mode}"))
            .arg("--wait")
            .arg(format!("--timeout={}", STOP_TIMEOUT.as_secs()));
        let output = self.run("pg_ctl stop", &mut cmd)?;
        if output.status.success() {
            return Ok(());
        }
        // Someone else stopping it first is as good as stopping it ourselves.
        if matches!(self.status(), Ok(ServerState::NotRunning)) {
            return Ok(());
        }
        Err(ManagedError::Command {
            what: format!("pg_ctl stop -m {mode} in {}", cluster_dir.display()),
            detail: self.describe_failure(&output, None),
        })
    }

    /// Parses `postmaster.pid`: line 4 is the port, line 8 the server's status ("starting",
    /// "ready", "stopping", "standby"). `None` while the file is missing or half-written.
    fn read_pid_file(&self) -> Option<PidFile> {
        let text = fs::read_to_string(self.cluster_dir().join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let port = lines.get(3)?.trim().parse().ok()?;
        let status = lines.get(7)?.trim().to_owned();
        Some(PidFile { port, status })
    }

    /// Makes sure the log exists and belongs to the server user (pg_ctl opens it as that user,
    /// which cannot create files in our directory). Returns its current length, so a failure can
    /// show just this start's messages.
    fn prepare_log(&self) -> Result<u64, ManagedError> {
        let path = self.log_path();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error(format!("opening {}", path.display())))?;
        self.chown_to_server_user(&path)?;
        let len = file
            .metadata()
            .map_err(io_error(format!("inspecting {}", path.display())))?
            .len();
        Ok(len)
    }

    fn log_tail_section(&self, offset: u64) -> String {
        let tail = read_log_tail(&self.log_path(), offset);
        if tail.is_empty() {
            String::new()
        } else {
            format!("\n--- {} ---\n{tail}", self.log_path().display())
        }
    }

    fn describe_failure(&self, output: &Output, log_offset: Option<u64>) -> String {
        let mut detail = output.status.to_string();
        for stream in [&output.stderr, &output.stdout] {
            let text = String::from_utf8_lossy(stream);
            let text = text.trim();
            if !text.is_empty() {
                detail.push('\n');
                detail.push_str(text);
            }
        }
        if let Some(offset) = log_offset {
            detail.push_str(&self.log_tail_section(offset));
        }
        if let Some(hint) = self.traversal_hint() {
            detail.push('\n');
            detail.push_str(&hint);
        }
        detail
    }

    /// The usual reason the server user cannot use a data directory is an ancestor it may not
    /// enter (e.g. /root). Mode bits alone decide here, so ACLs could make this a false alarm;
    /// that is why it is only a hint attached to a real failure.
    fn traversal_hint(&self) -> Option<String> {
        let (uid, gid) = self.run_as?;
        let blocked = self.data_dir.ancestors().find(|dir| {
            let Ok(meta) = fs::metadata(dir) else {
                return false;
            };
            let mode = meta.mode();
            let bit = if meta.uid() == uid.as_raw() {
                0o100
            } else if meta.gid() == gid.as_raw() {
                0o010
            } else {
                0o001
            };
            mode & bit == 0
        })?;
        Some(format!(
            "hint: the server runs as uid {uid}, which may not enter {}; choose a data directory \
             elsewhere or allow it in (chmod o+x)",
            blocked.display()
        ))
    }
}

fn read_log_tail(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    // A log shorter than the offset was replaced meanwhile; show it from the start.
    let offset = if offset > len { 0 } else { offset };
    let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

/// Binding port 0 lets the kernel pick a port nobody uses right now; parallel clusters then do
/// not collide.
fn pick_free_port() -> Result<u16, ManagedError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_error("picking a free port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("picking a free port on 127.0.0.1"))?
        .port();
    Ok(port)
}

/// Alphanumeric only, so the password can go into a URL without percent-encoding.
fn generate_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Writes `contents` to `path` atomically (temporary file, then rename) with mode 0600, so a
/// crash never leaves a truncated password behind.
fn write_private_file(path: &Path, contents: &str) -> Result<(), ManagedError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new_private_file(&tmp, contents)?;
    fs::rename(&tmp, path).map_err(io_error(format!("moving {} into place", path.display())))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn write_new_private_file(path: &Path, contents: &str) -> Result<(), ManagedError> {
    let context = || format!("writing {}", path.display());
    // create_new: never write a secret into a file someone else prepared.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(context()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(io_error(context()))
}

fn sync_dir(dir: &Path) -> Result<(), ManagedError> {
    File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(io_error(format!("syncing {}", dir.display())))
}

/// A path as a URL query value: everything but unreserved characters and
/// `/` percent-encoded.
fn percent_encode_path(path: &Path) -> String {
    let mut out = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(*b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
