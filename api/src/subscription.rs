//! The `Subscription` resource: a consumer group on one Queue, selecting consumer pods by labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, PodSelector, RateLimit, StartAt};

/// A Subscription: a named consumer group on one Queue. It receives every message of the Queue
/// (publish/subscribe); inside it, each message goes to exactly one consumer pod (competing consumers).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "qmesh.io",
    version = "v1alpha1",
    kind = "Subscription",
    doc = "A Subscription: a consumer group on one Queue. It receives every message of the Queue; inside it, each message goes to exactly one consumer pod.",
    namespaced,
    status = "SubscriptionStatus",
    category = "qmesh",
    shortname = "qms",
    printcolumn = r#"{"name":"Queue","type":"string","jsonPath":".spec.queue"}"#,
    printcolumn = r#"{"name":"Consumers","type":"integer","jsonPath":".status.consumers"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog"}"#,
    printcolumn = r#"{"name":"Scheduled","type":"integer","priority":1,"jsonPath":".status.scheduled"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionSpec {
    /// Name of the Queue (same namespace) this Subscription consumes. Cannot be changed after creation:
    /// create a new Subscription instead.
    #[schemars(length(min = 1, max = 253))]
    pub queue: String,

    /// Consumer pods of this Subscription, selected by labels and optionally by service account
    /// (`serviceAccounts`). Each message goes to exactly one of them.
    pub consumers: PodSelector,

    /// How messages reach the consumer pods.
    #[serde(default)]
    pub delivery: Delivery,

    /// Rate limit for the whole Subscription, split across its ready consumer pods. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Redelivery of messages that were nacked or not acked in time.
    #[serde(default)]
    pub retry: Retry,

    /// Queue receiving messages that exhausted `retry.maxDeliveries`; overrides the Queue's
    /// `deadLetterQueue`. Must not be this Subscription's own queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,

    /// Only messages matching this filter are delivered; the others are skipped for this Subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,

    /// Where a new Subscription starts: `Latest` (the default: messages published from now on),
    /// `Earliest` (every message its queue's owners still keep, acked ones included inside the
    /// Queue's `retention.keepAcked`), or an RFC 3339 time (kept messages published since then).
    /// Read once, when an owner first serves the Subscription; `qmesh sub rewind` replays later.
    #[serde(default, skip_serializing_if = "StartAt::is_latest")]
    pub start_at: StartAt,
}

/// How messages reach consumer apps.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// `Pull`: the app subscribes (gRPC stream) or polls (HTTP) its sidecar. `Push`: the sidecar POSTs
    /// each message to the app (2xx = ack, 429/503 = retry later, other statuses = nack).
    #[serde(default)]
    pub mode: DeliveryMode,

    /// Where the app listens for pushed messages; required when `mode` is `Push`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,

    /// Most un-acknowledged messages held by one consumer pod at once (1 to 10000). This is the
    /// backpressure window: the sidecar grants credits to owners only as the app makes room.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_in_flight: u32,

    /// A delivery not acknowledged within this time (e.g. `30s`) is redelivered, possibly to another
    /// consumer pod.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Duration,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::default(),
            push: None,
            max_in_flight: default_max_in_flight(),
            ack_timeout: default_ack_timeout(),
        }
    }
}

fn default_max_in_flight() -> u32 {
    32
}

fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Delivery mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeliveryMode {
    /// The app pulls from its sidecar.
    #[default]
    Pull,
    /// The sidecar pushes to the app over HTTP.
    Push,
}

/// The app's HTTP endpoint for push delivery, on the pod's loopback interface.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Push {
    /// Port the app listens on (1 to 65535).
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// HTTP path messages are POSTed to; must start with `/`.
    #[serde(default = "default_push_path")]
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
}

fn default_push_path() -> String {
    "/".to_owned()
}

/// Redelivery policy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Deliveries attempted before the message goes to the dead-letter queue (at least 1).
    #[serde(default = "default_max_deliveries")]
    #[schemars(range(min = 1))]
    pub max_deliveries: u32,

    /// Exponential backoff between deliveries, with jitter.
    #[serde(default)]
    pub backoff: Backoff,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_deliveries: default_max_deliveries(),
            backoff: Backoff::default(),
        }
    }
}

fn default_max_deliveries() -> u32 {
    5
}

/// Exponential backoff: `initial`, then `initial × multiplier`, ... capped at `max`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// Delay before the first redelivery (e.g. `1s`); at most `max`.
    #[serde(default = "default_initial_backoff")]
    pub initial: Duration,

    /// Longest delay between deliveries (e.g. `60s`).
    #[serde(default = "default_max_backoff")]
    pub max: Duration,

    /// Factor applied to the delay after each failed delivery (integer, at least 1).
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 1, max = 100))]
    pub multiplier: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: default_initial_backoff(),
            max: default_max_backoff(),
            multiplier: default_multiplier(),
        }
    }
}

fn default_initial_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

fn default_multiplier() -> u32 {
    2
}

/// Selects messages by their headers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    /// Header name/value pairs that must all be present on a message for it to be delivered.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

impl Filter {
    /// Whether a message with these headers passes the filter.
    pub fn matches<'a>(&self, mut header: impl FnMut(&str) -> Option<&'a str>) -> bool {
        self.headers
            .iter()
            .all(|(name, value)| header(name) == Some(value.as_str()))
    }
}

/// Observed state of a Subscription, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStatus {
    /// Current conditions; `Ready` says whether messages can flow and, if not, why.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of ready consumer pods.
    #[serde(default)]
    pub consumers: u32,

    /// Messages published to the Queue that this Subscription has not yet acknowledged.
    #[serde(default)]
    pub backlog: u64,

    /// Messages delivered to consumer pods and not yet settled.
    #[serde(default)]
    pub in_flight: u64,

    /// Of the backlog, delayed or scheduled messages not due yet.
    #[serde(default)]
    pub scheduled: u64,

    /// Messages moved to the dead-letter queue since the Subscription was created.
    #[serde(default)]
    pub dead_lettered: u64,
}
