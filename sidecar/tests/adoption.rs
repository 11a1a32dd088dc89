//! What a peer hands over or copies to a replica goes through the queue's message limit like a
//! publish: an 8 KiB message handed to a queue limited to 1 KiB is refused (the answer says so,
//! adopted 0) and never reaches the queue; an 8 KiB replica copy resets the stream with the reason.

#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use qmesh_proto::peer::{self, ReplicateFrame, peer_client::PeerClient, replicate_frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: small}
spec:
  maxMessageBytes: 1Ki
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: small
  consumers: {matchLabels: {app: worker}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_a_hand_over_nor_a_replica_copy_may_exceed_the_queues_limit() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("owner", &[("app", "producer")])
        .sidecar("peer", &[("app", "producer")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let node = mesh.sidecar("owner");
    // A real peer of the queue (a publisher too), with its own certificate.
    let mut peer_client = PeerClient::new(mesh.peer_channel("peer", "owner").await.unwrap());
    let peer_id = peer::SidecarId {
        namespace: "default".into(),
        name: "peer".into(),
        incarnation: 1,
    };
    let mut big = message("big", "", "");
    big.payload = vec![7u8; 8 * 1024].into();
    let mut acks = peer_client
        .hand_over(tokio_stream::iter(vec![peer::HandOverBatch {
            from: Some(peer_id.clone()),
            batch: 1,
            messages: vec![peer::OwnedMessage {
                queue: "small".into(),
                sequence: 1,
                message: Some(big),
                pending: vec![peer::PendingSubscription {
                    subscription: "work".into(),
                    attempts: 0,
                }],
            }],
        }]))
        .await
        .unwrap()
        .into_inner();
    let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ack.adopted, 0);
    let error = ack.error.expect("the refusal says why");
    assert!(error.message.contains("maxMessageBytes"), "{error:?}");
    assert_eq!(
        queue_backlog(node.admin, "small").await,
        0,
        "nothing taken in"
    );

    // The same message as a replica's copy.
    let (tx, rx) = mpsc::channel(4);
    tx.send(ReplicateFrame {
        frame: Some(replicate_frame::Frame::Owner(peer_id)),
    })
    .await
    .unwrap();
    let mut big = message("big-copy", "", "");
    big.payload = vec![7u8; 8 * 1024].into();
    tx.send(ReplicateFrame {
        frame: Some(replicate_frame::Frame::Messages(peer::ReplicaBatch {
            messages: vec![peer::OwnedMessage {
                queue: "small".into(),
                sequence: 1,
                message: Some(big),
                pending: vec![peer::PendingSubscription {
                    subscription: "work".into(),
                    attempts: 0,
                }],
            }],
        })),
    })
    .await
    .unwrap();
    let mut acks = peer_client
        .replicate(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let refused = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("maxMessageBytes"), "{refused}");
    drop(tx);
}
