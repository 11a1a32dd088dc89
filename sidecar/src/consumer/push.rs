//! Push delivery: the sidecar POSTs each message to the app at `http://127.0.0.1:{port}{path}`,
//! as many at once as the subscription's window allows. 2xx = ack; 429 and 503 = retry after the
//! owner's backoff; any other status, a connection error or the ack timeout = nack with the status as
//! the reason.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use qmesh_proto::v1;

use super::{Consumers, LocalSub};

/// Pushes deliveries of `sub` to its app until the subscription goes away.
pub async fn run(consumers: Arc<Consumers>, sub: Arc<LocalSub>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let holder = consumers.new_holder();
    // The push endpoint is the consumer: it is present for as long as the subscription is pushed.
    consumers.app_joined(&sub, None);
    loop {
        let window = sub.window() as usize;
        let deliveries = consumers
            .take(&sub, window, Duration::from_secs(3600), holder)
            .await;
        for delivery in deliveries {
            let consumers = Arc::clone(&consumers);
            let sub = Arc::clone(&sub);
            let client = client.clone();
            let tasks = Arc::clone(&consumers.tasks);
            tasks.spawn("push request", async move {
                let receipt = delivery.receipt.clone();
                let outcome = push_one(&client, &consumers, &sub, delivery).await;
                let nack = match outcome {
                    Ok(status) if (200..300).contains(&status) => None,
                    Ok(status) => Some(super::Nack::retry(None, format!("push: HTTP {status}"))),
                    Err(reason) => Some(super::Nack::retry(None, format!("push: {reason}"))),
                };
                consumers.settle(&sub, &[receipt], nack).await;
            });
        }
    }
}

async fn push_one(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    consumers: &Consumers,
    sub: &LocalSub,
    delivery: v1::Delivery,
) -> Result<u16, String> {
    let settings = sub.settings();
    let port = consumers
        .app_port
        .unwrap_or_else(|| u16::try_from(settings.push_port).unwrap_or_default());
    let message = delivery.message.unwrap_or_default();
    let path = if settings.push_path.is_empty() {
        "/".to_owned()
    } else {
        settings.push_path.clone()
    };
    let mut request = hyper::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/octet-stream")
        .header("qmesh-id", &message.id)
        .header("qmesh-attempt", delivery.attempt.to_string())
        .header("qmesh-subscription", &settings.name)
        .header("qmesh-queue", &settings.queue);
    if !message.key.is_empty() {
        request = request.header("qmesh-key", &message.key);
    }
    for (name, value) in &message.headers {
        request = request.header(format!("qmesh-h-{name}"), value);
    }
    let request = request
        .body(Full::new(message.payload))
        .map_err(|e| e.to_string())?;
    let timeout = settings
        .ack_timeout
        .as_ref()
        .map(qmesh_proto::convert::std_duration)
        .unwrap_or(Duration::from_secs(30));
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => Err(format!("no answer within {}", qmesh_api::Duration(timeout))),
        Ok(Err(e)) => Err(format!("connection failed: {e}")),
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            Ok(status)
        }
    }
}
