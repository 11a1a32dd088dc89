//! The log keeps its own promises at the edges: a record replay would reject is never written,
//! numbering never goes backwards, and a long-lived message does not pin the segments behind it.

#![allow(clippy::unwrap_used)]

use std::{path::Path, sync::Arc};

use qmesh_proto::v1;
use qmesh_store::{DiskLog, FsyncPolicy, Outcome, StoreConfig, record};

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.fsync = FsyncPolicy::Never;
    c
}

fn message(id: &str, payload: usize) -> Arc<v1::Message> {
    Arc::new(v1::Message {
        id: id.into(),
        payload: vec![7u8; payload].into(),
        ..Default::default()
    })
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count()
}

#[tokio::test]
async fn a_record_larger_than_replay_accepts_is_refused_and_loses_nothing_after_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = DiskLog::open(config(dir.path())).unwrap();
        let subs = ["a".to_owned()];
        log.append("q", 1, &message("before", 10), &subs)
            .await
            .unwrap();
        let huge = message("huge", record::MAX_RECORD);
        let refused = log.append("q", 2, &huge, &subs).await;
        let error = refused.expect_err("a record over the limit is refused");
        assert!(
            error.to_string().contains("exceeds the log's limit"),
            "{error}"
        );
        log.append("q", 3, &message("after", 10), &subs)
            .await
            .unwrap();
        log.flush().await.unwrap();
    }
    let log = DiskLog::open(config(dir.path())).unwrap();
    let ids: Vec<String> = log.recover().into_iter().map(|r| r.message.id).collect();
    assert_eq!(
        ids,
        ["before", "after"],
        "replay kept everything acknowledged"
    );
    let dropped = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".dropped")
        })
        .count();
    assert_eq!(dropped, 0, "no segment was set aside");
}

#[tokio::test]
async fn numbering_never_goes_backwards_once_every_message_segment_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = DiskLog::open(config(dir.path())).unwrap();
        for seq in 1..=3 {
            log.append("q", seq, &message("m", 10), &["a".to_owned()])
                .await
                .unwrap();
            log.settle("q", "a", seq, Outcome::Acked);
        }
        log.flush().await.unwrap();
    }
    // Each reopen starts a new segment and deletes the fully settled ones before it.
    for _ in 0..3 {
        let log = DiskLog::open(config(dir.path())).unwrap();
        assert!(log.recover().is_empty());
        assert!(
            log.next_sequence() >= 4,
            "sequences went back to {}",
            log.next_sequence()
        );
    }
}

#[tokio::test]
async fn parked_messages_do_not_pin_every_later_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.segment_bytes = 4096;
    c.max_segments = 4;
    let log = DiskLog::open(c).unwrap();
    let subs = ["a".to_owned()];
    // Two messages that stay owed (parked) make up most of the head segment.
    let mut parked = Vec::new();
    for (seq, id) in [(1, "parked-1"), (2, "parked-2")] {
        let m = message(id, 1900);
        let at = log.append("q", seq, &m, &subs).await.unwrap();
        parked.push((seq, m, at));
    }
    // Then lots of traffic that is settled at once; the owner relocates what the log asks for.
    for seq in 3..400 {
        let at = log
            .append("q", seq, &message("m", 500), &subs)
            .await
            .unwrap();
        log.settle("q", "a", seq, Outcome::Acked);
        log.release(at);
        if seq % 10 == 0 {
            log.flush().await.unwrap();
            if let Some(below) = log.relocation_target() {
                for (seq, m, at) in parked.iter_mut() {
                    if at.segment < below {
                        let to = log
                            .relocate("q", *seq, m, vec![("a".to_owned(), 3)])
                            .await
                            .unwrap();
                        log.release(*at);
                        *at = to;
                    }
                }
            }
        }
    }
    log.flush().await.unwrap();
    let n = segments(dir.path());
    assert!(n <= 6, "{n} segments kept for two live messages");
    assert!(
        log.stats()
            .relocated
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    drop(log);
    let mut c = config(dir.path());
    c.segment_bytes = 4096;
    let log = DiskLog::open(c).unwrap();
    let recovered = log.recover();
    let ids: Vec<String> = recovered.iter().map(|r| r.message.id.clone()).collect();
    assert_eq!(ids, ["parked-1", "parked-2"]);
    assert_eq!(
        recovered[0].pending,
        vec![("a".to_owned(), 3)],
        "attempts travel with the copy"
    );
}

/// Found by fuzzing (fuzz/regressions/log_replay): a well-formed record carrying the largest
/// sequence made replay overflow. It leaves no next sequence, so replay treats it as corruption.
#[test]
fn a_record_with_the_largest_sequence_is_corruption_not_an_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    let m = v1::Message {
        id: "a".into(),
        ..Default::default()
    };
    record::encode_message(7, "q", &m, &["s"], &mut bytes);
    record::encode_message(u64::MAX, "q", &m, &["s"], &mut bytes);
    std::fs::write(dir.path().join("00000000000000000001.log"), &bytes).unwrap();
    let log = DiskLog::open(config(dir.path())).unwrap();
    let seqs: Vec<u64> = log.recover().into_iter().map(|r| r.sequence).collect();
    assert_eq!(seqs, [7], "kept what is before, cut the rest");
    assert!(log.next_sequence() > 7 && log.next_sequence() < u64::MAX);
}
