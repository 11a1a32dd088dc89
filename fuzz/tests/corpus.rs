//! Replays the checked-in seed corpus (`fuzz/corpus/<target>/`) and the saved crashes
//! (`fuzz/regressions/<target>/`) through the fuzz targets' code on stable Rust, without libFuzzer:
//!
//! ```text
//! cd fuzz && CARGO_TARGET_DIR=/root/.cache/qmesh/fuzz-target cargo test --test corpus
//! ```
//!
//! A regression input fails its test until the project bug it found is fixed.

#![allow(clippy::unwrap_used)]

use std::path::Path;

/// A fuzz target's body.
type Run = fn(&[u8]);

const TARGETS: &[(&str, Run)] = &[
    ("log_record", qmesh_fuzz::log_record::run),
    ("log_replay", qmesh_fuzz::log_replay::run),
    ("peer_frames", qmesh_fuzz::peer_frames::run),
    ("manifests", qmesh_fuzz::manifests::run),
    ("http_bodies", qmesh_fuzz::http_bodies::run),
    ("amqp_frames", qmesh_fuzz::amqp_frames::run),
];

/// Runs every file of `<kind>/<target>/`; returns how many.
fn replay(kind: &str, target: &str, run: Run) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in &paths {
        let data = std::fs::read(path).unwrap();
        eprintln!("{target}: {}", path.display());
        run(&data);
    }
    paths.len()
}

#[test]
fn seed_corpus_passes() {
    for (target, run) in TARGETS {
        let n = replay("corpus", target, *run);
        assert!(
            n > 0,
            "no seeds for {target}: run `cargo test --test seeds -- --ignored`"
        );
    }
}

#[test]
fn saved_regressions_pass() {
    for (target, run) in TARGETS {
        replay("regressions", target, *run);
    }
}
