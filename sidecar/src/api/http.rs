//! The HTTP/JSON mirror of the app API, for curl and any language:
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/queues/{queue}/messages` (raw body; `qmesh-id`, `qmesh-key`, `qmesh-h-<name>` headers; `qmesh-delay: 30s` or `qmesh-deliver-at: <RFC 3339>` for a delayed message) | `201 {"id", "sequence", "duplicate"}` |
//! | `GET /v1/subscriptions/{sub}/messages?max=N&wait=5s` | `200 {"messages": [{"id", "payload" (base64), "headers", "key", "attempt", "receipt", "publishTime"}]}` |
//! | `POST /v1/subscriptions/{sub}/ack` `{"receipts": [...]}` | `200 {"settled": n, "unknown": [...]}` |
//! | `POST /v1/subscriptions/{sub}/nack` `{"receipts": [...], "delay": "5s", "reason": "...", "deadLetter": false}` | same |
//! | `GET /v1/queues/{queue}/held?max=N` (dead letters, parked messages) | `200 {"messages": [{"id", "sequence", "payload" (base64), "headers", "key", "subscriptions": [{"subscription", "attempts", "state", "lastError"}]}], "total"}` |
//! | `POST /v1/queues/{queue}/redrive` `{"to": "...", "max": N}` (body optional) | `200 {"republished", "unparked", "skipped", "failed": [{"id", "error"}]}` |
//! | `POST /v1/queues/{queue}/purge` `{"max": N}` (body optional) | `200 {"purged", "skipped", "remaining"}` |
//! | `POST /v1/subscriptions/{sub}/rewind` `{"to": "2026-12-01T09:30:00Z"}` | `200 {"asked", "replaying", "unreachable": [...]}` |
//! | `POST /v1/transactions` | `201 {"transaction"}`; then publish with the header `qmesh-transaction: <id>` |
//! | `POST /v1/transactions/{id}/commit` (or `/rollback`) | `200 {"transaction", "state", "messages"}`; 404 unknown, 409 settled the other way |
//!
//! Errors are `{"error": {"code", "message"}}` with 404 / 403 / 409 / 413 / 429 (+ `Retry-After`) /
//! 400 / 503 / 507 / 500, the same codes as gRPC.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine;
use qmesh_proto::v1;
use serde::{Deserialize, Serialize};

use crate::{
    Sidecar,
    consumer::HTTP_HOLDER,
    error::BrokerError,
    owner::{Schedule, transactions::Decision},
};

/// Longest long-poll wait accepted.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Most messages one poll returns.
const MAX_BATCH: usize = 1000;

/// Largest body of the requests other than a publish (acks and nacks of a large window fit).
const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;

/// The HTTP router. A publish's body is read up to its queue's `maxMessageBytes` (and never more
/// than `max_body`), any other body up to 4 MiB; beyond, 413 before the body is read whole.
pub fn router(sidecar: Arc<Sidecar>, max_body: usize) -> Router {
    Router::new()
        .route(
            "/v1/queues/{queue}/messages",
            post(
                move |state: State<Arc<Sidecar>>,
                      queue: Path<String>,
                      headers: HeaderMap,
                      body: axum::body::Body| {
                    publish(state, queue, headers, body, max_body)
                },
            ),
        )
        .route("/v1/subscriptions/{subscription}/messages", get(poll))
        .route("/v1/subscriptions/{subscription}/ack", post(ack))
        .route("/v1/subscriptions/{subscription}/nack", post(nack))
        .route("/v1/queues/{queue}/held", get(held))
        .route("/v1/queues/{queue}/redrive", post(redrive))
        .route("/v1/queues/{queue}/purge", post(purge))
        .route("/v1/subscriptions/{subscription}/rewind", post(rewind))
        .route("/v1/transactions", post(begin_transaction))
        .route(
            "/v1/transactions/{transaction}/commit",
            post(commit_transaction),
        )
        .route(
            "/v1/transactions/{transaction}/rollback",
            post(rollback_transaction),
        )
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY.min(max_body)))
        .with_state(sidecar)
}

struct ApiError(BrokerError);

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body =
            serde_json::json!({"error": {"code": self.0.label(), "message": self.0.to_string()}});
        let mut response = (status, Json(body)).into_response();
        if let Some(wait) = self.0.retry_after() {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

#[derive(Serialize)]
struct Published {
    id: String,
    sequence: u64,
    duplicate: bool,
}

async fn publish(
    State(sidecar): State<Arc<Sidecar>>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
    max_body: usize,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    // Read no more than the queue takes: a body over its maxMessageBytes is refused as it arrives.
    let limit = sidecar
        .view
        .borrow()
        .queue(&queue)
        .and_then(|q| q.policy.as_ref())
        .map(|p| p.max_message_bytes)
        .filter(|&limit| limit > 0);
    let read_limit = limit.map_or(max_body, |l| {
        usize::try_from(l).unwrap_or(usize::MAX).min(max_body)
    });
    let body = axum::body::to_bytes(body, read_limit).await.map_err(|_| {
        let size = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(read_limit.saturating_add(1));
        BrokerError::TooLarge {
            queue: queue.clone(),
            size,
            limit: limit.unwrap_or(max_body as u64),
        }
    })?;
    let text = |name: &str| -> Result<String, BrokerError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| BrokerError::Invalid(format!("header {name} is not valid text")))
            })
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let mut message_headers = HashMap::new();
    for (name, value) in &headers {
        if let Some(h) = name.as_str().strip_prefix("qmesh-h-") {
            let value = value
                .to_str()
                .map_err(|_| BrokerError::Invalid(format!("header {name} is not valid text")))?;
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
    let message = v1::Message {
        id: text("qmesh-id")?,
        payload: body,
        headers: message_headers,
        key: text("qmesh-key")?,
        publish_time: None,
    };
    let schedule = match (
        headers.get("qmesh-delay").is_some(),
        headers.get("qmesh-deliver-at").is_some(),
    ) {
        (true, true) => {
            return Err(BrokerError::Invalid(
                "give qmesh-delay or qmesh-deliver-at, not both".into(),
            )
            .into());
        }
        (true, false) => {
            let text = text("qmesh-delay")?;
            let delay = crate::config::parse_duration(&text)
                .map_err(|e| BrokerError::Invalid(format!("header qmesh-delay: {text:?}: {e}")))?;
            if delay.is_zero() {
                Schedule::Now
            } else {
                Schedule::After(delay, "qmesh-delay")
            }
        }
        (false, true) => {
            let text = text("qmesh-deliver-at")?;
            let at = qmesh_api::StartAt::parse_time(&text).map_err(|e| {
                BrokerError::Invalid(format!(
                    "header qmesh-deliver-at: {text:?} is not an RFC 3339 time: {e}"
                ))
            })?;
            Schedule::At(at, "qmesh-deliver-at")
        }
        (false, false) => Schedule::Now,
    };
    let transaction = text("qmesh-transaction")?;
    let ok = sidecar
        .publish_scheduled(&queue, message, schedule, &transaction)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Published {
            id: ok.id,
            sequence: ok.sequence,
            duplicate: ok.duplicate,
        }),
    ))
}

#[derive(Deserialize)]
struct PollQuery {
    max: Option<usize>,
    wait: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PolledMessage {
    id: String,
    payload: String,
    headers: HashMap<String, String>,
    key: String,
    attempt: u32,
    receipt: String,
    publish_time: Option<String>,
}

async fn poll(
    State(sidecar): State<Arc<Sidecar>>,
    Path(subscription): Path<String>,
    Query(query): Query<PollQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sub = sidecar.consumers.subscription(&subscription)?;
    let max = query.max.unwrap_or(1).clamp(1, MAX_BATCH);
    let wait = match query.wait.as_deref() {
        None | Some("") => Duration::ZERO,
        Some(w) => crate::config::parse_duration(w)
            .map_err(|e| BrokerError::Invalid(format!("wait: {e}")))?
            .min(MAX_WAIT),
    };
    sidecar.consumers.polled(&sub);
    let deliveries = sidecar.consumers.take(&sub, max, wait, HTTP_HOLDER).await;
    let engine = base64::engine::general_purpose::STANDARD;
    let messages: Vec<PolledMessage> = deliveries
        .into_iter()
        .map(|d| {
            let m = d.message.unwrap_or_default();
            PolledMessage {
                id: m.id,
                payload: engine.encode(&m.payload),
                headers: m.headers,
                key: m.key,
                attempt: d.attempt,
                receipt: d.receipt,
                publish_time: m.publish_time.map(|t| t.to_string()),
            }
        })
        .collect();
    Ok(Json(serde_json::json!({ "messages": messages })))
}

#[derive(Deserialize)]
struct Settle {
    receipts: Vec<String>,
    delay: Option<String>,
    reason: Option<String>,
    /// Nack only: give up now (dead-letter without further attempts).
    #[serde(default, rename = "deadLetter")]
    dead_letter: bool,
}

async fn ack(
    State(sidecar): State<Arc<Sidecar>>,
    Path(subscription): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    settle(sidecar, subscription, parse_settle(&body)?, false).await
}

async fn nack(
    State(sidecar): State<Arc<Sidecar>>,
    Path(subscription): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    settle(sidecar, subscription, parse_settle(&body)?, true).await
}

/// Parses an ack/nack body whatever its content type (curl's default is form-encoded).
fn parse_settle(body: &[u8]) -> Result<Settle, BrokerError> {
    serde_json::from_slice(body).map_err(|e| {
        BrokerError::Invalid(format!(
            "body must be JSON like {{\"receipts\": [\"...\"], \"delay\": \"5s\", \"reason\": \"...\"}}: {e}"
        ))
    })
}

async fn settle(
    sidecar: Arc<Sidecar>,
    subscription: String,
    body: Settle,
    is_nack: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sub = sidecar.consumers.subscription(&subscription)?;
    if body.receipts.is_empty() {
        return Err(BrokerError::Invalid("receipts must not be empty".into()).into());
    }
    let nack = if is_nack {
        let delay = body
            .delay
            .as_deref()
            .map(crate::config::parse_duration)
            .transpose()
            .map_err(|e| BrokerError::Invalid(format!("delay: {e}")))?;
        Some(crate::consumer::Nack {
            delay,
            reason: body.reason.unwrap_or_else(|| "nacked by consumer".into()),
            dead_letter: body.dead_letter,
        })
    } else {
        None
    };
    let unknown = sidecar.consumers.settle(&sub, &body.receipts, nack).await;
    Ok(Json(serde_json::json!({
        "settled": body.receipts.len() - unknown.len(),
        "unknown": unknown,
    })))
}

#[derive(Deserialize)]
struct HeldQuery {
    max: Option<usize>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HeldFor {
    subscription: String,
    attempts: u32,
    state: String,
    last_error: String,
}

#[derive(Serialize)]
struct HeldMessage {
    id: String,
    sequence: u64,
    payload: String,
    headers: HashMap<String, String>,
    key: String,
    subscriptions: Vec<HeldFor>,
}

async fn held(
    State(sidecar): State<Arc<Sidecar>>,
    Path(queue): Path<String>,
    Query(query): Query<HeldQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let max = query.max.unwrap_or(100).clamp(1, MAX_BATCH);
    let browsed = sidecar.owner.browse(&queue, max)?;
    let engine = base64::engine::general_purpose::STANDARD;
    let messages: Vec<HeldMessage> = browsed
        .messages
        .into_iter()
        .map(|h| {
            let m = h.message.unwrap_or_default();
            HeldMessage {
                id: m.id,
                sequence: h.sequence,
                payload: engine.encode(&m.payload),
                headers: m.headers,
                key: m.key,
                subscriptions: h
                    .subscriptions
                    .into_iter()
                    .map(|s| HeldFor {
                        subscription: s.subscription,
                        attempts: s.attempts,
                        state: s.state,
                        last_error: s.last_error,
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "messages": messages, "total": browsed.total }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Purge {
    #[serde(default)]
    max: usize,
}

async fn purge(
    State(sidecar): State<Arc<Sidecar>>,
    Path(queue): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: Purge = if body.iter().all(u8::is_ascii_whitespace) {
        Purge::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            BrokerError::Invalid(format!(
                "body must be empty or JSON like {{\"max\": 10}}: {e}"
            ))
        })?
    };
    let done = sidecar.owner.purge(&queue, body.max)?;
    Ok(Json(serde_json::json!({
        "purged": done.purged,
        "skipped": done.skipped,
        "remaining": done.remaining,
    })))
}

#[derive(Deserialize, Default)]
struct Redrive {
    #[serde(default)]
    to: String,
    #[serde(default)]
    max: usize,
}

async fn redrive(
    State(sidecar): State<Arc<Sidecar>>,
    Path(queue): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: Redrive = if body.iter().all(u8::is_ascii_whitespace) {
        Redrive::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            BrokerError::Invalid(format!(
                "body must be empty or JSON like {{\"to\": \"queue\", \"max\": 10}}: {e}"
            ))
        })?
    };
    let done = sidecar.owner.redrive(&queue, &body.to, body.max).await?;
    let failed: Vec<serde_json::Value> = done
        .failed
        .iter()
        .map(|f| {
            let e = f.error.clone().unwrap_or_default();
            serde_json::json!({"id": f.id, "error": {"code": crate::error::label(e.code()), "message": e.message}})
        })
        .collect();
    Ok(Json(serde_json::json!({
        "republished": done.republished,
        "unparked": done.unparked,
        "skipped": done.skipped,
        "failed": failed,
    })))
}

#[derive(Deserialize)]
struct Rewind {
    to: String,
}

async fn rewind(
    State(sidecar): State<Arc<Sidecar>>,
    Path(subscription): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: Rewind = serde_json::from_slice(&body).map_err(|e| {
        BrokerError::Invalid(format!(
            "body must be JSON like {{\"to\": \"2026-12-01T09:30:00Z\"}}: {e}"
        ))
    })?;
    let to = qmesh_api::StartAt::parse_time(&body.to)
        .map_err(|e| BrokerError::Invalid(e.to_string()))?;
    let done = sidecar.rewind(&subscription, to).await?;
    Ok(Json(serde_json::json!({
        "asked": done.asked,
        "replaying": done.replaying,
        "unreachable": done.unreachable,
    })))
}

async fn begin_transaction(
    State(sidecar): State<Arc<Sidecar>>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let opened = sidecar.owner.begin_transaction()?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"transaction": opened.transaction})),
    ))
}

async fn commit_transaction(
    state: State<Arc<Sidecar>>,
    Path(transaction): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    settle_transaction(state, &transaction, Decision::Commit).await
}

async fn rollback_transaction(
    state: State<Arc<Sidecar>>,
    Path(transaction): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    settle_transaction(state, &transaction, Decision::Rollback).await
}

async fn settle_transaction(
    State(sidecar): State<Arc<Sidecar>>,
    transaction: &str,
    decision: Decision,
) -> Result<Json<serde_json::Value>, ApiError> {
    let settled = sidecar
        .owner
        .settle_transaction(transaction, decision)
        .await?;
    Ok(Json(serde_json::json!({
        "transaction": settled.transaction,
        "state": settled.state,
        "messages": settled.messages,
    })))
}
