//! Settlements are only taken from the link a delivery went out on: a consumer sidecar serving one
//! Subscription cannot ack another Subscription's deliveries. The rogue here is a fake consumer
//! sidecar (a Peer server of the test's own) that the owner dials for its own Subscription.

#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, path::Path, pin::Pin, time::Duration};

use common::*;
use futures::Stream;
use qmesh_proto::peer::{
    self, ConsumerFrame, HandOverAck, HandOverBatch, OwnerFrame, ReplicateAck, ReplicateFrame,
    consumer_frame, owner_frame,
    peer_server::{Peer, PeerServer},
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// A consumer sidecar that grants credits for `rogue-sub` and answers every delivery with acks for
/// sequences 1..=20 of `victim-sub`.
struct Rogue;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for Rogue {
    type ForwardStream = ReceiverStream<Result<ConsumerFrame, Status>>;
    type ReplicateStream = BoxStream<ReplicateAck>;
    type HandOverStream = BoxStream<HandOverAck>;

    async fn rewind(
        &self,
        _: Request<peer::PeerRewind>,
    ) -> Result<Response<peer::PeerRewound>, Status> {
        Err(Status::unimplemented("rogue"))
    }

    async fn forward(
        &self,
        request: Request<Streaming<OwnerFrame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tx.send(Ok(ConsumerFrame {
            frame: Some(consumer_frame::Frame::Welcome(peer::Welcome {
                consumer: Some(peer::SidecarId {
                    namespace: "default".into(),
                    name: "rogue".into(),
                    incarnation: 1,
                }),
                protocol_revision: 1,
            })),
        }))
        .await
        .unwrap();
        tx.send(Ok(ConsumerFrame {
            frame: Some(consumer_frame::Frame::Credit(peer::CreditGrant {
                subscription: "rogue-sub".into(),
                credits: 10,
            })),
        }))
        .await
        .unwrap();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = inbound.next().await {
                if let Some(owner_frame::Frame::Deliveries(_)) = frame.frame {
                    let forged = (1..=40)
                        .map(|sequence| peer::DeliveryRef {
                            subscription: "victim-sub".into(),
                            sequence,
                            attempt: 1,
                        })
                        .collect();
                    let _ = tx
                        .send(Ok(ConsumerFrame {
                            frame: Some(consumer_frame::Frame::Settlements(peer::Settlements {
                                acks: forged,
                                nacks: Vec::new(),
                            })),
                        }))
                        .await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn replicate(
        &self,
        _: Request<Streaming<ReplicateFrame>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        Err(Status::unimplemented("not a replica"))
    }

    async fn hand_over(
        &self,
        _: Request<Streaming<HandOverBatch>>,
    ) -> Result<Response<Self::HandOverStream>, Status> {
        Err(Status::unimplemented("takes nothing over"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_one_subscription_cannot_ack_another_subscriptions_deliveries() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerServer::new(Rogue))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let manifests = format!(
        r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {{name: jobs}}
spec:
  publishers: {{matchLabels: {{app: producer}}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {{name: victim-sub}}
spec:
  queue: jobs
  consumers: {{matchLabels: {{app: worker}}}}
  delivery: {{ackTimeout: 60s}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {{name: rogue-sub}}
spec:
  queue: jobs
  consumers: {{matchLabels: {{app: rogue}}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {{name: rogue, labels: {{app: rogue}}}}
spec: {{peerAddress: "{rogue}", grpcAddress: "127.0.0.1:1", httpAddress: "127.0.0.1:2", adminAddress: "127.0.0.1:3"}}
"#
    );
    let mesh = mesh()
        .manifests(&manifests)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    // The real consumer of victim-sub holds every delivery (never acks).
    let victim = Consumer::start(
        "v",
        &mesh.sidecar("worker").grpc_url(),
        "victim-sub",
        0,
        |_| Verdict::Hold,
    )
    .await;
    let results = publish_all(
        &mesh.sidecar("producer").grpc_url(),
        "jobs",
        (0..10)
            .map(|i| message(&format!("m-{i}"), "", "m"))
            .collect(),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    until("the victim holds all 10", 10, || victim.count() >= 10).await;
    // The rogue got its own deliveries and answered with forged acks; give them time to land.
    let admin = mesh.sidecar("producer").admin;
    let forged_landed = qmesh_tests::wait_for(
        "the forged acks to take effect",
        Duration::from_secs(3),
        || async move { (sub_figure(admin, "victim-sub", "backlog").await < 10).then_some(()) },
    )
    .await;
    assert!(
        forged_landed.is_err(),
        "forged acks from another subscription's consumer settled victim-sub's deliveries: {:?}",
        stats(admin).await
    );
    assert_eq!(sub_figure(admin, "victim-sub", "backlog").await, 10);
}
