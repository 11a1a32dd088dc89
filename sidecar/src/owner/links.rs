//! Owner side of the peer API: one `Forward` stream per consumer sidecar, opened on demand when a
//! route names it, re-opened with backoff when it drops. Deliveries go out only against credits the
//! consumer granted; credits, settlements and link losses come back to the owner as events.
//!
//! ```text
//!   owner ──OwnerFrame (hello, deliveries)──▶ consumer sidecar
//!         ◀──ConsumerFrame (welcome, credit, settlements)──
//! ```

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use qmesh_proto::peer::{self, OwnerFrame, consumer_frame, owner_frame, peer_client::PeerClient};
use tokio::sync::mpsc;

use crate::identity::Dialer;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

/// What links report to the owner.
#[derive(Debug)]
pub enum LinkEvent {
    /// New credits for a subscription on a link.
    Credit {
        /// The subscription.
        subscription: String,
    },
    /// Outcomes of deliveries sent on a link.
    Settlements {
        /// Link connection id.
        link: u64,
        /// The batch.
        settlements: peer::Settlements,
    },
    /// A link connection ended: its in-flight deliveries must be redelivered.
    Lost {
        /// Link connection id.
        link: u64,
    },
    /// A link connection is up: queues report their demand on it and dispatch.
    Up,
}

/// Most distinct subscriptions a consumer may grant credits for on one link.
const MAX_SUBSCRIPTIONS_PER_LINK: usize = 1024;

/// Outbound frames a link connection may queue: deliveries are bounded by credits, so this only
/// guards against a consumer that grants absurdly many.
const LINK_QUEUE: usize = 4096;

struct Connection {
    id: u64,
    tx: mpsc::Sender<OwnerFrame>,
    credits: HashMap<String, u32>,
    /// What was last reported as `Demand` per subscription (has ready messages).
    demand: HashMap<String, bool>,
}

struct Link {
    connection: Mutex<Option<Connection>>,
    task: tokio::task::AbortHandle,
}

/// All links of this owner, keyed by consumer peer address.
pub struct Links {
    me: peer::SidecarId,
    tasks: Arc<crate::supervise::Supervisor>,
    dialer: Arc<Dialer>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    next_id: AtomicU64,
    events: mpsc::Sender<LinkEvent>,
}

