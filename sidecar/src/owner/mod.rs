//! The owner: every message published to this sidecar is persisted here, routed to each
//! subscription, forwarded to consumer sidecars against their credits, and kept until each
//! subscription settled it. Retries, backoff, dead-lettering, expiry, overflow and de-duplication
//! are decided here and nowhere else — one state machine per queue ([`queue::QueueState`]).
//!
//! ```text
//!   app publish ──▶ Owner::publish ──log.append (durable)──▶ QueueState::insert ──wake──▶ queue task
//!   queue task: tick (retries, timeouts, expiry) ▸ dispatch (credits) ──▶ Links ──▶ consumer sidecars
//!   Links ──LinkEvent (credit, settlements, lost)──▶ event task ──▶ QueueState::{ack, fail, link_lost}
//!   publishAck: Replicated: publish ──copy──▶ Replicas ══Replicate══▶ replica sidecar; the publish is
//!     answered once both the log and the replica have it; settlements and the floor follow
//! ```

pub mod held;
pub use held::browse_limit;
pub mod links;
pub mod log;
pub mod queue;
pub mod replicas;
pub mod retain;
pub mod transactions;

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use governor::{DefaultDirectRateLimiter, Quota, clock::Clock};
use qmesh_proto::{control, peer, v1};
use tokio::sync::{Notify, mpsc};

use crate::{
    error::BrokerError,
    identity::Dialer,
    metrics::Metrics,
    supervise::Supervisor,
    view::{View, ViewRx},
};
use links::{LinkEvent, Links};
use log::{Outcome, OwnerLog};
use queue::{DeadLetter, Failure, QueueState};
use replicas::{Pick, Replicas};

/// Who the owner is and how it behaves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This sidecar, as peers know it.
    pub me: peer::SidecarId,
    /// Bounds on what it holds.
    pub limits: Limits,
    /// How long a `publishAck: Replicated` publish waits for a replica.
    pub replica_timeout: Duration,
    /// How long a subscription may be missing from the view before what it owes is dropped.
    pub removed_grace: Duration,
    /// Dials peers (consumers, replicas).
    pub dialer: Arc<Dialer>,
    /// Bounds on open transactions.
    pub transactions: transactions::TransactionLimits,
    /// Replaces every Queue's `transaction.checkPort` (`qmesh run --app-port`).
    pub app_port: Option<u16>,
}

/// Sidecar-wide bounds on what the owner holds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes of unsettled messages over all queues, held or spilled (the disk budget).
    pub max_bytes: u64,
    /// Most unsettled messages over all queues.
    pub max_messages: u64,
    /// Most memory the held messages, their bookkeeping and remembered ids take: beyond it, disk
    /// queues spill their newest messages to the log and memory queues refuse publishes.
    pub memory: u64,
}

struct OwnedQueue {
    state: Mutex<QueueState>,
    wake: Notify,
    log: Arc<dyn OwnerLog>,
    limiter: Mutex<Option<(control::RateLimit, Arc<DefaultDirectRateLimiter>)>>,
    /// One page-in at a time.
    paging: tokio::sync::Mutex<()>,
}

impl OwnedQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The owner of this sidecar's messages.
pub struct Owner {
    view: ViewRx,
    dialer: Arc<Dialer>,
    disk: Arc<dyn OwnerLog>,
    memory: Arc<dyn OwnerLog>,
    queues: RwLock<HashMap<String, Arc<OwnedQueue>>>,
    links: Arc<Links>,
    limits: Limits,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    recovered: Mutex<HashMap<String, Vec<log::Recovered>>>,
    spills: Mutex<HashMap<String, log::RecoveredSpill>>,
    remembered: Mutex<HashMap<String, Vec<log::Remembered>>>,
    /// Settled records still in the log at start, per queue: kept for replay or released.
    retained: Mutex<HashMap<String, Vec<log::RetainedRun>>>,
    /// What each queue remembered beside the log at start (subscriptions served, replays).
    memos: Mutex<HashMap<String, retain::QueueMemo>>,
    /// One save of the state file at a time, in order.
    memo_saving: Mutex<()>,
    next_sequence: std::sync::atomic::AtomicU64,
    replicas: Arc<Replicas>,
    tasks: Arc<Supervisor>,
    removed_grace: Duration,
    /// A hand-over is running: no new deliveries.
    handing_over: AtomicBool,
    /// Bytes and messages of publishes and adoptions admitted and not yet in a queue's state.
    admitted: Mutex<(u64, u64)>,
    /// Open transactions and their half messages.
    transactions: transactions::Transactions,
}

/// A message's place in the memory bound while it is being persisted.
struct Admission<'a> {
    owner: &'a Owner,
    cost: u64,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let mut admitted = self
            .owner
            .admitted
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        admitted.0 = admitted.0.saturating_sub(self.cost);
        admitted.1 = admitted.1.saturating_sub(1);
    }
}

/// Runs a future inline; if it is dropped before the end (its caller went away), the rest runs in a
/// task of its own. What a publish started — a reserved sequence, a queued record — is finished
/// either way, without a task per publish on the normal path.
struct RunToEnd<F: Future + Send + 'static>(Option<std::pin::Pin<Box<F>>>)
where
    F::Output: Send;

impl<F: Future + Send + 'static> RunToEnd<F>
where
    F::Output: Send,
{
    fn new(future: F) -> Self {
        Self(Some(Box::pin(future)))
    }
}

impl<F: Future + Send + 'static> Future for RunToEnd<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let Some(future) = self.0.as_mut() else {
            return std::task::Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        if let Some(future) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(future);
        }
    }
}

/// Most bytes one page-in reads.
const PAGE_IN_BYTES: usize = 4 * 1024 * 1024;

/// Least bytes one page-in reads (at least one message is always read).
const MIN_PAGE_IN_BYTES: usize = 64 * 1024;

/// Most messages relocated per queue per second.
const RELOCATE_BATCH: usize = 10_000;

/// Headers set on dead letters.
pub mod headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "qmesh-dead-letter-reason";
    /// Queue it was first published to.
    pub const ORIGINAL_QUEUE: &str = "qmesh-original-queue";
    /// Subscription that gave up on it (empty for expiry / overflow).
    pub const ORIGINAL_SUBSCRIPTION: &str = "qmesh-original-subscription";
    /// Deliveries attempted.
    pub const DELIVERY_COUNT: &str = "qmesh-delivery-count";
    /// The last delivery error.
    pub const LAST_ERROR: &str = "qmesh-last-error";
    /// The id a dead letter or a redriven message had before (each gets a fresh one).
    pub const ORIGINAL_ID: &str = "qmesh-original-id";
    /// The dead-letter queue a redriven message came back from.
    pub const REDRIVEN_FROM: &str = "qmesh-redriven-from";

    /// Why a message taken over from a peer may not carry its reserved headers, if it may not:
    /// only the broker sets `qmesh-` headers, so an adopted message carries only those the broker
    /// could have set on a message of `queue` — the dead-letter ones only in a queue `dead_letters`
    /// says is the dead-letter queue of the queue they name, the redrive ones and a delayed
    /// message's time anywhere.
    pub fn forged(
        queue: &str,
        headers: &std::collections::HashMap<String, String>,
        dead_letters_into: impl Fn(&str) -> bool,
    ) -> Option<String> {
        for name in headers.keys() {
            let lower = name.to_ascii_lowercase();
            if !lower.starts_with(crate::RESERVED_HEADER_PREFIX) {
                continue;
            }
            match lower.as_str() {
                ORIGINAL_ID | REDRIVEN_FROM | super::transactions::TRANSACTION_HEADER => {}
                // A delayed message's time travels with it (the owner set it within maxDelay).
                super::queue::DELIVER_AT_HEADER => {
                    if headers[name].parse::<u64>().is_err() {
                        return Some(format!("its {name} is not a time in unix milliseconds"));
                    }
                }
                REASON | ORIGINAL_SUBSCRIPTION | DELIVERY_COUNT | LAST_ERROR | ORIGINAL_QUEUE => {
                    let origin = headers.get(ORIGINAL_QUEUE).map_or("", String::as_str);
                    if origin.is_empty() || !dead_letters_into(origin) {
                        return Some(format!(
                            "it carries the dead-letter header {name} but queue {queue:?} is not \
                             the dead-letter queue of {origin:?}"
                        ));
                    }
                }
                _ => return Some(format!("it carries the reserved header {name}")),
            }
        }
        None
    }
}

impl Owner {
    /// Starts the owner: recovers what the disk log holds, then runs one task per queue and one for
    /// link events, all under `tasks`.
    pub fn start(
        view: ViewRx,
        disk: Arc<dyn OwnerLog>,
        memory: Arc<dyn OwnerLog>,
        settings: Settings,
        metrics: Arc<Metrics>,
        tasks: Arc<Supervisor>,
    ) -> Arc<Self> {
        let Settings {
            me,
            limits,
            replica_timeout,
            removed_grace,
            dialer,
            transactions,
            app_port,
        } = settings;
        let (events_tx, events_rx) = mpsc::channel(8192);
        let replicas = Replicas::new(
            me.clone(),
            replica_timeout,
            Arc::clone(&tasks),
            Arc::clone(&dialer),
        );
        let owner = Arc::new(Self {
            view,
            disk,
            memory,
            queues: RwLock::new(HashMap::new()),
            links: Links::new(me, events_tx, Arc::clone(&tasks), Arc::clone(&dialer)),
            dialer,
            limits,
            draining: AtomicBool::new(false),
            metrics,
            recovered: Mutex::new(HashMap::new()),
            spills: Mutex::new(HashMap::new()),
            remembered: Mutex::new(HashMap::new()),
            retained: Mutex::new(HashMap::new()),
            memos: Mutex::new(HashMap::new()),
            memo_saving: Mutex::new(()),
            next_sequence: std::sync::atomic::AtomicU64::new(0),
            replicas,
            tasks,
            removed_grace,
            handing_over: AtomicBool::new(false),
            admitted: Mutex::new((0, 0)),
            transactions: transactions::Transactions::new(transactions, app_port),
        });
        owner
            .next_sequence
            .store(owner.disk.next_sequence().max(1), Ordering::SeqCst);
        owner.recover();
        // Queues already in the view get their messages back before the sidecar reports ready.
        let view = owner.view.borrow().clone();
        owner.restore_waiting(&view);
        owner.replicas.set_peers(&view.wire.peers);
        let tasks = Arc::clone(&owner.tasks);
        tasks.spawn(
            "owner link events",
            Arc::clone(&owner).run_events(events_rx),
        );
        tasks.spawn("owner view", Arc::clone(&owner).follow_view());
        tasks.spawn("owner replication", Arc::clone(&owner).run_replication());
        tasks.spawn("owner transactions", Arc::clone(&owner).run_transactions());
        owner
    }

