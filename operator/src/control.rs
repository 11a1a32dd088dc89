//! The control plane: gRPC `qmesh.control.v1.Control/Join`, served by every replica (leader or not).
//! A thin adapter between the [`Index`] and the wire.
//!
//! ```text
//!   sidecar ──Hello{namespace,name,token}──▶ authenticate (TokenReview, audience "qmesh";
//!                                              the token's pod must be the claimed pod)
//!           ◀──Rejected{reason}────────────── on failure, then the stream ends
//!           ◀──MeshView{version n}─────────── at once, then whenever Index.view_for(pod) changes
//!           ──Stats───────────────────────▶ Index.record_stats (rolled up into CR status)
//!   stream closes / pod deleted ──▶ Index.drop_stats
//! ```
//! A view is sent only when it differs from the last one sent on this stream; versions increase per
//! stream, starting above the `known_view_version` the sidecar reports.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::Stream;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use qmesh_core::SidecarKey;
use qmesh_proto::{
    control::{
        ControlUpdate, Hello, Rejected, SidecarReport,
        control_server::{Control, ControlServer},
        control_update::Update,
        sidecar_report::Report,
    },
    convert,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{index::Index, metrics::Metrics};

/// The audience sidecar tokens must be issued for.
pub const AUDIENCE: &str = "qmesh";
/// The TokenReview `extra` key naming the pod a bound token belongs to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// How long a sidecar may take to send `Hello`, and how long the index may take to learn its pod.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How sidecars prove who they are.
#[derive(Clone)]
pub enum SidecarAuth {
    /// A TokenReview of the `Hello` token (audience `qmesh`).
    TokenReview(Client),
    /// No check at all — `--insecure-skip-sidecar-auth`, tests and development only.
    Insecure,
}

impl std::fmt::Debug for SidecarAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenReview(_) => f.write_str("TokenReview"),
            Self::Insecure => f.write_str("Insecure"),
        }
    }
}

/// What a TokenReview said about a token, reduced to what the check needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewedToken {
    /// `system:serviceaccount:<namespace>:<name>`, if authenticated.
    pub username: Option<String>,
    /// Pod names from `user.extra["authentication.kubernetes.io/pod-name"]` (bound tokens).
    pub pod_names: Option<Vec<String>>,
    /// The server's error, if any.
    pub error: Option<String>,
}

/// Decides whether a reviewed token proves the `Hello`'s identity. `pod_service_account` is the
/// service account of the claimed pod as indexed (used when the token names no pod).
pub fn check_identity(
    hello: &Hello,
    review: &ReviewedToken,
    pod_service_account: Option<&str>,
) -> Result<(), String> {
    let Some(username) = &review.username else {
        return Err(format!(
            "token not authenticated{}",
            review
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    };
    let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
        return Err(format!("{username} is not a service account"));
    };
    let (namespace, account) = rest.split_once(':').unwrap_or((rest, ""));
    if namespace != hello.namespace {
        return Err(format!(
            "token of namespace {namespace:?} cannot join as a pod of {:?}",
            hello.namespace
        ));
    }
    match &review.pod_names {
        Some(pods) if !pods.contains(&hello.name) => Err(format!(
            "token belongs to pod {:?}, not {:?}",
            pods.join(","),
            hello.name
        )),
        Some(_) => Ok(()),
        None => match pod_service_account {
            Some(sa) if sa == account => Ok(()),
            Some(sa) => Err(format!(
                "pod {:?} runs as service account {sa:?}, the token is {account:?}'s",
                hello.name
            )),
            None => Err(format!(
                "pod {}/{} is not known",
                hello.namespace, hello.name
            )),
        },
    }
}

// === impl SidecarAuth ===

impl SidecarAuth {
    async fn review(client: &Client, token: &str) -> Result<ReviewedToken, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        let user = status.user.unwrap_or_default();
        Ok(ReviewedToken {
            username: user.username.filter(|_| status.authenticated == Some(true)),
            pod_names: user.extra.and_then(|mut e| e.remove(POD_NAME_EXTRA)),
            error: status.error,
        })
    }

    async fn check(&self, hello: &Hello, index: &Index) -> Result<(), String> {
        let client = match self {
            Self::Insecure => return Ok(()),
            Self::TokenReview(client) => client,
        };
        if hello.token.is_empty() {
            return Err("no token in Hello".into());
        }
        let review = Self::review(client, &hello.token).await?;
        let key = SidecarKey::new(&hello.namespace, &hello.name);
        let service_account = index.sidecar(&key).map(|s| s.service_account);
        check_identity(hello, &review, service_account.as_deref())
    }
}

/// The gRPC service.
pub struct ControlPlane {
    index: Arc<Index>,
    metrics: Arc<Metrics>,
    auth: SidecarAuth,
    sessions: AtomicU64,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

// === impl ControlPlane ===

impl ControlPlane {
    /// A control plane over `index`.
    pub fn new(
        index: Arc<Index>,
        metrics: Arc<Metrics>,
        auth: SidecarAuth,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            index,
            metrics,
            auth,
            sessions: AtomicU64::new(1),
            shutdown,
        }
    }

    /// Serves on `listener` until `shutdown` (which also ends every open stream).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
    ) -> Result<(), tonic::transport::Error> {
        let shutdown = self.shutdown.clone();
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(self))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ControlUpdate, Status>> + Send>>;

fn rejected(reason: String) -> ControlUpdate {
    ControlUpdate {
        update: Some(Update::Rejected(Rejected { reason })),
    }
}

