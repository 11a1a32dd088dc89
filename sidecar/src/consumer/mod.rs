//! The consumer side: deliveries that owners forward to this pod, held until this pod's apps take
//! them (gRPC stream, HTTP long-poll or push), and the credits that let owners send more.
//!
//! ```text
//!   owner ══Forward══▶ deliver() ──▶ buffer ──take()──▶ app (lease with receipt)
//!         ◀═credits══ pump (window − outstanding, rate-limit tokens)
//!         ◀═settlements══ settle() ◀── app ack / nack, lease timeout, app stream closed
//! ```
//! Per subscription, `Σ granted + held ≤ window`, where the window is `maxInFlight` capped by what the
//! connected apps asked for: memory is bounded by the window, and a slow app slows its owners down
//! (backpressure), never the other way round. The window goes to the owner streams that have work
//! (each reports its `Demand`); credits idle at an owner without work are revoked when another owner
//! waits for them, and all of them when the last app leaves.
//!
//! One deadline per attempt: `ackTimeout` from the moment a delivery arrives here. A delivery still
//! buffered then goes back uncounted (no app saw it); a lease past it is nacked ("ack timeout"), and
//! the app's late ack is still passed on — the owner takes it while the message is still owed.

pub mod push;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use governor::DefaultDirectRateLimiter;
use qmesh_proto::{
    control,
    peer::{self, ConsumerFrame, consumer_frame},
    v1,
};
use tokio::sync::{Notify, mpsc};

use crate::{error::BrokerError, metrics::Metrics, view::ViewRx};

/// Frames to an owner stream.
pub type FrameTx = mpsc::Sender<Result<ConsumerFrame, tonic::Status>>;

/// Who holds a lease.
pub type Holder = u64;
/// Leases taken over HTTP: not tied to a connection.
pub const HTTP_HOLDER: Holder = 0;

struct OwnerStream {
    owner: String,
    tx: FrameTx,
}

#[derive(Default, Clone, Copy)]
struct Account {
    /// Credits the owner holds, unused.
    granted: u32,
    /// Deliveries buffered or leased to an app.
    held: u32,
    /// The owner has messages ready (its last `Demand`).
    demand: bool,
    /// A revoke is outstanding (answered by `CreditReturn`).
    revoking: bool,
}

struct Held {
    stream: u64,
    delivery: peer::PeerDelivery,
    /// The attempt's deadline (arrival + ack timeout).
    deadline: Instant,
}

/// A lease that timed out, remembered so the app's late ack still reaches the owner.
struct Expired {
    stream: u64,
    reference: peer::DeliveryRef,
}

/// Why an app gave a delivery back.
#[derive(Debug, Clone)]
pub struct Nack {
    /// Wait at least this long before redelivering (`None`: the subscription's backoff).
    pub delay: Option<Duration>,
    /// Why processing failed.
    pub reason: String,
    /// Give up now: dead-letter without further attempts (AMQP's `requeue=false`).
    pub dead_letter: bool,
}

impl Nack {
    /// A nack redelivered after `delay` (or the backoff).
    pub fn retry(delay: Option<Duration>, reason: impl Into<String>) -> Self {
        Self {
            delay,
            reason: reason.into(),
            dead_letter: false,
        }
    }
}

/// The largest window a subscription gets, whatever its `maxInFlight` says (sums of credits stay
/// far from overflowing).
pub const MAX_WINDOW: u32 = 100_000;

/// Most payload bytes handed to an app in one batch (at least one message).
pub const APP_BATCH_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// How many timed-out leases a subscription remembers for late acks (oldest forgotten first).
const EXPIRED_MEMORY: usize = 4096;

struct Lease {
    stream: u64,
    holder: Holder,
    reference: peer::DeliveryRef,
    queue: String,
    deadline: Instant,
}

#[derive(Default)]
struct LocalState {
    buffer: VecDeque<Held>,
    leases: HashMap<u64, Lease>,
    accounts: HashMap<u64, Account>,
    expired: HashMap<u64, Expired>,
    expired_order: VecDeque<u64>,
}

impl LocalState {
    fn remember_expired(&mut self, receipt: u64, expired: Expired) {
        if self.expired_order.len() >= EXPIRED_MEMORY
            && let Some(old) = self.expired_order.pop_front()
        {
            self.expired.remove(&old);
        }
        self.expired.insert(receipt, expired);
        self.expired_order.push_back(receipt);
    }
}

