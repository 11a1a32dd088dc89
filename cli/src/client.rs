//! `qmesh pub`, `qmesh sub` and `qmesh sub rewind`: talk to a sidecar's gRPC app API (address from
//! `--addr` or `$QMESH_GRPC_ADDR`, as `qmesh run` and injected pods set it).

use std::{collections::HashMap, io::Read, time::Duration};

use anyhow::Context;
use clap::{Args, Subcommand};
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
    /// Publish this many copies (0 = until interrupted).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Publish at this steady rate, in messages per second (a prober), instead of as fast as the
    /// broker acknowledges.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Deliver no earlier than this long after the publish (a delayed message, e.g. `30s`; at most
    /// the Queue's `maxDelay`).
    #[arg(long, value_parser = crate::parse_duration)]
    pub delay: Option<std::time::Duration>,
    /// Publish every message (all of --count) in one transaction, then commit it or roll it back.
    #[arg(long, value_enum, conflicts_with = "rate")]
    pub transaction: Option<Settle>,
    /// Sidecar gRPC address.
    #[arg(long, env = "QMESH_GRPC_ADDR", default_value = "127.0.0.1:7071")]
    pub addr: String,
}

/// How `qmesh pub --transaction` ends its transaction.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Every message becomes deliverable.
    Commit,
    /// None is ever delivered.
    Rollback,
}

/// A `--rate`: a finite number of messages per second in 0.001..=1,000,000.
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of messages per second"))?;
    if (0.001..=1_000_000.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "{text}: the rate must be between 0.001 and 1000000 messages per second"
        ))
    }
}

/// `qmesh sub`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SubArgs {
    /// What else to do with a subscription.
    #[command(subcommand)]
    pub action: Option<SubAction>,
    /// Subscription to consume.
    #[arg(required = true)]
    pub subscription: Option<String>,
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

/// `qmesh sub <action>`.
#[derive(Subcommand, Debug)]
pub enum SubAction {
    /// Replay a subscription from a time, to reprocess after a consumer bug: every owner of its
    /// queue delivers again what it still keeps that was published since then (like
    /// `kafka-consumer-groups --reset-offsets --to-datetime`).
    Rewind(RewindArgs),
}

/// `qmesh sub rewind`.
#[derive(Args, Debug)]
pub struct RewindArgs {
    /// Subscription to replay (one the sidecar's pod consumes).
    pub subscription: String,
    /// From when: an RFC 3339 time (`2026-12-01T09:30:00Z`) or a duration ago (`15m`, `2h`).
    #[arg(long)]
    pub to: String,
    /// Sidecar gRPC address.
    #[arg(long, env = "QMESH_GRPC_ADDR", default_value = "127.0.0.1:7071")]
    pub addr: String,
}

/// The time `--to` names: an RFC 3339 time, or that long ago.
fn rewind_time(text: &str) -> anyhow::Result<std::time::SystemTime> {
    if let Ok(ago) = text.parse::<qmesh_api::Duration>() {
        return std::time::SystemTime::now()
            .checked_sub(ago.get())
            .context("--to: that is before the clock's epoch");
    }
    qmesh_api::StartAt::parse_time(text)
        .map_err(|e| anyhow::anyhow!("--to: {e}, or a duration ago such as 15m"))
}

/// `qmesh sub rewind`.
pub async fn rewind(args: RewindArgs) -> anyhow::Result<()> {
    let to = rewind_time(&args.to)?;
    let mut client = connect(&args.addr).await?;
    let answer = client
        .rewind(v1::RewindRequest {
            subscription: args.subscription.clone(),
            to: Some(to.into()),
        })
        .await
        .map_err(refused)?
        .into_inner();
    println!(
        "rewind of {}: {} of {} sidecars asked own messages of its queue and replay them",
        args.subscription, answer.replaying, answer.asked
    );
    for missed in &answer.unreachable {
        eprintln!("not reached (replays nothing): {missed}");
    }
    if !answer.unreachable.is_empty() {
        anyhow::bail!(
            "{} sidecars could not be asked; run the rewind again once they are back",
            answer.unreachable.len()
        );
    }
    Ok(())
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
    if args.transaction.is_some() && args.count == 0 {
        anyhow::bail!("--transaction needs a --count: the transaction ends after the last message");
    }
    let transaction = match args.transaction {
        Some(_) => {
            client
                .begin_transaction(v1::BeginTransactionRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .transaction
        }
        None => String::new(),
    };
    let bar = crate::progress::bar(args.count, "published");
    if args.count < 2 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut pace = args.rate.map(|rate| {
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    });
    for i in (0..).take_while(|i| args.count == 0 || *i < args.count) {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
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
            delay: args.delay.map(qmesh_proto::convert::duration),
            deliver_at: None,
            transaction: transaction.clone(),
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
    if let Some(settle) = args.transaction {
        let request = v1::TransactionRequest {
            transaction: transaction.clone(),
        };
        let done = match settle {
            Settle::Commit => client.commit_transaction(request).await,
            Settle::Rollback => client.rollback_transaction(request).await,
        }
        .map_err(refused)?
        .into_inner();
        println!(
            "transaction {transaction} {}: {} messages",
            done.state, done.messages
        );
    }
    Ok(())
}

/// `qmesh sub`.
pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let subscription = match args.action {
        Some(SubAction::Rewind(rewind_args)) => return rewind(rewind_args).await,
        None => args
            .subscription
            .clone()
            .context("name the subscription to consume")?,
    };
    let mut client = connect(&args.addr).await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(Open {
            subscription,
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
                    dead_letter: false,
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

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn a_rate_is_a_finite_positive_number_within_bounds() {
        assert_eq!(parse_rate("20"), Ok(20.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        for bad in ["0", "-1", "NaN", "inf", "1e9", "fast", ""] {
            assert!(parse_rate(bad).is_err(), "{bad} accepted");
        }
    }
}
