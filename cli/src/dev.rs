//! `qmesh dev`: a local control plane fed from files. The same `Queue` and `Subscription` manifests one
//! would `kubectl apply` (plus optional `Sidecar` documents) become the mesh state; sidecars join it
//! over `qmesh.control.v1` exactly as they join the operator (the session logic is shared:
//! [`qmesh_proto::join`]), and `qmesh run` sidecars register themselves with their labels.
//!
//! ```text
//!   manifests (file or folder) ──poll──▶ DevSource ◀──Join (Hello with labels)── qmesh run / sidecars
//!                                           │  MeshState::view_for ─────MeshView──▶
//!                                           └─ stats ──▶ Control/Status ──▶ qmesh get
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use clap::Args;
use qmesh_api::{Queue, SidecarDocument, Subscription};
use qmesh_core::{MeshFile, MeshState, MeshView, SidecarInfo, SidecarKey};
use qmesh_proto::{
    control::{Hello, MeshStatus, Stats, StatusRequest},
    join::{ControlService, MeshSource},
    summary,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::console::Snapshot;

/// The service account of every sidecar of a local mesh.
pub const LOCAL_SERVICE_ACCOUNT: &str = "default";

/// Most sidecars that may register themselves (`qmesh run`) with one local control plane.
const MAX_REGISTERED: usize = 10_000;

/// `qmesh dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// Manifests: a multi-document YAML file or a folder of `.yaml`/`.yml` files (repeatable).
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Address to serve the control plane on (sidecars and `qmesh run` join it here).
    #[arg(long, env = "QMESH_DEV_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// Where the local CA is kept (made on first use); `qmesh run` and `qmesh get` trust its `ca.crt`.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// How often the manifests are checked for changes.
    #[arg(long, default_value = "500ms", value_parser = crate::parse_duration)]
    pub poll_interval: Duration,
    /// Where to serve the web console (loopback only; port 0 picks a free one), or `off`.
    #[arg(
        long,
        env = "QMESH_DEV_CONSOLE",
        default_value = "127.0.0.1:7080",
        value_name = "ADDR|off",
        value_parser = crate::console::parse_addr
    )]
    pub console_addr: crate::console::ConsoleAddr,
}

/// Runs the local control plane until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let manifests = Manifests::new(args.paths.clone());
    let (file, stamp) = manifests.load()?;
    let source = Arc::new(DevSource::new(file));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} — is another `qmesh dev` running? (choose another with --listen)",
                args.listen
            )
        })?;
    let console = match args.console_addr.0 {
        Some(addr) => Some(crate::console::bind(addr).await?),
        None => None,
    };
    let shutdown = CancellationToken::new();
    let ca_dir = args
        .ca_dir
        .clone()
        .unwrap_or_else(crate::local_ca::default_dir);
    let (authority, tls) = crate::local_ca::control_plane(
        crate::local_ca::load_or_create(&ca_dir)?,
        &[args.listen.ip()],
    )?;
    {
        let summary = source.summary();
        let bundle = crate::local_ca::bundle_path(&ca_dir);
        println!(
            "qmesh dev: control plane on https://{} — {summary}",
            listener.local_addr()?
        );
        println!(
            "  local CA: {} (sidecars get certificates from it; peers speak mutual TLS)",
            bundle.display()
        );
        println!(
            "  join it with: qmesh run --app-id NAME --labels app=NAME --control-plane https://{} --trust-bundle {} -- <command>",
            listener.local_addr()?,
            bundle.display()
        );
        match &console {
            Some(console) => println!("  console: http://{}/", console.local_addr()?),
            None => println!("  console: off"),
        }
    }
    let control = ControlService::new(Arc::clone(&source), shutdown.clone())
        .authority(authority, qmesh_identity::CERTIFICATE_TTL)
        .tls(tls);
    let router = control.held_router();
    let server = tokio::spawn(control.serve(listener));
    let watcher = tokio::spawn(watch_manifests(
        manifests,
        stamp,
        Arc::clone(&source),
        args.poll_interval,
        shutdown.clone(),
    ));
    let console = console.map(|listener| {
        let backend = crate::console::DevBackend::new(Arc::clone(&source), router);
        tokio::spawn(crate::console::serve(
            listener,
            Arc::new(backend),
            shutdown.clone(),
        ))
    });
    crate::signals::terminated().await;
    println!("qmesh dev: stopping");
    shutdown.cancel();
    watcher.abort();
    server.await?.context("control plane failed")?;
    if let Some(console) = console {
        console.await?.context("console failed")?;
    }
    Ok(())
}

