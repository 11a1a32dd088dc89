//! One owned queue's delivery state machine: which subscriptions still owe an ack for each message,
//! what is ready, in flight (to which consumer sidecar, which attempt, until when) or waiting out a
//! backoff, and which ordering keys are busy. Pure data and decisions; no I/O — the owner task
//! around it sends what it decides.
//!
//! ```text
//!   publish ──▶ ready ──dispatch (credit)──▶ in flight ──ack──▶ settled
//!                 ▲                              │ nack / timeout / link lost
//!                 └──── waiting (backoff) ◀──────┘──(attempts ≥ max)──▶ dead letter
//!
//!   memory budget reached ──▶ spill: newer messages stay in the log only (counted, not held)
//!   room again ──▶ page-in: read back from the log, in order ──▶ ready
//! ```
//!
//! What memory holds is always the oldest part of the backlog: spilled messages are newer than
//! every held one, so order, overflow (oldest first) and expiry work on what is held.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use qmesh_proto::{control, v1};

use super::{
    log::{Page, Position},
    retain::{self, Kept, Replay},
};
use crate::error::BrokerError;

/// One unsettled message.
#[derive(Debug)]
pub struct Entry {
    /// The message (shared with in-flight deliveries).
    pub message: Arc<v1::Message>,
    /// Where its record is in the log (released once settled everywhere).
    pub at: Position,
    /// Payload + header bytes, for retention accounting.
    pub size: u64,
    /// Subscriptions that still owe an ack.
    pub pending: HashSet<String>,
    /// When the owner accepted it.
    pub accepted: Instant,
}

/// A delivery on its way to, or held by, a consumer sidecar.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    /// Attempt number of this delivery.
    pub attempt: u32,
    /// The peer link it went out on.
    pub link: u64,
    /// Redeliver if not settled by then.
    pub deadline: Instant,
}

/// Per-subscription delivery state.
#[derive(Debug, Default)]
pub struct SubState {
    /// Sequences ready for delivery, in order.
    pub ready: BTreeSet<u64>,
    /// Sequences waiting out a backoff.
    pub waiting: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Deliveries not yet settled.
    pub in_flight: HashMap<u64, InFlight>,
    /// Attempts so far per unsettled sequence.
    pub attempts: HashMap<u64, u32>,
    /// Last failure reason per sequence (for dead-letter headers).
    pub last_error: HashMap<u64, String>,
    /// Exhausted with no dead-letter queue: kept and counted, never silently dropped.
    pub parked: BTreeSet<u64>,
    /// Parked because the dead-letter queue refused them (full, disk full): tried again, with
    /// backoff, until it takes them.
    pub dead_letter_retry: BTreeMap<u64, DeadLetterRetry>,
    /// Ordering keys with a message in flight or waiting (ordering: Key only).
    pub busy_keys: HashMap<String, u32>,
    /// Where the round-robin over consumer links continues.
    pub next_link: usize,
    /// Since when the subscription is missing from the view (dormant: nothing is delivered, nothing
    /// it owes is dropped until the removal grace has passed).
    pub removed_at: Option<Instant>,
    /// Messages it owes that are spilled (in the log only, not yet paged in).
    pub spilled: u64,
    /// Totals.
    pub delivered_total: u64,
    /// Totals.
    pub acked_total: u64,
    /// Totals.
    pub redelivered_total: u64,
    /// Totals.
    pub dead_lettered_total: u64,
}

impl SubState {
    /// Messages this subscription still owes (ready, waiting, in flight, parked, spilled).
    pub fn backlog(&self) -> u64 {
        (self.ready.len() + self.waiting.len() + self.in_flight.len() + self.parked.len()) as u64
            + self.spilled
    }

    /// Delayed or scheduled messages waiting for their time (waiting, never attempted).
    pub fn scheduled(&self) -> u64 {
        self.waiting
            .iter()
            .filter(|Reverse((_, seq))| !self.attempts.contains_key(seq))
            .count() as u64
    }

    /// Messages ready for delivery, held or spilled.
    pub fn ready_work(&self) -> usize {
        self.ready.len() + self.spilled as usize
    }

    fn busy(&mut self, key: &str) {
        if !key.is_empty() {
            *self.busy_keys.entry(key.to_owned()).or_default() += 1;
        }
    }

    fn free(&mut self, key: &str) {
        if key.is_empty() {
            return;
        }
        if let Some(n) = self.busy_keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.busy_keys.remove(key);
            }
        }
    }
}

/// A dead letter its dead-letter queue refused, waiting to be tried again.
#[derive(Debug, Clone)]
pub struct DeadLetterRetry {
    /// When to try again.
    pub next: Instant,
    /// Tries so far.
    pub tries: u32,
    /// Why it is a dead letter.
    pub reason: String,
    /// Last delivery error.
    pub last_error: String,
    /// Deliveries attempted.
    pub attempts: u32,
    /// The dead-letter queue.
    pub target: String,
}

/// What to do with a message that a subscription gave up on.
#[derive(Debug)]
pub struct DeadLetter {
    /// The subscription.
    pub subscription: String,
    /// Sequence in this queue.
    pub sequence: u64,
    /// The message.
    pub message: Arc<v1::Message>,
    /// Deliveries attempted.
    pub attempts: u32,
    /// Why (`max deliveries reached`, `expired`, `overflow`).
    pub reason: String,
    /// Last delivery error.
    pub last_error: String,
    /// Dead-letter queue, if any.
    pub target: Option<String>,
}

/// The longest redelivery delay a nack may ask for (like SQS's 12 h visibility limit); longer ones
/// are cut to it.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(12 * 3600);

/// How long after an attempt's deadline the owner gives up on it by itself: the consumer sidecar
/// reports the timeout first (its sweeper runs every 200 ms); this covers a consumer that cannot
/// report (partitioned, frozen) while its link stays up.
pub const SETTLE_GRACE: Duration = Duration::from_secs(5);

/// `now + wait`, saturating far in the future instead of overflowing.
pub fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(MAX_NACK_DELAY * 2))
        .unwrap_or(now)
}

/// Why a delivery failed, and whether the attempt counts towards `maxDeliveries`.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// Reason (kept as `qmesh-last-error`).
    pub reason: &'a str,
    /// Requested delay before redelivery; `None` = the subscription's backoff.
    pub delay: Option<Duration>,
    /// False when the consumer never got to act (the delivery never left, or the consumer sidecar
    /// says no app saw it): redelivered at once, not counted.
    pub counted: bool,
    /// The link a consumer's report came on: it must be the link the attempt went out on. `None`
    /// for the owner's own decisions (timeouts, lost links).
    pub link: Option<u64>,
    /// The consumer gives up on the message: dead-lettered now, whatever attempts remain.
    pub dead_letter: bool,
}

impl<'a> Failure<'a> {
    /// A failed attempt that counts.
    pub fn counted(reason: &'a str, delay: Option<Duration>) -> Self {
        Self {
            reason,
            delay,
            counted: true,
            link: None,
            dead_letter: false,
        }
    }

    /// A delivery that never reached a consumer.
    pub fn uncounted(reason: &'a str) -> Self {
        Self {
            reason,
            delay: None,
            counted: false,
            link: None,
            dead_letter: false,
        }
    }

    /// A counted failure the consumer gives up on (dead-letter now).
    pub fn rejected(reason: &'a str) -> Self {
        Self {
            dead_letter: true,
            ..Self::counted(reason, None)
        }
    }

    /// Reported by the consumer on `link`.
    pub fn on(self, link: u64) -> Self {
        Self {
            link: Some(link),
            ..self
        }
    }
}

/// A delivery decided by [`QueueState::dispatch`].
#[derive(Debug)]
pub struct Outgoing {
    /// Link to send on.
    pub link: u64,
    /// The delivery.
    pub subscription: String,
    /// Sequence.
    pub sequence: u64,
    /// Attempt.
    pub attempt: u32,
    /// Message.
    pub message: Arc<v1::Message>,
}

/// All state of one owned queue.
#[derive(Debug)]
pub struct QueueState {
    /// Queue name.
    pub name: String,
    /// Policies and routes from the current view.
    pub view: control::QueueView,
    /// Unsettled messages by sequence.
    pub messages: BTreeMap<u64, Entry>,
    /// Per subscription (route) state.
    pub subs: HashMap<String, SubState>,
    /// Bytes of unsettled messages.
    pub bytes: u64,
    /// Message ids seen inside the dedup window: id → (sequence, forgotten at).
    pub dedup: HashMap<String, (u64, Instant)>,
    dedup_order: VecDeque<(Instant, String)>,
    /// Memory the remembered ids take (counted against the sidecar's bound).
    pub dedup_bytes: u64,
    /// Duplicates waiting for the outcome of an original that is still being persisted.
    dedup_waiters: HashMap<u64, Vec<tokio::sync::oneshot::Sender<Result<(), BrokerError>>>>,
    /// Published total.
    pub published_total: u64,
    /// Sequences reserved by publishes still being persisted.
    pub appending: BTreeSet<u64>,
    /// Sequences fully settled since the owner last took them (`publishAck: Replicated` queues
    /// only: their replicas are told to drop the copies).
    pub removed: Vec<u64>,
    /// Sequences being dead-lettered by overflow or expiry (claimed, not yet evicted).
    evicting: BTreeSet<u64>,
    /// Newer messages kept in the log only, while memory is short.
    pub spill: Option<Spill>,
    /// Highest sequence reserved so far.
    last_reserved: u64,
    /// Records nothing needs any more, for the log to release (old copies of relocated messages).
    pub released: Vec<Position>,
    /// Records of messages settled everywhere, with their publish time (unix ms): kept for replay
    /// (`retention.keepAcked`) or released.
    pub settled: Vec<(Position, u64)>,
    /// Acked messages kept in the log for replay.
    pub kept: Kept,
    /// Replays of a subscription from the log, run one at a time, in order.
    pub replays: VecDeque<Replay>,
    /// Subscriptions this owner has served (a new one starts at its `startAt`).
    pub known: BTreeSet<String>,
    /// The latest publish time (unix ms) of any message held so far: every spilled message is
    /// newer, so it dates a backlog that is spilled only ([`QueueState::oldest_owed_ms`]).
    newest_held_ms: u64,
}