#[tonic::async_trait]
impl Control for ControlPlane {
    type JoinStream = UpdateStream;

    async fn join(
        &self,
        request: Request<Streaming<SidecarReport>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
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
            index: self.index.clone(),
            metrics: self.metrics.clone(),
            auth: self.auth.clone(),
            id: self.sessions.fetch_add(1, Ordering::Relaxed),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(session.run(hello, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    index: Arc<Index>,
    metrics: Arc<Metrics>,
    auth: SidecarAuth,
    id: u64,
    shutdown: CancellationToken,
}

type Outbound = mpsc::Sender<Result<ControlUpdate, Status>>;

// === impl Session ===

impl Session {
    async fn run(self, hello: Hello, inbound: Streaming<SidecarReport>, tx: Outbound) {
        let key = SidecarKey::new(&hello.namespace, &hello.name);
        let span = tracing::info_span!("sidecar", namespace = %key.namespace, pod = %key.name, session = self.id);
        let result = async {
            if let Err(reason) = self.admit(&hello, &key).await {
                tracing::warn!(namespace = %key.namespace, pod = %key.name, %reason, "sidecar rejected");
                self.metrics.sidecars_rejected.inc();
                let _ = tx.send(Ok(rejected(reason))).await;
                return;
            }
            tracing::info!(namespace = %key.namespace, pod = %key.name, version = %hello.version, "sidecar joined");
            self.metrics.connected_sidecars.inc();
            self.stream_views(&key, hello.known_view_version, inbound, &tx)
                .await;
            self.metrics.connected_sidecars.dec();
            self.index.drop_stats(&key, self.id);
            tracing::info!(namespace = %key.namespace, pod = %key.name, "sidecar left");
        };
        tracing::Instrument::instrument(result, span).await;
    }

    /// Waits (briefly) for the index to be complete and to know the pod, then authenticates.
    async fn admit(&self, hello: &Hello, key: &SidecarKey) -> Result<(), String> {
        let mut changes = self.index.subscribe_changes();
        let known = async {
            self.index.wait_synced().await;
            loop {
                changes.borrow_and_update();
                if self.index.sidecar(key).is_some() {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(HELLO_TIMEOUT, known).await.is_err() {
            return Err(format!(
                "pod {}/{} is not a qmesh sidecar the control plane knows",
                key.namespace, key.name
            ));
        }
        self.auth.check(hello, &self.index).await
    }

    async fn stream_views(
        &self,
        key: &SidecarKey,
        known_version: u64,
        mut inbound: Streaming<SidecarReport>,
        tx: &Outbound,
    ) {
        let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
        let reader = {
            let index = self.index.clone();
            let key = key.clone();
            let id = self.id;
            tokio::spawn(async move {
                loop {
                    match inbound.message().await {
                        Ok(Some(SidecarReport {
                            report: Some(Report::Stats(stats)),
                        })) => index.record_stats(&key, id, stats),
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

        let mut changes = self.index.subscribe_changes();
        let mut version = known_version;
        let mut last = None;
        loop {
            changes.borrow_and_update();
            let Some(view) = self.index.view_for(key) else {
                tracing::info!("pod is gone; closing the stream");
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
                self.metrics.views_sent.inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(ns: &str, name: &str) -> Hello {
        Hello {
            namespace: ns.into(),
            name: name.into(),
            token: "t".into(),
            ..Default::default()
        }
    }

    fn review(user: Option<&str>, pods: Option<&[&str]>) -> ReviewedToken {
        ReviewedToken {
            username: user.map(Into::into),
            pod_names: pods.map(|p| p.iter().map(|s| s.to_string()).collect()),
            error: None,
        }
    }

    #[test]
    fn a_bound_token_of_the_claimed_pod_is_accepted() {
        let r = review(Some("system:serviceaccount:shop:worker"), Some(&["w-1"]));
        assert_eq!(check_identity(&hello("shop", "w-1"), &r, None), Ok(()));
    }

    #[test]
    fn a_token_of_another_pod_or_namespace_is_refused() {
        let r = review(Some("system:serviceaccount:shop:worker"), Some(&["w-2"]));
        let err = check_identity(&hello("shop", "w-1"), &r, Some("worker")).unwrap_err();
        assert!(err.contains("w-2"), "{err}");
        let err = check_identity(&hello("bank", "w-2"), &r, Some("worker")).unwrap_err();
        assert!(err.contains("namespace"), "{err}");
    }

    #[test]
    fn without_a_pod_claim_the_service_account_must_be_the_pods() {
        let r = review(Some("system:serviceaccount:shop:worker"), None);
        assert_eq!(
            check_identity(&hello("shop", "w-1"), &r, Some("worker")),
            Ok(())
        );
        assert!(check_identity(&hello("shop", "w-1"), &r, Some("admin")).is_err());
        assert!(check_identity(&hello("shop", "w-1"), &r, None).is_err());
    }

    #[test]
    fn unauthenticated_and_non_service_account_tokens_are_refused() {
        let mut r = review(None, None);
        r.error = Some("invalid bearer token".into());
        let err = check_identity(&hello("shop", "w-1"), &r, Some("worker")).unwrap_err();
        assert_eq!(err, "token not authenticated: invalid bearer token");
        let admin = review(Some("kubernetes-admin"), None);
        assert!(check_identity(&hello("shop", "w-1"), &admin, Some("worker")).is_err());
    }
}
