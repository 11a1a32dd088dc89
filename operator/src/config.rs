//! The command line (every flag also reads an environment variable), exactly as the Helm chart
//! relies on it: see `docs/operator.md` and the chart's deployment template.
//!
//! ```text
//!   argv / env ──clap──▶ Args ──resolve()──▶ Config (operator: controllers, lease, control plane)
//!                                  └──────▶ WebhookConfig (admission webhooks + TLS)
//! ```

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// `qmesh-operator`: reconciles Queues and Subscriptions, serves the control plane to sidecars and
/// the admission webhooks to the API server.
#[derive(Parser, Debug, Clone)]
#[command(name = "qmesh-operator", version, about)]
pub struct Args {
    /// The operator's own namespace (its Lease and TLS Secret live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = "qmesh-system")]
    pub namespace: String,

    /// Identity for leader election (default: the hostname).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// HTTPS admission webhooks (`POST /inject`, `POST /validate`).
    #[arg(long, env = "QMESH_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,

    /// gRPC `qmesh.control.v1.Control` for sidecars.
    #[arg(long, env = "QMESH_CONTROL_ADDR", default_value = "0.0.0.0:7443")]
    pub control_addr: SocketAddr,

    /// HTTP `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "QMESH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// gRPC KEDA external scaler (`externalscaler.ExternalScaler`): a Subscription's backlog.
    #[arg(long, env = "QMESH_SCALER_ADDR", default_value = "0.0.0.0:7444")]
    pub scaler_addr: SocketAddr,

    /// Trust domain of the SPIFFE IDs in sidecar certificates.
    #[arg(long, env = "QMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Lifetime of the mesh CA's root; it rotates itself after 2/3 of it.
    #[arg(long, env = "QMESH_MESH_CA_VALIDITY", default_value = "8760h", value_parser = parse_duration)]
    pub mesh_ca_validity: Duration,

    /// Lifetime of a sidecar certificate (renewed at half-life).
    #[arg(long, env = "QMESH_CERTIFICATE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub certificate_ttl: Duration,

    /// Service in front of the webhook (for the certificate's DNS names).
    #[arg(long, env = "QMESH_WEBHOOK_SERVICE", default_value = "qmesh-webhook")]
    pub webhook_service: String,

    /// MutatingWebhookConfiguration whose `caBundle` the operator patches.
    #[arg(
        long,
        env = "QMESH_MUTATING_WEBHOOK_CONFIG",
        default_value = "qmesh-sidecar-injector"
    )]
    pub mutating_webhook_config: String,

    /// ValidatingWebhookConfiguration whose `caBundle` the operator patches.
    #[arg(
        long,
        env = "QMESH_VALIDATING_WEBHOOK_CONFIG",
        default_value = "qmesh-validator"
    )]
    pub validating_webhook_config: String,

    /// Secret holding the self-managed CA and serving certificate.
    #[arg(long, env = "QMESH_TLS_SECRET", default_value = "qmesh-webhook-tls")]
    pub tls_secret: String,

    /// Do not manage certificates: read `tls.crt`/`tls.key` from `--tls-dir` and reload on change.
    #[arg(long, env = "QMESH_CERT_MANAGER", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub cert_manager: bool,

    /// Directory of `tls.crt`/`tls.key` when `--cert-manager` is set.
    #[arg(long, env = "QMESH_TLS_DIR", default_value = "/etc/qmesh/tls")]
    pub tls_dir: PathBuf,

    /// Serving certificate lifetime; rotated when 2/3 of it elapsed.
    #[arg(long, env = "QMESH_CERT_VALIDITY", default_value = "8760h", value_parser = parse_duration)]
    pub cert_validity: Duration,

    /// What injected sidecars are told to dial (default `qmesh-control.<namespace>.svc:7443`).
    #[arg(long, env = "QMESH_CONTROL_PLANE_ADDRESS")]
    pub control_plane_address: Option<String>,

    /// Injected sidecar image.
    #[arg(long, env = "QMESH_SIDECAR_IMAGE", default_value = concat!("ghcr.io/qmesh/qmesh-sidecar:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,

    /// Injected sidecar's CPU request.
    #[arg(long, env = "QMESH_SIDECAR_CPU_REQUEST", default_value = "50m")]
    pub sidecar_cpu_request: String,

    /// Injected sidecar's CPU limit (none by default).
    #[arg(long, env = "QMESH_SIDECAR_CPU_LIMIT")]
    pub sidecar_cpu_limit: Option<String>,

    /// Injected sidecar's memory request.
    #[arg(long, env = "QMESH_SIDECAR_MEMORY_REQUEST", default_value = "32Mi")]
    pub sidecar_memory_request: String,

    /// Injected sidecar's memory limit.
    #[arg(long, env = "QMESH_SIDECAR_MEMORY_LIMIT", default_value = "128Mi")]
    pub sidecar_memory_limit: String,

    /// Injected sidecar's log level.
    #[arg(long, env = "QMESH_SIDECAR_LOG_LEVEL", default_value = "info")]
    pub sidecar_log_level: String,

    /// Injected sidecar's data volume: the emptyDir's `sizeLimit` and the `ephemeral-storage`
    /// request; the sidecar owns at most three quarters of it (`--max-owned-bytes`). Annotation
    /// `qmesh.io/data-size` overrides it per pod.
    #[arg(long, env = "QMESH_SIDECAR_DATA_SIZE", default_value = "1Gi")]
    pub sidecar_data_size: String,

    /// coordination.k8s.io/v1 Lease (in `--namespace`) for leader election.
    #[arg(long, env = "QMESH_LEASE_NAME", default_value = "qmesh-operator")]
    pub lease_name: String,

    /// How long a leader's Lease lasts without renewal before another replica may take over.
    #[arg(long, env = "QMESH_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How long a Queue's deletion may be blocked (by subscriptions or backlog) before the operator
    /// lets it go anyway.
    #[arg(long, env = "QMESH_DELETION_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub deletion_grace: Duration,

    /// DANGER — tests and local development only: accept every sidecar's `Hello` without checking
    /// its token, so any client that can reach the control port can read every mesh view and
    /// pretend to be any pod. Never set this in a real cluster.
    #[arg(long, env = "QMESH_INSECURE_SKIP_SIDECAR_AUTH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub insecure_skip_sidecar_auth: bool,

    /// Log format.
    #[arg(long, env = "QMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Text,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<qmesh_api::Duration>()
        .map(qmesh_api::Duration::get)
        .map_err(|e| e.to_string())
}

