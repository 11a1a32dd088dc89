//! The admin port: `/healthz` (the process serves), `/readyz` (has a view and is not draining),
//! `/metrics` (Prometheus), `/v1/stats` (JSON figures for tools), `POST /drain` (graceful stop, for a
//! preStop hook).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};

use crate::Sidecar;

/// The admin router.
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .route("/drain", post(drain))
        .with_state(sidecar)
}

async fn readyz(State(sidecar): State<Arc<Sidecar>>) -> impl IntoResponse {
    if sidecar.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(sidecar): State<Arc<Sidecar>>) -> impl IntoResponse {
    sidecar.refresh_gauges();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        sidecar.metrics.encode(),
    )
}

async fn stats(State(sidecar): State<Arc<Sidecar>>) -> impl IntoResponse {
    Json(sidecar.stats_json())
}

async fn drain(State(sidecar): State<Arc<Sidecar>>) -> impl IntoResponse {
    sidecar.begin_shutdown();
    (StatusCode::ACCEPTED, "draining")
}
