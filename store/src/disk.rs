//! [`DiskLog`]: segment files, group commit, garbage collection, and the calls the owner makes to
//! spill, page in and relocate.
//!
//! ```text
//!   append / relocate ──▶ channel (in call order) ──▶ writer thread: one write + one fsync per batch
//!   settle / attempt / spill / paged-in ──▶ side buffer ──▶ written after the batch's messages
//!   release(position) ──▶ the segment's live count −1 ──▶ head segments with none live are deleted
//! ```
//!
//! The writer keeps no per-message index: a segment's live count goes up with each message record
//! written to it and down when the owner releases the message. Replay ([`crate::replay`]) rebuilds
//! the counts from what is still owed.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    future::Future,
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use qmesh_proto::v1;
use tokio::sync::{mpsc, oneshot};

use crate::{
    Outcome, Position, Recovered, RecoveredSpill, Remembered, RetainedRun, StoreError,
    dedup::{self, DedupJournal},
    index,
    pages::{self, Page, Want, segment_path},
    record::{self, Body},
    replay::{self, Segment},
};

/// When appends are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync before acknowledging (the default for `durability: Disk`).
    Always,
    /// Acknowledge after the write; fsync at most this often.
    Interval(Duration),
    /// Never fsync (the OS flushes when it likes).
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" | "Always" => Ok(Self::Always),
            "never" | "Never" => Ok(Self::Never),
            other => other
                .strip_prefix("interval:")
                .and_then(parse_duration)
                .map(Self::Interval)
                .ok_or_else(|| {
                    format!(
                        "{other:?}: use always, never or interval:<duration> (e.g. interval:5ms)"
                    )
                }),
        }
    }
}

/// `5ms`, `1s`, `1m30s`: digits and a unit (`ms`, `s`, `m`, `h`), repeated.
fn parse_duration(input: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = input;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let value: u64 = rest.get(..digits)?.parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(value).ok()?)?)?;
    }
    Some(total)
}

/// Settings of the log.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Directory of the segment files.
    pub dir: PathBuf,
    /// A segment is rolled once it reaches this size.
    pub segment_bytes: u64,
    /// Durability of appends.
    pub fsync: FsyncPolicy,
    /// Most bytes written in one batch.
    pub max_batch_bytes: usize,
    /// Beyond this many segments, the owner is asked to copy the live messages of the oldest
    /// forward (relocation) when that frees segments.
    pub max_segments: usize,
}

impl StoreConfig {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Always,
            max_batch_bytes: 4 * 1024 * 1024,
            max_segments: 8,
        }
    }
}

/// Counters of the log (exposed as metrics and used by the benchmark).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Appends made durable.
    pub appends: AtomicU64,
    /// Batches written.
    pub batches: AtomicU64,
    /// fsync calls.
    pub fsyncs: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Records replayed at start.
    pub recovered_records: AtomicU64,
    /// Segments replayed at start from their index, without reading their messages.
    pub indexed_segments: AtomicU64,
    /// Bytes dropped at start (torn tail, corruption, foreign files).
    pub dropped_bytes: AtomicU64,
    /// Failed writes or fsyncs.
    pub write_errors: AtomicU64,
    /// Segments deleted by garbage collection.
    pub segments_deleted: AtomicU64,
    /// Live messages copied forward (relocated) so old segments can go.
    pub relocated: AtomicU64,
    /// Releases of a segment that had no live message left (a bookkeeping error; kept, counted).
    pub release_errors: AtomicU64,
    /// Reads of spilled messages back from the log (page-ins).
    pub page_reads: AtomicU64,
    /// Bytes read back by page-ins.
    pub page_read_bytes: AtomicU64,
}

enum Op {
    Write {
        record: Pending,
        reply: oneshot::Sender<Result<Position, StoreError>>,
    },
    Wake,
    Flush(oneshot::Sender<std::io::Result<()>>),
}

/// A message record waiting for the writer.
enum Pending {
    Message {
        queue: String,
        sequence: u64,
        message: Arc<v1::Message>,
        pending: Vec<String>,
    },
    Relocated {
        queue: String,
        target: u64,
        message: Arc<v1::Message>,
        pending: Vec<(String, u32)>,
    },
}

