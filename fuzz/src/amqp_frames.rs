//! `amqp_frames`: arbitrary bytes read as the sidecar's AMQP listener reads them after the
//! handshake ([`qmesh_sidecar::amqp::split_frames`]: the frame-max check before buffering, then the
//! `amq-protocol` codec), with a 4096-byte frame-max; every content header's properties go through
//! the publish mapping ([`message::to_message`]) and, when accepted, back through the delivery
//! mapping ([`message::properties`]), which must give the same message again.

use amq_protocol::frame::AMQPFrame;
use qmesh_sidecar::amqp::{message, split_frames};

/// One fuzz input.
pub fn run(data: &[u8]) {
    for frame in split_frames(data, 4096) {
        let Ok(AMQPFrame::Header(_, header)) = frame else {
            continue;
        };
        let Ok(published) = message::to_message(&header.properties, b"body".to_vec()) else {
            continue;
        };
        // What a consumer gets back maps to the same message (headers, id) when published again.
        let delivered = message::properties(&published);
        let again = message::to_message(&delivered, b"body".to_vec())
            .expect("a delivery's properties are always publishable");
        assert_eq!(again.id, published.id);
        for (name, value) in &published.headers {
            if name.len() <= 255 {
                assert_eq!(again.headers.get(name), Some(value), "header {name:?}");
            }
        }
    }
}
