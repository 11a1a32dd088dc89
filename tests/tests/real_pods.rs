//! Real pods (tier 6): the chart installed with this build's images on a one-node cluster
//! (`hack/cluster.sh`), the operator running as pods, the API server reaching the webhooks through
//! their Service, pods of an opted-in namespace injected and started by the kubelet, and messages
//! flowing between pods over their pod IPs, every one counted. Faults a cluster brings: a sidecar
//! killed with `kill -9` inside its pod, a producer pod deleted with a backlog, an app that
//! publishes as it starts, rolling updates of consumers and producers under a continual prober,
//! the operator's leader killed; and `examples/` applied as a user would, read back with `kubectl
//! get`. The first test of a run brings the cluster up fresh and installs the chart; the others
//! reuse it (cargo test shares it within its process; nextest runs each test in a process of its
//! own, one at a time — `.config/nextest.toml` — and the later ones find the cluster the run
//! marked); each test has its own namespace.
//!
//! Runs where `QMESH_REAL_PODS=1` (set by `hack/test.sh`; it needs root and cgroup v2).

#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::OnceLock,
    time::Duration,
};

use qmesh_proto::externalscaler::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use qmesh_tests::{
    cluster::{AppLogs, RealCluster},
    repo_root, wait_for,
};

const DEADLINE: Duration = Duration::from_secs(180);

/// An opted-in namespace with Queue `orders` (published by `app=producer`) and Subscription
/// `billing` (consumed by `app=consumer`).
fn orders_namespace(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{qmesh.io/inject: enabled}}}}\n---\n\
         apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec: {{publishers: {{matchLabels: {{app: producer}}}}}}\n---\n\
         apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {{name: billing, namespace: {ns}}}\n\
         spec: {{queue: orders, consumers: {{matchLabels: {{app: consumer}}}}}}\n---\n"
    )
}

/// A pod of `qmesh/example:dev` labelled `app`, running `command` (restarted only on failure).
fn app_pod(ns: &str, name: &str, app: &str, command: &[&str]) -> String {
    pod_with_restart_policy(ns, name, app, command, "OnFailure")
}

fn pod_with_restart_policy(
    ns: &str,
    name: &str,
    app: &str,
    command: &[&str],
    restart_policy: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
         spec:\n  restartPolicy: {restart_policy}\n  containers:\n    - name: app\n      image: qmesh/example:dev\n\
         \x20     imagePullPolicy: Never\n      command: [{}]\n---\n",
        yaml_list(command)
    )
}

fn yaml_list(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|c| format!("{c:?}")).collect();
    items.join(", ")
}

/// A Deployment of `qmesh/example:dev` pods labelled `app`, running `command`.
fn app_deployment(ns: &str, app: &str, replicas: u32, command: &[&str]) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {app}, namespace: {ns}}}\n\
         spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {app}}}}}\n  template:\n\
         \x20   metadata: {{labels: {{app: {app}}}}}\n    spec:\n      containers:\n\
         \x20       - name: app\n          image: qmesh/example:dev\n          imagePullPolicy: Never\n\
         \x20         command: [{}]\n---\n",
        yaml_list(command)
    )
}

/// The prober's producer: 20 orders a second, until its pod goes.
const PROBE_PUBLISH: &[&str] = &[
    "qmesh", "pub", "orders", "probe", "--count", "0", "--rate", "20",
];
/// The prober's consumer: every order, until its pod goes.
const PROBE_CONSUME: &[&str] = &["qmesh", "sub", "billing", "--json"];

/// What the prober's pods have said so far: ids acknowledged to the producers, ids consumed, and
/// deliveries in all (a redelivered id counts once in `consumed`, every time in `deliveries`).
#[derive(Debug)]
struct Tally {
    published: BTreeSet<String>,
    consumed: BTreeSet<String>,
    deliveries: usize,
}

impl Tally {
    fn of(logs: &AppLogs) -> Self {
        let mut tally = Tally {
            published: BTreeSet::new(),
            consumed: BTreeSet::new(),
            deliveries: 0,
        };
        for (pod, lines) in logs.lines() {
            let output = lines.join("\n");
            if pod.starts_with("producer") {
                tally.published.extend(published_ids(&output));
            } else {
                let ids: Vec<String> = output
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter_map(|v| v["id"].as_str().map(str::to_owned))
                    .collect();
                tally.deliveries += ids.len();
                tally.consumed.extend(ids);
            }
        }
        tally
    }

    fn duplicates(&self) -> usize {
        self.deliveries - self.consumed.len()
    }
}

