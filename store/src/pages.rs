//! Reading spilled messages back: one queue's message records, in log order, from a position on.
//!
//! ```text
//!   cursor ──▶ segment N from offset … end ──▶ segment N+1 from 0 … ──▶ stop at: max bytes, a
//!   sequence not yet completed (below), the position the caller names (until), or the end of data
//! ```
//!
//! Sequential reads through a large buffer: the read-ahead of a backlog's head. Other queues'
//! records and settlement records are passed over without decoding their messages.

use std::{
    fs::File,
    io::{BufReader, ErrorKind, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use qmesh_proto::v1;

use crate::{Position, record};

/// Spilled messages read back, and where the next read starts.
#[derive(Debug, Default)]
pub struct Page {
    /// Messages of the queue, in sequence order.
    pub messages: Vec<Paged>,
    /// Where the next read starts.
    pub resume: Position,
    /// Bytes read from the log (every record passed over counts).
    pub bytes_read: u64,
    /// The read reached the end of what is written.
    pub at_end: bool,
    /// The read stopped at a message numbered at or above what was asked for.
    pub stopped: bool,
}

/// One message read back.
#[derive(Debug)]
pub struct Paged {
    /// Sequence.
    pub sequence: u64,
    /// Where its record is.
    pub at: Position,
    /// The message.
    pub message: v1::Message,
    /// Subscriptions that owe an ack (as published, or as relocated).
    pub pending: Vec<String>,
    /// A relocated copy (the original, if its segment is still there, was read before it).
    pub copy: bool,
}

/// What to read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want<'a> {
    pub queue: &'a str,
    /// Only sequences above this.
    pub after: u64,
    /// Stop at the first message of the queue with a sequence at or above this.
    pub below: u64,
    /// Stop at this position (exclusive).
    pub until: Option<Position>,
    /// Stop once this many message bytes are read.
    pub max_bytes: usize,
    /// Every message of the queue, settled or not, and relocated copies too (a replay's scan);
    /// otherwise only messages owed to someone as published (a spill's page-in).
    pub everything: bool,
}

pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

/// Reads `want` from `from` on, through segments up to `last`.
pub(crate) fn read(dir: &Path, from: Position, last: u64, want: Want<'_>) -> std::io::Result<Page> {
    let mut page = Page {
        resume: Position { len: 0, ..from },
        ..Page::default()
    };
    let mut taken = 0usize;
    let mut segment = from.segment;
    let mut offset = from.offset;
    let mut buf = Vec::new();
    while segment <= last {
        let file = match File::open(segment_path(dir, segment)) {
            Ok(f) => f,
            // Deleted by garbage collection: nothing of the queue is left in it.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let Some(next) = segment.checked_add(1) else {
                    break;
                };
                segment = next;
                offset = 0;
                page.resume = Position {
                    segment,
                    offset,
                    len: 0,
                };
                continue;
            }
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(1024 * 1024, file);
        reader.seek(SeekFrom::Start(offset))?;
        loop {
            let at = Position {
                segment,
                offset,
                len: 0,
            };
            if want.until.is_some_and(|u| at >= u) {
                page.resume = at;
                return Ok(page);
            }
            if size.saturating_sub(offset) < record::HEADER as u64 {
                break;
            }
            buf.resize(record::HEADER, 0);
            reader.read_exact(&mut buf)?;
            let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if !(9..=record::MAX_RECORD).contains(&len)
                || size - offset < (record::HEADER + len) as u64
            {
                // A record still being written (or a corrupt tail replay will deal with).
                page.resume = at;
                page.at_end = segment >= last;
                return Ok(page);
            }
            buf.resize(record::HEADER + len, 0);
            reader.read_exact(&mut buf[record::HEADER..])?;
            page.bytes_read += buf.len() as u64;
            let at = Position {
                len: buf.len() as u32,
                ..at
            };
            let Ok(head) = record::peek_message(&buf) else {
                page.resume = Position { len: 0, ..at };
                page.at_end = segment >= last;
                return Ok(page);
            };
            if head.is_none() && want.everything {
                if let Ok((
                    _,
                    record::Body::Relocated {
                        queue,
                        message,
                        pending,
                        target,
                    },
                    _,
                )) = record::decode(&buf)
                    && queue == want.queue
                    && target > want.after
                    && target < want.below
                {
                    taken += buf.len();
                    page.messages.push(Paged {
                        sequence: target,
                        at,
                        message,
                        pending: pending.into_iter().map(|(s, _)| s).collect(),
                        copy: true,
                    });
                }
            } else if let Some(head) = head
                && head.queue == want.queue
                && (want.everything || !head.pending.is_empty())
            {
                if head.seq >= want.below {
                    page.resume = Position { len: 0, ..at };
                    page.stopped = true;
                    return Ok(page);
                }
                if head.seq > want.after
                    && let Ok((_, record::Body::Message { message, .. }, _)) = record::decode(&buf)
                {
                    taken += buf.len();
                    page.messages.push(Paged {
                        sequence: head.seq,
                        at,
                        message,
                        pending: head.pending.iter().map(|s| (*s).to_owned()).collect(),
                        copy: false,
                    });
                }
            }
            offset += buf.len() as u64;
            page.resume = Position {
                segment,
                offset,
                len: 0,
            };
            if taken >= want.max_bytes {
                return Ok(page);
            }
        }
        if segment >= last {
            page.at_end = true;
            return Ok(page);
        }
        segment = segment.saturating_add(1);
        offset = 0;
        page.resume = Position {
            segment,
            offset,
            len: 0,
        };
    }
    page.at_end = true;
    Ok(page)
}
