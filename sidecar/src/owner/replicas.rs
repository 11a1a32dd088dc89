//! Owner side of `publishAck: Replicated`: one long-lived `Replicate` stream per replica sidecar,
//! carrying copies of this owner's messages and, later, which of them are settled. A publish of a
//! replicated queue is acknowledged only once its copy's batch is confirmed.
//!
//! ```text
//!   publish ──offer(copy, waiter)──▶ link outbox ──ReplicaBatch──▶ replica sidecar (persists)
//!           ◀──────confirmed───────  link task   ◀──ReplicateAck── (exactly one per batch, in order)
//!   owner: settled sequences, floor ──▶ link ──SettledRange{below, sequences}──▶ replica (drops)
//!   link (re)established ──▶ owner re-sends every still-owned message of the queues it serves
//! ```
//!
//! Replica choice is deterministic: the view's peers ranked by a rendezvous hash of this owner's
//! name and theirs; a queue uses the first ranked peer whose stream is up and which has not refused
//! the queue (a sidecar that may not own a queue cannot stand in for it). Links to lower-ranked
//! peers are only opened while no better one is up. Everything is bounded: copies wait in an outbox
//! only while their publish waits (at most `--replica-timeout`) or until a re-sync is sent, and the
//! channel towards the replica holds a few frames.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use qmesh_proto::{
    control::PeerEndpoint,
    peer::{
        self, OwnedMessage, ReplicaBatch, ReplicateFrame, SettledRange, peer_client::PeerClient,
        replicate_frame,
    },
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::identity::Dialer;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

/// Most copies in one `ReplicaBatch`.
const BATCH_MESSAGES: usize = 512;
/// Most bytes of copies in one `ReplicaBatch` (one copy if larger): within a peer frame limit.
const BATCH_BYTES: usize = crate::frames::PEER_BATCH_BYTES;
/// Frames queued towards one replica.
const LINK_QUEUE: usize = 8;
/// Settled sequences remembered for a replica that is down (beyond, the floor covers them).
const MAX_PENDING_SETTLED: usize = 1_000_000;
/// How long a replica's refusal of a queue is remembered (its view may change).
const REFUSAL_TTL: Duration = Duration::from_secs(60);
/// Metadata key of a refusal: the queue the replica may not own.
pub const REFUSED_QUEUE: &str = "qmesh-refused-queue";

/// Rendezvous score of `peer` for `owner`: stable across processes and versions (FNV-1a, mixed).
pub fn rendezvous_score(owner: &str, peer: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.bytes().chain([0u8]).chain(peer.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: FNV alone clusters on names differing only at the end.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Peers in replica preference order for `owner` (never `owner` itself).
pub fn rank(owner: &str, peers: &[PeerEndpoint]) -> Vec<PeerEndpoint> {
    let mut ranked: Vec<PeerEndpoint> = peers
        .iter()
        .filter(|p| p.name != owner && !p.peer_address.is_empty())
        .cloned()
        .collect();
    ranked.sort_by(|a, b| {
        rendezvous_score(owner, &b.name)
            .cmp(&rendezvous_score(owner, &a.name))
            .then_with(|| a.name.cmp(&b.name))
    });
    ranked
}

/// Where a queue's copies can go right now.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    /// This peer's stream is up.
    Up(String),
    /// No stream is up (yet); why.
    Waiting(String),
    /// There is no candidate at all.
    NoPeers,
}

struct Link {
    name: String,
    up: bool,
    /// Copies to send, by sequence.
    outbox: BTreeMap<u64, Arc<OwnedMessage>>,
    /// Batches sent and not yet confirmed, oldest first.
    sent: VecDeque<Vec<u64>>,
    /// Copies of the sent batches (to send again after a reconnect if a publish still waits).
    sent_copies: HashMap<u64, Arc<OwnedMessage>>,
    /// Publishes waiting for their copy to be confirmed.
    waiters: HashMap<u64, oneshot::Sender<()>>,
    /// Queues whose owned messages this stream has been sent.
    synced: HashSet<String>,
    /// Settled sequences to report.
    settled: Vec<u64>,
    floor_sent: u64,
    last_error: String,
    wake: Arc<Notify>,
    task: Option<tokio::task::AbortHandle>,
}

impl Link {
    fn has_work(&self, floor: u64) -> bool {
        self.up && (!self.outbox.is_empty() || !self.settled.is_empty() || floor > self.floor_sent)
    }

    /// The stream ended: waiting publishes are released to try another (or the same, once back)
    /// replica; re-sync copies are dropped (the owner sends them again when a link is up).
    fn lost(&mut self, error: String) {
        self.up = false;
        self.last_error = error;
        self.sent.clear();
        self.sent_copies.clear();
        self.outbox.clear();
        self.waiters.clear();
        self.synced.clear();
        self.floor_sent = 0;
    }

    /// The replica refused `queue`: its copies go elsewhere.
    fn refused(&mut self, queue: &str) {
        let gone: Vec<u64> = self
            .outbox
            .iter()
            .chain(self.sent_copies.iter())
            .filter(|(_, c)| c.queue == queue)
            .map(|(s, _)| *s)
            .collect();
        for seq in gone {
            self.outbox.remove(&seq);
            self.waiters.remove(&seq);
        }
        self.synced.remove(queue);
    }
}

struct Inner {
    ranked: Vec<PeerEndpoint>,
    links: HashMap<String, Link>,
    /// (peer address, queue) pairs a replica refused, and when (forgotten after [`REFUSAL_TTL`]).
    refused: HashMap<(String, String), Instant>,
    /// Every sequence below is settled (or was never a replicated message).
    floor: u64,
}

/// The owner's replica links.
pub struct Replicas {
    dialer: Arc<Dialer>,
    me: peer::SidecarId,
    tasks: Arc<crate::supervise::Supervisor>,
    timeout: Duration,
    inner: Mutex<Inner>,
    /// Signalled when a link comes up or goes down, or the peers change.
    changed: Notify,
    this: Weak<Replicas>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas").finish_non_exhaustive()
    }
}

