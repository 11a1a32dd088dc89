//! A sidecar restarting on a data directory: what replay costs in memory and time, and that the
//! backlog comes back whole.

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, path::Path, sync::Arc};

use common::*;
use qmesh_proto::v1;
use qmesh_sidecar::store::{DiskLog, FsyncPolicy, Outcome, StoreConfig};

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.fsync = FsyncPolicy::Never;
    c
}

fn sized(id: &str, payload: usize) -> Arc<v1::Message> {
    Arc::new(v1::Message {
        id: id.into(),
        payload: vec![7u8; payload].into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_streams_records_instead_of_reading_whole_segments() {
    let data = tempfile::tempdir().unwrap();
    {
        // One message still owed at the head keeps the segments; behind it 130 MiB of settled
        // 1 MiB messages: two full 64 MiB segments and a bit.
        let log = DiskLog::open(config(&data.path().join("log"))).unwrap();
        log.append("jobs", 1, &sized("owed", 10), &["work".to_owned()])
            .await
            .unwrap();
        let big = sized("big", 1024 * 1024);
        for seq in 2..=131 {
            log.append("jobs", seq, &big, &["work".to_owned()])
                .await
                .unwrap();
            log.settle("jobs", "work", seq, Outcome::Acked);
        }
        log.flush().await.unwrap();
    }
    let mut sidecar = qmesh_tests::MeshBuilder::new()
        .manifests(
            "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: jobs}\nspec: {}\n---\n\
             apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {name: work}\n\
             spec: {queue: jobs, consumers: {matchLabels: {app: worker}}}",
        )
        .sidecar("owner", &[("app", "owner")])
        .data_dir("owner", data.path())
        .start(Path::new(env!("CARGO_BIN_EXE_qmesh-sidecar")))
        .await
        .unwrap();
    let peak = sidecar.sidecar_mut("owner").peak_rss_bytes().unwrap();
    assert!(
        peak < 48 * 1024 * 1024,
        "replaying 64 MiB segments peaked at {} MiB",
        peak / (1024 * 1024)
    );
}

const BACKLOG_MESH: &str = "\
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: burst}
spec:
  ordering: None
  publishers: {matchLabels: {app: producer}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: drain}
spec:
  queue: burst
  consumers: {matchLabels: {app: worker}}
";

/// Peak shaving: a burst many times the owner's memory budget, published with no consumer, stays on
/// disk instead of in memory — while it is published, after a `kill -9` and the restart — and then
/// drains to a consumer whole, every message counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_far_larger_than_the_memory_budget_stays_on_disk_survives_kill_9_and_drains_whole()
 {
    const N: usize = 120_000;
    const BATCH: usize = 4_000;
    const BUDGET: u64 = 8 * 1024 * 1024;
    let mut mesh = mesh()
        .manifests(BACKLOG_MESH)
        .sidecar("owner", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg_for("owner", "--memory-budget=8Mi")
        .arg_for("owner", "--fsync=never")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("owner").grpc_url();
    let base = mesh.sidecar("owner").rss_bytes().unwrap();
    let payload = "p".repeat(1024);
    for batch in 0..N / BATCH {
        let messages = (0..BATCH)
            .map(|i| message(&format!("m-{}", batch * BATCH + i), "", &payload))
            .collect();
        for r in publish_all(&url, "burst", messages).await {
            r.expect("every publish of the burst is accepted");
        }
    }
    let admin = mesh.sidecar("owner").admin;
    assert_eq!(queue_backlog(admin, "burst").await, N as u64);
    let peak = mesh.sidecar("owner").peak_rss_bytes().unwrap();
    println!("owner RSS peak while publishing: {} MiB", peak >> 20);
    // About 130 MiB of messages went through; the owner's memory grew by its budget and buffers.
    assert!(
        peak < base + BUDGET + 40 * 1024 * 1024,
        "publishing {N} × 1 KiB peaked at {} MiB (started at {} MiB, budget {} MiB)",
        peak >> 20,
        base >> 20,
        BUDGET >> 20
    );

    let owner = mesh.sidecar_mut("owner");
    owner.kill9();
    owner.restart().await.unwrap();
    let peak = owner.peak_rss_bytes().unwrap();
    println!(
        "owner RSS peak after kill -9 and restart: {} MiB",
        peak >> 20
    );
    assert!(
        peak < base + BUDGET + 40 * 1024 * 1024,
        "restarting on a {N}-message backlog peaked at {} MiB",
        peak >> 20
    );
    assert_eq!(queue_backlog(admin, "burst").await, N as u64);

    let consumer = Consumer::start(
        "worker",
        &mesh.sidecar("worker").grpc_url(),
        "drain",
        1000,
        |_| Verdict::Ack,
    )
    .await;
    consumer
        .expect_prefixed("m-", N, 180, "the whole backlog drains")
        .await;
    let ids: HashSet<String> = consumer.ids().into_iter().collect();
    assert_eq!(ids.len(), N, "every message delivered");
    until_sub_settled(admin, "drain", 60).await;
    let owner = mesh.sidecar("owner");
    println!(
        "owner RSS: {} MiB at start; peak {} MiB after the restart and the drain",
        base >> 20,
        owner.peak_rss_bytes().unwrap() >> 20
    );
    let log = std::fs::read_to_string(owner.log_path()).unwrap();
    assert!(log.contains("memory budget reached"), "the owner spilled");
    assert!(log.contains("every spilled message is back in memory"));
    assert!(
        owner.peak_rss_bytes().unwrap() < base + BUDGET + 40 * 1024 * 1024,
        "draining peaked at {} MiB",
        owner.peak_rss_bytes().unwrap() >> 20
    );
}

/// A full disk: publishes get RESOURCE_EXHAUSTED (gRPC) and 507 (HTTP) with a message that says the
/// log's disk is full, nothing accepted is lost, and publishing works again by itself once the
/// consumers' acks free space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_clearly_loses_nothing_and_recovers_by_itself() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("owner");
    std::fs::create_dir_all(&data).unwrap();
    let _disk = Tmpfs::mount(&data, "6m").expect("mounting a tmpfs (the tests run as root)");
    let mesh = mesh()
        .manifests(BACKLOG_MESH)
        .sidecar("owner", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .data_dir("owner", &data)
        .arg_for("owner", "--segment-bytes=1048576")
        .arg_for("owner", "--memory-budget=1Mi")
        .arg_for("owner", "--fsync=never")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let owner = mesh.sidecar("owner");
    let url = owner.grpc_url();
    let payload = "f".repeat(1024);
    let mut accepted = Vec::new();
    let refusal = 'fill: loop {
        assert!(accepted.len() < 20_000, "a 6 MiB disk never filled");
        let batch: Vec<v1::Message> = (0..200)
            .map(|i| message(&format!("m-{}", accepted.len() + i), "", &payload))
            .collect();
        let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
        for (id, r) in ids.into_iter().zip(publish_all(&url, "burst", batch).await) {
            match r {
                Ok(_) => accepted.push(id),
                Err(e) => break 'fill e,
            }
        }
    };
    assert_eq!(refusal.code, v1::ErrorCode::Storage as i32, "{refusal:?}");
    assert!(refusal.message.contains("is full"), "{}", refusal.message);
    // The unary API and HTTP say the same. (A refused batch is cut off again, so a smaller write may
    // still fit: publish until one is refused, keeping what was accepted.)
    let mut app = client(&url).await;
    let status = loop {
        let id = format!("m-{}", accepted.len());
        let r = app
            .publish(v1::PublishRequest {
                queue: "burst".into(),
                message: Some(message(&id, "", &payload)),
                correlation: 0,
                delay: None,
                deliver_at: None,
                transaction: String::new(),
            })
            .await;
        match r {
            Ok(_) => accepted.push(id),
            Err(status) => break status,
        }
        assert!(accepted.len() < 20_000, "the disk stopped being full");
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("disk holding the message log"),
        "{status}"
    );
    let http = loop {
        let id = format!("m-{}", accepted.len());
        let r = qmesh_tests::http::request(
            "POST",
            owner.http,
            "/v1/queues/burst/messages",
            &[("qmesh-id", id.as_str())],
            payload.as_bytes(),
        )
        .await
        .unwrap();
        if r.status != 201 {
            break r;
        }
        accepted.push(id);
        assert!(accepted.len() < 20_000, "the disk stopped being full");
    };
    assert_eq!(http.status, 507, "{}", String::from_utf8_lossy(&http.body));
    assert!(String::from_utf8_lossy(&http.body).contains("is full"));
    println!(
        "disk full after {} accepted publishes of 1 KiB",
        accepted.len()
    );

    // Consumers drain what was accepted — all of it — and that frees the disk.
    let consumer = Consumer::start(
        "worker",
        &mesh.sidecar("worker").grpc_url(),
        "drain",
        500,
        |_| Verdict::Ack,
    )
    .await;
    consumer
        .expect_prefixed("m-", accepted.len(), 120, "every accepted message")
        .await;
    let got: HashSet<String> = consumer.ids().into_iter().collect();
    assert!(
        accepted.iter().all(|id| got.contains(id)),
        "an accepted message was lost"
    );
    until_sub_settled(owner.admin, "drain", 60).await;
    qmesh_tests::wait_for(
        "publishes to work again",
        std::time::Duration::from_secs(30),
        || {
            let url = url.clone();
            async move {
                publish_all(&url, "burst", vec![message("after-1", "", "again")])
                    .await
                    .pop()
                    .and_then(Result::ok)
            }
        },
    )
    .await
    .expect("publishing works again once space returns");
    consumer
        .expect_prefixed("after-", 1, 30, "a publish after the disk freed up")
        .await;
}

/// Publishers that go away in the middle of their publishes (a client crashing with thousands in
/// flight) leave nothing half-done behind: every publish already queued for the log completes, so
/// neither ordered dispatch nor paging in waits for it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_vanishing_mid_publish_do_not_stall_the_queue() {
    let mesh = mesh()
        .manifests(&BACKLOG_MESH.replace("ordering: None", "ordering: Key"))
        .sidecar("owner", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg_for("owner", "--memory-budget=256Ki")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let owner = mesh.sidecar("owner");
    let payload = "v".repeat(512);
    for round in 0..5 {
        // Thousands of pipelined publishes, and the client is gone before their answers.
        let mut app = client(&owner.grpc_url()).await;
        let requests: Vec<v1::PublishRequest> = (0..3000)
            .map(|i| v1::PublishRequest {
                queue: "burst".into(),
                message: Some(message(
                    &format!("gone-{round}-{i}"),
                    &format!("k{}", i % 7),
                    &payload,
                )),
                correlation: i,
                delay: None,
                deliver_at: None,
                transaction: String::new(),
            })
            .collect();
        let mut answers = app
            .publish_stream(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        // The first answer is in: the rest are in flight when the call is dropped.
        let _ = answers.message().await;
        drop(answers);
        drop(app);
    }
    // Whatever was accepted, later publishes of every key are delivered.
    let consumer = Consumer::start(
        "worker",
        &mesh.sidecar("worker").grpc_url(),
        "drain",
        1000,
        |_| Verdict::Ack,
    )
    .await;
    let after: Vec<v1::Message> = (0..70)
        .map(|i| message(&format!("after-{i}"), &format!("k{}", i % 7), "after"))
        .collect();
    for r in publish_all(&owner.grpc_url(), "burst", after).await {
        r.expect("accepted");
    }
    consumer
        .expect_prefixed("after-", 70, 60, "publishes after the vanished publishers")
        .await;
    until_sub_settled(owner.admin, "drain", 60).await;
}

/// Fan-out with one subscription whose consumers are gone (Kafka's stopped consumer group): the
/// messages it alone still owes must not hold the owner's memory so that the other subscription,
/// whose consumer keeps up, stalls once the backlog is a few times the memory budget.
///
/// Fails today (`drain` gets 815 of 6,000 within 60 s): a known defect of the per-queue memory
/// window, kept here until per-subscription cursors let a lagging subscription's backlog live in
/// the log only (issue 13). Run it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known defect: a subscription nobody consumes holds the memory window (issue 13)"]
async fn a_subscription_nobody_consumes_does_not_stall_the_others() {
    const N: usize = 6_000;
    let manifests = format!(
        "{BACKLOG_MESH}---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {{name: archive}}
spec:
  queue: burst
  consumers: {{matchLabels: {{app: archiver}}}}
"
    );
    let mesh = mesh()
        .manifests(&manifests)
        .sidecar("owner", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .sidecar("archiver", &[("app", "archiver")])
        .arg_for("owner", "--memory-budget=256Ki")
        .arg_for("owner", "--fsync=never")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let owner = mesh.sidecar("owner");
    let consumer = Consumer::start(
        "worker",
        &mesh.sidecar("worker").grpc_url(),
        "drain",
        1000,
        |_| Verdict::Ack,
    )
    .await;
    // 6,000 × 1 KiB: over twenty times the budget, all owed to `archive` too.
    let payload = "a".repeat(1024);
    for batch in 0..N / 500 {
        let messages = (0..500)
            .map(|i| message(&format!("f-{}", batch * 500 + i), "", &payload))
            .collect();
        for r in publish_all(&owner.grpc_url(), "burst", messages).await {
            r.expect("accepted");
        }
    }
    consumer
        .expect_prefixed(
            "f-",
            N,
            60,
            "`drain` gets every message while `archive` lags",
        )
        .await;
    until_sub_settled(owner.admin, "drain", 60).await;

    // The archiver comes back and gets all of them too.
    let archiver = Consumer::start(
        "archiver",
        &mesh.sidecar("archiver").grpc_url(),
        "archive",
        1000,
        |_| Verdict::Ack,
    )
    .await;
    archiver
        .expect_prefixed("f-", N, 60, "`archive` catches up")
        .await;
    until_sub_settled(owner.admin, "archive", 60).await;
}
