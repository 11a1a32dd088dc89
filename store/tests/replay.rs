//! Replay of the disk log against an in-memory model: any sequence of appends, settlements,
//! attempt counts and restarts gives the state the model predicts — with segments small enough that
//! rolling, garbage collection and compaction happen all the time. Plus garbage and foreign files.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, path::Path};

use proptest::prelude::*;
use qmesh_proto::v1;
use qmesh_store::{DiskLog, FsyncPolicy, Outcome, StoreConfig};

#[derive(Debug, Clone)]
enum Op {
    Append { queue: u8, subs: u8, size: usize },
    Settle { pick: usize, sub: u8 },
    Attempt { pick: usize, sub: u8, attempts: u32 },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..2, 1u8..4, 0usize..600).prop_map(|(queue, subs, size)| Op::Append { queue, subs, size }),
        3 => (any::<usize>(), 0u8..2).prop_map(|(pick, sub)| Op::Settle { pick, sub }),
        1 => (any::<usize>(), 0u8..2, 1u32..9).prop_map(|(pick, sub, attempts)| Op::Attempt { pick, sub, attempts }),
        1 => Just(Op::Restart),
    ]
}

const SUBS: [&str; 2] = ["a", "b"];

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.fsync = FsyncPolicy::Never;
    c.segment_bytes = 2048;
    c.max_segments = 3;
    c
}

/// Model: sequence → (queue, id, owing subscription → attempts).
type Model = BTreeMap<u64, (String, String, BTreeMap<String, u32>)>;

/// Where each unsettled message's record is (what the owner keeps to release it).
type Places = BTreeMap<u64, qmesh_store::Position>;

/// Copies live messages out of the segments the log asks to vacate, as the owner does.
async fn relocate(log: &DiskLog, model: &Model, places: &mut Places) {
    let Some(below) = log.relocation_target() else {
        return;
    };
    for (seq, at) in places.iter_mut() {
        if at.segment >= below {
            continue;
        }
        let (queue, id, owing) = &model[seq];
        let message = std::sync::Arc::new(v1::Message {
            id: id.clone(),
            ..Default::default()
        });
        let pending: Vec<(String, u32)> = owing.iter().map(|(s, a)| (s.clone(), *a)).collect();
        let to = log.relocate(queue, *seq, &message, pending).await.unwrap();
        log.release(*at);
        *at = to;
    }
}

fn state_of(log: &DiskLog) -> Model {
    model_of(log.recover())
}

