//! Who may read the mesh summary (`Control/Status`) and browse, redrive or purge held messages
//! (`Control/HeldMessages`): the caller's own Kubernetes identity and RBAC, not whoever reaches
//! the port. The caller sends its bearer token (the one in its kubeconfig); the operator asks the
//! API server who that is (TokenReview) and whether that user may do it (SubjectAccessReview):
//!
//! | call | RBAC the user needs (group `qmesh.io`) |
//! |---|---|
//! | `Status` of a namespace (or all) | `list` `queues` and `subscriptions` there |
//! | `HeldMessages` browse | `get` the Queue |
//! | `HeldMessages` redrive, purge | `update` the Queue |
//!
//! ```text
//!   qmesh get ──Status{namespace}, authorization: Bearer <token>──▶ TokenReview ──▶ user, groups
//!                                                                   SubjectAccessReview(s)
//!             ◀── MeshStatus | UNAUTHENTICATED | PERMISSION_DENIED
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use tonic::Status;

/// The resources a reader must be allowed to `list`.
const READ: [&str; 2] = ["queues", "subscriptions"];

/// Who may call.
#[derive(Clone)]
pub enum Callers {
    /// Users the API server authenticates and authorizes (RBAC on `qmesh.io` queues and
    /// subscriptions).
    Rbac(Client),
    /// Anyone — `--insecure-skip-sidecar-auth`, tests and development only.
    Anyone,
}

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rbac(_) => f.write_str("Rbac"),
            Self::Anyone => f.write_str("Anyone"),
        }
    }
}

/// A user as the API server authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct User {
    name: String,
    uid: Option<String>,
    groups: Option<Vec<String>>,
    extra: Option<BTreeMap<String, Vec<String>>>,
}

impl Callers {
    /// Whether the bearer of `token` may read `namespace` (every namespace when empty).
    pub async fn check(&self, token: Option<&str>, namespace: &str) -> Result<(), Status> {
        let Self::Rbac(client) = self else {
            return Ok(());
        };
        let user = authenticate(client, bearer(token, "reading the mesh status")?).await?;
        let scope = if namespace.is_empty() {
            "every namespace".to_owned()
        } else {
            format!("namespace {namespace:?}")
        };
        for resource in READ {
            if !allowed(client, &user, "list", resource, namespace, None).await? {
                return Err(Status::permission_denied(format!(
                    "{} may not list {resource}.qmesh.io in {scope} (RBAC), so may not read its \
                     mesh status",
                    user.name
                )));
            }
        }
        Ok(())
    }
}

/// Whether the bearer of `token` may `verb` (`get`, `update`) the Queue `namespace/queue`; `what`
/// names the call for the refusal.
pub async fn check_queue(
    callers: &Callers,
    token: Option<&str>,
    namespace: &str,
    queue: &str,
    verb: &str,
    what: &str,
) -> Result<(), Status> {
    let Callers::Rbac(client) = callers else {
        return Ok(());
    };
    let user = authenticate(client, bearer(token, what)?).await?;
    if allowed(client, &user, verb, "queues", namespace, Some(queue)).await? {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{} may not {verb} queues.qmesh.io {queue:?} in namespace {namespace:?} (RBAC), so may not {what}",
        user.name
    )))
}

/// The token, or why one is needed.
fn bearer<'a>(token: Option<&'a str>, what: &str) -> Result<&'a str, Status> {
    token.filter(|t| !t.is_empty()).ok_or_else(|| {
        Status::unauthenticated(format!(
            "{what} needs your Kubernetes bearer token (metadata `authorization: Bearer <token>`, \
             as in your kubeconfig)"
        ))
    })
}

/// The user a token belongs to (audience: the API server's own, as kubeconfig tokens are).
async fn authenticate(client: &Client, token: &str) -> Result<User, Status> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: None,
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
    let status = reviewed.status.unwrap_or_default();
    let user = status.user.unwrap_or_default();
    match (status.authenticated, user.username) {
        (Some(true), Some(name)) => Ok(User {
            name,
            uid: user.uid,
            groups: user.groups,
            extra: user.extra,
        }),
        _ => Err(Status::unauthenticated(format!(
            "the API server did not authenticate the token{}",
            status.error.map(|e| format!(": {e}")).unwrap_or_default()
        ))),
    }
}

/// Whether `user` may `verb` `resource` (group `qmesh.io`; the object `name`, if any) in
/// `namespace` (all when empty).
async fn allowed(
    client: &Client,
    user: &User,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: Option<&str>,
) -> Result<bool, Status> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some("qmesh.io".into()),
                resource: Some(resource.into()),
                verb: Some(verb.into()),
                name: name.map(str::to_owned),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Status::unavailable(format!("SubjectAccessReview failed: {e}")))?;
    Ok(reviewed.status.is_some_and(|s| s.allowed))
}
