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
    // Colours only on a terminal: `kubectl logs` and log collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
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

    // Either half ending on its own (a webhook that cannot bind or serve, an operator error) stops
    // the other and the process exits non-zero: a replica never stays up, and Ready, with half of
    // its work gone. The operator still releases its Lease on the way out.
    let operator = {
        let shutdown = shutdown.clone();
        let run = qmesh_operator::run(args.config(), client.clone(), shutdown.clone());
        async move {
            let result = run.await.context("operator");
            ended_early(&shutdown, result, "operator")
        }
    };
    // Every replica serves the admission webhooks.
    let webhook = {
        let shutdown = shutdown.clone();
        let stop = shutdown.clone();
        let serve = qmesh_operator::webhook::serve(args.webhook(), client.clone(), async move {
            stop.cancelled().await
        });
        async move {
            let result = serve.await.context("admission webhooks");
            ended_early(&shutdown, result, "admission webhooks")
        }
    };
    let (operator, webhook) = tokio::join!(operator, webhook);
    webhook?;
    operator?;
    Ok(())
}

/// What one half of the replica ended with, cancelling `shutdown` so the other half stops too; an
/// end that nobody asked for is an error even when the half itself saw none.
fn ended_early(
    shutdown: &CancellationToken,
    result: anyhow::Result<()>,
    what: &str,
) -> anyhow::Result<()> {
    let asked = shutdown.is_cancelled();
    shutdown.cancel();
    match result {
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "{what} failed; stopping this replica"
            );
            Err(error)
        }
        Ok(()) if !asked => anyhow::bail!("{what} stopped without being asked to"),
        Ok(()) => Ok(()),
    }
}
