//! `qmesh bench`: end-to-end throughput and latency through real sidecars, like `nats bench`.
//!
//! ```text
//!   P publishers ──PublishStream (pipelined)──▶ producer sidecar (owner, log) ══▶ consumer sidecar ──▶ S subscribers
//! ```
//! Prints msgs/s, MB/s, publish-ack and end-to-end latency percentiles, and the sidecars' CPU and RSS;
//! `--json` prints one JSON object instead. `--baseline` runs the same publishers against a bare
//! in-process gRPC server that answers at once, so the sidecars' cost shows as a ratio.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use qmesh_proto::v1::{
    self, Ack, Open, PublishRequest, PublishResult, SubscribeRequest, broker_client::BrokerClient,
    publish_result, subscribe_request, subscribe_response,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::local::LocalMesh;

/// Durability of the benchmark queue.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Durability {
    /// The disk log with group commit (fsync before acknowledging).
    Disk,
    /// Memory only.
    Memory,
}

/// `qmesh bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Messages to publish in total.
    #[arg(long, default_value_t = 100_000)]
    pub msgs: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Concurrent publishers (each a pipelined PublishStream).
    #[arg(long = "pub", default_value_t = 1)]
    pub publishers: usize,
    /// Concurrent subscribers (Subscribe streams on the consumer sidecar).
    #[arg(long = "sub", default_value_t = 1)]
    pub subscribers: usize,
    /// Queue durability.
    #[arg(long, value_enum, ignore_case = true, default_value = "disk")]
    pub durability: Durability,
    /// Offered rate in messages per second over all publishers (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publishes in flight per publisher.
    #[arg(long, default_value_t = 256)]
    pub pipeline: usize,
    /// Use these sidecars instead of starting two (`PRODUCER_GRPC,CONSUMER_GRPC`); their mesh must
    /// route queue `bench` to subscription `bench` on the consumer.
    #[arg(long, value_delimiter = ',')]
    pub sidecars: Vec<String>,
    /// Measure the same publishers against a bare in-process gRPC server instead.
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Peak shaving: publish everything with no consumer running, then start the subscribers and
    /// measure how fast the backlog drains (and the owner's memory throughout).
    #[arg(long)]
    pub burst: bool,
    /// With `--burst`: `kill -9` the owner once the backlog is in, restart it and measure the time
    /// until it is ready again.
    #[arg(long, requires = "burst")]
    pub kill: bool,
    /// The sidecars' `--memory-budget`.
    #[arg(long, default_value = "64Mi")]
    pub memory_budget: String,
    /// The sidecars' `--fsync` policy.
    #[arg(long, default_value = "always")]
    pub fsync: String,
    /// Scheduled messages: every message is published due at a time spread evenly over this long,
    /// starting `--scheduled-after` after the benchmark starts; measures how late (never early) and
    /// in what order they fire, and the owner's memory while it holds them.
    #[arg(long, value_parser = crate::parse_duration, conflicts_with_all = ["burst", "baseline"])]
    pub scheduled: Option<Duration>,
    /// With `--scheduled`: when the first message is due, after the start (leave time to publish).
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration, requires = "scheduled")]
    pub scheduled_after: Duration,
}

const MANIFESTS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: bench}
spec:
  durability: DURABILITY
  maxMessageBytes: 16Mi
  retention: {maxMessages: 100000000}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: bench}
spec:
  queue: bench
  consumers: {matchLabels: {app: consumer}}
  delivery: {maxInFlight: 2000, ackTimeout: 60s}
"#;

#[derive(Default)]
pub(crate) struct Latencies(Mutex<Vec<u32>>);

impl Latencies {
    pub(crate) fn push(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u32::MAX)) as u32;
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(us);
    }

    pub(crate) fn summary(&self) -> serde_json::Value {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_unstable();
        let p = |q: f64| -> u32 {
            if v.is_empty() {
                0
            } else {
                v[((q / 100.0) * (v.len() - 1) as f64).round() as usize]
            }
        };
        serde_json::json!({"p50": p(50.0), "p90": p(90.0), "p99": p(99.0), "p999": p(99.9), "max": v.last().copied().unwrap_or(0)})
    }
}

