//! Status computation as pure functions: spec + what the index observed + a clock → the status the
//! controllers apply. No client here, so tests compare whole statuses exactly.
//!
//! ```text
//!   Queue spec ─┐                                          ┌─ Ready condition (reason, message)
//!   observed ───┼──▶ queue_status / subscription_status ──▶┼─ observedGeneration
//!   previous ───┤    (lastTransitionTime kept unless the   └─ counts, backlog, inFlight, ...
//!   now ────────┘     condition's status flips)
//! ```
//!
//! Reasons, first match wins:
//! * Queue: `Invalid` → `DeadLetterQueueNotFound` → `Ready`; while deletion waits: `DeletionBlocked`.
//! * Subscription: `Invalid` → `QueueNotFound` → `DeadLetterQueueNotFound` → `NoConsumers` → `Ready`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use qmesh_api::{
    Queue, QueueStatus, Subscription, SubscriptionStatus, Validate, conditions, ready_condition,
};

use crate::index::{QueueObserved, SubscriptionObserved};

/// The `Ready` condition a resource should carry: status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    /// `True` or `False`.
    pub ready: bool,
    /// One of [`qmesh_api::conditions`]' reasons.
    pub reason: &'static str,
    /// What a user reads in `kubectl describe`.
    pub message: String,
}

impl Readiness {
    fn not_ready(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: false,
            reason,
            message: message.into(),
        }
    }
}

/// The Ready condition, keeping the previous transition time when the status did not flip.
pub fn condition(
    readiness: &Readiness,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: &Time,
) -> Condition {
    let mut condition = ready_condition(
        readiness.ready,
        readiness.reason,
        readiness.message.clone(),
        generation,
        now.clone(),
    );
    if let Some(previous) = previous
        && previous.status == condition.status
    {
        condition.last_transition_time = previous.last_transition_time.clone();
    }
    condition
}

/// The Ready condition of `conditions`.
pub fn ready_of(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == conditions::READY)
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// Whether a Queue is usable, and if not why.
pub fn queue_readiness(queue: &Queue, observed: &QueueObserved) -> Readiness {
    if let Err(errors) = queue.validate() {
        return Readiness::not_ready(conditions::REASON_INVALID, errors.to_string());
    }
    if !observed.dead_letter_queue_exists {
        let dlq = queue.spec.dead_letter_queue.as_deref().unwrap_or_default();
        return Readiness::not_ready(
            conditions::REASON_DEAD_LETTER_QUEUE_NOT_FOUND,
            format!("dead-letter queue {dlq:?} does not exist in this namespace"),
        );
    }
    Readiness {
        ready: true,
        reason: conditions::REASON_READY,
        message: format!(
            "{}, {}",
            plural(observed.subscriptions.len(), "subscription"),
            plural(observed.publishers as usize, "ready publisher"),
        ),
    }
}

/// The status a Queue should have. `readiness` overrides the computed one (deletion blocked).
pub fn queue_status(
    queue: &Queue,
    observed: &QueueObserved,
    readiness: Option<Readiness>,
    now: &Time,
) -> QueueStatus {
    let generation = queue.metadata.generation;
    let readiness = readiness.unwrap_or_else(|| queue_readiness(queue, observed));
    let previous = queue.status.as_ref().and_then(|s| ready_of(&s.conditions));
    QueueStatus {
        conditions: vec![condition(&readiness, generation, previous, now)],
        observed_generation: generation,
        publishers: observed.publishers,
        subscriptions: u32::try_from(observed.subscriptions.len()).unwrap_or(u32::MAX),
        backlog: observed.backlog,
        half_messages: observed.half_messages,
    }
}

/// Whether messages can flow through a Subscription, and if not why.
pub fn subscription_readiness(
    subscription: &Subscription,
    observed: &SubscriptionObserved,
) -> Readiness {
    let spec = &subscription.spec;
    if let Err(errors) = subscription.validate() {
        return Readiness::not_ready(conditions::REASON_INVALID, errors.to_string());
    }
    if !observed.queue_exists {
        return Readiness::not_ready(
            conditions::REASON_QUEUE_NOT_FOUND,
            format!("queue {:?} does not exist in this namespace", spec.queue),
        );
    }
    if !observed.dead_letter_queue_exists {
        let dlq = spec.dead_letter_queue.as_deref().unwrap_or_default();
        return Readiness::not_ready(
            conditions::REASON_DEAD_LETTER_QUEUE_NOT_FOUND,
            format!("dead-letter queue {dlq:?} does not exist in this namespace"),
        );
    }
    if observed.consumers == 0 {
        return Readiness::not_ready(
            conditions::REASON_NO_CONSUMERS,
            "no ready pod with a qmesh sidecar matches spec.consumers",
        );
    }
    Readiness {
        ready: true,
        reason: conditions::REASON_READY,
        message: plural(observed.consumers as usize, "ready consumer"),
    }
}

