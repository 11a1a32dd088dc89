//! The sidecar driven from Python with grpcio — an independent gRPC implementation — through the
//! example client in `examples/python`. The interpreter comes from `$QMESH_PYTHON` (the test set-up
//! makes a venv with grpcio), else `python3`.

#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, process::Command};

use common::*;

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: tasks}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: workers}
spec:
  queue: tasks
  consumers: {matchLabels: {app: worker}}
"#;

fn python(args: &[&str], addr: std::net::SocketAddr) -> std::process::Output {
    let interpreter = std::env::var("QMESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/qmesh_client.py");
    let out = Command::new(&interpreter)
        .arg(&script)
        .args(["--addr", &addr.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {interpreter}: {e} (hack/test.sh sets QMESH_PYTHON)"));
    assert!(
        out.status.success(),
        "python client failed ({interpreter}, needs grpcio + grpcio-tools): {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_publishes_and_consumes() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("py-producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();

    // Python publishes; a Rust consumer gets every message with the Python-set fields.
    let rust = Consumer::start(
        "rust",
        &mesh.sidecar("worker").grpc_url(),
        "workers",
        16,
        |_| Verdict::Ack,
    )
    .await;
    let producer = mesh.sidecar("py-producer").grpc;
    let out = python(
        &[
            "publish",
            "--queue",
            "tasks",
            "--count",
            "25",
            "--id-prefix",
            "py-",
            "--key",
            "k1",
        ],
        producer,
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 25);
    assert_eq!(lines[3]["id"], "py-3");
    until("the Rust consumer to get Python's messages", 20, || {
        rust.count() >= 25
    })
    .await;
    let got = rust.stop();
    let (ids, dups) = tally(got.iter().map(|r| r.id.clone()));
    assert_eq!((ids.len(), dups), (25, 0));
    assert!(
        got.iter()
            .all(|r| r.headers.get("lang").map(String::as_str) == Some("python") && r.key == "k1")
    );

    // Rust publishes; Python consumes and acks every message.
    let results = publish_all(
        &mesh.sidecar("py-producer").grpc_url(),
        "tasks",
        (0..20)
            .map(|i| message(&format!("rs-{i}"), "", "from rust"))
            .collect(),
    )
    .await;
    assert!(results.iter().all(Result::is_ok));
    let worker = mesh.sidecar("worker").grpc;
    let out = python(
        &[
            "consume",
            "--subscription",
            "workers",
            "--count",
            "20",
            "--timeout",
            "20",
        ],
        worker,
    );
    let seen: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: std::collections::BTreeSet<String> = seen
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    println!(
        "python consumed {} messages ({} distinct)",
        seen.len(),
        ids.len()
    );
    assert_eq!(ids.len(), 20);
    assert!(seen.iter().all(|v| v["payload"] == "from rust"));
}
