//! Who a qmesh process is, and how it proves it: the shared floor for identities, used by the
//! operator (the mesh CA), the sidecar (its certificate, mutual TLS on every port between
//! processes) and the CLI (a local CA for `qmesh dev` / `run` / `demo`).
//!
//! ```text
//!   sidecar: key + CSR ──(token, over server-verified TLS)──▶ control plane: Authority::issue
//!            ◀── certificate (SPIFFE ID + sidecar DNS name, 24 h) + trust bundle ──
//!   sidecar ══ mutual TLS (tls::Credentials, transport::{accept, connect}) ══ sidecar
//!            the server reads the client's WorkloadId from the certificate (PeerInfo);
//!            the client checks the server's certificate names the sidecar it dialled
//! ```

pub mod authority;
pub mod id;
pub mod tls;
pub mod transport;

pub use authority::{Authority, Issued, Material, SharedAuthority};
pub use id::{WorkloadId, sidecar_dns_name};
pub use tls::Credentials;
pub use transport::PeerInfo;

/// What can go wrong making, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen could not make or sign a certificate.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A PEM document did not parse.
    #[error("reading {what}: {reason}")]
    Pem {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A certificate or request does not carry a usable qmesh identity.
    #[error("{0}")]
    Identity(String),
}

/// Default lifetime of a sidecar certificate; it is renewed at half-life.
pub const CERTIFICATE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
