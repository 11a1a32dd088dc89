//! The mesh: which sidecar may own which queue's messages, where each subscription's consumers are,
//! and the complete view each sidecar gets. Fed by plain synchronous `apply`/`delete` calls (from
//! Kubernetes watches in the operator, from a mesh file locally) and queried with [`MeshState::view_for`].

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use qmesh_api::{Delivery, Filter, Queue, QueueSpec, RateLimit, Retry, Subscription, Validate};

/// Identifies a sidecar: its pod's (or mesh-file document's) namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SidecarKey {
    /// Namespace.
    pub namespace: String,
    /// Pod or document name.
    pub name: String,
}

impl SidecarKey {
    /// A key from namespace and name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// What the mesh knows of one sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarInfo {
    /// Its pod's labels.
    pub labels: BTreeMap<String, String>,
    /// Its pod's service account (`default` for a local sidecar).
    pub service_account: String,
    /// `ip:port` of its Peer API.
    pub peer_address: String,
    /// Whether it can take traffic (pod Ready, or a local sidecar that joined).
    pub ready: bool,
}

/// Another sidecar as a view names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerEndpoint {
    /// Pod or document name.
    pub name: String,
    /// `ip:port` of its Peer API.
    pub peer_address: String,
}

/// Everything one sidecar needs; complete, not a delta. Equal views need not be resent.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshView {
    /// The sidecar's namespace.
    pub namespace: String,
    /// Queues whose messages this sidecar may own.
    pub queues: Vec<QueueView>,
    /// Subscriptions whose consumers run beside this sidecar.
    pub subscriptions: Vec<ServedSubscription>,
    /// Other ready sidecars that may own one of this sidecar's queues (replication and hand-over
    /// candidates), sorted; no other sidecar of the namespace is named.
    pub peers: Vec<PeerEndpoint>,
    /// The namespace's valid queues this sidecar may not publish to (for a clear 403).
    pub other_queues: Vec<String>,
}

impl MeshView {
    /// The queue of this name, if the sidecar may own its messages.
    pub fn queue(&self, name: &str) -> Option<&QueueView> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The served subscription of this name.
    pub fn subscription(&self, name: &str) -> Option<&ServedSubscription> {
        self.subscriptions.iter().find(|s| s.name == name)
    }
}

/// A queue as its owner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueView {
    /// Queue name.
    pub name: String,
    /// Whether the app may publish (selected by `publishers`); false for a dead-letter queue included
    /// only so the sidecar can dead-letter into it.
    pub app_may_publish: bool,
    /// Policies as written (defaults already applied by deserialisation).
    pub spec: QueueSpec,
    /// Every subscription of the queue, sorted by name.
    pub routes: Vec<Route>,
    /// Names of the sidecars that may own the queue's messages, ready or not (a sidecar that is
    /// draining is no longer ready but still hands over), sorted: who may hand over or replicate
    /// them here.
    pub owners: Vec<String>,
    /// Queues whose dead letters come here (their own or a subscription's dead-letter queue is
    /// this one), sorted: the only origins a dead letter of this queue can name.
    pub dead_letter_of: Vec<String>,
}

/// One subscription of a queue, as owners need it.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Subscription name.
    pub subscription: String,
    /// Header filter; messages that fail it are settled for this subscription at publish.
    pub filter: Option<Filter>,
    /// Ready consumer sidecars, sorted by name.
    pub consumers: Vec<PeerEndpoint>,
    /// Redelivery policy.
    pub retry: Retry,
    /// Delivery settings (ack timeout, window).
    pub delivery: Delivery,
    /// Effective dead-letter queue: the subscription's, else the queue's.
    pub dead_letter_queue: Option<String>,
    /// Where the subscription starts when an owner first serves it.
    pub start_at: qmesh_api::StartAt,
}

