//! Prometheus metrics and the health endpoints, served on `--metrics-addr`.
//!
//! ```text
//!   controllers ─┐
//!   control plane├──▶ Metrics (prometheus-client registry) ──GET /metrics──▶ Prometheus
//!   elector ─────┘
//!   GET /healthz: the process serves HTTP.  GET /readyz: the indexes have synced once.
//! ```

use std::{
    net::SocketAddr,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

/// Labels of reconciliation counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `Queue` or `Subscription`.
    pub kind: String,
    /// `ok`, `error` or `blocked`.
    pub result: String,
}

/// Labels naming a kind of resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Queue` or `Subscription`.
    pub kind: String,
}

/// Labels of error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `Queue` or `Subscription`.
    pub kind: String,
    /// [`crate::controller::Error::metric_label`].
    pub error: String,
}

type HistogramFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

/// Labels of the admission webhook counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `inject` or `validate`.
    pub webhook: String,
    /// [`WebhookResult`] as text.
    pub result: String,
}

/// How the operator answered one admission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookResult {
    /// `inject`: the pod was patched with the sidecar.
    Injected,
    /// `inject`: allowed unchanged (not opted in, already injected, host network).
    Skipped,
    /// `validate`: the Queue or Subscription is valid.
    Allowed,
    /// `validate`: refused, the spec breaks a rule (the user's error, not the webhook's).
    Denied,
    /// Either: the webhook failed — the request was not an AdmissionReview, or the pod could not
    /// be patched. An injection error refuses the pod.
    Error,
}

impl WebhookResult {
    const ALL: [Self; 5] = [
        Self::Injected,
        Self::Skipped,
        Self::Allowed,
        Self::Denied,
        Self::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped => "skipped",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }

    fn of(self, webhook: &str) -> bool {
        match self {
            Self::Injected | Self::Skipped => webhook == "inject",
            Self::Allowed | Self::Denied => webhook == "validate",
            Self::Error => true,
        }
    }
}

/// Admission requests answered, process-wide: the webhook server runs beside [`crate::run`] (from
/// `main.rs`) and shares no state with it, so its counter lives here and every [`Metrics`]
/// registry exports it. Every label pair exists from the start at 0, so the first error is an
/// increase an alert sees.
static WEBHOOK_REQUESTS: LazyLock<Family<WebhookLabels, Counter>> = LazyLock::new(|| {
    let family = Family::<WebhookLabels, Counter>::default();
    for webhook in ["inject", "validate"] {
        for result in WebhookResult::ALL.into_iter().filter(|r| r.of(webhook)) {
            drop(family.get_or_create(&WebhookLabels {
                webhook: webhook.to_owned(),
                result: result.label().to_owned(),
            }));
        }
    }
    family
});

/// Counts one admission request `webhook` (`inject`, `validate`) answered with `result`.
pub fn webhook_answered(webhook: &'static str, result: WebhookResult) {
    WEBHOOK_REQUESTS
        .get_or_create(&WebhookLabels {
            webhook: webhook.to_owned(),
            result: result.label().to_owned(),
        })
        .inc();
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    reconciliations: Family<ReconcileLabels, Counter>,
    reconcile_duration: HistogramFamily,
    errors: Family<ErrorLabels, Counter>,
    status_writes: Family<KindLabels, Counter>,
    /// Sidecars with an open, authenticated control stream.
    pub connected_sidecars: Gauge,
    /// Mesh views sent to sidecars.
    pub views_sent: Counter,
    /// Sidecars refused at `Hello`.
    pub sidecars_rejected: Counter,
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Metrics ===

impl Metrics {
    /// A fresh registry with every metric registered under the `qmesh_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("qmesh_operator");
        let reconciliations = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations by kind and result",
            reconciliations.clone(),
        );
        let reconcile_duration: HistogramFamily =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            reconcile_duration.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by kind and error",
            errors.clone(),
        );
        let status_writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Status patches written",
            status_writes.clone(),
        );
        let connected_sidecars = Gauge::default();
        registry.register(
            "control_connected_sidecars",
            "Sidecars connected to this replica's control plane",
            connected_sidecars.clone(),
        );
        let views_sent = Counter::default();
        registry.register(
            "control_views_sent",
            "Mesh views sent to sidecars",
            views_sent.clone(),
        );
        let sidecars_rejected = Counter::default();
        registry.register(
            "control_sidecars_rejected",
            "Sidecars refused at Hello (bad token, wrong pod)",
            sidecars_rejected.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        registry.register(
            "webhook_requests",
            "Admission requests answered by this replica's webhooks, by webhook and result",
            WEBHOOK_REQUESTS.clone(),
        );
        Self {
            registry,
            reconciliations,
            reconcile_duration,
            errors,
            status_writes,
            connected_sidecars,
            views_sent,
            sidecars_rejected,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// Counts one reconciliation of `kind` with its outcome and duration.
    pub fn reconciled(&self, kind: &str, result: &str, took: Duration) {
        self.reconciliations
            .get_or_create(&ReconcileLabels {
                kind: kind.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a failed reconciliation by error kind.
    pub fn failed(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
                error: error.to_owned(),
            })
            .inc();
    }

    /// Counts a status write.
    pub fn status_written(&self, kind: &str) {
        self.status_writes
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Marks the replica ready (indexes synced).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the metrics address (so a port clash fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn ready_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "indexes not synced yet")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_with_the_prefix() {
        let metrics = Metrics::new();
        metrics.reconciled("Queue", "ok", Duration::from_millis(3));
        metrics.failed("Queue", "kube");
        metrics.leader.set(1);
        let text = metrics.encode();
        for name in [
            "qmesh_operator_reconciliations_total{kind=\"Queue\",result=\"ok\"} 1",
            "qmesh_operator_reconcile_duration_seconds_count{kind=\"Queue\"} 1",
            "qmesh_operator_reconcile_errors_total{kind=\"Queue\",error=\"kube\"} 1",
            "qmesh_operator_leader 1",
            "qmesh_operator_control_connected_sidecars 0",
            "qmesh_operator_control_views_sent_total 0",
            "qmesh_operator_webhook_requests_total{webhook=\"inject\",result=\"error\"}",
            "qmesh_operator_webhook_requests_total{webhook=\"validate\",result=\"denied\"}",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert!(
            !text.contains("webhook=\"validate\",result=\"injected\""),
            "only the results a webhook can give: {text}"
        );
    }

    #[test]
    fn webhook_answers_are_counted_by_webhook_and_result() {
        let metrics = Metrics::new();
        let series = "qmesh_operator_webhook_requests_total{webhook=\"inject\",result=\"error\"} ";
        let count = |text: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
        };
        // Process-wide (other tests may count too): it grows by at least one.
        let before = count(&metrics.encode());
        webhook_answered("inject", WebhookResult::Error);
        assert!(count(&metrics.encode()) > before);
    }
}
