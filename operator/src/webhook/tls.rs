//! The webhook's TLS: a CA and serving certificate the operator makes itself (rcgen), kept in a
//! Secret so every replica and restart serves the same one, rotated before expiry, hot-swapped into
//! the running server, and trusted by the API server through the webhook configurations' `caBundle`.
//!
//! Rotation publishes the new CA next to the old one in `caBundle` first, then switches the serving
//! certificate, so the API server trusts the webhook at every moment.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1 as admission, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

const ISSUED_AT: &str = "qmesh.io/issued-at";
const VALID_SECONDS: &str = "qmesh.io/valid-seconds";

/// The certificate material kept in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    /// CA certificates (PEM), newest last; more than one during a rotation.
    pub ca_bundle: String,
    /// Serving certificate (PEM).
    pub cert: String,
    /// Serving key (PKCS#8 PEM).
    pub key: String,
    /// Unix seconds of issuance.
    pub issued_at: u64,
    /// Lifetime in seconds.
    pub valid_seconds: u64,
}

impl Material {
    /// A new CA and a serving certificate for `dns_names` (plus localhost and 127.0.0.1).
    pub fn issue(
        dns_names: &[String],
        validity: Duration,
        previous_ca: Option<&str>,
    ) -> anyhow::Result<Self> {
        let now = SystemTime::now();
        let not_after = now + validity + Duration::from_secs(3600);
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "qmesh webhook CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.not_before = (now - Duration::from_secs(300)).into();
        ca_params.not_after = not_after.into();
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into()?));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().cloned().unwrap_or_default(),
        );
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + validity).into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        // Keep the previous CA trusted for a rotation's overlap.
        let ca_bundle = match previous_ca.and_then(last_pem_block) {
            Some(old) => format!("{old}{}", ca_cert.pem()),
            None => ca_cert.pem(),
        };
        Ok(Self {
            ca_bundle,
            cert: cert.pem(),
            key: key.serialize_pem(),
            issued_at: now.duration_since(UNIX_EPOCH)?.as_secs(),
            valid_seconds: validity.as_secs(),
        })
    }

    /// Whether 2/3 of the lifetime has passed.
    pub fn due(&self, now: SystemTime) -> bool {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        now >= self.issued_at + self.valid_seconds * 2 / 3
    }

    /// The serving certificate as rustls wants it.
    pub fn certified_key(&self) -> anyhow::Result<Arc<CertifiedKey>> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert.as_bytes())
                .collect::<Result<_, _>>()
                .context("parsing the serving certificate")?;
        let key = PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from_pem_slice(self.key.as_bytes())
                .context("parsing the serving key")?,
        );
        let signing =
            rustls::crypto::ring::sign::any_supported_type(&key).context("unsupported key")?;
        Ok(Arc::new(CertifiedKey::new(certs, signing)))
    }

    fn to_secret(&self, name: &str, namespace: &str) -> Secret {
        let data = BTreeMap::from([
            (
                "ca.crt".to_owned(),
                ByteString(self.ca_bundle.clone().into_bytes()),
            ),
            (
                "tls.crt".to_owned(),
                ByteString(self.cert.clone().into_bytes()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(self.key.clone().into_bytes()),
            ),
        ]);
        let mut s = Secret {
            data: Some(data),
            type_: Some("kubernetes.io/tls".into()),
            ..Default::default()
        };
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some(namespace.into());
        s.metadata.annotations = Some(BTreeMap::from([
            (ISSUED_AT.to_owned(), self.issued_at.to_string()),
            (VALID_SECONDS.to_owned(), self.valid_seconds.to_string()),
        ]));
        s
    }

    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let annotations = secret.metadata.annotations.as_ref()?;
        Some(Self {
            ca_bundle: text("ca.crt")?,
            cert: text("tls.crt")?,
            key: text("tls.key")?,
            issued_at: annotations.get(ISSUED_AT)?.parse().ok()?,
            valid_seconds: annotations.get(VALID_SECONDS)?.parse().ok()?,
        })
    }
}

fn last_pem_block(bundle: &str) -> Option<String> {
    let start = bundle.rfind("-----BEGIN CERTIFICATE-----")?;
    Some(bundle[start..].trim_end().to_owned() + "\n")
}

/// The serving certificate, swappable while the server runs.
#[derive(Debug)]
pub struct Resolver(RwLock<Arc<CertifiedKey>>);

