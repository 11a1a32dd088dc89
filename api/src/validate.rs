//! The rules a CRD schema cannot express, in one place: the operator's admission webhook and its
//! controllers call these, and so do `qmesh dev` and the sidecar's mesh-file loader.
//!
//! Every error names the field (`spec.retry.backoff.initial`) and says what to fix.

use std::fmt;

use kube::ResourceExt;

use crate::{
    DeliveryMode, Durability, Overflow, Queue, RateLimit, Subscription,
    selector::check_pod_selector,
};

/// Largest `maxMessageBytes` a Queue may ask for.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, e.g. `spec.retry.backoff.initial`.
    pub field: String,
    /// What is wrong and what to do instead.
    pub message: String,
}

impl FieldError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every rule a resource breaks (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    fn check(errors: Vec<FieldError>) -> Result<(), Self> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Self(errors))
        }
    }
}

/// A resource that can check itself.
pub trait Validate {
    /// Checks the resource on its own.
    fn validate(&self) -> Result<(), ValidationErrors>;

    /// Checks an update from `old` to `self`: everything [`Validate::validate`] checks, plus
    /// immutable fields.
    fn validate_update(&self, old: &Self) -> Result<(), ValidationErrors> {
        let _ = old;
        self.validate()
    }
}

impl Validate for Queue {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let spec = &self.spec;
        if let Some(selector) = &spec.publishers {
            check_pod_selector(selector, "spec.publishers", &mut errors);
        }
        match spec.max_message_bytes.bytes() {
            Ok(0) => errors.push(FieldError::new(
                "spec.maxMessageBytes",
                "must be at least 1 byte",
            )),
            Ok(n) if n > MAX_MESSAGE_BYTES_LIMIT => errors.push(FieldError::new(
                "spec.maxMessageBytes",
                format!("{n} bytes is above the limit of 64Mi: send large payloads by reference"),
            )),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new("spec.maxMessageBytes", e)),
        }
        if let Some(max_bytes) = &spec.retention.max_bytes {
            match max_bytes.bytes() {
                Ok(0) => errors.push(FieldError::new(
                    "spec.retention.maxBytes",
                    "must be at least 1 byte",
                )),
                Ok(_) => {}
                Err(e) => errors.push(FieldError::new("spec.retention.maxBytes", e)),
            }
        }
        if spec.retention.max_messages == Some(0) {
            errors.push(FieldError::new(
                "spec.retention.maxMessages",
                "must be at least 1",
            ));
        }
        if spec
            .retention
            .max_age
            .is_some_and(|age| age.get().is_zero())
        {
            errors.push(FieldError::new(
                "spec.retention.maxAge",
                "must be longer than 0s",
            ));
        }
        if let Some(keep) = spec.retention.keep_acked {
            if keep.get().is_zero() {
                errors.push(FieldError::new(
                    "spec.retention.keepAcked",
                    "must be longer than 0s; remove the field to drop acked messages at once",
                ));
            }
            if spec.durability == Durability::Memory {
                errors.push(FieldError::new(
                    "spec.retention.keepAcked",
                    "needs durability: Disk (acked messages are kept in the log, and a Memory queue has none)",
                ));
            }
        }
        if spec.dedup_window.is_some_and(|w| w.get().is_zero()) {
            errors.push(FieldError::new(
                "spec.dedupWindow",
                "must be longer than 0s; remove the field to turn de-duplication off",
            ));
        }
        if spec
            .max_delay
            .is_some_and(|d| d.get() > crate::queue::MAX_DELAY_LIMIT)
        {
            errors.push(FieldError::new(
                "spec.maxDelay",
                "must be at most 720h (30 days); longer waits belong in the app's own store",
            ));
        }
        if let Some(t) = &spec.transaction {
            let after = t.effective_check_after();
            if after < std::time::Duration::from_secs(1)
                || after > std::time::Duration::from_secs(86_400)
            {
                errors.push(FieldError::new(
                    "spec.transaction.checkAfter",
                    "must be from 1s to 24h",
                ));
            }
            if !(1..=1000).contains(&t.effective_max_checks()) {
                errors.push(FieldError::new(
                    "spec.transaction.maxChecks",
                    "must be from 1 to 1000",
                ));
            }
            if t.check_port == Some(0) {
                errors.push(FieldError::new(
                    "spec.transaction.checkPort",
                    "must be a port from 1 to 65535",
                ));
            }
            let path = t.effective_check_path();
            if !path.starts_with('/')
                || path.len() > 1024
                || path.chars().any(|c| c.is_control() || c == ' ')
            {
                errors.push(FieldError::new(
                    "spec.transaction.checkPath",
                    "must be an absolute URL path (starting with /, no spaces, at most 1024 characters)",
                ));
            }
        }
        if let Some(dlq) = &spec.dead_letter_queue {
            check_name(dlq, "spec.deadLetterQueue", &mut errors);
            if *dlq == self.name_any() {
                errors.push(FieldError::new(
                    "spec.deadLetterQueue",
                    "must name another Queue, not this one",
                ));
            }
        }
        if spec.retention.overflow == Overflow::DeadLetter && spec.dead_letter_queue.is_none() {
            errors.push(FieldError::new(
                "spec.retention.overflow",
                "DeadLetter needs spec.deadLetterQueue to be set",
            ));
        }
        if let Some(limit) = &spec.publish_rate_limit {
            check_rate(limit, "spec.publishRateLimit", &mut errors);
        }
        ValidationErrors::check(errors)
    }
}

