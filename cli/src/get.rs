//! `qmesh get queues|subscriptions|sidecars`: a `kubectl get`-like table of the mesh's status, from the
//! local control plane (`qmesh dev`, over `Control/Status`) or, with `--kubeconfig`, from the Queue
//! and Subscription status the operator writes.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use qmesh_api::{Queue, Subscription};
use qmesh_proto::control::{MeshStatus, StatusRequest, control_client::ControlClient};

use crate::table::Table;

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
    /// Read the status the operator writes in this cluster instead of asking `qmesh dev`.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The local control plane (`qmesh dev`).
    #[arg(
        long,
        env = "QMESH_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7000"
    )]
    pub control_plane: String,
    /// Roots the local control plane's certificate must chain to (default: the local CA's `ca.crt`).
    #[arg(long, env = "QMESH_TRUST_BUNDLE_FILE", value_name = "PATH")]
    pub trust_bundle: Option<PathBuf>,
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
    let status = match &args.kubeconfig {
        Some(path) => from_cluster(path, &namespace).await?,
        None => {
            let bundle = args
                .trust_bundle
                .clone()
                .unwrap_or_else(|| crate::local_ca::bundle_path(&crate::local_ca::default_dir()));
            from_control_plane(&args.control_plane, &bundle, &namespace).await?
        }
    };
    let table = render(
        &status,
        args.kind,
        args.all_namespaces,
        args.kubeconfig.is_some(),
    );
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

/// The mesh status from a local control plane.
pub async fn from_control_plane(
    endpoint: &str,
    trust_bundle: &std::path::Path,
    namespace: &str,
) -> anyhow::Result<MeshStatus> {
    let hint = || {
        format!("no control plane at {endpoint} — is `qmesh dev` running? (or pass --kubeconfig)")
    };
    let channel = crate::local_ca::connect(endpoint, trust_bundle)
        .await
        .with_context(hint)?;
    let status = ControlClient::new(channel)
        .status(StatusRequest {
            namespace: namespace.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .with_context(hint)?
        .into_inner();
    Ok(status)
}

/// The status the operator wrote into the Queue and Subscription objects.
async fn from_cluster(kubeconfig: &PathBuf, namespace: &str) -> anyhow::Result<MeshStatus> {
    let config = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
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

/// The rows of `kind`; rates are not in CR status, so a cluster shows `-` for them.
pub fn render(status: &MeshStatus, kind: Kind, namespaces: bool, cluster: bool) -> Table {
    let rate = |r: f64| {
        if cluster {
            "-".to_owned()
        } else {
            format!("{r:.1}")
        }
    };
    let dash = |s: &str| if s.is_empty() { "-" } else { s }.to_owned();
    // Counters of the connected sidecars; a cluster's status has none.
    let total = |n: u64| {
        if cluster {
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
                "PUBLISHED",
                "PUBLISH/S",
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
                        total(q.published_total),
                        rate(q.publish_rate),
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
                "IN-FLIGHT",
                "ACKED",
                "ACKS/S",
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
                        s.in_flight.to_string(),
                        total(s.acked_total),
                        rate(s.ack_rate),
                        s.dead_lettered_total.to_string(),
                    ];
                    (s.namespace.as_str(), cells)
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
