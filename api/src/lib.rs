//! qmesh types: the `Queue` and `Subscription` custom resources (`qmesh.io/v1alpha1`), the small
//! value types their specs use, and [`validate`](crate::validate) — the rules a schema cannot
//! express, shared by the operator's webhook and controllers.
//!
//! ```text
//!   YAML / API server ──serde──▶ Queue, Subscription ──validate()──▶ operator, sidecar, `qmesh dev`
//!   Rust types ──schemars──▶ crds/*.yaml (written by `crdgen`, never by hand)
//! ```

pub mod crd;
mod duration;
mod queue;
mod selector;
mod sidecar;
mod size;
mod start;
mod status;
mod subscription;
pub mod validate;

pub use duration::{Duration, DurationError};
pub use queue::{
    DEFAULT_CHECK_AFTER, DEFAULT_CHECK_PATH, DEFAULT_MAX_CHECKS, DEFAULT_MAX_DELAY, Durability,
    MAX_DELAY_LIMIT, OnUnknown, Ordering, Overflow, PublishAck, Queue, QueueSpec, QueueStatus,
    RateLimit, Retention, Transaction,
};
pub use selector::{PodSelector, labels_match};
pub use sidecar::{SidecarDocument, SidecarMetadata, SidecarSpec};
pub use size::ByteSize;
pub use start::{StartAt, StartAtError};
pub use status::{conditions, ready_condition};
pub use subscription::{
    Backoff, Delivery, DeliveryMode, Filter, Push, Retry, Subscription, SubscriptionSpec,
    SubscriptionStatus,
};
pub use validate::{FieldError, Validate, ValidationErrors};

/// The API group of every qmesh resource.
pub const GROUP: &str = "qmesh.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