/// A subscription served by the sidecar's pod.
#[derive(Clone, Debug, PartialEq)]
pub struct ServedSubscription {
    /// Subscription name.
    pub name: String,
    /// Its queue.
    pub queue: String,
    /// Delivery settings.
    pub delivery: Delivery,
    /// This pod's share of the subscription's rate limit.
    pub rate_share: Option<RateLimit>,
    /// Sidecars that may own the queue's messages and so open Forward streams here, ready or not
    /// (a draining owner still delivers its backlog).
    pub owners: Vec<PeerEndpoint>,
    /// The queue's largest message (bounds what owners may forward here in one frame).
    pub max_message_bytes: qmesh_api::ByteSize,
}

/// Queues, subscriptions and sidecars of every namespace, kept by the control plane.
///
/// Mutations are plain synchronous calls; the first view asked for after a change derives, once, the
/// facts every view needs (which specs are valid, which sidecars own which queues, who consumes which
/// subscription), so computing all views of a large namespace stays cheap.
#[derive(Clone, Debug, Default)]
pub struct MeshState {
    queues: BTreeMap<(String, String), Queue>,
    subscriptions: BTreeMap<(String, String), Subscription>,
    sidecars: BTreeMap<SidecarKey, SidecarInfo>,
    derived: std::sync::OnceLock<std::sync::Arc<Derived>>,
}

/// Facts derived from the state, shared by every view until the next change.
#[derive(Debug, Default)]
struct Derived {
    /// Valid queues by (namespace, name).
    queues: BTreeMap<(String, String), Queue>,
    /// Valid subscriptions of existing queues, by (namespace, queue) then name.
    routes: BTreeMap<(String, String), BTreeMap<String, Subscription>>,
    /// Per sidecar: queues its app may publish to, and all queues it may own (with dead-letter ones).
    owned: BTreeMap<SidecarKey, (BTreeSet<String>, BTreeSet<String>)>,
    /// Ready consumer sidecars per (namespace, subscription).
    consumers: BTreeMap<(String, String), Vec<PeerEndpoint>>,
    /// Ready sidecars that may own each (namespace, queue).
    owners: BTreeMap<(String, String), Vec<PeerEndpoint>>,
    /// All sidecars with an address, ready or not, that may own each (namespace, queue): a
    /// draining one still delivers and hands over what it owns.
    claimants: BTreeMap<(String, String), Vec<PeerEndpoint>>,
    /// Per (namespace, queue): the queues that dead-letter straight into it.
    dead_letter_of: BTreeMap<(String, String), BTreeSet<String>>,
    /// Subscriptions (namespace, name) whose consumers a sidecar is, per sidecar.
    served: BTreeMap<SidecarKey, Vec<(String, String)>>,
    /// Valid queue names per namespace.
    names: BTreeMap<String, Vec<String>>,
    /// Valid subscriptions of existing queues by (namespace, name).
    subs: BTreeMap<(String, String), Subscription>,
}

