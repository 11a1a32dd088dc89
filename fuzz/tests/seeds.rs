//! Writes the seed corpus, `fuzz/corpus/<target>/`, from real encodings: records made by
//! `record::encode`, segments and a dedup journal written by a real `DiskLog`, protobuf frames made
//! by prost, the example manifests, example HTTP bodies. Regenerate with
//!
//! ```text
//! cd fuzz && CARGO_TARGET_DIR=/root/.cache/qmesh/fuzz-target cargo test --test seeds -- --ignored
//! ```
//!
//! (file names are content hashes, like libFuzzer's, so regenerating gives the same files; stale
//! ones are removed first).

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prost::Message as _;
use qmesh_fuzz::log_replay::Input;
use qmesh_proto::{peer, v1};
use qmesh_sidecar::{
    owner::log::Outcome,
    store::{
        DiskLog, FsyncPolicy, StoreConfig,
        record::{self, Body},
    },
};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn fresh(target: &str) -> PathBuf {
    let dir = corpus(target);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `bytes` as `<dir>/<name>-<crc32c>`: readable and stable names.
fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let hash = crc32c::crc32c(bytes);
    std::fs::write(dir.join(format!("{name}-{hash:08x}")), bytes).unwrap();
}

fn message(id: &str, payload: &[u8]) -> v1::Message {
    v1::Message {
        id: id.into(),
        payload: payload.to_vec().into(),
        headers: [("kind".to_owned(), "parcel".to_owned())].into(),
        key: "customer-7".into(),
        publish_time: Some(prost_types::Timestamp {
            seconds: 1_780_000_000,
            nanos: 5_000,
        }),
    }
}

fn bodies() -> Vec<(&'static str, Body)> {
    vec![
        (
            "message",
            Body::Message {
                queue: "orders".into(),
                message: message("order-1", b"{\"total\": 12}"),
                pending: vec!["billing".into(), "shipping".into()],
            },
        ),
        (
            "settle",
            Body::Settle {
                queue: "orders".into(),
                subscription: "billing".into(),
                target: 1,
                outcome: 0,
            },
        ),
        (
            "attempt",
            Body::Attempt {
                queue: "orders".into(),
                subscription: "shipping".into(),
                target: 1,
                attempts: 3,
            },
        ),
        (
            "relocated",
            Body::Relocated {
                queue: "orders".into(),
                message: message("order-2", b"x"),
                pending: vec![("shipping".into(), 2)],
                target: 9,
            },
        ),
        ("floor", Body::Floor { next: 7 }),
        (
            "spill",
            Body::Spill {
                queue: "orders".into(),
                from: 4,
                segment: 1,
                offset: 300,
            },
        ),
        (
            "paged-in",
            Body::PagedIn {
                queue: "orders".into(),
                through: 5,
                segment: 1,
                offset: 600,
            },
        ),
        (
            "spill-end",
            Body::SpillEnd {
                queue: "orders".into(),
            },
        ),
        (
            "remember",
            Body::Remember {
                queue: "orders".into(),
                id: "order-1".into(),
                target: 1,
                until_ms: 4_102_444_800_000,
            },
        ),
    ]
}

fn log_record() {
    let dir = fresh("log_record");
    let mut all = Vec::new();
    for (i, (name, body)) in bodies().into_iter().enumerate() {
        let mut one = Vec::new();
        record::encode(i as u64 + 1, &body, &mut one);
        put(&dir, name, &one);
        all.extend_from_slice(&one);
    }
    put(&dir, "all-kinds", &all);
    // A torn tail: the last record cut short.
    put(&dir, "torn", &all[..all.len() - 5]);
}

/// A log directory written by a real `DiskLog`: appends, settlements, attempts, remembered ids;
/// with `segment_bytes` small, several segments.
fn real_log(dir: &Path, segment_bytes: u64) {
    let mut config = StoreConfig::new(dir);
    config.fsync = FsyncPolicy::Never;
    config.segment_bytes = segment_bytes;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = DiskLog::open(config).unwrap();
        let subs = vec!["billing".to_owned(), "shipping".to_owned()];
        let mut seqs = Vec::new();
        for i in 0..6 {
            let m = Arc::new(message(&format!("order-{i}"), &[b'a' + i as u8; 40]));
            let (seq, _) = log.append_next("orders", &m, &subs).await.unwrap();
            log.remember(
                "orders",
                &m.id,
                seq,
                SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800),
            );
            seqs.push(seq);
        }
        log.settle("orders", "billing", seqs[0], Outcome::Acked);
        log.settle("orders", "shipping", seqs[0], Outcome::Acked);
        log.settle("orders", "billing", seqs[1], Outcome::DeadLettered);
        log.attempted("orders", "shipping", seqs[2], 2);
        // The newest messages spilled, then two of them read back: replay follows both.
        let m = Arc::new(message("order-6", b"spilled"));
        let at = log.append("orders", 7, &m, &subs).await.unwrap();
        log.spill("orders", 8, at.end());
        for seq in 8..10 {
            let m = Arc::new(message(&format!("order-{seq}"), b"spilled"));
            log.append("orders", seq, &m, &subs).await.unwrap();
        }
        log.flush().await.unwrap();
        let page = log.read_spilled("orders", at.end(), 7, u64::MAX, 1 << 20).unwrap();
        log.paged_in("orders", 8, page.messages[0].at.end());
        log.flush().await.unwrap();
    });
}

