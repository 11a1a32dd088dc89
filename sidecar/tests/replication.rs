//! `publishAck: Replicated` with real `qmesh-sidecar` processes on loopback: a publish is answered
//! only once a second sidecar holds a copy, so `kill -9` of the owner loses nothing (the replica
//! adopts); without a reachable replica a publish fails with UNAVAILABLE / 503 in bounded time.
//! Every message is counted and duplicates are reported.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use qmesh_proto::v1::PublishRequest;
use qmesh_tests::http;

const ORDERS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
  publishAck: Replicated
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
"#;

fn messages(n: usize, prefix: &str) -> Vec<qmesh_proto::v1::Message> {
    (0..n)
        .map(|i| message(&format!("{prefix}-{i}"), "", &format!("order {i}")))
        .collect()
}

/// The value of one Prometheus sample (`name{labels}`) on a sidecar's admin port, 0 if absent.
async fn metric(admin: std::net::SocketAddr, sample: &str) -> f64 {
    let text = http::request("GET", admin, "/metrics", &[], b"")
        .await
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_owner_loses_no_replicated_publish_the_replica_adopts_them() {
    let mut mesh = mesh()
        .manifests(ORDERS)
        .arg("--replica-adopt-after=2s")
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // Nobody consumes yet: shop-1 owns every order when it dies.
    let n = 200;
    let results = publish_all(
        &mesh.sidecar("shop-1").grpc_url(),
        "orders",
        messages(n, "r"),
    )
    .await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        refused.is_empty(),
        "every publish acknowledged: {refused:?}"
    );
    let owner_admin = mesh.sidecar("shop-1").admin;
    assert_eq!(
        metric(owner_admin, "qmesh_replicated_total{queue=\"orders\"}").await,
        n as f64,
        "each acknowledged publish was confirmed by a replica"
    );
    // billing may not own `orders`, so only shop-2 can hold the copies.
    let replica_admin = mesh.sidecar("shop-2").admin;
    assert!(metric(replica_admin, "qmesh_replica_bytes").await > 0.0);

    mesh.sidecar_mut("shop-1").kill9();
    let killed = Instant::now();

    let billing = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;
    until("every replicated order delivered after kill -9", 40, || {
        tally(billing.ids()).0.len() >= n
    })
    .await;
    let (ids, dups) = tally(billing.ids());
    let adopted = metric(
        replica_admin,
        "qmesh_replica_adopted_total{queue=\"orders\"}",
    )
    .await;
    println!(
        "shop-1 killed with {n} acknowledged publishes owned; billing got {} distinct ({dups} \
         duplicates) {:.1} s later; shop-2 adopted {adopted}",
        ids.len(),
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(ids.len(), n, "nothing lost");
    assert_eq!(adopted, n as f64, "the replica adopted every copy");
    for i in 0..n {
        assert!(ids.contains(&format!("r-{i}")), "r-{i} missing");
    }
    // Settled at the new owner, and the standby copies are gone.
    let admin = replica_admin;
    qmesh_tests::wait_for(
        "copies dropped and backlog settled at shop-2",
        Duration::from_secs(20),
        || async move {
            let bytes = metric(admin, "qmesh_replica_bytes").await;
            let stats = http::request("GET", admin, "/v1/stats", &[], b"")
                .await
                .ok()?
                .json()
                .ok()?;
            let backlog: u64 = stats["queues"]
                .as_array()?
                .iter()
                .filter_map(|q| q["backlog"].as_u64())
                .sum();
            (bytes == 0.0 && backlog == 0).then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_messages_are_dropped_by_the_replica() {
    let mesh = mesh()
        .manifests(ORDERS)
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let billing = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;
    let n = 300;
    let results = publish_all(
        &mesh.sidecar("shop-1").grpc_url(),
        "orders",
        messages(n, "s"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        metric(
            mesh.sidecar("shop-1").admin,
            "qmesh_replicated_total{queue=\"orders\"}"
        )
        .await,
        n as f64
    );
    until("every order delivered", 30, || billing.count() >= n).await;
    let (ids, dups) = tally(billing.ids());
    assert_eq!((ids.len(), dups), (n, 0));
    let admin = mesh.sidecar("shop-2").admin;
    qmesh_tests::wait_for(
        "the replica to drop every settled copy",
        Duration::from_secs(10),
        || async move { (metric(admin, "qmesh_replica_bytes").await == 0.0).then_some(()) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reachable_replica_a_replicated_publish_fails_with_unavailable_in_time() {
    let mut mesh = mesh()
        .manifests(ORDERS)
        .arg("--replica-timeout=1s")
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // The only possible replica is gone (and the mesh file still lists it).
    mesh.sidecar_mut("shop-2").kill9();
    let mut client = client(&mesh.sidecar("shop-1").grpc_url()).await;
    let started = Instant::now();
    let status = client
        .publish(PublishRequest {
            queue: "orders".into(),
            message: Some(message("u-1", "", "lonely")),
            correlation: 0,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    println!("gRPC publish refused after {took:?}: {status}");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("no replica available"),
        "{status}"
    );
    assert!(took < Duration::from_secs(4), "bounded wait, took {took:?}");

    let started = Instant::now();
    let response = http::request(
        "POST",
        mesh.sidecar("shop-1").http,
        "/v1/queues/orders/messages",
        &[],
        b"lonely",
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(
        response.status,
        503,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert!(took < Duration::from_secs(4), "bounded wait, took {took:?}");
    // Nothing refused was kept.
    let stats = http::request("GET", mesh.sidecar("shop-1").admin, "/v1/stats", &[], b"")
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(stats["queues"][0]["backlog"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_alone_in_the_mesh_refuses_replicated_publishes_at_once() {
    let mesh = mesh()
        .manifests(ORDERS)
        .sidecar("solo", &[("app", "shop")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let mut client = client(&mesh.sidecar("solo").grpc_url()).await;
    let started = Instant::now();
    let status = client
        .publish(PublishRequest {
            queue: "orders".into(),
            message: Some(message("a-1", "", "alone")),
            correlation: 0,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(
        status.message().contains("no replica available"),
        "{status}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_catches_up_before_the_owner_dies() {
    let mut mesh = mesh()
        .manifests(ORDERS)
        .arg("--replica-adopt-after=2s")
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let owner = mesh.sidecar("shop-1").grpc_url();
    let first = publish_all(&owner, "orders", messages(100, "a")).await;
    assert!(first.iter().all(Result::is_ok));

    // The replica comes back as a new pod would: same name, empty disk.
    let replica = mesh.sidecar_mut("shop-2");
    replica.kill9();
    std::fs::remove_dir_all(replica.data_dir.join("replicas")).unwrap();
    replica.restart().await.unwrap();
    let admin = mesh.sidecar("shop-2").admin;
    qmesh_tests::wait_for(
        "the owner to re-send what it owns to the restarted replica",
        Duration::from_secs(20),
        || async move { (metric(admin, "qmesh_replica_bytes").await > 0.0).then_some(()) },
    )
    .await
    .unwrap();

    let second = publish_all(&owner, "orders", messages(100, "b")).await;
    let refused: Vec<_> = second.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    mesh.sidecar_mut("shop-1").kill9();

    let billing = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;
    until("every order of both rounds delivered", 40, || {
        tally(billing.ids()).0.len() >= 200
    })
    .await;
    let (ids, dups) = tally(billing.ids());
    println!(
        "replica restarted empty between rounds; after kill -9 of the owner billing got {} distinct \
         ({dups} duplicates)",
        ids.len()
    );
    assert_eq!(ids.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_replicate_streams_are_reset_and_lose_nothing() {
    use qmesh_proto::peer::{
        OwnedMessage, PendingSubscription, ReplicaBatch, ReplicateFrame, SidecarId,
        peer_client::PeerClient, replicate_frame::Frame,
    };

    let mut mesh = mesh()
        .manifests(ORDERS)
        .arg("--replica-adopt-after=2s")
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let owner = |name: &str| ReplicateFrame {
        frame: Some(Frame::Owner(SidecarId {
            name: name.into(),
            ..Default::default()
        })),
    };
    let copy = |queue: &str, message: bool| OwnedMessage {
        queue: queue.into(),
        sequence: 7,
        message: message.then(|| message_of("forged")),
        pending: vec![PendingSubscription {
            subscription: "billing".into(),
            attempts: 0,
        }],
    };
    fn message_of(id: &str) -> qmesh_proto::v1::Message {
        message(id, "", "forged")
    }
    let batch = |m: OwnedMessage| ReplicateFrame {
        frame: Some(Frame::Messages(ReplicaBatch { messages: vec![m] })),
    };
    // (who the client certificate says, what it sends, the answer)
    let attacks: Vec<(&str, &str, Vec<ReplicateFrame>, tonic::Code)> = vec![
        (
            "no owner first",
            "shop-1",
            vec![batch(copy("orders", true))],
            tonic::Code::InvalidArgument,
        ),
        (
            "an owner name other than the certificate's",
            "shop-1",
            vec![owner("../../etc")],
            tonic::Code::PermissionDenied,
        ),
        (
            "impersonating the replica itself",
            "shop-1",
            vec![owner("shop-2")],
            tonic::Code::PermissionDenied,
        ),
        (
            "a valid certificate of a sidecar outside the mesh",
            "mallory",
            vec![owner("mallory"), batch(copy("orders", true))],
            tonic::Code::PermissionDenied,
        ),
        (
            "a sidecar of the mesh that may not own the queue",
            "billing",
            vec![owner("billing"), batch(copy("orders", true))],
            tonic::Code::PermissionDenied,
        ),
        (
            "a copy without a message",
            "shop-1",
            vec![owner("shop-1"), batch(copy("orders", false))],
            tonic::Code::InvalidArgument,
        ),
        (
            "a copy of a queue the replica may not own",
            "shop-1",
            vec![owner("shop-1"), batch(copy("secret", true))],
            tonic::Code::FailedPrecondition,
        ),
        (
            "a second owner frame",
            "shop-1",
            vec![owner("shop-1"), owner("shop-1")],
            tonic::Code::InvalidArgument,
        ),
    ];
    for (what, who, frames, expected) in attacks {
        let mut client = PeerClient::new(mesh.peer_channel(who, "shop-2").await.unwrap());
        let code = match client.replicate(tokio_stream::iter(frames)).await {
            Err(status) => status.code(),
            Ok(response) => {
                let mut acks = response.into_inner();
                match acks.message().await {
                    Err(status) => status.code(),
                    Ok(other) => panic!("{what}: accepted: {other:?}"),
                }
            }
        };
        assert_eq!(code, expected, "{what}");
    }

    // The replica still serves the real owner, and nothing it confirmed is lost.
    let n = 50;
    let results = publish_all(
        &mesh.sidecar("shop-1").grpc_url(),
        "orders",
        messages(n, "h"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    mesh.sidecar_mut("shop-1").kill9();
    let billing = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;
    until("every order delivered after the attacks", 40, || {
        tally(billing.ids()).0.len() >= n
    })
    .await;
    let (ids, dups) = tally(billing.ids());
    println!(
        "after the attacks: {} distinct, {dups} duplicates",
        ids.len()
    );
    assert_eq!(ids.len(), n);
    assert!(!ids.contains("forged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_graceful_hand_over_the_replica_drops_its_copies_instead_of_adopting_them() {
    let mut mesh = mesh()
        .manifests(ORDERS)
        .arg("--replica-adopt-after=1s")
        .arg("--shutdown-grace=2s")
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let n = 60;
    let results = publish_all(
        &mesh.sidecar("shop-1").grpc_url(),
        "orders",
        messages(n, "g"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    let replica = mesh.sidecar("shop-2").admin;
    assert!(metric(replica, "qmesh_replica_bytes").await > 0.0);
    mesh.sidecar("shop-1").terminate().unwrap();
    let code = mesh
        .sidecar_mut("shop-1")
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    // shop-2 took the backlog over by hand-over; the copies it held as replica are released.
    qmesh_tests::wait_for(
        "the replica to drop the released copies",
        Duration::from_secs(10),
        || async move { (metric(replica, "qmesh_replica_bytes").await == 0.0).then_some(()) },
    )
    .await
    .unwrap();
    let billing = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;
    until("every handed-over order delivered", 20, || {
        tally(billing.ids()).0.len() >= n
    })
    .await;
    let (ids, dups) = tally(billing.ids());
    let adopted = metric(replica, "qmesh_replica_adopted_total{queue=\"orders\"}").await;
    println!(
        "graceful stop: billing got {} distinct ({dups} duplicates); copies adopted: {adopted}",
        ids.len()
    );
    assert_eq!(ids.len(), n);
    assert_eq!(adopted, 0.0, "released copies are not adopted");
    assert_eq!(dups, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_the_replica_adopts_still_waits_for_its_time() {
    let mut mesh = mesh()
        .manifests(ORDERS)
        .arg("--replica-adopt-after=2s")
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let billing = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;
    let delay = Duration::from_secs(6);
    let sent = Instant::now();
    let mut app = client(&mesh.sidecar("shop-1").grpc_url()).await;
    app.publish(PublishRequest {
        queue: "orders".into(),
        message: Some(message("later", "", "due in 6 s")),
        correlation: 0,
        delay: Some(qmesh_proto::convert::duration(delay)),
        deliver_at: None,
        transaction: String::new(),
    })
    .await
    .unwrap();
    // The owner dies with it scheduled; the replica adopts the copy, time and all.
    mesh.sidecar_mut("shop-1").kill9();
    let replica = mesh.sidecar("shop-2").admin;
    qmesh_tests::wait_for(
        "the replica to adopt the delayed message, as scheduled",
        Duration::from_secs(20),
        || async move {
            let scheduled = sub_figure_owner(replica, "billing", "scheduled").await;
            (scheduled == 1).then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        sent.elapsed() < delay,
        "adopted before its time, so the wait is the new owner's"
    );
    until("the adopted delayed message", 30, || {
        billing.count_prefixed("later") > 0
    })
    .await;
    let at = sent.elapsed();
    println!(
        "a delayed message adopted after kill -9 of its owner arrived {at:?} after its publish (due after {delay:?})"
    );
    assert!(
        at + Duration::from_millis(2) >= delay,
        "delivered {at:?} after its publish, before its time"
    );
    assert_eq!(
        metric(replica, "qmesh_replica_adopted_total{queue=\"orders\"}").await,
        1.0
    );
    assert_eq!(billing.count_prefixed("later"), 1);
}

/// A figure of the owner's own state of a subscription (`/v1/stats` `owner`), 0 when absent.
async fn sub_figure_owner(admin: std::net::SocketAddr, subscription: &str, field: &str) -> u64 {
    let Some(s) = stats(admin).await else {
        return 0;
    };
    s["subscriptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["subscription"] == subscription)
        .filter_map(|x| x["owner"][field].as_u64())
        .sum()
}
