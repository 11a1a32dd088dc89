//! `qmesh demo`: qmesh's main job in one command, no cluster needed. Starts real sidecar
//! processes from a mesh file (the same manifests one would `kubectl apply`), a producer and
//! consumer apps built into the CLI, shows progress, and ends with a summary: fan-out, competing
//! consumers, a rate limit holding, and a poison message reaching the dead-letter queue.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use clap::Args;
use qmesh_proto::v1::{
    self, Ack, Nack, Open, PublishRequest, SubscribeRequest, subscribe_request, subscribe_response,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::{client::connect, local::LocalMesh};

/// `qmesh demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Orders to publish (plus one poison message).
    #[arg(long, default_value_t = 200)]
    pub orders: u32,
    /// Rate limit of the billing subscription, messages per second.
    #[arg(long, default_value_t = 40.0)]
    pub billing_rate: f64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 25)]
    pub timeout: u64,
}

const MANIFESTS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec:
  publishers: {matchLabels: {app: shop}}
  deadLetterQueue: orders-dlq
  retention: {maxMessages: 10000}
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
  delivery: {maxInFlight: 8, ackTimeout: 10s}
  rateLimit: {messagesPerSecond: RATE, burst: BURST}
  retry: {maxDeliveries: 3, backoff: {initial: 100ms, max: 1s, multiplier: 2}}
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
metadata: {name: dlq-inspector}
spec:
  queue: orders-dlq
  consumers: {matchLabels: {app: analytics}}
"#;

#[derive(Debug, Clone)]
struct Seen {
    consumer: &'static str,
    subscription: &'static str,
    id: String,
    attempt: u32,
    at: Instant,
    latency: Option<Duration>,
    headers: std::collections::HashMap<String, String>,
    acked: bool,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn is_poison(payload: &[u8]) -> bool {
    payload.starts_with(b"POISON")
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let binary = crate::local::sidecar_binary()?;
    // A burst of 1/20 s of traffic absorbs scheduling jitter (with a burst of 1 every late delivery
    // loses its token) while keeping the measured rate within a few percent of the limit.
    let burst = (args.billing_rate / 20.0).ceil().max(1.0);
    let manifests = MANIFESTS
        .replace("RATE", &format!("{}", args.billing_rate))
        .replace("BURST", &format!("{burst}"));
    println!("qmesh demo — a local mesh of real sidecar processes, no cluster needed\n");
    println!(
        "  shop ──▶ queue orders ──┬──▶ billing    2 competing consumers, rate limit {}/s, 3 deliveries max",
        args.billing_rate
    );
    println!("                          ├──▶ analytics  every order (fan-out)");
    println!(
        "                          └──▶ dead letters ──▶ queue orders-dlq ──▶ dlq-inspector\n"
    );

    let started = Instant::now();
    let mut mesh = LocalMesh::start(
        &binary,
        &manifests,
        &[
            ("shop", &[("app", "shop")]),
            ("billing-1", &[("app", "billing")]),
            ("billing-2", &[("app", "billing")]),
            ("analytics", &[("app", "analytics")]),
        ],
    )
    .await?;
    mesh.wait_ready(Duration::from_secs(15)).await?;
    println!(
        "started a local control plane and {} sidecars joined to it in {:.1}s ({})",
        mesh.sidecars.len(),
        started.elapsed().as_secs_f64(),
        binary.display()
    );

    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let consumers = [
        ("billing-1", "billing-1", "billing"),
        ("billing-2", "billing-2", "billing"),
        ("analytics", "analytics", "analytics"),
        ("dlq-inspector", "analytics", "dlq-inspector"),
    ];
    let mut tasks = Vec::new();
    for (consumer, sidecar, subscription) in consumers {
        let addr = mesh.sidecar(sidecar).grpc.to_string();
        tasks.push(tokio::spawn(consume(
            addr,
            consumer,
            subscription,
            Arc::clone(&log),
        )));
    }

    // The producer: orders spread over a second, one poison message in the middle.
    let shop = mesh.sidecar("shop").grpc.to_string();
    let total = args.orders + 1;
    println!(
        "publishing {} orders and 1 poison message to queue orders ...",
        args.orders
    );
    let publish_started = Instant::now();
    // Publishes go out on a fixed schedule (all within about a second), each awaited on its own,
    // so a slow disk stretches latencies, not the schedule: billing stays backlogged and its rate
    // limit, not the publisher, sets its pace.
    let client = connect(&shop).await?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / total);
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..total {
        ticker.tick().await;
        let poison = i == args.orders / 2;
        let payload = if poison {
            "POISON: not an order".to_owned()
        } else {
            format!("{{\"order\": {i}, \"total\": {}}}", 10 + i % 90)
        };
        let message = v1::Message {
            id: format!("order-{i}"),
            payload: payload.into_bytes().into(),
            headers: [("kind".to_owned(), "order".to_owned())].into(),
            key: format!("customer-{}", i % 7),
            publish_time: None,
        };
        let mut client = client.clone();
        inflight.spawn(async move {
            let t = Instant::now();
            client
                .publish(PublishRequest {
                    queue: "orders".into(),
                    message: Some(message),
                    correlation: u64::from(i),
                    delay: None,
                    deliver_at: None,
                    transaction: String::new(),
                })
                .await
                .context("publishing to the shop sidecar")?;
            anyhow::Ok(t.elapsed())
        });
    }
    let mut publish_latencies = Vec::new();
    while let Some(done) = inflight.join_next().await {
        publish_latencies.push(done??);
    }
    let publish_secs = publish_started.elapsed().as_secs_f64();

