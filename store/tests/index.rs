//! Segment indexes: a start replays sealed segments from their index (no message payload read)
//! and recovers exactly what reading every segment whole recovers — held messages with their
//! attempts, a spilled range's counts, settled runs kept for replay. A damaged index is not used;
//! a damaged message of an indexed segment is lost alone, counted.

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use qmesh_proto::v1;
use qmesh_store::{DiskLog, FsyncPolicy, Outcome, StoreConfig};

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.fsync = FsyncPolicy::Never;
    c.segment_bytes = 32 * 1024;
    c
}

fn files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    v.sort();
    v
}

/// Waits until every segment but the active one has its index.
async fn until_indexed(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let segments = files(dir, "log").len();
        let indexes = files(dir, "index").len();
        if segments > 1 && indexes + 1 >= segments {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{indexes} indexes for {segments} segments after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A log of three queues over many segments: settled, partly settled and unsettled messages,
/// attempt counts, and a queue spilled from sequence 600 on (paged in through 700).
async fn write_log(dir: &Path) {
    let log = DiskLog::open(config(dir)).unwrap();
    let subs = ["a".to_owned(), "b".to_owned()];
    let mut spill_cursor = None;
    for i in 0..1200u64 {
        let queue = ["orders", "events", "audit"][(i % 3) as usize];
        let message = Arc::new(v1::Message {
            id: format!("{queue}-{i}"),
            payload: vec![(i % 251) as u8; 100 + (i % 7) as usize * 50].into(),
            publish_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + i as i64,
                nanos: 0,
            }),
            ..Default::default()
        });
        let owing: &[String] = if i % 10 == 0 { &[] } else { &subs };
        let (seq, at) = log.append_next(queue, &message, owing).await.unwrap();
        if queue == "audit" && seq >= 600 && spill_cursor.is_none() {
            log.spill("audit", seq, at);
            spill_cursor = Some(at);
        }
        if queue == "orders" && i % 4 == 1 {
            log.settle(queue, "a", seq, Outcome::Acked);
            log.settle(queue, "b", seq, Outcome::Acked);
        } else if queue == "events" && i % 5 == 1 {
            log.settle(queue, "a", seq, Outcome::Acked);
            log.attempted(queue, "b", seq, 3);
        }
        if queue == "audit" && seq == 703 {
            let resume = qmesh_store::Position {
                offset: at.offset + u64::from(at.len),
                len: 0,
                ..at
            };
            log.paged_in("audit", 700, resume);
        }
    }
    log.flush().await.unwrap();
    until_indexed(dir).await;
}

/// A held message: queue, sequence, id, payload, owing subscriptions with attempts.
type Held = (String, u64, String, Vec<u8>, Vec<(String, u32)>);

/// What a start recovers, in a comparable form.
#[derive(Debug, PartialEq)]
struct Start {
    held: Vec<Held>,
    spills: Vec<qmesh_store::RecoveredSpill>,
    retained: Vec<qmesh_store::RetainedRun>,
    next: u64,
}

fn start(dir: &Path) -> (Start, u64, u64) {
    let log = DiskLog::open(config(dir)).unwrap();
    let held = log
        .recover()
        .into_iter()
        .map(|r| {
            (
                r.queue,
                r.sequence,
                r.message.id,
                r.message.payload.to_vec(),
                r.pending,
            )
        })
        .collect();
    let stats = log.stats();
    let state = Start {
        held,
        spills: log.recover_spills(),
        retained: log.recover_retained(),
        next: log.next_sequence(),
    };
    (
        state,
        stats.indexed_segments.load(Ordering::Relaxed),
        stats.dropped_bytes.load(Ordering::Relaxed),
    )
}

fn remove_indexes(dir: &Path) {
    for p in files(dir, "index") {
        std::fs::remove_file(p).unwrap();
    }
}

#[tokio::test]
async fn an_indexed_start_recovers_exactly_what_reading_every_segment_recovers() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path()).await;
    let sealed = files(dir.path(), "index").len() as u64;
    assert!(
        sealed >= 5,
        "the log spans many segments ({sealed} indexed)"
    );

    let (indexed, used, dropped) = start(dir.path());
    assert_eq!(used, sealed, "every sealed segment replayed from its index");
    assert_eq!(dropped, 0);
    assert!(!indexed.held.is_empty() && !indexed.spills.is_empty() && !indexed.retained.is_empty());
    let spill = &indexed.spills[0];
    assert_eq!(spill.queue, "audit");
    assert!(spill.messages > 0, "{spill:?}");

    remove_indexes(dir.path());
    let (whole, used, _) = start(dir.path());
    assert_eq!(used, 0, "no index left: every segment read whole");
    assert_eq!(indexed.held.len(), whole.held.len());
    assert_eq!(indexed, whole);

    // That start indexed every segment again: the next one uses them.
    let (again, used, _) = start(dir.path());
    assert!(used >= sealed, "{used} of {sealed}");
    assert_eq!(again.held, whole.held);
    assert_eq!(again.spills, whole.spills);
}

#[tokio::test]
async fn a_damaged_index_is_not_used_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path()).await;
    let (before, _, _) = start(dir.path());
    let indexes = files(dir.path(), "index");
    // One flipped byte, one cut short, one foreign.
    let mut bytes = std::fs::read(&indexes[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&indexes[0], bytes).unwrap();
    let bytes = std::fs::read(&indexes[1]).unwrap();
    std::fs::write(&indexes[1], &bytes[..bytes.len() - 3]).unwrap();
    std::fs::write(&indexes[2], b"not an index").unwrap();
    let sealed = indexes.len() as u64;

    let (after, used, dropped) = start(dir.path());
    assert!(
        used <= sealed - 3,
        "{used} indexes used of {sealed}, 3 damaged"
    );
    assert_eq!(dropped, 0);
    assert_eq!(after.held, before.held);
    assert_eq!(after.spills, before.spills);
    assert_eq!(after.next, before.next);
}

#[tokio::test]
async fn a_damaged_message_of_an_indexed_segment_is_lost_alone_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path()).await;
    let (before, _, _) = start(dir.path());
    // The first held message's record: one byte of its payload flipped.
    let log = DiskLog::open(config(dir.path())).unwrap();
    let victim = log.recover().into_iter().next().unwrap();
    drop(log);
    let path = dir.path().join(format!("{:020}.log", victim.at.segment));
    let mut bytes = std::fs::read(&path).unwrap();
    let inside = (victim.at.offset + u64::from(victim.at.len) - 8) as usize;
    bytes[inside] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let (after, used, dropped) = start(dir.path());
    assert!(used > 0);
    assert_eq!(dropped, u64::from(victim.at.len));
    let lost: Vec<_> = before
        .held
        .iter()
        .filter(|h| !after.held.contains(h))
        .map(|h| h.2.clone())
        .collect();
    assert_eq!(
        lost,
        [victim.message.id],
        "only the damaged message is lost"
    );
    assert_eq!(after.held.len() + 1, before.held.len());
}
