//! [`DiskLog`]: segment files, group commit, replay, garbage collection and compaction.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
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

use super::{
    dedup::{self, DedupJournal},
    record::{self, Body},
};
use crate::{Outcome, Recovered, Remembered, StoreError};

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
    /// Appends waiting for the writer at most (backpressure beyond).
    pub queue_depth: usize,
    /// Compact (copy live messages of the oldest segment forward) once there are more segments.
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
            queue_depth: 4096,
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
    /// Bytes dropped at start (torn tail, corruption, foreign files).
    pub dropped_bytes: AtomicU64,
    /// Failed writes or fsyncs.
    pub write_errors: AtomicU64,
    /// Segments deleted by garbage collection.
    pub segments_deleted: AtomicU64,
    /// Live messages copied forward by compaction.
    pub relocated: AtomicU64,
}

enum Op {
    Append {
        queue: String,
        sequence: u64,
        message: Arc<v1::Message>,
        pending: Vec<String>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Wake,
    Flush(oneshot::Sender<std::io::Result<()>>),
}

/// Most settlement and attempt records waiting for the writer (they pile up only while the disk
/// refuses writes).
const MAX_SIDE_RECORDS: usize = 1_000_000;

/// The disk log: one per data directory, one writer thread.
pub struct DiskLog {
    /// Held for as long as the log is open: one process per log directory.
    _lock: fs::File,
    first_free: u64,
    numbering: AtomicU64,
    tx: mpsc::Sender<Op>,
    side: Arc<Mutex<Vec<Body>>>,
    recovered: Mutex<Vec<Recovered>>,
    remembered: Mutex<Vec<Remembered>>,
    stats: Arc<StoreStats>,
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

impl DiskLog {
    /// Opens (replaying) or creates the log in `config.dir`, and starts its writer thread.
    /// Fails if another process has the log open (`LOCK`, released by the kernel even on `kill -9`).
    pub fn open(config: StoreConfig) -> std::io::Result<Self> {
        fs::create_dir_all(&config.dir)?;
        let lock = lock_dir(&config.dir)?;
        let stats = Arc::new(StoreStats::default());
        let (writer, recovered, remembered) = Writer::open(config.clone(), Arc::clone(&stats))?;
        let first_free = writer.next_seq;
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let side = Arc::new(Mutex::new(Vec::new()));
        let writer_side = Arc::clone(&side);
        std::thread::Builder::new()
            .name("qmesh-log-writer".into())
            .spawn(move || writer.run(rx, writer_side))?;
        if let FsyncPolicy::Interval(every) = config.fsync {
            let tick = tx.clone();
            std::thread::Builder::new()
                .name("qmesh-log-fsync".into())
                .spawn(move || {
                    while !tick.is_closed() {
                        std::thread::sleep(every);
                        let _ = tick.try_send(Op::Wake);
                    }
                })?;
        }
        Ok(Self {
            _lock: lock,
            tx,
            side,
            recovered: Mutex::new(recovered),
            remembered: Mutex::new(remembered),
            stats,
            first_free,
            numbering: AtomicU64::new(first_free),
        })
    }

    /// The log's counters.
    pub fn stats(&self) -> Arc<StoreStats> {
        Arc::clone(&self.stats)
    }

    /// Appends with the next sequence of the log's own numbering (for callers that do not number
    /// messages themselves, like tools and benchmarks); returns the sequence once durable.
    pub async fn append_next(
        &self,
        queue: &str,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> Result<u64, StoreError> {
        let sequence = self.numbering.fetch_add(1, Ordering::SeqCst);
        self.append(queue, sequence, message, pending)
            .await
            .map(|()| sequence)
    }

    /// Writes every pending settle/attempt record and fsyncs: once this returns, everything
    /// recorded before is durable.
    pub async fn flush(&self) -> std::io::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Op::Flush(reply))
            .await
            .map_err(|_| std::io::Error::other("the log writer stopped"))?;
        answer
            .await
            .map_err(|_| std::io::Error::other("the log writer stopped"))?
    }

