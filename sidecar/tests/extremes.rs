//! Extreme values in every numeric and duration field a sidecar takes from outside — the app API
//! (gRPC and HTTP), the peer API, and the mesh view of the control API: each gets a clear answer or
//! is cut to a bound, nothing panics, and the sidecar keeps working afterwards.

#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use qmesh_proto::{
    peer::{
        self, OwnerFrame, ReplicateFrame, owner_frame, peer_client::PeerClient, replicate_frame,
    },
    v1::{self, subscribe_request},
};
use qmesh_tests::http;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec:
  publishers: {matchLabels: {app: producer}}
  maxMessageBytes: 64Ki
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: jobs
  consumers: {matchLabels: {app: producer}}
"#;

const DURATIONS: [(i64, i32); 6] = [
    (i64::MAX, 999_999_999),
    (i64::MAX, i32::MAX),
    (i64::MIN, i32::MIN),
    (-1, 0),
    (0, -1),
    (315_576_000_000, 0),
];

fn durations() -> impl Iterator<Item = prost_types::Duration> {
    DURATIONS
        .iter()
        .map(|&(seconds, nanos)| prost_types::Duration { seconds, nanos })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_values_on_every_api_get_an_answer_and_break_nothing() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("node", &[("app", "producer")])
        .sidecar("peer", &[("app", "producer")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let node = mesh.sidecar("node");
    let url = node.grpc_url();
    let mut app = client(&url).await;

    // --- app API, gRPC ---
    let mut big = message("too-big", "", "");
    big.payload = vec![0u8; 65 * 1024].into();
    let refused = app
        .publish(v1::PublishRequest {
            queue: "jobs".into(),
            message: Some(big),
            correlation: u64::MAX,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    let mut headers = message("many-headers", &"k".repeat(60_000), "");
    for i in 0..2000 {
        headers.headers.insert(format!("h{i}"), "v".repeat(30));
    }
    let answer = app
        .publish(v1::PublishRequest {
            queue: "jobs".into(),
            message: Some(headers),
            correlation: 0,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .await;
    assert!(
        answer.is_err(),
        "headers and key count towards maxMessageBytes"
    );
    for max in [0, 1, u32::MAX] {
        let browse = app
            .browse(v1::BrowseRequest {
                queue: "jobs".into(),
                max,
            })
            .await;
        assert!(browse.is_ok(), "browse max {max}: {browse:?}");
        // Answered either way (nothing is held yet); what matters is that it is answered.
        let _ = app
            .redrive(v1::RedriveRequest {
                queue: "jobs".into(),
                to: "nowhere".into(),
                max,
            })
            .await
            .map(|r| r.into_inner());
    }
    let published = publish_all(
        &url,
        "jobs",
        (0..DURATIONS.len() + 2)
            .map(|i| message(&format!("x-{i}"), "", "x"))
            .collect(),
    )
    .await;
    assert!(published.iter().all(Result::is_ok));
    // A stream with the largest window and credits; every extreme nack delay.
    let (tx, rx) = mpsc::channel(64);
    let open = |manual| v1::SubscribeRequest {
        request: Some(subscribe_request::Request::Open(v1::Open {
            subscription: "work".into(),
            max_in_flight: u32::MAX,
            manual_credit: manual,
        })),
    };
    tx.send(open(false)).await.unwrap();
    let mut inbound = app
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let subscribed = inbound.message().await.unwrap().unwrap();
    let Some(v1::subscribe_response::Response::Subscribed(s)) = subscribed.response else {
        panic!("not subscribed: {subscribed:?}");
    };
    assert!(s.max_in_flight < u32::MAX, "window capped to maxInFlight");
    let mut receipts = Vec::new();
    while receipts.len() < DURATIONS.len() {
        let m = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("deliveries")
            .unwrap()
            .unwrap();
        if let Some(v1::subscribe_response::Response::Deliveries(d)) = m.response {
            receipts.extend(d.deliveries.into_iter().map(|d| d.receipt));
        }
    }
    for (receipt, delay) in receipts.into_iter().zip(durations()) {
        tx.send(v1::SubscribeRequest {
            request: Some(subscribe_request::Request::Nack(v1::Nack {
                receipts: vec![receipt, "18446744073709551615".into(), "-1".into()],
                delay: Some(delay),
                reason: "x".repeat(100_000),
                dead_letter: false,
            })),
        })
        .await
        .unwrap();
    }
    tx.send(v1::SubscribeRequest {
        request: Some(subscribe_request::Request::Credit(v1::Credit {
            credits: u32::MAX,
        })),
    })
    .await
    .unwrap();
    drop(tx);

    // --- app API, HTTP ---
    for path in [
        "/v1/subscriptions/work/messages?max=18446744073709551616&wait=99999999999999h",
        "/v1/subscriptions/work/messages?max=-1&wait=-5s",
        "/v1/subscriptions/work/messages?max=0&wait=NaN",
    ] {
        let r = http::request("GET", node.http, path, &[], b"")
            .await
            .unwrap();
        assert!(
            r.status < 500,
            "{path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    for delay in ["99999999999999999999h", "-5s", "1e308s", "", "NaN"] {
        let body = format!(r#"{{"receipts": ["1", "99999999999999999999"], "delay": "{delay}"}}"#);
        let r = http::request(
            "POST",
            node.http,
            "/v1/subscriptions/work/nack",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
        .unwrap();
        assert!(r.status < 500, "delay {delay:?}: {}", r.status);
    }

    // --- peer API ---
    // As the real peer (a valid identity the view knows), so the extremes reach past the checks.
    let mut peer_client = PeerClient::new(mesh.peer_channel("peer", "node").await.unwrap())
        .max_encoding_message_size(64 * 1024 * 1024);
    let hello = OwnerFrame {
        frame: Some(owner_frame::Frame::Hello(peer::Hello {
            owner: Some(peer::SidecarId {
                namespace: "default".into(),
                name: "peer".into(),
                incarnation: u64::MAX,
            }),
            protocol_revision: u32::MAX,
        })),
    };
    let (ptx, prx) = mpsc::channel(16);
    ptx.send(hello).await.unwrap();
    let mut forward = peer_client
        .forward(ReceiverStream::new(prx))
        .await
        .unwrap()
        .into_inner();
    for frame in [
        owner_frame::Frame::Demand(peer::Demand {
            subscription: "work".into(),
            ready: u64::MAX,
        }),
        owner_frame::Frame::Returned(peer::CreditReturn {
            subscription: "work".into(),
            credits: u32::MAX,
        }),
        owner_frame::Frame::Deliveries(peer::DeliveryBatch {
            deliveries: durations()
                .map(|d| peer::PeerDelivery {
                    subscription: "work".into(),
                    queue: "jobs".into(),
                    sequence: u64::MAX,
                    attempt: u32::MAX,
                    message: Some(message("peer-x", "", "x")),
                    ack_timeout: Some(d),
                })
                .collect(),
        }),
    ] {
        let _ = ptx.send(OwnerFrame { frame: Some(frame) }).await;
    }
    // The stream answers (credits, or a reset for deliveries nobody granted) — never a crash.
    let _ = tokio::time::timeout(Duration::from_secs(2), forward.message()).await;
    drop(ptx);

    let (rtx, rrx) = mpsc::channel(16);
    rtx.send(ReplicateFrame {
        frame: Some(replicate_frame::Frame::Owner(peer::SidecarId {
            namespace: "default".into(),
            name: "peer".into(),
            incarnation: u64::MAX,
        })),
    })
    .await
    .unwrap();
    rtx.send(ReplicateFrame {
        frame: Some(replicate_frame::Frame::Settled(peer::SettledRange {
            below: u64::MAX,
            sequences: vec![u64::MAX, 0],
        })),
    })
    .await
    .unwrap();
    rtx.send(ReplicateFrame {
        frame: Some(replicate_frame::Frame::Messages(peer::ReplicaBatch {
            messages: vec![peer::OwnedMessage {
                queue: "jobs".into(),
                sequence: u64::MAX,
                message: Some(message("copy", "", "x")),
                pending: vec![peer::PendingSubscription {
                    subscription: "work".into(),
                    attempts: u32::MAX,
                }],
            }],
        })),
    })
    .await
    .unwrap();
    drop(rtx);
    if let Ok(mut acks) = peer_client.replicate(ReceiverStream::new(rrx)).await {
        let _ = tokio::time::timeout(Duration::from_secs(2), acks.get_mut().message()).await;
    }
    let hand_over = peer_client
        .hand_over(tokio_stream::iter(vec![peer::HandOverBatch {
            from: Some(peer::SidecarId {
                namespace: "default".into(),
                name: "peer".into(),
                incarnation: u64::MAX,
            }),
            batch: u64::MAX,
            messages: vec![peer::OwnedMessage {
                queue: "jobs".into(),
                sequence: u64::MAX,
                message: Some(message("handed", "", "x")),
                pending: vec![peer::PendingSubscription {
                    subscription: "work".into(),
                    attempts: u32::MAX,
                }],
            }],
        }]))
        .await;
    if let Ok(mut acks) = hand_over {
        let _ = tokio::time::timeout(Duration::from_secs(5), acks.get_mut().message()).await;
    }

    // --- still alive, still working ---
    let ready = http::request("GET", node.admin, "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "{}", node.log_tail());
    let after = publish_all(&url, "jobs", vec![message("after", "", "ok")]).await;
    assert!(after[0].is_ok(), "{after:?}");
    let consumer = Consumer::start("c", &url, "work", 0, |_| Verdict::Ack).await;
    let flowed = qmesh_tests::wait_for(
        "a normal message still flows",
        Duration::from_secs(20),
        || {
            let seen = consumer.ids().iter().any(|i| i == "after");
            async move { seen.then_some(()) }
        },
    )
    .await;
    assert!(
        flowed.is_ok(),
        "{flowed:?}: got {:?}; stats {:?}\n{}",
        consumer.ids(),
        stats(node.admin).await,
        std::fs::read_to_string(node.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("Error") || l.contains("panicked"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for name in ["node", "peer"] {
        let log = std::fs::read_to_string(mesh.sidecar(name).log_path()).unwrap_or_default();
        assert!(!log.contains("panicked"), "{name} panicked:\n{log}");
    }
}

/// The control API's numbers reach the engine through the mesh view: rates and bursts of any value
/// make a working token bucket.
#[test]
fn extreme_rate_limits_from_a_view_make_a_working_limiter() {
    for rate in [
        0.0,
        -1.0,
        f64::NAN,
        f64::INFINITY,
        f64::MAX,
        f64::MIN_POSITIVE,
        1e-300,
    ] {
        for burst in [0, 1, u32::MAX] {
            let limit = qmesh_proto::control::RateLimit {
                messages_per_second: rate,
                burst,
            };
            let limiter = qmesh_sidecar::owner::rate_limiter(&limit);
            let _ = limiter.check();
        }
    }
}
