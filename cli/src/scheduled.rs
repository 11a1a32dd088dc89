//! `qmesh bench --scheduled SPREAD`: many scheduled messages at once. Every message is published
//! due at its own time, spread evenly (in a shuffled order) over SPREAD starting `--scheduled-after`
//! after the start, to the producer sidecar, which holds them all until they are due; a subscriber
//! on the consumer sidecar records when each arrives.
//!
//! ```text
//!   publisher ──deliver_at (shuffled)──▶ producer sidecar (owner: holds every scheduled message)
//!   owner ══ at each one's time ══▶ consumer sidecar ──▶ subscriber: arrival − due, order
//! ```
//! Prints the publish rate, the owner's peak RSS while holding them, how late they fired
//! (percentiles of arrival − due; early ones are counted, and must be none), and how many fired out
//! of order (after one due more than 100 ms later had already arrived).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::bail;
use qmesh_proto::v1::{
    self, Ack, PublishRequest, SubscribeRequest, publish_result, subscribe_request,
    subscribe_response,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::bench::{BenchArgs, Latencies, connect, local_mesh, open_bench, process_usage};

/// A delivery that came before the one due this much later is counted as out of order.
const ORDER_SLACK_MS: u64 = 100;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The i-th message's place in the spread: a fixed permutation of 0..n (so publish order is not
/// due order).
fn slot(i: u64, n: u64) -> u64 {
    // An odd multiplier coprime with n permutes 0..n; n is made odd-friendly by the search below.
    let mut k = 2_654_435_761 % n.max(1);
    while k == 0 || gcd(k, n) != 1 {
        k += 1;
    }
    (i.wrapping_mul(k)) % n.max(1)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Runs the scheduled-messages benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let spread = args.scheduled.unwrap_or(Duration::from_secs(60));
    let mesh = local_mesh(&args).await?;
    let producer = mesh.sidecar("producer").grpc.to_string();
    let consumer = mesh.sidecar("consumer").grpc.to_string();
    let owner_pid = mesh.pid("producer");
    let started = SystemTime::now();
    let first_due = unix_ms(started) + args.scheduled_after.as_millis() as u64;
    let n = args.msgs.max(1);
    let due_of = move |i: u64| first_due + slot(i, n) * spread.as_millis() as u64 / n;

    // (due, arrival) per delivery, in arrival order.
    let arrivals: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let subscriber = subscribe(&consumer, Arc::clone(&arrivals)).await?;

    let publish = Latencies::default();
    let publish_started = Instant::now();
    let mut client = connect(&producer).await?;
    let window = args.pipeline.max(1);
    let (tx, rx) = mpsc::channel::<PublishRequest>(window);
    let mut results = client
        .publish_stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let sent: Arc<Mutex<std::collections::HashMap<u64, Instant>>> = Arc::default();
    let feeder = {
        let (permits, sent) = (Arc::clone(&permits), Arc::clone(&sent));
        tokio::spawn(async move {
            for i in 0..n {
                let Ok(permit) = permits.acquire().await else {
                    return;
                };
                permit.forget();
                let due = SystemTime::UNIX_EPOCH + Duration::from_millis(due_of(i));
                sent.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(i, Instant::now());
                let request = PublishRequest {
                    queue: "bench".into(),
                    message: Some(v1::Message {
                        payload: payload.clone(),
                        ..v1::Message::default()
                    }),
                    correlation: i,
                    delay: None,
                    deliver_at: Some(due.into()),
                    transaction: String::new(),
                };
                if tx.send(request).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut acked = 0;
    let mut owner_peak = 0;
    while acked < n {
        let Some(result) = results.message().await? else {
            bail!("the publish stream ended after {acked} of {n}");
        };
        if let Some(publish_result::Result::Error(e)) = &result.result {
            bail!("publish {} refused: {}", result.correlation, e.message);
        }
        if let Some(at) = sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&result.correlation)
        {
            publish.push(at.elapsed());
        }
        permits.add_permits(1);
        acked += 1;
        if acked % 10_000 == 0 {
            owner_peak = owner_peak.max(owner_pid.and_then(process_usage).map_or(0, |u| u.1));
        }
    }
    feeder.abort();
    let publish_secs = publish_started.elapsed().as_secs_f64();
    let all_published = unix_ms(SystemTime::now());
    if all_published > first_due {
        eprintln!(
            "qmesh bench --scheduled: publishing took past the first due time ({} ms); raise --scheduled-after",
            all_published - first_due
        );
    }

    let deadline =
        Instant::now() + args.scheduled_after + spread + Duration::from_secs(120 + n / 10_000);
    loop {
        let got = arrivals.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        owner_peak = owner_peak.max(owner_pid.and_then(process_usage).map_or(0, |u| u.1));
        if got >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {got} of {n} scheduled messages arrived in time");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    subscriber.abort();
    let owner_peak_total = owner_pid.and_then(process_usage).map_or(0, |u| u.2);
    let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let late = Latencies::default();
    let mut early = 0u64;
    let mut out_of_order = 0u64;
    let mut latest_due = 0u64;
    for &(due, at) in &arrivals {
        if at + 2 < due {
            early += 1;
        } else {
            late.push(Duration::from_millis(at.saturating_sub(due)));
        }
        if due + ORDER_SLACK_MS < latest_due {
            out_of_order += 1;
        }
        latest_due = latest_due.max(due);
    }
    let report = serde_json::json!({
        "msgs": n,
        "size": args.size,
        "spread_sec": spread.as_secs_f64(),
        "memory_budget": args.memory_budget,
        "fsync": args.fsync,
        "publish_msgs_per_sec": n as f64 / publish_secs,
        "publish_latency_us": publish.summary(),
        "owner_rss_peak_bytes": owner_peak.max(owner_peak_total),
        "lateness_us": late.summary(),
        "early": early,
        "out_of_order": out_of_order,
    });
    drop(mesh);
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let mb = |v: u64| v as f64 / (1024.0 * 1024.0);
    let ms = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / 1000.0;
    let l = &report["lateness_us"];
    println!(
        "qmesh bench --scheduled: {n} msgs × {} B due over {:.0} s from {:.0} s after the start; memory budget {}, fsync {}",
        args.size,
        spread.as_secs_f64(),
        args.scheduled_after.as_secs_f64(),
        args.memory_budget,
        args.fsync
    );
    println!(
        "publish         {:.0} msgs/s; owner RSS peak {:.0} MiB while holding them",
        n as f64 / publish_secs,
        mb(owner_peak.max(owner_peak_total))
    );
    println!(
        "fired           late by p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; early {early}; out of order (> {ORDER_SLACK_MS} ms) {out_of_order}",
        ms(&l["p50"]),
        ms(&l["p90"]),
        ms(&l["p99"]),
        ms(&l["max"]),
    );
    Ok(())
}

/// Subscribes to `bench` and records (due, arrival) of each delivery, acking it.
async fn subscribe(
    consumer: &str,
    arrivals: Arc<Mutex<Vec<(u64, u64)>>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut inbound) = open_bench(consumer).await?;
    Ok(tokio::spawn(async move {
        while let Some(Ok(response)) = inbound.next().await {
            let Some(subscribe_response::Response::Deliveries(batch)) = response.response else {
                continue;
            };
            let now = unix_ms(SystemTime::now());
            let mut receipts = Vec::with_capacity(batch.deliveries.len());
            {
                let mut log = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                for d in batch.deliveries {
                    let due = d
                        .message
                        .as_ref()
                        .and_then(|m| m.headers.get("qmesh-deliver-at"))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    log.push((due, now));
                    receipts.push(d.receipt);
                }
            }
            let _ = tx
                .send(SubscribeRequest {
                    request: Some(subscribe_request::Request::Ack(Ack { receipts })),
                })
                .await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_are_a_permutation() {
        for n in [1, 2, 7, 10, 1000, 65_536] {
            let mut seen: Vec<u64> = (0..n).map(|i| slot(i, n)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
    }
}
