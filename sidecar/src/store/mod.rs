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
//! The delivery engine keeps its working state in memory ([`crate::owner::queue`]) and writes through
//! this log ([`crate::owner::log::OwnerLog`]); the log keeps a small index (sequence → segment, owing
//! subscriptions) so it can delete a segment once everything in it and before it is settled, and
//! copy the few live messages of an old segment forward (compaction) so replay stays bounded.

pub mod dedup;
mod disk;
pub mod record;

pub use disk::{DiskLog, FsyncPolicy, StoreConfig, StoreStats};
