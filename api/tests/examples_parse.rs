//! Every manifest in `examples/` parses into the Rust types and passes `validate()`.

#![allow(clippy::unwrap_used)]

use std::{fs, path::Path};

use qmesh_api::{Queue, Subscription, Validate};
use serde::Deserialize;

#[test]
fn example_manifests_parse_and_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let (mut queues, mut subscriptions) = (Vec::new(), Vec::new());
    for entry in fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("valid YAML");
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            match kind.as_str() {
                "Queue" => {
                    let q: Queue = serde_yaml::from_value(value).expect("a Queue");
                    q.validate()
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    queues.push(q);
                }
                "Subscription" => {
                    let s: Subscription = serde_yaml::from_value(value).expect("a Subscription");
                    s.validate()
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    subscriptions.push(s);
                }
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
        }
    }
    assert!(
        queues.len() >= 2 && subscriptions.len() >= 2,
        "examples hold queues and subscriptions"
    );
    // Every subscription and dead-letter reference points at a queue the examples define.
    let names: Vec<String> = queues
        .iter()
        .filter_map(|q| q.metadata.name.clone())
        .collect();
    for s in &subscriptions {
        assert!(
            names.contains(&s.spec.queue),
            "unknown queue {}",
            s.spec.queue
        );
    }
    for q in &queues {
        if let Some(dlq) = &q.spec.dead_letter_queue {
            assert!(names.contains(dlq), "unknown dead-letter queue {dlq}");
        }
    }
    let orders = queues
        .iter()
        .find(|q| q.metadata.name.as_deref() == Some("orders"))
        .unwrap();
    assert_eq!(orders.spec.max_message_bytes.bytes(), Ok(256 * 1024));
}
