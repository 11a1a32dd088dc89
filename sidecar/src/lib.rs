//! The qmesh sidecar broker. One runs beside each app pod (or local process):
//!
//! ```text
//!   app ──gRPC/HTTP (127.0.0.1)──▶ api ──▶ owner (log, delivery state) ══Peer/Forward══▶ other sidecars
//!   app ◀──gRPC/HTTP/push────────── consumer (buffer, leases, credits) ◀══Peer/Forward══ other owners
//!                                   view ◀── mesh file | control plane;  admin: health, metrics, drain
//!   owner ══Peer/Replicate (publishAck: Replicated)══▶ replica (other sidecars' standby copies, adoption)
//! ```
//!
//! [`run`] wires it together; the parts are modules so tests can drive them one at a time.

pub mod admin;
pub mod amqp;
pub mod api;
pub mod config;
pub mod consumer;
pub mod control;
pub mod error;
pub mod frames;
pub mod identity;
pub mod metrics;
pub mod owner;
pub mod peer;
mod rates;
pub mod replica;
mod rewind;
pub use qmesh_store as store;
pub mod supervise;
pub mod view;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use prometheus_client::metrics::gauge::Gauge;
use qmesh_proto::{control as wire, peer as peer_wire, v1};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    config::RunArgs,
    consumer::Consumers,
    error::BrokerError,
    metrics::Metrics,
    owner::{Limits, Owner, log::OwnerLog},
    view::{View, ViewRx},
};

/// A running sidecar's shared parts.
pub struct Sidecar {
    /// Owned messages and their delivery.
    pub owner: Arc<Owner>,
    /// Deliveries for this pod's apps.
    pub consumers: Arc<Consumers>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The current mesh view.
    pub view: ViewRx,
    /// Every task of the sidecar; a panic in one fails it.
    pub tasks: Arc<supervise::Supervisor>,
    /// The disk log's counters.
    log_stats: Option<Arc<qmesh_store::StoreStats>>,
    /// This sidecar, as peers know it.
    me: peer_wire::SidecarId,
    draining: AtomicBool,
    shutdown: tokio::sync::Notify,
    /// Publish and ack rates of the stats reports.
    rates: std::sync::Mutex<rates::Rates>,
}

/// Headers apps may not set: the broker's own (`qmesh-dead-letter-reason`, `qmesh-original-queue`,
/// …), which dead-letter routing and redrive trust.
pub const RESERVED_HEADER_PREFIX: &str = "qmesh-";

