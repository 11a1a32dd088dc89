//! Benchmark of mesh-view computation (not a test): a namespace with 1,000 pods and 100 queues
//! (2 subscriptions each), every pod's view computed — what the control plane does after a change
//! that touches everyone.
//!
//! `cargo bench -p qmesh-core --bench views`

use std::{collections::BTreeMap, time::Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use qmesh_api::{Queue, QueueSpec, Subscription, SubscriptionSpec};
use qmesh_core::{MeshState, SidecarInfo, SidecarKey};

fn selector(app: &str) -> qmesh_api::PodSelector {
    qmesh_api::PodSelector::from(LabelSelector {
        match_labels: Some([("app".to_owned(), app.to_owned())].into()),
        ..Default::default()
    })
}

fn main() {
    let (pods, queues) = (1000usize, 100usize);
    let mut mesh = MeshState::default();
    for q in 0..queues {
        let mut queue = Queue::new(
            &format!("q{q}"),
            QueueSpec {
                publishers: Some(selector(&format!("producer-{}", q % 50))),
                ..Default::default()
            },
        );
        queue.metadata.namespace = Some("shop".into());
        mesh.apply_queue(queue);
        for s in 0..2 {
            let mut sub = Subscription::new(
                &format!("q{q}-s{s}"),
                SubscriptionSpec {
                    queue: format!("q{q}"),
                    consumers: selector(&format!("consumer-{}", (q * 2 + s) % 100)),
                    delivery: Default::default(),
                    rate_limit: None,
                    retry: Default::default(),
                    dead_letter_queue: None,
                    filter: None,
                    start_at: Default::default(),
                },
            );
            sub.metadata.namespace = Some("shop".into());
            mesh.apply_subscription(sub);
        }
    }
    for p in 0..pods {
        let app = if p % 2 == 0 {
            format!("producer-{}", p % 50)
        } else {
            format!("consumer-{}", p % 100)
        };
        mesh.apply_sidecar(
            SidecarKey::new("shop", format!("pod-{p}")),
            SidecarInfo {
                labels: BTreeMap::from([("app".to_owned(), app)]),
                service_account: "default".into(),
                peer_address: format!("198.18.{}.{}:7070", p / 250, p % 250),
                ready: true,
            },
        );
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut routes = 0usize;
        for p in 0..pods {
            let view = mesh
                .view_for(&SidecarKey::new("shop", format!("pod-{p}")))
                .expect("view");
            routes += view.queues.iter().map(|q| q.routes.len()).sum::<usize>()
                + view.subscriptions.len();
        }
        times.push(started.elapsed());
        std::hint::black_box(routes);
    }
    times.sort();
    println!(
        "all {pods} views of a namespace with {pods} pods, {queues} queues, {} subscriptions: median {:.1} ms (min {:.1}, max {:.1}) over {} runs",
        queues * 2,
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        times.len()
    );
}
