//! Delayed and scheduled messages: a publish may ask to be delivered no earlier than a delay after
//! it (gRPC `delay`, HTTP `qmesh-delay`, AMQP `x-delay`) or a time (gRPC `deliver_at`, HTTP
//! `qmesh-deliver-at`). The owner keeps them durably in the same waiting heap as retries; they fire
//! in time order, not publish order, survive a kill -9 of the owner, are shown as scheduled, and
//! out-of-range or malformed requests are refused naming the field, storing nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use common::*;
use qmesh_proto::v1::{self, subscribe_request, subscribe_response};
use tokio_stream::StreamExt;

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: reminders}
spec:
  maxDelay: 1h
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: remind}
spec:
  queue: reminders
  consumers: {matchLabels: {app: worker}}
"#;

/// When each message id arrived at the consumer (acked at once).
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<HashMap<String, Vec<Instant>>>>);

impl Arrivals {
    async fn start(url: &str) -> Self {
        let arrivals = Self::default();
        let (tx, mut inbound) = open_subscription(url, "remind", 100).await;
        let log = arrivals.clone();
        tokio::spawn(async move {
            while let Some(Ok(response)) = inbound.next().await {
                let Some(subscribe_response::Response::Deliveries(batch)) = response.response
                else {
                    continue;
                };
                let now = Instant::now();
                let mut receipts = Vec::new();
                for d in batch.deliveries {
                    let id = d.message.unwrap().id;
                    log.0.lock().unwrap().entry(id).or_default().push(now);
                    receipts.push(d.receipt);
                }
                let ack = subscribe_request::Request::Ack(v1::Ack { receipts });
                let _ = tx.send(v1::SubscribeRequest { request: Some(ack) }).await;
            }
        });
        arrivals
    }

    fn at(&self, id: &str) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .get(id)
            .and_then(|v| v.first().copied())
    }

    fn count(&self, id: &str) -> usize {
        self.0.lock().unwrap().get(id).map_or(0, Vec::len)
    }
}

