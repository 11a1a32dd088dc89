//! What the owner persists, behind a small trait: the delivery engine keeps its working state in
//! memory — within a budget — and writes through this log so that a restart rebuilds exactly the
//! state before it.
//!
//! ```text
//!   append ──(queued at the call, in call order)──▶ durable ──▶ Position
//!   settle / attempted / remember ──▶ written behind the appends, not awaited
//!   spill ▸ read_spilled ▸ paged_in ▸ spill_end ──▶ a queue's newest messages kept on disk only
//!   release(position) ──▶ the log may delete what nothing owes any more; relocate copies a
//!                          long-lived message forward so its old segment can go
//!   read_retained ──▶ every message still in the log, settled or not: a replay's scan
//! ```
//!
//! Losing the last settlements in a crash means a redelivery, never a lost message (at-least-once).

use std::sync::Arc;

use futures::future::BoxFuture;
use qmesh_proto::v1;

use crate::error::BrokerError;

pub use qmesh_store::{
    Outcome, Page, Paged, Position, Recovered, RecoveredSpill, Remembered, RetainedRun,
};

/// A record on its way to the log: resolves, with where it is, once durable.
pub type Written = BoxFuture<'static, Result<Position, BrokerError>>;

/// The owner's durable record.
pub trait OwnerLog: Send + Sync + 'static {
    /// Persists message `sequence` (assigned by the owner, see [`OwnerLog::next_sequence`]) owed to
    /// `pending` subscriptions. The record is queued when this is called — calls made in sequence
    /// order are written in sequence order — and the future resolves once it is durable.
    fn append(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> Written;

    /// The first sequence never used by a message in this log: the owner numbers new messages from
    /// here, in the order they were published (which is what makes per-key order hold).
    fn next_sequence(&self) -> u64 {
        1
    }

    /// Records that `subscription` is done with `sequence`.
    fn settle(&self, queue: &str, subscription: &str, sequence: u64, outcome: Outcome);

    /// Records a delivery attempt (so a restart does not reset `maxDeliveries` counting).
    fn attempted(&self, queue: &str, subscription: &str, sequence: u64, attempts: u32);

    /// What the owner held in memory, in sequence order, as of the last start.
    fn recover(&self) -> Vec<Recovered>;

    /// Remembers a stored message's id until `until` (its queue's dedup window), so a retry after
    /// a restart is still recognised once the message itself is settled and gone. Recorded before
    /// any later settlement of the message.
    fn remember(&self, _queue: &str, _id: &str, _sequence: u64, _until: std::time::SystemTime) {}

    /// Ids remembered and not yet expired, as of the last start.
    fn recover_remembered(&self) -> Vec<Remembered> {
        Vec::new()
    }

    /// Whether messages can be kept on disk only and read back (spilled): false for memory.
    fn pages(&self) -> bool {
        false
    }

    /// Nothing owes the message recorded at `at` any more.
    fn release(&self, _at: Position) {}

    /// Messages of `queue` from sequence `from` on are kept on disk only, readable from `cursor`.
    fn spill(&self, _queue: &str, _from: u64, _cursor: Position) {}

    /// Spilled messages of `queue` through `through` are back in memory; the next read starts at
    /// `resume`.
    fn paged_in(&self, _queue: &str, _through: u64, _resume: Position) {}

    /// Every spilled message of `queue` is back in memory.
    fn spill_end(&self, _queue: &str) {}

    /// Reads spilled messages of `queue` back (blocking file reads): sequences above `after`, up to
    /// the first at or above `below`, about `max_bytes` of them.
    fn read_spilled(
        &self,
        _queue: &str,
        _cursor: Position,
        _after: u64,
        _below: u64,
        _max_bytes: usize,
    ) -> Result<Page, BrokerError> {
        Ok(Page {
            at_end: true,
            ..Page::default()
        })
    }

    /// Queues whose newest messages were on disk only, as of the last start.
    fn recover_spills(&self) -> Vec<RecoveredSpill> {
        Vec::new()
    }

    /// Messages whose record is in a segment below this one should be relocated.
    fn relocation_target(&self) -> Option<u64> {
        None
    }

    /// The log's counters (disk logs only).
    fn stats(&self) -> Option<Arc<qmesh_store::StoreStats>> {
        None
    }

    /// Reads every message of `queue` still in the log, settled or not, from `cursor` (the
    /// oldest segment when `None`), up to the first numbered `below` or about `max_bytes` (blocking
    /// file reads): a replay's scan.
    fn read_retained(
        &self,
        _queue: &str,
        _cursor: Option<Position>,
        _below: u64,
        _max_bytes: usize,
    ) -> Result<Page, BrokerError> {
        Ok(Page {
            at_end: true,
            ..Page::default()
        })
    }

    /// Settled messages still in the log at the last start, per queue and segment: each run is
    /// kept (`retention.keepAcked`) or handed back with [`OwnerLog::release_run`].
    fn recover_retained(&self) -> Vec<RetainedRun> {
        Vec::new()
    }

    /// Nothing needs `messages` settled records in `segment` any more.
    fn release_run(&self, segment: u64, messages: u64) {
        for _ in 0..messages {
            self.release(Position {
                segment,
                offset: 0,
                len: 0,
            });
        }
    }

    /// Replaces the owner's small state file (what it remembers beside the log).
    fn save_state(&self, _bytes: &[u8]) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The owner's state file as last saved.
    fn load_state(&self) -> Option<Vec<u8>> {
        None
    }

    /// Writes a fresh copy of a live message with its owing subscriptions and attempts.
    fn relocate(
        &self,
        _queue: &str,
        _sequence: u64,
        _message: &Arc<v1::Message>,
        _pending: Vec<(String, u32)>,
    ) -> Written {
        Box::pin(async { Err(BrokerError::Internal("this log does not relocate".into())) })
    }
}

