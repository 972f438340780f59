//! The durable write-ahead spool between the device edge and the pipeline.
//!
//! A QoS 1 PUBACK may only go out once its message would survive a crash, so
//! an append is reported durable after an fdatasync. One writer thread takes
//! everything queued, writes it with one `write` and syncs once (group
//! commit), so the fsync cost is shared by every connection appending at the
//! time.
//!
//! The pipeline reads the records back from the segment files, in seq order,
//! and reports what PostgreSQL committed with [`SpoolCheckpoint::advance`].
//! The checkpoint is persisted (coalesced, at most every 50 ms) and only then
//! are whole segments below it deleted. After a crash everything after the
//! last persisted checkpoint is read again: downstream may see duplicates,
//! never a gap.
//!
//! On disk, in the spool directory:
//! - `{first_seq:020}.seg`: records framed as `u32 body length | u32 crc32 of
//!   the body | body`, little-endian; the body is `seq u64, received_at_us i64,
//!   origin_kind u8, qos u8, retain u8, hops u8, origin_id (u16 length + bytes),
//!   topic (u16 length + bytes), payload (u32 length + bytes)`. A segment is
//!   closed once it reaches `segment_bytes`, so it may run over by one group.
//! - `checkpoint`: the checkpointed seq (u64) and its crc32, replaced
//!   atomically: written into `checkpoint.tmp`, fsynced, then swapped with
//!   it (`renameat2(RENAME_EXCHANGE)` where available, else a rename) and
//!   the directory fsynced. The swap keeps both files, so once they exist a
//!   checkpoint is saved by overwriting allocated bytes: it needs no free
//!   space, and on a full disk the checkpoint still advances and deletes
//!   the segments it covers.
//! - `lock`: held (flock) while the spool is open, so two spools never write
//!   the same directory.
//!
//! Appends wait while the un-checkpointed bytes exceed `max_bytes`; segments
//! go whole, so the disk holds at most about `max_bytes` plus one segment.
//!
//! A full disk (ENOSPC, EDQUOT) while writing or starting a segment is
//! waited out, not fatal: the writer cuts the segment back to its durable
//! length (a write cut short leaves a torn frame), keeps the group and
//! retries with capped backoff. Its appenders' [`Durable`]s stay pending,
//! so the edge stops acknowledging and, at `max_inflight`, stops reading
//! those clients; later appends queue within the usual bounds. Space
//! comes back when the operator frees some or when the checkpoint deletes
//! drained segments. Every other I/O error, and any failed fsync, stops
//! the writer for good ([`Writer::fail`]).

use bytes::{Buf, BufMut, Bytes};
use metrics::{counter, gauge, histogram};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufReader, Read, Take, Write};
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, info, warn};

const SEGMENT_SUFFIX: &str = ".seg";
const CHECKPOINT_FILE: &str = "checkpoint";
const IDENTITY_FILE: &str = "id";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const LOCK_FILE: &str = "lock";
const CHECKPOINT_LEN: usize = 12;
/// Far beyond any real seq (146,000 years at a million a second); a larger
/// one read from disk is damage, and refusing it keeps seq arithmetic from overflowing.
const MAX_SEQ: u64 = 1 << 62;

/// Length and crc of a frame.
const HEADER_LEN: u64 = 8;
/// seq, received_at_us, four one-byte fields and the three length prefixes.
const BODY_FIXED_LEN: u64 = 8 + 8 + 4 + 2 + 2 + 4;

/// Persisting the checkpoint costs two fsyncs; the pipeline may advance it
/// for every batch, so writes are coalesced to at most one per interval.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);
/// A failed checkpoint write (disk full, say) is retried this much later.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);
/// The writer's first wait after a full disk refused a group, doubled at
/// each refusal up to [`DISK_FULL_MAX_BACKOFF`]: short enough to resume
/// soon after space returns, long enough not to spin on a disk that stays full.
const DISK_FULL_FIRST_BACKOFF: Duration = Duration::from_millis(10);
const DISK_FULL_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A disk that fills again this soon after it had room (a drain freeing a
/// segment at a time under steady load) continues the last report rather
/// than logging a new warning each time.
const DISK_FULL_LOG_QUIET: Duration = Duration::from_secs(30);
/// How often the age gauge is refreshed when nothing else happens, so a
/// stalled pipeline shows up as a growing age.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// One group's write buffer: large groups gain nothing more from sharing an
/// fsync, and the buffer is memory held by the writer.
const GROUP_MAX_BYTES: u64 = 8 << 20;
/// The byte index used to free space at a checkpoint keeps about this many
/// points per `max_bytes`, so its memory does not grow with the record count.
const INDEX_POINTS: u64 = 1024;
const READ_BUFFER: usize = 256 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Where segments live; None = the caller picks `{data_dir}/spool`.
    /// [`open`] itself uses the directory it is given.
    pub dir: Option<PathBuf>,
    /// Un-checkpointed bytes on disk beyond which appends wait. Default 1 GiB.
    pub max_bytes: u64,
    /// Size at which a segment file is closed and a new one started. Default 64 MiB.
    pub segment_bytes: u64,
    /// Most records written per fsync. Default 4096. Also the number of
    /// appends that can be queued for the writer.
    pub group_commit_max: usize,
    /// fsync (fdatasync) before reporting durability. Default true.
    /// false = report after write(2) (benchmark comparison only).
    pub fsync: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            group_commit_max: 4096,
            fsync: true,
        }
    }
}

impl SpoolConfig {
    fn validate(&self) -> Result<(), SpoolError> {
        if self.max_bytes == 0 {
            return Err(SpoolError::Config("max_bytes must be above 0"));
        }
        if self.segment_bytes == 0 {
            return Err(SpoolError::Config("segment_bytes must be above 0"));
        }
        if self.group_commit_max == 0 {
            return Err(SpoolError::Config("group_commit_max must be above 0"));
        }
        Ok(())
    }
}