/// The status a Subscription should have.
pub fn subscription_status(
    subscription: &Subscription,
    observed: &SubscriptionObserved,
    now: &Time,
) -> SubscriptionStatus {
    let generation = subscription.metadata.generation;
    let readiness = subscription_readiness(subscription, observed);
    let previous = subscription
        .status
        .as_ref()
        .and_then(|s| ready_of(&s.conditions));
    SubscriptionStatus {
        conditions: vec![condition(&readiness, generation, previous, now)],
        observed_generation: generation,
        consumers: observed.consumers,
        backlog: observed.backlog,
        in_flight: observed.in_flight,
        scheduled: observed.scheduled,
        dead_lettered: observed.dead_lettered,
    }
}

/// What differs between two statuses, for deciding whether and how soon to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing: do not write.
    None,
    /// Only live counters (backlog, in flight, scheduled, half messages, dead-lettered): write at
    /// most every status interval.
    Counters,
    /// Conditions, generation or membership counts: write now.
    Significant,
}

/// Compares the status in the cluster with the desired one.
pub fn queue_change(current: Option<&QueueStatus>, desired: &QueueStatus) -> Change {
    match current {
        Some(current) if current == desired => Change::None,
        Some(current)
            if QueueStatus {
                backlog: desired.backlog,
                half_messages: desired.half_messages,
                ..current.clone()
            } == *desired =>
        {
            Change::Counters
        }
        _ => Change::Significant,
    }
}