/// Waits until every order in `published` was consumed; the tally then.
async fn all_consumed(logs: &AppLogs, published: &BTreeSet<String>) -> Tally {
    let settled = wait_for("every acknowledged order consumed", DEADLINE, || {
        let tally = Tally::of(logs);
        async move { published.is_subset(&tally.consumed).then_some(tally) }
    })
    .await;
    let tally = settled.unwrap_or_else(|_| Tally::of(logs));
    let lost: Vec<&String> = published.difference(&tally.consumed).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged orders never consumed: {lost:?}",
        lost.len(),
        published.len()
    );
    tally
}

/// Waits until the prober has consumed `more` orders beyond what it had.
async fn flowing(logs: &AppLogs, more: usize) {
    let from = Tally::of(logs).consumed.len();
    wait_for("the prober's orders to flow", DEADLINE, || {
        let now = Tally::of(logs).consumed.len();
        async move { (now >= from + more).then_some(()) }
    })
    .await
    .unwrap();
}

const PUBLISH_100: &[&str] = &["qmesh", "pub", "orders", "hello", "--count", "100"];
const CONSUME_100: &[&str] = &["qmesh", "sub", "billing", "--count", "100", "--json"];

/// Whether this run asks for the tier; says so when it does not.
fn wanted() -> bool {
    let wanted = qmesh_tests::cluster::real_pods_wanted();
    if !wanted {
        eprintln!("real-pods tier not asked for (QMESH_REAL_PODS=1; hack/test.sh sets it)");
    }
    wanted
}

/// The directory of the binaries the images are made of: `$QMESH_IMAGE_BINARIES` (to try another
/// build), else this build's own (`target/<profile>`).
fn binaries() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("QMESH_IMAGE_BINARIES") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf()
}

/// The cluster, with the CRDs and the chart installed and the operator Ready; started by the
/// first test that asks, shared by the others.
fn cluster() -> &'static RealCluster {
    static CLUSTER: OnceLock<RealCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // nextest runs each test in a process of its own: the first of the run sets the cluster
        // up, the others reuse it.
        let run = std::env::var("NEXTEST_RUN_ID").ok();
        if let Some(cluster) = run.as_deref().and_then(RealCluster::reuse) {
            eprintln!("real pods: reusing the cluster this test run set up");
            return cluster;
        }
        let started = std::time::Instant::now();
        let cluster = RealCluster::start(&binaries()).unwrap();
        eprintln!(
            "real pods: cluster up and images imported in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        cluster
            .kubectl_ok(&[
                "apply",
                "-f",
                &repo_root().join("crds").display().to_string(),
            ])
            .unwrap();
        let chart = repo_root().join("charts/qmesh").display().to_string();
        let values = repo_root()
            .join("hack/cluster-values.yaml")
            .display()
            .to_string();
        let install = cluster
            .helm(&[
                "install",
                "qmesh",
                &chart,
                "-n",
                "qmesh-system",
                "--create-namespace",
                "-f",
                &values,
            ])
            .unwrap();
        assert!(
            install.status.success(),
            "helm install: {}",
            String::from_utf8_lossy(&install.stderr)
        );
        // The Deployment's pods appear a moment after the install; `kubectl wait` refuses a
        // selector that matches nothing yet, so it is asked again until they are there and Ready.
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let ready = cluster.kubectl_ok(&[
                "wait",
                "--for=condition=Ready",
                "pod",
                "-l",
                "app.kubernetes.io/component=operator",
                "-n",
                "qmesh-system",
                "--timeout=10s",
            ]);
            match ready {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("operator pods not Ready within {DEADLINE:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        if let Some(run) = &run {
            cluster.mark_for_run(run).unwrap();
        }
        eprintln!(
            "real pods: cluster set up (chart installed, operator Ready) in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        cluster
    })
}

/// The standard output of a pod's `app` container once it exited 0.
async fn app_output(cluster: &RealCluster, namespace: &str, pod: &str) -> String {
    let (code, logs) = app_exit(cluster, namespace, pod, |code| code == 0).await;
    assert_eq!(code, 0);
    logs
}

