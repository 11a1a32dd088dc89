//! Transactional messages (RocketMQ's half messages with check-back), with real sidecar processes:
//! a transaction's messages are stored but invisible until it commits — then all are delivered,
//! once — or rolls back — then none ever is; commit and rollback are idempotent and refuse the
//! other way; an abandoned transaction is checked back with the app (`POST` to its check port) and
//! settled as it answers, or by `onUnknown`; half messages survive a kill -9 of the sidecar and a
//! graceful hand-over to a peer.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use common::*;
use qmesh_proto::v1;

/// The app's check-back endpoint: answers each transaction as the test says, counting the asks.
#[derive(Clone, Default)]
struct CheckBack {
    answers: Arc<Mutex<HashMap<String, &'static str>>>,
    asked: Arc<Mutex<HashMap<String, u32>>>,
}

impl CheckBack {
    /// Serves on a free loopback port; the port.
    async fn start(&self) -> u16 {
        let app = Router::new()
            .route(
                "/qmesh/transaction-check",
                post(
                    |State(me): State<CheckBack>, Json(body): Json<serde_json::Value>| async move {
                        let id = body["transaction"].as_str().unwrap_or_default().to_owned();
                        *me.asked.lock().unwrap().entry(id.clone()).or_default() += 1;
                        let answer = me.answers.lock().unwrap().get(&id).copied();
                        answer.unwrap_or("unknown").to_owned()
                    },
                ),
            )
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }

    fn answer(&self, transaction: &str, answer: &'static str) {
        self.answers
            .lock()
            .unwrap()
            .insert(transaction.to_owned(), answer);
    }

    fn asked(&self, transaction: &str) -> u32 {
        self.asked
            .lock()
            .unwrap()
            .get(transaction)
            .copied()
            .unwrap_or(0)
    }
}

