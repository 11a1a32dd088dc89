//! Replay from the log across two owners: acked messages kept by `retention.keepAcked`, a new
//! Subscription starting at `Earliest` or a time, and `Rewind` (gRPC and HTTP) of an existing one
//! — through a `kill -9` of an owner — every message counted by id.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::HashSet,
    path::Path,
    time::{Duration, SystemTime},
};

use common::*;
use qmesh_proto::v1;

const MESH: &str = "\
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  ordering: None
  publishers: {matchLabels: {app: shop}}
  retention: {keepAcked: 1h}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
";

/// Two shop sidecars (two owners of `orders`), a billing consumer and an auditor no subscription
/// selects yet.
async fn two_owners() -> qmesh_tests::Mesh {
    mesh()
        .manifests(MESH)
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .sidecar("auditor", &[("app", "auditor")])
        .arg("--fsync=never")
        .start(Path::new(SIDECAR))
        .await
        .unwrap()
}

/// Publishes `n` messages `<prefix>-<shop>-<i>` through each shop.
async fn publish_batch(mesh: &qmesh_tests::Mesh, prefix: &str, n: usize) -> HashSet<String> {
    let mut ids = HashSet::new();
    for shop in ["shop-1", "shop-2"] {
        let batch: Vec<v1::Message> = (0..n)
            .map(|i| message(&format!("{prefix}-{shop}-{i}"), "", "order"))
            .collect();
        ids.extend(batch.iter().map(|m| m.id.clone()));
        for r in publish_all(&mesh.sidecar(shop).grpc_url(), "orders", batch).await {
            r.expect("publish accepted");
        }
    }
    ids
}

/// Consumes `subscription` at `sidecar` until `n` deliveries came, then a little longer to catch
/// any extra; returns the ids (with repeats).
async fn consume(
    mesh: &qmesh_tests::Mesh,
    sidecar: &str,
    subscription: &str,
    n: usize,
) -> Vec<String> {
    let consumer = Consumer::start(
        sidecar,
        &mesh.sidecar(sidecar).grpc_url(),
        subscription,
        100,
        |_| Verdict::Ack,
    )
    .await;
    consumer.expect_prefixed("", n, 30, subscription).await;
    for shop in ["shop-1", "shop-2"] {
        until_sub_settled(mesh.sidecar(shop).admin, subscription, 30).await;
    }
    // Nothing more is owed anywhere; a message delivered twice would have shown up by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.stop().into_iter().map(|r| r.id).collect()
}

