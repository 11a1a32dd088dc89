//! AMQP 0-9-1 on the sidecar, tried with real RabbitMQ clients, unmodified: pika running RabbitMQ's
//! own tutorial code (hello world; work queues with durable queues, persistent messages, prefetch 1,
//! manual acks, two competing workers in two pods, a failing message nacked with requeue until it
//! dead-letters, a rejected one dead-lettered at once), `basic.get`, heartbeats, the errors a user
//! meets, and kombu (on py-amqp) as a second client library. Raw sockets check what no client
//! library sends: garbage, frames over `frame-max`, unparsable methods, a silent peer.
//!
//! The clients are `sidecar/tests/amqp/clients.py`, run by `$QMESH_PYTHON` (hack/test.sh installs
//! pika and kombu in its venv), else `python3`.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use amq_protocol::{
    frame::{AMQPFrame, WriteContext, gen_frame, parse_frame},
    protocol::{AMQPClass, channel, connection},
    types::FieldTable,
};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: hello}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: hello-readers}
spec:
  queue: hello
  consumers: {matchLabels: {app: worker}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: task-queue}
spec:
  maxMessageBytes: 4Ki
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: task-dlq}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: workers}
spec:
  queue: task-queue
  consumers: {matchLabels: {app: worker}}
  deadLetterQueue: task-dlq
  retry: {maxDeliveries: 3, backoff: {initial: 50ms, max: 200ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dlq-audit}
spec:
  queue: task-dlq
  consumers: {matchLabels: {app: auditor}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: tiny}
spec:
  retention: {maxMessages: 1, overflow: Reject}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: tiny-readers}
spec:
  queue: tiny
  consumers: {matchLabels: {app: nobody}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: multi}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: multi-a}
spec:
  queue: multi
  consumers: {matchLabels: {app: producer}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: multi-b}
spec:
  queue: multi
  consumers: {matchLabels: {app: producer}}
"#;

fn python() -> String {
    std::env::var("QMESH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/amqp/clients.py")
}

fn url(addr: SocketAddr) -> String {
    format!("amqp://guest:guest@{addr}/%2F")
}

