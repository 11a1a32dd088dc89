//! The admission webhooks called by a real API server (registered with `clientConfig.url` on
//! loopback): labelled pods come back injected, others untouched, invalid Queue/Subscription specs are
//! refused with the field named, and a certificate rotation keeps the webhook working.

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use operator_support::*;
use qmesh_api::Subscription;
use qmesh_operator::webhook::{self, tls};
use qmesh_tests::{KubeApiServer, free_port, wait_for};
use tokio_util::sync::CancellationToken;

async fn create<K>(client: &Client, value: serde_json::Value) -> Result<K, kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(value).unwrap(),
    )
    .await
}

fn pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}
    }))
    .unwrap()
}

async fn create_pod_in(client: &Client, ns: &str, pod: &Pod) -> Pod {
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), pod)
        .await
        .unwrap()
}

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .any(|c| c.name == "qmesh-sidecar")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_calls_the_webhooks_and_rotation_keeps_them_working() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    let port = free_port().unwrap();
    let base = format!("https://127.0.0.1:{port}");

    // The configurations, as the chart creates them but pointing at loopback; caBundle empty.
    create::<MutatingWebhookConfiguration>(&client, serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "qmesh-sidecar-injector"},
        "webhooks": [{
            "name": "namespace.inject.qmesh.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": format!("{base}/inject")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"qmesh.io/inject": "enabled"}},
            "objectSelector": {"matchExpressions": [{"key": "qmesh.io/inject", "operator": "NotIn", "values": ["false"]}]}
        }]
    }))
    .await
    .unwrap();
    create::<ValidatingWebhookConfiguration>(&client, serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "qmesh-validator"},
        "webhooks": [{
            "name": "validate.qmesh.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": format!("{base}/validate")},
            "rules": [{"apiGroups": ["qmesh.io"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"], "resources": ["queues", "subscriptions"]}]
        }]
    }))
    .await
    .unwrap();

    // The operator's webhook side: TLS manager (creates the Secret, patches the caBundles) + server.
    let manager = tls::Manager::start(
        client.clone(),
        "default",
        "qmesh-webhook-tls",
        "qmesh-webhook",
        Duration::from_secs(3600),
        ("qmesh-sidecar-injector".into(), "qmesh-validator".into()),
    )
    .await
    .unwrap();
    let config = qmesh_operator::WebhookConfig {
        namespace: "default".into(),
        trust_domain: "cluster.local".into(),
        addr: ([127, 0, 0, 1], port).into(),
        service: "qmesh-webhook".into(),
        mutating_webhook_config: "qmesh-sidecar-injector".into(),
        validating_webhook_config: "qmesh-validator".into(),
        tls_secret: "qmesh-webhook-tls".into(),
        cert_manager: false,
        tls_dir: "/nonexistent".into(),
        cert_validity: Duration::from_secs(3600),
        control_plane_address: "qmesh-control.qmesh-system.svc:7443".into(),
        sidecar_image: "ghcr.io/qmesh/qmesh-sidecar:test".into(),
        sidecar_cpu_request: "50m".into(),
        sidecar_cpu_limit: None,
        sidecar_memory_request: "32Mi".into(),
        sidecar_memory_limit: "128Mi".into(),
        sidecar_log_level: "info".into(),
        sidecar_data_size: "1Gi".into(),
    };
    let native = webhook::supports_native_sidecars(&client).await;
    assert!(!native, "the test API server is 1.20");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let server_task = tokio::spawn({
        let (resolver, router, stop) = (
            Arc::clone(&manager.resolver),
            webhook::router(webhook::template(&config, native), Some(client.clone())),
            stop.clone(),
        );
        async move {
            webhook::serve_tls(
                listener,
                resolver,
                router,
                async move { stop.cancelled().await },
            )
            .await
        }
    });
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = hooks
        .get("qmesh-sidecar-injector")
        .await
        .unwrap()
        .webhooks
        .unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .unwrap();
    assert!(String::from_utf8_lossy(&bundle.0).contains("BEGIN CERTIFICATE"));

    // Namespaces: one opted in, one not.
    let ns: Api<Namespace> = Api::all(client.clone());
    for (name, labels) in [
        ("shop", serde_json::json!({"qmesh.io/inject": "enabled"})),
        ("plain", serde_json::json!({})),
    ] {
        ns.create(
            &PostParams::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    }
    let injected = create_pod_in(
        &client,
        "shop",
        &pod("web-1", serde_json::json!({"app": "web"})),
    )
    .await;
    assert!(
        has_sidecar(&injected),
        "the API server called the webhook and applied its patch"
    );
    let app = injected
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name != "qmesh-sidecar")
        .unwrap();
    let app_env: Vec<String> = app.env.iter().flatten().map(|e| e.name.clone()).collect();
    assert!(app_env.contains(&"QMESH_GRPC_ADDR".to_owned()));
    assert!(
        injected
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == "qmesh-data")
    );
    // The sidecar's own token: audience qmesh, 10 minutes (a leaked one is replayable for minutes).
    let token = injected
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "qmesh-token")
        .and_then(|v| {
            v.projected
                .as_ref()?
                .sources
                .as_ref()?
                .first()?
                .service_account_token
                .clone()
        })
        .expect("a projected token volume");
    assert_eq!(
        (token.audience.as_deref(), token.expiration_seconds),
        (Some("qmesh"), Some(600))
    );
    // ... and no other credential: the pod's Kubernetes API token is not mounted into the sidecar.
    let sidecar_mounts: Vec<String> = injected
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == "qmesh-sidecar")
        .into_iter()
        .chain(
            injected
                .spec
                .as_ref()
                .unwrap()
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.name == "qmesh-sidecar"),
        )
        .flat_map(|c| c.volume_mounts.iter().flatten().map(|m| m.name.clone()))
        .collect();
    assert_eq!(sidecar_mounts, ["qmesh-data", "qmesh-token"]);
    assert_eq!(
        injected.metadata.annotations.unwrap()["qmesh.io/injected"],
        "true"
    );
    let opted_out = create_pod_in(
        &client,
        "shop",
        &pod("web-2", serde_json::json!({"qmesh.io/inject": "false"})),
    )
    .await;
    assert!(!has_sidecar(&opted_out));
    let elsewhere = create_pod_in(&client, "plain", &pod("web-3", serde_json::json!({}))).await;
    assert!(!has_sidecar(&elsewhere));
    // Host-network pods are skipped, and the reason is recorded as an Event on the pod.
    let mut host = pod("node-agent", serde_json::json!({}));
    host.spec.as_mut().unwrap().host_network = Some(true);
    let host = create_pod_in(&client, "shop", &host).await;
    assert!(!has_sidecar(&host));
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "shop");
    let note = wait_for("the InjectionSkipped event", DEADLINE, || {
        let events = events.clone();
        async move {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find_map(|e| {
                    (e.reason.as_deref() == Some("InjectionSkipped")
                        && e.involved_object.name.as_deref() == Some("node-agent"))
                    .then(|| e.message.unwrap_or_default())
                })
        }
    })
    .await
    .unwrap();
    assert!(note.contains("host network"), "{note}");
    // A pod of a Deployment has only a generateName (`agent-7d9f-`) when the webhook sees it: its
    // event still gets a valid name, and says which pod it is about.
    let mut generated = pod("ignored", serde_json::json!({}));
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("agent-7d9f-".into());
    generated.spec.as_mut().unwrap().host_network = Some(true);
    let generated = create_pod_in(&client, "shop", &generated).await;
    assert!(!has_sidecar(&generated));
    let event = wait_for(
        "the InjectionSkipped event of a generated pod",
        DEADLINE,
        || {
            let events = events.clone();
            async move {
                events
                    .list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some("InjectionSkipped")
                            && e.involved_object.name.as_deref() == Some("agent-7d9f-")
                    })
            }
        },
    )
    .await
    .unwrap();
    // This API server stores legacy Events under any name; newer ones and tools want a DNS
    // subdomain (each dot-separated label alphanumeric at both ends).
    let name = event.metadata.name.unwrap_or_default();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    assert!(
        name.len() <= 253 && name.split('.').all(label_ok),
        "event name {name:?} is not a DNS subdomain"
    );

    // Validation: rules the schema cannot express come back from the webhook, naming the field.
    let subs: Api<Subscription> = Api::default_namespaced(client.clone());
    let mut looping = subscription("billing", "orders", "billing");
    looping.spec.dead_letter_queue = Some("orders".into());
    let err = subs
        .create(&PostParams::default(), &looping)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.deadLetterQueue"), "{err}");
    subs.create(
        &PostParams::default(),
        &subscription("billing", "orders", "billing"),
    )
    .await
    .unwrap();
    let err = subs
        .patch(
            "billing",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"queue": "payments"}})),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.queue") && err.contains("immutable"),
        "{err}"
    );
    // Every answer is counted by webhook and result (qmesh_operator_webhook_requests_total, what
    // the QmeshWebhookErrors alert watches); the counter is process-wide, the webhook served here.
    let text = qmesh_operator::metrics::Metrics::new().encode();
    let count = |webhook: &str, result: &str| -> u64 {
        let series = format!(
            "qmesh_operator_webhook_requests_total{{webhook=\"{webhook}\",result=\"{result}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
    };
    assert!(count("inject", "injected") >= 1, "{text}");
    assert!(
        count("inject", "skipped") >= 2,
        "opted out, host network: {text}"
    );
    assert!(count("validate", "denied") >= 2, "{text}");
    assert!(count("validate", "allowed") >= 1, "{text}");
    assert_eq!(count("inject", "error"), 0, "{text}");

    // Rotation: new Secret, caBundle carrying old + new CA, and the API server still trusts us.
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let before = secrets
        .get("qmesh-webhook-tls")
        .await
        .unwrap()
        .data
        .unwrap()["tls.crt"]
        .clone();
    manager.rotate_now().await.unwrap();
    let after = secrets
        .get("qmesh-webhook-tls")
        .await
        .unwrap()
        .data
        .unwrap()["tls.crt"]
        .clone();
    assert_ne!(before, after, "the serving certificate changed");
    let bundle = hooks
        .get("qmesh-sidecar-injector")
        .await
        .unwrap()
        .webhooks
        .unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&bundle.0)
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "old and new CA during the overlap"
    );
    let after_rotation = wait_for("injection after rotation", DEADLINE, || {
        let client = client.clone();
        async move {
            let api: Api<Pod> = Api::namespaced(client, "shop");
            api.create(&PostParams::default(), &pod("web-4", serde_json::json!({})))
                .await
                .ok()
        }
    })
    .await
    .unwrap();
    assert!(has_sidecar(&after_rotation));
    stop.cancel();
    server_task.await.unwrap().unwrap();
}