fn model_of(recovered: Vec<qmesh_store::Recovered>) -> Model {
    recovered
        .into_iter()
        .map(|r| {
            (
                r.sequence,
                (r.queue, r.message.id, r.pending.into_iter().collect()),
            )
        })
        .collect()
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = DiskLog::open(config(dir.path())).unwrap();
    let mut model: Model = BTreeMap::new();
    let mut places: Places = BTreeMap::new();
    let mut n = 0;
    for op in ops {
        match op {
            Op::Append { queue, subs, size } => {
                n += 1;
                let queue = format!("q{queue}");
                let id = format!("m{n}");
                let pending: Vec<String> = SUBS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| subs & (1 << i) != 0)
                    .map(|(_, s)| s.to_string())
                    .collect();
                let message = std::sync::Arc::new(v1::Message {
                    id: id.clone(),
                    payload: vec![1u8; size].into(),
                    ..Default::default()
                });
                let (seq, at) = log.append_next(&queue, &message, &pending).await.unwrap();
                if !pending.is_empty() {
                    places.insert(seq, at);
                }
                model.insert(
                    seq,
                    (queue, id, pending.into_iter().map(|s| (s, 0)).collect()),
                );
            }
            Op::Settle { pick, sub } => {
                if model.is_empty() {
                    continue;
                }
                let seq = *model.keys().nth(pick % model.len()).unwrap();
                let (queue, _, owing) = model.get_mut(&seq).unwrap();
                let sub = SUBS[sub as usize];
                if owing.remove(sub).is_some() {
                    log.settle(queue, sub, seq, Outcome::Acked);
                }
                if owing.is_empty() {
                    model.remove(&seq);
                    if let Some(at) = places.remove(&seq) {
                        log.release(at);
                    }
                }
            }
            Op::Attempt {
                pick,
                sub,
                attempts,
            } => {
                if model.is_empty() {
                    continue;
                }
                let seq = *model.keys().nth(pick % model.len()).unwrap();
                let (queue, _, owing) = model.get_mut(&seq).unwrap();
                let sub = SUBS[sub as usize];
                if let Some(a) = owing.get_mut(sub) {
                    *a = attempts;
                    log.attempted(queue, sub, seq, attempts);
                }
            }
            Op::Restart => {
                log.flush().await.unwrap();
                drop(log);
                log = DiskLog::open(config(dir.path())).unwrap();
                let recovered = log.recover();
                places = recovered.iter().map(|r| (r.sequence, r.at)).collect();
                assert_eq!(model_of(recovered), model, "state after restart");
                relocate(&log, &model, &mut places).await;
            }
        }
    }
    // The owner relocates what the log asks it to, about once a second.
    for _ in 0..4 {
        log.flush().await.unwrap();
        relocate(&log, &model, &mut places).await;
    }
    log.flush().await.unwrap();
    drop(log);
    let log = DiskLog::open(config(dir.path())).unwrap();
    assert_eq!(state_of(&log), model, "final state");
    // Garbage collection and compaction keep the log bounded by the live data: beyond
    // `max_segments`, only segments at least half live remain.
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let live: u64 = model.len() as u64 * (600 + 200);
    let bound = (3 + 2) * 2048 + 2 * live;
    assert!(
        on_disk <= bound,
        "{on_disk} bytes on disk for {} live messages (bound {bound})",
        model.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn replay_matches_the_model(ops in proptest::collection::vec(op(), 1..120)) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run(ops));
    }
}

#[tokio::test]
async fn garbage_truncated_and_foreign_files_never_panic_and_keep_what_is_before() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = DiskLog::open(config(dir.path())).unwrap();
        for i in 0..5 {
            let m = std::sync::Arc::new(v1::Message {
                id: format!("m{i}"),
                payload: vec![0u8; 10].into(),
                ..Default::default()
            });
            log.append_next("q", &m, &["a".to_owned()]).await.unwrap();
        }
        log.flush().await.unwrap();
    }
    // A torn tail: garbage appended to the newest segment that holds data.
    let mut segments: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    segments.sort();
    let last = segments.last().unwrap().clone();
    let mut bytes = std::fs::read(&last).unwrap();
    let good_len = bytes.len();
    bytes.extend_from_slice(&[0x42, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&last, &bytes).unwrap();
    // A foreign file in the directory.
    std::fs::write(dir.path().join("notes.txt"), b"not a segment").unwrap();
    let log = DiskLog::open(config(dir.path())).unwrap();
    let ids: Vec<String> = log.recover().into_iter().map(|r| r.message.id).collect();
    assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4"]);
    let stats = log.stats();
    assert_eq!(
        stats
            .dropped_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        7
    );
    assert_eq!(
        std::fs::metadata(&last).unwrap().len() as usize,
        good_len,
        "torn tail truncated"
    );
    drop(log);

    // A flipped bit in the middle of a record of a segment without an index (one that was never
    // sealed): replay stops there, keeping the records before it. (With an index, only the message
    // whose record is damaged is lost: see tests/index.rs.)
    std::fs::remove_file(last.with_extension("index")).unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&last, &bytes).unwrap();
    let log = DiskLog::open(config(dir.path())).unwrap();
    let ids: Vec<String> = log.recover().into_iter().map(|r| r.message.id).collect();
    assert!(
        ids.len() < 5 && ids.iter().enumerate().all(|(i, id)| *id == format!("m{i}")),
        "{ids:?}"
    );
    assert!(
        log.stats()
            .dropped_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}