/// Polls the manifests and applies what changed; a broken edit is reported and the last good
/// state kept.
async fn watch_manifests(
    manifests: Manifests,
    mut stamp: Stamp,
    source: Arc<DevSource>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = manifests.stamp();
        if now == stamp {
            continue;
        }
        stamp = now;
        match manifests.load() {
            Ok((file, _)) => {
                let changes = source.replace_manifests(file);
                if changes.is_empty() {
                    println!("reloaded: nothing changed");
                }
                for change in changes {
                    println!("reloaded: {change}");
                }
            }
            Err(error) => println!("reload failed, keeping the previous manifests: {error:#}"),
        }
    }
}

/// Modification times and sizes of the manifest files: a change of any reloads.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The manifest paths given on the command line.
#[derive(Debug)]
pub struct Manifests {
    paths: Vec<PathBuf>,
}

impl Manifests {
    /// Files and folders of manifests.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self { paths }
    }

    fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for path in &self.paths {
            if path.is_dir() {
                let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                    .with_context(|| format!("reading folder {}", path.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && is_manifest(p))
                    .collect();
                found.sort();
                files.extend(found);
            } else {
                files.push(path.clone());
            }
        }
        Ok(files)
    }

    fn stamp(&self) -> Stamp {
        self.files()
            .unwrap_or_default()
            .into_iter()
            .map(|f| {
                let meta = std::fs::metadata(&f).ok();
                let modified = meta.as_ref().and_then(|m| m.modified().ok());
                let len = meta.map(|m| m.len()).unwrap_or_default();
                (f, modified, len)
            })
            .collect()
    }

    /// Reads and validates every file; duplicates across files are refused like within one.
    pub fn load(&self) -> anyhow::Result<(MeshFile, Stamp)> {
        let stamp = self.stamp();
        let mut merged = MeshFile::default();
        let mut seen = BTreeSet::new();
        for file in self.files()? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let parsed = MeshFile::parse(&text).with_context(|| format!("{}", file.display()))?;
            let names = parsed
                .queues
                .iter()
                .map(|q| {
                    (
                        "Queue",
                        namespace_of(q.metadata.namespace.as_ref()),
                        q.metadata.name.clone().unwrap_or_default(),
                    )
                })
                .chain(parsed.subscriptions.iter().map(|s| {
                    (
                        "Subscription",
                        namespace_of(s.metadata.namespace.as_ref()),
                        s.metadata.name.clone().unwrap_or_default(),
                    )
                }))
                .chain(parsed.sidecars.iter().map(|d| {
                    (
                        "Sidecar",
                        namespace_of(d.metadata.namespace.as_ref()),
                        d.metadata.name.clone(),
                    )
                }));
            for (kind, ns, name) in names {
                if !seen.insert((kind, ns.clone(), name.clone())) {
                    anyhow::bail!(
                        "{}: {kind} {ns}/{name} is declared in another file too",
                        file.display()
                    );
                }
            }
            merged.queues.extend(parsed.queues);
            merged.subscriptions.extend(parsed.subscriptions);
            merged.sidecars.extend(parsed.sidecars);
        }
        if self.files()?.is_empty() {
            anyhow::bail!("no manifests found in {}", display_paths(&self.paths));
        }
        Ok((merged, stamp))
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn namespace_of(namespace: Option<&String>) -> String {
    namespace.cloned().unwrap_or_else(|| "default".to_owned())
}

