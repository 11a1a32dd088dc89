//! Command-line flags (each also read from an environment variable) of `qmesh-sidecar`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// qmesh sidecar broker: persists what its app publishes, forwards it to consumer sidecars against
/// credits, and hands deliveries to its app over gRPC, HTTP or push.
#[derive(Parser, Debug, Clone)]
#[command(name = "qmesh-sidecar", version, about)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run the broker (the default).
    Run,
    /// Ask a running sidecar (on this host) to drain and stop: used as a preStop hook.
    Drain {
        /// Admin address of the sidecar.
        #[arg(long, env = "QMESH_ADMIN_ADDR", default_value = "127.0.0.1:7073")]
        admin_addr: SocketAddr,
    },
    /// Wait until a sidecar (on this host) is ready, then exit 0 (1 after `--timeout`): the
    /// postStart hook that holds the pod's app containers until their broker answers.
    WaitReady {
        /// Admin address of the sidecar.
        #[arg(long, env = "QMESH_ADMIN_ADDR", default_value = "127.0.0.1:7073")]
        admin_addr: SocketAddr,
        /// Longest wait.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// Log output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Settings of the broker.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Local mesh file (multi-document YAML of Queues, Subscriptions and Sidecar documents) to take the
    /// mesh view from instead of a control plane. Reloaded when it changes.
    #[arg(long, env = "QMESH_MESH_FILE", conflicts_with = "control_plane")]
    pub mesh_file: Option<PathBuf>,

    /// This sidecar's name: the `Sidecar` document in the mesh file, or the pod name.
    #[arg(long, env = "POD_NAME")]
    pub name: Option<String>,

    /// Namespace of the pod (or of the `Sidecar` document).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Control plane to join (`http://host:port`), e.g. the operator's `qmesh-control` service.
    #[arg(long, env = "QMESH_CONTROL_PLANE")]
    pub control_plane: Option<String>,

    /// Directory holding this sidecar's certificate (`tls.crt`, `tls.key`, `ca.crt`), issued by the
    /// mesh CA; re-read when it changes. Without it, a sidecar that joins a control plane asks it
    /// for a certificate.
    #[arg(long, env = "QMESH_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,

    /// Roots (PEM file) an `https://` control plane's certificate must chain to.
    #[arg(long, env = "QMESH_TRUST_BUNDLE_FILE")]
    pub trust_bundle: Option<PathBuf>,

    /// The same roots inline (PEM), as the injector sets them.
    #[arg(long, env = "QMESH_TRUST_BUNDLE", hide_env_values = true)]
    pub trust_bundle_pem: Option<String>,

    /// File holding the token presented to the control plane (projected service-account token).
    #[arg(long, env = "QMESH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Labels announced to a local control plane (`k=v,k=v`); ignored on Kubernetes.
    #[arg(long, env = "QMESH_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Port on 127.0.0.1 where the app takes pushed messages; replaces the port of every pushed
    /// Subscription served here (`qmesh run --app-port`).
    #[arg(long, env = "QMESH_APP_PORT")]
    pub app_port: Option<u16>,

    /// Peer API listen address (other sidecars connect here). Default: the mesh file's, else 0.0.0.0:7070.
    #[arg(long, env = "QMESH_PEER_ADDR")]
    pub peer_addr: Option<SocketAddr>,

    /// Address other sidecars should dial for this one's Peer API (default: derived from POD_IP or
    /// the listen address).
    #[arg(long, env = "QMESH_ADVERTISE_PEER_ADDR")]
    pub advertise_peer_addr: Option<String>,

    /// IP of the pod, used to derive the advertised peer address.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<String>,

    /// App gRPC API listen address (loopback only). Default: the mesh file's, else 127.0.0.1:7071.
    #[arg(long, env = "QMESH_GRPC_LISTEN")]
    pub grpc_addr: Option<SocketAddr>,

    /// App HTTP API listen address (loopback only). Default: the mesh file's, else 127.0.0.1:7072.
    #[arg(long, env = "QMESH_HTTP_LISTEN")]
    pub http_addr: Option<SocketAddr>,

    /// AMQP 0-9-1 listen address (loopback only) for RabbitMQ client code, or `off`. Default: the
    /// mesh file's `amqpAddress` (off when it has none: local sidecars need a port each), else
    /// 127.0.0.1:5672.
    #[arg(long, env = "QMESH_AMQP_LISTEN")]
    pub amqp_addr: Option<String>,

    /// Largest AMQP frame offered to clients (bytes, at least 4096).
    #[arg(long, env = "QMESH_AMQP_FRAME_MAX", default_value_t = 131_072, value_parser = clap::value_parser!(u32).range(4096..))]
    pub amqp_frame_max: u32,

    /// AMQP heartbeat interval offered to clients (their answer wins; 0s turns it off).
    #[arg(long, env = "QMESH_AMQP_HEARTBEAT", default_value = "60s", value_parser = parse_duration)]
    pub amqp_heartbeat: Duration,

    /// Most AMQP channels per connection.
    #[arg(long, env = "QMESH_AMQP_CHANNEL_MAX", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    pub amqp_channel_max: u16,

    /// Most AMQP connections at once; more are closed at once (counted in
    /// `qmesh_amqp_connections_refused_total`).
    #[arg(long, env = "QMESH_AMQP_MAX_CONNECTIONS", default_value_t = 256)]
    pub amqp_max_connections: usize,

    /// Admin listen address: /healthz, /readyz, /metrics, POST /drain. Default: the mesh file's, else
    /// 0.0.0.0:7073.
    #[arg(long, env = "QMESH_ADMIN_LISTEN")]
    pub admin_addr: Option<SocketAddr>,

    /// After binding, write the four addresses it listens on to this file as JSON
    /// (`{"peer":…,"grpc":…,"http":…,"admin":…}`, written whole by a rename): with port 0 in the
    /// addresses above, how a launcher learns the ports the kernel chose.
    #[arg(long, env = "QMESH_ADDRESSES_FILE")]
    pub addresses_file: Option<PathBuf>,

    /// Directory of the message log (an emptyDir in a pod).
    #[arg(long, env = "QMESH_DATA_DIR", default_value = "/var/lib/qmesh")]
    pub data_dir: PathBuf,

    /// Durability of the disk log: `always` (fsync before acknowledging a publish), `never`, or
    /// `interval:<duration>` (acknowledge after the write, fsync at most that often).
    #[arg(long, env = "QMESH_FSYNC", default_value = "always")]
    pub fsync: crate::store::FsyncPolicy,

    /// Size at which a log segment is rolled.
    #[arg(long, env = "QMESH_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub segment_bytes: u64,

    /// How long a Subscription may be missing from the mesh view before the messages it still owes
    /// here are dropped (deleting a Subscription deletes its backlog, like deleting a RabbitMQ
    /// queue; an invalid edit or a transient view shorter than this loses nothing).
    #[arg(long, env = "QMESH_REMOVED_SUBSCRIPTION_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub removed_subscription_grace: Duration,

    /// How long SIGTERM may take: finishing deliveries to the app and handing over the backlog.
    #[arg(long, env = "QMESH_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Most bytes of messages this sidecar owns at once, over all queues, held in memory or spilled
    /// to the log (the disk budget; publishes beyond get 429). Size the data volume to it.
    #[arg(long, env = "QMESH_MAX_OWNED_BYTES", default_value = "1Gi", value_parser = parse_bytes)]
    pub max_owned_bytes: u64,

    /// Memory for the messages this sidecar holds (with their bookkeeping and remembered ids), over
    /// all queues: beyond it, `durability: Disk` queues keep their newest messages in the log only
    /// and read them back as the backlog drains; memory and `publishAck: Replicated` queues refuse
    /// publishes (429). Default: a quarter of `QMESH_MEMORY_LIMIT` (the container's memory limit
    /// in bytes, from the downward API when injected), else 64Mi.
    #[arg(long, env = "QMESH_MEMORY_BUDGET", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,

    /// The container's memory limit in bytes (set by the injector from the downward API).
    #[arg(long, env = "QMESH_MEMORY_LIMIT")]
    pub memory_limit: Option<u64>,

    /// Most streams one connection to the peer port may have open at once (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`): a sidecar needs a few per peer (a forward link, a replica
    /// link, a hand-over); a peer that opens more waits, and one that ignores the setting has its
    /// extra streams refused.
    #[arg(long, env = "QMESH_MAX_PEER_STREAMS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_peer_streams: u32,

    /// Most transactions open at once (BeginTransaction beyond gets 429 / RESOURCE_EXHAUSTED).
    #[arg(long, env = "QMESH_MAX_OPEN_TRANSACTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_open_transactions: u64,

    /// Most messages one transaction may publish.
    #[arg(long, env = "QMESH_MAX_TRANSACTION_MESSAGES", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_transaction_messages: u64,

    /// Most bytes of half messages (published in transactions still open) over all transactions;
    /// they are held in memory until settled, within this bound.
    #[arg(long, env = "QMESH_MAX_TRANSACTION_BYTES", default_value = "64Mi", value_parser = parse_bytes)]
    pub max_transaction_bytes: u64,

    /// Most messages this sidecar owns at once, over all queues (publishes beyond get 429).
    #[arg(long, env = "QMESH_MAX_OWNED_MESSAGES", default_value_t = 10_000_000)]
    pub max_owned_messages: u64,

    /// `publishAck: Replicated`: how long a publish waits for a replica sidecar to confirm its copy
    /// before it fails with UNAVAILABLE / 503 ("no replica available").
    #[arg(long, env = "QMESH_REPLICA_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub replica_timeout: Duration,

    /// As a replica: adopt (become the owner of) the copies of an owner that left the mesh view or
    /// whose peer address has been unreachable, with no Replicate stream, for this long.
    #[arg(long, env = "QMESH_REPLICA_ADOPT_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub replica_adopt_after: Duration,

    /// As a replica: most bytes of other owners' copies kept (a Replicate stream that would exceed it
    /// is reset with "replica storage full").
    #[arg(long, env = "QMESH_MAX_REPLICA_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_replica_bytes: u64,

    /// Log level filter (`info`, `debug`, `qmesh_sidecar=debug,info`, ...).
    #[arg(long, env = "QMESH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "QMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The memory budget for held messages: `--memory-budget`, else a quarter of the container's
    /// memory limit, else 64 MiB; never below 64 KiB.
    pub fn memory_budget(&self) -> u64 {
        self.memory_budget
            .or(self.memory_limit.map(|limit| limit / 4))
            .unwrap_or(64 * 1024 * 1024)
            .max(64 * 1024)
    }
}

/// Parses `64Mi`, `1Gi`, `500000` (bytes, Kubernetes quantity form).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    qmesh_api::ByteSize::new(text).bytes()
}

/// Parses `500ms`, `30s`, `5m`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    text.parse::<qmesh_api::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}