/// Two queues of one transaction (orders, audit), each with a subscription; `ledger` settles
/// unanswered transactions by committing them.
fn manifests(check_port: u16, check_after: &str) -> String {
    format!(
        r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {{name: orders}}
spec:
  dedupWindow: 10m
  transaction: {{checkAfter: {check_after}, maxChecks: 3, checkPort: {check_port}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {{name: audit}}
spec:
  transaction: {{checkAfter: {check_after}, maxChecks: 3, checkPort: {check_port}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {{name: ledger}}
spec:
  transaction: {{checkAfter: 1s, maxChecks: 2, onUnknown: Commit}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {{name: billing}}
spec:
  queue: orders
  consumers: {{matchLabels: {{app: worker}}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {{name: auditing}}
spec:
  queue: audit
  consumers: {{matchLabels: {{app: worker}}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {{name: booking}}
spec:
  queue: ledger
  consumers: {{matchLabels: {{app: worker}}}}
"#
    )
}

fn request(queue: &str, id: &str, transaction: &str) -> v1::PublishRequest {
    v1::PublishRequest {
        queue: queue.into(),
        message: Some(message(id, "", id)),
        correlation: 0,
        delay: None,
        deliver_at: None,
        transaction: transaction.into(),
    }
}

async fn begin(app: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>) -> String {
    app.begin_transaction(v1::BeginTransactionRequest {})
        .await
        .unwrap()
        .into_inner()
        .transaction
}

fn txn(id: &str) -> v1::TransactionRequest {
    v1::TransactionRequest {
        transaction: id.into(),
    }
}

/// One Prometheus sample of the sidecar at `admin` (0 when absent).
async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let answer = qmesh_tests::http::request("GET", admin, "/metrics", &[], b"")
        .await
        .unwrap();
    String::from_utf8_lossy(&answer.body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Consumers of the three subscriptions on the worker, acking everything.
async fn consumers(url: &str) -> [Consumer; 3] {
    [
        Consumer::start("b", url, "billing", 0, |_| Verdict::Ack).await,
        Consumer::start("a", url, "auditing", 0, |_| Verdict::Ack).await,
        Consumer::start("l", url, "booking", 0, |_| Verdict::Ack).await,
    ]
}

/// Publishes a plain message after the fact and waits for it: what the owner held back before it
/// would have arrived by then if it were deliverable.
async fn barrier(
    app: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>,
    consumer: &Consumer,
    queue: &str,
    id: &str,
) {
    app.publish(request(queue, id, "")).await.unwrap();
    until(&format!("barrier {id}"), 20, || {
        consumer.ids().iter().any(|i| i == id)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_delivers_all_its_messages_on_commit_and_none_on_rollback() {
    let checks = CheckBack::default();
    let port = checks.start().await;
    let mesh = mesh()
        .manifests(&manifests(port, "1h"))
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let [billing, auditing, _booking] = consumers(&mesh.sidecar("worker").grpc_url()).await;
    let producer = mesh.sidecar("producer");
    let mut app = client(&producer.grpc_url()).await;

    // Committed: two queues, three messages, none visible before the commit.
    let t1 = begin(&mut app).await;
    assert!(t1.starts_with("tx-"), "{t1}");
    for (queue, id) in [("orders", "o-1"), ("orders", "o-2"), ("audit", "a-1")] {
        let ok = app
            .publish(request(queue, id, &t1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.id, id);
        assert!(!ok.duplicate);
    }
    // The same id again in the transaction is a duplicate, stored once.
    let again = app
        .publish(request("orders", "o-1", &t1))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(metric(producer.admin, "qmesh_half_messages").await, 3.0);
    assert_eq!(metric(producer.admin, "qmesh_transactions_open").await, 1.0);
    barrier(&mut app, &billing, "orders", "plain-1").await;
    assert_eq!(billing.ids(), ["plain-1"], "half messages are invisible");
    assert_eq!(auditing.count(), 0);

    let done = app.commit_transaction(txn(&t1)).await.unwrap().into_inner();
    assert_eq!((done.state.as_str(), done.messages), ("committed", 3));
    billing
        .expect_prefixed("o-", 2, 20, "the committed orders")
        .await;
    auditing
        .expect_prefixed("a-", 1, 20, "the committed audit record")
        .await;
    let delivered = billing.received.lock().unwrap().clone();
    assert!(
        delivered
            .iter()
            .filter(|r| r.id.starts_with("o-"))
            .all(|r| r.headers.get("qmesh-transaction") == Some(&t1)),
        "committed deliveries name their transaction: {delivered:?}"
    );
    // Idempotent; the other way is refused.
    let again = app.commit_transaction(txn(&t1)).await.unwrap().into_inner();
    assert_eq!((again.state.as_str(), again.messages), ("committed", 3));
    let refused = app.rollback_transaction(txn(&t1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    // A publish into a settled transaction is refused too.
    let late = app
        .publish(request("orders", "o-late", &t1))
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);

    // Rolled back: never delivered.
    let t2 = begin(&mut app).await;
    app.publish(request("orders", "r-1", &t2)).await.unwrap();
    app.publish(request("audit", "r-2", &t2)).await.unwrap();
    let done = app
        .rollback_transaction(txn(&t2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.state.as_str(), done.messages), ("rolled-back", 2));
    app.rollback_transaction(txn(&t2)).await.unwrap();
    let refused = app.commit_transaction(txn(&t2)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    barrier(&mut app, &billing, "orders", "plain-2").await;
    barrier(&mut app, &auditing, "audit", "plain-3").await;
    assert_eq!(billing.count_prefixed("r-"), 0);
    assert_eq!(auditing.count_prefixed("r-"), 0);
    assert_eq!(metric(producer.admin, "qmesh_half_messages").await, 0.0);

    // The committed id is in the queue's dedup window: a plain publish of it is a duplicate.
    let dup = app
        .publish(request("orders", "o-2", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(dup.duplicate);

    // Unknown transactions: NOT_FOUND for commit, rollback and publish.
    for status in [
        app.commit_transaction(txn("tx-nope")).await.unwrap_err(),
        app.rollback_transaction(txn("tx-nope")).await.unwrap_err(),
        app.publish(request("orders", "x", "tx-nope"))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }

    // The HTTP mirror: 201 on begin, the header on publish, 200 / 404 / 409 on settling.
    let http = producer.http;
    let opened = qmesh_tests::http::request("POST", http, "/v1/transactions", &[], b"")
        .await
        .unwrap();
    assert_eq!(opened.status, 201);
    let t3: serde_json::Value = serde_json::from_slice(&opened.body).unwrap();
    let t3 = t3["transaction"].as_str().unwrap().to_owned();
    let published = qmesh_tests::http::request(
        "POST",
        http,
        "/v1/queues/orders/messages",
        &[("qmesh-id", "h-1"), ("qmesh-transaction", &t3)],
        b"via http",
    )
    .await
    .unwrap();
    assert_eq!(published.status, 201);
    let committed = qmesh_tests::http::request(
        "POST",
        http,
        &format!("/v1/transactions/{t3}/commit"),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(committed.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&committed.body).unwrap();
    assert_eq!(body["state"], "committed");
    assert_eq!(body["messages"], 1);
    billing
        .expect_prefixed("h-", 1, 20, "the HTTP transaction")
        .await;
    for (path, status) in [
        (format!("/v1/transactions/{t3}/rollback"), 409),
        ("/v1/transactions/tx-nope/commit".to_owned(), 404),
    ] {
        let answer = qmesh_tests::http::request("POST", http, &path, &[], b"")
            .await
            .unwrap();
        assert_eq!(answer.status, status, "{path}");
    }
    let unknown = qmesh_tests::http::request(
        "POST",
        http,
        "/v1/queues/orders/messages",
        &[("qmesh-transaction", "tx-nope")],
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(unknown.status, 404);

    // Exactly once each.
    let (_, duplicates) = tally(billing.ids());
    assert_eq!(duplicates, 0, "no duplicates: {:?}", billing.ids());
    assert_eq!(
        metric(
            producer.admin,
            r#"qmesh_transactions_total{outcome="committed",decided_by="producer"}"#
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            producer.admin,
            r#"qmesh_transactions_total{outcome="rolled-back",decided_by="producer"}"#
        )
        .await,
        1.0
    );
    assert_eq!(checks.asked(&t1) + checks.asked(&t2), 0, "nobody was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_transaction_is_checked_back_and_settled_as_the_app_answers() {
    let checks = CheckBack::default();
    let port = checks.start().await;
    let mesh = mesh()
        .manifests(&manifests(port, "1s"))
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let [billing, auditing, booking] = consumers(&mesh.sidecar("worker").grpc_url()).await;
    let producer = mesh.sidecar("producer");
    let mut app = client(&producer.grpc_url()).await;

    // The app commits, rolls back, cannot tell; a ledger transaction nobody can be asked about.
    let committed = begin(&mut app).await;
    app.publish(request("orders", "c-1", &committed))
        .await
        .unwrap();
    app.publish(request("audit", "c-2", &committed))
        .await
        .unwrap();
    checks.answer(&committed, "commit");
    let rolled = begin(&mut app).await;
    app.publish(request("orders", "r-1", &rolled))
        .await
        .unwrap();
    checks.answer(&rolled, "rollback");
    let unknown = begin(&mut app).await;
    app.publish(request("orders", "u-1", &unknown))
        .await
        .unwrap();
    let ledger = begin(&mut app).await;
    app.publish(request("ledger", "l-1", &ledger))
        .await
        .unwrap();

    billing
        .expect_prefixed("c-", 1, 20, "the order the check-back committed")
        .await;
    auditing
        .expect_prefixed("c-", 1, 20, "the audit record the check-back committed")
        .await;
    // onUnknown Commit, and no port to ask: committed once checkAfter × maxChecks passed.
    booking
        .expect_prefixed("l-", 1, 20, "the ledger entry onUnknown committed")
        .await;
    // Unknown three times (maxChecks), then onUnknown: Rollback.
    until("the unanswered transaction rolled back", 30, || {
        checks.asked(&unknown) >= 3
    })
    .await;
    let admin = producer.admin;
    let rolled_back_unknown =
        r#"qmesh_transactions_total{outcome="rolled-back",decided_by="on-unknown"}"#;
    qmesh_tests::wait_for("onUnknown applied", Duration::from_secs(20), || async {
        (metric(admin, rolled_back_unknown).await == 1.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(checks.asked(&unknown), 3, "asked maxChecks times, no more");
    assert_eq!(checks.asked(&committed), 1);
    assert_eq!(checks.asked(&rolled), 1);
    assert_eq!(checks.asked(&ledger), 0, "ledger has no check port");
    barrier(&mut app, &billing, "orders", "plain").await;
    assert_eq!(billing.count_prefixed("r-"), 0);
    assert_eq!(billing.count_prefixed("u-"), 0);
    for (series, n) in [
        (
            r#"qmesh_transactions_total{outcome="committed",decided_by="check"}"#,
            1.0,
        ),
        (
            r#"qmesh_transactions_total{outcome="rolled-back",decided_by="check"}"#,
            1.0,
        ),
        (
            r#"qmesh_transactions_total{outcome="committed",decided_by="on-unknown"}"#,
            1.0,
        ),
        (r#"qmesh_transaction_checks_total{answer="unknown"}"#, 3.0),
        (r#"qmesh_transaction_checks_total{answer="commit"}"#, 1.0),
        ("qmesh_transactions_open", 0.0),
        ("qmesh_half_messages", 0.0),
    ] {
        assert_eq!(metric(admin, series).await, n, "{series}");
    }
    // The producer's own commit after the check-back decided: the same answer, or refused.
    let again = app.commit_transaction(txn(&committed)).await.unwrap();
    assert_eq!(again.into_inner().state, "committed");
    let refused = app.commit_transaction(txn(&rolled)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    // Each outcome is an event of the sidecar's stats.
    let stats = stats(admin).await.unwrap();
    let events = stats["transactions"]["events"].as_array().unwrap().clone();
    let decided: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["outcome"].as_str().unwrap().to_owned(),
                e["decidedBy"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("committed", "check"),
        ("rolled-back", "check"),
        ("rolled-back", "on-unknown"),
        ("committed", "on-unknown"),
    ] {
        assert!(
            decided.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} in {decided:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_messages_survive_a_kill_9_and_are_committed_or_checked_back_after_it() {
    let checks = CheckBack::default();
    let port = checks.start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = mesh()
        .manifests(&manifests(port, "2s"))
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .data_dir("producer", dir.path())
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let [billing, auditing, _] = consumers(&mesh.sidecar("worker").grpc_url()).await;
    let mut app = client(&mesh.sidecar("producer").grpc_url()).await;
    // One the producer commits after the restart; one it forgot (the app restarted too).
    let resumed = begin(&mut app).await;
    app.publish(request("orders", "k-1", &resumed))
        .await
        .unwrap();
    app.publish(request("audit", "k-2", &resumed))
        .await
        .unwrap();
    let forgotten = begin(&mut app).await;
    app.publish(request("orders", "f-1", &forgotten))
        .await
        .unwrap();
    checks.answer(&forgotten, "commit");
    let dropped = begin(&mut app).await;
    app.publish(request("orders", "d-1", &dropped))
        .await
        .unwrap();
    checks.answer(&dropped, "rollback");

    let producer = mesh.sidecar_mut("producer");
    producer.kill9();
    producer.restart().await.unwrap();
    let producer = mesh.sidecar("producer");
    let mut app = client(&producer.grpc_url()).await;
    assert_eq!(
        metric(producer.admin, "qmesh_half_messages").await,
        4.0,
        "the half messages are back"
    );
    let done = app
        .commit_transaction(txn(&resumed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.messages, 2);
    billing
        .expect_prefixed("k-", 1, 20, "the resumed order")
        .await;
    auditing
        .expect_prefixed("k-", 1, 20, "the resumed audit record")
        .await;
    billing
        .expect_prefixed(
            "f-",
            1,
            30,
            "the forgotten transaction, committed by check-back",
        )
        .await;
    until("the dropped transaction checked back", 30, || {
        checks.asked(&dropped) >= 1
    })
    .await;
    let admin = producer.admin;
    qmesh_tests::wait_for("no half message left", Duration::from_secs(20), || async {
        (metric(admin, "qmesh_half_messages").await == 0.0).then_some(())
    })
    .await
    .unwrap();
    barrier(&mut app, &billing, "orders", "plain").await;
    assert_eq!(billing.count_prefixed("d-"), 0);
    let (_, duplicates) = tally(billing.ids());
    assert_eq!(duplicates, 0, "once each: {:?}", billing.ids());

    // Settled half messages stay settled across another restart.
    let producer = mesh.sidecar_mut("producer");
    producer.kill9();
    producer.restart().await.unwrap();
    assert_eq!(
        metric(mesh.sidecar("producer").admin, "qmesh_half_messages").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_is_handed_over_on_a_graceful_stop_and_checked_back_by_the_peer() {
    let checks = CheckBack::default();
    let port = checks.start().await;
    let mut mesh = mesh()
        .manifests(&manifests(port, "3s"))
        .sidecar("producer", &[("app", "producer")])
        .sidecar("standby", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--shutdown-grace")
        .arg("2s")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let [billing, _auditing, _] = consumers(&mesh.sidecar("worker").grpc_url()).await;
    let mut app = client(&mesh.sidecar("producer").grpc_url()).await;
    let open = begin(&mut app).await;
    for i in 0..3 {
        app.publish(request("orders", &format!("h-{i}"), &open))
            .await
            .unwrap();
    }
    let rolled = begin(&mut app).await;
    app.publish(request("orders", "x-1", &rolled))
        .await
        .unwrap();
    checks.answer(&rolled, "rollback");
    mesh.sidecar("producer").terminate().unwrap();
    let code = mesh
        .sidecar_mut("producer")
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let standby = mesh.sidecar("standby").admin;
    assert_eq!(
        metric(standby, "qmesh_half_messages").await,
        4.0,
        "the peer holds the half messages"
    );
    // The producer app's local transaction committed: the peer's check-back finds out.
    checks.answer(&open, "commit");
    billing
        .expect_prefixed("h-", 3, 30, "the handed-over transaction's messages")
        .await;
    until("the rolled-back one checked back", 30, || {
        checks.asked(&rolled) >= 1
    })
    .await;
    let mut standby_app = client(&mesh.sidecar("standby").grpc_url()).await;
    barrier(&mut standby_app, &billing, "orders", "plain").await;
    assert_eq!(billing.count_prefixed("x-"), 0);
    let (_, duplicates) = tally(billing.ids());
    assert_eq!(duplicates, 0, "once each: {:?}", billing.ids());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_a_full_queue_holds_up_is_finished_later_even_across_a_kill_9() {
    let checks = CheckBack::default();
    let port = checks.start().await;
    let dir = tempfile::tempdir().unwrap();
    // `audit` takes one message at a time (retention Reject): a commit can get half way.
    let manifests = manifests(port, "1s").replace(
        "metadata: {name: audit}\nspec:\n",
        "metadata: {name: audit}\nspec:\n  retention: {maxMessages: 1}\n",
    );
    assert!(manifests.contains("maxMessages: 1"));
    let mut mesh = mesh()
        .manifests(&manifests)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .data_dir("producer", dir.path())
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let worker = mesh.sidecar("worker").grpc_url();
    let billing = Consumer::start("b", &worker, "billing", 0, |_| Verdict::Ack).await;
    let mut app = client(&mesh.sidecar("producer").grpc_url()).await;
    // Nobody consumes audit yet: one plain message fills it.
    app.publish(request("audit", "filler", "")).await.unwrap();
    let t = begin(&mut app).await;
    app.publish(request("orders", "p-1", &t)).await.unwrap();
    app.publish(request("audit", "p-2", &t)).await.unwrap();
    let held_up = app.commit_transaction(txn(&t)).await.unwrap_err();
    assert_eq!(
        held_up.code(),
        tonic::Code::ResourceExhausted,
        "{held_up:?}"
    );
    assert!(
        held_up
            .message()
            .contains("is committed, and 1 of its 2 messages"),
        "{}",
        held_up.message()
    );
    billing
        .expect_prefixed("p-1", 1, 20, "the stored half")
        .await;
    // Decided: a rollback is refused, and the decision survives a kill -9.
    let refused = app.rollback_transaction(txn(&t)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let producer = mesh.sidecar_mut("producer");
    producer.kill9();
    producer.restart().await.unwrap();
    // Room in audit: the rest of the commit goes in, with no check-back (nothing was unknown).
    let auditing = Consumer::start("a", &worker, "auditing", 0, |_| Verdict::Ack).await;
    auditing
        .expect_prefixed("p-2", 1, 30, "the rest of the commit")
        .await;
    let mut app = client(&mesh.sidecar("producer").grpc_url()).await;
    barrier(&mut app, &billing, "orders", "plain").await;
    assert_eq!(
        billing.count_prefixed("p-1"),
        1,
        "stored once: {:?}",
        billing.ids()
    );
    assert_eq!(auditing.count_prefixed("p-2"), 1);
    assert_eq!(checks.asked(&t), 0, "a decided commit is not checked back");
    let again = app.commit_transaction(txn(&t)).await.unwrap().into_inner();
    assert_eq!((again.state.as_str(), again.messages), ("committed", 2));
    assert_eq!(
        metric(mesh.sidecar("producer").admin, "qmesh_half_messages").await,
        0.0
    );
}