/// One spooled message. `seq` is assigned by the spool (ignored on append),
/// strictly increasing, also across restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolRecord {
    pub seq: u64,
    /// Unix microseconds.
    pub received_at_us: i64,
    /// Opaque to the spool.
    pub origin_kind: u8,
    /// Opaque to the spool.
    pub origin_id: String,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub hops: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool file {} is corrupt at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("spool directory {} is already open (its lock file is held)", .0.display())]
    Locked(PathBuf),
    #[error("{field} is {len} bytes, more than the {max} a spool record holds")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid spool configuration: {0}")]
    Config(&'static str),
    #[error("the spool is closed")]
    Closed,
    /// The writer hit an I/O error; nothing more can be appended.
    #[error("the spool writer stopped after an error: {0}")]
    Failed(#[source] Arc<SpoolError>),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// ENOSPC or EDQUOT: the file system (or the user's quota) has no room.
/// Such a write changed nothing that matters once cut back, so it can be
/// retried; other errors cannot be told apart from a failing device.
fn is_no_space(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

impl SpoolError {
    /// An I/O error because the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if is_no_space(source))
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> SpoolError {
    SpoolError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Counters since [`open`], for tests and diagnostics (the same numbers go
/// to the metrics recorder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub records_appended: u64,
    pub fsyncs: u64,
    /// Appends that had to wait because the spool was over `max_bytes`.
    pub full_waits: u64,
    /// Records found after the checkpoint at open.
    pub records_replayed: u64,
    /// Group writes refused by a full disk and retried.
    pub disk_full_retries: u64,
}

#[derive(Default)]
struct Stats {
    records_appended: AtomicU64,
    fsyncs: AtomicU64,
    full_waits: AtomicU64,
    records_replayed: AtomicU64,
    disk_full_retries: AtomicU64,
}

impl Stats {
    fn snapshot(&self) -> SpoolStats {
        SpoolStats {
            records_appended: self.records_appended.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            full_waits: self.full_waits.load(Ordering::Relaxed),
            records_replayed: self.records_replayed.load(Ordering::Relaxed),
            disk_full_retries: self.disk_full_retries.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------
// Opening and recovery

/// Opens (creating the dir if needed), recovers, starts the writer thread.
///
/// The directory stays locked until the appender, the reader and the
/// checkpoint handle (with all their clones) are dropped.
pub fn open(
    config: &SpoolConfig,
    dir: &Path,
) -> Result<(SpoolAppender, SpoolReader, SpoolCheckpoint), SpoolError> {
    config.validate()?;
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let dir_lock = Arc::new(lock_dir(dir)?);
    let checkpoint = read_checkpoint(dir)?;
    let granularity = config.max_bytes / INDEX_POINTS;
    let recovered = recover(dir, checkpoint, granularity)?;
    prepare_checkpoint_files(dir, checkpoint);
    report_open(dir, &recovered);

    let shared = Arc::new(Shared::new(dir, config, &recovered));
    let (tx, rx) = mpsc::channel(config.group_commit_max);
    let writer = Writer::new(
        shared.clone(),
        rx,
        config,
        &recovered,
        granularity,
        dir_lock.clone(),
    )?;
    let writer = spawn_thread("sluice-spool-writer", dir, move || writer.run())?;
    let appender = SpoolAppender {
        inner: Arc::new(AppenderInner {
            tx,
            shared: shared.clone(),
            _writer: writer,
        }),
    };
    let checkpointer = {
        let (shared, dir_lock) = (shared.clone(), dir_lock.clone());
        spawn_thread("sluice-spool-ckpt", dir, move || {
            run_checkpointer(shared, dir_lock)
        })?
    };
    let checkpoint_handle = SpoolCheckpoint {
        inner: Arc::new(CheckpointInner {
            shared: shared.clone(),
            _thread: checkpointer,
        }),
    };
    let reader = SpoolReader {
        shared,
        next_seq: checkpoint + 1,
        replay_end: recovered.last_seq,
        cursor: None,
        _dir_lock: dir_lock,
    };
    Ok((appender, reader, checkpoint_handle))
}

fn report_open(dir: &Path, recovered: &Recovered) {
    counter!("sluice_spool_records_replayed_total").increment(recovered.replayed);
    gauge!("sluice_spool_pending_bytes").set(recovered.pending_bytes as f64);
    gauge!("sluice_spool_pending_records").set(recovered.replayed as f64);
    gauge!("sluice_spool_disk_full").set(0.0);
    info!(
        dir = %dir.display(),
        checkpoint = recovered.checkpoint,
        replay = recovered.replayed,
        replay_end = recovered.last_seq,
        pending_bytes = recovered.pending_bytes,
        segments = recovered.segments.len(),
        "spool opened"
    );
}

fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_at(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Locked(dir.to_path_buf())),
        Err(fs::TryLockError::Error(source)) => Err(SpoolError::Io { path, source }),
    }
}

/// What the files say at open.
struct Recovered {
    checkpoint: u64,
    /// The highest seq on disk, or the checkpoint if that is higher: the
    /// writer continues after it.
    last_seq: u64,
    segments: VecDeque<u64>,
    /// The newest segment and its valid length.
    last_segment: Option<(u64, u64)>,
    index: VecDeque<IndexEntry>,
    pending_bytes: u64,
    replayed: u64,
}

fn recover(dir: &Path, checkpoint: u64, granularity: u64) -> Result<Recovered, SpoolError> {
    let firsts = drop_checkpointed_segments(dir, list_segments(dir)?, checkpoint)?;
    let mut scan = Scan::new(checkpoint, granularity);
    let mut scanned: Vec<(u64, SegmentScan)> = Vec::with_capacity(firsts.len());
    let mut expected: Option<u64> = None;
    for (i, &first) in firsts.iter().enumerate() {
        let path = segment_path(dir, first);
        check_segment_start(&path, first, expected, checkpoint)?;
        let is_last = i + 1 == firsts.len();
        let segment = scan_segment(&path, first, is_last, &mut scan)?;
        expected = Some(segment.last_seq.map_or(first, |last| last + 1));
        scanned.push((first, segment));
    }
    // An empty or fully checkpointed newest segment holds nothing to read;
    // the writer starts a fresh one named after the next seq.
    if let Some((first, segment)) = scanned.last()
        && segment.last_seq.is_none_or(|last| last <= checkpoint)
    {
        remove_segment(dir, *first)?;
        scanned.pop();
    }
    Ok(Recovered {
        checkpoint,
        last_seq: scan.last_seq,
        segments: scanned.iter().map(|(first, _)| *first).collect(),
        last_segment: scanned.last().map(|(first, s)| (*first, s.len)),
        index: scan.index,
        pending_bytes: scan.pending_bytes,
        replayed: scan.replayed,
    })
}

/// Deletes the segments that hold only checkpointed records (known from the
/// next segment's name, without reading them) and returns the others.
fn drop_checkpointed_segments(
    dir: &Path,
    firsts: Vec<u64>,
    checkpoint: u64,
) -> Result<Vec<u64>, SpoolError> {
    let mut kept = Vec::with_capacity(firsts.len());
    for (i, &first) in firsts.iter().enumerate() {
        let covered = firsts
            .get(i + 1)
            .is_some_and(|&next| next <= checkpoint.saturating_add(1));
        if covered {
            remove_segment(dir, first)?;
        } else {
            kept.push(first);
        }
    }
    Ok(kept)
}

fn check_segment_start(
    path: &Path,
    first: u64,
    expected: Option<u64>,
    checkpoint: u64,
) -> Result<(), SpoolError> {
    match expected {
        Some(expected) if first != expected => Err(corrupt(
            path,
            0,
            format!("the segment starts at seq {first}, the one before ends before seq {expected}"),
        )),
        None if first > checkpoint + 1 => Err(corrupt(
            path,
            0,
            format!(
                "records {}..{first} are missing: the checkpoint is {checkpoint} but the oldest segment starts at {first}",
                checkpoint + 1
            ),
        )),
        _ => Ok(()),
    }
}

/// The byte accounting built while scanning the segments at open.
struct Scan {
    checkpoint: u64,
    granularity: u64,
    last_seq: u64,
    index: VecDeque<IndexEntry>,
    pending_bytes: u64,
    replayed: u64,
}

impl Scan {
    fn new(checkpoint: u64, granularity: u64) -> Self {
        Self {
            checkpoint,
            granularity,
            last_seq: checkpoint,
            index: VecDeque::new(),
            pending_bytes: 0,
            replayed: 0,
        }
    }

    fn add(&mut self, frame: &Frame) {
        let seq = frame.record.seq;
        self.last_seq = self.last_seq.max(seq);
        if seq <= self.checkpoint {
            return;
        }
        let entry = IndexEntry {
            first_seq: seq,
            start: self.pending_bytes,
            received_at_us: frame.record.received_at_us,
        };
        push_index(&mut self.index, self.granularity, entry);
        self.pending_bytes += frame.len;
        self.replayed += 1;
    }
}

struct SegmentScan {
    /// Bytes of valid frames (the file is truncated to this).
    len: u64,
    last_seq: Option<u64>,
}

fn scan_segment(
    path: &Path,
    first: u64,
    is_last: bool,
    scan: &mut Scan,
) -> Result<SegmentScan, SpoolError> {
    let file = File::open(path).map_err(io_at(path))?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, file);
    let mut offset = 0;
    let mut next = first;
    loop {
        match read_frame(&mut reader) {
            Ok(None) => break,
            Ok(Some(frame)) => {
                if frame.record.seq != next {
                    let reason = format!("seq {} where {next} was expected", frame.record.seq);
                    return Err(corrupt(path, offset, reason));
                }
                scan.add(&frame);
                offset += frame.len;
                next += 1;
            }
            Err(FrameError::Io(source)) => return Err(io_at(path)(source)),
            // Only the newest segment can end in a write that a crash cut
            // short; no record there was reported durable.
            Err(e) if is_last && e.is_torn() => {
                truncate_torn_tail(path, offset, &e)?;
                break;
            }
            Err(e) => return Err(corrupt(path, offset, e.to_string())),
        }
    }
    Ok(SegmentScan {
        len: offset,
        last_seq: (next > first).then(|| next - 1),
    })
}

fn truncate_torn_tail(path: &Path, valid: u64, cause: &FrameError) -> Result<(), SpoolError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    let len = file.metadata().map_err(io_at(path))?.len();
    file.set_len(valid)
        .and_then(|()| file.sync_all())
        .map_err(io_at(path))?;
    warn!(
        segment = %path.display(),
        offset = valid,
        bytes = len.saturating_sub(valid),
        cause = %cause,
        "truncated a torn write at the end of the spool"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Files

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

/// The first seqs of the segment files, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let name = entry.map_err(io_at(dir))?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        match stem.parse::<u64>() {
            Ok(first) if first <= MAX_SEQ => firsts.push(first),
            Ok(_) => return Err(corrupt(&dir.join(&name), 0, "implausible seq in the name")),
            Err(_) => warn!(file = ?name, "ignoring a .seg file not named by a seq"),
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

fn remove_segment(dir: &Path, first_seq: u64) -> Result<(), SpoolError> {
    let path = segment_path(dir, first_seq);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(&path)(e)),
    }
}

/// A created or renamed file survives a crash only once its directory entry does.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// The spool's identity: made once, when the directory is new, and kept in
/// it. Whatever records a position in this spool elsewhere (the database's
/// `ingest_progress`) keys it by this, so a wiped spool, whose seqs start
/// again at 1, is never mistaken for the old one.
pub fn identity(dir: &Path) -> Result<String, SpoolError> {
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let path = dir.join(IDENTITY_FILE);
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&path)(e)),
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!("{nanos:032x}-{:08x}", std::process::id());
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let mut file = File::create(&tmp).map_err(io_at(&tmp))?;
    file.write_all(id.as_bytes()).map_err(io_at(&tmp))?;
    file.sync_all().map_err(io_at(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    Ok(id)
}

fn read_checkpoint(dir: &Path) -> Result<u64, SpoolError> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_at(&path)(e)),
    };
    // Guessing here would be worse than stopping: a checkpoint read as too
    // low only replays, but one read as 0 after its segments were deleted
    // would restart seqs and make downstream drop new records as duplicates.
    if bytes.len() != CHECKPOINT_LEN {
        let reason = format!("{} bytes where {CHECKPOINT_LEN} were expected", bytes.len());
        return Err(corrupt(&path, 0, reason));
    }
    let mut fields = &bytes[..];
    let seq = fields.get_u64_le();
    let crc = fields.get_u32_le();
    if crc32fast::hash(&bytes[..8]) != crc {
        return Err(corrupt(&path, 0, "checksum mismatch"));
    }
    if seq > MAX_SEQ {
        return Err(corrupt(&path, 0, format!("implausible checkpoint {seq}")));
    }
    Ok(seq)
}

fn write_checkpoint(dir: &Path, seq: u64) -> Result<(), SpoolError> {
    let mut bytes = Vec::with_capacity(CHECKPOINT_LEN);
    bytes.put_u64_le(seq);
    bytes.put_u32_le(crc32fast::hash(&seq.to_le_bytes()));
    let tmp = dir.join(CHECKPOINT_TMP);
    // Not truncated: overwriting the spare's bytes in place needs no free
    // space. A write cut short leaves only the spare torn, which is never read.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    file.write_all(&bytes)
        .and_then(|()| file.set_len(CHECKPOINT_LEN as u64))
        .and_then(|()| file.sync_all())
        .map_err(io_at(&tmp))?;
    drop(file);
    let path = dir.join(CHECKPOINT_FILE);
    replace_keeping_spare(dir, &path)?;
    sync_dir(dir)
}

/// Makes `checkpoint` (with the value read at open, so nothing changes)
/// and its spare if they are missing, so that even the first checkpoint
/// saved after open needs no free space. Best effort: whatever is missing
/// is made by the next checkpoint (which on a full disk waits for room).
fn prepare_checkpoint_files(dir: &Path, checkpoint: u64) {
    if !dir.join(CHECKPOINT_FILE).exists()
        && let Err(e) = write_checkpoint(dir, checkpoint)
    {
        debug!(error = %e, "cannot write the spool checkpoint at open");
    }
    let tmp = dir.join(CHECKPOINT_TMP);
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut file| file.write_all(&[0; CHECKPOINT_LEN]));
    match made {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => debug!(error = %e, "cannot prepare the spare checkpoint file"),
    }
}

/// Puts `checkpoint.tmp` in place of `checkpoint`, atomically, keeping the
/// old checkpoint's file as the next spare where the platform can swap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn replace_keeping_spare(dir: &Path, path: &Path) -> Result<(), SpoolError> {
    use nix::errno::Errno;
    use nix::fcntl::{RenameFlags, renameat2};
    let handle = File::open(dir).map_err(io_at(dir))?;
    match renameat2(
        &handle,
        CHECKPOINT_TMP,
        &handle,
        CHECKPOINT_FILE,
        RenameFlags::RENAME_EXCHANGE,
    ) {
        Ok(()) => Ok(()),
        // No checkpoint yet, or a file system or kernel that cannot swap.
        Err(Errno::ENOENT | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            fs::rename(dir.join(CHECKPOINT_TMP), path).map_err(io_at(path))
        }
        Err(errno) => Err(io_at(path)(io::Error::from(errno))),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn replace_keeping_spare(dir: &Path, path: &Path) -> Result<(), SpoolError> {
    fs::rename(dir.join(CHECKPOINT_TMP), path).map_err(io_at(path))
}

// ---------------------------------------------------------------------------
// Record framing

/// The framed size of `record`, or why it cannot be spooled.
fn frame_len(record: &SpoolRecord) -> Result<u64, SpoolError> {
    check_len("origin_id", record.origin_id.len(), u16::MAX as usize)?;
    check_len("topic", record.topic.len(), u16::MAX as usize)?;
    let head = BODY_FIXED_LEN + record.origin_id.len() as u64 + record.topic.len() as u64;
    let payload_max = usize::try_from(u64::from(u32::MAX) - head).unwrap_or(usize::MAX);
    check_len("payload", record.payload.len(), payload_max)?;
    Ok(HEADER_LEN + head + record.payload.len() as u64)
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), SpoolError> {
    if len > max {
        return Err(SpoolError::TooLong { field, len, max });
    }
    Ok(())
}

/// Appends one frame; the lengths were checked by [`frame_len`] at append.
fn encode_frame(buf: &mut Vec<u8>, seq: u64, record: &SpoolRecord) {
    let start = buf.len();
    let body = start + HEADER_LEN as usize;
    buf.put_u64_le(0); // length and crc, known once the body is written
    buf.put_u64_le(seq);
    buf.put_i64_le(record.received_at_us);
    buf.put_u8(record.origin_kind);
    buf.put_u8(record.qos);
    buf.put_u8(u8::from(record.retain));
    buf.put_u8(record.hops);
    buf.put_u16_le(record.origin_id.len() as u16);
    buf.put_slice(record.origin_id.as_bytes());
    buf.put_u16_le(record.topic.len() as u16);
    buf.put_slice(record.topic.as_bytes());
    buf.put_u32_le(record.payload.len() as u32);
    buf.put_slice(&record.payload);
    let len = (buf.len() - body) as u32;
    let crc = crc32fast::hash(&buf[body..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..body].copy_from_slice(&crc.to_le_bytes());
}

#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("{0}")]
    Io(io::Error),
    #[error("the file ends inside a record")]
    Short,
    #[error("impossible record length {0}")]
    BadLength(u32),
    #[error("checksum mismatch")]
    BadCrc,
    /// The checksum matched, so this is not a torn write but a bug or tampering.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

impl FrameError {
    /// What an interrupted write can leave behind.
    fn is_torn(&self) -> bool {
        matches!(
            self,
            FrameError::Short | FrameError::BadLength(_) | FrameError::BadCrc
        )
    }
}

struct Frame {
    record: SpoolRecord,
    /// Header included.
    len: u64,
}

/// Reads the next frame; `Ok(None)` at a clean end, between frames.
fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_LEN as usize];
    match read_full(r, &mut header).map_err(FrameError::Io)? {
        0 => return Ok(None),
        n if n < header.len() => return Err(FrameError::Short),
        _ => {}
    }
    let mut fields = &header[..];
    let body_len = fields.get_u32_le();
    let crc = fields.get_u32_le();
    if u64::from(body_len) < BODY_FIXED_LEN {
        return Err(FrameError::BadLength(body_len));
    }
    // Grown as bytes arrive rather than allocated from a length that may be garbage.
    let mut body = Vec::with_capacity((body_len as usize).min(READ_BUFFER));
    r.by_ref()
        .take(u64::from(body_len))
        .read_to_end(&mut body)
        .map_err(FrameError::Io)?;
    if body.len() < body_len as usize {
        return Err(FrameError::Short);
    }
    if crc32fast::hash(&body) != crc {
        return Err(FrameError::BadCrc);
    }
    let record = decode_body(Bytes::from(body)).map_err(FrameError::Malformed)?;
    Ok(Some(Frame {
        record,
        len: HEADER_LEN + u64::from(body_len),
    }))
}

