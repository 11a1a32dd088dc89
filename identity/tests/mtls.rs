//! Mutual TLS between real sockets: who is let in, what the server learns, and rotation.

use std::{sync::Arc, time::Duration};

use qmesh_identity::{
    Authority, Credentials, Material, WorkloadId, authority::new_request, tls, transport,
};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt as _;

const DAY: Duration = Duration::from_secs(86_400);

fn id(name: &str) -> WorkloadId {
    WorkloadId {
        trust_domain: "qmesh.test".into(),
        namespace: "shop".into(),
        service_account: format!("{name}-sa"),
        sidecar: name.into(),
    }
}

async fn server(
    material: &Material,
) -> (
    std::net::SocketAddr,
    tokio_stream::wrappers::ReceiverStream<std::io::Result<transport::TlsConn>>,
    Arc<Credentials>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let creds = Credentials::new(material).expect("credentials");
    let c = Arc::clone(&creds);
    let incoming = transport::accept(listener, Arc::new(move || c.server()));
    (addr, incoming, creds)
}

/// Handshakes as a client with `config`, expecting the server to be `server_sidecar`.
async fn dial(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    server_sidecar: &str,
) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(qmesh_identity::sidecar_dns_name("shop", server_sidecar))
        .expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    // TLS 1.3: a refused client certificate shows on the first read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
        Ok(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

#[tokio::test]
async fn the_authority_signs_the_names_it_verified_not_the_ones_requested() {
    let ca = Authority::generate("qmesh.test", DAY, None).expect("ca");
    // A request asking to be "owner": the authority decides the names.
    let (_key, csr) = new_request("shop", "owner").expect("csr");
    let issued = ca.issue(&csr, &id("intruder"), DAY).expect("issue");
    let der = tls::certificates(&issued.chain_pem, "cert").expect("pem");
    let read = WorkloadId::from_certificate(&der[0]).expect("identity");
    assert_eq!(read, id("intruder"));
    assert_eq!(
        read.spiffe_id(),
        "spiffe://qmesh.test/ns/shop/sa/intruder-sa"
    );
    // Another trust domain is not this authority's to sign.
    let mut other = id("x");
    other.trust_domain = "evil.test".into();
    assert!(ca.issue(&csr, &other, DAY).is_err());
    // A request that does not parse is an error, not a panic.
    assert!(ca.issue(b"garbage", &id("x"), DAY).is_err());
    // A kept authority signs the same way.
    let again = Authority::from_pem("qmesh.test", ca.cert_pem(), ca.key_pem(), ca.bundle_pem())
        .expect("from pem");
    let issued = again.issue(&csr, &id("b"), DAY).expect("issue");
    assert!(issued.not_after > std::time::SystemTime::now() + DAY / 2);
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_mesh_ca_get_through() {
    let ca = Authority::generate("qmesh.test", DAY, None).expect("ca");
    let owner = ca.issue_material(&id("owner"), DAY).expect("owner");
    let (addr, mut incoming, _creds) = server(&owner).await;

    // A sidecar of the mesh: accepted, and the server learns who it is.
    let consumer = ca.issue_material(&id("consumer"), DAY).expect("consumer");
    dial(addr, tls::mesh_client(&consumer).expect("client"), "owner")
        .await
        .expect("a mesh client is accepted");
    let conn = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .expect("accepted in time")
        .expect("a connection")
        .expect("ok");
    let info = tonic::transport::server::Connected::connect_info(&conn);
    assert_eq!(info.identity.as_deref(), Some(&id("consumer")));

    // No certificate at all.
    let anonymous = tls::verifying_client(&owner.bundle_pem).expect("client");
    assert!(
        dial(addr, anonymous, "owner").await.is_err(),
        "no certificate must be refused"
    );
    // A certificate from another CA.
    let other = Authority::generate("qmesh.test", DAY, None).expect("other ca");
    let mut forged = other.issue_material(&id("consumer"), DAY).expect("forged");
    forged.bundle_pem = owner.bundle_pem.clone();
    assert!(
        dial(addr, tls::mesh_client(&forged).expect("client"), "owner")
            .await
            .is_err(),
        "a certificate from another CA must be refused"
    );
    // The client checks it reached the sidecar it meant: the owner is not "consumer".
    assert!(
        dial(
            addr,
            tls::mesh_client(&consumer).expect("client"),
            "consumer"
        )
        .await
        .is_err(),
        "a server with another sidecar's name must be refused"
    );
    // None of the refused ones reached the server.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), incoming.next())
            .await
            .is_err(),
        "refused handshakes yield no connection"
    );
}

#[tokio::test]
async fn a_rotated_root_is_trusted_next_to_the_old_one_until_the_old_is_dropped() {
    let old = Authority::generate("qmesh.test", DAY, None).expect("old ca");
    let owner = old.issue_material(&id("owner"), DAY).expect("owner");
    let (addr, mut incoming, creds) = server(&owner).await;
    let old_client = old.issue_material(&id("a"), DAY).expect("a");

    let new = Authority::generate("qmesh.test", DAY, Some(old.bundle_pem())).expect("new ca");
    let new_client = new.issue_material(&id("b"), DAY).expect("b");
    // Before the owner learns the new root, the new client is refused.
    assert!(
        dial(addr, tls::mesh_client(&new_client).expect("c"), "owner")
            .await
            .is_err()
    );
    // The owner renews from the new root; its bundle holds both.
    let renewed = new.issue_material(&id("owner"), DAY).expect("renewed");
    assert_eq!(
        tls::certificates(&renewed.bundle_pem, "b")
            .expect("b")
            .len(),
        2
    );
    creds.update(&renewed).expect("update");
    for client in [&old_client, &new_client] {
        let mut c = client.clone();
        c.bundle_pem = renewed.bundle_pem.clone();
        dial(addr, tls::mesh_client(&c).expect("c"), "owner")
            .await
            .expect("both roots are trusted during the overlap");
        incoming.next().await.expect("conn").expect("ok");
    }
}
