//! How large a gRPC message may be on each API, following the view: every request body is read
//! through [`Bounded`], which checks each message's 5-byte length prefix against the API's current
//! limit before tonic buffers the message, so a client announcing more than any queue here allows
//! is refused (`RESOURCE_EXHAUSTED`, naming the limit) having cost a few bytes, not the frame.
//!
//! ```text
//!   view ──watch──▶ FrameLimits::follow ──▶ app  limit: largest maxMessageBytes the app may publish
//!                                       └──▶ peer limit: one 4 MiB batch + the largest message of any
//!                                                        queue owned or consumed here
//!   request body ──▶ Bounded (checks each length prefix) ──▶ tonic decoder (static 64 MiB ceiling)
//! ```
//!
//! Until the first view is in force the ceiling holds (nothing is ready to serve before it).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::http;
use tonic::body::Body;

use crate::view::{View, ViewRx};

/// The absolute ceiling of a gRPC message on any API (the largest `maxMessageBytes` a Queue may
/// set, plus room for the envelope).
pub const CEILING: usize = 64 * 1024 * 1024 + ENVELOPE;

/// Room for what a message carries besides payload and headers (id, key, times, framing).
pub const ENVELOPE: usize = 64 * 1024;

/// Most bytes of messages in one peer batch (a hand-over, a replica batch, forwarded deliveries);
/// a single larger message still goes alone.
pub const PEER_BATCH_BYTES: usize = 4 * 1024 * 1024 - ENVELOPE;

/// The absolute ceiling of a peer frame: one batch and the largest message a Queue may set.
pub const PEER_FRAME_CEILING: usize = CEILING + PEER_BATCH_BYTES + ENVELOPE;

/// The smallest limit of the app API: acks, nacks and credits of a large window fit.
const APP_FLOOR: usize = 4 * 1024 * 1024;

/// `items` in order, cut into batches of at most `max` bytes by `size` (an item larger than `max`
/// goes alone).
pub fn batches<T>(items: Vec<T>, size: impl Fn(&T) -> usize, max: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        let n = size(&item);
        if !batch.is_empty() && bytes.saturating_add(n) > max {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes = bytes.saturating_add(n);
        batch.push(item);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// The current limits, shared by the servers' layers and updated from the view.
#[derive(Clone, Debug)]
pub struct FrameLimits {
    app: Arc<AtomicUsize>,
    peer: Arc<AtomicUsize>,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            app: Arc::new(AtomicUsize::new(CEILING)),
            peer: Arc::new(AtomicUsize::new(CEILING)),
        }
    }
}

impl FrameLimits {
    /// The limits a view implies.
    pub fn of(view: &View) -> (usize, usize) {
        let as_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let app = view
            .queues()
            .iter()
            .filter(|q| q.app_may_publish)
            .filter_map(|q| q.policy.as_ref().map(|p| as_usize(p.max_message_bytes)))
            .max()
            .unwrap_or(0);
        let received = view
            .queues()
            .iter()
            .filter_map(|q| q.policy.as_ref().map(|p| as_usize(p.max_message_bytes)))
            .chain(
                view.subscriptions()
                    .iter()
                    .map(|s| as_usize(s.max_message_bytes)),
            )
            .max()
            .unwrap_or(0);
        (
            app.saturating_add(ENVELOPE).clamp(APP_FLOOR, CEILING),
            (PEER_BATCH_BYTES + ENVELOPE)
                .saturating_add(received)
                .saturating_add(ENVELOPE)
                .min(PEER_FRAME_CEILING),
        )
    }

    /// Keeps the limits in step with the view, for as long as it is followed.
    pub async fn follow(self, mut view: ViewRx) {
        loop {
            let (app, peer) = {
                let v = view.borrow_and_update();
                if v.version() > 0 {
                    Self::of(&v)
                } else {
                    (CEILING, CEILING)
                }
            };
            self.app.store(app, Ordering::Relaxed);
            self.peer.store(peer, Ordering::Relaxed);
            if view.changed().await.is_err() {
                return;
            }
        }
    }

