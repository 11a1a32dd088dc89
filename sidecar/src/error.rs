//! One error type for everything an app or peer can be refused with, each variant with a stable wire
//! code (`qmesh.v1.ErrorCode`) mapped once to a gRPC status and once to an HTTP status.

use std::time::Duration;

use qmesh_proto::v1::ErrorCode;

/// Why a request was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// No such queue in this sidecar's view.
    #[error(
        "unknown queue {0:?}: no Queue of that name is in this pod's namespace (kubectl get queues)"
    )]
    UnknownQueue(String),
    /// No such subscription served here.
    #[error(
        "unknown subscription {0:?}: no Subscription of that name selects this pod as a consumer"
    )]
    UnknownSubscription(String),
    /// The pod is not selected as a publisher of the queue.
    #[error(
        "this pod may not publish to queue {0:?}: it is not selected by the Queue's spec.publishers"
    )]
    NotPublisher(String),
    /// Payload + headers exceed the queue's limit.
    #[error("message of {size} bytes exceeds queue {queue:?}'s maxMessageBytes of {limit}")]
    TooLarge {
        /// Queue name.
        queue: String,
        /// Message size.
        size: usize,
        /// The limit.
        limit: u64,
    },
    /// Retention limits reached with overflow Reject.
    #[error("queue {queue:?} is full ({limit}); retry later or raise spec.retention")]
    BacklogFull {
        /// Queue name.
        queue: String,
        /// Which limit.
        limit: String,
        /// Suggested wait.
        retry_after: Duration,
    },
    /// Publish rate limit hit.
    #[error("publish rate limit of queue {queue:?} exceeded")]
    RateLimited {
        /// Queue name.
        queue: String,
        /// Suggested wait.
        retry_after: Duration,
    },
    /// Malformed request.
    #[error("{0}")]
    Invalid(String),
    /// Draining before shutdown.
    #[error("sidecar is shutting down; retry against the restarted sidecar")]
    ShuttingDown,
    /// `publishAck: Replicated` and no replica confirmed a copy in time (like Kafka's
    /// NOT_ENOUGH_REPLICAS).
    #[error("no replica available for queue {queue:?} (publishAck: Replicated): {reason}")]
    ReplicaUnavailable {
        /// Queue name.
        queue: String,
        /// Why (no peers, unreachable, timed out, refused).
        reason: String,
    },
    /// No open or recently settled transaction of that id.
    #[error(
        "unknown transaction {0:?}: open one with BeginTransaction (POST /v1/transactions); a \
         transaction the sidecar lost in a restart is settled by check-back"
    )]
    UnknownTransaction(String),
    /// A commit of a rolled-back transaction, or a rollback of a committed one.
    #[error("transaction {transaction:?} is already {state}")]
    TransactionSettled {
        /// The transaction.
        transaction: String,
        /// `committed` or `rolled back`.
        state: &'static str,
    },
    /// Too many transactions open, or too much in one.
    #[error("{0}")]
    TransactionLimit(String),
    /// The log could not persist.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The disk under the log is full: nothing was written; retried once space returns (settled
    /// messages free it).
    #[error("{0}")]
    DiskFull(String),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownQueue(_) => ErrorCode::UnknownQueue,
            Self::UnknownSubscription(_) => ErrorCode::UnknownSubscription,
            Self::NotPublisher(_) => ErrorCode::PermissionDenied,
            Self::TooLarge { .. } => ErrorCode::MessageTooLarge,
            Self::BacklogFull { .. } => ErrorCode::BacklogFull,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::Invalid(_) => ErrorCode::Invalid,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::ReplicaUnavailable { .. } => ErrorCode::ReplicaUnavailable,
            Self::UnknownTransaction(_) => ErrorCode::UnknownTransaction,
            Self::TransactionSettled { .. } => ErrorCode::TransactionSettled,
            Self::TransactionLimit(_) => ErrorCode::BacklogFull,
            Self::Storage(_) | Self::DiskFull(_) => ErrorCode::Storage,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Short label for metrics and JSON (`unknown_queue`, `backlog_full`, ...).
    pub fn label(&self) -> &'static str {
        label(self.code())
    }

    /// When a retry may succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::BacklogFull { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::DiskFull(_) | Self::TransactionLimit(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The HTTP status of the HTTP/JSON API.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            ErrorCode::UnknownQueue
            | ErrorCode::UnknownSubscription
            | ErrorCode::UnknownTransaction => 404,
            ErrorCode::TransactionSettled => 409,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::MessageTooLarge => 413,
            ErrorCode::BacklogFull | ErrorCode::RateLimited => 429,
            ErrorCode::Invalid => 400,
            ErrorCode::ShuttingDown | ErrorCode::ReplicaUnavailable => 503,
            ErrorCode::Storage => 507,
            ErrorCode::Internal | ErrorCode::Unspecified => 500,
        }
    }

    /// The wire form for `PublishStream` results.
    pub fn to_proto(&self) -> qmesh_proto::v1::Error {
        qmesh_proto::v1::Error {
            code: self.code() as i32,
            message: self.to_string(),
            retry_after: self.retry_after().map(qmesh_proto::convert::duration),
        }
    }
}

impl From<BrokerError> for tonic::Status {
    fn from(error: BrokerError) -> Self {
        let message = error.to_string();
        let mut status = match error.code() {
            // A full disk is a resource running out, not a bug: clients back off and retry.
            ErrorCode::Storage if matches!(error, BrokerError::DiskFull(_)) => {
                tonic::Status::resource_exhausted(message)
            }
            ErrorCode::UnknownQueue
            | ErrorCode::UnknownSubscription
            | ErrorCode::UnknownTransaction => tonic::Status::not_found(message),
            ErrorCode::TransactionSettled => tonic::Status::failed_precondition(message),
            ErrorCode::PermissionDenied => tonic::Status::permission_denied(message),
            ErrorCode::MessageTooLarge | ErrorCode::Invalid => {
                tonic::Status::invalid_argument(message)
            }
            ErrorCode::BacklogFull | ErrorCode::RateLimited => {
                tonic::Status::resource_exhausted(message)
            }
            ErrorCode::ShuttingDown | ErrorCode::ReplicaUnavailable => {
                tonic::Status::unavailable(message)
            }
            ErrorCode::Storage | ErrorCode::Internal | ErrorCode::Unspecified => {
                tonic::Status::internal(message)
            }
        };
        if let Some(wait) = error.retry_after()
            && let Ok(value) = wait.as_millis().to_string().parse()
        {
            status.metadata_mut().insert("retry-after-ms", value);
        }
        status
    }
}

/// The short label (`unknown_queue`, `backlog_full`, ...) of an error code, as the HTTP API and the
/// metrics spell it.
pub fn label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::UnknownQueue => "unknown_queue",
        ErrorCode::UnknownSubscription => "unknown_subscription",
        ErrorCode::PermissionDenied => "permission_denied",
        ErrorCode::MessageTooLarge => "message_too_large",
        ErrorCode::BacklogFull => "backlog_full",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::Invalid => "invalid",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Storage => "storage",
        ErrorCode::ReplicaUnavailable => "replica_unavailable",
        ErrorCode::UnknownTransaction => "unknown_transaction",
        ErrorCode::TransactionSettled => "transaction_settled",
        ErrorCode::Internal | ErrorCode::Unspecified => "internal",
    }
}
