//! The operator's KEDA external scaler against a real kube-apiserver: a gRPC client playing KEDA
//! (`externalscaler.ExternalScaler`, what KEDA calls for `type: external` and `external-push`
//! triggers) asks for a Subscription's backlog while sidecars joined to the control plane report
//! it — summed over the owners, pushed to `StreamIsActive` when it turns active and idle again,
//! and bad triggers refused naming what is wrong.

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::net::SocketAddr;

use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use operator_support::*;
use qmesh_api::{Queue, Subscription};
use qmesh_proto::{
    control::{SidecarReport, Stats, SubscriptionStats, sidecar_report::Report},
    externalscaler::{
        GetMetricsRequest, IsActiveResponse, ScaledObjectRef,
        external_scaler_client::ExternalScalerClient,
    },
};
use qmesh_tests::{KubeApiServer, free_ports_on, wait_for};
use tonic::{Streaming, transport::Channel};

fn billing_workers(meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "billing-workers".into(),
        namespace: "default".into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

async fn report_backlog(sidecar: &Sidecar, backlog: u64) {
    sidecar
        .reports
        .send(SidecarReport {
            report: Some(Report::Stats(Stats {
                subscriptions: vec![SubscriptionStats {
                    subscription: "billing".into(),
                    queue: "orders".into(),
                    backlog,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        })
        .await
        .unwrap();
}

async fn metric(keda: &mut ExternalScalerClient<Channel>, scaled: &ScaledObjectRef) -> f64 {
    let answer = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled.clone()),
            metric_name: "qmesh-backlog-default-billing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.metric_values.len(), 1);
    let value = &answer.metric_values[0];
    assert_eq!(value.metric_name, "qmesh-backlog-default-billing");
    #[allow(clippy::cast_precision_loss)]
    let legacy = value.metric_value as f64;
    assert_eq!(legacy, value.metric_value_float);
    value.metric_value_float
}

/// The next state `StreamIsActive` pushes.
async fn next(pushed: &mut Streaming<IsActiveResponse>) -> bool {
    tokio::time::timeout(DEADLINE, pushed.message())
        .await
        .expect("a push within the deadline")
        .unwrap()
        .expect("the stream stays open")
        .result
}

#[tokio::test]
async fn keda_scales_a_subscription_on_the_backlog_its_owners_report() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let [port] = free_ports_on(std::net::Ipv4Addr::LOCALHOST).unwrap();
    let operator = Operator::start(client.clone(), "operator-0", |c| {
        c.insecure_skip_sidecar_auth = true;
        c.scaler_addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    });
    let pp = PostParams::default();
    let queues: Api<Queue> = Api::default_namespaced(client.clone());
    let subs: Api<Subscription> = Api::default_namespaced(client.clone());
    queues
        .create(&pp, &queue("orders", serde_json::json!({})))
        .await
        .unwrap();
    subs.create(&pp, &subscription("billing", "orders", "billing"))
        .await
        .unwrap();
    // Two producer pods, each owning part of the backlog.
    let mut owners = Vec::new();
    for (name, ip) in [("shop-1", "127.0.0.3"), ("shop-2", "127.0.0.4")] {
        create_pod(&client, &sidecar_pod(name, "shop")).await;
        set_pod_ready(&client, name, ip, true).await;
        owners.push(Sidecar::join(&operator, name, "").await);
    }

    let addr = format!("http://{}", operator.scaler_addr.unwrap());
    let mut keda = wait_for("the scaler to answer", DEADLINE, || {
        let addr = addr.clone();
        async move { ExternalScalerClient::connect(addr).await.ok() }
    })
    .await
    .unwrap();
    let scaled = billing_workers(&[("subscription", "billing"), ("targetBacklog", "50")]);

    // The HPA's metric: one per Subscription, 50 messages per consumer replica.
    let spec = wait_for("the Subscription indexed", DEADLINE, || {
        let (mut keda, scaled) = (keda.clone(), scaled.clone());
        async move {
            keda.is_active(scaled.clone()).await.ok()?;
            keda.get_metric_spec(scaled).await.ok()
        }
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(
        spec.metric_specs[0].metric_name,
        "qmesh-backlog-default-billing"
    );
    assert_eq!(
        (
            spec.metric_specs[0].target_size,
            spec.metric_specs[0].target_size_float
        ),
        (50, 50.0)
    );

    // The example ScaledObject's trigger is one this scaler takes, at the chart's Service.
    let example: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            qmesh_tests::repo_root().join("examples/keda/scaledobject-external.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let trigger = &example["spec"]["triggers"][0]["metadata"];
    assert_eq!(
        trigger["scalerAddress"].as_str(),
        Some("qmesh-scaler.qmesh-system.svc:7444")
    );
    let meta: Vec<(String, String)> = trigger
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .filter(|(k, _)| k != "scalerAddress")
        .collect();
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let spec = keda
        .get_metric_spec(billing_workers(&meta))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].target_size_float, 100.0);

    // Idle: no backlog, not active, and the push stream says so first.
    assert!(
        !keda
            .is_active(scaled.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let mut pushed = keda
        .stream_is_active(scaled.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!next(&mut pushed).await, "first push: idle");

    // The owners report 70 + 50 owed to billing: active, pushed, and the metric is the sum.
    report_backlog(&owners[0], 70).await;
    report_backlog(&owners[1], 50).await;
    assert!(next(&mut pushed).await, "pushed: active");
    wait_for("the backlog of both owners", DEADLINE, || {
        let (mut keda, scaled) = (keda.clone(), scaled.clone());
        async move { (metric(&mut keda, &scaled).await == 120.0).then_some(()) }
    })
    .await
    .unwrap();
    assert!(
        keda.is_active(scaled.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    println!(
        "KEDA scaler: backlog 120 at 50 per replica → the HPA asks for {} consumer replicas",
        (120.0_f64 / 50.0).ceil()
    );

    // An activation threshold keeps a small backlog from scaling up from zero.
    let lazy = billing_workers(&[("subscription", "billing"), ("activationBacklog", "500")]);
    assert!(!keda.is_active(lazy).await.unwrap().into_inner().result);

    // Drained: idle again, pushed.
    report_backlog(&owners[0], 0).await;
    report_backlog(&owners[1], 0).await;
    assert!(!next(&mut pushed).await, "pushed: idle again");
    assert_eq!(metric(&mut keda, &scaled).await, 0.0);

    // Bad triggers are refused, naming what is wrong.
    let refused = keda.is_active(billing_workers(&[])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("subscription"), "{refused:?}");
    let refused = keda
        .get_metric_spec(billing_workers(&[
            ("subscription", "billing"),
            ("targetBacklog", "-3"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let refused = keda
        .is_active(billing_workers(&[("subscription", "shipping")]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    assert!(
        refused.message().contains("default/shipping"),
        "{refused:?}"
    );

    // The Subscription deleted: the push stream ends saying so.
    subs.delete("billing", &DeleteParams::default())
        .await
        .unwrap();
    let ended = tokio::time::timeout(DEADLINE, pushed.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), tonic::Code::NotFound);
    // A push stream for a Subscription that does not exist is refused at once, not reported idle
    // forever.
    let refused = keda.stream_is_active(scaled).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    operator.stop().await;
}