    /// Takes what the disk log recovered; each queue's messages are restored when the queue
    /// appears in the view (at once from a mesh file, after the first view from a control plane).
    fn recover(self: &Arc<Self>) {
        let mut recovered = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
        let mut half = Vec::new();
        for rec in self.disk.recover() {
            if rec.queue == transactions::STAGING {
                half.push(rec);
            } else {
                recovered.entry(rec.queue.clone()).or_default().push(rec);
            }
        }
        self.recover_half_messages(half);
        let count: usize = recovered.values().map(Vec::len).sum();
        let mut spills = self.spills.lock().unwrap_or_else(|e| e.into_inner());
        for spill in self.disk.recover_spills() {
            spills.insert(spill.queue.clone(), spill);
        }
        let spilled: u64 = spills.values().map(|s| s.messages).sum();
        if count > 0 || spilled > 0 {
            tracing::info!(
                held = count,
                spilled,
                queues = recovered.len().max(spills.len()),
                "recovered unsettled messages from the log"
            );
        }
        drop(spills);
        let mut remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        let ids = self.disk.recover_remembered();
        if !ids.is_empty() {
            tracing::info!(
                ids = ids.len(),
                "recovered message ids inside their dedup windows"
            );
        }
        for r in ids {
            remembered.entry(r.queue.clone()).or_default().push(r);
        }
        drop(remembered);
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        for run in self.disk.recover_retained() {
            if run.queue == transactions::STAGING {
                // Settled half messages: nothing replays them.
                self.disk.release_run(run.segment, run.messages);
                continue;
            }
            retained.entry(run.queue.clone()).or_default().push(run);
        }
        drop(retained);
        if let Some(bytes) = self.disk.load_state() {
            match serde_json::from_slice::<HashMap<String, retain::QueueMemo>>(&bytes) {
                Ok(memos) => *self.memos.lock().unwrap_or_else(|e| e.into_inner()) = memos,
                Err(error) => tracing::error!(
                    %error,
                    "the owner's state file does not parse; replays and known subscriptions start afresh"
                ),
            }
        }
    }