impl Pending {
    fn bytes(&self) -> usize {
        match self {
            Self::Message { message, .. } | Self::Relocated { message, .. } => {
                message.payload.len() + 64
            }
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Message {
                queue,
                sequence,
                message,
                pending,
            } => record::encode_message(*sequence, queue, message, pending, out),
            Self::Relocated {
                queue,
                target,
                message,
                pending,
            } => record::encode(
                0,
                &Body::Relocated {
                    queue: queue.clone(),
                    message: (**message).clone(),
                    pending: pending.clone(),
                    target: *target,
                },
                out,
            ),
        }
    }

    /// Whether the record holds a message someone still owes (counted live in its segment).
    fn live(&self) -> bool {
        match self {
            Self::Message { pending, .. } => !pending.is_empty(),
            Self::Relocated { .. } => true,
        }
    }

    fn sequence(&self) -> u64 {
        match self {
            Self::Message { sequence, .. } => *sequence,
            Self::Relocated { target, .. } => *target,
        }
    }
}

/// Most settlement and attempt records waiting for the writer (they pile up only while the disk
/// refuses writes).
const MAX_SIDE_RECORDS: usize = 1_000_000;

/// The disk log: one per data directory, one writer thread.
pub struct DiskLog {
    /// Held for as long as the log is open: one process per log directory.
    _lock: fs::File,
    dir: PathBuf,
    first_free: u64,
    numbering: AtomicU64,
    /// Unbounded: what waits here is bounded by the caller's admission (the owner's memory bound).
    /// A send never waits, so records are written in call order.
    tx: mpsc::UnboundedSender<Op>,
    /// The writer thread, joined on drop: the directory's lock is released only once nothing
    /// writes to it any more.
    writer: Option<std::thread::JoinHandle<()>>,
    side: Arc<Mutex<Vec<Body>>>,
    /// Segments of released records, applied by the writer with its next batch.
    releases: Arc<Mutex<Vec<u64>>>,
    /// A wake-up is on its way to the writer: side records and releases pushed meanwhile ride on
    /// it (one wake-up per batch, not one per settlement).
    wake_pending: Arc<std::sync::atomic::AtomicBool>,
    recovered: Mutex<Vec<Recovered>>,
    spills: Mutex<Vec<RecoveredSpill>>,
    remembered: Mutex<Vec<Remembered>>,
    stats: Arc<StoreStats>,
    /// The segment being written.
    active: Arc<AtomicU64>,
    /// The oldest segment on disk.
    oldest: Arc<AtomicU64>,
    retained: Mutex<Vec<RetainedRun>>,
    /// Live messages in segments below this one should be relocated (0: none).
    relocate_below: Arc<AtomicU64>,
}

impl Drop for DiskLog {
    fn drop(&mut self) {
        // Closing the channel ends the writer after what it was given; then the lock goes (after
        // this, with the fields).
        drop(std::mem::replace(&mut self.tx, mpsc::unbounded_channel().0));
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the log writer thread panicked");
        }
    }
}

impl std::fmt::Debug for DiskLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLog").finish_non_exhaustive()
    }
}

/// Takes the exclusive lock of a log directory.
fn lock_dir(dir: &std::path::Path) -> std::io::Result<fs::File> {
    let path = dir.join("LOCK");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another process (is another qmesh-sidecar running on the same --data-dir?)",
                dir.display()
            ),
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Resolves a write's reply.
async fn answer(
    reply: oneshot::Receiver<Result<Position, StoreError>>,
) -> Result<Position, StoreError> {
    reply.await.map_err(|_| StoreError::Stopped)?
}