/// A sidecar that announced itself (`qmesh run`).
#[derive(Clone, Debug)]
struct Registered {
    info: SidecarInfo,
    session: u64,
}

#[derive(Default)]
struct State {
    file: MeshFile,
    registered: BTreeMap<SidecarKey, Registered>,
    /// Sessions of connected sidecars.
    connected: BTreeMap<SidecarKey, u64>,
    stats: BTreeMap<SidecarKey, (u64, Stats)>,
    mesh: MeshState,
}

/// The local control plane's view of the mesh.
pub struct DevSource {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    /// Print sidecars joining and leaving (`qmesh dev`); quiet inside `demo` and `bench`.
    verbose: bool,
}

impl std::fmt::Debug for DevSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevSource").finish_non_exhaustive()
    }
}

// === impl DevSource ===

impl DevSource {
    /// A control plane over these manifests.
    pub fn new(file: MeshFile) -> Self {
        let mut state = State {
            file,
            ..State::default()
        };
        state.rebuild();
        Self {
            state: Mutex::new(state),
            changes: watch::channel(0).0,
            verbose: true,
        }
    }

    /// Without the join / leave lines.
    pub fn quiet(mut self) -> Self {
        self.verbose = false;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    fn summary(&self) -> String {
        let state = self.lock();
        format!(
            "{} queues, {} subscriptions, {} declared sidecars",
            state.file.queues.len(),
            state.file.subscriptions.len(),
            state.file.sidecars.len()
        )
    }

    /// What the web console shows: the status `qmesh get` prints, of every namespace.
    pub fn console_snapshot(&self) -> Snapshot {
        Snapshot {
            status: self.lock().status(""),
        }
    }

    /// Swaps in newly loaded manifests; returns what changed, one line each.
    pub fn replace_manifests(&self, file: MeshFile) -> Vec<String> {
        let lines = {
            let mut state = self.lock();
            let lines = diff(&state.file, &file);
            state.file = file;
            state.rebuild();
            lines
        };
        self.changed();
        lines
    }
}

impl State {
    fn rebuild(&mut self) {
        let mut mesh = self.file.to_state();
        for (key, registered) in &self.registered {
            mesh.apply_sidecar(key.clone(), registered.info.clone());
        }
        self.mesh = mesh;
    }

    fn declared(&self, key: &SidecarKey) -> Option<&SidecarDocument> {
        self.file.sidecars.iter().find(|d| {
            d.metadata.name == key.name
                && namespace_of(d.metadata.namespace.as_ref()) == key.namespace
        })
    }
}

#[tonic::async_trait]
impl MeshSource for DevSource {
    /// A local mesh has no tokens: whoever reaches the (loopback) control plane may be any
    /// sidecar, as service account `default`; what the certificate still guarantees is that a
    /// peer is the sidecar the view names at that address, and that plaintext is never spoken.
    async fn service_account(&self, hello: &Hello) -> Result<String, String> {
        if hello.name.is_empty() || hello.namespace.is_empty() {
            return Err("a sidecar must give its namespace and name".into());
        }
        Ok(LOCAL_SERVICE_ACCOUNT.to_owned())
    }

    async fn admit(&self, hello: &Hello, session: u64) -> Result<(), String> {
        let key = SidecarKey::new(&hello.namespace, &hello.name);
        {
            let mut state = self.lock();
            if state.declared(&key).is_none() {
                if !state.registered.contains_key(&key) && state.registered.len() >= MAX_REGISTERED
                {
                    return Err(format!(
                        "this local control plane already has {MAX_REGISTERED} self-registered sidecars"
                    ));
                }
                if hello.peer_address.is_empty() {
                    return Err(format!(
                        "sidecar {}/{} is not declared in the manifests and announced no peer address",
                        key.namespace, key.name
                    ));
                }
                let info = SidecarInfo {
                    labels: hello
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    service_account: LOCAL_SERVICE_ACCOUNT.to_owned(),
                    peer_address: hello.peer_address.clone(),
                    ready: true,
                };
                state
                    .registered
                    .insert(key.clone(), Registered { info, session });
                state.rebuild();
            }
            state.connected.insert(key.clone(), session);
        }
        if self.verbose {
            println!(
                "sidecar {}/{} joined (peer {}, labels {})",
                key.namespace,
                key.name,
                hello.peer_address,
                format_labels(hello.labels.iter())
            );
        }
        self.changed();
        Ok(())
    }