/// What the controllers, the elector and the control plane need.
#[derive(Debug, Clone)]
pub struct Config {
    /// The operator's namespace (the Lease lives here).
    pub namespace: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    /// Lease name.
    pub lease_name: String,
    /// Lease duration.
    pub lease_duration: Duration,
    /// gRPC control-plane address.
    pub control_addr: SocketAddr,
    /// Metrics/health address.
    pub metrics_addr: SocketAddr,
    /// KEDA external scaler address (not served when `None`).
    pub scaler_addr: Option<SocketAddr>,
    /// Longest a Queue deletion stays blocked.
    pub deletion_grace: Duration,
    /// Skip TokenReview of sidecars (tests/dev only).
    pub insecure_skip_sidecar_auth: bool,
    /// Shortest interval between two status writes of one object when only its counters changed.
    pub status_interval: Duration,
    /// Trust domain of sidecar SPIFFE IDs.
    pub trust_domain: String,
    /// Lifetime of sidecar certificates.
    pub certificate_ttl: Duration,
    /// Lifetime of the mesh CA's root.
    pub mesh_ca_validity: Duration,
}

impl Config {
    /// Defaults for tests and embedding: loopback ports must still be set by the caller.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            identity: identity.into(),
            lease_name: "qmesh-operator".into(),
            lease_duration: Duration::from_secs(15),
            control_addr: SocketAddr::from(([127, 0, 0, 1], 7443)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            scaler_addr: None,
            deletion_grace: Duration::from_secs(600),
            insecure_skip_sidecar_auth: false,
            status_interval: Duration::from_secs(2),
            trust_domain: "cluster.local".into(),
            certificate_ttl: qmesh_identity::CERTIFICATE_TTL,
            mesh_ca_validity: Duration::from_secs(365 * 86_400),
        }
    }
}

/// What the admission webhooks and their TLS need (served by `webhook::serve`).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The operator's namespace (the TLS Secret lives here).
    pub namespace: String,
    /// Trust domain of the mesh CA (whose bundle injected sidecars trust).
    pub trust_domain: String,
    /// HTTPS listen address.
    pub addr: SocketAddr,
    /// Service name for the certificate's DNS names.
    pub service: String,
    /// MutatingWebhookConfiguration to patch.
    pub mutating_webhook_config: String,
    /// ValidatingWebhookConfiguration to patch.
    pub validating_webhook_config: String,
    /// TLS Secret name.
    pub tls_secret: String,
    /// Certificates come from cert-manager via `tls_dir`.
    pub cert_manager: bool,
    /// Certificate directory (cert-manager mode).
    pub tls_dir: PathBuf,
    /// Serving certificate lifetime.
    pub cert_validity: Duration,
    /// Address injected sidecars dial.
    pub control_plane_address: String,
    /// Injected image.
    pub sidecar_image: String,
    /// CPU request.
    pub sidecar_cpu_request: String,
    /// CPU limit.
    pub sidecar_cpu_limit: Option<String>,
    /// Memory request.
    pub sidecar_memory_request: String,
    /// Memory limit.
    pub sidecar_memory_limit: String,
    /// Sidecar log level.
    pub sidecar_log_level: String,
    /// Sidecar data volume size.
    pub sidecar_data_size: String,
}

