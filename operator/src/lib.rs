//! The qmesh operator as a library: [`run`] starts everything one replica does, so tests run the
//! operator in-process against a real API server, and `main.rs` only parses flags and signals.
//!
//! ```text
//!                 ┌────────────── every replica ───────────────┐   ┌── the leader only ──┐
//!   API server ──▶│ watches ──▶ Index ──▶ control plane (gRPC) │──▶│ Queue controller     │──▶ status,
//!                 │                 └──▶ triggers ─────────────┼──▶│ Subscription ctrl.   │    finalizers,
//!                 │ metrics/health (HTTP)   Lease elector ─────┼──▶│ (started/stopped)    │    Events
//!                 └────────────────────────────────────────────┘   └──────────────────────┘
//! ```
//! The admission webhooks (`webhook::serve`) run beside this from `main.rs`, on every replica.

pub mod access;
pub mod config;
pub mod control;
pub mod controller;
pub mod index;
pub mod leader;
pub mod mesh_ca;
pub mod metrics;
pub mod scaler;
pub mod status;
mod watch;
pub mod webhook;

use std::sync::Arc;

use kube::Client;
use tokio::{net::TcpListener, sync::watch as channel, task::JoinSet};
use tokio_util::sync::CancellationToken;

pub use config::{Args, Config, LogFormat, WebhookConfig};

use crate::{
    control::{SidecarAuth, control_plane},
    controller::Context,
    index::Index,
    leader::Elector,
    metrics::Metrics,
};

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listen address could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control-plane server failed.
    #[error("control plane server: {0}")]
    Control(#[source] tonic::transport::Error),
    /// The metrics server failed.
    #[error("KEDA scaler server: {0}")]
    Scaler(#[source] tonic::transport::Error),
    #[error("metrics server: {0}")]
    Metrics(#[source] std::io::Error),
    /// The mesh CA could not be loaded or created.
    #[error("mesh CA: {0:#}")]
    MeshCa(#[source] anyhow::Error),
}

/// Label on the operator pod that currently leads. The control-plane Service selects it, so every
/// sidecar reports its stats to the one replica that writes status.
pub const LEADER_LABEL: &str = "qmesh.io/leader";

/// Keeps [`LEADER_LABEL`] on this replica's own pod in step with leadership. A patch that fails is
/// retried (backing off to 30 s) until it lands or leadership changes: without the label the
/// control-plane Service has no endpoint. Out of cluster (no such pod) the retries log at debug.
async fn mark_leader_pod(
    client: Client,
    namespace: String,
    pod: String,
    mut leader: channel::Receiver<bool>,
) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, Patch, PatchParams};
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    'state: loop {
        let leading = *leader.borrow_and_update();
        let value = if leading {
            serde_json::json!("true")
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
        let mut delay = std::time::Duration::from_millis(500);
        while let Err(error) = pods
            .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            if matches!(&error, kube::Error::Api(status) if status.is_not_found()) {
                tracing::debug!(%pod, "no operator pod to label yet (running out of cluster?)");
            } else {
                tracing::warn!(%error, %pod, leading, retry_in = ?delay, "could not label the operator pod; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                changed = leader.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue 'state;
                }
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(30));
        }
        if leader.changed().await.is_err() {
            return;
        }
    }
}

