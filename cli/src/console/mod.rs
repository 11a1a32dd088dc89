//! The web console of `qmesh dev` (`--console-addr`, default `127.0.0.1:7080`): one page in the
//! spirit of RabbitMQ's management UI — overview, queues, subscriptions, dead letters, sidecars —
//! that polls a small JSON API. Its HTML, CSS and JavaScript are compiled into the binary; nothing is
//! fetched from anywhere else.
//!
//! ```text
//!   browser ──GET /, /assets/*──────────▶ embedded page (a per-process token in a <meta>)
//!           ──GET /api/status───────────▶ DevSource: what `qmesh get` prints + delivery rates
//!           ──GET /api/dead-letters─────▶ Browse (max 1) of each dead-letter queue at every sidecar
//!           ──GET /api/queues/…/messages▶ Browse at every sidecar of the namespace, merged
//!           ──POST /api/queues/…/redrive▶ Redrive at every sidecar (token header required)
//! ```
//!
//! Security: it listens on loopback only (a non-loopback `--console-addr` is refused), answers only
//! requests whose `Host` is a loopback name for its port (no DNS rebinding), and a POST must come
//! from loopback, carry the page's token in `x-qmesh-console-token` and, when the browser sends an
//! `Origin`, come from the console's own origin — a cross-site form can set none of these. Bodies
//! are limited to 16 KiB; every error is a JSON object `{"error": …}` with a 4xx/5xx status.

pub mod apps;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        ConnectInfo, DefaultBodyLimit, Path, Query, Request, State, rejection::BytesRejection,
    },
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use qmesh_proto::{
    control::MeshStatus,
    v1::{
        BrowseRequest, BrowseResponse, HeldMessage, RedriveRequest, RedriveResponse,
        broker_client::BrokerClient,
    },
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::dev::DevSource;

/// The header a mutating request must carry the page's token in.
pub const TOKEN_HEADER: &str = "x-qmesh-console-token";
/// Largest request body.
const MAX_BODY: usize = 16 * 1024;
/// Messages a peek returns unless `?max=` says otherwise.
const DEFAULT_PEEK: u32 = 100;
/// Most messages a peek returns (a sidecar's Browse returns at most 1000).
const MAX_PEEK: u32 = 1000;
/// How long one sidecar may take to answer.
const SIDECAR_TIMEOUT: Duration = Duration::from_secs(5);
/// Characters of a payload shown.
const PREVIEW_CHARS: usize = 200;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const FAVICON_SVG: &str = include_str!("assets/favicon.svg");

/// `--console-addr`: where to serve, or `None` for `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleAddr(pub Option<SocketAddr>);

/// Parses `--console-addr`: a loopback `ip:port` (`localhost:port` too), or `off`.
pub fn parse_addr(text: &str) -> Result<ConsoleAddr, String> {
    if matches!(text, "off" | "none" | "false" | "no") {
        return Ok(ConsoleAddr(None));
    }
    let addr = match text.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .map_err(|_| format!("{text:?}: not a port after localhost:"))?,
        None => text
            .parse::<SocketAddr>()
            .map_err(|_| format!("{text:?} is not an address (ip:port) nor `off`"))?,
    };
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr}: the console is served on loopback only (127.0.0.1:PORT or [::1]:PORT)"
        ));
    }
    Ok(ConsoleAddr(Some(addr)))
}

/// Binds the console's listener (loopback only).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "the console is served on loopback only, not on {addr}"
    );
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot serve the console on {addr} — is another `qmesh dev` running? (choose another \
             with --console-addr, or --console-addr off)"
        )
    })
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let port = listener.local_addr()?.port();
    let app = router(Arc::new(Console::new(backend, port)));
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .context("serving the console")
}

/// What the console shows, taken at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// What `Control/Status` answers `qmesh get`, for every namespace.
    pub status: MeshStatus,
    /// Delivery figures per `(namespace, subscription)` that `qmesh get` does not show.
    pub flows: BTreeMap<(String, String), Flow>,
    /// App gRPC address of each `(namespace, sidecar)` whose address is known (loopback only).
    pub apps: BTreeMap<(String, String), SocketAddr>,
}

