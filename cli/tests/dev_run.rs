//! `qmesh dev` + two `qmesh run` processes whose apps are the Python example client (grpcio): the
//! consumer's sidecar registers itself with its labels, `qmesh get` shows it, the producer publishes
//! and every message arrives once. Editing the manifests is picked up and reported. The interpreter
//! comes from `$QMESH_PYTHON` (the test set-up makes a venv with grpcio), else `python3`.

#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const MANIFESTS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
"#;

const COUNT: usize = 25;

/// An app that opens a transaction, publishes two messages in it, and commits once the file named
/// by its first argument exists (then stays, so its sidecar keeps reporting).
const TRANSACTION_APP: &str = r#"
import json, os, sys, time, urllib.request
base = "http://" + os.environ["QMESH_HTTP_ADDR"]
def post(path, body=b"", headers={}):
    request = urllib.request.Request(base + path, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())
tx = post("/v1/transactions")["transaction"]
for i in range(2):
    post("/v1/queues/orders/messages", b"x", {"qmesh-transaction": tx, "qmesh-id": f"tx-order-{i}"})
print("opened", tx, flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print(post(f"/v1/transactions/{tx}/commit")["state"], flush=True)
time.sleep(120)
"#;

fn qmesh() -> Command {
    let qmesh = PathBuf::from(env!("CARGO_BIN_EXE_qmesh"));
    let sidecar = qmesh.with_file_name("qmesh-sidecar");
    assert!(
        sidecar.is_file(),
        "{} is missing: the workspace test run builds it",
        sidecar.display()
    );
    let mut command = Command::new(qmesh);
    command.env("QMESH_SIDECAR_BIN", sidecar);
    // This test's own local CA (`qmesh dev` makes it, `qmesh run` / `get` trust it).
    command.env(
        "QMESH_LOCAL_CA_DIR",
        std::env::temp_dir().join(format!("qmesh-test-ca-{}", std::process::id())),
    );
    command
}

fn python() -> String {
    std::env::var("QMESH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/qmesh_client.py")
}

/// A child process killed when the test ends, whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a line containing `text`; returns every line read meanwhile.
    fn wait_for_line(&self, text: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    seen.push(line);
                    if found {
                        return seen;
                    }
                }
                Err(_) => panic!("no line containing {text:?} within {timeout:?}; got {seen:#?}"),
            }
        }
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn lines_now(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(control: &str, kind: &str) -> serde_json::Value {
    let out = qmesh()
        .args(["get", kind, "-o", "json", "--control-plane", control])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qmesh get {kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn qmesh_run_apps_exchange_messages_through_qmesh_dev() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("orders.yaml"), MANIFESTS).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let control = format!("https://{listen}");

    let dev = Running::start(qmesh().args(["dev", "-f"]).arg(&manifests).args([
        "--listen",
        &listen,
        "--poll-interval",
        "100ms",
        // Not the default 127.0.0.1:7080, which a developer's own `qmesh dev` may hold.
        "--console-addr",
        "127.0.0.1:0",
    ]));
    dev.wait_for_line("control plane on", Duration::from_secs(10));

    // The consumer app: the Python client behind its own sidecar, labelled app=billing.
    let mut consumer = Running::start(
        qmesh()
            .args(["run", "--app-id", "billing-1", "--labels", "app=billing"])
            .args(["--control-plane", &control, "--data-dir"])
            .arg(dir.path().join("billing-1"))
            .arg("--")
            .arg(python())
            .arg(client_script())
            .args(["consume", "--subscription", "billing"])
            .args(["--count", &COUNT.to_string(), "--timeout", "60"]),
    );
    dev.wait_for_line("sidecar default/billing-1 joined", Duration::from_secs(30));
    wait_until(
        "qmesh get to show the consumer",
        Duration::from_secs(20),
        || {
            let subs = get(&control, "subscriptions");
            subs.as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "billing" && s["queue"] == "orders" && s["consumers"] == "1")
        },
    );

    // The producer app publishes through its own sidecar, labelled app=shop; its exit code is passed on.
    let publisher = qmesh()
        .args(["run", "--app-id", "shop-1", "--labels", "app=shop"])
        .args(["--control-plane", &control, "--data-dir"])
        .arg(dir.path().join("shop-1"))
        .arg("--")
        .arg(python())
        .arg(client_script())
        .args([
            "publish",
            "--queue",
            "orders",
            "--count",
            &COUNT.to_string(),
        ])
        .args(["--id-prefix", "order-"])
        .output()
        .unwrap();
    assert!(
        publisher.status.success(),
        "publisher failed: {}",
        String::from_utf8_lossy(&publisher.stderr)
    );
    let published = String::from_utf8_lossy(&publisher.stdout)
        .lines()
        .filter(|l| l.contains("\"sequence\""))
        .count();
    assert_eq!(
        published,
        COUNT,
        "{}",
        String::from_utf8_lossy(&publisher.stdout)
    );

    // Every message arrives once; the consumer exits 0 after COUNT, and so does `qmesh run`.
    let status = consumer.wait(Duration::from_secs(60));
    let deliveries: Vec<serde_json::Value> = consumer
        .lines_now()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(status.success(), "consumer: {status}; got {deliveries:?}");
    let ids: BTreeSet<String> = deliveries
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        deliveries.len(),
        COUNT,
        "duplicates: {}",
        deliveries.len() - ids.len()
    );
    assert_eq!(ids.len(), COUNT);
    dev.wait_for_line("sidecar default/billing-1 left", Duration::from_secs(30));

    // An edit of the manifests is reloaded and reported; a broken one is refused and the old kept.
    std::fs::write(
        manifests.join("audit.yaml"),
        "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: audit}\nspec: {}\n",
    )
    .unwrap();
    dev.wait_for_line("queue default/audit created", Duration::from_secs(10));
    std::fs::write(
        manifests.join("audit.yaml"),
        "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: audit}\nspec: {retention: {maxMessages: -1}}\n",
    )
    .unwrap();
    dev.wait_for_line(
        "reload failed, keeping the previous manifests",
        Duration::from_secs(10),
    );
    let queues = get(&control, "queues");
    let names: Vec<&str> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["audit", "orders"]);

    // The command's exit code is `qmesh run`'s.
    let out = qmesh()
        .args([
            "run",
            "--app-id",
            "failing",
            "--control-plane",
            &control,
            "--data-dir",
        ])
        .arg(dir.path().join("failing"))
        .args(["--", "sh", "-c", "test -n \"$QMESH_GRPC_ADDR\" && exit 7"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // RabbitMQ client code under `qmesh run` finds its sidecar's AMQP listener in QMESH_AMQP_URL:
    // pika publishes with confirms (each confirm = stored).
    let amqp_script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sidecar/tests/amqp/clients.py");
    let out = qmesh()
        .args(["run", "--app-id", "shop-amqp", "--labels", "app=shop"])
        .args(["--control-plane", &control, "--data-dir"])
        .arg(dir.path().join("shop-amqp"))
        .args([
            "--",
            "sh",
            "-c",
            "\"$0\" \"$1\" new-task \"$QMESH_AMQP_URL\" orders from-pika",
        ])
        .arg(python())
        .arg(&amqp_script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(r#""confirmed": "from-pika""#),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A transaction through the HTTP API of `qmesh run`'s sidecar: while open, its two half
    // messages show as IN-TRANSACTION; once committed, `qmesh get transactions` shows how it ended.
    let go = dir.path().join("commit-now");
    let transaction = Running::start(
        qmesh()
            .args(["run", "--app-id", "shop-tx", "--labels", "app=shop"])
            .args(["--control-plane", &control, "--data-dir"])
            .arg(dir.path().join("shop-tx"))
            .args(["--", &python(), "-c", TRANSACTION_APP])
            .arg(&go),
    );
    let opened = transaction.wait_for_line("opened", Duration::from_secs(30));
    let id = opened
        .last()
        .unwrap()
        .trim_start_matches("opened ")
        .to_owned();
    wait_until(
        "qmesh get queues to show the half messages",
        Duration::from_secs(20),
        || get(&control, "queues")[1]["in-transaction"] == "2",
    );
    std::fs::write(&go, b"").unwrap();
    transaction.wait_for_line("committed", Duration::from_secs(30));
    wait_until(
        "qmesh get transactions to show the commit",
        Duration::from_secs(20),
        || {
            get(&control, "transactions")
                .as_array()
                .unwrap()
                .iter()
                .any(|t| {
                    t["transaction"] == id.as_str()
                        && t["outcome"] == "committed"
                        && t["decided-by"] == "producer"
                        && t["messages"] == "2"
                        && t["queues"] == "orders"
                        && t["sidecar"] == "shop-tx"
                })
        },
    );
    assert_eq!(get(&control, "queues")[1]["in-transaction"], "0");
    drop(transaction);

    // SIGTERM to `qmesh run` reaches the command; its code comes back and the sidecar leaves.
    let mut trapped = Running::start(
        qmesh()
            .args([
                "run",
                "--app-id",
                "trapper",
                "--control-plane",
                &control,
                "--data-dir",
            ])
            .arg(dir.path().join("trapper"))
            .args([
                "--",
                "sh",
                "-c",
                "sleep 30 & trap 'kill $!; exit 42' TERM; echo started; wait",
            ]),
    );
    trapped.wait_for_line("started", Duration::from_secs(30));
    let pid = trapped.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(trapped.wait(Duration::from_secs(30)).code(), Some(42));
    dev.wait_for_line("sidecar default/trapper left", Duration::from_secs(30));
}

#[test]
fn qmesh_run_without_a_control_plane_says_what_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = qmesh()
        .args(["run", "--app-id", "lonely", "--ready-timeout", "2s"])
        .args(["--control-plane", &format!("https://127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is `qmesh dev` running"), "{stderr}");

    let out = qmesh()
        .args([
            "get",
            "queues",
            "--control-plane",
            &format!("https://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is `qmesh dev` running"), "{stderr}");
}
