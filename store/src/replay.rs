//! Replay at open: the segments, record by record, rebuilt into what the owner had in memory — per
//! queue the messages it held (with their owing subscriptions and attempts), and for a queue whose
//! newest messages were on disk only, where paging them in goes on.
//!
//! ```text
//!   Message ──▶ held (decoded)            or, in a spilled range, counted only (never decoded)
//!   Settle / Attempt / Relocated ──▶ applied to what is held
//!   Spill ──▶ later sequences are counted only      PagedIn ──▶ read them back, as the owner did
//!   SpillEnd ──▶ held again from here on
//! ```
//!
//! Memory holds one record at a time plus what the owner held: never a whole segment, never the
//! spilled backlog.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::Read,
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use qmesh_proto::v1;

use crate::{
    Position, Recovered, RecoveredSpill, RetainedRun, StoreStats, index,
    pages::{self, Want, segment_path},
    record::{self, Body, published_ms},
};

/// A segment and how many live messages (latest copies still owed) it holds.
#[derive(Debug)]
pub(crate) struct Segment {
    pub id: u64,
    /// Live messages whose latest copy is here.
    pub live: u64,
    /// Message records (and relocated copies) ever written here.
    pub total: u64,
}

/// What replay found.
pub(crate) struct Replayed {
    pub segments: VecDeque<Segment>,
    pub recovered: Vec<Recovered>,
    pub spills: Vec<RecoveredSpill>,
    pub retained: Vec<RetainedRun>,
    pub next_seq: u64,
}

type Name = Arc<str>;

struct Held {
    at: Position,
    /// Read from the segment once replay ends when it came from an index.
    message: Option<v1::Message>,
    published_ms: u64,
    pending: Vec<(Name, u32)>,
}

struct Spilled {
    from: u64,
    cursor: Position,
    paged_through: u64,
    messages: u64,
    bytes: u64,
    by_sub: HashMap<Name, u64>,
}

#[derive(Default)]
struct QueueReplay {
    held: BTreeMap<u64, Held>,
    spill: Option<Spilled>,
}

#[derive(Default)]
struct State {
    queues: HashMap<Name, QueueReplay>,
    /// Spilled (not held) live messages per segment.
    spilled_in: HashMap<u64, u64>,
    totals: HashMap<u64, u64>,
    /// Settled messages whose records are still here, per (queue, segment): (count, bytes, newest
    /// publish time in unix ms).
    settled: HashMap<(Name, u64), (u64, u64, u64)>,
    next_seq: u64,
}

/// Replays the segments `ids` (sorted) of `dir`. A torn or corrupt record ends replay: the segment
/// is truncated there and later segments are set aside as `.dropped`.
pub(crate) fn replay(dir: &Path, ids: &[u64], stats: &StoreStats) -> std::io::Result<Replayed> {
    let mut state = State {
        next_seq: 1,
        ..State::default()
    };
    let mut stop_after: Option<usize> = None;
    let mut replayed = Vec::new();
    let last = ids.last().copied().unwrap_or(0);
    for (n, &id) in ids.iter().enumerate() {
        let path = segment_path(dir, id);
        let mut reader = SegmentReader::open(&path)?;
        if index::usable(dir, id, reader.size)? {
            state.replay_index(dir, last, id, stats)?;
            stats.indexed_segments.fetch_add(1, Ordering::Relaxed);
            replayed.push(id);
            continue;
        }
        // Read whole, and indexed on the way: every segment but the new active one is sealed
        // once the log is open.
        let mut builder = index::Builder::new(dir, id)
            .inspect_err(
                |error| tracing::warn!(%error, segment = %path.display(), "cannot index a segment"),
            )
            .ok();
        loop {
            let pos = reader.pos;
            match reader.next()? {
                Ok(None) => break,
                Ok(Some(raw)) => {
                    let at = Position {
                        segment: id,
                        offset: pos,
                        len: raw.len() as u32,
                    };
                    match state.apply(dir, last, at, raw) {
                        Ok(()) => {
                            stats.recovered_records.fetch_add(1, Ordering::Relaxed);
                            if let Some(b) = builder.as_mut()
                                && let Err(error) = b.add(pos, raw)
                            {
                                tracing::warn!(%error, segment = %path.display(), "cannot index a segment");
                                builder = None;
                            }
                        }
                        Err(error) => {
                            stop(&path, reader.size, pos, error, stats)?;
                            reader.size = pos;
                            stop_after = Some(n);
                            break;
                        }
                    }
                }
                Err(error) => {
                    stop(&path, reader.size, pos, error, stats)?;
                    reader.size = pos;
                    stop_after = Some(n);
                    break;
                }
            }
        }
        match builder.map(|b| b.finish(reader.size)) {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                tracing::warn!(%error, segment = %path.display(), "cannot index a segment");
                index::remove(dir, id);
            }
            None => index::remove(dir, id),
        }
        replayed.push(id);
        if stop_after.is_some() {
            break;
        }
    }
    if let Some(n) = stop_after {
        for &id in &ids[n + 1..] {
            let path = segment_path(dir, id);
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            stats.dropped_bytes.fetch_add(size, Ordering::Relaxed);
            tracing::warn!(segment = %path.display(), "segment after a corrupt record set aside as .dropped");
            let _ = fs::rename(&path, path.with_extension("log.dropped"));
            index::remove(dir, id);
        }
    }
    Ok(state.finish(dir, replayed, stats))
}

