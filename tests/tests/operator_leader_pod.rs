//! The leading replica labels its own pod `qmesh.io/leader=true` (the control-plane Service selects
//! it, so all sidecar stats reach the replica that writes status) and removes the label when it stops
//! leading.

#![allow(clippy::unwrap_used)]

mod operator_support;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use operator_support::*;
use qmesh_tests::{KubeApiServer, wait_for};

fn leader_label(pod: &Pod) -> Option<String> {
    pod.metadata
        .labels
        .as_ref()?
        .get(qmesh_operator::LEADER_LABEL)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_labels_its_pod_and_unlabels_it_when_it_stops_leading() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    // The replicas' own pods, as the Deployment would create them.
    create_pod(&client, &sidecar_pod("operator-a", "operator")).await;
    create_pod(&client, &sidecar_pod("operator-b", "operator")).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let a = Operator::start(client.clone(), "operator-a", |_| {});
    wait_for("operator-a's pod labelled leader", DEADLINE, || {
        let pods = pods.clone();
        async move { (leader_label(&pods.get("operator-a").await.ok()?)? == "true").then_some(()) }
    })
    .await
    .unwrap();
    let b = Operator::start(client.clone(), "operator-b", |_| {});
    a.stop().await;
    wait_for(
        "operator-b's pod labelled leader and operator-a's not",
        DEADLINE,
        || {
            let pods = pods.clone();
            async move {
                let a = pods.get("operator-a").await.ok()?;
                let b = pods.get("operator-b").await.ok()?;
                (leader_label(&a).is_none() && leader_label(&b).as_deref() == Some("true"))
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    b.stop().await;
}

/// A label patch that fails (here: the replica's pod is not there yet) is retried until it lands,
/// not tried once: without the label the control-plane Service would have no endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_leader_label_is_retried_until_it_lands() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::default_namespaced(client.clone());
    let a = Operator::start(client.clone(), "operator-a", |_| {});
    wait_for("operator-a to lead", DEADLINE, || {
        let leases = leases.clone();
        async move {
            let lease = leases.get("qmesh-operator").await.ok()?;
            (lease.spec?.holder_identity? == "operator-a").then_some(())
        }
    })
    .await
    .unwrap();
    create_pod(&client, &sidecar_pod("operator-a", "operator")).await;
    wait_for("operator-a's pod labelled leader", DEADLINE, || {
        let pods = pods.clone();
        async move { (leader_label(&pods.get("operator-a").await.ok()?)? == "true").then_some(()) }
    })
    .await
    .unwrap();
    a.stop().await;
}
