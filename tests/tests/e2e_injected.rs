//! End to end the way a cluster does it: pods are created through the API server, which calls the
//! injection webhook; the test plays kubelet — it starts each pod's injected `qmesh-sidecar` from the
//! injected container's own args and env (resolving the downward API, projecting a real bound
//! service-account token, giving the pod its own 127.x address and resolving the control-plane
//! Service name), and writes the pod's status. The operator authenticates every sidecar with a real
//! TokenReview; messages flow from the producer pod to the consumer pod, and status shows the backlog
//! and the consumers.

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use operator_support::*;
use qmesh_api::{Queue, Subscription};
use qmesh_operator::webhook::{self, tls};
use qmesh_proto::v1::{
    self, Ack, Open, PublishRequest, SubscribeRequest, broker_client::BrokerClient,
    subscribe_request, subscribe_response,
};
use qmesh_tests::{KubeApiServer, free_port, http, wait_for};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;

const NS: &str = "shop";

struct Kubelet {
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Kubelet {
    /// Runs the pod's injected sidecar the way a kubelet would, on `ip`.
    async fn run(&mut self, client: &Client, pod: &Pod, ip: Ipv4Addr, control: SocketAddr) {
        let name = pod.metadata.name.clone().unwrap();
        let sidecar = pod
            .spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .find(|c| c.name == "qmesh-sidecar")
            .expect("the pod was injected");
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        // The projected service-account token (audience qmesh, bound to this pod).
        let token = bound_token(client, NS, "default", pod).await;
        std::fs::write(dir.join("token"), token).unwrap();
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for e in sidecar.env.iter().flatten() {
            let value = match (
                &e.value,
                e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()),
            ) {
                (Some(v), _) => v.clone(),
                (None, Some(f)) => match f.field_path.as_str() {
                    "metadata.name" => name.clone(),
                    "metadata.namespace" => NS.to_owned(),
                    "status.podIP" => ip.to_string(),
                    other => panic!("unexpected downward-API field {other}"),
                },
                // What the kubelet puts there: the container's limit in bytes.
                (None, None) => match e
                    .value_from
                    .as_ref()
                    .and_then(|f| f.resource_field_ref.as_ref())
                {
                    Some(r) if r.resource == "limits.memory" => {
                        let limit =
                            &sidecar.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"];
                        qmesh_api::ByteSize::new(limit.0.as_str())
                            .bytes()
                            .unwrap()
                            .to_string()
                    }
                    Some(r) => panic!("unexpected downward-API resource {}", r.resource),
                    None => continue,
                },
            };
            env.insert(e.name.clone(), value);
        }
        // The pod's network namespace: its wildcard and loopback addresses are its own IP here.
        for key in [
            "QMESH_PEER_ADDR",
            "QMESH_GRPC_LISTEN",
            "QMESH_HTTP_LISTEN",
            "QMESH_ADMIN_LISTEN",
            "QMESH_AMQP_LISTEN",
        ] {
            let port = env[key].rsplit(':').next().unwrap().to_owned();
            env.insert(key.into(), format!("{ip}:{port}"));
        }
        // Cluster DNS: the control-plane Service resolves to the operator.
        assert_eq!(
            env["QMESH_CONTROL_PLANE"],
            "https://qmesh-control.qmesh-system.svc:7443"
        );
        assert!(
            env["QMESH_TRUST_BUNDLE"].contains("BEGIN CERTIFICATE"),
            "the injected sidecar trusts the mesh CA"
        );
        env.insert("QMESH_CONTROL_PLANE".into(), format!("https://{control}"));
        env.insert(
            "QMESH_TOKEN_FILE".into(),
            dir.join("token").display().to_string(),
        );
        env.insert(
            "QMESH_DATA_DIR".into(),
            dir.join("data").display().to_string(),
        );
        env.insert("QMESH_LOG_FORMAT".into(), "text".into());
        let log = std::fs::File::create(dir.join("sidecar.log")).unwrap();
        let exe = std::env::current_exe().unwrap();
        let binary = exe
            .parent()
            .and_then(|d| d.parent())
            .unwrap()
            .join("qmesh-sidecar");
        let child = Command::new(binary)
            .args(sidecar.args.iter().flatten())
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        set_ready(client, &name, ip).await;
        let admin = SocketAddr::from((ip, 7073));
        wait_for(
            &format!("{name}'s sidecar to join and be ready"),
            DEADLINE,
            || async move {
                http::request("GET", admin, "/readyz", &[], b"")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            },
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                std::fs::read_to_string(dir.join("sidecar.log")).unwrap_or_default()
            )
        });
    }
}

async fn set_ready(client: &Client, name: &str, ip: Ipv4Addr) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let patch = serde_json::json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

