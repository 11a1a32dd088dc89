//! What a peer hands over goes through the queue's message limit like a publish: an 8 KiB message
//! handed to a queue limited to 1 KiB is refused (the answer says so, adopted 0) and never reaches
//! the queue, whoever sent it.

#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use qmesh_proto::peer::{self, peer_client::PeerClient};

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
async fn a_hand_over_cannot_put_in_a_message_over_the_queues_limit() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("owner", &[("app", "producer")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let node = mesh.sidecar("owner");
    let mut peer_client = PeerClient::connect(format!("http://{}", node.peer))
        .await
        .unwrap();
    let mut big = message("big", "", "");
    big.payload = vec![7u8; 8 * 1024].into();
    let mut acks = peer_client
        .hand_over(tokio_stream::iter(vec![peer::HandOverBatch {
            from: None,
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
}
