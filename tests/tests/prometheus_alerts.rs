//! The chart's alerts and dashboard against a real Prometheus (Debian's `prometheus` package, which
//! `hack/test.sh` installs): the PrometheusRule rendered by `helm template` is a rules file
//! `promtool check rules` accepts, with default values and with the short durations used here;
//! then a real `prometheus` process scrapes real sidecars (a mesh file, loopback only) every second
//! and evaluates those rules: a subscription whose consumer does not consume fires
//! QmeshBacklogGrowing and QmeshOldestMessageTooOld for its queue and subscription, a subscription
//! without consumers fires QmeshSubscriptionWithoutConsumers (and the one with a consumer does not),
//! a message nacked to its last delivery fires QmeshDeadLetters, and once the consumer takes
//! everything its alerts stop firing. Every query of the Grafana dashboard is valid PromQL to the
//! same Prometheus, and the KEDA example's Prometheus query reads the subscription's backlog.

#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use qmesh_proto::v1::{
    self, Ack, Nack, Open, PublishRequest, SubscribeRequest, broker_client::BrokerClient,
    subscribe_request, subscribe_response,
};
use qmesh_tests::{MeshBuilder, free_port, http, repo_root, wait_for};
use serde_json::Value;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

const MESH: &str = r#"
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
kind: Subscription
metadata: {name: audit}
spec:
  queue: orders
  consumers: {matchLabels: {app: nobody}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: work}
spec:
  queue: jobs
  consumers: {matchLabels: {app: billing}}
  retry: {maxDeliveries: 1}
"#;

/// Short windows and `for:` durations, so alerts fire within seconds.
const SHORT: &[&str] = &[
    "prometheusRule.alerts.backlogGrowing.threshold=0",
    "prometheusRule.alerts.backlogGrowing.window=20s",
    "prometheusRule.alerts.backlogGrowing.for=5s",
    "prometheusRule.alerts.oldestMessage.ageSeconds=4",
    "prometheusRule.alerts.oldestMessage.for=2s",
    "prometheusRule.alerts.noConsumers.for=2s",
    "prometheusRule.alerts.deadLetters.window=1m",
    "prometheusRule.alerts.deadLetters.for=0s",
];

fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: these tests run a real Prometheus. On Debian: \
                 apt-get install --no-install-recommends prometheus (hack/test.sh does)"
            )
        })
}

fn helm(args: &[&str]) -> String {
    let assets = std::env::var_os("KUBEBUILDER_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/qmesh/k8s-1.20.2")
        });
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(assets.join("helm"))
        .args(args)
        .current_dir(repo_root())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .unwrap();
    ok("helm", &out)
}