/// The first header of an app's message that only the broker may set.
fn reserved_header(message: &v1::Message) -> Option<&str> {
    message.headers.keys().map(String::as_str).find(|name| {
        name.get(..RESERVED_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
    })
}

impl Sidecar {
    /// Publishes an app's message (metrics and latency around [`Owner::publish`]).
    pub async fn publish(
        &self,
        queue: &str,
        message: v1::Message,
    ) -> Result<v1::PublishResponse, BrokerError> {
        self.publish_scheduled(queue, message, owner::Schedule::Now, "")
            .await
    }

    /// Publishes an app's message to be delivered no earlier than `schedule` says (delayed and
    /// scheduled messages), and only once `transaction` commits when one is named (non-empty).
    pub async fn publish_scheduled(
        &self,
        queue: &str,
        message: v1::Message,
        schedule: owner::Schedule,
        transaction: &str,
    ) -> Result<v1::PublishResponse, BrokerError> {
        let started = Instant::now();
        let result = match reserved_header(&message) {
            Some(name) => Err(BrokerError::Invalid(format!(
                "header {name:?} is reserved: headers starting with \"{RESERVED_HEADER_PREFIX}\" are \
                 set by the broker (dead-letter reasons, redrive origins, replica bookkeeping); \
                 rename it"
            ))),
            None if transaction.is_empty() => self.owner.publish(queue, message, schedule).await,
            None => {
                self.owner
                    .publish_in_transaction(transaction, queue, message, schedule)
                    .await
            }
        };
        match &result {
            Ok(_) => self
                .metrics
                .publish_latency(queue, started.elapsed().as_secs_f64()),
            Err(e) => {
                // The queue's name comes from the app: labelled only when the view knows it.
                let known = {
                    let view = self.view.borrow();
                    view.queue(queue).is_some() || view.is_foreign_queue(queue)
                };
                self.metrics
                    .publish_error(if known { queue } else { "" }, e.label());
            }
        }
        result
    }

    /// Whether the sidecar takes traffic: it has a view, is not draining and no task died.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && self.view.borrow().version() > 0
            && self.tasks.failure().is_none()
    }

    /// Starts a graceful shutdown (SIGTERM or `POST /drain`).
    pub fn begin_shutdown(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            self.owner.drain();
            self.shutdown.notify_waiters();
            self.shutdown.notify_one();
        }
    }

    /// Refreshes the gauges (backlog, oldest message's age, consumer links, in flight, the log's
    /// figures, the certificate's expiry) from the owner's and consumers' state, at each scrape.
    pub fn refresh_gauges(&self) {
        if let Some(stats) = &self.log_stats {
            self.metrics.log.observe(stats);
        }
        let (held, spilled) = self.owner.memory_figures();
        self.metrics.log.held_bytes.set(held as i64);
        self.metrics.log.spilled.set(spilled as i64);
        let figures = self.owner.stats();
        let kept: u64 = figures.iter().map(|q| q.kept_bytes).sum();
        self.metrics.log.kept_bytes.set(kept as i64);
        let label = |queue: &str, subscription: &str| metrics::SubLabel {
            queue: queue.to_owned(),
            subscription: subscription.to_owned(),
        };
        let owed = || {
            figures
                .iter()
                .flat_map(|q| q.subscriptions.iter().map(move |s| (q.queue.as_str(), s)))
        };
        for q in &figures {
            let subscriptions: Vec<&str> = q
                .subscriptions
                .iter()
                .map(|s| s.subscription.as_str())
                .collect();
            self.metrics.owner_series(&q.queue, &subscriptions);
        }
        self.metrics.backlog.refresh(owed().map(|(queue, s)| {
            let n = s.backlog as i64;
            (label(queue, &s.subscription), move |g: &Gauge| {
                g.set(n);
            })
        }));
        self.metrics.scheduled.refresh(owed().map(|(queue, s)| {
            let n = s.scheduled as i64;
            (label(queue, &s.subscription), move |g: &Gauge| {
                g.set(n);
            })
        }));
        self.metrics.oldest_age.refresh(owed().map(|(queue, s)| {
            let age = s.oldest_age.unwrap_or_default().as_secs_f64();
            (
                label(queue, &s.subscription),
                move |g: &metrics::SecondsGauge| {
                    g.set(age);
                },
            )
        }));
        // Dormant subscriptions (no route in the view) have no consumers to count.
        self.metrics
            .consumer_links
            .refresh(owed().filter_map(|(queue, s)| {
                let n = s.consumer_links? as i64;
                Some((label(queue, &s.subscription), move |g: &Gauge| {
                    g.set(n);
                }))
            }));
        self.metrics
            .in_flight
            .refresh(
                self.consumers
                    .in_flight()
                    .into_iter()
                    .map(|(subscription, queue, n)| {
                        (
                            metrics::SubLabel {
                                queue,
                                subscription,
                            },
                            move |g: &Gauge| {
                                g.set(n as i64);
                            },
                        )
                    }),
            );
        if let Some(expiry) = self.owner.dialer().certificate_expiry() {
            let seconds = expiry
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.metrics.certificate_expiry.set(seconds);
        }
    }

    /// Stats for the control plane, with publish and ack rates over the last
    /// [`rates::WINDOW`].
    pub fn stats(&self) -> wire::Stats {
        let now = Instant::now();
        let mut rates = self
            .rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let counters = self.consumers.counters();
        let mut subs: HashMap<String, wire::SubscriptionStats> = HashMap::new();
        let mut queues = Vec::new();
        let age = |d: Option<std::time::Duration>| {
            d.and_then(|d| prost_types::Duration::try_from(d).ok())
        };
        let half = self.owner.transactions().staged_by_queue();
        for q in self.owner.stats() {
            let oldest = q.subscriptions.iter().filter_map(|s| s.oldest_age).max();
            queues.push(wire::QueueStats {
                queue: q.queue.clone(),
                backlog_messages: q.backlog_messages,
                backlog_bytes: q.backlog_bytes,
                published_total: q.published_total,
                rejected_total: 0,
                publish_rate: rates.observe(&format!("q/{}", q.queue), q.published_total, now),
                oldest_age: age(oldest),
                half_messages: half.get(&q.queue).copied().unwrap_or(0),
            });
            for s in q.subscriptions {
                let e = subs.entry(s.subscription.clone()).or_default();
                e.subscription = s.subscription;
                e.queue = q.queue.clone();
                e.backlog = s.backlog;
                e.scheduled = s.scheduled;
                e.dead_lettered_total = s.dead_lettered_total;
                e.oldest_age = age(s.oldest_age);
            }
        }
        for (name, queue, in_flight) in self.consumers.in_flight() {
            let e = subs.entry(name.clone()).or_default();
            e.subscription = name.clone();
            e.queue = queue;
            e.in_flight = in_flight as u64;
            e.consumers = 1;
            if let Some(c) = counters.get(&name) {
                e.delivered_total = c.delivered;
                e.acked_total = c.acked;
                e.nacked_total = c.nacked;
                e.ack_rate = rates.observe(&format!("s/{name}"), c.acked, now);
                e.deliver_rate = rates.observe(&format!("d/{name}"), c.delivered, now);
            }
        }
        rates.sweep();
        wire::Stats {
            at: Some(std::time::SystemTime::now().into()),
            queues,
            subscriptions: subs.into_values().collect(),
            transactions: self
                .owner
                .transactions()
                .events()
                .into_iter()
                .map(|e| wire::TransactionEvent {
                    transaction: e.transaction,
                    outcome: e.outcome.to_owned(),
                    decided_by: e.decided_by.to_owned(),
                    messages: e.messages,
                    checks: e.checks,
                    at: Some(e.time.into()),
                    queues: e.queues,
                    sidecar: String::new(),
                    namespace: String::new(),
                })
                .collect(),
        }
    }

    /// The same figures as JSON (admin `/v1/stats`), with the owner's own per-subscription state
    /// (`owner`: in flight from here, waiting out a backoff, parked).
    pub fn stats_json(&self) -> serde_json::Value {
        let stats = self.stats();
        let figures = self.owner.stats();
        let kept: HashMap<String, (u64, u64)> = figures
            .iter()
            .map(|q| (q.queue.clone(), (q.kept_messages, q.kept_bytes)))
            .collect();
        let credits: HashMap<String, serde_json::Value> =
            self.consumers.credit_state().into_iter().collect();
        let owned: HashMap<String, owner::SubFigures> = figures
            .into_iter()
            .flat_map(|q| q.subscriptions)
            .map(|s| (s.subscription.clone(), s))
            .collect();
        serde_json::json!({
            "viewVersion": self.view.borrow().version(),
            "links": self.owner.link_credits(),
            "ready": self.is_ready(),
            "queues": stats.queues.iter().map(|q| serde_json::json!({
                "queue": q.queue, "backlog": q.backlog_messages, "backlogBytes": q.backlog_bytes,
                "published": q.published_total,
                "kept": kept.get(&q.queue).map_or(0, |k| k.0),
                "keptBytes": kept.get(&q.queue).map_or(0, |k| k.1),
            })).collect::<Vec<_>>(),
            "subscriptions": stats.subscriptions.iter().map(|s| serde_json::json!({
                "subscription": s.subscription, "queue": s.queue, "backlog": s.backlog,
                "inFlight": s.in_flight, "delivered": s.delivered_total, "acked": s.acked_total,
                "nacked": s.nacked_total, "deadLettered": s.dead_lettered_total,
                "owner": owned.get(&s.subscription).map(|o| serde_json::json!({
                    "inFlight": o.in_flight, "waiting": o.waiting, "scheduled": o.scheduled, "parked": o.parked,
                })),
                "credits": credits.get(&s.subscription),
            })).collect::<Vec<_>>(),
            "transactions": {
                "open": self.owner.transactions().open_count(),
                "halfMessages": self.owner.transactions().staged_count(),
                "byQueue": self.owner.transactions().staged_by_queue(),
                "events": self.owner.transactions().events(),
            },
        })
    }
}