/// Delivery figures of one subscription, summed over the connected sidecars.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flow {
    /// Deliveries handed to apps.
    pub delivered_total: u64,
    /// Deliveries nacked or timed out.
    pub nacked_total: u64,
    /// Deliveries per second between the last two reports.
    pub deliver_rate: f64,
    /// App streams or push endpoints consuming now.
    pub app_consumers: u32,
}

/// Where the console's figures come from and how it reaches the sidecars: [`DevBackend`] in
/// `qmesh dev`, a fake in the tests.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The mesh now.
    fn snapshot(&self) -> Snapshot;
    /// `qmesh.v1.Broker/Browse` at the sidecar whose app API is at `app`.
    async fn browse(
        &self,
        app: SocketAddr,
        request: BrowseRequest,
    ) -> Result<BrowseResponse, tonic::Status>;
    /// `qmesh.v1.Broker/Redrive` at the sidecar whose app API is at `app`.
    async fn redrive(
        &self,
        app: SocketAddr,
        request: RedriveRequest,
    ) -> Result<RedriveResponse, tonic::Status>;
}

/// The console of `qmesh dev`: its control plane's state, the sidecars' app APIs over gRPC.
#[derive(Debug)]
pub struct DevBackend {
    source: Arc<DevSource>,
    registry: PathBuf,
}

impl DevBackend {
    /// Over `source`, finding `qmesh run` sidecars' app addresses in `registry`
    /// ([`apps::registry_dir`]).
    pub fn new(source: Arc<DevSource>, registry: PathBuf) -> Self {
        Self { source, registry }
    }
}

async fn broker(app: SocketAddr) -> Result<BrokerClient<tonic::transport::Channel>, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{app}"))
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(SIDECAR_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot reach its app API {app}: {e}")))?;
    Ok(BrokerClient::new(channel))
}

#[tonic::async_trait]
impl Backend for DevBackend {
    fn snapshot(&self) -> Snapshot {
        self.source.console_snapshot(&apps::read(&self.registry))
    }

    async fn browse(
        &self,
        app: SocketAddr,
        request: BrowseRequest,
    ) -> Result<BrowseResponse, tonic::Status> {
        Ok(broker(app).await?.browse(request).await?.into_inner())
    }

    async fn redrive(
        &self,
        app: SocketAddr,
        request: RedriveRequest,
    ) -> Result<RedriveResponse, tonic::Status> {
        Ok(broker(app).await?.redrive(request).await?.into_inner())
    }
}

/// The console's shared state.
struct Console {
    backend: Arc<dyn Backend>,
    token: String,
    index: String,
    /// Host headers accepted (`127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`).
    hosts: BTreeSet<String>,
}

impl Console {
    fn new(backend: Arc<dyn Backend>, port: u16) -> Self {
        let token: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut hosts = BTreeSet::new();
        for name in ["127.0.0.1", "localhost", "[::1]"] {
            hosts.insert(format!("{name}:{port}"));
            if port == 80 {
                hosts.insert(name.to_owned());
            }
        }
        Self {
            backend,
            index: INDEX_HTML.replace("{{TOKEN}}", &token),
            token,
            hosts,
        }
    }
}

/// The console's routes over `console`; serve with `into_make_service_with_connect_info`.
fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/favicon.svg", get(favicon))
        .route("/favicon.ico", get(favicon))
        .route("/api/status", get(status))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/queues/{namespace}/{name}/messages", get(messages))
        .route("/api/queues/{namespace}/{name}/redrive", post(redrive))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(Arc::clone(&console), guard))
        .with_state(console)
}

