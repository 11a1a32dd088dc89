//! The `Queue` resource: a named destination in a namespace that producers publish to.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ByteSize, Duration, PodSelector};

/// A Queue: a named destination that producers publish to. Every Subscription of the Queue receives
/// every message; a message is owned by the sidecar it was published to until every Subscription has
/// acknowledged it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "qmesh.io",
    version = "v1alpha1",
    kind = "Queue",
    doc = "A Queue: a named destination that producers publish to. Every Subscription of the Queue receives every message.",
    namespaced,
    status = "QueueStatus",
    category = "qmesh",
    shortname = "qmq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Subscriptions","type":"integer","jsonPath":".status.subscriptions"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog"}"#,
    printcolumn = r#"{"name":"In-Transaction","type":"integer","priority":1,"jsonPath":".status.halfMessages"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Pods allowed to publish to this Queue, selected by labels and optionally by service account
    /// (`serviceAccounts`). When absent, any qmesh-injected pod of the namespace may publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publishers: Option<PodSelector>,

    /// Where the owner sidecar keeps messages: `Disk` (a log on the pod's emptyDir, survives sidecar
    /// restarts) or `Memory` (fastest, survives nothing, still bounded).
    #[serde(default)]
    pub durability: Durability,

    /// When a publish is acknowledged: `Local` (once the owner persisted it) or `Replicated` (once a
    /// second sidecar persisted a copy too, so losing the producer's node loses nothing).
    #[serde(default)]
    pub publish_ack: PublishAck,

    /// Limits on the backlog each owner sidecar keeps, and what happens when one is reached.
    #[serde(default)]
    pub retention: Retention,

    /// Largest message accepted (payload plus headers), as a quantity such as `256Ki` or `1Mi`.
    /// Larger publishes are refused with 413 / INVALID_ARGUMENT.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: ByteSize,

    /// Delivery order: `None` (any order, maximum parallelism) or `Key` (messages of one ordering key
    /// from one producer are delivered in publish order, one in flight at a time).
    #[serde(default)]
    pub ordering: Ordering,

    /// Repeats of a producer-set message id inside this window (e.g. `10m`) are acknowledged but not
    /// stored twice. Absent: no de-duplication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window: Option<Duration>,

    /// Name of another Queue in this namespace that receives this Queue's dead letters (messages
    /// that exhausted their deliveries, expired or overflowed). Subscriptions may override it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,

    /// Publish rate limit applied per publisher pod. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_rate_limit: Option<RateLimit>,

    /// Longest delay a delayed or scheduled publish may ask for (gRPC `delay` / `deliver_at`, HTTP
    /// `qmesh-delay` / `qmesh-deliver-at`, AMQP `x-delay`), e.g. `1h`. Absent: 24h; at most 720h
    /// (30 days); `0s` refuses delayed publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Duration>,

    /// Transactional publishes (half messages with check-back): how long a transaction may stay
    /// open before the sidecar asks the producer app whether it committed, how often, and what an
    /// unanswered transaction becomes. Absent: the defaults of [`Transaction`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<Transaction>,
}

/// `maxDelay` when a Queue does not set it.
pub const DEFAULT_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The largest `maxDelay` a Queue may set.
pub const MAX_DELAY_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

impl QueueSpec {
    /// `maxDelay`, the default applied.
    pub fn effective_max_delay(&self) -> std::time::Duration {
        self.max_delay.map_or(DEFAULT_MAX_DELAY, |d| d.get())
    }
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            publishers: None,
            durability: Durability::default(),
            publish_ack: PublishAck::default(),
            retention: Retention::default(),
            max_message_bytes: default_max_message_bytes(),
            ordering: Ordering::default(),
            dedup_window: None,
            dead_letter_queue: None,
            publish_rate_limit: None,
            max_delay: None,
            transaction: None,
        }
    }
}

fn default_max_message_bytes() -> ByteSize {
    ByteSize::new("1Mi")
}

/// How a Queue's open transactions are resolved when the producer neither commits nor rolls back
/// (RocketMQ's transaction check-back).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transaction {
    /// How long a transaction may stay open before the sidecar asks the app about it, and the
    /// wait between two asks, e.g. `30s`. Absent: 10s; from 1s to 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_after: Option<Duration>,

    /// Most check-backs of one transaction; once they are spent, `onUnknown` applies. Absent: 15;
    /// from 1 to 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_checks: Option<u32>,

    /// What a transaction the app never resolved becomes: `Rollback` (none of its messages is
    /// delivered) or `Commit`.
    #[serde(default)]
    pub on_unknown: OnUnknown,

    /// Port on the pod's 127.0.0.1 where the app answers check-backs (`POST {checkPath}`; see
    /// docs/sidecar.md). Absent: the sidecar cannot ask, and `onUnknown` applies once
    /// `checkAfter` × `maxChecks` has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub check_port: Option<u16>,

    /// Path of the check-back endpoint. Absent: `/qmesh/transaction-check`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_path: Option<String>,
}

