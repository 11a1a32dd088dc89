//! Client of the control plane (`qmesh.control.v1.Control/Join`): says who this sidecar is, takes
//! every view it is sent, and reports stats. It reconnects with backoff forever; while the control
//! plane is away the sidecar keeps serving its last view.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

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

/// Joins `endpoint` until the process ends, publishing views into `views`.
pub async fn follow(
    endpoint: String,
    identity: Identity,
    views: watch::Sender<Arc<View>>,
    sidecar: watch::Receiver<Option<Arc<Sidecar>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match join_once(&endpoint, &identity, &views, &sidecar).await {
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
    views: &watch::Sender<Arc<View>>,
    sidecar: &watch::Receiver<Option<Arc<Sidecar>>>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .connect()
        .await?;
    let mut client = ControlClient::new(channel);
    let token = match &identity.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading token {}: {e}", path.display()))?
            .trim()
            .to_owned(),
        None => String::new(),
    };
    let (tx, rx) = mpsc::channel(16);
    tx.send(SidecarReport {
        report: Some(sidecar_report::Report::Hello(control::Hello {
            namespace: identity.namespace.clone(),
            name: identity.name.clone(),
            token,
            peer_address: identity.peer_address.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            incarnation: identity.incarnation,
            known_view_version: known_version(views),
            labels: identity.labels.clone(),
        })),
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
