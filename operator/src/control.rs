//! The control plane: gRPC `qmesh.control.v1.Control`, served by every replica (leader or not).
//! The session logic is shared with `qmesh dev` ([`qmesh_proto::join`]); what is the operator's own
//! is where views come from (the [`Index`]) and how a sidecar proves which pod it is.
//!
//! ```text
//!   sidecar ──Hello{namespace,name,token}──▶ authenticate (TokenReview, audience "qmesh";
//!                                              the token's pod must be the claimed pod)
//!           ◀──MeshView / Rejected────────── Index.view_for(pod)
//!           ──Stats───────────────────────▶ Index.record_stats (rolled up into CR status)
//!   stream closes / pod deleted ──▶ Index.drop_stats
//!   qmesh get ──Status + user's token──▶ Callers (TokenReview, RBAC) ──▶ Index.status
//!   qmesh dlq ──HeldMessages + token──▶ Callers (get / update the Queue) ──Join──▶ sidecars
//! ```

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use qmesh_core::{MeshView, SidecarKey};
use qmesh_proto::{
    control::{Hello, MeshStatus, Stats, StatusRequest},
    join::{ControlService, HeldAccess, JoinEvent, MeshSource},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    access::{self, Callers},
    index::Index,
    metrics::Metrics,
};

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

/// Decides whether a reviewed token proves the `Hello`'s identity, and returns the service account
/// it runs as. `pod_service_account` is the service account of the claimed pod as indexed (used
/// when the token names no pod).
pub fn check_identity(
    hello: &Hello,
    review: &ReviewedToken,
    pod_service_account: Option<&str>,
) -> Result<String, String> {
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
        Some(_) => Ok(account.to_owned()),
        None => match pod_service_account {
            Some(sa) if sa == account => Ok(account.to_owned()),
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
    /// Who may read the mesh summary and steer held messages: users RBAC lets (anyone when
    /// sidecars are not authenticated either).
    pub fn callers(&self) -> Callers {
        match self {
            Self::TokenReview(client) => Callers::Rbac(client.clone()),
            Self::Insecure => Callers::Anyone,
        }
    }

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

    /// The service account `hello`'s token proves (`Insecure`: the indexed pod's, unchecked).
    async fn check(&self, hello: &Hello, index: &Index) -> Result<String, String> {
        let client = match self {
            Self::Insecure => {
                let key = SidecarKey::new(&hello.namespace, &hello.name);
                return Ok(index
                    .sidecar(&key)
                    .map(|s| s.info.service_account)
                    .filter(|sa| !sa.is_empty())
                    .unwrap_or_else(|| "default".to_owned()));
            }
            Self::TokenReview(client) => client,
        };
        if hello.token.is_empty() {
            return Err("no token in Hello".into());
        }
        let review = Self::review(client, &hello.token).await?;
        let key = SidecarKey::new(&hello.namespace, &hello.name);
        let service_account = index.sidecar(&key).map(|s| s.info.service_account);
        check_identity(hello, &review, service_account.as_deref())
    }
}

/// The operator's source of views: the [`Index`], with sidecars authenticated by [`SidecarAuth`].
pub struct IndexSource {
    index: Arc<Index>,
    metrics: Arc<Metrics>,
    auth: SidecarAuth,
}

impl std::fmt::Debug for IndexSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexSource")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The control plane: `qmesh.control.v1.Control` served from the index.
pub type ControlPlane = ControlService<IndexSource>;

/// A control plane over `index`; `shutdown` ends every open stream.
pub fn control_plane(
    index: Arc<Index>,
    metrics: Arc<Metrics>,
    auth: SidecarAuth,
    shutdown: CancellationToken,
) -> ControlPlane {
    ControlService::new(
        Arc::new(IndexSource {
            index,
            metrics,
            auth,
        }),
        shutdown,
    )
}

#[tonic::async_trait]
impl MeshSource for IndexSource {
    /// Waits (briefly) for the index to be complete and to know the pod, then authenticates.
    async fn admit(&self, hello: &Hello, _session: u64) -> Result<(), String> {
        self.service_account(hello).await.map(drop)
    }

    async fn service_account(&self, hello: &Hello) -> Result<String, String> {
        let key = SidecarKey::new(&hello.namespace, &hello.name);
        let mut changes = self.index.subscribe_changes();
        let known = async {
            self.index.wait_synced().await;
            loop {
                changes.borrow_and_update();
                if self.index.sidecar(&key).is_some() {
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

    fn view_for(&self, key: &SidecarKey) -> Option<MeshView> {
        self.index.view_for(key)
    }

    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.index.subscribe_changes()
    }

    fn record_stats(&self, key: &SidecarKey, session: u64, stats: Stats) {
        self.index.record_stats(key, session, stats);
    }

    fn left(&self, key: &SidecarKey, session: u64) {
        self.index.drop_stats(key, session);
    }

    /// The summary of what the caller may read: its Kubernetes identity and RBAC decide
    /// ([`Callers`]); sidecars are not asked.
    async fn status(
        &self,
        request: &StatusRequest,
        caller: Option<&str>,
    ) -> Result<MeshStatus, Status> {
        self.auth
            .callers()
            .check(caller, &request.namespace)
            .await?;
        Ok(self.index.status(&request.namespace))
    }

    /// Browsing needs `get` on the Queue, redrive and purge `update` ([`access`]).
    async fn authorize_held(
        &self,
        access: &HeldAccess<'_>,
        caller: Option<&str>,
    ) -> Result<(), Status> {
        let (verb, what) = if access.mutating {
            ("update", "redrive or purge its messages")
        } else {
            ("get", "browse its messages")
        };
        access::check_queue(
            &self.auth.callers(),
            caller,
            access.namespace,
            access.queue,
            verb,
            what,
        )
        .await
    }

    fn observe(&self, event: JoinEvent) {
        match event {
            JoinEvent::Rejected => {
                self.metrics.sidecars_rejected.inc();
            }
            JoinEvent::Joined => {
                self.metrics.connected_sidecars.inc();
            }
            JoinEvent::Left => {
                self.metrics.connected_sidecars.dec();
            }
            JoinEvent::ViewSent => {
                self.metrics.views_sent.inc();
            }
        }
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
        assert_eq!(
            check_identity(&hello("shop", "w-1"), &r, None),
            Ok("worker".to_owned())
        );
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
            Ok("worker".to_owned())
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
