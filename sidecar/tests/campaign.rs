//! The fault campaign (Jepsen-style): five real sidecars of one mesh, producers publishing with ids
//! and keys, consumer apps that ack, nack, stay slow, hold deliveries and disconnect, and a seeded
//! schedule of faults — kill -9, SIGTERM hand-over, frozen pods, partitions (a TCP proxy in front
//! of every peer port), app disconnects, a full disk — while `analytics` is rewound now and then
//! (replays from the log under all of it). Some orders are delayed, some are published in
//! transactions that the producer commits or rolls back (and answers check-backs about). A checker reads the recorded history (never
//! the system's own counters) and verifies the promises, each named as a sentence.
//!
//! ```text
//!   seed ──▶ schedule of faults ──▶ mesh (shop-1, shop-2, worker-1, worker-2, auditor)
//!   producers ──publish──▶ history ◀──deliveries / verdicts── consumer apps
//!   faults stop ──▶ everything drains ──▶ checker(history) ──▶ pass, or the seed + history file
//! ```
//!
//! CI runs four fixed seeds for a short while; `hack/chaos.sh --minutes N
//! [--seed S]` runs a long one (the ignored test `long_campaign`, reading `QMESH_CHAOS_MINUTES`
//! and `QMESH_CHAOS_SEED`). `QMESH_CHAOS_DEBUG=1` keeps the history and the sidecars' logs of a
//! campaign that passed too.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use qmesh_proto::v1::{self, Ack, Nack, Open, SubscribeRequest, subscribe_request};
use qmesh_tests::{Mesh, ProxyMode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
  deadLetterQueue: orders-dlq
  retention: {keepAcked: 1m}
  transaction: {checkAfter: 1s, maxChecks: 20, checkPort: CHECK_PORT}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders-dlq}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: payments}
