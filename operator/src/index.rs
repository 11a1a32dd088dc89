//! The operator's in-memory index of Pods, Queues, Subscriptions and sidecar stats — the one place
//! both the controllers and the control plane read from.
//!
//! ```text
//!   watch Pods ─────────┐ apply_pod / delete_pod
//!   watch Queues ───────┤ apply_queue / delete_queue          ┌─▶ changes (watch<u64>) ─▶ Join streams
//!   watch Subscriptions ┤ apply_subscription / ...   ──▶ Index┤
//!   Join streams (Stats)┘ record_stats / drop_stats           └─▶ triggers (broadcast of ObjectRefs)
//!                                                                    ─▶ Queue / Subscription controllers
//! ```
//!
//! Every method is plain and synchronous (no client, no I/O), so the index is unit-tested without an
//! API server; [`crate::watch`] feeds it from watches. A pod is a **sidecar** when it runs the
//! injected container named [`SIDECAR_CONTAINER`] (a regular or a native-sidecar init container);
//! its Peer API is `<podIP>:7070`, and it is ready when the pod's `Ready` condition is `True` and the
//! pod is not being deleted. Other pods are ignored.
//!
//! A change notifies only what it can affect: a sidecar pod the Queues whose publishers and the
//! Subscriptions whose consumers it matches (before or after), a Queue the Subscriptions and Queues
//! naming it, a Subscription its Queue, and stats the objects they name.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{ResourceExt, runtime::reflector::ObjectRef};
use qmesh_api::{Queue, Subscription, labels_match};
use qmesh_core::{MeshState, MeshView, SidecarInfo, SidecarKey};
use qmesh_proto::control::Stats;
use tokio::sync::{broadcast, watch};

/// Name of the container the webhook injects; a pod carrying it is a sidecar of the mesh.
pub const SIDECAR_CONTAINER: &str = "qmesh-sidecar";
/// Port of the sidecar's Peer API on the pod IP.
pub const PEER_PORT: u16 = 7070;

/// `(namespace, name)` of a namespaced object.
pub type Key = (String, String);

/// A sidecar pod as the index keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarPod {
    /// What the mesh computation needs (and the service account a sidecar's token is checked
    /// against).
    pub info: SidecarInfo,
}

/// The sidecar of `pod`, if it is one: key, labels, peer address and readiness.
pub fn sidecar_of(pod: &Pod) -> Option<(SidecarKey, SidecarPod)> {
    let spec = pod.spec.as_ref()?;
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_CONTAINER);
    if !has_sidecar {
        return None;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty());
    let condition_ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let key = SidecarKey::new(pod.namespace().unwrap_or_default(), pod.name_any());
    let info = SidecarInfo {
        labels: pod.labels().clone(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        peer_address: ip.map(|ip| format!("{ip}:{PEER_PORT}")).unwrap_or_default(),
        ready: condition_ready && ip.is_some() && !deleting,
    };
    Some((key, SidecarPod { info }))
}

/// What a Queue's status is computed from, besides its own spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueObserved {
    /// Names of the Subscriptions of this Queue.
    pub subscriptions: Vec<String>,
    /// Ready sidecar pods selected as publishers.
    pub publishers: u32,
    /// Backlog summed over owner sidecars.
    pub backlog: u64,
    /// Half messages (in transactions still open) summed over owner sidecars.
    pub half_messages: u64,
    /// Whether `spec.deadLetterQueue` (if set) exists.
    pub dead_letter_queue_exists: bool,
}

/// What a Subscription's status is computed from, besides its own spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionObserved {
    /// Whether its Queue exists.
    pub queue_exists: bool,
    /// Whether `spec.deadLetterQueue` (if set) exists.
    pub dead_letter_queue_exists: bool,
    /// Ready sidecar pods matching the consumer selector.
    pub consumers: u32,
    /// Un-acked messages held by owners for this Subscription.
    pub backlog: u64,
    /// Deliveries in consumer pods, not yet settled.
    pub in_flight: u64,
    /// Of the backlog, delayed or scheduled messages not due yet.
    pub scheduled: u64,
    /// Messages dead-lettered (summed counters of the sidecars connected now).
    pub dead_lettered: u64,
}

