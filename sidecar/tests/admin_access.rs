//! The admin port listens on every address (the kubelet probes it, Prometheus scrapes it), but what
//! changes or reveals the sidecar is for the pod itself: from another address — a network
//! namespace of the test's own, like another pod — `POST /drain` and `/v1/stats` get 403 and the
//! sidecar keeps running; `/readyz` and `/metrics` answer. From loopback, `/drain` still works.

#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, time::Duration};

use common::Standalone;
use qmesh_tests::{http, netns::NetNs};

const MESH: &str = "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: secret-orders}\nspec: {}\n---\n\
    apiVersion: qmesh.io/v1alpha1\nkind: Sidecar\nmetadata: {name: a}\n\
    spec: {peerAddress: \"127.0.0.1:0\", grpcAddress: \"127.0.0.1:0\", httpAddress: \"127.0.0.1:0\", adminAddress: \"0.0.0.0:0\"}\n";

/// An HTTP request from inside the namespace (curl there); returns the status line and body.
fn from_ns(ns: &NetNs, method: &str, url: &str) -> (u16, String) {
    let out = ns
        .run(
            "curl",
            &[
                "-s",
                "-m",
                "10",
                "-X",
                method,
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                url,
            ],
        )
        .unwrap();
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    (code.parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_stats_are_refused_from_off_the_pod_and_work_from_loopback() {
    let ns = NetNs::create().unwrap();
    let mut sidecar = Standalone::start(MESH).await;
    let admin = sidecar.addr("admin");
    let local = SocketAddr::from(([127, 0, 0, 1], admin.port()));
    qmesh_tests::wait_for("readiness", Duration::from_secs(30), || async move {
        http::request("GET", local, "/readyz", &[], b"")
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await
    .unwrap();

    // A queue in the stats: one message published to it.
    let app = sidecar.addr("http");
    let published = http::request("POST", app, "/v1/queues/secret-orders/messages", &[], b"m")
        .await
        .unwrap();
    assert_eq!(published.status, 201);

    let remote = format!("http://{}:{}", ns.host_ip, admin.port());
    let (code, body) = from_ns(&ns, "POST", &format!("{remote}/drain"));
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("loopback only") && body.contains(&ns.ns_ip.to_string()),
        "{body}"
    );
    let (code, body) = from_ns(&ns, "GET", &format!("{remote}/v1/stats"));
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains("secret-orders"), "{body}");
    let (code, _) = from_ns(&ns, "GET", &format!("{remote}/readyz"));
    assert_eq!(code, 200, "probes answer from anywhere");
    let (code, _) = from_ns(&ns, "GET", &format!("{remote}/metrics"));
    assert_eq!(code, 200, "metrics stay scrapeable");
    assert!(sidecar.running(), "still running");

    let stats = http::request("GET", local, "/v1/stats", &[], b"")
        .await
        .unwrap();
    assert_eq!(stats.status, 200);
    assert!(String::from_utf8_lossy(&stats.body).contains("secret-orders"));
    let drain = http::request("POST", local, "/drain", &[], b"")
        .await
        .unwrap();
    assert_eq!(drain.status, 202);
    qmesh_tests::wait_for(
        "the drained sidecar to exit",
        Duration::from_secs(30),
        || {
            let exited = !sidecar.running();
            async move { exited.then_some(()) }
        },
    )
    .await
    .unwrap();
}
