//! Golden files of the injected pod: the webhook's JSON patch applied to a handful of input pods,
//! rendered as YAML. `UPDATE_GOLDEN=1` rewrites them after a reviewed change.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use qmesh_operator::webhook::{SidecarTemplate, decide_injection};

fn template(native: bool) -> SidecarTemplate {
    SidecarTemplate {
        image: "ghcr.io/qmesh/qmesh-sidecar:0.1.0".into(),
        cpu_request: "50m".into(),
        cpu_limit: None,
        memory_request: "32Mi".into(),
        memory_limit: "128Mi".into(),
        log_level: "info".into(),
        data_size: "1Gi".into(),
        control_plane: "qmesh-control.qmesh-system.svc:7443".into(),
        trust_bundle: "-----BEGIN CERTIFICATE-----\n(the mesh CA)\n-----END CERTIFICATE-----\n"
            .into(),
        native,
    }
}

fn pod(extra: serde_json::Value) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "shop", "namespace": "shop", "labels": {"app": "shop"}},
        "spec": {"containers": [{"name": "app", "image": "example.com/shop:1", "env": [{"name": "MODE", "value": "prod"}]}]}
    });
    json_merge(&mut pod, extra);
    pod
}

fn json_merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                json_merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// Runs the admission decision and applies its patch (if any) to the pod.
fn admit(pod: serde_json::Value, native: bool) -> (serde_json::Value, Vec<String>) {
    let review: AdmissionReview<Pod> = serde_json::from_value(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "shop", "namespace": "shop", "operation": "CREATE",
            "userInfo": {}, "object": pod.clone(), "dryRun": false
        }
    }))
    .unwrap();
    let request: AdmissionRequest<Pod> = review.try_into().unwrap();
    let response = decide_injection(&request, &template(native));
    assert!(response.allowed, "injection never refuses a pod");
    let mut out = pod;
    if let Some(patch) = &response.patch {
        let patch: json_patch::Patch = serde_json::from_slice(patch).unwrap();
        json_patch::patch(&mut out, &patch).unwrap();
    }
    (out, response.warnings.unwrap_or_default())
}

fn check(name: &str, value: &serde_json::Value) {
    let rendered = serde_yaml::to_string(value).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.yaml"));
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        rendered == expected,
        "injected pod {name} differs from {}:\n{rendered}\nreview it, then UPDATE_GOLDEN=1 cargo nextest run -p qmesh-operator --test injection_golden",
        path.display()
    );
}

#[test]
fn a_plain_pod_gets_the_sidecar_as_a_regular_container_before_1_29() {
    let (out, warnings) = admit(pod(serde_json::json!({})), false);
    assert!(warnings.is_empty());
    check("plain", &out);
    // First, so the kubelet starts the app only once the postStart hook saw the sidecar ready.
    let containers = out["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers[0]["name"], "qmesh-sidecar");
    assert_eq!(
        containers[0]["lifecycle"]["postStart"]["exec"]["command"][1],
        "wait-ready"
    );
    assert_eq!(
        containers[0]["lifecycle"]["preStop"]["exec"]["command"][1],
        "drain"
    );
    assert_eq!(
        out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        containers[1]["name"]
    );
}

#[test]
fn on_1_29_and_later_the_sidecar_is_a_native_init_container() {
    let (out, _) = admit(pod(serde_json::json!({})), true);
    check("native", &out);
    let sidecar = &out["spec"]["initContainers"][0];
    assert_eq!(sidecar["restartPolicy"], "Always");
    // The app containers start once the sidecar's startup probe passes.
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 1);
}

