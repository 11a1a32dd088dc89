//! Prometheus metrics of the sidecar, labelled by queue and subscription. Counters are bumped where
//! things happen; gauges (backlog, in flight) are refreshed from the owner and consumer state when
//! scraped.

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

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// Error kind (`backlog_full`, ...).
    pub reason: String,
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
    pub backlog: Family<SubLabel, Gauge>,
    /// Deliveries held by this pod's apps (refreshed on scrape).
    pub in_flight: Family<SubLabel, Gauge>,
    publish_latency: Family<QueueLabel, Histogram, fn() -> Histogram>,
    e2e_latency: Family<SubLabel, Histogram, fn() -> Histogram>,
    /// The disk log and the owner's memory (refreshed on scrape).
    pub log: LogMetrics,
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
        let backlog = Family::default();
        let in_flight = Family::default();
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
            "backlog",
            "Messages this owner holds that a subscription has not acked",
            backlog.clone(),
        );
        registry.register(
            "in_flight",
            "Deliveries held by this pod's apps, not yet settled",
            in_flight.clone(),
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
        Self {
            log,
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
            in_flight,
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

    /// A publish was refused.
    pub fn publish_error(&self, reason: &str) {
        self.publish_errors
            .get_or_create(&ErrorLabel {
                reason: reason.to_owned(),
            })
            .inc();
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
