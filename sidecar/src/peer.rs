//! The Peer API as served by this sidecar: `Forward` streams opened by owners (the consumer side
//! of forwarding), `Replicate` streams carrying standby copies for `publishAck: Replicated`
//! (stored by [`crate::replica`], one ack per batch once durable) and `HandOver` batches. A peer
//! that breaks the protocol — no `hello` / owner first, deliveries without credit, frames that do
//! not decode, malformed copies — gets its stream reset with a logged reason; what it had sent is
//! redelivered (Forward) or re-sent and its publishes failed (Replicate) by the owner, so nothing
//! is lost.
//!
//! Who may call comes from the client's certificate ([`PeerInfo`]), never from a frame: the name
//! an owner, a replicating owner or a handing-over sidecar gives must be its certificate's, and
//! it must be a sidecar this one's view works with — an owner of a served subscription for
//! `Forward` (checked again per delivery), a peer for `Replicate` and `HandOver`, a consumer of the
//! subscription for `Rewind`. Anyone else gets `PERMISSION_DENIED` and nothing is touched.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use qmesh_identity::{PeerInfo, WorkloadId};
use qmesh_proto::peer::{
    self, ConsumerFrame, HandOverAck, HandOverBatch, OwnerFrame, ReplicateAck, ReplicateFrame,
    consumer_frame, owner_frame, peer_server::Peer, replicate_frame,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{consumer::Consumers, replica::ReplicaStore, view::ViewRx};

/// The client's address, over TLS or not.
fn remote_of<T>(request: &Request<T>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.remote)
        .or_else(|| request.remote_addr())
}

/// Bound on frames queued towards one owner.
const OUTBOUND: usize = 1024;

/// The Peer service.
pub struct PeerService {
    consumers: Arc<Consumers>,
    owner: Arc<crate::owner::Owner>,
    replicas: Arc<ReplicaStore>,
    me: peer::SidecarId,
    tasks: Arc<crate::supervise::Supervisor>,
    view: ViewRx,
}

impl PeerService {
    /// The service for this sidecar.
    pub fn new(
        consumers: Arc<Consumers>,
        owner: Arc<crate::owner::Owner>,
        replicas: Arc<ReplicaStore>,
        me: peer::SidecarId,
        tasks: Arc<crate::supervise::Supervisor>,
        view: ViewRx,
    ) -> Self {
        Self {
            consumers,
            owner,
            replicas,
            me,
            tasks,
            view,
        }
    }

    /// The authenticated caller, which must be a sidecar of this namespace.
    fn caller<T>(&self, request: &Request<T>) -> Result<Option<Arc<WorkloadId>>, Status> {
        let id = PeerInfo::require(request.extensions().get::<PeerInfo>())?;
        if id.namespace != self.me.namespace {
            return Err(Status::permission_denied(format!(
                "{id} is not a sidecar of namespace {}",
                self.me.namespace
            )));
        }
        Ok(Some(id))
    }

