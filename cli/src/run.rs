//! `qmesh run`: a sidecar for a local process, like `dapr run`. Starts `qmesh-sidecar` joined to the
//! local control plane (`qmesh dev`) under the app id and labels given, waits until it is ready,
//! then runs the command with `QMESH_GRPC_ADDR` / `QMESH_HTTP_ADDR` / `QMESH_AMQP_URL` pointing at it.
//!
//! ```text
//!   qmesh run ──spawn──▶ qmesh-sidecar --control-plane … --name APP --labels …   (own process group)
//!       │  /readyz ok
//!       ├──spawn──▶ <command>  env QMESH_GRPC_ADDR, QMESH_HTTP_ADDR, QMESH_AMQP_URL, QMESH_APP_ID
//!       │  SIGINT / SIGTERM ──forwarded──▶ <command>
//!       └─ <command> exits ──SIGTERM──▶ sidecar (drains, hands over) ──▶ exit with the command's code
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::local::BoundAddresses;
use anyhow::{Context, bail};
use clap::Args;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    process::{Child, Command},
    signal::unix::{SignalKind, signal},
};

/// The command's exit code, passed on by `qmesh run` (not an error message).
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the command exited with code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// `qmesh run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The app's name: the sidecar joins the mesh under it (like a pod name).
    #[arg(long)]
    pub app_id: String,
    /// The app's labels, which Queue publishers and Subscription consumers select
    /// (`k=v,k=v`; default `app=<app-id>`).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Namespace to join.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Port on 127.0.0.1 where the app takes pushed messages (Subscriptions with `delivery.mode: Push`).
    #[arg(long)]
    pub app_port: Option<u16>,
    /// The local control plane (`qmesh dev`).
    #[arg(
        long,
        env = "QMESH_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7000"
    )]
    pub control_plane: String,
    /// Roots the control plane's certificate must chain to (default: the local CA's `ca.crt`,
    /// made by `qmesh dev`).
    #[arg(long, env = "QMESH_TRUST_BUNDLE_FILE", value_name = "PATH")]
    pub trust_bundle: Option<PathBuf>,
    /// The sidecar's message log (kept across runs). Default: `$XDG_STATE_HOME/qmesh/<namespace>/<app-id>`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Port of the sidecar's gRPC app API on 127.0.0.1 (default: a free one).
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Port of the sidecar's HTTP app API on 127.0.0.1 (default: a free one).
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Port of the sidecar's AMQP 0-9-1 listener on 127.0.0.1 (default: a free one), for RabbitMQ
    /// client code (`QMESH_AMQP_URL`).
    #[arg(long)]
    pub amqp_port: Option<u16>,
    /// How long to wait for the sidecar to join and be ready.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub ready_timeout: Duration,
    /// How long the sidecar may take to drain when the command has exited.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub shutdown_grace: Duration,
    /// The app's command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?} is not a label: write key=value")),
    }
}

fn default_data_dir(namespace: &str, app_id: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("qmesh").join(namespace).join(app_id)
}

/// A started sidecar, stopped gracefully (then killed) when dropped or [`Sidecar::stop`]ped.
struct Sidecar {
    child: Child,
    log: PathBuf,
}

impl Sidecar {
    fn pid(&self) -> Option<Pid> {
        self.child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        }
        if tokio::time::timeout(grace + Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("qmesh run: the sidecar did not stop in time; killing it");
            let _ = self.child.kill().await;
        }
    }
}

