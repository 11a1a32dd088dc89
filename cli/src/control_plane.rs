//! Reaching a control plane — what `qmesh get`, `qmesh dlq` and `qmesh console` ask: `qmesh dev`'s
//! on loopback (verified against the local CA), or with `--kubeconfig` the operator's, from
//! outside the cluster, as the user, the way `kubectl port-forward` and `linkerd viz dashboard`
//! reach a pod: through the API server, with the kubeconfig's own credentials, no port of the
//! cluster exposed.
//!
//! ```text
//!   kubeconfig ──▶ API server: Service qmesh-control (its selector: the leader)
//!                              ConfigMap qmesh-trust-bundle (ca.crt: the mesh CA, public)
//!                              pods/portforward to the leader's control port
//!              ══ TLS verified against ca.crt, for qmesh-control.<namespace>.svc ══▶ operator:
//!                 Control/Status, Control/HeldMessages with `authorization: Bearer <token>`
//! ```
//!
//! The operator authorizes the bearer token with a TokenReview and the user's RBAC, so the token is
//! the kubeconfig user's own (`token`, `tokenFile`) or `--token`; a user who authenticates with a
//! client certificate or an exec plugin passes `--token` (e.g. `kubectl create token`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use qmesh_proto::control::{
    MeshHeldRequest, MeshHeldResponse, MeshStatus, StatusRequest, control_client::ControlClient,
};
use tonic::{metadata::MetadataValue, transport::Channel};

/// The operator's control-plane Service; its selector picks the leader.
const CONTROL_SERVICE: &str = "qmesh-control";
/// Largest answer read: one held-message answer per sidecar, each at most a few MiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// The ConfigMap the operator publishes the mesh's trust bundle in.
pub const TRUST_BUNDLE_CONFIG_MAP: &str = "qmesh-trust-bundle";

/// Which control plane to ask: `qmesh dev`'s, or a cluster's operator.
#[derive(Args, Debug, Clone)]
pub struct ControlPlaneArgs {
    /// The local control plane (`qmesh dev`).
    #[arg(
        long,
        env = "QMESH_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7000"
    )]
    pub control_plane: String,
    /// Roots the local control plane's certificate must chain to (default: the local CA's `ca.crt`).
    #[arg(long, env = "QMESH_TRUST_BUNDLE_FILE", value_name = "PATH")]
    pub trust_bundle: Option<PathBuf>,
    /// A cluster's operator instead.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// How to reach a cluster's operator.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Ask the operator of the cluster this kubeconfig points at (through the API server).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current one).
    #[arg(long, requires = "kubeconfig")]
    pub context: Option<String>,
    /// The namespace qmesh's operator runs in.
    #[arg(long, default_value = "qmesh-system", requires = "kubeconfig")]
    pub operator_namespace: String,
    /// The bearer token to authenticate with instead of the kubeconfig's (needed when the
    /// kubeconfig authenticates with a client certificate or an exec plugin).
    #[arg(
        long,
        env = "QMESH_TOKEN",
        hide_env_values = true,
        requires = "kubeconfig"
    )]
    pub token: Option<String>,
}

/// A control plane: `qmesh dev`'s, or the operator's through a port-forward, as the user.
#[derive(Clone)]
pub struct ControlPlane {
    client: ControlClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

// === impl ControlPlaneArgs ===

impl ControlPlaneArgs {
    /// The operator with `--kubeconfig`, else the local control plane.
    pub async fn connect(&self) -> anyhow::Result<ControlPlane> {
        if self.cluster.is_set() {
            return self.cluster.operator().await;
        }
        let bundle = self
            .trust_bundle
            .clone()
            .unwrap_or_else(|| crate::local_ca::bundle_path(&crate::local_ca::default_dir()));
        let channel = crate::local_ca::connect(&self.control_plane, &bundle)
            .await
            .with_context(|| {
                format!(
                    "no control plane at {} — is `qmesh dev` running? (or pass --kubeconfig)",
                    self.control_plane
                )
            })?;
        Ok(ControlPlane {
            client: ControlClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES),
            token: None,
        })
    }

    /// Where the answers come from, for messages.
    pub fn describe(&self) -> String {
        match &self.cluster.kubeconfig {
            Some(path) => format!(
                "the operator in {} (kubeconfig {})",
                self.cluster.operator_namespace,
                path.display()
            ),
            None => format!("the control plane at {}", self.control_plane),
        }
    }
}

// === impl ClusterArgs ===

impl ClusterArgs {
    /// Whether a cluster is asked (else the local control plane).
    pub fn is_set(&self) -> bool {
        self.kubeconfig.is_some()
    }