impl Resolver {
    /// A resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(key)))
    }

    /// Serves `key` from now on.
    pub fn swap(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

/// Keeps the Secret, the caBundles and the served certificate in step.
pub struct Manager {
    client: Client,
    namespace: String,
    secret: String,
    dns_names: Vec<String>,
    validity: Duration,
    webhooks: (String, String),
    /// The certificate being served.
    pub resolver: Arc<Resolver>,
    current: RwLock<Material>,
}

impl Manager {
    /// Loads the Secret (creating it if missing), patches the caBundles and starts serving it.
    pub async fn start(
        client: Client,
        namespace: &str,
        secret: &str,
        service: &str,
        validity: Duration,
        webhooks: (String, String),
    ) -> anyhow::Result<Arc<Self>> {
        let dns_names = vec![
            service.to_owned(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ];
        let material = load_or_create(&client, namespace, secret, &dns_names, validity).await?;
        let resolver = Resolver::new(material.certified_key()?);
        let manager = Arc::new(Self {
            client,
            namespace: namespace.into(),
            secret: secret.into(),
            dns_names,
            validity,
            webhooks,
            resolver,
            current: RwLock::new(material.clone()),
        });
        manager.patch_ca_bundles(&material.ca_bundle).await?;
        Ok(manager)
    }

    /// The material being served.
    pub fn current(&self) -> Material {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rotates now: new CA and certificate, caBundle = old + new CA, then the switch.
    pub async fn rotate_now(&self) -> anyhow::Result<()> {
        let old = self.current();
        let fresh = Material::issue(&self.dns_names, self.validity, Some(&old.ca_bundle))?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut secret = secrets.get(&self.secret).await?;
        let replacement = fresh.to_secret(&self.secret, &self.namespace);
        secret.data = replacement.data;
        secret.metadata.annotations = replacement.metadata.annotations;
        // resourceVersion-guarded: if another replica rotated first, take its material instead.
        let material = match secrets
            .replace(&self.secret, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => fresh,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Material::from_secret(&secrets.get(&self.secret).await?)
                    .context("unreadable TLS Secret")?
            }
            Err(e) => return Err(e.into()),
        };
        self.patch_ca_bundles(&material.ca_bundle).await?;
        self.resolver.swap(material.certified_key()?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = material;
        tracing::info!(secret = %self.secret, "rotated the webhook certificate");
        Ok(())
    }

    /// Follows the Secret (other replicas' rotations) and rotates when due, every `every`.
    pub async fn maintain(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
            if let Ok(secret) = secrets.get(&self.secret).await
                && let Some(material) = Material::from_secret(&secret)
                && material != self.current()
                && let Ok(key) = material.certified_key()
            {
                self.resolver.swap(key);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = material;
            }
            if self.current().due(SystemTime::now())
                && let Err(error) = self.rotate_now().await
            {
                tracing::warn!(%error, "certificate rotation failed; retrying later");
            }
        }
    }

    async fn patch_ca_bundles(&self, ca_bundle: &str) -> anyhow::Result<()> {
        let bundle = ByteString(ca_bundle.as_bytes().to_vec());
        let mutating: Api<admission::MutatingWebhookConfiguration> = Api::all(self.client.clone());
        if let Some(mut m) = mutating.get_opt(&self.webhooks.0).await? {
            for w in m.webhooks.iter_mut().flatten() {
                w.client_config.ca_bundle = Some(bundle.clone());
            }
            let patch = serde_json::json!({"webhooks": m.webhooks});
            mutating
                .patch(
                    &self.webhooks.0,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        let validating: Api<admission::ValidatingWebhookConfiguration> =
            Api::all(self.client.clone());
        if let Some(mut v) = validating.get_opt(&self.webhooks.1).await? {
            for w in v.webhooks.iter_mut().flatten() {
                w.client_config.ca_bundle = Some(bundle.clone());
            }
            let patch = serde_json::json!({"webhooks": v.webhooks});
            validating
                .patch(
                    &self.webhooks.1,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        Ok(())
    }
}

async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
    dns_names: &[String],
    validity: Duration,
) -> anyhow::Result<Material> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(secret) = secrets.get_opt(name).await?
        && let Some(material) = Material::from_secret(&secret)
    {
        return Ok(material);
    }
    let material = Material::issue(dns_names, validity, None)?;
    match secrets
        .create(&PostParams::default(), &material.to_secret(name, namespace))
        .await
    {
        Ok(_) => Ok(material),
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            Material::from_secret(&secrets.get(name).await?).context("unreadable TLS Secret")
        }
        Err(e) => Err(e.into()),
    }
}
