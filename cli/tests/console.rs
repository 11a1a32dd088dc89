//! The web console of `qmesh dev` in a real headless browser: `qmesh dev --console-addr` with a queue
//! whose subscription dead-letters after two deliveries, two `qmesh run` sidecars (a publisher and a
//! consumer), six messages nacked into the dead-letter queue; then `cli/tests/console/drive.py`
//! drives Debian's Chromium through Selenium — every page loads without a browser console error,
//! the figures shown match `qmesh get … -o json`, the page updates without a reload, the dead
//! letters are listed with their reason and headers, and a Redrive clicked in the page (its
//! confirmation dialog accepted) sends them back — which `qmesh dlq peek`, `qmesh get` and a
//! consumer then confirm here.
//!
//! Needs `chromium` and `chromium-driver` (apt) and `selenium` in `$QMESH_PYTHON` (hack/test.sh
//! installs all three); without them the test fails saying so. Screenshots go to
//! `$QMESH_CONSOLE_SCREENSHOTS` when set (`docs/console` refreshes the documentation's), else to a
//! temporary folder.

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
  deadLetterQueue: orders-dlq
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders-dlq}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
  retry: {maxDeliveries: 2, backoff: {initial: 20ms, max: 50ms}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: analytics}
spec:
  queue: orders
  consumers: {matchLabels: {app: analytics}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: dlq-audit}
spec:
  queue: orders-dlq
  consumers: {matchLabels: {app: auditor}}
"#;

/// Messages published and dead-lettered.
const DEAD: usize = 6;
/// Messages the browser script publishes (and billing acks) to see the page update by itself.
const LIVE: usize = 60;
/// The pages the script saves.
const SCREENSHOTS: [&str; 8] = [
    "overview",
    "queues",
    "subscriptions",
    "sidecars",
    "transactions",
    "dead-letters",
    "redrive-confirm",
    "dead-letters-after-redrive",
];

fn qmesh_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qmesh"))
}

/// `qmesh` with this test's own local CA.
fn qmesh(ca_dir: &Path) -> Command {
    let sidecar = qmesh_binary().with_file_name("qmesh-sidecar");
    assert!(
        sidecar.is_file(),
        "{} is missing: build it (cargo build -p qmesh-sidecar); the workspace test run does",
        sidecar.display()
    );
    let mut command = Command::new(qmesh_binary());
    command
        .env("QMESH_SIDECAR_BIN", sidecar)
        .env("QMESH_LOCAL_CA_DIR", ca_dir);
    command
}

