//! `qmesh.v1.Broker` over gRPC for the app on localhost: unary and pipelined publish, the bidi
//! `Subscribe` stream with a window of in-flight deliveries refilled by acks and nacks, and
//! `Browse` / `Redrive` / `Purge` of held messages (the dead-letter tools), and transactions
//! (begin, publish naming one, commit or roll back).

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use qmesh_proto::v1::{
    self, PublishRequest, PublishResponse, PublishResult, SubscribeRequest, SubscribeResponse,
    broker_server::Broker, publish_result, subscribe_request, subscribe_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    Sidecar,
    error::BrokerError,
    owner::{Schedule, browse_limit, transactions::Decision},
};

/// Most publishes of one `PublishStream` in progress at once (pipelining depth).
const PIPELINE: usize = 256;

/// The gRPC app API.
pub struct BrokerService {
    sidecar: Arc<Sidecar>,
}

impl BrokerService {
    /// The service over a sidecar.
    pub fn new(sidecar: Arc<Sidecar>) -> Self {
        Self { sidecar }
    }

    async fn settle(
        &self,
        request: Request<v1::TransactionRequest>,
        decision: Decision,
    ) -> Result<Response<v1::TransactionResponse>, Status> {
        let id = request.into_inner().transaction;
        let settled = self.sidecar.owner.settle_transaction(&id, decision).await?;
        Ok(Response::new(settled))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerService {
    type PublishStreamStream = BoxStream<PublishResult>;
    type SubscribeStream = ReceiverStream<Result<SubscribeResponse, Status>>;

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let PublishRequest {
            queue,
            message,
            delay,
            deliver_at,
            transaction,
            ..
        } = request.into_inner();
        let message =
            message.ok_or_else(|| BrokerError::Invalid("publish without a message".into()))?;
        let schedule = Schedule::from_wire(delay, deliver_at)?;
        Ok(Response::new(
            self.sidecar
                .publish_scheduled(&queue, message, schedule, &transaction)
                .await?,
        ))
    }

    async fn browse(
        &self,
        request: Request<v1::BrowseRequest>,
    ) -> Result<Response<v1::BrowseResponse>, Status> {
        let v1::BrowseRequest { queue, max } = request.into_inner();
        Ok(Response::new(
            self.sidecar.owner.browse(&queue, browse_limit(max))?,
        ))
    }

    async fn redrive(
        &self,
        request: Request<v1::RedriveRequest>,
    ) -> Result<Response<v1::RedriveResponse>, Status> {
        let v1::RedriveRequest { queue, to, max } = request.into_inner();
        Ok(Response::new(
            self.sidecar
                .owner
                .redrive(&queue, &to, max as usize)
                .await?,
        ))
    }

    async fn purge(
        &self,
        request: Request<v1::PurgeRequest>,
    ) -> Result<Response<v1::PurgeResponse>, Status> {
        let v1::PurgeRequest { queue, max } = request.into_inner();
        Ok(Response::new(
            self.sidecar.owner.purge(&queue, max as usize)?,
        ))
    }

    async fn rewind(
        &self,
        request: Request<v1::RewindRequest>,
    ) -> Result<Response<v1::RewindResponse>, Status> {
        let v1::RewindRequest { subscription, to } = request.into_inner();
        let to = to
            .ok_or_else(|| BrokerError::Invalid("rewind without a `to` time".into()))
            .and_then(|t| {
                std::time::SystemTime::try_from(t)
                    .map_err(|e| BrokerError::Invalid(format!("rewind to an invalid time: {e}")))
            })?;
        Ok(Response::new(self.sidecar.rewind(&subscription, to).await?))
    }

    async fn begin_transaction(
        &self,
        _request: Request<v1::BeginTransactionRequest>,
    ) -> Result<Response<v1::BeginTransactionResponse>, Status> {
        Ok(Response::new(self.sidecar.owner.begin_transaction()?))
    }

    async fn commit_transaction(
        &self,
        request: Request<v1::TransactionRequest>,
    ) -> Result<Response<v1::TransactionResponse>, Status> {
        self.settle(request, Decision::Commit).await
    }

    async fn rollback_transaction(
        &self,
        request: Request<v1::TransactionRequest>,
    ) -> Result<Response<v1::TransactionResponse>, Status> {
        self.settle(request, Decision::Rollback).await
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let sidecar = Arc::clone(&self.sidecar);
        let results = request
            .into_inner()
            .map(move |item| {
                let sidecar = Arc::clone(&sidecar);
                async move {
                    let request = item?;
                    let schedule = Schedule::from_wire(request.delay, request.deliver_at);
                    let result = match (request.message, schedule) {
                        (None, _) => Err(BrokerError::Invalid("publish without a message".into())),
                        (_, Err(e)) => Err(e),
                        (Some(message), Ok(schedule)) => {
                            sidecar
                                .publish_scheduled(
                                    &request.queue,
                                    message,
                                    schedule,
                                    &request.transaction,
                                )
                                .await
                        }
                    };
                    Ok(PublishResult {
                        correlation: request.correlation,
                        result: Some(match result {
                            Ok(ok) => publish_result::Result::Ok(ok),
                            Err(e) => publish_result::Result::Error(e.to_proto()),
                        }),
                    })
                }
            })
            .buffer_unordered(PIPELINE);
        Ok(Response::new(Box::pin(results)))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(SubscribeRequest {
                request: Some(subscribe_request::Request::Open(open)),
            }) => open,
            _ => {
                return Err(Status::invalid_argument(
                    "the first request of Subscribe must be open",
                ));
            }
        };
        let consumers = Arc::clone(&self.sidecar.consumers);
        let sub = consumers.subscription(&open.subscription)?;
        let settings = sub.settings();
        let window = match open.max_in_flight {
            0 => settings.max_in_flight,
            n => n.min(settings.max_in_flight),
        }
        .clamp(1, crate::consumer::MAX_WINDOW);
        let manual = open.manual_credit;
        let (tx, rx) = mpsc::channel(16);
        tx.send(Ok(SubscribeResponse {
            response: Some(subscribe_response::Response::Subscribed(v1::Subscribed {
                queue: settings.queue.clone(),
                max_in_flight: window,
                ack_timeout: settings.ack_timeout,
            })),
        }))
        .await
        .map_err(|_| Status::cancelled("client went away"))?;
        let holder = consumers.new_holder();
        consumers.app_joined(&sub, Some(window));
        self.sidecar.tasks.spawn("app subscribe stream", async move {
            // Auto credit: the client may hold `window` deliveries; a slot frees when its lease ends
            // (ack, nack or ack timeout). Manual credit: what the client granted, minus what it got.
            let mut granted = 0u64;
            loop {
                let credit = if manual {
                    granted
                } else {
                    u64::from(window).saturating_sub(sub.held_by(holder) as u64)
                };
                tokio::select! {
                    request = inbound.message() => {
                        let request = match request {
                            Ok(Some(r)) => r,
                            _ => break,
                        };
                        match request.request {
                            Some(subscribe_request::Request::Ack(ack)) => {
                                consumers.settle(&sub, &ack.receipts, None).await;
                            }
                            Some(subscribe_request::Request::Nack(nack)) => {
                                let delay = nack.delay.as_ref().map(qmesh_proto::convert::std_duration);
                                let reason = if nack.reason.is_empty() { "nacked by consumer".to_owned() } else { nack.reason };
                                let nack_by = crate::consumer::Nack { delay, reason, dead_letter: nack.dead_letter };
                                consumers.settle(&sub, &nack.receipts, Some(nack_by)).await;
                            }
                            Some(subscribe_request::Request::Credit(c)) => {
                                granted = granted.saturating_add(u64::from(c.credits));
                            }
                            _ => {
                                let _ = tx.send(Err(Status::invalid_argument("open may only be sent once"))).await;
                                break;
                            }
                        }
                    }
                    // A lease may end without a request on this stream (ack timeout): look again.
                    _ = tokio::time::timeout(Duration::from_millis(500), sub.lease_released()), if credit == 0 => {}
                    deliveries = consumers.take(&sub, credit.min(256) as usize, Duration::from_secs(3600), holder), if credit > 0 => {
                        if deliveries.is_empty() { continue; }
                        if manual { granted -= (deliveries.len() as u64).min(granted); }
                        let response = SubscribeResponse {
                            response: Some(subscribe_response::Response::Deliveries(v1::Deliveries { deliveries })),
                        };
                        if tx.send(Ok(response)).await.is_err() { break; }
                    }
                }
            }
            consumers
                .release_holder(&sub, holder, "consumer stream closed")
                .await;
            consumers.app_left(&sub, Some(window)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
