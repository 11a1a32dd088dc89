//! The mesh summary `Control/Status` answers (`qmesh get`, the console): every Queue and
//! Subscription of a namespace with its backlog, rates and counters rolled up over the latest
//! stats of the sidecars connected now, and the sidecars known. Shared by the operator (from its
//! index) and `qmesh dev` (from its manifests), so both answer alike.
//!
//! ```text
//!   MeshState (queues, subscriptions, sidecars) ─┐
//!   latest Stats per connected sidecar ──────────┼─▶ summarize(namespace) ─▶ MeshStatus
//!   connected? per sidecar ──────────────────────┘
//! ```

use std::collections::BTreeMap;

use qmesh_core::{MeshState, SidecarInfo, SidecarKey};

use crate::control::{
    MeshStatus, QueueStatus, RateLimit, SidecarStatus, Stats, SubscriptionStatus, TransactionEvent,
};

/// Most transaction outcomes a summary carries.
pub const MAX_TRANSACTION_EVENTS: usize = 100;

/// The summary of `only` (every namespace when empty): `stats` holds the latest stats of each
/// connected sidecar, `connected` says which sidecars have a session now.
pub fn summarize(
    mesh: &MeshState,
    stats: &BTreeMap<SidecarKey, &Stats>,
    connected: impl Fn(&SidecarKey) -> bool,
    only: &str,
) -> MeshStatus {
    let wanted = |ns: &str| only.is_empty() || ns == only;
    let ready = |ns: &str| {
        mesh.sidecars()
            .filter(move |(k, info)| k.namespace == ns && info.ready)
            .map(|(_, info)| info)
            .collect::<Vec<&SidecarInfo>>()
    };
    let stats_in = |ns: &str| {
        stats
            .iter()
            .filter(move |(k, _)| k.namespace == ns)
            .map(|(_, s)| *s)
            .collect::<Vec<&Stats>>()
    };
    let mut status = MeshStatus::default();
    // Like `kubectl get`: by namespace, then name (the maps are ordered so).
    for ((ns, name), q) in mesh.queues().filter(|((ns, _), _)| wanted(ns)) {
        let mut row = QueueStatus {
            namespace: ns.clone(),
            name: name.clone(),
            dead_letter_queue: q.spec.dead_letter_queue.clone().unwrap_or_default(),
            publish_rate_limit: q.spec.publish_rate_limit.as_ref().map(rate_limit),
            ..Default::default()
        };
        row.publishers = count(ready(ns).into_iter().filter(|s| {
            q.spec
                .publishers
                .as_ref()
                .is_none_or(|sel| sel.matches(&s.labels, &s.service_account))
        }));
        row.subscriptions = count(
            mesh.subscriptions()
                .filter(|((n, _), s)| n == ns && s.spec.queue == *name),
        );
        for stats in stats_in(ns).into_iter().flat_map(|s| &s.queues) {
            if stats.queue == *name {
                row.backlog += stats.backlog_messages;
                row.publish_rate += stats.publish_rate;
                row.published_total += stats.published_total;
                row.oldest_age = older(row.oldest_age.take(), stats.oldest_age.as_ref());
                row.half_messages += stats.half_messages;
            }
        }
        status.queues.push(row);
    }
    for ((ns, name), s) in mesh.subscriptions().filter(|((ns, _), _)| wanted(ns)) {
        let mut row = SubscriptionStatus {
            namespace: ns.clone(),
            name: name.clone(),
            queue: s.spec.queue.clone(),
            mode: format!("{:?}", s.spec.delivery.mode),
            rate_limit: s.spec.rate_limit.as_ref().map(rate_limit),
            ..Default::default()
        };
        row.consumers = count(ready(ns).into_iter().filter(|info| {
            s.spec
                .consumers
                .matches(&info.labels, &info.service_account)
        }));
        for stats in stats_in(ns).into_iter().flat_map(|s| &s.subscriptions) {
            if stats.subscription == *name {
                row.backlog += stats.backlog;
                row.scheduled += stats.scheduled;
                row.in_flight += stats.in_flight;
                row.ack_rate += stats.ack_rate;
                row.acked_total += stats.acked_total;
                row.dead_lettered_total += stats.dead_lettered_total;
                row.delivered_total += stats.delivered_total;
                row.nacked_total += stats.nacked_total;
                row.deliver_rate += stats.deliver_rate;
                row.consumer_streams += stats.consumers;
                row.oldest_age = older(row.oldest_age.take(), stats.oldest_age.as_ref());
            }
        }
        status.subscriptions.push(row);
    }
    // The latest transaction outcomes over the sidecars, newest first.
    for (key, s) in stats.iter().filter(|(k, _)| wanted(&k.namespace)) {
        for event in &s.transactions {
            status.transactions.push(TransactionEvent {
                sidecar: key.name.clone(),
                namespace: key.namespace.clone(),
                ..event.clone()
            });
        }
    }
    status
        .transactions
        .sort_by_key(|e| std::cmp::Reverse(e.at.as_ref().map(|t| (t.seconds, t.nanos))));
    status.transactions.truncate(MAX_TRANSACTION_EVENTS);
    for (key, info) in mesh.sidecars().filter(|(k, _)| wanted(&k.namespace)) {
        let latest = stats.get(key);
        status.sidecars.push(SidecarStatus {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            peer_address: info.peer_address.clone(),
            labels: info.labels.clone().into_iter().collect(),
            connected: connected(key),
            owns: latest
                .iter()
                .flat_map(|s| &s.queues)
                .map(|q| (q.queue.clone(), q.backlog_messages))
                .collect(),
            consumes: latest
                .iter()
                .flat_map(|s| &s.subscriptions)
                .filter(|s| s.consumers > 0)
                .map(|s| (s.subscription.clone(), s.in_flight))
                .collect(),
        });
    }
    status
}

