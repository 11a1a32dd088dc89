//! Clients used by the mesh tests: publishers and consumers over the real gRPC app API, recording
//! every message so tests can count them.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use qmesh_proto::v1::{
    self, Ack, Nack, Open, PublishRequest, SubscribeRequest, broker_client::BrokerClient,
    publish_result, subscribe_request, subscribe_response,
};
use qmesh_tests::{MeshBuilder, wait_for};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

/// The sidecar binary built by cargo for these tests.
pub const SIDECAR: &str = env!("CARGO_BIN_EXE_qmesh-sidecar");

/// A mesh builder for the sidecar binary.
pub fn mesh() -> MeshBuilder {
    MeshBuilder::new()
}

/// A gRPC client of a sidecar's app API.
pub async fn client(url: &str) -> BrokerClient<tonic::transport::Channel> {
    BrokerClient::connect(url.to_owned()).await.unwrap()
}

/// A message to publish.
pub fn message(id: &str, key: &str, payload: &str) -> v1::Message {
    v1::Message {
        id: id.to_owned(),
        payload: payload.as_bytes().to_vec().into(),
        headers: HashMap::new(),
        key: key.to_owned(),
        publish_time: None,
    }
}

/// Publishes pipelined over `PublishStream`; returns each result in request order.
pub async fn publish_all(
    url: &str,
    queue: &str,
    messages: Vec<v1::Message>,
) -> Vec<Result<v1::PublishResponse, v1::Error>> {
    let mut client = client(url).await;
    let n = messages.len();
    let requests: Vec<PublishRequest> = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| PublishRequest {
            queue: queue.to_owned(),
            message: Some(m),
            correlation: i as u64,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .collect();
    let mut results: Vec<Option<Result<v1::PublishResponse, v1::Error>>> = vec![None; n];
    let mut stream = client
        .publish_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    while let Some(r) = stream.next().await {
        let r = r.unwrap();
        results[r.correlation as usize] = Some(match r.result.unwrap() {
            publish_result::Result::Ok(ok) => Ok(ok),
            publish_result::Result::Error(e) => Err(e),
        });
    }
    results
        .into_iter()
        .map(|r| r.expect("every publish answered"))
        .collect()
}

/// One delivery as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which consumer got it.
    pub consumer: String,
    /// Message id.
    pub id: String,
    /// Ordering key.
    pub key: String,
    /// Payload as text.
    pub payload: String,
    /// Headers.
    pub headers: HashMap<String, String>,
    /// Attempt.
    pub attempt: u32,
}

/// What a consumer does with a delivery.
#[derive(Clone, Copy, Debug)]
pub enum Verdict {
    /// Ack.
    Ack,
    /// Nack with this reason.
    Nack(&'static str),
    /// Neither: keep it (a stuck consumer).
    Hold,
}

/// A consumer app on a `Subscribe` stream that records what it gets.
pub struct Consumer {
    /// Everything received, in order.
    pub received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    /// Subscribes at `url` to `subscription`; `verdict` decides per delivery.
    pub async fn start(
        name: &str,
        url: &str,
        subscription: &str,
        max_in_flight: u32,
        verdict: impl Fn(&Received) -> Verdict + Send + 'static,
    ) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut inbound) = open_subscription(url, subscription, max_in_flight).await;
        let name = name.to_owned();
        let log = Arc::clone(&received);
        let task = tokio::spawn(async move {
            while let Some(Ok(response)) = inbound.next().await {
                let Some(subscribe_response::Response::Deliveries(batch)) = response.response
                else {
                    continue;
                };
                let mut acks = Vec::new();
                for d in batch.deliveries {
                    let m = d.message.unwrap_or_default();
                    let r = Received {
                        consumer: name.clone(),
                        id: m.id,
                        key: m.key,
                        payload: String::from_utf8_lossy(&m.payload).into_owned(),
                        headers: m.headers,
                        attempt: d.attempt,
                    };
                    let v = verdict(&r);
                    log.lock().unwrap().push(r);
                    match v {
                        Verdict::Ack => acks.push(d.receipt),
                        Verdict::Hold => {}
                        Verdict::Nack(reason) => {
                            let nack = Nack {
                                receipts: vec![d.receipt],
                                delay: None,
                                reason: reason.into(),
                                dead_letter: false,
                            };
                            let req = SubscribeRequest {
                                request: Some(subscribe_request::Request::Nack(nack)),
                            };
                            if tx.send(req).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                if !acks.is_empty() {
                    let req = SubscribeRequest {
                        request: Some(subscribe_request::Request::Ack(Ack { receipts: acks })),
                    };
                    if tx.send(req).await.is_err() {
                        return;
                    }
                }
            }
        });
        Self { received, task }
    }

    /// Ids received so far (with repeats).
    pub fn ids(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.id.clone())
            .collect()
    }

    /// Distinct-or-not deliveries so far whose id starts with `prefix`.
    pub fn count_prefixed(&self, prefix: &str) -> usize {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.id.starts_with(prefix))
            .count()
    }

    /// Waits up to `secs` for `n` deliveries with ids starting with `prefix`; on a timeout, fails
    /// with how many came.
    pub async fn expect_prefixed(&self, prefix: &str, n: usize, secs: u64, what: &str) {
        let done = wait_for(what, Duration::from_secs(secs), || {
            let got = self.count_prefixed(prefix);
            async move { (got >= n).then_some(()) }
        })
        .await;
        assert!(
            done.is_ok(),
            "{what}: {} of {n} within {secs} s",
            self.count_prefixed(prefix)
        );
    }

