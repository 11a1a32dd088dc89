//! Regression tests for the delivery engine's promises under ordinary conditions — each one a way a
//! new user broke them in wave 1: nothing acknowledged is lost, nothing gets stuck while a consumer
//! is there to take work. Real sidecar processes over real sockets; every message counted.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use qmesh_proto::v1::{self, Ack, Nack, SubscribeRequest, subscribe_request, subscribe_response};
use qmesh_tests::http;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

fn batch(n: usize, prefix: &str) -> Vec<v1::Message> {
    (0..n)
        .map(|i| message(&format!("{prefix}-{i}"), "", &format!("{prefix} {i}")))
        .collect()
}

/// A Subscribe stream driven by hand: the test decides when to ack or nack what.
struct RawStream {
    tx: mpsc::Sender<SubscribeRequest>,
    inbound: tonic::Streaming<v1::SubscribeResponse>,
}

impl RawStream {
    async fn open(url: &str, subscription: &str, max_in_flight: u32) -> Self {
        let (tx, inbound) = open_subscription(url, subscription, max_in_flight).await;
        Self { tx, inbound }
    }

    /// The next batch of deliveries, within `secs`.
    async fn next(&mut self, secs: u64) -> Option<Vec<v1::Delivery>> {
        loop {
            let item = tokio::time::timeout(Duration::from_secs(secs), self.inbound.next())
                .await
                .ok()??;
            if let Ok(v1::SubscribeResponse {
                response: Some(subscribe_response::Response::Deliveries(d)),
            }) = item
            {
                return Some(d.deliveries);
            }
        }
    }

    async fn ack(&self, receipts: Vec<String>) {
        self.send(subscribe_request::Request::Ack(Ack { receipts }))
            .await;
    }

    async fn nack(&self, receipts: Vec<String>, delay: Option<prost_types::Duration>) {
        self.send(subscribe_request::Request::Nack(Nack {
            receipts,
            delay,
            reason: "test nack".into(),
            dead_letter: false,
        }))
        .await;
    }

    async fn send(&self, request: subscribe_request::Request) {
        self.tx
            .send(SubscribeRequest {
                request: Some(request),
            })
            .await
            .unwrap();
    }
}

const TWO_PRODUCERS: &str = r#"
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

/// Two producer pods, one consumer pod: the owner that was alone when credits were handed out must
/// not keep them all while it sits idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_producer_gets_credits_while_the_first_sits_idle() {
    let mesh = mesh()
        .manifests(TWO_PRODUCERS)
        .sidecar("producer-1", &[("app", "producer")])
        .sidecar("producer-2", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let worker = Consumer::start("w", &mesh.sidecar("worker").grpc_url(), "work", 0, |_| {
        Verdict::Ack
    })
    .await;
    let first = publish_all(
        &mesh.sidecar("producer-1").grpc_url(),
        "jobs",
        batch(5, "first"),
    )
    .await;
    assert!(first.iter().all(Result::is_ok));
    until("the first producer's messages", 10, || worker.count() >= 5).await;

    // producer-1 now sits idle; producer-2 starts sending.
    let second = publish_all(
        &mesh.sidecar("producer-2").grpc_url(),
        "jobs",
        batch(50, "second"),
    )
    .await;
    assert!(second.iter().all(Result::is_ok));
    worker
        .expect_prefixed("second", 50, 10, "the second producer's messages delivered")
        .await;
    until_sub_settled(mesh.sidecar("producer-2").admin, "work", 10).await;

    // And the first producer is served again when it sends once more.
    let again = publish_all(
        &mesh.sidecar("producer-1").grpc_url(),
        "jobs",
        batch(20, "again"),
    )
    .await;
    assert!(again.iter().all(Result::is_ok));
    until("the first producer's second burst", 10, || {
        worker
            .ids()
            .iter()
            .filter(|i| i.starts_with("again"))
            .count()
            >= 20
    })
    .await;
    let (distinct, _) = tally(worker.ids());
    assert_eq!(distinct.len(), 75);
}

const SLOW: &str = r#"
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
  delivery: {maxInFlight: 10, ackTimeout: 1s}
  retry: {maxDeliveries: 100, backoff: {initial: 50ms, max: 100ms}}
"#;