fn key_of(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn endpoint(key: &SidecarKey, info: &SidecarInfo) -> PeerEndpoint {
    PeerEndpoint {
        name: key.name.clone(),
        peer_address: info.peer_address.clone(),
    }
}

// === impl MeshState ===

impl MeshState {
    fn changed(&mut self) {
        self.derived = std::sync::OnceLock::new();
    }

    /// Adds or replaces a Queue. Invalid queues are kept out of views (the operator reports them).
    pub fn apply_queue(&mut self, queue: Queue) {
        self.queues.insert(key_of(&queue.metadata), queue);
        self.changed();
    }

    /// Removes a Queue.
    pub fn delete_queue(&mut self, namespace: &str, name: &str) {
        self.queues.remove(&(namespace.to_owned(), name.to_owned()));
        self.changed();
    }

    /// Adds or replaces a Subscription.
    pub fn apply_subscription(&mut self, subscription: Subscription) {
        self.subscriptions
            .insert(key_of(&subscription.metadata), subscription);
        self.changed();
    }

    /// Removes a Subscription.
    pub fn delete_subscription(&mut self, namespace: &str, name: &str) {
        self.subscriptions
            .remove(&(namespace.to_owned(), name.to_owned()));
        self.changed();
    }

    /// Adds or replaces a sidecar.
    pub fn apply_sidecar(&mut self, key: SidecarKey, info: SidecarInfo) {
        self.sidecars.insert(key, info);
        self.changed();
    }

    /// Removes a sidecar.
    pub fn delete_sidecar(&mut self, key: &SidecarKey) {
        self.sidecars.remove(key);
        self.changed();
    }

    /// The sidecars known, with what is known of them.
    pub fn sidecars(&self) -> impl Iterator<Item = (&SidecarKey, &SidecarInfo)> {
        self.sidecars.iter()
    }

    /// Every Queue, valid or not, by (namespace, name).
    pub fn queues(&self) -> impl Iterator<Item = (&(String, String), &Queue)> {
        self.queues.iter()
    }

    /// Every Subscription, valid or not, by (namespace, name).
    pub fn subscriptions(&self) -> impl Iterator<Item = (&(String, String), &Subscription)> {
        self.subscriptions.iter()
    }

    fn derived(&self) -> std::sync::Arc<Derived> {
        std::sync::Arc::clone(
            self.derived
                .get_or_init(|| std::sync::Arc::new(self.derive())),
        )
    }

    /// Computes what every view needs, once per change.
    fn derive(&self) -> Derived {
        let mut d = Derived::default();
        for (key, q) in &self.queues {
            if q.validate().is_ok() {
                d.queues.insert(key.clone(), q.clone());
                d.names
                    .entry(key.0.clone())
                    .or_default()
                    .push(key.1.clone());
            }
        }
        for ((ns, name), s) in &self.subscriptions {
            if s.validate().is_ok() && d.queues.contains_key(&(ns.clone(), s.spec.queue.clone())) {
                d.subs.insert((ns.clone(), name.clone()), s.clone());
                d.routes
                    .entry((ns.clone(), s.spec.queue.clone()))
                    .or_default()
                    .insert(name.clone(), s.clone());
            }
        }
        // Dead-letter queues reachable from each queue (its own and its subscriptions', transitively).
        let direct = |ns: &str, queue: &str| -> Vec<String> {
            let key = (ns.to_owned(), queue.to_owned());
            let mut targets: Vec<String> = d
                .queues
                .get(&key)
                .and_then(|q| q.spec.dead_letter_queue.clone())
                .into_iter()
                .collect();
            if let Some(subs) = d.routes.get(&key) {
                targets.extend(
                    subs.values()
                        .filter_map(|s| s.spec.dead_letter_queue.clone()),
                );
            }
            targets.retain(|t| d.queues.contains_key(&(ns.to_owned(), t.clone())));
            targets
        };
        let mut dead_letter_of: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for (ns, name) in d.queues.keys() {
            for target in direct(ns, name) {
                dead_letter_of
                    .entry((ns.clone(), target))
                    .or_default()
                    .insert(name.clone());
            }
        }
        let mut closure: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for (ns, name) in d.queues.keys() {
            let mut seen = BTreeSet::new();
            let mut pending = vec![name.clone()];
            while let Some(q) = pending.pop() {
                for t in direct(ns, &q) {
                    if seen.insert(t.clone()) {
                        pending.push(t);
                    }
                }
            }
            closure.insert((ns.clone(), name.clone()), seen);
        }
        d.dead_letter_of = dead_letter_of;
        for (key, info) in &self.sidecars {
            let mut publishable = BTreeSet::new();
            for name in d.names.get(&key.namespace).into_iter().flatten() {
                let q = &d.queues[&(key.namespace.clone(), name.clone())];
                if q.spec
                    .publishers
                    .as_ref()
                    .is_none_or(|sel| sel.matches(&info.labels, &info.service_account))
                {
                    publishable.insert(name.clone());
                }
            }
            let mut owned = publishable.clone();
            for name in &publishable {
                owned.extend(
                    closure[&(key.namespace.clone(), name.clone())]
                        .iter()
                        .cloned(),
                );
            }
            // Ready or not, but with an address: a pod that never got one has never run, so it
            // holds nothing and can call no one (and its appearing changes no view).
            for name in owned.iter().filter(|_| !info.peer_address.is_empty()) {
                d.claimants
                    .entry((key.namespace.clone(), name.clone()))
                    .or_default()
                    .push(endpoint(key, info));
            }
            if info.ready {
                for name in &owned {
                    d.owners
                        .entry((key.namespace.clone(), name.clone()))
                        .or_default()
                        .push(endpoint(key, info));
                }
            }
            d.owned.insert(key.clone(), (publishable, owned));
        }
        for ((ns, _), subs) in &d.routes {
            for (name, s) in subs {
                let mut consumers = Vec::new();
                for (key, info) in self
                    .sidecars
                    .range(SidecarKey::new(ns.clone(), String::new())..)
                {
                    if key.namespace != *ns {
                        break;
                    }
                    if s.spec
                        .consumers
                        .matches(&info.labels, &info.service_account)
                    {
                        d.served
                            .entry(key.clone())
                            .or_default()
                            .push((ns.clone(), name.clone()));
                        if info.ready {
                            consumers.push(endpoint(key, info));
                        }
                    }
                }
                d.consumers.insert((ns.clone(), name.clone()), consumers);
            }
        }
        d
    }

    /// The view for one sidecar, or `None` if the sidecar is unknown.
    pub fn view_for(&self, key: &SidecarKey) -> Option<MeshView> {
        self.sidecars.get(key)?;
        let d = self.derived();
        let namespace = key.namespace.as_str();
        let (publishable, owned) = d.owned.get(key)?;
        let ns = |name: &str| (namespace.to_owned(), name.to_owned());

        let queues = owned
            .iter()
            .filter_map(|name| d.queues.get(&ns(name)).map(|q| (name, q)))
            .map(|(name, queue)| {
                let routes = d
                    .routes
                    .get(&ns(name))
                    .into_iter()
                    .flatten()
                    .map(|(sub_name, s)| Route {
                        subscription: sub_name.clone(),
                        filter: s.spec.filter.clone(),
                        consumers: d.consumers.get(&ns(sub_name)).cloned().unwrap_or_default(),
                        retry: s.spec.retry.clone(),
                        delivery: s.spec.delivery.clone(),
                        dead_letter_queue: s
                            .spec
                            .dead_letter_queue
                            .clone()
                            .or_else(|| queue.spec.dead_letter_queue.clone())
                            .filter(|dlq| d.queues.contains_key(&ns(dlq))),
                        start_at: s.spec.start_at,
                    })
                    .collect();
                QueueView {
                    app_may_publish: publishable.contains(name),
                    name: name.clone(),
                    spec: queue.spec.clone(),
                    routes,
                    owners: d
                        .claimants
                        .get(&ns(name))
                        .into_iter()
                        .flatten()
                        .map(|o| o.name.clone())
                        .collect(),
                    dead_letter_of: d
                        .dead_letter_of
                        .get(&ns(name))
                        .into_iter()
                        .flatten()
                        .cloned()
                        .collect(),
                }
            })
            .collect();

        let subscriptions = d
            .served
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|(sns, name)| {
                let s = d.subs.get(&(sns.clone(), name.clone()))?;
                let consumers = d
                    .consumers
                    .get(&(sns.clone(), name.clone()))
                    .map_or(0, Vec::len)
                    .max(1);
                Some(ServedSubscription {
                    name: name.clone(),
                    queue: s.spec.queue.clone(),
                    delivery: s.spec.delivery.clone(),
                    rate_share: s
                        .spec
                        .rate_limit
                        .as_ref()
                        .map(|limit| split_rate(limit, consumers)),
                    owners: d
                        .claimants
                        .get(&ns(&s.spec.queue))
                        .cloned()
                        .unwrap_or_default(),
                    max_message_bytes: d.queues.get(&ns(&s.spec.queue)).map_or_else(
                        || QueueSpec::default().max_message_bytes,
                        |q| q.spec.max_message_bytes.clone(),
                    ),
                })
            })
            .collect();

        // Only the ready sidecars that may own one of this sidecar's queues: where a hand-over or
        // a replica of them can go. The rest of the namespace is not named.
        let peers: BTreeSet<PeerEndpoint> = owned
            .iter()
            .filter_map(|name| d.owners.get(&ns(name)))
            .flatten()
            .filter(|p| p.name != key.name)
            .cloned()
            .collect();
        let peers = peers.into_iter().collect();

        let other_queues = d
            .names
            .get(namespace)
            .into_iter()
            .flatten()
            .filter(|name| !publishable.contains(*name))
            .cloned()
            .collect();

        Some(MeshView {
            namespace: namespace.to_owned(),
            queues,
            subscriptions,
            peers,
            other_queues,
        })
    }
}

