//! The server side of `qmesh.control.v1.Control`, shared by the operator and `qmesh dev`: one session
//! per `Join` stream over any [`MeshSource`] — the operator's index fed by Kubernetes watches, or a
//! local control plane fed by manifest files.
//!
//! ```text
//!   sidecar ──Hello{namespace,name,token,labels}──▶ MeshSource::admit (auth, registration)
//!           ◀──Rejected{reason}───────────────────── on failure, then the stream ends
//!           ◀──MeshView{version n}────────────────── at once, then whenever view_for(sidecar) changes
//!           ──Stats──────────────────────────────▶ MeshSource::record_stats
//!   stream closes / sidecar gone ──▶ MeshSource::left
//! ```
//! A view is sent only when it differs from the last one sent on this stream; versions increase per
//! stream, starting above the `known_view_version` the sidecar reports.
//!
//! `Certify` signs a sidecar's own key with the mesh CA ([`ControlService::authority`]) for the
//! identity [`MeshSource::service_account`] verified; with [`ControlService::tls`] the service
//! is served over TLS, which sidecars verify against the trust bundle.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::Stream;
use qmesh_core::{MeshView, SidecarKey};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use qmesh_identity::{SharedAuthority, WorkloadId, transport::ServerConfigs};

use crate::{
    control::{
        Certified, CertifyRequest, ControlUpdate, Hello, MeshStatus, Rejected, SidecarReport,
        Stats, StatusRequest,
        control_server::{Control, ControlServer},
        control_update::Update,
        sidecar_report::Report,
    },
    convert,
};

/// How long a sidecar may take to send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened on a session, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinEvent {
    /// A sidecar was refused.
    Rejected,
    /// A sidecar joined.
    Joined,
    /// A joined sidecar's stream ended.
    Left,
    /// A view was sent.
    ViewSent,
}

/// Where views come from and stats go: the operator's index, or a local control plane.
#[tonic::async_trait]
pub trait MeshSource: Send + Sync + 'static {
    /// Decides whether `hello` may join (and registers a self-announcing sidecar); may wait
    /// briefly, e.g. for the index to learn the pod. `Err` carries the reason sent in `Rejected`.
    async fn admit(&self, hello: &Hello, session: u64) -> Result<(), String>;

    /// The service account `hello` proves to run as, for its certificate (checked as `admit`
    /// checks, without registering anything). `Err` carries the reason the request is refused.
    async fn service_account(&self, hello: &Hello) -> Result<String, String>;

    /// The sidecar's current view; `None` once it is no longer part of the mesh.
    fn view_for(&self, key: &SidecarKey) -> Option<MeshView>;

    /// Bumped whenever a view may have changed.
    fn subscribe_changes(&self) -> watch::Receiver<u64>;

    /// The latest stats of a session.
    fn record_stats(&self, key: &SidecarKey, session: u64, stats: Stats);

    /// The session ended (its stats no longer count).
    fn left(&self, key: &SidecarKey, session: u64);

    /// A summary for `qmesh get` and the console; `caller` is the bearer token the request came
    /// with (`authorization: Bearer …`), for the source to authorize.
    async fn status(
        &self,
        _request: &StatusRequest,
        _caller: Option<&str>,
    ) -> Result<MeshStatus, Status> {
        Err(Status::unimplemented(
            "this control plane does not summarize the mesh; on Kubernetes use `kubectl get queues,subscriptions`",
        ))
    }

    /// Something worth counting happened.
    fn observe(&self, _event: JoinEvent) {}
}

/// The `Control` gRPC service over a [`MeshSource`].
pub struct ControlService<S> {
    source: Arc<S>,
    sessions: AtomicU64,
    shutdown: CancellationToken,
    /// Joins not yet admitted (waiting for `Hello`, or being authenticated).
    joining: Arc<Semaphore>,
    max_joining: usize,
    authority: Option<Arc<SharedAuthority>>,
    certificate_ttl: Duration,
    tls: Option<ServerConfigs>,
}