async fn bind(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

/// Runs one operator replica until `shutdown` is cancelled: index watches, control plane, metrics,
/// leader election, and — while leading — the controllers. Releases the Lease on the way out.
pub async fn run(config: Config, client: Client, shutdown: CancellationToken) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new());
    let index = Arc::new(Index::new());
    let metrics_listener = bind("metrics", config.metrics_addr).await?;
    let control_listener = bind("control plane", config.control_addr).await?;
    let scaler_listener = match config.scaler_addr {
        Some(addr) => Some(bind("KEDA scaler", addr).await?),
        None => None,
    };
    let auth = if config.insecure_skip_sidecar_auth {
        tracing::warn!(
            "--insecure-skip-sidecar-auth is set: sidecars are NOT authenticated; \
             any client reaching the control port can read every mesh view"
        );
        SidecarAuth::Insecure
    } else {
        SidecarAuth::TokenReview(client.clone())
    };
    tracing::info!(
        control = %config.control_addr,
        metrics = %config.metrics_addr,
        scaler = ?config.scaler_addr,
        identity = %config.identity,
        lease = %config.lease_name,
        "starting"
    );

    // The mesh CA signs sidecar certificates; the control plane is served with one of its own.
    let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    if !config.control_addr.ip().is_unspecified() {
        ips.push(config.control_addr.ip());
    }
    let ca = mesh_ca::MeshCa::start(
        client.clone(),
        &config.namespace,
        &config.trust_domain,
        mesh_ca::control_dns_names(&config.namespace),
        ips,
        mesh_ca::Rotation {
            root_validity: config.mesh_ca_validity,
            overlap: config.certificate_ttl,
        },
    )
    .await
    .map_err(Error::MeshCa)?;

    let (leader_tx, leader_rx) = channel::channel(false);
    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    tasks.spawn(
        watch::run(
            client.clone(),
            index.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .map_ok(),
    );
    tasks.spawn({
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        async move {
            metrics::serve(metrics_listener, metrics, shutdown)
                .await
                .map_err(Error::Metrics)
        }
    });
    tasks.spawn({
        let plane = control_plane(index.clone(), metrics.clone(), auth, shutdown.clone())
            .authority(Arc::clone(&ca.authority), config.certificate_ttl)
            .tls(ca.server_configs());
        async move { plane.serve(control_listener).await.map_err(Error::Control) }
    });
    if let Some(listener) = scaler_listener {
        let scaler = scaler::Scaler::new(index.clone(), shutdown.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(scaler.service())
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await
                .map_err(Error::Scaler)
        });
    }
    tasks.spawn({
        let (ca, shutdown) = (Arc::clone(&ca), shutdown.clone());
        let every = mesh_ca::check_interval(config.certificate_ttl);
        async move {
            tokio::select! {
                () = ca.maintain(every) => {}
                () = shutdown.cancelled() => {}
            }
        }
        .map_ok()
    });
    tasks.spawn({
        let publish =
            mesh_ca::publish_bundle(client.clone(), config.namespace.clone(), ca.bundle());
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                () = publish => {}
                () = shutdown.cancelled() => {}
            }
        }
        .map_ok()
    });
    tasks.spawn(
        Elector::new(
            client.clone(),
            &config.namespace,
            &config.lease_name,
            &config.identity,
            config.lease_duration,
        )
        .run(leader_tx, shutdown.clone())
        .map_ok(),
    );
    tasks.spawn(
        mark_leader_pod(
            client.clone(),
            config.namespace.clone(),
            config.identity.clone(),
            leader_rx.clone(),
        )
        .map_ok(),
    );
    tasks.spawn(lead(client, index, metrics, config, leader_rx, shutdown.clone()).map_ok());

    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = match joined {
            Ok(outcome) => outcome,
            Err(panic) => {
                tracing::error!(error = %panic, "operator task panicked");
                Ok(())
            }
        };
        if let Err(error) = outcome {
            tracing::error!(%error, "operator task failed; shutting down");
            shutdown.cancel();
            if result.is_ok() {
                result = Err(error);
            }
        } else if !shutdown.is_cancelled() {
            // Every task runs until shutdown; one ending early means the replica is unhealthy.
            tracing::error!("an operator task ended early; shutting down");
            shutdown.cancel();
        }
    }
    tracing::info!("stopped");
    result
}

/// Runs the controllers while this replica holds the Lease, and stops them when it loses it.
async fn lead(
    client: Client,
    index: Arc<Index>,
    metrics: Arc<Metrics>,
    config: Config,
    mut leader: channel::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        let leading = async { leader.wait_for(|l| *l).await.is_ok() };
        let leading = tokio::select! {
            leading = leading => leading,
            () = shutdown.cancelled() => false,
        };
        if !leading {
            return;
        }
        metrics.leader.set(1);
        // Reconciling from a partial index would report missing queues and release finalizers.
        tokio::select! {
            () = index.wait_synced() => {}
            () = shutdown.cancelled() => return,
        }
        tracing::info!("leading: starting the controllers");
        let ctx = Arc::new(Context::new(
            client.clone(),
            index.clone(),
            metrics.clone(),
            config.clone(),
        ));
        let lost = async { leader.wait_for(|l| !*l).await.is_ok() };
        tokio::select! {
            () = controller::run(ctx) => {}
            _ = lost => tracing::info!("lost the lease: stopping the controllers"),
            () = shutdown.cancelled() => {}
        }
        metrics.leader.set(0);
    }
}

/// Turns a task returning `()` into one returning `Ok(())`.
trait MapOk: std::future::Future<Output = ()> + Sized {
    fn map_ok(self) -> impl std::future::Future<Output = Result<(), Error>> + Send
    where
        Self: Send,
    {
        async move {
            self.await;
            Ok(())
        }
    }
}

impl<F: std::future::Future<Output = ()>> MapOk for F {}
