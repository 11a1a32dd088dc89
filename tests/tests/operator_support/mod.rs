//! Shared by the `operator_*` tests: CRDs, an in-process operator, sidecar pods whose status the
//! test writes like a kubelet would, and small waits.

#![allow(dead_code, clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use qmesh_api::{Queue, Subscription};
use qmesh_operator::Config;
use qmesh_proto::control::{
    ControlUpdate, Hello, MeshView, SidecarReport, control_client::ControlClient,
    control_update::Update, sidecar_report::Report,
};
use qmesh_tests::{KubeApiServer, free_ports_on, repo_root, wait_for};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

/// Generous deadline for anything the operator does in reaction to a change.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn ok(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "command failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub async fn install_crds(server: &KubeApiServer) {
    let crds = repo_root().join("crds");
    ok(server
        .kubectl(["apply", "-f", &crds.display().to_string()])
        .unwrap());
    ok(server
        .kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/queues.qmesh.io",
            "crd/subscriptions.qmesh.io",
        ])
        .unwrap());
    let queues: Api<Queue> = Api::default_namespaced(server.client());
    let subs: Api<Subscription> = Api::default_namespaced(server.client());
    wait_for("queues and subscriptions to be served", DEADLINE, || {
        let (queues, subs) = (queues.clone(), subs.clone());
        async move {
            queues.list(&ListParams::default()).await.ok()?;
            subs.list(&ListParams::default()).await.ok()
        }
    })
    .await
    .unwrap();
}

/// An operator replica running in-process.
pub struct Operator {
    pub control_addr: SocketAddr,
    #[allow(dead_code)]
    pub client: Client,
    pub metrics_addr: SocketAddr,
    /// The KEDA scaler's address, where `configure` asked for one.
    pub scaler_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    /// Starts a replica named `identity` in namespace `default`, its config adjusted by `configure`.
    pub fn start(client: Client, identity: &str, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new("default", identity);
        let [control, metrics] = free_ports_on(std::net::Ipv4Addr::LOCALHOST).unwrap();
        config.control_addr = SocketAddr::from(([127, 0, 0, 1], control));
        config.metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics));
        config.lease_duration = Duration::from_secs(4);
        configure(&mut config);
        let shutdown = CancellationToken::new();
        let (control_addr, metrics_addr, scaler_addr) =
            (config.control_addr, config.metrics_addr, config.scaler_addr);
        let task = tokio::spawn({
            let (shutdown, client) = (shutdown.clone(), client.clone());
            async move {
                qmesh_operator::run(config, client, shutdown).await.unwrap();
            }
        });
        Self {
            control_addr,
            client,
            metrics_addr,
            scaler_addr,
            shutdown,
            task,
        }
    }

    /// Body of `GET path` on the metrics port.
    pub async fn http_get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .ok()?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        conn.read_to_string(&mut out).await.ok()?;
        Some(out)
    }

    /// Stops the replica gracefully and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("operator stops within 15s")
            .unwrap();
    }
}

/// A pod carrying the injected sidecar container, labelled `app=<app>`.
pub fn sidecar_pod(name: &str, app: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": app } },
        "spec": {
            "containers": [
                { "name": "app", "image": "example.com/app:1" },
                { "name": "qmesh-sidecar", "image": "ghcr.io/qmesh/qmesh-sidecar:test" }
            ]
        }
    }))
    .unwrap()
}

pub async fn create_pod(client: &Client, pod: &Pod) -> Pod {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), pod).await.unwrap()
}

