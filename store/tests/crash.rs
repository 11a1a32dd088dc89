//! Crash test of the disk log: a child process appends and settles in a loop, reporting each
//! acknowledged append and each durable settlement on a pipe; the parent `kill -9`s it at random
//! moments, many times, and after every kill replays the log and checks that every acknowledged
//! append is there and every settled message stays settled.

#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use qmesh_proto::v1;
use qmesh_store::{DiskLog, FsyncPolicy, Outcome, StoreConfig};

const CHILD_ENV: &str = "QMESH_STORE_CRASH_CHILD_DIR";

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.fsync = FsyncPolicy::Always;
    // Small segments, so rolling, garbage collection and compaction all happen under the kills.
    c.segment_bytes = 64 * 1024;
    c.max_segments = 4;
    c
}

/// The child: runs only when the parent starts this test binary with `CHILD_ENV` set.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let log = std::sync::Arc::new(DiskLog::open(config(std::path::Path::new(&dir))).unwrap());
        let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let start: u64 = std::process::id().into();
        // 16 concurrent appenders, so group commit batches under the kills.
        let mut tasks = Vec::new();
        for worker in 0..16u64 {
            let log = std::sync::Arc::clone(&log);
            let out = std::sync::Arc::clone(&out);
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("{start}-{worker}-{i}");
                    let message = std::sync::Arc::new(v1::Message {
                        id: id.clone(),
                        payload: vec![b'p'; 200].into(),
                        ..Default::default()
                    });
                    let (seq, at) = log
                        .append_next("q", &message, &["s".to_owned()])
                        .await
                        .unwrap();
                    writeln!(out.lock().unwrap(), "A {seq} {id}").unwrap();
                    if i % 3 == 0 {
                        // Announced first: a kill between the settle and its report leaves the
                        // outcome open, and the parent must not count that as a loss.
                        writeln!(out.lock().unwrap(), "P {seq}").unwrap();
                        log.settle("q", "s", seq, Outcome::Acked);
                        log.release(at);
                        log.flush().await.unwrap();
                        writeln!(out.lock().unwrap(), "S {seq}").unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_append_and_unsettles_nothing() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut settled: BTreeSet<u64> = BTreeSet::new();
    let mut settling: BTreeSet<u64> = BTreeSet::new();
    let mut cycles = 0;
    let started = Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    while cycles < 40 && started.elapsed() < Duration::from_secs(45) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run_for = Duration::from_millis(30 + seed % 300);
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(run_for);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["A", seq, id] => {
                    acked.insert(seq.parse().unwrap(), (*id).to_owned());
                }
                ["S", seq] => {
                    settled.insert(seq.parse().unwrap());
                }
                ["P", seq] => {
                    settling.insert(seq.parse().unwrap());
                }
                _ => {} // a line cut by the kill, or test-harness output
            }
        }
        cycles += 1;

        // Replay and check.
        let log = DiskLog::open(config(dir.path())).unwrap();
        let recovered: BTreeMap<u64, String> = log
            .recover()
            .into_iter()
            .map(|r| (r.sequence, r.message.id))
            .collect();
        for (seq, id) in &acked {
            if settled.contains(seq) {
                assert!(
                    !recovered.contains_key(seq),
                    "cycle {cycles}: settled message {seq} came back"
                );
            } else if settling.contains(seq) {
                // Killed between settling and reporting it: either outcome is correct, but once
                // gone it must stay gone.
                if !recovered.contains_key(seq) {
                    settled.insert(*seq);
                }
            } else {
                assert_eq!(
                    recovered.get(seq),
                    Some(id),
                    "cycle {cycles}: acknowledged append {seq} lost"
                );
            }
        }
        let stats = log.stats();
        assert_eq!(
            stats
                .write_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        drop(log);
    }
    let live = acked.len() - settled.len();
    println!(
        "kill -9 cycles: {cycles}; acknowledged appends checked: {}; settled checked: {}; still owed: {live}",
        acked.len(),
        settled.len()
    );
    assert!(cycles >= 20, "only {cycles} cycles ran");
    assert!(
        acked.len() > 1000,
        "the child appended too little to prove anything: {}",
        acked.len()
    );
}
