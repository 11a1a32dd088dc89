//! Benchmark of the disk log (not a test): appends/s and MB/s of 1 KiB records for each fsync
//! policy at 1, 16 and 256 concurrent appenders, fsyncs/s and mean batch size, and a raw baseline
//! measured in the same run on the same disk (sequential `write` of the same bytes with std::fs,
//! then one fsync).
//!
//! `cargo bench -p qmesh-store --bench log [-- --secs 3 --dir /path/on/disk]`

use std::{
    io::Write,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use qmesh_proto::v1;
use qmesh_store::{DiskLog, FsyncPolicy, StoreConfig};

const PAYLOAD: usize = 1024;

struct Figures {
    appends_per_sec: f64,
    mb_per_sec: f64,
    fsyncs_per_sec: f64,
    batch: f64,
}

async fn run_case(
    dir: &std::path::Path,
    policy: FsyncPolicy,
    appenders: usize,
    secs: f64,
) -> Figures {
    let case = tempfile::tempdir_in(dir).expect("temp dir");
    let mut config = StoreConfig::new(case.path());
    config.fsync = policy;
    let log = Arc::new(DiskLog::open(config).expect("open log"));
    let stats = log.stats();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..appenders {
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            let pending = vec!["s".to_owned()];
            // Payloads arrive from the network as shared buffers; the log never copies them twice.
            let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
            let mut i = 0u64;
            while Instant::now() < deadline {
                let message = Arc::new(v1::Message {
                    id: format!("{w}-{i}"),
                    payload: payload.clone(),
                    ..Default::default()
                });
                log.append_next("bench", &message, &pending)
                    .await
                    .expect("append");
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.expect("appender");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let appends = stats.appends.load(Ordering::Relaxed) as f64;
    Figures {
        appends_per_sec: appends / elapsed,
        mb_per_sec: stats.bytes.load(Ordering::Relaxed) as f64 / elapsed / 1e6,
        fsyncs_per_sec: stats.fsyncs.load(Ordering::Relaxed) as f64 / elapsed,
        batch: appends / stats.batches.load(Ordering::Relaxed).max(1) as f64,
    }
}

/// Raw sequential write bandwidth of record-sized chunks gathered into `chunk_bytes`-byte writes,
/// then one fsync.
fn raw_baseline(dir: &std::path::Path, secs: f64, record: usize, chunk_bytes: usize) -> f64 {
    let path = dir.join("raw-baseline");
    let mut file = std::fs::File::create(&path).expect("create");
    let chunk = vec![b'x'; record];
    let started = Instant::now();
    let mut written = 0u64;
    let mut buf = Vec::with_capacity(chunk_bytes.max(record));
    while started.elapsed().as_secs_f64() < secs {
        buf.clear();
        while buf.len() + record <= buf.capacity() {
            buf.extend_from_slice(&chunk);
        }
        file.write_all(&buf).expect("write");
        written += buf.len() as u64;
    }
    file.sync_data().expect("fsync");
    let mbps = written as f64 / started.elapsed().as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(&path);
    mbps
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs: f64 = arg("--secs").and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let base = arg("--dir")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let record = PAYLOAD + 40; // payload + id + framing, as the log writes it

    let raw = raw_baseline(dir.path(), secs, record, 4 * 1024 * 1024);
    let raw_per_record = raw_baseline(dir.path(), secs, record, record);
    println!(
        "disk log benchmark: {PAYLOAD} B payloads, {secs} s per case, in {}",
        base.display()
    );
    println!("raw baseline, std::fs sequential write in 4 MiB writes + one fsync: {raw:.1} MB/s");
    println!(
        "raw baseline, std::fs sequential write of one record per write + one fsync: {raw_per_record:.1} MB/s"
    );
    println!("(% raw below is against the 4 MiB-write baseline)\n");
    println!(
        "{:<14}{:>10}{:>14}{:>10}{:>10}{:>12}{:>12}",
        "fsync", "appenders", "appends/s", "MB/s", "% raw", "fsyncs/s", "batch"
    );
    for (name, policy) in [
        ("never", FsyncPolicy::Never),
        (
            "interval:5ms",
            FsyncPolicy::Interval(Duration::from_millis(5)),
        ),
        ("always", FsyncPolicy::Always),
    ] {
        for appenders in [1, 16, 256] {
            if let Some(only) = arg("--only")
                && only != format!("{name}:{appenders}")
            {
                continue;
            }
            let f = runtime.block_on(run_case(dir.path(), policy, appenders, secs));
            println!(
                "{name:<14}{appenders:>10}{:>14.0}{:>10.1}{:>9.0}%{:>12.0}{:>12.1}",
                f.appends_per_sec,
                f.mb_per_sec,
                f.mb_per_sec / raw * 100.0,
                f.fsyncs_per_sec,
                f.batch
            );
        }
    }
}
