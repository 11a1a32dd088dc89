//! `qmesh-sidecar` — the broker injected beside each app pod (see `qmesh_sidecar` for the parts).

use std::sync::Arc;

use clap::Parser;
use qmesh_sidecar::{
    config::{Cli, Command, LogFormat},
    store::{DiskLog, StoreConfig},
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.run.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: `kubectl logs` and log collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.run.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if matches!(cli.command, None | Some(Command::Run)) {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            pid = std::process::id(),
            "qmesh sidecar starting"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        match cli.command {
            Some(Command::Drain { admin_addr }) => drain(admin_addr).await,
            Some(Command::WaitReady {
                admin_addr,
                timeout,
            }) => wait_ready(admin_addr, timeout).await,
            Some(Command::Run) | None => {
                let mut config = StoreConfig::new(cli.run.data_dir.join("log"));
                config.fsync = cli.run.fsync;
                config.segment_bytes = cli.run.segment_bytes;
                let disk = DiskLog::open(config).map_err(|e| {
                    anyhow::anyhow!(
                        "opening the message log in {}: {e}",
                        cli.run.data_dir.display()
                    )
                })?;
                qmesh_sidecar::run(cli.run, Arc::new(disk)).await
            }
        }
    });
    // A blocking read still under way does not hold the exit: what it read is in the log anyway.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Waits until a local sidecar's `/readyz` answers 200, asking every 100 ms.
async fn wait_ready(
    admin: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if readyz(admin).await.unwrap_or(false) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the sidecar at {admin} was not ready within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Whether the sidecar's `/readyz` answers 200.
async fn readyz(admin: std::net::SocketAddr) -> std::io::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        stream
            .write_all(
                format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut status = [0u8; 12];
        stream.read_exact(&mut status).await?;
        Ok(&status == b"HTTP/1.1 200")
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), ask)
        .await
        .unwrap_or(Ok(false))
}

/// Asks a local sidecar to drain and waits until its admin port stops answering.
async fn drain(admin: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(format!("POST /drain HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    anyhow::ensure!(
        response.starts_with("HTTP/1.1 202"),
        "drain refused: {response}"
    );
    while tokio::net::TcpStream::connect(admin).await.is_ok() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(())
}
