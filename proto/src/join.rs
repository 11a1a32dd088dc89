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
//! `HeldMessages` reaches every joined sidecar of a namespace that may own a queue down its own
//! stream (`HeldCall`, answered by `HeldAnswer`), so the dead-letter tools see the whole mesh
//! without any port of the sidecars being reachable; [`MeshSource::authorize_held`] decides who may:
//!
//! ```text
//!   qmesh dlq / console ──HeldMessages{namespace, browse|redrive|purge}──▶ authorize_held
//!        ──▶ each session whose view names the queue ──HeldCall{id}──▶ sidecar
//!        ◀── MeshHeldResponse{per sidecar}  ◀──HeldAnswer{id}──────── (or an error after 30 s)
//! ```
//!
//! `Certify` signs a sidecar's own key with the mesh CA ([`ControlService::authority`]) for the
//! identity [`MeshSource::service_account`] verified; with [`ControlService::tls`] the service
//! is served over TLS, which sidecars verify against the trust bundle.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
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
        Certified, CertifyRequest, ControlUpdate, HeldCall, HeldRequest, HeldResponse, Hello,
        MeshHeldRequest, MeshHeldResponse, MeshStatus, Rejected, SidecarHeld, SidecarReport, Stats,
        StatusRequest,
        control_server::{Control, ControlServer},
        control_update::Update,
        held_request::Call,
        held_response,
        sidecar_report::Report,
    },
    convert, v1,
};

/// How long a sidecar may take to send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a sidecar may take to answer a held-message call (a redrive of many messages
/// publishes each of them).
pub const HELD_TIMEOUT: Duration = Duration::from_secs(30);
/// Held-message calls one sidecar may have unanswered at once.
const MAX_HELD_PENDING: usize = 16;

/// What a `HeldMessages` caller wants to do, for [`MeshSource::authorize_held`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldAccess<'a> {
    /// The queue's namespace.
    pub namespace: &'a str,
    /// The queue.
    pub queue: &'a str,
    /// Redrive or purge (changes messages); browse does not.
    pub mutating: bool,
}

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

    /// Whether the bearer of `caller` may do `access` (`HeldMessages`). Refused unless a source
    /// says otherwise.
    async fn authorize_held(
        &self,
        _access: &HeldAccess<'_>,
        _caller: Option<&str>,
    ) -> Result<(), Status> {
        Err(Status::unimplemented(
            "this control plane does not reach sidecars' held messages",
        ))
    }

    /// Something worth counting happened.
    fn observe(&self, _event: JoinEvent) {}
}

/// The bearer token a request came with (`authorization: Bearer …`).
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The joined sidecars' streams, by sidecar, for calls down them.
#[derive(Default)]
struct Lines(Mutex<HashMap<SidecarKey, Line>>);

/// One joined sidecar's stream, as far as calls down it go.
#[derive(Clone)]
struct Line {
    session: u64,
    tx: Outbound,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<HeldResponse>>>>,
    next: Arc<AtomicU64>,
}

fn held_error(code: v1::ErrorCode, message: impl Into<String>) -> HeldResponse {
    HeldResponse {
        result: Some(held_response::Result::Error(v1::Error {
            code: code as i32,
            message: message.into(),
            retry_after: None,
        })),
    }
}

// === impl Lines ===

impl Lines {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SidecarKey, Line>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self, key: &SidecarKey, session: u64, tx: &Outbound) -> Line {
        let line = Line {
            session,
            tx: tx.clone(),
            pending: Arc::default(),
            next: Arc::new(AtomicU64::new(1)),
        };
        self.lock().insert(key.clone(), line.clone());
        line
    }

    /// Forgets `key`'s line if it is still `session`'s (a newer session may have replaced it).
    fn close(&self, key: &SidecarKey, session: u64) {
        let mut lines = self.lock();
        if lines.get(key).is_some_and(|l| l.session == session) {
            lines.remove(key);
        }
    }

    fn in_namespace(&self, namespace: &str) -> Vec<(SidecarKey, Line)> {
        self.lock()
            .iter()
            .filter(|(k, _)| k.namespace == namespace)
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect()
    }
}

// === impl Line ===

impl Line {
    /// Asks the sidecar and waits (at most `timeout`) for its answer.
    async fn call(&self, request: HeldRequest, timeout: Duration) -> HeldResponse {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.len() >= MAX_HELD_PENDING {
                return held_error(
                    v1::ErrorCode::Internal,
                    format!(
                        "{MAX_HELD_PENDING} held-message requests to this sidecar are unanswered; retry shortly"
                    ),
                );
            }
            pending.insert(id, answer_tx);
        }
        let update = ControlUpdate {
            update: Some(Update::Held(HeldCall {
                id,
                request: Some(request),
            })),
        };
        let asked = async {
            self.tx.send(Ok(update)).await.ok()?;
            answer.await.ok()
        };
        let response = match tokio::time::timeout(timeout, asked).await {
            Ok(Some(response)) => response,
            Ok(None) => held_error(
                v1::ErrorCode::ShuttingDown,
                "the sidecar left the control plane before answering",
            ),
            Err(_) => held_error(
                v1::ErrorCode::Internal,
                format!("the sidecar did not answer within {}s", timeout.as_secs()),
            ),
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        response
    }

