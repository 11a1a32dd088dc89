//! Prometheus metrics of the sidecar, labelled by queue and subscription. Counters are bumped where
//! things happen; gauges (backlog, oldest message's age, consumer links, in flight, certificate
//! expiry) are refreshed from the owner and consumer state when scraped. Every metric, its labels
//! and their cardinality: docs/monitoring.md.

use std::{
    collections::HashSet,
    sync::{Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// `queue` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// Queue name.
    pub queue: String,
}

/// `queue` + `subscription` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubLabel {
    /// Queue name.
    pub queue: String,
    /// Subscription name.
    pub subscription: String,
}

/// `queue` + `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// Queue name; empty when the view names no such queue (the name comes from the app, so it
    /// would not be bounded).
    pub queue: String,
    /// Error kind (`backlog_full`, ...).
    pub reason: String,
}

/// A gauge of seconds (fractions kept).
pub type SecondsGauge = Gauge<f64, AtomicU64>;

/// A per-subscription gauge family refreshed whole at each scrape: label sets not refreshed are
/// removed, so a queue or subscription that went away leaves no stale series behind (an alert on
/// it would never resolve).
pub struct SubGauges<G> {
    family: Family<SubLabel, G>,
    last: Mutex<HashSet<SubLabel>>,
}

impl<G: Default + Clone> Default for SubGauges<G> {
    fn default() -> Self {
        Self {
            family: Family::default(),
            last: Mutex::new(HashSet::new()),
        }
    }
}

impl<G> SubGauges<G>
where
    G: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
{
    /// Sets every label set of this scrape (`set` writes one gauge) and removes the others.
    pub fn refresh(&self, values: impl IntoIterator<Item = (SubLabel, impl FnOnce(&G))>) {
        let mut seen = HashSet::new();
        for (labels, set) in values {
            set(&self.family.get_or_create(&labels));
            seen.insert(labels);
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for gone in last.difference(&seen) {
            self.family.remove(gone);
        }
        *last = seen;
    }

    /// The current value of one label set (tests).
    pub fn get(&self, labels: &SubLabel) -> Option<G> {
        self.family.get(labels).map(|g| g.clone())
    }

    fn family(&self) -> Family<SubLabel, G> {
        self.family.clone()
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 50 µs … ~26 s.
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 20)
}

fn new_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// All metric families.
pub struct Metrics {
    registry: Registry,
    published: Family<QueueLabel, Counter>,
    publish_errors: Family<ErrorLabel, Counter>,
    forwarded: Family<SubLabel, Counter>,
    acked: Family<SubLabel, Counter>,
    dead_lettered: Family<SubLabel, Counter>,
    delivered: Family<SubLabel, Counter>,
    redelivered: Family<SubLabel, Counter>,
    replicated: Family<QueueLabel, Counter>,
    replica_adopted: Family<QueueLabel, Counter>,
    /// Bytes of other owners' copies held as a replica (refreshed on scrape).
    pub replica_bytes: Gauge,
    /// Owner backlog per subscription (refreshed on scrape).
    pub backlog: SubGauges<Gauge>,
    pub scheduled: SubGauges<Gauge>,
    /// Age of the oldest message a subscription owes this owner (refreshed on scrape).
    pub oldest_age: SubGauges<SecondsGauge>,
    /// Consumer sidecars of a subscription this owner has a live link to (refreshed on scrape).
    pub consumer_links: SubGauges<Gauge>,
    /// Deliveries held by this pod's apps (refreshed on scrape).
    pub in_flight: SubGauges<Gauge>,
    /// When this sidecar's peer certificate expires, unix seconds (refreshed on scrape).
    pub certificate_expiry: SecondsGauge,
    publish_latency: Family<QueueLabel, Histogram, fn() -> Histogram>,
    e2e_latency: Family<SubLabel, Histogram, fn() -> Histogram>,
    /// The disk log and the owner's memory (refreshed on scrape).
    pub log: LogMetrics,
    pub amqp: AmqpMetrics,
    /// Transactions and their half messages.
    pub transactions: TransactionMetrics,
}

/// `outcome` + `decided_by` labels of a settled transaction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransactionLabel {
    /// `committed` or `rolled-back`.
    pub outcome: String,
    /// `producer`, `check` or `on-unknown`.
    pub decided_by: String,
}

/// `answer` label of a check-back.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabel {
    /// `commit`, `rollback` or `unknown` (no answer, an error status, anything else).
    pub answer: String,
}

/// Transactional publishes.
#[derive(Debug, Default)]
pub struct TransactionMetrics {
    /// Transactions open (neither committed nor rolled back yet).
    pub open: Gauge,
    /// Half messages held: published in a transaction still open.
    pub half_messages: Gauge,
    settled: Family<TransactionLabel, Counter>,
    checks: Family<AnswerLabel, Counter>,
}