#[test]
fn a_pod_may_ask_for_a_regular_sidecar_where_native_ones_exist() {
    let regular = pod(serde_json::json!({"metadata": {"annotations": {
        "qmesh.io/native-sidecar": "false"
    }}}));
    let (out, _) = admit(regular, true);
    assert!(out["spec"]["initContainers"].is_null(), "{out}");
    let containers = out["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers[0]["name"], "qmesh-sidecar");
    assert_eq!(
        containers[0]["lifecycle"]["preStop"]["exec"]["command"][1],
        "drain"
    );
}

#[test]
fn annotations_override_resources_and_log_level() {
    let annotated = pod(serde_json::json!({"metadata": {"annotations": {
        "qmesh.io/sidecar-cpu": "200m", "qmesh.io/sidecar-memory": "256Mi", "qmesh.io/log-level": "debug",
        "qmesh.io/data-size": "8Gi"
    }}}));
    let (out, _) = admit(annotated, false);
    check("annotations", &out);
    let sidecar = &out["spec"]["containers"][0];
    assert_eq!(sidecar["resources"]["requests"]["cpu"], "200m");
    assert_eq!(sidecar["resources"]["limits"]["memory"], "256Mi");
    // The data volume is sized from the annotation: the emptyDir's limit, the scheduler's request,
    // and the sidecar's disk budget (three quarters of it).
    assert_eq!(sidecar["resources"]["requests"]["ephemeral-storage"], "8Gi");
    let data = out["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "qmesh-data")
        .unwrap();
    assert_eq!(data["emptyDir"]["sizeLimit"], "8Gi");
    let env = sidecar["env"].as_array().unwrap();
    let value = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
    assert_eq!(
        value("QMESH_MAX_OWNED_BYTES").unwrap()["value"],
        ((8u64 << 30) / 4 * 3).to_string()
    );
    assert_eq!(
        value("QMESH_MEMORY_LIMIT").unwrap()["valueFrom"]["resourceFieldRef"]["resource"],
        "limits.memory"
    );
}

#[test]
fn apps_get_the_amqp_url_and_a_pod_may_move_or_turn_off_the_listener() {
    let env_of = |c: &serde_json::Value, name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_owned())
    };
    let (out, _) = admit(pod(serde_json::json!({})), false);
    let (sidecar, app) = (&out["spec"]["containers"][0], &out["spec"]["containers"][1]);
    assert_eq!(
        env_of(sidecar, "QMESH_AMQP_LISTEN").as_deref(),
        Some("127.0.0.1:5672")
    );
    assert_eq!(
        env_of(app, "QMESH_AMQP_URL").as_deref(),
        Some("amqp://guest:guest@127.0.0.1:5672/%2F")
    );
    for (value, listen, url) in [
        (
            "5673",
            "127.0.0.1:5673",
            Some("amqp://guest:guest@127.0.0.1:5673/%2F"),
        ),
        ("off", "off", None),
        (
            "not-a-port",
            "127.0.0.1:5672",
            Some("amqp://guest:guest@127.0.0.1:5672/%2F"),
        ),
    ] {
        let annotated = pod(serde_json::json!({"metadata": {"annotations": {
            "qmesh.io/amqp-port": value
        }}}));
        let (out, _) = admit(annotated, false);
        let (sidecar, app) = (&out["spec"]["containers"][0], &out["spec"]["containers"][1]);
        assert_eq!(
            env_of(sidecar, "QMESH_AMQP_LISTEN").as_deref(),
            Some(listen),
            "{value}"
        );
        assert_eq!(env_of(app, "QMESH_AMQP_URL").as_deref(), url, "{value}");
    }
}

#[test]
fn a_data_size_the_annotation_cannot_parse_falls_back_to_the_default() {
    let annotated = pod(serde_json::json!({"metadata": {"annotations": {
        "qmesh.io/data-size": "lots"
    }}}));
    let (out, _) = admit(annotated, false);
    let sidecar = &out["spec"]["containers"][0];
    assert_eq!(sidecar["resources"]["requests"]["ephemeral-storage"], "1Gi");
}

#[test]
fn already_injected_opted_out_and_host_network_pods_are_left_alone() {
    let (injected, _) = admit(pod(serde_json::json!({})), false);
    let (again, _) = admit(injected.clone(), false);
    assert_eq!(again, injected, "re-invocation changes nothing");
    let opted_out = pod(serde_json::json!({"metadata": {"labels": {"qmesh.io/inject": "false"}}}));
    assert_eq!(admit(opted_out.clone(), false).0, opted_out);
    let host = pod(serde_json::json!({"spec": {"hostNetwork": true}}));
    let (out, warnings) = admit(host.clone(), false);
    assert_eq!(out, host);
    assert!(warnings[0].contains("host network"), "{warnings:?}");
    check("host-network", &out);
}
