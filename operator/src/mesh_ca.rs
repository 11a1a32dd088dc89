//! The mesh CA: the root that signs every sidecar's certificate (`Control/Certify`) and the
//! control plane's serving certificate. It is kept in the Secret `qmesh-mesh-ca` of the operator's
//! namespace so every replica and restart signs with the same root; the first replica to start
//! creates it, the others read it. Replicas follow the Secret, so a root replaced there (with the
//! old one kept in `ca.crt` for the overlap) is taken up without a restart.
//!
//! The root rotates itself once 2/3 of its life has passed, in three steps a certificate lifetime
//! apart, so that every sidecar has renewed (and so learnt the new bundle) before anything depends
//! on it ([`next_step`]):
//!
//! ```text
//!   1. next root made: ca.crt = old + new, still signing with old      (qmesh.io/promote-at)
//!      (when 2/3 of the root's life has passed, or only two overlaps are left)
//!   2. promoted: signing with new, ca.crt = old + new                   (qmesh.io/retire-at)
//!   3. retired: ca.crt = new
//! ```
//!
//! ```text
//!   Secret qmesh-mesh-ca {tls.crt root, tls.key, ca.crt bundle} ──▶ SharedAuthority ──▶ Certify
//!                                                              ├──▶ control-plane TLS (serving cert)
//!                                                              ├──▶ bundle ──▶ injected QMESH_TRUST_BUNDLE
//!                                                              └──▶ ConfigMap qmesh-trust-bundle
//! ```
//!
//! The bundle is public: it is published in the ConfigMap `qmesh-trust-bundle` (key `ca.crt`),
//! which the chart lets every authenticated user read, so clients outside the cluster
//! (`qmesh console`, `qmesh get --kubeconfig`) verify the control plane with it — as Istio's
//! `istio-ca-root-cert` ConfigMap serves its mesh.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use qmesh_identity::{Authority, SharedAuthority, tls, transport::ServerConfigs};
use rustls::ServerConfig;
use tokio::sync::watch;

/// The Secret holding the root.
pub const SECRET: &str = "qmesh-mesh-ca";
/// The ConfigMap the trust bundle is published in.
pub const BUNDLE_CONFIG_MAP: &str = "qmesh-trust-bundle";
/// Lifetime of a root the operator makes.
const ROOT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Lifetime of the control plane's serving certificate (re-issued at half-life).
const SERVING_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// How the root is kept fresh.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    /// Lifetime of a new root.
    pub root_validity: Duration,
    /// Time between the rotation's steps: at least a sidecar certificate's lifetime.
    pub overlap: Duration,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            root_validity: ROOT_VALIDITY,
            overlap: qmesh_identity::CERTIFICATE_TTL,
        }
    }
}

const PROMOTE_AT: &str = "qmesh.io/promote-at";
const RETIRE_AT: &str = "qmesh.io/retire-at";

/// The rotation's state, as the Secret keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootState {
    /// The root signing now (PEM) and its key.
    pub signing: (String, String),
    /// The next root during step 1.
    pub next: Option<(String, String)>,
    /// Every root to trust (`ca.crt`).
    pub bundle: String,
    /// When the next root starts signing (unix seconds).
    pub promote_at: Option<u64>,
    /// When the previous root leaves the bundle (unix seconds).
    pub retire_at: Option<u64>,
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn join_pem(a: &str, b: &str) -> String {
    format!("{}\n{}", a.trim_end(), b)
}