    // Progress until every subscription is done: bars on a terminal, a line every half second
    // otherwise.
    let bars = indicatif::MultiProgress::new();
    let billing_bar = bars.add(crate::progress::bar(
        u64::from(args.orders),
        "billing acked",
    ));
    let analytics_bar = bars.add(crate::progress::bar(u64::from(total), "analytics"));
    let dead_bar = bars.add(crate::progress::bar(1, "dead-lettered"));
    let interactive = !billing_bar.is_hidden();
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut last_line = Instant::now() - Duration::from_secs(1);
    loop {
        let (billing_done, analytics, dead) = {
            let log = log.lock().unwrap_or_else(|e| e.into_inner());
            let billing_acked = log
                .iter()
                .filter(|s| s.subscription == "billing" && s.acked)
                .count();
            let analytics = log.iter().filter(|s| s.subscription == "analytics").count();
            let dead = log
                .iter()
                .filter(|s| s.subscription == "dlq-inspector")
                .count();
            (billing_acked, analytics, dead)
        };
        let finished =
            billing_done >= args.orders as usize && analytics >= total as usize && dead >= 1;
        billing_bar.set_position(billing_done as u64);
        analytics_bar.set_position(analytics as u64);
        dead_bar.set_position(dead as u64);
        if finished || (!interactive && last_line.elapsed() >= Duration::from_millis(500)) {
            last_line = Instant::now();
            bars.suspend(|| {
                println!(
                    "[{:>5.1}s] published {total} │ billing acked {billing_done}/{} │ analytics {analytics}/{total} │ dead-lettered {dead}/1",
                    started.elapsed().as_secs_f64(),
                    args.orders
                )
            });
        }
        if finished {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the demo did not finish within {}s; sidecar log of shop:\n{}",
                args.timeout,
                mesh.log("shop")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for bar in [&billing_bar, &analytics_bar, &dead_bar] {
        bar.finish_and_clear();
    }
    for t in tasks {
        t.abort();
    }
    summary(
        &log.lock().unwrap_or_else(|e| e.into_inner()),
        total,
        args.billing_rate,
        publish_secs,
        &mut publish_latencies,
    );
    println!("\nstopping sidecars ...");
    drop(mesh);
    println!("done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn consume(
    addr: String,
    consumer: &'static str,
    subscription: &'static str,
    log: Log,
) -> anyhow::Result<()> {
    let mut client = connect(&addr).await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: subscription.to_owned(),
            max_in_flight: 8,
            manual_credit: false,
        })),
    })
    .await?;
    let mut inbound = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(response) = inbound.next().await {
        let Some(subscribe_response::Response::Deliveries(batch)) = response?.response else {
            continue;
        };
        for d in batch.deliveries {
            let m = d.message.unwrap_or_default();
            let latency = m
                .publish_time
                .and_then(|t| SystemTime::try_from(t).ok())
                .and_then(|t| SystemTime::now().duration_since(t).ok());
            let fail = subscription == "billing" && is_poison(&m.payload);
            log.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                consumer,
                subscription,
                id: m.id.clone(),
                attempt: d.attempt,
                at: Instant::now(),
                latency,
                headers: m.headers.clone(),
                acked: !fail,
            });
            let request = if fail {
                subscribe_request::Request::Nack(Nack {
                    receipts: vec![d.receipt],
                    delay: None,
                    reason: "billing: payload is not an order".into(),
                    dead_letter: false,
                })
            } else {
                subscribe_request::Request::Ack(Ack {
                    receipts: vec![d.receipt],
                })
            };
            tx.send(SubscribeRequest {
                request: Some(request),
            })
            .await?;
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn summary(
    log: &[Seen],
    published: u32,
    rate: f64,
    publish_secs: f64,
    publish_latencies: &mut [Duration],
) {
    println!("\n── summary ─────────────────────────────────────────────────────────────");
    println!("published            {published} messages in {publish_secs:.1}s (1 poison)");
    let mut per: BTreeMap<(&str, &str), (usize, usize)> = BTreeMap::new();
    for s in log {
        let e = per.entry((s.subscription, s.consumer)).or_default();
        e.0 += 1;
        if s.attempt > 1 {
            e.1 += 1;
        }
    }
    println!(
        "\n{:<16}{:<16}{:>10}{:>13}",
        "SUBSCRIPTION", "CONSUMER", "DELIVERED", "REDELIVERED"
    );
    for ((sub, consumer), (n, re)) in &per {
        println!("{sub:<16}{consumer:<16}{n:>10}{re:>13}");
    }
    // The rate over the span the subscription was backlogged: up to its last first delivery (the
    // poison message's later redeliveries wait out a backoff and would stretch the span).
    let billing: Vec<&Seen> = log.iter().filter(|s| s.subscription == "billing").collect();
    let last_first_attempt = billing.iter().rev().find(|s| s.attempt == 1);
    if let (Some(first), Some(last)) = (billing.first(), last_first_attempt) {
        let span = last.at.duration_since(first.at).as_secs_f64();
        let within = billing.iter().filter(|s| s.at <= last.at).count();
        let measured = if span > 0.0 {
            (within - 1) as f64 / span
        } else {
            0.0
        };
        println!(
            "\nbilling rate         {measured:.1} msgs/s measured vs limit {rate}/s ({:+.1}%)",
            (measured / rate - 1.0) * 100.0
        );
    }
    for dead in log.iter().filter(|s| s.subscription == "dlq-inspector") {
        let h = |k: &str| dead.headers.get(k).cloned().unwrap_or_default();
        println!(
            "dead letter          {} from {}/{} after {} deliveries: {} (last error: {})",
            h("qmesh-original-id"),
            h("qmesh-original-queue"),
            h("qmesh-original-subscription"),
            h("qmesh-delivery-count"),
            h("qmesh-dead-letter-reason"),
            h("qmesh-last-error")
        );
        let _ = &dead.id;
    }
    let mut e2e: Vec<Duration> = log
        .iter()
        .filter(|s| s.subscription == "analytics")
        .filter_map(|s| s.latency)
        .collect();
    e2e.sort();
    publish_latencies.sort();
    println!(
        "publish-ack latency  p50 {}  p90 {}  p99 {}  max {}",
        ms(percentile(publish_latencies, 50.0)),
        ms(percentile(publish_latencies, 90.0)),
        ms(percentile(publish_latencies, 99.0)),
        ms(publish_latencies.last().copied().unwrap_or_default())
    );
    println!(
        "end-to-end latency   p50 {}  p90 {}  p99 {}  max {}  (analytics, not rate limited)",
        ms(percentile(&e2e, 50.0)),
        ms(percentile(&e2e, 90.0)),
        ms(percentile(&e2e, 99.0)),
        ms(e2e.last().copied().unwrap_or_default())
    );
}
