//! A full disk for real: the log on a 1 MiB tmpfs. Appends fail with a clear storage error once it is
//! full, nothing acknowledged is harmed, and after settling frees segments, appends work again.
//! Needs root (mount); CI runs as root.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use qmesh_proto::v1;
use qmesh_store::{DiskLog, FsyncPolicy, Outcome, StoreConfig, StoreError};

struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.fsync = FsyncPolicy::Always;
    c.segment_bytes = 128 * 1024;
    c
}

fn message(i: usize) -> std::sync::Arc<v1::Message> {
    std::sync::Arc::new(v1::Message {
        id: format!("m{i}"),
        payload: vec![b'x'; 8 * 1024].into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_full_disk_fails_appends_clearly_keeps_what_was_acknowledged_and_recovers() {
    let fs = Tmpfs::mount("1m");
    let dir = fs.0.path().join("log");
    let log = DiskLog::open(config(&dir)).unwrap();
    let mut acked = Vec::new();
    let mut places = Vec::new();
    let error = loop {
        match log
            .append_next("q", &message(acked.len()), &["a".to_owned()])
            .await
        {
            Ok((seq, at)) => {
                acked.push(seq);
                places.push(at);
            }
            Err(e) => break e,
        }
        assert!(acked.len() < 1000, "a 1 MiB disk never filled");
    };
    println!("disk full after {} appends of 8 KiB: {error}", acked.len());
    assert!(matches!(error, StoreError::DiskFull { .. }), "{error:?}");
    assert!(error.to_string().contains("is full"), "{error}");
    assert!(error.to_string().contains("No space left"), "{error}");
    assert!(acked.len() > 50);
    // Still full: still a clear error, not a hang or a panic.
    assert!(
        log.append_next("q", &message(9999), &["a".to_owned()])
            .await
            .is_err()
    );

    // Nothing acknowledged was harmed: a second reader replays exactly the acknowledged messages.
    {
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            // The live log may remove a temporary file (a failed write's) between the listing and
            // the copy; segments are only ever removed once released, and nothing is here.
            match std::fs::copy(entry.path(), copy.path().join(entry.file_name())) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    assert!(!name.ends_with(".log"), "segment {name} vanished");
                }
                Err(e) => panic!("copying {}: {e}", entry.path().display()),
            }
        }
        let replay = DiskLog::open(config(copy.path())).unwrap();
        let seqs: Vec<u64> = replay.recover().into_iter().map(|r| r.sequence).collect();
        assert_eq!(
            seqs, acked,
            "the failed batch did not resurface and nothing acknowledged is missing"
        );
    }

    // Settling frees whole segments; then appends work again.
    let keep = acked[acked.len() - 1];
    for (&seq, &at) in acked[..acked.len() - 1].iter().zip(&places) {
        log.settle("q", "a", seq, Outcome::Acked);
        log.release(at);
    }
    let mut again = None;
    for attempt in 0..50 {
        let _ = log.flush().await;
        if let Ok((seq, _)) = log
            .append_next("q", &message(5000 + attempt), &["a".to_owned()])
            .await
        {
            again = Some(seq);
            break;
        }
    }
    let again = again.expect("appends work again once settled segments are deleted");
    log.flush().await.unwrap();
    drop(log);
    let log = DiskLog::open(config(&dir)).unwrap();
    let seqs: Vec<u64> = log.recover().into_iter().map(|r| r.sequence).collect();
    assert_eq!(seqs, [keep, again]);
}
