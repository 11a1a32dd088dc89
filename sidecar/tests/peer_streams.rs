//! Streams per peer connection are bounded (`--max-peer-streams`): a peer holding the limit open
//! gets no further stream on that connection until one ends, while other connections are served as
//! before.

#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use qmesh_proto::peer::{self, peer_client::PeerClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: jobs}
spec: {}
"#;

fn rewind() -> peer::PeerRewind {
    peer::PeerRewind {
        queue: "jobs".into(),
        subscription: "nobody".into(),
        from: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_connection_holds_at_most_the_stream_limit_open() {
    let mesh = mesh()
        .manifests(MESH)
        .sidecar("node", &[("app", "producer")])
        .sidecar("node-2", &[("app", "producer")])
        .arg("--max-peer-streams")
        .arg("4")
        .start(Path::new(SIDECAR))
        .await
        .unwrap();
    let channel = mesh.peer_channel("node-2", "node").await.unwrap();
    // Four hand-over streams that stay open (their request streams never end).
    let mut open = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = mpsc::channel::<peer::HandOverBatch>(1);
        let mut client = PeerClient::new(channel.clone());
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            client.hand_over(ReceiverStream::new(rx)),
        )
        .await
        .expect("a stream within the limit opens")
        .unwrap();
        open.push((tx, stream));
    }
    // A fifth on the same connection waits for one of them to end.
    let mut client = PeerClient::new(channel.clone());
    let fifth = tokio::spawn(async move { client.rewind(rewind()).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !fifth.is_finished(),
        "a fifth stream on the connection must wait"
    );
    // Another connection is served meanwhile.
    let mut other = PeerClient::new(mesh.peer_channel("node-2", "node").await.unwrap());
    let answered = tokio::time::timeout(Duration::from_secs(10), other.rewind(rewind())).await;
    assert!(answered.is_ok(), "another connection is not held up");
    // One stream ends: the fifth goes through.
    drop(open.pop());
    let fifth = tokio::time::timeout(Duration::from_secs(10), fifth).await;
    assert!(fifth.is_ok(), "the waiting stream runs once one ends");
}