fn stop(
    path: &Path,
    size: u64,
    pos: u64,
    error: record::DecodeError,
    stats: &StoreStats,
) -> std::io::Result<()> {
    let dropped = size - pos;
    stats.dropped_bytes.fetch_add(dropped, Ordering::Relaxed);
    tracing::warn!(
        segment = %path.display(), offset = pos, dropped_bytes = dropped, ?error,
        "log replay stopped at a torn or corrupt record; truncating there and keeping everything before"
    );
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(pos)?;
    f.sync_all()
}

impl State {
    fn queue(&mut self, name: &str) -> &mut QueueReplay {
        if !self.queues.contains_key(name) {
            self.queues.insert(Name::from(name), QueueReplay::default());
        }
        self.queues.get_mut(name).expect("inserted above")
    }

    /// A message settled everywhere whose record is at `at`: kept for replay, or released, by the
    /// owner once it knows the queue's policy.
    fn note_settled(&mut self, queue: &str, at: Position, published_ms: u64) {
        let key = match self.queues.get_key_value(queue) {
            Some((name, _)) => (Arc::clone(name), at.segment),
            None => (Name::from(queue), at.segment),
        };
        let run = self.settled.entry(key).or_default();
        run.0 += 1;
        run.1 += u64::from(at.len);
        run.2 = run.2.max(published_ms);
    }