/// A client process whose JSON lines arrive on a channel; killed when dropped.
struct Client {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Client {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(python())
            .arg(script())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running {}: {e} (hack/test.sh sets QMESH_PYTHON)", python())
            });
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value =
                    serde_json::from_str(&line).unwrap_or_else(|_| Value::String(line.clone()));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Runs to the end (60 s at most) and returns every line; fails on a non-zero exit.
    fn run(args: &[&str]) -> Vec<Value> {
        let mut client = Self::start(args);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = client.child.try_wait().unwrap() {
                client.seen.extend(client.lines.try_iter());
                // The reader thread may still hold the last lines.
                while let Ok(v) = client.lines.recv_timeout(Duration::from_millis(200)) {
                    client.seen.push(v);
                }
                assert!(
                    status.success(),
                    "{args:?} exited with {status}: {:#?}",
                    client.seen
                );
                return std::mem::take(&mut client.seen);
            }
            assert!(
                Instant::now() < deadline,
                "{args:?} still runs after 60 s: {:#?}",
                client.seen
            );
            client.seen.extend(client.lines.try_iter());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads lines until `done` holds for what was seen so far (deadline `secs`).
    fn until(&mut self, secs: u64, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(v) => self.seen.push(v),
                Err(_) if Instant::now() >= deadline => {
                    panic!(
                        "{what}: not within {secs} s; lines so far: {:#?}",
                        self.seen
                    )
                }
                Err(_) => {
                    if let Some(status) = self.child.try_wait().unwrap() {
                        panic!(
                            "{what}: the client exited ({status}); lines: {:#?}",
                            self.seen
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bodies<'a>(lines: &'a [Value], worker: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["worker"] == worker && l["body"].is_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_tutorial_code_runs_unchanged_against_the_sidecar() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker-a", &[("app", "worker")])
        .sidecar("worker-b", &[("app", "worker")])
        .sidecar("auditor", &[("app", "auditor")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let producer = url(mesh.sidecar("producer").amqp);
    let (a, b) = (
        url(mesh.sidecar("worker-a").amqp),
        url(mesh.sidecar("worker-b").amqp),
    );

    // Tutorial 1: hello world, the receiver in another pod with auto-ack.
    let mut receiver = Client::start(&["hello-receive", &a, "hello", "1"]);
    Client::run(&["hello-send", &producer, "hello", "Hello World!"]);
    receiver.until(30, "hello world received", |l| {
        l.iter().any(|v| v["received"] == "Hello World!")
    });
    let line = receiver
        .seen
        .iter()
        .find(|v| v["received"].is_string())
        .unwrap();
    assert_eq!(line["redelivered"], false);
    assert!(
        line["message_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{line}"
    );
    until_sub_settled(mesh.sidecar("producer").admin, "hello-readers", 15).await;

    // Tutorial 2: work queues. Two workers in two pods compete, prefetch 1, manual acks.
    let mut wa = Client::start(&["worker", &a, "task-queue", "a"]);
    let mut wb = Client::start(&["worker", &b, "task-queue", "b"]);
    wa.until(20, "worker a ready", |l| {
        l.iter().any(|v| v["ready"] == true)
    });
    wb.until(20, "worker b ready", |l| {
        l.iter().any(|v| v["ready"] == true)
    });
    let mut tasks: Vec<String> = (0..20).map(|i| format!("task {i}...")).collect();
    tasks.push("fail: always throws".into());
    tasks.push("reject: bad input".into());
    let args: Vec<&str> = ["new-task", producer.as_str(), "task-queue"]
        .into_iter()
        .chain(tasks.iter().map(String::as_str))
        .collect();
    let confirmed = Client::run(&args);
    assert_eq!(
        confirmed
            .iter()
            .filter(|v| v["confirmed"].is_string())
            .count(),
        tasks.len(),
        "every publish confirmed: {confirmed:#?}"
    );

    // Every task acked exactly once across the two workers; both did some.
    let done = |wa: &Client, wb: &Client| {
        let mut acked: Vec<String> = bodies(&wa.seen, "a")
            .into_iter()
            .chain(bodies(&wb.seen, "b"))
            .filter(|v| v["verdict"] == "ack")
            .map(|v| v["body"].as_str().unwrap().to_owned())
            .collect();
        acked.sort();
        acked
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while done(&wa, &wb).len() < 20 {
        assert!(
            Instant::now() < deadline,
            "tasks acked: {:?}",
            done(&wa, &wb)
        );
        wa.seen.extend(wa.lines.try_iter());
        wb.seen.extend(wb.lines.try_iter());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut expected: Vec<String> = tasks[..20].to_vec();
    expected.sort();
    assert_eq!(done(&wa, &wb), expected, "each task acked exactly once");
    for (name, w) in [("a", &wa), ("b", &wb)] {
        assert!(
            bodies(&w.seen, name).iter().any(|v| v["verdict"] == "ack"),
            "worker {name} got no task: competing consumers share the queue"
        );
    }
    // Properties came through: persistent, the id, content type and headers.
    let first = bodies(&wa.seen, "a")
        .into_iter()
        .chain(bodies(&wb.seen, "b"))
        .find(|v| v["body"] == "task 0...")
        .unwrap()
        .clone();
    assert_eq!(first["delivery_mode"], 2);
    assert_eq!(first["message_id"], "task-0-task 0...");
    assert_eq!(first["content_type"], "text/plain");
    assert_eq!(first["headers"]["tenant"], "acme");
    assert_eq!(first["headers"]["attempt-limit"], "3");

    // The failing task: nacked with requeue until maxDeliveries (3), redelivered flag set, then in
    // the dead-letter queue; the rejected one: dead-lettered on its first delivery.
    let audit = mesh.sidecar("auditor");
    let dlq = Consumer::start("audit", &audit.grpc_url(), "dlq-audit", 10, |_| {
        Verdict::Ack
    })
    .await;
    until("both dead letters", 60, || dlq.count() >= 2).await;
    let dead = dlq.stop();
    let reason = |body: &str| {
        dead.iter()
            .find(|d| d.payload == body)
            .map(|d| {
                d.headers
                    .get("qmesh-dead-letter-reason")
                    .cloned()
                    .unwrap_or_default()
            })
            .unwrap_or_else(|| panic!("{body:?} not dead-lettered: {dead:?}"))
    };
    assert!(reason("fail: always throws").contains("max deliveries (3)"));
    assert!(
        reason("reject: bad input").contains("rejected"),
        "{}",
        reason("reject: bad input")
    );
    wa.seen.extend(wa.lines.try_iter());
    wb.seen.extend(wb.lines.try_iter());
    let attempts = |body: &str| -> Vec<bool> {
        bodies(&wa.seen, "a")
            .into_iter()
            .chain(bodies(&wb.seen, "b"))
            .filter(|v| v["body"] == body)
            .map(|v| v["redelivered"].as_bool().unwrap())
            .collect()
    };
    let failing = attempts("fail: always throws");
    assert_eq!(
        failing.len(),
        3,
        "three deliveries of the failing task: {failing:?}"
    );
    assert_eq!(
        failing.iter().filter(|r| **r).count(),
        2,
        "two of them redelivered"
    );
    assert_eq!(
        attempts("reject: bad input").len(),
        1,
        "a reject is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_heartbeats_a_second_client_and_the_errors_users_meet() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("producer", &[("app", "producer")])
        .sidecar("worker", &[("app", "worker")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let producer = url(mesh.sidecar("producer").amqp);
    let worker = url(mesh.sidecar("worker").amqp);

    // basic.get (pull): empty answers until the message reaches the worker's sidecar, then it.
    Client::run(&["new-task", &producer, "task-queue", "pulled"]);
    let got = Client::run(&["get", &worker, "task-queue"]);
    assert_eq!(got[0]["got"], "pulled", "{got:?}");
    until_sub_settled(mesh.sidecar("producer").admin, "workers", 15).await;

    // A quiet connection with a 1 s heartbeat stays up for 4 s: the sidecar's heartbeats reach
    // pika, pika's reach the sidecar.
    let quiet = Client::run(&["heartbeat", &producer, "hello", "4"]);
    assert_eq!(quiet[0]["alive"], true, "{quiet:?}");
    assert_eq!(quiet[0]["heartbeat"], 1);

    // kombu, on py-amqp: publish 5 with the default exchange, consume them with manual acks.
    let kombu = Client::run(&["kombu", &worker, "task-queue", "5"]);
    let done = kombu.iter().find(|v| v["kombu_done"].is_array()).unwrap();
    assert_eq!(
        done["kombu_done"],
        serde_json::json!([0, 1, 2, 3, 4]),
        "{kombu:#?}"
    );
    let first = kombu.iter().find(|v| v["kombu_received"] == 0).unwrap();
    assert_eq!(first["message_id"], "kombu-0");
    assert_eq!(first["content_type"], "application/json");

    // What a user gets wrong: a clear reply code and a text saying what to do.
    let lines = Client::run(&["errors", &producer, "task-queue"]);
    let case = |name: &str| {
        lines
            .iter()
            .find(|l| l["case"] == name)
            .unwrap_or_else(|| panic!("no line for {name:?}: {lines:#?}"))
            .clone()
    };
    let unknown = case("declare an unknown queue");
    assert_eq!(unknown["code"], 404, "{unknown}");
    assert!(
        unknown["text"].as_str().unwrap().contains("Queue resource"),
        "{unknown}"
    );
    assert_eq!(case("server-named queue")["code"], 540);
    let exchange = case("named exchange");
    assert_eq!(exchange["code"], 540);
    assert!(
        exchange["text"]
            .as_str()
            .unwrap()
            .contains("default exchange"),
        "{exchange}"
    );
    assert_eq!(case("queue.bind")["code"], 540);
    assert_eq!(case("consume an unknown queue")["code"], 404);
    let large = case("message over maxMessageBytes");
    assert_eq!(large["code"], 406, "{large}");
    assert!(
        large["text"].as_str().unwrap().contains("maxMessageBytes"),
        "{large}"
    );
    let nested = case("nested header");
    assert_eq!(nested["code"], 406, "{nested}");
    assert!(
        nested["text"].as_str().unwrap().contains("nested"),
        "{nested}"
    );
    assert_eq!(case("mandatory publish to no queue")["unroutable"], 1);
    assert_eq!(case("ack of an unknown delivery tag")["code"], 406);
    // A full queue nacks the confirm; several Subscriptions need the consume argument; cancel;
    // one ack with multiple=True settles five deliveries.
    let more = Client::run(&["more", &producer]);
    let case = |name: &str| {
        more.iter()
            .find(|l| l["case"] == name)
            .unwrap_or_else(|| panic!("no line for {name:?}: {more:#?}"))
            .clone()
    };
    assert_eq!(
        case("full queue")["confirms"],
        serde_json::json!(["ack", "nack"])
    );
    let ambiguous = case("ambiguous consume");
    assert_eq!(ambiguous["code"], 406, "{ambiguous}");
    assert!(
        ambiguous["text"]
            .as_str()
            .unwrap()
            .contains("x-qmesh-subscription"),
        "{ambiguous}"
    );
    assert_eq!(case("chosen consume and cancel")["open"], true);
    assert_eq!(
        case("ack multiple")["tags"],
        serde_json::json!([1, 2, 3, 4, 5])
    );
    until_sub_settled(mesh.sidecar("producer").admin, "multi-a", 15).await;

    // None of the refused publishes was stored.
    let backlog = queue_backlog(mesh.sidecar("producer").admin, "task-queue").await;
    assert_eq!(backlog, 0, "nothing refused was stored");

    // AMQP transactions (tx.select) on qmesh transactions: what is rolled back is never
    // delivered, what is committed is; acks in a transaction take effect at its commit.
    let published = Client::run(&["tx-publish", &producer, "task-queue"]);
    let steps: Vec<&Value> = published.iter().filter(|l| l["step"].is_string()).collect();
    assert_eq!(steps.len(), 2, "{published:?}");
    let refused = published
        .iter()
        .find(|l| l["case"] == "confirm on a transactional channel")
        .unwrap();
    assert_eq!(refused["code"], 406, "{refused}");
    let got = Client::run(&["tx-get", &worker, "task-queue", "2"]);
    let mut bodies: Vec<&str> = got.iter().filter_map(|l| l["got"].as_str()).collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["tx-committed-1", "tx-committed-2"], "{got:?}");
    assert!(
        got.iter()
            .all(|l| l["got"].is_null() || l["redelivered"] == true),
        "each came again after its rolled-back ack: {got:?}"
    );
    let mut rolled: Vec<&str> = got
        .iter()
        .filter_map(|l| l["rolled_back"].as_str())
        .collect();
    rolled.sort_unstable();
    assert_eq!(rolled, ["tx-committed-1", "tx-committed-2"], "{got:?}");
    until_sub_settled(mesh.sidecar("producer").admin, "workers", 15).await;
    let backlog = queue_backlog(mesh.sidecar("producer").admin, "task-queue").await;
    assert_eq!(
        backlog, 0,
        "the rolled-back publishes were never stored in the queue"
    );
}

// === raw sockets: what no client library sends ===

fn encode(frame: &AMQPFrame) -> Vec<u8> {
    gen_frame(frame)(WriteContext::from(Vec::new()))
        .unwrap()
        .into_inner()
        .0
}

async fn read_frame(stream: &mut tokio::net::TcpStream) -> Option<AMQPFrame> {
    let mut head = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut frame = head.to_vec();
    frame.resize(7 + size + 1, 0);
    stream.read_exact(&mut frame[7..]).await.ok()?;
    Some(parse_frame(frame.as_slice()).unwrap().1)
}

/// Connects and runs the handshake with `heartbeat` seconds.
async fn handshake(addr: SocketAddr, heartbeat: u16) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let start = read_frame(&mut s).await.unwrap();
    assert!(
        matches!(
            start,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))
        ),
        "{start:?}"
    );
    let start_ok = connection::StartOk {
        client_properties: FieldTable::default(),
        mechanism: "PLAIN".into(),
        response: "\0guest\0guest".into(),
        locale: "en_US".into(),
    };
    s.write_all(&encode(&AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
    )))
    .await
    .unwrap();
    let tune = match read_frame(&mut s).await.unwrap() {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(tune.frame_max, 131_072);
    let tune_ok = connection::TuneOk {
        channel_max: 16,
        frame_max: 4096,
        heartbeat,
    };
    s.write_all(&encode(&AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
    )))
    .await
    .unwrap();
    s.write_all(&encode(&AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    )))
    .await
    .unwrap();
    let open_ok = read_frame(&mut s).await.unwrap();
    assert!(
        matches!(
            open_ok,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))
        ),
        "{open_ok:?}"
    );
    s
}

/// Reads until `connection.close`; returns its reply code and text.
async fn close_reason(s: &mut tokio::net::TcpStream) -> (u16, String) {
    loop {
        match read_frame(s).await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                return (c.reply_code, c.reply_text.to_string());
            }
            Some(_) => continue,
            None => panic!("the connection ended without connection.close"),
        }
    }
}

async fn closed(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversize_frames_and_silent_peers_close_the_connection_and_lose_nothing() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("node", &[("app", "producer")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let node = mesh.sidecar("node");
    let addr = node.amqp;
    // A message stored before, which none of this may touch.
    Client::run(&["new-task", &url(addr), "task-queue", "kept"]);

    // Not AMQP at all: the sidecar answers with the protocol header it speaks, then closes.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 8];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"AMQP\x00\x00\x09\x01");
    assert!(closed(&mut s, Duration::from_secs(5)).await);

    // A frame larger than the negotiated frame-max (4096): 501, before it is read whole.
    let mut s = handshake(addr, 0).await;
    let mut frame = vec![1u8, 0, 1];
    frame.extend_from_slice(&(1_000_000u32).to_be_bytes());
    s.write_all(&frame).await.unwrap();
    let (code, text) = close_reason(&mut s).await;
    assert_eq!(code, 501, "{text}");
    assert!(text.contains("frame-max"), "{text}");

    // A method frame whose arguments do not parse: 502 naming the method.
    let mut s = handshake(addr, 0).await;
    let mut payload = vec![0u8, 60, 0, 40]; // basic.publish
    payload.extend_from_slice(&[0xff; 3]);
    let mut frame = vec![1u8, 0, 1];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xce);
    s.write_all(&frame).await.unwrap();
    let (code, text) = close_reason(&mut s).await;
    assert_eq!(code, 502, "{text}");
    assert!(text.contains("60.40"), "{text}");

    // A frame on a channel that was never opened: 504.
    let mut s = handshake(addr, 0).await;
    s.write_all(&encode(&AMQPFrame::Method(
        7,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: false })),
    )))
    .await
    .unwrap();
    let (code, _) = close_reason(&mut s).await;
    assert_eq!(code, 504);

    // channel.flow is answered on an open channel.
    let mut s = handshake(addr, 0).await;
    s.write_all(&encode(&AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )))
    .await
    .unwrap();
    assert!(matches!(
        read_frame(&mut s).await.unwrap(),
        AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))
    ));
    s.write_all(&encode(&AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: false })),
    )))
    .await
    .unwrap();
    assert!(matches!(
        read_frame(&mut s).await.unwrap(),
        AMQPFrame::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                active: false
            }))
        )
    ));

    // A client that negotiated a 1 s heartbeat and went silent is closed within a few seconds;
    // it got the sidecar's heartbeats meanwhile.
    let mut s = handshake(addr, 1).await;
    let started = Instant::now();
    let mut heartbeats = 0;
    loop {
        match read_frame(&mut s).await {
            Some(AMQPFrame::Heartbeat) => heartbeats += 1,
            Some(other) => panic!("{other:?}"),
            None => break,
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still open");
    }
    assert!(heartbeats >= 1, "the sidecar sent heartbeats");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );

    // The sidecar is fine, and the message stored before is still there for its consumer.
    assert_eq!(queue_backlog(node.admin, "task-queue").await, 1);
    let metrics = qmesh_tests::http::request("GET", node.admin, "/metrics", &[], b"")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    let errors = text
        .lines()
        .find(|l| l.starts_with("qmesh_amqp_protocol_errors_total "))
        .unwrap_or_else(|| panic!("no qmesh_amqp_protocol_errors_total in {text}"));
    assert!(errors.ends_with(" 4"), "{errors}");
}