/// Largest certificate signing request accepted.
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Joins that may be in admission at once by default: a flood of connections that never say
/// `Hello`, or of tokens to review, waits its turn instead of piling up TokenReviews.
pub const MAX_JOINING: usize = 64;

impl<S> std::fmt::Debug for ControlService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlService").finish_non_exhaustive()
    }
}

// === impl ControlService ===

impl<S: MeshSource> ControlService<S> {
    /// A service over `source`; `shutdown` ends every open stream.
    pub fn new(source: Arc<S>, shutdown: CancellationToken) -> Self {
        Self {
            source,
            sessions: AtomicU64::new(1),
            shutdown,
            joining: Arc::new(Semaphore::new(MAX_JOINING)),
            max_joining: MAX_JOINING,
            authority: None,
            certificate_ttl: qmesh_identity::CERTIFICATE_TTL,
            tls: None,
        }
    }

    /// Signs sidecar certificates with `authority`, valid for `ttl`.
    pub fn authority(mut self, authority: Arc<SharedAuthority>, ttl: Duration) -> Self {
        self.authority = Some(authority);
        self.certificate_ttl = ttl;
        self
    }

    /// Serves over TLS with the configuration `configs` gives at each handshake.
    pub fn tls(mut self, configs: ServerConfigs) -> Self {
        self.tls = Some(configs);
        self
    }

    /// At most `max` joins in admission at once; more are refused with `RESOURCE_EXHAUSTED` (the
    /// sidecar retries with backoff). Joined sidecars do not count.
    pub fn max_joining(mut self, max: usize) -> Self {
        self.joining = Arc::new(Semaphore::new(max));
        self.max_joining = max;
        self
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
    ) -> Result<(), tonic::transport::Error> {
        let shutdown = self.shutdown.clone();
        let tls = self.tls.clone();
        let router = tonic::transport::Server::builder().add_service(ControlServer::new(self));
        match tls {
            Some(configs) => {
                router
                    .serve_with_incoming_shutdown(
                        qmesh_identity::transport::accept(listener, configs),
                        shutdown.cancelled_owned(),
                    )
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(listener),
                        shutdown.cancelled_owned(),
                    )
                    .await
            }
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ControlUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl<S: MeshSource> Control for ControlService<S> {
    type JoinStream = UpdateStream;

    async fn join(
        &self,
        request: Request<Streaming<SidecarReport>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let Ok(admission) = Arc::clone(&self.joining).try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "{} sidecars are joining at once, the most this control plane admits together; retry shortly",
                self.max_joining
            )));
        };
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(SidecarReport {
                report: Some(Report::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            source: self.source.clone(),
            id: self.sessions.fetch_add(1, Ordering::Relaxed),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(session.run(hello, inbound, tx, admission));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        let caller = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        self.source
            .status(request.get_ref(), caller)
            .await
            .map(Response::new)
    }

    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<Certified>, Status> {
        let Some(authority) = &self.authority else {
            return Err(Status::unimplemented(
                "this control plane issues no certificates",
            ));
        };
        let Ok(_admission) = Arc::clone(&self.joining).try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "{} sidecars are joining at once, the most this control plane admits together; retry shortly",
                self.max_joining
            )));
        };
        let CertifyRequest { hello, csr } = request.into_inner();
        let hello = hello.ok_or_else(|| Status::invalid_argument("Certify without hello"))?;
        if csr.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "the certificate signing request is {} bytes, more than {MAX_CSR_BYTES}",
                csr.len()
            )));
        }
        let service_account = match tokio::time::timeout(
            HELLO_TIMEOUT,
            self.source.service_account(&hello),
        )
        .await
        {
            Ok(Ok(sa)) => sa,
            Ok(Err(reason)) => {
                tracing::warn!(namespace = %hello.namespace, pod = %hello.name, %reason, "certificate refused");
                self.source.observe(JoinEvent::Rejected);
                return Err(Status::permission_denied(reason));
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "identity not verified within 10s",
                ));
            }
        };
        let ca = authority.current();
        let id = WorkloadId {
            trust_domain: ca.trust_domain().to_owned(),
            namespace: hello.namespace.clone(),
            service_account,
            sidecar: hello.name.clone(),
        };
        let issued = ca
            .issue(&csr, &id, self.certificate_ttl)
            .map_err(|e| Status::invalid_argument(format!("cannot certify {id}: {e}")))?;
        tracing::info!(identity = %id, "certificate issued");
        Ok(Response::new(Certified {
            certificate_chain: issued.chain_pem,
            trust_bundle: issued.bundle_pem,
            not_after: Some(issued.not_after.into()),
            spiffe_id: id.spiffe_id(),
        }))
    }
}

