//! `qmesh bench --burst`: peak shaving. A burst far larger than the owner's memory budget is
//! published with no consumer running, then (`--kill`) the owner is killed with `kill -9` and
//! restarted on its backlog, then the subscribers start and the backlog drains.
//!
//! ```text
//!   publishers ──▶ producer sidecar (owner: budget in memory, the rest in its log)   no consumer
//!   [kill -9 ▸ restart ▸ time to ready]
//!   producer ══▶ consumer sidecar ──▶ subscribers                                   drain rate
//! ```
//! Prints the publish rate, the drain rate from the cold backlog, the time to ready after the kill,
//! the owner's peak RSS in each phase, and the log reads the drain took.

use std::{
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::bench::{BenchArgs, Latencies, local_mesh, process_usage, publish_all, subscribe};

/// Runs the burst benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut mesh = local_mesh(&args).await?;
    let producer = mesh.sidecar("producer").clone();
    let consumer = mesh.sidecar("consumer").grpc.to_string();
    let owner_usage = |mesh: &crate::local::LocalMesh| {
        mesh.pid("producer")
            .and_then(process_usage)
            .unwrap_or_default()
    };
    let idle_rss = owner_usage(&mesh).1;

    let publish = Arc::new(Latencies::default());
    let started = Instant::now();
    publish_all(&args, &producer.grpc.to_string(), Arc::clone(&publish)).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let publish_peak = owner_usage(&mesh).2;
    let log_bytes = dir_bytes(&mesh.data_dir("producer"));

    let mut ready_secs = None;
    let mut restart_peak = None;
    if args.kill {
        mesh.kill9_and_restart("producer")?;
        let killed = Instant::now();
        while !crate::local::ready(producer.admin).await {
            if killed.elapsed() > Duration::from_secs(300) {
                bail!(
                    "the owner was not ready 300 s after the restart:\n{}",
                    mesh.log("producer")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ready_secs = Some(killed.elapsed().as_secs_f64());
        restart_peak = Some(owner_usage(&mesh).2);
    }
    let reads_before = metric(producer.admin, "qmesh_log_page_reads_total").await;

    let received = Arc::new(AtomicU64::new(0));
    let e2e = Arc::new(Latencies::default());
    let done = Arc::new(tokio::sync::Notify::new());
    let drain_started = Instant::now();
    let subscribers = subscribe(
        &args,
        &consumer,
        Arc::clone(&received),
        Arc::clone(&e2e),
        Arc::clone(&done),
    )
    .await?;
    let deadline = Duration::from_secs(120 + args.msgs / 10_000);
    while received.load(Ordering::SeqCst) < args.msgs {
        if drain_started.elapsed() > deadline {
            bail!(
                "only {} of {} messages drained within {deadline:?}",
                received.load(Ordering::SeqCst),
                args.msgs
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), done.notified()).await;
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    for s in subscribers {
        s.abort();
    }
    let drain_peak = owner_usage(&mesh).2;
    let page_reads = metric(producer.admin, "qmesh_log_page_reads_total").await - reads_before;
    let page_bytes = metric(producer.admin, "qmesh_log_page_read_bytes_total").await;
    let report = serde_json::json!({
        "msgs": args.msgs,
        "size": args.size,
        "publishers": args.publishers,
        "subscribers": args.subscribers,
        "memory_budget": args.memory_budget,
        "fsync": args.fsync,
        "publish_msgs_per_sec": args.msgs as f64 / publish_secs,
        "publish_latency_us": publish.summary(),
        "log_bytes": log_bytes,
        "drain_msgs_per_sec": args.msgs as f64 / drain_secs,
        "ready_after_kill_sec": ready_secs,
        "owner_idle_rss_bytes": idle_rss,
        "owner_peak_rss_publishing_bytes": publish_peak,
        "owner_peak_rss_after_restart_bytes": restart_peak,
        "owner_peak_rss_draining_bytes": drain_peak,
        "drain_page_reads": page_reads,
        "page_read_bytes": page_bytes,
    });
    drop(mesh);
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let mb = |v: u64| v as f64 / (1024.0 * 1024.0);
    println!(
        "qmesh bench --burst: {} msgs × {} B, {} publisher(s), no consumer, then {} subscriber(s); memory budget {}, fsync {}",
        args.msgs, args.size, args.publishers, args.subscribers, args.memory_budget, args.fsync
    );
    println!(
        "burst           {:.0} msgs/s published, {:.0} MiB of log; owner RSS {:.0} MiB idle, {:.0} MiB peak",
        args.msgs as f64 / publish_secs,
        mb(log_bytes),
        mb(idle_rss),
        mb(publish_peak)
    );
    if let (Some(ready), Some(peak)) = (ready_secs, restart_peak) {
        println!(
            "kill -9         ready again after {ready:.2} s, RSS peak {:.0} MiB",
            mb(peak)
        );
    }
    println!(
        "drain           {:.0} msgs/s from the cold backlog; owner RSS peak {:.0} MiB; {page_reads} log reads ({:.0} MiB)",
        args.msgs as f64 / drain_secs,
        mb(drain_peak),
        mb(page_bytes)
    );
    Ok(())
}

/// A counter from a sidecar's `/metrics` (0 when absent).
pub async fn metric(admin: std::net::SocketAddr, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
        return 0;
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