/// A JSON error.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        Json(json!({"error": message, "status": status.as_u16()})),
    )
        .into_response()
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Host check on every request; loopback, origin and token checks on every mutating one; security
/// headers on every response.
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    let mut response = if !console.hosts.contains(&host.to_ascii_lowercase()) {
        error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "the console answers requests for 127.0.0.1, localhost or [::1] on its own port, \
                 not for host {host:?}"
            ),
        )
    } else if request.method() == Method::GET || request.method() == Method::HEAD {
        next.run(request).await
    } else {
        match refuse_mutation(&console, &request) {
            Some(refusal) => refusal,
            None => next.run(request).await,
        }
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Why a mutating request is refused, if it is.
fn refuse_mutation(console: &Console, request: &Request) -> Option<Response> {
    let from = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if !from.is_some_and(|peer| peer.ip().is_loopback()) {
        return Some(error(
            StatusCode::FORBIDDEN,
            "changes are accepted from loopback only",
        ));
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default().to_ascii_lowercase();
        let same = origin
            .strip_prefix("http://")
            .is_some_and(|host| console.hosts.contains(host));
        if !same {
            return Some(error(
                StatusCode::FORBIDDEN,
                format!(
                    "a change from origin {origin:?} is refused: only the console's own page may make one"
                ),
            ));
        }
    }
    let token = request
        .headers()
        .get(TOKEN_HEADER)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if !equal_in_constant_time(token, console.token.as_bytes()) {
        return Some(error(
            StatusCode::FORBIDDEN,
            format!(
                "missing or wrong {TOKEN_HEADER} header: changes are made from the console's page, which carries the token"
            ),
        ));
    }
    None
}

async fn index(State(console): State<Arc<Console>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        console.index.clone(),
    )
        .into_response()
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

async fn favicon() -> Response {
    ([(header::CONTENT_TYPE, "image/svg+xml")], FAVICON_SVG).into_response()
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such page or API: {}", request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// `(namespace, queue)` of every dead-letter queue, with the queues dead-lettering into it.
fn dead_letter_queues(status: &MeshStatus) -> BTreeMap<(String, String), Vec<String>> {
    let mut dlqs: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for q in status
        .queues
        .iter()
        .filter(|q| !q.dead_letter_queue.is_empty())
    {
        dlqs.entry((q.namespace.clone(), q.dead_letter_queue.clone()))
            .or_default()
            .push(q.name.clone());
    }
    dlqs
}

/// `GET /api/status`: everything the overview, queues, subscriptions and sidecars pages show.
async fn status(State(console): State<Arc<Console>>) -> Response {
    Json(status_json(&console.backend.snapshot(), now_ms())).into_response()
}

fn status_json(snapshot: &Snapshot, time_ms: u64) -> Value {
    let status = &snapshot.status;
    let dlqs = dead_letter_queues(status);
    let queues: Vec<Value> = status
        .queues
        .iter()
        .map(|q| {
            let key = (q.namespace.clone(), q.name.clone());
            json!({
                "namespace": q.namespace,
                "name": q.name,
                "publishers": q.publishers,
                "subscriptions": q.subscriptions,
                "backlog": q.backlog,
                "published_total": q.published_total,
                "publish_rate": q.publish_rate,
                "dead_letter_queue": q.dead_letter_queue,
                "dead_letter_for": dlqs.get(&key).cloned().unwrap_or_default(),
            })
        })
        .collect();
    let subscriptions: Vec<Value> = status
        .subscriptions
        .iter()
        .map(|s| {
            let flow = snapshot
                .flows
                .get(&(s.namespace.clone(), s.name.clone()))
                .copied()
                .unwrap_or_default();
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "queue": s.queue,
                "mode": s.mode,
                "consumers": s.consumers,
                "app_consumers": flow.app_consumers,
                "backlog": s.backlog,
                "in_flight": s.in_flight,
                "acked_total": s.acked_total,
                "ack_rate": s.ack_rate,
                "delivered_total": flow.delivered_total,
                "deliver_rate": flow.deliver_rate,
                "nacked_total": flow.nacked_total,
                "dead_lettered_total": s.dead_lettered_total,
            })
        })
        .collect();
    let sidecars: Vec<Value> = status
        .sidecars
        .iter()
        .map(|s| {
            let labels: BTreeMap<&String, &String> = s.labels.iter().collect();
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "peer_address": s.peer_address,
                "app_address": snapshot
                    .apps
                    .get(&(s.namespace.clone(), s.name.clone()))
                    .map(ToString::to_string),
                "labels": labels,
                "connected": s.connected,
            })
        })
        .collect();
    let dead_letters_waiting: u64 = status
        .queues
        .iter()
        .filter(|q| dlqs.contains_key(&(q.namespace.clone(), q.name.clone())))
        .map(|q| q.backlog)
        .sum();
    let namespaces: BTreeSet<&str> = status
        .queues
        .iter()
        .map(|q| q.namespace.as_str())
        .chain(status.subscriptions.iter().map(|s| s.namespace.as_str()))
        .chain(status.sidecars.iter().map(|s| s.namespace.as_str()))
        .collect();
    json!({
        "time_ms": time_ms,
        "namespaces": namespaces,
        "totals": {
            "queues": status.queues.len(),
            "subscriptions": status.subscriptions.len(),
            "backlog": status.queues.iter().map(|q| q.backlog).sum::<u64>(),
            "in_flight": status.subscriptions.iter().map(|s| s.in_flight).sum::<u64>(),
            "publish_rate": status.queues.iter().map(|q| q.publish_rate).sum::<f64>(),
            "deliver_rate": snapshot.flows.values().map(|f| f.deliver_rate).sum::<f64>(),
            "ack_rate": status.subscriptions.iter().map(|s| s.ack_rate).sum::<f64>(),
            "published_total": status.queues.iter().map(|q| q.published_total).sum::<u64>(),
            "acked_total": status.subscriptions.iter().map(|s| s.acked_total).sum::<u64>(),
            "dead_lettered_total": status.subscriptions.iter().map(|s| s.dead_lettered_total).sum::<u64>(),
            "dead_letters_waiting": dead_letters_waiting,
            "sidecars": status.sidecars.len(),
            "sidecars_up": status.sidecars.iter().filter(|s| s.connected).count(),
        },
        "queues": queues,
        "subscriptions": subscriptions,
        "sidecars": sidecars,
    })
}

