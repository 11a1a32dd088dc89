//! The console's JSON API over a fake mesh, through a real listener and raw HTTP/1.1 (so the Host,
//! loopback, origin and token checks are exercised as a browser or `curl` would meet them).

use std::{collections::BTreeMap, net::SocketAddr, sync::Mutex};

use qmesh_core::MeshFile;
use qmesh_proto::{
    control::{HeldResponse, SidecarHeld},
    control::{
        Hello, MeshStatus, QueueStatus, SidecarStatus, Stats, SubscriptionStats, SubscriptionStatus,
    },
    join::MeshSource,
    v1::{HeldFor, Message, RedriveFailure},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn dead_letter(id: &str, payload: &[u8]) -> HeldMessage {
    HeldMessage {
        sequence: 7,
        payload_bytes: payload.len() as u64,
        message: Some(Message {
            id: id.into(),
            payload: payload.to_vec().into(),
            headers: [
                ("qmesh-dead-letter-reason", "max deliveries (2) reached"),
                ("qmesh-original-queue", "orders"),
                ("qmesh-original-subscription", "billing"),
                ("qmesh-original-id", "order-1"),
                ("qmesh-delivery-count", "2"),
                ("qmesh-last-error", "nacked"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..Default::default()
        }),
        subscriptions: vec![HeldFor {
            subscription: "dlq-audit".into(),
            attempts: 0,
            state: "ready".into(),
            last_error: String::new(),
        }],
    }
}

/// A control plane whose sidecars hold a list of messages per `(sidecar, queue)`: `billing` and
/// `shop` answer, `down` does not; no sidecar may own `jobs`.
struct Fake {
    snapshot: Snapshot,
    held: Mutex<BTreeMap<(String, String), Vec<HeldMessage>>>,
    calls: Mutex<Vec<MeshHeldRequest>>,
}

impl Fake {
    fn answer(&self, sidecar: &str, call: &Call) -> HeldResult {
        if sidecar == "down" {
            return HeldResult::Error(qmesh_proto::v1::Error {
                message: "the sidecar did not answer within 30s".into(),
                ..Default::default()
            });
        }
        let mut held = self.held.lock().unwrap();
        match call {
            Call::Browse(b) => {
                let all = held
                    .get(&(sidecar.to_owned(), b.queue.clone()))
                    .cloned()
                    .unwrap_or_default();
                HeldResult::Browse(BrowseResponse {
                    total: all.len() as u64,
                    messages: all.into_iter().take(b.max as usize).collect(),
                })
            }
            Call::Redrive(r) => {
                let list = held
                    .entry((sidecar.to_owned(), r.queue.clone()))
                    .or_default();
                let n = if r.max == 0 {
                    list.len()
                } else {
                    list.len().min(r.max as usize)
                };
                let moved: Vec<HeldMessage> = list.drain(..n).collect();
                let failed = moved
                    .iter()
                    .filter(|m| m.message.as_ref().is_some_and(|m| m.id == "stuck"))
                    .map(|m| RedriveFailure {
                        id: m.message.clone().unwrap_or_default().id,
                        error: Some(qmesh_proto::v1::Error {
                            message: "backlog full".into(),
                            ..Default::default()
                        }),
                    })
                    .collect::<Vec<_>>();
                HeldResult::Redrive(qmesh_proto::v1::RedriveResponse {
                    republished: u32::try_from(moved.len() - failed.len()).unwrap(),
                    failed,
                    ..Default::default()
                })
            }
            Call::Purge(p) => {
                let list = held
                    .entry((sidecar.to_owned(), p.queue.clone()))
                    .or_default();
                let purged = u32::try_from(list.len()).unwrap();
                list.clear();
                HeldResult::Purge(qmesh_proto::v1::PurgeResponse {
                    purged,
                    ..Default::default()
                })
            }
        }
    }
}

#[tonic::async_trait]
impl Backend for Fake {
    async fn snapshot(&self) -> Result<Snapshot, tonic::Status> {
        Ok(self.snapshot.clone())
    }

    async fn held(&self, request: MeshHeldRequest) -> Result<MeshHeldResponse, tonic::Status> {
        self.calls.lock().unwrap().push(request.clone());
        let call = request.request.and_then(|r| r.call).unwrap();
        let queue = match &call {
            Call::Browse(b) => &b.queue,
            Call::Redrive(r) => &r.queue,
            Call::Purge(p) => &p.queue,
        };
        if request.namespace != "default" || queue == "jobs" {
            return Err(tonic::Status::not_found("no sidecar may own it"));
        }
        let sidecars = ["billing", "down", "shop"]
            .into_iter()
            .map(|name| SidecarHeld {
                sidecar: name.to_owned(),
                response: Some(HeldResponse {
                    result: Some(self.answer(name, &call)),
                }),
            })
            .collect();
        Ok(MeshHeldResponse { sidecars })
    }
}

fn sidecar(name: &str, connected: bool) -> SidecarStatus {
    SidecarStatus {
        namespace: "default".into(),
        name: name.into(),
        peer_address: "127.0.0.1:1".into(),
        labels: [("app".to_owned(), name.to_owned())].into(),
        connected,
        owns: if name == "shop" {
            [("orders".to_owned(), 4)].into()
        } else {
            Default::default()
        },
        consumes: Default::default(),
    }
}

fn fake() -> Fake {
    let status = MeshStatus {
        queues: vec![
            QueueStatus {
                namespace: "default".into(),
                name: "orders".into(),
                publishers: 1,
                subscriptions: 1,
                backlog: 4,
                publish_rate: 2.5,
                published_total: 10,
                dead_letter_queue: "orders-dlq".into(),
                oldest_age: Some(prost_types::Duration {
                    seconds: 75,
                    nanos: 500_000_000,
                }),
                publish_rate_limit: Some(qmesh_proto::control::RateLimit {
                    messages_per_second: 50.0,
                    burst: 50,
                }),
                half_messages: 2,
            },
            QueueStatus {
                namespace: "default".into(),
                name: "orders-dlq".into(),
                subscriptions: 1,
                backlog: 3,
                ..Default::default()
            },
            QueueStatus {
                namespace: "default".into(),
                name: "jobs".into(),
                ..Default::default()
            },
        ],
        subscriptions: vec![SubscriptionStatus {
            namespace: "default".into(),
            name: "billing".into(),
            queue: "orders".into(),
            consumers: 1,
            backlog: 4,
            in_flight: 2,
            ack_rate: 1.5,
            acked_total: 6,
            dead_lettered_total: 3,
            mode: "Pull".into(),
            delivered_total: 12,
            nacked_total: 6,
            deliver_rate: 3.0,
            consumer_streams: 1,
            ..Default::default()
        }],
        sidecars: vec![
            sidecar("billing", true),
            sidecar("down", true),
            sidecar("gone", false),
            sidecar("mystery", true),
            sidecar("shop", true),
        ],
        transactions: vec![qmesh_proto::control::TransactionEvent {
            transaction: "tx-1".into(),
            outcome: "rolled-back".into(),
            decided_by: "on-unknown".into(),
            messages: 3,
            checks: 15,
            at: Some(prost_types::Timestamp {
                seconds: 1_796_000_000,
                nanos: 0,
            }),
            queues: vec!["orders".into()],
            sidecar: "shop".into(),
            namespace: "default".into(),
        }],
    };
    let snapshot = Snapshot { status };
    let held = [
        (
            ("shop".to_owned(), "orders-dlq".to_owned()),
            vec![
                dead_letter("dl-1", b"{\"order\": 1}"),
                dead_letter("dl-2", &[0xff, 0x00, 0x10]),
            ],
        ),
        (
            ("billing".to_owned(), "orders-dlq".to_owned()),
            vec![dead_letter("dl-3", "x".repeat(500).as_bytes())],
        ),
    ]
    .into();
    Fake {
        snapshot,
        held: Mutex::new(held),
        calls: Mutex::new(Vec::new()),
    }
}

/// A console over `backend` on a free loopback port.
async fn start(backend: Arc<dyn Backend>) -> (SocketAddr, CancellationToken) {
    let listener = bind(addr("127.0.0.1:0")).await.unwrap();
    let at = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, backend, shutdown.clone()));
    (at, shutdown)
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request; `Host` is the console's own unless `headers` gives one.
async fn http(
    at: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {at}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, mut body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let headers = head.to_ascii_lowercase();
    let decoded;
    if headers.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        loop {
            let (size, rest) = body.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.push_str(&rest[..size]);
            body = &rest[size + 2..];
        }
        decoded = out;
    } else {
        decoded = body.to_owned();
    }
    Reply {
        status,
        headers,
        body: decoded,
    }
}

async fn token(at: SocketAddr) -> String {
    let page = http(at, "GET", "/", &[], b"").await;
    assert_eq!(page.status, 200);
    let start = page
        .body
        .find("name=\"qmesh-console-token\" content=\"")
        .unwrap()
        + 36;
    let token = page.body[start..start + 32].to_owned();
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    token
}

#[test]
fn the_console_address_is_loopback_or_off() {
    assert_eq!(parse_addr("off").unwrap(), ConsoleAddr(None));
    assert_eq!(
        parse_addr("127.0.0.1:7080").unwrap(),
        ConsoleAddr(Some(addr("127.0.0.1:7080")))
    );
    assert_eq!(
        parse_addr("localhost:0").unwrap(),
        ConsoleAddr(Some(addr("127.0.0.1:0")))
    );
    assert!(parse_addr("[::1]:7080").is_ok());
    let refused = parse_addr("0.0.0.0:7080").unwrap_err();
    assert!(refused.contains("loopback only"), "{refused}");
    assert!(parse_addr("10.1.2.3:80").is_err());
    assert!(parse_addr("7080").is_err());
}

#[tokio::test]
async fn the_page_and_its_assets_are_embedded_with_a_token_and_a_strict_policy() {
    let (at, shutdown) = start(Arc::new(fake())).await;
    let page = http(at, "GET", "/", &[], b"").await;
    assert!(
        page.headers.contains("content-type: text/html"),
        "{}",
        page.headers
    );
    assert!(
        page.headers
            .contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{}",
        page.headers
    );
    assert!(page.headers.contains("x-frame-options: deny"));
    assert!(!page.body.contains("{{TOKEN}}"));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no CDN"
    );
    let first = token(at).await;
    let js = http(at, "GET", "/assets/app.js", &[], b"").await;
    assert_eq!(js.status, 200);
    assert!(js.headers.contains("content-type: text/javascript"));
    assert!(js.body.contains("/api/status"));
    let css = http(at, "GET", "/assets/app.css", &[], b"").await;
    assert!(css.headers.contains("content-type: text/css"));
    for icon in ["/favicon.svg", "/favicon.ico"] {
        assert_eq!(http(at, "GET", icon, &[], b"").await.status, 200);
    }
    let missing = http(at, "GET", "/api/nothing", &[], b"").await;
    assert_eq!(missing.status, 404);
    assert!(
        missing.json()["error"]
            .as_str()
            .unwrap()
            .contains("/api/nothing")
    );
    shutdown.cancel();

    // Another console process has another token.
    let (other, shutdown) = start(Arc::new(fake())).await;
    assert_ne!(token(other).await, first);
    shutdown.cancel();
}

