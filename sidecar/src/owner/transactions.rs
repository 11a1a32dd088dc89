//! Transactional publishes — RocketMQ's half messages with check-back. A transaction's messages are
//! persisted as they are published, in the log's staging area (never in a queue: nothing can
//! deliver them), and become queue messages only when the transaction commits.
//!
//! ```text
//!   begin ──▶ open transaction (id)
//!   publish(transaction) ──log.append(STAGING, half message)──▶ staged (durable, invisible)
//!   commit ──▶ each staged message ──Owner::accept──▶ its queue (deliverable) ──▶ staging settled
//!   rollback ──▶ staging settled (dropped: never delivered)
//!   open past checkAfter ──POST 127.0.0.1:{checkPort}{checkPath}──▶ the app: commit / rollback /
//!     unknown (asked again after checkAfter, up to maxChecks; then onUnknown)
//!   restart: recovered half messages ──▶ open transactions again (checked back)
//!   hand-over: half messages go to a peer, which checks them back with its own app
//! ```
//!
//! A commit is decided once: if storing a message in its queue fails part-way (a full queue, no
//! replica), the rest are stored by the background task as soon as the queue takes them. A crash
//! part-way leaves the rest as half messages, which the check-back commits again (the queue's
//! dedup window drops what was already stored).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use qmesh_proto::{control, peer, v1};

use super::{
    Owner, Schedule,
    log::{Outcome, OwnerLog, Position, Recovered},
    queue,
};
use crate::error::BrokerError;

/// The log's staging area: half messages are records of this pseudo-queue (no Queue can have the
/// name), owed to [`HALF`] until their transaction settles.
pub const STAGING: &str = "~transactions";
/// The one "subscription" a half message is owed to.
const HALF: &str = "~half";
/// Header of a half message: its transaction (also how a hand-over carries one).
pub const HALF_HEADER: &str = "qmesh-half-transaction";
/// Header of a half message in the staging area: its queue.
const QUEUE_HEADER: &str = "qmesh-transaction-queue";
/// Header of the staging record of a commit decision (its transaction in [`HALF_HEADER`]).
const COMMIT_HEADER: &str = "qmesh-transaction-commit";
/// Header of a committed message: the transaction it was published in.
pub const TRANSACTION_HEADER: &str = "qmesh-transaction";

/// How long a check-back may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Settled transactions remembered, so commit and rollback stay idempotent.
const REMEMBERED: usize = 100_000;
/// How often the task looks for transactions to check back, commits to finish and ones to drop.
const TICK: Duration = Duration::from_millis(100);

/// Bounds on open transactions (`--max-open-transactions`, `--max-transaction-messages`,
/// `--max-transaction-bytes`).
#[derive(Clone, Copy, Debug)]
pub struct TransactionLimits {
    /// Most transactions open at once.
    pub max_open: usize,
    /// Most messages in one transaction.
    pub max_messages: usize,
    /// Most bytes of half messages over all open transactions (held in memory until settled).
    pub max_bytes: u64,
}

impl Default for TransactionLimits {
    fn default() -> Self {
        Self {
            max_open: 10_000,
            max_messages: 1_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Its messages are deliverable.
    Commit,
    /// None of its messages is ever delivered.
    Rollback,
}

impl Decision {
    /// As the API and metrics spell it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Commit => "committed",
            Self::Rollback => "rolled-back",
        }
    }
}

/// Who decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// The producer, with CommitTransaction / RollbackTransaction.
    Producer,
    /// The app, answering a check-back.
    Check,
    /// Nobody: the Queue's `transaction.onUnknown` after the check-backs were spent.
    OnUnknown,
}

impl DecidedBy {
    /// As the metrics and events spell it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Producer => "producer",
            Self::Check => "check",
            Self::OnUnknown => "on-unknown",
        }
    }
}

/// One half message.
struct Staged {
    queue: String,
    sequence: u64,
    at: Position,
    log: Arc<dyn OwnerLog>,
    /// The app's message, without the staging headers.
    message: v1::Message,
    size: u64,
}

/// An open transaction.
struct Txn {
    opened: SystemTime,
    opened_at: Instant,
    staged: Vec<Staged>,
    checks: u32,
    next_check: Option<Instant>,
    /// A commit is decided and some messages are still to be stored.
    committing: Option<DecidedBy>,
    /// Since when, and the transaction's messages and queues at the decision.
    committed: Option<(Instant, u32, Vec<String>)>,
    /// The durable record of the commit decision (disk logs), until every message is stored.
    marker: Option<(Arc<dyn OwnerLog>, u64, Position)>,
    /// Settled and gone from the table (a publish holding the slot must not add to it).
    gone: bool,
}