/// A sidecar of a namespace the console may ask: its name and app address, or why not.
struct Target {
    name: String,
    app: Result<SocketAddr, String>,
}

/// Every sidecar of `namespace`, in name order.
fn targets(snapshot: &Snapshot, namespace: &str) -> Vec<Target> {
    snapshot
        .status
        .sidecars
        .iter()
        .filter(|s| s.namespace == namespace)
        .map(|s| {
            let app = if s.connected {
                snapshot
                    .apps
                    .get(&(s.namespace.clone(), s.name.clone()))
                    .copied()
                    .ok_or_else(|| {
                        "its app address is unknown (not started by `qmesh run` nor declared \
                         with a grpcAddress)"
                            .to_owned()
                    })
            } else {
                Err("not connected".to_owned())
            };
            Target {
                name: s.name.clone(),
                app,
            }
        })
        .collect()
}

fn queue_exists(snapshot: &Snapshot, namespace: &str, name: &str) -> bool {
    snapshot
        .status
        .queues
        .iter()
        .any(|q| q.namespace == namespace && q.name == name)
}

fn unknown_queue(namespace: &str, name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no queue {namespace}/{name} in the manifests"),
    )
}

/// A sidecar's Browse: messages, how many it holds, or the failure.
type Browsed = (String, Result<BrowseResponse, String>);

/// Browse of `queue` at every sidecar of `namespace` at once; a sidecar that does not know the
/// queue holds none of it.
async fn browse_all(
    backend: &Arc<dyn Backend>,
    snapshot: &Snapshot,
    namespace: &str,
    queue: &str,
    max: u32,
) -> Vec<Browsed> {
    let asks = targets(snapshot, namespace).into_iter().map(|t| {
        let backend = Arc::clone(backend);
        let queue = queue.to_owned();
        async move {
            let result = match t.app {
                Ok(app) => match backend
                    .browse(
                        app,
                        BrowseRequest {
                            queue: queue.clone(),
                            max,
                        },
                    )
                    .await
                {
                    Ok(r) => Ok(r),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(BrowseResponse::default()),
                    Err(s) => Err(s.message().to_owned()),
                },
                Err(why) => Err(why),
            };
            (t.name, result)
        }
    });
    futures::future::join_all(asks).await
}

fn sidecar_results(browsed: &[Browsed]) -> Vec<Value> {
    browsed
        .iter()
        .map(|(name, result)| match result {
            Ok(r) => json!({"name": name, "held": r.total, "error": null}),
            Err(e) => json!({"name": name, "held": null, "error": e}),
        })
        .collect()
}

