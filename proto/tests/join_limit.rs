//! Joins in admission are bounded (`ControlService::max_joining`): while that many sidecars are
//! being authenticated, a further join is refused at once with `RESOURCE_EXHAUSTED` instead of
//! piling up; once they are admitted the next one gets in. Joined sidecars do not count.

#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use qmesh_core::{MeshView, SidecarKey};
use qmesh_proto::{
    control::{Hello, SidecarReport, Stats, control_client::ControlClient, sidecar_report::Report},
    join::{ControlService, MeshSource},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Admits nobody until the gate opens (a slow TokenReview).
struct Gated {
    gate: watch::Receiver<bool>,
    changes: watch::Sender<u64>,
}

#[tonic::async_trait]
impl MeshSource for Gated {
    async fn admit(&self, _hello: &Hello, _session: u64) -> Result<(), String> {
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        Ok(())
    }
    async fn service_account(&self, _hello: &Hello) -> Result<String, String> {
        Err("no certificates in this test".into())
    }
    fn view_for(&self, _key: &SidecarKey) -> Option<MeshView> {
        None
    }
    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
    fn record_stats(&self, _key: &SidecarKey, _session: u64, _stats: Stats) {}
    fn left(&self, _key: &SidecarKey, _session: u64) {}
}

/// Opens a join that says Hello and keeps its stream open; the sender keeps it so.
async fn join(
    client: &mut ControlClient<tonic::transport::Channel>,
    name: &str,
) -> (
    mpsc::Sender<SidecarReport>,
    Result<tonic::Response<tonic::Streaming<qmesh_proto::control::ControlUpdate>>, tonic::Status>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(SidecarReport {
        report: Some(Report::Hello(Hello {
            namespace: "default".into(),
            name: name.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        client.join(ReceiverStream::new(rx)),
    )
    .await
    .expect("a join is answered at once");
    (tx, answer)
}

#[tokio::test]
async fn a_join_beyond_the_admission_limit_is_refused_until_the_others_are_admitted() {
    let (open, gate) = watch::channel(false);
    let source = Arc::new(Gated {
        gate,
        changes: watch::channel(0).0,
    });
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        ControlService::new(source, shutdown.clone())
            .max_joining(2)
            .serve(listener),
    );
    let mut client = ControlClient::connect(url).await.unwrap();

    let (_a, first) = join(&mut client, "a").await;
    let (_b, second) = join(&mut client, "b").await;
    assert!(first.is_ok() && second.is_ok());
    let (_c, third) = join(&mut client, "c").await;
    let refused = third.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("2 sidecars are joining at once"),
        "{refused}"
    );

    // Admitted, they no longer count: the next join gets in (retried until the two are through).
    open.send(true).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_d, fourth) = join(&mut client, "d").await;
        match fourth {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still refused 10 s after the others were admitted"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    shutdown.cancel();
}
