//! rustls configurations built from [`Material`], swappable while servers run: a renewed
//! certificate or a rotated trust bundle applies to the next handshake, and connections already
//! open keep going.
//!
//! - mesh server (peer port): requires a client certificate chaining to the bundle;
//! - mesh client: presents its certificate, and checks the server's names the sidecar it dialled;
//! - control-plane server: server-authenticated only (sidecars prove themselves with a token);
//! - control-plane client: verifies the control plane against the bundle.

use std::{
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::WebPkiServerVerifier,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::{Error, Material};

/// The crypto provider every qmesh TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses the certificates of a PEM bundle.
pub fn certificates(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            what,
            reason: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The roots of a trust bundle.
pub fn roots(bundle_pem: &str) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(bundle_pem, "the trust bundle")? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Pem {
        what: "the private key",
        reason: e.to_string(),
    })
}

const H2: &[u8] = b"h2";

/// A server configuration that requires clients to present a certificate from `material`'s bundle.
pub fn mesh_server(material: &Material) -> Result<ServerConfig, Error> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&material.bundle_pem)?, provider())
            .build()
            .map_err(|e| Error::Identity(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates(&material.chain_pem, "the certificate")?,
            key(&material.key_pem)?,
        )?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// A client configuration presenting `material`'s certificate and trusting its bundle.
pub fn mesh_client(material: &Material) -> Result<ClientConfig, Error> {
    let verifier =
        WebPkiServerVerifier::builder_with_provider(roots(&material.bundle_pem)?, provider())
            .build()
            .map_err(|e| Error::Identity(format!("server verifier: {e}")))?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(
            certificates(&material.chain_pem, "the certificate")?,
            key(&material.key_pem)?,
        )?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// A server configuration without client certificates (the control plane's join port).
pub fn plain_server(material: &Material) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            certificates(&material.chain_pem, "the certificate")?,
            key(&material.key_pem)?,
        )?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// A client configuration that verifies the server against `bundle_pem` and presents nothing.
pub fn verifying_client(bundle_pem: &str) -> Result<ClientConfig, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(bundle_pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// A sidecar's current mutual-TLS configurations, replaced whole when its certificate is renewed
/// or the trust bundle changes.
#[derive(Debug)]
pub struct Credentials {
    current: RwLock<Current>,
}

#[derive(Debug, Clone)]
struct Current {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    material: Material,
    not_after: SystemTime,
}

impl Credentials {
    /// Configurations from `material`.
    pub fn new(material: &Material) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self {
            current: RwLock::new(Self::build(material)?),
        }))
    }

    fn build(material: &Material) -> Result<Current, Error> {
        Ok(Current {
            server: Arc::new(mesh_server(material)?),
            client: Arc::new(mesh_client(material)?),
            material: material.clone(),
            not_after: crate::authority::not_after(material.chain_pem.as_bytes())?,
        })
    }

    /// Uses `material` for every handshake from now on; open connections are not touched.
    pub fn update(&self, material: &Material) -> Result<(), Error> {
        let next = Self::build(material)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server configuration for the next handshake.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.read().server
    }

    /// The client configuration for the next connection.
    pub fn client(&self) -> Arc<ClientConfig> {
        self.read().client
    }

    /// The material in use.
    pub fn material(&self) -> Material {
        self.read().material
    }

    /// When the certificate in use expires.
    pub fn not_after(&self) -> SystemTime {
        self.read().not_after
    }
}