/// One subscription served by this pod.
pub struct LocalSub {
    name: String,
    settings: Mutex<control::ServedSubscription>,
    state: Mutex<LocalState>,
    available: Notify,
    pump: Notify,
    limiter: Mutex<Option<(control::RateLimit, Arc<DefaultDirectRateLimiter>)>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// App connections consuming now (gRPC streams, the push worker).
    apps: std::sync::atomic::AtomicUsize,
    /// Sum of the windows the connected gRPC streams asked for.
    app_windows: AtomicU64,
    /// Connected apps that take up to the whole window (the push worker).
    unbounded_apps: std::sync::atomic::AtomicUsize,
    /// Leases ended (settled or timed out): app streams waiting for room look again.
    released: Notify,
    /// Last HTTP poll: an HTTP consumer counts as present for a while after each poll.
    last_poll: Mutex<Option<Instant>>,
}

/// How long after its last poll an HTTP consumer still counts as present.
pub const HTTP_PRESENCE: Duration = Duration::from_secs(30);

impl LocalSub {
    /// Whether an app is consuming: credits are granted only then, so owners do not park messages
    /// in a pod whose app is not taking them.
    pub fn has_consumer(&self) -> bool {
        self.apps.load(Ordering::SeqCst) > 0
            || self
                .last_poll
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < HTTP_PRESENCE)
    }

    /// Number of app connections consuming now.
    pub fn consumers(&self) -> usize {
        self.apps.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current settings.
    pub fn settings(&self) -> control::ServedSubscription {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `maxInFlight` as the view gives it, held to [1, [`MAX_WINDOW`]].
    fn window(&self) -> u32 {
        self.settings().max_in_flight.clamp(1, MAX_WINDOW)
    }

    /// The window credits may fill now: `maxInFlight`, capped by what the connected apps can hold
    /// (gRPC streams' own windows); 0 without a consumer.
    fn effective_window(&self) -> u32 {
        if !self.has_consumer() {
            return 0;
        }
        let window = self.window();
        let http = self
            .last_poll
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < HTTP_PRESENCE);
        if http || self.unbounded_apps.load(Ordering::SeqCst) > 0 {
            return window;
        }
        let apps = self.app_windows.load(Ordering::SeqCst);
        window.min(u32::try_from(apps).unwrap_or(u32::MAX))
    }

    /// Leases held by one app connection.
    pub fn held_by(&self, holder: Holder) -> usize {
        self.lock()
            .leases
            .values()
            .filter(|l| l.holder == holder)
            .count()
    }

    /// Resolves when a lease ends (settled or timed out).
    pub async fn lease_released(&self) {
        self.released.notified().await;
    }

    fn ack_timeout(&self) -> Duration {
        self.settings()
            .ack_timeout
            .as_ref()
            .map(qmesh_proto::convert::std_duration)
            .unwrap_or(Duration::from_secs(30))
    }

    /// Deliveries handed to apps and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.lock().leases.len()
    }
}

/// Everything on the consumer side of this sidecar.
pub struct Consumers {
    view: ViewRx,
    app_port: Option<u16>,
    subs: Mutex<HashMap<String, Arc<LocalSub>>>,
    streams: Mutex<HashMap<u64, Arc<OwnerStream>>>,
    next_stream: AtomicU64,
    next_receipt: AtomicU64,
    metrics: Arc<Metrics>,
    counters: Mutex<HashMap<String, SubCounters>>,
    tasks: Arc<crate::supervise::Supervisor>,
}

/// Consumer-side totals of one subscription.
#[derive(Default, Clone, Debug)]
pub struct SubCounters {
    /// Handed to apps.
    pub delivered: u64,
    /// Acked by apps.
    pub acked: u64,
    /// Nacked or timed out.
    pub nacked: u64,
}

impl Consumers {
    /// The consumer side, following the view for served subscriptions.
    /// `app_port`, when set, replaces every pushed subscription's port (`qmesh run --app-port`).
    pub fn start(
        view: ViewRx,
        metrics: Arc<Metrics>,
        app_port: Option<u16>,
        tasks: Arc<crate::supervise::Supervisor>,
    ) -> Arc<Self> {
        let consumers = Arc::new(Self {
            view,
            app_port,
            subs: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            next_receipt: AtomicU64::new(1),
            metrics,
            counters: Mutex::new(HashMap::new()),
            tasks,
        });
        let tasks = Arc::clone(&consumers.tasks);
        tasks.spawn("consumer view", Arc::clone(&consumers).follow_view());
        consumers
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LocalSub>>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<OwnerStream>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A served subscription.
    pub fn subscription(&self, name: &str) -> Result<Arc<LocalSub>, BrokerError> {
        self.subs()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownSubscription(name.to_owned()))
    }

