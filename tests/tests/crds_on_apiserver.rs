//! The CRDs and examples against a real kube-apiserver: accepted, printed with their columns,
//! defaulted, validated by the server's schema, and their status writable by server-side apply.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use qmesh_api::{Queue, QueueStatus, Subscription};
use qmesh_tests::{KubeApiServer, repo_root, wait_for};

fn ok(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "command failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn install_crds(server: &KubeApiServer) {
    let crds = repo_root().join("crds");
    ok(server
        .kubectl(
            ["apply", "-f"]
                .iter()
                .map(|s| s.to_string())
                .chain([crds.display().to_string()]),
        )
        .unwrap());
    ok(server
        .kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/queues.qmesh.io",
            "crd/subscriptions.qmesh.io",
        ])
        .unwrap());
    // Discovery can lag behind Established for a moment.
    let api: Api<Queue> = Api::default_namespaced(server.client());
    wait_for("queues to be served", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.list(&Default::default()).await.ok() }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn crds_and_examples_apply_and_print_their_columns() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;

    let examples = repo_root().join("examples");
    let applied = ok(server
        .kubectl(["apply", "-f", &examples.display().to_string()])
        .unwrap());
    assert!(
        applied.contains("queue.qmesh.io/orders created"),
        "{applied}"
    );
    assert!(
        applied.contains("subscription.qmesh.io/billing created"),
        "{applied}"
    );

    let queues = ok(server.kubectl(["get", "queues"]).unwrap());
    let header: Vec<&str> = queues.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "SUBSCRIPTIONS", "BACKLOG", "AGE"],
        "{queues}"
    );
    assert!(queues.contains("orders-dead-letter"), "{queues}");

    let subs = ok(server.kubectl(["get", "subscriptions"]).unwrap());
    let header: Vec<&str> = subs.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "QUEUE", "CONSUMERS", "BACKLOG", "READY", "AGE"],
        "{subs}"
    );
    let billing = subs
        .lines()
        .find(|l| l.starts_with("billing"))
        .expect("billing listed");
    assert_eq!(billing.split_whitespace().nth(1), Some("orders"), "{subs}");

    // The category groups both kinds.
    let all = ok(server.kubectl(["get", "qmesh", "-o", "name"]).unwrap());
    assert_eq!(all.lines().count(), 5, "{all}");

    // The transactional outbox's Queue: its `transaction` settings pass the CRD's schema; `-o
    // wide` adds the half messages (queues) and the scheduled messages (subscriptions).
    let outbox = examples.join("transactional-outbox/outbox.yaml");
    let applied = ok(server
        .kubectl(["apply", "-f", &outbox.display().to_string()])
        .unwrap());
    assert!(
        applied.contains("queue.qmesh.io/order-events created"),
        "{applied}"
    );
    let wide = ok(server.kubectl(["get", "queues", "-o", "wide"]).unwrap());
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "SUBSCRIPTIONS",
            "BACKLOG",
            "IN-TRANSACTION",
            "AGE"
        ],
        "{wide}"
    );
    let wide = ok(server
        .kubectl(["get", "subscriptions", "-o", "wide"])
        .unwrap());
    assert!(wide.lines().next().unwrap().contains("SCHEDULED"), "{wide}");

    // `kubectl explain` explains fields from the Rust doc comments (once the server has published
    // the CRD's OpenAPI, which it does shortly after the CRD is established).
    let explain = wait_for(
        "kubectl explain to know queues",
        Duration::from_secs(60),
        || {
            let out = server
                .kubectl(["explain", "queues.spec.retention.overflow"])
                .unwrap();
            async move {
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        },
    )
    .await
    .unwrap();
    assert!(
        explain.contains("backpressure to the publisher"),
        "{explain}"
    );
}