    /// Number of deliveries so far.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Stops consuming (closing the stream).
    pub fn stop(self) -> Vec<Received> {
        self.task.abort();
        self.received.lock().unwrap().clone()
    }
}

/// Opens a `Subscribe` stream and waits for its `subscribed` answer: the sender for acks, nacks and
/// credits, and the stream of deliveries.
pub async fn open_subscription(
    url: &str,
    subscription: &str,
    max_in_flight: u32,
) -> (
    mpsc::Sender<SubscribeRequest>,
    tonic::Streaming<v1::SubscribeResponse>,
) {
    let mut client = client(url).await;
    let (tx, rx) = mpsc::channel(64);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: subscription.to_owned(),
            max_in_flight,
            manual_credit: false,
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    match inbound.next().await {
        Some(Ok(v1::SubscribeResponse {
            response: Some(subscribe_response::Response::Subscribed(_)),
        })) => {}
        other => panic!("not subscribed: {other:?}"),
    }
    (tx, inbound)
}

/// Waits until `check` holds, up to `secs` seconds.
pub async fn until(what: &str, secs: u64, check: impl Fn() -> bool) {
    wait_for(what, Duration::from_secs(secs), || {
        let ok = check();
        async move { ok.then_some(()) }
    })
    .await
    .unwrap();
}

/// Distinct ids and duplicate count of a set of deliveries (first attempts and redeliveries).
pub fn tally(ids: impl IntoIterator<Item = String>) -> (std::collections::HashSet<String>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for id in ids {
        if !seen.insert(id) {
            dups += 1;
        }
    }
    (seen, dups)
}

/// The sidecar's `/v1/stats` JSON.
pub async fn stats(admin: std::net::SocketAddr) -> Option<serde_json::Value> {
    qmesh_tests::http::request("GET", admin, "/v1/stats", &[], b"")
        .await
        .ok()?
        .json()
        .ok()
}

/// A figure of one subscription in a sidecar's stats (`backlog`, `parked`, `inFlight`, …), 0 when
/// the sidecar does not list the subscription.
pub async fn sub_figure(admin: std::net::SocketAddr, subscription: &str, field: &str) -> u64 {
    let Some(s) = stats(admin).await else {
        return 0;
    };
    s["subscriptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["subscription"] == subscription)
        .filter_map(|x| x[field].as_u64())
        .sum()
}

/// Messages a sidecar owns for `queue` (0 when it owns none).
pub async fn queue_backlog(admin: std::net::SocketAddr, queue: &str) -> u64 {
    let Some(s) = stats(admin).await else {
        return 0;
    };
    s["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["queue"] == queue)
        .filter_map(|x| x["backlog"].as_u64())
        .sum()
}

/// Waits until the owner at `admin` owes nothing more to `subscription`.
pub async fn until_sub_settled(admin: std::net::SocketAddr, subscription: &str, secs: u64) {
    let result = wait_for(
        "the subscription's backlog to drain",
        Duration::from_secs(secs),
        || async move { (sub_figure(admin, subscription, "backlog").await == 0).then_some(()) },
    )
    .await;
    if let Err(e) = result {
        panic!("{e}: stats {:?}", stats(admin).await);
    }
}

/// A tmpfs mounted on a directory for a test (root may mount one): a small disk that fills up.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`48m`) on `dir`; `None` where mounting is not allowed.
    pub fn mount(dir: &std::path::Path, size: &str) -> Option<Self> {
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            .then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A sidecar started alone from a mesh file (as document `a`) whose addresses may use port 0, and
/// where it says it listens (`--addresses-file`); killed when dropped.
pub struct Standalone {
    child: std::process::Child,
    /// `peer`, `grpc`, `http` and `admin` as written by the sidecar.
    pub addresses: serde_json::Value,
    _dir: tempfile::TempDir,
}

impl Standalone {
    /// Starts it and waits (30 s) until it has bound its ports.
    pub async fn start(mesh_file: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(&mesh, mesh_file).unwrap();
        let file = dir.path().join("addresses.json");
        let identity = dir.path().join("identity");
        qmesh_tests::mesh::issue_identity(&qmesh_tests::mesh::test_ca().unwrap(), "a", &identity)
            .unwrap();
        let log = std::fs::File::create(dir.path().join("sidecar.log")).unwrap();
        let mut child = std::process::Command::new(SIDECAR)
            .arg("--mesh-file")
            .arg(&mesh)
            .arg("--identity-dir")
            .arg(&identity)
            .args(["--name", "a", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--addresses-file")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let text = wait_for("the addresses file", Duration::from_secs(30), || {
            let exited = child.try_wait().unwrap();
            let text = std::fs::read_to_string(&file).ok();
            async move {
                assert!(exited.is_none(), "the sidecar exited ({exited:?})");
                text
            }
        })
        .await
        .unwrap();
        Self {
            child,
            addresses: serde_json::from_str(&text).unwrap(),
            _dir: dir,
        }
    }

    /// The address it gives for `what` (`peer`, `grpc`, `http`, `admin`).
    pub fn addr(&self, what: &str) -> std::net::SocketAddr {
        self.addresses[what].as_str().unwrap().parse().unwrap()
    }

    /// What it logged so far (its standard error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("sidecar.log")).unwrap_or_default()
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
