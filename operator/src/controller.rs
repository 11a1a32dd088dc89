//! The Queue and Subscription controllers: validate, compute status from the [`Index`], write it by
//! server-side apply, keep a Queue with subscriptions or backlog from vanishing silently, and tell
//! users through Events.
//!
//! ```text
//!   watch Queue ──────────┐                         ┌─▶ PATCH queues/status (SSA, "qmesh-operator")
//!   Index triggers ───────┼─▶ reconcile_queue ──────┼─▶ finalizer qmesh.io/finalizer
//!   (subs, pods, stats)   │                         └─▶ Events (Invalid, DeletionBlocked, ...)
//!   watch Subscription ───┼─▶ reconcile_subscription ─▶ PATCH subscriptions/status
//!   Index triggers ───────┘   (queue, pods, stats)
//! ```
//!
//! Status writes: only when the status differs from the one in the cluster; a change of conditions,
//! generation or counts of pods/subscriptions is written at once, a change of live counters only
//! (backlog, in flight, dead-lettered) at most once per `status_interval` per object.
//!
//! Deletion of a Queue waits while Subscriptions of it exist or sidecars report backlog for it
//! (`Ready=False`, reason `DeletionBlocked`, plus a Warning Event), except when the namespace is
//! being deleted or the deletion has waited `deletion_grace` already.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, future};
use k8s_openapi::{
    api::core::v1::Namespace,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{self, Event as Finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use qmesh_api::{Queue, Subscription, conditions};
use serde::Serialize;
use tokio_stream::wrappers::BroadcastStream;

use crate::{
    config::Config,
    index::Index,
    metrics::Metrics,
    status::{self, Change, Readiness},
};

/// The finalizer the operator puts on Queues.
pub const FINALIZER: &str = "qmesh.io/finalizer";
/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "qmesh-operator";

/// Longest a status write may take before the reconciliation fails (and is retried).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a reconciliation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// A status write did not finish within its timeout.
    #[error("status write timed out")]
    Timeout,
    /// The object has no namespace (the CRDs are namespaced, so this is a bug).
    #[error("object has no namespace")]
    NoNamespace,
    /// Deletion waits (not a failure; mapped to a requeue).
    #[error("deletion blocked: {message}")]
    DeletionBlocked {
        /// Why.
        message: String,
        /// When to look again.
        retry: Duration,
    },
}

impl Error {
    /// A short, stable label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(inner) => match &**inner {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
            Self::Timeout => "timeout",
            Self::NoNamespace => "no_namespace",
            Self::DeletionBlocked { .. } => "deletion_blocked",
        }
    }
}

/// Shared by every reconciliation.
pub struct Context {
    client: Client,
    index: Arc<Index>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    config: Config,
    last_write: Mutex<HashMap<(&'static str, String, String), Instant>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context for the controllers of one leader term.
    pub fn new(client: Client, index: Arc<Index>, metrics: Arc<Metrics>, config: Config) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(config.identity.clone()),
            },
        );
        Self {
            client,
            index,
            metrics,
            recorder,
            config,
            last_write: Mutex::default(),
        }
    }

    /// How long until a counters-only write of this object is allowed (zero: now).
    fn write_delay(&self, kind: &'static str, ns: &str, name: &str) -> Duration {
        let last = self
            .last_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.get(&(kind, ns.to_owned(), name.to_owned()))
            .map(|at| self.config.status_interval.saturating_sub(at.elapsed()))
            .unwrap_or_default()
    }

    fn wrote(&self, kind: &'static str, ns: &str, name: &str) {
        let mut last = self
            .last_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Entries older than the interval no longer delay anything (and may be of deleted objects).
        let interval = self.config.status_interval;
        last.retain(|_, at| at.elapsed() < interval);
        last.insert((kind, ns.to_owned(), name.to_owned()), Instant::now());
        drop(last);
        self.metrics.status_written(kind);
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(%error, object = %obj.meta().name.as_deref().unwrap_or_default(), reason, "publishing event failed");
        }
    }
}

/// Now, at the second precision the API server stores.
fn now() -> Time {
    let secs = Timestamp::now().as_second();
    Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&patch);
    let write = api.patch_status(name, &params, &patch);
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| Error::Timeout)?
        .map_err(Error::Kube)?;
    Ok(())
}