/// CPU seconds (user + system) and RSS of a process, from /proc.
pub(crate) fn process_usage(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some((ticks / 100.0, kb("VmRSS:") * 1024, kb("VmHWM:") * 1024))
}

pub(crate) async fn connect(addr: &str) -> anyhow::Result<BrokerClient<tonic::transport::Channel>> {
    crate::client::connect(addr).await
}

/// Arguments every benchmark sidecar gets.
fn sidecar_args(args: &BenchArgs) -> Vec<String> {
    vec![
        format!("--memory-budget={}", args.memory_budget),
        format!("--fsync={}", args.fsync),
        format!("--max-owned-bytes={}", 64u64 << 30),
        "--max-owned-messages=100000000".into(),
    ]
}

/// Starts the two local sidecars of a benchmark.
pub(crate) async fn local_mesh(args: &BenchArgs) -> anyhow::Result<LocalMesh> {
    let binary = crate::local::sidecar_binary()?;
    let durability = match args.durability {
        Durability::Disk => "Disk",
        Durability::Memory => "Memory",
    };
    let mut mesh = LocalMesh::start_with(
        &binary,
        &MANIFESTS.replace("DURABILITY", durability),
        &[
            ("producer", &[("app", "producer")]),
            ("consumer", &[("app", "consumer")]),
        ],
        &sidecar_args(args),
    )
    .await?;
    mesh.wait_ready(Duration::from_secs(15)).await?;
    Ok(mesh)
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.baseline {
        return baseline(args).await;
    }
    if args.burst {
        return crate::burst::run(args).await;
    }
    if args.scheduled.is_some() {
        return crate::scheduled::run(args).await;
    }
    let (mesh, producer, consumer) = if args.sidecars.len() == 2 {
        (None, args.sidecars[0].clone(), args.sidecars[1].clone())
    } else {
        let mesh = local_mesh(&args).await?;
        let p = mesh.sidecar("producer").grpc.to_string();
        let c = mesh.sidecar("consumer").grpc.to_string();
        (Some(mesh), p, c)
    };
    let pids: Vec<u32> = mesh
        .as_ref()
        .map(|m| {
            ["producer", "consumer"]
                .iter()
                .filter_map(|n| m.pid(n))
                .collect()
        })
        .unwrap_or_default();
    let idle_rss: u64 = pids
        .iter()
        .filter_map(|p| process_usage(*p))
        .map(|u| u.1)
        .max()
        .unwrap_or(0);
    let cpu_before: f64 = pids
        .iter()
        .filter_map(|p| process_usage(*p))
        .map(|u| u.0)
        .sum();

    let received = Arc::new(AtomicU64::new(0));
    let e2e = Arc::new(Latencies::default());
    let publish = Arc::new(Latencies::default());
    let done = Arc::new(tokio::sync::Notify::new());
    let subscribers = subscribe(
        &args,
        &consumer,
        Arc::clone(&received),
        Arc::clone(&e2e),
        Arc::clone(&done),
    )
    .await?;
    let bar = crate::progress::bar(args.msgs, "received");
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let ticker = {
        let (bar, received) = (bar.clone(), Arc::clone(&received));
        tokio::spawn(async move {
            loop {
                bar.set_position(received.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    publish_all(&args, &producer, Arc::clone(&publish)).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let deadline = Duration::from_secs(120);
    if received.load(Ordering::SeqCst) < args.msgs {
        tokio::time::timeout(deadline, async {
            while received.load(Ordering::SeqCst) < args.msgs {
                let _ = tokio::time::timeout(Duration::from_millis(100), done.notified()).await;
            }
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "only {} of {} messages arrived within {deadline:?}",
                received.load(Ordering::SeqCst),
                args.msgs
            )
        })?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    ticker.abort();
    bar.finish_and_clear();
    for s in subscribers {
        s.abort();
    }
    let usage: Vec<(f64, u64, u64)> = pids.iter().filter_map(|p| process_usage(*p)).collect();
    let cpu: f64 = usage.iter().map(|u| u.0).sum::<f64>() - cpu_before;
    let rss = usage.iter().map(|u| u.1).max().unwrap_or(0);
    let peak = usage.iter().map(|u| u.2).max().unwrap_or(0);
    let msgs_per_sec = args.msgs as f64 / elapsed;
    let report = serde_json::json!({
        "msgs": args.msgs,
        "size": args.size,
        "publishers": args.publishers,
        "subscribers": args.subscribers,
        "durability": format!("{:?}", args.durability),
        "offered_rate": args.rate,
        "elapsed_sec": elapsed,
        "publish_sec": publish_secs,
        "msgs_per_sec": msgs_per_sec,
        "mb_per_sec": msgs_per_sec * args.size as f64 / 1e6,
        "publish_latency_us": publish.summary(),
        "e2e_latency_us": e2e.summary(),
        "sidecar_rss_bytes": rss,
        "sidecar_peak_rss_bytes": peak,
        "sidecar_idle_rss_bytes": idle_rss,
        "sidecar_cpu_seconds": cpu,
    });
    drop(mesh);
    print_report(&args, &report);
    Ok(())
}

fn print_report(args: &BenchArgs, r: &serde_json::Value) {
    if args.json {
        println!("{r}");
        return;
    }
    let lat = |k: &str| {
        let v = &r[k];
        format!(
            "p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
            v["p50"], v["p90"], v["p99"], v["p999"], v["max"]
        )
    };
    println!(
        "qmesh bench: {} msgs × {} B, {} publisher(s), {} subscriber(s), {} durability{}",
        args.msgs,
        args.size,
        args.publishers,
        args.subscribers,
        r["durability"].as_str().unwrap_or(""),
        args.rate
            .map(|r| format!(", offered {r} msgs/s"))
            .unwrap_or_default()
    );
    println!(
        "throughput      {:.0} msgs/s  {:.1} MB/s  ({:.2} s)",
        r["msgs_per_sec"].as_f64().unwrap_or(0.0),
        r["mb_per_sec"].as_f64().unwrap_or(0.0),
        r["elapsed_sec"].as_f64().unwrap_or(0.0)
    );
    println!("publish-ack     {}", lat("publish_latency_us"));
    println!("end-to-end      {}", lat("e2e_latency_us"));
    if r["sidecar_rss_bytes"].as_u64().unwrap_or(0) > 0 {
        println!(
            "sidecars        CPU {:.2} s (both)  RSS {:.1} MB now, {:.1} MB peak, {:.1} MB idle (largest of the two)",
            r["sidecar_cpu_seconds"].as_f64().unwrap_or(0.0),
            r["sidecar_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["sidecar_peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["sidecar_idle_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
}

/// Opens `args.subscribers` Subscribe streams on `consumer` that ack everything, counting into
/// `received` (waking `done` once `args.msgs` are in) and recording end-to-end latency.
pub(crate) async fn subscribe(
    args: &BenchArgs,
    consumer: &str,
    received: Arc<AtomicU64>,
    e2e: Arc<Latencies>,
    done: Arc<tokio::sync::Notify>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers.max(1) {
        let (addr, received, e2e, done, total) = (
            consumer.to_owned(),
            Arc::clone(&received),
            Arc::clone(&e2e),
            Arc::clone(&done),
            args.msgs,
        );
        let (tx, mut inbound) = open_bench(&addr).await?;
        subscribers.push(tokio::spawn(async move {
            while let Some(Ok(response)) = inbound.next().await {
                let Some(subscribe_response::Response::Deliveries(batch)) = response.response
                else {
                    continue;
                };
                let now = SystemTime::now();
                let mut receipts = Vec::with_capacity(batch.deliveries.len());
                for d in batch.deliveries {
                    if let Some(t) = d
                        .message
                        .as_ref()
                        .and_then(|m| m.publish_time)
                        .and_then(|t| SystemTime::try_from(t).ok())
                        && let Ok(lat) = now.duration_since(t)
                    {
                        e2e.push(lat);
                    }
                    receipts.push(d.receipt);
                }
                let n = receipts.len() as u64;
                let _ = tx
                    .send(SubscribeRequest {
                        request: Some(subscribe_request::Request::Ack(Ack { receipts })),
                    })
                    .await;
                if received.fetch_add(n, Ordering::SeqCst) + n >= total {
                    done.notify_one();
                }
            }
        }));
    }

    Ok(subscribers)
}

/// Opens a `Subscribe` stream of subscription `bench` on `consumer` (window 1000): the sender for
/// acks, and the deliveries.
pub(crate) async fn open_bench(
    consumer: &str,
) -> anyhow::Result<(
    mpsc::Sender<SubscribeRequest>,
    tonic::Streaming<v1::SubscribeResponse>,
)> {
    let mut client = connect(consumer).await?;
    let (tx, rx) = mpsc::channel(64);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: "bench".into(),
            max_in_flight: 1000,
            manual_credit: false,
        })),
    })
    .await?;
    let inbound = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .context("subscribing to bench")?
        .into_inner();
    Ok((tx, inbound))
}

/// Publishes `args.msgs` over `args.publishers` pipelined streams, recording publish-ack latency.
pub(crate) async fn publish_all(
    args: &BenchArgs,
    addr: &str,
    latencies: Arc<Latencies>,
) -> anyhow::Result<()> {
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let per = args.msgs / args.publishers.max(1) as u64;
    let mut tasks = Vec::new();
    for p in 0..args.publishers.max(1) {
        let count = if p == 0 {
            args.msgs - per * (args.publishers.max(1) as u64 - 1)
        } else {
            per
        };
        let mut client = connect(addr).await?;
        let (payload, latencies, window) = (
            payload.clone(),
            Arc::clone(&latencies),
            args.pipeline.max(1),
        );
        let interval = args
            .rate
            .map(|r| Duration::from_secs_f64(args.publishers.max(1) as f64 / r));
        tasks.push(tokio::spawn(async move {
            let sent_at = Arc::new(Mutex::new(std::collections::HashMap::<u64, Instant>::new()));
            let permits = Arc::new(tokio::sync::Semaphore::new(window));
            let (tx, rx) = mpsc::channel::<PublishRequest>(window);
            let mut results = client
                .publish_stream(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let (sent, perm) = (Arc::clone(&sent_at), Arc::clone(&permits));
            let producer = tokio::spawn(async move {
                let start = Instant::now();
                for i in 0..count {
                    if let Some(every) = interval {
                        let due = start + every.mul_f64(i as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let Ok(permit) = perm.acquire().await else {
                        return;
                    };
                    permit.forget();
                    sent.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(i, Instant::now());
                    let message = v1::Message {
                        id: String::new(),
                        payload: payload.clone(),
                        headers: Default::default(),
                        key: String::new(),
                        publish_time: None,
                    };
                    if tx
                        .send(PublishRequest {
                            queue: "bench".into(),
                            message: Some(message),
                            correlation: i,
                            delay: None,
                            deliver_at: None,
                            transaction: String::new(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let mut answered = 0;
            while answered < count {
                let Some(result) = results.next().await else {
                    bail!("publish stream ended early")
                };
                let PublishResult {
                    correlation,
                    result,
                } = result?;
                if let Some(t) = sent_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&correlation)
                {
                    latencies.push(t.elapsed());
                }
                if let Some(publish_result::Result::Error(e)) = result {
                    bail!("publish refused: {}", e.message);
                }
                permits.add_permits(1);
                answered += 1;
            }
            producer.await?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// A gRPC server that answers every publish at once: the floor under any broker.
struct Echo;

#[tonic::async_trait]
impl v1::broker_server::Broker for Echo {
    async fn browse(
        &self,
        _: tonic::Request<v1::BrowseRequest>,
    ) -> Result<tonic::Response<v1::BrowseResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo baseline holds nothing",
        ))
    }

    async fn redrive(
        &self,
        _: tonic::Request<v1::RedriveRequest>,
    ) -> Result<tonic::Response<v1::RedriveResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo baseline holds nothing",
        ))
    }

    async fn purge(
        &self,
        _: tonic::Request<v1::PurgeRequest>,
    ) -> Result<tonic::Response<v1::PurgeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo baseline holds nothing",
        ))
    }

    async fn rewind(
        &self,
        _: tonic::Request<v1::RewindRequest>,
    ) -> Result<tonic::Response<v1::RewindResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo baseline keeps nothing",
        ))
    }

    async fn begin_transaction(
        &self,
        _: tonic::Request<v1::BeginTransactionRequest>,
    ) -> Result<tonic::Response<v1::BeginTransactionResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo baseline keeps nothing",
        ))
    }

    async fn commit_transaction(
        &self,
        _: tonic::Request<v1::TransactionRequest>,
    ) -> Result<tonic::Response<v1::TransactionResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo baseline keeps nothing",
        ))
    }

    async fn rollback_transaction(
        &self,
        _: tonic::Request<v1::TransactionRequest>,
    ) -> Result<tonic::Response<v1::TransactionResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo baseline keeps nothing",
        ))
    }

    type PublishStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<PublishResult, tonic::Status>> + Send>>;
    type SubscribeStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<v1::SubscribeResponse, tonic::Status>> + Send>,
    >;

    async fn publish(
        &self,
        _: tonic::Request<PublishRequest>,
    ) -> Result<tonic::Response<v1::PublishResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::PublishResponse::default()))
    }

    async fn publish_stream(
        &self,
        request: tonic::Request<tonic::Streaming<PublishRequest>>,
    ) -> Result<tonic::Response<Self::PublishStreamStream>, tonic::Status> {
        let out = request.into_inner().map(|r| {
            r.map(|r| PublishResult {
                correlation: r.correlation,
                result: Some(publish_result::Result::Ok(v1::PublishResponse::default())),
            })
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }

    async fn subscribe(
        &self,
        _: tonic::Request<tonic::Streaming<SubscribeRequest>>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the baseline only answers publishes",
        ))
    }
}

