//! The `qmesh-operator` binary as a pod runs it, against a real API server: a replica whose admission
//! webhooks cannot serve exits non-zero, saying why, instead of staying up — and Ready — with half of
//! its work gone (the kubelet then restarts it, and a readiness probe never lies about it).

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use operator_support::*;
use qmesh_tests::{KubeApiServer, wait_for};

fn operator_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("qmesh-operator");
    assert!(
        bin.is_file(),
        "{} missing: `cargo build --bin qmesh-operator` (the workspace test run builds it)",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_webhooks_cannot_serve_exits_instead_of_staying_up() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    // Someone else holds the webhook's port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let webhook = taken.local_addr().unwrap();
    let [control, metrics] = qmesh_tests::free_ports_on::<2>([127, 0, 0, 1].into()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("operator.log");
    let mut child = Command::new(operator_binary())
        .env("KUBECONFIG", server.kubeconfig())
        .args(["--namespace", "default", "--pod-name", "operator-0"])
        .args(["--webhook-addr", &webhook.to_string()])
        .args(["--control-addr", &format!("127.0.0.1:{control}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let exited = wait_for(
        "the operator to exit once its webhooks cannot bind",
        Duration::from_secs(60),
        || {
            let status = child.try_wait().unwrap();
            async move { status }
        },
    )
    .await;
    let output = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    let status = match exited {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            panic!("{e}: the replica stayed up without its webhooks\n{output}");
        }
    };
    assert!(!status.success(), "exit status {status}\n{output}");
    assert!(
        output.contains("binding the webhook"),
        "the reason is logged:\n{output}"
    );
    drop(taken);
}
