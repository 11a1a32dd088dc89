//! `qmesh dlq peek` and `qmesh dlq redrive`: the dead letters a sidecar holds, with why they died,
//! and sending them back (`qmesh.v1.Broker/Browse` and `/Redrive`). Dead letters live at the
//! sidecar that owned the original message — the publisher's — so point `--addr` there.

use clap::{Args, Subcommand};
use qmesh_proto::v1::{BrowseRequest, HeldMessage, RedriveRequest};

use crate::{
    client::{connect, refused},
    table::Table,
};

/// `qmesh dlq`.
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
    /// Sidecar gRPC address (the sidecar that owned the messages, i.e. the publisher's).
    #[arg(
        long,
        global = true,
        env = "QMESH_GRPC_ADDR",
        default_value = "127.0.0.1:7071"
    )]
    addr: String,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters held for QUEUE (a dead-letter queue, or a queue whose subscriptions parked
    /// messages), with the reason, origin, delivery count and last error of each.
    Peek {
        /// The dead-letter queue (or a queue with parked messages).
        queue: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 20)]
        count: u32,
        /// One JSON object per message instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send the dead letters of QUEUE back to their original queue (or to --to); parked messages
    /// are redelivered with a fresh delivery count.
    Redrive {
        /// The dead-letter queue (or a queue with parked messages).
        queue: String,
        /// Publish them here instead of their original queue.
        #[arg(long)]
        to: Option<String>,
        /// Handle at most this many (0 = all).
        #[arg(long, default_value_t = 0)]
        count: u32,
    },
}

/// Runs `qmesh dlq …`.
pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    match args.command {
        DlqCommand::Peek { queue, count, json } => {
            let response = client
                .browse(BrowseRequest {
                    queue: queue.clone(),
                    max: count.max(1),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                for held in &response.messages {
                    println!("{}", to_json(held));
                }
                return Ok(());
            }
            if response.messages.is_empty() {
                println!("no messages held for queue {queue} at {}", args.addr);
                return Ok(());
            }
            print!("{}", peek_table(&response.messages));
            if response.total > response.messages.len() as u64 {
                println!(
                    "... {} of {} shown (--count)",
                    response.messages.len(),
                    response.total
                );
            }
        }
        DlqCommand::Redrive { queue, to, count } => {
            let response = client
                .redrive(RedriveRequest {
                    queue: queue.clone(),
                    to: to.clone().unwrap_or_default(),
                    max: count,
                })
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "redrive of {queue}: {} republished{}, {} parked redelivered, {} skipped (held by a consumer now), {} failed",
                response.republished,
                to.map(|t| format!(" to {t}")).unwrap_or_default(),
                response.unparked,
                response.skipped,
                response.failed.len()
            );
            for f in &response.failed {
                let message = f.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
                println!("  {}: {message}", f.id);
            }
            if !response.failed.is_empty() {
                anyhow::bail!(
                    "{} dead letters could not be redriven; they are still held",
                    response.failed.len()
                );
            }
        }
    }
    Ok(())
}

fn header<'a>(held: &'a HeldMessage, name: &str) -> &'a str {
    held.message
        .as_ref()
        .and_then(|m| m.headers.get(name))
        .map(String::as_str)
        .unwrap_or("")
}

/// Why a held message is held: its dead-letter reason, or the state of the parked subscription.
pub(crate) fn reason(held: &HeldMessage) -> String {
    let r = header(held, "qmesh-dead-letter-reason");
    if !r.is_empty() {
        return r.to_owned();
    }
    held.subscriptions
        .iter()
        .map(|s| format!("{}: {}", s.subscription, s.state))
        .collect::<Vec<_>>()
        .join(", ")
}

fn peek_table(messages: &[HeldMessage]) -> Table {
    let mut table = Table::new(&[
        "ID",
        "ORIGINAL-ID",
        "FROM",
        "DELIVERIES",
        "REASON",
        "LAST-ERROR",
        "PAYLOAD",
    ]);
    for held in messages {
        let message = held.message.clone().unwrap_or_default();
        let from = match (
            header(held, "qmesh-original-queue"),
            header(held, "qmesh-original-subscription"),
        ) {
            ("", _) => "-".to_owned(),
            (q, "") => q.to_owned(),
            (q, s) => format!("{q}/{s}"),
        };
        let deliveries = match header(held, "qmesh-delivery-count") {
            "" => held
                .subscriptions
                .iter()
                .map(|s| s.attempts)
                .max()
                .unwrap_or(0)
                .to_string(),
            n => n.to_owned(),
        };
        let last_error = match header(held, "qmesh-last-error") {
            "" => held
                .subscriptions
                .iter()
                .map(|s| s.last_error.as_str())
                .find(|e| !e.is_empty())
                .unwrap_or("-")
                .to_owned(),
            e => e.to_owned(),
        };
        let mut payload: String = String::from_utf8_lossy(&message.payload)
            .chars()
            .take(40)
            .collect();
        if message.payload.len() > 40 {
            payload.push('…');
        }
        table.row(vec![
            message.id.clone(),
            match header(held, "qmesh-original-id") {
                "" => "-".to_owned(),
                id => id.to_owned(),
            },
            from,
            deliveries,
            reason(held),
            last_error,
            payload,
        ]);
    }
    table
}

fn to_json(held: &HeldMessage) -> serde_json::Value {
    let message = held.message.clone().unwrap_or_default();
    serde_json::json!({
        "id": message.id,
        "sequence": held.sequence,
        "key": message.key,
        "headers": message.headers,
        "payload": String::from_utf8_lossy(&message.payload),
        "reason": reason(held),
        "subscriptions": held.subscriptions.iter().map(|s| serde_json::json!({
            "subscription": s.subscription,
            "attempts": s.attempts,
            "state": s.state,
            "last_error": s.last_error,
        })).collect::<Vec<_>>(),
    })
}