/// Like `read_exact`, but tells a clean end (0) from a short one.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn decode_body(mut body: Bytes) -> Result<SpoolRecord, &'static str> {
    let mut fixed = split(&mut body, 20)?;
    let seq = fixed.get_u64_le();
    let received_at_us = fixed.get_i64_le();
    let origin_kind = fixed.get_u8();
    let qos = fixed.get_u8();
    let retain = fixed.get_u8() != 0;
    let hops = fixed.get_u8();
    let origin_len = split(&mut body, 2)?.get_u16_le();
    let origin_id = utf8(split(&mut body, origin_len.into())?)?;
    let topic_len = split(&mut body, 2)?.get_u16_le();
    let topic = utf8(split(&mut body, topic_len.into())?)?;
    let payload_len = split(&mut body, 4)?.get_u32_le();
    let payload = split(&mut body, payload_len as usize)?;
    if !body.is_empty() {
        return Err("bytes after the payload");
    }
    Ok(SpoolRecord {
        seq,
        received_at_us,
        origin_kind,
        origin_id,
        topic,
        payload,
        qos,
        retain,
        hops,
    })
}

fn split(body: &mut Bytes, n: usize) -> Result<Bytes, &'static str> {
    if body.len() < n {
        return Err("a field runs past the end of the record");
    }
    Ok(body.split_to(n))
}

fn utf8(bytes: Bytes) -> Result<String, &'static str> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a text field is not UTF-8")
}

// ---------------------------------------------------------------------------
// State shared by the handles and the threads

/// A point of the sparse byte index: where the frame of `first_seq` starts,
/// counted in bytes appended since open. The index turns a checkpoint seq
/// into bytes freed without keeping a position per record.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    first_seq: u64,
    start: u64,
    received_at_us: i64,
}

fn push_index(index: &mut VecDeque<IndexEntry>, granularity: u64, entry: IndexEntry) {
    if index
        .back()
        .is_none_or(|last| entry.start.saturating_sub(last.start) >= granularity)
    {
        index.push_back(entry);
    }
}

#[derive(Debug, Clone)]
enum WriterState {
    Running,
    Closed,
    Failed(Arc<SpoolError>),
}

/// How far the reader may read: everything up to `last_seq`, and in the
/// segment `segment` no further than `offset` (the writer may be in the
/// middle of a write there).
#[derive(Debug, Clone, Copy)]
struct DurablePosition {
    segment: Option<u64>,
    offset: u64,
    last_seq: u64,
}

/// What the writer publishes and the checkpoint consumes, under one mutex.
struct LogState {
    /// Segment files by first seq, oldest first.
    segments: VecDeque<u64>,
    durable: DurablePosition,
    /// Bytes made durable since open (the index's unit).
    end: u64,
    /// Where the first un-checkpointed record starts, rounded down to an index point.
    base: u64,
    /// The checkpoint the byte accounting has caught up with.
    freed_upto: u64,
    index: VecDeque<IndexEntry>,
    writer: WriterState,
}

impl LogState {
    /// The byte position of the first record after `checkpoint`, rounded
    /// down to an index point (so pending bytes are over- rather than under-counted).
    fn start_after(&mut self, checkpoint: u64) -> u64 {
        if checkpoint >= self.durable.last_seq {
            self.index.clear();
            return self.end;
        }
        let next = checkpoint + 1;
        while self.index.get(1).is_some_and(|e| e.first_seq <= next) {
            self.index.pop_front();
        }
        match self.index.front() {
            Some(entry) if entry.first_seq <= next => entry.start.max(self.base),
            _ => self.base,
        }
    }

    fn oldest_pending_seconds(&self) -> f64 {
        if self.durable.last_seq <= self.freed_upto {
            return 0.0;
        }
        self.index.front().map_or(0.0, |entry| {
            (now_us().saturating_sub(entry.received_at_us)).max(0) as f64 / 1e6
        })
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

struct CheckpointState {
    /// The highest seq passed to `advance` (after clamping).
    requested: u64,
    /// The seq in the checkpoint file.
    persisted: u64,
    stop: bool,
}

struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes appended (from the moment an append is admitted) minus bytes
    /// freed by checkpoints: what `max_bytes` bounds.
    pending_bytes: AtomicU64,
    /// Set once when the writer fails; every later append returns it.
    failure: OnceLock<Arc<SpoolError>>,
    space: Notify,
    space_lock: Mutex<()>,
    space_cv: Condvar,
    log: Mutex<LogState>,
    log_cv: Condvar,
    /// The last seq the reader handed out; nothing beyond it can have been
    /// stored downstream, so the checkpoint never passes it.
    read_upto: AtomicU64,
    ckpt: Mutex<CheckpointState>,
    ckpt_cv: Condvar,
    /// Serialises checkpoint file writes between the background thread and `flush`.
    persist_lock: Mutex<()>,
    stats: Stats,
    /// The writer is waiting for the disk to have room (the gauge
    /// `sluice_spool_disk_full`).
    disk_full: AtomicBool,
    #[cfg(test)]
    faults: faults::Faults,
}

impl Shared {
    fn new(dir: &Path, config: &SpoolConfig, recovered: &Recovered) -> Self {
        let stats = Stats::default();
        stats
            .records_replayed
            .store(recovered.replayed, Ordering::Relaxed);
        let log = LogState {
            segments: recovered.segments.clone(),
            durable: DurablePosition {
                segment: recovered.last_segment.map(|(first, _)| first),
                offset: recovered.last_segment.map_or(0, |(_, len)| len),
                last_seq: recovered.last_seq,
            },
            end: recovered.pending_bytes,
            base: 0,
            freed_upto: recovered.checkpoint,
            index: recovered.index.clone(),
            writer: WriterState::Running,
        };
        Self {
            dir: dir.to_path_buf(),
            max_bytes: config.max_bytes,
            pending_bytes: AtomicU64::new(recovered.pending_bytes),
            failure: OnceLock::new(),
            space: Notify::new(),
            space_lock: Mutex::new(()),
            space_cv: Condvar::new(),
            log: Mutex::new(log),
            log_cv: Condvar::new(),
            read_upto: AtomicU64::new(recovered.checkpoint),
            ckpt: Mutex::new(CheckpointState {
                requested: recovered.checkpoint,
                persisted: recovered.checkpoint,
                stop: false,
            }),
            ckpt_cv: Condvar::new(),
            persist_lock: Mutex::new(()),
            stats,
            disk_full: AtomicBool::new(false),
            #[cfg(test)]
            faults: faults::Faults::default(),
        }
    }

    fn stopped_error(&self) -> SpoolError {
        match self.failure.get() {
            Some(error) => SpoolError::Failed(error.clone()),
            None => SpoolError::Closed,
        }
    }

    /// Admits `bytes` if the spool is not over `max_bytes`. A single record
    /// larger than `max_bytes` still gets in once the spool is drained.
    fn try_reserve(&self, bytes: u64) -> Result<Option<Reservation<'_>>, SpoolError> {
        if let Some(error) = self.failure.get() {
            return Err(SpoolError::Failed(error.clone()));
        }
        let max = self.max_bytes;
        let admitted =
            self.pending_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                    (current <= max).then_some(current.saturating_add(bytes))
                });
        // Built only once admitted: dropping a Reservation gives its bytes back.
        if admitted.is_err() {
            return Ok(None);
        }
        Ok(Some(Reservation {
            shared: self,
            bytes,
        }))
    }

    async fn reserve_async(&self, bytes: u64) -> Result<Reservation<'_>, SpoolError> {
        let mut waited = false;
        loop {
            let mut notified = pin!(self.space.notified());
            // Registered before the check, so space freed in between still wakes us.
            notified.as_mut().enable();
            if let Some(reservation) = self.try_reserve(bytes)? {
                return Ok(reservation);
            }
            self.count_full_wait(&mut waited);
            notified.await;
        }
    }

    fn reserve_blocking(&self, bytes: u64) -> Result<Reservation<'_>, SpoolError> {
        let mut waited = false;
        let mut guard = lock(&self.space_lock);
        loop {
            if let Some(reservation) = self.try_reserve(bytes)? {
                return Ok(reservation);
            }
            self.count_full_wait(&mut waited);
            guard = self
                .space_cv
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn count_full_wait(&self, waited: &mut bool) {
        if !*waited {
            *waited = true;
            self.stats.full_waits.fetch_add(1, Ordering::Relaxed);
            counter!("sluice_spool_full_waits_total").increment(1);
        }
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .pending_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                Some(current.saturating_sub(bytes))
            });
        self.notify_space();
    }

    fn notify_space(&self) {
        self.space.notify_waiters();
        // Taking the lock orders this after a blocking waiter's check.
        let _guard = lock(&self.space_lock);
        self.space_cv.notify_all();
    }

    /// Gives back the bytes of the records up to `checkpoint`.
    fn free_upto(&self, checkpoint: u64) {
        let mut log = lock(&self.log);
        if checkpoint <= log.freed_upto {
            return;
        }
        log.freed_upto = checkpoint;
        let base = log.start_after(checkpoint);
        if base > log.base {
            let freed = base - log.base;
            log.base = base;
            let _ =
                self.pending_bytes
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                        Some(current.saturating_sub(freed))
                    });
        }
        self.publish_gauges(&log);
        drop(log);
        self.notify_space();
    }

    fn publish_gauges(&self, log: &LogState) {
        let pending_records = log.durable.last_seq.saturating_sub(log.freed_upto);
        gauge!("sluice_spool_pending_bytes").set(self.pending_bytes.load(Ordering::Relaxed) as f64);
        gauge!("sluice_spool_pending_records").set(pending_records as f64);
        gauge!("sluice_spool_oldest_pending_seconds").set(log.oldest_pending_seconds());
    }

    fn refresh_age_gauge(&self) {
        let age = lock(&self.log).oldest_pending_seconds();
        gauge!("sluice_spool_oldest_pending_seconds").set(age);
    }

    fn set_writer_state(&self, state: WriterState) {
        lock(&self.log).writer = state;
        self.log_cv.notify_all();
    }

    /// Writes the requested checkpoint if it is newer than the file, then
    /// deletes the segments the file now covers (never before: a crash in
    /// between must not leave a checkpoint older than the deleted records).
    /// Serialised whole, so `flush` returns only after a concurrent
    /// background run has finished deleting too.
    fn persist_checkpoint(&self) -> Result<(), SpoolError> {
        let _serial = lock(&self.persist_lock);
        let (target, persisted) = {
            let state = lock(&self.ckpt);
            (state.requested, state.persisted)
        };
        if target > persisted {
            #[cfg(test)]
            self.faults.on_checkpoint(&self.dir)?;
            write_checkpoint(&self.dir, target)?;
            lock(&self.ckpt).persisted = target;
            debug!(checkpoint = target, "spool checkpoint persisted");
        }
        self.delete_segments_upto(target.max(persisted));
        Ok(())
    }

    /// Deletes the segments whose successor starts at or below `checkpoint + 1`.
    /// The newest segment has no successor, so the writer's file is never deleted.
    fn delete_segments_upto(&self, checkpoint: u64) {
        let doomed: Vec<u64> = {
            let mut log = lock(&self.log);
            let mut doomed = Vec::new();
            while log
                .segments
                .get(1)
                .is_some_and(|&next| next <= checkpoint + 1)
            {
                doomed.extend(log.segments.pop_front());
            }
            doomed
        };
        for first in doomed {
            // Left behind, it is deleted at the next open; only disk space is at stake.
            if let Err(e) = remove_segment(&self.dir, first) {
                warn!(error = %e, "cannot delete a checkpointed spool segment");
            }
        }
    }
}

