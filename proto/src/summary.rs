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

use crate::control::{MeshStatus, QueueStatus, SidecarStatus, Stats, SubscriptionStatus};

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
                row.in_flight += stats.in_flight;
                row.ack_rate += stats.ack_rate;
                row.acked_total += stats.acked_total;
                row.dead_lettered_total += stats.dead_lettered_total;
            }
        }
        status.subscriptions.push(row);
    }
    for (key, info) in mesh.sidecars().filter(|(k, _)| wanted(&k.namespace)) {
        status.sidecars.push(SidecarStatus {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            peer_address: info.peer_address.clone(),
            labels: info.labels.clone().into_iter().collect(),
            connected: connected(key),
        });
    }
    status
}

fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}
