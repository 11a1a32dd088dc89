//! The web console of `qmesh dev` (`--console-addr`, default `127.0.0.1:7080`): one page in the
//! spirit of RabbitMQ's management UI — overview, queues, subscriptions, dead letters, sidecars —
//! that polls a small JSON API. Its HTML, CSS and JavaScript are compiled into the binary; nothing is
//! fetched from anywhere else.
//!
//! ```text
//!   browser ──GET /, /assets/*──────────▶ embedded page (a per-process token in a <meta>)
//!           ──GET /api/status───────────▶ DevSource: what `qmesh get` prints + delivery rates
//!           ──GET /api/dead-letters─────▶ Browse (max 1) of each dead-letter queue ┐ Control/
//!           ──GET /api/queues/…/messages▶ Browse, merged                          │ HeldMessages:
//!           ──POST /api/queues/…/redrive▶ Redrive (token header required)         │ every sidecar
//!           ──POST /api/queues/…/purge──▶ Purge ({"confirm": name}, token header) ┘ that may own it
//! ```
//!
//! The same console serves `qmesh dev` (its control plane in the same process) and a cluster
//! (`qmesh console`: the operator over a port-forward, as the user's Kubernetes identity).
//!
//! Security: it listens on loopback only (a non-loopback `--console-addr` is refused), answers only
//! requests whose `Host` is a loopback name for its port (no DNS rebinding), and a POST must come
//! from loopback, carry the page's token in `x-qmesh-console-token` and, when the browser sends an
//! `Origin`, come from the console's own origin — a cross-site form can set none of these. Bodies
//! are limited to 16 KiB; every error is a JSON object `{"error": …}` with a 4xx/5xx status.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
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
    control::{
        HeldRequest, MeshHeldRequest, MeshHeldResponse, MeshStatus, held_request::Call,
        held_response::Result as HeldResult,
    },
    join::HeldRouter,
    v1::{BrowseRequest, BrowseResponse, HeldMessage, PurgeRequest, RedriveRequest},
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

/// `qmesh console`.
#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// The cluster's operator (required: `qmesh dev` serves the console of a local mesh itself).
    #[command(flatten)]
    cluster: crate::control_plane::ClusterArgs,
    /// Where to serve the console (loopback only; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7081", value_parser = parse_addr)]
    console_addr: ConsoleAddr,
    /// Show only this namespace (what your RBAC lets you list); every namespace when not given.
    #[arg(short = 'n', long, default_value = "")]
    namespace: String,
    /// Only print the URL; do not open a browser.
    #[arg(long)]
    no_open: bool,
}

/// Runs `qmesh console`: checks the operator answers as the user, then serves until interrupted.
pub async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.cluster.is_set(),
        "qmesh console shows a cluster: pass --kubeconfig (a local mesh's console is served by `qmesh dev`)"
    );
    let addr = args
        .console_addr
        .0
        .context("--console-addr off leaves nothing to serve")?;
    let operator = args.cluster.operator().await?;
    operator
        .status(&args.namespace)
        .await
        .map_err(|s| anyhow::anyhow!("the operator refused the mesh status: {}", s.message()))?;
    let listener = bind(addr).await?;
    let scope = if args.namespace.is_empty() {
        "every namespace".to_owned()
    } else {
        format!("namespace {}", args.namespace)
    };
    println!(
        "qmesh console: http://{}/ — {scope} of the operator in {} (Ctrl-C to stop)",
        listener.local_addr()?,
        args.cluster.operator_namespace
    );
    if !args.no_open {
        open_browser(&format!("http://{}/", listener.local_addr()?));
    }
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(serve(
        listener,
        Arc::new(ControlBackend::new(operator, args.namespace)),
        shutdown.clone(),
    ));
    crate::signals::terminated().await;
    shutdown.cancel();
    served.await?
}

/// Opens `url` in the desktop's browser (`$BROWSER`, else `xdg-open`) when there is a display;
/// says so when it cannot (the URL is printed anyway).
fn open_browser(url: &str) {
    let display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()));
    if !display {
        return;
    }
    let browser = std::env::var("BROWSER").unwrap_or_else(|_| "xdg-open".to_owned());
    let opened = std::process::Command::new(&browser)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = opened {
        eprintln!(
            "qmesh console: could not open a browser with {browser} ({e}); open the URL above"
        );
    }
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