    /// The stream ended: every call still waiting is answered at once that no answer will come.
    fn hang_up(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Hands the sidecar's answer to whoever asked.
    fn answered(&self, id: u64, response: HeldResponse) {
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match waiting {
            Some(tx) => {
                let _ = tx.send(response);
            }
            None => tracing::debug!(id, "an answer to a call no one waits for"),
        }
    }
}

/// Routes `HeldMessages` down the joined sidecars' streams ([`ControlService::held_router`]).
pub struct HeldRouter<S> {
    source: Arc<S>,
    lines: Arc<Lines>,
    timeout: Duration,
}

impl<S> Clone for HeldRouter<S> {
    fn clone(&self) -> Self {
        Self {
            source: Arc::clone(&self.source),
            lines: Arc::clone(&self.lines),
            timeout: self.timeout,
        }
    }
}

impl<S> std::fmt::Debug for HeldRouter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldRouter").finish_non_exhaustive()
    }
}

// === impl HeldRouter ===

impl<S: MeshSource> HeldRouter<S> {
    /// Authorizes `request` for `caller`, asks every connected sidecar of the namespace whose
    /// view names the queue, and gathers their answers (in sidecar name order).
    pub async fn held_messages(
        &self,
        request: MeshHeldRequest,
        caller: Option<&str>,
    ) -> Result<MeshHeldResponse, Status> {
        let MeshHeldRequest { namespace, request } = request;
        let request =
            request.ok_or_else(|| Status::invalid_argument("HeldMessages without a request"))?;
        let (queue, mutating) = match &request.call {
            Some(Call::Browse(b)) => (b.queue.clone(), false),
            Some(Call::Redrive(r)) => (r.queue.clone(), true),
            Some(Call::Purge(p)) => (p.queue.clone(), true),
            None => {
                return Err(Status::invalid_argument(
                    "HeldMessages needs browse, redrive or purge",
                ));
            }
        };
        if namespace.is_empty() || queue.is_empty() {
            return Err(Status::invalid_argument(
                "HeldMessages needs a namespace and a queue",
            ));
        }
        let access = HeldAccess {
            namespace: &namespace,
            queue: &queue,
            mutating,
        };
        self.source.authorize_held(&access, caller).await?;
        let mut owners: Vec<(SidecarKey, Line)> = self
            .lines
            .in_namespace(&namespace)
            .into_iter()
            .filter(|(key, _)| {
                self.source
                    .view_for(key)
                    .is_some_and(|view| view.queue(&queue).is_some())
            })
            .collect();
        if owners.is_empty() {
            return Err(Status::not_found(format!(
                "no sidecar connected to the control plane may own messages of queue {namespace}/{queue}: \
                 the queue does not exist, or none of its publishers runs now"
            )));
        }
        owners.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let timeout = self.timeout;
        let asked = owners.into_iter().map(|(key, line)| {
            let request = request.clone();
            async move {
                SidecarHeld {
                    sidecar: key.name,
                    response: Some(line.call(request, timeout).await),
                }
            }
        });
        Ok(MeshHeldResponse {
            sidecars: futures::future::join_all(asked).await,
        })
    }
}

/// The `Control` gRPC service over a [`MeshSource`].
pub struct ControlService<S> {
    source: Arc<S>,
    sessions: AtomicU64,
    lines: Arc<Lines>,
    held_timeout: Duration,
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
            lines: Arc::default(),
            held_timeout: HELD_TIMEOUT,
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

    /// Waits at most `timeout` for a sidecar's answer to a held-message call.
    pub fn held_timeout(mut self, timeout: Duration) -> Self {
        self.held_timeout = timeout;
        self
    }

    /// A handle that routes `HeldMessages` as this service does, for a caller in the same process
    /// (`qmesh dev`'s console).
    pub fn held_router(&self) -> HeldRouter<S> {
        HeldRouter {
            source: Arc::clone(&self.source),
            lines: Arc::clone(&self.lines),
            timeout: self.held_timeout,
        }
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
            lines: self.lines.clone(),
        };
        tokio::spawn(session.run(hello, inbound, tx, admission));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        self.source
            .status(request.get_ref(), bearer(&request))
            .await
            .map(Response::new)
    }

    async fn held_messages(
        &self,
        request: Request<MeshHeldRequest>,
    ) -> Result<Response<MeshHeldResponse>, Status> {
        let caller = bearer(&request).map(str::to_owned);
        self.held_router()
            .held_messages(request.into_inner(), caller.as_deref())
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
    lines: Arc<Lines>,
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
            let line = self.lines.open(&key, self.id, &tx);
            self.stream_views(&key, hello.known_view_version, inbound, &tx, line.clone())
                .await;
            self.lines.close(&key, self.id);
            line.hang_up();
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
        line: Line,
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
                        Ok(Some(SidecarReport {
                            report: Some(Report::Held(answer)),
                        })) => line.answered(answer.id, answer.response.unwrap_or_default()),
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