struct Slot {
    txn: tokio::sync::Mutex<Txn>,
    /// A check-back or a background finish is running.
    busy: AtomicBool,
}

/// A transaction's outcome, as events show it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionEvent {
    /// The transaction.
    pub transaction: String,
    /// `committed` or `rolled-back`.
    pub outcome: &'static str,
    /// `producer`, `check` or `on-unknown`.
    pub decided_by: &'static str,
    /// Its messages.
    pub messages: u32,
    /// Check-backs asked.
    pub checks: u32,
    /// When (RFC 3339).
    pub at: String,
    /// The queues of its messages.
    pub queues: Vec<String>,
    /// When, for the control plane.
    #[serde(skip)]
    pub time: SystemTime,
}

/// Most events kept for `qmesh get` and the console.
const EVENTS: usize = 50;

/// Settled transactions (outcome, messages), and the order to forget them in.
type Settled = (HashMap<String, (Decision, u32)>, VecDeque<String>);

/// Open and recently settled transactions.
pub struct Transactions {
    open: Mutex<HashMap<String, Arc<Slot>>>,
    settled: Mutex<Settled>,
    events: Mutex<VecDeque<TransactionEvent>>,
    limits: TransactionLimits,
    staged_bytes: AtomicU64,
    staged_messages: AtomicU64,
    /// Replaces every Queue's `transaction.checkPort` (`qmesh run --app-port`).
    app_port: Option<u16>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// How a transaction is checked back, from its queues' policies: the shortest wait, the fewest
/// checks, a commit on unknown only if every queue says so, the first queue's endpoint.
#[derive(Clone, Debug, PartialEq)]
struct CheckPolicy {
    after: Duration,
    max_checks: u32,
    commit_on_unknown: bool,
    port: u16,
    path: String,
}

impl CheckPolicy {
    fn of(policies: impl IntoIterator<Item = control::TransactionPolicy>) -> Self {
        let mut out: Option<Self> = None;
        for p in policies {
            let after = p
                .check_after
                .as_ref()
                .map(qmesh_proto::convert::std_duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(qmesh_api::DEFAULT_CHECK_AFTER);
            let this = Self {
                after,
                max_checks: if p.max_checks == 0 {
                    qmesh_api::DEFAULT_MAX_CHECKS
                } else {
                    p.max_checks
                },
                commit_on_unknown: p.commit_on_unknown,
                port: u16::try_from(p.check_port).unwrap_or(0),
                path: if p.check_path.is_empty() {
                    qmesh_api::DEFAULT_CHECK_PATH.to_owned()
                } else {
                    p.check_path
                },
            };
            out = Some(match out {
                None => this,
                Some(o) => Self {
                    after: o.after.min(this.after),
                    max_checks: o.max_checks.min(this.max_checks),
                    commit_on_unknown: o.commit_on_unknown && this.commit_on_unknown,
                    port: if o.port == 0 { this.port } else { o.port },
                    path: if o.port == 0 { this.path } else { o.path },
                },
            });
        }
        out.unwrap_or_else(|| Self::of([control::TransactionPolicy::default()]))
    }
}

/// What the app answered a check-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Its local transaction committed.
    Commit,
    /// It rolled back (or never happened).
    Rollback,
    /// It cannot tell yet (or did not answer).
    Unknown,
}

impl Answer {
    /// Reads a check-back answer: `commit` / `rollback` / `unknown` as the body, plain or as
    /// `{"state": "..."}`; anything else is unknown.
    pub fn parse(body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let word = if text.starts_with('{') {
            serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("state")?.as_str().map(str::to_owned))
                .unwrap_or_default()
        } else {
            text.to_owned()
        };
        match word.to_ascii_lowercase().as_str() {
            "commit" | "committed" => Self::Commit,
            "rollback" | "rolled-back" | "rolledback" | "rolled_back" => Self::Rollback,
            _ => Self::Unknown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Rollback => "rollback",
            Self::Unknown => "unknown",
        }
    }
}