/// A consumer slower than `ackTimeout / maxInFlight` per message: leases time out while it works,
/// and its late acks and the freed window must keep it going until every message is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_slower_than_its_ack_timeout_keeps_making_progress() {
    let mesh = mesh()
        .manifests(SLOW)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let results = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        batch(12, "slow"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));

    // The app: takes what comes, works 250 ms on each, in order, then acks it.
    let mut stream = RawStream::open(&mesh.sidecar("worker").grpc_url(), "work", 0).await;
    let work: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let done = Arc::new(Mutex::new(0usize));
    let worker = {
        let (work, done, tx) = (Arc::clone(&work), Arc::clone(&done), stream.tx.clone());
        tokio::spawn(async move {
            loop {
                let next = work.lock().unwrap().pop_front();
                match next {
                    Some(receipt) => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        let ack = subscribe_request::Request::Ack(Ack {
                            receipts: vec![receipt],
                        });
                        if tx
                            .send(SubscribeRequest { request: Some(ack) })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        *done.lock().unwrap() += 1;
                    }
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    };
    let admin = mesh.sidecar("producer").admin;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut settled = false;
    while std::time::Instant::now() < deadline {
        if let Some(deliveries) = stream.next(1).await {
            work.lock()
                .unwrap()
                .extend(deliveries.into_iter().map(|d| d.receipt));
        }
        if sub_figure(admin, "work", "backlog").await == 0 {
            settled = true;
            break;
        }
    }
    worker.abort();
    let acks = *done.lock().unwrap();
    assert!(
        settled,
        "stalled: {acks} acks sent, stats {:?}",
        stats(admin).await
    );
}

const OVERFLOW: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: events}
spec:
  publishers: {matchLabels: {app: producer}}
  deadLetterQueue: events-dlq
  retention: {maxMessages: 5, overflow: DeadLetter}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: events-dlq}
spec:
  retention: {maxMessages: 5, overflow: Reject}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: audit}
spec:
  queue: events
  consumers: {matchLabels: {app: auditor}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dlq-watch}
spec:
  queue: events-dlq
  consumers: {matchLabels: {app: auditor}}
"#;

/// Overflow into a dead-letter queue that refuses (it is full and rejects): every accepted publish
/// is still somewhere — the queue or its dead-letter queue — and the publishes that cannot be made
/// room for are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_into_a_dead_letter_queue_that_refuses_loses_no_accepted_message() {
    let mesh = mesh()
        .manifests(OVERFLOW)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("auditor", &[("app", "auditor")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("producer").grpc_url();
    let mut accepted = 0u64;
    let mut refusals = Vec::new();
    for m in batch(40, "e") {
        match publish_all(&url, "events", vec![m]).await.remove(0) {
            Ok(_) => accepted += 1,
            Err(e) => refusals.push(e),
        }
    }
    let admin = mesh.sidecar("producer").admin;
    let held = queue_backlog(admin, "events").await + queue_backlog(admin, "events-dlq").await;
    assert_eq!(
        held,
        accepted,
        "accepted {accepted}, but only {held} are in the queue or its dead-letter queue: {:?}",
        stats(admin).await
    );
    assert_eq!(accepted, 10, "5 in the queue, 5 moved to the full DLQ");
    assert_eq!(refusals.len(), 30);
    assert!(
        refusals
            .iter()
            .all(|e| e.code == v1::ErrorCode::BacklogFull as i32),
        "{refusals:?}"
    );
    assert!(
        refusals[0].message.contains("events-dlq"),
        "the refusal names the dead-letter queue that refused: {}",
        refusals[0].message
    );
}

const NACKS: &str = r#"
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
  retry: {maxDeliveries: 5, backoff: {initial: 50ms, max: 100ms}}
"#;

/// A nack asking for an absurd delay (i64::MAX seconds) is clamped: the owner survives, acked
/// messages stay acked, the nacked one stays owed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_with_an_absurd_delay_is_clamped_and_disturbs_nothing_else() {
    let mesh = mesh()
        .manifests(NACKS)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let results = publish_all(&mesh.sidecar("producer").grpc_url(), "jobs", batch(21, "n")).await;
    assert!(results.iter().all(Result::is_ok));
    let mut stream = RawStream::open(&mesh.sidecar("worker").grpc_url(), "work", 0).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut nacked = None;
    while seen.len() < 21 {
        let deliveries = stream.next(10).await.expect("deliveries");
        for d in deliveries {
            let id = d.message.unwrap().id;
            *seen.entry(id.clone()).or_default() += 1;
            if nacked.is_none() {
                nacked = Some(id);
                let forever = prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 999_999_999,
                };
                stream.nack(vec![d.receipt], Some(forever)).await;
            } else {
                stream.ack(vec![d.receipt]).await;
            }
        }
    }
    let admin = mesh.sidecar("producer").admin;
    let owed = qmesh_tests::wait_for(
        "20 settled, 1 owed",
        Duration::from_secs(10),
        || async move { (sub_figure(admin, "work", "backlog").await == 1).then_some(()) },
    )
    .await;
    assert!(owed.is_ok(), "{owed:?}: {:?}", stats(admin).await);
    // Nothing is redelivered: the acked stay acked, the nacked one waits out its (clamped) delay.
    assert!(
        stream.next(2).await.is_none(),
        "a redelivery after the absurd nack"
    );
    let ready = http::request("GET", admin, "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    // The owner still works: a new message flows.
    let more = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        batch(1, "after"),
    )
    .await;
    assert!(more[0].is_ok());
    let d = stream.next(10).await.expect("the owner still delivers");
    assert_eq!(d[0].message.as_ref().unwrap().id, "after-0");
    stream.ack(vec![d[0].receipt.clone()]).await;
    let log = mesh.sidecar("producer").log_tail();
    assert!(!log.contains("panicked"), "{log}");
}