    fn view_for(&self, key: &SidecarKey) -> Option<MeshView> {
        self.lock().mesh.view_for(key)
    }

    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn record_stats(&self, key: &SidecarKey, session: u64, stats: Stats) {
        self.lock().stats.insert(key.clone(), (session, stats));
    }

    fn left(&self, key: &SidecarKey, session: u64) {
        let gone = {
            let mut state = self.lock();
            if state.stats.get(key).is_some_and(|(s, _)| *s == session) {
                state.stats.remove(key);
            }
            if state.connected.get(key) == Some(&session) {
                state.connected.remove(key);
            }
            let registered = state
                .registered
                .get(key)
                .is_some_and(|r| r.session == session);
            if registered {
                state.registered.remove(key);
                state.rebuild();
            }
            registered
        };
        if gone && self.verbose {
            println!("sidecar {}/{} left", key.namespace, key.name);
        }
        if gone {
            self.changed();
        }
    }

    /// Anyone who reaches the loopback control plane may browse, redrive and purge: it is the
    /// developer's own machine, as for the sidecars' app APIs.
    async fn authorize_held(
        &self,
        _access: &qmesh_proto::join::HeldAccess<'_>,
        _caller: Option<&str>,
    ) -> Result<(), tonic::Status> {
        Ok(())
    }

    /// Anyone who reaches the loopback control plane may read the local mesh.
    async fn status(
        &self,
        request: &StatusRequest,
        _caller: Option<&str>,
    ) -> Result<MeshStatus, tonic::Status> {
        Ok(self.lock().status(&request.namespace))
    }
}

impl State {
    fn status(&self, only: &str) -> MeshStatus {
        let stats = self
            .stats
            .iter()
            .map(|(k, (_, s))| (k.clone(), s))
            .collect();
        summary::summarize(
            &self.mesh,
            &stats,
            |key| self.connected.contains_key(key),
            only,
        )
    }
}

fn format_labels<'a>(labels: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<String> = labels.map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    if pairs.is_empty() {
        "none".to_owned()
    } else {
        pairs.join(",")
    }
}