/// The exit code and standard output of a pod's `app` container once it ended with a code `done`
/// accepts.
async fn app_exit(
    cluster: &RealCluster,
    namespace: &str,
    pod: &str,
    done: impl Fn(i32) -> bool,
) -> (i32, String) {
    wait_for(&format!("{pod}'s app to finish"), DEADLINE, || {
        let state = cluster.kubectl_ok(&[
            "get",
            "pod",
            pod,
            "-n",
            namespace,
            "-o",
            "jsonpath={.status.containerStatuses[?(@.name==\"app\")].state.terminated.exitCode}",
        ]);
        let logs = cluster.kubectl_ok(&["logs", pod, "-n", namespace, "-c", "app"]);
        let done = &done;
        async move {
            let code: i32 = state.ok()?.trim().parse().ok()?;
            done(code).then_some((code, logs.ok()?))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", describe_pods(cluster, namespace)))
}

fn describe_pods(cluster: &RealCluster, namespace: &str) -> String {
    cluster
        .kubectl(&["describe", "pods", "-n", namespace])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Ids a `qmesh pub` run printed as published.
fn published_ids(output: &str) -> BTreeSet<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("published ")?.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Ids a `qmesh sub --json` run printed.
fn consumed_ids(output: &str) -> BTreeSet<String> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect()
}

fn apply(cluster: &RealCluster, yaml: &str) {
    let manifest = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(manifest.path(), yaml).unwrap();
    cluster
        .kubectl_ok(&["apply", "-f", &manifest.path().display().to_string()])
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_on_real_pods_and_messages_flow_between_injected_pods() {
    if !wanted() {
        return;
    }
    let started = std::time::Instant::now();
    let cluster = cluster();

    // One replica holds the Lease and labels its pod leader.
    let leader = settled_leader(cluster, None).await;

    // An opted-in namespace: the API server calls the injector through its Service, the kubelet
    // starts each pod with its sidecar, and the consumer takes every order the producer published.
    apply(
        cluster,
        &(orders_namespace("shop")
            + &app_pod("shop", "consumer", "consumer", CONSUME_100)
            + &app_pod("shop", "producer", "producer", PUBLISH_100)),
    );
    for pod in ["producer", "consumer"] {
        let containers = cluster
            .kubectl_ok(&[
                "get",
                "pod",
                pod,
                "-n",
                "shop",
                "-o",
                "jsonpath={.spec.containers[*].name}",
            ])
            .unwrap();
        assert!(containers.contains("qmesh-sidecar"), "{pod}: {containers}");
    }
    let received = consumed_ids(&app_output(cluster, "shop", "consumer").await);
    let published = published_ids(&app_output(cluster, "shop", "producer").await);
    assert_eq!(received.len(), 100, "100 distinct orders consumed");
    assert!(
        received.is_subset(&published),
        "every order consumed was published by the producer pod"
    );

    // The operator, as a pod, writes the Queue's status.
    let subscriptions = wait_for("the Queue's status", DEADLINE, || {
        let out = cluster.kubectl_ok(&[
            "get",
            "queue",
            "orders",
            "-n",
            "shop",
            "-o",
            "jsonpath={.status.subscriptions}",
        ]);
        async move { out.ok().filter(|s| s.trim() == "1") }
    })
    .await
    .unwrap();
    println!(
        "real pods: leader {leader}; {} orders published, {} consumed; queue status \
         subscriptions={subscriptions}; {:.1}s in all",
        published.len(),
        received.len(),
        started.elapsed().as_secs_f64()
    );
    let _ = cluster.kubectl(&["delete", "namespace", "shop", "--wait=false"]);
}

/// The producer pod owns 100 acknowledged orders (no consumer yet) when its sidecar process is
/// killed with SIGKILL: the kubelet restarts the container, the sidecar replays its log from the
/// pod's emptyDir, and a consumer started afterwards gets every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_inside_its_pod_is_restarted_by_the_kubelet_and_loses_nothing() {
    if !wanted() {
        return;
    }
    let cluster = cluster();
    apply(
        cluster,
        &(orders_namespace("crash") + &app_pod("crash", "producer", "producer", PUBLISH_100)),
    );
    let published = published_ids(&app_output(cluster, "crash", "producer").await);
    assert_eq!(published.len(), 100, "every publish acknowledged");

    let sidecar =
        |field: &str| {
            cluster
            .kubectl_ok(&[
                "get", "pod", "producer", "-n", "crash", "-o",
                &format!(
                    "jsonpath={{.status.containerStatuses[?(@.name==\"qmesh-sidecar\")].{field}}}"
                ),
            ])
            .unwrap()
        };
    let restarts_before: u32 = sidecar("restartCount").trim().parse().unwrap();
    let pid = cluster
        .container_pid(sidecar("containerID").trim())
        .unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_for(
        "the kubelet to restart the sidecar, Ready again",
        DEADLINE,
        || {
            let restarts: u32 = sidecar("restartCount").trim().parse().unwrap_or(0);
            let ready = sidecar("ready");
            async move { (restarts > restarts_before && ready.trim() == "true").then_some(()) }
        },
    )
    .await
    .unwrap();

    apply(
        cluster,
        &app_pod("crash", "consumer", "consumer", CONSUME_100),
    );
    let received = consumed_ids(&app_output(cluster, "crash", "consumer").await);
    assert_eq!(
        received, published,
        "every acknowledged order delivered after the sidecar's kill -9"
    );
    println!(
        "real pods: sidecar pid {pid} killed, restarted by the kubelet; {} of {} orders delivered",
        received.len(),
        published.len()
    );
    let _ = cluster.kubectl(&["delete", "namespace", "crash", "--wait=false"]);
}

/// `kubectl delete pod` of a producer whose sidecar owns 100 acknowledged orders (no consumer
/// yet): the pod turns unready, the preStop hook drains the sidecar, which hands its backlog to
/// the other producer pod within the grace period; a consumer started afterwards gets every order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_producer_pod_hands_its_backlog_over_and_loses_nothing() {
    if !wanted() {
        return;
    }
    let cluster = cluster();
    // A second producer pod whose command keeps running (and so the pod Ready): it consumes
    // `keepalive` of another queue.
    let keepalive = "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: pings, namespace: handover}\nspec: {}\n---\n\
        apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {name: keepalive, namespace: handover}\n\
        spec: {queue: pings, consumers: {matchLabels: {app: producer}}}\n---\n";
    apply(
        cluster,
        &(orders_namespace("handover")
            + keepalive
            + &app_pod(
                "handover",
                "producer-2",
                "producer",
                &["qmesh", "sub", "keepalive"],
            )
            + &app_pod("handover", "producer-1", "producer", PUBLISH_100)),
    );
    let published = published_ids(&app_output(cluster, "handover", "producer-1").await);
    assert_eq!(published.len(), 100, "every publish acknowledged");
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=condition=Ready",
            "pod/producer-2",
            "-n",
            "handover",
            "--timeout=180s",
        ])
        .unwrap();
    let started = std::time::Instant::now();
    cluster
        .kubectl_ok(&[
            "delete",
            "pod",
            "producer-1",
            "-n",
            "handover",
            "--timeout=120s",
        ])
        .unwrap();
    let deleted_in = started.elapsed();

    apply(
        cluster,
        &app_pod("handover", "consumer", "consumer", CONSUME_100),
    );
    let received = consumed_ids(&app_output(cluster, "handover", "consumer").await);
    assert_eq!(
        received, published,
        "every acknowledged order delivered after its owner's pod was deleted"
    );
    println!(
        "real pods: producer pod deleted (drain and hand-over) in {:.1}s; {} of {} orders delivered",
        deleted_in.as_secs_f64(),
        received.len(),
        published.len()
    );
    let _ = cluster.kubectl(&["delete", "namespace", "handover", "--wait=false"]);
}

