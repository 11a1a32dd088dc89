//! A sidecar restarting on a data directory: what replay costs in memory and time, and that the
//! backlog comes back whole.

#![allow(clippy::unwrap_used)]

use std::{path::Path, sync::Arc};

use qmesh_proto::v1;
use qmesh_sidecar::store::{DiskLog, FsyncPolicy, Outcome, StoreConfig};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_streams_records_instead_of_reading_whole_segments() {
    let data = tempfile::tempdir().unwrap();
    {
        // One message still owed at the head keeps the segments; behind it 130 MiB of settled
        // 1 MiB messages: two full 64 MiB segments and a bit.
        let log = DiskLog::open(config(&data.path().join("log"))).unwrap();
        log.append("jobs", 1, &message("owed", 10), &["work".to_owned()])
            .await
            .unwrap();
        let big = message("big", 1024 * 1024);
        for seq in 2..=131 {
            log.append("jobs", seq, &big, &["work".to_owned()])
                .await
                .unwrap();
            log.settle("jobs", "work", seq, Outcome::Acked);
        }
        log.flush().await.unwrap();
    }
    let mut sidecar = qmesh_tests::MeshBuilder::new()
        .manifests(
            "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: jobs}\nspec: {}\n---\n\
             apiVersion: qmesh.io/v1alpha1\nkind: Subscription\nmetadata: {name: work}\n\
             spec: {queue: jobs, consumers: {matchLabels: {app: worker}}}",
        )
        .sidecar("owner", &[("app", "owner")])
        .data_dir("owner", data.path())
        .start(Path::new(env!("CARGO_BIN_EXE_qmesh-sidecar")))
        .await
        .unwrap();
    let peak = sidecar.sidecar_mut("owner").peak_rss_bytes().unwrap();
    assert!(
        peak < 48 * 1024 * 1024,
        "replaying 64 MiB segments peaked at {} MiB",
        peak / (1024 * 1024)
    );
}
