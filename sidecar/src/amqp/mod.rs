//! AMQP 0-9-1 on loopback, for apps that already speak RabbitMQ's protocol (pika, kombu, lapin,
//! the Java client): the same publishes, deliveries, acks and credits as the gRPC and HTTP APIs,
//! under a RabbitMQ-shaped surface. Frames are parsed and written by the `amq-protocol` codec; the
//! mapping onto qmesh is here.
//!
//! ```text
//!   app ──TCP 127.0.0.1:5672──▶ reader task (frame-max enforced) ──frames──▶ connection task
//!                                                                            │ basic.publish ──▶ Sidecar::publish (pipelined, in order) ──▶ confirm ack / nack
//!                                                                            │ basic.consume ──▶ consumer task: take(credit = prefetch − unacked) ──▶ basic.deliver
//!                                                                            └ basic.ack / nack / reject ──▶ Consumers::settle (requeue=false ⇒ dead letter now)
//! ```
//! Queues come from Queue resources: `queue.declare` checks the view and never creates one.
//! docs/amqp.md has the whole mapping and what is not supported.

mod connection;
mod frames;
pub mod message;

pub use frames::split_frames;

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Semaphore};

use crate::Sidecar;

/// Limits and timers of the AMQP listener.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Largest frame offered in `connection.tune` (a client may ask for less, never more).
    pub frame_max: u32,
    /// Heartbeat interval offered in `connection.tune` (the client's answer wins; 0 turns it off).
    pub heartbeat: Duration,
    /// Most channels per connection.
    pub channel_max: u16,
    /// Most connections at once; more are closed at once (counted).
    pub max_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            frame_max: 131_072,
            heartbeat: Duration::from_secs(60),
            channel_max: 128,
            max_connections: 256,
        }
    }
}

/// Accepts AMQP connections until the listener fails.
pub async fn serve(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    settings: Settings,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait, the listener itself is fine.
                tracing::warn!(%error, "AMQP listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, limit = settings.max_connections, "AMQP connection refused: too many connections");
            sidecar.metrics.amqp.refused.inc();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sidecar_for_task = Arc::clone(&sidecar);
        sidecar.tasks.spawn("amqp connection", async move {
            let _permit = permit;
            let metrics = Arc::clone(&sidecar_for_task.metrics);
            metrics.amqp.connections.inc();
            connection::run(stream, peer, sidecar_for_task, settings).await;
            metrics.amqp.connections.dec();
        });
    }
}