fn ok(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The chart rendered with `sets`, as one YAML document per object.
fn render(sets: &[&str]) -> Vec<serde_yaml::Value> {
    let mut args = vec![
        "template",
        "qmesh",
        "charts/qmesh",
        "--namespace",
        "qmesh-system",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let text = helm(&args);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// The PrometheusRule's `spec` — a Prometheus rules file as it is — written to `dir`, checked by
/// `promtool check rules`.
fn rules_file(dir: &Path, name: &str, sets: &[&str]) -> PathBuf {
    let mut all = vec!["prometheusRule.enabled=true"];
    all.extend_from_slice(sets);
    let objects = render(&all);
    let spec = &of_kind(&objects, "PrometheusRule")["spec"];
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml::to_string(spec).unwrap()).unwrap();
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    let said = ok("promtool check rules", &out);
    assert!(said.contains("SUCCESS: 8 rules found"), "{said}");
    path
}

#[test]
fn the_rendered_prometheus_rule_is_a_valid_rules_file_and_every_alert_has_a_runbook() {
    let dir = tempfile::tempdir().unwrap();
    for (name, sets) in [("default.yml", &[][..]), ("short.yml", SHORT)] {
        let path = rules_file(dir.path(), name, sets);
        let rules: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let docs = std::fs::read_to_string(repo_root().join("docs/monitoring.md")).unwrap();
        for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            let anchor = format!("#{}", alert.to_lowercase());
            assert!(
                url.ends_with(&format!("docs/monitoring.md{anchor}")),
                "{alert}: {url}"
            );
            assert!(
                docs.contains(&format!("\n### {alert}\n")),
                "docs/monitoring.md has no section {alert} (the runbook_url's anchor)"
            );
            assert!(rule["labels"]["severity"].is_string(), "{alert}");
        }
    }
    // Every alert can be turned off.
    let objects = render(&[
        "prometheusRule.enabled=true",
        "prometheusRule.alerts.operatorDown.enabled=false",
    ]);
    let rules = &of_kind(&objects, "PrometheusRule")["spec"]["groups"][0]["rules"];
    assert_eq!(rules.as_sequence().unwrap().len(), 7);
    assert!(
        !serde_yaml::to_string(rules)
            .unwrap()
            .contains("QmeshOperatorDown")
    );
}

fn sidecar_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("qmesh-sidecar");
    assert!(
        bin.is_file(),
        "{} missing: `cargo build --bin qmesh-sidecar` (the workspace test run builds it)",
        bin.display()
    );
    bin
}