/// What the console shows, taken at one moment: what `Control/Status` answers, for every namespace
/// (or the one `qmesh console -n` shows).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The mesh status.
    pub status: MeshStatus,
}

/// Where the console's figures come from and how it reaches the messages sidecars hold: the
/// control plane of `qmesh dev` in the same process ([`DevBackend`]), the operator over gRPC
/// (`qmesh console`, [`ControlBackend`]), a fake in the tests.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The mesh now.
    async fn snapshot(&self) -> Result<Snapshot, tonic::Status>;
    /// `qmesh.control.v1.Control/HeldMessages`: `request` at every sidecar of the namespace that
    /// may own the queue.
    async fn held(&self, request: MeshHeldRequest) -> Result<MeshHeldResponse, tonic::Status>;
}

/// The console of `qmesh dev`: its control plane's state, and its sessions with the sidecars.
#[derive(Debug)]
pub struct DevBackend {
    source: Arc<DevSource>,
    router: HeldRouter<DevSource>,
}

impl DevBackend {
    /// Over `source`, reaching sidecars through `router` (the control plane's).
    pub fn new(source: Arc<DevSource>, router: HeldRouter<DevSource>) -> Self {
        Self { source, router }
    }
}

#[tonic::async_trait]
impl Backend for DevBackend {
    async fn snapshot(&self) -> Result<Snapshot, tonic::Status> {
        Ok(self.source.console_snapshot())
    }

    async fn held(&self, request: MeshHeldRequest) -> Result<MeshHeldResponse, tonic::Status> {
        self.router.held_messages(request, None).await
    }
}

/// The console of `qmesh console`: a control plane (the operator) over gRPC, as the user.
#[derive(Debug, Clone)]
pub struct ControlBackend {
    client: crate::control_plane::ControlPlane,
    namespace: String,
}

impl ControlBackend {
    /// Over the control plane `client` reaches, showing `namespace` (every namespace when empty).
    pub fn new(client: crate::control_plane::ControlPlane, namespace: String) -> Self {
        Self { client, namespace }
    }
}

#[tonic::async_trait]
impl Backend for ControlBackend {
    async fn snapshot(&self) -> Result<Snapshot, tonic::Status> {
        Ok(Snapshot {
            status: self.client.status(&self.namespace).await?,
        })
    }

    async fn held(&self, request: MeshHeldRequest) -> Result<MeshHeldResponse, tonic::Status> {
        self.client.held(request).await
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
        .route("/api/queues/{namespace}/{name}/purge", post(purge))
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
    match console.backend.snapshot().await {
        Ok(snapshot) => Json(status_json(&snapshot, now_ms())).into_response(),
        Err(refused) => refusal(&refused),
    }
}

/// A control plane's refusal as the console's error: the same meaning in HTTP terms.
fn refusal(status: &tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    error(code, format!("the control plane: {}", status.message()))
}

/// An age in seconds.
fn seconds(age: &prost_types::Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let whole = age.seconds as f64;
    whole + f64::from(age.nanos) / 1e9
}

fn limit_json(limit: &qmesh_proto::control::RateLimit) -> Value {
    json!({"messages_per_second": limit.messages_per_second, "burst": limit.burst})
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
                "half_messages": q.half_messages,
                "published_total": q.published_total,
                "publish_rate": q.publish_rate,
                "dead_letter_queue": q.dead_letter_queue,
                "dead_letter_for": dlqs.get(&key).cloned().unwrap_or_default(),
                "oldest_age_seconds": q.oldest_age.as_ref().map(seconds),
                "publish_rate_limit": q.publish_rate_limit.as_ref().map(limit_json),
            })
        })
        .collect();
    let subscriptions: Vec<Value> = status
        .subscriptions
        .iter()
        .map(|s| {
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "queue": s.queue,
                "mode": s.mode,
                "consumers": s.consumers,
                "app_consumers": s.consumer_streams,
                "backlog": s.backlog,
                "scheduled": s.scheduled,
                "in_flight": s.in_flight,
                "acked_total": s.acked_total,
                "ack_rate": s.ack_rate,
                "delivered_total": s.delivered_total,
                "deliver_rate": s.deliver_rate,
                "nacked_total": s.nacked_total,
                "dead_lettered_total": s.dead_lettered_total,
                "oldest_age_seconds": s.oldest_age.as_ref().map(seconds),
                "rate_limit": s.rate_limit.as_ref().map(limit_json),
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
                "labels": labels,
                "connected": s.connected,
                "owns": s.owns.iter().collect::<BTreeMap<_, _>>(),
                "consumes": s.consumes.iter().collect::<BTreeMap<_, _>>(),
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
            "deliver_rate": status.subscriptions.iter().map(|s| s.deliver_rate).sum::<f64>(),
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
        "transactions": status.transactions.iter().map(|t| json!({
            "namespace": t.namespace,
            "transaction": t.transaction,
            "outcome": t.outcome,
            "decided_by": t.decided_by,
            "messages": t.messages,
            "checks": t.checks,
            "queues": t.queues,
            "sidecar": t.sidecar,
            "at": t.at.map(|at| at.to_string()),
        })).collect::<Vec<_>>(),
    })
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

