//! `qmesh` — the command line: a one-command demo of a local mesh, a local control plane (`dev`) and
//! sidecars for local processes (`run`), publish/subscribe, status tables (`get`), dead-letter tools
//! and benchmarks. Exit codes: 0 success, 1 failure, 2 usage error (clap), 3 refused by the broker;
//! `qmesh run` passes on its command's code.

mod bench;
mod burst;
mod client;
mod console;
mod control_plane;
mod demo;
mod dev;
mod dlq;
mod get;
mod local;
mod local_ca;
mod progress;
mod run;
mod scheduled;
mod signals;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// qmesh: a message queue that lives in your cluster as a mesh of sidecar brokers.
#[derive(Parser, Debug)]
#[command(name = "qmesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a local mesh with no cluster: sidecar processes, a fan-out queue, competing rate-limited
    /// consumers and a poison message that ends in the dead-letter queue; prints a summary.
    Demo(demo::DemoArgs),
    /// Run a local control plane from Queue and Subscription manifests (no cluster); reloads them
    /// when they change.
    Dev(dev::DevArgs),
    /// Run a command beside its own sidecar, joined to `qmesh dev` (like `dapr run`).
    Run(run::RunArgs),
    /// Show queues, subscriptions or sidecars with backlog and rates, like `kubectl get`.
    Get(get::GetArgs),
    /// Publish messages to a queue through a sidecar.
    Pub(client::PubArgs),
    /// Consume messages of a subscription through a sidecar.
    Sub(client::SubArgs),
    /// Inspect dead letters (`peek`), send them back to their queue (`redrive`) or delete them
    /// (`purge`), at every sidecar of the mesh.
    Dlq(dlq::DlqArgs),
    /// Open the web console against a cluster (its operator, through your kubeconfig), like
    /// `linkerd viz dashboard`; `qmesh dev` serves the same console for a local mesh.
    Console(console::ConsoleArgs),
    /// Measure throughput and latency through real sidecars (or a bare gRPC baseline).
    Bench(bench::BenchArgs),
    /// Print a shell completion script (`qmesh completions bash > /etc/bash_completion.d/qmesh`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Parses `500ms`, `30s`, `5m`, `1h30m` for duration flags.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<qmesh_api::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Get(args) => get::run(args).await,
            // Asked to stop (SIGTERM, as a container's main process, or Ctrl-C): stop at once —
            // what was published was printed; what was delivered and not acked is redelivered.
            Command::Pub(args) => until_terminated(client::publish(args)).await,
            Command::Sub(args) => until_terminated(client::subscribe(args)).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::Console(args) => console::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "qmesh",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(run::ExitWith(code)) = error.downcast_ref::<run::ExitWith>() {
                return ExitCode::from(*code);
            }
            eprintln!("error: {error:#}");
            if error.downcast_ref::<client::Refused>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs `command` until it ends or the process is asked to stop (then `Ok`): a command that runs
/// as a container's PID 1 gets no default action for SIGTERM, so it must handle it itself.
async fn until_terminated(
    command: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::select! {
        result = command => result,
        () = signals::terminated() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    #[test]
    fn flags_take_the_crd_spellings_too() {
        for spelling in ["disk", "Disk", "Memory", "memory"] {
            let cli = Cli::try_parse_from(["qmesh", "bench", "--durability", spelling])
                .unwrap_or_else(|e| panic!("--durability {spelling}: {e}"));
            assert!(matches!(cli.command, Command::Bench(_)));
        }
        assert!(Cli::try_parse_from(["qmesh", "bench", "--durability", "tape"]).is_err());
    }
}
