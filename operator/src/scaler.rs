//! KEDA's external scaler, answered from the control plane's index: a Subscription's backlog —
//! the messages its owners still owe it, summed over the sidecars that report to this replica —
//! so a ScaledObject scales a consumer Deployment on backlog with no Prometheus in between.
//!
//! ```text
//!   ScaledObject trigger {type: external | external-push,
//!                         metadata: {scalerAddress, subscription, targetBacklog, activationBacklog}}
//!     KEDA ──IsActive / StreamIsActive / GetMetricSpec / GetMetrics──▶ Scaler ──▶ Index
//!                                                                                  ▲
//!                                           sidecars' stats (Control/Join) ────────┘
//! ```
//!
//! Only the leader has the sidecars' stats (they join `qmesh-control`, which selects the leader),
//! so the chart's `qmesh-scaler` Service selects the leader too. Read-only: it answers numbers,
//! never changes anything.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use qmesh_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
    external_scaler_server::{ExternalScaler, ExternalScalerServer},
};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::index::Index;

/// Backlog per replica the HPA aims at when the trigger does not say (`targetBacklog`).
pub const DEFAULT_TARGET_BACKLOG: f64 = 100.0;
/// How often `StreamIsActive` looks at the backlog (it pushes only changes).
const STREAM_EVERY: Duration = Duration::from_secs(1);

/// What a ScaledObject's trigger asks for.
#[derive(Debug, Clone, PartialEq)]
struct Trigger {
    namespace: String,
    subscription: String,
    /// Backlog per consumer replica.
    target: f64,
    /// Active (scale from zero) once the backlog is above this.
    activation: f64,
}

impl Trigger {
    /// Reads a trigger's `metadata`: `subscription` (required), `namespace` (default: the
    /// ScaledObject's), `targetBacklog` (default 100), `activationBacklog` (default 0).
    fn of(scaled: &ScaledObjectRef) -> Result<Self, Status> {
        let meta = &scaled.scaler_metadata;
        let subscription = meta
            .get("subscription")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(
                    "the trigger's metadata must name the Subscription to scale on: subscription: <name>",
                )
            })?
            .clone();
        let namespace = meta
            .get("namespace")
            .filter(|s| !s.is_empty())
            .unwrap_or(&scaled.namespace)
            .clone();
        let target = number(meta, "targetBacklog", DEFAULT_TARGET_BACKLOG)?;
        if target <= 0.0 {
            return Err(Status::invalid_argument(format!(
                "targetBacklog must be above 0 (the backlog per consumer replica), not {target}"
            )));
        }
        let activation = number(meta, "activationBacklog", 0.0)?;
        Ok(Self {
            namespace,
            subscription,
            target,
            activation,
        })
    }

    /// The metric's name: unique per Subscription, a valid HPA external metric name.
    fn metric_name(&self) -> String {
        format!("qmesh-backlog-{}-{}", self.namespace, self.subscription)
    }
}

/// A finite, non-negative number from the metadata, or `default` when absent.
fn number(meta: &HashMap<String, String>, key: &str, default: f64) -> Result<f64, Status> {
    let Some(text) = meta.get(key) else {
        return Ok(default);
    };
    match text.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
        _ => Err(Status::invalid_argument(format!(
            "{key}: {text:?} is not a number of messages (0 or more)"
        ))),
    }
}

/// The `ExternalScaler` service.
#[derive(Clone)]
pub struct Scaler {
    index: Arc<Index>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Scaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaler").finish_non_exhaustive()
    }
}

impl Scaler {
    /// A scaler over `index`; open `StreamIsActive` streams end at `shutdown`.
    pub fn new(index: Arc<Index>, shutdown: CancellationToken) -> Self {
        Self { index, shutdown }
    }

    /// The gRPC service.
    pub fn service(self) -> ExternalScalerServer<Self> {
        ExternalScalerServer::new(self)
    }

    /// The Subscription's backlog now.
    fn backlog(&self, trigger: &Trigger) -> Result<u64, Status> {
        let subscription = self
            .index
            .subscription(&trigger.namespace, &trigger.subscription)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no Subscription {}/{}",
                    trigger.namespace, trigger.subscription
                ))
            })?;
        Ok(self.index.observe_subscription(&subscription).backlog)
    }

    fn active(&self, trigger: &Trigger) -> Result<bool, Status> {
        #[allow(clippy::cast_precision_loss)]
        Ok(self.backlog(trigger)? as f64 > trigger.activation)
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let trigger = Trigger::of(request.get_ref())?;
        let result = self.active(&trigger)?;
        Ok(Response::new(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let trigger = Trigger::of(request.get_ref())?;
        let first = self.active(&trigger)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let scaler = self.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx
                .send(Ok(IsActiveResponse { result: first }))
                .await
                .is_err()
            {
                return;
            }
            let mut every = tokio::time::interval(STREAM_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = tx.closed() => return,
                    () = scaler.shutdown.cancelled() => return,
                }
                match scaler.active(&trigger) {
                    Ok(active) if active == last => {}
                    Ok(active) => {
                        last = active;
                        if tx
                            .send(Ok(IsActiveResponse { result: active }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    // The Subscription went away: the stream ends with why.
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let trigger = Trigger::of(request.get_ref())?;
        #[allow(clippy::cast_possible_truncation)]
        let target_size = trigger.target.ceil() as i64;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: trigger.metric_name(),
                target_size,
                target_size_float: trigger.target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let scaled = request
            .get_ref()
            .scaled_object_ref
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is missing"))?;
        let trigger = Trigger::of(scaled)?;
        let backlog = self.backlog(&trigger)?;
        #[allow(clippy::cast_precision_loss)]
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: trigger.metric_name(),
                metric_value: i64::try_from(backlog).unwrap_or(i64::MAX),
                metric_value_float: backlog as f64,
            }],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaled(meta: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: "billing-workers".into(),
            namespace: "shop".into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn a_trigger_names_its_subscription_and_defaults_the_rest() {
        let trigger = Trigger::of(&scaled(&[("subscription", "billing")])).unwrap();
        assert_eq!(
            trigger,
            Trigger {
                namespace: "shop".into(),
                subscription: "billing".into(),
                target: DEFAULT_TARGET_BACKLOG,
                activation: 0.0,
            }
        );
        assert_eq!(trigger.metric_name(), "qmesh-backlog-shop-billing");
        let other = Trigger::of(&scaled(&[
            ("subscription", "billing"),
            ("namespace", "payments"),
            ("targetBacklog", "250"),
            ("activationBacklog", "5"),
        ]))
        .unwrap();
        assert_eq!(
            (other.namespace.as_str(), other.target, other.activation),
            ("payments", 250.0, 5.0)
        );
    }

    #[test]
    fn a_bad_trigger_is_refused_naming_what_is_wrong() {
        for (meta, says) in [
            (vec![], "subscription"),
            (vec![("subscription", "")], "subscription"),
            (
                vec![("subscription", "billing"), ("targetBacklog", "0")],
                "targetBacklog",
            ),
            (
                vec![("subscription", "billing"), ("targetBacklog", "lots")],
                "targetBacklog",
            ),
            (
                vec![("subscription", "billing"), ("activationBacklog", "-1")],
                "activationBacklog",
            ),
            (
                vec![("subscription", "billing"), ("targetBacklog", "NaN")],
                "targetBacklog",
            ),
        ] {
            let refused = Trigger::of(&scaled(&meta)).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument);
            assert!(refused.message().contains(says), "{}", refused.message());
        }
    }
}