/// Addresses a sidecar listens on.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    /// Peer API.
    pub peer: SocketAddr,
    /// App gRPC.
    pub grpc: SocketAddr,
    /// App HTTP.
    pub http: SocketAddr,
    /// Admin.
    pub admin: SocketAddr,
    /// AMQP 0-9-1, when on.
    pub amqp: Option<SocketAddr>,
}

impl Addresses {
    /// Writes the addresses as JSON to `path`, whole (a temporary file renamed over it).
    fn write_to(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = serde_json::json!({
            "peer": self.peer.to_string(),
            "grpc": self.grpc.to_string(),
            "http": self.http.to_string(),
            "admin": self.admin.to_string(),
            "amqp": self.amqp.map(|a| a.to_string()),
        })
        .to_string();
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("writing the addresses file {}", path.display()))
    }
}

/// The listening sockets of a sidecar.
struct Listeners {
    peer: TcpListener,
    grpc: TcpListener,
    http: TcpListener,
    admin: TcpListener,
    amqp: Option<TcpListener>,
}

impl Listeners {
    /// Binds every address; returns the sockets and the addresses they really have (port 0 is
    /// the kernel's choice).
    async fn bind(addresses: Addresses) -> anyhow::Result<(Self, Addresses)> {
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {what} address {addr}"))
        };
        let listeners = Self {
            peer: bind("peer", addresses.peer).await?,
            grpc: bind("gRPC", addresses.grpc).await?,
            http: bind("HTTP", addresses.http).await?,
            admin: bind("admin", addresses.admin).await?,
            amqp: match addresses.amqp {
                Some(addr) => Some(bind("AMQP", addr).await?),
                None => None,
            },
        };
        let bound = Addresses {
            peer: listeners.peer.local_addr()?,
            grpc: listeners.grpc.local_addr()?,
            http: listeners.http.local_addr()?,
            admin: listeners.admin.local_addr()?,
            amqp: listeners
                .amqp
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
        };
        Ok((listeners, bound))
    }
}