/// A queue's spilled range: messages from `from` on that are in the log only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spill {
    /// First spilled sequence.
    pub from: u64,
    /// Where the next page-in reads.
    pub cursor: Position,
    /// Highest sequence paged in so far.
    pub paged_through: u64,
    /// Spilled messages not yet paged in.
    pub messages: u64,
    /// Their record bytes.
    pub bytes: u64,
}

/// A held message to copy forward in the log.
#[derive(Debug)]
pub struct Relocation {
    /// Sequence.
    pub sequence: u64,
    /// The message.
    pub message: Arc<v1::Message>,
    /// Owing subscriptions with attempts so far.
    pub pending: Vec<(String, u32)>,
    /// Where its record is now.
    pub from: Position,
}

/// Where an inserted message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Held in memory.
    Held,
    /// Spilled (in the log only).
    Spilled,
    /// Held, and memory is full: messages from `from` on are spilled, readable from `cursor`.
    SpillStarted {
        /// First spilled sequence.
        from: u64,
        /// Where paging in will read.
        cursor: Position,
    },
}

/// What a page-in did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedIn {
    /// Highest sequence now held.
    pub through: u64,
    /// Where the next page-in reads.
    pub resume: Position,
    /// Every spilled message is held again.
    pub ended: bool,
    /// Messages paged in.
    pub messages: usize,
}

/// What one page of a replay decided.
#[derive(Debug, Default)]
pub struct ReplayStep {
    /// Copies to write: every message the page owes to the subscription again.
    pub copies: Vec<ReplayCopy>,
    /// Messages owed again.
    pub owed: usize,
    /// The scan reached the end of what it covers.
    pub done: bool,
    /// The replay that finished with this page.
    pub finished: Option<Replay>,
}

/// A message owed again by a replay, to record with who owes it.
#[derive(Debug)]
pub struct ReplayCopy {
    /// Sequence.
    pub sequence: u64,
    /// The message.
    pub message: Arc<v1::Message>,
    /// Every subscription that owes it, with attempts so far.
    pub pending: Vec<(String, u32)>,
    /// It is held already (else: settled and kept, held again once the copy is written).
    pub held: bool,
}

/// A publish whose id was seen inside the dedup window.
#[derive(Debug)]
pub enum Duplicate {
    /// The original is stored (sequence).
    Stored(u64),
    /// The original is still being persisted; its outcome follows.
    Pending(u64, tokio::sync::oneshot::Receiver<Result<(), BrokerError>>),
}

/// Header the owner keeps on a delayed or scheduled message: the unix ms from which it may be
/// delivered. Set by the broker only (apps cannot set `qmesh-` headers); survives restarts,
/// hand-overs and replicas with the message.
pub const DELIVER_AT_HEADER: &str = "qmesh-deliver-at";

/// When a message may be delivered (unix ms), if it was published delayed or scheduled.
pub fn deliver_at_ms(message: &v1::Message) -> Option<u64> {
    message.headers.get(DELIVER_AT_HEADER)?.parse().ok()
}

/// Most replays a queue keeps waiting (one per subscription beyond the running one: repeated
/// rewinds of a waiting subscription merge).
pub const MAX_REPLAYS: usize = 256;

/// A subscription with fewer ready messages than this, and spilled ones owed, is paged in for.
pub const MIN_READY: usize = 64;

/// Upper bound on remembered ids for de-duplication (oldest forgotten first).
pub const DEDUP_CAPACITY: usize = 1_000_000;

impl QueueState {
    /// Empty state for a queue.
    pub fn new(view: control::QueueView) -> Self {
        let subs = view
            .routes
            .iter()
            .map(|r| (r.subscription.clone(), SubState::default()))
            .collect();
        Self {
            name: view.name.clone(),
            view,
            messages: BTreeMap::new(),
            subs,
            bytes: 0,
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            dedup_bytes: 0,
            dedup_waiters: HashMap::new(),
            published_total: 0,
            appending: BTreeSet::new(),
            removed: Vec::new(),
            evicting: BTreeSet::new(),
            spill: None,
            last_reserved: 0,
            released: Vec::new(),
            settled: Vec::new(),
            kept: Kept::default(),
            replays: VecDeque::new(),
            known: BTreeSet::new(),
            newest_held_ms: 0,
        }
    }

    /// Messages owed, held and spilled.
    pub fn backlog(&self) -> u64 {
        self.messages.len() as u64 + self.spill.as_ref().map_or(0, |s| s.messages)
    }

    /// Bytes owed, held and spilled.
    pub fn backlog_bytes(&self) -> u64 {
        self.bytes + self.spill.as_ref().map_or(0, |s| s.bytes)
    }

    /// When the oldest message `subscription` still owes here was published (unix ms), for
    /// `qmesh_oldest_unacked_age_seconds`; `None` when it owes nothing.
    ///
    /// Held messages: the one with the lowest sequence among ready, waiting, in flight and parked,
    /// dated by its publish time (kept across restarts and page-ins), or — without one — by when
    /// this owner accepted it (`now_ms` and `now` are the same moment on both clocks). Sequences
    /// follow the order this owner took messages in, so a message adopted or handed over (a new,
    /// higher sequence, its original publish time) counts only once the ones before it are
    /// settled. Spilled messages are newer than every held one: a subscription owing only spilled
    /// messages is dated by the newest message this queue has held, an upper bound of their age
    /// (the true age is at most that; a starving subscription is paged in at once). Costs one pass
    /// over the subscription's in-flight and waiting messages.
    pub fn oldest_owed_ms(&self, subscription: &str, now_ms: u64, now: Instant) -> Option<u64> {
        let state = self.subs.get(subscription)?;
        let oldest = [
            state.ready.first().copied(),
            state.parked.first().copied(),
            state.waiting.iter().map(|Reverse((_, seq))| *seq).min(),
            state.in_flight.keys().copied().min(),
        ]
        .into_iter()
        .flatten()
        .min();
        match oldest.and_then(|seq| self.messages.get(&seq)) {
            Some(entry) => match retain::published_ms(&entry.message) {
                0 => Some(
                    now_ms.saturating_sub(
                        u64::try_from(now.saturating_duration_since(entry.accepted).as_millis())
                            .unwrap_or(u64::MAX),
                    ),
                ),
                published => Some(published),
            },
            None if state.spilled > 0 && self.newest_held_ms > 0 => Some(self.newest_held_ms),
            None => None,
        }
    }

    /// Memory the held messages take, with their bookkeeping (remembered ids are bounded on their
    /// own, [`DEDUP_CAPACITY`], and counted in [`QueueState::dedup_bytes`]).
    pub fn memory(&self) -> u64 {
        self.bytes + self.messages.len() as u64 * ENTRY_OVERHEAD
    }

    /// Whether a subscription owed spilled messages has little ready work left: its backlog must
    /// be paged in even when memory is over budget, or it would stall behind what others hold.
    pub fn starving(&self) -> bool {
        self.subs
            .values()
            .any(|s| s.spilled > 0 && s.removed_at.is_none() && s.ready.len() < MIN_READY)
            || self.replays.front().is_some_and(|r| {
                self.subs
                    .get(&r.subscription)
                    .is_some_and(|s| s.ready.len() < MIN_READY)
            })
    }

    /// Continues a spill recovered from the log.
    pub fn resume_spill(
        &mut self,
        spill: Spill,
        by_subscription: Vec<(String, u64)>,
        now: Instant,
    ) {
        for (sub, n) in by_subscription {
            self.sub_or_dormant(&sub, now).spilled += n;
        }
        self.last_reserved = self.last_reserved.max(spill.from.saturating_sub(1));
        self.spill = Some(spill);
    }

    /// What the next page-in reads: `(cursor, after, below)` — sequences above `after`, stopping at
    /// `below`, the first still being persisted.
    pub fn page_request(&self) -> Option<(Position, u64, u64)> {
        let spill = self.spill.as_ref()?;
        let below = self.appending.first().copied().unwrap_or(u64::MAX);
        Some((spill.cursor, spill.paged_through, below))
    }