/// An app container whose first act is to publish, in a pod that never restarts it: the kubelet
/// starts it only once its sidecar is ready (the sidecar comes first and its postStart hook waits
/// for readiness), so not one of its publishes is refused or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_publishing_at_once_finds_its_sidecar_ready() {
    if !wanted() {
        return;
    }
    let cluster = cluster();
    apply(
        cluster,
        &(orders_namespace("startup")
            + &pod_with_restart_policy("startup", "producer", "producer", PUBLISH_100, "Never")),
    );
    let (code, output) = app_exit(cluster, "startup", "producer", |_| true).await;
    let published = published_ids(&output);
    assert_eq!(
        (code, published.len()),
        (0, 100),
        "the app's first publishes succeed: {output}"
    );
    apply(
        cluster,
        &app_pod("startup", "consumer", "consumer", CONSUME_100),
    );
    let received = consumed_ids(&app_output(cluster, "startup", "consumer").await);
    assert_eq!(
        received, published,
        "every order the app published delivered"
    );
    println!(
        "real pods: an app publishing as it starts: {} of 100 publishes acknowledged, {} delivered",
        published.len(),
        received.len()
    );
    let _ = cluster.kubectl(&["delete", "namespace", "startup", "--wait=false"]);
}

/// A consumer pod deleted, then a rolling update of the consumer Deployment, then of the producer
/// Deployment, while a prober publishes 20 orders a second from each producer pod and the consumer
/// pods take every one: every old consumer pod is deleted with deliveries in flight (redelivered
/// to the others), every old producer pod with a backlog it hands over; every acknowledged order
/// is consumed, and duplicates are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_updates_under_a_continual_prober_lose_nothing() {
    if !wanted() {
        return;
    }
    let cluster = cluster();
    let ns = "rollout";
    let logs = cluster.follow_app_logs(ns, "app in (producer,consumer)");
    apply(
        cluster,
        &(orders_namespace(ns)
            + &app_deployment(ns, "consumer", 2, PROBE_CONSUME)
            + &app_deployment(ns, "producer", 2, PROBE_PUBLISH)),
    );
    flowing(&logs, 50).await;

    // `kubectl delete pod` of a consumer pod taking orders: the deliveries its app had not
    // acknowledged go to the other consumer pod.
    let consumer = cluster
        .kubectl_ok(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "app=consumer",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .unwrap();
    let started = std::time::Instant::now();
    cluster
        .kubectl_ok(&["delete", "pod", consumer.trim(), "-n", ns, "--timeout=120s"])
        .unwrap();
    let mut phases = vec![format!(
        "a consumer pod deleted in {:.1}s",
        started.elapsed().as_secs_f64()
    )];
    flowing(&logs, 20).await;

    for app in ["consumer", "producer"] {
        let started = std::time::Instant::now();
        let deployment = format!("deployment/{app}");
        cluster
            .kubectl_ok(&["rollout", "restart", &deployment, "-n", ns])
            .unwrap();
        cluster
            .kubectl_ok(&["rollout", "status", &deployment, "-n", ns, "--timeout=300s"])
            .unwrap();
        // `rollout status` returns once the new pods are available; the old ones may still be
        // draining.
        wait_for(&format!("the old {app} pods gone"), DEADLINE, || {
            let pods = cluster.kubectl_ok(&[
                "get",
                "pods",
                "-n",
                ns,
                "-l",
                &format!("app={app}"),
                "-o",
                "name",
            ]);
            async move { (pods.ok()?.lines().count() == 2).then_some(()) }
        })
        .await
        .unwrap();
        phases.push(format!(
            "{app}s rolled in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        flowing(&logs, 20).await;
    }

    let published = Tally::of(&logs).published;
    let tally = all_consumed(&logs, &published).await;
    println!(
        "real pods: rolling updates under a prober: {}; {} orders acknowledged, all consumed \
         (0 lost), duplicates: {} in {} deliveries",
        phases.join(", "),
        published.len(),
        tally.duplicates(),
        tally.deliveries
    );
    drop(logs);
    let _ = cluster.kubectl(&["delete", "namespace", ns, "--wait=false"]);
}

/// The leader's name, once the Lease names a holder and that pod alone carries the leader label.
async fn settled_leader(cluster: &RealCluster, not: Option<&str>) -> String {
    wait_for("a leader holding the Lease and labelled", DEADLINE, || {
        let holder = cluster.kubectl_ok(&[
            "get",
            "lease",
            "qmesh-operator",
            "-n",
            "qmesh-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        let labelled = cluster.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "qmesh-system",
            "-l",
            "qmesh.io/leader=true",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        async move {
            let (holder, labelled) = (holder.ok()?, labelled.ok()?);
            (!holder.is_empty() && labelled.trim() == holder && Some(holder.as_str()) != not)
                .then_some(holder)
        }
    })
    .await
    .unwrap()
}

/// After a fail-over: the leader writes a new Queue's status, and the webhook injects a new pod.
async fn control_plane_answers(cluster: &RealCluster, ns: &str, round: u32) {
    let queue = format!("audit-{round}");
    apply(
        cluster,
        &format!(
            "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {{name: {queue}, namespace: {ns}}}\n\
             spec: {{publishers: {{matchLabels: {{app: auditor}}}}}}\n---\n"
        ),
    );
    wait_for(&format!("{queue}'s status written"), DEADLINE, || {
        let observed = cluster.kubectl_ok(&[
            "get",
            "queue",
            &queue,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].observedGeneration}",
        ]);
        async move { (observed.ok()?.trim() == "1").then_some(()) }
    })
    .await
    .unwrap();
    // Pod creation goes through the injector (failurePolicy: Fail); like a ReplicaSet, the test
    // asks again while the API server still routes to an endpoint that just went away.
    let pod = format!("auditor-{round}");
    let manifest = pod_with_restart_policy(
        ns,
        &pod,
        "auditor",
        &["qmesh", "pub", &queue, "ok"],
        "OnFailure",
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifest).unwrap();
    let path = file.path().display().to_string();
    wait_for(&format!("{pod} admitted"), DEADLINE, || {
        let created = cluster.kubectl_ok(&["apply", "-f", &path]);
        async move { created.ok().map(drop) }
    })
    .await
    .unwrap();
    let containers = cluster
        .kubectl_ok(&[
            "get",
            "pod",
            &pod,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.containers[*].name}",
        ])
        .unwrap();
    assert!(containers.contains("qmesh-sidecar"), "{pod}: {containers}");
}

/// The operator's leader killed twice while a prober runs: first its process with `kill -9`
/// (the kubelet restarts it), then its pod force-deleted (the other replica takes over). Each time the
/// data plane keeps flowing, one pod ends up holding the Lease and the leader label, the leader
/// writes a new Queue's status, and the webhook injects a new pod; no acknowledged order is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_flows_while_the_operator_leader_is_killed() {
    if !wanted() {
        return;
    }
    let cluster = cluster();
    let ns = "failover";
    let logs = cluster.follow_app_logs(ns, "app in (producer,consumer)");
    apply(
        cluster,
        &(orders_namespace(ns)
            + &app_deployment(ns, "consumer", 1, PROBE_CONSUME)
            + &app_deployment(ns, "producer", 1, PROBE_PUBLISH)),
    );
    flowing(&logs, 50).await;

    let mut rounds = Vec::new();
    for round in 1..=2 {
        let leader = settled_leader(cluster, None).await;
        let operator = |field: &str| {
            cluster.kubectl_ok(&[
                "get",
                "pod",
                &leader,
                "-n",
                "qmesh-system",
                "-o",
                &format!("jsonpath={{.status.containerStatuses[?(@.name==\"operator\")].{field}}}"),
            ])
        };
        let consumed_before = Tally::of(&logs).consumed.len();
        let started = std::time::Instant::now();
        let how = if round == 1 {
            let restarts: u32 = operator("restartCount").unwrap().trim().parse().unwrap();
            let pid = cluster
                .container_pid(operator("containerID").unwrap().trim())
                .unwrap();
            let killed = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
            assert!(killed.success());
            wait_for("the kubelet to restart the operator", DEADLINE, || {
                let now: u32 = operator("restartCount")
                    .ok()
                    .and_then(|r| r.trim().parse().ok())
                    .unwrap_or(0);
                async move { (now > restarts).then_some(()) }
            })
            .await
            .unwrap();
            "kill -9 of its process"
        } else {
            // The pod object goes at once; the other replica takes the Lease over (as soon as the
            // stopping leader gives it up, else once it has gone a lease duration unrenewed).
            cluster
                .kubectl_ok(&[
                    "delete",
                    "pod",
                    &leader,
                    "-n",
                    "qmesh-system",
                    "--grace-period=0",
                    "--force",
                ])
                .unwrap();
            "kubectl delete --force of its pod"
        };
        let new_leader = settled_leader(cluster, (round == 2).then_some(leader.as_str())).await;
        let took_over = started.elapsed();
        let consumed_meanwhile = Tally::of(&logs).consumed.len() - consumed_before;
        control_plane_answers(cluster, ns, round).await;
        flowing(&logs, 20).await;
        rounds.push(format!(
            "{how}: {leader} → {new_leader} in {:.1}s, {consumed_meanwhile} orders consumed meanwhile",
            took_over.as_secs_f64()
        ));
    }

    let published = Tally::of(&logs).published;
    let tally = all_consumed(&logs, &published).await;
    println!(
        "real pods: operator leader killed: {}; {} orders acknowledged, all consumed, duplicates: {}",
        rounds.join("; "),
        published.len(),
        tally.duplicates()
    );
    drop(logs);
    let _ = cluster.kubectl(&["delete", "namespace", ns, "--wait=false"]);
}