fn app_pod(name: &str, app: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pods_authenticate_exchange_messages_and_show_up_in_status() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let operator = Operator::start(client.clone(), "operator-0", |_| {});

    // The injection webhook, registered by URL, with its own CA.
    let port = free_port().unwrap();
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    hooks
        .create(&PostParams::default(), &serde_json::from_value(serde_json::json!({
            "metadata": {"name": "qmesh-sidecar-injector"},
            "webhooks": [{
                "name": "namespace.inject.qmesh.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "clientConfig": {"url": format!("https://127.0.0.1:{port}/inject")},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                "namespaceSelector": {"matchLabels": {"qmesh.io/inject": "enabled"}}
            }]
        })).unwrap())
        .await
        .unwrap();
    let manager = tls::Manager::start(
        client.clone(),
        "default",
        "qmesh-webhook-tls",
        "qmesh-webhook",
        Duration::from_secs(3600),
        ("qmesh-sidecar-injector".into(), "qmesh-validator".into()),
    )
    .await
    .unwrap();
    let template = webhook::SidecarTemplate {
        image: "ghcr.io/qmesh/qmesh-sidecar:test".into(),
        cpu_request: "50m".into(),
        cpu_limit: None,
        memory_request: "32Mi".into(),
        memory_limit: "128Mi".into(),
        log_level: "info".into(),
        data_size: "1Gi".into(),
        control_plane: "qmesh-control.qmesh-system.svc:7443".into(),
        trust_bundle: mesh_trust_bundle(&client).await,
        native: false,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let hook_task = tokio::spawn({
        let (resolver, stop) = (Arc::clone(&manager.resolver), stop.clone());
        async move {
            webhook::serve_tls(
                listener,
                resolver,
                webhook::router(template, None),
                async move { stop.cancelled().await },
            )
            .await
        }
    });

    // The namespace opts in; its default service account exists (no controller-manager here).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": NS, "labels": {"qmesh.io/inject": "enabled"}}})).unwrap()).await.unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap(),
        )
        .await
        .unwrap();
    let queues: Api<Queue> = Api::namespaced(client.clone(), NS);
    let subs: Api<Subscription> = Api::namespaced(client.clone(), NS);
    queues
        .create(
            &PostParams::default(),
            &queue(
                "orders",
                serde_json::json!({"publishers": {"matchLabels": {"app": "checkout"}}}),
            ),
        )
        .await
        .unwrap();
    subs.create(
        &PostParams::default(),
        &subscription("billing", "orders", "billing"),
    )
    .await
    .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut kubelet = Kubelet {
        children: Vec::new(),
        dir: tempfile::tempdir().unwrap(),
    };
    let base = 100 + (std::process::id() % 100) as u8;
    let (checkout_ip, billing_ip) = (
        Ipv4Addr::new(127, 88, base, 1),
        Ipv4Addr::new(127, 88, base, 2),
    );
    for (name, app, ip) in [
        ("checkout-1", "checkout", checkout_ip),
        ("billing-1", "billing", billing_ip),
    ] {
        let pod = pods
            .create(&PostParams::default(), &app_pod(name, app))
            .await
            .unwrap();
        kubelet.run(&client, &pod, ip, operator.control_addr).await;
    }

    // The injected env turns the AMQP listener on at the pod's 5672 (RabbitMQ client code): it
    // answers a client that does not speak AMQP with the protocol header it speaks.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut amqp = tokio::net::TcpStream::connect((checkout_ip, 5672))
            .await
            .unwrap();
        amqp.write_all(b"HELLO\r\n\r\n").await.unwrap();
        let mut header = [0u8; 8];
        amqp.read_exact(&mut header).await.unwrap();
        assert_eq!(&header, b"AMQP\x00\x00\x09\x01");
    }

    // Published while nobody consumes: the backlog shows in the Queue's status.
    let mut producer = BrokerClient::connect(format!("http://{checkout_ip}:7071"))
        .await
        .unwrap();
    for i in 0..10 {
        let message = v1::Message {
            id: format!("o{i}"),
            payload: b"{}".to_vec().into(),
            ..Default::default()
        };
        producer
            .publish(PublishRequest {
                queue: "orders".into(),
                message: Some(message),
                correlation: 0,
                delay: None,
                deliver_at: None,
                transaction: String::new(),
            })
            .await
            .unwrap();
    }
    wait_for("backlog 10 in the Queue's status", DEADLINE, || {
        let queues = queues.clone();
        async move { (queues.get("orders").await.ok()?.status?.backlog == 10).then_some(()) }
    })
    .await
    .unwrap();

    // The consumer app subscribes: every message arrives, the backlog drains, consumers = 1.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut consumer = BrokerClient::connect(format!("http://{billing_ip}:7071"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: "billing".into(),
            max_in_flight: 8,
            manual_credit: false,
        })),
    })
    .await
    .unwrap();
    let mut inbound = consumer
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(Ok(r)) = inbound.next().await {
            let Some(subscribe_response::Response::Deliveries(batch)) = r.response else {
                continue;
            };
            let receipts: Vec<String> =
                batch.deliveries.iter().map(|d| d.receipt.clone()).collect();
            log.lock().unwrap().extend(
                batch
                    .deliveries
                    .into_iter()
                    .map(|d| d.message.unwrap_or_default().id),
            );
            let _ = tx
                .send(SubscribeRequest {
                    request: Some(subscribe_request::Request::Ack(Ack { receipts })),
                })
                .await;
        }
    });
    wait_for("every message at billing-1", DEADLINE, || {
        let n = seen.lock().unwrap().len();
        async move { (n >= 10).then_some(()) }
    })
    .await
    .unwrap();
    wait_for(
        "backlog drained and one consumer in status",
        DEADLINE,
        || {
            let (queues, subs) = (queues.clone(), subs.clone());
            async move {
                let q = queues.get("orders").await.ok()?.status?;
                let s = subs.get("billing").await.ok()?.status?;
                (q.backlog == 0 && s.consumers == 1).then_some(())
            }
        },
    )
    .await
    .unwrap();
    let columns = operator_support::ok(server.kubectl(["get", "subscriptions", "-n", NS]).unwrap());
    println!("{columns}");
    stop.cancel();
    hook_task.await.unwrap().unwrap();
    drop(kubelet);
    operator.stop().await;
}