impl Validate for Subscription {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let spec = &self.spec;
        check_name(&spec.queue, "spec.queue", &mut errors);
        check_pod_selector(&spec.consumers, "spec.consumers", &mut errors);
        let delivery = &spec.delivery;
        if !(1..=10_000).contains(&delivery.max_in_flight) {
            errors.push(FieldError::new(
                "spec.delivery.maxInFlight",
                "must be between 1 and 10000",
            ));
        }
        if delivery.ack_timeout.get().is_zero() {
            errors.push(FieldError::new(
                "spec.delivery.ackTimeout",
                "must be longer than 0s",
            ));
        }
        match (&delivery.mode, &delivery.push) {
            (DeliveryMode::Push, None) => errors.push(FieldError::new(
                "spec.delivery.push",
                "mode Push needs push.port (and optionally push.path)",
            )),
            (DeliveryMode::Push, Some(push)) => {
                if push.port == 0 {
                    errors.push(FieldError::new(
                        "spec.delivery.push.port",
                        "must be 1 to 65535",
                    ));
                }
                if !push.path.starts_with('/') {
                    errors.push(FieldError::new(
                        "spec.delivery.push.path",
                        "must start with /",
                    ));
                }
            }
            (DeliveryMode::Pull, Some(_)) => errors.push(FieldError::new(
                "spec.delivery.push",
                "only allowed with mode Push; remove it or set mode: Push",
            )),
            (DeliveryMode::Pull, None) => {}
        }
        let retry = &spec.retry;
        if retry.max_deliveries == 0 {
            errors.push(FieldError::new(
                "spec.retry.maxDeliveries",
                "must be at least 1",
            ));
        }
        if retry.backoff.multiplier == 0 {
            errors.push(FieldError::new(
                "spec.retry.backoff.multiplier",
                "must be at least 1",
            ));
        }
        if retry.backoff.initial > retry.backoff.max {
            errors.push(FieldError::new(
                "spec.retry.backoff.initial",
                format!(
                    "{} is longer than spec.retry.backoff.max ({}); initial must be at most max",
                    retry.backoff.initial, retry.backoff.max
                ),
            ));
        }
        if let Some(dlq) = &spec.dead_letter_queue {
            check_name(dlq, "spec.deadLetterQueue", &mut errors);
            if *dlq == spec.queue {
                errors.push(FieldError::new(
                    "spec.deadLetterQueue",
                    format!(
                        "must differ from spec.queue ({}): dead letters would loop",
                        spec.queue
                    ),
                ));
            }
        }
        if let Some(limit) = &spec.rate_limit {
            check_rate(limit, "spec.rateLimit", &mut errors);
        }
        if let Some(filter) = &spec.filter
            && filter.headers.keys().any(String::is_empty)
        {
            errors.push(FieldError::new(
                "spec.filter.headers",
                "header names must not be empty",
            ));
        }
        ValidationErrors::check(errors)
    }

    fn validate_update(&self, old: &Self) -> Result<(), ValidationErrors> {
        let mut errors = match self.validate() {
            Ok(()) => Vec::new(),
            Err(ValidationErrors(errors)) => errors,
        };
        if self.spec.queue != old.spec.queue {
            errors.push(FieldError::new(
                "spec.queue",
                format!(
                    "is immutable (was {:?}): create a new Subscription for another queue",
                    old.spec.queue
                ),
            ));
        }
        ValidationErrors::check(errors)
    }
}