spec:
  publishers: {matchLabels: {app: shop}}
  publishAck: Replicated
  dedupWindow: 10m
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: events}
spec:
  publishers: {matchLabels: {app: shop}}
  ordering: Key
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: worker}}
  delivery: {maxInFlight: 8, ackTimeout: 2s}
  retry: {maxDeliveries: 4, backoff: {initial: 50ms, max: 400ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: analytics}
spec:
  queue: orders
  consumers: {matchLabels: {app: auditor}}
  delivery: {maxInFlight: 16, ackTimeout: 2s}
  retry: {maxDeliveries: 1000, backoff: {initial: 50ms, max: 400ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dlq-audit}
spec:
  queue: orders-dlq
  consumers: {matchLabels: {app: auditor}}
  retry: {maxDeliveries: 1000, backoff: {initial: 50ms, max: 400ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: ledger}
spec:
  queue: payments
  consumers: {matchLabels: {app: worker}}
  delivery: {maxInFlight: 8, ackTimeout: 2s}
  retry: {maxDeliveries: 1000, backoff: {initial: 50ms, max: 400ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: timeline}
spec:
  queue: events
  consumers: {matchLabels: {app: worker}}
  delivery: {maxInFlight: 8, ackTimeout: 2s}
  retry: {maxDeliveries: 1000, backoff: {initial: 50ms, max: 400ms}}
"#;

const PRODUCERS: [&str; 2] = ["shop-1", "shop-2"];
/// (sidecar, subscription) of every consumer app.
const CONSUMERS: [(&str, &str); 8] = [
    ("worker-1", "billing"),
    ("worker-2", "billing"),
    ("worker-1", "ledger"),
    ("worker-2", "ledger"),
    ("worker-1", "timeline"),
    ("worker-2", "timeline"),
    ("auditor", "analytics"),
    ("auditor", "dlq-audit"),
];
/// Subscriptions of each queue that must see every acknowledged publish.
const ROUTES: [(&str, &str); 4] = [
    ("orders", "billing"),
    ("orders", "analytics"),
    ("payments", "ledger"),
    ("events", "timeline"),
];
/// The subscriptions' `ackTimeout`.
const ACK_TIMEOUT_SECS: f64 = 2.0;
/// Most resident memory any sidecar may reach during a campaign.
const RSS_BOUND: u64 = 256 * 1024 * 1024;

// === the seeded schedule ===

/// splitmix64: small, seedable, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

// === the history ===

/// Everything that happened, in order, with times since the start.
struct History {
    started: Instant,
    events: Mutex<Vec<Value>>,
}

impl History {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            events: Mutex::new(Vec::new()),
        })
    }

    fn record(&self, mut event: Value) {
        event["t"] = json!(self.started.elapsed().as_secs_f64());
        self.events.lock().unwrap().push(event);
    }

    fn snapshot(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    fn save(&self, path: &Path) {
        let text: String = self.snapshot().iter().map(|e| format!("{e}\n")).collect();
        let _ = std::fs::create_dir_all(path.parent().unwrap());
        let _ = std::fs::write(path, text);
    }
}

// === the workload ===

/// What each producer decided for its transactions (`commit` / `rollback`), as its app's local
/// transaction would: check-backs are answered from here.
type Decisions = Arc<Mutex<HashMap<String, &'static str>>>;

/// The producer apps' check-back endpoint, on a free loopback port; the port.
async fn answer_check_backs(decisions: Decisions) -> u16 {
    use axum::{Json, extract::State, routing::post};
    let app = axum::Router::new()
        .route(
            "/qmesh/transaction-check",
            post(
                |State(decisions): State<Decisions>, Json(body): Json<Value>| async move {
                    let id = body["transaction"].as_str().unwrap_or_default();
                    let decided = decisions.lock().unwrap().get(id).copied();
                    decided.unwrap_or("unknown").to_owned()
                },
            ),
        )
        .with_state(decisions);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// One transaction of 1–3 orders: begun, published, then committed or rolled back as the producer
/// decides (rolled back when a publish in it failed). Its messages are recorded as publishes:
/// `ok` when committed (they must all be delivered, even if the commit call itself failed: the
/// check-back finishes it), `rolled-back` otherwise (none may ever be delivered).
async fn transaction(
    c: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>,
    sidecar: &str,
    n: u64,
    rng: &mut Rng,
    history: &History,
    decisions: &Decisions,
) -> Result<(), String> {
    let call = Duration::from_secs(8);
    let begun = tokio::time::timeout(call, c.begin_transaction(v1::BeginTransactionRequest {}))
        .await
        .map_err(|_| "begin timed out".to_owned())?
        .map_err(|s| s.message().to_owned())?;
    let txn = begun.into_inner().transaction;
    let mut ids = Vec::new();
    let mut failed = false;
    for i in 0..=rng.below(3) {
        let id = format!("{sidecar}-t{n}-{i}");
        let request = v1::PublishRequest {
            queue: "orders".into(),
            message: Some(message(&id, "", "order")),
            correlation: n,
            delay: None,
            deliver_at: None,
            transaction: txn.clone(),
        };
        match tokio::time::timeout(call, c.publish(request)).await {
            Ok(Ok(_)) => ids.push(id),
            _ => {
                // Maybe stored, maybe not: the app's local transaction fails, and rolls back.
                ids.push(id);
                failed = true;
                break;
            }
        }
    }
    let decision = if !failed && rng.chance(70) {
        "commit"
    } else {
        "rollback"
    };
    decisions.lock().unwrap().insert(txn.clone(), decision);
    let settled = if decision == "commit" {
        tokio::time::timeout(
            call,
            c.commit_transaction(v1::TransactionRequest {
                transaction: txn.clone(),
            }),
        )
        .await
    } else {
        tokio::time::timeout(
            call,
            c.rollback_transaction(v1::TransactionRequest {
                transaction: txn.clone(),
            }),
        )
        .await
    };
    let answer = match settled {
        Ok(Ok(_)) => "ok".to_owned(),
        Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
        Err(_) => "timed out".to_owned(),
    };
    history.record(
        json!({"kind": "transaction", "producer": sidecar, "transaction": txn,
        "decision": decision, "answer": answer, "ids": ids}),
    );
    for id in ids {
        let outcome = if decision == "commit" {
            "ok"
        } else {
            "rolled-back"
        };
        history.record(
            json!({"kind": "publish", "queue": "orders", "producer": sidecar, "id": id,
            "key": "", "payload": "order", "outcome": outcome, "transaction": txn}),
        );
    }
    Ok(())
}

/// A producer app: publishes to its own sidecar until told to stop.
async fn produce(
    sidecar: String,
    url: String,
    seed: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    decisions: Decisions,
) {
    let mut rng = Rng(seed);
    let mut per_key: HashMap<String, u64> = HashMap::new();
    let mut sent_payments: Vec<String> = Vec::new();
    let mut n = 0u64;
    let mut client = None;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let roll = rng.below(100);
        let (queue, id, key, payload) = if roll < 50 {
            let poison = rng.chance(3);
            (
                "orders",
                format!("{sidecar}-o{n}"),
                String::new(),
                if poison { "poison" } else { "order" }.to_owned(),
            )
        } else if roll < 75 {
            // Now and then a producer retries a payment it sent before (same id).
            let id = if !sent_payments.is_empty() && rng.chance(10) {
                rng.pick(&sent_payments).clone()
            } else {
                let id = format!("{sidecar}-p{n}");
                sent_payments.push(id.clone());
                id
            };
            ("payments", id, String::new(), "payment".to_owned())
        } else {
            let key = format!("{sidecar}-k{}", rng.below(4));
            let next = per_key.entry(key.clone()).or_default();
            *next += 1;
            ("events", format!("{sidecar}-e{n}"), key, next.to_string())
        };
        if client.is_none() {
            client = tokio::time::timeout(
                Duration::from_secs(2),
                v1::broker_client::BrokerClient::connect(url.clone()),
            )
            .await
            .ok()
            .and_then(Result::ok);
        }
        let Some(c) = client.as_mut() else {
            history.record(
                json!({"kind": "publish", "queue": queue, "producer": sidecar, "id": id,
                "key": key, "payload": payload, "outcome": "refused", "error": "unreachable"}),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // Some orders go in transactions.
        if queue == "orders" && payload == "order" && rng.chance(8) {
            if let Err(error) = transaction(c, &sidecar, n, &mut rng, &history, &decisions).await {
                history.record(json!({"kind": "transaction", "producer": sidecar,
                    "answer": error}));
                client = None;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
            continue;
        }
        // Some orders are delayed messages: they must not reach a consumer before their time.
        let delay = (queue == "orders" && payload == "order" && rng.chance(10))
            .then(|| rng.millis(200, 1500));
        let sent = history.started.elapsed().as_secs_f64();
        let request = v1::PublishRequest {
            queue: queue.to_owned(),
            message: Some(message(&id, &key, &payload)),
            correlation: n,
            delay: delay.map(qmesh_proto::convert::duration),
            deliver_at: None,
            transaction: String::new(),
        };
        let outcome = tokio::time::timeout(Duration::from_secs(8), c.publish(request)).await;
        let (outcome, error) = match outcome {
            Ok(Ok(r)) if r.get_ref().duplicate => ("duplicate", String::new()),
            Ok(Ok(_)) => ("ok", String::new()),
            // A status from the sidecar is a refusal; a broken connection or a timeout leaves the
            // outcome unknown (it may have been stored).
            Ok(Err(status))
                if status.code() != tonic::Code::Unavailable
                    || status.message().contains("shutting down")
                    || status.message().contains("replica") =>
            {
                (
                    "refused",
                    format!("{:?}: {}", status.code(), status.message()),
                )
            }
            Ok(Err(status)) => {
                client = None;
                ("unknown", status.message().to_owned())
            }
            Err(_) => {
                client = None;
                ("unknown", "timed out".to_owned())
            }
        };
        history.record(
            json!({"kind": "publish", "queue": queue, "producer": sidecar, "id": id,
            "key": key, "payload": payload, "outcome": outcome, "error": error, "sent": sent,
            "delay": delay.map(|d| d.as_secs_f64())}),
        );
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// Rewinds `analytics` on the auditor's sidecar every few seconds, to 5–15 s back, until
/// `stop`: replays from the log run under kill -9, partitions and full disks like everything else.
/// Each attempt is recorded from its start to its answer (or its failure).
async fn rewind_now_and_then(url: String, seed: u64, history: Arc<History>, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(rng.millis(3000, 8000)).await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // Far enough back to reach past what the (slow, holding) analytics app still owes.
        let to = std::time::SystemTime::now() - rng.millis(5_000, 15_000);
        history.record(json!({"kind": "rewind", "phase": "start", "sub": "analytics"}));
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut client = v1::broker_client::BrokerClient::connect(url.clone())
                .await
                .ok()?;
            client
                .rewind(v1::RewindRequest {
                    subscription: "analytics".into(),
                    to: Some(to.into()),
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        })
        .await
        .ok()
        .flatten();
        history.record(json!({"kind": "rewind", "phase": "end", "sub": "analytics",
            "replaying": answer.map(|a| a.replaying)}));
    }
}

/// A consumer app on one sidecar and subscription: takes deliveries and acks, nacks, holds or
/// works slowly on them; reconnects whenever its stream ends or it is told to disconnect.
async fn consume(
    sidecar: String,
    subscription: String,
    url: String,
    seed: u64,
    history: Arc<History>,
    disconnect: Arc<tokio::sync::Notify>,
    calm: Arc<AtomicBool>,
) {
    let mut rng = Rng(seed);
    let name = format!("{sidecar}/{subscription}");
    loop {
        let Ok(Ok(mut client)) = tokio::time::timeout(
            Duration::from_secs(2),
            v1::broker_client::BrokerClient::connect(url.clone()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (tx, rx) = mpsc::channel(256);
        let window = 1 + rng.below(8) as u32;
        let open = SubscribeRequest {
            request: Some(subscribe_request::Request::Open(Open {
                subscription: subscription.clone(),
                max_in_flight: window,
                manual_credit: false,
            })),
        };
        if tx.send(open).await.is_err() {
            continue;
        }
        let Ok(Ok(response)) = tokio::time::timeout(
            Duration::from_secs(3),
            client.subscribe(ReceiverStream::new(rx)),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut inbound = response.into_inner();
        loop {
            let next = tokio::select! {
                next = inbound.next() => next,
                () = disconnect.notified() => {
                    history.record(json!({"kind": "fault", "fault": "app-disconnect", "target": name}));
                    break;
                }
            };
            let Some(Ok(response)) = next else { break };
            let Some(v1::subscribe_response::Response::Deliveries(batch)) = response.response
            else {
                continue;
            };
            for d in batch.deliveries {
                let m = d.message.unwrap_or_default();
                let calm = calm.load(Ordering::SeqCst);
                let poison = subscription == "billing" && m.payload.as_ref() == b"poison";
                let roll = rng.below(100);
                let verdict = if poison {
                    // Half the time the consumer gives up at once (AMQP's reject, requeue=false).
                    if roll < 50 { "reject" } else { "nack" }
                } else if calm {
                    "ack"
                } else if subscription == "billing" && roll < 2 {
                    "reject"
                } else if subscription == "billing" && roll < 5 {
                    "nack"
                } else if roll < 9 {
                    "nack-delay"
                } else if roll < 12 {
                    "hold"
                } else if roll < 16 {
                    "slow"
                } else {
                    "ack"
                };
                history.record(
                    json!({"kind": "deliver", "sub": subscription, "consumer": name,
                    "id": m.id, "key": m.key, "payload": String::from_utf8_lossy(&m.payload),
                    "attempt": d.attempt, "verdict": verdict,
                    "original_id": m.headers.get("qmesh-original-id"),
                    "original_sub": m.headers.get("qmesh-original-subscription"),
                    "reason": m.headers.get("qmesh-dead-letter-reason")}),
                );
                let request = match verdict {
                    "nack" => subscribe_request::Request::Nack(Nack {
                        receipts: vec![d.receipt],
                        delay: None,
                        reason: "campaign nack".into(),
                        dead_letter: false,
                    }),
                    "reject" => subscribe_request::Request::Nack(Nack {
                        receipts: vec![d.receipt],
                        delay: None,
                        reason: "campaign reject".into(),
                        dead_letter: true,
                    }),
                    "nack-delay" => subscribe_request::Request::Nack(Nack {
                        receipts: vec![d.receipt],
                        delay: Some(qmesh_proto::convert::duration(rng.millis(50, 300))),
                        reason: "campaign nack with delay".into(),
                        dead_letter: false,
                    }),
                    "hold" => continue,
                    "slow" => {
                        tokio::time::sleep(rng.millis(100, 600)).await;
                        subscribe_request::Request::Ack(Ack {
                            receipts: vec![d.receipt],
                        })
                    }
                    _ => subscribe_request::Request::Ack(Ack {
                        receipts: vec![d.receipt],
                    }),
                };
                if tx
                    .send(SubscribeRequest {
                        request: Some(request),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                history.record(json!({"kind": "settle", "sub": subscription, "id": m.id,
                    "attempt": d.attempt, "verdict": verdict}));
            }
        }
        tokio::time::sleep(rng.millis(50, 500)).await;
    }
}

// === faults ===

#[derive(Default)]
struct FaultCounts(BTreeMap<&'static str, u64>);

/// Runs the seeded fault schedule until `until`.
async fn run_faults(
    mesh: &mut Mesh,
    rng: &mut Rng,
    until: Instant,
    history: &History,
    disconnects: &HashMap<String, Arc<tokio::sync::Notify>>,
    ballast: Option<&Path>,
    peak: &AtomicU64,
) -> anyhow::Result<FaultCounts> {
    let names = mesh.names();
    let mut counts = FaultCounts::default();
    while Instant::now() < until {
        tokio::time::sleep(rng.millis(1000, 3000)).await;
        for name in &names {
            if let Some(rss) = mesh.sidecar(name).rss_bytes() {
                peak.fetch_max(rss, Ordering::SeqCst);
            }
        }
        let target = rng.pick(&names).clone();
        let kind = match rng.below(100) {
            0..=24 => "kill-9",
            25..=39 => "sigterm",
            40..=54 => "pause",
            55..=74 => "partition",
            75..=89 => "app-disconnect",
            _ if ballast.is_some() => "disk-full",
            _ => "app-disconnect",
        };
        *counts.0.entry(kind).or_default() += 1;
        if kind != "app-disconnect" {
            history.record(json!({"kind": "fault", "fault": kind, "target": target}));
        }
        match kind {
            "kill-9" => {
                let s = mesh.sidecar_mut(&target);
                s.kill9();
                tokio::time::sleep(rng.millis(200, 1500)).await;
                s.restart().await?;
            }
            "sigterm" => {
                let s = mesh.sidecar_mut(&target);
                s.terminate()?;
                let code = s.wait_exit(Duration::from_secs(30)).await?;
                anyhow::ensure!(
                    code == Some(0),
                    "{target} exited with {code:?} after SIGTERM"
                );
                s.restart().await?;
            }
            "pause" => {
                let s = mesh.sidecar(&target);
                s.pause()?;
                tokio::time::sleep(rng.millis(500, 3000)).await;
                s.resume()?;
            }
            "partition" => {
                let proxy = mesh.proxy(&target);
                proxy.set(if rng.chance(50) {
                    ProxyMode::Blackhole
                } else {
                    ProxyMode::Reset
                });
                tokio::time::sleep(rng.millis(1000, 4000)).await;
                proxy.set(ProxyMode::Pass);
            }
            "disk-full" => {
                // Fill shop-2's small data filesystem for a while, then free it.
                if let Some(file) = ballast {
                    let _ = std::fs::write(file, vec![0u8; 64 * 1024 * 1024]);
                    tokio::time::sleep(rng.millis(1000, 3000)).await;
                    let _ = std::fs::remove_file(file);
                }
            }
            _ => {
                let consumers: Vec<&String> = disconnects.keys().collect();
                let who = rng.pick(&consumers);
                disconnects[*who].notify_one();
            }
        }
        history.record(json!({"kind": "fault-end", "fault": kind, "target": target}));
    }
    Ok(counts)
}

// === the checker ===

/// What the checker found.
#[derive(Debug, Default)]
struct Verdict {
    failures: Vec<String>,
    published: u64,
    unknown: u64,
    refused: u64,
    deliveries: u64,
    dead_letters: u64,
    rejected: u64,
    delayed: u64,
    committed: u64,
    rolled_back: u64,
    duplicates: u64,
    redeliveries: u64,
    repeats_after_faults: u64,
    repeats_after_rewinds: u64,
}

fn check(history: &[Value]) -> Verdict {
    let mut v = Verdict::default();
    let mut acked_publishes: Vec<&Value> = Vec::new();
    for e in history.iter().filter(|e| e["kind"] == "publish") {
        match e["outcome"].as_str() {
            Some("ok") => acked_publishes.push(e),
            Some("unknown") => v.unknown += 1,
            Some("refused") => v.refused += 1,
            _ => {}
        }
    }
    v.published = acked_publishes.len() as u64;
    // Deliveries per (subscription, id), in order.
    let mut seen: HashMap<(&str, &str), Vec<&Value>> = HashMap::new();
    let mut acked: HashSet<(&str, &str)> = HashSet::new();
    let mut dead: HashMap<&str, &Value> = HashMap::new();
    for e in history.iter().filter(|e| e["kind"] == "deliver") {
        v.deliveries += 1;
        if e["verdict"] == "reject" {
            v.rejected += 1;
        }
        let sub = e["sub"].as_str().unwrap_or_default();
        let id = e["id"].as_str().unwrap_or_default();
        if sub == "dlq-audit" {
            if let Some(original) = e["original_id"].as_str() {
                dead.insert(original, e);
            }
            continue;
        }
        seen.entry((sub, id)).or_default().push(e);
        if !matches!(
            e["verdict"].as_str(),
            Some("nack" | "nack-delay" | "hold" | "reject")
        ) {
            acked.insert((sub, id));
        }
    }
    v.dead_letters = dead.len() as u64;

    // every_acknowledged_publish_is_delivered_to_every_subscription_or_dead_lettered
    let mut missing = Vec::new();
    for p in &acked_publishes {
        let queue = p["queue"].as_str().unwrap_or_default();
        let id = p["id"].as_str().unwrap_or_default();
        for (_, sub) in ROUTES.iter().filter(|(q, _)| *q == queue) {
            let done = acked.contains(&(*sub, id))
                || (*sub == "billing"
                    && dead.get(id).is_some_and(|d| d["original_sub"] == "billing"));
            if !done {
                missing.push(format!("{sub}:{id}"));
            }
        }
        if queue == "orders" && p["payload"] == "poison" && !dead.contains_key(id) {
            missing.push(format!("dead-letter of poison {id}"));
        }
    }
    if !missing.is_empty() {
        v.failures.push(format!(
            "every_acknowledged_publish_is_delivered_to_every_subscription_or_dead_lettered: {} missing, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }

    // no_delayed_message_is_delivered_before_its_time
    let not_before: HashMap<&str, f64> = history
        .iter()
        .filter(|e| e["kind"] == "publish")
        .filter_map(|e| {
            let delay = e["delay"].as_f64()?;
            Some((e["id"].as_str()?, e["sent"].as_f64()? + delay))
        })
        .collect();
    v.delayed = history
        .iter()
        .filter(|e| e["kind"] == "publish" && e["outcome"] == "ok" && e["delay"].is_number())
        .count() as u64;
    for e in history.iter().filter(|e| e["kind"] == "deliver") {
        let id = e["id"].as_str().unwrap_or_default();
        let t = e["t"].as_f64().unwrap_or(0.0);
        // 20 ms for the two clocks (the owner's wall clock, this process's monotonic one).
        if let Some(due) = not_before.get(id)
            && t + 0.02 < *due
        {
            v.failures.push(format!(
                "no_delayed_message_is_delivered_before_its_time: {id} delivered at {t:.3}s, due at {due:.3}s"
            ));
        }
    }

    // no_message_of_a_rolled_back_transaction_is_ever_delivered (and committed ones are all
    // delivered: they are acknowledged publishes above)
    let rolled_back: HashSet<&str> = history
        .iter()
        .filter(|e| e["kind"] == "publish" && e["outcome"] == "rolled-back")
        .filter_map(|e| e["id"].as_str())
        .collect();
    let transactions = history
        .iter()
        .filter(|e| e["kind"] == "transaction" && e["decision"].is_string());
    for t in transactions {
        if t["decision"] == "commit" {
            v.committed += 1;
        } else {
            v.rolled_back += 1;
        }
    }
    for e in history.iter().filter(|e| e["kind"] == "deliver") {
        let id = e["id"].as_str().unwrap_or_default();
        if rolled_back.contains(id)
            || e["original_id"]
                .as_str()
                .is_some_and(|o| rolled_back.contains(o))
        {
            v.failures.push(format!(
                "no_message_of_a_rolled_back_transaction_is_ever_delivered: {e}"
            ));
        }
    }

    // dead_letters_carry_their_reason_and_come_from_published_messages
    let published_ids: HashSet<&str> = history
        .iter()
        .filter(|e| e["kind"] == "publish")
        .filter_map(|e| e["id"].as_str())
        .collect();
    for (id, d) in &dead {
        if !published_ids.contains(id) || d["reason"].as_str().is_none_or(str::is_empty) {
            v.failures.push(format!(
                "dead_letters_carry_their_reason_and_come_from_published_messages: {d}"
            ));
        }
    }

    // every_duplicate_is_explained_by_a_failed_attempt_or_a_fault: a delivery comes again only
    // after a nack, a hold, an ack sent past the ack timeout (late), or during or just after a fault.
    let mut faults: Vec<(f64, f64)> = Vec::new();
    let mut open_faults: HashMap<(&str, &str), f64> = HashMap::new();
    for e in history.iter() {
        let key = (
            e["fault"].as_str().unwrap_or_default(),
            e["target"].as_str().unwrap_or_default(),
        );
        let t = e["t"].as_f64().unwrap_or(0.0);
        if e["kind"] == "fault" {
            if key.0 == "app-disconnect" {
                faults.push((t, t));
            } else {
                open_faults.insert(key, t);
            }
        } else if e["kind"] == "fault-end"
            && let Some(start) = open_faults.remove(&key)
        {
            faults.push((start, t));
        }
    }
    faults.extend(open_faults.values().map(|t| (*t, f64::MAX)));
    // Rewinds (`analytics`, 5–15 s back): each from its start to its answer.
    let mut rewinds: Vec<(f64, f64)> = Vec::new();
    let mut rewinding: Option<f64> = None;
    for e in history.iter().filter(|e| e["kind"] == "rewind") {
        let t = e["t"].as_f64().unwrap_or(0.0);
        match e["phase"].as_str() {
            Some("start") => rewinding = Some(t),
            _ => rewinds.extend(rewinding.take().map(|start| (start, t))),
        }
    }
    rewinds.extend(rewinding.map(|start| (start, f64::MAX)));
    let settled_at: HashMap<(&str, &str, u64), f64> = history
        .iter()
        .filter(|e| e["kind"] == "settle")
        .map(|e| {
            (
                (
                    e["sub"].as_str().unwrap_or_default(),
                    e["id"].as_str().unwrap_or_default(),
                    e["attempt"].as_u64().unwrap_or(0),
                ),
                e["t"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let publish_t: HashMap<&str, f64> = history
        .iter()
        .filter(|e| e["kind"] == "publish")
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default(),
                e["t"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    for ((sub, id), deliveries) in &seen {
        if deliveries.len() < 2 {
            continue;
        }
        v.duplicates += 1;
        for pair in deliveries.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            let (t0, t1) = (
                before["t"].as_f64().unwrap_or(0.0),
                after["t"].as_f64().unwrap_or(0.0),
            );
            let attempt = before["attempt"].as_u64().unwrap_or(0);
            // A reject (dead-letter now) is not a failure that brings the message back.
            let failed = matches!(
                before["verdict"].as_str(),
                Some("nack" | "nack-delay" | "hold")
            );
            let late = settled_at
                .get(&(*sub, *id, attempt))
                // Sent so close to the deadline that a loaded machine may deliver it after it.
                .is_none_or(|at| at - t0 >= ACK_TIMEOUT_SECS - 1.0);
            let fault_between = faults
                .iter()
                .any(|(start, end)| *start - 0.5 <= t1 && t0 <= end + 2.0);
            // A rewind covers what was published before it answered; its scan runs after, so a
            // message first delivered meanwhile may come again once it is acked.
            let published = publish_t.get(id).copied().unwrap_or(0.0);
            let rewound = *sub == "analytics"
                && rewinds
                    .iter()
                    .any(|(start, end)| *start <= t1 && published <= *end);
            if failed || late {
                v.redeliveries += 1;
            } else if rewound {
                v.repeats_after_rewinds += 1;
            } else if fault_between {
                v.repeats_after_faults += 1;
            } else {
                v.failures.push(format!(
                    "every_duplicate_is_explained_by_a_failed_attempt_or_a_fault: {sub}:{id} delivered again at {t1:.2}s after an ack at {t0:.2}s with no fault between"
                ));
            }
        }
    }

    // key_order_holds_per_producer_between_hand_overs: first deliveries of a key follow publish
    // order, except across a SIGTERM hand-over of the producer's sidecar.
    let mut publish_t: HashMap<&str, f64> = HashMap::new();
    let mut key_seq: HashMap<&str, (&str, u64)> = HashMap::new();
    for p in acked_publishes.iter().filter(|p| p["queue"] == "events") {
        let id = p["id"].as_str().unwrap_or_default();
        publish_t.insert(id, p["t"].as_f64().unwrap_or(0.0));
        let seq = p["payload"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        key_seq.insert(id, (p["key"].as_str().unwrap_or_default(), seq));
    }
    let hand_overs: Vec<(&str, f64)> = history
        .iter()
        .filter(|e| e["kind"] == "fault" && e["fault"] == "sigterm")
        .map(|e| {
            (
                e["target"].as_str().unwrap_or_default(),
                e["t"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let mut last: HashMap<&str, (u64, &str)> = HashMap::new();
    let mut first_seen: HashSet<&str> = HashSet::new();
    for e in history
        .iter()
        .filter(|e| e["kind"] == "deliver" && e["sub"] == "timeline")
    {
        let id = e["id"].as_str().unwrap_or_default();
        let Some((key, seq)) = key_seq.get(id).copied() else {
            continue;
        };
        if !first_seen.insert(id) {
            continue;
        }
        if let Some((prev_seq, prev_id)) = last.get(key).copied()
            && seq < prev_seq
        {
            let producer = key.rsplit_once("-k").map_or("", |(p, _)| p);
            let (a, b) = (publish_t[id], publish_t[prev_id]);
            let across_hand_over = hand_overs
                .iter()
                .any(|(target, t)| *target == producer && *t >= a.min(b) && *t <= a.max(b));
            if !across_hand_over {
                v.failures.push(format!(
                    "key_order_holds_per_producer_between_hand_overs: key {key}: {id} (#{seq}) first delivered after {prev_id} (#{prev_seq})"
                ));
            }
        }
        let entry = last.entry(key).or_insert((seq, id));
        if seq > entry.0 {
            *entry = (seq, id);
        }
    }
    v
}

// === the campaign ===

struct Campaign {
    seed: u64,
    faults_for: Duration,
}

async fn run_campaign(c: Campaign) {
    let Campaign { seed, faults_for } = c;
    eprintln!("fault campaign: seed {seed}, faults for {faults_for:?}");
    let mut rng = Rng(seed);
    // A small filesystem of its own for shop-2's data, where root may mount one.
    let scratch = tempfile::tempdir().unwrap();
    let disk = scratch.path().join("shop-2");
    std::fs::create_dir_all(&disk).unwrap();
    let tmpfs = Tmpfs::mount(&disk, "48m");
    let mounted = tmpfs.is_some();
    let ballast = mounted.then(|| disk.join("ballast"));
    let decisions: Decisions = Arc::default();
    let check_port = answer_check_backs(Arc::clone(&decisions)).await;
    let mut builder = mesh()
        .manifests(&MESH.replace("CHECK_PORT", &check_port.to_string()))
        .proxied()
        .arg("--shutdown-grace")
        .arg("6s")
        .arg("--segment-bytes")
        .arg("1048576")
        .arg("--replica-timeout")
        .arg("3s")
        .arg("--fsync")
        .arg("interval:5ms")
        // The smallest memory budget: backlogs built up under the faults spill to the log and are
        // read back, so the campaign checks paging too (at 256 KiB, once partitions stopped losing
        // bytes, they no longer did).
        .arg("--memory-budget")
        .arg("64Ki");
    for name in PRODUCERS {
        builder = builder.sidecar(name, &[("app", "shop")]);
    }
    builder = builder
        .sidecar("worker-1", &[("app", "worker")])
        .sidecar("worker-2", &[("app", "worker")])
        .sidecar("auditor", &[("app", "auditor")]);
    if mounted {
        builder = builder.data_dir("shop-2", &disk.join("data"));
    }
    let mut mesh = builder.start(Path::new(SIDECAR)).await.unwrap();
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let calm = Arc::new(AtomicBool::new(false));

    let mut tasks = Vec::new();
    let mut disconnects = HashMap::new();
    for (i, (sidecar, sub)) in CONSUMERS.iter().enumerate() {
        let notify = Arc::new(tokio::sync::Notify::new());
        disconnects.insert(format!("{sidecar}/{sub}"), Arc::clone(&notify));
        tasks.push(tokio::spawn(consume(
            sidecar.to_string(),
            sub.to_string(),
            mesh.sidecar(sidecar).grpc_url(),
            seed ^ (0xC0 + i as u64),
            Arc::clone(&history),
            notify,
            Arc::clone(&calm),
        )));
    }
    let mut producers = Vec::new();
    for (i, name) in PRODUCERS.iter().enumerate() {
        producers.push(tokio::spawn(produce(
            name.to_string(),
            mesh.sidecar(name).grpc_url(),
            seed ^ (0x50 + i as u64),
            Arc::clone(&history),
            Arc::clone(&stop),
            Arc::clone(&decisions),
        )));
    }
    // Replays under the faults: `analytics` is rewound 5–15 s now and then.
    let rewinder = tokio::spawn(rewind_now_and_then(
        mesh.sidecar("auditor").grpc_url(),
        seed ^ 0xEE,
        Arc::clone(&history),
        Arc::clone(&stop),
    ));
    // Memory: sampled after every fault and while draining.
    let peak = Arc::new(AtomicU64::new(0));

    let until = Instant::now() + faults_for;
    let counts = run_faults(
        &mut mesh,
        &mut rng,
        until,
        &history,
        &disconnects,
        ballast.as_deref(),
        &peak,
    )
    .await;
    let counts = match counts {
        Ok(c) => c,
        Err(e) => {
            let path = history_path(seed);
            history.save(&path);
            panic!(
                "seed {seed}: a fault could not be applied: {e:#}; history in {}",
                path.display()
            );
        }
    };
    stop.store(true, Ordering::SeqCst);
    for p in producers {
        let _ = p.await;
    }
    let _ = rewinder.await;
    // Faults are over: the mesh must drain (no stall), with consumers acking everything now.
    calm.store(true, Ordering::SeqCst);
    let mut stalled = None;
    let drain_deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut owed = Vec::new();
        for name in mesh.names() {
            let s = mesh.sidecar_mut(&name);
            if let Some(rss) = s.rss_bytes() {
                peak.fetch_max(rss, Ordering::SeqCst);
            }
            let admin = s.admin;
            for (_, sub) in ROUTES.iter().chain([("orders-dlq", "dlq-audit")].iter()) {
                let n = sub_figure(admin, sub, "backlog").await;
                if n > 0 {
                    owed.push(format!("{name}:{sub}={n}"));
                }
            }
            // Transactions the producer could not settle are checked back and settled too.
            let open = stats(admin)
                .await
                .map_or(0, |s| s["transactions"]["open"].as_u64().unwrap_or(0));
            if open > 0 {
                owed.push(format!("{name}:open transactions={open}"));
            }
        }
        if owed.is_empty() {
            break;
        }
        if Instant::now() > drain_deadline {
            // What each sidecar says of itself while the backlog is stuck, for diagnosis.
            let dir = history_path(seed).with_extension("logs");
            let _ = std::fs::create_dir_all(&dir);
            for name in mesh.names() {
                let admin = mesh.sidecar(&name).admin;
                for (path, file) in [("/v1/stats", "stats.json"), ("/metrics", "metrics.txt")] {
                    if let Ok(r) = qmesh_tests::http::request("GET", admin, path, &[], b"").await {
                        let _ = std::fs::write(dir.join(format!("{name}.{file}")), r.body);
                    }
                }
            }
            stalled = Some(owed);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for t in tasks {
        t.abort();
    }
    let events = history.snapshot();
    let mut verdict = check(&events);
    if let Some(owed) = stalled {
        verdict.failures.push(format!(
            "every_backlog_drains_once_faults_stop: still owed after 90 s: {owed:?}"
        ));
    }
    let peak = peak.load(Ordering::SeqCst);
    if peak > RSS_BOUND {
        verdict.failures.push(format!(
            "memory_stays_under_its_bound: a sidecar reached {} MiB",
            peak / (1024 * 1024)
        ));
    }
    let mut spills = 0;
    for name in mesh.names() {
        let log = std::fs::read_to_string(mesh.sidecar(&name).log_path()).unwrap_or_default();
        spills += log.matches("memory budget reached").count();
        if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
            verdict
                .failures
                .push(format!("no_sidecar_panics: {name}: {line}"));
        }
    }
    let faults: Vec<String> = counts.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let rewound: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "rewind" && e["phase"] == "end")
        .map(|e| e["replaying"].as_u64().unwrap_or(0))
        .collect();
    eprintln!(
        "campaign seed {seed}: faults [{}]; rewinds {} ({} answered, {} owners replaying); published ok {} ({} delayed), unknown {}, refused {}; transactions {} committed, {} rolled back; deliveries {}; dead letters {} ({} deliveries rejected); lost 0 of {} checked; messages delivered more than once {} ({} after a failed attempt, {} after a fault, {} after a rewind); peak RSS {} MiB; backlogs spilled to disk {spills} times; disk-full fault {}",
        faults.join(", "),
        rewound.len(),
        rewound.iter().filter(|r| **r > 0).count(),
        rewound.iter().sum::<u64>(),
        verdict.published,
        verdict.delayed,
        verdict.unknown,
        verdict.refused,
        verdict.committed,
        verdict.rolled_back,
        verdict.deliveries,
        verdict.dead_letters,
        verdict.rejected,
        verdict.published,
        verdict.duplicates,
        verdict.redeliveries,
        verdict.repeats_after_faults,
        verdict.repeats_after_rewinds,
        peak / (1024 * 1024),
        if mounted { "on" } else { "off (no tmpfs)" },
    );
    if !verdict.failures.is_empty() {
        // The sidecars' own logs go next to the history, for diagnosis.
        let dir = history_path(seed).with_extension("logs");
        let _ = std::fs::create_dir_all(&dir);
        for name in mesh.names() {
            let _ = std::fs::copy(
                mesh.sidecar(&name).log_path(),
                dir.join(format!("{name}.log")),
            );
        }
    }
    if std::env::var("QMESH_CHAOS_DEBUG").is_ok() {
        history.save(&history_path(seed));
        let dir = history_path(seed).with_extension("logs");
        let _ = std::fs::create_dir_all(&dir);
        for name in mesh.names() {
            let _ = std::fs::copy(
                mesh.sidecar(&name).log_path(),
                dir.join(format!("{name}.log")),
            );
        }
    }
    drop(mesh);
    drop(tmpfs);
    if !verdict.failures.is_empty() {
        let path = history_path(seed);
        history.save(&path);
        panic!(
            "fault campaign failed with seed {seed} (replay: hack/chaos.sh --seed {seed}); history in {}:\n{}",
            path.display(),
            verdict.failures.join("\n")
        );
    }
    assert!(
        verdict.published > 100,
        "too little traffic to mean anything"
    );
}

/// A small tmpfs the test mounted (root only), unmounted when dropped — also when the test fails.
fn history_path(seed: u64) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos/history-{seed}.jsonl"))
}

fn seconds(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_with_fixed_seed_1() {
    run_campaign(Campaign {
        seed: 1,
        faults_for: seconds("QMESH_CHAOS_SECONDS", 40),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_with_fixed_seed_2() {
    run_campaign(Campaign {
        seed: 2,
        faults_for: seconds("QMESH_CHAOS_SECONDS", 40),
    })
    .await;
}

/// A third fixed schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_with_fixed_seed_777() {
    run_campaign(Campaign {
        seed: 777,
        faults_for: seconds("QMESH_CHAOS_SECONDS", 40),
    })
    .await;
}

/// The schedule that found the test proxy losing bytes inside live connections: its blackhole read
/// and dropped what was sent, then passed traffic again on the same connection, so a credit grant
/// could vanish from a stream that stayed up — no network does that (TCP resends, or the
/// connection ends), and the credit protocol rightly relies on it. `analytics` stalled for good
/// after the auditor's partition. The blackhole now holds bytes, as TCP does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_with_the_seed_of_the_lossy_partition() {
    run_campaign(Campaign {
        seed: 1_796_141_853_284_651_035,
        faults_for: seconds("QMESH_CHAOS_SECONDS", 40),
    })
    .await;
}

/// `hack/chaos.sh --minutes N [--seed S]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long; run by hack/chaos.sh"]
async fn long_campaign() {
    let minutes: u64 = std::env::var("QMESH_CHAOS_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let seed = std::env::var("QMESH_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    run_campaign(Campaign {
        seed,
        faults_for: Duration::from_secs(minutes * 60),
    })
    .await;
}