#[derive(Default)]
struct Inner {
    mesh: MeshState,
    queues: BTreeMap<Key, Arc<Queue>>,
    subscriptions: BTreeMap<Key, Arc<Subscription>>,
    sidecars: BTreeMap<SidecarKey, SidecarPod>,
    /// Latest stats per sidecar, with the session that sent them.
    stats: BTreeMap<SidecarKey, (u64, Stats)>,
}

/// Objects a change may affect.
#[derive(Default)]
struct Affected {
    queues: BTreeSet<Key>,
    subscriptions: BTreeSet<Key>,
    views: bool,
}

/// The index. Cheap to share behind an `Arc`.
pub struct Index {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
    queue_triggers: broadcast::Sender<ObjectRef<Queue>>,
    subscription_triggers: broadcast::Sender<ObjectRef<Subscription>>,
    synced: watch::Sender<bool>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

fn key_of<K: kube::Resource>(obj: &K) -> Key {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

// === impl Index ===

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        let (changes, _) = watch::channel(0);
        let (queue_triggers, _) = broadcast::channel(1024);
        let (subscription_triggers, _) = broadcast::channel(1024);
        let (synced, _) = watch::channel(false);
        Self {
            inner: Mutex::new(Inner::default()),
            changes,
            queue_triggers,
            subscription_triggers,
            synced,
        }
    }

    /// Marks the index complete: every kind has been listed once.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    /// Waits until every kind has been listed once (views computed earlier would be partial).
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        // The sender lives as long as the index, so this only ends when synced.
        let _ = synced.wait_for(|s| *s).await;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bumped whenever a sidecar's view may have changed.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Queues to reconcile because something they depend on changed.
    pub fn queue_triggers(&self) -> broadcast::Receiver<ObjectRef<Queue>> {
        self.queue_triggers.subscribe()
    }

    /// Subscriptions to reconcile because something they depend on changed.
    pub fn subscription_triggers(&self) -> broadcast::Receiver<ObjectRef<Subscription>> {
        self.subscription_triggers.subscribe()
    }

    fn notify(&self, affected: Affected) {
        if affected.views {
            self.changes.send_modify(|v| *v += 1);
        }
        for (ns, name) in affected.queues {
            // No receiver (this replica is not the leader) is fine.
            let _ = self.queue_triggers.send(ObjectRef::new(&name).within(&ns));
        }
        for (ns, name) in affected.subscriptions {
            let _ = self
                .subscription_triggers
                .send(ObjectRef::new(&name).within(&ns));
        }
    }

    /// Adds or updates a pod (ignored unless it is a sidecar).
    pub fn apply_pod(&self, pod: &Pod) {
        let Some((key, sidecar)) = sidecar_of(pod) else {
            // A pod that stopped being a sidecar (or finished) leaves the mesh.
            self.delete_pod(&pod.namespace().unwrap_or_default(), &pod.name_any());
            return;
        };
        let affected = {
            let mut inner = self.lock();
            let old = inner.sidecars.get(&key).cloned();
            if old.as_ref() == Some(&sidecar) {
                return;
            }
            let mut affected = Affected {
                views: true,
                ..Default::default()
            };
            for labels in old
                .iter()
                .map(|o| &o.info.labels)
                .chain([&sidecar.info.labels])
            {
                inner.selected_by(&key.namespace, labels, &mut affected);
            }
            inner.mesh.apply_sidecar(key.clone(), sidecar.info.clone());
            inner.sidecars.insert(key, sidecar);
            affected
        };
        self.notify(affected);
    }