#[tokio::test]
async fn server_rejects_invalid_specs_naming_the_field_and_defaults_the_rest() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;

    let bad_queue = serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1", "kind": "Queue",
        "metadata": {"name": "floppy"},
        "spec": {"durability": "Floppy"}
    });
    let bad_sub = serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1", "kind": "Subscription",
        "metadata": {"name": "greedy"},
        "spec": {"queue": "orders", "consumers": {}, "delivery": {"maxInFlight": 0}}
    });
    let bad_size = serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1", "kind": "Queue",
        "metadata": {"name": "huge"},
        "spec": {"maxMessageBytes": "lots"}
    });
    for (manifest, field) in [
        (&bad_queue, "spec.durability"),
        (&bad_sub, "spec.delivery.maxInFlight"),
        (&bad_size, "spec.maxMessageBytes"),
    ] {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), manifest.to_string()).unwrap();
        let out = server
            .kubectl(["apply", "-f", &file.path().display().to_string()])
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{manifest} was accepted");
        assert!(
            stderr.contains(field),
            "error should name {field}: {stderr}"
        );
    }
    let queues: Api<Queue> = Api::default_namespaced(server.client());
    assert!(queues.get_opt("floppy").await.unwrap().is_none());

    // A minimal Queue comes back with the schema's defaults filled in by the server.
    let minimal: Queue = serde_json::from_value(serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1", "kind": "Queue",
        "metadata": {"name": "orders"}, "spec": {}
    }))
    .unwrap();
    let created = queues
        .create(&PostParams::default(), &minimal)
        .await
        .unwrap();
    let stored = serde_json::to_value(&created.spec).unwrap();
    assert_eq!(stored["durability"], "Disk", "{stored}");
    assert_eq!(stored["maxMessageBytes"], "1Mi", "{stored}");
    assert_eq!(stored["retention"]["overflow"], "Reject", "{stored}");

    let minimal_sub: Subscription = serde_json::from_value(serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1", "kind": "Subscription",
        "metadata": {"name": "billing"}, "spec": {"queue": "orders", "consumers": {}}
    }))
    .unwrap();
    let subs: Api<Subscription> = Api::default_namespaced(server.client());
    let created = subs
        .create(&PostParams::default(), &minimal_sub)
        .await
        .unwrap();
    assert_eq!(created.spec.delivery.max_in_flight, 32);
    assert_eq!(created.spec.retry.max_deliveries, 5);
    assert_eq!(created.spec.delivery.ack_timeout.to_string(), "30s");

    // Status is a subresource, written by server-side apply with one field manager.
    let status = serde_json::json!({
        "apiVersion": "qmesh.io/v1alpha1", "kind": "Queue",
        "status": QueueStatus { subscriptions: 1, backlog: 42, ..Default::default() }
    });
    queues
        .patch_status(
            "orders",
            &PatchParams::apply("qmesh-operator").force(),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();
    let listed = ok(server
        .kubectl(["get", "queue", "orders", "--no-headers"])
        .unwrap());
    let columns: Vec<&str> = listed.split_whitespace().collect();
    assert_eq!(&columns[..1], ["orders"], "{listed}");
    assert!(
        columns.contains(&"42"),
        "backlog column shows the status: {listed}"
    );
}

/// Helm installs `crds/` once and never upgrades it (docs/install.md, "Upgrading"): a cluster
/// installed with an older chart keeps the older schema, which drops fields it does not know, until
/// the documented `kubectl apply -f crds/` — which takes over CRDs Helm created, keeps the Queues
/// already stored, and lets the new fields through.
#[tokio::test]
async fn the_documented_crd_upgrade_step_brings_new_fields_and_keeps_queues() {
    let server = KubeApiServer::start().await.unwrap();
    // An older Queue CRD, as an earlier chart's install created it: no `retention.keepAcked`.
    let current = std::fs::read_to_string(repo_root().join("crds/queues.qmesh.io.yaml")).unwrap();
    let mut older: serde_yaml::Value = serde_yaml::from_str(&current).unwrap();
    let retention = &mut older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["retention"]["properties"];
    assert!(
        retention
            .as_mapping_mut()
            .unwrap()
            .remove("keepAcked")
            .is_some()
    );
    let older_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(older_file.path(), serde_yaml::to_string(&older).unwrap()).unwrap();
    ok(server
        .kubectl(["create", "-f", &older_file.path().display().to_string()])
        .unwrap());
    ok(server
        .kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/queues.qmesh.io",
        ])
        .unwrap());

    let queue = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        queue.path(),
        "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: orders, namespace: default}\n\
         spec: {durability: Disk, retention: {keepAcked: 1h}}\n",
    )
    .unwrap();
    let queue = queue.path().display().to_string();
    let keep_acked = || {
        ok(server
            .kubectl([
                "get",
                "queue",
                "orders",
                "-o",
                "jsonpath={.metadata.uid} {.spec.retention.keepAcked}",
            ])
            .unwrap())
    };
    // Discovery can lag behind Established for a moment.
    wait_for("queues to be served", Duration::from_secs(30), || {
        // `--validate=false`: what is tested is the server's schema (which prunes), not
        // kubectl's copy of the published OpenAPI, which follows a CRD change only later.
        let applied = server
            .kubectl(["apply", "--validate=false", "-f", &queue])
            .unwrap();
        async move { applied.status.success().then_some(()) }
    })
    .await
    .unwrap();
    let before = keep_acked();
    let (uid, kept) = before.split_once(' ').unwrap();
    assert_eq!(kept, "", "the older schema prunes keepAcked");

    // The documented step.
    let crds = repo_root().join("crds").display().to_string();
    ok(server.kubectl(["apply", "-f", &crds]).unwrap());
    let schema = ok(server
        .kubectl([
            "get",
            "crd",
            "queues.qmesh.io",
            "-o",
            "jsonpath={.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.retention.properties.keepAcked.type}",
        ])
        .unwrap());
    assert_eq!(schema, "string", "the CRD took the current schema");
    ok(server
        .kubectl(["apply", "--validate=false", "-f", &queue])
        .unwrap());
    let after = keep_acked();
    assert_eq!(
        after,
        format!("{uid} 1h"),
        "the same Queue, now with keepAcked"
    );
}