/// What the rotation does at `now`, if anything is due.
pub fn next_step(
    state: &RootState,
    now: std::time::SystemTime,
    rotation: Rotation,
    trust_domain: &str,
) -> anyhow::Result<Option<RootState>> {
    let t = unix(now);
    let overlap = rotation.overlap.as_secs();
    // 3. The previous root's certificates have all expired: it leaves the bundle.
    if let Some(at) = state.retire_at
        && t >= at
    {
        return Ok(Some(RootState {
            bundle: state.signing.0.clone(),
            retire_at: None,
            ..state.clone()
        }));
    }
    // 2. Everyone has had time to learn the next root: it signs from now on.
    if let (Some(next), Some(at)) = (&state.next, state.promote_at)
        && t >= at
    {
        return Ok(Some(RootState {
            signing: next.clone(),
            next: None,
            bundle: join_pem(&state.signing.0, &next.0),
            promote_at: None,
            retire_at: Some(t + overlap),
        }));
    }
    // 1. Two thirds of the root's life have passed (or only the two overlaps the rotation takes
    // are left): a next root joins the bundle.
    if state.next.is_none() && state.retire_at.is_none() {
        let (born, dies) = qmesh_identity::authority::validity(state.signing.0.as_bytes())?;
        let life = dies.duration_since(born).unwrap_or_default();
        let lead = (life / 3).max(rotation.overlap * 2);
        if now + lead >= dies {
            let next = Authority::generate(trust_domain, rotation.root_validity, None)?;
            return Ok(Some(RootState {
                next: Some((next.cert_pem().to_owned(), next.key_pem().to_owned())),
                bundle: join_pem(&state.signing.0, next.cert_pem()),
                promote_at: Some(t + overlap),
                ..state.clone()
            }));
        }
    }
    Ok(None)
}

impl RootState {
    fn from_secret(secret: &Secret) -> anyhow::Result<Self> {
        let (Some(cert), Some(key)) = (text(secret, "tls.crt"), text(secret, "tls.key")) else {
            anyhow::bail!("Secret {SECRET} lacks tls.crt or tls.key");
        };
        let annotation = |k: &str| {
            secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .and_then(|v| v.parse().ok())
        };
        Ok(Self {
            bundle: text(secret, "ca.crt").unwrap_or_else(|| cert.clone()),
            next: text(secret, "next.crt").zip(text(secret, "next.key")),
            signing: (cert, key),
            promote_at: annotation(PROMOTE_AT),
            retire_at: annotation(RETIRE_AT),
        })
    }

    /// Writes this state into `secret` (keeping its metadata, for a guarded replace).
    fn write_into(&self, secret: &mut Secret) {
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        let mut data = BTreeMap::from([
            ("tls.crt".to_owned(), bytes(&self.signing.0)),
            ("tls.key".to_owned(), bytes(&self.signing.1)),
            ("ca.crt".to_owned(), bytes(&self.bundle)),
        ]);
        if let Some((cert, key)) = &self.next {
            data.insert("next.crt".into(), bytes(cert));
            data.insert("next.key".into(), bytes(key));
        }
        secret.data = Some(data);
        let annotations = secret
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new);
        for (k, v) in [(PROMOTE_AT, self.promote_at), (RETIRE_AT, self.retire_at)] {
            match v {
                Some(v) => annotations.insert(k.to_owned(), v.to_string()),
                None => annotations.remove(k),
            };
        }
    }
}