fn resolve_addresses(args: &RunArgs) -> anyhow::Result<(Addresses, Option<String>)> {
    let doc = match (&args.mesh_file, &args.name) {
        (Some(path), Some(name)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file = qmesh_core::MeshFile::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            file.sidecar(name).cloned()
        }
        _ => None,
    };
    let parse = |flag: Option<SocketAddr>,
                 from_doc: Option<&str>,
                 default: &str|
     -> anyhow::Result<SocketAddr> {
        match (flag, from_doc.filter(|s| !s.is_empty())) {
            (Some(a), _) => Ok(a),
            (None, Some(text)) => text
                .parse()
                .with_context(|| format!("address {text:?} in the mesh file")),
            (None, None) => Ok(default.parse()?),
        }
    };
    let spec = doc.as_ref().map(|d| &d.spec);
    let addresses = Addresses {
        peer: parse(
            args.peer_addr,
            spec.map(|s| s.peer_address.as_str()),
            "0.0.0.0:7070",
        )?,
        grpc: parse(
            args.grpc_addr,
            spec.map(|s| s.grpc_address.as_str()),
            "127.0.0.1:7071",
        )?,
        http: parse(
            args.http_addr,
            spec.map(|s| s.http_address.as_str()),
            "127.0.0.1:7072",
        )?,
        admin: parse(
            args.admin_addr,
            spec.map(|s| s.admin_address.as_str()),
            "0.0.0.0:7073",
        )?,
        amqp: amqp_address(args, spec)?,
    };
    let app_ports = [
        ("grpc", Some(addresses.grpc)),
        ("http", Some(addresses.http)),
        ("amqp", addresses.amqp),
    ];
    for (what, addr) in app_ports.into_iter().filter_map(|(w, a)| Some((w, a?))) {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "the app {what} API must listen on loopback only, not {addr}"
        );
    }
    let advertised = args
        .advertise_peer_addr
        .clone()
        .or_else(|| spec.map(|s| s.peer_address.clone()));
    Ok((addresses, advertised))
}