    /// Held messages whose record is in a segment below `segment`, for relocation: at most `max`,
    /// with their owing subscriptions and attempts.
    pub fn to_relocate(&self, segment: u64, max: usize) -> Vec<Relocation> {
        self.messages
            .iter()
            .filter(|(_, e)| e.at.segment > 0 && e.at.segment < segment)
            .take(max)
            .map(|(seq, e)| Relocation {
                sequence: *seq,
                message: Arc::clone(&e.message),
                pending: e
                    .pending
                    .iter()
                    .map(|sub| (sub.clone(), self.attempts_of(sub, *seq)))
                    .collect(),
                from: e.at,
            })
            .collect()
    }

    /// A relocation of `sequence` from `from` wrote its copy at `to`: the message now lives there,
    /// and the old record is released — or, settled meanwhile, the copy is.
    ///
    /// Copies of one message may be on their way at once (compaction, a replay): the newest record
    /// is the one a restart believes, so the message lives at the latest position, and every other
    /// is released exactly once.
    pub fn relocated(&mut self, sequence: u64, to: Position) {
        match self.messages.get_mut(&sequence) {
            Some(entry) if to > entry.at => {
                self.released.push(entry.at);
                entry.at = to;
            }
            _ => self.released.push(to),
        }
    }

    /// Holds spilled messages read back from the log, in order.
    pub fn paged_in(&mut self, page: Page, now: Instant) -> Option<PagedIn> {
        let spill = self.spill.as_mut()?;
        let mut through = spill.paged_through;
        let mut messages = 0;
        let mut held = Vec::new();
        for paged in page.messages {
            if paged.sequence <= spill.paged_through || self.messages.contains_key(&paged.sequence)
            {
                continue;
            }
            spill.messages = spill.messages.saturating_sub(1);
            spill.bytes = spill.bytes.saturating_sub(u64::from(paged.at.len));
            through = through.max(paged.sequence);
            messages += 1;
            held.push(paged);
        }
        spill.paged_through = through;
        spill.cursor = page.resume;
        let ended = spill.messages == 0;
        if ended {
            self.spill = None;
        }
        for paged in held {
            for sub in &paged.pending {
                if let Some(state) = self.subs.get_mut(sub) {
                    state.spilled = state.spilled.saturating_sub(1);
                }
            }
            let pending = paged.pending.into_iter().map(|s| (s, 0)).collect();
            self.hold(
                paged.sequence,
                Arc::new(paged.message),
                pending,
                paged.at,
                now,
            );
        }
        Some(PagedIn {
            through,
            resume: page.resume,
            ended,
            messages,
        })
    }