/// What differs between two sets of manifests, one line per object.
fn diff(old: &MeshFile, new: &MeshFile) -> Vec<String> {
    fn by_key<T: Clone, K: Ord>(items: &[T], key: impl Fn(&T) -> K) -> BTreeMap<K, T> {
        items.iter().map(|i| (key(i), i.clone())).collect()
    }
    fn compare<K: Ord + std::fmt::Display, T>(
        kind: &str,
        old: &BTreeMap<K, T>,
        new: &BTreeMap<K, T>,
        same: impl Fn(&T, &T) -> bool,
        lines: &mut Vec<String>,
    ) {
        for (key, item) in new {
            match old.get(key) {
                None => lines.push(format!("{kind} {key} created")),
                Some(before) if !same(before, item) => lines.push(format!("{kind} {key} changed")),
                Some(_) => {}
            }
        }
        for key in old.keys().filter(|k| !new.contains_key(k)) {
            lines.push(format!("{kind} {key} deleted"));
        }
    }
    let queue_key = |q: &Queue| {
        QualifiedName(
            namespace_of(q.metadata.namespace.as_ref()),
            q.metadata.name.clone().unwrap_or_default(),
        )
    };
    let sub_key = |s: &Subscription| {
        QualifiedName(
            namespace_of(s.metadata.namespace.as_ref()),
            s.metadata.name.clone().unwrap_or_default(),
        )
    };
    let sidecar_key = |d: &SidecarDocument| {
        QualifiedName(
            namespace_of(d.metadata.namespace.as_ref()),
            d.metadata.name.clone(),
        )
    };
    let mut lines = Vec::new();
    compare(
        "queue",
        &by_key(&old.queues, queue_key),
        &by_key(&new.queues, queue_key),
        |a, b| a.spec == b.spec,
        &mut lines,
    );
    compare(
        "subscription",
        &by_key(&old.subscriptions, sub_key),
        &by_key(&new.subscriptions, sub_key),
        |a, b| a.spec == b.spec,
        &mut lines,
    );
    compare(
        "sidecar",
        &by_key(&old.sidecars, sidecar_key),
        &by_key(&new.sidecars, sidecar_key),
        |a, b| a.spec == b.spec && a.metadata.labels == b.metadata.labels,
        &mut lines,
    );
    lines
}

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct QualifiedName(String, String);

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// Whether `path` looks like a manifest file `qmesh dev` would read.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec: {publishers: {matchLabels: {app: shop}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
"#;

    fn hello(name: &str, app: &str, port: u16) -> Hello {
        Hello {
            namespace: "default".into(),
            name: name.into(),
            peer_address: format!("127.0.0.1:{port}"),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn self_registered_sidecars_get_the_views_the_operator_would_send() {
        let source = DevSource::new(MeshFile::parse(ORDERS).unwrap());
        source
            .admit(&hello("shop-1", "shop", 9001), 1)
            .await
            .unwrap();
        source
            .admit(&hello("billing-1", "billing", 9002), 2)
            .await
            .unwrap();
        let shop = source
            .view_for(&SidecarKey::new("default", "shop-1"))
            .unwrap();
        assert_eq!(shop.queues[0].name, "orders");
        assert_eq!(
            shop.queues[0].routes[0].consumers[0].peer_address,
            "127.0.0.1:9002"
        );
        let billing = source
            .view_for(&SidecarKey::new("default", "billing-1"))
            .unwrap();
        assert_eq!(billing.subscriptions[0].name, "billing");
        let status = source
            .status(&StatusRequest::default(), None)
            .await
            .unwrap();
        assert_eq!(status.queues[0].publishers, 1);
        assert_eq!(status.subscriptions[0].consumers, 1);
        // Leaving removes the sidecar from the others' views; an older session's end does not.
        source.left(&SidecarKey::new("default", "billing-1"), 7);
        assert!(
            source
                .view_for(&SidecarKey::new("default", "billing-1"))
                .is_some()
        );
        source.left(&SidecarKey::new("default", "billing-1"), 2);
        let shop = source
            .view_for(&SidecarKey::new("default", "shop-1"))
            .unwrap();
        assert!(shop.queues[0].routes[0].consumers.is_empty());
    }

    #[tokio::test]
    async fn an_undeclared_sidecar_without_an_address_is_refused() {
        let source = DevSource::new(MeshFile::parse(ORDERS).unwrap());
        let mut anonymous = hello("x", "shop", 1);
        anonymous.peer_address.clear();
        let reason = source.admit(&anonymous, 1).await.unwrap_err();
        assert!(reason.contains("not declared"), "{reason}");
    }

    #[test]
    fn a_reload_reports_what_changed() {
        let old = MeshFile::parse(ORDERS).unwrap();
        let edited = ORDERS.replace("app: billing", "app: accounting")
            + "---\napiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: audit}\nspec: {}\n";
        let new = MeshFile::parse(&edited).unwrap();
        assert_eq!(
            diff(&old, &new),
            [
                "queue default/audit created",
                "subscription default/billing changed"
            ]
        );
        assert_eq!(diff(&new, &old)[0], "queue default/audit deleted");
    }
}