impl Transactions {
    /// No transactions yet.
    pub fn new(limits: TransactionLimits, app_port: Option<u16>) -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            settled: Mutex::new((HashMap::new(), VecDeque::new())),
            events: Mutex::new(VecDeque::new()),
            limits,
            staged_bytes: AtomicU64::new(0),
            staged_messages: AtomicU64::new(0),
            app_port,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http(),
        }
    }

    fn slot(&self, id: &str) -> Option<Arc<Slot>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every open transaction, taken out of the table's lock.
    fn all(&self) -> Vec<(String, Arc<Slot>)> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }

    fn settled(&self, id: &str) -> Option<(Decision, u32)> {
        self.settled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .get(id)
            .copied()
    }

    /// Why `id`, not open, cannot take a publish: settled, or unknown.
    fn refusal(&self, id: &str) -> BrokerError {
        match self.not_open(id, None) {
            Err(error) => error,
            Ok((decision, _)) => BrokerError::TransactionSettled {
                transaction: id.to_owned(),
                state: decision.label(),
            },
        }
    }

    /// The answer to a settlement `wanted` of `id`, not open: the same again when it was settled
    /// so, else why not (settled the other way, or unknown).
    fn not_open(&self, id: &str, wanted: Option<Decision>) -> Result<(Decision, u32), BrokerError> {
        match self.settled(id) {
            Some((decision, n)) if Some(decision) == wanted => Ok((decision, n)),
            Some((decision, _)) => Err(BrokerError::TransactionSettled {
                transaction: id.to_owned(),
                state: if decision == Decision::Commit {
                    "committed"
                } else {
                    "rolled back"
                },
            }),
            None => Err(BrokerError::UnknownTransaction(id.to_owned())),
        }
    }

    /// Open transactions.
    pub fn open_count(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Half messages held, over all open transactions.
    pub fn staged_count(&self) -> u64 {
        self.staged_messages.load(Ordering::Relaxed)
    }

    /// The latest outcomes, newest last.
    pub fn events(&self) -> Vec<TransactionEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Half messages per queue (for status).
    pub fn staged_by_queue(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for (_, slot) in self.all() {
            if let Ok(t) = slot.txn.try_lock() {
                for s in &t.staged {
                    *out.entry(s.queue.clone()).or_default() += 1;
                }
            }
        }
        out
    }

    fn insert_open(&self, id: String, txn: Txn) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            txn: tokio::sync::Mutex::new(txn),
            busy: AtomicBool::new(false),
        });
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&slot));
        slot
    }

    fn new_txn(opened: SystemTime) -> Txn {
        let age = SystemTime::now().duration_since(opened).unwrap_or_default();
        Txn {
            opened,
            opened_at: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            staged: Vec::new(),
            checks: 0,
            next_check: None,
            committing: None,
            committed: None,
            marker: None,
            gone: false,
        }
    }

    fn unstage(&self, s: &Staged) {
        s.log.settle(STAGING, HALF, s.sequence, Outcome::Acked);
        s.log.release(s.at);
        self.staged_bytes.fetch_sub(s.size, Ordering::Relaxed);
        self.staged_messages.fetch_sub(1, Ordering::Relaxed);
    }

    fn stage(&self, t: &mut Txn, s: Staged) {
        self.staged_bytes.fetch_add(s.size, Ordering::Relaxed);
        self.staged_messages.fetch_add(1, Ordering::Relaxed);
        t.staged.push(s);
    }

    /// Records a settled transaction: out of the table, remembered, an event.
    fn settle(
        &self,
        id: &str,
        t: &mut Txn,
        decision: Decision,
        by: DecidedBy,
        messages: u32,
        queues: Vec<String>,
    ) {
        t.gone = true;
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        {
            let mut settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
            let (map, order) = &mut *settled;
            if map.insert(id.to_owned(), (decision, messages)).is_none() {
                order.push_back(id.to_owned());
            }
            while order.len() > REMEMBERED {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.push_back(TransactionEvent {
            transaction: id.to_owned(),
            outcome: decision.label(),
            decided_by: by.label(),
            messages,
            checks: t.checks,
            at: prost_types::Timestamp::from(SystemTime::now()).to_string(),
            queues,
            time: SystemTime::now(),
        });
        while events.len() > EVENTS {
            events.pop_front();
        }
        tracing::info!(
            transaction = id,
            outcome = decision.label(),
            decided_by = by.label(),
            messages,
            checks = t.checks,
            "transaction settled"
        );
    }
}

/// The queues of half messages, sorted, once each.
fn queues_of(staged: &[Staged]) -> Vec<String> {
    let mut queues: Vec<String> = staged.iter().map(|s| s.queue.clone()).collect();
    queues.sort();
    queues.dedup();
    queues
}

/// Strips the staging headers off a half message: its transaction and queue.
fn unwrap_half(mut message: v1::Message) -> Option<(String, String, v1::Message)> {
    let txn = message.headers.remove(HALF_HEADER)?;
    let queue = message.headers.remove(QUEUE_HEADER).unwrap_or_default();
    Some((txn, queue, message))
}

impl Owner {
    /// Open transactions, their half messages, the latest outcomes.
    pub fn transactions(&self) -> &Transactions {
        &self.transactions
    }

    /// Opens a transaction.
    pub fn begin_transaction(&self) -> Result<v1::BeginTransactionResponse, BrokerError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(BrokerError::ShuttingDown);
        }
        let t = &self.transactions;
        if t.open_count() >= t.limits.max_open {
            return Err(BrokerError::TransactionLimit(format!(
                "{} transactions are open (--max-open-transactions); commit or roll back some first",
                t.limits.max_open
            )));
        }
        let id = format!("tx-{}", super::new_id());
        t.insert_open(id.clone(), Transactions::new_txn(SystemTime::now()));
        self.metrics.transactions.open.inc();
        Ok(v1::BeginTransactionResponse { transaction: id })
    }

    /// Publishes `message` as a half message of transaction `txn`: checked like any publish,
    /// persisted, held back until the transaction commits.
    pub async fn publish_in_transaction(
        self: &Arc<Self>,
        txn: &str,
        queue: &str,
        mut message: v1::Message,
        schedule: Schedule,
    ) -> Result<v1::PublishResponse, BrokerError> {
        let (q, policy) = self.admit_publish(queue, &mut message, schedule)?;
        let size = queue::message_size(&message);
        if size > policy.max_message_bytes.max(1) {
            return Err(BrokerError::TooLarge {
                queue: queue.to_owned(),
                size: size as usize,
                limit: policy.max_message_bytes,
            });
        }
        if message.id.is_empty() {
            message.id = super::new_id();
        }
        message.payload = Bytes::copy_from_slice(&message.payload);
        message.publish_time = Some(SystemTime::now().into());
        let transactions = &self.transactions;
        let Some(slot) = transactions.slot(txn) else {
            return Err(transactions.refusal(txn));
        };
        let mut t = slot.txn.lock().await;
        if t.gone {
            return Err(transactions.refusal(txn));
        }
        if t.committing.is_some() {
            return Err(BrokerError::TransactionSettled {
                transaction: txn.to_owned(),
                state: "committed",
            });
        }
        // The id is de-duplicated as a plain publish's: against what its queue stored, and
        // against this transaction's other half messages.
        let duplicate = q.lock().duplicate_of(&message.id, Instant::now());
        if let Some(duplicate) = duplicate {
            return super::answer_duplicate(&message.id, duplicate).await;
        }
        if let Some(s) = t
            .staged
            .iter()
            .find(|s| s.queue == queue && s.message.id == message.id)
        {
            return Ok(v1::PublishResponse {
                id: message.id,
                sequence: s.sequence,
                duplicate: true,
            });
        }
        if t.staged.len() >= transactions.limits.max_messages {
            return Err(BrokerError::TransactionLimit(format!(
                "transaction {txn:?} holds {} messages (--max-transaction-messages); commit it",
                t.staged.len()
            )));
        }
        let bytes = transactions.staged_bytes.load(Ordering::Relaxed);
        if bytes.saturating_add(size) > transactions.limits.max_bytes {
            return Err(BrokerError::TransactionLimit(format!(
                "open transactions hold {bytes} bytes of half messages (--max-transaction-bytes); \
                 commit or roll back some first"
            )));
        }
        let mut half = message.clone();
        half.headers.insert(HALF_HEADER.to_owned(), txn.to_owned());
        half.headers
            .insert(QUEUE_HEADER.to_owned(), queue.to_owned());
        let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
        let log = Arc::clone(&q.log);
        let at = log
            .append(STAGING, sequence, &Arc::new(half), &[HALF.to_owned()])
            .await?;
        let id = message.id.clone();
        transactions.stage(
            &mut t,
            Staged {
                queue: queue.to_owned(),
                sequence,
                at,
                log,
                message,
                size,
            },
        );
        self.metrics.transactions.half_messages.inc();
        Ok(v1::PublishResponse {
            id,
            sequence,
            duplicate: false,
        })
    }

    /// Commits or rolls back `txn` for its producer.
    pub async fn settle_transaction(
        self: &Arc<Self>,
        txn: &str,
        decision: Decision,
    ) -> Result<v1::TransactionResponse, BrokerError> {
        let answer = |n: u32| v1::TransactionResponse {
            transaction: txn.to_owned(),
            state: decision.label().to_owned(),
            messages: n,
        };
        let Some(slot) = self.transactions.slot(txn) else {
            return self
                .transactions
                .not_open(txn, Some(decision))
                .map(|(_, n)| answer(n));
        };
        let mut t = slot.txn.lock().await;
        if t.gone {
            return self
                .transactions
                .not_open(txn, Some(decision))
                .map(|(_, n)| answer(n));
        }
        self.decide(txn, &mut t, decision, DecidedBy::Producer)
            .await
            .map(answer)
    }

    /// Carries out a decision on an open transaction; the number of its messages.
    async fn decide(
        self: &Arc<Self>,
        txn: &str,
        t: &mut Txn,
        decision: Decision,
        by: DecidedBy,
    ) -> Result<u32, BrokerError> {
        if decision == Decision::Rollback {
            if t.committing.is_some() {
                return Err(BrokerError::TransactionSettled {
                    transaction: txn.to_owned(),
                    state: "committed",
                });
            }
            let n = t.staged.len() as u32;
            let queues = queues_of(&t.staged);
            for s in t.staged.drain(..) {
                self.transactions.unstage(&s);
            }
            self.metrics.transactions.half_messages.dec_by(i64::from(n));
            self.transactions.settle(txn, t, decision, by, n, queues);
            self.metrics.transaction_settled(decision, by);
            self.metrics.transactions.open.dec();
            return Ok(n);
        }
        if t.committing.is_none() {
            // The decision is made durable before any message goes to its queue: a crash while
            // they go commits the rest at the next start, so a commit is never partial.
            if let Some(log) = t.staged.iter().map(|s| &s.log).find(|l| l.pages()) {
                let log = Arc::clone(log);
                let mut headers = HashMap::new();
                headers.insert(HALF_HEADER.to_owned(), txn.to_owned());
                headers.insert(COMMIT_HEADER.to_owned(), by.label().to_owned());
                // What the event of its outcome says, also when it is finished after a restart.
                let decided = serde_json::json!({
                    "messages": t.staged.len(),
                    "queues": queues_of(&t.staged),
                });
                let record = v1::Message {
                    id: format!("{txn}/commit"),
                    payload: Bytes::from(decided.to_string()),
                    headers,
                    publish_time: Some(SystemTime::now().into()),
                    ..v1::Message::default()
                };
                let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
                let at = log
                    .append(STAGING, sequence, &Arc::new(record), &[HALF.to_owned()])
                    .await?;
                t.marker = Some((log, sequence, at));
            }
            t.committing = Some(by);
        }
        let by = t.committing.unwrap_or(by);
        let (since, total, queues) = t
            .committed
            .get_or_insert_with(|| (Instant::now(), t.staged.len() as u32, queues_of(&t.staged)))
            .clone();
        let view = self.view.borrow().clone();
        while let Some(s) = t.staged.first() {
            let Some(q) = self.queue_for(&view, &s.queue) else {
                if since.elapsed() < self.removed_grace {
                    // Not in the view (yet: a restart before the control plane's first view, or
                    // gone for good): tried again, until the removal grace has passed.
                    return Err(BrokerError::UnknownQueue(s.queue.clone()));
                }
                // The Queue was deleted while the transaction was open: nothing can take it.
                tracing::warn!(
                    transaction = txn,
                    queue = %s.queue,
                    id = %s.message.id,
                    "a committed message's queue is gone; it is dropped"
                );
                let s = t.staged.remove(0);
                self.transactions.unstage(&s);
                self.metrics.transactions.half_messages.dec();
                continue;
            };
            let policy = view
                .queue(&s.queue)
                .and_then(|qv| qv.policy.clone())
                .unwrap_or_default();
            let mut message = s.message.clone();
            message
                .headers
                .insert(TRANSACTION_HEADER.to_owned(), txn.to_owned());
            let queue = s.queue.clone();
            if let Err(error) = self.accept(&q, &queue, &mut message, policy).await {
                tracing::warn!(
                    transaction = txn,
                    queue,
                    %error,
                    "a committed transaction's message could not be stored yet; retrying"
                );
                return Err(BrokerError::TransactionLimit(format!(
                    "transaction {txn:?} is committed, and {} of its {total} messages are in \
                     their queues; the rest follow as soon as queue {queue:?} takes them ({error})",
                    total as usize - t.staged.len()
                )));
            }
            let s = t.staged.remove(0);
            self.transactions.unstage(&s);
            self.metrics.transactions.half_messages.dec();
        }
        if let Some((log, sequence, at)) = t.marker.take() {
            log.settle(STAGING, HALF, sequence, Outcome::Acked);
            log.release(at);
        }
        self.transactions
            .settle(txn, t, decision, by, total, queues);
        self.metrics.transaction_settled(decision, by);
        self.metrics.transactions.open.dec();
        Ok(total)
    }

    /// Half messages of `queue` to hand over (after every other message of the queue went).
    pub(super) fn half_messages(&self, queue: &str, max: usize) -> Vec<peer::OwnedMessage> {
        let slots = self.transactions.all();
        let mut out = Vec::new();
        for (id, slot) in slots {
            let Ok(t) = slot.txn.try_lock() else { continue };
            if t.committing.is_some() {
                continue;
            }
            for s in t.staged.iter().filter(|s| s.queue == queue) {
                if out.len() >= max {
                    return out;
                }
                let mut message = s.message.clone();
                message.headers.insert(HALF_HEADER.to_owned(), id.clone());
                out.push(peer::OwnedMessage {
                    queue: queue.to_owned(),
                    sequence: s.sequence,
                    message: Some(message),
                    pending: Vec::new(),
                });
            }
        }
        out
    }

    /// Queues with half messages.
    pub(super) fn queues_with_half_messages(&self) -> Vec<String> {
        let mut queues: Vec<String> = self.transactions.staged_by_queue().into_keys().collect();
        queues.sort();
        queues
    }

    /// Forgets half messages a peer took over (it checks them back with its own app).
    pub(super) fn half_messages_handed_over(&self, sequences: &[u64]) {
        let slots = self.transactions.all();
        for (id, slot) in slots {
            let Ok(mut t) = slot.txn.try_lock() else {
                continue;
            };
            let before = t.staged.len();
            let (gone, kept): (Vec<Staged>, Vec<Staged>) = std::mem::take(&mut t.staged)
                .into_iter()
                .partition(|s| sequences.contains(&s.sequence));
            t.staged = kept;
            for s in &gone {
                self.transactions.unstage(s);
                self.metrics.transactions.half_messages.dec();
            }
            if before > 0 && t.staged.is_empty() {
                t.gone = true;
                self.transactions
                    .open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                self.metrics.transactions.open.dec();
                tracing::info!(
                    transaction = %id,
                    "an open transaction was handed over to a peer; it is checked back there"
                );
            }
        }
    }

    /// Takes over a half message from a draining peer: staged here, checked back with this pod's
    /// app.
    pub(super) async fn adopt_half(
        self: &Arc<Self>,
        q: &Arc<super::OwnedQueue>,
        queue: &str,
        message: v1::Message,
    ) -> Result<(), BrokerError> {
        let Some((txn, _, message)) = unwrap_half(message) else {
            return Ok(());
        };
        if txn.is_empty() || txn.len() > 128 || txn.chars().any(char::is_control) {
            return Err(BrokerError::Invalid(
                "a half message handed over names no valid transaction".into(),
            ));
        }
        let size = queue::message_size(&message);
        let limit = q.lock().policy().max_message_bytes;
        if limit > 0 && size > limit {
            return Err(BrokerError::TooLarge {
                queue: queue.to_owned(),
                size: size as usize,
                limit,
            });
        }
        let opened = message
            .publish_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or_else(SystemTime::now);
        self.restage(txn, queue.to_owned(), message, opened, Arc::clone(&q.log))
            .await
    }

    /// Puts a half message taken over into its transaction, opening it if needed.
    async fn restage(
        &self,
        txn: String,
        queue: String,
        message: v1::Message,
        opened: SystemTime,
        log: Arc<dyn OwnerLog>,
    ) -> Result<(), BrokerError> {
        let transactions = &self.transactions;
        let slot = match transactions.slot(&txn) {
            Some(slot) => slot,
            None => {
                if let Some((decision, _)) = transactions.settled(&txn) {
                    tracing::info!(transaction = %txn, outcome = decision.label(), "a half message of a settled transaction came back; ignored");
                    return Ok(());
                }
                self.metrics.transactions.open.inc();
                transactions.insert_open(txn.clone(), Transactions::new_txn(opened))
            }
        };
        let mut t = slot.txn.lock().await;
        if t.staged
            .iter()
            .any(|s| s.queue == queue && s.message.id == message.id)
        {
            return Ok(());
        }
        let size = queue::message_size(&message);
        let bytes = transactions.staged_bytes.load(Ordering::Relaxed);
        if t.staged.len() >= transactions.limits.max_messages
            || bytes.saturating_add(size) > transactions.limits.max_bytes
        {
            return Err(BrokerError::TransactionLimit(format!(
                "no room for another half message of transaction {txn:?} \
                 (--max-transaction-messages, --max-transaction-bytes)"
            )));
        }
        let mut half = message.clone();
        half.headers.insert(HALF_HEADER.to_owned(), txn.clone());
        half.headers.insert(QUEUE_HEADER.to_owned(), queue.clone());
        let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
        let at = log
            .append(STAGING, sequence, &Arc::new(half), &[HALF.to_owned()])
            .await?;
        if opened < t.opened {
            let age = SystemTime::now().duration_since(opened).unwrap_or_default();
            t.opened = opened;
            t.opened_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        }
        transactions.stage(
            &mut t,
            Staged {
                queue,
                sequence,
                at,
                log,
                message,
                size,
            },
        );
        self.metrics.transactions.half_messages.inc();
        Ok(())
    }

    /// Takes the half messages the log recovered: their transactions are open again, and checked
    /// back once they have been open for `checkAfter`.
    pub(super) fn recover_half_messages(&self, records: Vec<Recovered>) {
        if records.is_empty() {
            return;
        }
        let mut open: HashMap<String, Txn> = HashMap::new();
        let mut markers = Vec::new();
        for rec in records {
            if rec.message.headers.contains_key(COMMIT_HEADER) {
                markers.push(rec);
                continue;
            }
            let Some((txn, queue, message)) = unwrap_half(rec.message) else {
                continue;
            };
            let opened = message
                .publish_time
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or_else(SystemTime::now);
            let t = open
                .entry(txn)
                .or_insert_with(|| Transactions::new_txn(opened));
            if opened < t.opened {
                *t = Txn {
                    staged: std::mem::take(&mut t.staged),
                    ..Transactions::new_txn(opened)
                };
            }
            let size = queue::message_size(&message);
            self.transactions.stage(
                t,
                Staged {
                    queue,
                    sequence: rec.sequence,
                    at: rec.at,
                    log: Arc::clone(&self.disk),
                    message,
                    size,
                },
            );
        }
        let mut committing = 0;
        for rec in markers {
            let txn = rec
                .message
                .headers
                .get(HALF_HEADER)
                .cloned()
                .unwrap_or_default();
            match open.get_mut(&txn) {
                Some(t) => {
                    // Decided before the stop: its remaining messages go to their queues now.
                    t.committing = Some(DecidedBy::Producer);
                    t.marker = Some((Arc::clone(&self.disk), rec.sequence, rec.at));
                    let decided: serde_json::Value =
                        serde_json::from_slice(&rec.message.payload).unwrap_or_default();
                    let total = decided["messages"]
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(t.staged.len() as u32);
                    let queues = decided["queues"]
                        .as_array()
                        .map(|q| {
                            q.iter()
                                .filter_map(|q| q.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_else(|| queues_of(&t.staged));
                    t.committed = Some((Instant::now(), total, queues));
                    committing += 1;
                }
                None => {
                    // Every message was stored; only the marker's settlement was lost.
                    self.disk
                        .settle(STAGING, HALF, rec.sequence, Outcome::Acked);
                    self.disk.release(rec.at);
                }
            }
        }
        let transactions = open.len();
        for (id, t) in open {
            self.transactions.insert_open(id, t);
        }
        self.metrics.transactions.open.set(transactions as i64);
        let count = self.transactions.staged_count();
        self.metrics.transactions.half_messages.set(count as i64);
        tracing::info!(
            transactions,
            committing,
            half_messages = count,
            "recovered open transactions from the log: committed ones are finished, the others \
             checked back"
        );
    }

    /// Checks back transactions open too long, finishes commits that could not store everything
    /// at once, and applies `onUnknown` to those whose check-backs are spent.
    pub(super) async fn run_transactions(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let slots = self.transactions.all();
            let now = Instant::now();
            for (id, slot) in slots {
                if slot.busy.load(Ordering::SeqCst) {
                    continue;
                }
                let due = {
                    let Ok(t) = slot.txn.try_lock() else {
                        continue;
                    };
                    if t.committing.is_some() {
                        t.next_check.is_none_or(|at| now >= at)
                    } else {
                        let policy = self.check_policy(&t);
                        let first = t.opened_at + policy.after;
                        now >= t.next_check.unwrap_or(first)
                    }
                };
                if due && !slot.busy.swap(true, Ordering::SeqCst) {
                    let owner = Arc::clone(&self);
                    self.tasks.spawn("transaction check-back", async move {
                        owner.check_back(&id, &slot).await;
                        slot.busy.store(false, Ordering::SeqCst);
                    });
                }
            }
        }
    }

    fn check_policy(&self, t: &Txn) -> CheckPolicy {
        let view = self.view.borrow();
        let mut queues: Vec<&str> = t.staged.iter().map(|s| s.queue.as_str()).collect();
        queues.dedup();
        let mut policy = CheckPolicy::of(queues.iter().filter_map(|q| {
            view.queue(q)
                .and_then(|qv| qv.policy.as_ref())
                .and_then(|p| p.transaction.clone())
        }));
        if let Some(port) = self.transactions.app_port {
            policy.port = port;
        }
        policy
    }

    /// One round for a due transaction: finish a commit, or ask the app, or give up.
    async fn check_back(self: &Arc<Self>, id: &str, slot: &Slot) {
        let mut t = slot.txn.lock().await;
        if t.gone {
            return;
        }
        if t.committing.is_some() {
            if self
                .decide(id, &mut t, Decision::Commit, DecidedBy::Producer)
                .await
                .is_err()
            {
                t.next_check = Some(Instant::now() + Duration::from_secs(1));
            }
            return;
        }
        let policy = self.check_policy(&t);
        if t.checks >= policy.max_checks {
            let decision = if policy.commit_on_unknown {
                Decision::Commit
            } else {
                Decision::Rollback
            };
            tracing::warn!(
                transaction = id,
                checks = t.checks,
                outcome = decision.label(),
                "transaction still unresolved after its check-backs; applying onUnknown"
            );
            if let Err(error) = self
                .decide(id, &mut t, decision, DecidedBy::OnUnknown)
                .await
            {
                tracing::warn!(transaction = id, %error, "onUnknown could not finish yet");
                t.next_check = Some(Instant::now() + Duration::from_secs(1));
            }
            return;
        }
        t.checks += 1;
        let answer = if policy.port == 0 {
            // Nobody to ask: every round counts as unknown.
            Answer::Unknown
        } else {
            let answer = self.ask_app(id, &t, &policy).await;
            self.metrics.transaction_checked(answer.label());
            answer
        };
        tracing::info!(
            transaction = id,
            check = t.checks,
            answer = answer.label(),
            "transaction checked back"
        );
        let decision = match answer {
            Answer::Commit => Decision::Commit,
            Answer::Rollback => Decision::Rollback,
            Answer::Unknown => {
                t.next_check = Some(Instant::now() + policy.after);
                return;
            }
        };
        if let Err(error) = self.decide(id, &mut t, decision, DecidedBy::Check).await {
            tracing::warn!(transaction = id, %error, "a checked-back commit could not finish yet");
            t.next_check = Some(Instant::now() + Duration::from_secs(1));
        }
    }

    /// Asks the app about a transaction: `POST http://127.0.0.1:{port}{path}` with a JSON body.
    async fn ask_app(&self, id: &str, t: &Txn, policy: &CheckPolicy) -> Answer {
        let messages: Vec<serde_json::Value> = t
            .staged
            .iter()
            .map(|s| serde_json::json!({"queue": s.queue, "id": s.message.id}))
            .collect();
        let body = serde_json::json!({
            "transaction": id,
            "check": t.checks,
            "openedAt": prost_types::Timestamp::from(t.opened).to_string(),
            "messages": messages,
        });
        let request =
            hyper::Request::post(format!("http://127.0.0.1:{}{}", policy.port, policy.path))
                .header("content-type", "application/json")
                .header(TRANSACTION_HEADER, id)
                .body(Full::new(Bytes::from(body.to_string())));
        let Ok(request) = request else {
            return Answer::Unknown;
        };
        let asked = async {
            let response = self.transactions.client.request(request).await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            // A check-back answer is one word; a body past 64 KiB is not an answer.
            let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await
                .ok()?
                .to_bytes();
            Some(Answer::parse(&body))
        };
        match tokio::time::timeout(CHECK_TIMEOUT, asked).await {
            Ok(Some(answer)) => answer,
            _ => Answer::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_back_answer_is_one_word_plain_or_json_and_anything_else_is_unknown() {
        assert_eq!(Answer::parse(b"commit"), Answer::Commit);
        assert_eq!(Answer::parse(b" COMMITTED\n"), Answer::Commit);
        assert_eq!(Answer::parse(b"rollback"), Answer::Rollback);
        assert_eq!(
            Answer::parse(br#"{"state": "rolled-back"}"#),
            Answer::Rollback
        );
        assert_eq!(Answer::parse(br#"{"state": "commit"}"#), Answer::Commit);
        assert_eq!(Answer::parse(b"unknown"), Answer::Unknown);
        assert_eq!(Answer::parse(b"yes"), Answer::Unknown);
        assert_eq!(Answer::parse(br#"{"state": 1}"#), Answer::Unknown);
        assert_eq!(Answer::parse(&[0xff, 0xfe]), Answer::Unknown);
    }

    #[test]
    fn a_transaction_over_several_queues_takes_the_strictest_check_policy() {
        let p = |secs: i64, max: u32, commit: bool, port: u32| control::TransactionPolicy {
            check_after: Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
            max_checks: max,
            commit_on_unknown: commit,
            check_port: port,
            check_path: format!("/p{port}"),
        };
        let policy = CheckPolicy::of([
            p(30, 5, true, 0),
            p(10, 9, false, 8080),
            p(20, 3, true, 9090),
        ]);
        assert_eq!(
            policy,
            CheckPolicy {
                after: Duration::from_secs(10),
                max_checks: 3,
                commit_on_unknown: false,
                port: 8080,
                path: "/p8080".into(),
            }
        );
        let none = CheckPolicy::of([]);
        assert_eq!(none.after, qmesh_api::DEFAULT_CHECK_AFTER);
        assert_eq!(none.max_checks, qmesh_api::DEFAULT_MAX_CHECKS);
        assert!(!none.commit_on_unknown);
        assert_eq!(none.port, 0);
    }
}
