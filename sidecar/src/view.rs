//! The sidecar's current mesh view, and where it comes from: a local mesh file (computed with the
//! same `qmesh-core` code the operator runs, then converted with the same function) or the control
//! plane. Everything else reads it through a `watch` channel and keeps working on the last view if the
//! source goes away.
//!
//! ```text
//!   mesh file ──core::MeshFile──▶ core::view_for ──convert──┐
//!                                                           ├──▶ watch<Arc<View>> ──▶ owner, consumer, APIs
//!   control plane ──Join stream (reconnects)────────────────┘
//! ```

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use qmesh_core::{MeshFile, SidecarKey};
use qmesh_proto::control;
use tokio::sync::watch;

/// One complete view, indexed for lookups.
#[derive(Debug, Default)]
pub struct View {
    /// The wire form, as received or computed.
    pub wire: control::MeshView,
    queues: HashMap<String, usize>,
    subscriptions: HashMap<String, usize>,
    route_queue: HashMap<String, String>,
}

impl View {
    /// Indexes a wire view.
    pub fn new(wire: control::MeshView) -> Self {
        let queues = wire
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| (q.name.clone(), i))
            .collect();
        let subscriptions = wire
            .subscriptions
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let route_queue = wire
            .queues
            .iter()
            .flat_map(|q| {
                q.routes
                    .iter()
                    .map(move |r| (r.subscription.clone(), q.name.clone()))
            })
            .collect();
        Self {
            wire,
            queues,
            subscriptions,
            route_queue,
        }
    }

    /// The view's version.
    pub fn version(&self) -> u64 {
        self.wire.version
    }

    /// A queue this sidecar may own messages of.
    pub fn queue(&self, name: &str) -> Option<&control::QueueView> {
        self.queues.get(name).map(|&i| &self.wire.queues[i])
    }

    /// Whether `sidecar` may own messages of `queue` (its `HandOver` or `Replicate` of them is
    /// taken here), ready or not; false for a queue this sidecar may not own itself.
    pub fn may_own(&self, queue: &str, sidecar: &str) -> bool {
        self.queue(queue)
            .is_some_and(|q| q.owners.iter().any(|o| o == sidecar))
    }

    /// Whether `sidecar` may own messages of any queue this sidecar may own.
    pub fn shares_a_queue_with(&self, sidecar: &str) -> bool {
        self.wire
            .queues
            .iter()
            .any(|q| q.owners.iter().any(|o| o == sidecar))
    }

    /// Whether the namespace has a queue of this name that this sidecar may not publish to.
    pub fn is_foreign_queue(&self, name: &str) -> bool {
        self.wire.other_queues.iter().any(|q| q == name)
    }

    /// Queues this sidecar may own messages of.
    pub fn queues(&self) -> &[control::QueueView] {
        &self.wire.queues
    }

    /// A subscription served by this pod.
    pub fn subscription(&self, name: &str) -> Option<&control::ServedSubscription> {
        self.subscriptions
            .get(name)
            .map(|&i| &self.wire.subscriptions[i])
    }

    /// Subscriptions served by this pod.
    pub fn subscriptions(&self) -> &[control::ServedSubscription] {
        &self.wire.subscriptions
    }

    /// The owned queue that routes to this subscription.
    pub fn queue_of_route(&self, subscription: &str) -> Option<&str> {
        self.route_queue.get(subscription).map(String::as_str)
    }
}

/// Shared access to the current view.
pub type ViewRx = watch::Receiver<Arc<View>>;

/// Loads a mesh file and computes this sidecar's view, exactly as the operator would.
pub fn view_from_mesh_file(
    path: &Path,
    namespace: &str,
    name: &str,
    version: u64,
) -> anyhow::Result<View> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading mesh file {}: {e}", path.display()))?;
    let file =
        MeshFile::parse(&text).map_err(|e| anyhow::anyhow!("mesh file {}: {e}", path.display()))?;
    let state = file.to_state();
    let view = state
        .view_for(&SidecarKey::new(namespace, name))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "mesh file {} has no Sidecar document named {namespace}/{name}",
                path.display()
            )
        })?;
    Ok(View::new(qmesh_proto::convert::mesh_view(
        &view,
        version,
        SystemTime::now(),
    )))
}

/// Watches a mesh file and publishes a new view whenever its content changes.
pub async fn follow_mesh_file(
    path: PathBuf,
    namespace: String,
    name: String,
    tx: watch::Sender<Arc<View>>,
) {
    let mut last = std::fs::read(&path).ok();
    let mut version = tx.borrow().version();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        version += 1;
        match view_from_mesh_file(&path, &namespace, &name, version) {
            Ok(view) => {
                tracing::info!(version, file = %path.display(), "mesh file changed: new view");
                tx.send_replace(Arc::new(view));
            }
            Err(error) => {
                tracing::warn!(%error, "mesh file changed but is invalid; keeping the last view")
            }
        }
    }
}
