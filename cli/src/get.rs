//! `qmesh get queues|subscriptions|sidecars`: a `kubectl get`-like table of the mesh's status from a
//! control plane's `Control/Status` — `qmesh dev`'s, or with `--kubeconfig` the operator's (as the
//! user; [`crate::control_plane`]). When the operator cannot be asked (no bearer token, no RBAC to
//! port-forward), the Queue and Subscription status the operator writes is shown instead, without
//! rates.

use anyhow::Context;
use clap::{Args, ValueEnum};
use kube::{Api, Client};
use qmesh_api::{Queue, Subscription};
use qmesh_proto::control::MeshStatus;

use crate::{control_plane::ControlPlaneArgs, table::Table};

/// What to list.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Queues: publishers, subscriptions, backlog, publish rate.
    #[value(alias = "queue", alias = "q")]
    Queues,
    /// Subscriptions: consumers, backlog, in flight, ack rate, dead letters.
    #[value(alias = "subscription", alias = "subs", alias = "sub")]
    Subscriptions,
    /// Sidecars known to the local control plane.
    #[value(alias = "sidecar")]
    Sidecars,
    /// The latest settled transactions: outcome, who decided, check-backs.
    #[value(alias = "transaction", alias = "tx")]
    Transactions,
}

/// Output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// An aligned table.
    Table,
    /// The rows as JSON.
    Json,
}

/// `qmesh get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// What to list.
    pub kind: Kind,
    /// Namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Which control plane to ask.
    #[command(flatten)]
    pub target: ControlPlaneArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Prints the table.
