//! The Queue and Subscription controllers against a real kube-apiserver, with the operator running
//! in-process: statuses, reasons, observedGeneration, printer columns, Events, and a Queue deletion
//! that waits for its subscription.

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use operator_support::*;
use qmesh_api::{Queue, Subscription};
use qmesh_tests::{KubeApiServer, wait_for};

/// Short, so the test also sees a blocked deletion given up on.
const GRACE: Duration = Duration::from_secs(6);

#[tokio::test]
async fn statuses_events_and_guarded_deletion_follow_specs_and_pods() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let operator = Operator::start(client.clone(), "operator-0", |c| {
        c.deletion_grace = GRACE;
    });
    let queues: Api<Queue> = Api::default_namespaced(client.clone());
    let subs: Api<Subscription> = Api::default_namespaced(client.clone());
    let pp = PostParams::default();

    // A valid queue becomes Ready, carries the finalizer and its generation.
    queues
        .create(&pp, &queue("orders", serde_json::json!({})))
        .await
        .unwrap();
    let orders = wait_queue(&client, "orders", "Ready", |q| {
        queue_ready(q) == Some(("True".into(), "Ready".into()))
    })
    .await;
    let status = orders.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, orders.metadata.generation);
    assert_eq!(
        status.conditions[0].observed_generation,
        orders.metadata.generation
    );
    assert!(
        orders
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "qmesh.io/finalizer")
    );

    // A subscription without consumer pods: NoConsumers, until a sidecar pod becomes ready.
    subs.create(&pp, &subscription("billing", "orders", "billing"))
        .await
        .unwrap();
    wait_subscription(&client, "billing", "NoConsumers", |s| {
        subscription_ready(s) == Some(("False".into(), "NoConsumers".into()))
    })
    .await;
    create_pod(&client, &sidecar_pod("billing-1", "billing")).await;
    set_pod_ready(&client, "billing-1", "127.0.0.2", true).await;
    let billing = wait_subscription(&client, "billing", "Ready with 1 consumer", |s| {
        subscription_ready(s) == Some(("True".into(), "Ready".into()))
            && s.status.as_ref().unwrap().consumers == 1
    })
    .await;
    assert_eq!(
        billing.status.unwrap().observed_generation,
        billing.metadata.generation
    );
    wait_queue(&client, "orders", "1 subscription, 1 publisher", |q| {
        q.status
            .as_ref()
            .is_some_and(|s| s.subscriptions == 1 && s.publishers == 1)
    })
    .await;
    let table = ok(server.kubectl(["get", "queues", "orders"]).unwrap());
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["orders", "True", "1", "0"], "{table}");
    let table = ok(server.kubectl(["get", "subscriptions", "billing"]).unwrap());
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["billing", "orders", "1", "0", "True"],
        "{table}"
    );

    // The pod becoming unready takes the consumer away again.
    set_pod_ready(&client, "billing-1", "127.0.0.2", false).await;
    wait_subscription(&client, "billing", "NoConsumers again", |s| {
        subscription_ready(s) == Some(("False".into(), "NoConsumers".into()))
            && s.status.as_ref().unwrap().consumers == 0
    })
    .await;

    // A subscription of a missing queue.
    subs.create(&pp, &subscription("lost", "nowhere", "billing"))
        .await
        .unwrap();
    wait_subscription(&client, "lost", "QueueNotFound", |s| {
        subscription_ready(s) == Some(("False".into(), "QueueNotFound".into()))
    })
    .await;
    wait_event(&client, "lost", "QueueNotFound").await;
    // Its queue appearing re-reconciles it (no consumer is ready now).
    queues
        .create(&pp, &queue("nowhere", serde_json::json!({})))
        .await
        .unwrap();
    wait_subscription(&client, "lost", "NoConsumers once its queue exists", |s| {
        subscription_ready(s) == Some(("False".into(), "NoConsumers".into()))
    })
    .await;

    // A spec the schema accepts but the rules refuse: Invalid plus an Event; fixing it (a new
    // generation) makes it Ready with the new observedGeneration.
    queues
        .create(
            &pp,
            &queue("loop", serde_json::json!({ "deadLetterQueue": "loop" })),
        )
        .await
        .unwrap();
    let invalid = wait_queue(&client, "loop", "Invalid", |q| {
        queue_ready(q) == Some(("False".into(), "Invalid".into()))
    })
    .await;
    let message = &invalid.status.as_ref().unwrap().conditions[0].message;
    assert!(message.contains("spec.deadLetterQueue"), "{message}");
    let note = wait_event(&client, "loop", "Invalid").await;
    assert!(note.contains("spec.deadLetterQueue"), "{note}");
    let fix = serde_json::json!({ "spec": { "deadLetterQueue": "orders" } });
    let fixed = queues
        .patch("loop", &PatchParams::default(), &Patch::Merge(&fix))
        .await
        .unwrap();
    let generation = fixed.metadata.generation;
    assert_eq!(generation, Some(2));
    wait_queue(&client, "loop", "Ready at generation 2", |q| {
        queue_ready(q) == Some(("True".into(), "Ready".into()))
            && q.status.as_ref().unwrap().observed_generation == generation
    })
    .await;

    // Deleting a queue that still has a subscription waits, says why, and completes once the
    // subscription is gone.
    queues
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    let blocked = wait_queue(&client, "orders", "DeletionBlocked", |q| {
        queue_ready(q) == Some(("False".into(), "DeletionBlocked".into()))
    })
    .await;
    let message = &blocked.status.as_ref().unwrap().conditions[0].message;
    assert!(message.contains("billing"), "{message}");
    let note = wait_event(&client, "orders", "DeletionBlocked").await;
    assert!(note.contains("billing"), "{note}");
    assert!(queues.get_opt("orders").await.unwrap().is_some());
    subs.delete("billing", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("queue orders to be gone", DEADLINE, || {
        let queues = queues.clone();
        async move {
            match queues.get_opt("orders").await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await
    .unwrap();

    // A deletion blocked for longer than the grace goes ahead anyway, and says so.
    queues
        .create(&pp, &queue("stubborn", serde_json::json!({})))
        .await
        .unwrap();
    subs.create(&pp, &subscription("clinging", "stubborn", "worker"))
        .await
        .unwrap();
    wait_queue(&client, "stubborn", "Ready", |q| {
        queue_ready(q).is_some_and(|(s, _)| s == "True")
    })
    .await;
    queues
        .delete("stubborn", &DeleteParams::default())
        .await
        .unwrap();
    wait_queue(&client, "stubborn", "DeletionBlocked", |q| {
        queue_ready(q) == Some(("False".into(), "DeletionBlocked".into()))
    })
    .await;
    let note = wait_event(&client, "stubborn", "DeletionForced").await;
    assert!(note.contains("clinging"), "{note}");
    wait_for("queue stubborn to be gone", DEADLINE, || {
        let queues = queues.clone();
        async move {
            match queues.get_opt("stubborn").await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await
    .unwrap();

    // In a namespace being deleted, the finalizer lets go even though a subscription remains.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let doomed: Namespace =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": "doomed" } })).unwrap();
    namespaces.create(&pp, &doomed).await.unwrap();
    let doomed_queues: Api<Queue> = Api::namespaced(client.clone(), "doomed");
    let doomed_subs: Api<Subscription> = Api::namespaced(client.clone(), "doomed");
    doomed_queues
        .create(&pp, &queue("jobs", serde_json::json!({})))
        .await
        .unwrap();
    doomed_subs
        .create(&pp, &subscription("workers", "jobs", "worker"))
        .await
        .unwrap();
    wait_for("the finalizer on doomed/jobs", DEADLINE, || {
        let api = doomed_queues.clone();
        async move {
            let q = api.get_opt("jobs").await.ok()??;
            q.metadata.finalizers.filter(|f| !f.is_empty())
        }
    })
    .await
    .unwrap();
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    // No namespace controller runs here, so delete the queue the way it would.
    doomed_queues
        .delete("jobs", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("doomed/jobs to be gone", DEADLINE, || {
        let api = doomed_queues.clone();
        async move {
            match api.get_opt("jobs").await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await
    .unwrap();

    let metrics = operator.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("qmesh_operator_reconciliations_total{kind=\"Queue\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("qmesh_operator_leader 1"), "{metrics}");
    assert!(
        operator
            .http_get("/readyz")
            .await
            .unwrap()
            .contains(" 200 ")
    );

    // A standby replica serves but does not reconcile; when the leader stops it takes over.
    let standby = Operator::start(client.clone(), "operator-1", |c| {
        c.deletion_grace = GRACE;
    });
    wait_for("the standby to be ready", DEADLINE, || async {
        standby
            .http_get("/readyz")
            .await
            .filter(|r| r.contains(" 200 "))
    })
    .await
    .unwrap();
    let metrics = standby.http_get("/metrics").await.unwrap();
    assert!(metrics.contains("qmesh_operator_leader 0"), "{metrics}");
    operator.stop().await;
    queues
        .create(&pp, &queue("after-failover", serde_json::json!({})))
        .await
        .unwrap();
    wait_queue(&client, "after-failover", "Ready", |q| {
        queue_ready(q) == Some(("True".into(), "Ready".into()))
    })
    .await;
    let metrics = standby.http_get("/metrics").await.unwrap();
    assert!(metrics.contains("qmesh_operator_leader 1"), "{metrics}");
    standby.stop().await;
}