/// A `prometheus` process on a free loopback port with its own storage, killed when dropped.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `targets` every second as job `qmesh-sidecar` and evaluates `rules` every second.
    async fn start(targets: &[SocketAddr], rules: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("qmesh-prometheus-")
            .tempdir()
            .unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n\
             - job_name: qmesh-sidecar\n  \
               static_configs:\n  \
               - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut prometheus = Self {
            addr,
            child,
            log,
            _dir: dir,
        };
        let ready = wait_for("Prometheus to be ready", Duration::from_secs(60), || {
            let exited = prometheus.child.try_wait().unwrap();
            async move {
                if exited.is_some() {
                    return Some(false);
                }
                let r = http::request("GET", addr, "/-/ready", &[], b"")
                    .await
                    .ok()?;
                (r.status == 200).then_some(true)
            }
        })
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "prometheus did not start ({ready:?}); log:\n{}",
            prometheus.log_tail()
        );
        prometheus
    }

    async fn api(&self, path: &str) -> Option<Value> {
        let r = http::request("GET", self.addr, path, &[], b"").await.ok()?;
        let v = r.json().ok()?;
        (v["status"] == "success").then_some(v["data"].clone())
    }

    /// Runs an instant query; `Err` with Prometheus' answer when it refuses it.
    async fn query(&self, promql: &str) -> Result<Value, String> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let r = http::request("GET", self.addr, &path, &[], b"")
            .await
            .map_err(|e| e.to_string())?;
        let v = r.json().map_err(|e| e.to_string())?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(v.to_string())
        }
    }

    /// Alerts of `name` in state `firing`; `None` while the API does not answer.
    async fn firing_now(&self, name: &str) -> Option<Vec<Value>> {
        let data = self.api("/api/v1/alerts").await?;
        Some(
            data["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
                .cloned()
                .collect(),
        )
    }

    /// Alerts of `name` in state `firing` (none while the API does not answer).
    async fn firing(&self, name: &str) -> Vec<Value> {
        self.firing_now(name).await.unwrap_or_default()
    }

    /// Waits until alert `name` fires for `subscription` of `queue`; returns it.
    async fn until_firing(&self, name: &str, queue: &str, subscription: &str) -> Value {
        let found = wait_for(
            &format!("{name} firing for {queue}/{subscription}"),
            Duration::from_secs(90),
            || async {
                self.firing(name).await.into_iter().find(|a| {
                    a["labels"]["queue"] == queue && a["labels"]["subscription"] == subscription
                })
            },
        )
        .await;
        match found {
            Ok(alert) => alert,
            Err(e) => panic!("{e}; alerts: {:?}", self.api("/api/v1/alerts").await),
        }
    }

    /// Waits until alert `name` no longer fires for `subscription` of `queue`.
    async fn until_not_firing(&self, name: &str, queue: &str, subscription: &str) {
        let gone = wait_for(
            &format!("{name} to stop firing for {queue}/{subscription}"),
            Duration::from_secs(60),
            || async {
                let firing = self.firing_now(name).await?;
                (!firing.iter().any(|a| {
                    a["labels"]["queue"] == queue && a["labels"]["subscription"] == subscription
                }))
                .then_some(())
            },
        )
        .await;
        if let Err(e) = gone {
            panic!("{e}; alerts: {:?}", self.api("/api/v1/alerts").await);
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("──── prometheus log ────\n{}", self.log_tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn message(id: &str) -> v1::Message {
    v1::Message {
        id: id.to_owned(),
        payload: id.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

async fn publish(url: &str, queue: &str, id: &str) {
    let mut client = BrokerClient::connect(url.to_owned()).await.unwrap();
    client
        .publish(PublishRequest {
            queue: queue.into(),
            message: Some(message(id)),
            correlation: 0,
            delay: None,
            deliver_at: None,
            transaction: String::new(),
        })
        .await
        .unwrap();
}

/// Consumes `subscription` at `url`, acking (or nacking) every delivery; counts them.
async fn consume(
    url: &str,
    subscription: &str,
    ack: bool,
    seen: Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let mut client = BrokerClient::connect(url.to_owned()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: subscription.into(),
            max_in_flight: 64,
            manual_credit: false,
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Some(Ok(r)) = inbound.next().await {
            let Some(subscribe_response::Response::Deliveries(batch)) = r.response else {
                continue;
            };
            let receipts: Vec<String> = batch.deliveries.into_iter().map(|d| d.receipt).collect();
            seen.fetch_add(receipts.len(), Ordering::SeqCst);
            let request = if ack {
                subscribe_request::Request::Ack(Ack { receipts })
            } else {
                subscribe_request::Request::Nack(Nack {
                    receipts,
                    delay: None,
                    reason: "cannot handle it".into(),
                    dead_letter: false,
                })
            };
            if tx
                .send(SubscribeRequest {
                    request: Some(request),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_the_charts_alerts_for_a_stuck_subscription_and_resolves_them() {
    let prometheus_bin = tool("prometheus");
    let work = tempfile::tempdir().unwrap();
    let rules = rules_file(work.path(), "rules.yml", SHORT);
    let mesh = MeshBuilder::new()
        .manifests(MESH)
        .sidecar("shop", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(&sidecar_binary())
        .await
        .unwrap();
    let (shop, billing) = (mesh.sidecar("shop"), mesh.sidecar("billing"));
    let prometheus = Prometheus::start(&[shop.admin, billing.admin], &rules).await;
    eprintln!(
        "prometheus {} at {}, sidecars {} and {}",
        prometheus_bin.display(),
        prometheus.addr,
        shop.admin,
        billing.admin
    );
    wait_for("both sidecars scraped", Duration::from_secs(30), || async {
        let data = prometheus
            .query("sum(up{job=\"qmesh-sidecar\"})")
            .await
            .ok()?;
        (data["result"][0]["value"][1] == "2").then_some(())
    })
    .await
    .unwrap();

    // A producer publishes steadily; billing's consumer sidecar is there but its app does not
    // consume, and audit has no consumer at all.
    let publishing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (url, publishing) = (shop.grpc_url(), Arc::clone(&publishing));
        tokio::spawn(async move {
            // Bounded: at most 2 minutes of it.
            for i in 0..600 {
                if !publishing.load(Ordering::SeqCst) {
                    return i;
                }
                publish(&url, "orders", &format!("order-{i}")).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            600
        })
    };
    let growing = prometheus
        .until_firing("QmeshBacklogGrowing", "orders", "billing")
        .await;
    assert_eq!(growing["labels"]["severity"], "warning", "{growing}");
    assert!(
        growing["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .ends_with("docs/monitoring.md#qmeshbackloggrowing"),
        "{growing}"
    );
    let old = prometheus
        .until_firing("QmeshOldestMessageTooOld", "orders", "billing")
        .await;
    assert!(
        old["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("subscription billing of queue orders"),
        "{old}"
    );
    publishing.store(false, Ordering::SeqCst);
    let published = producer.await.unwrap();
    assert!(published > 0);

    // The KEDA example's Prometheus trigger reads the same backlog (here without the `namespace`
    // a PodMonitor would add).
    let example: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("examples/keda/scaledobject-prometheus.yaml"))
            .unwrap(),
    )
    .unwrap();
    let keda = example["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap()
        .replace("namespace=\"shop\", ", "");
    assert!(keda.contains("subscription=\"billing\""), "{keda}");
    let want = published.to_string();
    let read = wait_for(
        "the KEDA example's query",
        Duration::from_secs(30),
        || async {
            let data = prometheus.query(&keda).await.ok()?;
            (data["result"][0]["value"][1] == want.as_str()).then_some(())
        },
    )
    .await;
    if let Err(e) = read {
        panic!("{e}: {keda} → {:?}", prometheus.query(&keda).await);
    }

    // audit has nobody to deliver to; billing has a consumer sidecar linked, so it is not "without
    // consumers" although its app takes nothing.
    prometheus
        .until_firing("QmeshSubscriptionWithoutConsumers", "orders", "audit")
        .await;
    let without = prometheus.firing("QmeshSubscriptionWithoutConsumers").await;
    assert!(
        without
            .iter()
            .all(|a| a["labels"]["subscription"] != "billing"),
        "{without:?}"
    );

    // A job nacked on its only delivery is parked: a dead letter.
    let nacked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let nacker = consume(&billing.grpc_url(), "work", false, Arc::clone(&nacked)).await;
    publish(&shop.grpc_url(), "jobs", "job-1").await;
    let dead = prometheus
        .until_firing("QmeshDeadLetters", "jobs", "work")
        .await;
    assert_eq!(dead["labels"]["alertname"], "QmeshDeadLetters");
    nacker.abort();

    // billing's app consumes everything: its alerts stop firing; audit's stay.
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let consumer = consume(&billing.grpc_url(), "billing", true, Arc::clone(&acked)).await;
    prometheus
        .until_not_firing("QmeshOldestMessageTooOld", "orders", "billing")
        .await;
    prometheus
        .until_not_firing("QmeshBacklogGrowing", "orders", "billing")
        .await;
    assert!(
        acked.load(Ordering::SeqCst) >= published,
        "every order consumed"
    );
    let backlog = prometheus
        .query("sum by (subscription) (qmesh_backlog_messages{queue=\"orders\"})")
        .await
        .unwrap();
    let of = |sub: &str| {
        backlog["result"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["metric"]["subscription"] == sub)
            .map(|r| r["value"][1].as_str().unwrap().to_owned())
    };
    assert_eq!(of("billing").as_deref(), Some("0"), "{backlog}");
    assert_eq!(of("audit"), Some(published.to_string()), "{backlog}");
    assert!(
        prometheus
            .firing("QmeshOldestMessageTooOld")
            .await
            .iter()
            .any(|a| a["labels"]["subscription"] == "audit"),
        "audit still owes its oldest message"
    );
    consumer.abort();

    // Every query of the dashboard is valid PromQL, and the panels about messages find series.
    let objects = render(&["grafanaDashboard.enabled=true"]);
    let configmap = of_kind(&objects, "ConfigMap");
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(configmap["data"]["qmesh.json"].as_str().unwrap()).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$job", "qmesh-sidecar")
                .replace("$namespace", ".*")
                .replace("$queue", ".*");
            let data = prometheus
                .query(&expr)
                .await
                .unwrap_or_else(|e| panic!("panel {}: {expr}: {e}", panel["title"]));
            let title = panel["title"].as_str().unwrap();
            // The first query of these panels has series by now (refusals and the like may not).
            if target["refId"] == "A"
                && [
                    "Backlog",
                    "Sidecars up",
                    "Oldest unacked message",
                    "Publish rate",
                    "Dead letters",
                ]
                .contains(&title)
            {
                assert!(
                    !data["result"].as_array().unwrap().is_empty(),
                    "panel {title}: {expr} found nothing"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 14, "{checked} queries");
}

/// The alerts about the mesh's health, not its messages, on the same real Prometheus: sidecar
/// certificates within the (here: widened) expiry window fire QmeshCertificateExpiringSoon for each
/// sidecar; a sidecar killed with kill -9 fires QmeshSidecarDown for its instance only, and it stops
/// once the sidecar is back; with no operator scraped, QmeshOperatorDown fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_the_health_alerts_for_a_killed_sidecar_and_expiring_certificates()
{
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(
        dir.path(),
        "health.yml",
        &[
            "prometheusRule.alerts.sidecarDown.for=2s",
            "prometheusRule.alerts.operatorDown.for=2s",
            // Every certificate of the test mesh (a day's life at most) is "expiring".
            "prometheusRule.alerts.certificateExpiry.withinSeconds=31536000",
            "prometheusRule.alerts.certificateExpiry.for=0s",
        ],
    );
    let mut mesh = MeshBuilder::new()
        .manifests(MESH)
        .sidecar("shop", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(&sidecar_binary())
        .await
        .unwrap();
    let (shop, billing) = (mesh.sidecar("shop").admin, mesh.sidecar("billing").admin);
    let prometheus = Prometheus::start(&[shop, billing], &rules).await;

    let instances = |alerts: Vec<Value>| -> Vec<String> {
        let mut found: Vec<String> = alerts
            .iter()
            .filter_map(|a| a["labels"]["instance"].as_str().map(str::to_owned))
            .collect();
        found.sort();
        found
    };
    let mut both = vec![shop.to_string(), billing.to_string()];
    both.sort();
    let expiring = wait_for(
        "QmeshCertificateExpiringSoon for both sidecars",
        Duration::from_secs(90),
        || async {
            let firing = instances(prometheus.firing("QmeshCertificateExpiringSoon").await);
            (firing == both).then_some(firing)
        },
    )
    .await;
    assert!(
        expiring.is_ok(),
        "{expiring:?}; alerts: {:?}",
        prometheus.api("/api/v1/alerts").await
    );
    let operator = wait_for("QmeshOperatorDown", Duration::from_secs(90), || async {
        let firing = prometheus.firing("QmeshOperatorDown").await;
        (!firing.is_empty()).then_some(())
    })
    .await;
    assert!(operator.is_ok(), "{operator:?}");
    assert!(
        prometheus.firing("QmeshSidecarDown").await.is_empty(),
        "both sidecars are up"
    );

    mesh.sidecar_mut("billing").kill9();
    let down = wait_for(
        "QmeshSidecarDown for billing",
        Duration::from_secs(90),
        || async {
            let firing = instances(prometheus.firing("QmeshSidecarDown").await);
            (firing == [billing.to_string()]).then_some(())
        },
    )
    .await;
    assert!(
        down.is_ok(),
        "{down:?}; alerts: {:?}",
        prometheus.api("/api/v1/alerts").await
    );
    mesh.sidecar_mut("billing").restart().await.unwrap();
    let back = wait_for(
        "QmeshSidecarDown to stop firing",
        Duration::from_secs(90),
        || async {
            let firing = prometheus.firing_now("QmeshSidecarDown").await?;
            firing.is_empty().then_some(())
        },
    )
    .await;
    assert!(back.is_ok(), "{back:?}");
}
