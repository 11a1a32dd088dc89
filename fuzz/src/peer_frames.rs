//! `peer_frames`: arbitrary bytes decoded as each peer-API message a sidecar receives
//! ([`OwnerFrame`], [`ConsumerFrame`], [`ReplicateFrame`], [`HandOverBatch`]) with
//! `prost::Message::decode`, and every wire value a receiver turns into time put through the same
//! conversions the sidecar applies:
//!
//! * `PeerDelivery.ack_timeout` → [`convert::std_duration`] → `Instant::now() + d` (a plain add, as
//!   in `consumer::Consumers::accept`: the clamp to [`convert::MAX_WIRE_DURATION`] is what keeps it
//!   from overflowing);
//! * `PeerNack.delay` → `std_duration` → `min(MAX_NACK_DELAY)` → [`queue::later`] (the owner);
//! * `Message.publish_time` → `SystemTime::try_from` → `duration_since` (end-to-end latency), the
//!   dedup-window deadline `checked_add` → `dedup::unix_ms`, and `to_string()` (the HTTP poll
//!   answer's `publishTime`);
//! * `SidecarId.name` → `replica::valid_owner_name`.

use std::time::{Duration, Instant, SystemTime};

use prost::Message as _;
use qmesh_proto::{
    convert, peer,
    peer::{ConsumerFrame, HandOverBatch, OwnerFrame, ReplicateFrame},
    v1,
};
use qmesh_sidecar::{owner::queue, replica, store::dedup};

/// One fuzz input.
pub fn run(data: &[u8]) {
    if let Ok(frame) = OwnerFrame::decode(data) {
        owner_frame(&frame);
    }
    if let Ok(frame) = ConsumerFrame::decode(data) {
        consumer_frame(&frame);
    }
    if let Ok(frame) = ReplicateFrame::decode(data) {
        replicate_frame(&frame);
    }
    if let Ok(batch) = HandOverBatch::decode(data) {
        if let Some(from) = &batch.from {
            sidecar_id(from);
        }
        for m in &batch.messages {
            owned_message(m);
        }
    }
}

fn owner_frame(frame: &OwnerFrame) {
    use peer::owner_frame::Frame;
    match &frame.frame {
        Some(Frame::Hello(hello)) => {
            if let Some(owner) = &hello.owner {
                sidecar_id(owner);
            }
        }
        Some(Frame::Deliveries(batch)) => {
            for d in &batch.deliveries {
                if let Some(timeout) = &d.ack_timeout {
                    let timeout = wire_duration(timeout);
                    // As the consumer side computes a lease deadline.
                    let _deadline = Instant::now() + timeout;
                }
                if let Some(m) = &d.message {
                    message(m);
                }
            }
        }
        Some(Frame::Withdraw(_) | Frame::Demand(_) | Frame::Returned(_)) | None => {}
    }
}

fn consumer_frame(frame: &ConsumerFrame) {
    use peer::consumer_frame::Frame;
    match &frame.frame {
        Some(Frame::Welcome(welcome)) => {
            if let Some(consumer) = &welcome.consumer {
                sidecar_id(consumer);
            }
        }
        Some(Frame::Settlements(settlements)) => {
            for nack in &settlements.nacks {
                // As the owner schedules a redelivery.
                let delay = nack.delay.as_ref().map(wire_duration);
                if let Some(d) = delay {
                    let wait = d.min(queue::MAX_NACK_DELAY);
                    let now = Instant::now();
                    let at = queue::later(now, wait);
                    assert!(at >= now, "a redelivery scheduled in the past");
                }
            }
        }
        Some(Frame::Credit(_) | Frame::Revoke(_)) | None => {}
    }
}

fn replicate_frame(frame: &ReplicateFrame) {
    use peer::replicate_frame::Frame;
    match &frame.frame {
        Some(Frame::Owner(owner)) => sidecar_id(owner),
        Some(Frame::Messages(batch)) => {
            for m in &batch.messages {
                owned_message(m);
            }
        }
        Some(Frame::Settled(_)) | None => {}
    }
}

fn owned_message(m: &peer::OwnedMessage) {
    if let Some(message) = &m.message {
        self::message(message);
    }
}

fn sidecar_id(id: &peer::SidecarId) {
    let _ = replica::valid_owner_name(&id.name);
}

/// A duration from the wire, checked against the documented clamp.
fn wire_duration(d: &prost_types::Duration) -> Duration {
    let std = convert::std_duration(d);
    assert!(
        std <= convert::MAX_WIRE_DURATION,
        "std_duration({d:?}) = {std:?} is above MAX_WIRE_DURATION"
    );
    if d.seconds < 0 {
        assert!(
            std < Duration::from_secs(1),
            "negative {d:?} became {std:?}"
        );
    }
    std
}

fn message(m: &v1::Message) {
    let Some(t) = m.publish_time else {
        return;
    };
    // The HTTP poll answer's `publishTime`.
    let _ = t.to_string();
    // End-to-end latency at delivery.
    let published = SystemTime::try_from(t).ok();
    let _e2e = published
        .and_then(|p| SystemTime::now().duration_since(p).ok())
        .map(|d| d.as_secs_f64());
    // The dedup deadline of a stored id (window at most MAX_WIRE_DURATION, like any wire duration).
    let published = published.unwrap_or_else(SystemTime::now);
    for window in [Duration::from_secs(600), convert::MAX_WIRE_DURATION] {
        let until = published
            .checked_add(window)
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(86_400));
        let _ = dedup::unix_ms(until);
    }
}