/// `transaction.checkAfter` when a Queue does not set it.
pub const DEFAULT_CHECK_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
/// `transaction.maxChecks` when a Queue does not set it.
pub const DEFAULT_MAX_CHECKS: u32 = 15;
/// `transaction.checkPath` when a Queue does not set it.
pub const DEFAULT_CHECK_PATH: &str = "/qmesh/transaction-check";

impl Transaction {
    /// `checkAfter`, the default applied.
    pub fn effective_check_after(&self) -> std::time::Duration {
        self.check_after.map_or(DEFAULT_CHECK_AFTER, |d| d.get())
    }

    /// `maxChecks`, the default applied.
    pub fn effective_max_checks(&self) -> u32 {
        self.max_checks.unwrap_or(DEFAULT_MAX_CHECKS)
    }

    /// `checkPath`, the default applied.
    pub fn effective_check_path(&self) -> &str {
        self.check_path.as_deref().unwrap_or(DEFAULT_CHECK_PATH)
    }
}

/// What an unresolved transaction becomes once its check-backs are spent.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnUnknown {
    /// None of its messages is ever delivered.
    #[default]
    Rollback,
    /// Its messages are delivered.
    Commit,
}

/// Where messages are kept.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Durability {
    /// In the owner sidecar's log on disk; survives sidecar and app restarts.
    #[default]
    Disk,
    /// In memory only; lost when the sidecar restarts.
    Memory,
}

/// When a publish is acknowledged to the producer.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PublishAck {
    /// Once the owner sidecar has persisted the message.
    #[default]
    Local,
    /// Once a second sidecar has persisted a copy as well.
    Replicated,
}

/// Backlog limits per owner sidecar. Absent limits are unlimited.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Most messages kept (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_messages: Option<u64>,

    /// Most payload bytes kept, as a quantity such as `512Mi` or `1Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,

    /// Oldest message kept, as a duration such as `24h`; older messages go to the dead-letter queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,

    /// Acked messages stay in the log this long after they were published (like Kafka's
    /// `retention.ms`), inside the same byte limits, so a Subscription can start at `Earliest` or a
    /// time and be rewound (`qmesh sub rewind`). Needs `durability: Disk`. Absent: an acked
    /// message is gone once every subscription acked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_acked: Option<Duration>,

    /// What a publish does when a limit is reached: `Reject` (refused with 429 /
    /// RESOURCE_EXHAUSTED: backpressure to the publisher), `DropOldest`, or `DeadLetter` (the
    /// oldest message moves to the dead-letter queue).
    #[serde(default)]
    pub overflow: Overflow,
}

/// What happens to a publish when retention limits are reached.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Overflow {
    /// Refuse the publish: backpressure to the publisher.
    #[default]
    Reject,
    /// Drop the oldest message to make room.
    DropOldest,
    /// Move the oldest message to the dead-letter queue to make room.
    DeadLetter,
}

/// Delivery ordering.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Ordering {
    /// No ordering promise.
    #[default]
    None,
    /// Per ordering key: publish order, one in flight at a time.
    Key,
}

/// A token-bucket rate limit.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained rate in messages per second (greater than 0; fractions allowed, e.g. 0.5).
    #[schemars(range(min = 0.001))]
    pub messages_per_second: f64,

    /// How many messages may pass at once after a quiet period (at least 1). Defaults to one second's
    /// worth of the rate, rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

impl RateLimit {
    /// The effective bucket size.
    pub fn burst_or_default(&self) -> u32 {
        self.burst.unwrap_or_else(|| {
            let per_second = self.messages_per_second.ceil();
            if per_second >= f64::from(u32::MAX) {
                u32::MAX
            } else {
                (per_second as u32).max(1)
            }
        })
    }
}

/// Observed state of a Queue, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Current conditions; `Ready` says whether the Queue is usable and, if not, why.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of ready pods selected as publishers.
    #[serde(default)]
    pub publishers: u32,

    /// Number of Subscriptions of this Queue.
    #[serde(default)]
    pub subscriptions: u32,

    /// Messages held by owner sidecars and not yet acknowledged by every Subscription.
    #[serde(default)]
    pub backlog: u64,

    /// Half messages: published in transactions still open, stored but not deliverable yet.
    #[serde(default)]
    pub half_messages: u64,
}