impl TransactionMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "transactions_open",
            "Transactions neither committed nor rolled back yet",
            self.open.clone(),
        );
        registry.register(
            "half_messages",
            "Messages published in a transaction still open: stored, not deliverable",
            self.half_messages.clone(),
        );
        registry.register(
            "transactions",
            "Transactions settled, by outcome and by who decided (producer, check, on-unknown)",
            self.settled.clone(),
        );
        registry.register(
            "transaction_checks",
            "Check-backs asked of the app, by its answer",
            self.checks.clone(),
        );
        // Every series exists at 0 from the start, so the first outcome is an increase.
        for outcome in ["committed", "rolled-back"] {
            for decided_by in ["producer", "check", "on-unknown"] {
                let _ = self.settled.get_or_create(&TransactionLabel {
                    outcome: outcome.into(),
                    decided_by: decided_by.into(),
                });
            }
        }
        for answer in ["commit", "rollback", "unknown"] {
            let _ = self.checks.get_or_create(&AnswerLabel {
                answer: answer.into(),
            });
        }
    }

    /// The count of settled transactions with this outcome and decider (tests).
    pub fn settled(&self, outcome: &str, decided_by: &str) -> u64 {
        self.settled
            .get_or_create(&TransactionLabel {
                outcome: outcome.into(),
                decided_by: decided_by.into(),
            })
            .get()
    }
}

/// The AMQP listener's figures.
#[derive(Debug, Default)]
pub struct AmqpMetrics {
    /// Open AMQP connections.
    pub connections: Gauge,
    /// Connections closed at once because `--amqp-max-connections` were open.
    pub refused: Counter,
    /// Publishes to a queue this pod's namespace does not have (returned when `mandatory`).
    pub unroutable: Counter,
    /// Connections closed by the sidecar for a protocol error (bad frames, wrong sequences).
    pub protocol_errors: Counter,
}

impl AmqpMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "amqp_connections",
            "Open AMQP 0-9-1 connections",
            self.connections.clone(),
        );
        let counters: [(&str, &str, &Counter); 3] = [
            (
                "amqp_connections_refused",
                "AMQP connections closed at once: --amqp-max-connections were open",
                &self.refused,
            ),
            (
                "amqp_unroutable",
                "AMQP publishes to a queue the namespace does not have (basic.return when mandatory)",
                &self.unroutable,
            ),
            (
                "amqp_protocol_errors",
                "AMQP connections closed for a protocol error (malformed or unexpected frames)",
                &self.protocol_errors,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }
}

/// The disk log's counters and the owner's held and spilled figures, copied from the log's own
/// counters when scraped.
#[derive(Debug, Default)]
pub struct LogMetrics {
    appends: Counter,
    fsyncs: Counter,
    written: Counter,
    page_reads: Counter,
    page_read_bytes: Counter,
    relocated: Counter,
    segments_deleted: Counter,
    write_errors: Counter,
    /// Memory the owner's held messages take (with bookkeeping and remembered ids).
    pub held_bytes: Gauge,
    /// Messages kept in the log only (spilled), not yet read back.
    pub spilled: Gauge,
    /// Record bytes of acked messages kept for replay.
    pub kept_bytes: Gauge,
}