    /// Totals per served subscription.
    pub fn counters(&self) -> HashMap<String, SubCounters> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// In-flight deliveries per served subscription (with the queue).
    pub fn in_flight(&self) -> Vec<(String, String, usize)> {
        self.subs()
            .values()
            .map(|s| (s.name.clone(), s.settings().queue, s.in_flight()))
            .collect()
    }

    /// The credit state of each served subscription, for the admin stats: connected apps, the
    /// window credits may fill, and per owner stream what it was granted and what is held here.
    pub fn credit_state(&self) -> Vec<(String, serde_json::Value)> {
        let streams: HashMap<u64, String> = self
            .streams()
            .iter()
            .map(|(id, s)| (*id, s.owner.clone()))
            .collect();
        self.subs()
            .values()
            .map(|sub| {
                let st = sub.lock();
                let accounts: Vec<serde_json::Value> = st
                    .accounts
                    .iter()
                    .map(|(id, a)| {
                        serde_json::json!({
                            "stream": id, "owner": streams.get(id), "granted": a.granted,
                            "held": a.held, "demand": a.demand, "revoking": a.revoking,
                        })
                    })
                    .collect();
                let buffered = st.buffer.len();
                drop(st);
                (
                    sub.name.clone(),
                    serde_json::json!({
                        "apps": sub.consumers(), "window": sub.effective_window(),
                        "buffered": buffered, "streams": accounts,
                    }),
                )
            })
            .collect()
    }

