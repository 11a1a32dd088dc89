//! Port 0: a sidecar binds what the kernel picks and writes where it listens to `--addresses-file`,
//! so a launcher (`qmesh demo`, `qmesh run`) never chooses a port another process takes before the
//! sidecar binds it. What it writes is where it really serves.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{message, publish_all, stats};

const MESH: &str = "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: q}\nspec: {}\n---\n\
    apiVersion: qmesh.io/v1alpha1\nkind: Sidecar\nmetadata: {name: a}\n\
    spec: {peerAddress: \"127.0.0.1:0\", grpcAddress: \"127.0.0.1:0\", httpAddress: \"127.0.0.1:0\", adminAddress: \"127.0.0.1:0\"}\n";

/// Kills the sidecar when the test ends, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_on_port_zero_says_where_it_listens_and_serves_there() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    let file = dir.path().join("addresses.json");
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_qmesh-sidecar"))
            .arg("--mesh-file")
            .arg(&mesh)
            .args(["--name", "a", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--addresses-file")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            break text;
        }
        assert!(child.0.try_wait().unwrap().is_none(), "the sidecar exited");
        assert!(Instant::now() < deadline, "no addresses file in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let addr = |what: &str| -> SocketAddr { json[what].as_str().unwrap().parse().unwrap() };
    let all = ["peer", "grpc", "http", "admin"].map(addr);
    for a in all {
        assert_ne!(a.port(), 0, "{text}");
        assert!(a.ip().is_loopback(), "{text}");
    }
    let distinct: std::collections::BTreeSet<u16> = all.iter().map(SocketAddr::port).collect();
    assert_eq!(distinct.len(), 4, "four different ports: {text}");

    // Served where it says: readiness on the admin port, a publish on the gRPC port.
    qmesh_tests::wait_for("the sidecar's stats", Duration::from_secs(30), || async {
        stats(addr("admin")).await.map(|_| ())
    })
    .await
    .unwrap();
    let results = publish_all(
        &format!("http://{}", addr("grpc")),
        "q",
        vec![message("m-1", "", "hello")],
    )
    .await;
    assert!(results[0].is_ok(), "{results:?}");
    let http = tokio::net::TcpStream::connect(addr("http")).await;
    assert!(http.is_ok(), "the HTTP API listens at {}", addr("http"));
    let peer = tokio::net::TcpStream::connect(addr("peer")).await;
    assert!(peer.is_ok(), "the peer API listens at {}", addr("peer"));
}