/// Runs the command beside its sidecar; fails with [`ExitWith`] when the command does.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let binary = crate::local::sidecar_binary()?;
    let trust_bundle = args
        .trust_bundle
        .clone()
        .unwrap_or_else(|| crate::local_ca::bundle_path(&crate::local_ca::default_dir()));
    if args.control_plane.starts_with("https://") && !trust_bundle.is_file() {
        bail!(
            "no trust bundle at {} to verify the control plane {} with — is `qmesh dev` running? \
             (it makes the local CA; or pass --trust-bundle)",
            trust_bundle.display(),
            args.control_plane
        );
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| default_data_dir(&args.namespace, &args.app_id));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    // The given ports, else port 0: the sidecar binds what the kernel picks and writes which.
    let loopback = |port: Option<u16>| SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0)));
    let addresses_file = data_dir.join("sidecar.addresses.json");
    match std::fs::remove_file(&addresses_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", addresses_file.display()));
        }
        _ => {}
    }
    let labels = if args.labels.is_empty() {
        vec![("app".to_owned(), args.app_id.clone())]
    } else {
        args.labels.clone()
    };
    let labels_flag = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let log = data_dir.join("sidecar.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut command = Command::new(&binary);
    command
        .args(["--control-plane", &args.control_plane])
        .arg("--trust-bundle")
        .arg(&trust_bundle)
        .args(["--name", &args.app_id, "--namespace", &args.namespace])
        .args(["--labels", &labels_flag])
        .args(["--peer-addr", &loopback(None).to_string()])
        .args(["--grpc-addr", &loopback(args.grpc_port).to_string()])
        .args(["--http-addr", &loopback(args.http_port).to_string()])
        .args(["--amqp-addr", &loopback(args.amqp_port).to_string()])
        .args(["--admin-addr", &loopback(None).to_string()])
        .arg("--addresses-file")
        .arg(&addresses_file)
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--shutdown-grace",
            &format!("{}ms", args.shutdown_grace.as_millis()),
        ])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // Its own process group: Ctrl-C in the terminal reaches the app, and the sidecar is stopped
        // only once the app has exited.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(port) = args.app_port {
        command.args(["--app-port", &port.to_string()]);
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut sidecar = Sidecar { child, log };

    let bound = match wait_ready(&mut sidecar, &addresses_file, &args).await {
        Ok(bound) => bound,
        Err(error) => {
            sidecar.stop(Duration::from_secs(1)).await;
            return Err(error);
        }
    };
    let (grpc, http) = (bound.grpc, bound.http);
    let amqp = bound
        .amqp
        .map(|a| format!(", AMQP {a}"))
        .unwrap_or_default();
    eprintln!(
        "qmesh run: sidecar {}/{} ready (labels {labels_flag}) — gRPC {grpc}, HTTP {http}{amqp}; log {}",
        args.namespace,
        args.app_id,
        sidecar.log.display()
    );

    let code = run_app(&args, &bound, &mut sidecar).await;
    eprintln!("qmesh run: stopping the sidecar");
    sidecar.stop(args.shutdown_grace).await;
    match code? {
        0 => Ok(()),
        code => Err(ExitWith(code).into()),
    }
}

/// Waits until the sidecar has said where it listens and answers `/readyz` there.
async fn wait_ready(
    sidecar: &mut Sidecar,
    addresses_file: &Path,
    args: &RunArgs,
) -> anyhow::Result<BoundAddresses> {
    let deadline = Instant::now() + args.ready_timeout;
    let mut bound: Option<BoundAddresses> = None;
    loop {
        if let Some(status) = sidecar.child.try_wait()? {
            bail!(
                "the sidecar exited ({status}) before it was ready; its log:\n{}",
                sidecar.log_tail()
            );
        }
        if bound.is_none()
            && let Ok(text) = std::fs::read_to_string(addresses_file)
        {
            bound = Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("the addresses file {}", addresses_file.display()))?,
            );
        }
        if let Some(addresses) = &bound
            && crate::local::ready(addresses.admin).await
        {
            return Ok(bound.take().expect("just checked"));
        }
        if Instant::now() > deadline {
            bail!(
                "the sidecar is not ready after {:?} — is `qmesh dev` running at {}? Its log:\n{}",
                args.ready_timeout,
                args.control_plane,
                sidecar.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the command to its end, forwarding SIGINT and SIGTERM; returns its exit code.
async fn run_app(
    args: &RunArgs,
    bound: &BoundAddresses,
    sidecar: &mut Sidecar,
) -> anyhow::Result<u8> {
    let (program, rest) = args
        .command
        .split_first()
        .context("no command given after --")?;
    let mut app = Command::new(program);
    app.args(rest)
        .env("QMESH_GRPC_ADDR", bound.grpc.to_string())
        .env("QMESH_HTTP_ADDR", bound.http.to_string())
        .env("QMESH_APP_ID", &args.app_id)
        .env("QMESH_NAMESPACE", &args.namespace)
        .kill_on_drop(true);
    if let Some(amqp) = bound.amqp {
        app.env("QMESH_AMQP_URL", format!("amqp://guest:guest@{amqp}/%2F"));
    }
    let mut app = app
        .spawn()
        .with_context(|| format!("starting {program:?}"))?;
    let app_pid = app
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut sidecar_alive = true;
    loop {
        let forward = tokio::select! {
            status = app.wait() => {
                let status = status?;
                use std::os::unix::process::ExitStatusExt;
                let code = status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1);
                return Ok(u8::try_from(code).unwrap_or(1));
            }
            _ = interrupt.recv() => Signal::SIGINT,
            _ = terminate.recv() => Signal::SIGTERM,
            status = sidecar.child.wait(), if sidecar_alive => {
                sidecar_alive = false;
                eprintln!(
                    "qmesh run: the sidecar exited unexpectedly ({}); the app keeps running without a broker. Its log:\n{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    sidecar.log_tail()
                );
                continue;
            }
        };
        if let Some(pid) = app_pid {
            let _ = nix::sys::signal::kill(pid, forward);
        }
    }
}
