//! Client of the control plane (`qmesh.control.v1.Control`): `Certify` first — a key made here,
//! signed for the identity the token proves, renewed at half-life — then `Join`: says who this
//! sidecar is, takes every view it is sent, and reports stats. It reconnects with backoff forever;
//! while the control plane is away the sidecar keeps serving its last view and certificate.
//!
//! The control plane may also ask, down the same stream, about the messages this sidecar holds
//! (`HeldCall`: browse, redrive, purge — mesh-wide dead-letter tools); each is answered with a
//! `HeldAnswer`, at most [`HELD_CALLS`] at once.
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
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::{Sidecar, error::BrokerError, view::View};

/// Held-message calls from the control plane answered at once; more are refused as busy.
pub const HELD_CALLS: usize = 4;
/// Largest answer sent up the `Join` stream: the control plane reads messages of up to 4 MiB, and
/// one answer too large would end the stream.
pub const MAX_ANSWER_BYTES: usize = 3 * 1024 * 1024;

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
    let calls = Arc::new(Semaphore::new(HELD_CALLS));
    let sidecar = sidecar.clone();
    let stats_sidecar = sidecar.clone();
    let reporter = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let current = stats_sidecar.borrow().clone();
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
                Some(control_update::Update::Held(call)) => {
                    answer_held(call, sidecar.borrow().clone(), &calls, tx.clone());
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

/// Answers `call` on a task of its own, so views keep flowing meanwhile.
fn answer_held(
    call: control::HeldCall,
    sidecar: Option<Arc<Sidecar>>,
    calls: &Arc<Semaphore>,
    tx: mpsc::Sender<SidecarReport>,
) {
    let permit = Arc::clone(calls).try_acquire_owned();
    tokio::spawn(async move {
        let refused = |error: BrokerError| control::HeldResponse {
            result: Some(control::held_response::Result::Error(error.to_proto())),
        };
        let response = match (sidecar, permit) {
            (None, _) => refused(BrokerError::ShuttingDown),
            (Some(_), Err(_)) => refused(BrokerError::Internal(format!(
                "{HELD_CALLS} held-message requests are being answered here already; retry shortly"
            ))),
            (Some(sidecar), Ok(_permit)) => {
                let mut response = sidecar.owner.held(call.request.unwrap_or_default()).await;
                fit(&mut response, MAX_ANSWER_BYTES);
                response
            }
        };
        let answer = SidecarReport {
            report: Some(sidecar_report::Report::Held(control::HeldAnswer {
                id: call.id,
                response: Some(response),
            })),
        };
        let _ = tx.send(answer).await;
    });
}

/// Keeps a browse answer within `limit` encoded bytes: the newest messages go first (`total`
/// still counts them), then a single remaining message's payload is cut (its `payload_bytes`
/// still says how large it is).
fn fit(response: &mut control::HeldResponse, limit: usize) {
    use prost::Message as _;
    let Some(control::held_response::Result::Browse(browsed)) = &mut response.result else {
        return;
    };
    while browsed.encoded_len() > limit && browsed.messages.len() > 1 {
        browsed.messages.pop();
    }
    let over = browsed.encoded_len().saturating_sub(limit);
    if over > 0
        && let Some(message) = browsed
            .messages
            .first_mut()
            .and_then(|h| h.message.as_mut())
    {
        let keep = message.payload.len().saturating_sub(over + 64);
        message.payload.truncate(keep);
    }
}

fn known_version(views: &watch::Sender<Arc<View>>) -> u64 {
    views.borrow().version()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use qmesh_proto::{
        control::{HeldResponse, held_response::Result as Answer},
        v1::{BrowseResponse, HeldMessage, Message},
    };

    use super::fit;

    fn held(payload: usize) -> HeldMessage {
        HeldMessage {
            sequence: 1,
            payload_bytes: payload as u64,
            message: Some(Message {
                id: "m".into(),
                payload: vec![7u8; payload].into(),
                ..Default::default()
            }),
            subscriptions: Vec::new(),
        }
    }

    fn browsed(response: &HeldResponse) -> &BrowseResponse {
        match &response.result {
            Some(Answer::Browse(b)) => b,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_browse_answer_is_cut_to_what_the_control_plane_relays() {
        let mut response = HeldResponse {
            result: Some(Answer::Browse(BrowseResponse {
                messages: (0..10).map(|_| held(1000)).collect(),
                total: 10,
            })),
        };
        fit(&mut response, 4500);
        let b = browsed(&response);
        assert!(b.encoded_len() <= 4500, "{}", b.encoded_len());
        assert_eq!(b.messages.len(), 4);
        assert_eq!(b.total, 10, "the total still counts every message");

        let mut one = HeldResponse {
            result: Some(Answer::Browse(BrowseResponse {
                messages: vec![held(10_000)],
                total: 1,
            })),
        };
        fit(&mut one, 4000);
        let b = browsed(&one);
        assert!(b.encoded_len() <= 4000, "{}", b.encoded_len());
        let first = &b.messages[0];
        assert!(first.message.as_ref().unwrap().payload.len() < 4000);
        assert_eq!(first.payload_bytes, 10_000, "the full size is still said");
    }
}