pub async fn run(args: GetArgs) -> anyhow::Result<()> {
    let namespace = if args.all_namespaces {
        String::new()
    } else {
        args.namespace.clone()
    };
    let (status, from_objects) = if args.target.cluster.is_set() {
        let asked = async {
            let operator = args.target.cluster.operator().await?;
            anyhow::Ok(operator.status(&namespace).await?)
        };
        match asked.await {
            Ok(status) => (status, false),
            Err(why) => {
                eprintln!(
                    "qmesh: the operator could not be asked ({why:#}); showing the status written in \
                     the Queue and Subscription objects, without rates"
                );
                let (client, _) = args.target.cluster.client().await?;
                (from_objects(client, &namespace).await?, true)
            }
        }
    } else {
        let control_plane = args.target.connect().await?;
        let status = control_plane
            .status(&namespace)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", args.target.describe(), s.message()))?;
        (status, false)
    };
    let table = render(&status, args.kind, args.all_namespaces, from_objects);
    match args.output {
        Output::Table if table.is_empty() => {
            let place = if args.all_namespaces {
                "any namespace".to_owned()
            } else {
                format!("namespace {}", args.namespace)
            };
            eprintln!("No {:?} found in {place}.", args.kind);
        }
        Output::Table => print!("{table}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&table.to_json())?),
    }
    Ok(())
}

/// The status the operator wrote into the Queue and Subscription objects.
async fn from_objects(client: Client, namespace: &str) -> anyhow::Result<MeshStatus> {
    let (queues, subscriptions): (Api<Queue>, Api<Subscription>) = if namespace.is_empty() {
        (Api::all(client.clone()), Api::all(client))
    } else {
        (
            Api::namespaced(client.clone(), namespace),
            Api::namespaced(client, namespace),
        )
    };
    let params = Default::default();
    let queues = queues
        .list(&params)
        .await
        .context("listing Queues (is the qmesh CRD installed?)")?;
    let subscriptions = subscriptions
        .list(&params)
        .await
        .context("listing Subscriptions")?;
    let mut status = MeshStatus::default();
    for q in queues {
        let s = q.status.clone().unwrap_or_default();
        status.queues.push(qmesh_proto::control::QueueStatus {
            namespace: q.metadata.namespace.clone().unwrap_or_default(),
            name: q.metadata.name.clone().unwrap_or_default(),
            publishers: s.publishers,
            subscriptions: s.subscriptions,
            backlog: s.backlog,
            dead_letter_queue: q.spec.dead_letter_queue.clone().unwrap_or_default(),
            ..Default::default()
        });
    }
    for sub in subscriptions {
        let s = sub.status.clone().unwrap_or_default();
        status
            .subscriptions
            .push(qmesh_proto::control::SubscriptionStatus {
                namespace: sub.metadata.namespace.clone().unwrap_or_default(),
                name: sub.metadata.name.clone().unwrap_or_default(),
                queue: sub.spec.queue.clone(),
                consumers: s.consumers,
                backlog: s.backlog,
                in_flight: s.in_flight,
                dead_lettered_total: s.dead_lettered,
                mode: format!("{:?}", sub.spec.delivery.mode),
                ..Default::default()
            });
    }
    Ok(status)
}

/// An age as `kubectl get` shows one (`45s`, `3m12s`, `2h5m`, `3d4h`); `-` for none.
fn age(age: Option<&prost_types::Duration>) -> String {
    let Some(seconds) = age.map(|d| d.seconds).filter(|s| *s >= 0) else {
        return "-".to_owned();
    };
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// The rows of `kind`; rates and counters are not in the objects' status, so `-` stands for them
/// when `from_objects`.
pub fn render(status: &MeshStatus, kind: Kind, namespaces: bool, from_objects: bool) -> Table {
    let rate = |r: f64| {
        if from_objects {
            "-".to_owned()
        } else {
            format!("{r:.1}")
        }
    };
    let dash = |s: &str| if s.is_empty() { "-" } else { s }.to_owned();
    // Counters of the connected sidecars; the objects' status has none.
    let total = |n: u64| {
        if from_objects {
            "-".to_owned()
        } else {
            n.to_string()
        }
    };
    let (headers, rows): (&[&str], Vec<(&str, Vec<String>)>) = match kind {
        Kind::Queues => (
            &[
                "NAME",
                "PUBLISHERS",
                "SUBSCRIPTIONS",
                "BACKLOG",
                "IN-TRANSACTION",
                "PUBLISHED",
                "PUBLISH/S",
                "OLDEST",
                "DEAD-LETTER-QUEUE",
            ],
            status
                .queues
                .iter()
                .map(|q| {
                    let cells = vec![
                        q.name.clone(),
                        q.publishers.to_string(),
                        q.subscriptions.to_string(),
                        q.backlog.to_string(),
                        total(q.half_messages),
                        total(q.published_total),
                        rate(q.publish_rate),
                        age(q.oldest_age.as_ref()),
                        dash(&q.dead_letter_queue),
                    ];
                    (q.namespace.as_str(), cells)
                })
                .collect(),
        ),
        Kind::Subscriptions => (
            &[
                "NAME",
                "QUEUE",
                "MODE",
                "CONSUMERS",
                "BACKLOG",
                "SCHEDULED",
                "IN-FLIGHT",
                "ACKED",
                "ACKS/S",
                "OLDEST",
                "DEAD-LETTERED",
            ],
            status
                .subscriptions
                .iter()
                .map(|s| {
                    let cells = vec![
                        s.name.clone(),
                        s.queue.clone(),
                        s.mode.clone(),
                        s.consumers.to_string(),
                        s.backlog.to_string(),
                        total(s.scheduled),
                        s.in_flight.to_string(),
                        total(s.acked_total),
                        rate(s.ack_rate),
                        age(s.oldest_age.as_ref()),
                        s.dead_lettered_total.to_string(),
                    ];
                    (s.namespace.as_str(), cells)
                })
                .collect(),
        ),
        Kind::Transactions => (
            &[
                "TRANSACTION",
                "OUTCOME",
                "DECIDED-BY",
                "MESSAGES",
                "CHECKS",
                "QUEUES",
                "SIDECAR",
                "AT",
            ],
            status
                .transactions
                .iter()
                .map(|t| {
                    let cells = vec![
                        t.transaction.clone(),
                        t.outcome.clone(),
                        t.decided_by.clone(),
                        t.messages.to_string(),
                        t.checks.to_string(),
                        dash(&t.queues.join(",")),
                        t.sidecar.clone(),
                        t.at.map_or_else(|| "-".to_owned(), |at| at.to_string()),
                    ];
                    (t.namespace.as_str(), cells)
                })
                .collect(),
        ),
        Kind::Sidecars => (
            &["NAME", "PEER", "CONNECTED", "LABELS"],
            status
                .sidecars
                .iter()
                .map(|s| {
                    let mut labels: Vec<String> =
                        s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    let cells = vec![
                        s.name.clone(),
                        s.peer_address.clone(),
                        s.connected.to_string(),
                        dash(&labels.join(",")),
                    ];
                    (s.namespace.as_str(), cells)
                })
                .collect(),
        ),
    };
    let mut all_headers: Vec<&str> = namespaces.then_some("NAMESPACE").into_iter().collect();
    all_headers.extend(headers);
    let mut table = Table::new(&all_headers);
    for (namespace, cells) in rows {
        let mut row: Vec<String> = namespaces
            .then(|| namespace.to_owned())
            .into_iter()
            .collect();
        row.extend(cells);
        table.row(row);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::age;

    #[test]
    fn ages_read_like_kubectl_get() {
        let of = |seconds| age(Some(&prost_types::Duration { seconds, nanos: 0 }));
        assert_eq!(age(None), "-");
        assert_eq!(of(0), "0s");
        assert_eq!(of(45), "45s");
        assert_eq!(of(192), "3m12s");
        assert_eq!(of(7500), "2h5m");
        assert_eq!(of(3 * 86_400 + 4 * 3600 + 5), "3d4h");
        assert_eq!(of(-1), "-");
    }
}
