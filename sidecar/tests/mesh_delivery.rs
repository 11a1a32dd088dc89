//! Real `qmesh-sidecar` processes on loopback, started from a mesh file: every test counts every
//! message and reports duplicates.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use qmesh_tests::http;

const SHOP: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: checkout}}
  deadLetterQueue: orders-dlq
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders-dlq}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
  delivery: {maxInFlight: 16}
  retry: {maxDeliveries: 3, backoff: {initial: 50ms, max: 200ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: shipping}
spec:
  queue: orders
  consumers: {matchLabels: {app: shipping}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dlq-audit}
spec:
  queue: orders-dlq
  consumers: {matchLabels: {app: shipping}}
"#;

async fn shop() -> qmesh_tests::Mesh {
    mesh()
        .manifests(SHOP)
        .sidecar("checkout", &[("app", "checkout")])
        .sidecar("billing-1", &[("app", "billing")])
        .sidecar("billing-2", &[("app", "billing")])
        .sidecar("shipping", &[("app", "shipping")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap()
}

fn messages(n: usize, prefix: &str) -> Vec<qmesh_proto::v1::Message> {
    (0..n)
        .map(|i| message(&format!("{prefix}-{i}"), "", &format!("order {i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_every_subscription_and_competing_consumers_share_the_load() {
    let mesh = shop().await;
    let b1 = Consumer::start(
        "b1",
        &mesh.sidecar("billing-1").grpc_url(),
        "billing",
        8,
        |_| Verdict::Ack,
    )
    .await;
    let b2 = Consumer::start(
        "b2",
        &mesh.sidecar("billing-2").grpc_url(),
        "billing",
        8,
        |_| Verdict::Ack,
    )
    .await;
    let ship = Consumer::start(
        "s",
        &mesh.sidecar("shipping").grpc_url(),
        "shipping",
        32,
        |_| Verdict::Ack,
    )
    .await;

    let n = 600;
    let results = publish_all(
        &mesh.sidecar("checkout").grpc_url(),
        "orders",
        messages(n, "o"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "every publish accepted");

    until("shipping to get every order", 30, || ship.count() >= n).await;
    until("billing to get every order", 30, || {
        b1.count() + b2.count() >= n
    })
    .await;
    let (shipping, dup_s) = tally(ship.ids());
    let (billing, dup_b) = tally(b1.ids().into_iter().chain(b2.ids()));
    println!(
        "published {n}: shipping got {} distinct ({dup_s} duplicates), billing {} distinct \
         ({dup_b} duplicates) split {} / {}",
        shipping.len(),
        billing.len(),
        b1.count(),
        b2.count()
    );
    assert_eq!(shipping.len(), n);
    assert_eq!(billing.len(), n);
    assert_eq!(dup_s + dup_b, 0, "no redelivery without a failure");
    // Each competing consumer gets a fair part.
    assert!(
        b1.count() >= n / 4 && b2.count() >= n / 4,
        "split {} / {}",
        b1.count(),
        b2.count()
    );

    // Everything settled at the owner.
    let stats = http::request("GET", mesh.sidecar("checkout").admin, "/v1/stats", &[], b"")
        .await
        .unwrap();
    let stats = stats.json().unwrap();
    until_backlog_zero(&mesh).await;
    assert_eq!(stats["queues"][0]["published"], n as u64);
}

async fn until_backlog_zero(mesh: &qmesh_tests::Mesh) {
    let admin = mesh.sidecar("checkout").admin;
    qmesh_tests::wait_for(
        "owner backlog to drain",
        Duration::from_secs(20),
        || async move {
            let s = http::request("GET", admin, "/v1/stats", &[], b"")
                .await
                .ok()?
                .json()
                .ok()?;
            let backlog: u64 = s["queues"]
                .as_array()?
                .iter()
                .filter_map(|q| q["backlog"].as_u64())
                .sum();
            (backlog == 0).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        let stats = std::process::Command::new("curl")
            .arg(format!("http://{admin}/v1/stats"))
            .output()
            .unwrap();
        panic!("{e}: {}", String::from_utf8_lossy(&stats.stdout))
    });
}

/// Waits until the owner holds nothing more for `subscription`.
async fn until_settled(mesh: &qmesh_tests::Mesh, subscription: &str) {
    let admin = mesh.sidecar("checkout").admin;
    qmesh_tests::wait_for(
        "subscription backlog to drain",
        Duration::from_secs(20),
        || async move {
            let s = http::request("GET", admin, "/v1/stats", &[], b"")
                .await
                .ok()?
                .json()
                .ok()?;
            let backlog: u64 = s["subscriptions"]
                .as_array()?
                .iter()
                .filter(|x| x["subscription"] == subscription)
                .filter_map(|x| x["backlog"].as_u64())
                .sum();
            (backlog == 0).then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nacked_max_deliveries_times_reaches_the_dead_letter_queue_with_headers() {
    let mesh = shop().await;
    let poison = |r: &Received| {
        if r.payload == "poison" {
            Verdict::Nack("cannot parse order")
        } else {
            Verdict::Ack
        }
    };
    let billing = Consumer::start(
        "b1",
        &mesh.sidecar("billing-1").grpc_url(),
        "billing",
        8,
        poison,
    )
    .await;
    let audit = Consumer::start(
        "a",
        &mesh.sidecar("shipping").grpc_url(),
        "dlq-audit",
        8,
        |_| Verdict::Ack,
    )
    .await;
    let mut batch = messages(20, "ok");
    batch.push(message("bad-1", "", "poison"));
    let results = publish_all(&mesh.sidecar("checkout").grpc_url(), "orders", batch).await;
    assert!(results.iter().all(Result::is_ok));

    until("the poison message in the dead-letter queue", 30, || {
        audit.count() >= 1
    })
    .await;
    let dead = audit.received.lock().unwrap()[0].clone();
    assert_eq!(dead.payload, "poison");
    assert_eq!(dead.headers["qmesh-original-queue"], "orders");
    assert_eq!(dead.headers["qmesh-original-subscription"], "billing");
    assert_eq!(dead.headers["qmesh-delivery-count"], "3");
    assert_eq!(dead.headers["qmesh-last-error"], "cannot parse order");
    assert!(dead.headers["qmesh-dead-letter-reason"].contains("max deliveries"));
    assert_eq!(dead.headers["qmesh-original-id"], "bad-1");
    let attempts: Vec<u32> = billing
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.id == "bad-1")
        .map(|r| r.attempt)
        .collect();
    assert_eq!(
        attempts,
        [1, 2, 3],
        "delivered exactly maxDeliveries times, attempts counted"
    );
    until("the good orders", 10, || billing.count() >= 23).await;
    until_settled(&mesh, "billing").await;
    until_settled(&mesh, "dlq-audit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_consumer_sidecar_mid_stream_loses_nothing() {
    let mut mesh = shop().await;
    let slow = |_: &Received| {
        std::thread::sleep(Duration::from_millis(2));
        Verdict::Ack
    };
    let b1 = Consumer::start(
        "b1",
        &mesh.sidecar("billing-1").grpc_url(),
        "billing",
        8,
        slow,
    )
    .await;
    let b2 = Consumer::start(
        "b2",
        &mesh.sidecar("billing-2").grpc_url(),
        "billing",
        8,
        slow,
    )
    .await;
    let n = 1000;
    let publisher = {
        let url = mesh.sidecar("checkout").grpc_url();
        tokio::spawn(async move { publish_all(&url, "orders", messages(n, "k")).await })
    };
    until("some deliveries to billing-2", 20, || b2.count() >= 50).await;
    mesh.sidecar_mut("billing-2").kill9();
    let before_kill = b2.stop();
    let results = publisher.await.unwrap();
    assert!(results.iter().all(Result::is_ok));
    until("billing-1 to take over the rest", 60, || {
        let (ids, _) = tally(
            b1.ids()
                .into_iter()
                .chain(before_kill.iter().map(|r| r.id.clone())),
        );
        ids.len() >= n
    })
    .await;
    let (ids, dups) = tally(
        b1.ids()
            .into_iter()
            .chain(before_kill.iter().map(|r| r.id.clone())),
    );
    println!(
        "published {n}: billing-2 got {} before kill -9, billing-1 {}; {} distinct, {dups} duplicates",
        before_kill.len(),
        b1.count(),
        ids.len()
    );
    assert_eq!(ids.len(), n, "nothing lost");
    assert!(
        dups <= 16,
        "duplicates bounded by the killed consumer's window: {dups}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_subscription_is_delivered_at_its_rate() {
    let yaml = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: workers}
spec:
  queue: jobs
  consumers: {matchLabels: {app: worker}}
  rateLimit: {messagesPerSecond: 50, burst: 1}
"#;
    let mesh = mesh()
        .manifests(yaml)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker-1", &[("app", "worker")])
        .sidecar("worker-2", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let w1 = Consumer::start(
        "w1",
        &mesh.sidecar("worker-1").grpc_url(),
        "workers",
        32,
        |_| Verdict::Ack,
    )
    .await;
    let w2 = Consumer::start(
        "w2",
        &mesh.sidecar("worker-2").grpc_url(),
        "workers",
        32,
        |_| Verdict::Ack,
    )
    .await;
    let results = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        messages(2000, "j"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    // Measure over 10 s after the first second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = (Instant::now(), w1.count() + w2.count());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let delivered = w1.count() + w2.count() - start.1;
    let rate = delivered as f64 / start.0.elapsed().as_secs_f64();
    println!("rate limit 50/s split over 2 consumers: measured {rate:.1} msgs/s over 10 s");
    assert!(
        (45.0..=55.0).contains(&rate),
        "rate {rate:.1} not within 50 ±10%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_fills_retention_and_publishes_get_429_while_memory_stays_bounded() {
    let yaml = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: events}
spec:
  retention: {maxMessages: 200, overflow: Reject}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: slow}
spec:
  queue: events
  consumers: {matchLabels: {app: slow}}
  delivery: {maxInFlight: 4}
"#;
    let mesh = mesh()
        .manifests(yaml)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("slow", &[("app", "slow")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // The consumer never acks: its window fills, then the owner's retention.
    let _stuck = Consumer::start("stuck", &mesh.sidecar("slow").grpc_url(), "slow", 4, |_| {
        Verdict::Hold
    })
    .await;
    let payload = vec![b'x'; 4096];
    let producer = mesh.sidecar("producer");
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..400 {
        let r = http::request(
            "POST",
            producer.http,
            "/v1/queues/events/messages",
            &[("qmesh-id", &format!("e{i}"))],
            &payload,
        )
        .await
        .unwrap();
        match r.status {
            201 => accepted += 1,
            429 => {
                refused = Some(r);
                break;
            }
            other => panic!(
                "unexpected status {other}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
    let refused = refused.expect("publishes refused once retention is full");
    assert_eq!(accepted, 200, "exactly maxMessages accepted");
    assert!(refused.header("retry-after").is_some());
    let body = refused.json().unwrap();
    assert_eq!(body["error"]["code"], "backlog_full");
    let rss: HashMap<&str, u64> = ["producer", "slow"]
        .iter()
        .map(|n| (*n, mesh.sidecar(n).rss_bytes().unwrap()))
        .collect();
    println!(
        "retention full after {accepted} publishes; RSS producer {} KiB, consumer {} KiB",
        rss["producer"] / 1024,
        rss["slow"] / 1024
    );
    for (name, bytes) in rss {
        assert!(bytes < 64 * 1024 * 1024, "{name} RSS {bytes} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_publishes_polls_acks_and_explains_errors() {
    let mesh = shop().await;
    let checkout = mesh.sidecar("checkout");
    let ok = http::request(
        "POST",
        checkout.http,
        "/v1/queues/orders/messages",
        &[
            ("qmesh-id", "h-1"),
            ("qmesh-key", "customer-7"),
            ("qmesh-h-region", "eu"),
        ],
        b"{\"total\": 12}",
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 201, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json().unwrap()["id"], "h-1");
    let dup = http::request(
        "POST",
        checkout.http,
        "/v1/queues/orders/messages",
        &[("qmesh-id", "h-1")],
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(dup.status, 201);

    for (addr, path, status, code) in [
        (
            checkout.http,
            "/v1/queues/nope/messages",
            404,
            "unknown_queue",
        ),
        (
            mesh.sidecar("billing-1").http,
            "/v1/queues/orders/messages",
            403,
            "permission_denied",
        ),
    ] {
        let r = http::request("POST", addr, path, &[], b"x").await.unwrap();
        assert_eq!(r.status, status);
        assert_eq!(r.json().unwrap()["error"]["code"], code);
    }
    let big = vec![0u8; 2 * 1024 * 1024];
    let r = http::request(
        "POST",
        checkout.http,
        "/v1/queues/orders/messages",
        &[],
        &big,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.json().unwrap()["error"]["code"], "message_too_large");

    let billing = mesh.sidecar("billing-1").http;
    let polled = http::request(
        "GET",
        billing,
        "/v1/subscriptions/billing/messages?max=10&wait=5s",
        &[],
        b"",
    )
    .await
    .unwrap()
    .json()
    .unwrap();
    let m = &polled["messages"][0];
    assert_eq!(m["id"], "h-1");
    assert_eq!(m["key"], "customer-7");
    assert_eq!(m["headers"]["region"], "eu");
    assert_eq!(m["payload"], "eyJ0b3RhbCI6IDEyfQ==");
    let receipt = m["receipt"].as_str().unwrap();
    let body = format!("{{\"receipts\": [\"{receipt}\"]}}");
    let acked = http::request(
        "POST",
        billing,
        "/v1/subscriptions/billing/ack",
        &[],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(acked.json().unwrap()["settled"], 1);
    let again = http::request(
        "POST",
        billing,
        "/v1/subscriptions/billing/ack",
        &[],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(again.json().unwrap()["unknown"][0], receipt);
    let bad = http::request(
        "POST",
        billing,
        "/v1/subscriptions/billing/ack",
        &[],
        b"not json",
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
    let unknown = http::request("GET", billing, "/v1/subscriptions/nope/messages", &[], b"")
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_of_an_owner_loses_no_acknowledged_publish() {
    let mut mesh = shop().await;
    // Nobody consumes yet: everything published stays owned by checkout.
    let n = 300;
    let results = publish_all(
        &mesh.sidecar("checkout").grpc_url(),
        "orders",
        messages(n, "d"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    mesh.sidecar_mut("checkout").kill9();
    mesh.sidecar_mut("checkout").restart().await.unwrap();
    let ship = Consumer::start(
        "s",
        &mesh.sidecar("shipping").grpc_url(),
        "shipping",
        32,
        |_| Verdict::Ack,
    )
    .await;
    let b1 = Consumer::start(
        "b1",
        &mesh.sidecar("billing-1").grpc_url(),
        "billing",
        16,
        |_| Verdict::Ack,
    )
    .await;
    until(
        "every acknowledged publish delivered after the restart",
        30,
        || ship.count() >= n && b1.count() >= n,
    )
    .await;
    let (shipping, dups) = tally(ship.ids());
    let (billing, dups_b) = tally(b1.ids());
    println!(
        "owner killed with {n} acknowledged publishes owned; after restart shipping got {} ({dups} dup), billing {} ({dups_b} dup)",
        shipping.len(),
        billing.len()
    );
    assert_eq!((shipping.len(), billing.len()), (n, n));
    until_backlog_zero(&mesh).await;

    // Settled messages stay settled across another crash.
    mesh.sidecar_mut("checkout").kill9();
    mesh.sidecar_mut("checkout").restart().await.unwrap();
    // Recovery completes before the sidecar reports ready: what it owns now is what it replayed.
    let stats = http::request("GET", mesh.sidecar("checkout").admin, "/v1/stats", &[], b"")
        .await
        .unwrap();
    let stats = stats.json().unwrap();
    let owned: u64 = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|q| q["backlog"].as_u64())
        .sum();
    assert_eq!(
        owned, 0,
        "nothing settled came back after a second kill -9: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_per_key_holds_under_concurrency_across_competing_consumers() {
    let yaml = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: accounts}
spec: {ordering: Key}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: ledger}
spec:
  queue: accounts
  consumers: {matchLabels: {app: ledger}}
  delivery: {maxInFlight: 32}
  retry: {maxDeliveries: 10, backoff: {initial: 10ms, max: 50ms}}
"#;
    let mesh = mesh()
        .manifests(yaml)
        .sidecar("bank", &[("app", "bank")])
        .sidecar("ledger-1", &[("app", "ledger")])
        .sidecar("ledger-2", &[("app", "ledger")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // Every 7th delivery is nacked once, so retries interleave with new messages.
    let flaky = |r: &Received| {
        let n: u32 = r.payload.rsplit(' ').next().unwrap().parse().unwrap();
        if n % 7 == 3 && r.attempt == 1 {
            Verdict::Nack("transient")
        } else {
            Verdict::Ack
        }
    };
    let l1 = Consumer::start(
        "l1",
        &mesh.sidecar("ledger-1").grpc_url(),
        "ledger",
        16,
        flaky,
    )
    .await;
    let l2 = Consumer::start(
        "l2",
        &mesh.sidecar("ledger-2").grpc_url(),
        "ledger",
        16,
        flaky,
    )
    .await;
    let keys = 8;
    let per_key = 60;
    let batch: Vec<_> = (0..per_key)
        .flat_map(|i| {
            (0..keys).map(move |k| {
                message(
                    &format!("acct{k}-{i}"),
                    &format!("acct{k}"),
                    &format!("entry {i}"),
                )
            })
        })
        .collect();
    let results = publish_all(&mesh.sidecar("bank").grpc_url(), "accounts", batch).await;
    assert!(results.iter().all(Result::is_ok));
    until("every entry acked", 60, || {
        let acked = |c: &Consumer| {
            c.received
                .lock()
                .unwrap()
                .iter()
                .filter(|r| {
                    let n: u32 = r.payload.rsplit(' ').next().unwrap().parse().unwrap();
                    !(n % 7 == 3 && r.attempt == 1)
                })
                .count()
        };
        acked(&l1) + acked(&l2) >= keys * per_key
    })
    .await;
    // Merge both consumers' deliveries in the order they happened per key: since only one message
    // of a key is in flight at a time, each key's successful deliveries must be 0, 1, 2, ...
    let mut all: Vec<Received> = l1.received.lock().unwrap().clone();
    all.extend(l2.received.lock().unwrap().iter().cloned());
    let mut by_key: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
    for r in &all {
        let n: u32 = r.payload.rsplit(' ').next().unwrap().parse().unwrap();
        by_key
            .entry(r.key.clone())
            .or_default()
            .push((n, r.attempt));
    }
    let (l1n, l2n) = (l1.count(), l2.count());
    for (key, deliveries) in &by_key {
        let mut acked: Vec<u32> = deliveries
            .iter()
            .filter(|(n, a)| !(n % 7 == 3 && *a == 1))
            .map(|(n, _)| *n)
            .collect();
        acked.sort_unstable();
        acked.dedup();
        assert_eq!(
            acked,
            (0..per_key as u32).collect::<Vec<_>>(),
            "{key}: every entry once"
        );
    }
    // Per-consumer order is observable directly: within one consumer's log, a key's entries never
    // go backwards.
    for c in [&l1, &l2] {
        let mut last: HashMap<String, u32> = HashMap::new();
        for r in c.received.lock().unwrap().iter() {
            let n: u32 = r.payload.rsplit(' ').next().unwrap().parse().unwrap();
            if let Some(prev) = last.get(&r.key) {
                assert!(n >= *prev, "{}: entry {n} after {prev}", r.key);
            }
            last.insert(r.key.clone(), n);
        }
    }
    println!(
        "ordered: {keys} keys × {per_key} entries; deliveries {l1n} + {l2n} (with one nack per 7th entry)"
    );
    assert!(l1n > 50 && l2n > 50, "both consumers worked: {l1n} / {l2n}");
}

/// A minimal HTTP endpoint for push delivery: answers each POST with the next status of `script`
/// (then 200 forever) and records (id, attempt, key, body).
async fn push_endpoint(
    script: Vec<u16>,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, String)>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let script = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
        script,
    )));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (log, script) = (std::sync::Arc::clone(&log), std::sync::Arc::clone(&script));
            tokio::spawn(async move {
                loop {
                    // Read one request (headers + Content-Length body).
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
                            .unwrap_or_default()
                    };
                    let len: usize = header("content-length").parse().unwrap_or(0);
                    while buf.len() < head_end + 4 + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end + 4..head_end + 4 + len])
                        .into_owned();
                    log.lock().unwrap().push((
                        header("qmesh-id"),
                        header("qmesh-attempt"),
                        header("qmesh-key"),
                        body,
                    ));
                    let status = script.lock().unwrap().pop_front().unwrap_or(200);
                    let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    if conn.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivery_posts_to_the_app_and_retries_failed_pushes() {
    // The app answers 503, then 500, then 200 for everything.
    let (port, seen) = push_endpoint(vec![503, 500]).await;
    let yaml = format!(
        r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {{name: hooks}}
spec: {{ordering: Key}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {{name: webhook}}
spec:
  queue: hooks
  consumers: {{matchLabels: {{app: receiver}}}}
  delivery: {{mode: Push, push: {{port: {port}, path: /events}}, maxInFlight: 1, ackTimeout: 5s}}
  retry: {{maxDeliveries: 5, backoff: {{initial: 20ms, max: 100ms}}}}
"#
    );
    let mesh = mesh()
        .manifests(&yaml)
        .sidecar("sender", &[("app", "sender")])
        .sidecar("receiver", &[("app", "receiver")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let batch: Vec<_> = (0..10)
        .map(|i| message(&format!("h{i}"), "k", &format!("event {i}")))
        .collect();
    assert!(
        publish_all(&mesh.sidecar("sender").grpc_url(), "hooks", batch)
            .await
            .iter()
            .all(Result::is_ok)
    );
    until("every event pushed and accepted", 20, || {
        let ok: std::collections::BTreeSet<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(id, ..)| id.clone())
            .collect();
        ok.len() >= 10 && seen.lock().unwrap().len() >= 12
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    // The first message was refused twice (503, then 500) and redelivered with a growing attempt;
    // with ordering by key, nothing overtook it.
    let first: Vec<(String, String)> = seen
        .iter()
        .filter(|(id, ..)| id == "h0")
        .map(|(_, a, _, b)| (a.clone(), b.clone()))
        .collect();
    assert_eq!(
        first,
        [
            ("1".into(), "event 0".into()),
            ("2".into(), "event 0".into()),
            ("3".into(), "event 0".into())
        ]
    );
    assert!(seen.iter().all(|(_, _, key, _)| key == "k"));
    let order: Vec<&str> = seen.iter().map(|(id, ..)| id.as_str()).collect();
    assert_eq!(order[..4], ["h0", "h0", "h0", "h1"], "{order:?}");
    // Everything settled at the owner.
    let admin = mesh.sidecar("sender").admin;
    qmesh_tests::wait_for(
        "sender backlog to drain",
        Duration::from_secs(10),
        || async move {
            let s = http::request("GET", admin, "/v1/stats", &[], b"")
                .await
                .ok()?
                .json()
                .ok()?;
            (s["queues"][0]["backlog"] == 0).then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_garbage_or_breaking_the_protocol_is_reset_and_nothing_is_lost() {
    use qmesh_proto::peer::{self, OwnerFrame, owner_frame, peer_client::PeerClient};
    use tokio::io::AsyncWriteExt;

    let mesh = shop().await;
    let billing = Consumer::start(
        "b1",
        &mesh.sidecar("billing-1").grpc_url(),
        "billing",
        8,
        |_| Verdict::Ack,
    )
    .await;
    let target = mesh.sidecar("billing-1").peer;

    // Raw bytes that are not HTTP/2 at all.
    let mut raw = tokio::net::TcpStream::connect(target).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage \x13\x37")
        .await
        .unwrap();
    drop(raw);

    // Without a certificate: the TLS handshake fails, nothing is read.
    let plaintext = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
            .unwrap()
            .connect()
            .await?;
        PeerClient::new(channel)
            .rewind(peer::PeerRewind::default())
            .await
            .map_err(|s| anyhow::anyhow!("{s}"))?;
        anyhow::Ok(())
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), plaintext)
        .await
        .expect("a plaintext client is refused, not left hanging");
    assert!(answer.is_err(), "plaintext must not be served");
    // A valid certificate of a sidecar outside the mesh: refused before the first frame.
    let mut intruder = PeerClient::new(mesh.peer_channel("intruder", "billing-1").await.unwrap());
    let hello_as = |name: &str| OwnerFrame {
        frame: Some(owner_frame::Frame::Hello(peer::Hello {
            owner: Some(peer::SidecarId {
                namespace: "default".into(),
                name: name.into(),
                incarnation: 1,
            }),
            protocol_revision: 1,
        })),
    };
    let err = intruder
        .forward(tokio_stream::iter(vec![hello_as("intruder")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // ... and claiming to be the real owner does not help.
    let err = intruder
        .forward(tokio_stream::iter(vec![hello_as("checkout")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // The real owner's identity, breaking the protocol.
    let mut client = PeerClient::new(mesh.peer_channel("checkout", "billing-1").await.unwrap());
    // Deliveries before hello.
    let delivery = peer::PeerDelivery {
        subscription: "billing".into(),
        queue: "orders".into(),
        sequence: 1,
        attempt: 1,
        message: Some(message("forged", "", "forged")),
        ack_timeout: None,
    };
    let frames = vec![OwnerFrame {
        frame: Some(owner_frame::Frame::Deliveries(peer::DeliveryBatch {
            deliveries: vec![delivery.clone()],
        })),
    }];
    let err = client
        .forward(tokio_stream::iter(frames))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // Hello, then far more deliveries than any credit granted (the owner's own identity: what
    // fits the credit is a real delivery, the rest a protocol violation).
    let hello = hello_as("checkout");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello).await.unwrap();
    let mut inbound = client
        .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let flood = (0..20_000u64)
        .map(|i| peer::PeerDelivery {
            sequence: 1_000_000 + i,
            message: Some(message(&format!("flood-{i}"), "", "x")),
            ..delivery.clone()
        })
        .collect();
    tx.send(OwnerFrame {
        frame: Some(owner_frame::Frame::Deliveries(peer::DeliveryBatch {
            deliveries: flood,
        })),
    })
    .await
    .unwrap();
    let reset = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue, // welcome
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(reset.code(), tonic::Code::FailedPrecondition, "{reset}");
    assert!(reset.message().contains("without credit"), "{reset}");

    // The real owner is unaffected: every order arrives, the forged one never does.
    let results = publish_all(
        &mesh.sidecar("checkout").grpc_url(),
        "orders",
        messages(50, "after"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    until("every order after the attacks", 20, || {
        billing.count_prefixed("after-") >= 50
    })
    .await;
    let (ids, dups) = tally(
        billing
            .ids()
            .into_iter()
            .filter(|i| i.starts_with("after-")),
    );
    assert_eq!((ids.len(), dups), (50, 0));
    assert!(!billing.ids().iter().any(|i| i == "forged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_an_owner_with_backlog_hands_it_over_and_loses_nothing() {
    let yaml = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
  retry: {maxDeliveries: 4}
"#;
    let mut mesh = mesh()
        .manifests(yaml)
        .arg("--shutdown-grace=2s")
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // Nobody consumes yet: shop-1 owns the whole backlog when it is told to stop.
    let n = 40;
    let results = publish_all(
        &mesh.sidecar("shop-1").grpc_url(),
        "orders",
        messages(n, "h"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    mesh.sidecar("shop-1").terminate().unwrap();
    let code = mesh
        .sidecar_mut("shop-1")
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "graceful exit");
    // The consumer arrives after shop-1 is gone: everything comes from the new owner.
    let billing = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        16,
        |_| Verdict::Ack,
    )
    .await;
    until("every handed-over order delivered", 20, || {
        tally(billing.ids()).0.len() >= n
    })
    .await;
    let (ids, dups) = tally(billing.ids());
    println!(
        "shop-1 stopped with {n} owned; billing got {} distinct ({dups} duplicates) from shop-2",
        ids.len()
    );
    assert_eq!(ids.len(), n);
    let stats = http::request("GET", mesh.sidecar("shop-2").admin, "/v1/stats", &[], b"")
        .await
        .unwrap()
        .json()
        .unwrap();
    assert!(
        stats["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["queue"] == "orders"),
        "shop-2 owns orders now: {stats}"
    );
}
