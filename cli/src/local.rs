//! Local meshes for `qmesh demo` and `qmesh bench`: finds the `qmesh-sidecar` binary, serves the
//! local control plane of `qmesh dev` in this process, starts sidecar processes on free loopback ports
//! that join it with their labels, and stops them (SIGTERM, then kill) when dropped.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use qmesh_core::MeshFile;
use qmesh_proto::join::ControlService;
use tokio_util::sync::CancellationToken;

use crate::dev::DevSource;

/// Finds `qmesh-sidecar`: `$QMESH_SIDECAR_BIN`, next to this executable, or on `PATH`.
pub fn sidecar_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("QMESH_SIDECAR_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let candidate = dir.join("qmesh-sidecar");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("qmesh-sidecar");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "qmesh-sidecar not found next to qmesh or on PATH: build it with \
         `cargo build --release --bin qmesh-sidecar` (or set QMESH_SIDECAR_BIN)"
    )
}

/// Addresses of one local sidecar.
#[derive(Clone, Debug)]
pub struct LocalSidecar {
    /// Its name.
    pub name: String,
    /// App gRPC API.
    pub grpc: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
}

/// A running local mesh: a control plane in this process (the one `qmesh dev` serves) and sidecar
/// processes that join it with their labels.
pub struct LocalMesh {
    dir: tempfile::TempDir,
    /// The sidecars, in the order given.
    pub sidecars: Vec<LocalSidecar>,
    children: Vec<Child>,
    /// How each sidecar was started (binary, arguments), to start it again.
    commands: Vec<(PathBuf, Vec<std::ffi::OsString>)>,
    control: CancellationToken,
}

impl LocalMesh {
    /// Starts a control plane over `manifests` and one sidecar per `(name, labels)`.
    pub async fn start(
        binary: &Path,
        manifests: &str,
        sidecars: &[(&str, &[(&str, &str)])],
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, manifests, sidecars, &[]).await
    }

    /// Like [`LocalMesh::start`], with `extra` arguments for every sidecar.
    pub async fn start_with(
        binary: &Path,
        manifests: &str,
        sidecars: &[(&str, &[(&str, &str)])],
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("qmesh-local-").tempdir()?;
        let file = MeshFile::parse(manifests).context("the local mesh's manifests")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let control_plane = format!("https://{}", listener.local_addr()?);
        let control = CancellationToken::new();
        // Its own CA: the mesh speaks mutual TLS like any other.
        let ca_dir = dir.path().join("ca");
        let (authority, tls) =
            crate::local_ca::control_plane(crate::local_ca::load_or_create(&ca_dir)?, &[])?;
        let trust_bundle = crate::local_ca::bundle_path(&ca_dir);
        let service = ControlService::new(Arc::new(DevSource::new(file).quiet()), control.clone())
            .authority(authority, qmesh_identity::CERTIFICATE_TTL)
            .tls(tls);
        tokio::spawn(service.serve(listener));

        let mut local = Vec::new();
        let mut children = Vec::new();
        let mut commands = Vec::new();
        for (name, labels) in sidecars {
            let addresses_file = dir.path().join(format!("{name}.addresses.json"));
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let mut argv: Vec<std::ffi::OsString> = [
                "--control-plane",
                &control_plane,
                "--name",
                name,
                "--labels",
                &labels.join(","),
                "--data-dir",
            ]
            .iter()
            .map(Into::into)
            .collect();
            argv.push(dir.path().join(name).into());
            // The demo's and bench's apps speak gRPC: no AMQP port per local sidecar.
            argv.push("--amqp-addr".into());
            argv.push("off".into());
            argv.push("--trust-bundle".into());
            argv.push(trust_bundle.clone().into());
            argv.push("--addresses-file".into());
            argv.push(addresses_file.clone().into());
            argv.extend(extra.iter().map(Into::into));
            let log = dir.path().join(format!("{name}.log"));
            // Port 0: the kernel picks free ports and the sidecar says which, so no other process
            // can take one between choosing and binding.
            let mut first = argv.clone();
            for flag in ["--peer-addr", "--grpc-addr", "--http-addr", "--admin-addr"] {
                first.push(flag.into());
                first.push("127.0.0.1:0".into());
            }
            let mut child = spawn(binary, &first, &log)?;
            let bound = match read_addresses(&addresses_file, &mut child, &log).await {
                Ok(bound) => bound,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e.context(format!("starting sidecar {name}")));
                }
            };
            children.push(child);
            // A restart binds the same ports again.
            for (flag, addr) in [
                ("--peer-addr", bound.peer),
                ("--grpc-addr", bound.grpc),
                ("--http-addr", bound.http),
                ("--admin-addr", bound.admin),
            ] {
                argv.push(flag.into());
                argv.push(addr.to_string().into());
            }
            commands.push((binary.to_path_buf(), argv));
            local.push(LocalSidecar {
                name: (*name).to_owned(),
                grpc: bound.grpc,
                admin: bound.admin,
            });
        }
        Ok(Self {
            dir,
            sidecars: local,
            children,
            commands,
            control,
        })
    }

    /// Kills the sidecar of this name with SIGKILL (no chance to clean up) and starts it again on
    /// the same data directory and ports.
    pub fn kill9_and_restart(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .sidecars
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no sidecar {name}"))?;
        self.children[i].kill()?;
        self.children[i].wait()?;
        let (binary, argv) = &self.commands[i];
        self.children[i] = spawn(binary, argv, &self.dir.path().join(format!("{name}.log")))?;
        Ok(())
    }

    /// Waits until every sidecar answers `/readyz`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.sidecars.len() {
            loop {
                if let Some(status) = self.children[i].try_wait()? {
                    bail!(
                        "sidecar {} exited ({status}):\n{}",
                        self.sidecars[i].name,
                        self.log(&self.sidecars[i].name)
                    );
                }
                if ready(self.sidecars[i].admin).await {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("sidecar {} not ready in {timeout:?}", self.sidecars[i].name);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Process id of the sidecar of this name.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let i = self.sidecars.iter().position(|s| s.name == name)?;
        Some(self.children[i].id())
    }

    /// The sidecar of this name.
    pub fn sidecar(&self, name: &str) -> &LocalSidecar {
        self.sidecars
            .iter()
            .find(|s| s.name == name)
            .unwrap_or(&self.sidecars[0])
    }

    /// The data directory of the sidecar of this name.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The last lines of a sidecar's log.
    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines.len().saturating_sub(20);
        // A panic's message comes before its backtrace: keep its first line even when the
        // backtrace fills the tail.
        let first_failure = lines[..tail]
            .iter()
            .position(|l| l.contains("panicked at") || l.starts_with("Error:"));
        // The line after "panicked at …:" is the panic's message.
        let mut shown: Vec<&str> = first_failure
            .map(|i| lines[i..(i + 2).min(tail)].to_vec())
            .unwrap_or_default();
        if !shown.is_empty() {
            shown.push("…");
        }
        shown.extend_from_slice(&lines[tail..]);
        shown.join("\n")
    }
}