    fn side(&self, body: Body) {
        let mut side = self.side.lock().unwrap_or_else(|e| e.into_inner());
        if side.len() >= MAX_SIDE_RECORDS {
            // The disk has refused writes for a long while. Settlements and attempt counts may go
            // (a restart redelivers, at-least-once); remembered ids stay.
            let before = side.len();
            side.retain(|b| matches!(b, Body::Remember { .. }));
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
        let _ = self.tx.try_send(Op::Wake);
    }
}

impl DiskLog {
    /// Persists message `sequence` owed to `pending` subscriptions; resolves once it is durable
    /// (per the fsync policy).
    pub async fn append(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let op = Op::Append {
            queue: queue.to_owned(),
            sequence,
            message: Arc::clone(message),
            pending: pending.to_vec(),
            reply,
        };
        self.tx.send(op).await.map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?.map(|_| ())
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

    /// Everything unsettled, in sequence order, as of the open (taken once).
    pub fn recover(&self) -> Vec<Recovered> {
        std::mem::take(&mut *self.recovered.lock().unwrap_or_else(|e| e.into_inner()))
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

/// Where a live message is, and who still owes it.
struct Live {
    segment: u64,
    offset: u64,
    len: u32,
    queue: Name,
    pending: Vec<(Name, u32)>,
}

/// Queue and subscription names, shared by every index entry that mentions them.
type Name = Arc<str>;

/// Interns names so the index does not allocate per message.
#[derive(Default)]
struct Names(std::collections::HashSet<Name>);

impl Names {
    fn get(&mut self, name: &str) -> Name {
        if let Some(n) = self.0.get(name) {
            return Arc::clone(n);
        }
        let n: Name = Arc::from(name);
        self.0.insert(Arc::clone(&n));
        n
    }
}

struct Segment {
    id: u64,
    /// Unsettled messages whose latest copy is in this segment.
    live: u64,
    /// Messages (and relocated copies) ever written to it.
    total: u64,
}

struct Writer {
    config: StoreConfig,
    stats: Arc<StoreStats>,
    segments: VecDeque<Segment>,
    active: File,
    active_size: u64,
    live: HashMap<u64, Live>,
    names: Names,
    next_seq: u64,
    last_fsync: Instant,
    dirty: bool,
    dedup: DedupJournal,
    dedup_buf: Vec<u8>,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
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
    ) -> std::io::Result<(Self, Vec<Recovered>, Vec<Remembered>)> {
        let dir = config.dir.clone();
        let (dedup, remembered) = DedupJournal::open(dir.clone())?;
        let mut ids: Vec<u64> = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() || name == "LOCK" || name.ends_with(".ids") {
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
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut live: HashMap<u64, Live> = HashMap::new();
        let mut messages: BTreeMap<u64, v1::Message> = BTreeMap::new();
        let mut next_seq = 1;
        let mut stop_after: Option<usize> = None;
        for (index, &id) in ids.iter().enumerate() {
            let path = segment_path(&dir, id);
            // Record by record: one record in memory at a time, never a whole segment.
            let mut reader = SegmentReader::open(&path)?;
            let mut segment = Segment {
                id,
                live: 0,
                total: 0,
            };
            loop {
                let pos = reader.pos as usize;
                // A message numbered u64::MAX leaves no next sequence: no writer makes one, so it is
                // corruption like any other.
                let next = reader.next()?.and_then(|r| match &r {
                    Some((u64::MAX, Body::Message { .. }, _))
                    | Some((
                        _,
                        Body::Relocated {
                            target: u64::MAX, ..
                        },
                        _,
                    )) => Err(record::DecodeError::Corrupt("sequence out of range")),
                    _ => Ok(r),
                });
                match next {
                    Ok(None) => break,
                    Ok(Some((seq, body, used))) => {
                        match &body {
                            Body::Message { .. } => next_seq = next_seq.max(seq.saturating_add(1)),
                            Body::Relocated { target, .. } => {
                                next_seq = next_seq.max(target.saturating_add(1))
                            }
                            Body::Floor { next } => next_seq = next_seq.max(*next),
                            Body::Settle { .. } | Body::Attempt { .. } | Body::Remember { .. } => {}
                        }
                        stats.recovered_records.fetch_add(1, Ordering::Relaxed);
                        apply(
                            &mut live,
                            &mut segments,
                            &mut segment,
                            &mut messages,
                            seq,
                            body,
                            pos as u64,
                            used as u32,
                        );
                    }
                    Err(error) => {
                        let dropped = reader.size - pos as u64;
                        stats.dropped_bytes.fetch_add(dropped, Ordering::Relaxed);
                        tracing::warn!(
                            segment = %path.display(), offset = pos, dropped_bytes = dropped, ?error,
                            "log replay stopped at a torn or corrupt record; truncating there and keeping everything before"
                        );
                        let f = OpenOptions::new().write(true).open(&path)?;
                        f.set_len(pos as u64)?;
                        f.sync_all()?;
                        stop_after = Some(index);
                        break;
                    }
                }
            }
            segments.push_back(segment);
            if stop_after.is_some() {
                break;
            }
        }
        if let Some(index) = stop_after {
            for &id in &ids[index + 1..] {
                let path = segment_path(&dir, id);
                let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                stats.dropped_bytes.fetch_add(size, Ordering::Relaxed);
                tracing::warn!(segment = %path.display(), "segment after a corrupt record set aside as .dropped");
                let _ = fs::rename(&path, path.with_extension("log.dropped"));
            }
        }
        let recovered: Vec<Recovered> = live
            .iter()
            .filter_map(|(seq, l)| {
                messages.get(seq).map(|m| {
                    let r = Recovered {
                        queue: l.queue.to_string(),
                        sequence: *seq,
                        message: m.clone(),
                        pending: l.pending.iter().map(|(s, a)| (s.to_string(), *a)).collect(),
                    };
                    (*seq, r)
                })
            })
            .collect::<BTreeMap<u64, Recovered>>()
            .into_values()
            .collect();
        let new_id = segments.back().map_or(1, |s| s.id + 1);
        let active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&dir, new_id))?;
        sync_dir(&dir);
        segments.push_back(Segment {
            id: new_id,
            live: 0,
            total: 0,
        });
        let mut writer = Self {
            config,
            stats,
            segments,
            active,
            active_size: 0,
            live,
            names: Names::default(),
            next_seq,
            last_fsync: Instant::now(),
            dirty: false,
            dedup,
            dedup_buf: Vec::new(),
        };
        writer.write_floor();
        writer.collect_garbage();
        writer.compact();
        Ok((writer, recovered, remembered))
    }

    fn active_id(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.id)
    }