/// The spool's state stays usable after a panic on another thread: poisoning
/// would otherwise turn one bug into panics on every connection.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(guard, timeout) {
        Ok((guard, _)) => guard,
        Err(poisoned) => poisoned.into_inner().0,
    }
}

/// Bytes counted against `max_bytes` for an append that has not reached the
/// writer's queue yet; given back if the append is abandoned (an error, or
/// its future dropped while waiting for a queue slot).
struct Reservation<'a> {
    shared: &'a Shared,
    bytes: u64,
}

impl Reservation<'_> {
    /// The record is queued: its bytes stay counted until a checkpoint frees them.
    fn keep(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.shared.release(self.bytes);
        }
    }
}

/// Joins a spool thread when its owner goes, so that once every handle is
/// dropped nothing touches the directory any more (and it can be reopened).
struct JoinOnDrop(Option<JoinHandle<()>>);

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take()
            && handle.thread().id() != std::thread::current().id()
            && handle.join().is_err()
        {
            error!("a spool thread panicked");
        }
    }
}

fn spawn_thread(
    name: &str,
    dir: &Path,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinOnDrop, SpoolError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .map(|handle| JoinOnDrop(Some(handle)))
        .map_err(io_at(dir))
}

// ---------------------------------------------------------------------------
// Appending

/// Appends records; cheap to clone and shared by every connection task.
///
/// Dropping the last clone closes the spool: it waits (briefly: one group
/// write and fsync) for the writer to make what is queued durable.
#[derive(Clone)]
pub struct SpoolAppender {
    inner: Arc<AppenderInner>,
}

struct AppenderInner {
    // Fields drop in order: the queue closes first, which lets the writer
    // drain and stop, and only then is it joined.
    tx: mpsc::Sender<Pending>,
    shared: Arc<Shared>,
    _writer: JoinOnDrop,
}

struct Pending {
    record: SpoolRecord,
    frame_len: u64,
    done: oneshot::Sender<Result<u64, SpoolError>>,
}

impl SpoolAppender {
    /// Waits (async, without blocking the runtime thread) while the spool is
    /// over `max_bytes` or the writer's bounded queue is full; returns once
    /// the record is queued. The returned [`Durable`] resolves to the
    /// record's seq when it is on disk (fsynced if `config.fsync`).
    pub async fn append(&self, record: SpoolRecord) -> Result<Durable, SpoolError> {
        let shared = &self.inner.shared;
        let frame_len = frame_len(&record)?;
        let reservation = shared.reserve_async(frame_len).await?;
        let permit = self
            .inner
            .tx
            .reserve()
            .await
            .map_err(|_| shared.stopped_error())?;
        let (done, rx) = oneshot::channel();
        permit.send(Pending {
            record,
            frame_len,
            done,
        });
        reservation.keep();
        Ok(Durable { rx })
    }

    /// [`SpoolAppender::append`] for plain threads; must not be called from
    /// async code (it blocks).
    pub fn blocking_append(&self, record: SpoolRecord) -> Result<Durable, SpoolError> {
        let shared = &self.inner.shared;
        let frame_len = frame_len(&record)?;
        let reservation = shared.reserve_blocking(frame_len)?;
        let (done, rx) = oneshot::channel();
        let pending = Pending {
            record,
            frame_len,
            done,
        };
        self.inner
            .tx
            .blocking_send(pending)
            .map_err(|_| shared.stopped_error())?;
        reservation.keep();
        Ok(Durable { rx })
    }
}

impl fmt::Debug for SpoolAppender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpoolAppender")
            .field("dir", &self.inner.shared.dir)
            .finish_non_exhaustive()
    }
}

/// Resolves to the record's seq once it is durable. Notifications complete
/// in append order. Dropping it does not withdraw the record.
#[derive(Debug)]
pub struct Durable {
    rx: oneshot::Receiver<Result<u64, SpoolError>>,
}

impl Durable {
    /// Waits on a plain thread; must not be called from async code.
    pub fn blocking_wait(self) -> Result<u64, SpoolError> {
        self.rx.blocking_recv().unwrap_or(Err(SpoolError::Closed))
    }
}

impl Future for Durable {
    type Output = Result<u64, SpoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|result| result.unwrap_or(Err(SpoolError::Closed)))
    }
}

// ---------------------------------------------------------------------------
// The writer thread

struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Pending>,
    active: Option<Segment>,
    next_seq: u64,
    segment_bytes: u64,
    group_max: usize,
    group_max_bytes: u64,
    fsync: bool,
    granularity: u64,
    buf: Vec<u8>,
    /// Set while a full disk holds the current group back.
    disk_full: Option<DiskFull>,
    /// When the last such episode ended.
    disk_full_ended: Option<Instant>,
    _dir_lock: Arc<File>,
}

struct Segment {
    first_seq: u64,
    file: File,
    len: u64,
}

/// One stretch of time during which the disk had no room for the writer.
struct DiskFull {
    since: Instant,
    retries: u64,
    backoff: Duration,
    /// Reported at warn level (else at debug: see [`DISK_FULL_LOG_QUIET`]).
    loud: bool,
}

/// Why a group was not written.
enum WriteFailure {
    /// The disk or quota is full; the segment is back at its durable
    /// length, so the same group can be written again.
    NoSpace(SpoolError),
    /// Anything else: the writer stops.
    Fatal(SpoolError),
}