    /// Removes a pod (and the stats its sidecar sent).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let key = SidecarKey::new(namespace, name);
        let affected = {
            let mut inner = self.lock();
            let Some(old) = inner.sidecars.remove(&key) else {
                return;
            };
            inner.mesh.delete_sidecar(&key);
            let mut affected = Affected {
                views: true,
                ..Default::default()
            };
            inner.selected_by(namespace, &old.info.labels, &mut affected);
            if let Some((_, stats)) = inner.stats.remove(&key) {
                stats_names(namespace, &stats, &mut affected);
            }
            affected
        };
        self.notify(affected);
    }

    /// Adds or updates a Queue.
    pub fn apply_queue(&self, queue: &Queue) {
        let key = key_of(queue);
        let affected = {
            let mut inner = self.lock();
            let old = inner.queues.get(&key);
            if old.is_some_and(|old| old.spec == queue.spec) {
                // Status or metadata only: nothing another object or a view depends on.
                inner.queues.insert(key, Arc::new(queue.clone()));
                return;
            }
            let mut affected = Affected {
                views: true,
                ..Default::default()
            };
            inner.naming_queue(&key, &mut affected);
            inner.mesh.apply_queue(queue.clone());
            inner.queues.insert(key, Arc::new(queue.clone()));
            affected
        };
        self.notify(affected);
    }

    /// Removes a Queue.
    pub fn delete_queue(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let affected = {
            let mut inner = self.lock();
            if inner.queues.remove(&key).is_none() {
                return;
            }
            inner.mesh.delete_queue(namespace, name);
            let mut affected = Affected {
                views: true,
                ..Default::default()
            };
            inner.naming_queue(&key, &mut affected);
            affected
        };
        self.notify(affected);
    }

    /// Adds or updates a Subscription.
    pub fn apply_subscription(&self, subscription: &Subscription) {
        let key = key_of(subscription);
        let affected = {
            let mut inner = self.lock();
            let old = inner.subscriptions.get(&key).cloned();
            if old
                .as_ref()
                .is_some_and(|old| old.spec == subscription.spec)
            {
                inner
                    .subscriptions
                    .insert(key, Arc::new(subscription.clone()));
                return;
            }
            let mut affected = Affected {
                views: true,
                ..Default::default()
            };
            for s in old.iter().map(|o| &**o).chain([subscription]) {
                affected
                    .queues
                    .insert((key.0.clone(), s.spec.queue.clone()));
            }
            inner.mesh.apply_subscription(subscription.clone());
            inner
                .subscriptions
                .insert(key, Arc::new(subscription.clone()));
            affected
        };
        self.notify(affected);
    }

    /// Removes a Subscription.
    pub fn delete_subscription(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let affected = {
            let mut inner = self.lock();
            let Some(old) = inner.subscriptions.remove(&key) else {
                return;
            };
            inner.mesh.delete_subscription(namespace, name);
            let mut affected = Affected {
                views: true,
                ..Default::default()
            };
            affected
                .queues
                .insert((namespace.to_owned(), old.spec.queue.clone()));
            affected
        };
        self.notify(affected);
    }

    /// Keys of every indexed object of a kind, to drop what a re-list no longer returns.
    pub fn pod_keys(&self) -> Vec<Key> {
        self.lock()
            .sidecars
            .keys()
            .map(|k| (k.namespace.clone(), k.name.clone()))
            .collect()
    }

    /// Keys of every indexed Queue.
    pub fn queue_keys(&self) -> Vec<Key> {
        self.lock().queues.keys().cloned().collect()
    }

    /// Keys of every indexed Subscription.
    pub fn subscription_keys(&self) -> Vec<Key> {
        self.lock().subscriptions.keys().cloned().collect()
    }

    /// Records the latest stats of a sidecar's session.
    pub fn record_stats(&self, key: &SidecarKey, session: u64, stats: Stats) {
        let affected = {
            let mut inner = self.lock();
            let mut affected = Affected::default();
            match inner.stats.get(key) {
                Some((_, old)) if figures(old) == figures(&stats) => {}
                Some((_, old)) => {
                    changed_names(&key.namespace, old, &stats, &mut affected);
                }
                None => stats_names(&key.namespace, &stats, &mut affected),
            }
            inner.stats.insert(key.clone(), (session, stats));
            affected
        };
        self.notify(affected);
    }

    /// Forgets a sidecar's stats when its session ends (unless a newer session replaced them).
    pub fn drop_stats(&self, key: &SidecarKey, session: u64) {
        let affected = {
            let mut inner = self.lock();
            let mut affected = Affected::default();
            if inner.stats.get(key).is_some_and(|(s, _)| *s == session)
                && let Some((_, old)) = inner.stats.remove(key)
            {
                stats_names(&key.namespace, &old, &mut affected);
            }
            affected
        };
        self.notify(affected);
    }

    /// The current view of a sidecar (`None` while its pod is unknown).
    pub fn view_for(&self, key: &SidecarKey) -> Option<MeshView> {
        self.lock().mesh.view_for(key)
    }

    /// The indexed sidecar pod.
    pub fn sidecar(&self, key: &SidecarKey) -> Option<SidecarPod> {
        self.lock().sidecars.get(key).cloned()
    }

    /// The indexed Queue.
    pub fn queue(&self, namespace: &str, name: &str) -> Option<Arc<Queue>> {
        self.lock()
            .queues
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The summary `Control/Status` answers for `namespace` (every namespace when empty): a
    /// sidecar counts as connected while its session's stats are in.
    pub fn status(&self, namespace: &str) -> qmesh_proto::control::MeshStatus {
        let inner = self.lock();
        let stats = inner
            .stats
            .iter()
            .map(|(k, (_, s))| (k.clone(), s))
            .collect();
        qmesh_proto::summary::summarize(
            &inner.mesh,
            &stats,
            |key| inner.stats.contains_key(key),
            namespace,
        )
    }

    /// The indexed Subscription.
    pub fn subscription(&self, namespace: &str, name: &str) -> Option<Arc<Subscription>> {
        self.lock()
            .subscriptions
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// What a Queue's status depends on.
    pub fn observe_queue(&self, queue: &Queue) -> QueueObserved {
        let inner = self.lock();
        let (ns, name) = key_of(queue);
        let subscriptions = inner
            .subscriptions
            .range((ns.clone(), String::new())..)
            .take_while(|((n, _), _)| *n == ns)
            .filter(|(_, s)| s.spec.queue == name)
            .map(|((_, s), _)| s.clone())
            .collect();
        let publishers = inner
            .ready_sidecars(&ns)
            .filter(|s| {
                queue
                    .spec
                    .publishers
                    .as_ref()
                    .is_none_or(|sel| sel.matches(&s.info.labels, &s.info.service_account))
            })
            .count();
        let (backlog, half_messages) = inner
            .stats_in(&ns)
            .flat_map(|stats| &stats.queues)
            .filter(|q| q.queue == name)
            .fold((0, 0), |(b, h), q| {
                (b + q.backlog_messages, h + q.half_messages)
            });
        let dead_letter_queue_exists = queue
            .spec
            .dead_letter_queue
            .as_ref()
            .is_none_or(|dlq| inner.queues.contains_key(&(ns.clone(), dlq.clone())));
        QueueObserved {
            subscriptions,
            publishers: u32::try_from(publishers).unwrap_or(u32::MAX),
            backlog,
            half_messages,
            dead_letter_queue_exists,
        }
    }

    /// What a Subscription's status depends on.
    pub fn observe_subscription(&self, subscription: &Subscription) -> SubscriptionObserved {
        let inner = self.lock();
        let (ns, name) = key_of(subscription);
        let exists = |queue: &str| inner.queues.contains_key(&(ns.clone(), queue.to_owned()));
        let consumers = inner
            .ready_sidecars(&ns)
            .filter(|s| {
                subscription
                    .spec
                    .consumers
                    .matches(&s.info.labels, &s.info.service_account)
            })
            .count();
        let mut observed = SubscriptionObserved {
            queue_exists: exists(&subscription.spec.queue),
            dead_letter_queue_exists: subscription
                .spec
                .dead_letter_queue
                .as_deref()
                .is_none_or(exists),
            consumers: u32::try_from(consumers).unwrap_or(u32::MAX),
            ..Default::default()
        };
        for s in inner
            .stats_in(&ns)
            .flat_map(|stats| &stats.subscriptions)
            .filter(|s| s.subscription == name)
        {
            observed.backlog += s.backlog;
            observed.in_flight += s.in_flight;
            observed.scheduled += s.scheduled;
            observed.dead_lettered += s.dead_lettered_total;
        }
        observed
    }
}

// === impl Inner ===

impl Inner {
    fn ready_sidecars<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a SidecarPod> {
        self.sidecars
            .iter()
            .filter(move |(k, s)| k.namespace == namespace && s.info.ready)
            .map(|(_, s)| s)
    }

    fn stats_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Stats> {
        self.stats
            .iter()
            .filter(move |(k, _)| k.namespace == namespace)
            .map(|(_, (_, stats))| stats)
    }

    /// Queues whose publishers and Subscriptions whose consumers select `labels`.
    fn selected_by(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        affected: &mut Affected,
    ) {
        for ((ns, name), q) in &self.queues {
            if ns == namespace
                && q.spec
                    .publishers
                    .as_ref()
                    .is_none_or(|sel| labels_match(&sel.labels, labels))
            {
                affected.queues.insert((ns.clone(), name.clone()));
            }
        }
        for ((ns, name), s) in &self.subscriptions {
            if ns == namespace && labels_match(&s.spec.consumers.labels, labels) {
                affected.subscriptions.insert((ns.clone(), name.clone()));
            }
        }
    }

    /// Subscriptions and Queues that name the Queue `key` (as their queue or dead-letter queue).
    fn naming_queue(&self, key: &Key, affected: &mut Affected) {
        let (namespace, queue) = key;
        for ((ns, name), s) in &self.subscriptions {
            if ns == namespace
                && (s.spec.queue == *queue || s.spec.dead_letter_queue.as_ref() == Some(queue))
            {
                affected.subscriptions.insert((ns.clone(), name.clone()));
            }
        }
        for ((ns, name), q) in &self.queues {
            if ns == namespace && q.spec.dead_letter_queue.as_ref() == Some(queue) {
                affected.queues.insert((ns.clone(), name.clone()));
            }
        }
    }
}

type Figures = (
    BTreeMap<String, (u64, u64)>,
    BTreeMap<String, (u64, u64, u64, u64)>,
);

/// The figures of a stats report that statuses show.
fn figures(stats: &Stats) -> Figures {
    (
        stats
            .queues
            .iter()
            .map(|q| (q.queue.clone(), (q.backlog_messages, q.half_messages)))
            .collect(),
        stats
            .subscriptions
            .iter()
            .map(|s| {
                (
                    s.subscription.clone(),
                    (s.backlog, s.in_flight, s.dead_lettered_total, s.scheduled),
                )
            })
            .collect(),
    )
}

fn stats_names(namespace: &str, stats: &Stats, affected: &mut Affected) {
    for q in &stats.queues {
        affected
            .queues
            .insert((namespace.to_owned(), q.queue.clone()));
    }
    for s in &stats.subscriptions {
        affected
            .subscriptions
            .insert((namespace.to_owned(), s.subscription.clone()));
    }
}

fn changed_names(namespace: &str, old: &Stats, new: &Stats, affected: &mut Affected) {
    let (old_q, old_s) = figures(old);
    let (new_q, new_s) = figures(new);
    for name in old_q.keys().chain(new_q.keys()) {
        if old_q.get(name) != new_q.get(name) {
            affected.queues.insert((namespace.to_owned(), name.clone()));
        }
    }
    for name in old_s.keys().chain(new_s.keys()) {
        if old_s.get(name) != new_s.get(name) {
            affected
                .subscriptions
                .insert((namespace.to_owned(), name.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Container, PodCondition, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
    };
    use qmesh_api::{QueueSpec, SubscriptionSpec};
    use qmesh_proto::control::{QueueStats, SubscriptionStats};

    use super::*;

    fn pod(name: &str, app: &str, ip: Option<&str>, ready: bool) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("shop".into());
        pod.metadata.labels = Some([("app".to_owned(), app.to_owned())].into());
        pod.spec = Some(PodSpec {
            containers: vec![
                Container {
                    name: "app".into(),
                    ..Default::default()
                },
                Container {
                    name: SIDECAR_CONTAINER.into(),
                    ..Default::default()
                },
            ],
            service_account_name: Some("worker".into()),
            ..Default::default()
        });
        pod.status = Some(PodStatus {
            pod_ip: ip.map(Into::into),
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        pod
    }

    fn queue(name: &str) -> Queue {
        let mut q = Queue::new(name, QueueSpec::default());
        q.metadata.namespace = Some("shop".into());
        q
    }

    fn subscription(name: &str, queue: &str, app: &str) -> Subscription {
        let mut s = Subscription::new(
            name,
            SubscriptionSpec {
                queue: queue.into(),
                consumers: LabelSelector {
                    match_labels: Some([("app".to_owned(), app.to_owned())].into()),
                    ..Default::default()
                }
                .into(),
                delivery: Default::default(),
                rate_limit: None,
                retry: Default::default(),
                dead_letter_queue: None,
                filter: None,
                start_at: Default::default(),
            },
        );
        s.metadata.namespace = Some("shop".into());
        s
    }

    #[test]
    fn a_ready_pod_with_the_sidecar_container_is_a_ready_sidecar_at_port_7070() {
        let (key, sidecar) = sidecar_of(&pod("w-1", "worker", Some("198.18.0.7"), true)).unwrap();
        assert_eq!(key, SidecarKey::new("shop", "w-1"));
        assert_eq!(sidecar.info.peer_address, "198.18.0.7:7070");
        assert!(sidecar.info.ready);
        assert_eq!(sidecar.info.service_account, "worker");
        assert_eq!(sidecar.info.labels["app"], "worker");
    }

    #[test]
    fn unready_ipless_deleting_and_plain_pods_are_not_ready_sidecars() {
        assert!(
            !sidecar_of(&pod("a", "w", Some("198.18.0.1"), false))
                .unwrap()
                .1
                .info
                .ready
        );
        let (_, no_ip) = sidecar_of(&pod("a", "w", None, true)).unwrap();
        assert!(!no_ip.info.ready && no_ip.info.peer_address.is_empty());
        let mut deleting = pod("a", "w", Some("198.18.0.1"), true);
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(!sidecar_of(&deleting).unwrap().1.info.ready);
        let mut plain = pod("a", "w", Some("198.18.0.1"), true);
        plain.spec.as_mut().unwrap().containers.pop();
        assert!(sidecar_of(&plain).is_none());
        let mut done = pod("a", "w", Some("198.18.0.1"), true);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(sidecar_of(&done).is_none());
    }

    #[test]
    fn a_native_sidecar_init_container_counts_too() {
        let mut p = pod("a", "w", Some("198.18.0.1"), true);
        let spec = p.spec.as_mut().unwrap();
        let sidecar = spec.containers.pop().unwrap();
        spec.init_containers = Some(vec![sidecar]);
        assert!(sidecar_of(&p).is_some());
    }

    #[test]
    fn pods_feed_the_mesh_and_counts_follow_readiness() {
        let index = Index::new();
        index.apply_queue(&queue("orders"));
        let sub = subscription("billing", "orders", "billing");
        index.apply_subscription(&sub);
        index.apply_pod(&pod("b-1", "billing", Some("198.18.0.2"), false));
        assert_eq!(index.observe_subscription(&sub).consumers, 0);
        index.apply_pod(&pod("b-1", "billing", Some("198.18.0.2"), true));
        let observed = index.observe_subscription(&sub);
        assert_eq!(observed.consumers, 1);
        assert!(observed.queue_exists);
        let q = index.observe_queue(&queue("orders"));
        assert_eq!(q.subscriptions, ["billing"]);
        assert_eq!(q.publishers, 1);
        let view = index.view_for(&SidecarKey::new("shop", "b-1")).unwrap();
        assert_eq!(view.subscriptions[0].name, "billing");
        index.delete_pod("shop", "b-1");
        assert_eq!(index.observe_subscription(&sub).consumers, 0);
        assert!(index.view_for(&SidecarKey::new("shop", "b-1")).is_none());
    }

    #[test]
    fn a_pod_change_triggers_what_selects_it_and_bumps_views() {
        let index = Index::new();
        index.apply_queue(&queue("orders"));
        index.apply_subscription(&subscription("billing", "orders", "billing"));
        index.apply_subscription(&subscription("audit", "orders", "audit"));
        let mut queues = index.queue_triggers();
        let mut subs = index.subscription_triggers();
        let changes = index.subscribe_changes();
        let before = *changes.borrow();
        index.apply_pod(&pod("b-1", "billing", Some("198.18.0.2"), true));
        assert_eq!(queues.try_recv().unwrap().name, "orders");
        assert_eq!(subs.try_recv().unwrap().name, "billing");
        assert!(subs.try_recv().is_err(), "audit does not select the pod");
        assert!(*changes.borrow() > before);
        // The same pod again changes nothing.
        let now = *changes.borrow();
        index.apply_pod(&pod("b-1", "billing", Some("198.18.0.2"), true));
        assert_eq!(*changes.borrow(), now);
        assert!(queues.try_recv().is_err());
    }

    #[test]
    fn a_status_only_queue_update_triggers_nothing() {
        let index = Index::new();
        index.apply_queue(&queue("orders"));
        index.apply_subscription(&subscription("billing", "orders", "billing"));
        let mut subs = index.subscription_triggers();
        let mut q = queue("orders");
        q.status = Some(Default::default());
        index.apply_queue(&q);
        assert!(subs.try_recv().is_err());
        index.delete_queue("shop", "orders");
        assert_eq!(subs.try_recv().unwrap().name, "billing");
        assert!(
            !index
                .observe_subscription(&subscription("billing", "orders", "billing"))
                .queue_exists
        );
    }

    #[test]
    fn stats_are_summed_over_sidecars_and_dropped_with_their_session() {
        let index = Index::new();
        let q = queue("orders");
        let sub = subscription("billing", "orders", "billing");
        let stats = |backlog| Stats {
            at: None,
            queues: vec![QueueStats {
                queue: "orders".into(),
                backlog_messages: backlog,
                ..Default::default()
            }],
            subscriptions: vec![SubscriptionStats {
                subscription: "billing".into(),
                queue: "orders".into(),
                backlog,
                in_flight: 2,
                dead_lettered_total: 1,
                ..Default::default()
            }],
            transactions: Vec::new(),
        };
        let (a, b) = (SidecarKey::new("shop", "a"), SidecarKey::new("shop", "b"));
        let mut triggers = index.queue_triggers();
        index.record_stats(&a, 1, stats(5));
        index.record_stats(&b, 7, stats(3));
        assert_eq!(triggers.try_recv().unwrap().name, "orders");
        assert_eq!(index.observe_queue(&q).backlog, 8);
        let s = index.observe_subscription(&sub);
        assert_eq!((s.backlog, s.in_flight, s.dead_lettered), (8, 4, 2));
        // An older session ending does not drop a newer session's figures.
        index.drop_stats(&b, 6);
        assert_eq!(index.observe_queue(&q).backlog, 8);
        index.drop_stats(&b, 7);
        assert_eq!(index.observe_queue(&q).backlog, 5);
    }
}
