//! The operator's mesh CA rotates its root against a real API server: a next root joins the trust
//! bundle, then signs, then the old one leaves — each step an overlap (the certificate lifetime)
//! after the last, written to the Secret `qmesh-mesh-ca` — and the control plane stays reachable
//! over TLS with the bundle at every step.

#![allow(clippy::unwrap_used)]

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use operator_support::*;
use qmesh_tests::{KubeApiServer, wait_for};

fn text(secret: &Secret, key: &str) -> Option<String> {
    String::from_utf8(secret.data.as_ref()?.get(key)?.0.clone()).ok()
}

fn certs(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

/// Phases seen: (signing root, bundle size).
async fn wait_phase(
    secrets: &Api<Secret>,
    what: &str,
    check: impl Fn(&Secret) -> bool + Clone,
) -> Secret {
    wait_for(what, Duration::from_secs(60), || {
        let (secrets, check) = (secrets.clone(), check.clone());
        async move {
            let s = secrets.get(qmesh_operator::mesh_ca::SECRET).await.ok()?;
            check(&s).then_some(s)
        }
    })
    .await
    .unwrap()
}

async fn control_plane_answers(operator: &Operator, bundle: &str) {
    let channel = qmesh_identity::transport::connect_url(
        &format!("https://{}", operator.control_addr),
        Some(bundle),
        |e| e.connect_timeout(Duration::from_secs(3)),
    )
    .await;
    assert!(
        channel.is_ok(),
        "control plane not verifiable with the bundle: {channel:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_root_rotates_with_an_overlap_and_the_control_plane_stays_trusted() {
    let server = KubeApiServer::start().await.unwrap();
    install_crds(&server).await;
    let client = server.client();
    // A root of 16 s rotates when two overlaps are left (after 10 s); steps are 3 s (the certificate
    // lifetime) apart.
    let operator = Operator::start(client.clone(), "operator-0", |c| {
        c.insecure_skip_sidecar_auth = true;
        c.mesh_ca_validity = Duration::from_secs(16);
        c.certificate_ttl = Duration::from_secs(3);
    });
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let first = wait_phase(&secrets, "the mesh CA", |s| text(s, "tls.crt").is_some()).await;
    let old = text(&first, "tls.crt").unwrap();
    control_plane_answers(&operator, &text(&first, "ca.crt").unwrap()).await;

    // 1. A next root joins the bundle; the old one still signs.
    let one = wait_phase(&secrets, "a next root in the bundle", |s| {
        text(s, "next.crt").is_some()
    })
    .await;
    assert_eq!(text(&one, "tls.crt").unwrap(), old);
    assert_eq!(certs(&text(&one, "ca.crt").unwrap()), 2);
    let next = text(&one, "next.crt").unwrap();
    control_plane_answers(&operator, &text(&one, "ca.crt").unwrap()).await;

    // 2. The next root signs; the bundle still holds both.
    let two = wait_phase(&secrets, "the next root promoted", {
        let next = next.clone();
        move |s| text(s, "tls.crt").as_deref() == Some(&next)
    })
    .await;
    assert_eq!(certs(&text(&two, "ca.crt").unwrap()), 2);
    assert!(text(&two, "next.crt").is_none());
    // Holders of the old bundle only still reach the control plane until its serving certificate
    // is re-issued; with the bundle of step 1 they always do.
    control_plane_answers(&operator, &text(&one, "ca.crt").unwrap()).await;

    // 3. The old root leaves the bundle.
    let three = wait_phase(&secrets, "the old root retired", {
        let next = next.clone();
        move |s| text(s, "ca.crt").as_deref() == Some(next.as_str())
    })
    .await;
    assert!(!text(&three, "ca.crt").unwrap().contains(old.trim()));
    // The control plane now serves from the new root alone.
    wait_for(
        "the control plane served from the new root",
        Duration::from_secs(20),
        || {
            let (addr, next) = (operator.control_addr, next.clone());
            async move {
                qmesh_identity::transport::connect_url(
                    &format!("https://{addr}"),
                    Some(&next),
                    |e| e,
                )
                .await
                .ok()
            }
        },
    )
    .await
    .unwrap();
    operator.stop().await;
}
