//! `Control/HeldMessages` is routed down the joined sidecars' own `Join` streams: only sidecars
//! whose view names the queue are asked, each answer is reported by sidecar, one that does not
//! answer in time or leaves mid-call is reported with why (the others still count), a refused
//! caller reaches no sidecar, and a queue no joined sidecar may own is NOT_FOUND.

#![allow(clippy::unwrap_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use qmesh_core::{MeshFile, MeshState, MeshView, SidecarKey};
use qmesh_proto::{
    control::{
        ControlUpdate, HeldAnswer, HeldRequest, HeldResponse, Hello, MeshHeldRequest,
        MeshHeldResponse, SidecarReport, Stats, control_client::ControlClient,
        control_update::Update, held_request::Call, held_response::Result as HeldResult,
        sidecar_report::Report,
    },
    join::{ControlService, HeldAccess, MeshSource},
    v1::{BrowseRequest, BrowseResponse},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

const MANIFESTS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: shop-a, labels: {app: shop}}
spec: {peerAddress: "127.0.0.1:9001", grpcAddress: "127.0.0.1:9101", httpAddress: "127.0.0.1:9201"}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: shop-b, labels: {app: shop}}
spec: {peerAddress: "127.0.0.1:9002", grpcAddress: "127.0.0.1:9102", httpAddress: "127.0.0.1:9202"}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: billing, labels: {app: billing}}
spec: {peerAddress: "127.0.0.1:9003", grpcAddress: "127.0.0.1:9103", httpAddress: "127.0.0.1:9203"}
"#;

/// The mesh of `MANIFESTS`; callers with the token `denied` are refused.
struct Source {
    mesh: MeshState,
    changes: watch::Sender<u64>,
}

#[tonic::async_trait]
impl MeshSource for Source {
    async fn admit(&self, _hello: &Hello, _session: u64) -> Result<(), String> {
        Ok(())
    }
    async fn service_account(&self, _hello: &Hello) -> Result<String, String> {
        Err("no certificates in this test".into())
    }
    fn view_for(&self, key: &SidecarKey) -> Option<MeshView> {
        self.mesh.view_for(key)
    }
    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
    fn record_stats(&self, _key: &SidecarKey, _session: u64, _stats: Stats) {}
    fn left(&self, _key: &SidecarKey, _session: u64) {}
    async fn authorize_held(
        &self,
        _access: &HeldAccess<'_>,
        caller: Option<&str>,
    ) -> Result<(), tonic::Status> {
        match caller {
            Some("denied") => Err(tonic::Status::permission_denied("not you")),
            _ => Ok(()),
        }
    }
}

/// A joined sidecar played by the test: answers each held-message call with `total` held (or
/// never, with `None`), counting the calls it got. Dropping it (its report sender) ends its
/// stream.
struct Joined {
    _reports: mpsc::Sender<SidecarReport>,
    calls: Arc<AtomicUsize>,
}

async fn join(
    client: &mut ControlClient<tonic::transport::Channel>,
    name: &str,
    total: Option<u64>,
) -> Joined {
    let (reports, rx) = mpsc::channel(8);
    reports
        .send(SidecarReport {
            report: Some(Report::Hello(Hello {
                namespace: "default".into(),
                name: name.into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut updates = client
        .join(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The first view, then calls as they come.
    match updates.message().await.unwrap() {
        Some(ControlUpdate {
            update: Some(Update::View(_)),
        }) => {}
        other => panic!("{name}: expected a view, got {other:?}"),
    }
    let calls = Arc::new(AtomicUsize::new(0));
    // A sidecar that never answers keeps no sender: dropping `reports` ends its stream.
    let answers = total.map(|_| reports.clone());
    let counted = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok(Some(update)) = updates.message().await {
            let Some(Update::Held(call)) = update.update else {
                continue;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            let (Some(total), Some(answers)) = (total, &answers) else {
                continue;
            };
            let answer = SidecarReport {
                report: Some(Report::Held(HeldAnswer {
                    id: call.id,
                    response: Some(HeldResponse {
                        result: Some(HeldResult::Browse(BrowseResponse {
                            messages: Vec::new(),
                            total,
                        })),
                    }),
                })),
            };
            if answers.send(answer).await.is_err() {
                return;
            }
        }
    });
    Joined {
        _reports: reports,
        calls,
    }
}

fn browse(queue: &str) -> MeshHeldRequest {
    MeshHeldRequest {
        namespace: "default".into(),
        request: Some(HeldRequest {
            call: Some(Call::Browse(BrowseRequest {
                queue: queue.into(),
                max: 10,
            })),
        }),
    }
}

async fn held(
    client: &mut ControlClient<tonic::transport::Channel>,
    request: MeshHeldRequest,
    token: &str,
) -> Result<MeshHeldResponse, tonic::Status> {
    let mut request = tonic::Request::new(request);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client
        .held_messages(request)
        .await
        .map(tonic::Response::into_inner)
}

fn outcome(answer: &MeshHeldResponse) -> Vec<(String, Result<u64, String>)> {
    answer
        .sidecars
        .iter()
        .map(|s| {
            let result = match s.response.as_ref().and_then(|r| r.result.as_ref()) {
                Some(HeldResult::Browse(b)) => Ok(b.total),
                Some(HeldResult::Error(e)) => Err(e.message.clone()),
                other => Err(format!("{other:?}")),
            };
            (s.sidecar.clone(), result)
        })
        .collect()
}

#[tokio::test]
async fn held_message_calls_reach_the_owners_down_their_join_streams() {
    let source = Arc::new(Source {
        mesh: MeshFile::parse(MANIFESTS).unwrap().to_state(),
        changes: watch::channel(0).0,
    });
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        ControlService::new(source, shutdown.clone())
            .held_timeout(Duration::from_millis(800))
            .serve(listener),
    );
    let mut client = ControlClient::connect(url).await.unwrap();
    let a = join(&mut client, "shop-a", Some(2)).await;
    let b = join(&mut client, "shop-b", None).await;
    let billing = join(&mut client, "billing", Some(99)).await;

    // shop-a answers; shop-b never does (reported after the timeout); billing may not own orders.
    let answer = held(&mut client, browse("orders"), "ok").await.unwrap();
    let got = outcome(&answer);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], ("shop-a".to_owned(), Ok(2)));
    assert_eq!(got[1].0, "shop-b");
    assert!(
        got[1].1.as_ref().unwrap_err().contains("did not answer"),
        "{got:?}"
    );
    assert_eq!(billing.calls.load(Ordering::SeqCst), 0);

    // A refused caller reaches no sidecar; an unknown queue is NOT_FOUND.
    let refused = held(&mut client, browse("orders"), "denied")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let unknown = held(&mut client, browse("nope"), "ok").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains("nope"), "{}", unknown.message());
    let empty = held(
        &mut client,
        MeshHeldRequest {
            namespace: "default".into(),
            request: Some(HeldRequest { call: None }),
        },
        "ok",
    )
    .await
    .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    assert_eq!(a.calls.load(Ordering::SeqCst), 1);

    // A sidecar that leaves mid-call is reported at once, not after the timeout.
    let mut asking = client.clone();
    let call = tokio::spawn(async move { held(&mut asking, browse("orders"), "ok").await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "shop-b was not asked again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(b);
    let got = outcome(&call.await.unwrap().unwrap());
    assert_eq!(got[0], ("shop-a".to_owned(), Ok(2)));
    let left = got[1].1.as_ref().unwrap_err();
    assert!(left.contains("left"), "{got:?}");
    drop((a, billing));
    shutdown.cancel();
}