    async fn follow_view(self: Arc<Self>) {
        let mut rx = self.view.clone();
        loop {
            let view = rx.borrow_and_update().clone();
            self.apply_view(&view);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn apply_view(self: &Arc<Self>, view: &crate::view::View) {
        {
            let mut subs = self.subs();
            let wanted: HashMap<String, control::ServedSubscription> = view
                .subscriptions()
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect();
            subs.retain(|name, sub| {
                let keep = wanted.contains_key(name);
                if !keep {
                    for t in sub
                        .tasks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .drain(..)
                    {
                        t.abort();
                    }
                }
                keep
            });
            for (name, settings) in wanted {
                match subs.get(&name) {
                    Some(sub) => {
                        *sub.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
                        sub.pump.notify_one();
                    }
                    None => {
                        let push = settings.mode() == control::DeliveryMode::Push;
                        let sub = Arc::new(LocalSub {
                            name: name.clone(),
                            settings: Mutex::new(settings),
                            state: Mutex::new(LocalState::default()),
                            available: Notify::new(),
                            pump: Notify::new(),
                            limiter: Mutex::new(None),
                            tasks: Mutex::new(Vec::new()),
                            apps: std::sync::atomic::AtomicUsize::new(0),
                            app_windows: AtomicU64::new(0),
                            unbounded_apps: std::sync::atomic::AtomicUsize::new(0),
                            released: Notify::new(),
                            last_poll: Mutex::new(None),
                        });
                        let mut tasks = vec![
                            self.tasks.spawn(
                                format!("credits of {name}"),
                                Arc::clone(self).run_pump(Arc::clone(&sub)),
                            ),
                            self.tasks.spawn(
                                format!("deadlines of {name}"),
                                Arc::clone(self).run_sweeper(Arc::clone(&sub)),
                            ),
                        ];
                        if push {
                            tasks.push(self.tasks.spawn(
                                format!("push of {name}"),
                                push::run(Arc::clone(self), Arc::clone(&sub)),
                            ));
                        }
                        *sub.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
                        subs.insert(name, sub);
                    }
                }
            }
        }
    }

    // === owner streams (peer API, server side) ===

    /// Registers a new owner stream; returns its id.
    /// Whether the sidecar behind owner stream `stream` is one the view names as an owner of
    /// `sub`'s queue (a publisher of it): only those may deliver.
    fn is_owner_of(&self, stream: u64, sub: &LocalSub) -> bool {
        let Some(owner) = self.streams().get(&stream).map(|s| s.owner.clone()) else {
            return false;
        };
        sub.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .owners
            .iter()
            .any(|o| o.name == owner)
    }

    /// Whether the view names `sidecar` as an owner of any subscription served here.
    pub fn owner_known(&self, sidecar: &str) -> bool {
        self.view
            .borrow()
            .subscriptions()
            .iter()
            .any(|s| s.owners.iter().any(|o| o.name == sidecar))
    }

    pub fn register(&self, owner: String, tx: FrameTx) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.streams()
            .insert(id, Arc::new(OwnerStream { owner, tx }));
        for sub in self.subs().values() {
            sub.pump.notify_one();
        }
        id
    }

    /// Forgets an owner stream: what it sent and no app has settled goes back to the owner by
    /// the owner's own redelivery (the stream is gone), so it is just dropped here.
    pub fn unregister(&self, stream: u64) {
        self.streams().remove(&stream);
        for sub in self.subs().values() {
            let mut st = sub.lock();
            st.buffer.retain(|h| h.stream != stream);
            st.leases.retain(|_, l| l.stream != stream);
            st.accounts.remove(&stream);
            drop(st);
            sub.pump.notify_one();
        }
    }

    /// Deliveries from an owner stream. A delivery without credit is a protocol violation that
    /// resets the stream (the owner redelivers; nothing is lost).
    pub fn deliver(&self, stream: u64, batch: peer::DeliveryBatch) -> Result<(), tonic::Status> {
        let mut refused = Vec::new();
        for delivery in batch.deliveries {
            let sub = self.subs().get(&delivery.subscription).cloned();
            let Some(sub) = sub else {
                let reason = format!(
                    "subscription {} is not served by this pod",
                    delivery.subscription
                );
                refused.push(undelivered(&delivery, &reason));
                continue;
            };
            if delivery.message.is_none() {
                return Err(tonic::Status::invalid_argument(
                    "delivery without a message",
                ));
            }
            if !self.is_owner_of(stream, &sub) {
                let reason = format!(
                    "this stream's sidecar is not an owner of the queue of subscription {}",
                    delivery.subscription
                );
                refused.push(undelivered(&delivery, &reason));
                continue;
            }
            let present = sub.has_consumer();
            let mut st = sub.lock();
            let account = st.accounts.entry(stream).or_default();
            if account.granted == 0 {
                return Err(tonic::Status::failed_precondition(format!(
                    "delivery for {} without credit",
                    delivery.subscription
                )));
            }
            account.granted -= 1;
            if !present {
                drop(st);
                refused.push(undelivered(&delivery, "no consumer app in this pod"));
                continue;
            }
            account.held += 1;
            let ack_timeout = delivery
                .ack_timeout
                .as_ref()
                .map(qmesh_proto::convert::std_duration)
                .unwrap_or_else(|| sub.ack_timeout());
            let deadline = Instant::now() + ack_timeout;
            st.buffer.push_back(Held {
                stream,
                delivery,
                deadline,
            });
            drop(st);
            sub.available.notify_waiters();
            sub.available.notify_one();
        }
        if !refused.is_empty()
            && let Some(s) = self.streams().get(&stream).cloned()
        {
            let frame = settlements_frame(Vec::new(), refused);
            let _ = s.tx.try_send(Ok(frame));
        }
        Ok(())
    }

    /// Deliveries an owner took back.
    pub fn withdraw(&self, stream: u64, withdraw: peer::Withdraw) {
        for r in withdraw.deliveries {
            if let Ok(sub) = self.subscription(&r.subscription) {
                let mut st = sub.lock();
                let before = st.buffer.len();
                st.buffer.retain(|h| {
                    !(h.stream == stream
                        && h.delivery.sequence == r.sequence
                        && h.delivery.attempt == r.attempt)
                });
                let removed = (before - st.buffer.len()) as u32;
                if let Some(a) = st.accounts.get_mut(&stream) {
                    a.held = a.held.saturating_sub(removed);
                }
                drop(st);
                sub.pump.notify_one();
            }
        }
    }

    // === credits ===

    fn limiter(&self, sub: &LocalSub) -> Option<Arc<DefaultDirectRateLimiter>> {
        let share = sub.settings().rate_share?;
        let mut slot = sub.limiter.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some((current, l)) if *current == share => Some(Arc::clone(l)),
            _ => {
                let l = Arc::new(crate::owner::rate_limiter(&share));
                *slot = Some((share, Arc::clone(&l)));
                Some(l)
            }
        }
    }