#[tokio::test]
async fn status_rolls_up_totals() {
    let (at, shutdown) = start(Arc::new(fake())).await;
    let reply = http(at, "GET", "/api/status", &[], b"").await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.contains("cache-control: no-store"));
    let status = reply.json();
    let totals = &status["totals"];
    assert_eq!(totals["backlog"], 7);
    assert_eq!(totals["dead_letters_waiting"], 3);
    assert_eq!(totals["dead_lettered_total"], 3);
    assert_eq!(totals["publish_rate"], 2.5);
    assert_eq!(totals["deliver_rate"], 3.0);
    assert_eq!(totals["ack_rate"], 1.5);
    assert_eq!(totals["in_flight"], 2);
    assert_eq!(totals["sidecars"], 5);
    assert_eq!(totals["sidecars_up"], 4);
    assert_eq!(status["namespaces"], json!(["default"]));
    let dlq = &status["queues"][1];
    assert_eq!(dlq["name"], "orders-dlq");
    assert_eq!(dlq["dead_letter_for"], json!(["orders"]));
    let billing = &status["subscriptions"][0];
    assert_eq!(billing["delivered_total"], 12);
    assert_eq!(billing["nacked_total"], 6);
    assert_eq!(billing["mode"], "Pull");
    let sidecars = status["sidecars"].as_array().unwrap();
    assert_eq!(sidecars[4]["name"], "shop");
    assert_eq!(sidecars[4]["owns"], json!({"orders": 4}));
    let orders = &status["queues"][0];
    assert_eq!(orders["oldest_age_seconds"], 75.5);
    assert_eq!(
        orders["publish_rate_limit"],
        json!({"messages_per_second": 50.0, "burst": 50})
    );
    assert_eq!(status["queues"][1]["oldest_age_seconds"], Value::Null);
    assert_eq!(sidecars[0]["labels"], json!({"app": "billing"}));
    assert_eq!(orders["half_messages"], 2);
    assert_eq!(
        status["transactions"],
        json!([{
            "namespace": "default", "transaction": "tx-1", "outcome": "rolled-back",
            "decided_by": "on-unknown", "messages": 3, "checks": 15, "queues": ["orders"],
            "sidecar": "shop", "at": "2026-11-30T00:53:20Z",
        }])
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_peek_merges_every_sidecar_and_says_which_could_not_be_asked() {
    let (at, shutdown) = start(Arc::new(fake())).await;
    let reply = http(
        at,
        "GET",
        "/api/queues/default/orders-dlq/messages",
        &[],
        b"",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let peek = reply.json();
    assert_eq!(peek["total"], 3);
    assert_eq!(peek["dead_letter_for"], json!(["orders"]));
    let messages = peek["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0]["sidecar"], "billing");
    assert_eq!(messages[0]["payload_bytes"], 500);
    assert!(
        messages[0]["payload_preview"]
            .as_str()
            .unwrap()
            .ends_with('…')
    );
    let first = &messages[1];
    assert_eq!(first["sidecar"], "shop");
    assert_eq!(first["id"], "dl-1");
    assert_eq!(first["reason"], "max deliveries (2) reached");
    assert_eq!(first["original_queue"], "orders");
    assert_eq!(first["original_subscription"], "billing");
    assert_eq!(first["original_id"], "order-1");
    assert_eq!(first["deliveries"], 2);
    assert_eq!(first["last_error"], "nacked");
    assert_eq!(first["payload_preview"], "{\"order\": 1}");
    assert_eq!(first["payload_encoding"], "utf-8");
    assert_eq!(
        first["headers"]["qmesh-dead-letter-reason"],
        "max deliveries (2) reached"
    );
    assert_eq!(messages[2]["payload_encoding"], "hex");
    assert_eq!(messages[2]["payload_preview"], "ff0010");
    let sidecars: BTreeMap<String, Value> = peek["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s.clone()))
        .collect();
    assert_eq!(sidecars["shop"]["held"], 2);
    assert_eq!(sidecars["billing"]["held"], 1);
    assert!(
        sidecars["down"]["error"]
            .as_str()
            .unwrap()
            .contains("did not answer")
    );
    assert_eq!(sidecars.len(), 3, "only sidecars that may own the queue");

    let limited = http(
        at,
        "GET",
        "/api/queues/default/orders-dlq/messages?max=1",
        &[],
        b"",
    )
    .await;
    assert_eq!(limited.json()["messages"].as_array().unwrap().len(), 1);
    assert_eq!(limited.json()["total"], 3);
    // A queue no sidecar may own now has nothing held.
    let jobs = http(at, "GET", "/api/queues/default/jobs/messages", &[], b"").await;
    assert_eq!(jobs.status, 200);
    assert_eq!(jobs.json()["total"], 0);

    let dead_letters = http(at, "GET", "/api/dead-letters", &[], b"").await.json();
    let row = &dead_letters["dead_letter_queues"][0];
    assert_eq!(row["name"], "orders-dlq");
    assert_eq!(row["held"], 3);
    assert_eq!(row["backlog"], 3);
    assert_eq!(row["dead_letter_for"], json!(["orders"]));

    for (path, status, words) in [
        (
            "/api/queues/default/nope/messages",
            404,
            "no queue default/nope",
        ),
        (
            "/api/queues/other/orders/messages",
            404,
            "no queue other/orders",
        ),
        ("/api/queues/default/orders-dlq/messages?max=0", 400, "max"),
        ("/api/queues/default/orders-dlq/messages?max=x", 400, "max"),
        (
            "/api/queues/default/orders-dlq/messages?max=5000",
            400,
            "max",
        ),
        (
            "/api/queues/default/orders-dlq/messages?limit=5",
            400,
            "limit",
        ),
    ] {
        let reply = http(at, "GET", path, &[], b"").await;
        assert_eq!(reply.status, status, "{path}: {}", reply.body);
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(words), "{path}: {error}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_redrive_needs_the_page_token_and_covers_every_sidecar() {
    let backend = Arc::new(fake());
    let (at, shutdown) = start(Arc::clone(&backend) as Arc<dyn Backend>).await;
    let token = token(at).await;
    let path = "/api/queues/default/orders-dlq/redrive";
    let json_type = ("Content-Type", "application/json");
    let own_origin = format!("http://{at}");

    // Refused: no token, a wrong one, another site's origin (even with the token), a GET.
    for headers in [
        vec![json_type],
        vec![
            json_type,
            (TOKEN_HEADER, "0123456789abcdef0123456789abcdef"),
        ],
        vec![
            json_type,
            (TOKEN_HEADER, token.as_str()),
            ("Origin", "http://evil.example"),
        ],
    ] {
        let reply = http(at, "POST", path, &headers, b"{}").await;
        assert_eq!(reply.status, 403, "{headers:?}: {}", reply.body);
        assert!(reply.json()["error"].is_string());
    }
    let get = http(at, "GET", path, &[], b"").await;
    assert_eq!(get.status, 405);
    assert!(get.json()["error"].as_str().unwrap().contains("GET"));
    assert!(
        backend.calls.lock().unwrap().is_empty(),
        "nothing reached the control plane"
    );

    // Bad input: clear 4xx errors.
    let with_token = |extra: &[(&'static str, &'static str)]| {
        let mut h = vec![
            json_type,
            (TOKEN_HEADER, token.as_str()),
            ("Origin", own_origin.as_str()),
        ];
        h.extend_from_slice(extra);
        h
    };
    let big = vec![b' '; MAX_BODY + 10];
    for (path, body, status, words) in [
        (path, &b"{not json"[..], 400, "must be JSON"),
        (path, &b"{\"max\": -1}"[..], 400, "must be JSON"),
        (path, &b"{\"queue\": \"x\"}"[..], 400, "unknown field"),
        (path, &b"{\"to\": \"nowhere\"}"[..], 400, "no such queue"),
        (
            "/api/queues/default/nope/redrive",
            &b"{}"[..],
            404,
            "no queue",
        ),
        (path, &big[..], 413, "larger than"),
    ] {
        let reply = http(at, "POST", path, &with_token(&[]), body).await;
        assert_eq!(reply.status, status, "{}", reply.body);
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(words), "{error}");
    }
    assert!(backend.calls.lock().unwrap().is_empty());

    // With the token: every sidecar that may own the queue is asked; one that did not answer is
    // named.
    let reply = http(at, "POST", path, &with_token(&[]), b"").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let result = reply.json();
    assert_eq!(result["republished"], 3);
    assert_eq!(result["failed"], json!([]));
    let calls = backend.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "one call, answered by every sidecar");
    assert_eq!(calls[0].namespace, "default");
    let errors: Vec<&str> = result["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["error"].is_null())
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(errors, ["down"]);
    let peek = http(
        at,
        "GET",
        "/api/queues/default/orders-dlq/messages",
        &[],
        b"",
    )
    .await;
    assert_eq!(peek.json()["total"], 0);

    // `max` applies at each sidecar; `to` is passed on; a failure per message is reported.
    backend.held.lock().unwrap().insert(
        ("billing".into(), "orders-dlq".into()),
        vec![
            dead_letter("a", b""),
            dead_letter("b", b""),
            dead_letter("d", b""),
        ],
    );
    backend.held.lock().unwrap().insert(
        ("shop".into(), "orders-dlq".into()),
        vec![dead_letter("stuck", b""), dead_letter("c", b"")],
    );
    backend.calls.lock().unwrap().clear();
    let reply = http(
        at,
        "POST",
        path,
        &with_token(&[]),
        br#"{"to": "jobs", "max": 2}"#,
    )
    .await;
    let result = reply.json();
    assert_eq!(result["republished"], 3, "{result}");
    assert_eq!(result["failed"][0]["id"], "stuck");
    assert_eq!(result["failed"][0]["sidecar"], "shop");
    assert_eq!(result["failed"][0]["error"], "backlog full");
    let calls = backend.calls.lock().unwrap().clone();
    match calls[0].request.clone().and_then(|r| r.call) {
        Some(Call::Redrive(r)) => {
            assert_eq!((r.max, r.to.as_str()), (2, "jobs"));
        }
        other => panic!("{other:?}"),
    }

    // A curl-like client without Origin but with the token may redrive too.
    let reply = http(at, "POST", path, &[(TOKEN_HEADER, token.as_str())], b"").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    shutdown.cancel();

    // A namespace without a sidecar to ask: nothing was redriven, and the answer says so.
    let mut lonely = fake();
    lonely.snapshot.status.queues.push(QueueStatus {
        namespace: "lonely".into(),
        name: "q".into(),
        ..Default::default()
    });
    let (at, shutdown) = start(Arc::new(lonely)).await;
    let token = self::token(at).await;
    let reply = http(
        at,
        "POST",
        "/api/queues/lonely/q/redrive",
        &[(TOKEN_HEADER, token.as_str())],
        b"{}",
    )
    .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("nothing was redriven")
    );
    shutdown.cancel();
}

#[tokio::test]
async fn requests_for_another_host_name_are_refused() {
    let (at, shutdown) = start(Arc::new(fake())).await;
    for host in ["evil.example", "evil.example:80", "127.0.0.1:1"] {
        let reply = http(at, "GET", "/api/status", &[("Host", host)], b"").await;
        assert_eq!(reply.status, 421, "{host}");
        assert!(reply.json()["error"].as_str().unwrap().contains("host"));
    }
    let port = at.port().to_string();
    for host in [format!("localhost:{port}"), format!("LOCALHOST:{port}")] {
        let reply = http(at, "GET", "/api/status", &[("Host", host.as_str())], b"").await;
        assert_eq!(reply.status, 200, "{host}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_non_loopback_console_is_refused() {
    let error = bind(addr("0.0.0.0:0")).await.unwrap_err();
    assert!(error.to_string().contains("loopback only"), "{error}");
}

/// The dev control plane's side: the latest report of each sidecar, rolled up.
#[tokio::test]
async fn the_dev_snapshot_rolls_up_the_latest_reports() {
    let manifests = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: declared, labels: {app: shop}}
spec: {peerAddress: "127.0.0.1:9201", grpcAddress: "127.0.0.1:9202", httpAddress: "127.0.0.1:9203"}
"#;
    let source = DevSource::new(MeshFile::parse(manifests).unwrap()).quiet();
    let hello = Hello {
        namespace: "default".into(),
        name: "billing-1".into(),
        peer_address: "127.0.0.1:9301".into(),
        labels: [("app".to_owned(), "billing".to_owned())].into(),
        ..Default::default()
    };
    source.admit(&hello, 1).await.unwrap();
    let report = |seconds: i64, delivered: u64| Stats {
        at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        queues: vec![qmesh_proto::control::QueueStats {
            queue: "orders".into(),
            published_total: delivered * 2,
            publish_rate: 20.0,
            ..Default::default()
        }],
        subscriptions: vec![SubscriptionStats {
            subscription: "billing".into(),
            queue: "orders".into(),
            delivered_total: delivered,
            acked_total: delivered / 2,
            nacked_total: 1,
            consumers: 2,
            ack_rate: 5.0,
            deliver_rate: 10.0,
            ..Default::default()
        }],
        transactions: vec![qmesh_proto::control::TransactionEvent {
            transaction: format!("tx-{seconds}"),
            outcome: "committed".into(),
            at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        }],
    };
    let key = qmesh_core::SidecarKey::new("default", "billing-1");
    source.record_stats(&key, 1, report(100, 10));
    source.record_stats(&key, 1, report(102, 30));
    let snapshot = source.console_snapshot();
    // Rates and counters are the sidecars' own, rolled up (`qmesh get` shows the same).
    let status = &snapshot.status;
    let billing = &status.subscriptions[0];
    assert_eq!(billing.name, "billing");
    assert_eq!(
        (
            billing.delivered_total,
            billing.nacked_total,
            billing.consumer_streams
        ),
        (30, 1, 2)
    );
    assert!((billing.deliver_rate - 10.0).abs() < 1e-9, "{billing:?}");
    assert!((billing.ack_rate - 5.0).abs() < 1e-9, "{billing:?}");
    assert!(
        (status.queues[0].publish_rate - 20.0).abs() < 1e-9,
        "{status:?}"
    );
    // The latest report's transaction outcomes, named by their sidecar.
    let events: Vec<(&str, &str, &str)> = status
        .transactions
        .iter()
        .map(|t| {
            (
                t.transaction.as_str(),
                t.sidecar.as_str(),
                t.namespace.as_str(),
            )
        })
        .collect();
    assert_eq!(events, [("tx-102", "billing-1", "default")]);
}

#[tokio::test]
async fn a_purge_needs_the_queue_name_to_confirm_and_empties_every_sidecar() {
    let backend = Arc::new(fake());
    let (at, shutdown) = start(Arc::clone(&backend) as Arc<dyn Backend>).await;
    let token = token(at).await;
    let path = "/api/queues/default/orders-dlq/purge";
    let with_token = [(TOKEN_HEADER, token.as_str())];
    let refused = http(at, "POST", path, &[], br#"{"confirm": "orders-dlq"}"#).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    for body in [
        &b""[..],
        br#"{"confirm": "orders"}"#,
        br#"{"confirm": "orders-dlq", "x": 1}"#,
    ] {
        let reply = http(at, "POST", path, &with_token, body).await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert!(backend.calls.lock().unwrap().is_empty(), "{}", reply.body);
    }
    let reply = http(
        at,
        "POST",
        path,
        &with_token,
        br#"{"confirm": "orders-dlq"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let result = reply.json();
    assert_eq!(result["purged"], 3, "{result}");
    let errors: Vec<&str> = result["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["error"].is_null())
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(errors, ["down"]);
    let peek = http(
        at,
        "GET",
        "/api/queues/default/orders-dlq/messages",
        &[],
        b"",
    )
    .await;
    assert_eq!(peek.json()["total"], 0);
    let unknown = http(
        at,
        "POST",
        "/api/queues/default/nope/purge",
        &with_token,
        br#"{"confirm": "nope"}"#,
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    shutdown.cancel();
}
