//! What the owner persists, behind a small trait: the delivery engine keeps its working state in
//! memory and writes through this log so that a restart rebuilds exactly the state before it.
//!
//! `append` resolves once the message is durable (per the log's fsync policy); settlements are
//! written in order behind it but not awaited: losing the last settlements in a crash means a
//! redelivery, never a lost message (at-least-once).

use std::sync::Arc;

use qmesh_proto::v1;

use crate::error::BrokerError;

pub use qmesh_store::{Outcome, Recovered, Remembered};

/// The owner's durable record.
#[tonic::async_trait]
pub trait OwnerLog: Send + Sync + 'static {
    /// Persists message `sequence` (assigned by the owner, see [`OwnerLog::next_sequence`]) owed to
    /// `pending` subscriptions; resolves once it is durable.
    async fn append(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> Result<(), BrokerError>;

    /// The first sequence never used by a message in this log: the owner numbers new messages from
    /// here, in the order they were published (which is what makes per-key order hold).
    fn next_sequence(&self) -> u64 {
        1
    }

    /// Records that `subscription` is done with `sequence`.
    fn settle(&self, queue: &str, subscription: &str, sequence: u64, outcome: Outcome);

    /// Records a delivery attempt (so a restart does not reset `maxDeliveries` counting).
    fn attempted(&self, queue: &str, subscription: &str, sequence: u64, attempts: u32);

    /// Everything unsettled, in sequence order, as of the last start.
    fn recover(&self) -> Vec<Recovered>;

    /// Remembers a stored message's id until `until` (its queue's dedup window), so a retry after
    /// a restart is still recognised once the message itself is settled and gone. Recorded before
    /// any later settlement of the message.
    fn remember(&self, _queue: &str, _id: &str, _sequence: u64, _until: std::time::SystemTime) {}

    /// Ids remembered and not yet expired, as of the last start.
    fn recover_remembered(&self) -> Vec<Remembered> {
        Vec::new()
    }
}

/// `durability: Memory`: nothing is written and nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryLog;

#[tonic::async_trait]
impl OwnerLog for MemoryLog {
    async fn append(
        &self,
        _: &str,
        _: u64,
        _: &Arc<v1::Message>,
        _: &[String],
    ) -> Result<(), BrokerError> {
        Ok(())
    }

    fn settle(&self, _: &str, _: &str, _: u64, _: Outcome) {}

    fn attempted(&self, _: &str, _: &str, _: u64, _: u32) {}

    fn recover(&self) -> Vec<Recovered> {
        Vec::new()
    }
}

impl From<qmesh_store::StoreError> for BrokerError {
    fn from(error: qmesh_store::StoreError) -> Self {
        Self::Storage(error.to_string())
    }
}

/// `durability: Disk`: the log in the data directory.
#[tonic::async_trait]
impl OwnerLog for qmesh_store::DiskLog {
    async fn append(
        &self,
        queue: &str,
        sequence: u64,
        message: &Arc<v1::Message>,
        pending: &[String],
    ) -> Result<(), BrokerError> {
        Ok(qmesh_store::DiskLog::append(self, queue, sequence, message, pending).await?)
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
}
