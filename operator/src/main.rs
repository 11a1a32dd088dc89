//! `qmesh-operator` — reconciles Queue and Subscription resources, serves the control plane to
//! sidecars and the admission webhooks to the API server (see docs/operator.md).
//!
//! ```text
//!   flags/env ──▶ Args ──▶ qmesh_operator::run(config, client, shutdown)   (controllers, control plane,
//!                      └──▶ webhook::serve(...)                              lease, metrics)
//!   SIGTERM / SIGINT ──▶ shutdown (CancellationToken) ──▶ both stop; the Lease is released
//! ```

use anyhow::Context as _;
use clap::Parser;
use qmesh_operator::{Args, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));

    let operator = qmesh_operator::run(args.config(), client.clone(), shutdown.clone());

    // Every replica serves the admission webhooks.
    let stop = shutdown.clone();
    let webhook = qmesh_operator::webhook::serve(args.webhook(), client.clone(), async move {
        stop.cancelled().await
    });
    let (operator, webhook) = tokio::join!(operator, webhook);
    webhook.context("admission webhooks")?;
    operator?;
    Ok(())
}