/// Writes the pod's status the way a kubelet would: Running, `ip`, Ready = `ready`.
pub async fn set_pod_ready(client: &Client, name: &str, ip: &str, ready: bool) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let status = if ready { "True" } else { "False" };
    let patch = serde_json::json!({
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "conditions": [{ "type": "Ready", "status": status }]
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The Ready condition's (status, reason) of a Queue, if written.
pub fn queue_ready(queue: &Queue) -> Option<(String, String)> {
    let c = queue
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

/// The Ready condition's (status, reason) of a Subscription, if written.
pub fn subscription_ready(sub: &Subscription) -> Option<(String, String)> {
    let c = sub
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

/// Waits until the named Queue satisfies `check`.
pub async fn wait_queue(
    client: &Client,
    name: &str,
    what: &str,
    check: impl Fn(&Queue) -> bool,
) -> Queue {
    let api: Api<Queue> = Api::default_namespaced(client.clone());
    let check = &check;
    wait_for(&format!("queue {name}: {what}"), DEADLINE, || {
        let api = api.clone();
        async move { api.get_opt(name).await.ok().flatten().filter(check) }
    })
    .await
    .unwrap()
}

/// Waits until the named Subscription satisfies `check`.
pub async fn wait_subscription(
    client: &Client,
    name: &str,
    what: &str,
    check: impl Fn(&Subscription) -> bool,
) -> Subscription {
    let api: Api<Subscription> = Api::default_namespaced(client.clone());
    let check = &check;
    wait_for(&format!("subscription {name}: {what}"), DEADLINE, || {
        let api = api.clone();
        async move { api.get_opt(name).await.ok().flatten().filter(check) }
    })
    .await
    .unwrap()
}

/// Waits for an Event with `reason` about the object `name`, returning its note.
pub async fn wait_event(client: &Client, name: &str, reason: &str) -> String {
    let api: Api<Event> = Api::default_namespaced(client.clone());
    wait_for(&format!("event {reason} about {name}"), DEADLINE, || {
        let api = api.clone();
        async move {
            let events = api.list(&ListParams::default()).await.ok()?;
            events.items.into_iter().find_map(|e| {
                let about = e.regarding.as_ref()?.name.as_deref()? == name;
                (about && e.reason.as_deref() == Some(reason)).then(|| e.note.unwrap_or_default())
            })
        }
    })
    .await
    .unwrap()
}

pub fn queue(name: &str, spec: serde_json::Value) -> Queue {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1",
        "kind": "Queue",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .unwrap()
}

pub fn subscription(name: &str, queue: &str, app: &str) -> Subscription {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1",
        "kind": "Subscription",
        "metadata": { "name": name },
        "spec": { "queue": queue, "consumers": { "matchLabels": { "app": app } } },
    }))
    .unwrap()
}

/// A service-account token for `pod` (audience `qmesh`, bound to the pod), as the kubelet projects it.
pub async fn bound_token(client: &Client, namespace: &str, account: &str, pod: &Pod) -> String {
    use k8s_openapi::api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["qmesh".into()]),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(3600),
        }),
        ..Default::default()
    };
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap()
}

/// The mesh CA's trust bundle, once an operator in namespace `default` has made the CA.
#[allow(dead_code)]
pub async fn mesh_trust_bundle(client: &Client) -> String {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    wait_for("the operator to make the mesh CA", DEADLINE, || {
        let secrets = secrets.clone();
        async move {
            let secret = secrets
                .get_opt(qmesh_operator::mesh_ca::SECRET)
                .await
                .ok()??;
            String::from_utf8(secret.data?.get("ca.crt")?.0.clone()).ok()
        }
    })
    .await
    .unwrap()
}

/// A sidecar played by the test: joined to the operator's control plane over TLS as pod `name`,
/// sending reports (stats) and reading the updates (views, rejections) it gets.
pub struct Sidecar {
    pub reports: mpsc::Sender<SidecarReport>,
    updates: Streaming<ControlUpdate>,
}

impl Sidecar {
    pub async fn join(operator: &Operator, name: &str, token: &str) -> Self {
        // Over TLS, verified against the mesh CA the operator made.
        let bundle = mesh_trust_bundle(&operator.client).await;
        let channel = qmesh_identity::transport::connect_url(
            &format!("https://{}", operator.control_addr),
            Some(&bundle),
            |e| e,
        )
        .await
        .unwrap();
        let mut client = ControlClient::new(channel);
        let (reports, rx) = mpsc::channel(16);
        reports
            .send(SidecarReport {
                report: Some(Report::Hello(Hello {
                    namespace: "default".into(),
                    name: name.into(),
                    token: token.into(),
                    version: "test".into(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
        let updates = client
            .join(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { reports, updates }
    }

    pub async fn next(&mut self, within: Duration) -> Option<Update> {
        tokio::time::timeout(within, self.updates.message())
            .await
            .ok()
            .map(|m| m.unwrap().unwrap().update.unwrap())
    }

    pub async fn view(&mut self, within: Duration) -> MeshView {
        match self.next(within).await {
            Some(Update::View(view)) => view,
            other => panic!("expected a view within {within:?}, got {other:?}"),
        }
    }

    pub async fn rejection(&mut self) -> String {
        match self.next(DEADLINE).await {
            Some(Update::Rejected(r)) => r.reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
}
