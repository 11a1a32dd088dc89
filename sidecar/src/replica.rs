//! The replica side of `publishAck: Replicated`: standby copies of other owners' messages, kept
//! apart from this sidecar's own log, and adopted when their owner is gone.
//!
//! ```text
//!   owner ══Replicate: owner id, ReplicaBatch…, SettledRange…══▶ serve ──▶ ReplicaStore::accept
//!         ◀══ReplicateAck{durable_through}, one per batch, once persisted══   (data-dir/replicas/<owner>/,
//!                                                                           a DiskLog per owner)
//!   SettledRange ──▶ ReplicaStore::settle (copies dropped, their segments collected)
//!   watch (every 500 ms): owner left the view, or no stream and its address refuses connections
//!     for --replica-adopt-after ──▶ Owner::adopt (own log, new sequences, attempts kept) ──▶ copies dropped
//! ```
//!
//! Copies are numbered in the per-owner log by this sidecar (the owner's sequence travels in a
//! header, [`OWNER_SEQUENCE`]), so an owner that restarts without its disk and numbers from 1 again
//! cannot collide with older copies. Everything is bounded by `--max-replica-bytes`: a batch that
//! would exceed it resets the stream with "replica storage full"; the owner's publishes then fail
//! with UNAVAILABLE rather than anything growing without limit.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::join_all;
use qmesh_proto::{
    control,
    peer::{self, ReplicaBatch, SettledRange},
    v1,
};
use tonic::Status;

use crate::{
    metrics::Metrics,
    owner::{Owner, log::Outcome, replicas::REFUSED_QUEUE},
    store::{DiskLog, FsyncPolicy, StoreConfig},
    view::ViewRx,
};

/// Most owners whose copies one replica keeps (each has its own log).
pub const MAX_OWNERS: usize = 1024;

/// Header carrying the owner's sequence of a copy inside the replica's log (removed on load).
pub const OWNER_SEQUENCE: &str = "qmesh-replica-owner-sequence";

/// Settings of the replica store.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// `data-dir/replicas`; `None` keeps copies in memory only (tests, tools).
    pub dir: Option<PathBuf>,
    /// Fsync policy of the per-owner logs (the sidecar's `--fsync`).
    pub fsync: FsyncPolicy,
    /// Segment size of the per-owner logs.
    pub segment_bytes: u64,
    /// Most bytes of copies over all owners.
    pub max_bytes: u64,
    /// Adopt an owner's copies after it has been unreachable this long.
    pub adopt_after: Duration,
}

/// One standby copy.
#[derive(Clone, Debug)]
struct Copy {
    queue: String,
    message: Arc<v1::Message>,
    pending: Vec<(String, u32)>,
    size: u64,
    /// Sequence in the per-owner log (`None`: memory only).
    local: Option<(u64, qmesh_store::Position)>,
}

#[derive(Default)]
struct OwnerCopies {
    log: Option<Arc<DiskLog>>,
    /// By the owner's sequence.
    copies: BTreeMap<u64, Copy>,
    /// Replicate streams open from this owner.
    streams: usize,
    /// Since when its address refuses connections (no stream open).
    unreachable_since: Option<Instant>,
}

/// Standby copies of other owners' messages.
pub struct ReplicaStore {
    config: ReplicaConfig,
    view: ViewRx,
    metrics: Arc<Metrics>,
    owners: Mutex<HashMap<String, OwnerCopies>>,
    bytes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore").finish_non_exhaustive()
    }
}

/// Whether `name` may name an owner (and its directory): a Kubernetes-style name.
pub fn valid_owner_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn message_size(m: &v1::Message) -> u64 {
    crate::owner::queue::message_size(m)
}

/// Drops [`OWNER_SEQUENCE`] from a recovered copy and returns it.
fn owner_sequence(message: &mut v1::Message) -> Option<u64> {
    message.headers.remove(OWNER_SEQUENCE)?.parse().ok()
}

/// RAII count of an open stream from an owner.
pub struct StreamGuard {
    store: Arc<ReplicaStore>,
    owner: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut owners = self.store.lock();
        if let Some(o) = owners.get_mut(&self.owner) {
            o.streams = o.streams.saturating_sub(1);
            o.unreachable_since = None;
        }
        self.store.forget_if_idle(&mut owners, &self.owner);
    }
}

