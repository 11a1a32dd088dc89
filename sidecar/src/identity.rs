//! This sidecar's identity on the peer port: its certificate (from `--identity-dir`, re-read when
//! the files change), and dialing peers with it. A peer is dialled by the name the view gives its
//! address, so the TLS handshake proves the far end is that sidecar — an address taken over by
//! someone else fails the handshake instead of receiving messages.
//!
//! ```text
//!   identity dir ──(poll)──▶ Credentials ──▶ peer server (client certificates required)
//!                                       └──▶ Dialer::connect(addr) ── server name from the view
//! ```

use std::{path::PathBuf, sync::Arc, time::Duration};

use qmesh_identity::{Credentials, Material, sidecar_dns_name, transport};
use tonic::transport::{Channel, Endpoint};

use crate::view::ViewRx;

/// How often the identity directory is checked for a renewed certificate.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Loads the certificate in `dir`.
pub fn load(dir: &std::path::Path) -> anyhow::Result<(Arc<Credentials>, Material)> {
    use anyhow::Context;
    let material = Material::read_from(dir)
        .with_context(|| format!("reading the sidecar certificate in {}", dir.display()))?;
    let credentials = Credentials::new(&material)
        .with_context(|| format!("using the sidecar certificate in {}", dir.display()))?;
    Ok((credentials, material))
}

/// Re-reads `dir` and applies a changed certificate or trust bundle to new connections.
pub async fn follow_dir(dir: PathBuf, credentials: Arc<Credentials>, mut current: Material) {
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let Ok(next) = Material::read_from(&dir) else {
            continue; // mid-update; the next look sees it whole
        };
        if next == current {
            continue;
        }
        match credentials.update(&next) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "sidecar certificate reloaded");
                current = next;
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "keeping the current certificate: the new one is unusable");
            }
        }
    }
}

/// Dials peers: mutual TLS with this sidecar's certificate, expecting the sidecar the view names
/// at the address.
pub struct Dialer {
    credentials: Option<Arc<Credentials>>,
    view: ViewRx,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// A dialer with `credentials` (plaintext without, where no identity is configured).
    pub fn new(credentials: Option<Arc<Credentials>>, view: ViewRx) -> Arc<Self> {
        Arc::new(Self { credentials, view })
    }

    /// Whether peers are dialled with mutual TLS.
    pub fn tls(&self) -> bool {
        self.credentials.is_some()
    }

    /// When the certificate in use expires (`None` without one).
    pub fn certificate_expiry(&self) -> Option<std::time::SystemTime> {
        self.credentials.as_ref().map(|c| c.not_after())
    }

    /// The name of the sidecar the view places at `addr`.
    pub fn name_at(&self, addr: &str) -> Option<String> {
        let view = self.view.borrow();
        let wire = &view.wire;
        wire.peers
            .iter()
            .chain(
                wire.queues
                    .iter()
                    .flat_map(|q| q.routes.iter().flat_map(|r| r.consumers.iter())),
            )
            .chain(wire.subscriptions.iter().flat_map(|s| s.owners.iter()))
            .find(|p| p.peer_address == addr)
            .map(|p| p.name.clone())
    }

    /// A connected channel to the peer at `addr` (`name` if known, else looked up in the view),
    /// with `endpoint`'s settings.
    pub async fn connect(
        &self,
        endpoint: Endpoint,
        addr: &str,
        name: Option<&str>,
    ) -> anyhow::Result<Channel> {
        let Some(credentials) = &self.credentials else {
            return Ok(endpoint.connect().await?);
        };
        let name = match name {
            Some(n) => n.to_owned(),
            None => self
                .name_at(addr)
                .ok_or_else(|| anyhow::anyhow!("no sidecar in the view listens at {addr}"))?,
        };
        let namespace = self.view.borrow().wire.namespace.clone();
        let credentials = Arc::clone(credentials);
        let channel = transport::connect(
            &endpoint,
            Arc::new(move || credentials.client()),
            &sidecar_dns_name(&namespace, &name),
        )
        .await?;
        Ok(channel)
    }
}