/// One sidecar's part of a mesh-wide answer: its name, and its answer or why there is none.
type Answer<T> = (String, Result<T, String>);

/// `request` at every sidecar of `namespace` that may own its queue, each answer taken apart by
/// `pick`; no such sidecar is no answer, not an error. A refusal of the whole request is the
/// console's error response.
async fn ask<T>(
    backend: &Arc<dyn Backend>,
    namespace: &str,
    call: Call,
    pick: impl Fn(HeldResult) -> Option<T>,
) -> Result<Vec<Answer<T>>, Response> {
    let request = MeshHeldRequest {
        namespace: namespace.to_owned(),
        request: Some(HeldRequest { call: Some(call) }),
    };
    let answered = match backend.held(request).await {
        Ok(answered) => answered,
        Err(s) if s.code() == tonic::Code::NotFound => return Ok(Vec::new()),
        Err(s) => return Err(refusal(&s)),
    };
    Ok(answered
        .sidecars
        .into_iter()
        .map(|sidecar| {
            let result = match sidecar.response.and_then(|r| r.result) {
                Some(HeldResult::Error(e)) => Err(e.message),
                Some(other) => pick(other).ok_or_else(|| "an answer of another kind".to_owned()),
                None => Err("no answer".to_owned()),
            };
            (sidecar.sidecar, result)
        })
        .collect())
}

/// Browse of `queue` at every sidecar of `namespace` that may own it.
async fn browse_all(
    backend: &Arc<dyn Backend>,
    namespace: &str,
    queue: &str,
    max: u32,
) -> Result<Vec<Answer<BrowseResponse>>, Response> {
    let call = Call::Browse(BrowseRequest {
        queue: queue.to_owned(),
        max,
    });
    ask(backend, namespace, call, |r| match r {
        HeldResult::Browse(b) => Some(b),
        _ => None,
    })
    .await
}

fn sidecar_results(browsed: &[Answer<BrowseResponse>]) -> Vec<Value> {
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
    let snapshot = match console.backend.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(refused) => return refusal(&refused),
    };
    let dlqs = dead_letter_queues(&snapshot.status);
    let mut rows = Vec::new();
    for ((namespace, name), sources) in dlqs {
        let browsed = match browse_all(&console.backend, &namespace, &name, 1).await {
            Ok(browsed) => browsed,
            Err(response) => return response,
        };
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
        // The full size, also when the sidecar cut the payload to fit its answer.
        "payload_bytes": held.payload_bytes.max(message.payload.len() as u64),
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
    let snapshot = match console.backend.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(refused) => return refusal(&refused),
    };
    if !queue_exists(&snapshot, &namespace, &name) {
        return unknown_queue(&namespace, &name);
    }
    let browsed = match browse_all(&console.backend, &namespace, &name, max).await {
        Ok(browsed) => browsed,
        Err(response) => return response,
    };
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
    /// Most messages handled at each sidecar (0 or absent = all).
    #[serde(default)]
    max: Option<u32>,
}

/// The body of a purge: the queue's name again, typed by the user to confirm.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    /// Must be the queue's name.
    #[serde(default)]
    confirm: String,
}

