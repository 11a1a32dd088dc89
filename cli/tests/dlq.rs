//! `qmesh dlq peek` / `redrive` and `qmesh sub rewind` against real sidecars: dead letters are
//! listed with their reason and origin, redriven to their original queue and delivered again (every
//! one, once); messages parked by a subscription without a dead-letter queue are listed and
//! redelivered with a fresh delivery count through the HTTP mirror; acked messages a queue keeps
//! are replayed by a rewind.

#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use qmesh_tests::mesh::MeshBuilder;

const MANIFESTS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
  deadLetterQueue: orders-dlq
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders-dlq}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
  retry: {maxDeliveries: 2, backoff: {initial: 20ms, max: 50ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dlq-audit}
spec:
  queue: orders-dlq
  consumers: {matchLabels: {app: auditor}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec:
  publishers: {matchLabels: {app: shop}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: workers}
spec:
  queue: jobs
  consumers: {matchLabels: {app: billing}}
  retry: {maxDeliveries: 1}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: ledger}
spec:
  publishers: {matchLabels: {app: shop}}
  retention: {keepAcked: 1h}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: ledger-readers}
spec:
  queue: ledger
  consumers: {matchLabels: {app: billing}}
"#;

fn qmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmesh"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = qmesh(args);
    assert!(
        out.status.success(),
        "qmesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn sidecar_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qmesh")).with_file_name("qmesh-sidecar")
}