async fn kept(mesh: &qmesh_tests::Mesh, shop: &str) -> u64 {
    let Some(s) = stats(mesh.sidecar(shop).admin).await else {
        return 0;
    };
    s["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["queue"] == "orders")
        .filter_map(|q| q["kept"].as_u64())
        .sum()
}

/// Waits until `shop` keeps `n` acked messages of `orders`.
async fn until_kept(mesh: &qmesh_tests::Mesh, shop: &str, n: u64) {
    let admin = mesh.sidecar(shop).admin;
    let result = qmesh_tests::wait_for(
        "acked messages to be kept",
        Duration::from_secs(10),
        || async move {
            let s = stats(admin).await?;
            let q = s["queues"]
                .as_array()?
                .iter()
                .find(|q| q["queue"] == "orders")?
                .clone();
            (q["kept"] == n).then_some(())
        },
    )
    .await;
    assert!(
        result.is_ok(),
        "{shop} keeps {} of {n}",
        kept(mesh, shop).await
    );
}

/// Rewrites the mesh file with more documents and waits until `sidecar` has the new view (the
/// sidecars reload the file within a second or two).
async fn add_documents(mesh: &qmesh_tests::Mesh, yaml: &str, sidecar: &str) {
    let admin = mesh.sidecar(sidecar).admin;
    let version = |s: Option<serde_json::Value>| s.and_then(|s| s["viewVersion"].as_u64());
    let before = version(stats(admin).await).unwrap();
    let path = mesh.dir().join("mesh.yaml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n---\n");
    text.push_str(yaml);
    std::fs::write(&path, text).unwrap();
    qmesh_tests::wait_for("the new view", Duration::from_secs(15), || async move {
        (version(stats(admin).await) > Some(before)).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_subscriptions_start_at_earliest_or_at_a_time_across_two_owners() {
    let mesh = two_owners().await;
    let before = publish_batch(&mesh, "a", 20).await;
    let got = consume(&mesh, "billing", "billing", 40).await;
    assert_eq!(tally(got).0, before, "billing gets the first batch");
    // Time moves on between the batches (publish times are the owners' clocks, in ms).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = publish_batch(&mesh, "b", 30).await;
    let got = consume(&mesh, "billing", "billing", 60).await;
    assert_eq!(tally(got).0, after);
    for shop in ["shop-1", "shop-2"] {
        until_kept(&mesh, shop, 50).await;
    }

    let since = qmesh_api::StartAt::Time(since);
    add_documents(
        &mesh,
        &format!(
            "apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {{name: audit}}\n\
             spec: {{queue: orders, startAt: Earliest, consumers: {{matchLabels: {{app: auditor}}}}}}\n\
             ---\napiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {{name: recent}}\n\
             spec: {{queue: orders, startAt: \"{since}\", consumers: {{matchLabels: {{app: auditor}}}}}}\n"
        ),
        "auditor",
    )
    .await;
    let audit = consume(&mesh, "auditor", "audit", 100).await;
    let (distinct, duplicates) = tally(audit);
    let everything: HashSet<String> = before.union(&after).cloned().collect();
    assert_eq!(
        distinct, everything,
        "Earliest: every kept message of both owners"
    );
    assert_eq!(duplicates, 0);
    let recent = consume(&mesh, "auditor", "recent", 60).await;
    let (distinct, duplicates) = tally(recent);
    assert_eq!(
        distinct, after,
        "a start time: only what was published since then"
    );
    assert_eq!(duplicates, 0);

    // From here on every subscription gets what is new, once.
    let later = publish_batch(&mesh, "c", 5).await;
    for (sidecar, sub) in [
        ("billing", "billing"),
        ("auditor", "audit"),
        ("auditor", "recent"),
    ] {
        let got = consume(&mesh, sidecar, sub, 10).await;
        assert_eq!(tally(got), (later.clone(), 0), "{sub} after it started");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_replays_what_both_owners_keep_through_a_kill_9() {
    let mut mesh = two_owners().await;
    let start = SystemTime::now() - Duration::from_secs(1);
    let first = publish_batch(&mesh, "a", 25).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let middle = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = publish_batch(&mesh, "b", 15).await;
    let got = consume(&mesh, "billing", "billing", 80).await;
    assert_eq!(tally(got).0, first.union(&second).cloned().collect());

    // The kept messages survive an owner's crash.
    until_kept(&mesh, "shop-1", 40).await;
    let shop = mesh.sidecar_mut("shop-1");
    shop.kill9();
    shop.restart().await.unwrap();
    assert_eq!(
        kept(&mesh, "shop-1").await,
        40,
        "shop-1 still keeps its 40 after kill -9"
    );

    let mut client = client(&mesh.sidecar("billing").grpc_url()).await;
    let answer = client
        .rewind(v1::RewindRequest {
            subscription: "billing".into(),
            to: Some(start.into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.asked, answer.replaying), (3, 2), "{answer:?}");
    assert!(answer.unreachable.is_empty(), "{answer:?}");
    let replayed = consume(&mesh, "billing", "billing", 80).await;
    let (distinct, duplicates) = tally(replayed);
    assert_eq!(
        distinct,
        first.union(&second).cloned().collect::<HashSet<_>>()
    );
    assert_eq!(duplicates, 0, "each kept message is replayed once");

    // The HTTP mirror, from a time between the batches.
    let middle = qmesh_api::StartAt::Time(middle).to_string();
    let http = mesh.sidecar("billing").http;
    let body = serde_json::json!({ "to": middle }).to_string();
    let response = qmesh_tests::http::request(
        "POST",
        http,
        "/v1/subscriptions/billing/rewind",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200, "{:?}", response.json());
    assert_eq!(response.json().unwrap()["replaying"], 2);
    // An owner that crashes right after taking a rewind still replays: the rewind, and what it has
    // owed again so far, are on disk.
    let shop = mesh.sidecar_mut("shop-2");
    shop.kill9();
    shop.restart().await.unwrap();
    let replayed = consume(&mesh, "billing", "billing", 30).await;
    assert_eq!(
        tally(replayed),
        (second.clone(), 0),
        "only what came after the time"
    );

    // Bad requests get clear errors.
    let unknown = client
        .rewind(v1::RewindRequest {
            subscription: "nobody".into(),
            to: Some(start.into()),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let bad = qmesh_tests::http::request(
        "POST",
        http,
        "/v1/subscriptions/billing/rewind",
        &[("content-type", "application/json")],
        br#"{"to": "yesterday"}"#,
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
    assert!(
        String::from_utf8_lossy(&bad.body).contains("RFC 3339"),
        "{:?}",
        String::from_utf8_lossy(&bad.body)
    );
}

/// An owner that was down when a Subscription was created replays it from its `startAt` when it
/// comes back: what it serves is remembered beside the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_down_when_a_subscription_starts_replays_it_when_it_is_back() {
    let mut mesh = two_owners().await;
    let before = publish_batch(&mesh, "a", 10).await;
    let got = consume(&mesh, "billing", "billing", 20).await;
    assert_eq!(tally(got).0, before);
    until_kept(&mesh, "shop-1", 10).await;
    mesh.sidecar_mut("shop-1").kill9();
    add_documents(
        &mesh,
        "apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {name: audit}\n\
         spec: {queue: orders, startAt: Earliest, consumers: {matchLabels: {app: auditor}}}\n",
        "auditor",
    )
    .await;
    let auditor = Consumer::start(
        "auditor",
        &mesh.sidecar("auditor").grpc_url(),
        "audit",
        100,
        |_| Verdict::Ack,
    )
    .await;
    auditor
        .expect_prefixed("a-shop-2-", 10, 30, "shop-2 replays at once")
        .await;
    assert_eq!(auditor.count_prefixed("a-shop-1-"), 0, "shop-1 is down");
    mesh.sidecar_mut("shop-1").restart().await.unwrap();
    auditor
        .expect_prefixed("a-shop-1-", 10, 30, "shop-1 replays once it is back")
        .await;
    until_sub_settled(mesh.sidecar("shop-1").admin, "audit", 30).await;
    let (distinct, duplicates) = tally(auditor.stop().into_iter().map(|r| r.id));
    assert_eq!((distinct, duplicates), (before, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_messages_go_when_their_time_is_up_and_make_room_under_a_byte_limit() {
    let mesh = mesh()
        .manifests(
            "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: orders}\n\
             spec: {ordering: None, publishers: {matchLabels: {app: shop}}, \
             retention: {keepAcked: 3s, maxBytes: 64Ki}}\n---\n\
             apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {name: billing}\n\
             spec: {queue: orders, consumers: {matchLabels: {app: billing}}}",
        )
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .arg("--fsync=never")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("shop-1").grpc_url();
    let consumer = Consumer::start(
        "billing",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        100,
        |_| Verdict::Ack,
    )
    .await;
    // 200 × 1 KiB through a 64 KiB limit: what is acked and kept makes room, nothing is refused.
    let payload = "k".repeat(1024);
    for round in 0..20 {
        let batch = (0..10)
            .map(|i| message(&format!("m-{round}-{i}"), "", &payload))
            .collect();
        for r in publish_all(&url, "orders", batch).await {
            r.expect("kept messages never make a publish fail");
        }
        consumer
            .expect_prefixed("m-", (round + 1) * 10, 20, "billing")
            .await;
    }
    until_sub_settled(mesh.sidecar("shop-1").admin, "billing", 20).await;
    let held = kept(&mesh, "shop-1").await;
    assert!(
        (1..=64).contains(&held),
        "inside the 64 KiB limit, a few dozen 1 KiB messages are kept: {held}"
    );
    let admin = mesh.sidecar("shop-1").admin;
    qmesh_tests::wait_for(
        "kept messages to go after keepAcked",
        Duration::from_secs(15),
        || async move {
            let s = stats(admin).await?;
            let q = s["queues"]
                .as_array()?
                .iter()
                .find(|q| q["queue"] == "orders")?
                .clone();
            (q["kept"] == 0).then_some(())
        },
    )
    .await
    .unwrap();
}

/// A replay of more than the owner's memory budget is read a page at a time as the consumer
/// drains it, and arrives whole, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_larger_than_the_memory_budget_is_paced_and_arrives_whole() {
    const N: usize = 4_000;
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .arg_for("shop-1", "--memory-budget=1Mi")
        .arg("--fsync=never")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let start = SystemTime::now() - Duration::from_secs(1);
    let payload = "r".repeat(1024);
    let url = mesh.sidecar("shop-1").grpc_url();
    let mut ids = HashSet::new();
    for batch in 0..N / 500 {
        let messages: Vec<v1::Message> = (0..500)
            .map(|i| message(&format!("m-{}", batch * 500 + i), "", &payload))
            .collect();
        ids.extend(messages.iter().map(|m| m.id.clone()));
        for r in publish_all(&url, "orders", messages).await {
            r.expect("publish accepted");
        }
    }
    let consumer = Consumer::start(
        "billing",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        100,
        |_| Verdict::Ack,
    )
    .await;
    consumer
        .expect_prefixed("m-", N, 60, "the first pass")
        .await;
    until_sub_settled(mesh.sidecar("shop-1").admin, "billing", 30).await;
    until_kept(&mesh, "shop-1", N as u64).await;
    let mut client = client(&mesh.sidecar("billing").grpc_url()).await;
    let answer = client
        .rewind(v1::RewindRequest {
            subscription: "billing".into(),
            to: Some(start.into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.replaying, 1);
    consumer
        .expect_prefixed("m-", 2 * N, 60, "the replay")
        .await;
    until_sub_settled(mesh.sidecar("shop-1").admin, "billing", 30).await;
    let (distinct, duplicates) = tally(consumer.stop().into_iter().map(|r| r.id));
    assert_eq!(distinct, ids);
    assert_eq!(
        duplicates, N,
        "every message exactly twice: once published, once replayed"
    );
    let log = std::fs::read_to_string(mesh.sidecar("shop-1").log_path()).unwrap();
    assert!(log.contains("replay finished"));
    assert!(
        !log.contains("could not record"),
        "every replayed message was recorded"
    );
}

/// Acked messages kept for replay never fill a disk for good: when the log's disk is full they
/// are given up, and publishing goes on (a few publishes may be refused, and are retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_messages_are_given_up_when_the_disk_is_full() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("shop-1");
    std::fs::create_dir_all(&data).unwrap();
    let _disk = Tmpfs::mount(&data, "4m").expect("mounting a tmpfs (the tests run as root)");
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .data_dir("shop-1", &data)
        .arg_for("shop-1", "--segment-bytes=262144")
        .arg("--fsync=never")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("shop-1").grpc_url();
    let consumer = Consumer::start(
        "billing",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        100,
        |_| Verdict::Ack,
    )
    .await;
    // 12 MiB of acked messages through a 4 MiB disk, each batch consumed before the next.
    let payload = "d".repeat(1024);
    let mut refused = 0;
    for batch in 0..120 {
        let mut left: Vec<v1::Message> = (0..100)
            .map(|i| message(&format!("m-{batch}-{i}"), "", &payload))
            .collect();
        for _attempt in 0..20 {
            let results = publish_all(&url, "orders", left.clone()).await;
            let mut again = Vec::new();
            for (m, r) in left.into_iter().zip(results) {
                if let Err(e) = r {
                    assert_eq!(e.code, v1::ErrorCode::Storage as i32, "{e:?}");
                    refused += 1;
                    again.push(m);
                }
            }
            left = again;
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(left.is_empty(), "batch {batch}: the disk stayed full");
        consumer
            .expect_prefixed("m-", (batch + 1) * 100, 20, "billing")
            .await;
    }
    let (distinct, _) = tally(consumer.stop().into_iter().map(|r| r.id));
    assert_eq!(distinct.len(), 12_000, "every message delivered");
    let log = std::fs::read_to_string(mesh.sidecar("shop-1").log_path()).unwrap();
    assert!(
        log.contains("are given up to make room"),
        "the kept messages were given up ({refused} publishes refused meanwhile)"
    );
    println!("{refused} publishes refused while the disk was full, then accepted");
}
