//! The durable message log behind `durability: Disk`: what makes "an acknowledged publish is never
//! lost" true.
//!
//! ```text
//!   append ──▶ bounded channel ──▶ writer thread: one write + one fsync per batch (group commit)
//!   settle / attempt ──▶ side buffer ─┘        │
//!                                               ▼
//!   data-dir/log/00000000000000000001.log, …002.log …  (segments, rolled at --segment-bytes)
//!                                               │
//!   restart ──▶ replay (stop at first torn/corrupt record, truncate, keep what is before) ──▶ Recovered
//! ```
//!
//! The sidecar's delivery engine keeps its working state in memory and writes through this log (its
//! `OwnerLog` trait); the log keeps a small index (sequence → segment, owing subscriptions) so it
//! can delete a segment once everything in it and before it is settled, and copy the few live
//! messages of an old segment forward (compaction) so replay stays bounded.

pub mod dedup;
mod disk;
mod index;
mod pages;
pub mod record;
mod replay;

pub use disk::{DiskLog, FsyncPolicy, StoreConfig, StoreStats};
pub use pages::{Page, Paged};

use qmesh_proto::v1;

/// Why the log did not take a write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The record would exceed [`record::MAX_RECORD`].
    #[error("a record of {size} bytes exceeds the log's limit of {limit} bytes")]
    TooLarge {
        /// Framed size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The disk holding the log is full; nothing of the write is kept.
    #[error(
        "the disk holding the message log ({dir}) is full: {error}; publishes are refused until settled messages free space"
    )]
    DiskFull {
        /// The log directory.
        dir: String,
        /// The operating system's words.
        error: String,
    },
    /// The write or fsync failed (an I/O error); nothing of it is kept.
    #[error("could not persist the message: {0}")]
    Io(String),
    /// The writer thread is gone.
    #[error("the log writer stopped")]
    Stopped,
}

/// How a subscription finished with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A consumer acknowledged it.
    Acked,
    /// Moved to the dead-letter queue (or dropped by retention).
    DeadLettered,
}

/// Where a record is in the log: its segment, offset and framed length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Segment id (the file name's number).
    pub segment: u64,
    /// Byte offset of the record in the segment.
    pub offset: u64,
    /// Framed length of the record.
    pub len: u32,
}

impl Position {
    /// The position just after this record.
    pub fn end(self) -> Self {
        Self {
            segment: self.segment,
            offset: self.offset.saturating_add(u64::from(self.len)),
            len: 0,
        }
    }
}

/// A message recovered from the log at start.
#[derive(Clone, Debug)]
pub struct Recovered {
    /// Queue it was published to.
    pub queue: String,
    /// Its sequence.
    pub sequence: u64,
    /// Where its latest copy is.
    pub at: Position,
    /// The message, `publish_time` set.
    pub message: v1::Message,
    /// Subscriptions that still owe an ack, with delivery attempts so far.
    pub pending: Vec<(String, u32)>,
}

/// A message id remembered for de-duplication, recovered at start.
#[derive(Clone, Debug)]
pub struct Remembered {
    /// Queue it was published to.
    pub queue: String,
    /// The message id.
    pub id: String,
    /// The message's sequence.
    pub sequence: u64,
    /// When the queue's dedup window for it ends.
    pub until: std::time::SystemTime,
}

/// A queue whose newest messages were on disk only (spilled) at the last stop, recovered at start:
/// the owner goes on paging them in from `cursor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredSpill {
    /// Queue.
    pub queue: String,
    /// First spilled sequence.
    pub from: u64,
    /// Where the next page-in reads from.
    pub cursor: Position,
    /// Highest sequence already paged in.
    pub paged_through: u64,
    /// Spilled messages not yet paged in.
    pub messages: u64,
    /// Their record bytes.
    pub bytes: u64,
    /// Per owing subscription, how many of them it owes.
    pub by_subscription: Vec<(String, u64)>,
}

/// Settled messages of one queue in one segment, found at open: the owner keeps them for replay
/// (`retention.keepAcked`) or releases them, with [`DiskLog::release_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRun {
    /// Queue.
    pub queue: String,
    /// The segment their records are in.
    pub segment: u64,
    /// How many.
    pub messages: u64,
    /// Their record bytes.
    pub bytes: u64,
    /// Unix milliseconds of the newest publish time among them.
    pub newest_ms: u64,
}
