//! `/metrics` of real sidecars, scraped as Prometheus does: the owner's backlog, the age of the
//! oldest message a subscription owes (it grows while nobody consumes, and is 0 once everything is
//! acked), the consumer links per subscription (1 for a subscription whose consumer sidecar is up, 0
//! for one without consumers), counters that exist at 0 before their first event, publish errors
//! labelled by queue (never by an unknown name an app made up), and the certificate's expiry.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use common::*;
use qmesh_proto::v1;
use qmesh_tests::{http, wait_for};

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec: {maxMessageBytes: 1Ki}
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
"#;

async fn scrape(admin: SocketAddr) -> String {
    let response = http::request("GET", admin, "/metrics", &[], b"")
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    String::from_utf8(response.body).unwrap()
}

/// The value of the series `name{labels}` (labels written as the sidecar orders them).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

fn sub_series(name: &str, subscription: &str) -> String {
    format!("{name}{{queue=\"orders\",subscription=\"{subscription}\"}}")
}

/// Waits until `series` on `admin` satisfies `ok`; returns its value.
async fn until_value(admin: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let result = wait_for(series, Duration::from_secs(30), || async {
        value(&scrape(admin).await, series).filter(|v| ok(*v))
    })
    .await;
    match result {
        Ok(v) => v,
        Err(e) => panic!("{e}; last scrape:\n{}", scrape(admin).await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_exports_backlog_oldest_age_consumer_links_and_certificate_expiry() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("shop", &[("app", "shop")])
        .sidecar("billing", &[("app", "billing")])
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let shop = mesh.sidecar("shop");
    let billing = mesh.sidecar("billing");

    // Before anything is published: the counters of the queues this sidecar may own exist at 0
    // (a rate sees the first event only from a sample before it); nothing is owed yet.
    let text = scrape(shop.admin).await;
    for sub in ["billing", "audit"] {
        assert_eq!(
            value(&text, &sub_series("qmesh_dead_lettered_total", sub)),
            Some(0.0),
            "a counter exists before its first event: {text}"
        );
    }
    assert_eq!(
        value(&text, "qmesh_published_total{queue=\"orders\"}"),
        Some(0.0)
    );
    assert!(!text.contains("qmesh_backlog_messages{"), "{text}");

    // The certificate the mesh issued lives 24 h.
    let expiry = value(&text, "qmesh_certificate_expiry_timestamp_seconds").unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ttl = qmesh_identity::CERTIFICATE_TTL.as_secs_f64();
    assert!(
        (expiry - (now + ttl)).abs() < 600.0,
        "expiry {expiry}, now {now}"
    );

    let published = publish_all(
        &shop.grpc_url(),
        "orders",
        vec![message("o-1", "", "first"), message("o-2", "", "second")],
    )
    .await;
    assert!(published.iter().all(Result::is_ok), "{published:?}");

    // Nobody consumes: both subscriptions owe both messages.
    for sub in ["billing", "audit"] {
        until_value(
            shop.admin,
            &sub_series("qmesh_backlog_messages", sub),
            |v| v == 2.0,
        )
        .await;
    }
    let text = scrape(shop.admin).await;
    assert!(
        !text.contains("qmesh_backlog{"),
        "the old name is gone: {text}"
    );
    // billing's consumer sidecar is linked (its app is not consuming yet); audit has no consumer.
    until_value(
        shop.admin,
        &sub_series("qmesh_subscription_consumer_links", "billing"),
        |v| v == 1.0,
    )
    .await;
    until_value(
        shop.admin,
        &sub_series("qmesh_subscription_consumer_links", "audit"),
        |v| v == 0.0,
    )
    .await;

    // The oldest message's age grows while it is not consumed.
    let age = sub_series("qmesh_oldest_unacked_age_seconds", "billing");
    let first = until_value(shop.admin, &age, |v| v > 0.0).await;
    let later = until_value(shop.admin, &age, |v| v >= first + 1.5).await;
    assert!(later < first + 30.0, "{first} → {later}");
    assert!(
        value(
            &scrape(shop.admin).await,
            &sub_series("qmesh_oldest_unacked_age_seconds", "audit")
        )
        .unwrap()
            >= later - 1.0,
        "audit owes the same messages"
    );

    // billing's app consumes everything: nothing owed, the age is 0 again; audit still owes.
    let consumer = Consumer::start("b", &billing.grpc_url(), "billing", 8, |_| Verdict::Ack).await;
    consumer
        .expect_prefixed("o-", 2, 30, "billing's deliveries")
        .await;
    until_value(
        shop.admin,
        &sub_series("qmesh_backlog_messages", "billing"),
        |v| v == 0.0,
    )
    .await;
    until_value(shop.admin, &age, |v| v == 0.0).await;
    let text = scrape(shop.admin).await;
    assert_eq!(
        value(&text, &sub_series("qmesh_acked_total", "billing")),
        Some(2.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            &sub_series("qmesh_oldest_unacked_age_seconds", "audit")
        )
        .unwrap()
            >= later,
        "{text}"
    );
    // The consumer sidecar counts what its app holds (nothing: all acked).
    until_value(
        billing.admin,
        &sub_series("qmesh_in_flight_messages", "billing"),
        |v| v == 0.0,
    )
    .await;

    // Publish errors carry the queue — empty for a queue nobody declared.
    let mut app = client(&shop.grpc_url()).await;
    for (queue, payload) in [("orders", vec![b'x'; 4096]), ("made-up", b"m".to_vec())] {
        let refused = app
            .publish(v1::PublishRequest {
                queue: queue.into(),
                message: Some(message("e", "", &String::from_utf8(payload).unwrap())),
                correlation: 0,
                delay: None,
                deliver_at: None,
                transaction: String::new(),
            })
            .await;
        assert!(refused.is_err(), "{queue}: {refused:?}");
    }
    let text = scrape(shop.admin).await;
    assert_eq!(
        value(
            &text,
            "qmesh_publish_errors_total{queue=\"orders\",reason=\"message_too_large\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "qmesh_publish_errors_total{queue=\"\",reason=\"unknown_queue\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("made-up"), "{text}");
}