/// `GET /api/dead-letters`: every dead-letter queue with the messages it holds, per sidecar.
async fn dead_letters(State(console): State<Arc<Console>>) -> Response {
    let snapshot = console.backend.snapshot();
    let dlqs = dead_letter_queues(&snapshot.status);
    let mut rows = Vec::new();
    for ((namespace, name), sources) in dlqs {
        let browsed = browse_all(&console.backend, &snapshot, &namespace, &name, 1).await;
        let held: u64 = browsed
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|r| r.total)
            .sum();
        let backlog = snapshot
            .status
            .queues
            .iter()
            .find(|q| q.namespace == namespace && q.name == name)
            .map(|q| q.backlog);
        rows.push(json!({
            "namespace": namespace,
            "name": name,
            "declared": backlog.is_some(),
            "dead_letter_for": sources,
            "backlog": backlog,
            "held": held,
            "sidecars": sidecar_results(&browsed),
        }));
    }
    Json(json!({"time_ms": now_ms(), "dead_letter_queues": rows})).into_response()
}

fn header<'a>(held: &'a HeldMessage, name: &str) -> Option<&'a str> {
    held.message
        .as_ref()
        .and_then(|m| m.headers.get(name))
        .map(String::as_str)
}

fn held_json(sidecar: &str, held: &HeldMessage) -> Value {
    let message = held.message.clone().unwrap_or_default();
    let (preview, encoding) = match std::str::from_utf8(&message.payload) {
        Ok(text) => {
            let mut preview: String = text.chars().take(PREVIEW_CHARS).collect();
            if text.chars().count() > PREVIEW_CHARS {
                preview.push('…');
            }
            (preview, "utf-8")
        }
        Err(_) => {
            let mut preview: String = message
                .payload
                .iter()
                .take(PREVIEW_CHARS / 2)
                .map(|b| format!("{b:02x}"))
                .collect();
            if message.payload.len() > PREVIEW_CHARS / 2 {
                preview.push('…');
            }
            (preview, "hex")
        }
    };
    let publish_time_ms = message.publish_time.as_ref().map(|t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos / 1_000_000))
    });
    let deliveries = header(held, "qmesh-delivery-count")
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| {
            held.subscriptions
                .iter()
                .map(|s| s.attempts)
                .max()
                .unwrap_or(0)
        });
    let last_error = header(held, "qmesh-last-error")
        .map(str::to_owned)
        .or_else(|| {
            held.subscriptions
                .iter()
                .map(|s| s.last_error.clone())
                .find(|e| !e.is_empty())
        });
    let headers: BTreeMap<&String, &String> = message.headers.iter().collect();
    json!({
        "sidecar": sidecar,
        "sequence": held.sequence,
        "id": message.id,
        "key": message.key,
        "publish_time_ms": publish_time_ms,
        "headers": headers,
        "reason": crate::dlq::reason(held),
        "original_id": header(held, "qmesh-original-id"),
        "original_queue": header(held, "qmesh-original-queue"),
        "original_subscription": header(held, "qmesh-original-subscription"),
        "deliveries": deliveries,
        "last_error": last_error,
        "payload_bytes": message.payload.len(),
        "payload_encoding": encoding,
        "payload_preview": preview,
        "subscriptions": held.subscriptions.iter().map(|s| json!({
            "subscription": s.subscription,
            "attempts": s.attempts,
            "state": s.state,
            "last_error": s.last_error,
        })).collect::<Vec<_>>(),
    })
}

