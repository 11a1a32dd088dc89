//! Client of the control plane (`qmesh.control.v1.Control`): `Certify` first — a key made here,
//! signed for the identity the token proves, renewed at half-life — then `Join`: says who this
//! sidecar is, takes every view it is sent, and reports stats. It reconnects with backoff forever;
//! while the control plane is away the sidecar keeps serving its last view and certificate.
//!
//! An `https://` control plane is verified against the trust bundle (`--trust-bundle`, then
//! whatever bundle the control plane hands out with each certificate).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use qmesh_identity::{Credentials, Material, transport};

use qmesh_proto::control::{
    self, SidecarReport, control_client::ControlClient, control_update, sidecar_report,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::{Sidecar, view::View};

/// Who this sidecar is, for `hello`.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Namespace.
    pub namespace: String,
    /// Pod (or local sidecar) name.
    pub name: String,
    /// Advertised peer address.
    pub peer_address: String,
    /// Token file (projected service-account token), re-read on every connect.
    pub token_file: Option<PathBuf>,
    /// Labels for a local control plane.
    pub labels: HashMap<String, String>,
    /// Process incarnation.
    pub incarnation: u64,
}

impl Identity {
    fn hello(&self, known_view_version: u64) -> anyhow::Result<control::Hello> {
        let token = match &self.token_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading token {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            None => String::new(),
        };
        Ok(control::Hello {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            token,
            peer_address: self.peer_address.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            incarnation: self.incarnation,
            known_view_version,
            labels: self.labels.clone(),
        })
    }
}

/// The roots the control plane's certificate must chain to: from `--trust-bundle` at first, then
/// the bundle handed out with each certificate (a CA rotation reaches the sidecar this way).
#[derive(Debug, Default)]
pub struct ControlTrust(RwLock<Option<String>>);

impl ControlTrust {
    /// Trusting `bundle` (PEM), if any.
    pub fn new(bundle: Option<String>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(bundle)))
    }

    fn get(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, bundle: &str) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(bundle.to_owned());
    }
}

/// A channel to the control plane: TLS verified against `trust` for `https://`, plaintext for
/// `http://`.
async fn channel(
    endpoint: &str,
    trust: &ControlTrust,
) -> anyhow::Result<tonic::transport::Channel> {
    let bundle = trust.get();
    Ok(transport::connect_url(endpoint, bundle.as_deref(), |e| {
        e.connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(15))
    })
    .await?)
}

/// A certificate for a new key from the control plane.
pub async fn certify(
    endpoint: &str,
    identity: &Identity,
    trust: &ControlTrust,
) -> anyhow::Result<Material> {
    let (key_pem, csr) =
        qmesh_identity::authority::new_request(&identity.namespace, &identity.name)?;
    let mut client = ControlClient::new(channel(endpoint, trust).await?);
    let certified = client
        .certify(control::CertifyRequest {
            hello: Some(identity.hello(0)?),
            csr: csr.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("the control plane refused a certificate: {}", s.message()))?
        .into_inner();
    let material = Material {
        chain_pem: certified.certificate_chain,
        key_pem,
        bundle_pem: certified.trust_bundle,
    };
    // Usable before anything else trusts it.
    Credentials::new(&material).context("the certificate the control plane issued is unusable")?;
    trust.set(&material.bundle_pem);
    tracing::info!(spiffe_id = %certified.spiffe_id, "certificate issued by the control plane");
    Ok(material)
}

/// Retries [`certify`] with backoff until it succeeds.
pub async fn first_certificate(
    endpoint: &str,
    identity: &Identity,
    trust: &ControlTrust,
) -> Material {
    let mut backoff = Duration::from_millis(100);
    loop {
        match certify(endpoint, identity, trust).await {
            Ok(material) => return material,
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), control_plane = %endpoint, "no certificate yet; the peer port waits for one")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Renews the certificate at half its remaining life, forever; a failed renewal is retried
/// while the current certificate still serves.
pub async fn renew(
    endpoint: String,
    identity: Identity,
    trust: Arc<ControlTrust>,
    credentials: Arc<Credentials>,
) {
    loop {
        let left = credentials
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep((left / 2).max(Duration::from_secs(1))).await;
        loop {
            match certify(&endpoint, &identity, &trust).await {
                Ok(material) => match credentials.update(&material) {
                    Ok(()) => {
                        tracing::info!("certificate renewed");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "a renewed certificate is unusable"),
                },
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "certificate renewal failed; retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

/// Joins `endpoint` until the process ends, publishing views into `views`.
pub async fn follow(
    endpoint: String,
    identity: Identity,
    trust: Arc<ControlTrust>,
    views: watch::Sender<Arc<View>>,
    sidecar: watch::Receiver<Option<Arc<Sidecar>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match join_once(&endpoint, &identity, &trust, &views, &sidecar).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                tracing::warn!(%error, control_plane = %endpoint, "control plane unavailable; keeping the last view")
            }
        }
        tokio::time::sleep(backoff + Duration::from_millis(rand::random::<u64>() % 100)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn join_once(
    endpoint: &str,
    identity: &Identity,
    trust: &ControlTrust,
    views: &watch::Sender<Arc<View>>,
    sidecar: &watch::Receiver<Option<Arc<Sidecar>>>,
) -> anyhow::Result<()> {
    let mut client = ControlClient::new(channel(endpoint, trust).await?);
    let (tx, rx) = mpsc::channel(16);
    tx.send(SidecarReport {
        report: Some(sidecar_report::Report::Hello(
            identity.hello(known_version(views))?,
        )),
    })
    .await?;
    let mut updates = client.join(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(control_plane = %endpoint, "joined the control plane");
    let stats_tx = tx.clone();
    let sidecar = sidecar.clone();
    let reporter = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let current = sidecar.borrow().clone();
            if let Some(s) = current {
                let report = SidecarReport {
                    report: Some(sidecar_report::Report::Stats(s.stats())),
                };
                if stats_tx.send(report).await.is_err() {
                    return;
                }
            }
        }
    });
    let result = async {
        while let Some(update) = updates.next().await {
            match update?.update {
                Some(control_update::Update::View(view)) => {
                    let version = view.version;
                    tracing::info!(version, "new mesh view");
                    views.send_replace(Arc::new(View::new(view)));
                    let _ = tx
                        .send(SidecarReport {
                            report: Some(sidecar_report::Report::Applied(control::ViewApplied {
                                version,
                            })),
                        })
                        .await;
                }
                Some(control_update::Update::Rejected(r)) => {
                    anyhow::bail!("control plane rejected this sidecar: {}", r.reason)
                }
                None => {}
            }
        }
        Ok(())
    }
    .await;
    reporter.abort();
    result
}

fn known_version(views: &watch::Sender<Arc<View>>) -> u64 {
    views.borrow().version()
}
