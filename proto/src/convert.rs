//! From the control plane's computed views (`qmesh_core::MeshView`) to the wire
//! (`qmesh.control.v1.MeshView`). One direction only: the operator and `qmesh dev` send what this
//! produces, and a sidecar run from a mesh file uses the same function, so both paths give a sidecar
//! byte-for-byte the same view.

use qmesh_api as api;
use qmesh_core as core;

use crate::control;

/// A protobuf duration from a standard one.
pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The longest duration taken from the wire: anything longer is cut to it, so no deadline computed
/// from a peer's or an app's number can overflow a clock.
pub const MAX_WIRE_DURATION: std::time::Duration =
    std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// A standard duration from a protobuf one (negative values become zero, longer than
/// [`MAX_WIRE_DURATION`] become that).
pub fn std_duration(d: &prost_types::Duration) -> std::time::Duration {
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    std::time::Duration::new(secs, nanos.min(999_999_999)).min(MAX_WIRE_DURATION)
}

/// The wire form of a view, stamped with `version`.
pub fn mesh_view(
    view: &core::MeshView,
    version: u64,
    computed_at: std::time::SystemTime,
) -> control::MeshView {
    control::MeshView {
        version,
        namespace: view.namespace.clone(),
        queues: view.queues.iter().map(queue_view).collect(),
        subscriptions: view.subscriptions.iter().map(served_subscription).collect(),
        peers: view.peers.iter().map(peer).collect(),
        computed_at: Some(computed_at.into()),
        other_queues: view.other_queues.clone(),
    }
}

fn peer(p: &core::PeerEndpoint) -> control::PeerEndpoint {
    control::PeerEndpoint {
        name: p.name.clone(),
        peer_address: p.peer_address.clone(),
    }
}

fn rate_limit(limit: &api::RateLimit) -> control::RateLimit {
    control::RateLimit {
        messages_per_second: limit.messages_per_second,
        burst: limit.burst_or_default(),
    }
}

fn queue_view(q: &core::QueueView) -> control::QueueView {
    control::QueueView {
        name: q.name.clone(),
        app_may_publish: q.app_may_publish,
        policy: Some(queue_policy(&q.spec)),
        routes: q.routes.iter().map(route).collect(),
        owners: q.owners.clone(),
        dead_letter_of: q.dead_letter_of.clone(),
    }
}

/// The wire form of a Queue's policies (sizes resolved to bytes; validated specs only).
pub fn queue_policy(spec: &api::QueueSpec) -> control::QueuePolicy {
    let retention = &spec.retention;
    control::QueuePolicy {
        durability: match spec.durability {
            api::Durability::Disk => control::Durability::Disk,
            api::Durability::Memory => control::Durability::Memory,
        } as i32,
        publish_ack: match spec.publish_ack {
            api::PublishAck::Local => control::PublishAck::Local,
            api::PublishAck::Replicated => control::PublishAck::Replicated,
        } as i32,
        retention: Some(control::Retention {
            max_messages: retention.max_messages.unwrap_or(0),
            max_bytes: retention
                .max_bytes
                .as_ref()
                .and_then(|b| b.bytes().ok())
                .unwrap_or(0),
            max_age: retention.max_age.map(|d| duration(d.get())),
            keep_acked: retention.keep_acked.map(|d| duration(d.get())),
            overflow: match retention.overflow {
                api::Overflow::Reject => control::Overflow::Reject,
                api::Overflow::DropOldest => control::Overflow::DropOldest,
                api::Overflow::DeadLetter => control::Overflow::DeadLetter,
            } as i32,
        }),
        max_message_bytes: spec.max_message_bytes.bytes().unwrap_or(1024 * 1024),
        ordering: match spec.ordering {
            api::Ordering::None => control::Ordering::None,
            api::Ordering::Key => control::Ordering::Key,
        } as i32,
        dedup_window: spec.dedup_window.map(|d| duration(d.get())),
        dead_letter_queue: spec.dead_letter_queue.clone().unwrap_or_default(),
        publish_rate_limit: spec.publish_rate_limit.as_ref().map(rate_limit),
        max_delay: Some(duration(spec.effective_max_delay())),
        transaction: Some(transaction_policy(
            &spec.transaction.clone().unwrap_or_default(),
        )),
    }
}

/// A Queue's `transaction` settings with the defaults applied.
pub fn transaction_policy(t: &api::Transaction) -> control::TransactionPolicy {
    control::TransactionPolicy {
        check_after: Some(duration(t.effective_check_after())),
        max_checks: t.effective_max_checks(),
        commit_on_unknown: t.on_unknown == api::OnUnknown::Commit,
        check_port: t.check_port.map_or(0, u32::from),
        check_path: t.effective_check_path().to_owned(),
    }
}

