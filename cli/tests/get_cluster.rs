//! `qmesh get --kubeconfig` against a real kube-apiserver with no operator to ask: the table falls
//! back to the status the operator writes into Queue and Subscription objects (rates, counters and
//! ages as `-`). Asking the operator itself is tested on real pods (`tests/tests/real_pods.rs`).

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use qmesh_api::{Queue, Subscription};
use qmesh_tests::{KubeApiServer, wait_for};

const OBJECTS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders, namespace: default}
spec: {deadLetterQueue: orders-dlq}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing, namespace: default}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectl_ok(server: &KubeApiServer, args: &[&str]) {
    let out = server.kubectl(args.iter().map(|s| s.to_string())).unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(server: &KubeApiServer, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qmesh"))
        .args(["get"])
        .args(args)
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qmesh get {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn get_with_a_kubeconfig_shows_the_status_the_operator_wrote() {
    let server = KubeApiServer::start().await.unwrap();
    let crds = repo_root().join("crds").display().to_string();
    kubectl_ok(&server, &["apply", "-f", &crds]);
    kubectl_ok(
        &server,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/queues.qmesh.io",
            "crd/subscriptions.qmesh.io",
        ],
    );
    let queues: Api<Queue> = Api::namespaced(server.client(), "default");
    let subscriptions: Api<Subscription> = Api::namespaced(server.client(), "default");
    wait_for("queues to be served", Duration::from_secs(30), || {
        let api = queues.clone();
        async move { api.list(&Default::default()).await.ok() }
    })
    .await
    .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), OBJECTS).unwrap();
    kubectl_ok(
        &server,
        &["apply", "-f", &file.path().display().to_string()],
    );

    // The figures the operator's status writer would put there.
    let params = PatchParams::default();
    queues
        .patch_status(
            "orders",
            &params,
            &Patch::Merge(
                serde_json::json!({"status": {"publishers": 2, "subscriptions": 1, "backlog": 7}}),
            ),
        )
        .await
        .unwrap();
    subscriptions
        .patch_status(
            "billing",
            &params,
            &Patch::Merge(serde_json::json!({"status": {"consumers": 3, "backlog": 7, "inFlight": 2, "deadLettered": 1}})),
        )
        .await
        .unwrap();

    let rows: serde_json::Value =
        serde_json::from_str(&get(&server, &["queues", "-o", "json"])).unwrap();
    let orders = &rows[0];
    assert_eq!(orders["name"], "orders");
    assert_eq!(orders["publishers"], "2");
    assert_eq!(orders["subscriptions"], "1");
    assert_eq!(orders["backlog"], "7");
    assert_eq!(orders["dead-letter-queue"], "orders-dlq");
    assert_eq!(orders["publish/s"], "-", "rates are not in CR status");

    let table = get(&server, &["subscriptions", "-A"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE   NAME"), "{table}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "default", "billing", "orders", "Pull", "3", "7", "-", "2", "-", "-", "-", "1"
        ],
        "{table}"
    );
}