const TWO_WORKERS: &str = r#"
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
  delivery: {maxInFlight: 10, ackTimeout: 30s}
"#;

/// The only gRPC consumer app of a pod disconnects: that pod stops taking credits, and later
/// messages go to the pod whose consumer is still there — not after an ack timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_only_consumer_app_of_a_pod_leaves_its_share_goes_to_the_live_consumer() {
    let mesh = mesh()
        .manifests(TWO_WORKERS)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker-1", &[("app", "worker")])
        .sidecar("worker-2", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let leaving = Consumer::start(
        "w1",
        &mesh.sidecar("worker-1").grpc_url(),
        "work",
        0,
        |_| Verdict::Ack,
    )
    .await;
    let staying = Consumer::start(
        "w2",
        &mesh.sidecar("worker-2").grpc_url(),
        "work",
        0,
        |_| Verdict::Ack,
    )
    .await;
    let warm = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        batch(20, "warm"),
    )
    .await;
    assert!(warm.iter().all(Result::is_ok));
    until("both consumers served", 10, || {
        leaving.count() + staying.count() >= 20
    })
    .await;
    leaving.stop();
    let later = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        batch(50, "later"),
    )
    .await;
    assert!(later.iter().all(Result::is_ok));
    staying
        .expect_prefixed("later", 50, 10, "every later message at the live consumer")
        .await;
}

const POISON: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec:
  publishers: {matchLabels: {app: producer}}
  deadLetterQueue: jobs-dlq
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs-dlq}
spec:
  publishers: {matchLabels: {app: producer}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: jobs
  consumers: {matchLabels: {app: worker}}
  delivery: {ackTimeout: 1s}
  retry: {maxDeliveries: 3, backoff: {initial: 50ms, max: 100ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dead}
spec:
  queue: jobs-dlq
  consumers: {matchLabels: {app: producer}}
"#;

async fn poison_mesh() -> qmesh_tests::Mesh {
    mesh()
        .manifests(POISON)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap()
}

/// A poison message that kills its consumer sidecar each time: every lost delivery counts, and
/// after `maxDeliveries` it is dead-lettered instead of being redelivered forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_that_kills_its_consumer_sidecar_is_dead_lettered() {
    let mut mesh = poison_mesh().await;
    let dead = Consumer::start(
        "dlq",
        &mesh.sidecar("producer").grpc_url(),
        "dead",
        0,
        |_| Verdict::Ack,
    )
    .await;
    let results = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        vec![message("poison", "", "boom")],
    )
    .await;
    assert!(results[0].is_ok());
    let mut attempts = Vec::new();
    for _ in 0..5 {
        if dead.count() > 0 {
            break;
        }
        let mut stream = RawStream::open(&mesh.sidecar("worker").grpc_url(), "work", 0).await;
        let Some(d) = stream.next(10).await else {
            break;
        };
        attempts.push(d[0].attempt);
        // The message crashes the pod: the sidecar goes down with it, no chance to settle.
        mesh.sidecar_mut("worker").kill9();
        mesh.sidecar_mut("worker").restart().await.unwrap();
    }
    until("the poison message in the dead-letter queue", 10, || {
        dead.count() >= 1
    })
    .await;
    assert_eq!(attempts, [1, 2, 3], "each lost delivery counts once");
    let dl = dead.received.lock().unwrap()[0].clone();
    assert_eq!(dl.headers["qmesh-original-id"], "poison");
    assert_eq!(dl.headers["qmesh-delivery-count"], "3");
}

