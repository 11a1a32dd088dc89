//! The Helm chart and the plain manifests: lint, golden renders, CRDs identical to the generated
//! ones, and installs into a real API server (objects accepted, webhook wired to the service,
//! least-privilege RBAC proven by acting as the operator's ServiceAccount, upgrade, uninstall).

#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, process::Output, time::Duration};

mod operator_support;

use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use qmesh_api::Queue;
use qmesh_tests::{KubeApiServer, repo_root, wait_for};

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn helm_bin() -> PathBuf {
    let assets = std::env::var_os("KUBEBUILDER_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/qmesh/k8s-1.20.2")
        });
    assets.join("helm")
}

fn helm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    std::process::Command::new(helm_bin())
        .args(args)
        .current_dir(repo_root())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .unwrap()
}

#[test]
fn chart_lints_clean_and_refuses_wrong_values_with_a_message() {
    let out = ok("helm lint", helm(&["lint", "--strict", "charts/qmesh"]));
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let out = ok(
        "helm lint (monitoring)",
        helm(&[
            "lint",
            "--strict",
            "charts/qmesh",
            "--set",
            "podMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "grafanaDashboard.enabled=true",
        ]),
    );
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let bad = helm(&[
        "template",
        "qmesh",
        "charts/qmesh",
        "--set",
        "webhook.injection.failurePolicy=Sometimes",
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("/webhook/injection/failurePolicy") && err.contains("'Fail', 'Ignore'"),
        "{err}"
    );
    let bad = helm(&["template", "qmesh", "charts/qmesh", "--set", "replicas=0"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/replicas"));
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let root = repo_root();
    for entry in std::fs::read_dir(root.join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let shipped =
            std::fs::read(root.join("charts/qmesh/crds").join(name)).unwrap_or_else(|_| {
                panic!("charts/qmesh/crds/{name:?} missing: cp crds/*.yaml charts/qmesh/crds/")
            });
        assert!(
            shipped == std::fs::read(&path).unwrap(),
            "charts/qmesh/crds/{name:?} differs from crds/: cp crds/*.yaml charts/qmesh/crds/"
        );
    }
    assert_eq!(
        std::fs::read_dir(root.join("charts/qmesh/crds"))
            .unwrap()
            .count(),
        std::fs::read_dir(root.join("crds")).unwrap().count()
    );
}

#[test]
fn helm_template_matches_the_golden_files() {
    let cases: [(&str, &[&str]); 4] = [
        ("default", &[]),
        (
            "cert-manager",
            &[
                "--set",
                "webhook.certManager.enabled=true",
                "--set",
                "webhook.certManager.issuerRef.name=ca-issuer",
            ],
        ),
        (
            "mesh-network-policy",
            &["--set", "networkPolicy.meshNamespaces={shop,billing}"],
        ),
        (
            "ha-monitored",
            &[
                "--set",
                "replicas=2",
                "--set",
                "serviceMonitor.enabled=true",
                "--set",
                "podMonitor.enabled=true",
                "--set",
                "prometheusRule.enabled=true",
                "--set",
                "grafanaDashboard.enabled=true",
                "--api-versions",
                "policy/v1/PodDisruptionBudget",
            ],
        ),
    ];
    let golden = repo_root().join("tests/golden/helm");
    for (name, extra) in cases {
        let mut args = vec![
            "template",
            "qmesh",
            "charts/qmesh",
            "--namespace",
            "qmesh-system",
        ];
        args.extend_from_slice(extra);
        let rendered = ok("helm template", helm(&args));
        let path = golden.join(format!("{name}.yaml"));
        if std::env::var("UPDATE_GOLDEN").is_ok() {
            std::fs::write(&path, &rendered).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            rendered == expected,
            "helm template ({name}) differs from {}: review, then UPDATE_GOLDEN=1 cargo nextest run -p qmesh-tests --test helm_chart",
            path.display()
        );
    }
}

#[test]
fn plain_manifests_are_rendered_from_the_chart() {
    let rendered = ok(
        "helm template",
        helm(&[
            "template",
            "qmesh",
            "charts/qmesh",
            "--namespace",
            "qmesh-system",
            "--set",
            "createNamespace=true",
            "--set",
            "podDisruptionBudget.enabled=false",
        ]),
    );
    let committed = std::fs::read_to_string(repo_root().join("deploy/qmesh.yaml")).unwrap();
    assert!(
        committed.ends_with(&rendered),
        "deploy/qmesh.yaml is stale: run hack/render-deploy.sh"
    );
}

fn can_i(server: &KubeApiServer, verb: &str, resource: &str, namespace: &str) -> bool {
    let out = server
        .kubectl([
            "auth",
            "can-i",
            verb,
            resource,
            "-n",
            namespace,
            "--as",
            "system:serviceaccount:qmesh-system:qmesh-operator",
        ])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_and_uninstall_against_a_real_api_server() {
    let server = KubeApiServer::start().await.unwrap();
    let chart = repo_root().join("charts/qmesh").display().to_string();
    // No operator pod runs here (no kubelet): let the validating webhook fail open for this test.
    ok(
        "helm install",
        server
            .helm([
                "install",
                "qmesh",
                &chart,
                "--namespace",
                "qmesh-system",
                "--create-namespace",
                "--set",
                "webhook.validation.failurePolicy=Ignore",
            ])
            .unwrap(),
    );
    let objects = ok(
        "kubectl get",
        server
            .kubectl([
                "get",
                "deployment,service,serviceaccount,networkpolicy",
                "-n",
                "qmesh-system",
                "-o",
                "name",
            ])
            .unwrap(),
    );
    for want in [
        "deployment.apps/qmesh-operator",
        "service/qmesh-webhook",
        "service/qmesh-control",
        "serviceaccount/qmesh-operator",
        "networkpolicy.networking.k8s.io/qmesh-operator",
    ] {
        assert!(objects.contains(want), "{want} missing: {objects}");
    }
    // The webhook configuration points at the service.
    let hook = ok(
        "get webhook",
        server
            .kubectl([
                "get",
                "mutatingwebhookconfiguration",
                "qmesh-sidecar-injector",
                "-o",
                "json",
            ])
            .unwrap(),
    );
    let hook: serde_json::Value = serde_json::from_str(&hook).unwrap();
    let client_config = &hook["webhooks"][0]["clientConfig"]["service"];
    assert_eq!(
        (
            client_config["name"].as_str(),
            client_config["namespace"].as_str(),
            client_config["path"].as_str()
        ),
        (Some("qmesh-webhook"), Some("qmesh-system"), Some("/inject"))
    );

    // RBAC: what the operator does is allowed, the rest is not.
    for (verb, resource, ns) in [
        ("watch", "pods", "default"),
        ("patch", "queues.qmesh.io/status", "shop"),
        ("update", "queues.qmesh.io/finalizers", "shop"),
        ("create", "tokenreviews.authentication.k8s.io", "default"),
        (
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            "default",
        ),
        ("create", "events", "shop"),
        ("update", "leases.coordination.k8s.io", "qmesh-system"),
        ("create", "secrets", "qmesh-system"),
        ("get", "secrets/qmesh-webhook-tls", "qmesh-system"),
        ("update", "secrets/qmesh-webhook-tls", "qmesh-system"),
        ("get", "secrets/qmesh-mesh-ca", "qmesh-system"),
        ("update", "secrets/qmesh-mesh-ca", "qmesh-system"),
        (
            "patch",
            "mutatingwebhookconfigurations/qmesh-sidecar-injector",
            "default",
        ),
    ] {
        assert!(
            can_i(&server, verb, resource, ns),
            "operator should be allowed to {verb} {resource} in {ns}"
        );
    }
    for (verb, resource, ns) in [
        ("delete", "pods", "default"),
        ("get", "secrets", "default"),
        // Only its own Secret, by name: no other, no listing or watching of Secrets.
        ("get", "secrets/someone-elses", "qmesh-system"),
        ("list", "secrets", "qmesh-system"),
        ("watch", "secrets", "qmesh-system"),
        ("create", "leases.coordination.k8s.io", "default"),
        (
            "patch",
            "mutatingwebhookconfigurations/someone-else",
            "default",
        ),
        ("create", "deployments.apps", "qmesh-system"),
    ] {
        assert!(
            !can_i(&server, verb, resource, ns),
            "operator must not be allowed to {verb} {resource} in {ns}"
        );
    }

    // A user Queue, created after install (CRDs came with the chart).
    let queue = repo_root()
        .join("examples/orders.yaml")
        .display()
        .to_string();
    wait_for("CRDs to be served", Duration::from_secs(30), || {
        let out = server.kubectl(["apply", "-f", &queue]).unwrap();
        async move { out.status.success().then_some(()) }
    })
    .await
    .unwrap();

    // The operator itself, run out of cluster as the chart's ServiceAccount (impersonated), does its
    // job: takes the Lease in its namespace, reconciles a Queue and writes its status.
    let mut kubeconfig = Kubeconfig::read_from(server.kubeconfig()).unwrap();
    kubeconfig.auth_infos[0]
        .auth_info
        .as_mut()
        .unwrap()
        .impersonate = Some("system:serviceaccount:qmesh-system:qmesh-operator".into());
    let as_operator = Client::try_from(
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let operator = operator_support::Operator::start(as_operator.clone(), "rbac-check", |c| {
        c.namespace = "qmesh-system".into()
    });
    let ready = operator_support::wait_queue(
        &server.client(),
        "orders",
        "Ready written by the SA-restricted operator",
        |q| {
            q.status
                .as_ref()
                .is_some_and(|s| s.observed_generation.is_some())
        },
    )
    .await;
    assert!(
        ready
            .status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready")
    );
    // A call outside its role is forbidden: it may read and patch Queues, never create them.
    let forbidden = elsewhere_create(&as_operator).await;
    assert!(forbidden.contains("forbidden"), "{forbidden}");
    operator.stop().await;

    // Upgrade with changed values.
    ok(
        "helm upgrade",
        server
            .helm([
                "upgrade",
                "qmesh",
                &chart,
                "--namespace",
                "qmesh-system",
                "--set",
                "replicas=3",
                "--set",
                "webhook.validation.failurePolicy=Ignore",
            ])
            .unwrap(),
    );
    let replicas = ok(
        "get deploy",
        server
            .kubectl([
                "get",
                "deployment",
                "qmesh-operator",
                "-n",
                "qmesh-system",
                "-o",
                "jsonpath={.spec.replicas}",
            ])
            .unwrap(),
    );
    assert_eq!(replicas, "3");

    // Uninstall: everything of the release goes, CRDs and the user's Queues stay.
    ok(
        "helm uninstall",
        server
            .helm(["uninstall", "qmesh", "--namespace", "qmesh-system"])
            .unwrap(),
    );
    let left = ok(
        "get",
        server
            .kubectl([
                "get",
                "deployment,service,serviceaccount,role,rolebinding",
                "-n",
                "qmesh-system",
                "-o",
                "name",
            ])
            .unwrap(),
    );
    assert!(
        !left.contains("qmesh-operator") && !left.contains("qmesh-webhook"),
        "left behind: {left}"
    );
    let cluster_left = ok("get", server.kubectl(["get", "clusterrole,clusterrolebinding,mutatingwebhookconfiguration,validatingwebhookconfiguration", "-o", "name"]).unwrap());
    assert!(
        !cluster_left.contains("qmesh"),
        "left behind: {cluster_left}"
    );
    let crds = ok(
        "get crd",
        server.kubectl(["get", "crd", "-o", "name"]).unwrap(),
    );
    assert!(crds.contains("queues.qmesh.io"));
    ok(
        "get queue",
        server.kubectl(["get", "queue", "orders"]).unwrap(),
    );

    // The plain-manifest path installs the same thing.
    let crds_dir = repo_root().join("crds").display().to_string();
    let deploy = repo_root().join("deploy/qmesh.yaml").display().to_string();
    ok(
        "kubectl apply plain manifests",
        server
            .kubectl(["apply", "-f", &crds_dir, "-f", &deploy])
            .unwrap(),
    );
    ok(
        "get deploy",
        server
            .kubectl(["get", "deployment", "qmesh-operator", "-n", "qmesh-system"])
            .unwrap(),
    );
}

async fn elsewhere_create(client: &Client) -> String {
    let queues: Api<Queue> = Api::namespaced(client.clone(), "default");
    let q = operator_support::queue("sneaky", serde_json::json!({}));
    match queues.create(&PostParams::default(), &q).await {
        Ok(_) => "created".into(),
        Err(e) => e.to_string(),
    }
}

/// The traffic rule of these machines: the API server reaches the chart's webhooks through the
/// `qmesh-webhook` Service's *endpoints* (`--enable-aggregator-routing=true`), never by dialling its
/// ClusterIP. With no operator pod behind the Service, a Queue is refused because there are no
/// endpoints — nothing was dialled — not because a TLS handshake or a connection failed somewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_calls_go_to_service_endpoints_never_to_a_cluster_ip() {
    let server = KubeApiServer::start().await.unwrap();
    let chart = repo_root().join("charts/qmesh").display().to_string();
    // The chart's defaults: the validating webhook fails closed.
    ok(
        "helm install",
        server
            .helm([
                "install",
                "qmesh",
                &chart,
                "--namespace",
                "qmesh-system",
                "--create-namespace",
            ])
            .unwrap(),
    );
    // The Service got a ClusterIP from the non-private service range.
    let cluster_ip = ok(
        "get service",
        server
            .kubectl([
                "get",
                "service",
                "qmesh-webhook",
                "-n",
                "qmesh-system",
                "-o",
                "jsonpath={.spec.clusterIP}",
            ])
            .unwrap(),
    );
    let prefix = qmesh_tests::SERVICE_CIDR.trim_end_matches("0.0/16");
    assert!(
        cluster_ip.starts_with(prefix),
        "ClusterIP {cluster_ip} outside {}",
        qmesh_tests::SERVICE_CIDR
    );
    // What the endpoints controller writes for a Service whose pods are not ready: no addresses.
    let endpoints = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        endpoints.path(),
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: qmesh-webhook, namespace: qmesh-system}\nsubsets: []\n",
    )
    .unwrap();
    ok(
        "create endpoints",
        server
            .kubectl(["apply", "-f", &endpoints.path().display().to_string()])
            .unwrap(),
    );

    let queue = repo_root()
        .join("examples/orders.yaml")
        .display()
        .to_string();
    let refusal = wait_for(
        "the Queue to be refused by the webhook",
        Duration::from_secs(30),
        || {
            let out = server.kubectl(["apply", "-f", &queue]).unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            // Until the CRDs are served, apply fails for another reason: try again.
            async move { (!out.status.success() && stderr.contains("webhook")).then_some(stderr) }
        },
    )
    .await
    .unwrap();
    assert!(
        refusal.contains("validate.qmesh.io")
            && refusal.contains("no endpoints available for service \"qmesh-webhook\""),
        "expected a no-endpoints refusal: {refusal}"
    );
    for dialled in [
        "x509",
        "tls:",
        "i/o timeout",
        "deadline exceeded",
        "connection refused",
        "no route to host",
    ] {
        assert!(
            !refusal.to_lowercase().contains(dialled),
            "the API server dialled something ({dialled}): {refusal}"
        );
    }
    let stored = server
        .kubectl(["get", "queue", "orders", "-o", "name"])
        .unwrap();
    assert!(
        !stored.status.success(),
        "the refused Queue must not be stored"
    );

    // This API server (1.20) does not label namespaces with kubernetes.io/metadata.name, so the
    // injector's exclusions also go by `qmesh.io/inject=disabled`: a pod asking for injection in an
    // excluded namespace is not sent to the (unreachable, fail-closed) injector at all.
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: qmesh-system, labels: {{qmesh.io/inject: \"true\"}}}}\n\
             spec: {{containers: [{{name: app, image: app}}]}}\n"
        )
    };
    let manifest = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(manifest.path(), pod("before")).unwrap();
    let path = manifest.path().display().to_string();
    let refused = server.kubectl(["apply", "-f", &path]).unwrap();
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("inject.qmesh.io"),
        "an unlabelled namespace still goes to the injector: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    ok(
        "label the namespace",
        server
            .kubectl([
                "label",
                "namespace",
                "qmesh-system",
                "qmesh.io/inject=disabled",
            ])
            .unwrap(),
    );
    std::fs::write(manifest.path(), pod("after")).unwrap();
    ok(
        "a pod in an excluded namespace",
        server.kubectl(["apply", "-f", &path]).unwrap(),
    );
}