/// A small JSON body (empty = `T::default()`), or the error response.
#[allow(clippy::result_large_err)] // The error is the response itself, made once per request.
fn json_body<T: serde::de::DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
    example: &str,
) -> Result<T, Response> {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
            ));
        }
        Err(rejection) => return Err(error(rejection.status(), rejection.body_text())),
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body must be JSON like {example}: {e}"),
        )
    })
}

/// The sidecars' part of a mutation as JSON, and whether any sidecar took it.
fn sidecars_json<T>(answers: &[Answer<T>]) -> (Vec<Value>, bool) {
    let json = answers
        .iter()
        .map(|(name, r)| json!({"name": name, "error": r.as_ref().err()}))
        .collect();
    (json, answers.iter().any(|(_, r)| r.is_ok()))
}

/// `POST /api/queues/{namespace}/{name}/redrive` with `{"to": "…", "max": N}` (both optional):
/// Redrive at every sidecar of the namespace that may own the queue.
async fn redrive(
    State(console): State<Arc<Console>>,
    Path((namespace, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body: RedriveBody = match json_body(body, r#"{"to": "queue", "max": 10}"#) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let snapshot = match console.backend.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(refused) => return refusal(&refused),
    };
    if !queue_exists(&snapshot, &namespace, &name) {
        return unknown_queue(&namespace, &name);
    }
    let to = body.to.filter(|t| !t.is_empty()).unwrap_or_default();
    if !to.is_empty() && !queue_exists(&snapshot, &namespace, &to) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("cannot redrive to {namespace}/{to}: no such queue"),
        );
    }
    let call = Call::Redrive(RedriveRequest {
        queue: name.clone(),
        to: to.clone(),
        max: body.max.unwrap_or(0),
    });
    let answers = match ask(&console.backend, &namespace, call, |r| match r {
        HeldResult::Redrive(r) => Some(r),
        _ => None,
    })
    .await
    {
        Ok(answers) => answers,
        Err(response) => return response,
    };
    let (sidecars, reached) = sidecars_json(&answers);
    if !reached {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no sidecar that may own {namespace}/{name} could be asked ({} tried): nothing was redriven",
                answers.len()
            ),
        );
    }
    let (mut republished, mut unparked, mut skipped) = (0u32, 0u32, 0u32);
    let mut failed = Vec::new();
    for (sidecar, r) in &answers {
        let Ok(r) = r else { continue };
        republished += r.republished;
        unparked += r.unparked;
        skipped += r.skipped;
        for f in &r.failed {
            failed.push(json!({
                "sidecar": sidecar,
                "id": f.id,
                "error": f.error.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
            }));
        }
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

/// `POST /api/queues/{namespace}/{name}/purge` with `{"confirm": "<name>"}`: deletes the messages
/// every sidecar of the namespace holds for the queue (those no consumer holds now).
async fn purge(
    State(console): State<Arc<Console>>,
    Path((namespace, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body: PurgeBody = match json_body(body, r#"{"confirm": "<the queue's name>"}"#) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if body.confirm != name {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "a purge cannot be undone: confirm it with {{\"confirm\": {name:?}}} (the queue's name)"
            ),
        );
    }
    let snapshot = match console.backend.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(refused) => return refusal(&refused),
    };
    if !queue_exists(&snapshot, &namespace, &name) {
        return unknown_queue(&namespace, &name);
    }
    let call = Call::Purge(PurgeRequest {
        queue: name.clone(),
        max: 0,
    });
    let answers = match ask(&console.backend, &namespace, call, |r| match r {
        HeldResult::Purge(p) => Some(p),
        _ => None,
    })
    .await
    {
        Ok(answers) => answers,
        Err(response) => return response,
    };
    let (sidecars, reached) = sidecars_json(&answers);
    if !reached && !answers.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no sidecar that may own {namespace}/{name} could be asked ({} tried): nothing was purged",
                answers.len()
            ),
        );
    }
    let ok = || answers.iter().filter_map(|(_, r)| r.as_ref().ok());
    Json(json!({
        "namespace": namespace,
        "name": name,
        "purged": ok().map(|p| u64::from(p.purged)).sum::<u64>(),
        "skipped": ok().map(|p| u64::from(p.skipped)).sum::<u64>(),
        "remaining": ok().map(|p| p.remaining).sum::<u64>(),
        "sidecars": sidecars,
    }))
    .into_response()
}

#[cfg(test)]
mod tests;