/// Compares the status in the cluster with the desired one.
pub fn subscription_change(
    current: Option<&SubscriptionStatus>,
    desired: &SubscriptionStatus,
) -> Change {
    match current {
        Some(current) if current == desired => Change::None,
        Some(current)
            if SubscriptionStatus {
                backlog: desired.backlog,
                in_flight: desired.in_flight,
                scheduled: desired.scheduled,
                dead_lettered: desired.dead_lettered,
                ..current.clone()
            } == *desired =>
        {
            Change::Counters
        }
        _ => Change::Significant,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::LabelSelector, jiff::Timestamp};
    use qmesh_api::{QueueSpec, SubscriptionSpec};

    use super::*;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    fn queue(spec: QueueSpec) -> Queue {
        let mut q = Queue::new("orders", spec);
        q.metadata.namespace = Some("shop".into());
        q.metadata.generation = Some(3);
        q
    }

    fn subscription(queue: &str) -> Subscription {
        let mut s = Subscription::new(
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
        );
        s.metadata.generation = Some(2);
        s
    }

    fn observed_queue() -> QueueObserved {
        QueueObserved {
            subscriptions: vec!["billing".into(), "audit".into()],
            publishers: 1,
            backlog: 12,
            half_messages: 3,
            dead_letter_queue_exists: true,
        }
    }

    #[test]
    fn a_valid_queue_is_ready_with_counts_and_observed_generation() {
        let status = queue_status(
            &queue(QueueSpec::default()),
            &observed_queue(),
            None,
            &at(0),
        );
        assert_eq!(
            status,
            QueueStatus {
                conditions: vec![Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: "Ready".into(),
                    message: "2 subscriptions, 1 ready publisher".into(),
                    observed_generation: Some(3),
                    last_transition_time: at(0),
                }],
                observed_generation: Some(3),
                publishers: 1,
                subscriptions: 2,
                backlog: 12,
                half_messages: 3,
            }
        );
    }

    #[test]
    fn a_queue_dead_lettering_into_itself_is_invalid() {
        let q = queue(QueueSpec {
            dead_letter_queue: Some("orders".into()),
            ..Default::default()
        });
        let status = queue_status(&q, &observed_queue(), None, &at(0));
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Invalid")
        );
        assert!(
            ready.message.contains("spec.deadLetterQueue"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn a_missing_dead_letter_queue_is_reported() {
        let q = queue(QueueSpec {
            dead_letter_queue: Some("orders-dlq".into()),
            ..Default::default()
        });
        let observed = QueueObserved {
            dead_letter_queue_exists: false,
            ..observed_queue()
        };
        let ready = queue_readiness(&q, &observed);
        assert_eq!(ready.reason, "DeadLetterQueueNotFound");
        assert_eq!(
            ready.message,
            "dead-letter queue \"orders-dlq\" does not exist in this namespace"
        );
    }

    #[test]
    fn transition_time_is_kept_until_the_status_flips() {
        let mut q = queue(QueueSpec::default());
        q.status = Some(queue_status(&q, &observed_queue(), None, &at(0)));
        let again = queue_status(
            &q,
            &QueueObserved {
                backlog: 99,
                ..observed_queue()
            },
            None,
            &at(60),
        );
        assert_eq!(again.conditions[0].last_transition_time, at(0));
        assert_eq!(queue_change(q.status.as_ref(), &again), Change::Counters);
        let blocked = Readiness::not_ready(conditions::REASON_DELETION_BLOCKED, "waiting");
        let flipped = queue_status(&q, &observed_queue(), Some(blocked), &at(90));
        assert_eq!(flipped.conditions[0].last_transition_time, at(90));
        assert_eq!(flipped.conditions[0].reason, "DeletionBlocked");
        assert_eq!(
            queue_change(q.status.as_ref(), &flipped),
            Change::Significant
        );
        assert_eq!(
            queue_change(q.status.as_ref(), q.status.as_ref().unwrap()),
            Change::None
        );
    }

    #[test]
    fn subscription_reasons_in_order() {
        let ok = SubscriptionObserved {
            queue_exists: true,
            dead_letter_queue_exists: true,
            consumers: 2,
            backlog: 4,
            in_flight: 1,
            scheduled: 0,
            dead_lettered: 0,
        };
        let reason =
            |s: &Subscription, o: &SubscriptionObserved| subscription_readiness(s, o).reason;
        assert_eq!(reason(&subscription("orders"), &ok), "Ready");
        assert_eq!(
            reason(
                &subscription("orders"),
                &SubscriptionObserved {
                    consumers: 0,
                    ..ok.clone()
                }
            ),
            "NoConsumers"
        );
        assert_eq!(
            reason(
                &subscription("orders"),
                &SubscriptionObserved {
                    dead_letter_queue_exists: false,
                    ..ok.clone()
                }
            ),
            "DeadLetterQueueNotFound"
        );
        assert_eq!(
            reason(
                &subscription("orders"),
                &SubscriptionObserved {
                    queue_exists: false,
                    ..ok.clone()
                }
            ),
            "QueueNotFound"
        );
        let mut looping = subscription("orders");
        looping.spec.dead_letter_queue = Some("orders".into());
        assert_eq!(
            reason(
                &looping,
                &SubscriptionObserved {
                    queue_exists: false,
                    ..ok
                }
            ),
            "Invalid"
        );
    }

    #[test]
    fn subscription_status_carries_live_figures() {
        let observed = SubscriptionObserved {
            queue_exists: true,
            dead_letter_queue_exists: true,
            consumers: 1,
            backlog: 4,
            in_flight: 3,
            scheduled: 1,
            dead_lettered: 2,
        };
        let status = subscription_status(&subscription("orders"), &observed, &at(5));
        assert_eq!(
            status,
            SubscriptionStatus {
                conditions: vec![Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: "Ready".into(),
                    message: "1 ready consumer".into(),
                    observed_generation: Some(2),
                    last_transition_time: at(5),
                }],
                observed_generation: Some(2),
                consumers: 1,
                backlog: 4,
                in_flight: 3,
                scheduled: 1,
                dead_lettered: 2,
            }
        );
        let mut s = subscription("orders");
        s.status = Some(status.clone());
        let busier = SubscriptionStatus {
            in_flight: 9,
            ..status.clone()
        };
        assert_eq!(
            subscription_change(s.status.as_ref(), &busier),
            Change::Counters
        );
        let more = SubscriptionStatus {
            consumers: 2,
            ..status
        };
        assert_eq!(
            subscription_change(s.status.as_ref(), &more),
            Change::Significant
        );
        assert_eq!(subscription_change(None, &more), Change::Significant);
    }
}