/// Why the writer stopped before its queue closed normally.
enum Stop {
    Failed(SpoolError),
    /// Every appender went (shutdown) while a full disk held the group back.
    ClosedWhileFull,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Pending>,
        config: &SpoolConfig,
        recovered: &Recovered,
        granularity: u64,
        dir_lock: Arc<File>,
    ) -> Result<Self, SpoolError> {
        let active = match recovered.last_segment {
            Some((first_seq, len)) if len < config.segment_bytes => {
                Some(reopen_segment(&shared.dir, first_seq, len)?)
            }
            _ => None,
        };
        Ok(Self {
            shared,
            rx,
            active,
            next_seq: recovered.last_seq + 1,
            segment_bytes: config.segment_bytes,
            group_max: config.group_commit_max,
            group_max_bytes: config.segment_bytes.min(GROUP_MAX_BYTES),
            fsync: config.fsync,
            granularity,
            buf: Vec::new(),
            disk_full: None,
            disk_full_ended: None,
            _dir_lock: dir_lock,
        })
    }

    fn run(mut self) {
        let mut group = Vec::with_capacity(self.group_max.min(1024));
        while self.collect(&mut group) {
            match self.commit(&mut group) {
                Ok(()) => {}
                Err(Stop::Failed(error)) => {
                    self.fail(error, group);
                    return;
                }
                Err(Stop::ClosedWhileFull) => {
                    self.abandon(group);
                    break;
                }
            }
        }
        self.shared.set_writer_state(WriterState::Closed);
        debug!(next_seq = self.next_seq, "spool writer stopped");
    }

    /// Waits for one append, then takes whatever else is already queued.
    /// Returns false once every appender is gone and the queue is empty.
    fn collect(&mut self, group: &mut Vec<Pending>) -> bool {
        group.clear();
        let Some(first) = self.rx.blocking_recv() else {
            return false;
        };
        let mut bytes = first.frame_len;
        group.push(first);
        while group.len() < self.group_max && bytes < self.group_max_bytes {
            match self.rx.try_recv() {
                Ok(pending) => {
                    bytes += pending.frame_len;
                    group.push(pending);
                }
                Err(_) => break,
            }
        }
        true
    }

    /// Writes the group (waiting out a full disk) and reports it durable.
    fn commit(&mut self, group: &mut Vec<Pending>) -> Result<(), Stop> {
        let started = Instant::now();
        let first_seq = self.next_seq;
        self.encode(group, first_seq);
        let durable = loop {
            match self.write_group(first_seq) {
                Ok(durable) => break durable,
                Err(WriteFailure::NoSpace(error)) => self.wait_for_space(&error)?,
                Err(WriteFailure::Fatal(error)) => return Err(Stop::Failed(error)),
            }
        };
        self.space_returned();
        let bytes = self.buf.len() as u64;
        self.next_seq = first_seq + group.len() as u64;
        self.publish(first_seq, group, bytes, durable);
        let records = group.len();
        for (seq, pending) in (first_seq..).zip(group.drain(..)) {
            // The appender may have stopped waiting; the record is durable all the same.
            let _ = pending.done.send(Ok(seq));
        }
        self.shared
            .stats
            .records_appended
            .fetch_add(records as u64, Ordering::Relaxed);
        counter!("sluice_spool_records_appended_total").increment(records as u64);
        debug!(
            records,
            bytes,
            elapsed_us = started.elapsed().as_micros() as u64,
            "spool group commit"
        );
        Ok(())
    }

    /// One attempt at the encoded group; on success, where the segment's
    /// durable end now is.
    fn write_group(&mut self, first_seq: u64) -> Result<(u64, u64), WriteFailure> {
        let mut segment = self.segment_with_room(first_seq)?;
        let written = self.write(&mut segment);
        let durable = (segment.first_seq, segment.len);
        self.active = Some(segment);
        written.map(|()| durable)
    }

    /// A full disk refused the group: reports it (once per episode), then
    /// waits before the next attempt. Gives up only when no appender is
    /// left to wait for the answer.
    fn wait_for_space(&mut self, error: &SpoolError) -> Result<(), Stop> {
        if self.rx.is_closed() {
            return Err(Stop::ClosedWhileFull);
        }
        let loud = self
            .disk_full_ended
            .is_none_or(|ended| ended.elapsed() >= DISK_FULL_LOG_QUIET);
        let episode = self.disk_full.get_or_insert_with(|| {
            const MESSAGE: &str =
                "spool disk full: holding back acknowledgements and retrying until there is room";
            if loud {
                warn!(%error, "{MESSAGE}");
            } else {
                debug!(%error, "{MESSAGE}");
            }
            gauge!("sluice_spool_disk_full").set(1.0);
            DiskFull {
                since: Instant::now(),
                retries: 0,
                backoff: DISK_FULL_FIRST_BACKOFF,
                loud,
            }
        });
        self.shared.disk_full.store(true, Ordering::Release);
        episode.retries += 1;
        self.shared
            .stats
            .disk_full_retries
            .fetch_add(1, Ordering::Relaxed);
        counter!("sluice_spool_disk_full_retries_total").increment(1);
        let wait = episode.backoff;
        episode.backoff = (wait * 2).min(DISK_FULL_MAX_BACKOFF);
        std::thread::sleep(wait);
        Ok(())
    }

    fn space_returned(&mut self) {
        let Some(episode) = self.end_disk_full() else {
            return;
        };
        let (retries, waited_ms) = (episode.retries, episode.since.elapsed().as_millis() as u64);
        const MESSAGE: &str = "spool disk has room again; writing resumed";
        if episode.loud {
            info!(retries, waited_ms, "{MESSAGE}");
        } else {
            debug!(retries, waited_ms, "{MESSAGE}");
        }
    }

    fn segment_with_room(&mut self, first_seq: u64) -> Result<Segment, WriteFailure> {
        match self.active.take() {
            Some(segment) if segment.len < self.segment_bytes => Ok(segment),
            _ => self.create_segment(first_seq),
        }
    }

    fn create_segment(&self, first_seq: u64) -> Result<Segment, WriteFailure> {
        let path = segment_path(&self.shared.dir, first_seq);
        #[cfg(test)]
        if faults::take(&self.shared.faults.no_space_creates) {
            return Err(WriteFailure::NoSpace(io_at(&path)(faults::no_space())));
        }
        // A directory with no room for another entry refuses the file; nothing was made.
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| classify(&path, e))?;
        if self.fsync {
            sync_dir(&self.shared.dir).map_err(WriteFailure::Fatal)?;
        }
        lock(&self.shared.log).segments.push_back(first_seq);
        debug!(segment = %path.display(), "spool segment started");
        Ok(Segment {
            first_seq,
            file,
            len: 0,
        })
    }

    fn encode(&mut self, group: &[Pending], first_seq: u64) {
        self.buf.clear();
        // An unusually large group must not pin its buffer for good.
        self.buf.shrink_to(GROUP_MAX_BYTES as usize);
        for (seq, pending) in (first_seq..).zip(group) {
            encode_frame(&mut self.buf, seq, &pending.record);
        }
    }

    fn write(&self, segment: &mut Segment) -> Result<(), WriteFailure> {
        let path = segment_path(&self.shared.dir, segment.first_seq);
        if let Err(error) = self.write_bytes(segment) {
            if !is_no_space(&error) {
                return Err(WriteFailure::Fatal(io_at(&path)(error)));
            }
            // Part of the group may be in the file, ending in a torn frame.
            // None of it was reported durable; cut it off so that the retry
            // appends right after the last durable frame. The cut needs no
            // fsync: the retry's fdatasync makes the length durable, and a
            // crash before it leaves a torn tail that recovery cuts again
            // (this is the newest segment).
            segment
                .file
                .set_len(segment.len)
                .map_err(|e| WriteFailure::Fatal(io_at(&path)(e)))?;
            return Err(WriteFailure::NoSpace(io_at(&path)(error)));
        }
        segment.len += self.buf.len() as u64;
        if self.fsync {
            let started = Instant::now();
            #[cfg(test)]
            if self.shared.faults.fsync_error.load(Ordering::Relaxed) {
                return Err(WriteFailure::Fatal(io_at(&path)(io::Error::other(
                    "injected fsync error",
                ))));
            }
            // Always fatal, full disk or not: after a failed fsync the
            // kernel may have dropped the dirty pages, so what the page
            // cache shows cannot be trusted to be what is on disk.
            segment
                .file
                .sync_data()
                .map_err(|e| WriteFailure::Fatal(io_at(&path)(e)))?;
            histogram!("sluice_spool_fsync_seconds").record(started.elapsed().as_secs_f64());
            counter!("sluice_spool_fsyncs_total").increment(1);
            self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The group's bytes into the segment (O_APPEND: at its end).
    fn write_bytes(&self, segment: &mut Segment) -> io::Result<()> {
        #[cfg(test)]
        if let Some(injected) = self.shared.faults.on_write(&mut segment.file, &self.buf) {
            return Err(injected);
        }
        segment.file.write_all(&self.buf)
    }

    /// Lets the reader see the group and indexes its bytes for the checkpoint.
    fn publish(
        &self,
        first_seq: u64,
        group: &[Pending],
        bytes: u64,
        (segment, offset): (u64, u64),
    ) {
        let mut log = lock(&self.shared.log);
        let entry = IndexEntry {
            first_seq,
            start: log.end,
            received_at_us: group.first().map_or(0, |p| p.record.received_at_us),
        };
        push_index(&mut log.index, self.granularity, entry);
        log.end += bytes;
        log.durable = DurablePosition {
            segment: Some(segment),
            offset,
            last_seq: first_seq + group.len() as u64 - 1,
        };
        self.shared.publish_gauges(&log);
        drop(log);
        self.shared.log_cv.notify_all();
    }

    /// A write or fsync failed other than for a full disk: whether any of it
    /// reached the disk is unknown (and after a failed fsync the page cache
    /// cannot be trusted), so nothing queued is reported durable and the
    /// spool stops taking appends.
    fn fail(mut self, error: SpoolError, group: Vec<Pending>) {
        error!(%error, "spool writer failed; appends are refused from now on");
        let error = Arc::new(error);
        let _ = self.shared.failure.set(error.clone());
        self.rx.close();
        let queued = std::iter::from_fn(|| self.rx.blocking_recv());
        for pending in group.into_iter().chain(queued) {
            let _ = pending.done.send(Err(SpoolError::Failed(error.clone())));
        }
        self.shared.set_writer_state(WriterState::Failed(error));
        self.shared.notify_space();
    }

    /// The spool is closing while the disk is still full: what is not
    /// written never will be. None of it was acknowledged (its clients send
    /// it again); what is durable stays readable.
    fn abandon(&mut self, group: Vec<Pending>) {
        let queued = std::iter::from_fn(|| self.rx.blocking_recv());
        let mut lost = 0u64;
        for pending in group.into_iter().chain(queued) {
            lost += 1;
            let _ = pending.done.send(Err(SpoolError::Closed));
        }
        warn!(
            records = lost,
            "spool closed while its disk was full: records not yet written were dropped \
             unacknowledged"
        );
        self.end_disk_full();
    }

    /// Clears the disk-full report; returns the episode that ended, if any.
    fn end_disk_full(&mut self) -> Option<DiskFull> {
        let episode = self.disk_full.take()?;
        self.disk_full_ended = Some(Instant::now());
        self.shared.disk_full.store(false, Ordering::Release);
        gauge!("sluice_spool_disk_full").set(0.0);
        Some(episode)
    }
}

/// A full disk is worth waiting for; any other error is not.
fn classify(path: &Path, error: io::Error) -> WriteFailure {
    if is_no_space(&error) {
        WriteFailure::NoSpace(io_at(path)(error))
    } else {
        WriteFailure::Fatal(io_at(path)(error))
    }
}

fn reopen_segment(dir: &Path, first_seq: u64, len: u64) -> Result<Segment, SpoolError> {
    let path = segment_path(dir, first_seq);
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_at(&path))?;
    Ok(Segment {
        first_seq,
        file,
        len,
    })
}

// ---------------------------------------------------------------------------
// Reading

/// Reads the spooled records in seq order, from the segment files. Single
/// consumer, used on a plain thread.
pub struct SpoolReader {
    shared: Arc<Shared>,
    next_seq: u64,
    replay_end: u64,
    cursor: Option<Cursor>,
    _dir_lock: Arc<File>,
}

impl SpoolReader {
    /// Blocks up to `wait` for durable records not yet read; returns up to
    /// `max` of them in seq order (empty on timeout). Returns
    /// `Err(SpoolError::Closed)` once the writer has stopped (all appenders
    /// dropped) and every record was read, or `Err(SpoolError::Failed)` if
    /// it stopped on an error. After any other error the same records are
    /// read again by the next call.
    pub fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SpoolRecord>, SpoolError> {
        let Some(durable) = self.wait_for_records(wait)? else {
            return Ok(Vec::new());
        };
        let available = durable.last_seq - self.next_seq + 1;
        let count = usize::try_from(available).unwrap_or(usize::MAX).min(max);
        let start = self.next_seq;
        let mut batch = Vec::with_capacity(count);
        while batch.len() < count {
            match self.read_next(&durable) {
                Ok(record) => batch.push(record),
                Err(e) => {
                    self.next_seq = start;
                    self.cursor = None;
                    return Err(e);
                }
            }
        }
        self.shared
            .read_upto
            .store(self.next_seq - 1, Ordering::Release);
        Ok(batch)
    }

    /// The last seq that was already in the spool (un-checkpointed) when it
    /// was opened: records up to it are replay.
    pub fn replay_end(&self) -> u64 {
        self.replay_end
    }

    fn wait_for_records(&self, wait: Duration) -> Result<Option<DurablePosition>, SpoolError> {
        let deadline = Instant::now().checked_add(wait);
        let mut log = lock(&self.shared.log);
        loop {
            if log.durable.last_seq >= self.next_seq {
                return Ok(Some(log.durable));
            }
            match &log.writer {
                WriterState::Running => {}
                WriterState::Closed => return Err(SpoolError::Closed),
                WriterState::Failed(error) => return Err(SpoolError::Failed(error.clone())),
            }
            log = match deadline {
                None => self
                    .shared
                    .log_cv
                    .wait(log)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    wait_timeout(&self.shared.log_cv, log, left)
                }
            };
        }
    }

    fn read_next(&mut self, durable: &DurablePosition) -> Result<SpoolRecord, SpoolError> {
        loop {
            let cursor = match &mut self.cursor {
                Some(cursor) => cursor,
                empty => empty.insert(Cursor::open(&self.shared, self.next_seq, durable)?),
            };
            cursor.extend_limit(durable);
            let frame_start = cursor.offset;
            match cursor.next_record()? {
                // Only when starting inside a segment, after the checkpoint.
                Some(record) if record.seq < self.next_seq => {}
                Some(record) if record.seq == self.next_seq => {
                    self.next_seq += 1;
                    return Ok(record);
                }
                Some(record) => {
                    let reason = format!("seq {} where {} was expected", record.seq, self.next_seq);
                    return Err(corrupt(&cursor.path, frame_start, reason));
                }
                None => {
                    let ended = cursor.first_seq;
                    let next = Cursor::open(&self.shared, self.next_seq, durable)?;
                    if next.first_seq == ended {
                        let reason = format!("the segment ends before seq {}", self.next_seq);
                        return Err(corrupt(&next.path, frame_start, reason));
                    }
                    self.cursor = Some(next);
                }
            }
        }
    }
}

impl fmt::Debug for SpoolReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpoolReader")
            .field("dir", &self.shared.dir)
            .field("next_seq", &self.next_seq)
            .field("replay_end", &self.replay_end)
            .finish_non_exhaustive()
    }
}

