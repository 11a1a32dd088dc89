//! `manifests`: arbitrary UTF-8 as a multi-document mesh file.
//!
//! * Each document on its own is deserialized as a [`Queue`], a [`Subscription`] and a
//!   [`SidecarDocument`], and every Queue and Subscription that deserializes is validated
//!   ([`Validate::validate`], and `validate_update` against itself and the previous one of its kind),
//!   so the validation rules see resources even when the file as a whole is refused.
//! * The whole text goes through [`MeshFile::parse`]; when it parses, the path a sidecar run from a
//!   mesh file takes (`view::view_from_mesh_file`) follows: `to_state`, `view_for` every sidecar
//!   document, [`convert::mesh_view`], [`View::new`], plus what the owner derives from a view (rate
//!   limiters, backoff delays).

use std::time::{Instant, SystemTime};

use qmesh_api::{Queue, SidecarDocument, Subscription, Validate};
use qmesh_core::{MeshFile, SidecarKey};
use qmesh_proto::{control, convert};
use qmesh_sidecar::{
    owner::{self, queue},
    view::View,
};
use serde::Deserialize;

/// Most documents looked at one by one (the whole file is still parsed).
const MAX_DOCUMENTS: usize = 64;

/// One fuzz input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    documents(text);
    mesh_file(text);
}

fn documents(text: &str) {
    let mut last_queue: Option<Queue> = None;
    let mut last_sub: Option<Subscription> = None;
    for doc in serde_yaml::Deserializer::from_str(text).take(MAX_DOCUMENTS) {
        let Ok(value) = serde_yaml::Value::deserialize(doc) else {
            // A YAML error ends the stream.
            return;
        };
        if let Ok(q) = serde_yaml::from_value::<Queue>(value.clone()) {
            if q.validate().is_ok() {
                let _ = convert::queue_policy(&q.spec);
            }
            let _ = q.validate_update(&q);
            if let Some(old) = &last_queue {
                let _ = q.validate_update(old);
                let _ = old.validate_update(&q);
            }
            let _ = q.spec.max_message_bytes.bytes();
            last_queue = Some(q);
        }
        if let Ok(s) = serde_yaml::from_value::<Subscription>(value.clone()) {
            let _ = s.validate();
            let _ = s.validate_update(&s);
            if let Some(old) = &last_sub {
                let _ = s.validate_update(old);
                let _ = old.validate_update(&s);
            }
            last_sub = Some(s);
        }
        let _ = serde_yaml::from_value::<SidecarDocument>(value);
    }
}

fn mesh_file(text: &str) {
    let Ok(file) = MeshFile::parse(text) else {
        return;
    };
    // What parsed was validated: validating again must agree.
    for q in &file.queues {
        assert!(q.validate().is_ok(), "a parsed Queue fails validate()");
        let _ = convert::queue_policy(&q.spec);
    }
    for s in &file.subscriptions {
        assert!(
            s.validate().is_ok(),
            "a parsed Subscription fails validate()"
        );
    }
    let state = file.to_state();
    for d in &file.sidecars {
        let namespace = d.metadata.namespace.as_deref().unwrap_or("default");
        let key = SidecarKey::new(namespace, d.metadata.name.clone());
        let Some(view) = state.view_for(&key) else {
            continue;
        };
        let wire = convert::mesh_view(&view, 1, SystemTime::now());
        derived(&wire);
        let _ = View::new(wire);
    }
}

/// What the owner computes from a view: a rate limiter per limit, redelivery backoffs per route.
fn derived(view: &control::MeshView) {
    for q in &view.queues {
        if let Some(limit) = q
            .policy
            .as_ref()
            .and_then(|p| p.publish_rate_limit.as_ref())
        {
            let _ = owner::rate_limiter(limit);
        }
        for route in &q.routes {
            let Some(retry) = &route.retry else {
                continue;
            };
            let backoff = qmesh_api::Backoff {
                initial: qmesh_api::Duration(
                    retry
                        .initial_backoff
                        .as_ref()
                        .map(convert::std_duration)
                        .unwrap_or(std::time::Duration::from_secs(1)),
                ),
                max: qmesh_api::Duration(
                    retry
                        .max_backoff
                        .as_ref()
                        .map(convert::std_duration)
                        .unwrap_or(std::time::Duration::from_secs(60)),
                ),
                multiplier: retry.multiplier.max(1),
            };
            let now = Instant::now();
            for attempts in [1, 2, 7, 64, u32::MAX] {
                for unit in [0.0, 0.5, 0.999_999] {
                    let wait = qmesh_core::backoff::jittered_delay(&backoff, attempts, unit);
                    let _ = queue::later(now, wait);
                }
            }
        }
    }
    for s in &view.subscriptions {
        if let Some(limit) = &s.rate_share {
            let _ = owner::rate_limiter(limit);
        }
    }
}