    /// Saves what every disk queue remembers beside the log (subscriptions served, replays not
    /// finished).
    fn save_memos(&self) {
        let _saving = self.memo_saving.lock().unwrap_or_else(|e| e.into_inner());
        let mut memos = self.memos.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (name, q) in self.queues.read().unwrap_or_else(|e| e.into_inner()).iter() {
            if !q.log.pages() {
                continue;
            }
            let state = q.lock();
            memos.insert(
                name.clone(),
                retain::QueueMemo {
                    subscriptions: state.known.iter().cloned().collect(),
                    replays: state.replays.iter().cloned().collect(),
                },
            );
        }
        let bytes = match serde_json::to_vec(&memos) {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, "could not encode the owner's state");
                return;
            }
        };
        if let Err(error) = self.disk.save_state(&bytes) {
            tracing::error!(%error, "could not save the owner's state: a restart may replay again, or miss a new subscription's startAt");
        }
    }

    /// Restores recovered messages of every queue that is now in the view.
    fn restore_waiting(self: &Arc<Self>, view: &View) {
        let mut waiting: Vec<String> = self
            .recovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        waiting.extend(
            self.remembered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        waiting.extend(
            self.spills
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        waiting.extend(
            self.retained
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        waiting.extend(
            self.memos
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        for name in waiting {
            let _ = self.queue_for(view, &name);
        }
    }

    fn restore_recovered(&self, name: &str, q: &OwnedQueue) {
        // Held until the messages are in the queue's state, so the replication floor never sees
        // them in neither place.
        let mut recovered = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
        let ids = self
            .remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .unwrap_or_default();
        let records = recovered.remove(name).unwrap_or_default();
        let spill = self
            .spills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let runs = self
            .retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .unwrap_or_default();
        let memo = self
            .memos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let now = Instant::now();
        let mut state = q.lock();
        // Settled records the log kept at start: kept again while inside keepAcked, else released.
        let keep = state.keep_acked_ms();
        let now_ms = retain::unix_ms(SystemTime::now());
        for run in runs {
            match keep.map(|k| run.newest_ms.saturating_add(k)) {
                Some(until) if until > now_ms => {
                    state
                        .kept
                        .keep_run(run.segment, run.messages, run.bytes, until);
                }
                _ => q.log.release_run(run.segment, run.messages),
            }
        }
        // A queue new to this owner is written down at once: a subscription created while the
        // owner is down is then known to be new when it is back.
        let first_time = memo.is_none() && q.log.pages();
        if let Some(memo) = memo {
            state.known = memo.subscriptions.into_iter().collect();
            state.replays = memo.replays.into_iter().collect();
        }
        if records.is_empty() && ids.is_empty() && spill.is_none() {
            let joined = state.join_new_routes();
            drop(state);
            drop(recovered);
            if joined || first_time {
                self.save_memos();
            }
            q.wake.notify_one();
            return;
        }
        let wall = SystemTime::now();
        for r in ids {
            let left = r.until.duration_since(wall).unwrap_or_default();
            state.remember(&r.id, r.sequence, queue::later(now, left));
        }
        let routes: HashSet<String> = state
            .view
            .routes
            .iter()
            .map(|r| r.subscription.clone())
            .collect();
        for rec in records {
            // Owed to subscriptions this view lacks: kept dormant (the view may be partial; a
            // deleted subscription is dropped after the removal grace).
            if rec.pending.iter().any(|(s, _)| !routes.contains(s)) {
                tracing::info!(
                    queue = name,
                    sequence = rec.sequence,
                    "recovered a message owed to a subscription not in the view; kept dormant"
                );
            }
            if !rec.pending.is_empty() {
                state.restore(
                    rec.sequence,
                    Arc::new(rec.message),
                    rec.pending,
                    rec.at,
                    now,
                );
            }
        }
        // After what was held: held messages are never counted as spilled.
        if let Some(spill) = spill {
            state.resume_spill(
                queue::Spill {
                    from: spill.from,
                    cursor: spill.cursor,
                    paged_through: spill.paged_through,
                    messages: spill.messages,
                    bytes: spill.bytes,
                },
                spill.by_subscription,
                now,
            );
        }
        let joined = state.join_new_routes();
        drop(state);
        drop(recovered);
        if joined || first_time {
            self.save_memos();
        }
        q.wake.notify_one();
    }

    /// Stops taking publishes (graceful shutdown).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops (`true`) or resumes dispatching, around a hand-over.
    pub fn handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::SeqCst);
        if !on {
            for q in self.queues() {
                q.wake.notify_one();
            }
        }
    }

    /// Messages still owed to some subscription, over all queues.
    pub fn backlog(&self) -> u64 {
        self.queues()
            .iter()
            .map(|q| q.lock().backlog())
            .sum::<u64>()
            + self.transactions.staged_count()
    }

    fn queues(&self) -> Vec<Arc<OwnedQueue>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn get_queue(&self, name: &str) -> Option<Arc<OwnedQueue>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The owned queue `name`, created (and its task started) on first use.
    fn queue_for(self: &Arc<Self>, view: &View, name: &str) -> Option<Arc<OwnedQueue>> {
        if let Some(q) = self.get_queue(name) {
            return Some(q);
        }
        let qv = view.queue(name)?.clone();
        let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = queues.get(name) {
            return Some(Arc::clone(q));
        }
        let durable = qv
            .policy
            .as_ref()
            .is_none_or(|p| p.durability() != control::Durability::Memory);
        let mut state = QueueState::new(qv);
        state.numbered_through(self.next_sequence.load(Ordering::SeqCst).saturating_sub(1));
        // Routes of a queue this owner starts now are served from here on (a memo, restored
        // below, says which it served before).
        state.known = state
            .view
            .routes
            .iter()
            .map(|r| r.subscription.clone())
            .collect();
        let q = Arc::new(OwnedQueue {
            state: Mutex::new(state),
            wake: Notify::new(),
            log: if durable {
                Arc::clone(&self.disk)
            } else {
                Arc::clone(&self.memory)
            },
            limiter: Mutex::new(None),
            paging: tokio::sync::Mutex::new(()),
        });
        queues.insert(name.to_owned(), Arc::clone(&q));
        drop(queues);
        self.restore_recovered(name, &q);
        self.tasks.spawn(
            format!("owner queue {name}"),
            Arc::clone(self).run_queue(name.to_owned(), Arc::clone(&q)),
        );
        Some(q)
    }

    /// Publishes an app's message: checks, de-duplicates, applies retention, persists, routes.
    pub async fn publish(
        self: &Arc<Self>,
        queue: &str,
        mut message: v1::Message,
        schedule: Schedule,
    ) -> Result<v1::PublishResponse, BrokerError> {
        let (q, policy) = self.admit_publish(queue, &mut message, schedule)?;
        self.accept(&q, queue, &mut message, policy).await
    }

    /// An app's publish to `queue`, checked: the queue, the right to publish, the delay (set on
    /// the message), the rate limit. The queue and its policy.
    fn admit_publish(
        self: &Arc<Self>,
        queue: &str,
        message: &mut v1::Message,
        schedule: Schedule,
    ) -> Result<(Arc<OwnedQueue>, control::QueuePolicy), BrokerError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(BrokerError::ShuttingDown);
        }
        let view = self.view.borrow().clone();
        let qv = view.queue(queue).ok_or_else(|| {
            if view.is_foreign_queue(queue) {
                BrokerError::NotPublisher(queue.to_owned())
            } else {
                BrokerError::UnknownQueue(queue.to_owned())
            }
        })?;
        if !qv.app_may_publish {
            return Err(BrokerError::NotPublisher(queue.to_owned()));
        }
        let max_delay = qv
            .policy
            .as_ref()
            .and_then(|p| p.max_delay.as_ref())
            .map_or(
                qmesh_api::DEFAULT_MAX_DELAY,
                qmesh_proto::convert::std_duration,
            );
        if let Some(at) = schedule.deliver_at_ms(queue, max_delay, SystemTime::now())? {
            message
                .headers
                .insert(queue::DELIVER_AT_HEADER.to_owned(), at.to_string());
        }
        let q = self
            .queue_for(&view, queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        self.check_rate(
            queue,
            &q,
            qv.policy.as_ref().and_then(|p| p.publish_rate_limit),
        )?;
        Ok((q, qv.policy.clone().unwrap_or_default()))
    }

    fn check_rate(
        &self,
        queue: &str,
        q: &OwnedQueue,
        limit: Option<control::RateLimit>,
    ) -> Result<(), BrokerError> {
        let Some(limit) = limit else { return Ok(()) };
        let limiter = {
            let mut slot = q.limiter.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some((current, l)) if *current == limit => Arc::clone(l),
                _ => {
                    let l = Arc::new(rate_limiter(&limit));
                    *slot = Some((limit, Arc::clone(&l)));
                    l
                }
            }
        };
        limiter
            .check()
            .map_err(|not_until| BrokerError::RateLimited {
                queue: queue.to_owned(),
                retry_after: not_until
                    .wait_time_from(governor::clock::DefaultClock::default().now()),
            })
    }

    /// Persists and routes a message (also used for dead letters, which skip the app checks).
    async fn accept(
        self: &Arc<Self>,
        q: &Arc<OwnedQueue>,
        queue: &str,
        message: &mut v1::Message,
        policy: control::QueuePolicy,
    ) -> Result<v1::PublishResponse, BrokerError> {
        let size = queue::message_size(message);
        if size > policy.max_message_bytes.max(1) {
            return Err(BrokerError::TooLarge {
                queue: queue.to_owned(),
                size: size as usize,
                limit: policy.max_message_bytes,
            });
        }
        if message.id.is_empty() {
            message.id = new_id();
        }
        // Decoded payloads are slices of the connection's shared read buffers: a backlog holding
        // them would pin whole buffers per small message. Owned messages own their bytes.
        message.payload = bytes::Bytes::copy_from_slice(&message.payload);
        message.publish_time = Some(SystemTime::now().into());
        let now = Instant::now();
        let (pending, duplicate) = {
            let mut state = q.lock();
            match state.duplicate_of(&message.id, now) {
                Some(duplicate) => (Vec::new(), Some(duplicate)),
                None => (state.routes_for(message), None),
            }
        };
        if let Some(duplicate) = duplicate {
            return answer_duplicate(&message.id, duplicate).await;
        }
        let spills = q.log.pages() && policy.publish_ack() != control::PublishAck::Replicated;
        let _admission = self.admit(queue, size, spills)?;
        self.make_room(q, queue, &policy, size).await?;
        // publishAck: Replicated — a replica must be there before anything is written.
        let replicated = policy.publish_ack() == control::PublishAck::Replicated;
        let deadline = Instant::now() + self.replicas.timeout();
        let replica = if replicated && !pending.is_empty() {
            Some(self.replica_for(q, queue, deadline).await?)
        } else {
            None
        };
        let id = message.id.clone();
        let message = Arc::new(std::mem::take(message));
        // Numbered here, in publish order, under the queue's lock; the log may complete appends
        // in any order. The id is checked again under the same lock: of two publishes of one id
        // racing here, exactly one is stored.
        // The record is queued under the same lock, so a queue's records are in the log in
        // sequence order (what paging spilled messages back in relies on).
        let reserved = {
            let mut state = q.lock();
            match state.duplicate_of(&id, now) {
                Some(duplicate) => Err(duplicate),
                None => {
                    let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
                    state.reserve(sequence, &id, now);
                    Ok((sequence, q.log.append(queue, sequence, &message, &pending)))
                }
            }
        };
        let (sequence, appended) = match reserved {
            Ok(reserved) => reserved,
            Err(duplicate) => return answer_duplicate(&id, duplicate).await,
        };
        // Once reserved and queued for the log, the publish runs to its end even if the caller goes
        // away (a client disconnecting): a reservation left behind would hold back paging and
        // ordered dispatch for good.
        let owner = Arc::clone(self);
        let (q, queue) = (Arc::clone(q), queue.to_owned());
        RunToEnd::new(async move {
            owner
                .complete(
                    &q, &queue, sequence, id, message, pending, replica, deadline, now, appended,
                )
                .await
        })
        .await
    }

    /// The rest of a publish once its sequence is reserved and its record queued: waits for the
    /// log (and the replica), then places the message in its queue.
    #[allow(clippy::too_many_arguments)]
    async fn complete(
        self: &Arc<Self>,
        q: &Arc<OwnedQueue>,
        queue: &str,
        sequence: u64,
        id: String,
        message: Arc<v1::Message>,
        pending: Vec<String>,
        replica: Option<String>,
        deadline: Instant,
        now: Instant,
        appended: log::Written,
    ) -> Result<v1::PublishResponse, BrokerError> {
        let replicated = replica.is_some();
        // The copy goes out while the log writes, so the two waits overlap.
        let (appended, confirmed) = match replica {
            None => (appended.await, Ok(())),
            Some(addr) => {
                let copy = Arc::new(peer::OwnedMessage {
                    queue: queue.to_owned(),
                    sequence,
                    message: Some((*message).clone()),
                    pending: pending
                        .iter()
                        .map(|s| peer::PendingSubscription {
                            subscription: s.clone(),
                            attempts: 0,
                        })
                        .collect(),
                });
                tokio::join!(
                    appended,
                    self.replicate_copy(q, queue, addr, copy, deadline)
                )
            }
        };
        let at = match appended {
            Ok(at) => at,
            Err(error) => {
                if matches!(error, BrokerError::DiskFull(_)) {
                    self.shed_kept("the log's disk is full");
                }
                q.lock().abandon(sequence, &id, &error);
                if replicated {
                    self.replicas.cancel(sequence);
                }
                q.wake.notify_one();
                return Err(error);
            }
        };
        if let Err(reason) = confirmed {
            // Written here but not replicated: it must not be delivered as if acknowledged.
            for sub in &pending {
                q.log.settle(queue, sub, sequence, Outcome::Acked);
            }
            let error = BrokerError::ReplicaUnavailable {
                queue: queue.to_owned(),
                reason,
            };
            {
                let mut state = q.lock();
                state.abandon(sequence, &id, &error);
                // Replicated queues never spill: nothing will read this record back.
                state.released.push(at);
            }
            self.replicas.cancel(sequence);
            q.wake.notify_one();
            tracing::warn!(queue, sequence, %error, "publish refused: no replica confirmed its copy");
            return Err(error);
        }
        self.remember(q, queue, &message, sequence);
        let pending = pending.into_iter().map(|s| (s, 0)).collect();
        self.place(q, queue, sequence, message, pending, at, replicated, now);
        q.wake.notify_one();
        self.metrics.published(queue);
        if replicated {
            self.metrics.replicated(queue);
        }
        Ok(v1::PublishResponse {
            id,
            sequence,
            duplicate: false,
        })
    }

    /// Writes a stored message's id to the log's dedup journal when its queue de-duplicates, before
    /// anything can settle it.
    fn remember(&self, q: &OwnedQueue, queue: &str, message: &v1::Message, sequence: u64) {
        let Some(window) = q.lock().dedup_window() else {
            return;
        };
        if message.id.is_empty() {
            return;
        }
        let published = message
            .publish_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or_else(SystemTime::now);
        let until = published
            .checked_add(window)
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(86_400));
        q.log.remember(queue, &message.id, sequence, until);
    }

    /// Memory held over all queues: messages with their bookkeeping and remembered ids.
    fn memory_held(&self) -> u64 {
        self.queues().iter().map(|q| q.lock().memory()).sum()
    }

    /// Inserts a durable message into its queue: held while memory is within budget, else (a disk
    /// queue that is not replicated) spilled to the log, to be paged in when there is room.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &self,
        q: &OwnedQueue,
        queue: &str,
        sequence: u64,
        message: Arc<v1::Message>,
        pending: Vec<(String, u32)>,
        at: log::Position,
        replicated: bool,
        now: Instant,
    ) {
        let cost = queue::message_size(&message) + queue::ENTRY_OVERHEAD;
        let room = !q.log.pages() || replicated || self.memory_held() + cost <= self.limits.memory;
        let mut state = q.lock();
        let placed = state.insert(sequence, message, pending, at, room, now);
        if let queue::Placed::SpillStarted { from, cursor } = placed {
            // Under the queue's lock: the spill is in the log before any page-in of it.
            q.log.spill(queue, from, cursor);
            drop(state);
            tracing::info!(
                queue,
                from,
                budget = self.limits.memory,
                "memory budget reached: newer messages stay on disk until there is room"
            );
        }
    }

    /// Keeps a queue's memory and log in shape: hands settled records to the log for release,
    /// pages spilled messages back in while memory has room, and (`relocate`) copies long-lived
    /// messages out of old segments so those can be deleted.
    async fn maintain(self: &Arc<Self>, q: &Arc<OwnedQueue>, name: &str, relocate: bool) {
        let (released, runs) = {
            let mut state = q.lock();
            let released = std::mem::take(&mut state.released);
            let settled = std::mem::take(&mut state.settled);
            let now_ms = retain::unix_ms(SystemTime::now());
            let mut runs = Vec::new();
            match state.keep_acked_ms() {
                Some(keep) => {
                    for (at, published) in settled {
                        let until = published.saturating_add(keep);
                        if until > now_ms {
                            state.kept.keep(at, until);
                        } else {
                            runs.push((at.segment, 1));
                        }
                    }
                    runs.extend(state.kept.expire(now_ms));
                }
                None => {
                    runs.extend(settled.into_iter().map(|(at, _)| (at.segment, 1)));
                    runs.extend(state.kept.all());
                }
            }
            (released, runs)
        };
        for at in released {
            q.log.release(at);
        }
        for (segment, messages) in runs {
            q.log.release_run(segment, messages);
        }
        self.page_in(q, name).await;
        self.replay(q, name).await;
        if relocate {
            self.relocate(q, name);
        }
    }

    /// Runs the replay at the front of a queue's list while memory has room: scans the log a page
    /// at a time, owes what the page covers to the subscription again (a copy records each), and
    /// finishes once the scan is through.
    async fn replay(self: &Arc<Self>, q: &Arc<OwnedQueue>, name: &str) {
        if q.lock().replays.is_empty() {
            return;
        }
        let _paging = q.paging.lock().await;
        loop {
            let cursor_below = {
                let mut state = q.lock();
                if !q.log.pages() {
                    if state.replays.is_empty() {
                        return;
                    }
                    let owed = state.replay_held();
                    drop(state);
                    if owed > 0 {
                        q.wake.notify_one();
                    }
                    tracing::info!(queue = name, owed, "replayed what this memory queue holds");
                    continue;
                }
                if state.replay_waits() {
                    return;
                }
                state
                    .replays
                    .front()
                    .map(|r| (r.cursor, r.through.saturating_add(1)))
            };
            let Some((cursor, below)) = cursor_below else {
                return;
            };
            let Some(max) = self.read_room(q) else {
                return;
            };
            let queue = name.to_owned();
            let read = move |log: &dyn OwnerLog| log.read_retained(&queue, cursor, below, max);
            let Some(page) = read_log(q, name, "a replay", read).await else {
                return;
            };
            let now_ms = retain::unix_ms(SystemTime::now());
            // The copies are queued under the queue's lock, with the state it has now: a later
            // settlement is written after them.
            let (step, writes) = {
                let mut state = q.lock();
                let Some(mut step) = state.replay_page(page, now_ms) else {
                    return;
                };
                let copies = std::mem::take(&mut step.copies);
                let writes: Vec<_> = copies
                    .into_iter()
                    .map(|c| {
                        let write = q
                            .log
                            .relocate(name, c.sequence, &c.message, c.pending.clone());
                        (c, write)
                    })
                    .collect();
                (step, writes)
            };
            let (copies, writes): (Vec<_>, Vec<_>) = writes.into_iter().unzip();
            let results = futures::future::join_all(writes).await;
            let mut failed = 0;
            {
                let mut state = q.lock();
                let now = Instant::now();
                for (copy, result) in copies.into_iter().zip(results) {
                    match result {
                        Ok(to) => state.replay_copied(copy, to, now),
                        Err(_) => failed += 1,
                    }
                }
            }
            if failed > 0 {
                tracing::warn!(
                    queue = name,
                    failed,
                    "a replay could not record some messages; they are not replayed"
                );
            }
            if step.owed > 0 {
                q.wake.notify_one();
            }
            if let Some(done) = step.finished {
                tracing::info!(
                    queue = name,
                    subscription = %done.subscription,
                    through = done.through,
                    "replay finished"
                );
                self.save_memos();
            } else if step.owed == 0 && q.lock().replay_waits() {
                return;
            }
        }
    }

    /// Reads spilled messages back while held memory is below three quarters of the budget, a few
    /// MiB at a time, in order.
    async fn page_in(self: &Arc<Self>, q: &Arc<OwnedQueue>, name: &str) {
        if q.lock().spill.is_none() {
            return;
        }
        let _paging = q.paging.lock().await;
        loop {
            let Some((cursor, after, below)) = q.lock().page_request() else {
                return;
            };
            let Some(max) = self.read_room(q) else {
                return;
            };
            let queue = name.to_owned();
            let read =
                move |log: &dyn OwnerLog| log.read_spilled(&queue, cursor, after, below, max);
            let Some(page) = read_log(q, name, "paging spilled messages in", read).await else {
                return;
            };
            let moved = page.resume != cursor;
            let mut state = q.lock();
            let Some(paged) = state.paged_in(page, Instant::now()) else {
                return;
            };
            // Under the queue's lock: the page-in is in the log before any settlement of what it
            // brought in.
            if paged.messages > 0 || moved {
                q.log.paged_in(name, paged.through, paged.resume);
            }
            if paged.ended {
                q.log.spill_end(name);
            }
            drop(state);
            if paged.messages > 0 {
                q.wake.notify_one();
            }
            if paged.ended {
                tracing::info!(queue = name, "every spilled message is back in memory");
            }
            if paged.ended || (paged.messages == 0 && !moved) {
                return;
            }
        }
    }

    /// How many bytes a read back from the log (a page-in, a replay) may bring into memory now:
    /// while held memory is within three quarters of the budget. Beyond it, a subscription whose
    /// ready work ran out is still fed (up to four times the budget): messages held for others —
    /// parked, in flight, owed to a subscription nobody consumes — must not stall it for good.
    fn read_room(&self, q: &OwnedQueue) -> Option<usize> {
        let low = self.limits.memory / 4 * 3;
        let held = self.memory_held();
        let starving = q.lock().starving();
        if held >= low && !(starving && held < self.limits.memory.saturating_mul(4)) {
            return None;
        }
        Some(
            usize::try_from(low.saturating_sub(held))
                .unwrap_or(usize::MAX)
                .clamp(MIN_PAGE_IN_BYTES, PAGE_IN_BYTES),
        )
    }

    /// Copies held messages whose records pin old segments forward in the log.
    fn relocate(self: &Arc<Self>, q: &Arc<OwnedQueue>, name: &str) {
        let Some(target) = q.log.relocation_target() else {
            return;
        };
        // Queued under the queue's lock, with the state it has now: no settlement recorded after
        // this is written before the copy.
        let (moving, writes): (Vec<_>, Vec<_>) = {
            let state = q.lock();
            state
                .to_relocate(target, RELOCATE_BATCH)
                .into_iter()
                .map(|m| {
                    let write = q
                        .log
                        .relocate(name, m.sequence, &m.message, m.pending.clone());
                    (m.sequence, write)
                })
                .unzip()
        };
        if moving.is_empty() {
            return;
        }
        let q = Arc::clone(q);
        let name = name.to_owned();
        self.tasks.spawn(format!("owner relocation {name}"), async move {
            let results = futures::future::join_all(writes).await;
            let mut state = q.lock();
            let mut failed = 0;
            for (sequence, result) in moving.into_iter().zip(results) {
                match result {
                    Ok(to) => state.relocated(sequence, to),
                    Err(_) => failed += 1,
                }
            }
            drop(state);
            if failed > 0 {
                tracing::warn!(queue = %name, failed, "could not relocate some messages; they stay where they are");
            }
        });
    }

    /// Admits a message of `size` bytes into the sidecar's bounds — the bytes and messages owned
    /// (held or spilled, `--max-owned-bytes` / `--max-owned-messages`), and for messages that cannot
    /// spill (memory or replicated queues) the memory budget — counting every publish or adoption
    /// still in progress, or refuses it. The admission is held until the message is in its queue's
    /// state (or has failed).
    fn admit(&self, queue: &str, size: u64, spills: bool) -> Result<Admission<'_>, BrokerError> {
        let queues = self.queues();
        let (owned_bytes, owned_messages, held, kept) =
            queues.iter().fold((0, 0, 0, 0), |(b, m, h, k), q| {
                let s = q.lock();
                (
                    b + s.backlog_bytes(),
                    m + s.backlog(),
                    h + s.memory() + s.dedup_bytes,
                    k + s.kept.bytes,
                )
            });
        let cost = size + queue::ENTRY_OVERHEAD;
        // Acked messages kept for replay live inside the same disk budget: the oldest go first,
        // before anything owed is refused.
        let over = (owned_bytes + kept + cost).saturating_sub(self.limits.max_bytes);
        if over > 0 && kept > 0 {
            let mut freed = 0;
            for q in &queues {
                if freed >= over {
                    break;
                }
                let runs = {
                    let mut s = q.lock();
                    let before = s.kept.bytes;
                    let runs = s.kept.shed(over - freed);
                    freed += before - s.kept.bytes;
                    runs
                };
                for (segment, messages) in runs {
                    q.log.release_run(segment, messages);
                }
            }
        }
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        let full = |limit: &str| BrokerError::BacklogFull {
            queue: queue.to_owned(),
            limit: limit.into(),
            retry_after: Duration::from_secs(1),
        };
        if owned_bytes + admitted.0 + cost > self.limits.max_bytes
            || owned_messages + admitted.1 + 1 > self.limits.max_messages
        {
            return Err(full(
                "the sidecar's bound on owned messages (--max-owned-bytes / --max-owned-messages)",
            ));
        }
        if !spills && held + admitted.0 + cost > self.limits.memory {
            return Err(full(
                "the sidecar's memory budget (--memory-budget); durability: Memory and publishAck: Replicated queues cannot spill to disk",
            ));
        }
        admitted.0 += cost;
        admitted.1 += 1;
        Ok(Admission { owner: self, cost })
    }

    /// Applies retention limits before a publish of `size` bytes.
    async fn make_room(
        self: &Arc<Self>,
        q: &Arc<OwnedQueue>,
        queue: &str,
        policy: &control::QueuePolicy,
        size: u64,
    ) -> Result<(), BrokerError> {
        let retention = policy.retention.unwrap_or_default();
        if retention.max_bytes > 0 {
            // What is only kept for replay goes before anything owed.
            let runs = {
                let mut s = q.lock();
                let total = s.backlog_bytes() + s.kept.bytes + size;
                s.kept.shed(total.saturating_sub(retention.max_bytes))
            };
            for (segment, messages) in runs {
                q.log.release_run(segment, messages);
            }
        }
        loop {
            let over = {
                let s = q.lock();
                let count = s.backlog();
                if retention.max_messages > 0 && count + 1 > retention.max_messages {
                    Some(format!("maxMessages {}", retention.max_messages))
                } else if retention.max_bytes > 0 && s.backlog_bytes() + size > retention.max_bytes
                {
                    Some(format!("maxBytes {}", retention.max_bytes))
                } else {
                    None
                }
            };
            let Some(limit) = over else { return Ok(()) };
            match retention.overflow() {
                control::Overflow::DropOldest | control::Overflow::DeadLetter => {
                    let oldest = q.lock().claim_oldest();
                    let Some((sequence, message)) = oldest else {
                        return Ok(());
                    };
                    let reason = format!("overflow: {limit} reached");
                    let target = (retention.overflow() == control::Overflow::DeadLetter)
                        .then(|| policy.dead_letter_queue.clone())
                        .filter(|t| !t.is_empty());
                    if let Err(error) = self
                        .evict(q, queue, sequence, message, &reason, target.clone())
                        .await
                    {
                        // The oldest stays where it is; the new publish is the one refused.
                        return Err(BrokerError::BacklogFull {
                            queue: queue.to_owned(),
                            limit: format!(
                                "{limit}, and dead-letter queue {} refused the oldest message: {error}",
                                target.unwrap_or_default()
                            ),
                            retry_after: Duration::from_secs(1),
                        });
                    }
                }
                control::Overflow::Reject | control::Overflow::Unspecified => {
                    return Err(BrokerError::BacklogFull {
                        queue: queue.to_owned(),
                        limit,
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
    }

    /// Takes a message away from every subscription (overflow, expiry), dead-lettering it if a
    /// target is given. The dead-letter copy is accepted first: when the dead-letter queue refuses
    /// it, the message stays where it is and the refusal is returned — nothing accepted vanishes.
    async fn evict(
        self: &Arc<Self>,
        q: &Arc<OwnedQueue>,
        queue: &str,
        sequence: u64,
        message: Arc<v1::Message>,
        reason: &str,
        target: Option<String>,
    ) -> Result<(), BrokerError> {
        if let Some(target) = target {
            let attempts = {
                let state = q.lock();
                state
                    .subs
                    .keys()
                    .map(|sub| state.attempts_of(sub, sequence))
                    .max()
                    .unwrap_or(0)
            };
            let dl = DeadLetter {
                subscription: String::new(),
                sequence,
                message,
                attempts,
                reason: reason.to_owned(),
                last_error: String::new(),
                target: Some(target),
            };
            if let Err(error) = self.republish_dead_letter(queue, &dl).await {
                q.lock().unclaim(sequence);
                return Err(error);
            }
        } else {
            tracing::warn!(
                queue,
                sequence,
                reason,
                "message dropped by retention (overflow: DropOldest)"
            );
        }
        let owed = q.lock().evict(sequence);
        for (sub, _) in &owed {
            q.log.settle(queue, sub, sequence, Outcome::DeadLettered);
            self.metrics.dead_lettered(queue, sub);
        }
        Ok(())
    }

    async fn republish_dead_letter(
        self: &Arc<Self>,
        queue: &str,
        dl: &DeadLetter,
    ) -> Result<(), BrokerError> {
        let target = dl.target.clone().unwrap_or_default();
        let view = self.view.borrow().clone();
        let tq = self
            .queue_for(&view, &target)
            .ok_or_else(|| BrokerError::UnknownQueue(target.clone()))?;
        let target_view = view
            .queue(&target)
            .ok_or_else(|| BrokerError::UnknownQueue(target.clone()))?;
        if target_view.routes.is_empty() {
            // Nothing would keep it there: better parked here, visible to `qmesh dlq peek`.
            return Err(BrokerError::Invalid(format!(
                "dead-letter queue {target} has no subscription to keep the message"
            )));
        }
        let policy = target_view.policy.clone().unwrap_or_default();
        let mut message = (*dl.message).clone();
        message
            .headers
            .insert(headers::REASON.into(), dl.reason.clone());
        message
            .headers
            .insert(headers::ORIGINAL_QUEUE.into(), queue.to_owned());
        message.headers.insert(
            headers::ORIGINAL_SUBSCRIPTION.into(),
            dl.subscription.clone(),
        );
        message
            .headers
            .insert(headers::DELIVERY_COUNT.into(), dl.attempts.to_string());
        message
            .headers
            .insert(headers::LAST_ERROR.into(), dl.last_error.clone());
        // The dead-letter copy is a new message of its queue: a fresh id keeps dedup windows apart;
        // the original id stays visible.
        message
            .headers
            .insert(headers::ORIGINAL_ID.into(), message.id.clone());
        message.id = new_id();
        Box::pin(self.accept(&tq, &target, &mut message, policy))
            .await
            .map(|_| ())
    }

    async fn dead_letter(self: &Arc<Self>, q: &Arc<OwnedQueue>, queue: &str, dl: DeadLetter) {
        self.metrics.dead_lettered(queue, &dl.subscription);
        self.dead_letter_again(q, queue, dl).await;
    }

    /// Moves a dead letter to its dead-letter queue (a first try or a retry; counted once).
    async fn dead_letter_again(self: &Arc<Self>, q: &Arc<OwnedQueue>, queue: &str, dl: DeadLetter) {
        if dl.target.is_none() {
            tracing::warn!(queue, subscription = %dl.subscription, sequence = dl.sequence, "delivery attempts exhausted and no dead-letter queue: message kept (parked) and counted");
            return;
        }
        match self.republish_dead_letter(queue, &dl).await {
            Ok(()) => {
                q.lock().settle_dead(&dl.subscription, dl.sequence);
                q.log
                    .settle(queue, &dl.subscription, dl.sequence, Outcome::DeadLettered);
            }
            Err(error) => {
                tracing::warn!(%error, queue, subscription = %dl.subscription, sequence = dl.sequence, "dead-letter queue refused the message; kept (parked) and tried again later");
                q.lock()
                    .retry_dead_letter(&dl, &error.to_string(), Instant::now());
            }
        }
    }

    async fn run_queue(self: Arc<Self>, name: String, q: Arc<OwnedQueue>) {
        let mut last_expiry_check = Instant::now();
        loop {
            let relocate = last_expiry_check.elapsed() >= Duration::from_secs(1);
            self.maintain(&q, &name, relocate).await;
            let now = Instant::now();
            let mut dead = Vec::new();
            let (outgoing, next, demand) = {
                let mut state = q.lock();
                let (timed_out, next) = state.tick(now);
                for (sub, seq, attempt) in timed_out {
                    let outcome = state.fail(
                        &sub,
                        seq,
                        attempt,
                        Failure::counted("ack timeout (no settlement from the consumer)", None),
                        now,
                        rand::random(),
                    );
                    q.log
                        .attempted(&name, &sub, seq, state.attempts_of(&sub, seq));
                    dead.extend(outcome);
                }
                let links = &self.links;
                let links_for = |route: &control::Route| -> Vec<u64> {
                    route
                        .consumers
                        .iter()
                        .filter_map(|c| links.connection_to(&c.peer_address))
                        .collect()
                };
                let mut take = |link: u64, sub: &str| links.take_credit(link, sub);
                // While handing over, nothing new goes out: a message is delivered either from here
                // or from its new owner, and a key's next message never overtakes one already gone.
                let outgoing = if self.handing_over.load(Ordering::SeqCst) {
                    Vec::new()
                } else {
                    state.dispatch(now, &links_for, &mut take)
                };
                // What is still ready after dispatch waits for credit: every consumer link of the
                // route hears whether this owner has work, so consumers share their windows fairly.
                let demand: Vec<(Vec<u64>, String, usize)> = state
                    .view
                    .routes
                    .iter()
                    .map(|r| {
                        let ready = state
                            .subs
                            .get(&r.subscription)
                            .map_or(0, |s| s.ready_work());
                        (links_for(r), r.subscription.clone(), ready)
                    })
                    .collect();
                (outgoing, next, demand)
            };
            for (links, sub, ready) in demand {
                for link in links {
                    self.links.report_demand(link, &sub, ready);
                }
            }
            if !outgoing.is_empty() {
                self.send(&q, &name, outgoing);
            }
            for dl in dead {
                self.dead_letter(&q, &name, dl).await;
            }
            if now.duration_since(last_expiry_check) >= Duration::from_secs(1) {
                last_expiry_check = now;
                let dropped = q.lock().drop_removed(now, self.removed_grace);
                if !dropped.is_empty() {
                    tracing::warn!(queue = %name, messages = dropped.len(), grace = %qmesh_api::Duration(self.removed_grace), "subscription removed for longer than the grace: what it owed is dropped");
                }
                for (sub, seq) in dropped {
                    q.log.settle(&name, &sub, seq, Outcome::Acked);
                }
                self.expire(&q, &name).await;
                let due = q.lock().due_dead_letters(now);
                for dl in due {
                    self.dead_letter_again(&q, &name, dl).await;
                }
            }
            let wait = next.map_or(Duration::from_secs(1), |n| {
                n.saturating_duration_since(Instant::now())
            });
            let _ = tokio::time::timeout(wait.min(Duration::from_secs(1)), q.wake.notified()).await;
        }
    }

    async fn expire(self: &Arc<Self>, q: &Arc<OwnedQueue>, queue: &str) {
        let policy = q.lock().policy();
        let Some(max_age) = policy.retention.as_ref().and_then(|r| r.max_age) else {
            return;
        };
        let max_age = qmesh_proto::convert::std_duration(&max_age);
        let expired = q.lock().expired(Instant::now(), max_age);
        let target = Some(policy.dead_letter_queue.clone()).filter(|t| !t.is_empty());
        for (sequence, message, _) in expired {
            if !q.lock().claim(sequence) {
                continue;
            }
            let reason = format!(
                "expired: older than maxAge {}",
                qmesh_api::Duration(max_age)
            );
            if target.is_none() {
                // Never silently lost: without a dead-letter queue an expired message stays owed and
                // is reported in the log (and counted as backlog).
                q.lock().unclaim(sequence);
                continue;
            }
            if let Err(error) = self
                .evict(q, queue, sequence, message, &reason, target.clone())
                .await
            {
                // Kept (and retried at the next check); older ones go first, so stop here.
                tracing::warn!(%error, queue, sequence, "dead-letter queue refused an expired message; kept");
                break;
            }
        }
    }

    fn send(&self, q: &OwnedQueue, queue: &str, outgoing: Vec<queue::Outgoing>) {
        let mut by_link: HashMap<u64, Vec<(peer::PeerDelivery, String, u64, u32)>> = HashMap::new();
        let timeouts: HashMap<String, prost_types::Duration> = q
            .lock()
            .view
            .routes
            .iter()
            .filter_map(|r| r.ack_timeout.map(|t| (r.subscription.clone(), t)))
            .collect();
        for o in outgoing {
            self.metrics.forwarded(queue, &o.subscription);
            let delivery = peer::PeerDelivery {
                subscription: o.subscription.clone(),
                queue: queue.to_owned(),
                sequence: o.sequence,
                attempt: o.attempt,
                message: Some((*o.message).clone()),
                ack_timeout: timeouts.get(&o.subscription).copied(),
            };
            by_link.entry(o.link).or_default().push((
                delivery,
                o.subscription,
                o.sequence,
                o.attempt,
            ));
        }
        // Frames of at most one peer batch (or one message), which the consumer's frame limit
        // takes whatever the window.
        let batches: Vec<_> = by_link
            .into_iter()
            .flat_map(|(link, items)| {
                crate::frames::batches(
                    items,
                    |(d, ..)| {
                        d.message
                            .as_ref()
                            .map_or(0, |m| queue::message_size(m) as usize)
                    },
                    crate::frames::PEER_BATCH_BYTES,
                )
                .into_iter()
                .map(move |batch| (link, batch))
            })
            .collect();
        for (link, items) in batches {
            let deliveries: Vec<peer::PeerDelivery> =
                items.iter().map(|(d, ..)| d.clone()).collect();
            if !self.links.send(link, deliveries) {
                let mut state = q.lock();
                for (_, sub, seq, attempt) in items {
                    self.links.return_credit(link, &sub);
                    state.fail(
                        &sub,
                        seq,
                        attempt,
                        Failure::uncounted("peer link unavailable"),
                        Instant::now(),
                        0.0,
                    );
                }
                q.wake.notify_one();
            }
        }
    }

    async fn run_events(self: Arc<Self>, mut events: mpsc::Receiver<LinkEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                LinkEvent::Credit { subscription } => {
                    let view = self.view.borrow().clone();
                    if let Some(q) = view
                        .queue_of_route(&subscription)
                        .and_then(|n| self.get_queue(n))
                    {
                        q.wake.notify_one();
                    }
                }
                LinkEvent::Settlements { link, settlements } => {
                    self.settle(link, settlements).await
                }
                LinkEvent::Lost { link } => {
                    // The consumer sidecar may have crashed on the message (a poison message that
                    // kills its pod): the attempt counts, so it ends in the dead-letter queue.
                    for q in self.queues() {
                        let mut dead = Vec::new();
                        let name = {
                            let mut state = q.lock();
                            for (sub, seq, attempt) in state.link_lost(link) {
                                let outcome = state.fail(
                                    &sub,
                                    seq,
                                    attempt,
                                    Failure::counted("peer link lost", None),
                                    Instant::now(),
                                    rand::random(),
                                );
                                q.log.attempted(
                                    &state.name,
                                    &sub,
                                    seq,
                                    state.attempts_of(&sub, seq),
                                );
                                dead.extend(outcome);
                            }
                            state.name.clone()
                        };
                        for dl in dead {
                            self.dead_letter(&q, &name, dl).await;
                        }
                        q.wake.notify_one();
                    }
                }
                LinkEvent::Up => {
                    for q in self.queues() {
                        q.wake.notify_one();
                    }
                }
            }
        }
    }

    /// Settlements that came on `link`: only for deliveries of subscriptions that link's consumer
    /// serves (see [`QueueState::ack`] for late acks).
    async fn settle(self: &Arc<Self>, link: u64, settlements: peer::Settlements) {
        let view = self.view.borrow().clone();
        let now = Instant::now();
        let consumer = self.links.address_of(link);
        let serves = |queue: &str, subscription: &str| {
            consumer.as_ref().is_some_and(|addr| {
                view.queue(queue).is_some_and(|qv| {
                    qv.routes.iter().any(|r| {
                        r.subscription == subscription
                            && r.consumers.iter().any(|c| &c.peer_address == addr)
                    })
                })
            })
        };
        let mut touched: HashMap<String, Arc<OwnedQueue>> = HashMap::new();
        let mut dead = Vec::new();
        for ack in settlements.acks {
            let Some(name) = view.queue_of_route(&ack.subscription) else {
                continue;
            };
            let Some(q) = self.get_queue(name) else {
                continue;
            };
            let from_consumer = serves(name, &ack.subscription);
            if q.lock().ack(
                &ack.subscription,
                ack.sequence,
                ack.attempt,
                link,
                from_consumer,
            ) {
                q.log
                    .settle(name, &ack.subscription, ack.sequence, Outcome::Acked);
                self.metrics.acked(name, &ack.subscription);
            }
            touched.insert(name.to_owned(), q);
        }
        for nack in settlements.nacks {
            let Some(r) = nack.delivery else { continue };
            let Some(name) = view.queue_of_route(&r.subscription) else {
                continue;
            };
            let Some(q) = self.get_queue(name) else {
                continue;
            };
            let delay = nack.delay.as_ref().map(qmesh_proto::convert::std_duration);
            let failure = if nack.undelivered {
                Failure::uncounted(&nack.reason)
            } else if nack.dead_letter {
                Failure::rejected(&nack.reason)
            } else {
                Failure::counted(&nack.reason, delay)
            };
            let outcome = {
                let mut state = q.lock();
                let outcome = state.fail(
                    &r.subscription,
                    r.sequence,
                    r.attempt,
                    failure.on(link),
                    now,
                    rand::random(),
                );
                if failure.counted {
                    q.log.attempted(
                        name,
                        &r.subscription,
                        r.sequence,
                        state.attempts_of(&r.subscription, r.sequence),
                    );
                }
                outcome
            };
            if let Some(dl) = outcome {
                dead.push((Arc::clone(&q), name.to_owned(), dl));
            }
            touched.insert(name.to_owned(), q);
        }
        for (q, name, dl) in dead {
            self.dead_letter(&q, &name, dl).await;
        }
        for q in touched.values() {
            q.wake.notify_one();
        }
    }

    async fn follow_view(self: Arc<Self>) {
        let mut rx = self.view.clone();
        loop {
            let view = rx.borrow_and_update().clone();
            self.restore_waiting(&view);
            let mut wanted = HashSet::new();
            for qv in view.queues() {
                for r in &qv.routes {
                    wanted.extend(r.consumers.iter().map(|c| c.peer_address.clone()));
                }
                // Counters of every queue this sidecar may own exist at 0 before their first
                // event, which a rate or `increase()` sees only from a sample before it.
                let routes: Vec<&str> = qv.routes.iter().map(|r| r.subscription.as_str()).collect();
                self.metrics.owner_series(&qv.name, &routes);
                if let Some(q) = self.get_queue(&qv.name) {
                    let joined = {
                        let mut state = q.lock();
                        state.update_view(qv.clone(), Instant::now());
                        state.join_new_routes()
                    };
                    if joined && q.log.pages() {
                        self.save_memos();
                    }
                    q.wake.notify_one();
                }
            }
            self.links.retain(&wanted);
            self.replicas.set_peers(&view.wire.peers);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Takes over messages another (draining) sidecar owned: persisted here with their owing
    /// subscriptions and attempt counts, then delivered like any of ours. Refused when this sidecar
    /// may not own the queue.
    pub async fn adopt(self: &Arc<Self>, owned: peer::OwnedMessage) -> Result<(), BrokerError> {
        // A sidecar on its way out takes nothing over: it would have to hand it on again.
        if self.draining.load(Ordering::SeqCst) {
            return Err(BrokerError::ShuttingDown);
        }
        let view = self.view.borrow().clone();
        let queue = owned.queue.clone();
        let q = self
            .queue_for(&view, &queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.clone()))?;
        let message = owned.message.unwrap_or_default();
        if message.headers.contains_key(transactions::HALF_HEADER) {
            // A half message of a transaction still open: staged here, checked back with this
            // pod's app (any producer of the queue may answer for its transactions).
            let mut plain = message.clone();
            plain.headers.remove(transactions::HALF_HEADER);
            if let Some(why) = headers::forged(&queue, &plain.headers, |_| false) {
                return Err(BrokerError::Invalid(format!(
                    "a half message handed over for queue {queue:?} is refused: {why}"
                )));
            }
            return self.adopt_half(&q, &queue, message).await;
        }
        let message = Arc::new(message);
        // What is taken over goes through a publish's admission: a peer cannot put in what no app
        // or broker could — reserved headers the broker would not have set, more than the queue's
        // message limit, an id its dedup window already holds, more than its retention allows.
        if let Some(why) = headers::forged(&queue, &message.headers, |origin| {
            dead_letter_target(&view, origin, &queue)
        }) {
            return Err(BrokerError::Invalid(format!(
                "a message handed over for queue {queue:?} is refused: {why}"
            )));
        }
        let size = queue::message_size(&message);
        if let Some(limit) = view
            .queue(&queue)
            .and_then(|qv| qv.policy.as_ref())
            .map(|p| p.max_message_bytes)
            .filter(|&limit| limit > 0)
            && size > limit
        {
            return Err(BrokerError::TooLarge {
                queue: queue.clone(),
                size: size as usize,
                limit,
            });
        }
        // Taken over like a publish: within this sidecar's memory bound, or refused (the sender
        // tries another peer; a replica keeps its copy and tries again).
        let spills = {
            let state = q.lock();
            q.log.pages() && !state.replicated()
        };
        if q.lock().duplicate_of(&message.id, Instant::now()).is_some() {
            // Stored here already (the same message adopted twice, or published here too): taken
            // over, and not stored twice.
            return Ok(());
        }
        let _admission = self.admit(&queue, size, spills)?;
        if let Some(policy) = view.queue(&queue).and_then(|qv| qv.policy.clone()) {
            self.make_room(&q, &queue, &policy, size).await?;
        }
        // Every owing subscription is kept, also those this sidecar's view lacks (dormant until
        // they appear or the removal grace passes): a hand-over never drops what is owed.
        let pending: Vec<(String, u32)> = owned
            .pending
            .into_iter()
            .map(|p| (p.subscription, p.attempts))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let subs: Vec<String> = pending.iter().map(|(s, _)| s.clone()).collect();
        let (sequence, appended) = {
            let mut state = q.lock();
            let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
            state.reserve(sequence, &message.id, now);
            (sequence, q.log.append(&queue, sequence, &message, &subs))
        };
        // Runs to its end once reserved, like a publish (see `accept`).
        let owner = Arc::clone(self);
        RunToEnd::new(async move {
            let at = match appended.await {
                Ok(at) => at,
                Err(error) => {
                    q.lock().abandon(sequence, &message.id, &error);
                    return Err(error);
                }
            };
            for (sub, attempts) in &pending {
                if *attempts > 0 {
                    q.log.attempted(&queue, sub, sequence, *attempts);
                }
            }
            owner.remember(&q, &queue, &message, sequence);
            let replicated = q.lock().replicated();
            owner.place(&q, &queue, sequence, message, pending, at, replicated, now);
            {
                let state = q.lock();
                // Replicated queues: the copy follows in the background (or with the next re-sync).
                if state.replicated()
                    && let Pick::Up(addr) = owner.replicas.pick(&queue)
                    && owner.replicas.is_synced(&addr, &queue)
                    && let Some(copy) = state
                        .messages
                        .get(&sequence)
                        .map(|e| owned_message(&state, sequence, e))
                {
                    owner.replicas.offer(&addr, Arc::new(copy), None);
                }
            }
            q.wake.notify_one();
            Ok(())
        })
        .await
    }

    /// Sends a publish's copy and waits (until `deadline`) for a replica's confirmation; when the
    /// link breaks or the replica refuses the queue, the next replica is tried.
    async fn replicate_copy(
        &self,
        q: &OwnedQueue,
        queue: &str,
        mut addr: String,
        copy: Arc<peer::OwnedMessage>,
        deadline: Instant,
    ) -> Result<(), String> {
        loop {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.replicas.offer(&addr, Arc::clone(&copy), Some(tx)) {
                match tokio::time::timeout_at(deadline.into(), rx).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(_)) => {}
                    Err(_) => {
                        return Err(format!(
                            "no replica confirmed the copy within {} (last tried {addr})",
                            qmesh_api::Duration(self.replicas.timeout())
                        ));
                    }
                }
            }
            addr = self
                .replica_for(q, queue, deadline)
                .await
                .map_err(|e| match e {
                    BrokerError::ReplicaUnavailable { reason, .. } => reason,
                    other => other.to_string(),
                })?;
        }
    }

    /// The replica peer for a publish of `queue`, waiting (until `deadline`) for one to be
    /// connected; makes sure that replica's stream has every owned message of the queue.
    async fn replica_for(
        &self,
        q: &OwnedQueue,
        queue: &str,
        deadline: Instant,
    ) -> Result<String, BrokerError> {
        let addr = self
            .replicas
            .target(queue, deadline)
            .await
            .map_err(|reason| BrokerError::ReplicaUnavailable {
                queue: queue.to_owned(),
                reason,
            })?;
        if !self.replicas.is_synced(&addr, queue) {
            self.resync(q, queue, &addr);
        }
        Ok(addr)
    }

    /// Sends every owned message of `queue` to the replica at `addr` (under the queue's lock, so
    /// no settlement of them can overtake the copies).
    fn resync(&self, q: &OwnedQueue, queue: &str, addr: &str) {
        let state = q.lock();
        let copies = state
            .messages
            .iter()
            .map(|(seq, e)| Arc::new(owned_message(&state, *seq, e)))
            .collect();
        self.replicas.resync(addr, queue, copies);
    }

    /// Keeps replicas current: every 250 ms reports settled messages and the floor (every sequence
    /// below it is settled), re-sends owned messages to a replica stream that (re)appeared, and
    /// refreshes the replica gauge.
    async fn run_replication(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Recovered messages not yet restored: held for the whole computation (they move into a
            // queue's state under this lock).
            let recovered = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
            let recovered_floor = recovered
                .values()
                .flat_map(|records| records.iter().map(|r| r.sequence))
                .min();
            // Read first: a publish numbered after this read cannot be below the floor.
            let mut floor = self.next_sequence.load(Ordering::SeqCst);
            if let Some(first) = recovered_floor {
                floor = floor.min(first);
            }
            let mut any = false;
            for q in self.queues() {
                let (name, replicated) = {
                    let mut state = q.lock();
                    let removed = std::mem::take(&mut state.removed);
                    self.replicas.settled(&removed);
                    if !state.replicated() {
                        continue;
                    }
                    if let Some(first) = state.messages.keys().next() {
                        floor = floor.min(*first);
                    }
                    if let Some(first) = state.appending.first() {
                        floor = floor.min(*first);
                    }
                    (state.name.clone(), !state.messages.is_empty())
                };
                any = true;
                if replicated
                    && let Pick::Up(addr) = self.replicas.pick(&name)
                    && !self.replicas.is_synced(&addr, &name)
                {
                    self.resync(&q, &name, &addr);
                }
            }
            drop(recovered);
            if any {
                self.replicas.set_floor(floor);
            }
        }
    }

    /// After a complete hand-over: tells the replicas nothing of this owner is owed any more, so
    /// they do not adopt copies the new owner already has.
    pub async fn release_replicas(&self, deadline: Instant) {
        if self.backlog() == 0 {
            self.replicas.release_all(deadline).await;
        }
    }

    /// Queues that still own messages, for a hand-over.
    pub fn owned_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self
            .queues()
            .iter()
            .filter_map(|q| {
                let s = q.lock();
                (s.backlog() > 0).then(|| s.name.clone())
            })
            .collect();
        for queue in self.queues_with_half_messages() {
            if !queues.contains(&queue) {
                queues.push(queue);
            }
        }
        queues
    }

    /// The oldest messages still owed in `queue`, for one hand-over batch: at most `max` of them
    /// and `max_bytes` (but always one), with their owing subscriptions and attempts.
    pub fn owned_messages(
        &self,
        queue: &str,
        max: usize,
        max_bytes: u64,
    ) -> Vec<peer::OwnedMessage> {
        let Some(q) = self.get_queue(queue) else {
            return Vec::new();
        };
        let state = q.lock();
        let mut out = Vec::new();
        let mut bytes = 0;
        for (seq, entry) in state.messages.iter() {
            if out.len() >= max || (!out.is_empty() && bytes + entry.size > max_bytes) {
                break;
            }
            bytes += entry.size;
            out.push(owned_message(&state, *seq, entry));
        }
        // Half messages of open transactions go last, once everything else of the queue went.
        if out.is_empty() && state.spill.is_none() {
            drop(state);
            let mut half = self.half_messages(queue, max);
            let mut bytes = 0;
            half.retain(|m| {
                let size = m.message.as_ref().map_or(0, queue::message_size);
                bytes += size;
                bytes == size || bytes <= max_bytes
            });
            return half;
        }
        out
    }

    /// Memory held by messages over all queues, and messages spilled (in the log only).
    pub fn memory_figures(&self) -> (u64, u64) {
        self.queues().iter().fold((0, 0), |(held, spilled), q| {
            let s = q.lock();
            (
                held + s.memory(),
                spilled + s.spill.as_ref().map_or(0, |sp| sp.messages),
            )
        })
    }

    /// Whether `queue` has spilled messages (in the log only, not yet read back).
    pub fn spilled(&self, queue: &str) -> bool {
        self.get_queue(queue)
            .is_some_and(|q| q.lock().spill.is_some())
    }

    /// Reads spilled messages of `queue` back now, if memory has room; returns whether any came.
    pub async fn page_in_queue(self: &Arc<Self>, queue: &str) -> bool {
        let Some(q) = self.get_queue(queue) else {
            return false;
        };
        let before = q.lock().messages.len();
        self.page_in(&q, queue).await;
        q.lock().messages.len() > before
    }

    /// Forgets messages another sidecar now owns.
    pub fn handed_over(&self, messages: &[peer::OwnedMessage]) {
        let half: Vec<u64> = messages
            .iter()
            .filter(|m| {
                m.message
                    .as_ref()
                    .is_some_and(|m| m.headers.contains_key(transactions::HALF_HEADER))
            })
            .map(|m| m.sequence)
            .collect();
        if !half.is_empty() {
            self.half_messages_handed_over(&half);
        }
        for m in messages {
            let Some(q) = self.get_queue(&m.queue) else {
                continue;
            };
            let owed = q.lock().evict(m.sequence);
            for (sub, _) in owed {
                q.log.settle(&m.queue, &sub, m.sequence, Outcome::Acked);
            }
            q.wake.notify_one();
        }
    }

    /// Gives up every acked message kept for replay, on every queue: what is owed comes first.
    fn shed_kept(&self, why: &str) {
        let mut messages = 0;
        for q in self.queues() {
            let runs = {
                let mut s = q.lock();
                messages += s.kept.messages;
                s.kept.all()
            };
            for (segment, n) in runs {
                q.log.release_run(segment, n);
            }
        }
        if messages > 0 {
            tracing::warn!(
                messages,
                why,
                "acked messages kept for replay (retention.keepAcked) are given up to make room"
            );
        }
    }

    /// Replays `subscription` of `queue` from messages published at `from` on (`qmesh sub
    /// rewind`): `Some(through)`, the highest sequence covered, when this owner has the queue and
    /// the subscription is one of its routes.
    pub fn rewind(&self, queue: &str, subscription: &str, from: SystemTime) -> Option<u64> {
        let q = self.get_queue(queue)?;
        let through = q.lock().rewind(subscription, retain::unix_ms(from))?;
        if q.log.pages() {
            self.save_memos();
        }
        q.wake.notify_one();
        tracing::info!(
            queue,
            subscription,
            through,
            "rewind: replaying from the log"
        );
        Some(through)
    }

    /// The links to consumer sidecars with the credits they hold (admin stats).
    pub fn link_credits(&self) -> Vec<serde_json::Value> {
        self.links.credit_table()
    }

    /// Other sidecars of the mesh, candidates to take over.
    pub fn dialer(&self) -> &Arc<Dialer> {
        &self.dialer
    }

    /// Addresses of the peers in the view.
    pub fn peers(&self) -> Vec<String> {
        self.view
            .borrow()
            .wire
            .peers
            .iter()
            .map(|p| p.peer_address.clone())
            .collect()
    }

    /// Per-queue and per-subscription figures for stats and metrics.
    pub fn stats(&self) -> Vec<QueueFigures> {
        let now = Instant::now();
        let now_ms = retain::unix_ms(SystemTime::now());
        self.queues()
            .iter()
            .map(|q| {
                let s = q.lock();
                // Consumer sidecars of each route this owner has a live `Forward` link to.
                let links: HashMap<&str, u64> = s
                    .view
                    .routes
                    .iter()
                    .map(|r| {
                        let up = r
                            .consumers
                            .iter()
                            .filter(|c| self.links.connected(&c.peer_address))
                            .count();
                        (r.subscription.as_str(), up as u64)
                    })
                    .collect();
                QueueFigures {
                    queue: s.name.clone(),
                    backlog_messages: s.backlog(),
                    backlog_bytes: s.backlog_bytes(),
                    kept_messages: s.kept.messages,
                    kept_bytes: s.kept.bytes,
                    published_total: s.published_total,
                    subscriptions: s
                        .subs
                        .iter()
                        .map(|(name, sub)| SubFigures {
                            subscription: name.clone(),
                            backlog: sub.backlog(),
                            in_flight: sub.in_flight.len() as u64,
                            dead_lettered_total: sub.dead_lettered_total,
                            parked: sub.parked.len() as u64,
                            waiting: sub.waiting.len() as u64,
                            scheduled: sub.scheduled(),
                            oldest_age: s
                                .oldest_owed_ms(name, now_ms, now)
                                .map(|ms| Duration::from_millis(now_ms.saturating_sub(ms))),
                            consumer_links: links.get(name.as_str()).copied(),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

/// Owner-side figures of one queue.
#[derive(Debug, Clone)]
pub struct QueueFigures {
    /// Queue name.
    pub queue: String,
    /// Unsettled messages.
    pub backlog_messages: u64,
    /// Their bytes.
    pub backlog_bytes: u64,
    /// Acked messages kept in the log for replay (`retention.keepAcked`).
    pub kept_messages: u64,
    /// Their record bytes.
    pub kept_bytes: u64,
    /// Accepted publishes since start.
    pub published_total: u64,
    /// Per subscription.
    pub subscriptions: Vec<SubFigures>,
}

/// Owner-side figures of one subscription.
#[derive(Debug, Clone)]
pub struct SubFigures {
    /// Subscription name.
    pub subscription: String,
    /// Messages it still owes here.
    pub backlog: u64,
    /// Deliveries out.
    pub in_flight: u64,
    /// Dead-lettered since start.
    pub dead_lettered_total: u64,
    /// Exhausted without a dead-letter queue, kept.
    pub parked: u64,
    /// Waiting: out a retry backoff or a nack's delay, or for the time of a delayed message.
    pub waiting: u64,
    /// Of those, delayed or scheduled messages not yet due (never delivered).
    pub scheduled: u64,
    /// How long ago the oldest message it owes here was published
    /// ([`queue::QueueState::oldest_owed_ms`]); `None` when it owes nothing.
    pub oldest_age: Option<Duration>,
    /// Consumer sidecars of the subscription this owner has a live link to; `None` when the view
    /// no longer routes the subscription (it is dormant).
    pub consumer_links: Option<u64>,
}

/// Runs a blocking read of a queue's log off the async threads; a failure is logged (`what` failed)
/// and the caller tries again later.
async fn read_log(
    q: &OwnedQueue,
    name: &str,
    what: &str,
    read: impl FnOnce(&dyn OwnerLog) -> Result<log::Page, BrokerError> + Send + 'static,
) -> Option<log::Page> {
    let log = Arc::clone(&q.log);
    match tokio::task::spawn_blocking(move || read(log.as_ref())).await {
        Ok(Ok(page)) => Some(page),
        Ok(Err(error)) => {
            tracing::error!(%error, queue = name, "{what} could not read the log; trying again later");
            None
        }
        Err(error) => {
            tracing::error!(%error, queue = name, "{what}: the read task failed; trying again later");
            None
        }
    }
}

/// One owned message with its owing subscriptions and attempts, as handed over or replicated.
/// Whether the view says messages of `origin` are dead-lettered into `target`.
fn dead_letter_target(view: &View, origin: &str, target: &str) -> bool {
    view.queue(target)
        .is_some_and(|q| q.dead_letter_of.iter().any(|o| o == origin))
}

fn owned_message(state: &QueueState, seq: u64, entry: &queue::Entry) -> peer::OwnedMessage {
    peer::OwnedMessage {
        queue: state.name.clone(),
        sequence: seq,
        message: Some((*entry.message).clone()),
        pending: entry
            .pending
            .iter()
            .map(|sub| peer::PendingSubscription {
                subscription: sub.clone(),
                attempts: state
                    .subs
                    .get(sub)
                    .and_then(|s| s.attempts.get(&seq))
                    .copied()
                    .unwrap_or(0),
            })
            .collect(),
    }
}

/// The answer to a publish whose id is inside the dedup window: the original's outcome, once known.
async fn answer_duplicate(
    id: &str,
    duplicate: queue::Duplicate,
) -> Result<v1::PublishResponse, BrokerError> {
    let sequence = match duplicate {
        queue::Duplicate::Stored(sequence) => sequence,
        queue::Duplicate::Pending(sequence, outcome) => {
            outcome.await.map_err(|_| {
                BrokerError::Internal("the original publish ended without an outcome".into())
            })??;
            sequence
        }
    };
    Ok(v1::PublishResponse {
        id: id.to_owned(),
        sequence,
        duplicate: true,
    })
}

/// A token bucket for a rate limit (rates below one per second allowed).
///
/// Any numbers make a working bucket: the rate is held to [0.001, 10⁹] per second (NaN and
/// negatives are the minimum) and the burst to [1, 100,000], so the bucket's size in time always
/// fits its clock.
pub fn rate_limiter(limit: &control::RateLimit) -> DefaultDirectRateLimiter {
    let rate = limit.messages_per_second;
    let per_second = if rate.is_nan() {
        0.001
    } else {
        rate.clamp(0.001, 1e9)
    };
    let period = Duration::from_secs_f64(1.0 / per_second).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(limit.burst.clamp(1, 100_000)).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    DefaultDirectRateLimiter::direct(quota)
}

/// A unique, time-ordered message id (48-bit milliseconds + 80 random bits, Crockford base32 like a
/// ULID).
pub fn new_id() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let value: u128 = (ms << 80) | (rand::random::<u128>() >> 48);
    (0..26)
        .rev()
        .map(|i| ALPHABET[((value >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// When an app's publish may be delivered: at once, after a delay, or from a time on (delayed and
/// scheduled messages). Each names the field or header it came from, for errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Schedule {
    /// At once.
    #[default]
    Now,
    /// This long after the publish.
    After(Duration, &'static str),
    /// From this time on (a past time: at once).
    At(SystemTime, &'static str),
}

impl Schedule {
    /// From `PublishRequest.delay` / `deliver_at` (at most one; a zero delay is none).
    pub fn from_wire(
        delay: Option<prost_types::Duration>,
        at: Option<prost_types::Timestamp>,
    ) -> Result<Self, BrokerError> {
        match (delay, at) {
            (Some(_), Some(_)) => Err(BrokerError::Invalid(
                "give delay or deliver_at, not both".into(),
            )),
            (Some(d), None) if d.seconds < 0 || d.nanos < 0 => Err(BrokerError::Invalid(format!(
                "delay: {}s is negative",
                d.seconds
            ))),
            (Some(d), None) => {
                let d = qmesh_proto::convert::std_duration(&d);
                Ok(if d.is_zero() {
                    Self::Now
                } else {
                    Self::After(d, "delay")
                })
            }
            (None, Some(t)) => SystemTime::try_from(t)
                .map(|t| Self::At(t, "deliver_at"))
                .map_err(|e| BrokerError::Invalid(format!("deliver_at: not a valid time: {e}"))),
            (None, None) => Ok(Self::Now),
        }
    }

    /// The unix ms from which the message may be delivered (`None`: at once), within the queue's
    /// `maxDelay`.
    pub fn deliver_at_ms(
        self,
        queue: &str,
        max_delay: Duration,
        now: SystemTime,
    ) -> Result<Option<u64>, BrokerError> {
        let (at, wait, field) = match self {
            Self::Now => return Ok(None),
            Self::After(d, field) => (now.checked_add(d), d, field),
            Self::At(t, field) => match t.duration_since(now) {
                Ok(ahead) if !ahead.is_zero() => (Some(t), ahead, field),
                _ => return Ok(None),
            },
        };
        if wait > max_delay {
            return Err(BrokerError::Invalid(format!(
                "{field}: {} ahead is beyond queue {queue:?}'s maxDelay of {} (spec.maxDelay)",
                qmesh_api::Duration(wait),
                qmesh_api::Duration(max_delay)
            )));
        }
        Ok(at.map(retain::unix_ms))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::headers;

    fn with(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_adopted_message_carries_only_the_reserved_headers_the_broker_could_have_set() {
        let into_dlq = |origin: &str| origin == "orders";
        let dead_letter = with(&[
            (headers::REASON, "max deliveries"),
            (headers::ORIGINAL_QUEUE, "orders"),
            (headers::DELIVERY_COUNT, "3"),
            (headers::ORIGINAL_ID, "a"),
            ("app", "x"),
        ]);
        assert_eq!(headers::forged("orders-dlq", &dead_letter, into_dlq), None);
        let redriven = with(&[(headers::ORIGINAL_ID, "a"), (headers::REDRIVEN_FROM, "dlq")]);
        assert_eq!(headers::forged("orders", &redriven, |_| false), None);
        // A dead-letter reason in a queue nothing dead-letters into, or naming another origin.
        let reason = with(&[(headers::REASON, "forged")]);
        assert!(headers::forged("orders", &reason, |_| false).is_some());
        let elsewhere = with(&[
            (headers::REASON, "x"),
            (headers::ORIGINAL_QUEUE, "payments"),
        ]);
        assert!(headers::forged("orders-dlq", &elsewhere, into_dlq).is_some());
        // A delayed message's time travels (hand-over, adoption), if it is a time.
        let delayed = with(&[(super::queue::DELIVER_AT_HEADER, "1765000000000")]);
        assert_eq!(headers::forged("orders", &delayed, |_| false), None);
        let garbled = with(&[(super::queue::DELIVER_AT_HEADER, "soon")]);
        assert!(headers::forged("orders", &garbled, |_| false).is_some());
        // Any other reserved header, in any case.
        let other = with(&[("QMESH-Replica-Owner-Sequence", "9")]);
        let why = headers::forged("orders", &other, into_dlq).unwrap();
        assert!(why.contains("QMESH-Replica-Owner-Sequence"), "{why}");
    }
}
