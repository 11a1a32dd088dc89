//! Benchmark of recovery (not a test): how long opening a log takes when it holds a spilled
//! backlog — messages kept on disk only, which replay counts without decoding — and at what rate it
//! reads. What a `kill -9` with a backlog far larger than memory costs before the sidecar is ready.
//!
//! `cargo bench -p qmesh-store --bench replay [-- --messages 1000000 --dir /path/on/disk --cold]`
//! (`--cold`, as root: the page cache is dropped before the first open, so it reads from the disk).

use std::{sync::Arc, time::Instant};

use qmesh_proto::v1;
use qmesh_store::{DiskLog, FsyncPolicy, StoreConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let messages: u64 = arg("--messages")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base = arg("--dir").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = || {
        let mut c = StoreConfig::new(dir.path());
        c.fsync = FsyncPolicy::Never;
        c
    };
    let message = Arc::new(v1::Message {
        id: "01JDQ8Z3M9V4ZK2W7Q5R8T6Y1X".into(),
        payload: vec![7u8; 1024].into(),
        ..Default::default()
    });
    let pending = ["drain".to_owned()];
    runtime.block_on(async {
        let log = DiskLog::open(config()).expect("open");
        let at = log
            .append("burst", 1, &message, &pending)
            .await
            .expect("append");
        log.spill("burst", 2, at.end());
        let mut writes = Vec::new();
        for seq in 2..=messages {
            writes.push(log.append("burst", seq, &message, &pending));
            if writes.len() == 4096 {
                for w in writes.drain(..) {
                    w.await.expect("append");
                }
            }
        }
        for w in writes {
            w.await.expect("append");
        }
        log.flush().await.expect("flush");
    });
    let bytes: u64 = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // Twice: the first open reads from the disk (with `--cold`) or from whatever the page cache
    // kept, the second from the page cache.
    let cold = args.iter().any(|a| a == "--cold");
    if cold {
        let dropped = std::process::Command::new("sh")
            .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(dropped, "--cold needs root (to drop the page cache)");
    }
    let mut seconds = [0.0; 2];
    for run in &mut seconds {
        let started = Instant::now();
        let log = DiskLog::open(config()).expect("reopen");
        *run = started.elapsed().as_secs_f64();
        // Appends queued just after the spill record may be written before it (side records
        // ride behind a batch's appends): replay holds those few instead.
        let spilled: u64 = log.recover_spills().iter().map(|s| s.messages).sum();
        let held = log.recover().len() as u64;
        assert_eq!(held + spilled, messages, "every message recovered");
    }
    let mib = bytes as f64 / (1024.0 * 1024.0);
    for (what, secs) in [
        (if cold { "from disk" } else { "first open" }, seconds[0]),
        ("from the page cache", seconds[1]),
    ] {
        println!(
            "replay of {messages} messages ({mib:.0} MiB, nearly all spilled), {what}: {secs:.2} s, {:.0} MiB/s, {:.0} k records/s",
            mib / secs,
            messages as f64 / secs / 1000.0
        );
    }
}
