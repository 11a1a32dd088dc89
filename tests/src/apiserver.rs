//! A real Kubernetes API server for tests: etcd + kube-apiserver on loopback, one per test.
//!
//! ```text
//!   test ──kube::Client / kubectl / helm──▶ kube-apiserver (127.0.0.1:free, TLS, token auth, RBAC)
//!                                                 │
//!                                                 └──▶ etcd (127.0.0.1:free, data in a temp dir)
//! ```
//! No kubelet, scheduler or controller-manager runs: Pods are stored but never started, so tests
//! that need running pods start processes themselves and write pod status like a kubelet would.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, bail};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use tempfile::TempDir;

use crate::process::{ChildGuard, wait_for};

/// The admin token the test server accepts (user `qmesh-test-admin`, group `system:masters`).
const ADMIN_TOKEN: &str = "qmesh-test-admin-token";

/// The Service ClusterIP range of every API server the tests start: not a private range, and
/// unreachable from this machine (hack/test.sh routes it nowhere).
pub const SERVICE_CIDR: &str = "198.19.0.0/16";

/// A running API server (or an existing cluster) for one test.
pub struct KubeApiServer {
    kubeconfig: PathBuf,
    assets: Option<PathBuf>,
    client: Client,
    // Drop order: processes first (apiserver before etcd), then the directory.
    _apiserver: Option<ChildGuard>,
    _etcd: Option<ChildGuard>,
    _dir: TempDir,
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver and waits until the server answers (about 10 s), or connects
    /// to `$KUBECONFIG`'s cluster when `USE_EXISTING_CLUSTER=true`.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("qmesh-kube-").tempdir()?;
        if std::env::var("USE_EXISTING_CLUSTER").is_ok_and(|v| v == "true") {
            let kubeconfig = PathBuf::from(
                std::env::var("KUBECONFIG")
                    .context("USE_EXISTING_CLUSTER=true needs KUBECONFIG")?,
            );
            let client = client_for(&kubeconfig).await?;
            return Ok(Self {
                kubeconfig,
                assets: assets_dir().ok(),
                client,
                _apiserver: None,
                _etcd: None,
                _dir: dir,
            });
        }

        let assets = assets_dir()?;
        let root = dir.path();
        let [etcd_port, etcd_peer_port, api_port] =
            crate::process::free_ports_on(std::net::Ipv4Addr::LOCALHOST)?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");

        let mut etcd = Command::new(assets.join("etcd"));
        etcd.args(["--name", "default", "--data-dir"])
            .arg(root.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(["--unsafe-no-fsync", "--log-level", "warn"]);
        let mut etcd = ChildGuard::spawn("etcd", etcd, root.join("etcd.log"))?;

        let key = root.join("sa.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .context("running openssl to make the service-account key (apt-get install openssl)")?;
        if !status.status.success() {
            bail!(
                "openssl genrsa failed: {}",
                String::from_utf8_lossy(&status.stderr)
            );
        }
        let tokens = root.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{ADMIN_TOKEN},qmesh-test-admin,1,\"system:masters\"\n"),
        )?;

        let mut api = Command::new(assets.join("kube-apiserver"));
        api.arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--secure-port={api_port}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--cert-dir={}", root.join("certs").display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", key.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                key.display()
            ))
            .arg("--api-audiences=https://kubernetes.default.svc.cluster.local,qmesh")
            // Traffic stays on this machine: webhook and aggregated-API calls go to a Service's
            // endpoints (our own processes, or none), never to a ClusterIP, and the service range is
            // outside the private ranges (198.19.0.0/16 is reserved for benchmarking; see
            // docs/testing.md).
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--enable-aggregator-routing=true")
            .arg("--allow-privileged=true")
            // No controller-manager runs to create service accounts' tokens for pods.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--v=1");
        let mut apiserver = ChildGuard::spawn("kube-apiserver", api, root.join("apiserver.log"))?;

        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(api_port))?;
        let client = client_for(&kubeconfig).await?;

        let probe = client.clone();
        let ready = wait_for("kube-apiserver to answer", Duration::from_secs(90), || {
            let probe = probe.clone();
            let alive = etcd
                .check_running()
                .and_then(|()| apiserver.check_running());
            async move {
                match alive {
                    Err(e) => Some(Err(e)),
                    Ok(()) => probe.apiserver_version().await.ok().map(Ok),
                }
            }
        })
        .await;
        match ready {
            Ok(Ok(_)) => {}
            Ok(Err(exited)) => return Err(exited),
            Err(timeout) => bail!("{timeout}; kube-apiserver log:\n{}", apiserver.log_tail()),
        }
        // The default namespace is created by the server's bootstrap controller shortly after start.
        let ns = client.clone();
        wait_for("namespace default", Duration::from_secs(30), || {
            let ns = ns.clone();
            async move {
                let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(ns);
                api.get_opt("default").await.ok().flatten()
            }
        })
        .await?;

        Ok(Self {
            kubeconfig,
            assets: Some(assets),
            client,
            _apiserver: Some(apiserver),
            _etcd: Some(etcd),
            _dir: dir,
        })
    }

    /// A client with cluster-admin rights.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Path of a kubeconfig for kubectl and helm.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs `kubectl` (from the assets directory, else `PATH`) against this server.
    pub fn kubectl<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.tool("kubectl", args)
    }

    /// Runs `helm` (from the assets directory, else `PATH`) against this server.
    pub fn helm<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.tool("helm", args)
    }

    fn tool<I, S>(&self, name: &str, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let program = self
            .assets
            .as_ref()
            .map(|a| a.join(name))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(name));
        Command::new(&program)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self._dir.path().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self._dir.path().join("helm/config"))
            .env("HELM_DATA_HOME", self._dir.path().join("helm/data"))
            .args(args)
            .output()
            .with_context(|| format!("running {}", program.display()))
    }
}

/// Where etcd, kube-apiserver, kubectl and helm are: `$KUBEBUILDER_ASSETS`, else the cache that
/// `hack/k8s-test-env.sh` fills.
fn assets_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("KUBEBUILDER_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("QMESH_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qmesh")))
                .context("neither KUBEBUILDER_ASSETS nor HOME is set")?;
            cache.join("k8s-1.20.2")
        }
    };
    for binary in ["etcd", "kube-apiserver"] {
        if !dir.join(binary).is_file() {
            bail!(
                "{} has no {binary}: run `hack/k8s-test-env.sh` (or set KUBEBUILDER_ASSETS)",
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn kubeconfig_yaml(port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: qmesh-test
  cluster:
    server: https://127.0.0.1:{port}
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: {ADMIN_TOKEN}
contexts:
- name: qmesh-test
  context:
    cluster: qmesh-test
    user: admin
    namespace: default
current-context: qmesh-test
"
    )
}

async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}
