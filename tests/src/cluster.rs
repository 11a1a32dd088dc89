//! The one-node cluster with real pods (`hack/cluster.sh`: kubelet, containerd, a CNI bridge on
//! 198.18.0.0/24, cluster DNS) for the real-pods tier: started fresh once per test run (the first
//! test process of a nextest run starts it and marks it; the others of the run reuse it), with
//! images built from this very build's binaries (`hack/images.sh --from`), and driven with the
//! kubectl and helm of the test assets.
//!
//! ```text
//!   RealCluster::start ──▶ hack/cluster.sh down; up ──▶ kubeconfig
//!                      └─▶ hack/images.sh --from <this build> ──▶ qmesh/{operator,sidecar,example}:dev
//! ```
//!
//! It needs root and a cgroup v2 hierarchy (what `hack/test.sh` has on a Debian 12 machine), so the
//! tier runs where `QMESH_REAL_PODS=1` says so; `hack/test.sh` sets it and takes the cluster down
//! at the end.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};

use crate::repo_root;

/// A running one-node cluster.
#[derive(Debug, Clone)]
pub struct RealCluster {
    kubeconfig: PathBuf,
    assets: PathBuf,
}

/// Whether this run asks for the real-pods tier (`QMESH_REAL_PODS=1`, set by `hack/test.sh`).
pub fn real_pods_wanted() -> bool {
    std::env::var("QMESH_REAL_PODS").is_ok_and(|v| v == "1")
}

fn script(name: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("bash")
        .arg(repo_root().join("hack").join(name))
        .args(args)
        .output()
        .with_context(|| format!("running hack/{name}"))?;
    if !out.status.success() {
        bail!(
            "hack/{name} {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 40)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The cluster's state directory (`hack/cluster.sh`'s).
fn state_dir() -> anyhow::Result<PathBuf> {
    std::env::var_os("QMESH_CLUSTER_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("QMESH_CACHE_DIR").map(|d| PathBuf::from(d).join("cluster")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qmesh/cluster")))
        .context("no HOME")
}

/// Where a test run records that it brought the cluster up and set it up.
fn run_marker() -> anyhow::Result<PathBuf> {
    Ok(state_dir()?.join("test-run"))
}

impl RealCluster {
    /// The cluster an earlier test process of the same run (`run`: nextest's `NEXTEST_RUN_ID`)
    /// brought up and set up, if it still answers: a run starts the cluster once, not once per
    /// test process.
    pub fn reuse(run: &str) -> Option<Self> {
        let marker = std::fs::read_to_string(run_marker().ok()?).ok()?;
        let (marked, kubeconfig) = marker.trim().split_once('\n')?;
        if marked != run {
            return None;
        }
        let assets = PathBuf::from(script("k8s-test-env.sh", &[]).ok()?.lines().last()?.trim());
        let cluster = Self {
            kubeconfig: PathBuf::from(kubeconfig.trim()),
            assets,
        };
        cluster
            .kubectl_ok(&["get", "--raw", "/readyz"])
            .ok()
            .map(|_| cluster)
    }

    /// Records that this cluster is up and set up for `run`, for [`RealCluster::reuse`].
    pub fn mark_for_run(&self, run: &str) -> anyhow::Result<()> {
        std::fs::write(
            run_marker()?,
            format!("{run}\n{}\n", self.kubeconfig.display()),
        )
        .context("writing the test-run marker")
    }

    /// Brings a fresh cluster up (taking down what an earlier run left) and imports the images
    /// of the binaries in `binaries` (the directory holding `qmesh-operator`, `qmesh-sidecar` and
    /// `qmesh`).
    pub fn start(binaries: &Path) -> anyhow::Result<Self> {
        script("cluster.sh", &["down"])?;
        let up = script("cluster.sh", &["up"])?;
        let kubeconfig = PathBuf::from(
            up.lines()
                .last()
                .context("hack/cluster.sh up printed no kubeconfig")?
                .trim(),
        );
        let binaries = binaries.display().to_string();
        script("images.sh", &["--from", &binaries])?;
        let assets = PathBuf::from(
            script("k8s-test-env.sh", &[])?
                .lines()
                .last()
                .context("hack/k8s-test-env.sh printed no directory")?
                .trim(),
        );
        Ok(Self { kubeconfig, assets })
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs `kubectl` against the cluster.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.tool("kubectl", args)
    }

    /// Runs `helm` against the cluster.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.tool("helm", args)
    }

    /// `kubectl` that must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The host PID of a running container (`containerd://<id>` as a pod's status names it).
    pub fn container_pid(&self, container_id: &str) -> anyhow::Result<u32> {
        let id = container_id
            .strip_prefix("containerd://")
            .unwrap_or(container_id);
        let socket = state_dir()?.join("run/containerd/containerd.sock");
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["-n", "k8s.io", "task", "ls"])
            .output()
            .context("running ctr")?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next()? == id).then(|| fields.next()?.parse().ok())?
            })
            .with_context(|| format!("no running task {id} in ctr task ls"))
    }

    /// Follows the standard output of the `app` container of every pod `selector` matches in
    /// `namespace`, from each container's start until it ends — also of pods a rolling update
    /// deletes while the test runs.
    pub fn follow_app_logs(&self, namespace: &str, selector: &str) -> AppLogs {
        let logs = AppLogs {
            lines: Arc::default(),
            followers: Arc::default(),
            stop: Arc::default(),
        };
        let (cluster, namespace, selector) =
            (self.clone(), namespace.to_owned(), selector.to_owned());
        let (lines, followers, stop) = (
            logs.lines.clone(),
            logs.followers.clone(),
            logs.stop.clone(),
        );
        std::thread::spawn(move || {
            let mut followed = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let listed = cluster.kubectl_ok(&[
                    "get",
                    "pods",
                    "-n",
                    &namespace,
                    "-l",
                    &selector,
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name} \
                     {.status.containerStatuses[?(@.name==\"app\")].containerID}{\"\\n\"}{end}",
                ]);
                for line in listed.unwrap_or_default().lines() {
                    let Some((pod, container)) = line.split_once(' ') else {
                        continue;
                    };
                    if container.is_empty() || !followed.insert(container.to_owned()) {
                        continue;
                    }
                    let follow = Command::new(cluster.assets.join("kubectl"))
                        .env("KUBECONFIG", &cluster.kubeconfig)
                        .args(["logs", "-f", pod, "-c", "app", "-n", &namespace])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn();
                    let Ok(mut child) = follow else { continue };
                    let Some(stdout) = child.stdout.take() else {
                        continue;
                    };
                    followers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(child);
                    let (lines, pod) = (lines.clone(), pod.to_owned());
                    std::thread::spawn(move || {
                        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                            lines
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(pod.clone())
                                .or_insert_with(Vec::new)
                                .push(line);
                        }
                    });
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        logs
    }

    fn tool(&self, name: &str, args: &[&str]) -> anyhow::Result<Output> {
        let program = self.assets.join(name);
        Command::new(&program)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(repo_root())
            .args(args)
            .output()
            .with_context(|| format!("running {}", program.display()))
    }
}

/// What [`RealCluster::follow_app_logs`] has read so far; stops following when dropped.
#[derive(Debug)]
pub struct AppLogs {
    lines: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    followers: Arc<Mutex<Vec<Child>>>,
    stop: Arc<AtomicBool>,
}

impl AppLogs {
    /// Every line read so far, by pod name.
    pub fn lines(&self) -> BTreeMap<String, Vec<String>> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for AppLogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for mut child in
            std::mem::take(&mut *self.followers.lock().unwrap_or_else(|p| p.into_inner()))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
