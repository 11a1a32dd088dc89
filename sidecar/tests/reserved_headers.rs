//! Headers starting with `qmesh-` are the broker's: dead-letter routing writes them and redrive
//! trusts them (`qmesh-original-queue` says where a dead letter goes back to). An app that sets one
//! on a publish, over gRPC or HTTP, in any case, is refused with a message naming the header, and
//! nothing is stored; other headers pass.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use qmesh_proto::v1;
use qmesh_tests::http;

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: jobs
  consumers: {matchLabels: {app: worker}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_cannot_set_the_brokers_headers() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("node", &[("app", "producer")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let node = mesh.sidecar("node");
    let mut app = client(&node.grpc_url()).await;

    for name in [
        "qmesh-original-queue",
        "qmesh-dead-letter-reason",
        "QMESH-Redriven-From",
    ] {
        let mut forged = message(&format!("forged-{name}"), "", "m");
        forged.headers.insert(name.to_owned(), "jobs".to_owned());
        let refused = app
            .publish(v1::PublishRequest {
                queue: "jobs".into(),
                message: Some(forged),
                correlation: 0,
                delay: None,
                deliver_at: None,
                transaction: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        assert!(
            refused.message().contains(name) && refused.message().contains("reserved"),
            "{refused}"
        );
    }
    // Over HTTP an app header is `qmesh-h-<name>`.
    let answer = http::request(
        "POST",
        node.http,
        "/v1/queues/jobs/messages",
        &[("qmesh-h-qmesh-original-queue", "jobs")],
        b"m",
    )
    .await
    .unwrap();
    let body = String::from_utf8_lossy(&answer.body);
    assert_eq!(answer.status, 400, "{body}");
    assert!(body.contains("qmesh-original-queue"), "{body}");
    assert_eq!(queue_backlog(node.admin, "jobs").await, 0, "nothing stored");

    // Any other header passes.
    let mut fine = message("fine", "", "m");
    fine.headers
        .insert("x-qmesh-like".to_owned(), "ok".to_owned());
    let results = publish_all(&node.grpc_url(), "jobs", vec![fine]).await;
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(queue_backlog(node.admin, "jobs").await, 1);
}
