//! Local meshes of real `qmesh-sidecar` processes for tests: a mesh file written from the Queues and
//! Subscriptions a test gives plus one `Sidecar` document per process, each on its own free
//! loopback ports, started, killed (`SIGKILL`), stopped (`SIGTERM`), frozen (`SIGSTOP`) and
//! restarted on demand. With [`MeshBuilder::proxied`], peers reach each sidecar through a
//! [`Proxy`] the test controls (partitions). Every mesh has its own CA ([`Mesh::ca`]) and every
//! sidecar a certificate from it, so peers speak mutual TLS as in a cluster.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context;
use tempfile::TempDir;

use crate::{
    process::{ChildGuard, free_ports_on, loopback_ip, wait_for},
    proxy::Proxy,
};

/// Builds a [`Mesh`].
#[derive(Default)]
pub struct MeshBuilder {
    manifests: String,
    sidecars: Vec<(String, Vec<(String, String)>)>,
    args: Vec<String>,
    own_args: BTreeMap<String, Vec<String>>,
    data_dirs: BTreeMap<String, PathBuf>,
    service_accounts: BTreeMap<String, String>,
    proxied: bool,
}

impl MeshBuilder {
    /// An empty mesh.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds Queue / Subscription manifests (multi-document YAML).
    pub fn manifests(mut self, yaml: &str) -> Self {
        if !self.manifests.is_empty() {
            self.manifests.push_str("\n---\n");
        }
        self.manifests.push_str(yaml.trim());
        self
    }