/// Where a sidecar listens, as its `--addresses-file` says.
#[derive(serde::Deserialize)]
pub struct BoundAddresses {
    /// Peer API.
    pub peer: SocketAddr,
    /// App gRPC API.
    pub grpc: SocketAddr,
    /// App HTTP API.
    pub http: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
    /// AMQP 0-9-1 listener (absent when off).
    #[serde(default)]
    pub amqp: Option<SocketAddr>,
}

/// How long a starting sidecar may take to bind its ports.
const BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for a sidecar started with `--addresses-file path` to write it; fails with the end of its
/// log if it exits first.
pub async fn read_addresses(
    path: &Path,
    child: &mut Child,
    log: &Path,
) -> anyhow::Result<BoundAddresses> {
    let deadline = Instant::now() + BIND_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text)
                .with_context(|| format!("the addresses file {}", path.display()));
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the sidecar exited ({status}) before listening:\n{}",
                tail.join("\n")
            );
        }
        if Instant::now() > deadline {
            bail!("the sidecar did not bind its ports in {BIND_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a sidecar process appending its output to `log`.
fn spawn(binary: &Path, argv: &[std::ffi::OsString], log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(binary)
        .args(argv)
        // As the injector sets them: glibc gives a drained backlog's memory back.
        .env("MALLOC_ARENA_MAX", "2")
        .env("MALLOC_TRIM_THRESHOLD_", "131072")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// Whether the sidecar with this admin address answers `/readyz` with 200 (within 2 s: a
/// sidecar that accepts but does not answer is not ready, and callers keep their own deadlines).
pub async fn ready(admin: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
            return false;
        };
        let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        response.starts_with("HTTP/1.1 200")
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .unwrap_or(false)
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        // Sidecars first (they keep their last view while the control plane goes away).
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.control.cancel();
    }
}