/// A position in one segment file.
struct Cursor {
    first_seq: u64,
    path: PathBuf,
    reader: BufReader<Take<File>>,
    /// Where the next frame starts.
    offset: u64,
    /// How far into the file reads may go: the durable end while the writer
    /// is still in this segment (bytes past it may be half written), `u64::MAX`
    /// once it has moved on.
    readable_to: u64,
}

impl Cursor {
    /// Opens the segment holding `seq`: the newest one starting at or before it.
    fn open(shared: &Shared, seq: u64, durable: &DurablePosition) -> Result<Self, SpoolError> {
        let first_seq = lock(&shared.log)
            .segments
            .iter()
            .rev()
            .find(|&&first| first <= seq)
            .copied();
        let Some(first_seq) = first_seq else {
            let reason = format!("no segment holds seq {seq}");
            return Err(corrupt(&shared.dir, 0, reason));
        };
        let path = segment_path(&shared.dir, first_seq);
        let file = File::open(&path).map_err(io_at(&path))?;
        let readable_to = if durable.segment == Some(first_seq) {
            durable.offset
        } else {
            u64::MAX
        };
        Ok(Self {
            first_seq,
            reader: BufReader::with_capacity(READ_BUFFER, file.take(readable_to)),
            path,
            offset: 0,
            readable_to,
        })
    }

    fn extend_limit(&mut self, durable: &DurablePosition) {
        if self.readable_to == u64::MAX {
            return;
        }
        let take = self.reader.get_mut();
        if durable.segment != Some(self.first_seq) {
            take.set_limit(u64::MAX);
            self.readable_to = u64::MAX;
        } else if durable.offset > self.readable_to {
            take.set_limit(take.limit() + (durable.offset - self.readable_to));
            self.readable_to = durable.offset;
        }
    }

    /// The next record, or None at the end of what may be read.
    fn next_record(&mut self) -> Result<Option<SpoolRecord>, SpoolError> {
        match read_frame(&mut self.reader) {
            Ok(Some(frame)) => {
                self.offset += frame.len;
                Ok(Some(frame.record))
            }
            Ok(None) => Ok(None),
            Err(FrameError::Io(source)) => Err(io_at(&self.path)(source)),
            Err(e) => Err(corrupt(&self.path, self.offset, e.to_string())),
        }
    }
}

// ---------------------------------------------------------------------------
// Checkpoints

/// Reports what is safely stored downstream. Cheap to clone; `advance` never
/// waits for the disk.
///
/// Dropping the last clone persists the latest checkpoint (waiting for it).
#[derive(Clone)]
pub struct SpoolCheckpoint {
    inner: Arc<CheckpointInner>,
}

struct CheckpointInner {
    shared: Arc<Shared>,
    _thread: JoinOnDrop,
}

impl Drop for CheckpointInner {
    fn drop(&mut self) {
        // The thread persists what is left and exits; `_thread` then joins it.
        lock(&self.shared.ckpt).stop = true;
        self.shared.ckpt_cv.notify_all();
    }
}

impl SpoolCheckpoint {
    /// Records with seq <= `seq` are safely stored downstream: frees their
    /// bytes (waiting appenders proceed), and in the background persists
    /// the checkpoint and then deletes the segments it covers. Monotonic (a
    /// lower value is ignored); a seq past what the reader returned is
    /// clamped to it, since nothing unread can have been stored.
    pub fn advance(&self, seq: u64) {
        let shared = &self.inner.shared;
        let read = shared.read_upto.load(Ordering::Acquire);
        if seq > read {
            debug!(seq, read, "spool checkpoint past the records read; clamped");
        }
        let seq = seq.min(read);
        {
            let mut state = lock(&shared.ckpt);
            if seq <= state.requested {
                return;
            }
            state.requested = seq;
        }
        shared.ckpt_cv.notify_all();
        shared.free_upto(seq);
    }

    /// The highest seq passed to [`SpoolCheckpoint::advance`] so far (or the
    /// checkpoint found at open). It reaches the disk within about 50 ms,
    /// or at once with [`SpoolCheckpoint::flush`].
    pub fn checkpointed(&self) -> u64 {
        lock(&self.inner.shared.ckpt).requested
    }

    /// Bytes on disk not yet checkpointed (what `max_bytes` bounds),
    /// including appends queued for the writer.
    pub fn pending_bytes(&self) -> u64 {
        self.inner.shared.pending_bytes.load(Ordering::Acquire)
    }

    /// Persists the checkpoint now and deletes the segments it covers (for shutdown).
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.inner.shared.persist_checkpoint()
    }

    pub fn stats(&self) -> SpoolStats {
        self.inner.shared.stats.snapshot()
    }

    /// The writer is waiting for room on a full disk (appends wait meanwhile).
    pub fn disk_full(&self) -> bool {
        self.inner.shared.disk_full.load(Ordering::Acquire)
    }
}

impl fmt::Debug for SpoolCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpoolCheckpoint")
            .field("dir", &self.inner.shared.dir)
            .field("checkpointed", &self.checkpointed())
            .finish_non_exhaustive()
    }
}

/// Persists the requested checkpoint at most every [`CHECKPOINT_INTERVAL`],
/// and once more when the last [`SpoolCheckpoint`] goes.
fn run_checkpointer(shared: Arc<Shared>, _dir_lock: Arc<File>) {
    let mut next_write = Instant::now();
    // Failures since the last success: a full disk is reported once, not
    // at every retry.
    let mut failing = 0u64;
    loop {
        let state = lock(&shared.ckpt);
        let due = state.requested > state.persisted;
        let stopping = state.stop;
        if !due && stopping {
            return;
        }
        let now = Instant::now();
        if !due || (now < next_write && !stopping) {
            let timeout = if due {
                next_write - now
            } else {
                GAUGE_INTERVAL
            };
            drop(wait_timeout(&shared.ckpt_cv, state, timeout));
            shared.refresh_age_gauge();
            continue;
        }
        drop(state);
        match shared.persist_checkpoint() {
            Ok(()) => {
                if failing > 0 {
                    info!(failures = failing, "spool checkpoint persisted again");
                    failing = 0;
                }
                next_write = Instant::now() + CHECKPOINT_INTERVAL;
            }
            Err(error) => {
                failing += 1;
                if !error.is_disk_full() {
                    error!(%error, "cannot persist the spool checkpoint");
                } else if failing == 1 {
                    warn!(%error, "spool disk full: the checkpoint waits for room");
                } else {
                    debug!(%error, "spool checkpoint still waits for room");
                }
                if stopping {
                    return;
                }
                next_write = Instant::now() + CHECKPOINT_RETRY;
            }
        }
    }
}

/// Failures a unit test injects into the writer and the checkpoint, to
/// see what follows a full disk or a failing device.
#[cfg(test)]
mod faults {
    use std::fs::{File, OpenOptions};
    use std::io::{self, Write};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[derive(Default)]
    pub(super) struct Faults {
        /// Group writes still to be cut short by a full disk (`u64::MAX`:
        /// until the test sets 0).
        pub no_space_writes: AtomicU64,
        /// Segment creations still to be refused by a full disk.
        pub no_space_creates: AtomicU64,
        /// Checkpoint writes still to be refused by a full disk.
        pub no_space_checkpoints: AtomicU64,
        /// The next group write fails as a failing device would (EIO).
        pub write_error: AtomicBool,
        /// Every fsync of a segment fails.
        pub fsync_error: AtomicBool,
    }