impl ReplicaStore {
    /// Opens the store, reloading every owner's copies from `config.dir`.
    pub fn open(
        config: ReplicaConfig,
        view: ViewRx,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Self>> {
        let mut owners = HashMap::new();
        let mut total = 0;
        if let Some(dir) = &config.dir {
            std::fs::create_dir_all(dir)?;
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !entry.file_type()?.is_dir() || !valid_owner_name(&name) {
                    tracing::warn!(file = %name, "ignoring a file in the replica directory");
                    continue;
                }
                let log = Arc::new(DiskLog::open(Self::log_config(&config, &name))?);
                let mut copies = BTreeMap::new();
                for mut rec in log.recover() {
                    let Some(seq) = owner_sequence(&mut rec.message) else {
                        tracing::warn!(owner = %name, local = rec.sequence, "replica copy without the owner's sequence; dropped");
                        for (sub, _) in &rec.pending {
                            log.settle(&rec.queue, sub, rec.sequence, Outcome::Acked);
                        }
                        log.release(rec.at);
                        continue;
                    };
                    let size = message_size(&rec.message);
                    total += size;
                    copies.insert(
                        seq,
                        Copy {
                            queue: rec.queue,
                            message: Arc::new(rec.message),
                            pending: rec.pending,
                            size,
                            local: Some((rec.sequence, rec.at)),
                        },
                    );
                }
                if !copies.is_empty() {
                    tracing::info!(owner = %name, copies = copies.len(), "recovered standby copies");
                }
                owners.insert(
                    name,
                    OwnerCopies {
                        log: Some(log),
                        copies,
                        streams: 0,
                        unreachable_since: None,
                    },
                );
            }
        }
        metrics.replica_bytes.set(total as i64);
        Ok(Arc::new(Self {
            config,
            view,
            metrics,
            owners: Mutex::new(owners),
            bytes: std::sync::atomic::AtomicU64::new(total),
        }))
    }