    fn run(mut self, mut rx: mpsc::Receiver<Op>, side: Arc<Mutex<Vec<Body>>>) {
        let mut buf = Vec::with_capacity(self.config.max_batch_bytes);
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            let mut bytes = 0usize;
            while bytes < self.config.max_batch_bytes {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Append { message, .. } = &op {
                            bytes += message.payload.len() + 64;
                        }
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            let side_records = std::mem::take(&mut *side.lock().unwrap_or_else(|e| e.into_inner()));
            self.write_batch(ops, side_records, &side, &mut buf);
        }
        let _ = self.active.sync_data();
    }

    fn write_batch(
        &mut self,
        mut ops: Vec<Op>,
        side_records: Vec<Body>,
        side: &Mutex<Vec<Body>>,
        buf: &mut Vec<u8>,
    ) {
        let mut flushes = Vec::new();
        for op in &mut ops {
            if matches!(op, Op::Flush(_))
                && let Op::Flush(reply) = std::mem::replace(op, Op::Wake)
            {
                flushes.push(reply);
            }
        }
        self.write_records(ops, side_records, side, buf);
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
    }

    fn write_records(
        &mut self,
        ops: Vec<Op>,
        side_records: Vec<Body>,
        side: &Mutex<Vec<Body>>,
        buf: &mut Vec<u8>,
    ) {
        buf.clear();
        let start_size = self.active_size;
        let mut replies = Vec::new();
        let mut placed = Vec::new();
        for op in ops {
            if let Op::Append {
                queue,
                sequence: seq,
                message,
                pending,
                reply,
            } = op
            {
                let at = buf.len();
                let offset = start_size + at as u64;
                record::encode_message(seq, &queue, &message, &pending, buf);
                if !record::fits(buf.len() - at) {
                    // Replay would reject it (and cut the log there): refuse it now instead.
                    let size = buf.len() - at;
                    buf.truncate(at);
                    let _ = reply.send(Err(StoreError::TooLarge {
                        size,
                        limit: record::MAX_RECORD,
                    }));
                    continue;
                }
                let len = (start_size + buf.len() as u64 - offset) as u32;
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                placed.push((seq, offset, len, queue, pending));
                replies.push((seq, reply));
            }
        }
        // Remembered ids go to the dedup journal first: a settlement written after them must
        // never be on disk without them. If the journal cannot be written, the side records wait.
        let (remember, side_records): (Vec<Body>, Vec<Body>) = side_records
            .into_iter()
            .partition(|b| matches!(b, Body::Remember { .. }));
        let side_records = match self.dedup.write(&remember, &mut self.dedup_buf) {
            Ok(()) => side_records,
            Err(error) => {
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
        let mut side_applied = Vec::new();
        for body in side_records {
            // Settlement records are identified by their target; their own sequence is unused.
            record::encode(0, &body, buf);
            side_applied.push(body);
        }
        if buf.is_empty() {
            self.maybe_interval_fsync();
            return;
        }
        let must_sync = !replies.is_empty() && self.config.fsync == FsyncPolicy::Always;
        let result = self
            .active
            .write_all(buf)
            .and_then(|()| if must_sync { self.sync() } else { Ok(()) });
        if let Err(error) = result {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "log write failed; failing this batch's appends");
            // Nothing of this batch may resurface after a restart: cut it off again.
            if self.active.set_len(start_size).is_err()
                || self.active.seek(SeekFrom::End(0)).is_err()
            {
                self.roll();
            }
            // The settlements are known even if not yet durable: apply them to the index so that
            // fully settled head segments can be deleted — which is what frees a full disk — and
            // keep them queued to be written once there is room (applying twice is harmless).
            for body in &side_applied {
                self.apply_side(body.clone());
            }
            self.collect_garbage();
            side.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(side_applied);
            for (_, reply) in replies {
                let _ = reply.send(Err(StoreError::Io(error.to_string())));
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
            .fetch_add(replies.len() as u64, Ordering::Relaxed);
        let active = self.active_id();
        for (seq, offset, len, queue, pending) in placed {
            if pending.is_empty() {
                continue;
            }
            self.live.insert(
                seq,
                Live {
                    segment: active,
                    offset,
                    len,
                    queue: self.names.get(&queue),
                    pending: pending.iter().map(|p| (self.names.get(p), 0)).collect(),
                },
            );
            if let Some(s) = self.segments.back_mut() {
                s.live += 1;
                s.total += 1;
            }
        }
        for body in side_applied {
            self.apply_side(body);
        }
        for (seq, reply) in replies {
            let _ = reply.send(Ok(seq));
        }
        self.maybe_interval_fsync();
        if self.active_size >= self.config.segment_bytes {
            self.roll();
        }
        self.collect_garbage();
        self.compact();
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

    fn apply_side(&mut self, body: Body) {
        match body {
            Body::Settle {
                subscription,
                target,
                ..
            } => {
                let Some(l) = self.live.get_mut(&target) else {
                    return;
                };
                l.pending.retain(|(s, _)| **s != *subscription);
                if l.pending.is_empty() {
                    let segment = l.segment;
                    self.live.remove(&target);
                    if let Some(s) = self.segments.iter_mut().find(|s| s.id == segment) {
                        s.live = s.live.saturating_sub(1);
                    }
                }
            }
            Body::Attempt {
                subscription,
                target,
                attempts,
                ..
            } => {
                if let Some(l) = self.live.get_mut(&target)
                    && let Some(p) = l.pending.iter_mut().find(|(s, _)| **s == *subscription)
                {
                    p.1 = attempts;
                }
            }
            Body::Message { .. }
            | Body::Relocated { .. }
            | Body::Remember { .. }
            | Body::Floor { .. } => {}
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

    /// Starts a new active segment.
    fn roll(&mut self) {
        let _ = self.active.sync_data();
        let id = self.active_id() + 1;
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
                self.write_floor();
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
        self.dedup
            .collect(dedup::unix_ms(std::time::SystemTime::now()));
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.live == 0) {
            let Some(s) = self.segments.pop_front() else {
                break;
            };
            let path = segment_path(&self.config.dir, s.id);
            match fs::remove_file(&path) {
                Ok(()) => {
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

    /// Copies the live messages of the oldest segment forward once there are too many segments,
    /// so replay time stays bounded however long a few messages stay unsettled.
    fn compact(&mut self) {
        // A mostly settled head is worth copying forward; so is any head that pins settled segments
        // behind it (parked or slow messages would otherwise keep every later segment on disk).
        // A log that is live all through (a backlog) is left alone: moving it would only rewrite it.
        while self.segments.len() > self.config.max_segments.max(2)
            && self.segments.front().is_some_and(|h| {
                h.live * 2 <= h.total
                    || self
                        .segments
                        .iter()
                        .skip(1)
                        .take(self.segments.len().saturating_sub(2))
                        .any(|s| s.live == 0)
            })
        {
            let before = self.segments.len();
            self.compact_head();
            if self.segments.len() >= before {
                break;
            }
        }
    }

    fn compact_head(&mut self) {
        let Some(head) = self.segments.front().map(|s| s.id) else {
            return;
        };
        let mut moving: Vec<(u64, u64, u32)> = self
            .live
            .iter()
            .filter(|(_, l)| l.segment == head)
            .map(|(seq, l)| (*seq, l.offset, l.len))
            .collect();
        moving.sort_unstable();
        let Ok(mut file) = File::open(segment_path(&self.config.dir, head)) else {
            return;
        };
        let mut buf = Vec::new();
        let mut placed = Vec::new();
        for (seq, offset, len) in moving {
            let mut raw = vec![0u8; len as usize];
            if file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut raw))
                .is_err()
            {
                return;
            }
            let Ok((_, Body::Message { message, .. } | Body::Relocated { message, .. }, _)) =
                record::decode(&raw)
            else {
                return;
            };
            let Some(l) = self.live.get(&seq) else {
                continue;
            };
            let new_seq = 0;
            let before = buf.len();
            let at = self.active_size + before as u64;
            record::encode(
                new_seq,
                &Body::Relocated {
                    queue: l.queue.to_string(),
                    message,
                    pending: l.pending.iter().map(|(s, a)| (s.to_string(), *a)).collect(),
                    target: seq,
                },
                &mut buf,
            );
            if !record::fits(buf.len() - before) {
                // Too big to copy forward with its state: it stays where it is.
                buf.truncate(before);
                return;
            }
            placed.push((seq, at, (self.active_size + buf.len() as u64 - at) as u32));
        }
        if self
            .active
            .write_all(&buf)
            .and_then(|()| self.sync())
            .is_err()
        {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            let _ = self.active.set_len(self.active_size);
            return;
        }
        self.active_size += buf.len() as u64;
        let active = self.active_id();
        let moved = placed.len() as u64;
        for (seq, offset, len) in placed {
            if let Some(l) = self.live.get_mut(&seq) {
                *l = Live {
                    segment: active,
                    offset,
                    len,
                    queue: Arc::clone(&l.queue),
                    pending: std::mem::take(&mut l.pending),
                };
            }
        }
        if let Some(s) = self.segments.back_mut() {
            s.live += moved;
            s.total += moved;
        }
        if let Some(s) = self.segments.front_mut() {
            s.live = 0;
        }
        self.stats.relocated.fetch_add(moved, Ordering::Relaxed);
        tracing::info!(segment = head, moved, "compacted the oldest log segment");
        self.collect_garbage();
    }
}

/// What [`SegmentReader::next`] finds: a record `(seq, body, bytes)`, the clean end (`None`), or
/// where the good data ends.
type Next = Result<Option<(u64, Body, usize)>, record::DecodeError>;

/// Reads a segment file record by record, holding one record at a time.
struct SegmentReader {
    file: std::io::BufReader<File>,
    buf: Vec<u8>,
    size: u64,
    pos: u64,
}

impl SegmentReader {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file: std::io::BufReader::with_capacity(256 * 1024, file),
            buf: Vec::new(),
            size,
            pos: 0,
        })
    }

    /// The next record (`None` at the clean end), or where the good data ends.
    fn next(&mut self) -> std::io::Result<Next> {
        let left = self.size - self.pos;
        if left == 0 {
            return Ok(Ok(None));
        }
        if left < record::HEADER as u64 {
            return Ok(Err(record::DecodeError::Torn));
        }
        self.buf.resize(record::HEADER, 0);
        self.file.read_exact(&mut self.buf)?;
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if !(9..=record::MAX_RECORD).contains(&len) {
            return Ok(Err(record::DecodeError::Corrupt(
                "record length out of range",
            )));
        }
        if left < (record::HEADER + len) as u64 {
            return Ok(Err(record::DecodeError::Torn));
        }
        self.buf.resize(record::HEADER + len, 0);
        self.file.read_exact(&mut self.buf[record::HEADER..])?;
        let decoded = record::decode(&self.buf);
        if let Ok((_, _, used)) = &decoded {
            self.pos += *used as u64;
        }
        Ok(decoded.map(Some))
    }
}

/// Applies one replayed record to the index.
#[allow(clippy::too_many_arguments)]
fn apply(
    live: &mut HashMap<u64, Live>,
    earlier: &mut VecDeque<Segment>,
    current: &mut Segment,
    messages: &mut BTreeMap<u64, v1::Message>,
    seq: u64,
    body: Body,
    offset: u64,
    len: u32,
) {
    let mut release = |segment: u64| {
        if let Some(s) = earlier.iter_mut().find(|s| s.id == segment) {
            s.live = s.live.saturating_sub(1);
        }
    };
    match body {
        Body::Message {
            queue,
            message,
            pending,
        } => {
            if pending.is_empty() {
                return;
            }
            live.insert(
                seq,
                Live {
                    segment: current.id,
                    offset,
                    len,
                    queue: Arc::from(queue),
                    pending: pending.into_iter().map(|p| (Name::from(p), 0)).collect(),
                },
            );
            messages.insert(seq, message);
            current.live += 1;
            current.total += 1;
        }
        Body::Relocated {
            queue,
            message,
            pending,
            target,
        } => {
            if let Some(old) = live.remove(&target) {
                if old.segment == current.id {
                    current.live = current.live.saturating_sub(1);
                } else {
                    release(old.segment);
                }
            }
            live.insert(
                target,
                Live {
                    segment: current.id,
                    offset,
                    len,
                    queue: Arc::from(queue),
                    pending: pending
                        .into_iter()
                        .map(|(p, a)| (Name::from(p), a))
                        .collect(),
                },
            );
            messages.insert(target, message);
            current.live += 1;
            current.total += 1;
        }
        Body::Settle {
            subscription,
            target,
            ..
        } => {
            let Some(l) = live.get_mut(&target) else {
                return;
            };
            l.pending.retain(|(s, _)| **s != *subscription);
            if l.pending.is_empty() {
                let segment = l.segment;
                live.remove(&target);
                messages.remove(&target);
                if segment == current.id {
                    current.live = current.live.saturating_sub(1);
                } else {
                    release(segment);
                }
            }
        }
        Body::Attempt {
            subscription,
            target,
            attempts,
            ..
        } => {
            if let Some(l) = live.get_mut(&target)
                && let Some(p) = l.pending.iter_mut().find(|(s, _)| **s == *subscription)
            {
                p.1 = attempts;
            }
        }
        // Kept in the dedup journal, never in segments; floors are read by replay itself.
        Body::Remember { .. } | Body::Floor { .. } => {}
    }
}