impl Args {
    /// The operator half of the configuration.
    pub fn config(&self) -> Config {
        Config {
            namespace: self.namespace.clone(),
            identity: self.pod_name.clone().unwrap_or_else(hostname),
            lease_name: self.lease_name.clone(),
            lease_duration: self.lease_duration,
            control_addr: self.control_addr,
            metrics_addr: self.metrics_addr,
            scaler_addr: Some(self.scaler_addr),
            deletion_grace: self.deletion_grace,
            insecure_skip_sidecar_auth: self.insecure_skip_sidecar_auth,
            status_interval: Duration::from_secs(2),
            trust_domain: self.trust_domain.clone(),
            certificate_ttl: self.certificate_ttl,
            mesh_ca_validity: self.mesh_ca_validity,
        }
    }

    /// The webhook half of the configuration.
    pub fn webhook(&self) -> WebhookConfig {
        WebhookConfig {
            namespace: self.namespace.clone(),
            trust_domain: self.trust_domain.clone(),
            addr: self.webhook_addr,
            service: self.webhook_service.clone(),
            mutating_webhook_config: self.mutating_webhook_config.clone(),
            validating_webhook_config: self.validating_webhook_config.clone(),
            tls_secret: self.tls_secret.clone(),
            cert_manager: self.cert_manager,
            tls_dir: self.tls_dir.clone(),
            cert_validity: self.cert_validity,
            control_plane_address: self
                .control_plane_address
                .clone()
                .unwrap_or_else(|| format!("qmesh-control.{}.svc:7443", self.namespace)),
            sidecar_image: self.sidecar_image.clone(),
            sidecar_cpu_request: self.sidecar_cpu_request.clone(),
            sidecar_cpu_limit: self.sidecar_cpu_limit.clone(),
            sidecar_memory_request: self.sidecar_memory_request.clone(),
            sidecar_memory_limit: self.sidecar_memory_limit.clone(),
            sidecar_log_level: self.sidecar_log_level.clone(),
            sidecar_data_size: self.sidecar_data_size.clone(),
        }
    }
}

/// The machine's hostname (a pod's hostname is its name), for the default `--pod-name`.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "qmesh-operator".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_chart_contract() {
        let args = Args::try_parse_from(["qmesh-operator"]).unwrap();
        assert_eq!(args.webhook_addr.to_string(), "0.0.0.0:9443");
        assert_eq!(args.control_addr.to_string(), "0.0.0.0:7443");
        assert_eq!(args.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(args.scaler_addr.to_string(), "0.0.0.0:7444");
        assert_eq!(args.lease_name, "qmesh-operator");
        assert_eq!(args.lease_duration, Duration::from_secs(15));
        assert_eq!(args.cert_validity, Duration::from_secs(8760 * 3600));
        assert_eq!(args.deletion_grace, Duration::from_secs(600));
        assert_eq!(args.log_format, LogFormat::Json);
        assert!(!args.cert_manager && !args.insecure_skip_sidecar_auth);
        assert_eq!(args.sidecar_memory_limit, "128Mi");
        assert_eq!(args.sidecar_cpu_limit, None);
    }

    #[test]
    fn control_plane_address_defaults_to_the_service_in_the_namespace() {
        let args = Args::try_parse_from(["qmesh-operator", "--namespace", "ops", "--cert-manager"])
            .unwrap();
        assert_eq!(
            args.webhook().control_plane_address,
            "qmesh-control.ops.svc:7443"
        );
        assert!(args.cert_manager);
    }

    #[test]
    fn durations_are_written_like_kubernetes_durations() {
        let args = Args::try_parse_from([
            "qmesh-operator",
            "--lease-duration",
            "4s",
            "--deletion-grace",
            "1h30m",
            "--log-format",
            "text",
        ])
        .unwrap();
        assert_eq!(args.lease_duration, Duration::from_secs(4));
        assert_eq!(args.deletion_grace, Duration::from_secs(5400));
        assert_eq!(args.log_format, LogFormat::Text);
        assert!(Args::try_parse_from(["qmesh-operator", "--lease-duration", "soon"]).is_err());
    }
}
