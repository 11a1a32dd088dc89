//! What a peer hands over or replicates goes through a publish's admission, and only for queues
//! the peer may own: an authenticated sidecar of the mesh that shares one queue with the receiver
//! cannot put messages into another, nor slip in what no app or broker could publish — reserved
//! headers the broker would not have set, a second copy of an id inside the dedup window, more
//! than the queue's retention allows. Each refusal leaves the receiver's backlog as it was.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use qmesh_proto::peer::{self, peer_client::PeerClient};

/// `hub` may own orders, payments and small; `shop-2` only orders and small.
const QUEUES: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
  dedupWindow: 10m
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: payments}
spec:
  publishers: {matchLabels: {team: pay}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: small}
spec:
  publishers: {matchLabels: {app: shop}}
  retention: {maxMessages: 2, overflow: Reject}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: ledger}
spec:
  queue: payments
  consumers: {matchLabels: {app: billing}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: audit}
spec:
  queue: small
  consumers: {matchLabels: {app: billing}}
"#;

fn shop2() -> peer::SidecarId {
    peer::SidecarId {
        namespace: "default".into(),
        name: "shop-2".into(),
        incarnation: 1,
    }
}

fn owned(queue: &str, subscription: &str, message: qmesh_proto::v1::Message) -> peer::OwnedMessage {
    peer::OwnedMessage {
        queue: queue.into(),
        sequence: 1,
        message: Some(message),
        pending: vec![peer::PendingSubscription {
            subscription: subscription.into(),
            attempts: 0,
        }],
    }
}

/// What one hand-over batch of `messages` gets: the stream's error, or the receiver's answer.
async fn hand_over(
    client: &mut PeerClient<tonic::transport::Channel>,
    messages: Vec<peer::OwnedMessage>,
) -> Result<peer::HandOverAck, tonic::Status> {
    let batch = peer::HandOverBatch {
        from: Some(shop2()),
        batch: 1,
        messages,
    };
    let mut acks = client
        .hand_over(tokio_stream::iter(vec![batch]))
        .await?
        .into_inner();
    acks.message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("no answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_hands_over_and_replicates_only_what_it_may_own_and_a_publish_would_admit() {
    let mesh = mesh()
        .manifests(QUEUES)
        .sidecar("hub", &[("app", "shop"), ("team", "pay")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let hub = mesh.sidecar("hub");
    let mut from_shop2 = PeerClient::new(mesh.peer_channel("shop-2", "hub").await.unwrap());

    // 1. shop-2 shares `orders` with hub, but may not own `payments`.
    let refused = hand_over(
        &mut from_shop2,
        vec![owned("payments", "ledger", message("p-1", "", "x"))],
    )
    .await
    .expect_err("a hand-over of a queue the sender may not own must be refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("payments"), "{refused}");
    let copy = peer::ReplicateFrame {
        frame: Some(peer::replicate_frame::Frame::Messages(peer::ReplicaBatch {
            messages: vec![owned("payments", "ledger", message("p-2", "", "x"))],
        })),
    };
    let owner = peer::ReplicateFrame {
        frame: Some(peer::replicate_frame::Frame::Owner(shop2())),
    };
    let mut replicate = PeerClient::new(mesh.peer_channel("shop-2", "hub").await.unwrap())
        .replicate(tokio_stream::iter(vec![owner, copy]))
        .await
        .unwrap()
        .into_inner();
    let refused = replicate
        .message()
        .await
        .expect_err("a copy of a queue the sender may not own must be refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");

    // 2. A queue it may own, with a dead-letter reason no broker set (orders is nobody's
    //    dead-letter queue) or another reserved header: refused, nothing stored.
    let mut forged = message("o-1", "", "x");
    forged
        .headers
        .insert("qmesh-dead-letter-reason".into(), "forged".into());
    let ack = hand_over(&mut from_shop2, vec![owned("orders", "billing", forged)])
        .await
        .unwrap();
    let error = ack
        .error
        .expect("a forged dead-letter header must be refused");
    assert!(
        error.message.contains("qmesh-dead-letter-reason"),
        "{error:?}"
    );
    assert_eq!(ack.adopted, 0);
    let mut forged = message("o-2", "", "x");
    forged
        .headers
        .insert("Qmesh-Replica-Owner-Sequence".into(), "7".into());
    let ack = hand_over(&mut from_shop2, vec![owned("orders", "billing", forged)])
        .await
        .unwrap();
    assert!(ack.error.is_some(), "any other reserved header is refused");

    // 3. An id hub's app already published inside the dedup window is taken but not stored twice.
    let published = publish_all(&hub.grpc_url(), "orders", vec![message("dup-1", "", "x")]).await;
    assert!(published[0].is_ok(), "{published:?}");
    let ack = hand_over(
        &mut from_shop2,
        vec![owned("orders", "billing", message("dup-1", "", "x"))],
    )
    .await
    .unwrap();
    assert!(ack.error.is_none(), "{ack:?}");
    assert_eq!(queue_backlog(hub.admin, "orders").await, 1, "stored once");

    // 4. Retention holds: `small` keeps 2 with overflow Reject, and hub's app filled it.
    let filled = publish_all(
        &hub.grpc_url(),
        "small",
        vec![message("s-1", "", "x"), message("s-2", "", "x")],
    )
    .await;
    assert!(filled.iter().all(Result::is_ok), "{filled:?}");
    let ack = hand_over(
        &mut from_shop2,
        vec![owned("small", "audit", message("s-3", "", "x"))],
    )
    .await
    .unwrap();
    let error = ack.error.expect("a full queue takes nothing over");
    assert_eq!(
        error.code(),
        qmesh_proto::v1::ErrorCode::BacklogFull,
        "{error:?}"
    );
    assert_eq!(ack.adopted, 0);

    // Nothing got in beyond what hub's app published; a legitimate hand-over still works.
    assert_eq!(queue_backlog(hub.admin, "payments").await, 0);
    assert_eq!(queue_backlog(hub.admin, "small").await, 2);
    let ack = hand_over(
        &mut from_shop2,
        vec![owned("orders", "billing", message("o-3", "", "x"))],
    )
    .await
    .unwrap();
    assert_eq!((ack.error, ack.adopted), (None, 1));
    assert_eq!(queue_backlog(hub.admin, "orders").await, 2);
}