    fn log_config(config: &ReplicaConfig, owner: &str) -> StoreConfig {
        let dir = config.dir.clone().unwrap_or_default().join(owner);
        let mut c = StoreConfig::new(dir);
        c.fsync = config.fsync;
        c.segment_bytes = config.segment_bytes.min(64 * 1024 * 1024);
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, OwnerCopies>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of copies held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Copies held for `owner`.
    pub fn count(&self, owner: &str) -> usize {
        self.lock().get(owner).map_or(0, |o| o.copies.len())
    }

    fn add_bytes(&self, delta: i64) {
        use std::sync::atomic::Ordering::SeqCst;
        if delta >= 0 {
            self.bytes.fetch_add(delta as u64, SeqCst);
        } else {
            self.bytes.fetch_sub(delta.unsigned_abs(), SeqCst);
        }
        self.metrics.replica_bytes.set(self.bytes() as i64);
    }

    /// Forgets an owner with no stream open and no copy kept: its slot, its log and its directory
    /// go, so a sidecar that outlives many owner pods keeps room for new ones.
    fn forget_if_idle(&self, owners: &mut HashMap<String, OwnerCopies>, owner: &str) {
        if !owners
            .get(owner)
            .is_some_and(|o| o.streams == 0 && o.copies.is_empty())
        {
            return;
        }
        let had_log = owners.remove(owner).is_some_and(|o| o.log.is_some());
        if had_log && let Some(dir) = &self.config.dir {
            let path = dir.join(owner);
            if let Err(error) = std::fs::remove_dir_all(&path) {
                tracing::warn!(%error, path = %path.display(), "could not delete an idle owner's replica log");
            }
        }
    }

    /// Checks the first frame's owner and counts the stream as open.
    pub fn open_stream(
        self: &Arc<Self>,
        owner: &peer::SidecarId,
        me: &peer::SidecarId,
    ) -> Result<StreamGuard, Status> {
        if !valid_owner_name(&owner.name) {
            return Err(Status::invalid_argument(format!(
                "invalid owner name {:?}",
                owner.name
            )));
        }
        if owner.name == me.name {
            return Err(Status::invalid_argument(
                "a sidecar cannot be its own replica",
            ));
        }
        let mut owners = self.lock();
        if owners.len() >= MAX_OWNERS && !owners.contains_key(&owner.name) {
            return Err(Status::resource_exhausted(format!(
                "replica already holds copies of {MAX_OWNERS} owners"
            )));
        }
        let o = owners.entry(owner.name.clone()).or_default();
        o.streams += 1;
        o.unreachable_since = None;
        Ok(StreamGuard {
            store: Arc::clone(self),
            owner: owner.name.clone(),
        })
    }

    fn durable(&self, queue: &str) -> Option<bool> {
        let view = self.view.borrow();
        let qv = view.queue(queue)?;
        Some(
            qv.policy
                .as_ref()
                .is_none_or(|p| p.durability() != control::Durability::Memory),
        )
    }

    /// The queue's `maxMessageBytes`, when this sidecar may own it (0: not sent, no limit).
    fn max_message_bytes(&self, queue: &str) -> Option<u64> {
        let view = self.view.borrow();
        view.queue(queue)?
            .policy
            .as_ref()
            .map(|p| p.max_message_bytes)
            .filter(|&limit| limit > 0)
    }

    /// Persists a batch of copies from `owner`; resolves once every one is durable. Refused (the
    /// stream is then reset) when a copy is malformed, names a queue this sidecar may not own, or
    /// the store is full. Copies it already holds are not written twice.
    pub async fn accept(&self, owner: &str, batch: ReplicaBatch) -> Result<(), Status> {
        // Validate everything first: a refused batch changes nothing.
        let mut new = Vec::new();
        let mut bytes = 0u64;
        for m in batch.messages {
            let Some(message) = m.message else {
                return Err(Status::invalid_argument(format!(
                    "copy {} without a message",
                    m.sequence
                )));
            };
            if m.sequence == 0 || m.queue.is_empty() || m.pending.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "copy {} without a sequence, queue or owing subscription",
                    m.sequence
                )));
            }
            if message.headers.contains_key(OWNER_SEQUENCE) {
                return Err(Status::invalid_argument(format!(
                    "copy {} carries the reserved header {OWNER_SEQUENCE}",
                    m.sequence
                )));
            }
            let Some(durable) = self.durable(&m.queue) else {
                let mut status = Status::failed_precondition(format!(
                    "this sidecar may not own queue {:?}, so it cannot stand in for its owner",
                    m.queue
                ));
                if let Ok(v) = m.queue.parse() {
                    status.metadata_mut().insert(REFUSED_QUEUE, v);
                }
                return Err(status);
            };
            let size = message_size(&message);
            // What no app could publish to the queue, no owner may copy into it.
            if let Some(limit) = self.max_message_bytes(&m.queue)
                && size > limit
            {
                return Err(Status::invalid_argument(format!(
                    "copy {} of {size} bytes exceeds queue {:?}'s maxMessageBytes of {limit}",
                    m.sequence, m.queue
                )));
            }
            bytes += size;
            new.push((m.sequence, m.queue, message, m.pending, size, durable));
        }
        // Skip what is held already; replace a different message under the same sequence (an
        // owner that restarted without its disk).
        let (log, stale) = {
            let mut owners = self.lock();
            let o = owners.entry(owner.to_owned()).or_default();
            let mut stale = Vec::new();
            new.retain(|(seq, _, message, ..)| match o.copies.get(seq) {
                Some(c) if c.message.id == message.id => {
                    bytes -= message_size(message);
                    false
                }
                Some(_) => {
                    stale.push(*seq);
                    true
                }
                None => true,
            });
            if self.bytes() + bytes > self.config.max_bytes {
                return Err(Status::resource_exhausted(format!(
                    "replica storage full: {} of {} bytes (--max-replica-bytes) used",
                    self.bytes(),
                    self.config.max_bytes
                )));
            }
            if o.log.is_none() && self.config.dir.is_some() && new.iter().any(|n| n.5) {
                let log = DiskLog::open(Self::log_config(&self.config, owner))
                    .map_err(|e| Status::unavailable(format!("replica storage failure: {e}")))?;
                o.log = Some(Arc::new(log));
            }
            (o.log.clone(), stale)
        };
        if !stale.is_empty() {
            self.settle(
                owner,
                &SettledRange {
                    below: 0,
                    sequences: stale,
                },
            );
        }
        self.add_bytes(bytes as i64);
        let writes = new
            .into_iter()
            .map(|(seq, queue, mut message, pending, size, durable)| {
                let log = log.clone().filter(|_| durable);
                async move {
                    let pending: Vec<(String, u32)> = pending
                        .into_iter()
                        .map(|p| (p.subscription, p.attempts))
                        .collect();
                    let local = match log {
                        Some(log) => {
                            message
                                .headers
                                .insert(OWNER_SEQUENCE.into(), seq.to_string());
                            let subs: Vec<String> =
                                pending.iter().map(|(s, _)| s.clone()).collect();
                            let stored = Arc::new(message);
                            let local = log.append_next(&queue, &stored, &subs).await;
                            message = Arc::unwrap_or_clone(stored);
                            message.headers.remove(OWNER_SEQUENCE);
                            let (local, at) = local?;
                            for (sub, attempts) in &pending {
                                if *attempts > 0 {
                                    log.attempted(&queue, sub, local, *attempts);
                                }
                            }
                            Some((local, at))
                        }
                        None => None,
                    };
                    Ok::<_, crate::error::BrokerError>((
                        seq,
                        Copy {
                            queue,
                            message: Arc::new(message),
                            pending,
                            size,
                            local,
                        },
                    ))
                }
            });
        let results = join_all(writes).await;
        let mut owners = self.lock();
        let o = owners.entry(owner.to_owned()).or_default();
        let mut failed = None;
        for r in results {
            match r {
                Ok((seq, copy)) => {
                    o.copies.insert(seq, copy);
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            let held: u64 = o.copies.values().map(|c| c.size).sum();
            drop(owners);
            self.recount();
            tracing::warn!(owner, %e, held, "could not persist standby copies");
            return Err(Status::unavailable(format!("replica storage failure: {e}")));
        }
        Ok(())
    }

    fn recount(&self) {
        let total: u64 = self
            .lock()
            .values()
            .flat_map(|o| o.copies.values())
            .map(|c| c.size)
            .sum();
        self.bytes.store(total, std::sync::atomic::Ordering::SeqCst);
        self.metrics.replica_bytes.set(total as i64);
    }

    /// Drops the copies `range` names: everything below `below` and the listed sequences.
    pub fn settle(&self, owner: &str, range: &SettledRange) -> usize {
        let mut owners = self.lock();
        let Some(o) = owners.get_mut(owner) else {
            return 0;
        };
        let mut gone: Vec<u64> = o.copies.range(..range.below).map(|(s, _)| *s).collect();
        gone.extend(
            range
                .sequences
                .iter()
                .filter(|s| **s >= range.below && o.copies.contains_key(s)),
        );
        let mut freed = 0u64;
        for seq in &gone {
            if let Some(copy) = o.copies.remove(seq) {
                freed += copy.size;
                if let (Some(log), Some((local, at))) = (&o.log, copy.local) {
                    for (sub, _) in &copy.pending {
                        log.settle(&copy.queue, sub, local, Outcome::Acked);
                    }
                    log.release(at);
                }
            }
        }
        self.forget_if_idle(&mut owners, owner);
        drop(owners);
        self.add_bytes(-(freed as i64));
        gone.len()
    }

    /// Owners with copies and no open stream, with their peer address in the view (`None`: gone
    /// from the view).
    fn orphans(&self) -> Vec<(String, Option<String>)> {
        let view = self.view.borrow().clone();
        let owners = self.lock();
        owners
            .iter()
            .filter(|(_, o)| o.streams == 0 && !o.copies.is_empty())
            .map(|(name, _)| {
                let addr = view
                    .wire
                    .peers
                    .iter()
                    .find(|p| p.name == *name)
                    .map(|p| p.peer_address.clone());
                (name.clone(), addr)
            })
            .collect()
    }

    /// Watches for owners that are gone and adopts their copies (runs for the sidecar's life).
    pub async fn watch(self: Arc<Self>, owner: Arc<Owner>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let has_view = self.view.borrow().version() > 0;
            for (name, addr) in self.orphans() {
                let reason = match addr {
                    None if has_view => Some("the owner left the mesh view".to_owned()),
                    None => None,
                    Some(addr) => {
                        let reachable = tokio::time::timeout(
                            Duration::from_secs(1),
                            tokio::net::TcpStream::connect(&addr),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok());
                        let mut owners = self.lock();
                        let Some(o) = owners.get_mut(&name) else {
                            continue;
                        };
                        if reachable || o.streams > 0 {
                            o.unreachable_since = None;
                            None
                        } else {
                            let since = *o.unreachable_since.get_or_insert_with(Instant::now);
                            (since.elapsed() >= self.config.adopt_after).then(|| {
                                format!(
                                    "the owner's address {addr} has been unreachable for {}",
                                    qmesh_api::Duration(self.config.adopt_after)
                                )
                            })
                        }
                    }
                };
                if let Some(reason) = reason {
                    self.adopt(&owner, &name, &reason).await;
                }
            }
        }
    }

    /// Becomes the owner of every copy of `from`: persisted in this sidecar's own log with new
    /// sequences and the owing subscriptions' attempts, then the copy is dropped.
    pub async fn adopt(&self, owner: &Arc<Owner>, from: &str, reason: &str) -> usize {
        let copies: Vec<(u64, Copy)> = self
            .lock()
            .get(from)
            .map(|o| o.copies.iter().map(|(s, c)| (*s, c.clone())).collect())
            .unwrap_or_default();
        let mut adopted: BTreeMap<String, u64> = BTreeMap::new();
        let mut done = Vec::new();
        let mut refused = 0;
        let mut last_error = None;
        for (seq, copy) in copies {
            let owned = peer::OwnedMessage {
                queue: copy.queue.clone(),
                sequence: seq,
                message: Some((*copy.message).clone()),
                pending: copy
                    .pending
                    .iter()
                    .map(|(s, a)| peer::PendingSubscription {
                        subscription: s.clone(),
                        attempts: *a,
                    })
                    .collect(),
            };
            match owner.adopt(owned).await {
                Ok(()) => {
                    *adopted.entry(copy.queue).or_default() += 1;
                    done.push(seq);
                }
                Err(e) => {
                    refused += 1;
                    last_error = Some(e.to_string());
                }
            }
        }
        let n = done.len();
        self.settle(
            from,
            &SettledRange {
                below: 0,
                sequences: done,
            },
        );
        for (queue, count) in &adopted {
            self.metrics.replica_adopted(queue, *count);
            tracing::warn!(owner = %from, queue, messages = count, %reason, "adopted standby copies: this sidecar owns them now");
        }
        if let Some(error) = last_error {
            tracing::error!(owner = %from, refused, %error, "could not adopt some standby copies; kept, retried later");
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: Option<PathBuf>, max_bytes: u64) -> Arc<ReplicaStore> {
        let wire = control::MeshView {
            version: 1,
            queues: vec![
                control::QueueView {
                    name: "q".into(),
                    ..Default::default()
                },
                control::QueueView {
                    name: "mem".into(),
                    policy: Some(control::QueuePolicy {
                        durability: control::Durability::Memory as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(crate::view::View::new(wire)));
        let config = ReplicaConfig {
            dir,
            fsync: FsyncPolicy::Always,
            segment_bytes: 1024 * 1024,
            max_bytes,
            adopt_after: Duration::from_secs(1),
        };
        ReplicaStore::open(config, rx, Arc::new(Metrics::default())).unwrap()
    }

    fn copy(queue: &str, seq: u64, id: &str) -> peer::OwnedMessage {
        peer::OwnedMessage {
            queue: queue.into(),
            sequence: seq,
            message: Some(v1::Message {
                id: id.into(),
                payload: format!("payload {seq}").into_bytes().into(),
                ..Default::default()
            }),
            pending: vec![peer::PendingSubscription {
                subscription: "s".into(),
                attempts: 2,
            }],
        }
    }

    fn batch(copies: Vec<peer::OwnedMessage>) -> ReplicaBatch {
        ReplicaBatch { messages: copies }
    }

    #[tokio::test]
    async fn copies_survive_a_restart_and_settled_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas");
        {
            let s = store(Some(path.clone()), 1 << 20);
            let copies = (1..=10).map(|i| copy("q", i, &format!("m{i}"))).collect();
            s.accept("owner-a", batch(copies)).await.unwrap();
            s.accept("owner-a", batch(vec![copy("mem", 11, "m11")]))
                .await
                .unwrap();
            assert_eq!(s.count("owner-a"), 11);
            // Everything below 4 and 7 are settled.
            let dropped = s.settle(
                "owner-a",
                &SettledRange {
                    below: 4,
                    sequences: vec![7, 99],
                },
            );
            assert_eq!(dropped, 4);
            assert_eq!(s.count("owner-a"), 7);
            // Settlements are written behind the next batch; force them out.
            let log = s.lock()["owner-a"].log.clone().unwrap();
            log.flush().await.unwrap();
        }
        let s = store(Some(path), 1 << 20);
        let owners = s.lock();
        let seqs: Vec<u64> = owners["owner-a"].copies.keys().copied().collect();
        // The memory-durability copy (11) is gone; the others came back with attempts.
        assert_eq!(seqs, [4, 5, 6, 8, 9, 10]);
        let c = &owners["owner-a"].copies[&4];
        assert_eq!(c.message.id, "m4");
        assert!(!c.message.headers.contains_key(OWNER_SEQUENCE));
        assert_eq!(c.pending, [("s".to_owned(), 2)]);
    }

    #[tokio::test]
    async fn repeated_copies_are_stored_once_and_a_reused_sequence_replaces_the_old_copy() {
        let s = store(None, 1 << 20);
        s.accept("o", batch(vec![copy("q", 1, "a"), copy("q", 2, "b")]))
            .await
            .unwrap();
        let before = s.bytes();
        s.accept("o", batch(vec![copy("q", 1, "a")])).await.unwrap();
        assert_eq!(s.bytes(), before, "a re-sent copy is not counted twice");
        s.accept("o", batch(vec![copy("q", 2, "new")]))
            .await
            .unwrap();
        assert_eq!(s.count("o"), 2);
        assert_eq!(s.lock()["o"].copies[&2].message.id, "new");
    }

    #[tokio::test]
    async fn malformed_foreign_or_too_large_batches_are_refused_and_change_nothing() {
        let s = store(None, 200);
        let mut no_message = copy("q", 1, "a");
        no_message.message = None;
        let mut no_pending = copy("q", 1, "a");
        no_pending.pending.clear();
        let mut forged = copy("q", 1, "a");
        if let Some(m) = forged.message.as_mut() {
            m.headers.insert(OWNER_SEQUENCE.into(), "5".into());
        }
        for bad in [no_message, no_pending, forged, copy("q", 0, "zero")] {
            let err = s
                .accept("o", batch(vec![copy("q", 3, "ok"), bad]))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
        }
        let err = s
            .accept("o", batch(vec![copy("other", 1, "a")]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            err.metadata()
                .get(REFUSED_QUEUE)
                .and_then(|v| v.to_str().ok()),
            Some("other")
        );
        let big: Vec<_> = (1..=20).map(|i| copy("q", i, "x")).collect();
        let err = s.accept("o", batch(big)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("replica storage full"));
        assert_eq!(s.count("o"), 0);
        assert_eq!(s.bytes(), 0);
    }

    #[tokio::test]
    async fn owners_with_nothing_kept_are_forgotten_so_new_owners_always_find_a_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas");
        let s = store(Some(path.clone()), 1 << 20);
        let me = peer::SidecarId {
            name: "me".into(),
            ..Default::default()
        };
        // More owner pods over the sidecar's life than it has slots: each replicates, settles, goes.
        for i in 0..(MAX_OWNERS + 5) {
            let owner = peer::SidecarId {
                name: format!("owner-{i}"),
                ..Default::default()
            };
            let guard = s
                .open_stream(&owner, &me)
                .unwrap_or_else(|e| panic!("owner {i} refused: {e}"));
            s.accept(&owner.name, batch(vec![copy("q", 1, "m")]))
                .await
                .unwrap();
            s.settle(
                &owner.name,
                &SettledRange {
                    below: 2,
                    sequences: vec![],
                },
            );
            drop(guard);
        }
        assert!(s.lock().is_empty(), "no idle owner kept");
        let left = std::fs::read_dir(&path).map_or(0, |d| d.count());
        assert_eq!(left, 0, "their logs are deleted");
    }

    #[test]
    fn owner_names_that_could_escape_the_directory_are_invalid() {
        for bad in ["", "..", "../x", "a/b", ".hidden", "a\0b"] {
            assert!(!valid_owner_name(bad), "{bad:?}");
        }
        assert!(valid_owner_name("shop-1.default_x"));
    }
}
