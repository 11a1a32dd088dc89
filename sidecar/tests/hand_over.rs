//! Graceful hand-over under the conditions that broke it: messages too big for a count-bounded
//! batch, a backlog of queues no single peer may own, and two pods terminating at once.

#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use qmesh_proto::v1;

async fn terminate_all(mesh: &mut qmesh_tests::Mesh, names: &[&str]) {
    for name in names {
        mesh.sidecar(name).terminate().unwrap();
    }
    for name in names {
        let code = mesh
            .sidecar_mut(name)
            .wait_exit(Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(code, Some(0), "{name} exits cleanly after SIGTERM");
    }
}

const BIG: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: images}
spec:
  publishers: {matchLabels: {app: producer}}
  maxMessageBytes: 1Mi
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: thumbnails}
spec:
  queue: images
  consumers: {matchLabels: {app: worker}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_big_messages_is_handed_over_whole() {
    let mut mesh = mesh()
        .manifests(BIG)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("standby", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--fsync")
        .arg("interval:5ms")
        .arg("--shutdown-grace")
        .arg("10s")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("producer").grpc_url();
    // 100 × 700 KiB: more than one 64 MiB frame, in batches of 200 messages or fewer.
    for chunk in 0..10 {
        let messages: Vec<v1::Message> = (0..10)
            .map(|i| {
                let mut m = message(&format!("img-{chunk}-{i}"), "", "");
                m.payload = vec![b'x'; 700 * 1024].into();
                m
            })
            .collect();
        let results = publish_all(&url, "images", messages).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    terminate_all(&mut mesh, &["producer"]).await;
    assert_eq!(
        queue_backlog(mesh.sidecar("standby").admin, "images").await,
        100,
        "every message owned by the standby"
    );
    let worker = Consumer::start(
        "w",
        &mesh.sidecar("worker").grpc_url(),
        "thumbnails",
        0,
        |_| Verdict::Ack,
    )
    .await;
    until("all 100 delivered from the new owner", 30, || {
        worker.count() >= 100
    })
    .await;
    let (distinct, _) = tally(worker.ids());
    assert_eq!(distinct.len(), 100);
}

const SPLIT: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: left}
spec:
  publishers: {matchLabels: {left: "yes"}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: right}
spec:
  publishers: {matchLabels: {right: "yes"}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: left-sub}
spec:
  queue: left
  consumers: {matchLabels: {app: worker}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: right-sub}
spec:
  queue: right
  consumers: {matchLabels: {app: worker}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_no_single_peer_may_own_go_to_different_peers_without_duplicates() {
    let mut mesh = mesh()
        .manifests(SPLIT)
        .sidecar("producer", &[("left", "yes"), ("right", "yes")])
        .sidecar("left-peer", &[("left", "yes")])
        .sidecar("right-peer", &[("right", "yes")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--shutdown-grace")
        .arg("4s")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // The producer may publish to both; each peer may own only one of them.
    let url = mesh.sidecar("producer").grpc_url();
    for i in 0..5 {
        for queue in ["left", "right"] {
            let r = publish_all(&url, queue, vec![message(&format!("{queue}-{i}"), "", "m")]).await;
            assert!(r[0].is_ok(), "{queue}: {r:?}");
        }
    }
    terminate_all(&mut mesh, &["producer"]).await;
    let left = queue_backlog(mesh.sidecar("left-peer").admin, "left").await;
    let right = queue_backlog(mesh.sidecar("right-peer").admin, "right").await;
    assert_eq!(
        (left, right),
        (5, 5),
        "each queue whole, once, at a peer that may own it"
    );
}

const PAIR: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec:
  publishers: {matchLabels: {app: producer}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: jobs
  consumers: {matchLabels: {app: worker}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_terminating_together_hand_everything_to_the_one_that_stays() {
    let mut mesh = mesh()
        .manifests(PAIR)
        .sidecar("producer-1", &[("app", "producer")])
        .sidecar("producer-2", &[("app", "producer")])
        .sidecar("standby", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--shutdown-grace")
        .arg("8s")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    for p in ["producer-1", "producer-2"] {
        let messages = (0..20)
            .map(|i| message(&format!("{p}-{i}"), "", "m"))
            .collect();
        let results = publish_all(&mesh.sidecar(p).grpc_url(), "jobs", messages).await;
        assert!(results.iter().all(Result::is_ok));
    }
    terminate_all(&mut mesh, &["producer-1", "producer-2"]).await;
    assert_eq!(
        queue_backlog(mesh.sidecar("standby").admin, "jobs").await,
        40,
        "the staying pod owns all of both backlogs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_takes_only_what_fits_its_bound_and_the_rest_goes_elsewhere_once() {
    let mut mesh = mesh()
        .manifests(PAIR)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("small", &[("app", "producer")])
        .sidecar("large", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--shutdown-grace")
        .arg("4s")
        .arg_for("small", "--max-owned-messages")
        .arg_for("small", "5")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let messages = (0..20)
        .map(|i| message(&format!("m-{i}"), "", "m"))
        .collect();
    let results = publish_all(&mesh.sidecar("producer").grpc_url(), "jobs", messages).await;
    assert!(results.iter().all(Result::is_ok));
    terminate_all(&mut mesh, &["producer"]).await;
    let small = queue_backlog(mesh.sidecar("small").admin, "jobs").await;
    let large = queue_backlog(mesh.sidecar("large").admin, "jobs").await;
    assert!(small <= 5, "the small peer took {small}, over its bound");
    assert_eq!(
        small + large,
        20,
        "every message owned exactly once: {small} + {large}"
    );
}

const ORDERED: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: ledger}
spec:
  publishers: {matchLabels: {app: producer}}
  ordering: Key
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: books}
spec:
  queue: ledger
  consumers: {matchLabels: {app: worker}}
"#;

/// A hand-over in several batches while the key is being consumed: the old owner sends nothing new
/// once it hands over, so no message of the key is first delivered before an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_holds_through_a_hand_over_in_several_batches() {
    let mut mesh = mesh()
        .manifests(ORDERED)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("standby", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--shutdown-grace")
        .arg("3s")
        .arg("--fsync")
        .arg("interval:5ms")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let n = 700;
    let messages = (0..n)
        .map(|i| message(&format!("{i:05}"), "account-1", "entry"))
        .collect();
    let results = publish_all(&mesh.sidecar("producer").grpc_url(), "ledger", messages).await;
    assert!(results.iter().all(Result::is_ok));
    // A consumer that takes a few milliseconds per entry: the hand-over starts mid-stream.
    let books = Consumer::start("b", &mesh.sidecar("worker").grpc_url(), "books", 0, |_| {
        std::thread::sleep(Duration::from_millis(4));
        Verdict::Ack
    })
    .await;
    until("some entries consumed", 10, || books.count() >= 20).await;
    terminate_all(&mut mesh, &["producer"]).await;
    until("every entry consumed", 60, || {
        tally(books.ids()).0.len() >= n
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<String> = books
        .ids()
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    let mut sorted = firsts.clone();
    sorted.sort();
    let out_of_order = firsts.windows(2).find(|w| w[0] > w[1]);
    assert!(
        firsts == sorted,
        "first deliveries out of order at {out_of_order:?}"
    );
}