impl DiskLog {
    /// Opens (replaying) or creates the log in `config.dir`, and starts its writer thread.
    /// Fails if another process has the log open (`LOCK`, released by the kernel even on `kill -9`).
    pub fn open(config: StoreConfig) -> std::io::Result<Self> {
        fs::create_dir_all(&config.dir)?;
        let lock = lock_dir(&config.dir)?;
        let stats = Arc::new(StoreStats::default());
        let relocate_below = Arc::new(AtomicU64::new(0));
        let (writer, replayed, remembered) = Writer::open(
            config.clone(),
            Arc::clone(&stats),
            Arc::clone(&relocate_below),
        )?;
        let first_free = writer.next_seq;
        let active = Arc::clone(&writer.active_id);
        let oldest = Arc::clone(&writer.oldest_id);
        let (tx, rx) = mpsc::unbounded_channel();
        let side = Arc::new(Mutex::new(Vec::new()));
        let releases = Arc::new(Mutex::new(Vec::new()));
        let wake_pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pickup = Pickup {
            side: Arc::clone(&side),
            releases: Arc::clone(&releases),
            wake_pending: Arc::clone(&wake_pending),
        };
        let writer = std::thread::Builder::new()
            .name("qmesh-log-writer".into())
            .spawn(move || writer.run(rx, pickup))?;
        if let FsyncPolicy::Interval(every) = config.fsync {
            // Weak: the ticker does not keep the writer alive once the log is dropped.
            let tick = tx.downgrade();
            std::thread::Builder::new()
                .name("qmesh-log-fsync".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        match tick.upgrade() {
                            Some(tx) if tx.send(Op::Wake).is_ok() => {}
                            _ => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            writer: Some(writer),
            _lock: lock,
            dir: config.dir,
            tx,
            side,
            releases,
            wake_pending,
            recovered: Mutex::new(replayed.recovered),
            spills: Mutex::new(replayed.spills),
            retained: Mutex::new(replayed.retained),
            remembered: Mutex::new(remembered),
            stats,
            first_free,
            numbering: AtomicU64::new(first_free),
            active,
            oldest,
            relocate_below,
        })
    }

    /// The log's counters.
    pub fn stats(&self) -> Arc<StoreStats> {
        Arc::clone(&self.stats)
    }

    /// Appends with the next sequence of the log's own numbering (for callers that do not number
    /// messages themselves, like tools and benchmarks); returns the sequence and where the record
    /// is once durable.
    pub async fn append_next(
        &self,
        queue: &str,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> Result<(u64, Position), StoreError> {
        let sequence = self.numbering.fetch_add(1, Ordering::SeqCst);
        let at = self.append(queue, sequence, message, pending).await?;
        Ok((sequence, at))
    }

    /// Writes every pending side record and fsyncs: once this returns, everything recorded before
    /// is durable.
    pub async fn flush(&self) -> std::io::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Op::Flush(reply))
            .map_err(|_| std::io::Error::other("the log writer stopped"))?;
        answer
            .await
            .map_err(|_| std::io::Error::other("the log writer stopped"))?
    }