/// Ack timeouts count towards `maxDeliveries` and the count survives a kill -9 of the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_timeouts_count_towards_max_deliveries_across_an_owner_restart() {
    // A long backoff, so the owner can be killed while the message waits for its third attempt.
    let mut mesh = mesh()
        .manifests(&POISON.replace("initial: 50ms, max: 100ms", "initial: 3s, max: 3s"))
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let results = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        vec![message("stuck", "", "slow")],
    )
    .await;
    assert!(results[0].is_ok());
    let mut stream = RawStream::open(&mesh.sidecar("worker").grpc_url(), "work", 0).await;
    let mut attempts = Vec::new();
    // Two deliveries the consumer holds past the ack timeout …
    for _ in 0..2 {
        let d = stream.next(10).await.expect("a delivery");
        attempts.push(d[0].attempt);
    }
    // … the second one times out too (the owner has it waiting for its third attempt) …
    let admin = mesh.sidecar("producer").admin;
    let waiting = qmesh_tests::wait_for(
        "the second timeout",
        Duration::from_secs(10),
        || async move {
            let s = stats(admin).await?;
            let sub = s["subscriptions"]
                .as_array()?
                .iter()
                .find(|x| x["subscription"] == "work")?
                .clone();
            (sub["owner"]["waiting"] == 1).then_some(())
        },
    )
    .await;
    assert!(waiting.is_ok(), "{waiting:?}: {:?}", stats(admin).await);
    // … then the owner crashes and comes back.
    mesh.sidecar_mut("producer").kill9();
    mesh.sidecar_mut("producer").restart().await.unwrap();
    let d = stream.next(15).await.expect("a delivery after the restart");
    attempts.push(d[0].attempt);
    assert_eq!(
        attempts,
        [1, 2, 3],
        "the restart forgot the timed-out attempts"
    );
    // The third timeout exhausts it: dead-lettered, not delivered a fourth time.
    let dead = Consumer::start(
        "dlq",
        &mesh.sidecar("producer").grpc_url(),
        "dead",
        0,
        |_| Verdict::Ack,
    )
    .await;
    until("the stuck message in the dead-letter queue", 15, || {
        dead.count() >= 1
    })
    .await;
    assert!(stream.next(1).await.is_none(), "a fourth delivery");
}

const BACKLOG: &str = r#"
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

/// A backlog of small messages costs memory in proportion to its bytes: payloads do not pin the
/// shared buffers they were decoded from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_small_messages_does_not_pin_decode_buffers() {
    let mesh = mesh()
        .manifests(BACKLOG)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--fsync")
        .arg("interval:5ms")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("producer").grpc_url();
    let before = mesh.sidecar("producer").rss_bytes().unwrap();
    // Unary publishes: each request arrives in a read buffer of its own.
    let n = 6_000;
    let mut tasks = Vec::new();
    for t in 0..6 {
        let mut client = client(&url).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 6 {
                let request = v1::PublishRequest {
                    queue: "jobs".into(),
                    message: Some(message(&format!("m-{t}-{i}"), "", &"x".repeat(100))),
                    correlation: 0,
                    delay: None,
                    deliver_at: None,
                    transaction: String::new(),
                };
                client.publish(request).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admin = mesh.sidecar("producer").admin;
    let s = stats(admin).await.unwrap();
    let bytes = s["queues"][0]["backlogBytes"].as_u64().unwrap();
    let grown = mesh
        .sidecar("producer")
        .rss_bytes()
        .unwrap()
        .saturating_sub(before);
    eprintln!(
        "backlog {n} messages, {bytes} accounted bytes, RSS grew {} KiB",
        grown / 1024
    );
    // Index and bookkeeping cost something per message; 8 KiB decode buffers per message do not fit.
    assert!(
        grown < bytes * 4 + 16 * 1024 * 1024,
        "RSS grew {grown} bytes for {bytes} accounted bytes"
    );
}

const DEDUP: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: payments}
spec:
  publishers: {matchLabels: {app: producer}}
  dedupWindow: 5m
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: ledger}
spec:
  queue: payments
  consumers: {matchLabels: {app: worker}}
"#;