    /// Adds a sidecar with these labels.
    pub fn sidecar(mut self, name: &str, labels: &[(&str, &str)]) -> Self {
        self.sidecars.push((
            name.to_owned(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        self
    }

    /// Extra flags for every sidecar.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Extra flags for one sidecar.
    pub fn arg_for(mut self, name: &str, arg: &str) -> Self {
        self.own_args
            .entry(name.to_owned())
            .or_default()
            .push(arg.to_owned());
        self
    }

    /// Keeps one sidecar's data in `dir` (e.g. a small tmpfs the test mounted) instead of the
    /// mesh's temporary directory.
    pub fn data_dir(mut self, name: &str, dir: &Path) -> Self {
        self.data_dirs.insert(name.to_owned(), dir.to_path_buf());
        self
    }

    /// Runs one sidecar as service account `account` (its `Sidecar` document and its certificate
    /// say so); the others run as `default`.
    pub fn service_account(mut self, name: &str, account: &str) -> Self {
        self.service_accounts
            .insert(name.to_owned(), account.to_owned());
        self
    }

    /// Puts a [`Proxy`] in front of every sidecar's peer port: the mesh file advertises the proxy.
    pub fn proxied(mut self) -> Self {
        self.proxied = true;
        self
    }

    /// Writes the mesh file and starts every sidecar from `binary`, waiting until all are ready.
    pub async fn start(self, binary: &Path) -> anyhow::Result<Mesh> {
        let dir = tempfile::Builder::new().prefix("qmesh-mesh-").tempdir()?;
        let ca = test_ca()?;
        let mut text = self.manifests.clone();
        let mut sidecars = BTreeMap::new();
        let mut proxies = BTreeMap::new();
        for (name, labels) in &self.sidecars {
            // Each sidecar on its own loopback address, like a pod on its own IP.
            let ip = loopback_ip();
            let addr = |p: u16| SocketAddr::from((ip, p));
            let [
                peer_port,
                front_port,
                grpc_port,
                http_port,
                admin_port,
                amqp_port,
            ] = free_ports_on(ip)?;
            let identity = dir.path().join(format!("{name}.identity"));
            let account = self
                .service_accounts
                .get(name)
                .map_or("default", String::as_str);
            let mut id = test_identity(name);
            id.service_account = account.to_owned();
            ca.issue_material(&id, qmesh_identity::CERTIFICATE_TTL)?
                .write_to(&identity)?;
            let mut args = vec!["--identity-dir".to_owned(), identity.display().to_string()];
            args.extend(self.args.clone());
            args.extend(self.own_args.get(name).cloned().unwrap_or_default());
            let listen_peer = addr(peer_port);
            // Proxied: the mesh file (what peers dial) names the proxy; the sidecar listens behind.
            let peer = if self.proxied {
                let front = addr(front_port);
                proxies.insert(name.clone(), Proxy::start(front, listen_peer).await?);
                args.push("--peer-addr".into());
                args.push(listen_peer.to_string());
                front
            } else {
                listen_peer
            };
            let s = SidecarProcess {
                name: name.clone(),
                peer,
                grpc: addr(grpc_port),
                http: addr(http_port),
                admin: addr(admin_port),
                amqp: addr(amqp_port),
                data_dir: self
                    .data_dirs
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| dir.path().join(name)),
                mesh_file: dir.path().join("mesh.yaml"),
                binary: binary.to_path_buf(),
                args,
                child: None,
                log: dir.path().join(format!("{name}.log")),
            };
            let labels: String = labels
                .iter()
                .map(|(k, v)| format!("{k}: {v:?}, "))
                .collect();
            write!(
                text,
                "\n---\napiVersion: qmesh.io/v1alpha1\nkind: Sidecar\nmetadata: {{name: {name}, labels: {{{}}}}}\n\
                 spec: {{peerAddress: \"{}\", grpcAddress: \"{}\", httpAddress: \"{}\", adminAddress: \"{}\", \
                 amqpAddress: \"{}\", serviceAccountName: {account}}}\n",
                labels.trim_end_matches(", "),
                s.peer,
                s.grpc,
                s.http,
                s.admin,
                s.amqp
            )?;
            sidecars.insert(name.clone(), s);
        }
        std::fs::write(dir.path().join("mesh.yaml"), text)?;
        let mut mesh = Mesh {
            ca,
            _dir: dir,
            sidecars,
            proxies,
        };
        for s in mesh.sidecars.values_mut() {
            s.spawn()?;
        }
        for s in mesh.sidecars.values_mut() {
            s.wait_ready().await?;
        }
        Ok(mesh)
    }
}

/// A running local mesh; every process is killed when it is dropped.
pub struct Mesh {
    ca: qmesh_identity::Authority,
    sidecars: BTreeMap<String, SidecarProcess>,
    proxies: BTreeMap<String, Proxy>,
    // Last: the processes are gone before their directory.
    _dir: TempDir,
}

impl Mesh {
    /// The sidecar of this name.
    pub fn sidecar(&self, name: &str) -> &SidecarProcess {
        &self.sidecars[name]
    }

    /// The sidecar of this name, to kill or restart it.
    pub fn sidecar_mut(&mut self, name: &str) -> &mut SidecarProcess {
        self.sidecars.get_mut(name).expect("a sidecar of that name")
    }

    /// Names of every sidecar.
    pub fn names(&self) -> Vec<String> {
        self.sidecars.keys().cloned().collect()
    }

    /// The proxy in front of a sidecar's peer port (meshes built with [`MeshBuilder::proxied`]).
    pub fn proxy(&self, name: &str) -> &Proxy {
        &self.proxies[name]
    }

    /// The mesh's certificate authority (to mint identities for impostors and rotations).
    pub fn ca(&self) -> &qmesh_identity::Authority {
        &self.ca
    }

    /// A channel to `target`'s peer port presenting a certificate from the mesh's CA for sidecar
    /// `as_sidecar` (a member of the mesh, or an impostor with a valid certificate).
    pub async fn peer_channel(
        &self,
        as_sidecar: &str,
        target: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        peer_channel(&self.ca, as_sidecar, self.sidecar(target).peer, target).await
    }

    /// Where the mesh keeps its files (mesh file, logs, data directories).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// Lines of each sidecar's log shown when a test fails.
const FAILURE_LOG_LINES: usize = 60;

impl Drop for Mesh {
    /// A failing test shows what each sidecar logged last: the log files go with the mesh's
    /// temporary directory.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (name, sidecar) in &self.sidecars {
            let text = std::fs::read_to_string(&sidecar.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(FAILURE_LOG_LINES)..];
            eprintln!(
                "──── last {} lines of sidecar {name}'s log ────",
                tail.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// One sidecar process of a mesh.
pub struct SidecarProcess {
    /// Its name (the `Sidecar` document).
    pub name: String,
    /// Peer API address.
    pub peer: SocketAddr,
    /// App gRPC address.
    pub grpc: SocketAddr,
    /// App HTTP address.
    pub http: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// AMQP 0-9-1 address.
    pub amqp: SocketAddr,
    /// Its data directory (kept across restarts).
    pub data_dir: PathBuf,
    mesh_file: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl SidecarProcess {
    /// `http://` URL of the app gRPC API.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--mesh-file")
            .arg(&self.mesh_file)
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .args(["--log-level", "info,qmesh_sidecar=debug"])
            .args(&self.args)
            // Errors and panics in the log as one readable line each, not a page of backtrace.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            // As the injector and the image set them (see docs/storage.md).
            .env("MALLOC_ARENA_MAX", "2")
            .env("MALLOC_TRIM_THRESHOLD_", "131072");
        // Append, so a restart keeps the earlier incarnation's log for diagnosis.
        self.child = Some(ChildGuard::spawn_appending(
            "qmesh-sidecar",
            command,
            self.log.clone(),
        )?);
        Ok(())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let admin = self.admin;
        let child = self.child.as_mut().context("not running")?;
        let result = wait_for(
            "sidecar readiness",
            // Generous: on a loaded 2-core machine running the whole suite, fsyncs can crawl.
            Duration::from_secs(60),
            || {
                // A process that exited will not become ready: fail at once, with its log.
                let exited = child.try_status();
                async move {
                    if let Some(code) = exited {
                        return Some(Err(anyhow::anyhow!(
                            "exited ({code:?}) before it was ready"
                        )));
                    }
                    crate::http::request("GET", admin, "/readyz", &[], b"")
                        .await
                        .ok()
                        .filter(|r| r.status == 200)
                        .map(|_| Ok(()))
                }
            },
        )
        .await
        .and_then(|ready| ready);
        result.with_context(|| {
            format!(
                "{} did not become ready; log:\n{}",
                self.name,
                self.log_tail()
            )
        })?;
        Ok(())
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        self.child.take();
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal("-TERM")
    }

    /// Freezes the process (SIGSTOP): its sockets stay open, nothing answers — a hung pod.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(ChildGuard::id)
            .context("not running")?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let child = self.child.as_mut().context("not running")?;
        let code = wait_for("sidecar exit", timeout, || {
            let status = child.try_status();
            async move { status }
        })
        .await?;
        self.child = None;
        Ok(code)
    }

    /// Starts the process again on the same data directory and waits until ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child.take();
        self.spawn()?;
        self.wait_ready().await
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_status().is_none())
    }

    /// Path of its log file (every incarnation appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Peak resident set size of the process so far (VmHWM), from /proc.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Resident set size of the process, from /proc.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// The trust domain of test meshes.
pub const TEST_TRUST_DOMAIN: &str = "qmesh.local";

/// A new CA for a test mesh.
pub fn test_ca() -> anyhow::Result<qmesh_identity::Authority> {
    Ok(qmesh_identity::Authority::generate(
        TEST_TRUST_DOMAIN,
        Duration::from_secs(7 * 86_400),
        None,
    )?)
}

/// The workload identity of sidecar `name` of namespace `default` in a test mesh.
pub fn test_identity(name: &str) -> qmesh_identity::WorkloadId {
    qmesh_identity::WorkloadId {
        trust_domain: TEST_TRUST_DOMAIN.into(),
        namespace: "default".into(),
        service_account: "default".into(),
        sidecar: name.into(),
    }
}

/// Writes a certificate for sidecar `name` from `ca` into `dir` (for `--identity-dir`).
pub fn issue_identity(
    ca: &qmesh_identity::Authority,
    name: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    ca.issue_material(&test_identity(name), qmesh_identity::CERTIFICATE_TTL)?
        .write_to(dir)
        .with_context(|| format!("writing the identity of {name} to {}", dir.display()))
}

/// A channel to the peer port at `addr` of sidecar `target`, presenting a certificate from `ca`
/// for sidecar `as_sidecar`.
pub async fn peer_channel(
    ca: &qmesh_identity::Authority,
    as_sidecar: &str,
    addr: SocketAddr,
    target: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    let material =
        ca.issue_material(&test_identity(as_sidecar), qmesh_identity::CERTIFICATE_TTL)?;
    let config = std::sync::Arc::new(qmesh_identity::tls::mesh_client(&material)?);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5));
    Ok(qmesh_identity::transport::connect(
        &endpoint,
        std::sync::Arc::new(move || std::sync::Arc::clone(&config)),
        &qmesh_identity::sidecar_dns_name("default", target),
    )
    .await?)
}
