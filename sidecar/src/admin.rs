//! The admin port: `/healthz` (the process serves), `/readyz` (has a view and is not draining),
//! `/metrics` (Prometheus) — for the kubelet and scrapers, from anywhere — and, from loopback only
//! (the pod itself: `qmesh-sidecar drain` in the preStop hook, tools beside the app), `/v1/stats`
//! (JSON figures, naming queues and subscriptions) and `POST /drain` (graceful stop).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};

use crate::Sidecar;

/// The admin router; serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    let local = Router::new()
        .route("/v1/stats", get(stats))
        .route("/drain", post(drain))
        .route_layer(middleware::from_fn(loopback_only));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(local)
        .with_state(sidecar)
}

/// Refuses a request that did not come from this host's loopback.
async fn loopback_only(request: Request, next: Next) -> Response {
    let from = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    match from {
        Some(peer) if peer.ip().is_loopback() => next.run(request).await,
        _ => {
            let from = from.map_or_else(|| "an unknown address".to_owned(), |p| p.ip().to_string());
            tracing::warn!(%from, path = %request.uri().path(), "refused an admin request from off the pod");
            (
                StatusCode::FORBIDDEN,
                format!(
                    "{} is served to loopback only (the pod itself), not to {from}",
                    request.uri().path()
                ),
            )
                .into_response()
        }
    }
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
