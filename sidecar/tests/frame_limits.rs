//! Frame caps per API follow the queues' `maxMessageBytes`: a client announcing a message larger
//! than any queue here takes is refused from the message's length prefix (`RESOURCE_EXHAUSTED`,
//! naming the limit) on the app API and on the peer port, while large messages still flow through
//! a large window (an owner cuts what it forwards into frames a consumer takes).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use qmesh_proto::{
    peer::{self, peer_client::PeerClient},
    v1::PublishRequest,
};

const QUEUES: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: small}
spec:
  publishers: {matchLabels: {app: shop}}
  maxMessageBytes: 1Ki
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: audit}
spec:
  queue: small
  consumers: {matchLabels: {app: billing}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: big}
spec:
  publishers: {matchLabels: {app: uploads}}
  maxMessageBytes: 1Mi
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: scans}
spec:
  queue: big
  consumers: {matchLabels: {app: billing}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_what_the_queues_take_are_refused_from_their_length_prefix() {
    let mesh = mesh()
        .manifests(QUEUES)
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let shop = mesh.sidecar("shop-1");

    // App API: 5 MiB for a pod that may publish only to a 1 KiB queue.
    let refused = client(&shop.grpc_url())
        .await
        .publish(PublishRequest {
            queue: "small".into(),
            message: Some(message("huge", "", &"x".repeat(5 << 20))),
            correlation: 0,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(refused.message().contains("limit"), "{refused}");
    // Within the frame limit but over the queue's: the queue's own refusal, as before.
    let refused = client(&shop.grpc_url())
        .await
        .publish(PublishRequest {
            queue: "small".into(),
            message: Some(message("big", "", &"x".repeat(2048))),
            correlation: 0,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("maxMessageBytes"), "{refused}");
    // HTTP: the body is read no further than the queue takes (a small one here: refusing a large
    // one mid-body closes the connection under a client still writing, as any server does).
    let http = qmesh_tests::http::request(
        "POST",
        shop.http,
        "/v1/queues/small/messages",
        &[],
        "x".repeat(2048).as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(http.status, 413, "{}", String::from_utf8_lossy(&http.body));
    assert!(
        String::from_utf8_lossy(&http.body).contains("maxMessageBytes"),
        "{}",
        String::from_utf8_lossy(&http.body)
    );

    // Peer port: a real peer handing over 6 MiB of 1 KiB messages in one frame.
    let batch = peer::HandOverBatch {
        from: Some(peer::SidecarId {
            namespace: "default".into(),
            name: "shop-2".into(),
            incarnation: 1,
        }),
        batch: 1,
        messages: (0..6 * 1024)
            .map(|i| peer::OwnedMessage {
                queue: "small".into(),
                sequence: i + 1,
                message: Some(message(&format!("h-{i}"), "", &"x".repeat(1000))),
                pending: vec![peer::PendingSubscription {
                    subscription: "audit".into(),
                    attempts: 0,
                }],
            })
            .collect(),
    };
    let mut from_shop2 = PeerClient::new(mesh.peer_channel("shop-2", "shop-1").await.unwrap())
        .max_encoding_message_size(usize::MAX);
    let answer = match from_shop2.hand_over(tokio_stream::iter(vec![batch])).await {
        Err(status) => Err(status),
        Ok(response) => response.into_inner().message().await,
    };
    let refused = answer.expect_err("a 6 MiB hand-over frame for a 1 KiB queue must be refused");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert_eq!(
        queue_backlog(shop.admin, "small").await,
        0,
        "nothing adopted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_near_the_limit_flow_through_a_large_window() {
    let mesh = mesh()
        .manifests(QUEUES)
        .sidecar("uploads", &[("app", "uploads")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // Twelve messages of almost 1 MiB published before a consumer with a window of 64 arrives:
    // together three times the consumer's peer frame limit.
    let payload = "x".repeat(1000 * 1024);
    let messages: Vec<_> = (0..12)
        .map(|i| message(&format!("scan-{i}"), "", &payload))
        .collect();
    let published = publish_all(&mesh.sidecar("uploads").grpc_url(), "big", messages).await;
    assert!(published.iter().all(Result::is_ok), "{published:?}");
    let consumer = Consumer::start(
        "c",
        &mesh.sidecar("billing").grpc_url(),
        "scans",
        64,
        |_| Verdict::Ack,
    )
    .await;
    until("all twelve large messages delivered", 60, || {
        consumer.count() >= 12
    })
    .await;
    let (ids, dups) = tally(consumer.ids());
    assert_eq!((ids.len(), dups), (12, 0));
}