struct Session<S> {
    source: Arc<S>,
    id: u64,
    shutdown: CancellationToken,
}

type Outbound = mpsc::Sender<Result<ControlUpdate, Status>>;

// === impl Session ===

impl<S: MeshSource> Session<S> {
    async fn run(
        self,
        hello: Hello,
        inbound: Streaming<SidecarReport>,
        tx: Outbound,
        admission: OwnedSemaphorePermit,
    ) {
        let key = SidecarKey::new(&hello.namespace, &hello.name);
        let span = tracing::info_span!("sidecar", namespace = %key.namespace, pod = %key.name, session = self.id);
        let session = async {
            let admitted = self.source.admit(&hello, self.id).await;
            drop(admission);
            if let Err(reason) = admitted {
                tracing::warn!(%reason, "sidecar rejected");
                self.source.observe(JoinEvent::Rejected);
                let update = ControlUpdate {
                    update: Some(Update::Rejected(Rejected { reason })),
                };
                let _ = tx.send(Ok(update)).await;
                self.source.left(&key, self.id);
                return;
            }
            tracing::info!(version = %hello.version, "sidecar joined");
            self.source.observe(JoinEvent::Joined);
            self.stream_views(&key, hello.known_view_version, inbound, &tx)
                .await;
            self.source.observe(JoinEvent::Left);
            self.source.left(&key, self.id);
            tracing::info!("sidecar left");
        };
        tracing::Instrument::instrument(session, span).await;
    }

    async fn stream_views(
        &self,
        key: &SidecarKey,
        known_version: u64,
        mut inbound: Streaming<SidecarReport>,
        tx: &Outbound,
    ) {
        let (closed_tx, mut closed) = oneshot::channel::<()>();
        let reader = {
            let source = self.source.clone();
            let key = key.clone();
            let id = self.id;
            tokio::spawn(async move {
                loop {
                    match inbound.message().await {
                        Ok(Some(SidecarReport {
                            report: Some(Report::Stats(stats)),
                        })) => source.record_stats(&key, id, stats),
                        Ok(Some(SidecarReport {
                            report: Some(Report::Applied(applied)),
                        })) => tracing::debug!(version = applied.version, "view applied"),
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "sidecar stream failed");
                            break;
                        }
                    }
                }
                drop(closed_tx);
            })
        };

        let mut changes = self.source.subscribe_changes();
        let mut version = known_version;
        let mut last = None;
        loop {
            changes.borrow_and_update();
            let Some(view) = self.source.view_for(key) else {
                tracing::info!("sidecar is no longer part of the mesh; closing the stream");
                break;
            };
            if last.as_ref() != Some(&view) {
                version += 1;
                let update = ControlUpdate {
                    update: Some(Update::View(convert::mesh_view(
                        &view,
                        version,
                        SystemTime::now(),
                    ))),
                };
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
                self.source.observe(JoinEvent::ViewSent);
                tracing::debug!(version, "view sent");
                last = Some(view);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = &mut closed => break,
                () = tx.closed() => break,
                () = self.shutdown.cancelled() => break,
            }
        }
        reader.abort();
    }
}
