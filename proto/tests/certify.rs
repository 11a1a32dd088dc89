//! `Certify` over a TLS control plane: a sidecar that verifies the control plane gets a certificate
//! for its own key with the identity the source verified (not the names it asked for); a refused
//! identity gets PERMISSION_DENIED; a client that does not trust the control plane's CA cannot
//! connect, and neither can one speaking plaintext.

#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use qmesh_core::{MeshView, SidecarKey};
use qmesh_identity::{Authority, SharedAuthority, WorkloadId, authority::new_request, tls};
use qmesh_proto::{
    control::{CertifyRequest, Hello, Stats, control_client::ControlClient},
    join::{ControlService, MeshSource},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Admits pods of namespace `shop` whose token is `good`, as service account `orders`.
struct Source(watch::Sender<u64>);

#[tonic::async_trait]
impl MeshSource for Source {
    async fn admit(&self, _hello: &Hello, _session: u64) -> Result<(), String> {
        Err("not in this test".into())
    }
    async fn service_account(&self, hello: &Hello) -> Result<String, String> {
        if hello.token == "good" && hello.namespace == "shop" {
            Ok("orders".into())
        } else {
            Err(format!(
                "token of {}/{} not valid",
                hello.namespace, hello.name
            ))
        }
    }
    fn view_for(&self, _key: &SidecarKey) -> Option<MeshView> {
        None
    }
    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
    fn record_stats(&self, _key: &SidecarKey, _session: u64, _stats: Stats) {}
    fn left(&self, _key: &SidecarKey, _session: u64) {}
}

fn hello(name: &str, token: &str) -> Hello {
    Hello {
        namespace: "shop".into(),
        name: name.into(),
        token: token.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_verified_sidecar_gets_its_identity_signed_and_nobody_else_does() {
    let ca = Authority::generate("cluster.local", Duration::from_secs(86_400), None).unwrap();
    let serving = ca
        .issue_server(
            &[],
            &["127.0.0.1".parse().unwrap()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let bundle = ca.bundle_pem().to_owned();
    let server_config = Arc::new(tls::plain_server(&serving).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let service = ControlService::new(Arc::new(Source(watch::channel(0).0)), shutdown.clone())
        .authority(SharedAuthority::new(ca), Duration::from_secs(3600))
        .tls(Arc::new(move || Arc::clone(&server_config)));
    tokio::spawn(service.serve(listener));

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let verifying = Arc::new(tls::verifying_client(&bundle).unwrap());
    let channel = qmesh_identity::transport::connect(
        &endpoint,
        Arc::new(move || Arc::clone(&verifying)),
        "127.0.0.1",
    )
    .await
    .unwrap();
    let mut client = ControlClient::new(channel);

    // The request asks for another sidecar's name; the certificate names the asker.
    let (_key, csr) = new_request("shop", "payments-0").unwrap();
    let certified = client
        .certify(CertifyRequest {
            hello: Some(hello("orders-0", "good")),
            csr: csr.clone().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        certified.spiffe_id,
        "spiffe://cluster.local/ns/shop/sa/orders"
    );
    let leaf = tls::certificates(&certified.certificate_chain, "leaf").unwrap();
    let id = WorkloadId::from_certificate(&leaf[0]).unwrap();
    assert_eq!(id.sidecar, "orders-0");
    assert_eq!(certified.trust_bundle, bundle);

    // A token the source refuses.
    let refused = client
        .certify(CertifyRequest {
            hello: Some(hello("orders-0", "stolen")),
            csr: csr.clone().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    // Garbage instead of a request, and an oversize one.
    for csr in [b"garbage".to_vec(), vec![0u8; 64 * 1024]] {
        let bad = client
            .certify(CertifyRequest {
                hello: Some(hello("orders-0", "good")),
                csr: csr.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    }

    // A client trusting another CA does not get through the handshake.
    let other = Authority::generate("cluster.local", Duration::from_secs(86_400), None).unwrap();
    let wrong = Arc::new(tls::verifying_client(other.bundle_pem()).unwrap());
    let failed = qmesh_identity::transport::connect(
        &endpoint,
        Arc::new(move || Arc::clone(&wrong)),
        "127.0.0.1",
    )
    .await;
    assert!(
        failed.is_err(),
        "a control plane of another CA must not be trusted"
    );
    // Plaintext gets no answer.
    let plain = async {
        let channel = endpoint.connect().await?;
        ControlClient::new(channel)
            .certify(CertifyRequest::default())
            .await
            .map_err(|s| anyhow_like(s.to_string()))?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), plain)
        .await
        .unwrap();
    assert!(answer.is_err(), "plaintext must not be served");
    shutdown.cancel();
}

fn anyhow_like(s: String) -> Box<dyn std::error::Error + Send + Sync> {
    s.into()
}
