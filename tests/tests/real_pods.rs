//! Real pods (tier 6): the chart installed with this build's images on a one-node cluster
//! (`hack/cluster.sh`), the operator running as pods, the API server reaching the webhooks through
//! their Service, pods of an opted-in namespace injected and started by the kubelet, and messages
//! flowing from a producer pod to a consumer pod over their pod IPs, every one counted.
//!
//! Runs where `QMESH_REAL_PODS=1` (set by `hack/test.sh`; it needs root and cgroup v2).

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeSet, time::Duration};

use qmesh_tests::{cluster::RealCluster, repo_root, wait_for};

const DEADLINE: Duration = Duration::from_secs(180);

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {qmesh.io/inject: enabled}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders, namespace: shop}
spec:
  publishers: {matchLabels: {app: producer}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing, namespace: shop}
spec:
  queue: orders
  consumers: {matchLabels: {app: consumer}}
---
apiVersion: v1
kind: Pod
metadata: {name: consumer, namespace: shop, labels: {app: consumer}}
spec:
  restartPolicy: OnFailure
  containers:
    - name: app
      image: qmesh/example:dev
      imagePullPolicy: Never
      command: [qmesh, sub, billing, --count, "100", --json]
---
apiVersion: v1
kind: Pod
metadata: {name: producer, namespace: shop, labels: {app: producer}}
spec:
  restartPolicy: OnFailure
  containers:
    - name: app
      image: qmesh/example:dev
      imagePullPolicy: Never
      command: [qmesh, pub, orders, hello, --count, "100"]
"#;

/// The directory of this build's binaries (`target/<profile>`).
fn binaries() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_on_real_pods_and_messages_flow_between_injected_pods() {
    if !qmesh_tests::cluster::real_pods_wanted() {
        eprintln!("real-pods tier not asked for (QMESH_REAL_PODS=1; hack/test.sh sets it)");
        return;
    }
    let started = std::time::Instant::now();
    let cluster = RealCluster::start(&binaries()).unwrap();
    let cluster_ready = started.elapsed();
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

    // The operator replicas become Ready; one holds the Lease and labels its pod leader.
    let operator = "app.kubernetes.io/component=operator";
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=condition=Ready",
            "pod",
            "-l",
            operator,
            "-n",
            "qmesh-system",
            "--timeout=180s",
        ])
        .unwrap();
    let leader = wait_for("a leader holding the Lease and labelled", DEADLINE, || {
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
            (!holder.is_empty() && labelled.trim() == holder).then_some(holder)
        }
    })
    .await
    .unwrap();

    // An opted-in namespace: the API server calls the injector through its Service, the kubelet
    // starts each pod with its sidecar, and the consumer takes every order the producer published.
    let manifest = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(manifest.path(), SHOP).unwrap();
    cluster
        .kubectl_ok(&["apply", "-f", &manifest.path().display().to_string()])
        .unwrap();
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
    let consumed = wait_for(
        "the consumer app to take 100 orders and exit",
        DEADLINE,
        || {
            let state = cluster.kubectl_ok(&[
            "get", "pod", "consumer", "-n", "shop", "-o",
            "jsonpath={.status.containerStatuses[?(@.name==\"app\")].state.terminated.exitCode}",
        ]);
            let logs = cluster.kubectl_ok(&["logs", "consumer", "-n", "shop", "-c", "app"]);
            async move { (state.ok()?.trim() == "0").then_some(logs.ok()?) }
        },
    )
    .await
    .unwrap_or_else(|e| {
        let describe = cluster
            .kubectl(&["describe", "pods", "-n", "shop"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!("{e}\n{describe}")
    });
    let received: BTreeSet<String> = consumed
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    let published: BTreeSet<String> = cluster
        .kubectl_ok(&["logs", "producer", "-n", "shop", "-c", "app"])
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("published ")?.split_whitespace().next())
        .map(str::to_owned)
        .collect();
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
        "real pods: cluster and images ready in {:.1}s; leader {leader}; {} orders published, \
         {} consumed; queue status subscriptions={subscriptions}; {:.1}s in all",
        cluster_ready.as_secs_f64(),
        published.len(),
        received.len(),
        started.elapsed().as_secs_f64()
    );
    let _ = cluster.kubectl(&["delete", "namespace", "shop", "--wait=false"]);
}
