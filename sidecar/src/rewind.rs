//! `Rewind`: a subscription this pod consumes replayed from a time. Every owner of its queue keeps
//! its own log, so the sidecar asks each of them — itself, and the owners its view names — over
//! the Peer API; each replays what it still keeps and delivers it over the usual Forward streams.
//!
//! ```text
//!   app / qmesh sub rewind ──Rewind(sub, to)──▶ this sidecar ──▶ own owner ─┐
//!                                               └─Peer/Rewind──▶ owners ────┴─▶ replay from the log
//! ```

use std::time::{Duration, SystemTime};

use qmesh_proto::{peer::PeerRewind, peer::peer_client::PeerClient, v1};

use crate::{Sidecar, error::BrokerError};

/// How long one owner may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

impl Sidecar {
    /// Replays `subscription` from messages published at or after `to`, on every owner.
    pub async fn rewind(
        &self,
        subscription: &str,
        to: SystemTime,
    ) -> Result<v1::RewindResponse, BrokerError> {
        let (queue, owners) = {
            let view = self.view.borrow();
            let served = view
                .subscription(subscription)
                .ok_or_else(|| BrokerError::UnknownSubscription(subscription.to_owned()))?;
            let owners: Vec<(String, String)> = served
                .owners
                .iter()
                .filter(|o| o.name != self.me.name && !o.peer_address.is_empty())
                .map(|o| (o.name.clone(), o.peer_address.clone()))
                .collect();
            (served.queue.clone(), owners)
        };
        let mut answer = v1::RewindResponse {
            asked: 1,
            ..Default::default()
        };
        if self.owner.rewind(&queue, subscription, to).is_some() {
            answer.replaying += 1;
        }
        let request = PeerRewind {
            queue: queue.clone(),
            subscription: subscription.to_owned(),
            from: Some(to.into()),
        };
        let asks = owners.into_iter().map(|(name, addr)| {
            let request = request.clone();
            async move {
                let result = tokio::time::timeout(
                    ASK_TIMEOUT,
                    ask(self.owner.dialer(), &name, &addr, request),
                )
                .await;
                (addr, result)
            }
        });
        for (addr, result) in futures::future::join_all(asks).await {
            answer.asked += 1;
            match result {
                Ok(Ok(true)) => answer.replaying += 1,
                Ok(Ok(false)) => {}
                Ok(Err(error)) => answer.unreachable.push(format!("{addr}: {error}")),
                Err(_) => answer
                    .unreachable
                    .push(format!("{addr}: no answer within {ASK_TIMEOUT:?}")),
            }
        }
        tracing::info!(
            subscription,
            queue,
            asked = answer.asked,
            replaying = answer.replaying,
            unreachable = answer.unreachable.len(),
            "rewind"
        );
        Ok(answer)
    }
}

async fn ask(
    dialer: &crate::identity::Dialer,
    name: &str,
    addr: &str,
    request: PeerRewind,
) -> Result<bool, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2));
    let channel = dialer
        .connect(endpoint, addr, Some(name))
        .await
        .map_err(|e| format!("{e:#}"))?;
    let answer = PeerClient::new(channel)
        .rewind(request)
        .await
        .map_err(|s| s.message().to_owned())?;
    Ok(answer.into_inner().replaying)
}