fn file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_default()
}

fn log_replay() {
    let out = fresh("log_replay");

    let one = tempfile::tempdir().unwrap();
    real_log(one.path(), 64 * 1024 * 1024);
    let segment = file(one.path(), "00000000000000000001.log");
    let ids = file(one.path(), "00000000000000000001.ids");
    assert!(!segment.is_empty() && !ids.is_empty());
    put(
        &out,
        "one-segment",
        &Input {
            segment1: segment.clone(),
            ..Input::default()
        }
        .to_bytes(),
    );
    put(
        &out,
        "segment-and-ids",
        &Input {
            segment1: segment.clone(),
            ids: Some(ids.clone()),
            ..Input::default()
        }
        .to_bytes(),
    );
    put(
        &out,
        "torn-segment",
        &Input {
            segment1: segment[..segment.len() - 3].to_vec(),
            ids: Some(ids[..ids.len() - 3].to_vec()),
            ..Input::default()
        }
        .to_bytes(),
    );

    let two = tempfile::tempdir().unwrap();
    real_log(two.path(), 300);
    let seg1 = file(two.path(), "00000000000000000001.log");
    let seg2 = file(two.path(), "00000000000000000002.log");
    assert!(!seg1.is_empty() && !seg2.is_empty());
    put(
        &out,
        "two-segments",
        &Input {
            segment1: seg1.clone(),
            segment2: Some(seg2.clone()),
            ids: Some(file(two.path(), "00000000000000000001.ids")),
            ..Input::default()
        }
        .to_bytes(),
    );
    put(
        &out,
        "two-segments-gap",
        &Input {
            segment1: seg1,
            segment2: Some(seg2),
            gap: true,
            ..Input::default()
        }
        .to_bytes(),
    );
    // A raw segment on its own (shorter inputs than the header are one segment too).
    put(&out, "raw-segment", &segment);
}

fn duration(secs: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs,
        nanos,
    })
}

fn peer_frames() {
    use peer::{consumer_frame, owner_frame, replicate_frame};
    let out = fresh("peer_frames");
    let id = || peer::SidecarId {
        namespace: "default".into(),
        name: "checkout-0".into(),
        incarnation: 42,
    };
    let reference = peer::DeliveryRef {
        subscription: "billing".into(),
        sequence: 3,
        attempt: 1,
    };
    let owned = peer::OwnedMessage {
        queue: "orders".into(),
        sequence: 3,
        message: Some(message("order-3", b"payload")),
        pending: vec![peer::PendingSubscription {
            subscription: "billing".into(),
            attempts: 1,
        }],
    };
    let frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "owner-hello",
            peer::OwnerFrame {
                frame: Some(owner_frame::Frame::Hello(peer::Hello {
                    owner: Some(id()),
                    protocol_revision: 2,
                })),
            }
            .encode_to_vec(),
        ),
        (
            "owner-deliveries",
            peer::OwnerFrame {
                frame: Some(owner_frame::Frame::Deliveries(peer::DeliveryBatch {
                    deliveries: vec![peer::PeerDelivery {
                        subscription: "billing".into(),
                        queue: "orders".into(),
                        sequence: 3,
                        attempt: 1,
                        message: Some(message("order-3", b"payload")),
                        ack_timeout: duration(30, 0),
                    }],
                })),
            }
            .encode_to_vec(),
        ),
        (
            "owner-withdraw",
            peer::OwnerFrame {
                frame: Some(owner_frame::Frame::Withdraw(peer::Withdraw {
                    deliveries: vec![reference.clone()],
                })),
            }
            .encode_to_vec(),
        ),
        (
            "consumer-settlements",
            peer::ConsumerFrame {
                frame: Some(consumer_frame::Frame::Settlements(peer::Settlements {
                    acks: vec![reference.clone()],
                    nacks: vec![peer::PeerNack {
                        delivery: Some(reference.clone()),
                        delay: duration(5, 500_000_000),
                        reason: "busy".into(),
                        undelivered: false,
                        dead_letter: false,
                    }],
                })),
            }
            .encode_to_vec(),
        ),
        (
            "consumer-credit",
            peer::ConsumerFrame {
                frame: Some(consumer_frame::Frame::Credit(peer::CreditGrant {
                    subscription: "billing".into(),
                    credits: 64,
                })),
            }
            .encode_to_vec(),
        ),
        (
            "replicate-messages",
            peer::ReplicateFrame {
                frame: Some(replicate_frame::Frame::Messages(peer::ReplicaBatch {
                    messages: vec![owned.clone()],
                })),
            }
            .encode_to_vec(),
        ),
        (
            "replicate-settled",
            peer::ReplicateFrame {
                frame: Some(replicate_frame::Frame::Settled(peer::SettledRange {
                    below: 3,
                    sequences: vec![5, 8],
                })),
            }
            .encode_to_vec(),
        ),
        (
            "hand-over",
            peer::HandOverBatch {
                from: Some(id()),
                batch: 1,
                messages: vec![owned],
            }
            .encode_to_vec(),
        ),
    ];
    for (name, bytes) in frames {
        put(&out, name, &bytes);
    }
}