fn route(r: &core::Route) -> control::Route {
    control::Route {
        subscription: r.subscription.clone(),
        filter: r
            .filter
            .as_ref()
            .map(|f| f.headers.clone().into_iter().collect())
            .unwrap_or_default(),
        consumers: r.consumers.iter().map(peer).collect(),
        retry: Some(control::RetryPolicy {
            max_deliveries: r.retry.max_deliveries,
            initial_backoff: Some(duration(r.retry.backoff.initial.get())),
            max_backoff: Some(duration(r.retry.backoff.max.get())),
            multiplier: r.retry.backoff.multiplier,
        }),
        ack_timeout: Some(duration(r.delivery.ack_timeout.get())),
        dead_letter_queue: r.dead_letter_queue.clone().unwrap_or_default(),
        start_at: match r.start_at {
            api::StartAt::Latest => None,
            api::StartAt::Earliest => Some(control::StartAt {
                from: Some(control::start_at::From::Earliest(true)),
            }),
            api::StartAt::Time(t) => Some(control::StartAt {
                from: Some(control::start_at::From::Time(t.into())),
            }),
        },
    }
}

fn served_subscription(s: &core::ServedSubscription) -> control::ServedSubscription {
    let push = s.delivery.push.as_ref();
    control::ServedSubscription {
        name: s.name.clone(),
        queue: s.queue.clone(),
        mode: match s.delivery.mode {
            api::DeliveryMode::Pull => control::DeliveryMode::Pull,
            api::DeliveryMode::Push => control::DeliveryMode::Push,
        } as i32,
        push_port: push.map(|p| u32::from(p.port)).unwrap_or(0),
        push_path: push.map(|p| p.path.clone()).unwrap_or_default(),
        max_in_flight: s.delivery.max_in_flight,
        ack_timeout: Some(duration(s.delivery.ack_timeout.get())),
        rate_share: s.rate_share.as_ref().map(rate_limit),
        owners: s.owners.iter().map(peer).collect(),
        max_message_bytes: s.max_message_bytes.bytes().unwrap_or(1024 * 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  retention: {maxBytes: 64Mi, maxAge: 1h, overflow: DropOldest}
  maxMessageBytes: 256Ki
  ordering: Key
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: shipping}
spec:
  queue: orders
  consumers: {matchLabels: {app: shipping}}
  delivery: {mode: Push, push: {port: 8080, path: /in}, maxInFlight: 7}
  rateLimit: {messagesPerSecond: 10}
  filter: {headers: {kind: parcel}}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: a, labels: {app: shipping}}
spec: {peerAddress: "127.0.0.1:1", grpcAddress: "127.0.0.1:2", httpAddress: "127.0.0.1:3"}
"#;

    #[test]
    fn views_reach_the_wire_with_sizes_and_durations_resolved() {
        let state = qmesh_core::MeshFile::parse(MESH).unwrap().to_state();
        let view = state
            .view_for(&qmesh_core::SidecarKey::new("default", "a"))
            .unwrap();
        let wire = mesh_view(&view, 7, std::time::SystemTime::UNIX_EPOCH);
        assert_eq!(wire.version, 7);
        let policy = wire.queues[0].policy.as_ref().unwrap();
        assert_eq!(policy.max_message_bytes, 256 * 1024);
        let retention = policy.retention.as_ref().unwrap();
        assert_eq!(retention.max_bytes, 64 * 1024 * 1024);
        assert_eq!(retention.max_age.unwrap().seconds, 3600);
        assert_eq!(retention.overflow(), control::Overflow::DropOldest);
        assert_eq!(policy.ordering(), control::Ordering::Key);
        let route = &wire.queues[0].routes[0];
        assert_eq!(route.filter.get("kind").map(String::as_str), Some("parcel"));
        assert_eq!(route.retry.unwrap().max_deliveries, 5);
        let served = &wire.subscriptions[0];
        assert_eq!(served.mode(), control::DeliveryMode::Push);
        assert_eq!((served.push_port, served.push_path.as_str()), (8080, "/in"));
        assert_eq!(served.max_in_flight, 7);
        assert_eq!(served.rate_share.unwrap().burst, 10);
    }

    #[test]
    fn durations_round_trip() {
        let d = std::time::Duration::from_millis(1_500);
        assert_eq!(std_duration(&duration(d)), d);
        assert_eq!(
            std_duration(&prost_types::Duration {
                seconds: -5,
                nanos: 0
            }),
            std::time::Duration::ZERO
        );
        assert_eq!(
            std_duration(&prost_types::Duration {
                seconds: i64::MAX,
                nanos: i32::MAX
            }),
            MAX_WIRE_DURATION
        );
    }
}