async fn baseline(args: BenchArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                v1::broker_server::BrokerServer::new(Echo)
                    .max_decoding_message_size(64 * 1024 * 1024),
            )
            .serve_with_incoming(
                tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
                    if let Ok(s) = &s {
                        let _ = s.set_nodelay(true);
                    }
                    s
                }),
            ),
    );
    let latencies = Arc::new(Latencies::default());
    let started = Instant::now();
    publish_all(&args, &addr.to_string(), Arc::clone(&latencies)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    server.abort();
    let msgs_per_sec = args.msgs as f64 / elapsed;
    let report = serde_json::json!({
        "baseline": true,
        "msgs": args.msgs,
        "size": args.size,
        "publishers": args.publishers,
        "elapsed_sec": elapsed,
        "msgs_per_sec": msgs_per_sec,
        "mb_per_sec": msgs_per_sec * args.size as f64 / 1e6,
        "publish_latency_us": latencies.summary(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "baseline (bare in-process gRPC server answering at once): {} msgs × {} B, {} publisher(s)",
            args.msgs, args.size, args.publishers
        );
        let v = &report["publish_latency_us"];
        println!(
            "throughput      {msgs_per_sec:.0} msgs/s  {:.1} MB/s",
            report["mb_per_sec"].as_f64().unwrap_or(0.0)
        );
        println!(
            "publish-ack     p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
            v["p50"], v["p90"], v["p99"], v["p999"], v["max"]
        );
    }
    Ok(())
}