/// The AMQP address: `--amqp-addr` (`off` turns it off), else the mesh file's `amqpAddress` (off
/// when it has none: local sidecars need a port each), else 127.0.0.1:5672.
fn amqp_address(
    args: &RunArgs,
    spec: Option<&qmesh_api::SidecarSpec>,
) -> anyhow::Result<Option<SocketAddr>> {
    let text = match (&args.amqp_addr, spec, &args.mesh_file) {
        (Some(flag), _, _) => flag.as_str(),
        (None, Some(spec), _) => spec.amqp_address.as_deref().unwrap_or("off"),
        (None, None, Some(_)) => "off",
        (None, None, None) => "127.0.0.1:5672",
    };
    match text.trim() {
        "" | "off" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .with_context(|| format!("AMQP address {addr:?} (host:port, or off)")),
    }
}

/// Runs a sidecar until SIGTERM/SIGINT or `POST /drain`, then drains (bounded by the grace period)
/// and returns. `disk` is the log for `durability: Disk` queues.
pub async fn run(args: RunArgs, disk: Arc<dyn OwnerLog>) -> anyhow::Result<()> {
    let name = args
        .name
        .clone()
        .context("--name (or POD_NAME) is required")?;
    let namespace = args.namespace.clone();
    let (addresses, advertised) = resolve_addresses(&args)?;
    // Bound before anything is announced: with port 0 the kernel's choice is what peers are told.
    let (listeners, addresses) = Listeners::bind(addresses).await?;
    if let Some(path) = &args.addresses_file {
        addresses.write_to(path)?;
    }
    let peer_address = advertised
        .or_else(|| {
            args.pod_ip
                .as_ref()
                .map(|ip| format!("{ip}:{}", addresses.peer.port()))
        })
        .unwrap_or_else(|| addresses.peer.to_string());
    let incarnation: u64 = rand::random();
    let me = peer_wire::SidecarId {
        namespace: namespace.clone(),
        name: name.clone(),
        incarnation,
    };

    // The view: from the mesh file now, or from the control plane when it answers.
    let initial = match &args.mesh_file {
        Some(path) => view::view_from_mesh_file(path, &namespace, &name, 1)?,
        None => View::default(),
    };
    let (view_tx, view_rx) = watch::channel(Arc::new(initial));
    let (sidecar_tx, sidecar_rx) = watch::channel(None);
    let tasks = supervise::Supervisor::new();
    let trust = control::ControlTrust::new(trust_bundle(&args)?);
    let labels = args
        .labels
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let control_identity = control::Identity {
        namespace: namespace.clone(),
        name: name.clone(),
        peer_address: peer_address.clone(),
        token_file: args.token_file.clone(),
        labels,
        incarnation,
    };
    if let Some(path) = args.mesh_file.clone() {
        tasks.spawn(
            "mesh file",
            view::follow_mesh_file(path, namespace.clone(), name.clone(), view_tx.clone()),
        );
    } else if let Some(endpoint) = args.control_plane.clone() {
        tasks.spawn(
            "control plane",
            control::follow(
                endpoint,
                control_identity.clone(),
                Arc::clone(&trust),
                view_tx.clone(),
                sidecar_rx,
            ),
        );
    } else {
        anyhow::bail!("give either --mesh-file or --control-plane");
    }

    // Who this sidecar is on the peer port: there is no plaintext peer port.
    let credentials = match (&args.identity_dir, &args.control_plane) {
        (Some(dir), _) => {
            let (credentials, material) = identity::load(dir)?;
            tasks.spawn(
                "identity reload",
                identity::follow_dir(dir.clone(), Arc::clone(&credentials), material),
            );
            credentials
        }
        (None, Some(endpoint)) => {
            let material = control::first_certificate(endpoint, &control_identity, &trust).await;
            let credentials = qmesh_identity::Credentials::new(&material)?;
            tasks.spawn(
                "certificate renewal",
                control::renew(
                    endpoint.clone(),
                    control_identity.clone(),
                    Arc::clone(&trust),
                    Arc::clone(&credentials),
                ),
            );
            credentials
        }
        (None, None) => anyhow::bail!(
            "the peer port speaks mutual TLS only: give --identity-dir with a certificate from the \
             mesh CA, or --control-plane to be issued one"
        ),
    };
    let dialer = identity::Dialer::new(Some(Arc::clone(&credentials)), view_rx.clone());

    let metrics = Arc::new(Metrics::default());
    let log_stats = disk.stats();
    let memory: Arc<dyn OwnerLog> = Arc::new(owner::log::MemoryLog);
    let limits = Limits {
        max_bytes: args.max_owned_bytes,
        max_messages: args.max_owned_messages,
        memory: args.memory_budget(),
    };
    let owner = Owner::start(
        view_rx.clone(),
        disk,
        memory,
        owner::Settings {
            me: me.clone(),
            limits,
            replica_timeout: args.replica_timeout,
            removed_grace: args.removed_subscription_grace,
            dialer,
            transactions: owner::transactions::TransactionLimits {
                max_open: usize::try_from(args.max_open_transactions).unwrap_or(usize::MAX),
                max_messages: usize::try_from(args.max_transaction_messages).unwrap_or(usize::MAX),
                max_bytes: args.max_transaction_bytes,
            },
            app_port: args.app_port,
        },
        Arc::clone(&metrics),
        Arc::clone(&tasks),
    );
    let replicas = replica::ReplicaStore::open(
        replica::ReplicaConfig {
            dir: Some(args.data_dir.join("replicas")),
            fsync: args.fsync,
            segment_bytes: args.segment_bytes,
            max_bytes: args.max_replica_bytes,
            adopt_after: args.replica_adopt_after,
        },
        view_rx.clone(),
        Arc::clone(&metrics),
    )
    .with_context(|| {
        format!(
            "opening the replica store in {}",
            args.data_dir.join("replicas").display()
        )
    })?;
    tasks.spawn(
        "replica adoption",
        Arc::clone(&replicas).watch(Arc::clone(&owner)),
    );
    let consumers = Consumers::start(
        view_rx.clone(),
        Arc::clone(&metrics),
        args.app_port,
        Arc::clone(&tasks),
    );
    let sidecar = Arc::new(Sidecar {
        owner,
        consumers: Arc::clone(&consumers),
        metrics,
        view: view_rx,
        tasks: Arc::clone(&tasks),
        log_stats,
        me: me.clone(),
        draining: AtomicBool::new(false),
        shutdown: tokio::sync::Notify::new(),
        rates: std::sync::Mutex::default(),
    });
    let _ = sidecar_tx.send(Some(Arc::clone(&sidecar)));

    let Listeners {
        peer: peer_listener,
        grpc: grpc_listener,
        http: http_listener,
        admin: admin_listener,
        amqp: amqp_listener,
    } = listeners;
    tracing::info!(
        %name, %namespace, peer = %addresses.peer, advertised = %peer_address, grpc = %addresses.grpc,
        http = %addresses.http, admin = %addresses.admin, amqp = ?addresses.amqp, "qmesh sidecar listening"
    );

    let max_message = frames::CEILING;
    let max_peer_frame = frames::PEER_FRAME_CEILING;
    let frame_limits = frames::FrameLimits::default();
    tasks.spawn(
        "frame limits",
        frame_limits.clone().follow(sidecar.view.clone()),
    );
    let peer_router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(frame_limits.peer_layer())
        .max_concurrent_streams(Some(args.max_peer_streams))
        // A peer whose connection went silent (a partition that drops packets, a frozen pod) is
        // found out here too, not only by the side that dials: its streams end and what they held
        // — an owner's credits, a consumer's deliveries — is freed.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(
            qmesh_proto::peer::peer_server::PeerServer::new(peer::PeerService::new(
                Arc::clone(&consumers),
                Arc::clone(&sidecar.owner),
                replicas,
                me.clone(),
                Arc::clone(&tasks),
                sidecar.view.clone(),
            ))
            .max_decoding_message_size(max_peer_frame)
            .max_encoding_message_size(max_peer_frame),
        );
    let peer_server = {
        let credentials = Arc::clone(&credentials);
        peer_router.serve_with_incoming(qmesh_identity::transport::accept(
            peer_listener,
            Arc::new(move || credentials.server()),
        ))
    };
    let grpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(frame_limits.app_layer())
        .add_service(
            qmesh_proto::v1::broker_server::BrokerServer::new(api::grpc::BrokerService::new(
                Arc::clone(&sidecar),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        )
        .serve_with_incoming(incoming(grpc_listener));
    let http_server = axum::serve(
        http_listener,
        api::http::router(Arc::clone(&sidecar), max_message),
    );
    let admin_server = axum::serve(
        admin_listener,
        admin::router(Arc::clone(&sidecar)).into_make_service_with_connect_info::<SocketAddr>(),
    );

    let amqp_server = {
        let sidecar = Arc::clone(&sidecar);
        let settings = amqp::Settings {
            frame_max: args.amqp_frame_max,
            heartbeat: args.amqp_heartbeat,
            channel_max: args.amqp_channel_max,
            max_connections: args.amqp_max_connections,
        };
        async move {
            match amqp_listener {
                Some(listener) => amqp::serve(listener, sidecar, settings).await,
                None => std::future::pending().await,
            }
        }
    };
    let servers = async {
        tokio::try_join!(
            async { amqp_server.await.context("AMQP server") },
            async { peer_server.await.context("peer server") },
            async { grpc_server.await.context("gRPC server") },
            async { http_server.await.context("HTTP server") },
            async { admin_server.await.context("admin server") },
        )
    };
    let signals = {
        let sidecar = Arc::clone(&sidecar);
        async move {
            let notified = sidecar.shutdown.notified();
            wait_for_signal(notified).await;
            sidecar.begin_shutdown();
        }
    };
    tokio::select! {
        result = servers => { result?; }
        () = signals => {}
        reason = tasks.failed() => {
            // The log holds everything acknowledged: exiting lets the kubelet restart on it.
            anyhow::bail!("{reason}");
        }
    }
    // The grace period bounds the whole drain, whatever a peer or the disk does meanwhile.
    let bound = args.shutdown_grace + DRAIN_OVERRUN;
    if tokio::time::timeout(bound, drain(&sidecar, args.shutdown_grace, &me))
        .await
        .is_err()
    {
        tracing::warn!(
            ?bound,
            "drain did not finish within the grace period; what is still owned stays in the log"
        );
    }
    Ok(())
}

/// The roots to verify the control plane with: `--trust-bundle-pem`, `--trust-bundle`, or the
/// identity directory's `ca.crt`.
fn trust_bundle(args: &RunArgs) -> anyhow::Result<Option<String>> {
    if let Some(pem) = args
        .trust_bundle_pem
        .as_ref()
        .filter(|p| !p.trim().is_empty())
    {
        return Ok(Some(pem.clone()));
    }
    if let Some(path) = &args.trust_bundle {
        return std::fs::read_to_string(path)
            .map(Some)
            .with_context(|| format!("reading the trust bundle {}", path.display()));
    }
    Ok(args
        .identity_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join(qmesh_identity::authority::BUNDLE_FILE)).ok()))
}