/// One consumer pod's share of a subscription-wide rate limit: the rate divided evenly, the burst
/// divided and rounded up (at least 1), so the whole never exceeds the limit by more than rounding.
pub fn split_rate(limit: &RateLimit, consumers: usize) -> RateLimit {
    let n = consumers.max(1) as f64;
    let burst = (f64::from(limit.burst_or_default()) / n).ceil().max(1.0);
    RateLimit {
        messages_per_second: limit.messages_per_second / n,
        burst: Some(burst as u32),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use qmesh_api::{PodSelector, QueueSpec, SubscriptionSpec};

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(pairs: &[(&str, &str)]) -> PodSelector {
        LabelSelector {
            match_labels: Some(labels(pairs)),
            ..Default::default()
        }
        .into()
    }

    fn queue(name: &str, spec: QueueSpec) -> Queue {
        let mut q = Queue::new(name, spec);
        q.metadata.namespace = Some("shop".into());
        q
    }

    fn subscription(name: &str, queue: &str, app: &str) -> Subscription {
        let mut s = Subscription::new(
            name,
            SubscriptionSpec {
                queue: queue.into(),
                consumers: selector(&[("app", app)]),
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

    fn sidecar(mesh: &mut MeshState, name: &str, app: &str, ready: bool) -> SidecarKey {
        let key = SidecarKey::new("shop", name);
        mesh.apply_sidecar(
            key.clone(),
            SidecarInfo {
                labels: labels(&[("app", app)]),
                service_account: "default".into(),
                peer_address: format!("{name}:7000"),
                ready,
            },
        );
        key
    }

    /// checkout publishes to orders (dead letters to orders-dlq); billing has two competing pods
    /// and a rate limit; shipping one pod.
    fn shop() -> MeshState {
        let mut mesh = MeshState::default();
        mesh.apply_queue(queue(
            "orders",
            QueueSpec {
                publishers: Some(selector(&[("app", "checkout")])),
                dead_letter_queue: Some("orders-dlq".into()),
                ..Default::default()
            },
        ));
        mesh.apply_queue(queue(
            "orders-dlq",
            QueueSpec {
                publishers: Some(selector(&[("app", "ops")])),
                ..Default::default()
            },
        ));
        let mut billing = subscription("billing", "orders", "billing");
        billing.spec.rate_limit = Some(RateLimit {
            messages_per_second: 100.0,
            burst: Some(9),
        });
        mesh.apply_subscription(billing);
        mesh.apply_subscription(subscription("shipping", "orders", "shipping"));
        sidecar(&mut mesh, "checkout-1", "checkout", true);
        sidecar(&mut mesh, "billing-1", "billing", true);
        sidecar(&mut mesh, "billing-2", "billing", true);
        sidecar(&mut mesh, "billing-3", "billing", false);
        sidecar(&mut mesh, "shipping-1", "shipping", true);
        mesh
    }

    #[test]
    fn service_accounts_in_selectors_narrow_publishers_consumers_and_peers() {
        let mut mesh = shop();
        let mut orders = queue(
            "orders",
            QueueSpec {
                publishers: Some(selector(&[("app", "checkout")])),
                ..Default::default()
            },
        );
        orders.spec.publishers.as_mut().unwrap().service_accounts = Some(vec!["checkout".into()]);
        mesh.apply_queue(orders);
        let mut billing = subscription("billing", "orders", "billing");
        billing.spec.consumers.service_accounts = Some(vec!["billing".into()]);
        mesh.apply_subscription(billing);
        // checkout-1 and billing-1 run as `default`: labels alone no longer select them.
        let as_account = |mesh: &mut MeshState, name: &str, app: &str, sa: &str| {
            mesh.apply_sidecar(
                SidecarKey::new("shop", name),
                SidecarInfo {
                    labels: labels(&[("app", app)]),
                    service_account: sa.into(),
                    peer_address: format!("{name}:7000"),
                    ready: true,
                },
            );
        };
        as_account(&mut mesh, "checkout-2", "checkout", "checkout");
        as_account(&mut mesh, "billing-4", "billing", "billing");
        let view = |name: &str| mesh.view_for(&SidecarKey::new("shop", name)).unwrap();
        let may_publish = |name: &str| {
            view(name)
                .queues
                .iter()
                .any(|q| q.name == "orders" && q.app_may_publish)
        };
        assert!(
            !may_publish("checkout-1"),
            "right labels, wrong service account"
        );
        assert!(may_publish("checkout-2"));
        let consumers: Vec<String> = view("checkout-2")
            .queues
            .iter()
            .find(|q| q.name == "orders")
            .unwrap()
            .routes
            .iter()
            .find(|r| r.subscription == "billing")
            .unwrap()
            .consumers
            .iter()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(consumers, ["billing-4"]);
        // A sidecar that may not own the queue is nobody's peer for it.
        assert!(
            !view("checkout-2")
                .peers
                .iter()
                .any(|p| p.name == "checkout-1")
        );
    }

    #[test]
    fn a_view_names_only_the_peers_that_may_own_its_queues() {
        let mut mesh = shop();
        sidecar(&mut mesh, "checkout-2", "checkout", true);
        sidecar(&mut mesh, "checkout-3", "checkout", false);
        sidecar(&mut mesh, "ops-1", "ops", true);
        let peers = |name: &str| -> Vec<String> {
            mesh.view_for(&SidecarKey::new("shop", name))
                .unwrap()
                .peers
                .into_iter()
                .map(|p| p.name)
                .collect()
        };
        // checkout owns orders and orders-dlq: the other ready checkout pod and ops (which may own
        // orders-dlq) — not the consumers, not a pod that is not ready.
        assert_eq!(peers("checkout-1"), ["checkout-2", "ops-1"]);
        // ops owns only orders-dlq, which checkout pods own too (to dead-letter into it).
        assert_eq!(peers("ops-1"), ["checkout-1", "checkout-2"]);
        // A consumer that may own nothing is told of no peer.
        assert!(peers("billing-1").is_empty());
    }

    #[test]
    fn each_queue_names_every_sidecar_that_may_own_it_ready_or_not() {
        let mut mesh = shop();
        sidecar(&mut mesh, "checkout-2", "checkout", false);
        sidecar(&mut mesh, "ops-1", "ops", true);
        let owners = |name: &str, queue: &str| -> Vec<String> {
            mesh.view_for(&SidecarKey::new("shop", name))
                .unwrap()
                .queue(queue)
                .unwrap()
                .owners
                .clone()
        };
        // A sidecar that is not ready (draining, say) still may hand its messages over; consumers
        // and pods no selector names never appear.
        assert_eq!(owners("checkout-1", "orders"), ["checkout-1", "checkout-2"]);
        // Dead-letter queues are owned by their publishers and by whoever dead-letters into them.
        assert_eq!(
            owners("ops-1", "orders-dlq"),
            ["checkout-1", "checkout-2", "ops-1"]
        );
        // ops-1 owns only orders-dlq, and still learns whose dead letters it holds.
        let dlq = mesh
            .view_for(&SidecarKey::new("shop", "ops-1"))
            .unwrap()
            .queue("orders-dlq")
            .unwrap()
            .clone();
        assert_eq!(dlq.dead_letter_of, ["orders"]);
    }

    #[test]
    fn publisher_owns_its_queue_and_the_dead_letter_queue_it_needs() {
        let view = shop()
            .view_for(&SidecarKey::new("shop", "checkout-1"))
            .unwrap();
        let names: Vec<_> = view
            .queues
            .iter()
            .map(|q| (q.name.as_str(), q.app_may_publish))
            .collect();
        assert_eq!(names, [("orders", true), ("orders-dlq", false)]);
        let orders = view.queue("orders").unwrap();
        let routes: Vec<_> = orders
            .routes
            .iter()
            .map(|r| r.subscription.as_str())
            .collect();
        assert_eq!(routes, ["billing", "shipping"]);
        assert_eq!(
            orders.routes[0].dead_letter_queue.as_deref(),
            Some("orders-dlq")
        );
        assert!(view.subscriptions.is_empty());
    }

    #[test]
    fn routes_list_only_ready_consumers() {
        let view = shop()
            .view_for(&SidecarKey::new("shop", "checkout-1"))
            .unwrap();
        let billing = &view.queue("orders").unwrap().routes[0];
        let consumers: Vec<_> = billing.consumers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(consumers, ["billing-1", "billing-2"]);
    }

    #[test]
    fn consumer_serves_its_subscription_with_a_share_of_the_rate_and_knows_the_owners() {
        let view = shop()
            .view_for(&SidecarKey::new("shop", "billing-1"))
            .unwrap();
        assert_eq!(view.subscriptions.len(), 1);
        let served = &view.subscriptions[0];
        assert_eq!(
            (served.name.as_str(), served.queue.as_str()),
            ("billing", "orders")
        );
        let share = served.rate_share.as_ref().unwrap();
        assert_eq!(share.messages_per_second, 50.0);
        assert_eq!(share.burst, Some(5));
        let owners: Vec<_> = served.owners.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(owners, ["checkout-1"]);
        // billing pods may publish nowhere: the queue selects checkout pods only.
        assert!(view.queues.is_empty());
    }

    #[test]
    fn queue_without_publisher_selector_is_open_to_every_sidecar_of_its_namespace() {
        let mut mesh = shop();
        mesh.apply_queue(queue("events", QueueSpec::default()));
        let view = mesh
            .view_for(&SidecarKey::new("shop", "shipping-1"))
            .unwrap();
        assert!(view.queue("events").is_some_and(|q| q.app_may_publish));
        let mut other = mesh.clone();
        sidecar(&mut other, "x", "checkout", true);
        let key = SidecarKey::new("elsewhere", "y");
        other.apply_sidecar(
            key.clone(),
            SidecarInfo {
                labels: labels(&[("app", "checkout")]),
                service_account: "default".into(),
                peer_address: "y:1".into(),
                ready: true,
            },
        );
        assert!(
            other.view_for(&key).unwrap().queues.is_empty(),
            "namespaces do not mix"
        );
    }

    #[test]
    fn invalid_specs_and_subscriptions_of_missing_queues_stay_out_of_views() {
        let mut mesh = shop();
        let mut broken = subscription("broken", "orders", "shipping");
        broken.spec.dead_letter_queue = Some("orders".into());
        mesh.apply_subscription(broken);
        mesh.apply_subscription(subscription("orphan", "nope", "shipping"));
        let view = mesh
            .view_for(&SidecarKey::new("shop", "shipping-1"))
            .unwrap();
        let served: Vec<_> = view.subscriptions.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(served, ["shipping"]);
    }

    #[test]
    fn views_change_when_pods_come_and_go() {
        let mut mesh = shop();
        let key = SidecarKey::new("shop", "checkout-1");
        let before = mesh.view_for(&key).unwrap();
        mesh.delete_sidecar(&SidecarKey::new("shop", "billing-2"));
        let after = mesh.view_for(&key).unwrap();
        assert_ne!(before, after);
        assert_eq!(after.queue("orders").unwrap().routes[0].consumers.len(), 1);
        assert_eq!(mesh.view_for(&key), Some(after), "same state, same view");
        assert!(mesh.view_for(&SidecarKey::new("shop", "ghost")).is_none());
    }

    #[test]
    fn rate_share_never_rounds_burst_to_zero() {
        let share = split_rate(
            &RateLimit {
                messages_per_second: 1.0,
                burst: Some(1),
            },
            3,
        );
        assert_eq!(share.burst, Some(1));
        assert!((share.messages_per_second - 1.0 / 3.0).abs() < 1e-9);
    }
}