    /// Refuses a frame naming a sidecar other than the caller's certificate.
    fn claims(caller: Option<&WorkloadId>, claimed: &str, what: &str) -> Result<(), Status> {
        match caller {
            Some(id) if id.sidecar != claimed => Err(Status::permission_denied(format!(
                "{what} names sidecar {claimed:?}, but the client certificate is {id}"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a caller that may own none of this sidecar's queues. Readiness does not count: a
    /// draining sidecar is no longer ready and still hands its backlog over.
    fn shares_a_queue(&self, caller: Option<&WorkloadId>, what: &str) -> Result<(), Status> {
        let Some(id) = caller else { return Ok(()) };
        if self.view.borrow().shares_a_queue_with(&id.sidecar) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{id} may not {what}: it may own none of the queues this sidecar does"
            )))
        }
    }

    /// Refuses a handed-over or replicated message of a queue its sender may not own (not
    /// selected by the Queue's `publishers`, nor by those of a queue dead-lettering into it). A
    /// queue this sidecar may not own either is left to the refusal that names it as such.
    fn may_own(view: &ViewRx, caller: Option<&WorkloadId>, queue: &str) -> Result<(), Status> {
        let Some(id) = caller else { return Ok(()) };
        let view = view.borrow();
        if view.queue(queue).is_none() || view.may_own(queue, &id.sidecar) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{id} may not own messages of queue {queue:?}: it is not selected by the Queue's \
                 spec.publishers (nor by those of a queue dead-lettering into it)"
            )))
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type ForwardStream = ReceiverStream<Result<ConsumerFrame, Status>>;
    type ReplicateStream = BoxStream<ReplicateAck>;
    type HandOverStream = BoxStream<HandOverAck>;

    async fn rewind(
        &self,
        request: Request<peer::PeerRewind>,
    ) -> Result<Response<peer::PeerRewound>, Status> {
        let caller = self.caller(&request)?;
        let peer::PeerRewind {
            queue,
            subscription,
            from,
        } = request.into_inner();
        if let Some(id) = &caller {
            let consumes = self.view.borrow().queue(&queue).is_some_and(|q| {
                q.routes.iter().any(|r| {
                    r.subscription == subscription
                        && r.consumers.iter().any(|c| c.name == id.sidecar)
                })
            });
            if !consumes {
                return Err(Status::permission_denied(format!(
                    "{id} is not a consumer of subscription {subscription} of queue {queue}"
                )));
            }
        }
        let from = from
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .ok_or_else(|| Status::invalid_argument("rewind without a valid `from` time"))?;
        let through = self.owner.rewind(&queue, &subscription, from);
        Ok(Response::new(peer::PeerRewound {
            replaying: through.is_some(),
            through: through.unwrap_or(0),
        }))
    }

    async fn forward(
        &self,
        request: Request<Streaming<OwnerFrame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let caller = self.caller(&request)?;
        let remote = remote_of(&request);
        let mut inbound = request.into_inner();
        let owner = match inbound.message().await? {
            Some(OwnerFrame {
                frame: Some(owner_frame::Frame::Hello(hello)),
            }) => hello
                .owner
                .ok_or_else(|| Status::invalid_argument("hello without owner"))?,
            _ => {
                return Err(Status::invalid_argument(
                    "the first frame of Forward must be hello",
                ));
            }
        };
        Self::claims(caller.as_deref(), &owner.name, "Forward's hello")?;
        if let Some(id) = &caller
            && !self.consumers.owner_known(&id.sidecar)
        {
            tracing::warn!(?remote, caller = %id, "forward stream refused: not an owner of a served subscription");
            return Err(Status::permission_denied(format!(
                "{id} owns no queue of a subscription consumed here"
            )));
        }
        let (tx, rx) = mpsc::channel(OUTBOUND);
        tx.send(Ok(ConsumerFrame {
            frame: Some(consumer_frame::Frame::Welcome(peer::Welcome {
                consumer: Some(self.me.clone()),
                protocol_revision: 1,
            })),
        }))
        .await
        .map_err(|_| Status::internal("stream closed"))?;
        let stream = self.consumers.register(owner.name.clone(), tx.clone());
        tracing::info!(owner = %owner.name, stream, ?remote, "owner stream opened");
        let consumers = Arc::clone(&self.consumers);
        self.tasks.spawn("forward stream", async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(OwnerFrame {
                        frame: Some(owner_frame::Frame::Deliveries(batch)),
                    })) => {
                        if let Err(status) = consumers.deliver(stream, batch) {
                            let _ = tx.send(Err(status.clone())).await;
                            break format!("protocol violation: {}", status.message());
                        }
                    }
                    Ok(Some(OwnerFrame {
                        frame: Some(owner_frame::Frame::Withdraw(w)),
                    })) => consumers.withdraw(stream, w),
                    Ok(Some(OwnerFrame {
                        frame: Some(owner_frame::Frame::Demand(d)),
                    })) => consumers.demand(stream, d),
                    Ok(Some(OwnerFrame {
                        frame: Some(owner_frame::Frame::Returned(r)),
                    })) => consumers.credit_returned(stream, r),
                    Ok(Some(_)) => {
                        let status = Status::invalid_argument("unexpected frame after hello");
                        let _ = tx.send(Err(status)).await;
                        break "protocol violation: unexpected frame".to_owned();
                    }
                    Ok(None) => break "closed by owner".to_owned(),
                    Err(status) => {
                        // A frame over the limit (or garbage) ends the stream; the peer is told why.
                        let reason = format!("stream error: {}", status.message());
                        let _ = tx.send(Err(status)).await;
                        break reason;
                    }
                }
            };
            consumers.unregister(stream);
            tracing::info!(owner = %owner.name, stream, %reason, "owner stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn replicate(
        &self,
        request: Request<Streaming<ReplicateFrame>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let caller = self.caller(&request)?;
        let remote = remote_of(&request);
        let mut inbound = request.into_inner();
        let owner = match inbound.message().await? {
            Some(ReplicateFrame {
                frame: Some(replicate_frame::Frame::Owner(owner)),
            }) => owner,
            _ => {
                tracing::warn!(
                    ?remote,
                    "replicate stream reset: the first frame must name the owner"
                );
                return Err(Status::invalid_argument(
                    "the first frame of Replicate must be the owner",
                ));
            }
        };
        Self::claims(caller.as_deref(), &owner.name, "Replicate's owner")?;
        self.shares_a_queue(caller.as_deref(), "replicate here")?;
        let guard = self.replicas.open_stream(&owner, &self.me).inspect_err(|status| {
            tracing::warn!(?remote, owner = %owner.name, reason = %status.message(), "replicate stream refused");
        })?;
        let replicas = Arc::clone(&self.replicas);
        let view = self.view.clone();
        let (tx, rx) = mpsc::channel(OUTBOUND);
        tracing::info!(owner = %owner.name, incarnation = owner.incarnation, ?remote, "replicate stream opened");
        self.tasks.spawn("replicate stream", async move {
            let _guard = guard;
            let mut durable_through = 0u64;
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(ReplicateFrame {
                        frame: Some(replicate_frame::Frame::Messages(batch)),
                    })) => {
                        let high = batch.messages.iter().map(|m| m.sequence).max();
                        if let Err(status) = batch
                            .messages
                            .iter()
                            .try_for_each(|m| Self::may_own(&view, caller.as_deref(), &m.queue))
                        {
                            let reason = format!("refused a batch: {}", status.message());
                            let _ = tx.send(Err(status)).await;
                            break reason;
                        }
                        match replicas.accept(&owner.name, batch).await {
                            Ok(()) => {
                                // One ack per batch, in order: the owner counts them.
                                durable_through = durable_through.max(high.unwrap_or(0));
                                if tx.send(Ok(ReplicateAck { durable_through })).await.is_err() {
                                    break "closed by owner".to_owned();
                                }
                            }
                            Err(status) => {
                                let reason = format!("refused a batch: {}", status.message());
                                let _ = tx.send(Err(status)).await;
                                break reason;
                            }
                        }
                    }
                    Ok(Some(ReplicateFrame {
                        frame: Some(replicate_frame::Frame::Settled(range)),
                    })) => {
                        let dropped = replicas.settle(&owner.name, &range);
                        tracing::trace!(owner = %owner.name, below = range.below, dropped, "settled copies dropped");
                    }
                    Ok(Some(_)) => {
                        let status = Status::invalid_argument("unexpected frame after the owner");
                        let _ = tx.send(Err(status)).await;
                        break "protocol violation: unexpected frame".to_owned();
                    }
                    Ok(None) => break "closed by owner".to_owned(),
                    Err(status) => {
                        // A frame over the limit (or garbage) ends the stream; the peer is told why.
                        let reason = format!("stream error: {}", status.message());
                        let _ = tx.send(Err(status)).await;
                        break reason;
                    }
                }
            };
            tracing::info!(owner = %owner.name, %reason, copies = replicas.count(&owner.name), "replicate stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn hand_over(
        &self,
        request: Request<Streaming<HandOverBatch>>,
    ) -> Result<Response<Self::HandOverStream>, Status> {
        let caller = self.caller(&request)?;
        self.shares_a_queue(caller.as_deref(), "hand messages over")?;
        let mut inbound = request.into_inner();
        let owner = Arc::clone(&self.owner);
        let view = self.view.clone();
        let (tx, rx) = mpsc::channel(16);
        self.tasks.spawn("hand-over stream", async move {
            loop {
                let batch = match inbound.message().await {
                    Ok(Some(batch)) => batch,
                    Ok(None) => return,
                    Err(status) => {
                        tracing::warn!(reason = %status.message(), "hand-over stream reset");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let from = batch.from.as_ref().map(|f| f.name.as_str()).unwrap_or_default();
                let allowed = Self::claims(caller.as_deref(), from, "a hand-over batch").and_then(|()| {
                    batch.messages.iter().try_for_each(|m| {
                        Self::may_own(&view, caller.as_deref(), &m.queue)
                    })
                });
                if let Err(status) = allowed {
                    tracing::warn!(reason = %status.message(), "hand-over stream reset");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let mut error = None;
                let count = batch.messages.len();
                let mut adopted = 0u32;
                for message in batch.messages {
                    if let Err(e) = owner.adopt(message).await {
                        error = Some(e.to_proto());
                        break;
                    }
                    adopted += 1;
                }
                let from = batch.from.map(|f| f.name).unwrap_or_default();
                match &error {
                    None => {
                        tracing::info!(%from, messages = count, batch = batch.batch, "took over messages")
                    }
                    Some(e) => {
                        tracing::warn!(%from, batch = batch.batch, reason = %e.message, "refused a hand-over batch")
                    }
                }
                if tx
                    .send(Ok(HandOverAck {
                        batch: batch.batch,
                        error,
                        adopted,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