/// Polls `peek` until it lists `n` messages.
fn peek_until(addr: &str, queue: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = json_lines(&ok(&["dlq", "peek", queue, "--json", "--addr", addr]));
        if held.len() == n {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} holds {} messages, waited for {n}: {held:?}",
            held.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_peeked_with_reasons_and_redriven_to_their_queue() {
    let mesh = MeshBuilder::new()
        .manifests(MANIFESTS)
        .sidecar("shop", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .sidecar("auditor", &[("app", "auditor")])
        .start(Path::new(&sidecar_binary()))
        .await
        .unwrap();
    let shop = mesh.sidecar("shop").grpc.to_string();
    let billing = mesh.sidecar("billing").grpc.to_string();
    let shop_http = mesh.sidecar("shop").http;
    tokio::task::spawn_blocking(move || {
        ok(&[
            "pub",
            "orders",
            "not an order",
            "--id",
            "order",
            "--count",
            "5",
            "--addr",
            &shop,
        ]);
        // Two failed deliveries each: every order ends in orders-dlq, held by the publisher's
        // sidecar (the auditor app is not consuming).
        ok(&[
            "sub", "billing", "--nack", "--count", "10", "--addr", &billing,
        ]);
        let held = peek_until(&shop, "orders-dlq", 5);
        let mut original = BTreeSet::new();
        for h in &held {
            let headers = &h["headers"];
            assert_eq!(
                headers["qmesh-dead-letter-reason"],
                "max deliveries (2) reached"
            );
            assert_eq!(headers["qmesh-original-queue"], "orders");
            assert_eq!(headers["qmesh-original-subscription"], "billing");
            assert_eq!(headers["qmesh-delivery-count"], "2");
            assert_eq!(headers["qmesh-last-error"], "nacked by qmesh sub");
            assert_eq!(h["payload"], "not an order");
            original.insert(headers["qmesh-original-id"].as_str().unwrap().to_owned());
        }
        assert_eq!(original.len(), 5, "{held:?}");
        let table = ok(&["dlq", "peek", "orders-dlq", "--addr", &shop]);
        assert!(table.starts_with("SIDECAR "), "{table}");
        assert!(table.contains("orders/billing"), "{table}");

        // Redrive: all five published again to orders, removed from the dead-letter queue.
        let out = ok(&["dlq", "redrive", "orders-dlq", "--addr", &shop]);
        assert!(out.contains("5 republished"), "{out}");
        peek_until(&shop, "orders-dlq", 0);
        let again = json_lines(&ok(&[
            "sub", "billing", "--count", "5", "--json", "--addr", &billing,
        ]));
        let ids: BTreeSet<&str> = again
            .iter()
            .map(|d| d["headers"]["qmesh-original-id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, original.iter().map(String::as_str).collect());
        for d in &again {
            assert_eq!(d["attempt"], 1, "a redriven message starts afresh: {d}");
            assert_eq!(d["headers"]["qmesh-redriven-from"], "orders-dlq");
            assert!(
                d["headers"].get("qmesh-dead-letter-reason").is_none(),
                "{d}"
            );
        }
        peek_until(&shop, "orders", 0);

        // No dead-letter queue: exhausted messages stay parked, and a redrive redelivers them.
        ok(&[
            "pub", "jobs", "job", "--id", "job", "--count", "3", "--addr", &shop,
        ]);
        ok(&[
            "sub", "workers", "--nack", "--count", "3", "--addr", &billing,
        ]);
        let parked = peek_until(&shop, "jobs", 3);
        for p in &parked {
            assert_eq!(p["subscriptions"][0]["state"], "parked", "{p}");
            assert_eq!(p["subscriptions"][0]["attempts"], 1, "{p}");
        }
        // …this time through the HTTP mirror, as curl would.
        let http = |method: &str, path: &str, body: &[u8]| {
            tokio::runtime::Handle::current()
                .block_on(qmesh_tests::http::request(
                    method,
                    shop_http,
                    path,
                    &[],
                    body,
                ))
                .unwrap()
        };
        let listed = http("GET", "/v1/queues/jobs/held?max=2", b"");
        assert_eq!(listed.status, 200);
        let listed = listed.json().unwrap();
        assert_eq!(listed["total"], 3, "{listed}");
        assert_eq!(listed["messages"].as_array().unwrap().len(), 2, "{listed}");
        assert_eq!(listed["messages"][0]["subscriptions"][0]["state"], "parked");
        assert_eq!(
            listed["messages"][0]["subscriptions"][0]["lastError"],
            "nacked by qmesh sub"
        );
        let unknown = http("GET", "/v1/queues/nope/held", b"");
        assert_eq!(unknown.status, 404);
        assert_eq!(unknown.json().unwrap()["error"]["code"], "unknown_queue");
        let bad = http("POST", "/v1/queues/jobs/redrive", b"{not json");
        assert_eq!(bad.status, 400);
        let redriven = http("POST", "/v1/queues/jobs/redrive", b"");
        assert_eq!(redriven.status, 200);
        assert_eq!(redriven.json().unwrap()["unparked"], 3);
        let redelivered = json_lines(&ok(&[
            "sub", "workers", "--count", "3", "--json", "--addr", &billing,
        ]));
        let ids: BTreeSet<&str> = redelivered
            .iter()
            .map(|d| d["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, BTreeSet::from(["job-0", "job-1", "job-2"]));
        peek_until(&shop, "jobs", 0);

        // Purge through the HTTP mirror: ready messages no consumer holds are deleted.
        ok(&[
            "pub", "jobs", "extra", "--id", "extra", "--count", "2", "--addr", &shop,
        ]);
        peek_until(&shop, "jobs", 2);
        let bad = http("POST", "/v1/queues/jobs/purge", b"{\"max\": \"all\"}");
        assert_eq!(bad.status, 400);
        let unknown = http("POST", "/v1/queues/nope/purge", b"");
        assert_eq!(unknown.status, 404);
        let purged = http("POST", "/v1/queues/jobs/purge", b"");
        assert_eq!(purged.status, 200);
        let purged = purged.json().unwrap();
        assert_eq!(
            (purged["purged"].as_u64(), purged["remaining"].as_u64()),
            (Some(2), Some(0)),
            "{purged}"
        );
        peek_until(&shop, "jobs", 0);

        // Unknown queues are an error with exit code 3.
        let out = qmesh(&["dlq", "peek", "nope", "--addr", &shop]);
        assert_eq!(out.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    })
    .await
    .unwrap();
    drop(mesh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_replays_what_was_acked_and_says_what_it_reached() {
    let mesh = MeshBuilder::new()
        .manifests(MANIFESTS)
        .sidecar("shop", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(&sidecar_binary()))
        .await
        .unwrap();
    let shop = mesh.sidecar("shop").grpc.to_string();
    let billing = mesh.sidecar("billing").grpc.to_string();
    tokio::task::spawn_blocking(move || {
        ok(&[
            "pub", "ledger", "entry", "--id", "entry", "--count", "4", "--addr", &shop,
        ]);
        let ids = |text: &str| -> BTreeSet<String> {
            json_lines(text)
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let first = ids(&ok(&[
            "sub",
            "ledger-readers",
            "--count",
            "4",
            "--json",
            "--addr",
            &billing,
        ]));
        assert_eq!(first.len(), 4, "{first:?}");
        let out = ok(&[
            "sub",
            "rewind",
            "ledger-readers",
            "--to",
            "10m",
            "--addr",
            &billing,
        ]);
        assert!(out.contains("1 of 2 sidecars"), "{out}");
        let again = ids(&ok(&[
            "sub",
            "ledger-readers",
            "--count",
            "4",
            "--json",
            "--addr",
            &billing,
        ]));
        assert_eq!(again, first, "the acked entries, replayed");

        let unknown = qmesh(&["sub", "rewind", "nobody", "--to", "10m", "--addr", &billing]);
        assert_eq!(unknown.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown subscription"));
        let bad = qmesh(&[
            "sub",
            "rewind",
            "ledger-readers",
            "--to",
            "yesterday",
            "--addr",
            &billing,
        ]);
        assert_eq!(bad.status.code(), Some(1));
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains("RFC 3339") && err.contains("15m"), "{err}");
    })
    .await
    .unwrap();
}