impl Replicas {
    /// Links for owner `me`; a publish waits at most `timeout` for its copy's confirmation.
    pub fn new(
        me: peer::SidecarId,
        timeout: Duration,
        tasks: Arc<crate::supervise::Supervisor>,
        dialer: Arc<Dialer>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            me,
            tasks,
            dialer,
            timeout,
            inner: Mutex::new(Inner {
                ranked: Vec::new(),
                links: HashMap::new(),
                refused: HashMap::new(),
                floor: 0,
            }),
            changed: Notify::new(),
            this: this.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a publish waits for a replica.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// New view peers: re-ranks the candidates and stops links to peers that left.
    pub fn set_peers(&self, peers: &[PeerEndpoint]) {
        let ranked = rank(&self.me.name, peers);
        let mut inner = self.lock();
        let wanted: HashSet<&str> = ranked.iter().map(|p| p.peer_address.as_str()).collect();
        inner.links.retain(|addr, link| {
            let keep = wanted.contains(addr.as_str());
            if !keep {
                tracing::info!(replica = %link.name, peer = %addr, "replica left the view; its link is closed");
                if let Some(task) = link.task.take() {
                    task.abort();
                }
            }
            keep
        });
        inner
            .refused
            .retain(|(addr, _), at| wanted.contains(addr.as_str()) && at.elapsed() < REFUSAL_TTL);
        inner.ranked = ranked;
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Where copies of `queue` go now; starts links to candidates as needed.
    pub fn pick(&self, queue: &str) -> Pick {
        let mut inner = self.lock();
        if inner.ranked.is_empty() {
            return Pick::NoPeers;
        }
        let mut reasons = Vec::new();
        let ranked = inner.ranked.clone();
        for peer in &ranked {
            let addr = &peer.peer_address;
            if inner
                .refused
                .get(&(addr.clone(), queue.to_owned()))
                .is_some_and(|at| at.elapsed() < REFUSAL_TTL)
            {
                reasons.push(format!("{} may not own the queue", peer.name));
                continue;
            }
            let link = inner
                .links
                .entry(addr.clone())
                .or_insert_with(|| self.start_link(peer));
            if link.up {
                return Pick::Up(addr.clone());
            }
            reasons.push(if link.last_error.is_empty() {
                format!("{} ({addr}) not connected yet", peer.name)
            } else {
                format!("{} ({addr}): {}", peer.name, link.last_error)
            });
        }
        if reasons.is_empty() {
            Pick::NoPeers
        } else {
            Pick::Waiting(reasons.join("; "))
        }
    }

    /// Waits (until `deadline`) for a peer whose stream is up to take copies of `queue`.
    pub async fn target(&self, queue: &str, deadline: Instant) -> Result<String, String> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let reason = match self.pick(queue) {
                Pick::Up(addr) => return Ok(addr),
                Pick::NoPeers => {
                    return Err("no other ready sidecar in the mesh to hold a copy".into());
                }
                Pick::Waiting(reason) => reason,
            };
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(format!("no replica reachable in time ({reason})"));
            }
        }
    }

    /// Whether the current stream to `addr` has been sent the owned messages of `queue`.
    pub fn is_synced(&self, addr: &str, queue: &str) -> bool {
        self.lock()
            .links
            .get(addr)
            .is_some_and(|l| l.up && l.synced.contains(queue))
    }

    /// Queues `copies` (everything owned of `queue`) for `addr` and marks the queue synced there.
    /// Call with the queue's lock held, so no settlement of these copies can be reported before
    /// they are queued.
    pub fn resync(&self, addr: &str, queue: &str, copies: Vec<Arc<OwnedMessage>>) {
        let mut inner = self.lock();
        let Some(link) = inner.links.get_mut(addr).filter(|l| l.up) else {
            return;
        };
        let count = copies.len();
        for copy in copies {
            if !link.sent_copies.contains_key(&copy.sequence) {
                link.outbox.entry(copy.sequence).or_insert(copy);
            }
        }
        link.synced.insert(queue.to_owned());
        link.wake.notify_one();
        if count > 0 {
            tracing::info!(replica = %link.name, queue, messages = count, "re-sending owned messages to the replica");
        }
    }

    /// Queues a copy for `addr`. With a waiter, it is told once the copy is durable there; it is
    /// dropped if the link goes away. False if there is no such link.
    pub fn offer(
        &self,
        addr: &str,
        copy: Arc<OwnedMessage>,
        waiter: Option<oneshot::Sender<()>>,
    ) -> bool {
        let mut inner = self.lock();
        let Some(link) = inner.links.get_mut(addr) else {
            return false;
        };
        if let Some(w) = waiter {
            link.waiters.insert(copy.sequence, w);
        }
        link.outbox.insert(copy.sequence, copy);
        link.wake.notify_one();
        true
    }

    /// A publish gave up (no confirmation in time, or its local append failed): forget its copy
    /// and tell the replicas it is settled, in case it reached one.
    pub fn cancel(&self, sequence: u64) {
        let mut inner = self.lock();
        for link in inner.links.values_mut() {
            link.waiters.remove(&sequence);
            link.outbox.remove(&sequence);
            link.settled.push(sequence);
            link.wake.notify_one();
        }
    }

    /// Messages fully settled at the owner: their copies may go.
    pub fn settled(&self, sequences: &[u64]) {
        if sequences.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for link in inner.links.values_mut() {
            for seq in sequences {
                link.outbox.remove(seq);
            }
            if link.settled.len() + sequences.len() <= MAX_PENDING_SETTLED {
                link.settled.extend_from_slice(sequences);
            }
            if link.up {
                link.wake.notify_one();
            }
        }
    }

    /// Every sequence below `floor` is settled at the owner.
    pub fn set_floor(&self, floor: u64) {
        let mut inner = self.lock();
        if floor <= inner.floor {
            return;
        }
        inner.floor = floor;
        for link in inner.links.values() {
            if link.up && floor > link.floor_sent {
                link.wake.notify_one();
            }
        }
    }

    /// Tells every connected replica that nothing of this owner is owed any more (after a
    /// complete hand-over), and waits (bounded) until it was sent.
    pub async fn release_all(&self, deadline: Instant) {
        self.set_floor(u64::MAX);
        while Instant::now() < deadline {
            let pending = self
                .lock()
                .links
                .values()
                .any(|l| l.up && l.floor_sent < u64::MAX);
            if !pending {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn start_link(&self, peer: &PeerEndpoint) -> Link {
        let wake = Arc::new(Notify::new());
        let task = self.this.upgrade().map(|this| {
            let addr = peer.peer_address.clone();
            let name = peer.name.clone();
            let wake = Arc::clone(&wake);
            self.tasks
                .spawn(format!("replica link to {addr}"), async move {
                    this.run(addr, name, wake).await
                })
        });
        tracing::debug!(replica = %peer.name, peer = %peer.peer_address, "opening a replica link");
        Link {
            name: peer.name.clone(),
            up: false,
            outbox: BTreeMap::new(),
            sent: VecDeque::new(),
            sent_copies: HashMap::new(),
            waiters: HashMap::new(),
            synced: HashSet::new(),
            settled: Vec::new(),
            floor_sent: 0,
            last_error: String::new(),
            wake,
            task,
        }
    }

    async fn run(self: Arc<Self>, addr: String, name: String, wake: Arc<Notify>) {
        let backoff = qmesh_api::Backoff {
            initial: qmesh_api::Duration::from_millis(50),
            max: qmesh_api::Duration::from_millis(2_000),
            multiplier: 2,
        };
        let mut failures = 0u32;
        loop {
            let result = self.connect_once(&addr, &name, &wake).await;
            let error = match result {
                Ok(()) => {
                    failures = 0;
                    "stream closed".to_owned()
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    format!("{error:#}")
                }
            };
            let was_up = {
                let mut inner = self.lock();
                let Some(link) = inner.links.get_mut(&addr) else {
                    return;
                };
                let was_up = link.up;
                link.lost(error.clone());
                was_up
            };
            if was_up {
                tracing::warn!(peer = %addr, %error, "replica link down");
            } else {
                tracing::debug!(peer = %addr, %error, "replica link failed");
            }
            self.changed.notify_waiters();
            let delay =
                qmesh_core::backoff::jittered_delay(&backoff, failures.max(1), rand::random());
            tokio::time::sleep(delay).await;
        }
    }

    async fn connect_once(&self, addr: &str, name: &str, wake: &Notify) -> anyhow::Result<()> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = self.dialer.connect(endpoint, addr, Some(name)).await?;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(crate::frames::CEILING)
            .max_encoding_message_size(crate::frames::PEER_FRAME_CEILING);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        tx.send(ReplicateFrame {
            frame: Some(replicate_frame::Frame::Owner(self.me.clone())),
        })
        .await?;
        let mut inbound = client
            .replicate(ReceiverStream::new(rx))
            .await?
            .into_inner();
        {
            let mut inner = self.lock();
            let Some(link) = inner.links.get_mut(addr) else {
                return Ok(());
            };
            link.up = true;
            link.last_error.clear();
            link.floor_sent = 0;
            tracing::info!(replica = %link.name, peer = %addr, "replica link up");
        }
        self.changed.notify_waiters();
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let busy = {
                let inner = self.lock();
                inner
                    .links
                    .get(addr)
                    .is_some_and(|l| l.has_work(inner.floor))
            };
            tokio::select! {
                ack = inbound.next() => match ack {
                    Some(Ok(ack)) => self.confirm(addr, &ack)?,
                    Some(Err(status)) => {
                        if let Some(queue) = status.metadata().get(REFUSED_QUEUE).and_then(|v| v.to_str().ok()) {
                            let mut inner = self.lock();
                            inner.refused.insert((addr.to_owned(), queue.to_owned()), Instant::now());
                            if let Some(link) = inner.links.get_mut(addr) {
                                link.refused(queue);
                            }
                            tracing::warn!(peer = %addr, queue, reason = %status.message(), "replica refused a queue; another peer is used for it");
                        }
                        anyhow::bail!("replica reset the stream: {}", status.message());
                    }
                    None => anyhow::bail!("replica closed the stream"),
                },
                permit = tx.reserve(), if busy => {
                    let permit = permit?;
                    if let Some(frame) = self.next_frame(addr) {
                        permit.send(frame);
                    }
                }
                () = &mut notified, if !busy => {}
            }
        }
    }

    /// The next frame for `addr`: copies first (so no settlement overtakes its copy), then what
    /// is settled.
    fn next_frame(&self, addr: &str) -> Option<ReplicateFrame> {
        let mut inner = self.lock();
        let floor = inner.floor;
        let link = inner.links.get_mut(addr)?;
        if !link.outbox.is_empty() {
            let mut messages = Vec::new();
            let mut bytes = 0usize;
            while messages.len() < BATCH_MESSAGES {
                let Some((_, next)) = link.outbox.first_key_value() else {
                    break;
                };
                let size = next
                    .message
                    .as_ref()
                    .map_or(0, |m| super::queue::message_size(m) as usize)
                    + 64;
                if !messages.is_empty() && bytes + size > BATCH_BYTES {
                    break;
                }
                let Some((seq, copy)) = link.outbox.pop_first() else {
                    break;
                };
                bytes += size;
                link.sent_copies.insert(seq, Arc::clone(&copy));
                messages.push(copy);
            }
            link.sent
                .push_back(messages.iter().map(|m| m.sequence).collect());
            return Some(ReplicateFrame {
                frame: Some(replicate_frame::Frame::Messages(ReplicaBatch {
                    messages: messages.iter().map(|m| (**m).clone()).collect(),
                })),
            });
        }
        if !link.settled.is_empty() || floor > link.floor_sent {
            let take = link.settled.len().min(65_536);
            let mut sequences: Vec<u64> = link.settled.drain(..take).collect();
            sequences.retain(|s| *s >= floor);
            sequences.sort_unstable();
            sequences.dedup();
            link.floor_sent = floor;
            return Some(ReplicateFrame {
                frame: Some(replicate_frame::Frame::Settled(SettledRange {
                    below: floor,
                    sequences,
                })),
            });
        }
        None
    }

    /// An ack confirms the oldest unconfirmed batch of the stream.
    fn confirm(&self, addr: &str, ack: &peer::ReplicateAck) -> anyhow::Result<()> {
        let mut inner = self.lock();
        let Some(link) = inner.links.get_mut(addr) else {
            return Ok(());
        };
        let Some(batch) = link.sent.pop_front() else {
            anyhow::bail!("replica acknowledged a batch that was never sent");
        };
        if let Some(max) = batch.iter().max()
            && ack.durable_through < *max
        {
            anyhow::bail!(
                "replica acknowledged through {} a batch reaching {max}",
                ack.durable_through
            );
        }
        for seq in batch {
            link.sent_copies.remove(&seq);
            if let Some(w) = link.waiters.remove(&seq) {
                let _ = w.send(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> PeerEndpoint {
        PeerEndpoint {
            name: name.into(),
            peer_address: format!("{name}:7070"),
        }
    }

    #[test]
    fn ranking_is_deterministic_never_self_and_spreads_owners() {
        let peers: Vec<PeerEndpoint> = ["a", "b", "c", "d"].iter().map(|n| peer(n)).collect();
        let r1 = rank("a", &peers);
        let r2 = rank("a", &peers.iter().rev().cloned().collect::<Vec<_>>());
        assert_eq!(r1, r2, "order of the view does not matter");
        assert_eq!(r1.len(), 3);
        assert!(r1.iter().all(|p| p.name != "a"));
        // Different owners do not all pick the same first replica.
        let firsts: HashSet<String> = (0..20)
            .map(|i| {
                let owner = format!("owner-{i}");
                rank(&owner, &peers)[0].name.clone()
            })
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
    }

    #[tokio::test]
    async fn no_peers_fails_at_once_and_an_unreachable_peer_within_the_deadline() {
        let me = peer::SidecarId {
            name: "me".into(),
            ..Default::default()
        };
        let (_view_tx, view) = tokio::sync::watch::channel(Arc::default());
        let replicas = Replicas::new(
            me,
            Duration::from_millis(300),
            crate::supervise::Supervisor::new(),
            Dialer::new(None, view),
        );
        let started = Instant::now();
        let err = replicas
            .target("q", started + Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("no other ready sidecar"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));

        // A peer nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        replicas.set_peers(&[PeerEndpoint {
            name: "gone".into(),
            peer_address: format!("127.0.0.1:{port}"),
        }]);
        let started = Instant::now();
        let err = replicas
            .target("q", started + Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(err.contains("no replica reachable"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_lost_stream_releases_waiting_publishes_and_forgets_what_it_sent() {
        let mut link = Link {
            name: "r".into(),
            up: true,
            outbox: BTreeMap::new(),
            sent: VecDeque::new(),
            sent_copies: HashMap::new(),
            waiters: HashMap::new(),
            synced: HashSet::from(["q".to_owned()]),
            settled: Vec::new(),
            floor_sent: 5,
            last_error: String::new(),
            wake: Arc::new(Notify::new()),
            task: None,
        };
        let copy = |s: u64| {
            Arc::new(OwnedMessage {
                queue: "q".into(),
                sequence: s,
                ..Default::default()
            })
        };
        let (w1, _r1) = oneshot::channel();
        let (w3, _r3) = oneshot::channel();
        link.waiters.insert(1, w1);
        link.waiters.insert(3, w3);
        link.sent.push_back(vec![1, 2]);
        link.sent_copies.insert(1, copy(1));
        link.sent_copies.insert(2, copy(2));
        link.outbox.insert(3, copy(3));
        link.outbox.insert(4, copy(4));
        link.lost("gone".into());
        assert!(link.outbox.is_empty() && link.waiters.is_empty());
        assert!(link.sent.is_empty() && link.sent_copies.is_empty());
        assert!(link.synced.is_empty() && !link.up);
        assert_eq!(link.floor_sent, 0);
    }
}