impl LogMetrics {
    fn register(&self, registry: &mut Registry) {
        let counters: [(&str, &str, &Counter); 8] = [
            ("log_appends", "Message records made durable", &self.appends),
            ("log_fsyncs", "fsync calls of the log", &self.fsyncs),
            (
                "log_written_bytes",
                "Bytes written to the log",
                &self.written,
            ),
            (
                "log_page_reads",
                "Reads of spilled messages back from the log (0 while consumers keep up)",
                &self.page_reads,
            ),
            (
                "log_page_read_bytes",
                "Bytes read back from the log for spilled messages",
                &self.page_read_bytes,
            ),
            (
                "log_relocated",
                "Live messages copied forward so old segments could be deleted",
                &self.relocated,
            ),
            (
                "log_segments_deleted",
                "Log segments deleted once nothing in them was owed",
                &self.segments_deleted,
            ),
            (
                "log_write_errors",
                "Failed writes or fsyncs of the log (a full disk among them)",
                &self.write_errors,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "owner_held_bytes",
            "Memory the owner's held messages take, within --memory-budget",
            self.held_bytes.clone(),
        );
        registry.register(
            "owner_spilled_messages",
            "Messages kept in the log only until there is memory to read them back",
            self.spilled.clone(),
        );
        registry.register(
            "owner_kept_bytes",
            "Record bytes of acked messages kept in the log for replay (retention.keepAcked)",
            self.kept_bytes.clone(),
        );
    }

    /// Copies the log's counters.
    pub fn observe(&self, stats: &qmesh_store::StoreStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let pairs = [
            (&self.appends, &stats.appends),
            (&self.fsyncs, &stats.fsyncs),
            (&self.written, &stats.bytes),
            (&self.page_reads, &stats.page_reads),
            (&self.page_read_bytes, &stats.page_read_bytes),
            (&self.relocated, &stats.relocated),
            (&self.segments_deleted, &stats.segments_deleted),
            (&self.write_errors, &stats.write_errors),
        ];
        for (counter, value) in pairs {
            let value = value.load(Relaxed);
            let seen = counter.get();
            if value > seen {
                counter.inc_by(value - seen);
            }
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("qmesh");
        let published = Family::default();
        let publish_errors = Family::default();
        let forwarded = Family::default();
        let acked = Family::default();
        let dead_lettered = Family::default();
        let delivered = Family::default();
        let redelivered = Family::default();
        let replicated = Family::default();
        let replica_adopted = Family::default();
        let replica_bytes = Gauge::default();
        let backlog = SubGauges::default();
        let scheduled = SubGauges::default();
        let oldest_age = SubGauges::default();
        let consumer_links = SubGauges::default();
        let in_flight = SubGauges::default();
        let certificate_expiry = SecondsGauge::default();
        let publish_latency: Family<QueueLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(new_histogram);
        let e2e_latency: Family<SubLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(new_histogram);
        registry.register(
            "published",
            "Messages accepted from apps and persisted",
            published.clone(),
        );
        registry.register(
            "publish_errors",
            "Publishes refused, by reason",
            publish_errors.clone(),
        );
        registry.register(
            "forwarded",
            "Deliveries sent by this owner to consumer sidecars",
            forwarded.clone(),
        );
        registry.register(
            "acked",
            "Deliveries acknowledged, as seen by the owner",
            acked.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages moved to a dead-letter queue (or parked)",
            dead_lettered.clone(),
        );
        registry.register(
            "delivered",
            "Deliveries handed to this pod's apps",
            delivered.clone(),
        );
        registry.register(
            "redelivered",
            "Deliveries to this pod's apps that were not the first attempt",
            redelivered.clone(),
        );
        registry.register(
            "replicated",
            "Publishes of publishAck: Replicated queues confirmed by a replica sidecar",
            replicated.clone(),
        );
        registry.register(
            "replica_adopted",
            "Standby copies this sidecar adopted as owner after their owner was gone",
            replica_adopted.clone(),
        );
        registry.register(
            "replica_bytes",
            "Bytes of other owners' copies held here as a replica",
            replica_bytes.clone(),
        );
        registry.register(
            "backlog_messages",
            "Messages this owner holds that a subscription has not acked (ready, in flight, \
             waiting out a backoff, parked, spilled)",
            backlog.family(),
        );
        registry.register(
            "scheduled_messages",
            "Delayed or scheduled messages this owner holds that are not due yet (part of the backlog)",
            scheduled.family(),
        );
        registry.register(
            "oldest_unacked_age_seconds",
            "Age (since publish) of the oldest message this owner holds that a subscription has \
             not acked; 0 when it owes nothing",
            oldest_age.family(),
        );
        registry.register(
            "subscription_consumer_links",
            "Consumer sidecars of the subscription this owner has a live peer link to",
            consumer_links.family(),
        );
        registry.register(
            "in_flight_messages",
            "Deliveries held by this pod's apps, not yet settled",
            in_flight.family(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When this sidecar's peer (mutual TLS) certificate expires, in unix seconds",
            certificate_expiry.clone(),
        );
        registry.register(
            "publish_latency_seconds",
            "Time from publish request to durable acknowledgement",
            publish_latency.clone(),
        );
        registry.register(
            "end_to_end_latency_seconds",
            "Time from publish to hand-over to a consumer app",
            e2e_latency.clone(),
        );
        let log = LogMetrics::default();
        log.register(&mut registry);
        let amqp = AmqpMetrics::default();
        amqp.register(&mut registry);
        let transactions = TransactionMetrics::default();
        transactions.register(&mut registry);
        Self {
            log,
            amqp,
            transactions,
            registry,
            published,
            publish_errors,
            forwarded,
            acked,
            dead_lettered,
            delivered,
            redelivered,
            replicated,
            replica_adopted,
            replica_bytes,
            backlog,
            scheduled,
            oldest_age,
            consumer_links,
            in_flight,
            certificate_expiry,
            publish_latency,
            e2e_latency,
        }
    }
}

fn sub(queue: &str, subscription: &str) -> SubLabel {
    SubLabel {
        queue: queue.to_owned(),
        subscription: subscription.to_owned(),
    }
}

impl Metrics {
    /// A publish was accepted.
    pub fn published(&self, queue: &str) {
        self.published
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .inc();
    }

    /// A transaction settled.
    pub fn transaction_settled(
        &self,
        decision: crate::owner::transactions::Decision,
        by: crate::owner::transactions::DecidedBy,
    ) {
        self.transactions
            .settled
            .get_or_create(&TransactionLabel {
                outcome: decision.label().to_owned(),
                decided_by: by.label().to_owned(),
            })
            .inc();
    }

    /// The app answered (or not) a check-back.
    pub fn transaction_checked(&self, answer: &str) {
        self.transactions
            .checks
            .get_or_create(&AnswerLabel {
                answer: answer.to_owned(),
            })
            .inc();
    }

    /// A publish to `queue` was refused (`queue` empty when the view has no such queue).
    pub fn publish_error(&self, queue: &str, reason: &str) {
        self.publish_errors
            .get_or_create(&ErrorLabel {
                queue: queue.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Makes the counters of a queue and subscription this owner serves exist at 0, so the first
    /// event is an increase a rate or `increase()` sees (a series born at 1 shows none).
    pub fn owner_series(&self, queue: &str, subscriptions: &[&str]) {
        let labels = QueueLabel {
            queue: queue.to_owned(),
        };
        drop(self.published.get_or_create(&labels));
        for subscription in subscriptions {
            let labels = sub(queue, subscription);
            drop(self.forwarded.get_or_create(&labels));
            drop(self.acked.get_or_create(&labels));
            drop(self.dead_lettered.get_or_create(&labels));
        }
    }

    /// A replica confirmed a publish's copy.
    pub fn replicated(&self, queue: &str) {
        self.replicated
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .inc();
    }

    /// Standby copies of `queue` adopted as owner.
    pub fn replica_adopted(&self, queue: &str, n: u64) {
        self.replica_adopted
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .inc_by(n);
    }

    /// Publish-ack latency.
    pub fn publish_latency(&self, queue: &str, seconds: f64) {
        self.publish_latency
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .observe(seconds);
    }

    /// A delivery left this owner.
    pub fn forwarded(&self, queue: &str, subscription: &str) {
        self.forwarded
            .get_or_create(&sub(queue, subscription))
            .inc();
    }

    /// An ack reached this owner.
    pub fn acked(&self, queue: &str, subscription: &str) {
        self.acked.get_or_create(&sub(queue, subscription)).inc();
    }

    /// A message was dead-lettered.
    pub fn dead_lettered(&self, queue: &str, subscription: &str) {
        self.dead_lettered
            .get_or_create(&sub(queue, subscription))
            .inc();
    }

    /// A delivery was handed to an app here; `attempt` > 1 counts as a redelivery.
    pub fn delivered(
        &self,
        queue: &str,
        subscription: &str,
        attempt: u32,
        e2e_seconds: Option<f64>,
    ) {
        let labels = sub(queue, subscription);
        self.delivered.get_or_create(&labels).inc();
        if attempt > 1 {
            self.redelivered.get_or_create(&labels).inc();
        }
        if let Some(s) = e2e_seconds {
            self.e2e_latency.get_or_create(&labels).observe(s);
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(queue: &str, subscription: &str) -> SubLabel {
        sub(queue, subscription)
    }

    #[test]
    fn a_subscription_gone_from_a_scrape_leaves_no_stale_series() {
        let metrics = Metrics::default();
        let set = |n: i64| {
            move |g: &Gauge| {
                g.set(n);
            }
        };
        metrics
            .backlog
            .refresh([(label("q", "a"), set(3)), (label("q", "b"), set(4))]);
        let text = metrics.encode();
        assert!(text.contains("qmesh_backlog_messages{queue=\"q\",subscription=\"a\"} 3"));
        assert!(text.contains("qmesh_backlog_messages{queue=\"q\",subscription=\"b\"} 4"));
        metrics.backlog.refresh([(label("q", "a"), set(0))]);
        let text = metrics.encode();
        assert!(text.contains("qmesh_backlog_messages{queue=\"q\",subscription=\"a\"} 0"));
        assert!(!text.contains("subscription=\"b\""), "{text}");
        assert!(metrics.backlog.get(&label("q", "b")).is_none());
    }

    #[test]
    fn the_age_gauge_keeps_fractions_of_a_second() {
        let metrics = Metrics::default();
        metrics
            .oldest_age
            .refresh([(label("q", "a"), |g: &SecondsGauge| {
                g.set(1.5);
            })]);
        assert!(
            metrics
                .encode()
                .contains("qmesh_oldest_unacked_age_seconds{queue=\"q\",subscription=\"a\"} 1.5")
        );
    }
}