    /// Takes one from `counter` if it is above 0.
    pub(super) fn take(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(super) fn no_space() -> io::Error {
        io::Error::from(io::ErrorKind::StorageFull)
    }

    impl Faults {
        /// A full disk writes what fits and then refuses the rest: half the
        /// group goes into the file (a torn frame at its end) before the error.
        pub(super) fn on_write(&self, file: &mut File, buf: &[u8]) -> Option<io::Error> {
            if self.write_error.swap(false, Ordering::AcqRel) {
                return Some(io::Error::other("injected write error"));
            }
            if take(&self.no_space_writes) {
                if let Err(e) = file.write_all(&buf[..buf.len() / 2]) {
                    return Some(e);
                }
                return Some(no_space());
            }
            None
        }

        /// A refused checkpoint write leaves the spare file torn, as a
        /// real one cut short would.
        pub(super) fn on_checkpoint(&self, dir: &Path) -> Result<(), super::SpoolError> {
            if !take(&self.no_space_checkpoints) {
                return Ok(());
            }
            let tmp = dir.join(super::CHECKPOINT_TMP);
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&tmp)
                .map_err(super::io_at(&tmp))?;
            file.write_all(&[0xEE; 5]).map_err(super::io_at(&tmp))?;
            Err(super::io_at(&tmp)(no_space()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = identity(dir.path()).unwrap();
        assert!(first.len() >= 32, "{first}");
        assert_eq!(identity(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(identity(other.path()).unwrap(), first);
    }

    fn small_segments() -> SpoolConfig {
        SpoolConfig {
            segment_bytes: 4096,
            ..SpoolConfig::default()
        }
    }

    fn record(topic: &str, n: u64) -> SpoolRecord {
        SpoolRecord {
            seq: 0,
            received_at_us: 1_700_000_000_000_000 + n as i64,
            origin_kind: (n % 3) as u8,
            origin_id: format!("device-{n}"),
            topic: topic.to_owned(),
            payload: Bytes::from(format!("{n}:{}", "x".repeat(64))),
            qos: 1,
            retain: n.is_multiple_of(2),
            hops: (n % 4) as u8,
        }
    }

    fn append_all(
        appender: &SpoolAppender,
        records: impl IntoIterator<Item = SpoolRecord>,
    ) -> Vec<u64> {
        let durables: Vec<Durable> = records
            .into_iter()
            .map(|r| appender.blocking_append(r).expect("append"))
            .collect();
        durables
            .into_iter()
            .map(|d| d.blocking_wait().expect("durable"))
            .collect()
    }

    fn drain(reader: &mut SpoolReader, count: usize) -> Vec<SpoolRecord> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut records = Vec::new();
        while records.len() < count {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} records arrived",
                records.len()
            );
            let batch = reader
                .next_batch(count - records.len(), Duration::from_millis(200))
                .expect("read");
            records.extend(batch);
        }
        records
    }

    fn seqs(records: &[SpoolRecord]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let firsts = list_segments(dir).expect("list");
        segment_path(dir, *firsts.last().expect("a segment"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_fsyncs_and_read_back_in_order() {
        const TASKS: u64 = 4;
        const PER_TASK: u64 = 250;
        const TOTAL: u64 = TASKS * PER_TASK;
        let dir = tempfile::tempdir().expect("tempdir");
        let (appender, mut reader, checkpoint) =
            open(&SpoolConfig::default(), dir.path()).expect("open");

        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let appender = appender.clone();
            tasks.push(tokio::spawn(async move {
                let mut durables = Vec::new();
                for i in 0..PER_TASK {
                    let record = record(&format!("task/{task}"), i);
                    durables.push(appender.append(record).await.expect("append"));
                }
                let mut seqs = Vec::new();
                for durable in durables {
                    seqs.push(durable.await.expect("durable"));
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            let seqs = task.await.expect("task");
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "per-task seqs not increasing"
            );
            all.extend(seqs);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=TOTAL).collect::<Vec<_>>());

        let records = tokio::task::spawn_blocking(move || drain(&mut reader, TOTAL as usize))
            .await
            .expect("reader");
        assert_eq!(seqs(&records), (1..=TOTAL).collect::<Vec<_>>());
        // Within a task, the spool keeps the order of its appends.
        for task in 0..TASKS {
            let topic = format!("task/{task}");
            let order: Vec<String> = records
                .iter()
                .filter(|r| r.topic == topic)
                .map(|r| r.origin_id.clone())
                .collect();
            let expected: Vec<String> = (0..PER_TASK).map(|i| format!("device-{i}")).collect();
            assert_eq!(order, expected);
        }

        let stats = checkpoint.stats();
        assert_eq!(stats.records_appended, TOTAL);
        assert!(stats.fsyncs > 0, "no fsync at all");
        assert!(
            stats.fsyncs < TOTAL,
            "{} fsyncs for {TOTAL} records: no group commit",
            stats.fsyncs
        );
    }

    /// The reader follows the writer closely: it reads the segment being
    /// written (only up to the durable end) and moves on as segments roll.
    #[test]
    fn a_reader_follows_a_concurrent_writer_across_segments() {
        for fsync in [true, false] {
            const TOTAL: u64 = 2000;
            let dir = tempfile::tempdir().expect("tempdir");
            let config = SpoolConfig {
                fsync,
                group_commit_max: 16,
                ..small_segments()
            };
            let (appender, mut reader, checkpoint) = open(&config, dir.path()).expect("open");
            let follower = std::thread::spawn(move || {
                let mut read = Vec::new();
                loop {
                    match reader.next_batch(7, Duration::from_millis(100)) {
                        Ok(batch) => {
                            if let Some(last) = batch.last() {
                                checkpoint.advance(last.seq);
                            }
                            read.extend(batch);
                        }
                        Err(SpoolError::Closed) => return read,
                        Err(e) => panic!("read failed: {e}"),
                    }
                }
            });
            for chunk in (0..TOTAL).collect::<Vec<_>>().chunks(50) {
                append_all(&appender, chunk.iter().map(|&i| record("follow", i)));
            }
            drop(appender);
            let read = follower.join().expect("reader thread");
            assert_eq!(seqs(&read), (1..=TOTAL).collect::<Vec<_>>());
            assert!(
                read.iter()
                    .zip(0..)
                    .all(|(r, i)| r.origin_id == format!("device-{i}"))
            );
            assert!(
                list_segments(dir.path()).expect("list").len() < 5,
                "checkpointed segments kept"
            );
        }
    }

    #[test]
    fn reopening_without_a_checkpoint_replays_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let originals: Vec<SpoolRecord> = (0..50).map(|i| record("replay", i)).collect();
        {
            let (appender, mut reader, _checkpoint) =
                open(&small_segments(), dir.path()).expect("open");
            assert_eq!(reader.replay_end(), 0);
            assert_eq!(
                append_all(&appender, originals.clone()),
                (1..=50).collect::<Vec<_>>()
            );
            assert_eq!(drain(&mut reader, 50).len(), 50);
        }

        let (appender, mut reader, checkpoint) =
            open(&small_segments(), dir.path()).expect("reopen");
        assert_eq!(reader.replay_end(), 50);
        assert_eq!(checkpoint.checkpointed(), 0);
        assert_eq!(checkpoint.stats().records_replayed, 50);
        assert!(checkpoint.pending_bytes() > 0);
        let replayed = drain(&mut reader, 50);
        for (i, (got, original)) in replayed.iter().zip(&originals).enumerate() {
            let expected = SpoolRecord {
                seq: i as u64 + 1,
                ..original.clone()
            };
            assert_eq!(*got, expected);
        }
        assert_eq!(append_all(&appender, [record("replay", 50)]), vec![51]);
        assert_eq!(seqs(&drain(&mut reader, 1)), vec![51]);
    }

    #[test]
    fn a_checkpoint_deletes_segments_and_limits_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Fine enough byte index points (max_bytes / 1024) to free part of the records.
        let config = SpoolConfig {
            max_bytes: 1 << 20,
            ..small_segments()
        };
        {
            let (appender, mut reader, checkpoint) = open(&config, dir.path()).expect("open");
            append_all(&appender, (0..300).map(|i| record("ckpt", i)));
            drain(&mut reader, 300);
            let segments_before = list_segments(dir.path()).expect("list");
            assert!(
                segments_before.len() > 5,
                "only {} segments",
                segments_before.len()
            );
            let pending_before = checkpoint.pending_bytes();

            checkpoint.advance(200);
            checkpoint.advance(100);
            assert_eq!(
                checkpoint.checkpointed(),
                200,
                "a lower checkpoint was not ignored"
            );
            assert!(checkpoint.pending_bytes() < pending_before);
            assert!(checkpoint.pending_bytes() > 0);
            checkpoint.flush().expect("flush");

            let segments = list_segments(dir.path()).expect("list");
            assert!(segments.len() < segments_before.len());
            assert!(
                segments[0] <= 201,
                "the segment holding seq 201 was deleted"
            );
            assert!(
                segments[1..].iter().all(|&first| first > 201),
                "{segments:?}"
            );
        }

        let (appender, mut reader, checkpoint) = open(&config, dir.path()).expect("reopen");
        assert_eq!(checkpoint.checkpointed(), 200);
        assert_eq!(reader.replay_end(), 300);
        assert_eq!(checkpoint.stats().records_replayed, 100);
        assert_eq!(
            seqs(&drain(&mut reader, 100)),
            (201..=300).collect::<Vec<_>>()
        );
        assert!(
            reader
                .next_batch(10, Duration::from_millis(50))
                .expect("read")
                .is_empty()
        );

        // Past what was read, a checkpoint is clamped.
        checkpoint.advance(u64::MAX);
        assert_eq!(checkpoint.checkpointed(), 300);
        assert_eq!(checkpoint.pending_bytes(), 0);
        assert_eq!(append_all(&appender, [record("ckpt", 300)]), vec![301]);
        assert_eq!(seqs(&drain(&mut reader, 1)), vec![301]);
    }

    #[test]
    fn the_checkpoint_is_persisted_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (appender, mut reader, checkpoint) = open(&small_segments(), dir.path()).expect("open");
        append_all(&appender, (0..100).map(|i| record("bg", i)));
        drain(&mut reader, 100);
        checkpoint.advance(60);

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let persisted = read_checkpoint(dir.path()).expect("checkpoint file");
            let segments = list_segments(dir.path()).expect("list");
            if persisted == 60 && segments.get(1).is_some_and(|&second| second > 61) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "checkpoint {persisted}, segments {segments:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SpoolConfig::default();
        {
            let (appender, _reader, _checkpoint) = open(&config, dir.path()).expect("open");
            append_all(&appender, (0..20).map(|i| record("torn", i)));
        }
        let segment = last_segment(dir.path());
        let valid_len = fs::metadata(&segment).expect("metadata").len();

        // Garbage after the last record: a write cut short by a crash.
        let mut file = OpenOptions::new()
            .append(true)
            .open(&segment)
            .expect("segment");
        file.write_all(&[0xAB; 13]).expect("garbage");
        drop(file);
        {
            let (appender, mut reader, _checkpoint) = open(&config, dir.path()).expect("reopen");
            assert_eq!(fs::metadata(&segment).expect("metadata").len(), valid_len);
            assert_eq!(reader.replay_end(), 20);
            assert_eq!(seqs(&drain(&mut reader, 20)), (1..=20).collect::<Vec<_>>());
            assert_eq!(append_all(&appender, [record("torn", 20)]), vec![21]);
        }

        // Cut inside record 21: it was never fully written, so it is gone.
        let len = fs::metadata(&segment).expect("metadata").len();
        let file = OpenOptions::new()
            .write(true)
            .open(&segment)
            .expect("segment");
        file.set_len(len - 5).expect("truncate");
        drop(file);
        let (appender, mut reader, _checkpoint) = open(&config, dir.path()).expect("reopen");
        assert_eq!(fs::metadata(&segment).expect("metadata").len(), valid_len);
        assert_eq!(reader.replay_end(), 20);
        let records = drain(&mut reader, 20);
        assert_eq!(seqs(&records), (1..=20).collect::<Vec<_>>());
        assert_eq!(records[19].origin_id, "device-19");
        assert_eq!(append_all(&appender, [record("torn", 21)]), vec![21]);
        let again = drain(&mut reader, 1);
        assert_eq!(
            (again[0].seq, again[0].origin_id.as_str()),
            (21, "device-21")
        );
    }

    #[test]
    fn a_bad_record_inside_an_older_segment_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (appender, _reader, _checkpoint) =
                open(&small_segments(), dir.path()).expect("open");
            append_all(&appender, (0..100).map(|i| record("corrupt", i)));
        }
        let first = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&first).expect("segment");
        bytes[HEADER_LEN as usize + 30] ^= 0xFF;
        fs::write(&first, bytes).expect("write");

        match open(&small_segments(), dir.path()) {
            Err(SpoolError::Corrupt { path, offset, .. }) => {
                assert_eq!(path, first);
                assert_eq!(offset, 0);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_wait_while_the_spool_is_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SpoolConfig {
            max_bytes: 1,
            ..small_segments()
        };
        let (appender, reader, checkpoint) = open(&config, dir.path()).expect("open");
        let first = appender.append(record("full", 0)).await.expect("append");
        assert_eq!(first.await.expect("durable"), 1);
        assert!(checkpoint.pending_bytes() > 1);

        let blocked = tokio::time::timeout(
            Duration::from_millis(300),
            appender.append(record("full", 1)),
        )
        .await;
        assert!(
            blocked.is_err(),
            "an append over max_bytes completed: {blocked:?}"
        );
        let waiting = tokio::spawn({
            let appender = appender.clone();
            async move { appender.append(record("full", 2)).await?.await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "an append over max_bytes completed");

        let (reader, batch) = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let batch = reader.next_batch(10, Duration::from_secs(5));
            (reader, batch)
        })
        .await
        .expect("reader");
        assert_eq!(seqs(&batch.expect("read")), vec![1]);
        checkpoint.advance(1);

        let seq = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the append still waits after the checkpoint")
            .expect("task")
            .expect("append");
        assert_eq!(seq, 2);
        assert!(checkpoint.stats().full_waits >= 2);
        drop(reader);
    }

    #[test]
    fn the_reader_drains_then_reports_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (appender, mut reader, _checkpoint) =
            open(&small_segments(), dir.path()).expect("open");
        append_all(&appender, (0..10).map(|i| record("closed", i)));
        assert_eq!(drain(&mut reader, 10).len(), 10);
        assert!(
            reader
                .next_batch(100, Duration::from_millis(50))
                .expect("read")
                .is_empty()
        );

        append_all(&appender, (10..15).map(|i| record("closed", i)));
        drop(appender);
        assert_eq!(seqs(&drain(&mut reader, 5)), (11..=15).collect::<Vec<_>>());
        assert!(matches!(
            reader.next_batch(100, Duration::from_secs(5)),
            Err(SpoolError::Closed)
        ));
    }

    #[test]
    fn a_write_error_fails_what_is_pending_and_every_later_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (appender, mut reader, _checkpoint) =
                open(&small_segments(), dir.path()).expect("open");
            append_all(&appender, (0..5).map(|i| record("fail", i)));
            appender
                .inner
                .shared
                .faults
                .write_error
                .store(true, Ordering::Relaxed);
            let lost = appender.blocking_append(record("fail", 5)).expect("queued");
            assert!(matches!(lost.blocking_wait(), Err(SpoolError::Failed(_))));
            assert!(matches!(
                appender.blocking_append(record("fail", 6)),
                Err(SpoolError::Failed(_))
            ));
            // What was durable before the error is still read, then the error.
            assert_eq!(seqs(&drain(&mut reader, 5)), (1..=5).collect::<Vec<_>>());
            assert!(matches!(
                reader.next_batch(10, Duration::from_secs(5)),
                Err(SpoolError::Failed(_))
            ));
        }
        let (appender, mut reader, _checkpoint) =
            open(&small_segments(), dir.path()).expect("reopen");
        assert_eq!(reader.replay_end(), 5);
        assert_eq!(seqs(&drain(&mut reader, 5)), (1..=5).collect::<Vec<_>>());
        assert_eq!(append_all(&appender, [record("fail", 7)]), vec![6]);
    }

    /// Every record in the segment files, read strictly: a torn or
    /// corrupt frame anywhere fails the test. Called before a reopen, which
    /// would quietly cut a torn tail.
    fn seqs_on_disk(dir: &Path) -> Vec<u64> {
        let mut seqs = Vec::new();
        for first in list_segments(dir).expect("list") {
            let path = segment_path(dir, first);
            let mut reader = BufReader::new(File::open(&path).expect("segment"));
            loop {
                match read_frame(&mut reader) {
                    Ok(Some(frame)) => seqs.push(frame.record.seq),
                    Ok(None) => break,
                    Err(e) => panic!("{}: {e} after seq {:?}", path.display(), seqs.last()),
                }
            }
        }
        seqs
    }

    fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_pending(durable: &mut Durable) -> bool {
        matches!(
            durable.rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    fn faults(appender: &SpoolAppender) -> &faults::Faults {
        &appender.inner.shared.faults
    }

    #[test]
    fn a_full_disk_holds_appends_back_until_there_is_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (appender, mut reader, checkpoint) =
                open(&small_segments(), dir.path()).expect("open");
            assert_eq!(
                append_all(&appender, (0..5).map(|i| record("full", i))).len(),
                5
            );
            assert_eq!(seqs(&drain(&mut reader, 5)), (1..=5).collect::<Vec<_>>());

            faults(&appender)
                .no_space_writes
                .store(u64::MAX, Ordering::Relaxed);
            let mut durables: Vec<Durable> = (5..25)
                .map(|i| appender.blocking_append(record("full", i)).expect("queued"))
                .collect();
            wait_until("the writer has retried twice", || {
                checkpoint.disk_full() && checkpoint.stats().disk_full_retries >= 2
            });
            // Nothing of the held-back group is reported durable or readable.
            assert!(durables.iter_mut().all(is_pending), "an append was acked");
            assert!(
                reader
                    .next_batch(100, Duration::from_millis(100))
                    .expect("read")
                    .is_empty()
            );
            // Later appends still queue (within the usual bounds).
            let mut later = appender
                .blocking_append(record("full", 25))
                .expect("queued");
            assert!(is_pending(&mut later));
            durables.push(later);

            faults(&appender)
                .no_space_writes
                .store(0, Ordering::Relaxed);
            let acked: Vec<u64> = durables
                .into_iter()
                .map(|d| d.blocking_wait().expect("durable once there is room"))
                .collect();
            assert_eq!(acked, (6..=26).collect::<Vec<_>>());
            assert!(!checkpoint.disk_full());
            let records = drain(&mut reader, 21);
            assert_eq!(seqs(&records), (6..=26).collect::<Vec<_>>());
            assert!(
                records
                    .iter()
                    .zip(5..)
                    .all(|(r, i)| r.origin_id == format!("device-{i}"))
            );
        }
        // The halves written before each refusal were cut off.
        assert_eq!(seqs_on_disk(dir.path()), (1..=26).collect::<Vec<_>>());
        let (_appender, mut reader, _checkpoint) =
            open(&small_segments(), dir.path()).expect("reopen");
        assert_eq!(reader.replay_end(), 26);
        assert_eq!(seqs(&drain(&mut reader, 26)), (1..=26).collect::<Vec<_>>());
    }

    #[test]
    fn refused_writes_and_segment_starts_are_retried_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (appender, mut reader, checkpoint) =
                open(&small_segments(), dir.path()).expect("open");
            faults(&appender)
                .no_space_writes
                .store(3, Ordering::Relaxed);
            faults(&appender)
                .no_space_creates
                .store(2, Ordering::Relaxed);
            let acked = append_all(&appender, (0..200).map(|i| record("retry", i)));
            assert_eq!(acked, (1..=200).collect::<Vec<_>>());
            assert_eq!(checkpoint.stats().disk_full_retries, 5);
            assert!(!checkpoint.disk_full());
            assert!(list_segments(dir.path()).expect("list").len() > 3);
            assert_eq!(
                seqs(&drain(&mut reader, 200)),
                (1..=200).collect::<Vec<_>>()
            );
        }
        assert_eq!(seqs_on_disk(dir.path()), (1..=200).collect::<Vec<_>>());
        let (_appender, mut reader, _checkpoint) =
            open(&small_segments(), dir.path()).expect("reopen");
        assert_eq!(
            seqs(&drain(&mut reader, 200)),
            (1..=200).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_failed_fsync_stops_the_spool_even_after_a_full_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (appender, mut reader, checkpoint) = open(&small_segments(), dir.path()).expect("open");
        append_all(&appender, (0..5).map(|i| record("fsync", i)));
        faults(&appender)
            .no_space_writes
            .store(2, Ordering::Relaxed);
        faults(&appender).fsync_error.store(true, Ordering::Relaxed);
        let lost = appender
            .blocking_append(record("fsync", 5))
            .expect("queued");
        assert!(matches!(lost.blocking_wait(), Err(SpoolError::Failed(_))));
        assert_eq!(checkpoint.stats().disk_full_retries, 2);
        assert!(matches!(
            appender.blocking_append(record("fsync", 6)),
            Err(SpoolError::Failed(_))
        ));
        assert_eq!(seqs(&drain(&mut reader, 5)), (1..=5).collect::<Vec<_>>());
        assert!(matches!(
            reader.next_batch(10, Duration::from_secs(5)),
            Err(SpoolError::Failed(_))
        ));
    }

    #[test]
    fn closing_while_the_disk_is_full_drops_only_what_was_never_acked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let durables: Vec<Durable> = {
            let (appender, mut reader, checkpoint) =
                open(&small_segments(), dir.path()).expect("open");
            append_all(&appender, (0..5).map(|i| record("close", i)));
            faults(&appender)
                .no_space_writes
                .store(u64::MAX, Ordering::Relaxed);
            let durables = (5..8)
                .map(|i| {
                    appender
                        .blocking_append(record("close", i))
                        .expect("queued")
                })
                .collect();
            wait_until("the disk is reported full", || checkpoint.disk_full());
            // Returns once the writer gave up, not after the disk has room.
            drop(appender);
            assert_eq!(seqs(&drain(&mut reader, 5)), (1..=5).collect::<Vec<_>>());
            assert!(matches!(
                reader.next_batch(10, Duration::from_secs(5)),
                Err(SpoolError::Closed)
            ));
            durables
        };
        for durable in durables {
            assert!(matches!(durable.blocking_wait(), Err(SpoolError::Closed)));
        }
        assert_eq!(seqs_on_disk(dir.path()), (1..=5).collect::<Vec<_>>());
        let (appender, mut reader, _checkpoint) =
            open(&small_segments(), dir.path()).expect("reopen");
        assert_eq!(reader.replay_end(), 5);
        assert_eq!(seqs(&drain(&mut reader, 5)), (1..=5).collect::<Vec<_>>());
        assert_eq!(append_all(&appender, [record("close", 8)]), vec![6]);
    }

    #[test]
    fn a_checkpoint_refused_by_a_full_disk_is_kept_intact_and_retried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (appender, mut reader, checkpoint) = open(&small_segments(), dir.path()).expect("open");
        append_all(&appender, (0..300).map(|i| record("ckpt-full", i)));
        drain(&mut reader, 300);
        checkpoint.advance(100);
        checkpoint.flush().expect("flush");
        assert_eq!(read_checkpoint(dir.path()).expect("checkpoint"), 100);
        let segments = list_segments(dir.path()).expect("list");

        faults(&appender)
            .no_space_checkpoints
            .store(u64::MAX, Ordering::Relaxed);
        checkpoint.advance(200);
        let refused = checkpoint
            .flush()
            .expect_err("a full disk refuses the checkpoint");
        assert!(refused.is_disk_full(), "{refused}");
        // The old checkpoint is intact, and the segments it does not cover stay.
        assert_eq!(read_checkpoint(dir.path()).expect("checkpoint"), 100);
        assert_eq!(list_segments(dir.path()).expect("list"), segments);

        faults(&appender)
            .no_space_checkpoints
            .store(0, Ordering::Relaxed);
        checkpoint.flush().expect("flush once there is room");
        assert_eq!(read_checkpoint(dir.path()).expect("checkpoint"), 200);
        let after = list_segments(dir.path()).expect("list");
        assert!(after.len() < segments.len(), "{after:?}");

        // The background checkpointer retries on its own.
        faults(&appender)
            .no_space_checkpoints
            .store(1, Ordering::Relaxed);
        checkpoint.advance(250);
        wait_until("the checkpoint is persisted after a refusal", || {
            read_checkpoint(dir.path()).expect("checkpoint") == 250
        });
    }

    /// The checkpoint and its spare trade places, so saving a checkpoint
    /// reuses allocated bytes instead of needing a new block.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn checkpoints_reuse_the_spare_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (appender, mut reader, checkpoint) = open(&small_segments(), dir.path()).expect("open");
        let inode = |name: &str| fs::metadata(dir.path().join(name)).expect(name).ino();
        append_all(&appender, (0..3).map(|i| record("spare", i)));
        drain(&mut reader, 3);
        checkpoint.advance(1);
        checkpoint.flush().expect("flush");
        let (current, spare) = (inode(CHECKPOINT_FILE), inode(CHECKPOINT_TMP));
        checkpoint.advance(2);
        checkpoint.flush().expect("flush");
        assert_eq!(
            (inode(CHECKPOINT_FILE), inode(CHECKPOINT_TMP)),
            (spare, current)
        );
        assert_eq!(read_checkpoint(dir.path()).expect("checkpoint"), 2);
    }

    #[test]
    fn handles_can_be_shared_across_threads() {
        fn shared<T: Send + Sync + 'static>() {}
        fn sent<T: Send + 'static>() {}
        shared::<SpoolAppender>();
        shared::<SpoolCheckpoint>();
        shared::<SpoolError>();
        sent::<SpoolReader>();
        sent::<Durable>();
    }

    #[test]
    fn oversized_fields_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (appender, _reader, _checkpoint) =
            open(&SpoolConfig::default(), dir.path()).expect("open");
        let mut long_topic = record("t", 0);
        long_topic.topic = "t".repeat(usize::from(u16::MAX) + 1);
        assert!(matches!(
            appender.blocking_append(long_topic),
            Err(SpoolError::TooLong { field: "topic", .. })
        ));
        let mut long_origin = record("t", 0);
        long_origin.origin_id = "o".repeat(usize::from(u16::MAX) + 1);
        assert!(matches!(
            appender.blocking_append(long_origin),
            Err(SpoolError::TooLong {
                field: "origin_id",
                ..
            })
        ));
        let mut longest = record("t", 0);
        longest.topic = "t".repeat(usize::from(u16::MAX));
        assert_eq!(append_all(&appender, [longest]), vec![1]);
    }

    #[test]
    fn a_directory_is_opened_once_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = open(&SpoolConfig::default(), dir.path()).expect("open");
        assert!(matches!(
            open(&SpoolConfig::default(), dir.path()),
            Err(SpoolError::Locked(_))
        ));
        drop(spool);
        open(&SpoolConfig::default(), dir.path()).expect("reopen after close");
    }
}
