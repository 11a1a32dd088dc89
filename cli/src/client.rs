//! `qmesh pub` and `qmesh sub`: talk to a sidecar's gRPC app API (address from `--addr` or
//! `$QMESH_GRPC_ADDR`, as `qmesh run` and injected pods set it).

use std::{collections::HashMap, io::Read, time::Duration};

use anyhow::Context;
use clap::Args;
use qmesh_proto::v1::{
    self, Ack, Nack, Open, PublishRequest, SubscribeRequest, broker_client::BrokerClient,
    subscribe_request, subscribe_response,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

/// The broker refused a request (exit code 3).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// `qmesh pub`.
#[derive(Args, Debug)]
pub struct PubArgs {
    /// Queue to publish to.
    pub queue: String,
    /// Payload; `-` reads standard input. Empty when omitted.
    pub data: Option<String>,
    /// Message header `name=value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Ordering key.
    #[arg(long)]
    pub key: Option<String>,
    /// Message id (for de-duplication); with --count, `-N` is appended.
    #[arg(long)]
    pub id: Option<String>,
    /// Publish this many copies.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Sidecar gRPC address.
    #[arg(long, env = "QMESH_GRPC_ADDR", default_value = "127.0.0.1:7071")]
    pub addr: String,
}

/// `qmesh sub`.
#[derive(Args, Debug)]
pub struct SubArgs {
    /// Subscription to consume.
    pub subscription: String,
    /// Stop after this many messages (0 = run until interrupted).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Nack instead of ack (the messages are redelivered, then dead-lettered).
    #[arg(long)]
    pub nack: bool,
    /// Print each message as one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Most unacknowledged messages at once.
    #[arg(long, default_value_t = 32)]
    pub max_in_flight: u32,
    /// Sidecar gRPC address.
    #[arg(long, env = "QMESH_GRPC_ADDR", default_value = "127.0.0.1:7071")]
    pub addr: String,
}

/// Connects to a sidecar's app API, explaining what to do when nothing answers.
pub async fn connect(addr: &str) -> anyhow::Result<BrokerClient<tonic::transport::Channel>> {
    let url = if addr.starts_with("http") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint =
        tonic::transport::Endpoint::from_shared(url)?.connect_timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.with_context(|| {
        format!("no sidecar at {addr} — is `qmesh run` or the pod's sidecar up? (set --addr or QMESH_GRPC_ADDR)")
    })?;
    Ok(BrokerClient::new(channel))
}

/// A broker refusal, for exit code 3.
pub fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(Refused(format!(
        "{:?}: {}",
        status.code(),
        status.message()
    )))
}

/// `qmesh pub`.
pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let payload = match args.data.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
        Some(text) => text.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let mut headers = HashMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("header {h:?} is not NAME=VALUE"))?;
        headers.insert(k.to_owned(), v.to_owned());
    }
    let mut client = connect(&args.addr).await?;
    let bar = crate::progress::bar(args.count, "published");
    if args.count < 2 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for i in 0..args.count {
        let id = match (&args.id, args.count) {
            (Some(id), 1) => id.clone(),
            (Some(id), _) => format!("{id}-{i}"),
            (None, _) => String::new(),
        };
        let message = v1::Message {
            id,
            payload: payload.clone().into(),
            headers: headers.clone(),
            key: args.key.clone().unwrap_or_default(),
            publish_time: None,
        };
        let request = PublishRequest {
            queue: args.queue.clone(),
            message: Some(message),
            correlation: i,
        };
        let ok = client.publish(request).await.map_err(refused)?.into_inner();
        bar.suspend(|| {
            println!(
                "published {} (sequence {}{})",
                ok.id,
                ok.sequence,
                if ok.duplicate { ", duplicate" } else { "" }
            )
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// `qmesh sub`.
pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription: args.subscription.clone(),
            max_in_flight: args.max_in_flight,
            manual_credit: false,
        })),
    })
    .await?;
    let mut inbound = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(refused)?
        .into_inner();
    let mut seen = 0u64;
    while let Some(response) = inbound.next().await {
        let response = response.map_err(refused)?;
        let Some(subscribe_response::Response::Deliveries(batch)) = response.response else {
            continue;
        };
        for d in batch.deliveries {
            let m = d.message.clone().unwrap_or_default();
            if args.json {
                let line = serde_json::json!({
                    "id": m.id, "key": m.key, "attempt": d.attempt, "headers": m.headers,
                    "payload": String::from_utf8_lossy(&m.payload),
                });
                println!("{line}");
            } else {
                println!(
                    "{} attempt={} key={:?} {}",
                    m.id,
                    d.attempt,
                    m.key,
                    String::from_utf8_lossy(&m.payload)
                );
            }
            let request = if args.nack {
                subscribe_request::Request::Nack(Nack {
                    receipts: vec![d.receipt],
                    delay: None,
                    reason: "nacked by qmesh sub".into(),
                })
            } else {
                subscribe_request::Request::Ack(Ack {
                    receipts: vec![d.receipt],
                })
            };
            tx.send(SubscribeRequest {
                request: Some(request),
            })
            .await?;
            seen += 1;
            if args.count > 0 && seen >= args.count {
                // Half-close and let the sidecar take the last acks before the stream goes away
                // (un-acked deliveries of a closed stream are redelivered).
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while inbound.next().await.is_some() {}
                })
                .await;
                return Ok(());
            }
        }
    }
    Ok(())
}