/// `kubectl apply -f examples/` in an opted-in namespace, with a `checkout` pod publishing and a
/// `billing` Deployment consuming: billing takes all 100 orders, and `kubectl get
/// queues,subscriptions` shows what the operator wrote — billing's consumer, and the 100 orders
/// waiting for `shipping`, whose push consumers are not running — which the operator's KEDA
/// scaler answers too, reached through its Service's endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_apply_and_kubectl_get_shows_backlog_and_consumers() {
    if !wanted() {
        return;
    }
    let cluster = cluster();
    let ns = "examples";
    let logs = cluster.follow_app_logs(ns, "app=billing");
    apply(
        cluster,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{qmesh.io/inject: enabled}}}}\n"
        ),
    );
    let examples = repo_root().join("examples").display().to_string();
    cluster
        .kubectl_ok(&["apply", "-n", ns, "-f", &examples])
        .unwrap();
    apply(
        cluster,
        &(app_deployment(ns, "billing", 1, &["qmesh", "sub", "billing", "--json"])
            + &app_pod(
                ns,
                "checkout",
                "checkout",
                &[
                    "qmesh",
                    "pub",
                    "orders",
                    "hello",
                    "--count",
                    "100",
                    "--key",
                    "customer-7",
                    "-H",
                    "fulfilment=physical",
                ],
            )),
    );
    let published = published_ids(&app_output(cluster, ns, "checkout").await);
    assert_eq!(published.len(), 100, "every publish acknowledged");
    let tally = all_consumed(&logs, &published).await;

    let status = |kind: &str, name: &str, field: &str| {
        cluster
            .kubectl_ok(&[
                "get",
                kind,
                name,
                "-n",
                ns,
                "-o",
                &format!("jsonpath={{.status.{field}}}"),
            ])
            .map(|s| s.trim().to_owned())
    };
    wait_for(
        "billing's consumer and shipping's backlog in the status",
        DEADLINE,
        || {
            let consumers = status("subscription", "billing", "consumers");
            let billing = status("subscription", "billing", "backlog");
            let shipping = status("subscription", "shipping", "backlog");
            async move {
                (consumers.ok()? == "1" && billing.ok()? == "0" && shipping.ok()? == "100")
                    .then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", describe_pods(cluster, ns)));
    // KEDA's view of the same: the operator's external scaler, reached through the endpoint of
    // the chart's `qmesh-scaler` Service (the leader), answers shipping's backlog.
    let endpoint = wait_for("the qmesh-scaler Service's endpoint", DEADLINE, || {
        let ip = cluster.kubectl_ok(&[
            "get",
            "endpoints",
            "qmesh-scaler",
            "-n",
            "qmesh-system",
            "-o",
            "jsonpath={.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}",
        ]);
        async move { ip.ok().filter(|a| !a.starts_with(':')) }
    })
    .await
    .unwrap();
    let mut keda = ExternalScalerClient::connect(format!("http://{endpoint}"))
        .await
        .unwrap();
    let shipping = ScaledObjectRef {
        name: "shipping".into(),
        namespace: ns.into(),
        scaler_metadata: [("subscription".to_owned(), "shipping".to_owned())].into(),
    };
    let backlog = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(shipping.clone()),
            metric_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .metric_values[0]
        .metric_value;
    assert_eq!(backlog, 100, "the scaler's backlog of shipping");
    assert!(keda.is_active(shipping).await.unwrap().into_inner().result);

    let table = cluster
        .kubectl_ok(&["get", "queues,subscriptions", "-n", ns])
        .unwrap();
    for column in ["BACKLOG", "CONSUMERS", "SUBSCRIPTIONS", "READY"] {
        assert!(table.contains(column), "no {column} column:\n{table}");
    }
    println!(
        "real pods: examples/ applied; {} orders published, {} consumed by billing; kubectl get:\n{table}",
        published.len(),
        tally.consumed.len()
    );
    drop(logs);
    let _ = cluster.kubectl(&["delete", "namespace", ns, "--wait=false"]);
}

/// `qmesh get`, `qmesh dlq` and the console's backend reach the operator from outside the cluster
/// as the user: through a port-forward to the leader (as `kubectl port-forward` does), verified
/// against the public trust bundle, authorized by the user's RBAC. Dead letters of two producer
/// pods — held by each producer's sidecar — are listed together; a user who may only read is
/// refused a purge; one who may update the Queue purges them at both sidecars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmesh_reaches_the_operator_through_a_port_forward_as_the_user() {
    if !wanted() {
        return;
    }
    let cluster = cluster();
    let ns = "steer";
    apply(
        cluster,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{qmesh.io/inject: enabled}}}}\n---\n\
             apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {{name: orders, namespace: {ns}}}\n\
             spec: {{publishers: {{matchLabels: {{app: producer}}}}, deadLetterQueue: orders-dlq}}\n---\n\
             apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {{name: orders-dlq, namespace: {ns}}}\nspec: {{}}\n---\n\
             apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {{name: billing, namespace: {ns}}}\n\
             spec: {{queue: orders, consumers: {{matchLabels: {{app: consumer}}}}, retry: {{maxDeliveries: 1}}}}\n---\n\
             apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {{name: audit, namespace: {ns}}}\n\
             spec: {{queue: orders-dlq, consumers: {{matchLabels: {{app: auditor}}}}}}\n---\n"
        ),
    );
    // Two producers, three orders each; a consumer that nacks all six into orders-dlq.
    let mut pods = String::new();
    for producer in ["producer-1", "producer-2"] {
        pods += &app_pod(
            ns,
            producer,
            "producer",
            &[
                "qmesh", "pub", "orders", "order", "--count", "3", "--id", producer,
            ],
        );
    }
    pods += &app_pod(
        ns,
        "nacker",
        "consumer",
        &["qmesh", "sub", "billing", "--nack", "--count", "6"],
    );
    apply(cluster, &pods);
    for pod in ["producer-1", "producer-2", "nacker"] {
        app_output(cluster, ns, pod).await;
    }

    // Two users: `steerer` may update the namespace's Queues, `viewer` may only read them; both
    // may port-forward to the operator (the chart's `qmesh-console` Role).
    let mut tokens = BTreeMap::new();
    for (user, verbs) in [("steerer", "get,list,update"), ("viewer", "get,list")] {
        cluster
            .kubectl_ok(&["create", "serviceaccount", user, "-n", ns])
            .unwrap();
        cluster
            .kubectl_ok(&[
                "create",
                "role",
                user,
                "-n",
                ns,
                &format!("--verb={verbs}"),
                "--resource=queues.qmesh.io,subscriptions.qmesh.io",
            ])
            .unwrap();
        cluster
            .kubectl_ok(&[
                "create",
                "rolebinding",
                user,
                "-n",
                ns,
                &format!("--role={user}"),
                &format!("--serviceaccount={ns}:{user}"),
            ])
            .unwrap();
        cluster
            .kubectl_ok(&[
                "create",
                "rolebinding",
                &format!("{ns}-{user}-console"),
                "-n",
                "qmesh-system",
                "--role=qmesh-console",
                &format!("--serviceaccount={ns}:{user}"),
            ])
            .unwrap();
        let token = cluster
            .kubectl_ok(&["create", "token", user, "-n", ns])
            .unwrap();
        tokens.insert(user, token.trim().to_owned());
    }
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let qmesh = |user: &str, args: &[&str]| {
        std::process::Command::new(binaries().join("qmesh"))
            .args(args)
            .args([
                "-n",
                ns,
                "--kubeconfig",
                &kubeconfig,
                "--token",
                &tokens[user],
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let held = || {
        let out = qmesh("viewer", &["dlq", "peek", "orders-dlq", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (
            out.status.success(),
            lines,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dead = wait_for("six dead letters over both producers", DEADLINE, || {
        let (ok, lines, _) = held();
        async move { (ok && lines.len() == 6).then_some(lines) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", held(), describe_pods(cluster, ns)));
    let sidecars: BTreeSet<&str> = dead
        .iter()
        .map(|d| d["sidecar"].as_str().unwrap())
        .collect();
    assert_eq!(sidecars, BTreeSet::from(["producer-1", "producer-2"]));

    // `qmesh get` asks the operator as the user: its rates and counters, not the objects' status.
    let billing = || {
        let out = qmesh("viewer", &["get", "subscriptions", "-o", "json"]);
        assert!(out.status.success(), "{out:?}");
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "billing")
            .cloned()
            .unwrap()
    };
    let row = wait_for(
        "billing's dead letters counted by the operator",
        DEADLINE,
        || {
            let row = billing();
            async move { (row["dead-lettered"] == "6").then_some(row) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", billing()));
    assert_ne!(row["acks/s"], "-", "rates come from the operator: {row}");
    assert_ne!(row["acked"], "-", "counters come from the operator: {row}");

    // `qmesh console` for the namespace, as the viewer: its API shows the dead letters of both.
    /// Killed when the test ends, also when it fails.
    struct Console(std::process::Child);
    impl Drop for Console {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut console = Console(
        std::process::Command::new(binaries().join("qmesh"))
            .args([
                "console",
                "-n",
                ns,
                "--console-addr",
                "127.0.0.1:0",
                "--no-open",
            ])
            .args(["--kubeconfig", &kubeconfig, "--token", &tokens["viewer"]])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let first = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(console.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    };
    let at: std::net::SocketAddr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no console URL in {first:?}"))
        .parse()
        .unwrap();
    let dead_letters = wait_for("the console's dead letters", DEADLINE, || async move {
        let reply = qmesh_tests::http::request("GET", at, "/api/dead-letters", &[], b"")
            .await
            .ok()?;
        let json = reply.json().ok()?;
        let row = json["dead_letter_queues"].as_array()?.first()?.clone();
        (row["held"] == 6).then_some(row)
    })
    .await
    .unwrap();
    assert_eq!(dead_letters["name"], "orders-dlq", "{dead_letters}");
    let holding: BTreeSet<&str> = dead_letters["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["held"] == 3)
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        holding,
        BTreeSet::from(["producer-1", "producer-2"]),
        "{dead_letters}"
    );
    drop(console);

    // Purge: refused to the viewer (exit code 3), done for the steerer at both sidecars.
    let refused = qmesh("viewer", &["dlq", "purge", "orders-dlq", "--yes"]);
    assert_eq!(refused.status.code(), Some(3), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("may not update"),
        "{refused:?}"
    );
    assert_eq!(held().1.len(), 6, "nothing purged by the viewer");
    let purged = qmesh("steerer", &["dlq", "purge", "orders-dlq", "--yes"]);
    let text = String::from_utf8_lossy(&purged.stdout);
    assert!(
        purged.status.success() && text.contains("6 deleted"),
        "{purged:?}"
    );
    assert!(held().1.is_empty());
    println!("real pods: qmesh dlq/get through a port-forward as two users: {text}");
}