const SIDECARS: &str = r#"---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: checkout-0, labels: {app: checkout}}
spec: {peerAddress: "127.0.0.1:7070", grpcAddress: "127.0.0.1:7071", httpAddress: "127.0.0.1:7072"}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: billing-0, labels: {app: billing}}
spec: {peerAddress: "127.0.0.1:7080", grpcAddress: "127.0.0.1:7081", httpAddress: "127.0.0.1:7082"}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: shipping-0, labels: {app: shipping}}
spec: {peerAddress: "127.0.0.1:7090", grpcAddress: "127.0.0.1:7091", httpAddress: "127.0.0.1:7092"}
"#;

fn manifests() {
    let out = fresh("manifests");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        put(&out, &stem, text.as_bytes());
        // The same resources with local sidecars: the whole mesh-file path, views included.
        let with = format!("{}\n{SIDECARS}", text.trim_end());
        qmesh_core::MeshFile::parse(&with).unwrap();
        put(&out, &format!("{stem}-with-sidecars"), with.as_bytes());
    }
}

fn http_bodies() {
    let out = fresh("http_bodies");
    let seeds: &[(&str, &str)] = &[
        ("ack", r#"{"receipts": ["17", "18"]}"#),
        (
            "nack",
            r#"{"receipts": ["17"], "delay": "1h30m", "reason": "downstream busy"}"#,
        ),
        ("nack-ms", r#"{"receipts":["1"],"delay":"250ms"}"#),
        ("redrive", r#"{"to": "orders", "max": 10}"#),
        ("redrive-empty", " \n"),
        ("poll-query", "max=10&wait=5s"),
        ("held-query", "max=100"),
        ("duration", "1h30m45s500ms"),
        ("size", "1.5Gi"),
        ("fsync", "interval:5ms"),
        (
            "publish-headers",
            "qmesh-id: order-1\nqmesh-key: customer-7\nqmesh-h-kind: parcel\nce-type: com.example.order\ncontent-type: application/json\n",
        ),
    ];
    for (name, text) in seeds {
        put(&out, name, text.as_bytes());
    }
}

fn amqp_frames() {
    use amq_protocol::{
        frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame},
        protocol::{AMQPClass, BasicProperties, basic, channel, confirm, connection, queue},
        types::{AMQPValue, FieldTable},
    };
    let encode = |frames: &[AMQPFrame]| -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out = gen_frame(f)(WriteContext::from(out)).unwrap().into_inner().0;
        }
        out
    };
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    headers.insert("retries".into(), AMQPValue::LongInt(3));
    headers.insert("urgent".into(), AMQPValue::Boolean(true));
    let properties = BasicProperties::default()
        .with_message_id("order-1".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    let publish = vec![
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: "orders".into(),
                mandatory: true,
                immediate: false,
            })),
        ),
        AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 11,
                properties,
            },
        ),
        AMQPFrame::Body(1, b"{\"id\": 42}".to_vec()),
    ];
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-qmesh-subscription".into(),
        AMQPValue::LongString("billing".into()),
    );
    let session = vec![
        AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))),
        AMQPFrame::Method(
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false })),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "orders".into(),
                durable: true,
                ..Default::default()
            })),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 1,
                global: false,
            })),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "orders".into(),
                consumer_tag: "c1".into(),
                arguments,
                ..Default::default()
            })),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 1,
                multiple: true,
                requeue: false,
            })),
        ),
        AMQPFrame::Heartbeat,
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        ),
    ];
    let out = fresh("amqp_frames");
    put(&out, "publish", &encode(&publish));
    put(&out, "session", &encode(&session));
    let mut both = encode(&session);
    both.extend(encode(&publish));
    put(&out, "session-then-publish", &both);
}

#[test]
#[ignore = "writes fuzz/corpus; run with --ignored to regenerate the seeds"]
fn write_seeds() {
    log_record();
    log_replay();
    peer_frames();
    manifests();
    http_bodies();
    amqp_frames();
}
