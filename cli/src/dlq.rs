//! `qmesh dlq peek|redrive|purge`: the dead letters (and parked messages) held for a queue, with
//! why they died, sending them back, or deleting them. Dead letters live at whichever sidecar owned
//! the original message, so by default every sidecar is asked through a control plane
//! (`Control/HeldMessages`: `qmesh dev`'s, or with `--kubeconfig` the operator's, as the user);
//! `--addr` asks one sidecar's app API instead (`qmesh.v1.Broker/Browse`, `/Redrive`, `/Purge`).
//!
//! ```text
//!   qmesh dlq peek Q ──HeldMessages{browse}──▶ control plane ──Join──▶ every sidecar that may own Q
//!                    ◀── one answer per sidecar (SIDECAR column; unreachable ones on stderr)
//! ```

use std::io::{BufRead, IsTerminal, Write};

use clap::{Args, Subcommand};
use qmesh_proto::{
    control::{
        HeldRequest, MeshHeldRequest, held_request::Call, held_response::Result as HeldResult,
    },
    v1::{BrowseRequest, HeldMessage, PurgeRequest, RedriveRequest},
};

use crate::{
    client::{Refused, connect, refused},
    control_plane::ControlPlaneArgs,
    table::Table,
};

/// `qmesh dlq`.
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

/// Where the held messages are asked for.
#[derive(Args, Debug)]
struct Where {
    /// Ask only this sidecar's app API (gRPC address) instead of every sidecar through the control
    /// plane.
    #[arg(long, env = "QMESH_GRPC_ADDR")]
    addr: Option<String>,
    /// The queue's namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    control: ControlPlaneArgs,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters held for QUEUE (a dead-letter queue, or a queue whose subscriptions parked
    /// messages), with the reason, origin, delivery count and last error of each.
    Peek {
        /// The dead-letter queue (or a queue with parked messages).
        queue: String,
        /// Show at most this many (from each sidecar).
        #[arg(long, default_value_t = 20)]
        count: u32,
        /// One JSON object per message instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Send the dead letters of QUEUE back to their original queue (or to --to); parked messages
    /// are redelivered with a fresh delivery count.
    Redrive {
        /// The dead-letter queue (or a queue with parked messages).
        queue: String,
        /// Publish them here instead of their original queue.
        #[arg(long)]
        to: Option<String>,
        /// Handle at most this many at each sidecar (0 = all).
        #[arg(long, default_value_t = 0)]
        count: u32,
        #[command(flatten)]
        at: Where,
    },
    /// Delete the messages held for QUEUE — all that no consumer holds now. Cannot be undone: asks
    /// for the queue's name to confirm, unless --yes.
    Purge {
        /// The dead-letter queue (or any queue: its ready messages go too).
        queue: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        at: Where,
    },
}

/// Each asked sidecar's answer (or why there is none), by sidecar.
type Answers = Vec<(String, Result<HeldResult, String>)>;

/// Asks the sidecar at `--addr`, or every sidecar through the control plane.
async fn ask(at: &Where, call: Call) -> anyhow::Result<Answers> {
    if let Some(addr) = &at.addr {
        let mut client = connect(addr).await?;
        let result = match call {
            Call::Browse(r) => {
                HeldResult::Browse(client.browse(r).await.map_err(refused)?.into_inner())
            }
            Call::Redrive(r) => {
                HeldResult::Redrive(client.redrive(r).await.map_err(refused)?.into_inner())
            }
            Call::Purge(r) => {
                HeldResult::Purge(client.purge(r).await.map_err(refused)?.into_inner())
            }
        };
        return Ok(vec![(addr.clone(), Ok(result))]);
    }
    let control = at.control.connect().await?;
    let answered = control
        .held(MeshHeldRequest {
            namespace: at.namespace.clone(),
            request: Some(HeldRequest { call: Some(call) }),
        })
        .await
        .map_err(refused)?;
    Ok(answered
        .sidecars
        .into_iter()
        .map(|s| {
            let result = match s.response.and_then(|r| r.result) {
                Some(HeldResult::Error(e)) => Err(e.message),
                Some(result) => Ok(result),
                None => Err("no answer".to_owned()),
            };
            (s.sidecar, result)
        })
        .collect())
}

/// Says on stderr which sidecars could not answer; an error when none could.
fn report_unanswered(answers: &Answers, what: &str) -> anyhow::Result<()> {
    let mut failed = 0;
    for (sidecar, result) in answers {
        if let Err(why) = result {
            failed += 1;
            eprintln!("qmesh: sidecar {sidecar} did not {what}: {why}");
        }
    }
    if failed > 0 && failed == answers.len() {
        anyhow::bail!("no sidecar could {what}");
    }
    Ok(())
}

/// Runs `qmesh dlq …`.
pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::Peek {
            queue,
            count,
            json,
            at,
        } => {
            let call = Call::Browse(BrowseRequest {
                queue: queue.clone(),
                max: count.max(1),
            });
            let answers = ask(&at, call).await?;
            report_unanswered(&answers, "answer")?;
            let (mut held, mut total) = (Vec::new(), 0u64);
            for (sidecar, result) in &answers {
                if let Ok(HeldResult::Browse(b)) = result {
                    total += b.total;
                    held.extend(b.messages.iter().map(|m| (sidecar.as_str(), m)));
                }
            }
            if json {
                for (sidecar, message) in &held {
                    println!("{}", to_json(sidecar, message));
                }
                return Ok(());
            }
            if held.is_empty() {
                println!("no messages held for queue {queue}");
                return Ok(());
            }
            print!("{}", peek_table(&held));
            if total > held.len() as u64 {
                println!("... {} of {total} shown (--count)", held.len());
            }
        }
        DlqCommand::Redrive {
            queue,
            to,
            count,
            at,
        } => {
            let call = Call::Redrive(RedriveRequest {
                queue: queue.clone(),
                to: to.clone().unwrap_or_default(),
                max: count,
            });
            let answers = ask(&at, call).await?;
            report_unanswered(&answers, "redrive")?;
            let (mut republished, mut unparked, mut skipped) = (0, 0, 0);
            let mut failed = Vec::new();
            for (sidecar, result) in &answers {
                if let Ok(HeldResult::Redrive(r)) = result {
                    republished += r.republished;
                    unparked += r.unparked;
                    skipped += r.skipped;
                    failed.extend(r.failed.iter().map(|f| (sidecar.as_str(), f)));
                }
            }
            println!(
                "redrive of {queue}: {republished} republished{}, {unparked} parked redelivered, {skipped} skipped (held by a consumer now), {} failed",
                to.map(|t| format!(" to {t}")).unwrap_or_default(),
                failed.len()
            );
            for (sidecar, f) in &failed {
                let message = f.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
                println!("  {}: {message} (at {sidecar})", f.id);
            }
            if !failed.is_empty() {
                anyhow::bail!(
                    "{} dead letters could not be redriven; they are still held",
                    failed.len()
                );
            }
        }
        DlqCommand::Purge { queue, yes, at } => {
            if !yes {
                confirm_purge(&queue, &at.namespace)?;
            }
            let (mut purged, mut skipped, mut remaining) = (0u64, 0u64, 0u64);
            // A backlog larger than memory is read back from disk after each pass: purge again
            // while a pass still deletes something.
            for _ in 0..PURGE_PASSES {
                let call = Call::Purge(PurgeRequest {
                    queue: queue.clone(),
                    max: 0,
                });
                let answers = ask(&at, call).await?;
                report_unanswered(&answers, "purge")?;
                let (mut pass, mut held) = (0u64, 0u64);
                skipped = 0;
                for (_, result) in &answers {
                    if let Ok(HeldResult::Purge(p)) = result {
                        pass += u64::from(p.purged);
                        skipped += u64::from(p.skipped);
                        held += p.remaining;
                    }
                }
                purged += pass;
                remaining = held;
                if pass == 0 || held <= skipped {
                    break;
                }
            }
            println!(
                "purge of {queue}: {purged} deleted, {skipped} left alone (held by a consumer now), {remaining} still held"
            );
        }
    }
    Ok(())
}