/// A producer's retry of an id inside the dedup window is recognised after the owner restarted —
/// killed or gracefully — even though the original was consumed and acked long before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_after_kill_9_or_a_graceful_restart_is_not_stored_again() {
    let mut mesh = mesh()
        .manifests(DEDUP)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let ledger = Consumer::start("l", &mesh.sidecar("worker").grpc_url(), "ledger", 0, |_| {
        Verdict::Ack
    })
    .await;
    let url = mesh.sidecar("producer").grpc_url();
    let first = publish_all(&url, "payments", vec![message("pay-1", "", "10 EUR")]).await;
    assert!(!first[0].as_ref().unwrap().duplicate);
    until("the payment delivered", 10, || ledger.count() == 1).await;
    until_sub_settled(mesh.sidecar("producer").admin, "ledger", 10).await;

    for restart in ["kill -9", "SIGTERM"] {
        let producer = mesh.sidecar_mut("producer");
        if restart == "kill -9" {
            producer.kill9();
        } else {
            producer.terminate().unwrap();
            let code = producer.wait_exit(Duration::from_secs(30)).await.unwrap();
            assert_eq!(code, Some(0), "graceful exit");
        }
        producer.restart().await.unwrap();
        let again = publish_all(&url, "payments", vec![message("pay-1", "", "10 EUR")]).await;
        assert!(
            again[0].as_ref().unwrap().duplicate,
            "after {restart}: the retry was stored again: {again:?}"
        );
    }
    // A new id still flows, and the duplicate never reached the consumer.
    let fresh = publish_all(&url, "payments", vec![message("pay-2", "", "5 EUR")]).await;
    assert!(!fresh[0].as_ref().unwrap().duplicate);
    until("the second payment", 10, || ledger.count() >= 2).await;
    assert_eq!(ledger.ids(), ["pay-1", "pay-2"]);
}

const REPLICATED_DEDUP: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: payments}
spec:
  publishers: {matchLabels: {app: producer}}
  dedupWindow: 5m
  publishAck: Replicated
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: ledger}
spec:
  queue: payments
  consumers: {matchLabels: {app: worker}}
"#;

/// A retry that arrives while the original is still being made durable gets the original's
/// outcome — here a failure, because the replica hangs — never `duplicate: true` for a message that
/// was not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_during_the_original_publish_gets_the_originals_outcome() {
    let mesh = mesh()
        .manifests(REPLICATED_DEDUP)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("standby", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--replica-timeout")
        .arg("2s")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("producer").grpc_url();
    let warm = publish_all(&url, "payments", vec![message("warm", "", "0 EUR")]).await;
    assert!(warm[0].is_ok(), "{warm:?}");
    // The only replica hangs: the original waits for its copy's confirmation, then fails.
    mesh.sidecar("standby").pause().unwrap();
    let original = {
        let url = url.clone();
        tokio::spawn(async move {
            publish_all(&url, "payments", vec![message("pay-1", "", "10 EUR")])
                .await
                .remove(0)
        })
    };
    // The producer's retry, while the original is still in progress.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retry = publish_all(&url, "payments", vec![message("pay-1", "", "10 EUR")])
        .await
        .remove(0);
    let original = original.await.unwrap();
    mesh.sidecar("standby").resume().unwrap();
    let original = original.expect_err("the original fails: no replica confirmed");
    assert_eq!(original.code, v1::ErrorCode::ReplicaUnavailable as i32);
    match retry {
        Ok(r) => panic!("the retry was answered {r:?} for a message that was never stored"),
        Err(e) => assert_eq!(e.code, original.code, "{e:?}"),
    }
    // With the replica back, a retry is stored for real.
    let later = publish_all(&url, "payments", vec![message("pay-1", "", "10 EUR")]).await;
    let later = later[0].as_ref().unwrap();
    assert!(!later.duplicate, "{later:?}");
}

const FULL_DLQ: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec:
  publishers: {matchLabels: {app: producer}}
  deadLetterQueue: jobs-dlq
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs-dlq}
spec:
  retention: {maxMessages: 1, overflow: Reject}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: jobs
  consumers: {matchLabels: {app: worker}}
  retry: {maxDeliveries: 1}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dead}
spec:
  queue: jobs-dlq
  consumers: {matchLabels: {app: auditor}}
"#;

