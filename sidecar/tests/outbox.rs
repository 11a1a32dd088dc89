//! The transactional outbox example (`examples/transactional-outbox/orders.py`, a Python service
//! with its own SQLite database) against real sidecar processes: the service is killed between its
//! database commit and its qmesh commit, and before its database commit; after it restarts, the
//! sidecar's check-back asks it, and every order in its database has its event delivered exactly
//! once per Subscription while no other order's event ever is. The interpreter is `$QMESH_PYTHON`
//! (hack/test.sh sets it), else `python3`; the service needs only the standard library.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;

fn python() -> String {
    std::env::var("QMESH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/transactional-outbox")
}

/// The example's manifests with the service's port as the check port and short check intervals.
fn manifests(port: u16) -> String {
    let yaml = std::fs::read_to_string(example().join("outbox.yaml")).unwrap();
    let yaml = yaml
        .replace("checkPort: 8080", &format!("checkPort: {port}"))
        .replace("checkAfter: 5s", "checkAfter: 1s");
    assert!(yaml.contains(&format!("checkPort: {port}")));
    yaml
}

/// The order service, running.
struct Service {
    child: Child,
    port: u16,
}

impl Service {
    fn start(port: u16, db: &Path, sidecar: std::net::SocketAddr, die_after: Option<&str>) -> Self {
        let mut command = Command::new(python());
        command
            .arg(example().join("orders.py"))
            .args([
                "--port",
                &port.to_string(),
                "--sidecar",
                &sidecar.to_string(),
            ])
            .arg("--db")
            .arg(db)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(point) = die_after {
            command.args(["--die-after", point]);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("running {}: {e} (hack/test.sh sets QMESH_PYTHON)", python())
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("listening"),
            "the service did not start: {line:?}"
        );
        Self { child, port }
    }

    async fn order(&self, id: &str, amount: i64) -> Option<u16> {
        let body = serde_json::json!({"id": id, "amount": amount}).to_string();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        qmesh_tests::http::request(
            "POST",
            addr,
            "/orders",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
        .ok()
        .map(|a| a.status)
    }

    /// Waits for the service to have died (it kills itself at its `--die-after` point).
    async fn died(mut self) {
        qmesh_tests::wait_for("the service to die", Duration::from_secs(20), || {
            let exited = self.child.try_wait().unwrap().is_some();
            async move { exited.then_some(()) }
        })
        .await
        .unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Orders in the service's database.
fn stored_orders(db: &Path) -> Vec<String> {
    let out = Command::new(python())
        .arg("-c")
        .arg(
            "import sqlite3, sys; \
             print('\\n'.join(r[0] for r in sqlite3.connect(sys.argv[1]).execute('SELECT id FROM orders ORDER BY id')))",
        )
        .arg(db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_service_killed_between_its_two_commits_still_publishes_exactly_its_stored_orders()
{
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orders.db");
    let mesh = mesh()
        .manifests(&manifests(port))
        .sidecar("orders", &[("app", "orders")])
        .sidecar("shipping", &[("app", "shipping")])
        .sidecar("invoicing", &[("app", "invoicing")])
        .data_dir("orders", &dir.path().join("sidecar"))
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let shipping = Consumer::start(
        "s",
        &mesh.sidecar("shipping").grpc_url(),
        "shipping",
        0,
        |_| Verdict::Ack,
    )
    .await;
    let invoicing = Consumer::start(
        "i",
        &mesh.sidecar("invoicing").grpc_url(),
        "invoicing",
        0,
        |_| Verdict::Ack,
    )
    .await;
    let sidecar = mesh.sidecar("orders").http;

    // An order stored, and one its database refuses (rolled back in qmesh too).
    let service = Service::start(port, &db, sidecar, None);
    assert_eq!(service.order("o-1", 5).await, Some(201));
    assert_eq!(service.order("o-2", 0).await, Some(422));
    drop(service);

    // Killed between its database commit and its qmesh commit: the order is stored, the event is
    // a half message nobody committed.
    let service = Service::start(port, &db, sidecar, Some("db-commit"));
    assert_eq!(
        service.order("o-3", 7).await,
        None,
        "the service died answering"
    );
    service.died().await;
    // Killed after publishing, before its database commit: no order, a half message.
    let service = Service::start(port, &db, sidecar, Some("publish"));
    assert_eq!(service.order("o-4", 9).await, None);
    service.died().await;
    assert_eq!(stored_orders(&db), ["o-1", "o-3"]);

    // Back up: the sidecar checks both transactions back and the database decides.
    let service = Service::start(port, &db, sidecar, None);
    for consumer in [&shipping, &invoicing] {
        consumer
            .expect_prefixed(
                "order-o-3",
                1,
                30,
                "the event of the order stored before the kill",
            )
            .await;
    }
    let admin = mesh.sidecar("orders").admin;
    qmesh_tests::wait_for(
        "both transactions settled",
        Duration::from_secs(30),
        || async {
            let s = stats(admin).await?;
            (s["transactions"]["open"] == 0).then_some(())
        },
    )
    .await
    .unwrap();
    // A last order after it all, as a barrier: everything before it has been delivered.
    assert_eq!(service.order("o-5", 1).await, Some(201));
    for consumer in [&shipping, &invoicing] {
        consumer
            .expect_prefixed("order-o-5", 1, 30, "the last order's event")
            .await;
        let mut ids = consumer.ids();
        ids.sort();
        assert_eq!(
            ids,
            ["order-o-1", "order-o-3", "order-o-5"],
            "exactly the stored orders, once each"
        );
    }
    assert_eq!(stored_orders(&db), ["o-1", "o-3", "o-5"]);
}