    /// A client of the API server, and the bearer token of the kubeconfig's user (or `--token`).
    pub async fn client(&self) -> anyhow::Result<(Client, Option<String>)> {
        let path = self.kubeconfig.as_ref().context("no --kubeconfig given")?;
        let kubeconfig = Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .with_context(|| format!("using kubeconfig {}", path.display()))?;
        let token = match (&self.token, &config.auth_info) {
            (Some(token), _) => Some(token.trim().to_owned()),
            (None, auth) => match (&auth.token, &auth.token_file) {
                (Some(token), _) => Some(
                    secrecy::ExposeSecret::expose_secret(token)
                        .trim()
                        .to_owned(),
                ),
                (None, Some(file)) => Some(
                    std::fs::read_to_string(file)
                        .with_context(|| format!("reading the kubeconfig's tokenFile {file}"))?
                        .trim()
                        .to_owned(),
                ),
                (None, None) => None,
            },
        };
        Ok((Client::try_from(config)?, token.filter(|t| !t.is_empty())))
    }

    /// The operator's control plane, through a port-forward to the leader.
    pub async fn operator(&self) -> anyhow::Result<ControlPlane> {
        let (client, token) = self.client().await?;
        let token = token.context(
            "the operator authorizes you with a bearer token, and this kubeconfig's user has \
             none (it authenticates with a client certificate or an exec plugin): pass --token \
             (e.g. `--token $(kubectl create token <service-account>)`)",
        )?;
        ControlPlane::operator(client, &self.operator_namespace, &token).await
    }
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Finds the leader behind the control-plane Service of `namespace`, the mesh's trust bundle,
    /// and opens a channel through a port-forward to it.
    pub async fn operator(client: Client, namespace: &str, token: &str) -> anyhow::Result<Self> {
        let service = Api::<Service>::namespaced(client.clone(), namespace)
            .get(CONTROL_SERVICE)
            .await
            .with_context(|| {
                format!(
                    "reading Service {namespace}/{CONTROL_SERVICE} (is qmesh installed there? \
                     --operator-namespace)"
                )
            })?;
        let spec = service.spec.unwrap_or_default();
        let selector = spec
            .selector
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let port = spec.ports.unwrap_or_default().into_iter().next();
        let pods = Api::<Pod>::namespaced(client.clone(), namespace);
        let leader = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .with_context(|| format!("listing the operator's pods in {namespace}"))?
            .items
            .into_iter()
            .find(is_ready)
            .with_context(|| {
                format!("no ready operator pod leads in {namespace} (selector {selector})")
            })?;
        let pod = leader.metadata.name.clone().unwrap_or_default();
        let target = port
            .and_then(|p| p.target_port)
            .context("the control-plane Service names no port")?;
        let port = match target {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
                u16::try_from(n).context("the control port is out of range")?
            }
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
                container_port(&leader, &name).with_context(|| {
                    format!("the operator pod {pod} has no container port named {name:?}")
                })?
            }
        };
        let bundle = Api::<ConfigMap>::namespaced(client, namespace)
            .get(TRUST_BUNDLE_CONFIG_MAP)
            .await
            .with_context(|| {
                format!("reading the mesh's trust bundle (ConfigMap {namespace}/{TRUST_BUNDLE_CONFIG_MAP})")
            })?
            .data
            .and_then(|mut d| d.remove("ca.crt"))
            .with_context(|| format!("ConfigMap {TRUST_BUNDLE_CONFIG_MAP} has no ca.crt"))?;
        let config = std::sync::Arc::new(qmesh_identity::tls::verifying_client(&bundle)?);
        let server_name = format!("{CONTROL_SERVICE}.{namespace}.svc");
        let dial = move || {
            let (pods, pod) = (pods.clone(), pod.clone());
            async move {
                let mut forwarder = pods
                    .portforward(&pod, &[port])
                    .await
                    .map_err(|e| std::io::Error::other(format!("port-forward to {pod}: {e}")))?;
                let stream = forwarder.take_stream(port).ok_or_else(|| {
                    std::io::Error::other(format!("port-forward to {pod}:{port} gave no stream"))
                })?;
                // Ends with the connection; a broken one fails the channel's next call, which
                // dials again.
                tokio::spawn(async move { forwarder.join().await });
                Ok(stream)
            }
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{server_name}"))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(60));
        let channel =
            qmesh_identity::transport::channel_over(&endpoint, config, &server_name, dial)?;
        let token = MetadataValue::try_from(format!("Bearer {token}"))
            .context("the token is not a valid header value")?;
        Ok(Self {
            client: ControlClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES),
            token: Some(token),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    /// `Control/Status` of `namespace` (every namespace when empty).
    pub async fn status(&self, namespace: &str) -> Result<MeshStatus, tonic::Status> {
        let request = self.request(StatusRequest {
            namespace: namespace.to_owned(),
        });
        Ok(self.client.clone().status(request).await?.into_inner())
    }

    /// `Control/HeldMessages`.
    pub async fn held(&self, request: MeshHeldRequest) -> Result<MeshHeldResponse, tonic::Status> {
        Ok(self
            .client
            .clone()
            .held_messages(self.request(request))
            .await?
            .into_inner())
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn container_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}