/// `GET /api/queues/{namespace}/{name}/messages?max=N`: the messages the sidecars of the namespace
/// hold for the queue (dead letters, parked messages), merged, oldest first per sidecar.
async fn messages(
    State(console): State<Arc<Console>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(unknown) = query.keys().find(|k| k.as_str() != "max") {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown query parameter {unknown:?} (only max)"),
        );
    }
    let max = match query.get("max").map(|m| m.parse::<u32>()) {
        None => DEFAULT_PEEK,
        Some(Ok(m)) if (1..=MAX_PEEK).contains(&m) => m,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("max must be a number from 1 to {MAX_PEEK}"),
            );
        }
    };
    let snapshot = console.backend.snapshot();
    if !queue_exists(&snapshot, &namespace, &name) {
        return unknown_queue(&namespace, &name);
    }
    let browsed = browse_all(&console.backend, &snapshot, &namespace, &name, max).await;
    let total: u64 = browsed
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .map(|r| r.total)
        .sum();
    let mut messages = Vec::new();
    for (sidecar, result) in &browsed {
        for held in result.iter().flat_map(|r| &r.messages) {
            messages.push(held_json(sidecar, held));
        }
    }
    messages.truncate(max as usize);
    let dead_letter_for = dead_letter_queues(&snapshot.status)
        .remove(&(namespace.clone(), name.clone()))
        .unwrap_or_default();
    Json(json!({
        "namespace": namespace,
        "name": name,
        "dead_letter_for": dead_letter_for,
        "total": total,
        "messages": messages,
        "sidecars": sidecar_results(&browsed),
    }))
    .into_response()
}

/// The body of a redrive.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    /// Publish dead letters to this queue instead of their original one.
    #[serde(default)]
    to: Option<String>,
    /// Most messages handled over all sidecars (0 or absent = all).
    #[serde(default)]
    max: Option<u32>,
}

/// `POST /api/queues/{namespace}/{name}/redrive` with `{"to": "…", "max": N}` (both optional):
/// Redrive at every sidecar of the namespace.
async fn redrive(
    State(console): State<Arc<Console>>,
    Path((namespace, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
            );
        }
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let body: RedriveBody = if body.iter().all(u8::is_ascii_whitespace) {
        RedriveBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be JSON like {{\"to\": \"queue\", \"max\": 10}}: {e}"),
                );
            }
        }
    };
    let snapshot = console.backend.snapshot();
    if !queue_exists(&snapshot, &namespace, &name) {
        return unknown_queue(&namespace, &name);
    }
    let to = body.to.filter(|t| !t.is_empty()).unwrap_or_default();
    if !to.is_empty() && !queue_exists(&snapshot, &namespace, &to) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("cannot redrive to {namespace}/{to}: no such queue in the manifests"),
        );
    }
    let mut left = body.max.unwrap_or(0);
    let limited = left > 0;
    let (mut republished, mut unparked, mut skipped) = (0u32, 0u32, 0u32);
    let mut failed = Vec::new();
    let mut sidecars = Vec::new();
    let mut reached = 0usize;
    let all = targets(&snapshot, &namespace);
    let count = all.len();
    for target in all {
        if limited && left == 0 {
            break;
        }
        let result = match target.app {
            Ok(app) => console
                .backend
                .redrive(
                    app,
                    RedriveRequest {
                        queue: name.clone(),
                        to: to.clone(),
                        max: left,
                    },
                )
                .await
                .map(Some)
                .or_else(|s| {
                    if s.code() == tonic::Code::NotFound {
                        Ok(None)
                    } else {
                        Err(s.message().to_owned())
                    }
                }),
            Err(why) => Err(why),
        };
        match result {
            Ok(response) => {
                reached += 1;
                let r = response.unwrap_or_default();
                republished += r.republished;
                unparked += r.unparked;
                skipped += r.skipped;
                if limited {
                    left = left.saturating_sub(r.republished + r.unparked);
                }
                for f in &r.failed {
                    failed.push(json!({
                        "sidecar": target.name,
                        "id": f.id,
                        "error": f.error.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
                    }));
                }
                sidecars.push(json!({"name": target.name, "error": null}));
            }
            Err(e) => sidecars.push(json!({"name": target.name, "error": e})),
        }
    }
    if reached == 0 {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no sidecar of namespace {namespace} could be asked ({count} known): nothing was redriven"
            ),
        );
    }
    Json(json!({
        "namespace": namespace,
        "name": name,
        "to": to,
        "republished": republished,
        "unparked": unparked,
        "skipped": skipped,
        "failed": failed,
        "sidecars": sidecars,
    }))
    .into_response()
}

#[cfg(test)]
mod tests;