    /// How long acked messages are kept after their publish, in ms (`retention.keepAcked`).
    pub fn keep_acked_ms(&self) -> Option<u64> {
        self.view
            .policy
            .as_ref()
            .and_then(|p| p.retention.as_ref())
            .and_then(|r| r.keep_acked.as_ref())
            .map(qmesh_proto::convert::std_duration)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Sequences up to `sequence` were given out before this state existed (by the owner's
    /// numbering, shared by its queues): a replay asked for now covers them.
    pub fn numbered_through(&mut self, sequence: u64) {
        self.last_reserved = self.last_reserved.max(sequence);
    }

    /// The highest sequence given out so far (what a replay asked for now covers).
    pub fn last_sequence(&self) -> u64 {
        self.last_reserved
    }

    /// Queues a replay of `subscription` from `from_ms`, through every message numbered so far.
    /// `None` when the subscription is not a route of the queue.
    pub fn rewind(&mut self, subscription: &str, from_ms: u64) -> Option<u64> {
        if !self
            .view
            .routes
            .iter()
            .any(|r| r.subscription == subscription)
        {
            return None;
        }
        let through = self.last_reserved;
        // A rewind of a subscription already waiting its turn widens that one (the one running
        // has scanned past where it started); the list stays bounded whoever asks how often.
        if let Some(waiting) = self
            .replays
            .iter_mut()
            .skip(1)
            .find(|r| r.subscription == subscription)
        {
            waiting.from_ms = waiting.from_ms.min(from_ms);
            waiting.through = waiting.through.max(through);
            return Some(through);
        }
        if self.replays.len() >= MAX_REPLAYS {
            return None;
        }
        self.replays
            .push_back(Replay::new(subscription.to_owned(), from_ms, through));
        Some(through)
    }

    /// Routes this owner has not served before, replayed from their `startAt` (none for
    /// `Latest`); every route is known afterwards. True when the known set changed.
    pub fn join_new_routes(&mut self) -> bool {
        let mut changed = false;
        let through = self.last_reserved;
        for route in &self.view.routes {
            if self.known.contains(&route.subscription) {
                continue;
            }
            changed = true;
            self.known.insert(route.subscription.clone());
            let from_ms = match route.start_at.as_ref().and_then(|s| s.from.as_ref()) {
                None => continue,
                Some(control::start_at::From::Earliest(_)) => 0,
                Some(control::start_at::From::Time(t)) => {
                    std::time::SystemTime::try_from(*t).map_or(0, retain::unix_ms)
                }
            };
            if through > 0 {
                self.replays
                    .push_back(Replay::new(route.subscription.clone(), from_ms, through));
            }
        }
        changed
    }

    /// Whether the replay at the front is waiting for spilled messages to be paged in.
    pub fn replay_waits(&self) -> bool {
        match (self.replays.front(), &self.spill) {
            (Some(r), Some(spill)) => r.waiting_for.is_some_and(|w| spill.paged_through < w),
            _ => false,
        }
    }

    /// Applies a page of the replay at the front to what is held: messages it covers are owed to
    /// its subscription again — held ones at once, settled ones still kept once their copy is
    /// written ([`QueueState::replay_copied`]). `None` without a replay.
    pub fn replay_page(&mut self, page: Page, now_ms: u64) -> Option<ReplayStep> {
        let mut replay = self.replays.pop_front()?;
        let keep = self.keep_acked_ms();
        let mut step = ReplayStep::default();
        replay.waiting_for = None;
        for paged in page.messages {
            if !paged.copy && replay.first_message.is_none() {
                replay.first_message = Some(paged.sequence);
            }
            if paged.copy && replay.first_message.is_some_and(|m| paged.sequence >= m) {
                continue;
            }
            if paged.sequence > replay.through
                || retain::published_ms(&paged.message) < replay.from_ms
                || !self
                    .routes_for(&paged.message)
                    .contains(&replay.subscription)
            {
                continue;
            }
            if let Some(spill) = &self.spill
                && paged.sequence >= spill.from
                && paged.sequence > spill.paged_through
                && !self.messages.contains_key(&paged.sequence)
            {
                // Spilled: owed to the subscription (or not) once it is held again.
                replay.cursor = Some(Position { len: 0, ..paged.at });
                replay.waiting_for = Some(paged.sequence);
                self.replays.push_front(replay);
                return Some(step);
            }
            if let Some(copy) = self.owe_again(&replay.subscription, paged.sequence) {
                step.owed += 1;
                step.copies.push(copy);
                continue;
            }
            if self.messages.contains_key(&paged.sequence)
                || self.appending.contains(&paged.sequence)
            {
                continue;
            }
            if keep.is_some_and(|k| retain::published_ms(&paged.message).saturating_add(k) > now_ms)
            {
                step.owed += 1;
                step.copies.push(ReplayCopy {
                    sequence: paged.sequence,
                    message: Arc::new(paged.message),
                    pending: vec![(replay.subscription.clone(), 0)],
                    held: false,
                });
            }
        }
        replay.cursor = Some(page.resume);
        step.done = page.at_end || page.stopped;
        if step.done {
            step.finished = Some(replay);
        } else {
            self.replays.push_front(replay);
        }
        Some(step)
    }

    /// A held message not owed to `subscription` is owed to it again; returns the copy that records
    /// it (with every owing subscription and its attempts).
    fn owe_again(&mut self, subscription: &str, sequence: u64) -> Option<ReplayCopy> {
        if self.evicting.contains(&sequence) {
            return None;
        }
        let entry = self.messages.get_mut(&sequence)?;
        if entry.pending.contains(subscription) {
            return None;
        }
        entry.pending.insert(subscription.to_owned());
        let message = Arc::clone(&entry.message);
        let owing: Vec<String> = entry.pending.iter().cloned().collect();
        self.subs.get_mut(subscription)?.ready.insert(sequence);
        let pending = owing
            .into_iter()
            .map(|sub| {
                let attempts = self.attempts_of(&sub, sequence);
                (sub, attempts)
            })
            .collect();
        Some(ReplayCopy {
            sequence,
            message,
            pending,
            held: true,
        })
    }

    /// Without a log to scan (`durability: Memory`), the replay at the front covers what is held,
    /// at once. Returns the messages owed again.
    pub fn replay_held(&mut self) -> usize {
        let Some(replay) = self.replays.pop_front() else {
            return 0;
        };
        let covered: Vec<u64> = self
            .messages
            .range(..=replay.through)
            .filter(|(_, e)| {
                retain::published_ms(&e.message) >= replay.from_ms
                    && self.routes_for(&e.message).contains(&replay.subscription)
            })
            .map(|(seq, _)| *seq)
            .collect();
        covered
            .into_iter()
            .filter(|seq| self.owe_again(&replay.subscription, *seq).is_some())
            .count()
    }

    /// The copy of a replayed message is written at `to`: a held one now lives there; a settled
    /// one is held again, owed to the replayed subscription.
    pub fn replay_copied(&mut self, copy: ReplayCopy, to: Position, now: Instant) {
        if copy.held || self.messages.contains_key(&copy.sequence) {
            if let Some(entry) = self.messages.get_mut(&copy.sequence) {
                for (sub, _) in &copy.pending {
                    if entry.pending.insert(sub.clone())
                        && let Some(state) = self.subs.get_mut(sub)
                    {
                        state.ready.insert(copy.sequence);
                    }
                }
            }
            self.relocated(copy.sequence, to);
            return;
        }
        self.hold(copy.sequence, copy.message, copy.pending, to, now);
    }

    /// Whether publishes wait for a replica's copy (`publishAck: Replicated`).
    pub fn replicated(&self) -> bool {
        self.view
            .policy
            .as_ref()
            .is_some_and(|p| p.publish_ack() == control::PublishAck::Replicated)
    }

    fn note_removed(&mut self, sequence: u64) {
        if self.replicated() {
            self.removed.push(sequence);
        }
    }

    /// The queue's policy (defaults if absent).
    pub fn policy(&self) -> control::QueuePolicy {
        self.view.policy.clone().unwrap_or_default()
    }

    fn ordered(&self) -> bool {
        self.view
            .policy
            .as_ref()
            .is_some_and(|p| p.ordering() == control::Ordering::Key)
    }

    fn route(&self, subscription: &str) -> Option<&control::Route> {
        self.view
            .routes
            .iter()
            .find(|r| r.subscription == subscription)
    }

    /// Applies a new view of the queue: new routes start empty (they see new messages only); a
    /// route missing from the view goes dormant — what it owes is kept, undelivered, and picked up
    /// again if it comes back (an invalid edit, a transient view). Only
    /// [`QueueState::drop_removed`] gives it up, after the removal grace.
    pub fn update_view(&mut self, view: control::QueueView, now: Instant) {
        let keep: HashSet<String> = view.routes.iter().map(|r| r.subscription.clone()).collect();
        for (name, state) in self.subs.iter_mut() {
            if keep.contains(name) {
                state.removed_at = None;
            } else if state.removed_at.is_none() {
                state.removed_at = Some(now);
            }
        }
        for sub in keep {
            self.subs.entry(sub).or_default();
        }
        self.view = view;
    }

    /// Subscriptions removed from the view for longer than `grace` are deleted, like a deleted
    /// queue in RabbitMQ: what they owed is settled. Returns (subscription, sequence) settled.
    pub fn drop_removed(&mut self, now: Instant, grace: Duration) -> Vec<(String, u64)> {
        let expired: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| {
                s.removed_at
                    .is_some_and(|at| now.duration_since(at) >= grace)
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut settled = Vec::new();
        for sub in expired {
            self.subs.remove(&sub);
            for (seq, entry) in self.messages.iter_mut() {
                if entry.pending.remove(&sub) {
                    settled.push((sub.clone(), *seq));
                }
            }
        }
        if !settled.is_empty() {
            self.collect_settled();
        }
        settled
    }

    /// Subscriptions a message with these headers must reach (after each route's filter).
    pub fn routes_for(&self, message: &v1::Message) -> Vec<String> {
        self.view
            .routes
            .iter()
            .filter(|r| {
                r.filter
                    .iter()
                    .all(|(k, v)| message.headers.get(k) == Some(v))
            })
            .map(|r| r.subscription.clone())
            .collect()
    }

    /// The queue's dedup window, if it has one.
    pub fn dedup_window(&self) -> Option<Duration> {
        self.policy()
            .dedup_window
            .map(|d| qmesh_proto::convert::std_duration(&d))
    }

    /// A previous publish of this id inside the window, if any: stored already, or still being
    /// persisted (then the duplicate waits for, and answers with, the original's outcome).
    pub fn duplicate_of(&mut self, id: &str, now: Instant) -> Option<Duplicate> {
        self.dedup_window()?;
        while let Some((until, old)) = self.dedup_order.front() {
            if *until > now && self.dedup_order.len() <= DEDUP_CAPACITY {
                break;
            }
            if self.dedup.get(old).is_some_and(|(_, u)| u == until) {
                self.dedup.remove(old);
                self.dedup_bytes = self.dedup_bytes.saturating_sub(dedup_cost(old));
            }
            self.dedup_order.pop_front();
        }
        let (sequence, until) = *self.dedup.get(id)?;
        if until <= now {
            return None;
        }
        if !self.appending.contains(&sequence) {
            return Some(Duplicate::Stored(sequence));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.dedup_waiters.entry(sequence).or_default().push(tx);
        Some(Duplicate::Pending(sequence, rx))
    }

    /// Remembers `id` for de-duplication until `until`.
    pub fn remember(&mut self, id: &str, sequence: u64, until: Instant) {
        if id.is_empty() {
            return;
        }
        if self
            .dedup
            .insert(id.to_owned(), (sequence, until))
            .is_none()
        {
            self.dedup_bytes += dedup_cost(id);
        }
        self.dedup_order.push_back((until, id.to_owned()));
    }

    /// Reserves `sequence` for a publish being persisted: its id counts for de-duplication at once,
    /// and (ordering: Key) nothing at or after it is dispatched until it is inserted or abandoned,
    /// so messages go out in publish order even when their appends complete out of order.
    pub fn reserve(&mut self, sequence: u64, id: &str, now: Instant) {
        self.appending.insert(sequence);
        self.last_reserved = self.last_reserved.max(sequence);
        if let Some(window) = self.dedup_window() {
            self.remember(id, sequence, later(now, window));
        }
    }

    /// Gives up a reservation whose append failed: duplicates waiting on it get the same error.
    pub fn abandon(&mut self, sequence: u64, id: &str, error: &BrokerError) {
        self.appending.remove(&sequence);
        if self.dedup.get(id).is_some_and(|(seq, _)| *seq == sequence) {
            self.dedup.remove(id);
            self.dedup_bytes = self.dedup_bytes.saturating_sub(dedup_cost(id));
        }
        for waiter in self.dedup_waiters.remove(&sequence).unwrap_or_default() {
            let _ = waiter.send(Err(error.clone()));
        }
    }

    /// Inserts a durable message owed to `pending` (reserved with [`QueueState::reserve`]), with
    /// attempts so far, recorded at `at`. Held in memory when `room`, or spilled — kept in the log
    /// only, to be paged in later — once memory is short (only when the log can page).
    pub fn insert(
        &mut self,
        sequence: u64,
        message: Arc<v1::Message>,
        pending: Vec<(String, u32)>,
        at: Position,
        room: bool,
        now: Instant,
    ) -> Placed {
        self.appending.remove(&sequence);
        for waiter in self.dedup_waiters.remove(&sequence).unwrap_or_default() {
            let _ = waiter.send(Ok(()));
        }
        self.published_total += 1;
        if pending.is_empty() {
            // Settled at once (no subscription wanted it): kept for replay like an acked one.
            self.settled.push((at, retain::published_ms(&message)));
            return Placed::Held;
        }
        if let Some(spill) = self.spill.as_mut()
            && sequence >= spill.from
        {
            spill.messages += 1;
            spill.bytes += u64::from(at.len);
            for (sub, _) in &pending {
                self.sub_or_dormant(sub, now).spilled += 1;
            }
            return Placed::Spilled;
        }
        let mut placed = Placed::Held;
        if !room && self.spill.is_none() {
            // Everything reserved so far is held (it is on its way); later ones are spilled. Their
            // records all follow this one's.
            let from = self.last_reserved.saturating_add(1);
            let cursor = at.end();
            self.spill = Some(Spill {
                from,
                cursor,
                paged_through: from - 1,
                messages: 0,
                bytes: 0,
            });
            placed = Placed::SpillStarted { from, cursor };
        }
        self.hold(sequence, message, pending, at, now);
        placed
    }

    /// The state of `sub`; one this view does not (yet) have is created dormant — what it is owed
    /// is kept for it (no allocation when it exists: this is on the publish path).
    fn sub_or_dormant(&mut self, sub: &str, now: Instant) -> &mut SubState {
        if !self.subs.contains_key(sub) {
            self.subs.insert(
                sub.to_owned(),
                SubState {
                    removed_at: Some(now),
                    ..SubState::default()
                },
            );
        }
        self.subs.get_mut(sub).expect("inserted above")
    }

    fn hold(
        &mut self,
        sequence: u64,
        message: Arc<v1::Message>,
        pending: Vec<(String, u32)>,
        at: Position,
        now: Instant,
    ) {
        let size = message_size(&message);
        self.newest_held_ms = self.newest_held_ms.max(retain::published_ms(&message));
        // A delayed message waits for its time like a retry waits out its backoff: one timer. Its
        // wall-clock time is turned into an instant against a reading of both clocks taken now —
        // not against `now`, which may be from before a slow write (that made it due early).
        let not_before = deliver_at_ms(&message).and_then(|at| {
            let (now_ms, mono) = (
                retain::unix_ms(std::time::SystemTime::now()),
                Instant::now(),
            );
            (at > now_ms).then(|| later(mono, Duration::from_millis(at - now_ms)))
        });
        let ordered = self.ordered();
        for (sub, attempts) in &pending {
            let state = self.sub_or_dormant(sub, now);
            match not_before {
                Some(due) => {
                    // Its key is busy until then, as for a retry: later messages of the key wait.
                    if ordered {
                        state.busy(&message.key);
                    }
                    state.waiting.push(Reverse((due, sequence)));
                }
                None => {
                    state.ready.insert(sequence);
                }
            }
            if *attempts > 0 {
                state.attempts.insert(sequence, *attempts);
            }
        }
        self.bytes += size;
        self.messages.insert(
            sequence,
            Entry {
                message,
                at,
                size,
                pending: pending.into_iter().map(|(s, _)| s).collect(),
                accepted: now,
            },
        );
    }

    /// Re-inserts a recovered message with its attempt counts (held: what the owner held before).
    pub fn restore(
        &mut self,
        sequence: u64,
        message: Arc<v1::Message>,
        pending: Vec<(String, u32)>,
        at: Position,
        now: Instant,
    ) {
        self.reserve(sequence, &message.id.clone(), now);
        self.insert(sequence, message, pending, at, true, now);
        self.published_total -= 1;
    }

    /// Decides deliveries: for each subscription, ready messages in order go to links with credit
    /// (`take_credit(link, subscription)` consumes one). Ordering keys in flight are skipped.
    pub fn dispatch(
        &mut self,
        now: Instant,
        links_for: &dyn Fn(&control::Route) -> Vec<u64>,
        take_credit: &mut dyn FnMut(u64, &str) -> bool,
    ) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let ordered = self.ordered();
        let routes: Vec<control::Route> = self.view.routes.clone();
        for route in &routes {
            let Some(state) = self.subs.get_mut(&route.subscription) else {
                continue;
            };
            if state.ready.is_empty() {
                continue;
            }
            let links = links_for(route);
            if links.is_empty() {
                continue;
            }
            let ack_timeout = route
                .ack_timeout
                .as_ref()
                .map(qmesh_proto::convert::std_duration)
                .unwrap_or(Duration::from_secs(30));
            // Round-robin over consumer sidecars carries on from the last dispatch, so competing
            // consumers share the load even when messages arrive one at a time.
            let mut next_link = state.next_link % links.len();
            let mut skipped_keys: HashSet<String> = HashSet::new();
            let mut taken = Vec::new();
            let mut scanned = 0usize;
            // Ordered queues never overtake a publish that is still being persisted.
            let horizon = if ordered {
                self.appending.first().copied()
            } else {
                None
            };
            for &seq in state.ready.iter() {
                scanned += 1;
                if scanned > 4096 || horizon.is_some_and(|h| seq > h) {
                    break;
                }
                let Some(entry) = self.messages.get(&seq) else {
                    continue;
                };
                let key = &entry.message.key;
                if ordered
                    && !key.is_empty()
                    && (state.busy_keys.contains_key(key) || skipped_keys.contains(key))
                {
                    skipped_keys.insert(key.clone());
                    continue;
                }
                // Find a link with credit, round-robin from where the last one left off.
                let mut chosen = None;
                for i in 0..links.len() {
                    let link = links[(next_link + i) % links.len()];
                    if take_credit(link, &route.subscription) {
                        chosen = Some(link);
                        next_link = (next_link + i + 1) % links.len();
                        break;
                    }
                }
                let Some(link) = chosen else { break };
                let attempt = state
                    .attempts
                    .get(&seq)
                    .copied()
                    .unwrap_or(0)
                    .saturating_add(1);
                taken.push((seq, link, attempt, Arc::clone(&entry.message)));
                if ordered && !key.is_empty() {
                    skipped_keys.insert(key.clone());
                }
            }
            state.next_link = next_link;
            for (seq, link, attempt, message) in taken {
                state.ready.remove(&seq);
                state.attempts.insert(seq, attempt);
                state.in_flight.insert(
                    seq,
                    InFlight {
                        attempt,
                        link,
                        deadline: later(now, ack_timeout.saturating_add(SETTLE_GRACE)),
                    },
                );
                if ordered {
                    state.busy(&message.key);
                }
                state.delivered_total += 1;
                if attempt > 1 {
                    state.redelivered_total += 1;
                }
                out.push(Outgoing {
                    link,
                    subscription: route.subscription.clone(),
                    sequence: seq,
                    attempt,
                    message,
                });
            }
        }
        out
    }

    /// An ack for one delivery attempt, received on `link`. Returns whether it settled the message
    /// for the subscription.
    ///
    /// The ack of the attempt in flight counts only from the link that attempt went out on. A late
    /// ack — of an attempt that already timed out or failed — still settles the message while the
    /// subscription owes it (the consumer did the work), provided it comes from a consumer of the
    /// subscription (`from_consumer`); a newer attempt in flight elsewhere is then forgotten and its
    /// settlement ignored.
    pub fn ack(
        &mut self,
        subscription: &str,
        sequence: u64,
        attempt: u32,
        link: u64,
        from_consumer: bool,
    ) -> bool {
        let ordered = self.ordered();
        let Some(state) = self.subs.get_mut(subscription) else {
            return false;
        };
        let Some(entry) = self.messages.get_mut(&sequence) else {
            return false;
        };
        if !entry.pending.contains(subscription) {
            return false;
        }
        let was_busy = match state.in_flight.get(&sequence) {
            Some(f) if f.attempt == attempt => {
                if f.link != link {
                    return false;
                }
                state.in_flight.remove(&sequence);
                true
            }
            _ if !from_consumer => return false,
            Some(_) => {
                state.in_flight.remove(&sequence);
                true
            }
            None => {
                state.dead_letter_retry.remove(&sequence);
                if state.ready.remove(&sequence) || state.parked.remove(&sequence) {
                    false
                } else {
                    let before = state.waiting.len();
                    state.waiting.retain(|Reverse((_, s))| *s != sequence);
                    state.waiting.len() != before
                }
            }
        };
        state.attempts.remove(&sequence);
        state.last_error.remove(&sequence);
        state.acked_total += 1;
        if ordered && was_busy {
            let key = entry.message.key.clone();
            state.free(&key);
        }
        entry.pending.remove(subscription);
        self.settle_if_done(sequence);
        true
    }

    /// A failed delivery (nack, timeout): schedule a redelivery after `delay`, or give up when the
    /// subscription's `maxDeliveries` is reached. `counted` false means the attempt does not count
    /// (the link was lost before the consumer could act).
    pub fn fail(
        &mut self,
        subscription: &str,
        sequence: u64,
        attempt: u32,
        failure: Failure<'_>,
        now: Instant,
        unit_random: f64,
    ) -> Option<DeadLetter> {
        let Failure {
            reason,
            delay,
            counted,
            link,
            dead_letter,
        } = failure;
        let ordered = self.ordered();
        let route = self.route(subscription).cloned();
        let state = self.subs.get_mut(subscription)?;
        match state.in_flight.get(&sequence) {
            Some(f) if f.attempt == attempt && link.is_none_or(|l| l == f.link) => {}
            _ => return None,
        }
        let Some(route) = route else {
            // A dormant subscription: back to ready, uncounted, for when it returns.
            state.in_flight.remove(&sequence);
            if let Some(entry) = self.messages.get(&sequence) {
                if ordered {
                    let key = entry.message.key.clone();
                    state.free(&key);
                }
                state.ready.insert(sequence);
            }
            return None;
        };
        state.in_flight.remove(&sequence);
        let entry = self.messages.get(&sequence)?;
        let key = entry.message.key.clone();
        if !counted {
            let n = state.attempts.entry(sequence).or_default();
            *n = n.saturating_sub(1);
        }
        state.last_error.insert(sequence, reason.to_owned());
        let attempts = state.attempts.get(&sequence).copied().unwrap_or(0);
        let retry = route.retry.unwrap_or_default();
        let max = retry.max_deliveries.max(1);
        if counted && (attempts >= max || dead_letter) {
            if ordered {
                state.free(&key);
            }
            let target =
                (!route.dead_letter_queue.is_empty()).then(|| route.dead_letter_queue.clone());
            if target.is_none() {
                state.parked.insert(sequence);
            }
            state.dead_lettered_total += 1;
            return Some(DeadLetter {
                subscription: subscription.to_owned(),
                sequence,
                message: Arc::clone(&entry.message),
                attempts,
                reason: if attempts >= max {
                    format!("max deliveries ({max}) reached")
                } else {
                    "rejected by the consumer".to_owned()
                },
                last_error: reason.to_owned(),
                target,
            });
        }
        let wait = match (counted, delay) {
            (false, _) => Duration::ZERO,
            (true, Some(d)) => d.min(MAX_NACK_DELAY),
            (true, None) => {
                let backoff = qmesh_api::Backoff {
                    initial: qmesh_api::Duration(
                        retry
                            .initial_backoff
                            .as_ref()
                            .map(qmesh_proto::convert::std_duration)
                            .unwrap_or(Duration::from_secs(1)),
                    ),
                    max: qmesh_api::Duration(
                        retry
                            .max_backoff
                            .as_ref()
                            .map(qmesh_proto::convert::std_duration)
                            .unwrap_or(Duration::from_secs(60)),
                    ),
                    multiplier: retry.multiplier.max(1),
                };
                qmesh_core::backoff::jittered_delay(&backoff, attempts.max(1), unit_random)
            }
        };
        if wait.is_zero() {
            if ordered {
                state.free(&key);
            }
            state.ready.insert(sequence);
        } else {
            // The key stays busy while waiting, so later messages of the key keep their order.
            state.waiting.push(Reverse((later(now, wait), sequence)));
        }
        None
    }

    /// Attempts so far of `sequence` for `subscription` (what the log keeps across restarts).
    pub fn attempts_of(&self, subscription: &str, sequence: u64) -> u32 {
        self.subs
            .get(subscription)
            .and_then(|s| s.attempts.get(&sequence))
            .copied()
            .unwrap_or(0)
    }

    /// Parks a dead letter its dead-letter queue refused and schedules another try.
    pub fn retry_dead_letter(&mut self, dl: &DeadLetter, error: &str, now: Instant) {
        let Some(state) = self.subs.get_mut(&dl.subscription) else {
            return;
        };
        if !self
            .messages
            .get(&dl.sequence)
            .is_some_and(|e| e.pending.contains(&dl.subscription))
        {
            return;
        }
        let tries = state
            .dead_letter_retry
            .get(&dl.sequence)
            .map_or(0, |r| r.tries)
            .saturating_add(1);
        let wait = Duration::from_secs(1 << tries.min(5));
        state.parked.insert(dl.sequence);
        state.last_error.insert(
            dl.sequence,
            format!("dead-letter queue refused it (try {tries}): {error}"),
        );
        state.dead_letter_retry.insert(
            dl.sequence,
            DeadLetterRetry {
                next: later(now, wait),
                tries,
                reason: dl.reason.clone(),
                last_error: dl.last_error.clone(),
                attempts: dl.attempts,
                target: dl.target.clone().unwrap_or_default(),
            },
        );
    }

    /// Dead letters due for another try at their dead-letter queue.
    pub fn due_dead_letters(&mut self, now: Instant) -> Vec<DeadLetter> {
        let mut due = Vec::new();
        for (name, state) in self.subs.iter_mut() {
            let ready: Vec<u64> = state
                .dead_letter_retry
                .iter()
                .filter(|(_, r)| r.next <= now)
                .map(|(s, _)| *s)
                .collect();
            for seq in ready {
                let Some(retry) = state.dead_letter_retry.get_mut(&seq) else {
                    continue;
                };
                // Not again until this try is answered.
                retry.next = later(now, Duration::from_secs(3600));
                let Some(entry) = self.messages.get(&seq) else {
                    state.dead_letter_retry.remove(&seq);
                    continue;
                };
                due.push(DeadLetter {
                    subscription: name.clone(),
                    sequence: seq,
                    message: Arc::clone(&entry.message),
                    attempts: retry.attempts,
                    reason: retry.reason.clone(),
                    last_error: retry.last_error.clone(),
                    target: Some(retry.target.clone()),
                });
            }
        }
        due
    }

    /// Settles a dead-lettered (or dropped) message for a subscription.
    pub fn settle_dead(&mut self, subscription: &str, sequence: u64) {
        if let Some(state) = self.subs.get_mut(subscription) {
            state.dead_letter_retry.remove(&sequence);
            state.parked.remove(&sequence);
            state.attempts.remove(&sequence);
            state.last_error.remove(&sequence);
        }
        if let Some(entry) = self.messages.get_mut(&sequence) {
            entry.pending.remove(subscription);
        }
        self.settle_if_done(sequence);
    }

    /// Moves due retries to ready, and in-flight deliveries past their deadline back to ready
    /// (counted as a failed attempt). Returns expired in-flight deliveries and the next wake-up.
    pub fn tick(&mut self, now: Instant) -> (Vec<(String, u64, u32)>, Option<Instant>) {
        let ordered = self.ordered();
        let mut timed_out = Vec::new();
        let mut next: Option<Instant> = None;
        for (name, state) in self.subs.iter_mut() {
            while let Some(Reverse((due, seq))) = state.waiting.peek().copied() {
                if due > now {
                    next = Some(next.map_or(due, |n| n.min(due)));
                    break;
                }
                state.waiting.pop();
                if let Some(entry) = self.messages.get(&seq) {
                    if ordered {
                        let key = entry.message.key.clone();
                        state.free(&key);
                    }
                    state.ready.insert(seq);
                }
            }
            for (seq, f) in state.in_flight.iter() {
                if f.deadline <= now {
                    timed_out.push((name.clone(), *seq, f.attempt));
                } else {
                    next = Some(next.map_or(f.deadline, |n| n.min(f.deadline)));
                }
            }
        }
        (timed_out, next)
    }

    /// Deliveries that went out on a lost link go back to ready, uncounted.
    pub fn link_lost(&mut self, link: u64) -> Vec<(String, u64, u32)> {
        self.subs
            .iter()
            .flat_map(|(name, state)| {
                state
                    .in_flight
                    .iter()
                    .filter(|(_, f)| f.link == link)
                    .map(|(seq, f)| (name.clone(), *seq, f.attempt))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Claims the oldest unsettled message not already being evicted, for overflow handling: it
    /// stays owed until [`QueueState::evict`] or [`QueueState::unclaim`].
    pub fn claim_oldest(&mut self) -> Option<(u64, Arc<v1::Message>)> {
        let (seq, message) = self
            .messages
            .iter()
            .find(|(seq, _)| !self.evicting.contains(seq))
            .map(|(seq, e)| (*seq, Arc::clone(&e.message)))?;
        self.evicting.insert(seq);
        Some((seq, message))
    }

    /// Claims `sequence` for eviction; false if another eviction has it.
    pub fn claim(&mut self, sequence: u64) -> bool {
        self.messages.contains_key(&sequence) && self.evicting.insert(sequence)
    }

    /// Gives up a claim (the dead-letter queue refused the message: it stays).
    pub fn unclaim(&mut self, sequence: u64) {
        self.evicting.remove(&sequence);
    }

    /// Messages older than `max_age`, with the subscriptions that still owe them.
    pub fn expired(
        &self,
        now: Instant,
        max_age: Duration,
    ) -> Vec<(u64, Arc<v1::Message>, Vec<String>)> {
        self.messages
            .iter()
            .take_while(|(_, e)| now.duration_since(e.accepted) >= max_age)
            .map(|(seq, e)| {
                (
                    *seq,
                    Arc::clone(&e.message),
                    e.pending.iter().cloned().collect(),
                )
            })
            .collect()
    }

    /// What each subscription owes for `sequence`: (subscription, attempts, state, last error).
    pub fn held_for(&self, sequence: u64) -> Vec<(String, u32, &'static str, String)> {
        let Some(entry) = self.messages.get(&sequence) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entry
            .pending
            .iter()
            .filter_map(|sub| {
                let state = self.subs.get(sub)?;
                let where_ = if state.in_flight.contains_key(&sequence) {
                    "in-flight"
                } else if state.parked.contains(&sequence) {
                    "parked"
                } else if state.ready.contains(&sequence) {
                    "ready"
                } else {
                    "waiting"
                };
                Some((
                    sub.clone(),
                    state.attempts.get(&sequence).copied().unwrap_or(0),
                    where_,
                    state.last_error.get(&sequence).cloned().unwrap_or_default(),
                ))
            })
            .collect();
        out.sort();
        out
    }

    /// Whether a consumer holds `sequence` now.
    pub fn in_flight_anywhere(&self, sequence: u64) -> bool {
        self.subs
            .values()
            .any(|s| s.in_flight.contains_key(&sequence))
    }

    /// Makes a parked `sequence` ready again with its delivery count reset; returns how many
    /// subscriptions had it parked.
    pub fn unpark(&mut self, sequence: u64) -> usize {
        let mut unparked = 0;
        for state in self.subs.values_mut() {
            if state.parked.remove(&sequence) {
                state.dead_letter_retry.remove(&sequence);
                state.attempts.remove(&sequence);
                state.last_error.remove(&sequence);
                state.ready.insert(sequence);
                unparked += 1;
            }
        }
        unparked
    }

    /// Removes a message a tool took away (redriven to another queue, or purged); returns the
    /// subscriptions that owed it.
    pub fn remove_held(&mut self, sequence: u64) -> Vec<String> {
        let owed = self.evict(sequence);
        for (sub, _) in &owed {
            if let Some(state) = self.subs.get_mut(sub) {
                // `evict` counts a dead letter; a redrive or purge is not one.
                state.dead_lettered_total = state.dead_lettered_total.saturating_sub(1);
            }
        }
        owed.into_iter().map(|(sub, _)| sub).collect()
    }

    /// Removes a message from every subscription's bookkeeping (overflow, expiry) — the caller
    /// dead-letters or counts it.
    pub fn evict(&mut self, sequence: u64) -> Vec<(String, u32)> {
        self.evicting.remove(&sequence);
        let ordered = self.ordered();
        let Some(entry) = self.messages.get(&sequence) else {
            return Vec::new();
        };
        let key = entry.message.key.clone();
        let subs: Vec<String> = entry.pending.iter().cloned().collect();
        let mut owed = Vec::new();
        for sub in subs {
            if let Some(state) = self.subs.get_mut(&sub) {
                let was_busy = state.in_flight.remove(&sequence).is_some()
                    || state.waiting.iter().any(|Reverse((_, s))| *s == sequence);
                state.ready.remove(&sequence);
                state.waiting.retain(|Reverse((_, s))| *s != sequence);
                state.parked.remove(&sequence);
                state.dead_letter_retry.remove(&sequence);
                if ordered && was_busy {
                    state.free(&key);
                }
                owed.push((sub.clone(), state.attempts.remove(&sequence).unwrap_or(0)));
                state.last_error.remove(&sequence);
                state.dead_lettered_total += 1;
            }
        }
        if let Some(entry) = self.messages.remove(&sequence) {
            self.bytes -= entry.size;
            self.released.push(entry.at);
            self.note_removed(sequence);
        }
        owed
    }

    fn settle_if_done(&mut self, sequence: u64) {
        if self
            .messages
            .get(&sequence)
            .is_some_and(|e| e.pending.is_empty())
            && let Some(entry) = self.messages.remove(&sequence)
        {
            self.bytes -= entry.size;
            self.settled
                .push((entry.at, retain::published_ms(&entry.message)));
            self.note_removed(sequence);
        }
    }

    fn collect_settled(&mut self) {
        let done: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, e)| e.pending.is_empty())
            .map(|(s, _)| *s)
            .collect();
        for seq in done {
            if let Some(entry) = self.messages.remove(&seq) {
                self.bytes -= entry.size;
                self.settled
                    .push((entry.at, retain::published_ms(&entry.message)));
                self.note_removed(seq);
            }
        }
    }
}

/// What the owner keeps per unsettled message beside its bytes (the entry, its index nodes, the
/// per-subscription sets), counted against the sidecar's memory bound.
pub const ENTRY_OVERHEAD: u64 = 320;

/// What one remembered id costs in memory (the map entry and its place in the expiry order).
fn dedup_cost(id: &str) -> u64 {
    2 * id.len() as u64 + 96
}

/// Bytes a message counts for: payload, headers, id and key.
pub fn message_size(message: &v1::Message) -> u64 {
    let headers: usize = message.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (message.payload.len() + headers + message.id.len() + message.key.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> QueueState {
        QueueState::new(control::QueueView {
            name: "q".into(),
            routes: vec![control::Route {
                subscription: "s".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn at(offset: u64) -> Position {
        Position {
            segment: 1,
            offset,
            len: 100,
        }
    }

    fn publish(q: &mut QueueState, seq: u64, room: bool) -> Placed {
        q.reserve(seq, &format!("m{seq}"), Instant::now());
        q.insert(
            seq,
            Arc::new(v1::Message::default()),
            vec![("s".into(), 0)],
            at(seq * 100),
            room,
            Instant::now(),
        )
    }

    #[test]
    fn a_delayed_message_waits_in_the_retry_heap_until_its_time_and_holds_its_key() {
        let mut q = QueueState::new(control::QueueView {
            name: "q".into(),
            routes: vec![control::Route {
                subscription: "s".into(),
                ..Default::default()
            }],
            policy: Some(control::QueuePolicy {
                ordering: control::Ordering::Key as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        let now = Instant::now();
        let in_2s = retain::unix_ms(std::time::SystemTime::now()) + 2_000;
        let mut delayed = v1::Message {
            id: "later".into(),
            key: "k".into(),
            ..Default::default()
        };
        delayed
            .headers
            .insert(DELIVER_AT_HEADER.into(), in_2s.to_string());
        q.reserve(1, "later", now);
        q.insert(
            1,
            Arc::new(delayed),
            vec![("s".into(), 0)],
            at(100),
            true,
            now,
        );
        let plain = v1::Message {
            id: "next".into(),
            key: "k".into(),
            ..Default::default()
        };
        q.reserve(2, "next", now);
        q.insert(
            2,
            Arc::new(plain),
            vec![("s".into(), 0)],
            at(200),
            true,
            now,
        );
        assert_eq!(q.subs["s"].scheduled(), 1);
        // Nothing goes out: 1 waits for its time, 2 for its key.
        assert!(q.dispatch(now, &|_| vec![7], &mut |_, _| true).is_empty());
        let (_, next) = q.tick(now);
        let wake = next.expect("a wake-up at the due time");
        assert!(
            wake >= now + Duration::from_millis(1_900)
                && wake <= now + Duration::from_millis(2_100)
        );
        // Due: 1 first, then 2 once 1 is settled.
        let later = now + Duration::from_millis(2_100);
        q.tick(later);
        let out = q.dispatch(later, &|_| vec![7], &mut |_, _| true);
        assert_eq!(out.iter().map(|o| o.sequence).collect::<Vec<_>>(), [1]);
        assert_eq!(q.subs["s"].scheduled(), 0);
    }

    #[test]
    fn a_delayed_message_placed_after_a_slow_write_is_not_due_early() {
        // The publish began 300 ms before its message is placed (a slow fsync, a replica): its due
        // time is the wall-clock time it asked for, not 300 ms earlier.
        let mut q = state();
        let began = Instant::now() - Duration::from_millis(300);
        let in_1s = retain::unix_ms(std::time::SystemTime::now()) + 1_000;
        let mut delayed = v1::Message {
            id: "later".into(),
            ..Default::default()
        };
        delayed
            .headers
            .insert(DELIVER_AT_HEADER.into(), in_1s.to_string());
        q.reserve(1, "later", began);
        q.insert(
            1,
            Arc::new(delayed),
            vec![("s".into(), 0)],
            at(100),
            true,
            began,
        );
        let (_, next) = q.tick(Instant::now());
        let wake = next.expect("a wake-up at the due time");
        let left = wake.saturating_duration_since(Instant::now());
        assert!(
            left >= Duration::from_millis(900),
            "due in {left:?}, asked for 1 s from now"
        );
    }

    #[test]
    fn a_rejected_delivery_is_dead_lettered_at_once_with_attempts_to_spare() {
        let mut q = QueueState::new(control::QueueView {
            name: "q".into(),
            routes: vec![control::Route {
                subscription: "s".into(),
                dead_letter_queue: "dlq".into(),
                retry: Some(control::RetryPolicy {
                    max_deliveries: 5,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        publish(&mut q, 1, true);
        let now = Instant::now();
        let out = q.dispatch(now, &|_| vec![7], &mut |_, _| true);
        assert_eq!(out.len(), 1);
        let dl = q
            .fail(
                "s",
                1,
                out[0].attempt,
                Failure::rejected("bad input").on(7),
                now,
                0.5,
            )
            .expect("dead-lettered on the first attempt");
        assert_eq!(dl.attempts, 1);
        assert_eq!(dl.reason, "rejected by the consumer");
        assert_eq!(dl.last_error, "bad input");
        assert_eq!(dl.target.as_deref(), Some("dlq"));
        // A plain nack of the same kind would have been retried.
        publish(&mut q, 2, true);
        let out = q.dispatch(now, &|_| vec![7], &mut |_, _| true);
        assert!(
            q.fail(
                "s",
                2,
                out[0].attempt,
                Failure::counted("try again", None).on(7),
                now,
                0.5
            )
            .is_none()
        );
    }

    #[test]
    fn a_full_memory_spills_the_newer_messages_and_a_page_in_holds_them_again_in_order() {
        let mut q = state();
        assert_eq!(publish(&mut q, 1, true), Placed::Held);
        // Memory is full when 2 completes; 3 was reserved before, so it is still held.
        q.reserve(3, "m3", Instant::now());
        let started = q.insert(
            2,
            Arc::new(v1::Message::default()),
            vec![("s".into(), 0)],
            at(200),
            false,
            Instant::now(),
        );
        assert_eq!(
            started,
            Placed::SpillStarted {
                from: 4,
                cursor: at(200).end()
            }
        );
        assert_eq!(
            q.insert(
                3,
                Arc::new(v1::Message::default()),
                vec![("s".into(), 0)],
                at(300),
                true,
                Instant::now()
            ),
            Placed::Held
        );
        assert_eq!(publish(&mut q, 4, true), Placed::Spilled);
        assert_eq!(publish(&mut q, 5, true), Placed::Spilled);
        assert_eq!((q.messages.len(), q.backlog()), (3, 5));
        assert_eq!(q.subs["s"].backlog(), 5);
        let (cursor, after, below) = q.page_request().unwrap();
        assert_eq!((cursor, after, below), (at(200).end(), 3, u64::MAX));
        // The log gives 4 back first, then 5: the spill ends once both are held.
        let page = |seq: u64| Page {
            messages: vec![qmesh_store::Paged {
                sequence: seq,
                at: at(seq * 100),
                message: v1::Message::default(),
                pending: vec!["s".into()],
                copy: false,
            }],
            resume: at(seq * 100).end(),
            bytes_read: 100,
            at_end: false,
            stopped: false,
        };
        let first = q.paged_in(page(4), Instant::now()).unwrap();
        assert_eq!((first.through, first.ended), (4, false));
        let again = q.paged_in(page(4), Instant::now()).unwrap();
        assert_eq!(again.messages, 0, "a message is never held twice");
        let last = q.paged_in(page(5), Instant::now()).unwrap();
        assert!(last.ended);
        assert!(q.spill.is_none());
        assert_eq!(
            q.subs["s"].ready.iter().copied().collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(publish(&mut q, 6, true), Placed::Held);
    }

    #[test]
    fn the_oldest_owed_message_is_dated_by_its_publish_time_and_a_spilled_backlog_by_the_newest_held()
     {
        let published = |seq: u64, ms: u64| {
            Arc::new(v1::Message {
                id: format!("m{seq}"),
                publish_time: Some(prost_types::Timestamp {
                    seconds: (ms / 1000) as i64,
                    nanos: ((ms % 1000) * 1_000_000) as i32,
                }),
                ..Default::default()
            })
        };
        let now = Instant::now();
        let mut q = state();
        assert_eq!(q.oldest_owed_ms("s", 9_000, now), None, "owes nothing");
        assert_eq!(q.oldest_owed_ms("nobody", 9_000, now), None);
        q.reserve(1, "m1", now);
        q.insert(
            1,
            published(1, 1_000),
            vec![("s".into(), 0)],
            at(100),
            true,
            now,
        );
        q.reserve(2, "m2", now);
        // Memory is full once 2 is written: 3 on is spilled.
        q.insert(
            2,
            published(2, 2_000),
            vec![("s".into(), 0)],
            at(200),
            false,
            now,
        );
        q.reserve(3, "m3", now);
        let placed = q.insert(
            3,
            published(3, 3_000),
            vec![("s".into(), 0)],
            at(300),
            true,
            now,
        );
        assert_eq!(placed, Placed::Spilled);
        assert_eq!(q.oldest_owed_ms("s", 9_000, now), Some(1_000));
        // In flight, waiting or parked, it is still owed.
        let s = q.subs.get_mut("s").unwrap();
        s.ready.remove(&1);
        s.in_flight.insert(
            1,
            InFlight {
                attempt: 1,
                link: 1,
                deadline: now,
            },
        );
        assert_eq!(q.oldest_owed_ms("s", 9_000, now), Some(1_000));
        let s = q.subs.get_mut("s").unwrap();
        s.in_flight.remove(&1);
        s.waiting.push(Reverse((now, 1)));
        assert_eq!(q.oldest_owed_ms("s", 9_000, now), Some(1_000));
        let s = q.subs.get_mut("s").unwrap();
        s.waiting.clear();
        s.parked.insert(1);
        assert_eq!(q.oldest_owed_ms("s", 9_000, now), Some(1_000));
        // 1 and 2 settled: only the spilled 3 is owed, dated by 2, the newest held (3 is newer).
        let s = q.subs.get_mut("s").unwrap();
        s.parked.clear();
        s.ready.clear();
        assert_eq!(q.subs["s"].spilled, 1);
        assert_eq!(q.oldest_owed_ms("s", 9_000, now), Some(2_000));

        // Without a publish time, the owner's own acceptance dates it.
        let mut q = state();
        let accepted = now.checked_sub(Duration::from_secs(4)).unwrap_or(now);
        q.reserve(1, "m1", accepted);
        q.insert(
            1,
            Arc::new(v1::Message::default()),
            vec![("s".into(), 0)],
            at(100),
            true,
            accepted,
        );
        let age = 9_000 - q.oldest_owed_ms("s", 9_000, now).unwrap();
        assert_eq!(
            age,
            u64::try_from(now.duration_since(accepted).as_millis()).unwrap()
        );
    }

    #[test]
    fn settled_and_relocated_records_are_released_exactly_once() {
        let mut q = state();
        publish(&mut q, 1, true);
        publish(&mut q, 2, true);
        let moving = q.to_relocate(2, 10);
        assert_eq!(moving.len(), 2);
        let to = Position {
            segment: 5,
            offset: 0,
            len: 100,
        };
        let later = Position { offset: 500, ..to };
        // Two copies of 1 on their way (compaction and a replay), the later written first: the
        // message lives at the later one, and the original and the earlier copy go, once each.
        q.relocated(1, later);
        q.relocated(1, to);
        assert_eq!(q.released, vec![at(100), to], "the old copies of 1 go");
        assert_eq!(q.messages[&1].at, later);
        q.released.clear();
        // 2 is settled before its copy is written: the copy goes, and the original is handed
        // over as settled (kept for replay, or released), not released twice.
        q.settle_dead("s", 2);
        q.relocated(2, to);
        assert_eq!(q.released, vec![to]);
        assert_eq!(q.settled, vec![(moving[1].from, 0)]);
    }

    fn scanned(records: &[(u64, bool)], end: bool) -> Page {
        Page {
            messages: records
                .iter()
                .map(|&(seq, copy)| qmesh_store::Paged {
                    sequence: seq,
                    at: at(seq * 100),
                    message: v1::Message {
                        publish_time: Some(std::time::SystemTime::now().into()),
                        ..Default::default()
                    },
                    pending: vec!["s".into()],
                    copy,
                })
                .collect(),
            resume: at(10_000),
            bytes_read: 0,
            at_end: end,
            stopped: false,
        }
    }

    #[test]
    fn a_new_subscription_starting_at_earliest_is_owed_what_is_held_and_what_is_kept() {
        let mut q = state();
        q.view.policy = Some(control::QueuePolicy {
            retention: Some(control::Retention {
                keep_acked: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        for seq in 1..=3 {
            publish(&mut q, seq, true);
        }
        q.settle_dead("s", 1);
        assert_eq!(
            q.settled.len(),
            1,
            "1 is settled everywhere, for the owner to keep"
        );
        let mut view = q.view.clone();
        view.routes.push(control::Route {
            subscription: "audit".into(),
            start_at: Some(control::StartAt {
                from: Some(control::start_at::From::Earliest(true)),
            }),
            ..Default::default()
        });
        q.update_view(view, Instant::now());
        assert!(q.join_new_routes());
        assert!(!q.join_new_routes(), "a route is joined once");
        assert_eq!(q.replays.len(), 1);
        assert_eq!(q.replays[0].through, 3);
        // The scan meets 1 (kept), 2 and 3 (held), and a relocated copy of 2 (a second sighting).
        let now_ms = retain::unix_ms(std::time::SystemTime::now());
        let step = q
            .replay_page(
                scanned(&[(1, false), (2, false), (3, false), (2, true)], true),
                now_ms,
            )
            .unwrap();
        assert!(step.done && step.finished.is_some() && q.replays.is_empty());
        let owed: Vec<(u64, bool)> = step.copies.iter().map(|c| (c.sequence, c.held)).collect();
        assert_eq!(owed, [(1, false), (2, true), (3, true)]);
        assert!(step.copies[1].pending.iter().any(|(s, _)| s == "audit"));
        for (i, copy) in step.copies.into_iter().enumerate() {
            q.replay_copied(copy, at(20_000 + i as u64 * 100), Instant::now());
        }
        assert_eq!(
            q.subs["audit"].ready.iter().copied().collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(
            !q.messages[&1].pending.contains("s"),
            "1 is owed to audit only"
        );
        assert_eq!(q.messages[&2].at, at(20_100), "2 lives at its newest copy");
        assert!(q.released.contains(&at(200)));
    }

    #[test]
    fn a_replay_passes_over_what_is_no_longer_kept_and_waits_for_spilled_messages() {
        let mut q = state();
        publish(&mut q, 1, true);
        q.settle_dead("s", 1);
        publish(&mut q, 2, true);
        q.reserve(3, "m3", Instant::now());
        let _ = q.insert(
            3,
            Arc::new(v1::Message::default()),
            vec![("s".into(), 0)],
            at(300),
            false,
            Instant::now(),
        );
        assert!(q.spill.is_some());
        publish(&mut q, 4, true);
        assert_eq!(q.rewind("s", 0), Some(4));
        assert_eq!(q.rewind("nobody", 0), None);
        // Rewinding again while one waits widens the waiting one: the list stays bounded.
        assert_eq!(q.rewind("s", 5), Some(4));
        assert_eq!(q.rewind("s", 9), Some(4));
        assert_eq!(q.replays.len(), 2);
        assert_eq!(q.replays[1].from_ms, 5);
        q.replays.truncate(1);
        // 1 is settled and the queue keeps nothing acked; 2 and 3 are owed to s already; 4 is
        // spilled: the scan stops there until it is paged in.
        let step = q
            .replay_page(
                scanned(&[(1, false), (2, false), (3, false), (4, false)], true),
                0,
            )
            .unwrap();
        assert!(step.copies.is_empty() && !step.done);
        assert!(q.replay_waits());
        assert_eq!(q.replays[0].cursor, Some(Position { len: 0, ..at(400) }));
    }
}
