//! End to end on a real API server: the operator runs in-process (out of cluster, as under
//! `cargo run`), the test plays kubelet — for each pod it starts a real `qmesh-sidecar` process
//! joined to the operator's control plane, on the pod's own 127.x.y.z address, and writes the pod's
//! status — and messages flow from a producer pod's sidecar to consumer pods'. Deleting a consumer
//! pod reroutes within seconds and loses nothing.

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use operator_support::*;
use qmesh_api::{Queue, Subscription};
use qmesh_proto::v1::{
    self, Ack, Open, PublishRequest, SubscribeRequest, broker_client::BrokerClient,
    subscribe_request, subscribe_response,
};
use qmesh_tests::{KubeApiServer, http, wait_for};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

fn sidecar_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("qmesh-sidecar");
    assert!(
        bin.is_file(),
        "{} missing: `cargo build --bin qmesh-sidecar` (the workspace test run builds it)",
        bin.display()
    );
    bin
}

/// A pod's sidecar process, killed when dropped.
struct PodSidecar {
    ip: Ipv4Addr,
    child: Option<Child>,
    _data: tempfile::TempDir,
}

impl PodSidecar {
    fn start(name: &str, control: SocketAddr, bundle: &str, n: u8) -> Self {
        Self::start_with(name, control, bundle, n, &[])
    }

    /// Started with extra environment (`QMESH_*` settings).
    fn start_with(
        name: &str,
        control: SocketAddr,
        bundle: &str,
        n: u8,
        env: &[(&str, &str)],
    ) -> Self {
        let ip = Ipv4Addr::new(127, 77, std::process::id() as u8, n);
        let data = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(data.path().join("sidecar.log")).unwrap();
        let child = Command::new(sidecar_binary())
            .envs(env.iter().copied())
            .env("QMESH_TRUST_BUNDLE", bundle)
            .args([
                "--control-plane",
                &format!("https://{control}"),
                "--name",
                name,
                "--namespace",
                "default",
            ])
            .args([
                "--peer-addr",
                &format!("{ip}:7070"),
                "--grpc-addr",
                &format!("{ip}:7071"),
            ])
            .args([
                "--http-addr",
                &format!("{ip}:7072"),
                "--admin-addr",
                &format!("{ip}:7073"),
                "--amqp-addr",
                &format!("{ip}:5672"),
            ])
            .arg("--data-dir")
            .arg(data.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            ip,
            child: Some(child),
            _data: data,
        }
    }

    fn grpc(&self) -> String {
        format!("http://{}:7071", self.ip)
    }

    async fn wait_ready(&self) {
        let admin = self.admin();
        wait_for(
            "sidecar to get its view from the operator",
            DEADLINE,
            || async move {
                http::request("GET", admin, "/readyz", &[], b"")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            },
        )
        .await
        .unwrap();
    }

    fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self._data.path().join("sidecar.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// How often its log says the certificate was renewed.
    fn renewals(&self) -> usize {
        std::fs::read_to_string(self._data.path().join("sidecar.log"))
            .unwrap_or_default()
            .matches("certificate renewed")
            .count()
    }

    fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 7073))
    }

    /// SIGTERM, as the kubelet sends it, then waits (at most `within`) for the process to exit.
    async fn terminate(&mut self, within: Duration) {
        let child = self.child.as_mut().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        wait_for("the terminated sidecar to exit", within, || {
            let exited = child.try_wait().ok().flatten().is_some();
            async move { exited.then_some(()) }
        })
        .await
        .unwrap();
        self.child = None;
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PodSidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Queue `orders` (published by `app=shop`) with Subscription `billing` (consumed by `app=billing`).
async fn orders_to_billing(client: &kube::Client) {
    let queues: Api<Queue> = Api::default_namespaced(client.clone());
    let subs: Api<Subscription> = Api::default_namespaced(client.clone());
    queues
        .create(
            &PostParams::default(),
            &queue(
                "orders",
                serde_json::json!({"publishers": {"matchLabels": {"app": "shop"}}}),
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
}

/// The kubelet's part for pods `shop-1` and `billing-1`: a sidecar process each (addresses from
/// `base`), a Ready status with their IP, and both ready.
async fn shop_and_billing_pods(
    client: &kube::Client,
    operator: &Operator,
    bundle: &str,
    base: u8,
) -> Vec<PodSidecar> {
    let mut sidecars = Vec::new();
    for (i, (pod, app)) in [("shop-1", "shop"), ("billing-1", "billing")]
        .into_iter()
        .enumerate()
    {
        create_pod(client, &sidecar_pod(pod, app)).await;
        let s = PodSidecar::start(pod, operator.control_addr, bundle, base + i as u8);
        set_pod_ready(client, pod, &s.ip.to_string(), true).await;
        sidecars.push(s);
    }
    for s in &sidecars {
        s.wait_ready().await;
    }
    sidecars
}

async fn consume(
    url: String,
    subscription: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    let mut client = BrokerClient::connect(url).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: subscription.into(),
            max_in_flight: 8,
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
    tokio::spawn(async move {
        while let Some(Ok(r)) = inbound.next().await {
            let Some(subscribe_response::Response::Deliveries(batch)) = r.response else {
                continue;
            };
            let mut receipts = Vec::new();
            for d in batch.deliveries {
                seen.lock().unwrap().push(d.message.unwrap_or_default().id);
                receipts.push(d.receipt);
            }
            if tx
                .send(SubscribeRequest {
                    request: Some(subscribe_request::Request::Ack(Ack { receipts })),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

async fn publish(url: &str, ids: std::ops::Range<u32>) {
    let mut client = BrokerClient::connect(url.to_owned()).await.unwrap();
    for i in ids {
        let message = v1::Message {
            id: format!("order-{i}"),
            payload: b"{}".to_vec().into(),
            ..Default::default()
        };
        client
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_between_pods_through_the_operators_views_and_reroute_when_a_consumer_pod_goes()
 {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let operator = Operator::start(client.clone(), "operator-0", |c| {
        c.insecure_skip_sidecar_auth = true
    });
    let bundle = mesh_trust_bundle(&client).await;

    orders_to_billing(&client).await;

    // The kubelet's part: pods get a sidecar process and a Ready status with their IP.
    let mut sidecars = shop_and_billing_pods(&client, &operator, &bundle, 1).await;

    let seen1 = Arc::new(Mutex::new(Vec::new()));
    let c1 = consume(sidecars[1].grpc(), "billing", Arc::clone(&seen1)).await;
    publish(&sidecars[0].grpc(), 0..50).await;
    wait_for("50 orders at billing-1", DEADLINE, || {
        let n = seen1.lock().unwrap().len();
        async move { (n >= 50).then_some(()) }
    })
    .await
    .unwrap();

    // The operator rolls the pods up into status.
    wait_subscription(&client, "billing", "one ready consumer", |s| {
        s.status.as_ref().is_some_and(|st| st.consumers == 1)
    })
    .await;

    // A second consumer pod appears, the first goes away (killed, pod deleted): new orders reroute.
    create_pod(&client, &sidecar_pod("billing-2", "billing")).await;
    let s2 = PodSidecar::start("billing-2", operator.control_addr, &bundle, 3);
    set_pod_ready(&client, "billing-2", &s2.ip.to_string(), true).await;
    s2.wait_ready().await;
    let seen2 = Arc::new(Mutex::new(Vec::new()));
    let _c2 = consume(s2.grpc(), "billing", Arc::clone(&seen2)).await;
    c1.abort();
    sidecars[1].kill9();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.delete("billing-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    publish(&sidecars[0].grpc(), 50..100).await;
    wait_for(
        "orders 50..100 at billing-2",
        Duration::from_secs(30),
        || {
            let all: BTreeSet<String> = seen1
                .lock()
                .unwrap()
                .iter()
                .chain(seen2.lock().unwrap().iter())
                .cloned()
                .collect();
            async move { (all.len() >= 100).then_some(()) }
        },
    )
    .await
    .unwrap();
    let all: BTreeSet<String> = seen1
        .lock()
        .unwrap()
        .iter()
        .chain(seen2.lock().unwrap().iter())
        .cloned()
        .collect();
    println!(
        "100 orders: billing-1 got {}, billing-2 got {}; rerouted in {:.1}s; {} distinct",
        seen1.lock().unwrap().len(),
        seen2.lock().unwrap().len(),
        started.elapsed().as_secs_f64(),
        all.len()
    );
    assert_eq!(all.len(), 100, "nothing lost");
    assert!(seen2.lock().unwrap().iter().any(|id| id == "order-99"));
    drop(s2);
    drop(sidecars);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_keep_serving_their_last_view_while_the_operator_is_away_and_rejoin_when_it_returns()
 {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let control_port = qmesh_tests::free_port().unwrap();
    let start_operator = |identity: &str| {
        Operator::start(client.clone(), identity, |c| {
            c.insecure_skip_sidecar_auth = true;
            c.control_addr = SocketAddr::from(([127, 0, 0, 1], control_port));
        })
    };
    let operator = start_operator("operator-a");
    let bundle = mesh_trust_bundle(&client).await;
    let queues: Api<Queue> = Api::default_namespaced(client.clone());
    let subs: Api<Subscription> = Api::default_namespaced(client.clone());
    queues
        .create(
            &PostParams::default(),
            &queue("orders", serde_json::json!({})),
        )
        .await
        .unwrap();
    subs.create(
        &PostParams::default(),
        &subscription("billing", "orders", "billing"),
    )
    .await
    .unwrap();
    let mut sidecars = Vec::new();
    for (i, (pod, app)) in [("shop-1", "shop"), ("billing-1", "billing")]
        .into_iter()
        .enumerate()
    {
        create_pod(&client, &sidecar_pod(pod, app)).await;
        let s = PodSidecar::start(pod, operator.control_addr, &bundle, i as u8 + 11);
        set_pod_ready(&client, pod, &s.ip.to_string(), true).await;
        sidecars.push(s);
    }
    for s in &sidecars {
        s.wait_ready().await;
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _consumer = consume(sidecars[1].grpc(), "billing", Arc::clone(&seen)).await;

    // The operator goes away: the data plane keeps working on the last view.
    operator.stop().await;
    publish(&sidecars[0].grpc(), 0..20).await;
    wait_for("deliveries without a control plane", DEADLINE, || {
        let n = seen.lock().unwrap().len();
        async move { (n >= 20).then_some(()) }
    })
    .await
    .unwrap();

    // It comes back on the same address: the sidecars rejoin (with backoff) and follow new views —
    // a second consumer pod appearing now gets traffic.
    let operator = start_operator("operator-b");
    create_pod(&client, &sidecar_pod("billing-2", "billing")).await;
    let s3 = PodSidecar::start("billing-2", operator.control_addr, &bundle, 13);
    set_pod_ready(&client, "billing-2", &s3.ip.to_string(), true).await;
    s3.wait_ready().await;
    let seen2 = Arc::new(Mutex::new(Vec::new()));
    let _consumer2 = consume(s3.grpc(), "billing", Arc::clone(&seen2)).await;
    let started = std::time::Instant::now();
    wait_for(
        "the producer's rejoined view to route to billing-2",
        Duration::from_secs(30),
        || {
            let url = sidecars[0].grpc();
            let seen2 = Arc::clone(&seen2);
            async move {
                publish(&url, 1000..1010).await;
                (!seen2.lock().unwrap().is_empty()).then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nproducer log:\n{}", sidecars[0].log_tail()));
    println!(
        "rejoined and rerouted {:.1}s after the operator returned",
        started.elapsed().as_secs_f64()
    );
    drop(s3);
    drop(sidecars);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_renew_their_certificates_from_the_operator_while_messages_flow() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    // Certificates of 4 s: each sidecar renews about every 2 s, over live peer streams.
    let operator = Operator::start(client.clone(), "operator-0", |c| {
        c.insecure_skip_sidecar_auth = true;
        c.certificate_ttl = Duration::from_secs(4);
    });
    let bundle = mesh_trust_bundle(&client).await;
    orders_to_billing(&client).await;
    let sidecars = shop_and_billing_pods(&client, &operator, &bundle, 21).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _consumer = consume(sidecars[1].grpc(), "billing", Arc::clone(&seen)).await;
    // Ten rounds a second apart: the certificates are renewed in between.
    for round in 0..10u32 {
        publish(&sidecars[0].grpc(), round * 20..round * 20 + 20).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_for(
        "every order delivered across the renewals",
        Duration::from_secs(30),
        || {
            let n = seen.lock().unwrap().iter().collect::<BTreeSet<_>>().len();
            async move { (n >= 200).then_some(()) }
        },
    )
    .await
    .unwrap();
    for s in &sidecars {
        assert!(
            s.renewals() >= 2,
            "a sidecar renewed {} times in 10 s of 4 s certificates:\n{}",
            s.renewals(),
            s.log_tail()
        );
    }
    println!(
        "renewals: shop-1 {}, billing-1 {}; {} deliveries of 200 orders",
        sidecars[0].renewals(),
        sidecars[1].renewals(),
        seen.lock().unwrap().len()
    );
}

/// The version of the view the sidecar whose admin port is `admin` follows (`/v1/stats`).
async fn view_version(admin: SocketAddr) -> u64 {
    http::request("GET", admin, "/v1/stats", &[], b"")
        .await
        .ok()
        .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
        .and_then(|v| v["viewVersion"].as_u64())
        .unwrap_or(0)
}

/// A pod being deleted turns unready before its sidecar's drain hands the backlog over: the other
/// publisher pod, which has already dropped it from its ready peers, must still take what it owns
/// (the queue's owners, not its ready peers, say who may hand over), and the consumer pod must
/// still take its deliveries meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_pod_going_away_hands_its_backlog_over_although_it_is_no_longer_ready() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let operator = Operator::start(client.clone(), "operator-0", |c| {
        c.insecure_skip_sidecar_auth = true
    });
    let bundle = mesh_trust_bundle(&client).await;
    orders_to_billing(&client).await;
    let mut pods = Vec::new();
    for (i, (pod, app)) in [
        ("shop-1", "shop"),
        ("shop-2", "shop"),
        ("billing-1", "billing"),
    ]
    .into_iter()
    .enumerate()
    {
        create_pod(&client, &sidecar_pod(pod, app)).await;
        let s = PodSidecar::start_with(
            pod,
            operator.control_addr,
            &bundle,
            31 + i as u8,
            &[("QMESH_SHUTDOWN_GRACE", "8s")],
        );
        set_pod_ready(&client, pod, &s.ip.to_string(), true).await;
        pods.push(s);
    }
    for s in &pods {
        s.wait_ready().await;
    }
    // No consumer app yet: the 50 orders stay owned by shop-1.
    publish(&pods[0].grpc(), 0..50).await;

    // The kubelet's part of a deletion: the pod turns unready (the operator drops it from the
    // others' ready peers), then its sidecar gets SIGTERM.
    let shop2 = pods[1].admin();
    let before = view_version(shop2).await;
    set_pod_ready(&client, "shop-1", &pods[0].ip.to_string(), false).await;
    wait_for(
        "shop-2's view without shop-1 as a ready peer",
        DEADLINE,
        || async move { (view_version(shop2).await > before).then_some(()) },
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    pods[0].terminate(Duration::from_secs(30)).await;
    let drained = started.elapsed();
    let log = pods[0].log_tail();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let _consumer = consume(pods[2].grpc(), "billing", Arc::clone(&seen)).await;
    wait_for(
        "the 50 orders delivered from shop-2",
        Duration::from_secs(30),
        || {
            let n = seen.lock().unwrap().iter().collect::<BTreeSet<_>>().len();
            async move { (n >= 50).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} of 50\nshop-1 (terminated) log:\n{log}\nshop-2 log:\n{}",
            seen.lock().unwrap().len(),
            pods[1].log_tail()
        )
    });
    println!(
        "shop-1 drained in {:.1}s; {} deliveries of 50 orders",
        drained.as_secs_f64(),
        seen.lock().unwrap().len()
    );
    drop(pods);
    operator.stop().await;
}