/// The mesh CA as one replica uses it.
pub struct MeshCa {
    /// Signs sidecar certificates.
    pub authority: Arc<SharedAuthority>,
    rotation: Rotation,
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
    validity: Duration,
) -> anyhow::Result<Authority> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(secret) = secrets.get_opt(SECRET).await? {
        return from_secret(&secret, trust_domain);
    }
    let fresh = Authority::generate(trust_domain, validity, None)?;
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
        rotation: Rotation,
    ) -> anyhow::Result<Arc<Self>> {
        let authority =
            load_or_create(&client, namespace, trust_domain, rotation.root_validity).await?;
        let serving = Self::serving_for(&authority, &dns_names, &ips)?;
        let (bundle, _) = watch::channel(authority.bundle_pem().to_owned());
        Ok(Arc::new(Self {
            authority: SharedAuthority::new(authority),
            rotation,
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
        let mut secret = secrets.get(SECRET).await?;
        // A rotation step that is due: written guarded by resourceVersion, so of replicas acting at
        // once one wins and the others read its result next time.
        let state = RootState::from_secret(&secret)?;
        if let Some(next) = next_step(
            &state,
            std::time::SystemTime::now(),
            self.rotation,
            current.trust_domain(),
        )? {
            next.write_into(&mut secret);
            match secrets
                .replace(SECRET, &PostParams::default(), &secret)
                .await
            {
                Ok(written) => {
                    tracing::info!(
                        promote_at = ?next.promote_at,
                        retire_at = ?next.retire_at,
                        "mesh CA rotation step"
                    );
                    secret = written;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => secret = secrets.get(SECRET).await?,
                Err(e) => return Err(e).context("writing the mesh CA rotation"),
            }
        }
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

/// Keeps the ConfigMap [`BUNDLE_CONFIG_MAP`] of `namespace` holding the trust bundle (`ca.crt`) as
/// it changes, until `bundle`'s sender is gone. A failed write is retried with backoff (at most a
/// minute apart); a newer bundle replaces one still being written.
pub async fn publish_bundle(
    client: Client,
    namespace: String,
    mut bundle: watch::Receiver<String>,
) {
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    loop {
        let pem = bundle.borrow_and_update().clone();
        let mut backoff = Duration::from_secs(1);
        loop {
            let config_map = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": BUNDLE_CONFIG_MAP,
                    "labels": {"app.kubernetes.io/managed-by": "qmesh-operator"},
                },
                "data": {"ca.crt": pem},
            });
            let params = PatchParams::apply("qmesh-operator").force();
            match api
                .patch(BUNDLE_CONFIG_MAP, &params, &Patch::Apply(&config_map))
                .await
            {
                Ok(_) => {
                    tracing::debug!(config_map = BUNDLE_CONFIG_MAP, "trust bundle published");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, config_map = BUNDLE_CONFIG_MAP, "cannot publish the trust bundle; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
            if bundle.has_changed().unwrap_or(false) {
                break;
            }
        }
        if bundle.changed().await.is_err() {
            return;
        }
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
    let first = load_or_create(&client, &namespace, &trust_domain, ROOT_VALIDITY).await?;
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

/// How often a replica looks at the Secret: every minute, or a quarter of the rotation's overlap
/// when certificates live shorter than four minutes.
pub fn check_interval(certificate_ttl: Duration) -> Duration {
    (certificate_ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(60))
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn count(bundle: &str) -> usize {
        bundle.matches("BEGIN CERTIFICATE").count()
    }

    #[test]
    fn the_root_rotates_in_three_steps_an_overlap_apart() {
        let rotation = Rotation {
            root_validity: Duration::from_secs(900),
            overlap: Duration::from_secs(60),
        };
        let old = Authority::generate("cluster.local", rotation.root_validity, None).unwrap();
        let state = RootState {
            signing: (old.cert_pem().to_owned(), old.key_pem().to_owned()),
            next: None,
            bundle: old.bundle_pem().to_owned(),
            promote_at: None,
            retire_at: None,
        };
        let (born, dies) = qmesh_identity::authority::validity(old.cert_pem().as_bytes()).unwrap();
        let life = dies.duration_since(born).unwrap();
        let step =
            |s: &RootState, at: SystemTime| next_step(s, at, rotation, "cluster.local").unwrap();

        // Young: nothing to do.
        assert_eq!(step(&state, born + life / 2), None);
        // 1. Past 2/3: a next root joins the bundle; the old one still signs.
        let at = born + life * 2 / 3 + Duration::from_secs(1);
        let one = step(&state, at).expect("rotation starts");
        assert_eq!(one.signing, state.signing);
        assert_eq!(count(&one.bundle), 2);
        let next = one.next.clone().unwrap();
        assert_eq!(one.promote_at, Some(unix(at) + 60));
        assert_eq!(
            step(&one, at + Duration::from_secs(30)),
            None,
            "waits the overlap"
        );
        // 2. After the overlap the next root signs; the bundle keeps both.
        let at = at + Duration::from_secs(60);
        let two = step(&one, at).expect("promotion");
        assert_eq!(two.signing, next);
        assert_eq!((two.next.as_ref(), count(&two.bundle)), (None, 2));
        assert_eq!(
            step(&two, at + Duration::from_secs(30)),
            None,
            "waits the overlap"
        );
        // 3. After another overlap the old root leaves the bundle.
        let three = step(&two, at + Duration::from_secs(60)).expect("retirement");
        assert_eq!(three.bundle, next.0);
        assert_eq!(three.retire_at, None);
        // The promoted root signs: the kept state makes a working authority.
        let mut secret = Secret::default();
        three.write_into(&mut secret);
        let authority = from_secret(&secret, "cluster.local").unwrap();
        assert_eq!(authority.cert_pem(), next.0);
        assert!(secret.metadata.annotations.unwrap().is_empty());
        // And it rotates again in its own time: the new root is young now.
        assert_eq!(step(&three, SystemTime::now()), None);
    }
}