/// A child process stopped (SIGTERM, then SIGKILL) when the test ends, whose stdout lines arrive
/// on a channel.
struct Running {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(name: &str, command: &mut Command) -> Self {
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
        Self {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// The first line starting with `prefix`, without it.
    fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match line.trim_start().strip_prefix(prefix) {
                    Some(rest) => return rest.trim().to_owned(),
                    None => seen.push(line),
                },
                Err(_) => panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?}; got {seen:#?}",
                    self.name
                ),
            }
        }
    }

    /// Waits for the process to exit; its stdout lines.
    fn finish(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} failed: {status}", self.name);
                // The reader thread ends with the pipe; collect what it read.
                let mut lines = Vec::new();
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    lines.push(line);
                }
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SIGTERM first: `qmesh run` passes it to its command, then stops its sidecar gracefully.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ok(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `qmesh run` sidecar (labelled `app=<name>`) whose app only says where its sidecar is and
/// waits.
fn app(ca_dir: &Path, dir: &Path, control: &str, name: &str) -> (Running, String) {
    app_labelled(ca_dir, dir, control, name, name)
}

/// [`app`] labelled `app=<label>`.
fn app_labelled(
    ca_dir: &Path,
    dir: &Path,
    control: &str,
    name: &str,
    label: &str,
) -> (Running, String) {
    let running = Running::start(
        &format!("qmesh run {name}"),
        qmesh(ca_dir)
            .args(["run", "--app-id", name, "--labels", &format!("app={label}")])
            .args(["--control-plane", control, "--shutdown-grace", "2s"])
            .arg("--data-dir")
            .arg(dir.join(name))
            .args([
                "--",
                "sh",
                "-c",
                "echo \"grpc=$QMESH_GRPC_ADDR\"; exec sleep 600",
            ]),
    );
    let grpc = running.wait_for("grpc=", Duration::from_secs(40));
    (running, grpc)
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_console_shows_the_mesh_and_redrives_dead_letters_from_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let manifests = dir.path().join("mesh.yaml");
    std::fs::write(&manifests, MANIFESTS).unwrap();
    let control = format!("https://127.0.0.1:{}", free_port());

    let dev = Running::start(
        "qmesh dev",
        qmesh(&ca_dir)
            .args(["dev", "-f"])
            .arg(&manifests)
            .args(["--listen", control.trim_start_matches("https://")])
            .args(["--console-addr", "127.0.0.1:0"]),
    );
    let url = dev.wait_for("console:", Duration::from_secs(20));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let (_shop, shop) = app(&ca_dir, dir.path(), &control, "shop");
    let (_billing, billing) = app(&ca_dir, dir.path(), &control, "billing");
    let get = |kind: &str| -> Vec<serde_json::Value> {
        let text =
            ok(qmesh(&ca_dir).args(["get", kind, "-o", "json", "--control-plane", &control]));
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    wait_until(
        "both sidecars to be connected",
        Duration::from_secs(30),
        || {
            get("sidecars")
                .iter()
                .filter(|s| s["connected"] == "true")
                .count()
                == 2
        },
    );

    // Six orders, each nacked twice by billing: all six end in orders-dlq at the publisher's sidecar.
    ok(qmesh(&ca_dir)
        .args(["pub", "orders", r#"{"order": 42, "sku": "book"}"#])
        .args(["--id", "order", "--count", &DEAD.to_string()])
        .args(["--header", "kind=order", "--addr", &shop]));
    ok(qmesh(&ca_dir)
        .args(["sub", "billing", "--nack", "--count"])
        .arg((2 * DEAD).to_string())
        .args(["--addr", &billing]));
    let peek = || {
        json_lines(&ok(qmesh(&ca_dir).args([
            "dlq",
            "peek",
            "orders-dlq",
            "--json",
            "--addr",
            &shop,
        ])))
    };
    wait_until("six dead letters", Duration::from_secs(30), || {
        peek().len() == DEAD
    });
    let original: BTreeSet<String> = peek()
        .iter()
        .map(|h| {
            h["headers"]["qmesh-original-id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(original.len(), DEAD);
    // The control plane's figures have caught up (the sidecars report every 2 s).
    wait_until(
        "qmesh get to count the dead letters",
        Duration::from_secs(30),
        || {
            get("queues")
                .iter()
                .any(|q| q["name"] == "orders-dlq" && q["backlog"] == DEAD.to_string().as_str())
        },
    );

    // A transaction the shop rolls back: the Transactions page lists it as `qmesh get` does.
    let rolled = ok(qmesh(&ca_dir)
        .args(["pub", "orders", "never", "--count", "2", "--id", "tx"])
        .args(["--transaction", "rollback", "--addr", &shop]));
    assert!(rolled.contains("rolled-back: 2 messages"), "{rolled}");
    wait_until(
        "qmesh get to list the rolled-back transaction",
        Duration::from_secs(30),
        || {
            get("transactions")
                .iter()
                .any(|t| t["outcome"] == "rolled-back" && t["messages"] == "2")
        },
    );

    // The browser.
    let screenshots = std::env::var_os("QMESH_CONSOLE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("screenshots"));
    let report = dir.path().join("report.json");
    let python = std::env::var("QMESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/drive.py");
    let mut browser = Command::new(&python);
    browser
        .arg(&script)
        .args(["--url", &url, "--control-plane", &control])
        .arg("--qmesh")
        .arg(qmesh_binary())
        .args(["--publisher", &shop, "--consumer", &billing])
        .args(["--queue", "orders", "--dlq", "orders-dlq"])
        .args(["--live", &LIVE.to_string(), "--live-rate", "10"])
        .args(["--dead-letters", &DEAD.to_string()])
        .arg("--screenshots")
        .arg(&screenshots)
        .arg("--report")
        .arg(&report)
        .env("QMESH_LOCAL_CA_DIR", &ca_dir);
    let started = Instant::now();
    let out = browser
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e} (hack/test.sh sets QMESH_PYTHON)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(2) => panic!(
            "the browser test cannot run — install what it needs (hack/test.sh does): {stderr}"
        ),
        _ => panic!(
            "the console check failed ({}) after {:?}:\n{stderr}\n{stdout}\nscreenshots in {}",
            out.status,
            started.elapsed(),
            screenshots.display()
        ),
    }
    println!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(report["failure"].is_null(), "{report}");
    let severe: Vec<&serde_json::Value> = report["browser_log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(severe.is_empty(), "browser console errors: {severe:?}");
    for name in SCREENSHOTS {
        let png = std::fs::read(screenshots.join(format!("{name}.png"))).unwrap();
        assert!(
            png.len() > 10_000 && png.starts_with(b"\x89PNG"),
            "{name}.png"
        );
    }
    let transactions = report["pages"]["transactions"].as_array().unwrap();
    assert!(
        transactions
            .iter()
            .any(|t| t["outcome"] == "rolled-back" && t["decided_by"] == "producer"),
        "the Transactions page showed the rollback: {transactions:?}"
    );
    let shown: BTreeSet<String> = report["pages"]["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["original_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        shown, original,
        "the page listed the dead letters qmesh dlq peek lists"
    );

    // The redrive clicked in the browser moved them: none left in the dead-letter queue …
    assert!(peek().is_empty(), "{:?}", peek());
    wait_until(
        "qmesh get to show an empty dead-letter queue",
        Duration::from_secs(30),
        || {
            get("queues")
                .iter()
                .any(|q| q["name"] == "orders-dlq" && q["backlog"] == "0")
        },
    );
    // … and billing gets each of them again, marked as redriven (it acked the live traffic
    // already).
    assert_eq!(report["pages"]["live_update"]["published"], LIVE);
    let mut again = Running::start(
        "qmesh sub billing",
        qmesh(&ca_dir)
            .args(["sub", "billing", "--json", "--count"])
            .arg(DEAD.to_string())
            .args(["--addr", &billing]),
    );
    let deliveries = json_lines(&again.finish(Duration::from_secs(60)).join("\n"));
    let redriven: BTreeSet<String> = deliveries
        .iter()
        .filter(|d| d["headers"]["qmesh-redriven-from"] == "orders-dlq")
        .map(|d| {
            d["headers"]["qmesh-original-id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(redriven, original, "{deliveries:#?}");
    assert_eq!(deliveries.len(), DEAD, "{deliveries:#?}");
}

/// Dead letters live at whichever sidecar owned the original message: with two publishers, each
/// holds some. `qmesh dlq` without `--addr` asks every sidecar through `qmesh dev`'s control plane
/// (`Control/HeldMessages` down each sidecar's `Join` stream): peek lists both halves, redrive and
/// purge reach both, and a purge is refused without confirmation.
#[test]
fn dlq_tools_reach_every_sidecar_through_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let manifests = dir.path().join("mesh.yaml");
    std::fs::write(&manifests, MANIFESTS).unwrap();
    let control = format!("https://127.0.0.1:{}", free_port());
    let dev = Running::start(
        "qmesh dev",
        qmesh(&ca_dir)
            .args(["dev", "-f"])
            .arg(&manifests)
            .args(["--listen", control.trim_start_matches("https://")])
            .args(["--console-addr", "off"]),
    );
    dev.wait_for("qmesh dev: control plane on", Duration::from_secs(20));
    let (_shop, shop) = app(&ca_dir, dir.path(), &control, "shop");
    let (_shop2, shop2) = app_labelled(&ca_dir, dir.path(), &control, "shop-2", "shop");
    let (_billing, billing) = app(&ca_dir, dir.path(), &control, "billing");
    for (addr, prefix) in [(&shop, "a"), (&shop2, "b")] {
        ok(qmesh(&ca_dir)
            .args(["pub", "orders", "order", "--id", prefix, "--count", "3"])
            .args(["--addr", addr]));
    }
    ok(qmesh(&ca_dir)
        .args(["sub", "billing", "--nack", "--count", "12"])
        .args(["--addr", &billing]));
    let dlq = |args: &[&str]| {
        let mut command = qmesh(&ca_dir);
        command
            .arg("dlq")
            .args(args)
            .args(["--control-plane", &control])
            .stdin(Stdio::null());
        command.output().unwrap()
    };
    let peek = || {
        let out = dlq(&["peek", "orders-dlq", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_lines(&String::from_utf8(out.stdout).unwrap())
    };
    wait_until(
        "six dead letters over both publishers",
        Duration::from_secs(30),
        || peek().len() == 6,
    );
    let held = peek();
    let at: BTreeSet<(String, String)> = held
        .iter()
        .map(|h| {
            (
                h["sidecar"].as_str().unwrap().to_owned(),
                h["headers"]["qmesh-original-id"].as_str().unwrap()[..1].to_owned(),
            )
        })
        .collect();
    assert_eq!(
        at,
        BTreeSet::from([
            ("shop".to_owned(), "a".to_owned()),
            ("shop-2".to_owned(), "b".to_owned())
        ]),
        "each publisher holds its own dead letters: {held:?}"
    );
    let table = String::from_utf8(dlq(&["peek", "orders-dlq"]).stdout).unwrap();
    assert!(table.starts_with("SIDECAR "), "{table}");
    assert!(table.contains("shop-2"), "{table}");

    // Redrive one at each sidecar: two go back to orders.
    let out = dlq(&["redrive", "orders-dlq", "--count", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("2 republished"),
        "{text}"
    );
    wait_until("four dead letters left", Duration::from_secs(10), || {
        peek().len() == 4
    });

    // Purge: refused unconfirmed (no terminal), then deletes the rest at both sidecars.
    let refused = dlq(&["purge", "orders-dlq"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--yes"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(peek().len(), 4, "nothing purged without confirmation");
    let out = dlq(&["purge", "orders-dlq", "--yes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("4 deleted"), "{text}");
    assert!(peek().is_empty());
    // The two redriven orders wait in orders for billing, untouched by the purge.
    let orders = {
        let out = dlq(&["peek", "orders", "--json"]);
        json_lines(&String::from_utf8(out.stdout).unwrap())
    };
    let redriven = orders
        .iter()
        .filter(|m| m["headers"]["qmesh-redriven-from"] == "orders-dlq")
        .count();
    assert_eq!(redriven, 2, "{orders:?}");

    // An unknown queue: refused (exit code 3), saying so.
    let unknown = dlq(&["peek", "nope"]);
    assert_eq!(unknown.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}