/// How long a drain may run past the grace period (a last log write, releasing replicas) before the
/// sidecar exits anyway.
const DRAIN_OVERRUN: Duration = Duration::from_secs(2);

/// Accepted connections with Nagle's algorithm off: small gRPC frames (acks, credits, publish
/// answers) must not wait for a delayed ACK.
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
        if let Ok(s) = &stream {
            let _ = s.set_nodelay(true);
        }
        stream
    })
}

async fn wait_for_signal(notified: tokio::sync::futures::Notified<'_>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            notified.await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
            () = notified => tracing::info!("drain requested"),
        }
    }
    #[cfg(not(unix))]
    notified.await;
}

/// Graceful stop: waits (up to half of `grace`) for the backlog to be delivered and the apps to
/// settle what they hold, then hands what this sidecar still owns to other sidecars of the mesh (each
/// persists it and becomes its owner) — again every second while something is left and the grace
/// lasts (a peer may be draining too, or refuse a queue) — then returns.
async fn drain(sidecar: &Sidecar, grace: Duration, me: &peer_wire::SidecarId) {
    let deadline = Instant::now() + grace;
    let mut hand_over_at = Instant::now() + grace / 2;
    loop {
        let backlog = sidecar.owner.backlog();
        let in_flight: usize = sidecar
            .consumers
            .in_flight()
            .iter()
            .map(|(_, _, n)| n)
            .sum();
        if backlog == 0 && in_flight == 0 {
            tracing::info!("drained: nothing owned, nothing in flight");
            sidecar
                .owner
                .release_replicas(Instant::now() + Duration::from_secs(1))
                .await;
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                backlog,
                in_flight,
                "grace period over with messages still owned; they stay in the log for the next start"
            );
            return;
        }
        if backlog > 0 && Instant::now() >= hand_over_at {
            sidecar.owner.handing_over(true);
            hand_over(sidecar, me, deadline).await;
            sidecar.owner.handing_over(false);
            hand_over_at = Instant::now() + Duration::from_secs(1);
            continue;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Most bytes of messages in one hand-over batch (one message if larger), within the receiver's
/// frame limit.
const HAND_OVER_BATCH_BYTES: u64 = frames::PEER_BATCH_BYTES as u64;

/// Hands the owned backlog over, queue by queue and batch by batch, to the first peer that takes
/// each queue. A batch is of one queue, so a peer that may not own it refuses all of it; a peer that
/// took only part of a batch says how much, and exactly that is forgotten here.
async fn hand_over(sidecar: &Sidecar, me: &peer_wire::SidecarId, deadline: Instant) {
    use qmesh_proto::peer::{HandOverBatch, peer_client::PeerClient};
    let mut batch_no = 0;
    let (queues, peers) = (sidecar.owner.owned_queues(), sidecar.owner.peers());
    if peers.is_empty() {
        tracing::warn!(
            ?queues,
            "nothing to hand over to: no ready peer may own these queues"
        );
    }
    for queue in queues {
        for peer in &peers {
            if Instant::now() >= deadline {
                return;
            }
            let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{peer}")) {
                Ok(e) => e.connect_timeout(Duration::from_secs(2)),
                Err(_) => continue,
            };
            let channel = match sidecar.owner.dialer().connect(endpoint, peer, None).await {
                Ok(channel) => channel,
                Err(error) => {
                    tracing::warn!(%peer, %queue, %error, "could not reach a peer to hand over to; trying another");
                    continue;
                }
            };
            let mut client = PeerClient::new(channel)
                .max_decoding_message_size(frames::CEILING)
                .max_encoding_message_size(frames::PEER_FRAME_CEILING);
            let refused = loop {
                if Instant::now() >= deadline {
                    return;
                }
                let messages = sidecar
                    .owner
                    .owned_messages(&queue, 200, HAND_OVER_BATCH_BYTES);
                if messages.is_empty() {
                    // Spilled messages are handed over too, once read back into memory.
                    if sidecar.owner.spilled(&queue) {
                        if !sidecar.owner.page_in_queue(&queue).await {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                    break false;
                }
                batch_no += 1;
                let batch = HandOverBatch {
                    from: Some(me.clone()),
                    batch: batch_no,
                    messages: messages.clone(),
                };
                let answer = async {
                    let mut acks = client
                        .hand_over(tokio_stream::iter(vec![batch]))
                        .await?
                        .into_inner();
                    acks.message().await
                };
                // A peer that does not answer before the grace ends keeps nothing: what it did not
                // acknowledge stays owned here, in the log.
                let Ok(answer) = tokio::time::timeout_at(deadline.into(), answer).await else {
                    tracing::warn!(%peer, %queue, "peer did not answer the hand-over before the grace period ended");
                    return;
                };
                match answer {
                    Ok(Some(ack)) => {
                        let adopted = (ack.adopted as usize).min(messages.len());
                        sidecar.owner.handed_over(&messages[..adopted]);
                        if adopted > 0 {
                            tracing::info!(%peer, %queue, messages = adopted, "handed over owned messages");
                        }
                        if let Some(error) = ack.error {
                            tracing::info!(%peer, %queue, reason = %error.message, "peer refused the hand-over; trying another");
                            break true;
                        }
                    }
                    Ok(None) => break true,
                    Err(status) => {
                        tracing::info!(%peer, %queue, reason = %status.message(), "peer refused the hand-over stream; trying another");
                        break true;
                    }
                }
            };
            if !refused {
                break;
            }
        }
    }
}