/// A dead letter its dead-letter queue refuses (full) is kept, visible as parked, and moved there
/// as soon as the dead-letter queue has room — not parked forever. (Found by the fault campaign,
/// with a full disk.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_by_a_full_dead_letter_queue_gets_there_once_it_has_room() {
    let mesh = mesh()
        .manifests(FULL_DLQ)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .sidecar("auditor", &[("app", "auditor")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let worker = Consumer::start("w", &mesh.sidecar("worker").grpc_url(), "work", 0, |_| {
        Verdict::Nack("cannot process")
    })
    .await;
    let results = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        vec![message("bad-1", "", "x"), message("bad-2", "", "y")],
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    until("both delivered and nacked", 10, || worker.count() >= 2).await;
    let admin = mesh.sidecar("producer").admin;
    // One fits into the dead-letter queue; the other waits, parked, where it was.
    let parked = qmesh_tests::wait_for("one parked", Duration::from_secs(10), || async move {
        let s = stats(admin).await?;
        let work = s["subscriptions"]
            .as_array()?
            .iter()
            .find(|x| x["subscription"] == "work")?
            .clone();
        (work["owner"]["parked"] == 1 && queue_backlog(admin, "jobs-dlq").await == 1).then_some(())
    })
    .await;
    assert!(parked.is_ok(), "{parked:?}: {:?}", stats(admin).await);
    // Someone drains the dead-letter queue: the parked one follows.
    let audit = Consumer::start("a", &mesh.sidecar("auditor").grpc_url(), "dead", 0, |_| {
        Verdict::Ack
    })
    .await;
    until("both dead letters at the auditor", 20, || {
        audit.count() >= 2
    })
    .await;
    let mut originals: Vec<String> = audit
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.headers["qmesh-original-id"].clone())
        .collect();
    originals.sort();
    assert_eq!(originals, ["bad-1", "bad-2"]);
    until_sub_settled(admin, "work", 10).await;
}

/// A Subscription that disappears from the view for a while (an invalid edit, a transient view)
/// and comes back loses nothing it was owed: it was dormant, not deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_missing_from_the_view_for_a_while_keeps_its_backlog() {
    let mesh = mesh()
        .manifests(BACKLOG)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let results = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        batch(10, "kept"),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    let admin = mesh.sidecar("producer").admin;
    let path = mesh.dir().join("mesh.yaml");
    let original = std::fs::read_to_string(&path).unwrap();
    let without: Vec<&str> = original
        .split("\n---\n")
        .filter(|doc| !doc.contains("kind: Subscription"))
        .collect();
    let version = |admin| async move {
        stats(admin)
            .await
            .and_then(|s| s["viewVersion"].as_u64())
            .unwrap_or(0)
    };
    for text in [without.join("\n---\n"), original.clone()] {
        let before = version(admin).await;
        std::fs::write(&path, text).unwrap();
        let reloaded = qmesh_tests::wait_for(
            "the mesh file reloaded",
            Duration::from_secs(15),
            || async move { (version(admin).await > before).then_some(()) },
        )
        .await;
        assert!(reloaded.is_ok(), "{reloaded:?}");
    }
    let worker = Consumer::start("w", &mesh.sidecar("worker").grpc_url(), "work", 0, |_| {
        Verdict::Ack
    })
    .await;
    until(
        "the backlog delivered after the subscription came back",
        15,
        || worker.count() >= 10,
    )
    .await;
    until_sub_settled(admin, "work", 10).await;
}

/// The sidecar's memory bound holds under concurrent publishes: those still being written count
/// too, so many large publishes at once cannot all pass the check before any is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_cannot_overrun_the_memory_bound() {
    let bound = 8 * 1024 * 1024;
    let mesh = mesh()
        .manifests(BIG_JOBS)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--max-owned-bytes")
        .arg(&bound.to_string())
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let url = mesh.sidecar("producer").grpc_url();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = message(&format!("big-{i}"), "", "");
            m.payload = vec![b'x'; 1024 * 1024].into();
            publish_all(&url, "jobs", vec![m]).await.remove(0)
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(e) => assert_eq!(e.code, v1::ErrorCode::BacklogFull as i32, "{e:?}"),
        }
    }
    let s = stats(mesh.sidecar("producer").admin).await.unwrap();
    let bytes = s["queues"][0]["backlogBytes"].as_u64().unwrap();
    assert!(
        bytes <= bound,
        "{accepted} accepted: {bytes} bytes owned over a bound of {bound}"
    );
    assert!(accepted >= 4, "only {accepted} accepted");
}

const BIG_JOBS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec:
  publishers: {matchLabels: {app: producer}}
  maxMessageBytes: 2Mi
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: jobs
  consumers: {matchLabels: {app: worker}}
"#;