    /// Replays segment `id` from its index (checked whole by [`index::usable`]).
    fn replay_index(
        &mut self,
        dir: &Path,
        last: u64,
        id: u64,
        stats: &StoreStats,
    ) -> std::io::Result<()> {
        let result = index::for_each(dir, id, |entry| {
            stats.recovered_records.fetch_add(1, Ordering::Relaxed);
            match entry {
                index::Entry::Head {
                    offset,
                    len,
                    seq,
                    queue,
                    published_ms,
                    pending,
                } => {
                    let at = Position {
                        segment: id,
                        offset,
                        len,
                    };
                    self.apply_message(at, seq, queue, pending, published_ms, None)
                }
                index::Entry::Record { offset, raw } => {
                    let at = Position {
                        segment: id,
                        offset,
                        len: raw.len() as u32,
                    };
                    self.apply(dir, last, at, raw)
                }
            }
        })?;
        result.map_err(|error| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the index of segment {id} changed while it was replayed: {error:?}"),
            )
        })
    }

    /// A message record at `at` (its bytes `raw` when read from the segment, `None` from an index).
    fn apply_message(
        &mut self,
        at: Position,
        seq: u64,
        queue: &str,
        pending: Vec<&str>,
        published_ms: u64,
        raw: Option<&[u8]>,
    ) -> Result<(), record::DecodeError> {
        // A message numbered u64::MAX leaves no next sequence: no writer makes one.
        if seq == u64::MAX {
            return Err(record::DecodeError::Corrupt("sequence out of range"));
        }
        self.next_seq = self.next_seq.max(seq + 1);
        *self.totals.entry(at.segment).or_default() += 1;
        if pending.is_empty() {
            self.note_settled(queue, at, published_ms);
            return Ok(());
        }
        let q = self.queue(queue);
        if let Some(spill) = q.spill.as_mut()
            && seq >= spill.from
            && seq > spill.paged_through
        {
            spill.messages += 1;
            spill.bytes += u64::from(at.len);
            for p in &pending {
                match spill.by_sub.get_mut(*p) {
                    Some(n) => *n += 1,
                    None => {
                        spill.by_sub.insert(Name::from(*p), 1);
                    }
                }
            }
            *self.spilled_in.entry(at.segment).or_default() += 1;
            return Ok(());
        }
        let message = match raw {
            Some(raw) => match record::decode(raw)? {
                (_, Body::Message { message, .. }, _) => Some(message),
                _ => return Err(record::DecodeError::Corrupt("not a message record")),
            },
            None => None,
        };
        let pending = pending.into_iter().map(|p| (Name::from(p), 0)).collect();
        q.held.insert(
            seq,
            Held {
                at,
                message,
                published_ms,
                pending,
            },
        );
        Ok(())
    }

    fn apply(
        &mut self,
        dir: &Path,
        last: u64,
        at: Position,
        raw: &[u8],
    ) -> Result<(), record::DecodeError> {
        if let Some(head) = record::peek_message(raw)? {
            let published = record::published_ms_of(head.message);
            return self.apply_message(
                at,
                head.seq,
                head.queue,
                head.pending,
                published,
                Some(raw),
            );
        }
        let (_, body, _) = record::decode(raw)?;
        match body {
            Body::Message { .. } => {}
            Body::Relocated {
                queue,
                message,
                pending,
                target,
            } => {
                if target == u64::MAX {
                    return Err(record::DecodeError::Corrupt("sequence out of range"));
                }
                self.next_seq = self.next_seq.max(target + 1);
                *self.totals.entry(at.segment).or_default() += 1;
                let pending = pending
                    .into_iter()
                    .map(|(p, a)| (Name::from(p), a))
                    .collect();
                self.queue(&queue).held.insert(
                    target,
                    Held {
                        at,
                        published_ms: published_ms(&message),
                        message: Some(message),
                        pending,
                    },
                );
            }
            Body::Settle {
                queue,
                subscription,
                target,
                ..
            } => {
                let q = self.queue(&queue);
                if let Some(held) = q.held.get_mut(&target) {
                    held.pending.retain(|(s, _)| **s != *subscription);
                    if held.pending.is_empty()
                        && let Some(done) = q.held.remove(&target)
                    {
                        self.note_settled(&queue, done.at, done.published_ms);
                    }
                }
            }
            Body::Attempt {
                queue,
                subscription,
                target,
                attempts,
            } => {
                if let Some(held) = self.queue(&queue).held.get_mut(&target)
                    && let Some(p) = held.pending.iter_mut().find(|(s, _)| **s == *subscription)
                {
                    p.1 = attempts;
                }
            }
            Body::Floor { next } => self.next_seq = self.next_seq.max(next),
            Body::Spill {
                queue,
                from,
                segment,
                offset,
            } => {
                let q = self.queue(&queue);
                if q.spill.is_none() {
                    q.spill = Some(Spilled {
                        from,
                        cursor: Position {
                            segment,
                            offset,
                            len: 0,
                        },
                        paged_through: from.saturating_sub(1),
                        messages: 0,
                        bytes: 0,
                        by_sub: HashMap::new(),
                    });
                }
            }
            Body::PagedIn {
                queue,
                through,
                segment,
                offset,
            } => self.page_in(dir, last, &queue, through, segment, offset),
            Body::SpillEnd { queue } => {
                let q = self.queue(&queue);
                if let Some(spill) = q.spill.take()
                    && spill.messages > 0
                {
                    // The owner ends a spill only once everything spilled is back in memory;
                    // what replay still counts is read back before the end.
                    tracing::warn!(
                        queue = %queue,
                        messages = spill.messages,
                        "spill ended with messages not yet read back; keeping the spill"
                    );
                    q.spill = Some(spill);
                }
            }
            // Kept in the dedup journal, never in segments.
            Body::Remember { .. } => {}
        }
        Ok(())
    }

    /// Reads spilled messages of `queue` back, as the owner did when it wrote the `PagedIn` record.
    fn page_in(
        &mut self,
        dir: &Path,
        last: u64,
        queue: &str,
        through: u64,
        segment: u64,
        offset: u64,
    ) {
        let until = Position {
            segment,
            offset,
            len: 0,
        };
        let Some(spill) = self.queues.get(queue).and_then(|q| q.spill.as_ref()) else {
            return;
        };
        let want = Want {
            queue,
            after: spill.paged_through,
            below: through.saturating_add(1),
            until: Some(until),
            max_bytes: usize::MAX,
            everything: false,
        };
        let page = match pages::read(dir, spill.cursor, last, want) {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, queue, "could not read spilled messages back during replay");
                return;
            }
        };
        let mut moved = Vec::new();
        let q = self.queue(queue);
        for paged in page.messages {
            if q.held.contains_key(&paged.sequence) {
                continue;
            }
            if let Some(spill) = q.spill.as_mut() {
                spill.messages = spill.messages.saturating_sub(1);
                spill.bytes = spill.bytes.saturating_sub(u64::from(paged.at.len));
                for p in &paged.pending {
                    if let Some(n) = spill.by_sub.get_mut(p.as_str()) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
            moved.push(paged.at.segment);
            let pending = paged
                .pending
                .into_iter()
                .map(|p| (Name::from(p), 0))
                .collect();
            q.held.insert(
                paged.sequence,
                Held {
                    at: paged.at,
                    published_ms: published_ms(&paged.message),
                    message: Some(paged.message),
                    pending,
                },
            );
        }
        if let Some(spill) = q.spill.as_mut() {
            spill.paged_through = spill.paged_through.max(through);
            spill.cursor = until;
        }
        for segment in moved {
            if let Some(n) = self.spilled_in.get_mut(&segment) {
                *n = n.saturating_sub(1);
            }
        }
    }

    fn finish(self, dir: &Path, replayed: Vec<u64>, stats: &StoreStats) -> Replayed {
        let mut live: HashMap<u64, u64> = self.spilled_in;
        let mut retained: Vec<RetainedRun> = self
            .settled
            .into_iter()
            .map(|((queue, segment), (messages, bytes, newest_ms))| {
                *live.entry(segment).or_default() += messages;
                RetainedRun {
                    queue: queue.to_string(),
                    segment,
                    messages,
                    bytes,
                    newest_ms,
                }
            })
            .collect();
        retained.sort_by(|a, b| (a.segment, &a.queue).cmp(&(b.segment, &b.queue)));
        let mut recovered = Vec::new();
        let mut spills = Vec::new();
        let mut segments = Segments::new(dir);
        for (queue, q) in self.queues {
            for (sequence, held) in q.held {
                let message = match held.message {
                    Some(message) => message,
                    None => match segments.message_at(held.at) {
                        Ok(message) => message,
                        Err(error) => {
                            stats
                                .dropped_bytes
                                .fetch_add(u64::from(held.at.len), Ordering::Relaxed);
                            tracing::error!(
                                %error, queue = %queue, sequence, segment = held.at.segment,
                                offset = held.at.offset,
                                "a message its segment's index names could not be read back; it is lost"
                            );
                            continue;
                        }
                    },
                };
                *live.entry(held.at.segment).or_default() += 1;
                recovered.push(Recovered {
                    queue: queue.to_string(),
                    sequence,
                    at: held.at,
                    message,
                    pending: held
                        .pending
                        .into_iter()
                        .map(|(s, a)| (s.to_string(), a))
                        .collect(),
                });
            }
            if let Some(s) = q.spill {
                let mut by_subscription: Vec<(String, u64)> = s
                    .by_sub
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(s, n)| (s.to_string(), n))
                    .collect();
                by_subscription.sort();
                spills.push(RecoveredSpill {
                    queue: queue.to_string(),
                    from: s.from,
                    cursor: s.cursor,
                    paged_through: s.paged_through,
                    messages: s.messages,
                    bytes: s.bytes,
                    by_subscription,
                });
            }
        }
        recovered.sort_by_key(|r| r.sequence);
        spills.sort_by(|a, b| a.queue.cmp(&b.queue));
        let segments = replayed
            .into_iter()
            .map(|id| Segment {
                id,
                live: live.get(&id).copied().unwrap_or(0),
                total: self.totals.get(&id).copied().unwrap_or(0),
            })
            .collect();
        Replayed {
            segments,
            recovered,
            spills,
            retained,
            next_seq: self.next_seq,
        }
    }
}

