//! `http_bodies`: what the sidecar's HTTP API (`sidecar/src/api/http.rs`) parses out of a request.
//! Its parsing helpers and body types are private, so this mirrors them field for field (keep them
//! in sync) around the public pieces they call:
//!
//! * ack/nack bodies `{"receipts", "delay", "reason"}` (`Settle`, parsed with `serde_json` whatever
//!   the content type), `delay` through [`config::parse_duration`] → [`convert::duration`] (the
//!   consumer's `PeerNack`) → [`convert::std_duration`] → `min(MAX_NACK_DELAY)` → [`queue::later`]
//!   (the owner);
//! * redrive bodies `{"to", "max"}` (empty or whitespace = defaults);
//! * rewind bodies `{"to": "<RFC 3339>"}`, the time through the wire's `Timestamp` and back to the
//!   owner's unix milliseconds, and printed again;
//! * poll and held query strings (`max=N&wait=5s`, `serde_urlencoded` as axum's `Query` uses), `wait`
//!   through `parse_duration` capped at 60 s;
//! * the raw input as a duration, a size and an fsync policy, with the duration's `Display` read
//!   back;
//! * publish: there is no JSON body (the payload is raw bytes), so the input is read as header lines
//!   `name: value` into an [`http::HeaderMap`] and the `qmesh-id` / `qmesh-key` / `qmesh-h-*` /
//!   `ce-*` headers are turned into a message the way `publish` does; that message is then framed as
//!   a log record and must decode back unchanged.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use qmesh_proto::{convert, v1};
use qmesh_sidecar::{
    config,
    owner::{queue, retain},
    store::{FsyncPolicy, record},
};
use serde::Deserialize;

/// `http::MAX_WAIT`.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// `http::MAX_BATCH`.
const MAX_BATCH: usize = 1000;

/// `http::Settle`.
#[derive(Deserialize, Debug)]
#[allow(dead_code)]
struct Settle {
    receipts: Vec<String>,
    delay: Option<String>,
    reason: Option<String>,
}

/// `http::Redrive`.
#[derive(Deserialize, Default, Debug)]
#[allow(dead_code)]
struct Redrive {
    #[serde(default)]
    to: String,
    #[serde(default)]
    max: usize,
}

/// `http::Rewind`.
#[derive(Deserialize, Debug)]
struct Rewind {
    to: String,
}

/// `http::PollQuery`.
#[derive(Deserialize, Debug)]
struct PollQuery {
    max: Option<usize>,
    wait: Option<String>,
}

/// `http::HeldQuery`.
#[derive(Deserialize, Debug)]
struct HeldQuery {
    max: Option<usize>,
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    settle(data);
    redrive(data);
    rewind(data);
    queries(data);
    if let Ok(text) = std::str::from_utf8(data) {
        scalars(text);
    }
    publish_headers(data);
}

fn settle(body: &[u8]) {
    let Ok(settle) = serde_json::from_slice::<Settle>(body) else {
        return;
    };
    let Some(delay) = settle.delay.as_deref() else {
        return;
    };
    let Ok(delay) = config::parse_duration(delay) else {
        return;
    };
    // Consumer side: the nack's delay goes to the owner as a protobuf duration …
    let wire = convert::duration(delay);
    // … which the owner reads back, clamped, and schedules the redelivery with.
    let back = convert::std_duration(&wire);
    assert_eq!(
        back,
        delay.min(convert::MAX_WIRE_DURATION),
        "a nack delay changed on its way over the wire ({wire:?})"
    );
    let now = Instant::now();
    let _ = queue::later(now, back.min(queue::MAX_NACK_DELAY));
}

fn redrive(body: &[u8]) {
    let _: Option<Redrive> = if body.iter().all(u8::is_ascii_whitespace) {
        Some(Redrive::default())
    } else {
        serde_json::from_slice(body).ok()
    };
}

fn rewind(body: &[u8]) {
    let Ok(rewind) = serde_json::from_slice::<Rewind>(body) else {
        return;
    };
    let Ok(to) = qmesh_api::StartAt::parse_time(&rewind.to) else {
        return;
    };
    // The sidecar sends the time to every owner as a protobuf timestamp …
    let wire: prost_types::Timestamp = to.into();
    let back = std::time::SystemTime::try_from(wire).expect("a parsed time crosses the wire");
    assert_eq!(back, to, "a rewind time changed on its way over the wire");
    // … which the owner compares with publish times in unix milliseconds.
    let _ = retain::unix_ms(back);
    let _ = qmesh_api::StartAt::Time(back).to_string();
}

fn queries(query: &[u8]) {
    if let Ok(q) = serde_urlencoded::from_bytes::<PollQuery>(query) {
        let _max = q.max.unwrap_or(1).clamp(1, MAX_BATCH);
        let _wait = match q.wait.as_deref() {
            None | Some("") => Some(Duration::ZERO),
            Some(w) => config::parse_duration(w).ok().map(|d| d.min(MAX_WAIT)),
        };
    }
    if let Ok(q) = serde_urlencoded::from_bytes::<HeldQuery>(query) {
        let _max = q.max.unwrap_or(100).clamp(1, MAX_BATCH);
    }
}

fn scalars(text: &str) {
    if let Ok(d) = config::parse_duration(text) {
        // What the CLI and the status print must read back as the same duration.
        let shown = qmesh_api::Duration(d).to_string();
        match config::parse_duration(&shown) {
            Ok(again) => assert_eq!(again, d, "{text:?} shows as {shown:?}"),
            Err(e) => panic!("{text:?} shows as {shown:?}, which does not parse: {e}"),
        }
    }
    let _ = qmesh_api::ByteSize::new(text).bytes();
    let _ = text.parse::<FsyncPolicy>();
}

/// The message `publish` builds from the request headers (and an empty body).
fn publish_headers(data: &[u8]) {
    let mut headers = http::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let text = |name: &str| -> Result<String, ()> {
        headers
            .get(name)
            .map(|v| v.to_str().map(str::to_owned).map_err(|_| ()))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let mut message_headers = HashMap::new();
    for (name, value) in &headers {
        if let Some(h) = name.as_str().strip_prefix("qmesh-h-") {
            let Ok(value) = value.to_str() else {
                return;
            };
            message_headers.insert(h.to_owned(), value.to_owned());
        }
    }
    for (name, value) in &headers {
        if let Some(attr) = name.as_str().strip_prefix("ce-")
            && let Ok(value) = value.to_str()
        {
            message_headers.insert(format!("ce-{attr}"), value.to_owned());
        }
    }
    let (Ok(id), Ok(key)) = (text("qmesh-id"), text("qmesh-key")) else {
        return;
    };
    let message = v1::Message {
        id,
        payload: bytes_of(data),
        headers: message_headers,
        key,
        publish_time: Some(std::time::SystemTime::now().into()),
    };
    // The owner persists it as a log record: it must come back as it went in.
    let pending = ["billing".to_owned()];
    let mut buf = Vec::new();
    record::encode_message(7, "orders", &message, &pending, &mut buf);
    match record::decode(&buf) {
        Ok((
            7,
            record::Body::Message {
                queue,
                message: m,
                pending: p,
            },
            used,
        )) => {
            assert_eq!(used, buf.len());
            assert_eq!(queue, "orders");
            assert_eq!(m, message, "a published message changed in the log");
            assert_eq!(p, pending);
        }
        other => panic!("a published message's record does not decode: {other:?}"),
    }
}

fn bytes_of(data: &[u8]) -> prost::bytes::Bytes {
    prost::bytes::Bytes::copy_from_slice(data)
}