impl Links {
    /// Links that report to `events`, identifying this sidecar as `me`.
    pub fn new(
        me: peer::SidecarId,
        events: mpsc::Sender<LinkEvent>,
        tasks: Arc<crate::supervise::Supervisor>,
        dialer: Arc<Dialer>,
    ) -> Arc<Self> {
        Arc::new(Self {
            me,
            tasks,
            dialer,
            links: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            events,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Link>>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current connection id to `addr`, starting a link if there is none yet.
    pub fn connection_to(self: &Arc<Self>, addr: &str) -> Option<u64> {
        let link = {
            let mut links = self.lock();
            if let Some(link) = links.get(addr) {
                Arc::clone(link)
            } else {
                let link = Arc::new_cyclic(|weak: &std::sync::Weak<Link>| {
                    let weak = weak.clone();
                    let this = Arc::clone(self);
                    let addr = addr.to_owned();
                    Link {
                        connection: Mutex::new(None),
                        task: self
                            .tasks
                            .spawn(format!("peer link to {addr}"), async move {
                                this.run(addr, weak).await
                            }),
                    }
                });
                links.insert(addr.to_owned(), Arc::clone(&link));
                link
            }
        };
        let connection = link.connection.lock().unwrap_or_else(|e| e.into_inner());
        connection.as_ref().map(|c| c.id)
    }

    /// Whether the link to `addr` is connected (starts none).
    pub fn connected(&self, addr: &str) -> bool {
        self.lock().get(addr).is_some_and(|link| {
            link.connection
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        })
    }

    /// Takes one credit for `subscription` on connection `id`.
    pub fn take_credit(&self, id: u64, subscription: &str) -> bool {
        self.with_connection(id, |c| match c.credits.get_mut(subscription) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .unwrap_or(false)
    }

    /// Every link with its connection and the credits and demand it holds per subscription, for
    /// the admin stats.
    pub fn credit_table(&self) -> Vec<serde_json::Value> {
        self.lock()
            .iter()
            .map(|(addr, link)| {
                let connection = link.connection.lock().unwrap_or_else(|e| e.into_inner());
                match connection.as_ref() {
                    Some(c) => serde_json::json!({
                        "consumer": addr, "link": c.id, "credits": c.credits, "demand": c.demand,
                    }),
                    None => serde_json::json!({ "consumer": addr, "link": null }),
                }
            })
            .collect()
    }

    /// Returns a credit that was taken but not used.
    pub fn return_credit(&self, id: u64, subscription: &str) {
        self.with_connection(id, |c| {
            *c.credits.entry(subscription.to_owned()).or_default() += 1
        });
    }

    /// Tells the consumer on connection `id` whether this owner has messages ready for
    /// `subscription` (only when that changed since the last report).
    pub fn report_demand(&self, id: u64, subscription: &str, ready: usize) {
        self.with_connection(id, |c| {
            let has = ready > 0;
            if c.demand.get(subscription).copied().unwrap_or(false) == has {
                return;
            }
            let frame = OwnerFrame {
                frame: Some(owner_frame::Frame::Demand(peer::Demand {
                    subscription: subscription.to_owned(),
                    ready: ready as u64,
                })),
            };
            if c.tx.try_send(frame).is_ok() {
                c.demand.insert(subscription.to_owned(), has);
            }
        });
    }

    /// The consumer address connection `id` goes to.
    pub fn address_of(&self, id: u64) -> Option<String> {
        let links = self.lock();
        links.iter().find_map(|(addr, link)| {
            link.connection
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|c| c.id == id)
                .map(|_| addr.clone())
        })
    }

    /// Sends deliveries on connection `id`; false if the connection is gone or saturated.
    pub fn send(&self, id: u64, deliveries: Vec<peer::PeerDelivery>) -> bool {
        let frame = OwnerFrame {
            frame: Some(owner_frame::Frame::Deliveries(peer::DeliveryBatch {
                deliveries,
            })),
        };
        self.with_connection(id, |c| c.tx.try_send(frame).is_ok())
            .unwrap_or(false)
    }

    /// Stops links to addresses no route names any more.
    pub fn retain(&self, wanted: &std::collections::HashSet<String>) {
        let mut links = self.lock();
        links.retain(|addr, link| {
            let keep = wanted.contains(addr);
            if !keep {
                link.task.abort();
                if let Some(c) = link
                    .connection
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                {
                    let _ = self.events.try_send(LinkEvent::Lost { link: c.id });
                }
            }
            keep
        });
    }

    fn with_connection<T>(&self, id: u64, f: impl FnOnce(&mut Connection) -> T) -> Option<T> {
        let links = self.lock();
        for link in links.values() {
            let mut connection = link.connection.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = connection.as_mut().filter(|c| c.id == id) {
                return Some(f(c));
            }
        }
        None
    }

    async fn run(self: Arc<Self>, addr: String, link: std::sync::Weak<Link>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.connect_once(&addr, &link).await {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(error) => {
                    tracing::debug!(%error, peer = %addr, "peer link failed");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn connect_once(&self, addr: &str, link: &std::sync::Weak<Link>) -> anyhow::Result<()> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = self.dialer.connect(endpoint, addr, None).await?;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(crate::frames::CEILING)
            .max_encoding_message_size(crate::frames::PEER_FRAME_CEILING);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        tx.send(OwnerFrame {
            frame: Some(owner_frame::Frame::Hello(peer::Hello {
                owner: Some(self.me.clone()),
                protocol_revision: 1,
            })),
        })
        .await?;
        let mut inbound = client.forward(ReceiverStream::new(rx)).await?.into_inner();
        match inbound.next().await {
            Some(Ok(peer::ConsumerFrame {
                frame: Some(consumer_frame::Frame::Welcome(_)),
            })) => {}
            other => anyhow::bail!("peer {addr} did not welcome us: {other:?}"),
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Some(link) = link.upgrade() else {
            return Ok(());
        };
        *link.connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(Connection {
            id,
            tx,
            credits: HashMap::new(),
            demand: HashMap::new(),
        });
        tracing::info!(peer = %addr, link = id, "peer link up");
        let _ = self.events.send(LinkEvent::Up).await;
        let result = async {
            while let Some(frame) = inbound.next().await {
                match frame?.frame {
                    Some(consumer_frame::Frame::Credit(grant)) => {
                        {
                            let mut connection =
                                link.connection.lock().unwrap_or_else(|e| e.into_inner());
                            // Bounded by what a consumer may name: a peer cannot grow this map.
                            if let Some(c) = connection.as_mut()
                                && (c.credits.len() < MAX_SUBSCRIPTIONS_PER_LINK
                                    || c.credits.contains_key(&grant.subscription))
                            {
                                let n = c.credits.entry(grant.subscription.clone()).or_default();
                                *n = n.saturating_add(grant.credits).min(1_000_000);
                            }
                        }
                        let _ = self
                            .events
                            .send(LinkEvent::Credit {
                                subscription: grant.subscription,
                            })
                            .await;
                    }
                    Some(consumer_frame::Frame::Revoke(revoke)) => {
                        // Give back what is unused; deliveries that used credit before this are
                        // already queued ahead of the answer.
                        let answer = {
                            let mut connection =
                                link.connection.lock().unwrap_or_else(|e| e.into_inner());
                            connection.as_mut().map(|c| {
                                let n = c.credits.entry(revoke.subscription.clone()).or_default();
                                let give = (*n).min(revoke.credits);
                                *n -= give;
                                (c.tx.clone(), give)
                            })
                        };
                        if let Some((tx, credits)) = answer {
                            let frame = OwnerFrame {
                                frame: Some(owner_frame::Frame::Returned(peer::CreditReturn {
                                    subscription: revoke.subscription,
                                    credits,
                                })),
                            };
                            tx.send(frame).await?;
                        }
                    }
                    Some(consumer_frame::Frame::Settlements(settlements)) => {
                        let _ = self
                            .events
                            .send(LinkEvent::Settlements {
                                link: id,
                                settlements,
                            })
                            .await;
                    }
                    Some(consumer_frame::Frame::Welcome(_)) | None => {
                        anyhow::bail!("unexpected frame from {addr}")
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        link.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let _ = self.events.send(LinkEvent::Lost { link: id }).await;
        tracing::info!(peer = %addr, link = id, "peer link down");
        result
    }
}