/// Reads single records back by position (held messages replayed from an index), keeping the
/// last segment file open.
struct Segments<'a> {
    dir: &'a Path,
    open: Option<(u64, File)>,
    buf: Vec<u8>,
}

impl<'a> Segments<'a> {
    fn new(dir: &'a Path) -> Self {
        Self {
            dir,
            open: None,
            buf: Vec::new(),
        }
    }

    fn message_at(&mut self, at: Position) -> std::io::Result<v1::Message> {
        use std::os::unix::fs::FileExt;
        let file = match &self.open {
            Some((id, file)) if *id == at.segment => file,
            _ => {
                let file = File::open(segment_path(self.dir, at.segment))?;
                &self.open.insert((at.segment, file)).1
            }
        };
        self.buf.resize(at.len as usize, 0);
        file.read_exact_at(&mut self.buf, at.offset)?;
        match record::decode(&self.buf) {
            Ok((_, Body::Message { message, .. } | Body::Relocated { message, .. }, _)) => {
                Ok(message)
            }
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a message record",
            )),
            Err(error) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{error:?}"),
            )),
        }
    }
}

/// What [`SegmentReader::next`] finds: a record's bytes, the clean end (`None`), or where the good
/// data ends.
type Next<'a> = Result<Option<&'a [u8]>, record::DecodeError>;

/// Reads a segment file record by record, holding one record at a time.
pub(crate) struct SegmentReader {
    file: std::io::BufReader<File>,
    buf: Vec<u8>,
    pub size: u64,
    pub pos: u64,
}

impl SegmentReader {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file: std::io::BufReader::with_capacity(256 * 1024, file),
            buf: Vec::new(),
            size,
            pos: 0,
        })
    }

    /// The next record's bytes (`None` at the clean end), or where the good data ends.
    pub fn next(&mut self) -> std::io::Result<Next<'_>> {
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
        self.pos += self.buf.len() as u64;
        Ok(Ok(Some(&self.buf)))
    }
}