/// Whether a Ready condition newly says something a user must see (reason or generation changed).
fn newly(previous: Option<&Condition>, readiness: &Readiness, generation: Option<i64>) -> bool {
    previous.is_none_or(|p| {
        p.reason != readiness.reason
            || p.observed_generation != generation
            || p.message != readiness.message
    })
}

// === Queue ===

/// Reconciles one Queue (run by the controller while this replica leads).
pub async fn reconcile_queue(queue: Arc<Queue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = queue.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Queue> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer::finalizer(&api, FINALIZER, queue, |event| async {
        match event {
            Finalizer::Apply(queue) => apply_queue(&queue, &ctx).await,
            Finalizer::Cleanup(queue) => cleanup_queue(&queue, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let result = match result {
        Err(Error::Finalizer(inner)) => match *inner {
            finalizer::Error::CleanupFailed(Error::DeletionBlocked { retry, .. }) => {
                ctx.metrics
                    .reconciled("Queue", "blocked", started.elapsed());
                return Ok(Action::requeue(retry));
            }
            other => Err(Error::Finalizer(Box::new(other))),
        },
        other => other,
    };
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciled("Queue", outcome, started.elapsed());
    result
}

async fn apply_queue(queue: &Queue, ctx: &Context) -> Result<Action, Error> {
    let observed = ctx.index.observe_queue(queue);
    let desired = status::queue_status(queue, &observed, None, &now());
    Ok(match write_queue_status(queue, &desired, ctx).await? {
        Some(delay) => Action::requeue(delay),
        None => Action::requeue(Duration::from_secs(300)),
    })
}

/// Writes a Queue's status if needed; `Some(delay)` when a counters-only write had to wait.
async fn write_queue_status(
    queue: &Queue,
    desired: &qmesh_api::QueueStatus,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let ns = queue.namespace().ok_or(Error::NoNamespace)?;
    let name = queue.name_any();
    let current = queue.status.as_ref();
    match status::queue_change(current, desired) {
        Change::None => return Ok(None),
        Change::Counters => {
            let delay = ctx.write_delay("Queue", &ns, &name);
            if !delay.is_zero() {
                return Ok(Some(delay));
            }
        }
        Change::Significant => {}
    }
    let api: Api<Queue> = Api::namespaced(ctx.client.clone(), &ns);
    apply_status(&api, &name, desired).await?;
    ctx.wrote("Queue", &ns, &name);
    let previous = current.and_then(|s| status::ready_of(&s.conditions));
    if let Some(ready) = desired.conditions.first()
        && ready.status == "False"
        && ready.reason != conditions::REASON_DELETION_BLOCKED
        && previous.is_none_or(|p| p.reason != ready.reason || p.message != ready.message)
    {
        tracing::info!(queue = %name, namespace = %ns, reason = %ready.reason, message = %ready.message, "queue not ready");
        ctx.event(
            queue,
            EventType::Warning,
            &ready.reason,
            ready.message.clone(),
        )
        .await;
    }
    Ok(None)
}

async fn cleanup_queue(queue: &Queue, ctx: &Context) -> Result<Action, Error> {
    let ns = queue.namespace().ok_or(Error::NoNamespace)?;
    let name = queue.name_any();
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let terminating = match namespaces.get_opt(&ns).await.map_err(Error::Kube)? {
        None => true,
        Some(n) => {
            n.metadata.deletion_timestamp.is_some()
                || n.status.and_then(|s| s.phase).as_deref() == Some("Terminating")
        }
    };
    if terminating {
        tracing::info!(queue = %name, namespace = %ns, "namespace is being deleted; releasing the finalizer");
        return Ok(Action::await_change());
    }

    let observed = ctx.index.observe_queue(queue);
    let mut waiting = Vec::new();
    if !observed.subscriptions.is_empty() {
        waiting.push(format!(
            "subscriptions {} to be deleted",
            observed.subscriptions.join(", ")
        ));
    }
    if observed.backlog > 0 {
        waiting.push(format!(
            "a backlog of {} messages to drain",
            observed.backlog
        ));
    }
    if waiting.is_empty() {
        tracing::info!(queue = %name, namespace = %ns, "queue deleted");
        return Ok(Action::await_change());
    }

    let deleted_at = queue
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or_else(Timestamp::now, |t| t.0);
    let waited = Timestamp::now()
        .duration_since(deleted_at)
        .try_into()
        .unwrap_or(Duration::ZERO);
    let grace = ctx.config.deletion_grace;
    if waited >= grace {
        let note = format!(
            "deleting anyway after waiting {}s for {}",
            waited.as_secs(),
            waiting.join(" and ")
        );
        tracing::warn!(queue = %name, namespace = %ns, "{note}");
        ctx.event(queue, EventType::Warning, "DeletionForced", note)
            .await;
        return Ok(Action::await_change());
    }

    let message = format!(
        "deletion waits for {}; it proceeds anyway after {}s",
        waiting.join(" and "),
        grace.as_secs()
    );
    let readiness = Readiness {
        ready: false,
        reason: conditions::REASON_DELETION_BLOCKED,
        message: message.clone(),
    };
    let previous = queue
        .status
        .as_ref()
        .and_then(|s| status::ready_of(&s.conditions));
    let announce = newly(previous, &readiness, queue.metadata.generation);
    let desired = status::queue_status(queue, &observed, Some(readiness), &now());
    write_queue_status(queue, &desired, ctx).await?;
    if announce {
        tracing::info!(queue = %name, namespace = %ns, %message, "queue deletion blocked");
        ctx.event(
            queue,
            EventType::Warning,
            conditions::REASON_DELETION_BLOCKED,
            message.clone(),
        )
        .await;
    }
    Err(Error::DeletionBlocked {
        message,
        retry: (grace - waited).min(Duration::from_secs(10)),
    })
}

// === Subscription ===

/// Reconciles one Subscription (run by the controller while this replica leads).
pub async fn reconcile_subscription(
    subscription: Arc<Subscription>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = apply_subscription(&subscription, &ctx).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciled("Subscription", outcome, started.elapsed());
    result
}

async fn apply_subscription(subscription: &Subscription, ctx: &Context) -> Result<Action, Error> {
    if subscription.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = subscription.namespace().ok_or(Error::NoNamespace)?;
    let name = subscription.name_any();
    let observed = ctx.index.observe_subscription(subscription);
    let desired = status::subscription_status(subscription, &observed, &now());
    let current = subscription.status.as_ref();
    match status::subscription_change(current, &desired) {
        Change::None => return Ok(Action::requeue(Duration::from_secs(300))),
        Change::Counters => {
            let delay = ctx.write_delay("Subscription", &ns, &name);
            if !delay.is_zero() {
                return Ok(Action::requeue(delay));
            }
        }
        Change::Significant => {}
    }
    let api: Api<Subscription> = Api::namespaced(ctx.client.clone(), &ns);
    apply_status(&api, &name, &desired).await?;
    ctx.wrote("Subscription", &ns, &name);
    let previous = current.and_then(|s| status::ready_of(&s.conditions));
    if let Some(ready) = desired.conditions.first()
        && ready.status == "False"
        && previous.is_none_or(|p| p.reason != ready.reason || p.message != ready.message)
    {
        tracing::info!(subscription = %name, namespace = %ns, reason = %ready.reason, message = %ready.message, "subscription not ready");
        let type_ = if ready.reason == conditions::REASON_NO_CONSUMERS {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(subscription, type_, &ready.reason, ready.message.clone())
            .await;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Retry policy of both controllers: count, log, back off.
fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&());
    ctx.metrics.failed(&kind, error.metric_label());
    tracing::warn!(%error, kind = %kind, name = %obj.meta().name.as_deref().unwrap_or_default(), "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

fn triggers<K>(
    receiver: tokio::sync::broadcast::Receiver<ObjectRef<K>>,
) -> impl futures::Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    // A lagging receiver misses triggers; the periodic requeue repairs that.
    BroadcastStream::new(receiver).filter_map(|r| future::ready(r.ok()))
}

/// Runs both controllers until the future returns (dropping them cancels in-flight reconciles).
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let queues = Controller::new(
        Api::<Queue>::all(client.clone()),
        watcher::Config::default(),
    )
    .reconcile_on(triggers(ctx.index.queue_triggers()))
    .run(reconcile_queue, error_policy, ctx.clone())
    .for_each(|_| future::ready(()));
    let subscriptions =
        Controller::new(Api::<Subscription>::all(client), watcher::Config::default())
            .reconcile_on(triggers(ctx.index.subscription_triggers()))
            .run(reconcile_subscription, error_policy, ctx)
            .for_each(|_| future::ready(()));
    future::join(queues, subscriptions).await;
}