    /// Grants credits to owner streams as room frees up and rate-limit tokens allow, and revokes
    /// credits that sit idle where they are not needed.
    async fn run_pump(self: Arc<Self>, sub: Arc<LocalSub>) {
        loop {
            let notified = sub.pump.notified();
            let revokes = self.revokes(&sub);
            for (stream, credits) in revokes {
                let frame = ConsumerFrame {
                    frame: Some(consumer_frame::Frame::Revoke(peer::CreditRevoke {
                        subscription: sub.name.clone(),
                        credits,
                    })),
                };
                self.send_frame(stream, frame).await;
            }
            let room = self.room(&sub);
            if room == 0 {
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                continue;
            }
            let grants = match self.limiter(&sub) {
                Some(l) => {
                    l.until_ready().await;
                    self.allocate(&sub, 1)
                }
                None => self.allocate(&sub, room),
            };
            if grants.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                continue;
            }
            for (stream, credits) in grants {
                let frame = ConsumerFrame {
                    frame: Some(consumer_frame::Frame::Credit(peer::CreditGrant {
                        subscription: sub.name.clone(),
                        credits,
                    })),
                };
                self.send_frame(stream, frame).await;
            }
        }
    }

    async fn send_frame(&self, stream: u64, frame: ConsumerFrame) {
        let tx = self.streams().get(&stream).map(|s| s.tx.clone());
        let Some(tx) = tx else { return };
        if tx.send(Ok(frame)).await.is_err() {
            self.unregister(stream);
        }
    }

    fn eligible_streams(&self, sub: &LocalSub) -> Vec<u64> {
        let owners: Vec<String> = sub.settings().owners.into_iter().map(|o| o.name).collect();
        let mut streams: Vec<u64> = self
            .streams()
            .iter()
            .filter(|(_, s)| owners.is_empty() || owners.contains(&s.owner))
            .map(|(id, _)| *id)
            .collect();
        streams.sort_unstable();
        streams
    }

    /// Each eligible stream's fair part of the window: shared among the streams that have work, or
    /// among all of them while none says it has (so a lone owner is never kept waiting for a grant).
    fn targets(window: u32, streams: &[u64], st: &LocalState) -> HashMap<u64, u32> {
        let demanding: Vec<u64> = streams
            .iter()
            .copied()
            .filter(|id| st.accounts.get(id).is_some_and(|a| a.demand))
            .collect();
        let sharing = if demanding.is_empty() {
            streams.to_vec()
        } else {
            demanding
        };
        let share = if sharing.is_empty() {
            0
        } else {
            window.div_ceil(sharing.len() as u32)
        };
        streams
            .iter()
            .map(|id| (*id, if sharing.contains(id) { share } else { 0 }))
            .collect()
    }

    fn room(&self, sub: &LocalSub) -> u32 {
        let window = sub.effective_window();
        if window == 0 || self.eligible_streams(sub).is_empty() {
            return 0;
        }
        let st = sub.lock();
        let used: u32 = st.accounts.values().map(|a| a.granted + a.held).sum();
        window.saturating_sub(used)
    }

    /// Splits up to `credits` among eligible streams, each up to its target, those with work and
    /// the least outstanding first.
    fn allocate(&self, sub: &LocalSub, credits: u32) -> Vec<(u64, u32)> {
        let streams = self.eligible_streams(sub);
        if streams.is_empty() {
            return Vec::new();
        }
        let window = sub.effective_window();
        let mut st = sub.lock();
        let targets = Self::targets(window, &streams, &st);
        let used: u32 = st.accounts.values().map(|a| a.granted + a.held).sum();
        let mut left = credits.min(window.saturating_sub(used));
        let mut grants = Vec::new();
        let mut order = streams;
        order.sort_by_key(|id| {
            let a = st.accounts.get(id).copied().unwrap_or_default();
            (!a.demand, a.granted + a.held)
        });
        for id in order {
            if left == 0 {
                break;
            }
            let target = targets.get(&id).copied().unwrap_or(0);
            let account = st.accounts.entry(id).or_default();
            let give = target
                .saturating_sub(account.granted + account.held)
                .min(left);
            if give > 0 {
                account.granted += give;
                left -= give;
                grants.push((id, give));
            }
        }
        grants
    }

    /// Credits to take back: everything granted beyond the window (the last app left, or apps
    /// asked for less), and idle credits beyond their stream's target while a stream with work
    /// waits below its own.
    fn revokes(&self, sub: &LocalSub) -> Vec<(u64, u32)> {
        let streams = self.eligible_streams(sub);
        let window = sub.effective_window();
        let mut st = sub.lock();
        let targets = Self::targets(window, &streams, &st);
        let used: u32 = st.accounts.values().map(|a| a.granted + a.held).sum();
        let starving = streams.iter().any(|id| {
            let a = st.accounts.get(id).copied().unwrap_or_default();
            a.demand && a.granted + a.held < targets.get(id).copied().unwrap_or(0)
        });
        if used <= window && (!starving || used < window) {
            return Vec::new();
        }
        let mut revokes = Vec::new();
        for (id, account) in st.accounts.iter_mut() {
            if account.revoking || account.granted == 0 {
                continue;
            }
            let target = targets.get(id).copied().unwrap_or(0);
            let excess = (account.granted + account.held).saturating_sub(target);
            let n = excess.min(account.granted);
            if n > 0 {
                account.revoking = true;
                revokes.push((*id, n));
            }
        }
        revokes
    }

    /// An owner stream says whether it has messages ready for `demand.subscription`.
    pub fn demand(&self, stream: u64, demand: peer::Demand) {
        let Ok(sub) = self.subscription(&demand.subscription) else {
            return;
        };
        sub.lock().accounts.entry(stream).or_default().demand = demand.ready > 0;
        sub.pump.notify_one();
    }

    /// An owner stream gave credits back (answering a revoke).
    pub fn credit_returned(&self, stream: u64, returned: peer::CreditReturn) {
        let Ok(sub) = self.subscription(&returned.subscription) else {
            return;
        };
        if let Some(a) = sub.lock().accounts.get_mut(&stream) {
            a.granted = a.granted.saturating_sub(returned.credits);
            a.revoking = false;
        }
        sub.pump.notify_one();
    }

    // === apps ===

    /// Takes up to `max` deliveries for an app, waiting up to `wait` for the first.
    pub async fn take(
        &self,
        sub: &Arc<LocalSub>,
        max: usize,
        wait: Duration,
        holder: Holder,
    ) -> Vec<v1::Delivery> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = sub.available.notified();
            let taken = self.take_now(sub, max, holder);
            if !taken.is_empty() {
                return taken;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Vec::new();
            }
        }
    }

    /// Takes what is buffered right now.
    pub fn take_now(&self, sub: &LocalSub, max: usize, holder: Holder) -> Vec<v1::Delivery> {
        let mut out = Vec::new();
        let mut st = sub.lock();
        let mut bytes = 0usize;
        while out.len() < max {
            // One answer stays within what gRPC clients accept by default (4 MiB), unless a single
            // message is bigger.
            let next = st
                .buffer
                .front()
                .and_then(|h| h.delivery.message.as_ref())
                .map_or(0, |m| m.payload.len() + 512);
            if !out.is_empty() && bytes + next > APP_BATCH_BYTES {
                break;
            }
            bytes += next;
            let Some(held) = st.buffer.pop_front() else {
                break;
            };
            let receipt = self.next_receipt.fetch_add(1, Ordering::Relaxed);
            let d = held.delivery;
            let message = d.message.unwrap_or_default();
            let e2e = message
                .publish_time
                .and_then(|t| SystemTime::try_from(t).ok())
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map(|d| d.as_secs_f64());
            self.metrics
                .delivered(&d.queue, &d.subscription, d.attempt, e2e);
            st.leases.insert(
                receipt,
                Lease {
                    stream: held.stream,
                    holder,
                    reference: peer::DeliveryRef {
                        subscription: d.subscription.clone(),
                        sequence: d.sequence,
                        attempt: d.attempt,
                    },
                    queue: d.queue.clone(),
                    deadline: held.deadline,
                },
            );
            out.push(v1::Delivery {
                message: Some(message),
                attempt: d.attempt,
                receipt: receipt.to_string(),
            });
        }
        drop(st);
        if !out.is_empty() {
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            counters.entry(sub.name.clone()).or_default().delivered += out.len() as u64;
        }
        out
    }

    /// Acks (`nack` = None) or nacks deliveries by receipt. Returns the receipts that were unknown
    /// (already settled, or never issued). The ack of a lease that timed out is still passed on:
    /// the owner takes it while the message is owed (the work was done).
    pub async fn settle(
        &self,
        sub: &LocalSub,
        receipts: &[String],
        nack: Option<Nack>,
    ) -> Vec<String> {
        let mut unknown = Vec::new();
        let mut per_stream: HashMap<u64, (Vec<peer::DeliveryRef>, Vec<peer::PeerNack>)> =
            HashMap::new();
        {
            let mut st = sub.lock();
            for r in receipts {
                let id = r.parse::<u64>().ok();
                let lease = id.and_then(|id| st.leases.remove(&id));
                let Some(lease) = lease else {
                    match id.and_then(|id| st.expired.remove(&id)) {
                        // Late: the timeout nack went out already; an ack still settles it.
                        Some(late) => {
                            if nack.is_none() {
                                per_stream
                                    .entry(late.stream)
                                    .or_default()
                                    .0
                                    .push(late.reference);
                            }
                        }
                        None => unknown.push(r.clone()),
                    }
                    continue;
                };
                if let Some(a) = st.accounts.get_mut(&lease.stream) {
                    a.held = a.held.saturating_sub(1);
                }
                let entry = per_stream.entry(lease.stream).or_default();
                match &nack {
                    None => entry.0.push(lease.reference),
                    Some(nack) => entry.1.push(peer::PeerNack {
                        delivery: Some(lease.reference),
                        delay: nack.delay.map(qmesh_proto::convert::duration),
                        reason: nack.reason.clone(),
                        undelivered: false,
                        dead_letter: nack.dead_letter,
                    }),
                }
            }
        }
        let settled = receipts.len() - unknown.len();
        if settled > 0 {
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            let c = counters.entry(sub.name.clone()).or_default();
            if nack.is_none() {
                c.acked += settled as u64
            } else {
                c.nacked += settled as u64
            }
        }
        self.send_settlements(per_stream).await;
        sub.released.notify_waiters();
        sub.pump.notify_one();
        unknown
    }

    /// Ends leases past their deadline: nacked to the owner as a failed attempt ("ack timeout")
    /// and remembered for a late ack; deliveries still buffered past it go back uncounted.
    async fn expire(&self, sub: &LocalSub, now: Instant) {
        let mut per_stream: HashMap<u64, (Vec<peer::DeliveryRef>, Vec<peer::PeerNack>)> =
            HashMap::new();
        let mut timed_out = 0u64;
        {
            let mut st = sub.lock();
            let expired: Vec<u64> = st
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                let Some(lease) = st.leases.remove(&id) else {
                    continue;
                };
                timed_out += 1;
                if let Some(a) = st.accounts.get_mut(&lease.stream) {
                    a.held = a.held.saturating_sub(1);
                }
                per_stream
                    .entry(lease.stream)
                    .or_default()
                    .1
                    .push(peer::PeerNack {
                        delivery: Some(lease.reference.clone()),
                        delay: None,
                        reason: "ack timeout".to_owned(),
                        undelivered: false,
                        dead_letter: false,
                    });
                st.remember_expired(
                    id,
                    Expired {
                        stream: lease.stream,
                        reference: lease.reference,
                    },
                );
            }
            let (stale, fresh): (VecDeque<Held>, VecDeque<Held>) =
                st.buffer.drain(..).partition(|h| h.deadline <= now);
            st.buffer = fresh;
            for h in stale {
                if let Some(a) = st.accounts.get_mut(&h.stream) {
                    a.held = a.held.saturating_sub(1);
                }
                per_stream.entry(h.stream).or_default().1.push(undelivered(
                    &h.delivery,
                    "not taken by an app before its deadline",
                ));
            }
        }
        if per_stream.is_empty() {
            return;
        }
        if timed_out > 0 {
            tracing::debug!(subscription = %sub.name, count = timed_out, "ack timeout");
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            counters.entry(sub.name.clone()).or_default().nacked += timed_out;
        }
        self.send_settlements(per_stream).await;
        sub.released.notify_waiters();
        sub.pump.notify_one();
    }

    async fn send_settlements(
        &self,
        per_stream: HashMap<u64, (Vec<peer::DeliveryRef>, Vec<peer::PeerNack>)>,
    ) {
        for (stream, (acks, nacks)) in per_stream {
            let tx = self.streams().get(&stream).map(|s| s.tx.clone());
            if let Some(tx) = tx {
                let _ = tx.send(Ok(settlements_frame(acks, nacks))).await;
            }
        }
    }

    /// Returns every lease of an app connection that went away to its owner (counted as a failed
    /// attempt, so a message that keeps crashing its consumer ends in the dead-letter queue).
    pub async fn release_holder(&self, sub: &LocalSub, holder: Holder, reason: &str) {
        let receipts: Vec<String> = sub
            .lock()
            .leases
            .iter()
            .filter(|(_, l)| l.holder == holder)
            .map(|(id, _)| id.to_string())
            .collect();
        if !receipts.is_empty() {
            self.settle(
                sub,
                &receipts,
                Some(Nack::retry(Some(Duration::ZERO), reason)),
            )
            .await;
        }
    }

    /// Hands buffered deliveries back to their owners uncounted (no app took them).
    pub async fn return_buffered(&self, sub: &LocalSub, reason: &str) {
        let held: Vec<Held> = {
            let mut st = sub.lock();
            let held: Vec<Held> = st.buffer.drain(..).collect();
            for h in &held {
                if let Some(a) = st.accounts.get_mut(&h.stream) {
                    a.held = a.held.saturating_sub(1);
                }
            }
            held
        };
        if held.is_empty() {
            return;
        }
        let mut per_stream: HashMap<u64, (Vec<peer::DeliveryRef>, Vec<peer::PeerNack>)> =
            HashMap::new();
        for h in held {
            per_stream
                .entry(h.stream)
                .or_default()
                .1
                .push(undelivered(&h.delivery, reason));
        }
        self.send_settlements(per_stream).await;
    }

    /// An app connection starts consuming `sub`, holding at most `window` deliveries (`None`: up
    /// to the subscription's whole window).
    pub fn app_joined(&self, sub: &LocalSub, window: Option<u32>) {
        match window {
            Some(w) => {
                sub.app_windows.fetch_add(u64::from(w), Ordering::SeqCst);
            }
            None => {
                sub.unbounded_apps.fetch_add(1, Ordering::SeqCst);
            }
        }
        sub.apps.fetch_add(1, Ordering::SeqCst);
        sub.pump.notify_one();
    }

    /// An app connection that joined with `window` stopped consuming `sub`: its share of the window
    /// is taken back from the owners, and when it was the last one, buffered deliveries go back to
    /// their owners uncounted.
    pub async fn app_left(&self, sub: &LocalSub, window: Option<u32>) {
        match window {
            Some(w) => {
                sub.app_windows.fetch_sub(u64::from(w), Ordering::SeqCst);
            }
            None => {
                sub.unbounded_apps.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if sub.apps.fetch_sub(1, Ordering::SeqCst) == 1 && !sub.has_consumer() {
            self.return_buffered(sub, "last consumer app left").await;
        }
        sub.pump.notify_one();
    }

    /// An HTTP consumer polled `sub`.
    pub fn polled(&self, sub: &LocalSub) {
        let was_present = sub.has_consumer();
        *sub.last_poll.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        if !was_present {
            sub.pump.notify_one();
        }
    }

    /// Ends what passed its deadline, and hands buffered deliveries back when no app is left.
    async fn run_sweeper(self: Arc<Self>, sub: Arc<LocalSub>) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.expire(&sub, Instant::now()).await;
            if !sub.has_consumer() {
                self.return_buffered(&sub, "no consumer app in this pod")
                    .await;
                sub.pump.notify_one();
            }
        }
    }

    /// New holder id for an app connection.
    pub fn new_holder(&self) -> Holder {
        self.next_receipt.fetch_add(1, Ordering::Relaxed) | (1 << 63)
    }

    /// The queue of a lease (for metrics), if it is still held.
    pub fn lease_queue(&self, sub: &LocalSub, receipt: &str) -> Option<String> {
        let id = receipt.parse::<u64>().ok()?;
        sub.lock().leases.get(&id).map(|l| l.queue.clone())
    }
}

fn undelivered(d: &peer::PeerDelivery, reason: &str) -> peer::PeerNack {
    peer::PeerNack {
        delivery: Some(reference(d)),
        delay: None,
        reason: reason.to_owned(),
        undelivered: true,
        dead_letter: false,
    }
}

fn reference(d: &peer::PeerDelivery) -> peer::DeliveryRef {
    peer::DeliveryRef {
        subscription: d.subscription.clone(),
        sequence: d.sequence,
        attempt: d.attempt,
    }
}

fn settlements_frame(acks: Vec<peer::DeliveryRef>, nacks: Vec<peer::PeerNack>) -> ConsumerFrame {
    ConsumerFrame {
        frame: Some(consumer_frame::Frame::Settlements(peer::Settlements {
            acks,
            nacks,
        })),
    }
}
