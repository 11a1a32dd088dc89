//! Feeds the [`Index`] from watches of Pods, Queues and Subscriptions in every namespace.
//!
//! ```text
//!   kube watcher (list + watch, re-list on expiry, backoff) ──apply/delete──▶ Index
//! ```
//! After each (re-)list, objects the list no longer returned are deleted from the index. Once all
//! three kinds have listed once, [`Metrics::set_ready`] marks the replica ready.

use std::{collections::BTreeSet, fmt::Debug, sync::Arc};

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use qmesh_api::{Queue, Subscription};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{index::Index, metrics::Metrics};

/// How one kind is applied to and removed from the index.
trait Indexed: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static {
    const KIND: &'static str;
    fn apply(index: &Index, obj: &Self);
    fn delete(index: &Index, namespace: &str, name: &str);
    fn keys(index: &Index) -> Vec<(String, String)>;
}

impl Indexed for Pod {
    const KIND: &'static str = "Pod";
    fn apply(index: &Index, obj: &Self) {
        index.apply_pod(obj);
    }
    fn delete(index: &Index, namespace: &str, name: &str) {
        index.delete_pod(namespace, name);
    }
    fn keys(index: &Index) -> Vec<(String, String)> {
        index.pod_keys()
    }
}

impl Indexed for Queue {
    const KIND: &'static str = "Queue";
    fn apply(index: &Index, obj: &Self) {
        index.apply_queue(obj);
    }
    fn delete(index: &Index, namespace: &str, name: &str) {
        index.delete_queue(namespace, name);
    }
    fn keys(index: &Index) -> Vec<(String, String)> {
        index.queue_keys()
    }
}

impl Indexed for Subscription {
    const KIND: &'static str = "Subscription";
    fn apply(index: &Index, obj: &Self) {
        index.apply_subscription(obj);
    }
    fn delete(index: &Index, namespace: &str, name: &str) {
        index.delete_subscription(namespace, name);
    }
    fn keys(index: &Index) -> Vec<(String, String)> {
        index.subscription_keys()
    }
}

/// Runs the three watches until `shutdown`.
pub async fn run(
    client: Client,
    index: Arc<Index>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let (synced_tx, synced_rx) = watch::channel(0u8);
    let synced_tx = Arc::new(synced_tx);
    let ready = {
        let mut rx = synced_rx;
        let index = index.clone();
        async move {
            if rx.wait_for(|n| *n >= 3).await.is_ok() {
                index.mark_synced();
                metrics.set_ready();
                tracing::info!("indexes synced");
            }
            future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = watch_kind::<Pod>(Api::all(client.clone()), index.clone(), synced_tx.clone()) => {}
        () = watch_kind::<Queue>(Api::all(client.clone()), index.clone(), synced_tx.clone()) => {}
        () = watch_kind::<Subscription>(Api::all(client), index, synced_tx) => {}
        () = ready => {}
    }
}

async fn watch_kind<K: Indexed>(api: Api<K>, index: Arc<Index>, synced: Arc<watch::Sender<u8>>) {
    let mut seen: Option<BTreeSet<(String, String)>> = None;
    let mut listed_once = false;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(obj)) => K::apply(&index, &obj),
            Ok(watcher::Event::Delete(obj)) => {
                K::delete(
                    &index,
                    &obj.namespace().unwrap_or_default(),
                    &obj.name_any(),
                );
            }
            Ok(watcher::Event::Init) => seen = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(obj)) => {
                if let Some(seen) = seen.as_mut() {
                    seen.insert((obj.namespace().unwrap_or_default(), obj.name_any()));
                }
                K::apply(&index, &obj);
            }
            Ok(watcher::Event::InitDone) => {
                let seen = seen.take().unwrap_or_default();
                for (ns, name) in K::keys(&index) {
                    if !seen.contains(&(ns.clone(), name.clone())) {
                        K::delete(&index, &ns, &name);
                    }
                }
                if !listed_once {
                    listed_once = true;
                    synced.send_modify(|n| *n += 1);
                }
                tracing::debug!(kind = K::KIND, "index synced");
            }
            Err(error) => {
                let hint = if K::KIND == "Pod" {
                    ""
                } else {
                    " (are the qmesh CRDs installed?)"
                };
                tracing::warn!(%error, kind = K::KIND, "watch failed{hint}; retrying");
            }
        }
    }
}