fn request(id: &str, delay: Option<Duration>, at: Option<SystemTime>) -> v1::PublishRequest {
    v1::PublishRequest {
        queue: "reminders".into(),
        message: Some(message(id, "", id)),
        correlation: 0,
        delay: delay.map(|d| prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }),
        deliver_at: at.map(Into::into),
        transaction: String::new(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
    .to_string()
}

async fn scheduled(admin: std::net::SocketAddr) -> u64 {
    let Some(s) = stats(admin).await else {
        return 0;
    };
    s["subscriptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["subscription"] == "remind")
        .filter_map(|x| x["owner"]["scheduled"].as_u64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_fire_in_time_order_through_every_api_and_survive_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = mesh()
        .manifests(MESH)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .data_dir("producer", dir.path())
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let arrivals = Arrivals::start(&mesh.sidecar("worker").grpc_url()).await;
    let producer = mesh.sidecar("producer");
    let mut app = client(&producer.grpc_url()).await;
    // Published latest-first: each fires at its own time, in time order.
    let t0 = Instant::now();
    let wall = SystemTime::now();
    let mut due: Vec<(&str, Duration)> = Vec::new();
    app.publish(request(
        "grpc-at-3s",
        None,
        Some(wall + Duration::from_secs(3)),
    ))
    .await
    .unwrap();
    due.push(("grpc-at-3s", Duration::from_secs(3)));
    let answer = qmesh_tests::http::request(
        "POST",
        producer.http,
        "/v1/queues/reminders/messages",
        &[
            ("qmesh-id", "http-at-2.5s"),
            (
                "qmesh-deliver-at",
                &rfc3339(wall + Duration::from_millis(2500)),
            ),
        ],
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(
        answer.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    due.push(("http-at-2.5s", Duration::from_millis(2500)));
    app.publish(request("grpc-2s", Some(Duration::from_secs(2)), None))
        .await
        .unwrap();
    due.push(("grpc-2s", Duration::from_secs(2)));
    let answer = qmesh_tests::http::request(
        "POST",
        producer.http,
        "/v1/queues/reminders/messages",
        &[("qmesh-id", "http-1.5s"), ("qmesh-delay", "1500ms")],
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 201);
    due.push(("http-1.5s", Duration::from_millis(1500)));
    app.publish(request("now", None, None)).await.unwrap();

    // Not delayed: at once. The four others are scheduled, shown as such by the owner.
    until("the undelayed message", 10, || arrivals.count("now") == 1).await;
    assert!(
        t0.elapsed() < Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(scheduled(producer.admin).await, 4);

    until("every delayed message", 20, || {
        due.iter().all(|(id, _)| arrivals.count(id) > 0)
    })
    .await;
    let mut late = Vec::new();
    for (id, after) in &due {
        let at = arrivals.at(id).unwrap().duration_since(t0);
        // The due time is counted from before the publish: never early (times are kept in whole
        // milliseconds, and the HTTP time below is cut to them).
        assert!(
            at + Duration::from_millis(2) >= *after,
            "{id} arrived at {at:?}, before {after:?}"
        );
        late.push((*id, at.saturating_sub(*after)));
        assert_eq!(arrivals.count(id), 1, "{id} delivered once");
    }
    let order: Vec<&str> = {
        let mut by_time: Vec<(&str, Instant)> = due
            .iter()
            .map(|(id, _)| (*id, arrivals.at(id).unwrap()))
            .collect();
        by_time.sort_by_key(|(_, t)| *t);
        by_time.into_iter().map(|(id, _)| id).collect()
    };
    assert_eq!(
        order,
        ["http-1.5s", "grpc-2s", "http-at-2.5s", "grpc-at-3s"]
    );
    eprintln!("lateness after the due time (publish → consumer app): {late:?}");
    for (id, l) in &late {
        assert!(*l < Duration::from_secs(1), "{id} {l:?} late");
    }
    assert_eq!(scheduled(producer.admin).await, 0);

    // A scheduled message survives a kill -9 of its owner and fires at its time after the restart.
    let t1 = Instant::now();
    app.publish(request("survivor", Some(Duration::from_secs(3)), None))
        .await
        .unwrap();
    let producer = mesh.sidecar_mut("producer");
    producer.kill9();
    producer.restart().await.unwrap();
    until("the survivor", 20, || arrivals.count("survivor") > 0).await;
    let at = arrivals.at("survivor").unwrap().duration_since(t1);
    assert!(
        at + Duration::from_millis(2) >= Duration::from_secs(3),
        "survivor arrived after {at:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(arrivals.count("survivor"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_delays_are_refused_naming_the_field_and_store_nothing() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("producer", &[("app", "producer")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let producer = mesh.sidecar("producer");
    let mut app = client(&producer.grpc_url()).await;
    let refusals = [
        (
            request("far", Some(Duration::from_secs(7200)), None),
            "maxDelay",
        ),
        (
            request(
                "far-at",
                None,
                Some(SystemTime::now() + Duration::from_secs(7200)),
            ),
            "deliver_at",
        ),
        (
            request(
                "both",
                Some(Duration::from_secs(1)),
                Some(SystemTime::now()),
            ),
            "not both",
        ),
        (
            v1::PublishRequest {
                delay: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..request("negative", None, None)
            },
            "negative",
        ),
    ];
    for (req, says) in refusals {
        let id = req.message.as_ref().unwrap().id.clone();
        let error = app.publish(req).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{id}: {error}");
        assert!(error.message().contains(says), "{id}: {error}");
    }
    for (header, value, says) in [
        ("qmesh-delay", "soon", "qmesh-delay"),
        ("qmesh-delay", "2h", "maxDelay"),
        ("qmesh-deliver-at", "tomorrow", "qmesh-deliver-at"),
    ] {
        let answer = qmesh_tests::http::request(
            "POST",
            producer.http,
            "/v1/queues/reminders/messages",
            &[(header, value)],
            b"x",
        )
        .await
        .unwrap();
        let body = String::from_utf8_lossy(&answer.body);
        assert_eq!(answer.status, 400, "{header}: {value}: {body}");
        assert!(body.contains(says), "{header}: {value}: {body}");
    }
    // An app cannot set the broker's header itself.
    let mut forged = message("forged", "", "x");
    forged
        .headers
        .insert("qmesh-deliver-at".into(), "99999999999999".into());
    let error = app
        .publish(v1::PublishRequest {
            message: Some(forged),
            ..request("x", None, None)
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        queue_backlog(producer.admin, "reminders").await,
        0,
        "nothing stored"
    );

    // A zero delay and a past time deliver at once (nothing scheduled).
    app.publish(request("zero", Some(Duration::ZERO), None))
        .await
        .unwrap();
    app.publish(request(
        "past",
        None,
        Some(SystemTime::now() - Duration::from_secs(60)),
    ))
    .await
    .unwrap();
    assert_eq!(scheduled(producer.admin).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_clients_delay_with_the_x_delay_header() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let arrivals = Arrivals::start(&mesh.sidecar("worker").grpc_url()).await;
    let url = format!("amqp://guest:guest@{}/%2F", mesh.sidecar("producer").amqp);
    let python = std::env::var("QMESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/amqp/clients.py");
    let t0 = Instant::now();
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["delayed", &url, "reminders", "amqp-delayed", "1500"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until("the delayed AMQP message", 20, || {
        arrivals.count("amqp-delayed") > 0
    })
    .await;
    let at = arrivals.at("amqp-delayed").unwrap().duration_since(t0);
    assert!(
        at + Duration::from_millis(2) >= Duration::from_millis(1500),
        "arrived after {at:?}"
    );
}

/// A scheduled message keeps its time through a graceful hand-over: the owner going away hands it
/// to another publisher of the queue, which holds it until its time (not at once, not lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_keeps_its_time_through_a_hand_over() {
    let mut mesh = mesh()
        .manifests(MESH)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("standby", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .arg("--shutdown-grace")
        .arg("2s")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let arrivals = Arrivals::start(&mesh.sidecar("worker").grpc_url()).await;
    let mut app = client(&mesh.sidecar("producer").grpc_url()).await;
    let t0 = Instant::now();
    app.publish(request("handed-over", Some(Duration::from_secs(5)), None))
        .await
        .unwrap();
    // SIGTERM: the drain waits half its grace for the backlog, then hands over what is left.
    mesh.sidecar("producer").terminate().unwrap();
    let code = mesh
        .sidecar_mut("producer")
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    assert_eq!(arrivals.count("handed-over"), 0, "not delivered early");
    assert_eq!(
        scheduled(mesh.sidecar("standby").admin).await,
        1,
        "the standby holds it, scheduled"
    );
    until("the handed-over message", 20, || {
        arrivals.count("handed-over") > 0
    })
    .await;
    let at = arrivals.at("handed-over").unwrap().duration_since(t0);
    assert!(
        at + Duration::from_millis(2) >= Duration::from_secs(5),
        "arrived after {at:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(arrivals.count("handed-over"), 1);
}