/// The wire form of a spec's rate limit, its burst resolved.
fn rate_limit(limit: &qmesh_api::RateLimit) -> RateLimit {
    RateLimit {
        messages_per_second: limit.messages_per_second,
        burst: limit.burst_or_default(),
    }
}

/// The longer of two ages (a missing one is no age).
fn older(
    a: Option<prost_types::Duration>,
    b: Option<&prost_types::Duration>,
) -> Option<prost_types::Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if (b.seconds, b.nanos) > (a.seconds, a.nanos) {
            *b
        } else {
            a
        }),
        (a, b) => a.or_else(|| b.copied()),
    }
}

fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use qmesh_core::MeshFile;

    use super::*;
    use crate::control::{QueueStats, SubscriptionStats};

    const MANIFESTS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
  publishRateLimit: {messagesPerSecond: 50}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
  rateLimit: {messagesPerSecond: 10, burst: 5}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: shop-a, labels: {app: shop}}
spec: {peerAddress: "127.0.0.1:9001", grpcAddress: "127.0.0.1:9101", httpAddress: "127.0.0.1:9201"}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: shop-b, labels: {app: shop}}
spec: {peerAddress: "127.0.0.1:9002", grpcAddress: "127.0.0.1:9102", httpAddress: "127.0.0.1:9202"}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: billing-1, labels: {app: billing}}
spec: {peerAddress: "127.0.0.1:9003", grpcAddress: "127.0.0.1:9103", httpAddress: "127.0.0.1:9203"}
"#;

    fn age(seconds: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos: 0 })
    }

    fn owner(backlog: u64, oldest: i64) -> Stats {
        Stats {
            at: None,
            queues: vec![QueueStats {
                queue: "orders".into(),
                backlog_messages: backlog,
                oldest_age: age(oldest),
                half_messages: backlog + 1,
                ..Default::default()
            }],
            subscriptions: vec![SubscriptionStats {
                subscription: "billing".into(),
                queue: "orders".into(),
                backlog,
                scheduled: backlog / 2,
                oldest_age: age(oldest),
                ..Default::default()
            }],
            transactions: vec![TransactionEvent {
                transaction: format!("tx-{oldest}"),
                at: Some(prost_types::Timestamp {
                    seconds: oldest,
                    nanos: 0,
                }),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn the_oldest_message_rate_limits_and_what_each_sidecar_holds_are_rolled_up() {
        let mesh = MeshFile::parse(MANIFESTS).unwrap().to_state();
        let (a, b) = (owner(3, 5), owner(4, 12));
        let consumer = Stats {
            at: None,
            queues: Vec::new(),
            subscriptions: vec![SubscriptionStats {
                subscription: "billing".into(),
                queue: "orders".into(),
                in_flight: 2,
                consumers: 1,
                ..Default::default()
            }],
            transactions: Vec::new(),
        };
        let stats = BTreeMap::from([
            (SidecarKey::new("default", "shop-a"), &a),
            (SidecarKey::new("default", "shop-b"), &b),
            (SidecarKey::new("default", "billing-1"), &consumer),
        ]);
        let status = summarize(&mesh, &stats, |_| true, "default");
        let orders = &status.queues[0];
        assert_eq!((orders.backlog, orders.oldest_age), (7, age(12)));
        assert_eq!(
            orders.half_messages,
            4 + 5,
            "half messages, over the owners"
        );
        let events: Vec<(&str, &str)> = status
            .transactions
            .iter()
            .map(|t| (t.transaction.as_str(), t.sidecar.as_str()))
            .collect();
        assert_eq!(
            events,
            [("tx-12", "shop-b"), ("tx-5", "shop-a")],
            "newest first, named by their sidecar"
        );
        let limit = orders.publish_rate_limit.unwrap();
        assert_eq!((limit.messages_per_second, limit.burst), (50.0, 50));
        let billing = &status.subscriptions[0];
        assert_eq!((billing.backlog, billing.oldest_age), (7, age(12)));
        assert_eq!(
            billing.scheduled,
            1 + 2,
            "delayed messages not due, over the owners"
        );
        let limit = billing.rate_limit.unwrap();
        assert_eq!((limit.messages_per_second, limit.burst), (10.0, 5));
        let sidecar = |name: &str| status.sidecars.iter().find(|s| s.name == name).unwrap();
        assert_eq!(sidecar("shop-b").owns, [("orders".to_owned(), 4)].into());
        assert!(sidecar("shop-b").consumes.is_empty());
        assert_eq!(
            sidecar("billing-1").consumes,
            [("billing".to_owned(), 2)].into()
        );
        // Nothing owed anywhere: no age.
        let idle = owner(0, 0);
        let mut none = idle.clone();
        none.queues[0].oldest_age = None;
        none.subscriptions[0].oldest_age = None;
        let stats = BTreeMap::from([(SidecarKey::new("default", "shop-a"), &none)]);
        let status = summarize(&mesh, &stats, |_| true, "default");
        assert_eq!(status.queues[0].oldest_age, None);
    }
}
