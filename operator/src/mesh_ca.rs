//! The mesh CA: the root that signs every sidecar's certificate (`Control/Certify`) and the
//! control plane's serving certificate. It is kept in the Secret `qmesh-mesh-ca` of the operator's
//! namespace so every replica and restart signs with the same root; the first replica to start
//! creates it, the others read it. Replicas follow the Secret, so a root replaced there (with the
//! old one kept in `ca.crt` for the overlap) is taken up without a restart.
//!
//! ```text
//!   Secret qmesh-mesh-ca {tls.crt root, tls.key, ca.crt bundle} ──▶ SharedAuthority ──▶ Certify
//!                                                              ├──▶ control-plane TLS (serving cert)
//!                                                              └──▶ bundle ──▶ injected QMESH_TRUST_BUNDLE
//! ```

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use qmesh_identity::{Authority, SharedAuthority, tls, transport::ServerConfigs};
use rustls::ServerConfig;
use tokio::sync::watch;

/// The Secret holding the root.
pub const SECRET: &str = "qmesh-mesh-ca";
/// Lifetime of a root the operator makes.
const ROOT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Lifetime of the control plane's serving certificate (re-issued at half-life).
const SERVING_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// The mesh CA as one replica uses it.
pub struct MeshCa {
    /// Signs sidecar certificates.
    pub authority: Arc<SharedAuthority>,
    bundle: watch::Sender<String>,
    serving: RwLock<(Arc<ServerConfig>, std::time::SystemTime)>,
    client: Client,
    namespace: String,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn from_secret(secret: &Secret, trust_domain: &str) -> anyhow::Result<Authority> {
    let (Some(cert), Some(key)) = (text(secret, "tls.crt"), text(secret, "tls.key")) else {
        anyhow::bail!("Secret {SECRET} lacks tls.crt or tls.key");
    };
    let bundle = text(secret, "ca.crt").unwrap_or_else(|| cert.clone());
    Ok(Authority::from_pem(trust_domain, &cert, &key, &bundle)?)
}

fn to_secret(authority: &Authority, namespace: &str) -> Secret {
    let data = BTreeMap::from([
        (
            "tls.crt".to_owned(),
            ByteString(authority.cert_pem().as_bytes().to_vec()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(authority.key_pem().as_bytes().to_vec()),
        ),
        (
            "ca.crt".to_owned(),
            ByteString(authority.bundle_pem().as_bytes().to_vec()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "qmesh".to_owned(),
            )])),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    }
}

/// The root in the Secret, made and stored first if there is none (a replica that loses the race
/// to create it reads the winner's).
async fn load_or_create(
    client: &Client,
    namespace: &str,
    trust_domain: &str,
) -> anyhow::Result<Authority> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(secret) = secrets.get_opt(SECRET).await? {
        return from_secret(&secret, trust_domain);
    }
    let fresh = Authority::generate(trust_domain, ROOT_VALIDITY, None)?;
    match secrets
        .create(&PostParams::default(), &to_secret(&fresh, namespace))
        .await
    {
        Ok(_) => {
            tracing::info!(secret = SECRET, %trust_domain, "created the mesh CA");
            Ok(fresh)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            from_secret(&secrets.get(SECRET).await?, trust_domain)
        }
        Err(e) => Err(e).context("creating the mesh CA Secret"),
    }
}

impl MeshCa {
    /// Loads (or creates) the root and a serving certificate for the control plane at
    /// `dns_names` / `ips`.
    pub async fn start(
        client: Client,
        namespace: &str,
        trust_domain: &str,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
    ) -> anyhow::Result<Arc<Self>> {
        let authority = load_or_create(&client, namespace, trust_domain).await?;
        let serving = Self::serving_for(&authority, &dns_names, &ips)?;
        let (bundle, _) = watch::channel(authority.bundle_pem().to_owned());
        Ok(Arc::new(Self {
            authority: SharedAuthority::new(authority),
            bundle,
            serving: RwLock::new(serving),
            client,
            namespace: namespace.to_owned(),
            dns_names,
            ips,
        }))
    }

    fn serving_for(
        authority: &Authority,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> anyhow::Result<(Arc<ServerConfig>, std::time::SystemTime)> {
        let material = authority.issue_server(dns_names, ips, SERVING_VALIDITY)?;
        let config = Arc::new(tls::plain_server(&material)?);
        Ok((config, std::time::SystemTime::now() + SERVING_VALIDITY / 2))
    }

    /// The trust bundle now, and its changes.
    pub fn bundle(&self) -> watch::Receiver<String> {
        self.bundle.subscribe()
    }

    /// The control plane's TLS configuration for each handshake.
    pub fn server_configs(self: &Arc<Self>) -> ServerConfigs {
        let this = Arc::clone(self);
        Arc::new(move || Arc::clone(&this.serving.read().unwrap_or_else(|e| e.into_inner()).0))
    }

    /// Follows the Secret (a root replaced there) and renews the serving certificate, every `every`.
    pub async fn maintain(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(error) = self.refresh().await {
                tracing::warn!(error = %format!("{error:#}"), "mesh CA refresh failed; keeping the current root");
            }
        }
    }

    async fn refresh(&self) -> anyhow::Result<()> {
        let current = self.authority.current();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret = secrets.get(SECRET).await?;
        let changed = text(&secret, "tls.crt").as_deref() != Some(current.cert_pem())
            || text(&secret, "ca.crt").as_deref() != Some(current.bundle_pem());
        let authority = if changed {
            let next = from_secret(&secret, current.trust_domain())?;
            tracing::info!(
                secret = SECRET,
                "the mesh CA changed; signing with the new root"
            );
            self.bundle.send_replace(next.bundle_pem().to_owned());
            self.authority.replace(next);
            self.authority.current()
        } else {
            current
        };
        let due = self.serving.read().unwrap_or_else(|e| e.into_inner()).1;
        if changed || std::time::SystemTime::now() >= due {
            let serving = Self::serving_for(&authority, &self.dns_names, &self.ips)?;
            *self.serving.write().unwrap_or_else(|e| e.into_inner()) = serving;
        }
        Ok(())
    }
}

/// The trust bundle in the Secret now and as it changes (polled every `every`), for the injector;
/// the Secret is created if no replica has yet.
pub async fn follow_bundle(
    client: Client,
    namespace: String,
    trust_domain: String,
    every: Duration,
) -> anyhow::Result<watch::Receiver<String>> {
    let first = load_or_create(&client, &namespace, &trust_domain).await?;
    let (tx, rx) = watch::channel(first.bundle_pem().to_owned());
    tokio::spawn(async move {
        let secrets: Api<Secret> = Api::namespaced(client, &namespace);
        loop {
            tokio::time::sleep(every).await;
            if let Ok(secret) = secrets.get(SECRET).await
                && let Some(bundle) = text(&secret, "ca.crt")
            {
                tx.send_if_modified(|b| {
                    let changed = *b != bundle;
                    if changed {
                        b.clone_from(&bundle);
                    }
                    changed
                });
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

/// The names the control plane is reached at: its Service in `namespace`, and `localhost`.
pub fn control_dns_names(namespace: &str) -> Vec<String> {
    vec![
        "qmesh-control".to_owned(),
        format!("qmesh-control.{namespace}"),
        format!("qmesh-control.{namespace}.svc"),
        format!("qmesh-control.{namespace}.svc.cluster.local"),
        "localhost".to_owned(),
    ]
}