    /// The layer bounding the app API's messages.
    pub fn app_layer(&self) -> FrameLimitLayer {
        FrameLimitLayer {
            limit: Arc::clone(&self.app),
            api: "app",
        }
    }

    /// The layer bounding the peer API's messages.
    pub fn peer_layer(&self) -> FrameLimitLayer {
        FrameLimitLayer {
            limit: Arc::clone(&self.peer),
            api: "peer",
        }
    }

    /// The app API's current limit.
    pub fn app(&self) -> usize {
        self.app.load(Ordering::Relaxed)
    }
}

/// A tower layer reading request bodies through [`Bounded`].
#[derive(Clone, Debug)]
pub struct FrameLimitLayer {
    limit: Arc<AtomicUsize>,
    api: &'static str,
}

impl<S> tower::Layer<S> for FrameLimitLayer {
    type Service = FrameLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FrameLimited {
            inner,
            limit: Arc::clone(&self.limit),
            api: self.api,
        }
    }
}

/// A service whose request bodies are read through [`Bounded`].
#[derive(Clone, Debug)]
pub struct FrameLimited<S> {
    inner: S,
    limit: Arc<AtomicUsize>,
    api: &'static str,
}

impl<S> tower::Service<http::Request<Body>> for FrameLimited<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (limit, api) = (Arc::clone(&self.limit), self.api);
        self.inner
            .call(request.map(|body| Body::new(Bounded::new(body, limit, api))))
    }
}

/// A gRPC request body whose messages are checked against a limit as their length prefixes go by.
pub struct Bounded {
    inner: Body,
    limit: Arc<AtomicUsize>,
    api: &'static str,
    /// Bytes of the current length prefix seen so far.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    left: usize,
}

impl Bounded {
    fn new(inner: Body, limit: Arc<AtomicUsize>, api: &'static str) -> Self {
        Self {
            inner,
            limit,
            api,
            prefix: [0; 5],
            have: 0,
            left: 0,
        }
    }

    /// Follows the framing through `data`; the refusal of the first message over the limit.
    fn check(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.left > 0 {
                let skip = self.left.min(data.len());
                self.left -= skip;
                data.advance(skip);
                continue;
            }
            self.prefix[self.have] = data[0];
            self.have += 1;
            data.advance(1);
            if self.have == self.prefix.len() {
                self.have = 0;
                let [_, a, b, c, d] = self.prefix;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                let limit = self.limit.load(Ordering::Relaxed);
                if len > limit {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "a {} API message of {len} bytes is over this sidecar's limit of {limit} \
                         bytes (derived from the maxMessageBytes of the queues it serves)",
                        self.api
                    )));
                }
                self.left = len;
            }
        }
        Ok(())
    }
}

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = self.check(data)
                {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(lens: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &len in lens {
            out.push(0);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend(std::iter::repeat_n(7u8, len as usize));
        }
        out
    }

    fn bounded(limit: usize) -> Bounded {
        Bounded::new(Body::empty(), Arc::new(AtomicUsize::new(limit)), "test")
    }

    #[test]
    fn batches_stay_within_their_bytes_and_keep_order() {
        let sizes = vec![3, 3, 5, 20, 1, 1, 1, 9];
        let cut = batches(sizes, |n| *n, 10);
        assert_eq!(cut, [vec![3, 3], vec![5], vec![20], vec![1, 1, 1], vec![9]]);
        assert!(batches(Vec::<usize>::new(), |n| *n, 10).is_empty());
    }

    #[test]
    fn messages_within_the_limit_pass_in_any_chunking() {
        let bytes = framed(&[0, 10, 3, 10]);
        for chunk in 1..bytes.len() {
            let mut b = bounded(10);
            for part in bytes.chunks(chunk) {
                assert!(b.check(part).is_ok(), "chunks of {chunk}");
            }
        }
    }

    #[test]
    fn the_first_message_over_the_limit_is_refused_from_its_prefix() {
        let bytes = framed(&[4, 11]);
        let mut b = bounded(10);
        // The refusal comes from the five prefix bytes, before any of the message.
        let refused = b.check(&bytes[..4 + 5 + 5]).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("11 bytes"),
            "{}",
            refused.message()
        );
    }
}
