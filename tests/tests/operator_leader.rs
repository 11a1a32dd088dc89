//! Leader election on a real Lease: of two electors exactly one leads; when the leader crashes the
//! other takes over once the Lease expires, and when a leader shuts down gracefully it releases the
//! Lease and the next one takes over at once.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use qmesh_operator::leader::Elector;
use qmesh_tests::{KubeApiServer, wait_for};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(3);

struct Candidate {
    leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Candidate {
    fn start(client: &Client, identity: &str) -> Self {
        let elector = Elector::new(client.clone(), "default", "qmesh-operator", identity, LEASE);
        let (tx, leader) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(elector.run(tx, shutdown.clone()));
        Self {
            leader,
            shutdown,
            task,
        }
    }

    fn leads(&self) -> bool {
        *self.leader.borrow()
    }
}

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::default_namespaced(client.clone());
    leases
        .get_opt("qmesh-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

async fn wait_leader(
    client: &Client,
    candidates: &[(&str, &Candidate)],
    deadline: Duration,
) -> String {
    wait_for("exactly one leader", deadline, || async {
        let leading: Vec<&str> = candidates
            .iter()
            .filter(|(_, c)| c.leads())
            .map(|(name, _)| *name)
            .collect();
        match leading.as_slice() {
            [one] if holder(client).await.as_deref() == Some(*one) => Some(one.to_string()),
            _ => None,
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn one_of_two_electors_leads_and_the_other_takes_over() {
    let server = KubeApiServer::start().await.unwrap();
    let client = server.client();
    let a = Candidate::start(&client, "replica-a");
    let b = Candidate::start(&client, "replica-b");

    let first = wait_leader(&client, &[("replica-a", &a), ("replica-b", &b)], LEASE * 2).await;
    // It stays that way: the follower does not steal a lease that is being renewed.
    tokio::time::sleep(LEASE + LEASE / 2).await;
    assert_eq!(a.leads() as u8 + b.leads() as u8, 1);
    assert_eq!(holder(&client).await.as_deref(), Some(first.as_str()));

    // The leader crashes (no release): the other takes over once the Lease has expired.
    let (crashed, survivor, survivor_name) = if first == "replica-a" {
        (a, b, "replica-b")
    } else {
        (b, a, "replica-a")
    };
    let crashed_at = Instant::now();
    crashed.task.abort();
    let _ = crashed.task.await;
    let next = wait_leader(&client, &[(survivor_name, &survivor)], LEASE * 3).await;
    let took = crashed_at.elapsed();
    assert_eq!(next, survivor_name);
    // Expiry: a lease duration after the follower last saw the Lease change (up to one retry
    // period after the last renewal), detected at its next poll (another retry period).
    let retry = LEASE / 3;
    assert!(
        took <= LEASE + retry * 2 + Duration::from_millis(500),
        "takeover took {took:?}"
    );
    println!("takeover after a crash: {took:?}");

    // A graceful shutdown releases the Lease: a newcomer leads at once, well within a duration.
    let c = Candidate::start(&client, "replica-c");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c.leads());
    let stopped_at = Instant::now();
    survivor.shutdown.cancel();
    survivor.task.await.unwrap();
    assert!(!survivor.leader.borrow().to_owned());
    wait_leader(&client, &[("replica-c", &c)], LEASE).await;
    let took = stopped_at.elapsed();
    assert!(took < LEASE, "takeover after release took {took:?}");
    println!("takeover after a release: {took:?}");
    c.shutdown.cancel();
    c.task.await.unwrap();
    assert_eq!(holder(&client).await, None);
}