/// `durability: Memory`: nothing is written and nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryLog;

impl OwnerLog for MemoryLog {
    fn append(&self, _: &str, _: u64, _: &Arc<v1::Message>, _: &[String]) -> Written {
        Box::pin(async { Ok(Position::default()) })
    }

    fn settle(&self, _: &str, _: &str, _: u64, _: Outcome) {}

    fn attempted(&self, _: &str, _: &str, _: u64, _: u32) {}

    fn recover(&self) -> Vec<Recovered> {
        Vec::new()
    }
}

impl From<qmesh_store::StoreError> for BrokerError {
    fn from(error: qmesh_store::StoreError) -> Self {
        match error {
            qmesh_store::StoreError::DiskFull { .. } => Self::DiskFull(error.to_string()),
            _ => Self::Storage(error.to_string()),
        }
    }
}

/// The owner's state file beside the log: subscriptions served and replays running, per queue.
pub const OWNER_STATE: &str = "owner.state";

/// `durability: Disk`: the log in the data directory.
impl OwnerLog for qmesh_store::DiskLog {
    fn append(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> Written {
        let written = qmesh_store::DiskLog::append(self, queue, sequence, message, pending);
        Box::pin(async move { Ok(written.await?) })
    }

    fn next_sequence(&self) -> u64 {
        qmesh_store::DiskLog::next_sequence(self)
    }

    fn settle(&self, queue: &str, subscription: &str, sequence: u64, outcome: Outcome) {
        qmesh_store::DiskLog::settle(self, queue, subscription, sequence, outcome);
    }

    fn attempted(&self, queue: &str, subscription: &str, sequence: u64, attempts: u32) {
        qmesh_store::DiskLog::attempted(self, queue, subscription, sequence, attempts);
    }

    fn recover(&self) -> Vec<Recovered> {
        qmesh_store::DiskLog::recover(self)
    }

    fn remember(&self, queue: &str, id: &str, sequence: u64, until: std::time::SystemTime) {
        qmesh_store::DiskLog::remember(self, queue, id, sequence, until);
    }

    fn recover_remembered(&self) -> Vec<Remembered> {
        qmesh_store::DiskLog::recover_remembered(self)
    }

    fn pages(&self) -> bool {
        true
    }

    fn release(&self, at: Position) {
        qmesh_store::DiskLog::release(self, at);
    }

    fn spill(&self, queue: &str, from: u64, cursor: Position) {
        qmesh_store::DiskLog::spill(self, queue, from, cursor);
    }

    fn paged_in(&self, queue: &str, through: u64, resume: Position) {
        qmesh_store::DiskLog::paged_in(self, queue, through, resume);
    }

    fn spill_end(&self, queue: &str) {
        qmesh_store::DiskLog::spill_end(self, queue);
    }

    fn read_spilled(
        &self,
        queue: &str,
        cursor: Position,
        after: u64,
        below: u64,
        max_bytes: usize,
    ) -> Result<Page, BrokerError> {
        qmesh_store::DiskLog::read_spilled(self, queue, cursor, after, below, max_bytes)
            .map_err(|e| BrokerError::Storage(format!("could not read spilled messages back: {e}")))
    }

    fn recover_spills(&self) -> Vec<RecoveredSpill> {
        qmesh_store::DiskLog::recover_spills(self)
    }

    fn relocation_target(&self) -> Option<u64> {
        qmesh_store::DiskLog::relocation_target(self)
    }

    fn read_retained(
        &self,
        queue: &str,
        cursor: Option<Position>,
        below: u64,
        max_bytes: usize,
    ) -> Result<Page, BrokerError> {
        qmesh_store::DiskLog::read_retained(self, queue, cursor, below, max_bytes)
            .map_err(|e| BrokerError::Storage(format!("could not read the log for a replay: {e}")))
    }

    fn recover_retained(&self) -> Vec<RetainedRun> {
        qmesh_store::DiskLog::recover_retained(self)
    }

    fn release_run(&self, segment: u64, messages: u64) {
        qmesh_store::DiskLog::release_run(self, segment, messages);
    }

    fn save_state(&self, bytes: &[u8]) -> Result<(), BrokerError> {
        qmesh_store::DiskLog::save_state(self, OWNER_STATE, bytes)
            .map_err(|e| BrokerError::Storage(format!("could not save {OWNER_STATE}: {e}")))
    }

    fn load_state(&self) -> Option<Vec<u8>> {
        match qmesh_store::DiskLog::load_state(self, OWNER_STATE) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::error!(%error, "could not read {OWNER_STATE}; replays and known subscriptions start afresh");
                None
            }
        }
    }

    fn stats(&self) -> Option<Arc<qmesh_store::StoreStats>> {
        Some(qmesh_store::DiskLog::stats(self))
    }

    fn relocate(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: Vec<(String, u32)>,
    ) -> Written {
        let written = qmesh_store::DiskLog::relocate(self, queue, sequence, message, pending);
        Box::pin(async move { Ok(written.await?) })
    }
}
