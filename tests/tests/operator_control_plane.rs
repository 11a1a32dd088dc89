//! The control plane against a real kube-apiserver: a tonic client joins as a sidecar pod, gets its
//! view, a new one within a second of a relevant change and none for irrelevant ones; its stats
//! reach the Queue and Subscription status; tokens are checked with real TokenReviews.

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{Api, Client, api::PostParams};
use operator_support::*;
use qmesh_api::{Queue, Subscription};
use qmesh_proto::control::{
    MeshView, QueueStats, SidecarReport, Stats, SubscriptionStats, sidecar_report::Report,
};
use qmesh_tests::{KubeApiServer, wait_for};

fn consumers_of(view: &MeshView, queue: &str, subscription: &str) -> Vec<(String, String)> {
    let q = view.queues.iter().find(|q| q.name == queue).unwrap();
    let route = q
        .routes
        .iter()
        .find(|r| r.subscription == subscription)
        .unwrap();
    route
        .consumers
        .iter()
        .map(|c| (c.name.clone(), c.peer_address.clone()))
        .collect()
}

async fn mesh(client: &Client) {
    let queues: Api<Queue> = Api::default_namespaced(client.clone());
    let subs: Api<Subscription> = Api::default_namespaced(client.clone());
    let pp = PostParams::default();
    queues
        .create(&pp, &queue("orders", serde_json::json!({})))
        .await
        .unwrap();
    subs.create(&pp, &subscription("billing", "orders", "billing"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_sidecar_gets_fresh_views_within_a_second_and_its_stats_reach_status() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let operator = Operator::start(client.clone(), "operator-0", |c| {
        c.insecure_skip_sidecar_auth = true;
    });
    mesh(&client).await;
    create_pod(&client, &sidecar_pod("shop-1", "shop")).await;
    set_pod_ready(&client, "shop-1", "127.0.0.3", true).await;

    let mut sidecar = Sidecar::join(&operator, "shop-1", "").await;
    // The index may learn of the pod before the queue: wait for the view that has both.
    let mut first = sidecar.view(DEADLINE).await;
    while first.queues.is_empty() {
        let next = sidecar.view(DEADLINE).await;
        assert!(next.version > first.version);
        first = next;
    }
    assert_eq!(first.namespace, "default");
    assert!(consumers_of(&first, "orders", "billing").is_empty());

    // A consumer pod that is not ready yet, and a pod without a sidecar, change nothing it sees.
    create_pod(&client, &sidecar_pod("billing-1", "billing")).await;
    let mut plain = sidecar_pod("web-1", "billing");
    plain.spec.as_mut().unwrap().containers.pop();
    create_pod(&client, &plain).await;
    assert_eq!(sidecar.next(Duration::from_millis(700)).await, None);

    // The consumer becoming ready: a new view within a second.
    let started = Instant::now();
    set_pod_ready(&client, "billing-1", "127.0.0.4", true).await;
    let second = sidecar.view(Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(second.version, first.version + 1);
    assert_eq!(
        consumers_of(&second, "orders", "billing"),
        [("billing-1".to_owned(), "127.0.0.4:7070".to_owned())]
    );
    println!("view after pod ready: {took:?}");

    // A spec edit that changes its view.
    let queues: Api<Queue> = Api::default_namespaced(client.clone());
    let edit = serde_json::json!({ "spec": { "maxMessageBytes": "2Mi" } });
    let started = Instant::now();
    queues
        .patch(
            "orders",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&edit),
        )
        .await
        .unwrap();
    let third = sidecar.view(Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    println!("view after spec edit: {took:?}");
    assert_eq!(third.version, second.version + 1);
    let policy = third.queues[0].policy.as_ref().unwrap();
    assert_eq!(policy.max_message_bytes, 2 * 1024 * 1024);

    // Stats roll up into the statuses (and the printer columns).
    sidecar
        .reports
        .send(SidecarReport {
            report: Some(Report::Stats(Stats {
                at: None,
                queues: vec![QueueStats {
                    queue: "orders".into(),
                    backlog_messages: 7,
                    half_messages: 2,
                    ..Default::default()
                }],
                subscriptions: vec![SubscriptionStats {
                    subscription: "billing".into(),
                    queue: "orders".into(),
                    backlog: 7,
                    in_flight: 2,
                    scheduled: 3,
                    dead_lettered_total: 1,
                    ..Default::default()
                }],
                transactions: Vec::new(),
            })),
        })
        .await
        .unwrap();
    wait_queue(&client, "orders", "backlog 7, 2 in transactions", |q| {
        q.status
            .as_ref()
            .is_some_and(|s| s.backlog == 7 && s.half_messages == 2)
    })
    .await;
    let billing = wait_subscription(&client, "billing", "backlog 7, 2 in flight", |s| {
        s.status
            .as_ref()
            .is_some_and(|s| s.backlog == 7 && s.in_flight == 2)
    })
    .await;
    let status = billing.status.unwrap();
    assert_eq!((status.dead_lettered, status.scheduled), (1, 3));
    // `kubectl get -o wide` shows the scheduled messages and the half messages.
    let wide = ok(server
        .kubectl(["get", "subscriptions", "billing", "-o", "wide"])
        .unwrap());
    assert!(wide.lines().next().unwrap().contains("SCHEDULED"), "{wide}");
    let wide = ok(server
        .kubectl(["get", "queues", "orders", "-o", "wide"])
        .unwrap());
    assert!(
        wide.lines().next().unwrap().contains("IN-TRANSACTION"),
        "{wide}"
    );
    let table = ok(server.kubectl(["get", "queues", "orders"]).unwrap());
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["orders", "True", "1", "7"], "{table}");

    let metrics = operator.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("qmesh_operator_control_connected_sidecars 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "qmesh_operator_control_views_sent_total {}",
            third.version
        )),
        "{metrics}"
    );

    // The stream closing drops its stats.
    drop(sidecar);
    wait_queue(&client, "orders", "backlog back to 0", |q| {
        q.status.as_ref().is_some_and(|s| s.backlog == 0)
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn sidecar_tokens_are_checked_with_token_review() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let operator = Operator::start(client.clone(), "operator-0", |_| {});
    mesh(&client).await;
    service_account(&client, "shop").await;
    let mut pods = Vec::new();
    for (name, ip) in [("shop-1", "127.0.0.5"), ("shop-2", "127.0.0.6")] {
        let mut pod = sidecar_pod(name, "shop");
        pod.spec.as_mut().unwrap().service_account_name = Some("shop".into());
        pods.push(create_pod(&client, &pod).await);
        set_pod_ready(&client, name, ip, true).await;
    }

    let reason = Sidecar::join(&operator, "shop-1", "bogus")
        .await
        .rejection()
        .await;
    assert!(reason.contains("token not authenticated"), "{reason}");
    let reason = Sidecar::join(&operator, "shop-1", "")
        .await
        .rejection()
        .await;
    assert!(reason.contains("no token"), "{reason}");

    // A real token bound to shop-1: good for shop-1, not for shop-2.
    let token = bound_token(&client, "default", "shop", &pods[0]).await;
    let reason = Sidecar::join(&operator, "shop-2", &token)
        .await
        .rejection()
        .await;
    assert!(reason.contains("shop-1"), "{reason}");
    let view = Sidecar::join(&operator, "shop-1", &token)
        .await
        .view(DEADLINE)
        .await;
    assert_eq!(view.version, 1);
    assert_eq!(view.queues[0].name, "orders");

    let metrics = operator.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("qmesh_operator_control_sidecars_rejected_total 3"),
        "{metrics}"
    );
    operator.stop().await;
}

/// Creates service account `name` in `default`.
async fn service_account(client: &Client, name: &str) -> Api<ServiceAccount> {
    let accounts: Api<ServiceAccount> = Api::default_namespaced(client.clone());
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": name } })).unwrap();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    accounts
}

/// A user's token (audience: the API server's own, as in a kubeconfig) for service account
/// `account` of `default`.
async fn user_token(client: &Client, account: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let accounts = service_account(client, account).await;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap()
}

/// `Control/Status` answers with the caller's Kubernetes identity and RBAC: no token or a bad one
/// is unauthenticated, a user RBAC does not let list Queues and Subscriptions there is denied
/// (naming what is missing), and a reader gets the namespace's queues and subscriptions with the
/// rates its sidecars report — what `qmesh get` shows in a cluster.
#[tokio::test]
async fn the_mesh_status_is_read_with_the_callers_identity_and_rbac() {
    use qmesh_proto::control::{StatusRequest, control_client::ControlClient};
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let operator = Operator::start(client.clone(), "operator-0", |_| {});
    mesh(&client).await;

    // An owner sidecar (a real bound token) reporting rates.
    service_account(&client, "shop").await;
    let mut pod = sidecar_pod("shop-1", "shop");
    pod.spec.as_mut().unwrap().service_account_name = Some("shop".into());
    let pod = create_pod(&client, &pod).await;
    set_pod_ready(&client, "shop-1", "127.0.0.7", true).await;
    let token = bound_token(&client, "default", "shop", &pod).await;
    let mut sidecar = Sidecar::join(&operator, "shop-1", &token).await;
    sidecar.view(DEADLINE).await;
    sidecar
        .reports
        .send(SidecarReport {
            report: Some(Report::Stats(Stats {
                at: None,
                queues: vec![QueueStats {
                    queue: "orders".into(),
                    backlog_messages: 7,
                    publish_rate: 42.5,
                    published_total: 900,
                    half_messages: 3,
                    ..Default::default()
                }],
                subscriptions: vec![SubscriptionStats {
                    subscription: "billing".into(),
                    queue: "orders".into(),
                    backlog: 7,
                    ack_rate: 12.0,
                    acked_total: 893,
                    ..Default::default()
                }],
                transactions: vec![qmesh_proto::control::TransactionEvent {
                    transaction: "tx-1".into(),
                    outcome: "committed".into(),
                    decided_by: "check".into(),
                    messages: 2,
                    queues: vec!["orders".into()],
                    ..Default::default()
                }],
            })),
        })
        .await
        .unwrap();

    // A reader (a Role to list queues and subscriptions in `default`) and a stranger.
    let reader = user_token(&client, "reader").await;
    let stranger = user_token(&client, "stranger").await;
    ok(server
        .kubectl([
            "create",
            "role",
            "qmesh-reader",
            "--verb=list",
            "--resource=queues.qmesh.io,subscriptions.qmesh.io",
        ])
        .unwrap());
    ok(server
        .kubectl([
            "create",
            "rolebinding",
            "qmesh-reader",
            "--role=qmesh-reader",
            "--serviceaccount=default:reader",
        ])
        .unwrap());

    let bundle = mesh_trust_bundle(&client).await;
    let channel = qmesh_identity::transport::connect_url(
        &format!("https://{}", operator.control_addr),
        Some(&bundle),
        |e| e,
    )
    .await
    .unwrap();
    let control = ControlClient::new(channel);
    let status = |token: Option<&str>, namespace: &str| {
        let mut control = control.clone();
        let mut request = tonic::Request::new(StatusRequest {
            namespace: namespace.into(),
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        async move {
            control
                .status(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };

    let refused = status(None, "default").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = status(Some("bogus"), "default").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = status(Some(&stranger), "default").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("system:serviceaccount:default:stranger")
            && refused.message().contains("may not list queues.qmesh.io"),
        "{}",
        refused.message()
    );
    // The Role is the namespace's: every namespace is more than the reader may see.
    let refused = status(Some(&reader), "").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    let summary = wait_for(
        "the reader's summary with the reported rates",
        DEADLINE,
        || {
            let answer = status(Some(&reader), "default");
            async move {
                let summary = answer.await.ok()?;
                (summary.queues.first()?.publish_rate == 42.5).then_some(summary)
            }
        },
    )
    .await
    .unwrap();
    let orders = &summary.queues[0];
    assert_eq!(
        (
            orders.name.as_str(),
            orders.backlog,
            orders.published_total,
            orders.subscriptions
        ),
        ("orders", 7, 900, 1)
    );
    assert_eq!(orders.half_messages, 3);
    // Transaction outcomes, named by the sidecar that reported them (`qmesh get transactions`).
    let events: Vec<(&str, &str, &str, &str)> = summary
        .transactions
        .iter()
        .map(|t| {
            (
                t.transaction.as_str(),
                t.decided_by.as_str(),
                t.sidecar.as_str(),
                t.namespace.as_str(),
            )
        })
        .collect();
    assert_eq!(events, [("tx-1", "check", "shop-1", "default")]);
    let billing = &summary.subscriptions[0];
    assert_eq!(
        (billing.name.as_str(), billing.ack_rate, billing.acked_total),
        ("billing", 12.0, 893)
    );
    assert!(
        summary
            .sidecars
            .iter()
            .any(|s| s.name == "shop-1" && s.connected),
        "{:?}",
        summary.sidecars
    );

    // `Control/HeldMessages`: RBAC on the Queue decides (get to browse, update to purge), and an
    // allowed call reaches the sidecar down its Join stream, which answers for itself.
    use qmesh_proto::{
        control::{
            HeldAnswer, HeldRequest, HeldResponse, MeshHeldRequest, control_update::Update,
            held_request::Call, held_response::Result as HeldResult,
        },
        v1::{BrowseRequest, BrowseResponse, PurgeRequest},
    };
    let held = {
        let control = control.clone();
        move |token: &str, call: Call| {
            let mut control = control.clone();
            let mut request = tonic::Request::new(MeshHeldRequest {
                namespace: "default".into(),
                request: Some(HeldRequest { call: Some(call) }),
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            async move {
                control
                    .held_messages(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        }
    };
    let browse = || {
        Call::Browse(BrowseRequest {
            queue: "orders".into(),
            max: 10,
        })
    };
    let purge = || {
        Call::Purge(PurgeRequest {
            queue: "orders".into(),
            max: 0,
        })
    };
    let refused = held(&stranger, browse()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = held(&reader, browse()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("may not get queues.qmesh.io \"orders\""),
        "{}",
        refused.message()
    );
    ok(server
        .kubectl([
            "create",
            "role",
            "qmesh-orders-browser",
            "--verb=get",
            "--resource=queues.qmesh.io",
            "--resource-name=orders",
        ])
        .unwrap());
    ok(server
        .kubectl([
            "create",
            "rolebinding",
            "qmesh-orders-browser",
            "--role=qmesh-orders-browser",
            "--serviceaccount=default:reader",
        ])
        .unwrap());
    let asked = tokio::spawn(wait_for("the reader's browse", DEADLINE, {
        let held = held.clone();
        let reader = reader.clone();
        move || {
            let answer = held(&reader, browse());
            async move { answer.await.ok() }
        }
    }));
    let call = loop {
        match sidecar.next(DEADLINE).await {
            Some(Update::Held(call)) => break call,
            Some(Update::View(_)) => {}
            other => panic!("expected a held-message call, got {other:?}"),
        }
    };
    assert!(
        matches!(&call.request, Some(HeldRequest { call: Some(Call::Browse(b)) }) if b.queue == "orders"),
        "{call:?}"
    );
    sidecar
        .reports
        .send(SidecarReport {
            report: Some(Report::Held(HeldAnswer {
                id: call.id,
                response: Some(HeldResponse {
                    result: Some(HeldResult::Browse(BrowseResponse {
                        messages: Vec::new(),
                        total: 3,
                    })),
                }),
            })),
        })
        .await
        .unwrap();
    let answered = asked.await.unwrap().unwrap();
    assert_eq!(answered.sidecars.len(), 1, "{answered:?}");
    assert_eq!(answered.sidecars[0].sidecar, "shop-1");
    assert!(
        matches!(
            answered.sidecars[0].response.as_ref().and_then(|r| r.result.as_ref()),
            Some(HeldResult::Browse(b)) if b.total == 3
        ),
        "{answered:?}"
    );
    // Browsing is not purging: that needs `update`.
    let refused = held(&reader, purge()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("may not update"),
        "{}",
        refused.message()
    );
    drop(sidecar);
    operator.stop().await;
}
