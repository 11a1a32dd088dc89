//! The peer port is mutual TLS, and who may call comes from the certificate: a client without a
//! certificate, with one from another CA, or with a valid one of a sidecar that may not do what it
//! asks, is refused on every Peer RPC and puts nothing into a queue; certificates rotated to a new
//! root (with the old one kept in the bundle for the overlap) while messages flow lose none.

#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use qmesh_proto::peer::{self, peer_client::PeerClient};
use qmesh_tests::mesh::{TEST_TRUST_DOMAIN, peer_channel, test_identity};

const ORDERS: &str = r#"
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
"#;

fn id(name: &str) -> peer::SidecarId {
    peer::SidecarId {
        namespace: "default".into(),
        name: name.into(),
        incarnation: 1,
    }
}

fn forged(from: &str) -> peer::HandOverBatch {
    peer::HandOverBatch {
        from: Some(id(from)),
        batch: 1,
        messages: vec![peer::OwnedMessage {
            queue: "orders".into(),
            sequence: 1,
            message: Some(message("forged", "", "forged")),
            pending: vec![peer::PendingSubscription {
                subscription: "billing".into(),
                attempts: 0,
            }],
        }],
    }
}

/// The code a hand-over of one forged message gets, whether the call or its first answer fails.
async fn hand_over_code(
    mut client: PeerClient<tonic::transport::Channel>,
    from: &str,
) -> tonic::Code {
    match client
        .hand_over(tokio_stream::iter(vec![forged(from)]))
        .await
    {
        Err(status) => status.code(),
        Ok(response) => match response.into_inner().message().await {
            Err(status) => status.code(),
            Ok(Some(ack)) if ack.error.is_none() => {
                panic!("hand-over from {from} accepted: {ack:?}")
            }
            Ok(other) => panic!("hand-over from {from}: unexpected answer {other:?}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_every_client_that_is_not_a_sidecar_allowed_to_do_what_it_asks() {
    let mesh = mesh()
        .manifests(ORDERS)
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("shop-2", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let owner = mesh.sidecar("shop-1");

    // 1. No certificate: nothing is served.
    let plaintext = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", owner.peer))?
            .connect()
            .await?;
        PeerClient::new(channel)
            .hand_over(tokio_stream::iter(vec![forged("shop-2")]))
            .await
            .map_err(|s| anyhow::anyhow!("{s}"))?;
        anyhow::Ok(())
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), plaintext)
        .await
        .unwrap();
    assert!(answer.is_err(), "a plaintext client must be refused");

    // 2. A certificate for a real sidecar's name, from another CA: the handshake fails.
    let other =
        qmesh_identity::Authority::generate(TEST_TRUST_DOMAIN, Duration::from_secs(3600), None)
            .unwrap();
    let mut material = other
        .issue_material(&test_identity("shop-2"), Duration::from_secs(3600))
        .unwrap();
    material.bundle_pem = mesh.ca().bundle_pem().to_owned(); // it does trust the real server
    let config = std::sync::Arc::new(qmesh_identity::tls::mesh_client(&material).unwrap());
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", owner.peer)).unwrap();
    let refused = qmesh_identity::transport::connect(
        &endpoint,
        std::sync::Arc::new(move || std::sync::Arc::clone(&config)),
        &qmesh_identity::sidecar_dns_name("default", "shop-1"),
    )
    .await;
    match refused {
        Err(_) => {}
        Ok(channel) => {
            let call = PeerClient::new(channel)
                .rewind(peer::PeerRewind::default())
                .await;
            assert!(
                call.is_err(),
                "a certificate from another CA must be refused"
            );
        }
    }

    // 3. A valid certificate of a sidecar outside the mesh: PERMISSION_DENIED on every RPC.
    let mallory =
        || async { PeerClient::new(mesh.peer_channel("mallory", "shop-1").await.unwrap()) };
    assert_eq!(
        hand_over_code(mallory().await, "mallory").await,
        tonic::Code::PermissionDenied
    );
    let replicate = mallory()
        .await
        .replicate(tokio_stream::iter(vec![peer::ReplicateFrame {
            frame: Some(peer::replicate_frame::Frame::Owner(id("mallory"))),
        }]))
        .await;
    let code = match replicate {
        Err(s) => s.code(),
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(code, tonic::Code::PermissionDenied);
    let rewind = mallory()
        .await
        .rewind(peer::PeerRewind {
            queue: "orders".into(),
            subscription: "billing".into(),
            from: Some(std::time::SystemTime::UNIX_EPOCH.into()),
        })
        .await
        .unwrap_err();
    assert_eq!(rewind.code(), tonic::Code::PermissionDenied, "{rewind}");
    let mut to_consumer = PeerClient::new(mesh.peer_channel("mallory", "billing").await.unwrap());
    let forward = to_consumer
        .forward(tokio_stream::iter(vec![peer::OwnerFrame {
            frame: Some(peer::owner_frame::Frame::Hello(peer::Hello {
                owner: Some(id("mallory")),
                protocol_revision: 1,
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(forward.code(), tonic::Code::PermissionDenied, "{forward}");

    // 4. A sidecar of the mesh that publishes nothing cannot inject by handing over.
    let billing = PeerClient::new(mesh.peer_channel("billing", "shop-1").await.unwrap());
    assert_eq!(
        hand_over_code(billing, "billing").await,
        tonic::Code::PermissionDenied
    );
    // 5. A real peer naming another sidecar as the sender.
    let shop2 = PeerClient::new(mesh.peer_channel("shop-2", "shop-1").await.unwrap());
    assert_eq!(
        hand_over_code(shop2, "shop-3").await,
        tonic::Code::PermissionDenied
    );

    // Nothing got in; real traffic still flows, and only it arrives.
    assert_eq!(
        queue_backlog(owner.admin, "orders").await,
        0,
        "nothing injected"
    );
    let consumer = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        16,
        |_| Verdict::Ack,
    )
    .await;
    let real: Vec<_> = (0..20)
        .map(|i| message(&format!("real-{i}"), "", "x"))
        .collect();
    let results = publish_all(&owner.grpc_url(), "orders", real).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    until("every real order delivered", 30, || {
        consumer.count_prefixed("real-") >= 20
    })
    .await;
    let (ids, dups) = tally(consumer.ids());
    assert_eq!(
        (ids.len(), dups),
        (20, 0),
        "only the real orders, once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotated_to_a_new_root_under_load_lose_no_message() {
    let mut mesh = mesh()
        .manifests(ORDERS)
        .sidecar("shop-1", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let consumer = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;
    let url = mesh.sidecar("shop-1").grpc_url();
    let n = 3_000;
    let publisher = tokio::spawn(async move {
        let mut accepted = 0;
        for round in 0..30 {
            let batch: Vec<_> = (0..n / 30)
                .map(|i| message(&format!("m-{round}-{i}"), "", "x"))
                .collect();
            accepted += publish_all(&url, "orders", batch)
                .await
                .iter()
                .filter(|r| r.is_ok())
                .count();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        accepted
    });

    // Mid-stream: a new root, trusted next to the old one; every sidecar gets a certificate from it.
    until("traffic flowing", 30, || consumer.count() >= 100).await;
    let next = qmesh_identity::Authority::generate(
        TEST_TRUST_DOMAIN,
        Duration::from_secs(86_400),
        Some(mesh.ca().bundle_pem()),
    )
    .unwrap();
    for name in mesh.names() {
        next.issue_material(&test_identity(&name), Duration::from_secs(86_400))
            .unwrap()
            .write_to(&mesh.dir().join(format!("{name}.identity")))
            .unwrap();
    }
    for name in mesh.names() {
        let log = mesh.sidecar(&name).log_path().to_path_buf();
        until("the new certificate taken up", 20, || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("sidecar certificate reloaded")
        })
        .await;
    }
    // New connections now handshake with the new root: the consumer's sidecar restarts, and the
    // owner dials it afresh.
    mesh.sidecar_mut("billing").kill9();
    mesh.sidecar_mut("billing").restart().await.unwrap();
    let consumer2 = Consumer::start(
        "b2",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        32,
        |_| Verdict::Ack,
    )
    .await;

    let accepted = publisher.await.unwrap();
    assert_eq!(accepted, n, "every publish accepted through the rotation");
    until("every message delivered after the rotation", 60, || {
        let mut all = consumer.ids();
        all.extend(consumer2.ids());
        tally(all).0.len() >= n
    })
    .await;
    // A client holding only the new root's certificate is accepted by the renewed owner.
    let only_new = next
        .issue_material(&test_identity("billing"), Duration::from_secs(3600))
        .unwrap();
    assert!(qmesh_identity::tls::mesh_client(&only_new).is_ok());
    let mut client = PeerClient::new(
        peer_channel(&next, "billing", mesh.sidecar("shop-1").peer, "shop-1")
            .await
            .unwrap(),
    );
    // (a real consumer identity may ask for a rewind of its subscription)
    let rewind = client
        .rewind(peer::PeerRewind {
            queue: "orders".into(),
            subscription: "billing".into(),
            from: Some(std::time::SystemTime::now().into()),
        })
        .await;
    assert!(rewind.is_ok(), "{rewind:?}");
}

const GUARDED: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}, serviceAccounts: [shop]}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}, serviceAccounts: [billing]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_without_the_service_account_neither_publish_consume_nor_inject() {
    let mesh = mesh()
        .manifests(GUARDED)
        .sidecar("shop-1", &[("app", "shop")])
        .service_account("shop-1", "shop")
        // Right labels, wrong service account: what anyone who may create pods can do.
        .sidecar("lookalike", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .service_account("billing", "billing")
        .sidecar("billing-lookalike", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();

    // The look-alike may not publish: 403 naming the Queue and the rule, on both app APIs.
    let refused = publish_all(
        &mesh.sidecar("lookalike").grpc_url(),
        "orders",
        vec![message("sneaky", "", "x")],
    )
    .await;
    let error = refused[0]
        .as_ref()
        .expect_err("the look-alike must not publish");
    assert_eq!(error.code(), qmesh_proto::v1::ErrorCode::PermissionDenied);
    assert!(
        error.message.contains("orders") && error.message.contains("spec.publishers"),
        "{error:?}"
    );
    let http = qmesh_tests::http::request(
        "POST",
        mesh.sidecar("lookalike").http,
        "/v1/queues/orders/messages",
        &[],
        b"sneaky",
    )
    .await
    .unwrap();
    assert_eq!(http.status, 403, "{}", String::from_utf8_lossy(&http.body));
    // ... nor hand messages over to the real publisher.
    let lookalike = PeerClient::new(mesh.peer_channel("lookalike", "shop-1").await.unwrap());
    assert_eq!(
        hand_over_code(lookalike, "lookalike").await,
        tonic::Code::PermissionDenied
    );

    // The consumer look-alike serves no subscription; only the real consumer receives.
    let (_tx, inbound) =
        open_subscription_result(&mesh.sidecar("billing-lookalike").grpc_url(), "billing").await;
    assert!(inbound.is_err(), "the look-alike consumer must be refused");
    let consumer = Consumer::start(
        "b",
        &mesh.sidecar("billing").grpc_url(),
        "billing",
        16,
        |_| Verdict::Ack,
    )
    .await;
    let real: Vec<_> = (0..20)
        .map(|i| message(&format!("real-{i}"), "", "x"))
        .collect();
    let results = publish_all(&mesh.sidecar("shop-1").grpc_url(), "orders", real).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    until("the real consumer gets every order", 30, || {
        consumer.count() >= 20
    })
    .await;
    let (ids, dups) = tally(consumer.ids());
    assert_eq!((ids.len(), dups), (20, 0));
    assert!(!ids.contains("sneaky"));
}

/// Opens a `Subscribe` stream and returns the first answer's outcome: `Err` if the sidecar refused.
async fn open_subscription_result(
    url: &str,
    subscription: &str,
) -> (
    tokio::sync::mpsc::Sender<qmesh_proto::v1::SubscribeRequest>,
    Result<tonic::Streaming<qmesh_proto::v1::SubscribeResponse>, tonic::Status>,
) {
    use qmesh_proto::v1::{Open, SubscribeRequest, subscribe_request};
    let mut c = client(url).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: subscription.to_owned(),
            max_in_flight: 1,
            manual_credit: false,
        })),
    })
    .await
    .unwrap();
    let result = match c
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Err(status) => Err(status),
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Err(status)) => Err(status),
                _ => Ok(stream),
            }
        }
    };
    (tx, result)
}
