//! The mesh's certificate authority: a self-managed root (rotated with an overlap window, the old
//! root staying in the trust bundle until every certificate it signed has expired) that signs
//! short-lived workload certificates. The operator keeps one for the cluster; `qmesh dev` keeps one
//! for a local mesh; tests make one per mesh.
//!
//! A workload sends a certificate signing request for a key it made itself; the authority ignores
//! whatever names the request asks for and signs the names it verified ([`WorkloadId`]).

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};

use crate::{Error, WorkloadId};

/// How far back a certificate's `notBefore` is set, for clocks that are a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A certificate and the trust bundle to verify peers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The certificate (PEM), leaf first.
    pub chain_pem: String,
    /// Every root to trust now (PEM).
    pub bundle_pem: String,
    /// When the certificate expires.
    pub not_after: SystemTime,
}

/// Everything a process needs to speak mutual TLS: its certificate, its key and the roots.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The certificate (PEM), leaf first.
    pub chain_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
    /// Every root to trust (PEM).
    pub bundle_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").finish_non_exhaustive()
    }
}

/// The file names of [`Material`] in a directory.
pub const CERT_FILE: &str = "tls.crt";
/// See [`CERT_FILE`].
pub const KEY_FILE: &str = "tls.key";
/// See [`CERT_FILE`].
pub const BUNDLE_FILE: &str = "ca.crt";

impl Material {
    /// Writes `tls.crt`, `tls.key` and `ca.crt` into `dir` (each replaced whole, by a rename; the
    /// key readable by its owner only).
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, text, mode) in [
            (BUNDLE_FILE, &self.bundle_pem, 0o644),
            (KEY_FILE, &self.key_pem, 0o600),
            (CERT_FILE, &self.chain_pem, 0o644),
        ] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            }
            std::fs::rename(&tmp, dir.join(name))?;
        }
        Ok(())
    }

    /// Reads what [`Material::write_to`] wrote.
    pub fn read_from(dir: &Path) -> std::io::Result<Self> {
        let read = |name| std::fs::read_to_string(dir.join(name));
        Ok(Self {
            chain_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
            bundle_pem: read(BUNDLE_FILE)?,
        })
    }
}

/// A new private key (PKCS#8 PEM) and a certificate signing request for it (DER). The request
/// names the sidecar, but the authority decides what the certificate says.
pub fn new_request(namespace: &str, sidecar: &str) -> Result<(String, Vec<u8>), Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![crate::sidecar_dns_name(namespace, sidecar)])?;
    params.distinguished_name.push(
        DnType::CommonName,
        crate::sidecar_dns_name(namespace, sidecar),
    );
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// A certificate authority.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    bundle_pem: String,
    trust_domain: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new root for `trust_domain`, valid for `validity`. `previous_bundle` (a rotation) stays
    /// trusted next to it.
    pub fn generate(
        trust_domain: &str,
        validity: Duration,
        previous_bundle: Option<&str>,
    ) -> Result<Self, Error> {
        let now = SystemTime::now();
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(
            DnType::CommonName,
            format!("qmesh mesh CA ({trust_domain})"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "qmesh");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        // Back-dated for clocks a little behind, but never by much of a short-lived root's life.
        params.not_before = (now - CLOCK_SKEW.min(validity / 10)).into();
        params.not_after = (now + validity).into();
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let bundle_pem = match previous_bundle {
            Some(old) if !old.trim().is_empty() => {
                format!("{}\n{cert_pem}", old.trim_end())
            }
            _ => cert_pem.clone(),
        };
        Ok(Self {
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            cert_pem,
            bundle_pem,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// An authority kept earlier ([`Authority::cert_pem`], [`Authority::key_pem`],
    /// [`Authority::bundle_pem`]).
    pub fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let key_pem = key_pem.to_owned();
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem,
            bundle_pem: bundle_pem.to_owned(),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The root certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root's private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Every root to trust: this one, and during a rotation the previous ones.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The trust domain of the SPIFFE IDs it signs.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// When this root expires.
    pub fn not_after(&self) -> Result<SystemTime, Error> {
        not_after(self.cert_pem.as_bytes())
    }

    /// The workload identity `id` for the key in `csr_der`, valid for `ttl`. The request's own
    /// signature is checked (the requester holds the key); its names are ignored.
    pub fn issue(&self, csr_der: &[u8], id: &WorkloadId, ttl: Duration) -> Result<Issued, Error> {
        id.validate()?;
        if id.trust_domain != self.trust_domain {
            return Err(Error::Identity(format!(
                "trust domain {} is not this authority's ({})",
                id.trust_domain, self.trust_domain
            )));
        }
        let request = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr_der),
        )?;
        let params = workload_params(id, ttl)?;
        let cert = params.signed_by(&request.public_key, &self.issuer)?;
        Ok(Issued {
            chain_pem: cert.pem(),
            bundle_pem: self.bundle_pem.clone(),
            not_after: SystemTime::now() + ttl,
        })
    }

    /// The identity `id` with a key made here: for files handed to a process that cannot ask
    /// (a sidecar started from a mesh file).
    pub fn issue_material(&self, id: &WorkloadId, ttl: Duration) -> Result<Material, Error> {
        let (key, csr) = new_request(&id.namespace, &id.sidecar)?;
        let issued = self.issue(&csr, id, ttl)?;
        Ok(Material {
            chain_pem: issued.chain_pem,
            key_pem: key,
            bundle_pem: issued.bundle_pem,
        })
    }

    /// A serving certificate for a control plane reached at `dns_names` / `ips`.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<Material, Error> {
        let now = SystemTime::now();
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names
                .first()
                .cloned()
                .unwrap_or_else(|| "qmesh control plane".into()),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ttl).into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Material {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            bundle_pem: self.bundle_pem.clone(),
        })
    }
}

fn workload_params(id: &WorkloadId, ttl: Duration) -> Result<CertificateParams, Error> {
    let now = SystemTime::now();
    let mut params = CertificateParams::new(vec![id.dns_name()])?;
    params.subject_alt_names.push(SanType::URI(
        id.spiffe_id()
            .try_into()
            .map_err(|e| Error::Identity(format!("SPIFFE ID: {e}")))?,
    ));
    params
        .distinguished_name
        .push(DnType::CommonName, id.dns_name());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + ttl).into();
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// The `notAfter` of the first certificate in `pem`.
pub fn not_after(pem: &[u8]) -> Result<SystemTime, Error> {
    validity(pem).map(|(_, after)| after)
}

/// The `notBefore` and `notAfter` of the first certificate in `pem`.
pub fn validity(pem: &[u8]) -> Result<(SystemTime, SystemTime), Error> {
    let der = CertificateDer::from_pem_slice(pem).map_err(|e| Error::Pem {
        what: "a certificate",
        reason: e.to_string(),
    })?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::Identity(format!("the certificate does not parse: {e}")))?;
    let at =
        |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// An authority that may be replaced while in use (a rotation): signers take the current one.
#[derive(Debug)]
pub struct SharedAuthority(std::sync::RwLock<std::sync::Arc<Authority>>);

impl SharedAuthority {
    /// Shares `authority`.
    pub fn new(authority: Authority) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::RwLock::new(std::sync::Arc::new(authority))))
    }

    /// The authority signing now.
    pub fn current(&self) -> std::sync::Arc<Authority> {
        std::sync::Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Signs with `authority` from now on.
    pub fn replace(&self, authority: Authority) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(authority);
    }
}