/// Most purge passes one `qmesh dlq purge` makes.
const PURGE_PASSES: usize = 100;

/// Asks the user to type the queue's name; refuses without a terminal (use --yes there).
fn confirm_purge(queue: &str, namespace: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "a purge cannot be undone: confirm it by running in a terminal, or pass --yes"
        );
    }
    eprint!(
        "Purge deletes every message held for queue {namespace}/{queue} that no consumer holds \
         now, at every sidecar. It cannot be undone.\nType the queue's name to confirm: "
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != queue {
        return Err(Refused(format!(
            "not confirmed ({:?} is not {queue:?}); nothing was purged",
            answer.trim()
        ))
        .into());
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

fn peek_table(messages: &[(&str, &HeldMessage)]) -> Table {
    let mut table = Table::new(&[
        "SIDECAR",
        "ID",
        "ORIGINAL-ID",
        "FROM",
        "DELIVERIES",
        "REASON",
        "LAST-ERROR",
        "PAYLOAD",
    ]);
    for &(sidecar, held) in messages {
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
            sidecar.to_owned(),
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

fn to_json(sidecar: &str, held: &HeldMessage) -> serde_json::Value {
    let message = held.message.clone().unwrap_or_default();
    serde_json::json!({
        "sidecar": sidecar,
        "id": message.id,
        "sequence": held.sequence,
        "key": message.key,
        "headers": message.headers,
        "payload": String::from_utf8_lossy(&message.payload),
        "payload_bytes": held.payload_bytes.max(message.payload.len() as u64),
        "reason": reason(held),
        "subscriptions": held.subscriptions.iter().map(|s| serde_json::json!({
            "subscription": s.subscription,
            "attempts": s.attempts,
            "state": s.state,
            "last_error": s.last_error,
        })).collect::<Vec<_>>(),
    })
}
