//! Port 0: a sidecar binds what the kernel picks and writes where it listens to `--addresses-file`,
//! so a launcher (`qmesh demo`, `qmesh run`) never chooses a port another process takes before the
//! sidecar binds it. What it writes is where it really serves.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::{Standalone, message, publish_all, stats};

const MESH: &str = "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: q}\nspec: {}\n---\n\
    apiVersion: qmesh.io/v1alpha1\nkind: Sidecar\nmetadata: {name: a}\n\
    spec: {peerAddress: \"127.0.0.1:0\", grpcAddress: \"127.0.0.1:0\", httpAddress: \"127.0.0.1:0\", adminAddress: \"127.0.0.1:0\"}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_on_port_zero_says_where_it_listens_and_serves_there() {
    let sidecar = Standalone::start(MESH).await;
    let text = sidecar.addresses.to_string();
    let addr = |what: &str| sidecar.addr(what);
    let all = ["peer", "grpc", "http", "admin"].map(addr);
    for a in all {
        assert_ne!(a.port(), 0, "{text}");
        assert!(a.ip().is_loopback(), "{text}");
    }
    let distinct: std::collections::BTreeSet<u16> = all.iter().map(SocketAddr::port).collect();
    assert_eq!(distinct.len(), 4, "four different ports: {text}");

    // Served where it says: readiness on the admin port, a publish on the gRPC port.
    qmesh_tests::wait_for(
        "the sidecar's stats",
        std::time::Duration::from_secs(30),
        || async { stats(addr("admin")).await.map(|_| ()) },
    )
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

    // Its log, written to a file as `kubectl logs` reads it: plain text, no terminal colours.
    let log = sidecar.log();
    assert!(log.contains("qmesh sidecar listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}