fn check_rate(limit: &RateLimit, path: &str, errors: &mut Vec<FieldError>) {
    if !(limit.messages_per_second.is_finite() && limit.messages_per_second > 0.0) {
        errors.push(FieldError::new(
            format!("{path}.messagesPerSecond"),
            "must be a number greater than 0",
        ));
    }
    if limit.burst == Some(0) {
        errors.push(FieldError::new(
            format!("{path}.burst"),
            "must be at least 1",
        ));
    }
}

/// Checks a reference to another object by name (a DNS-1123 subdomain, as Kubernetes names are).
fn check_name(name: &str, path: &str, errors: &mut Vec<FieldError>) {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let valid_ends = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 253 || !valid_chars || !valid_ends {
        errors.push(FieldError::new(
            path,
            format!(
                "{name:?} is not a valid name: use lower-case letters, digits, '-' and '.', \
                 starting and ending with a letter or digit"
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::{Backoff, ByteSize, Duration, Push, QueueSpec, Retention, SubscriptionSpec};

    fn queue(name: &str, spec: QueueSpec) -> Queue {
        Queue::new(name, spec)
    }

    fn subscription(queue: &str) -> Subscription {
        Subscription::new(
            "billing",
            SubscriptionSpec {
                queue: queue.into(),
                consumers: LabelSelector::default().into(),
                delivery: Default::default(),
                rate_limit: None,
                retry: Default::default(),
                dead_letter_queue: None,
                filter: None,
                start_at: Default::default(),
            },
        )
    }

    fn fields(result: Result<(), ValidationErrors>) -> Vec<String> {
        result
            .err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn default_queue_and_subscription_are_valid() {
        assert_eq!(queue("orders", QueueSpec::default()).validate(), Ok(()));
        assert_eq!(subscription("orders").validate(), Ok(()));
    }

    #[test]
    fn queue_cannot_dead_letter_into_itself() {
        let q = queue(
            "orders",
            QueueSpec {
                dead_letter_queue: Some("orders".into()),
                ..Default::default()
            },
        );
        assert_eq!(fields(q.validate()), ["spec.deadLetterQueue"]);
    }

    #[test]
    fn keeping_acked_messages_needs_a_disk_queue_and_a_real_duration() {
        let memory = queue(
            "orders",
            QueueSpec {
                durability: Durability::Memory,
                retention: Retention {
                    keep_acked: Some(Duration::from_secs(0)),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let err = memory.validate().unwrap_err().to_string();
        assert!(
            err.contains("durability: Disk") && err.contains("0s"),
            "{err}"
        );
        let disk = queue(
            "orders",
            QueueSpec {
                retention: Retention {
                    keep_acked: Some(Duration::from_secs(3600)),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        assert_eq!(disk.validate(), Ok(()));
    }

    #[test]
    fn transaction_settings_out_of_range_are_refused_by_field() {
        let bad = queue(
            "orders",
            QueueSpec {
                transaction: Some(crate::Transaction {
                    check_after: Some(Duration::from_secs(0)),
                    max_checks: Some(0),
                    on_unknown: crate::OnUnknown::Commit,
                    check_port: Some(0),
                    check_path: Some("no-slash".into()),
                }),
                ..QueueSpec::default()
            },
        );
        assert_eq!(
            fields(bad.validate()),
            [
                "spec.transaction.checkAfter",
                "spec.transaction.maxChecks",
                "spec.transaction.checkPort",
                "spec.transaction.checkPath"
            ]
        );
        let good = queue(
            "orders",
            QueueSpec {
                transaction: Some(crate::Transaction {
                    check_after: Some(Duration::from_secs(2)),
                    max_checks: Some(3),
                    check_port: Some(8080),
                    ..crate::Transaction::default()
                }),
                ..QueueSpec::default()
            },
        );
        assert!(good.validate().is_ok());
        let t = crate::Transaction::default();
        assert_eq!(t.effective_check_after(), crate::DEFAULT_CHECK_AFTER);
        assert_eq!(t.effective_max_checks(), 15);
        assert_eq!(t.effective_check_path(), "/qmesh/transaction-check");
    }

    #[test]
    fn a_max_delay_beyond_thirty_days_is_refused() {
        let far = queue(
            "reminders",
            QueueSpec {
                max_delay: Some(Duration::from_secs(31 * 24 * 3600)),
                ..Default::default()
            },
        );
        assert_eq!(fields(far.validate()), ["spec.maxDelay"]);
        let ok = queue(
            "reminders",
            QueueSpec {
                max_delay: Some(Duration::from_secs(30 * 24 * 3600)),
                ..Default::default()
            },
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            QueueSpec::default().effective_max_delay(),
            crate::DEFAULT_MAX_DELAY
        );
    }

    #[test]
    fn dead_letter_overflow_needs_a_dead_letter_queue() {
        let q = queue(
            "orders",
            QueueSpec {
                retention: Retention {
                    overflow: Overflow::DeadLetter,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        assert_eq!(fields(q.validate()), ["spec.retention.overflow"]);
    }

    #[test]
    fn oversize_and_malformed_message_limits_are_refused() {
        let big = queue(
            "orders",
            QueueSpec {
                max_message_bytes: ByteSize::new("1Gi"),
                ..Default::default()
            },
        );
        assert_eq!(fields(big.validate()), ["spec.maxMessageBytes"]);
        let junk = queue(
            "orders",
            QueueSpec {
                max_message_bytes: ByteSize::new("lots"),
                ..Default::default()
            },
        );
        let err = junk.validate().unwrap_err().to_string();
        assert!(
            err.contains("spec.maxMessageBytes") && err.contains("64Mi"),
            "{err}"
        );
    }

    #[test]
    fn backoff_initial_must_not_exceed_max() {
        let mut s = subscription("orders");
        s.spec.retry.backoff = Backoff {
            initial: Duration::from_secs(120),
            max: Duration::from_secs(60),
            multiplier: 2,
        };
        let err = s.validate().unwrap_err();
        assert_eq!(err.0[0].field, "spec.retry.backoff.initial");
        assert!(err.0[0].message.contains("2m"), "{}", err.0[0].message);
    }

    #[test]
    fn subscription_dead_letter_queue_must_differ_from_its_queue() {
        let mut s = subscription("orders");
        s.spec.dead_letter_queue = Some("orders".into());
        assert_eq!(fields(s.validate()), ["spec.deadLetterQueue"]);
    }

    #[test]
    fn push_mode_needs_an_endpoint_and_pull_mode_refuses_one() {
        let mut s = subscription("orders");
        s.spec.delivery.mode = DeliveryMode::Push;
        assert_eq!(fields(s.validate()), ["spec.delivery.push"]);
        s.spec.delivery.push = Some(Push {
            port: 8080,
            path: "/events".into(),
        });
        assert_eq!(s.validate(), Ok(()));
        s.spec.delivery.mode = DeliveryMode::Pull;
        assert_eq!(fields(s.validate()), ["spec.delivery.push"]);
    }

    #[test]
    fn queue_of_a_subscription_is_immutable() {
        let old = subscription("orders");
        let new = subscription("payments");
        assert_eq!(fields(new.validate_update(&old)), ["spec.queue"]);
        assert_eq!(old.validate_update(&old), Ok(()));
    }

    #[test]
    fn every_broken_rule_is_reported_at_once() {
        let mut s = subscription("Bad_Queue");
        s.spec.delivery.max_in_flight = 0;
        s.spec.retry.max_deliveries = 0;
        s.spec.rate_limit = Some(RateLimit {
            messages_per_second: 0.0,
            burst: Some(0),
        });
        assert_eq!(
            fields(s.validate()),
            [
                "spec.queue",
                "spec.delivery.maxInFlight",
                "spec.retry.maxDeliveries",
                "spec.rateLimit.messagesPerSecond",
                "spec.rateLimit.burst"
            ]
        );
    }
}
