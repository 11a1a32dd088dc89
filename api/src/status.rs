//! Status conditions shared by Queue and Subscription: the condition type, the reasons the operator
//! reports, and a builder so every writer spells them the same way.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types and reasons (CamelCase, as Kubernetes conditions are).
pub mod conditions {
    /// The one condition every qmesh resource carries.
    pub const READY: &str = "Ready";

    /// Everything the resource needs exists and is valid.
    pub const REASON_READY: &str = "Ready";
    /// The spec breaks a rule the schema cannot express (see the message).
    pub const REASON_INVALID: &str = "Invalid";
    /// A Subscription's queue does not exist.
    pub const REASON_QUEUE_NOT_FOUND: &str = "QueueNotFound";
    /// The configured dead-letter queue does not exist.
    pub const REASON_DEAD_LETTER_QUEUE_NOT_FOUND: &str = "DeadLetterQueueNotFound";
    /// No ready pod matches the Subscription's consumer selector.
    pub const REASON_NO_CONSUMERS: &str = "NoConsumers";
    /// Deletion waits until subscriptions or backlog are gone.
    pub const REASON_DELETION_BLOCKED: &str = "DeletionBlocked";
}

/// Builds the `Ready` condition for a resource at `generation`, observed at `now`.
pub fn ready_condition(
    ready: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: conditions::READY.to_owned(),
        status: if ready { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now,
    }
}