    fn side(&self, body: Body) {
        let mut side = self.side.lock().unwrap_or_else(|e| e.into_inner());
        if side.len() >= MAX_SIDE_RECORDS {
            // The disk has refused writes for a long while. Settlements and attempt counts may go
            // (a restart redelivers, at-least-once); remembered ids and spill records stay.
            let before = side.len();
            side.retain(|b| {
                matches!(
                    b,
                    Body::Remember { .. }
                        | Body::Spill { .. }
                        | Body::PagedIn { .. }
                        | Body::SpillEnd { .. }
                )
            });
            self.stats
                .write_errors
                .fetch_add((before - side.len()) as u64, Ordering::Relaxed);
            tracing::error!(
                dropped = before - side.len(),
                "settlement records waiting for a failing disk dropped; their messages will be redelivered after a restart"
            );
        }
        side.push(body);
        drop(side);
        self.wake();
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            let _ = self.tx.send(Op::Wake);
        }
    }

    fn write(&self, record: Pending) -> impl Future<Output = Result<Position, StoreError>> + use<> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Write { record, reply }).is_err() {
            let (failed, rx) = oneshot::channel();
            let _ = failed.send(Err(StoreError::Stopped));
            return answer(rx);
        }
        answer(rx)
    }

    /// Persists message `sequence` owed to `pending` subscriptions; resolves, with where it is,
    /// once it is durable (per the fsync policy). Records are written in the order of the calls,
    /// which is made when this is called, not when the future is first polled.
    pub fn append(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> impl Future<Output = Result<Position, StoreError>> + use<> {
        self.write(Pending::Message {
            queue: queue.to_owned(),
            sequence,
            message: Arc::clone(message),
            pending: pending.to_vec(),
        })
    }

    /// Writes a fresh copy of a live message (its sequence, owing subscriptions and attempts) at
    /// the head of the log, so the segment of its old copy can go. The caller releases the old copy
    /// once this resolves.
    pub fn relocate(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: Vec<(String, u32)>,
    ) -> impl Future<Output = Result<Position, StoreError>> + use<> {
        self.write(Pending::Relocated {
            queue: queue.to_owned(),
            target: sequence,
            message: Arc::clone(message),
            pending,
        })
    }

    /// The message record at `at` is no longer needed (settled everywhere, or superseded by a
    /// relocated copy): its segment can go once nothing else in it or before it is live.
    pub fn release(&self, at: Position) {
        self.releases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(at.segment);
        self.wake();
    }

    /// Live messages in segments below the returned one should be relocated: that lets old
    /// segments go. `None` while the log is short or its head is mostly live.
    pub fn relocation_target(&self) -> Option<u64> {
        Some(self.relocate_below.load(Ordering::Relaxed)).filter(|&s| s > 0)
    }

    /// The first sequence never used by a message in this log.
    pub fn next_sequence(&self) -> u64 {
        self.first_free
    }

    /// Records that `subscription` is done with `sequence` (written behind the appends, not
    /// awaited).
    pub fn settle(&self, queue: &str, subscription: &str, sequence: u64, outcome: Outcome) {
        self.side(Body::Settle {
            queue: queue.to_owned(),
            subscription: subscription.to_owned(),
            target: sequence,
            outcome: u8::from(outcome == Outcome::DeadLettered),
        });
    }

    /// Records the delivery attempts so far of `sequence` for `subscription`.
    pub fn attempted(&self, queue: &str, subscription: &str, sequence: u64, attempts: u32) {
        self.side(Body::Attempt {
            queue: queue.to_owned(),
            subscription: subscription.to_owned(),
            target: sequence,
            attempts,
        });
    }

    /// Records that messages of `queue` from sequence `from` on are kept on disk only; paging them
    /// in starts at `cursor`.
    pub fn spill(&self, queue: &str, from: u64, cursor: Position) {
        self.side(Body::Spill {
            queue: queue.to_owned(),
            from,
            segment: cursor.segment,
            offset: cursor.offset,
        });
    }

    /// Records a page-in of `queue` through sequence `through`; the next starts at `resume`.
    pub fn paged_in(&self, queue: &str, through: u64, resume: Position) {
        self.side(Body::PagedIn {
            queue: queue.to_owned(),
            through,
            segment: resume.segment,
            offset: resume.offset,
        });
    }

    /// Records that every spilled message of `queue` is back in memory.
    pub fn spill_end(&self, queue: &str) {
        self.side(Body::SpillEnd {
            queue: queue.to_owned(),
        });
    }

    /// Reads spilled messages of `queue` back from `cursor`: sequences above `after`, stopping at
    /// the first at or above `below` (not yet completed) or once `max_bytes` are read. Blocking
    /// file reads; the read-ahead is one large buffer.
    pub fn read_spilled(
        &self,
        queue: &str,
        cursor: Position,
        after: u64,
        below: u64,
        max_bytes: usize,
    ) -> std::io::Result<Page> {
        let last = self.active.load(Ordering::SeqCst);
        let page = pages::read(
            &self.dir,
            cursor,
            last,
            Want {
                queue,
                after,
                below,
                until: None,
                max_bytes,
                everything: false,
            },
        )?;
        self.stats.page_reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .page_read_bytes
            .fetch_add(page.bytes_read, Ordering::Relaxed);
        Ok(page)
    }

    /// Reads every message of `queue` still in the log, settled or not, relocated copies included,
    /// from `cursor` (the oldest segment when `None`): stopping at the first message numbered at or
    /// above `below` or once `max_bytes` are read. What a replay (`startAt`, rewind) scans.
    pub fn read_retained(
        &self,
        queue: &str,
        cursor: Option<Position>,
        below: u64,
        max_bytes: usize,
    ) -> std::io::Result<Page> {
        let last = self.active.load(Ordering::SeqCst);
        let oldest = Position {
            segment: self.oldest.load(Ordering::SeqCst),
            offset: 0,
            len: 0,
        };
        // A cursor in a segment deleted since starts again at the oldest one left.
        let from = cursor.filter(|c| *c >= oldest).unwrap_or(oldest);
        let page = pages::read(
            &self.dir,
            from,
            last,
            Want {
                queue,
                after: 0,
                below,
                until: None,
                max_bytes,
                everything: true,
            },
        )?;
        self.stats.page_reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .page_read_bytes
            .fetch_add(page.bytes_read, Ordering::Relaxed);
        Ok(page)
    }

    /// Settled messages whose records were still in the log at open, per queue and segment (taken
    /// once): each run must be kept (for replay) or handed back with [`DiskLog::release_run`].
    pub fn recover_retained(&self) -> Vec<RetainedRun> {
        std::mem::take(&mut *self.retained.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Nothing needs `messages` settled records in `segment` any more.
    pub fn release_run(&self, segment: u64, messages: u64) {
        {
            let mut releases = self.releases.lock().unwrap_or_else(|e| e.into_inner());
            for _ in 0..messages {
                releases.push(segment);
            }
        }
        self.wake();
    }

    /// Writes a small state file beside the log (replaced whole, atomically, and synced).
    pub fn save_state(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut f = fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// Reads a state file written by [`DiskLog::save_state`] (`None` if there is none).
    pub fn load_state(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What the owner held in memory at the last stop, in sequence order (taken once).
    pub fn recover(&self) -> Vec<Recovered> {
        std::mem::take(&mut *self.recovered.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Queues whose newest messages were on disk only at the last stop (taken once).
    pub fn recover_spills(&self) -> Vec<RecoveredSpill> {
        std::mem::take(&mut *self.spills.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Remembers a stored message's id until `until` in the dedup journal.
    pub fn remember(&self, queue: &str, id: &str, sequence: u64, until: std::time::SystemTime) {
        self.side(Body::Remember {
            queue: queue.to_owned(),
            id: id.to_owned(),
            target: sequence,
            until_ms: dedup::unix_ms(until),
        });
    }

    /// Ids remembered and not yet expired, as of the open (taken once).
    pub fn recover_remembered(&self) -> Vec<Remembered> {
        std::mem::take(&mut *self.remembered.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

// === impl Writer ===

/// What the writer picks up besides its channel.
struct Pickup {
    side: Arc<Mutex<Vec<Body>>>,
    releases: Arc<Mutex<Vec<u64>>>,
    wake_pending: Arc<std::sync::atomic::AtomicBool>,
}

struct Writer {
    config: StoreConfig,
    stats: Arc<StoreStats>,
    segments: VecDeque<Segment>,
    active: File,
    active_size: u64,
    active_id: Arc<AtomicU64>,
    /// The oldest segment still on disk (where a replay's scan starts).
    oldest_id: Arc<AtomicU64>,
    relocate_below: Arc<AtomicU64>,
    next_seq: u64,
    last_fsync: Instant,
    dirty: bool,
    /// The last write failed (the side records wait for the next operation).
    failed: bool,
    dedup: DedupJournal,
    dedup_buf: Vec<u8>,
    /// Sealed segments to index, for the indexing thread.
    indexer: std::sync::mpsc::Sender<u64>,
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Writer {
    /// Replays every segment, then starts a fresh active segment.
    fn open(
        config: StoreConfig,
        stats: Arc<StoreStats>,
        relocate_below: Arc<AtomicU64>,
    ) -> std::io::Result<(Self, replay::Replayed, Vec<Remembered>)> {
        let dir = config.dir.clone();
        let (dedup, remembered) = DedupJournal::open(dir.clone())?;
        let mut ids: Vec<u64> = Vec::new();
        let mut indexes: Vec<u64> = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if index::is_partial(&name) {
                if index::is_abandoned(&name) {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            if index::is_index_file(&name) {
                indexes.extend(index::indexed_segment(&name));
                continue;
            }
            if entry.file_type()?.is_dir()
                || name == "LOCK"
                || name.ends_with(".ids")
                || name.ends_with(".state")
                || name.ends_with(".state.tmp")
            {
                continue;
            }
            match name
                .strip_suffix(".log")
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(id) => ids.push(id),
                None if name.ends_with(".dropped") => {}
                None => tracing::warn!(file = %name, "ignoring a file that is not a log segment"),
            }
        }
        ids.sort_unstable();
        // An index whose segment is gone (collected while it was being written) goes too.
        for id in indexes {
            if ids.binary_search(&id).is_err() {
                index::remove(&dir, id);
            }
        }
        let mut replayed = replay::replay(&dir, &ids, &stats)?;
        let segments = std::mem::take(&mut replayed.segments);
        let new_id = segments.back().map_or(1, |s| s.id + 1);
        let active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&dir, new_id))?;
        sync_dir(&dir);
        let (indexer, sealed) = std::sync::mpsc::channel::<u64>();
        let index_dir = dir.clone();
        std::thread::Builder::new()
            .name("qmesh-log-index".into())
            .spawn(move || {
                for id in sealed {
                    if let Err(error) = index::build(&index_dir, id) {
                        tracing::warn!(%error, segment = id, "could not index a sealed segment; the next start reads it whole");
                        index::remove(&index_dir, id);
                    }
                }
            })?;
        let mut writer = Self {
            config,
            stats,
            segments,
            active,
            active_size: 0,
            active_id: Arc::new(AtomicU64::new(new_id)),
            oldest_id: Arc::new(AtomicU64::new(new_id)),
            relocate_below,
            next_seq: replayed.next_seq,
            last_fsync: Instant::now(),
            dirty: false,
            failed: false,
            dedup,
            dedup_buf: Vec::new(),
            indexer,
        };
        writer.segments.push_back(Segment {
            id: new_id,
            live: 0,
            total: 0,
        });
        writer.write_floor();
        writer.collect_garbage();
        Ok((writer, replayed, remembered))
    }

    fn active_id(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.id)
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>, pickup: Pickup) {
        let side = pickup.side;
        let mut buf = Vec::with_capacity(self.config.max_batch_bytes);
        loop {
            // Cleared before looking: a record pushed after this sends a wake-up; one pushed
            // before is seen below (a wake-up taken with the last batch's operations would
            // otherwise leave later pushes waiting for an unrelated operation). After a failed
            // write the writer waits for the next operation instead of spinning on a full disk.
            pickup.wake_pending.store(false, Ordering::SeqCst);
            let waiting = !self.failed
                && (!side.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
                    || !pickup
                        .releases
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_empty());
            let first = if waiting {
                rx.try_recv().unwrap_or(Op::Wake)
            } else {
                match rx.blocking_recv() {
                    Some(op) => op,
                    None => break,
                }
            };
            let released =
                std::mem::take(&mut *pickup.releases.lock().unwrap_or_else(|e| e.into_inner()));
            for segment in released {
                self.release(segment);
            }
            // Side records are taken before the channel is drained: every record written or queued
            // before a settlement was recorded is in this batch, and messages are written first —
            // a settlement never lands before the record it settles.
            let mut side_records =
                std::mem::take(&mut *side.lock().unwrap_or_else(|e| e.into_inner()));
            let mut ops = vec![first];
            let mut bytes = 0usize;
            let mut cut = false;
            loop {
                if bytes >= self.config.max_batch_bytes {
                    cut = true;
                    break;
                }
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Write { record, .. } = &op {
                            bytes += record.bytes();
                        }
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            if cut && !side_records.is_empty() {
                // Writes queued before these side records may still wait in the channel: the side
                // records go with a later batch.
                let mut waiting = side.lock().unwrap_or_else(|e| e.into_inner());
                let later = std::mem::take(&mut *waiting);
                waiting.append(&mut side_records);
                waiting.extend(later);
            }
            self.write_batch(ops, side_records, &side, &mut buf);
        }
        let _ = self.active.sync_data();
    }

    fn write_batch(
        &mut self,
        ops: Vec<Op>,
        side_records: Vec<Body>,
        side: &Mutex<Vec<Body>>,
        buf: &mut Vec<u8>,
    ) {
        let mut flushes = Vec::new();
        let mut writes = Vec::new();
        for op in ops {
            match op {
                Op::Flush(reply) => flushes.push(reply),
                Op::Write { record, reply } => writes.push((record, reply)),
                Op::Wake => {}
            }
        }
        self.write_records(writes, side_records, side, buf);
        if !flushes.is_empty() {
            let result = self.sync();
            if result.is_ok() {
                self.dirty = false;
            }
            for reply in flushes {
                let answer = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                let _ = reply.send(answer);
            }
        }
        self.collect_garbage();
        self.update_relocation_target();
    }

    fn release(&mut self, segment: u64) {
        match self.segments.iter_mut().find(|s| s.id == segment) {
            Some(s) if s.live > 0 => s.live -= 1,
            _ => {
                self.stats.release_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    segment,
                    "a release for a segment with no live message; ignored"
                );
            }
        }
    }

    fn write_records(
        &mut self,
        writes: Vec<(Pending, oneshot::Sender<Result<Position, StoreError>>)>,
        side_records: Vec<Body>,
        side: &Mutex<Vec<Body>>,
        buf: &mut Vec<u8>,
    ) {
        buf.clear();
        self.failed = false;
        let start_size = self.active_size;
        let mut placed = Vec::new();
        for (record, reply) in writes {
            let at = buf.len();
            record.encode(buf);
            let size = buf.len() - at;
            if !record::fits(size) {
                // Replay would reject it (and cut the log there): refuse it now instead.
                buf.truncate(at);
                let _ = reply.send(Err(StoreError::TooLarge {
                    size,
                    limit: record::MAX_RECORD,
                }));
                continue;
            }
            self.next_seq = self.next_seq.max(record.sequence().saturating_add(1));
            if matches!(record, Pending::Relocated { .. }) {
                self.stats.relocated.fetch_add(1, Ordering::Relaxed);
            }
            placed.push((start_size + at as u64, size as u32, record.live(), reply));
        }
        // Remembered ids go to the dedup journal first: a settlement written after them must
        // never be on disk without them. If the journal cannot be written, the side records wait.
        let (remember, side_records): (Vec<Body>, Vec<Body>) = side_records
            .into_iter()
            .partition(|b| matches!(b, Body::Remember { .. }));
        let side_records = match self.dedup.write(&remember, &mut self.dedup_buf) {
            Ok(()) => side_records,
            Err(error) => {
                self.failed = true;
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "dedup journal write failed; settlements wait for it");
                let mut waiting = side.lock().unwrap_or_else(|e| e.into_inner());
                let later = std::mem::take(&mut *waiting);
                waiting.extend(remember);
                waiting.extend(side_records);
                waiting.extend(later);
                Vec::new()
            }
        };
        for body in &side_records {
            // Side records are identified by their target; their own sequence is unused.
            record::encode(0, body, buf);
        }
        if buf.is_empty() {
            self.maybe_interval_fsync();
            return;
        }
        let must_sync = !placed.is_empty() && self.config.fsync == FsyncPolicy::Always;
        let result = self
            .active
            .write_all(buf)
            .and_then(|()| if must_sync { self.sync() } else { Ok(()) });
        if let Err(error) = result {
            self.failed = true;
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "log write failed; failing this batch's appends");
            // Nothing of this batch may resurface after a restart: cut it off again.
            if self.active.set_len(start_size).is_err()
                || self.active.seek(SeekFrom::End(0)).is_err()
            {
                self.roll();
            }
            // Kept to be written once there is room; releases already freed what they could,
            // which is what frees a full disk.
            side.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(side_records);
            let failure = if matches!(
                error.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) {
                StoreError::DiskFull {
                    dir: self.config.dir.display().to_string(),
                    error: error.to_string(),
                }
            } else {
                StoreError::Io(error.to_string())
            };
            for (.., reply) in placed {
                let _ = reply.send(Err(failure.clone()));
            }
            return;
        }
        self.active_size += buf.len() as u64;
        self.dirty = !must_sync;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.stats
            .appends
            .fetch_add(placed.len() as u64, Ordering::Relaxed);
        let active = self.active_id();
        for (offset, len, live, reply) in placed {
            if let Some(s) = self.segments.back_mut() {
                s.total += 1;
                s.live += u64::from(live);
            }
            let _ = reply.send(Ok(Position {
                segment: active,
                offset,
                len,
            }));
        }
        self.maybe_interval_fsync();
        if self.active_size >= self.config.segment_bytes {
            self.roll();
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.last_fsync = Instant::now();
        // Ids written before anything this sync covers are made durable first.
        self.dedup.sync()?;
        self.active.sync_data()
    }

    fn maybe_interval_fsync(&mut self) {
        if let FsyncPolicy::Interval(every) = self.config.fsync
            && self.dirty
            && self.last_fsync.elapsed() >= every
        {
            if let Err(error) = self.sync() {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "periodic fsync failed");
            }
            self.dirty = false;
        }
    }

    /// Starts the active segment with the numbering floor (a failed write only loses the floor of
    /// this segment; the next roll writes it again).
    fn write_floor(&mut self) {
        let mut buf = Vec::new();
        record::encode(
            0,
            &Body::Floor {
                next: self.next_seq,
            },
            &mut buf,
        );
        if self.active.write_all(&buf).is_ok() {
            self.active_size += buf.len() as u64;
        }
    }

    /// Starts a new active segment; the one before is sealed and indexed in the background.
    fn roll(&mut self) {
        let _ = self.active.sync_data();
        let sealed = self.active_id();
        let id = sealed + 1;
        match OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.config.dir, id))
        {
            Ok(file) => {
                sync_dir(&self.config.dir);
                self.active = file;
                self.active_size = 0;
                self.segments.push_back(Segment {
                    id,
                    live: 0,
                    total: 0,
                });
                self.active_id.store(id, Ordering::SeqCst);
                self.write_floor();
                let _ = self.indexer.send(sealed);
            }
            Err(error) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "could not roll the log segment; continuing in the current one");
            }
        }
    }

    /// Deletes the oldest segments while everything in them is settled. Only from the front: a
    /// later segment may hold the settle records of messages in an earlier one.
    fn collect_garbage(&mut self) {
        self.collect_segments();
        if let Some(front) = self.segments.front() {
            self.oldest_id.store(front.id, Ordering::SeqCst);
        }
    }

    fn collect_segments(&mut self) {
        self.dedup
            .collect(dedup::unix_ms(std::time::SystemTime::now()));
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.live == 0) {
            let Some(s) = self.segments.pop_front() else {
                break;
            };
            let path = segment_path(&self.config.dir, s.id);
            match fs::remove_file(&path) {
                Ok(()) => {
                    index::remove(&self.config.dir, s.id);
                    self.stats.segments_deleted.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(%error, segment = %path.display(), "could not delete a settled segment");
                    self.segments.push_front(s);
                    break;
                }
            }
        }
    }

    /// Beyond `max_segments`, asks for the live messages of the oldest segment to be copied forward
    /// when that is worth it: a mostly settled head, or one that pins settled segments behind it
    /// (parked or slow messages would otherwise keep every later segment on disk). A log that is
    /// live all through (a backlog) is left alone: moving it would only rewrite it.
    fn update_relocation_target(&mut self) {
        let n = self.segments.len();
        let target = self
            .segments
            .front()
            .filter(|h| {
                n > self.config.max_segments.max(2)
                    && (h.live * 2 <= h.total
                        || self
                            .segments
                            .iter()
                            .skip(1)
                            .take(n - 2)
                            .any(|s| s.live == 0))
            })
            .map_or(0, |h| h.id + 1);
        self.relocate_below.store(target, Ordering::Relaxed);
    }
}
