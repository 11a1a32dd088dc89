//! AMQP frames off the socket: the frame header is read first, so a frame larger than the
//! negotiated `frame-max` is refused before its payload is buffered; then the payload and its end
//! octet go to the `amq-protocol` codec. A bad frame becomes the reply that closes the connection.
//!
//! ```text
//!   socket ──7-byte header──▶ type known? size ≤ frame-max? ──payload + 0xCE──▶ parse_frame ──▶ connection
//!                                   └────────── no: 501 / 502 reply, reading stops ──────────────┘
//! ```

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use amq_protocol::{
    frame::{AMQPFrame, parse_frame},
    protocol::{AMQPClass, constants},
};
use tokio::{
    io::{AsyncReadExt, BufReader},
    net::tcp::OwnedReadHalf,
    sync::mpsc,
};

/// AMQP 0-9-1 reply codes (spec 1.2).
pub(super) mod reply {
    pub const NO_ROUTE: u16 = 312;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// A reply code with its text and the method it is about.
#[derive(Debug)]
pub(super) struct Reply {
    pub code: u16,
    pub text: String,
    pub class: u16,
    pub method: u16,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
            class: 0,
            method: 0,
        }
    }

    pub fn about(mut self, method: &AMQPClass) -> Self {
        self.class = method.get_amqp_class_id();
        self.method = method.get_amqp_method_id();
        self
    }
}

/// Reads frames: type, channel and size first, so a frame larger than `frame-max` is refused before
/// it is buffered; then the payload and the end octet, parsed by the codec.
pub(super) async fn read_frames(
    read: OwnedReadHalf,
    limit: Arc<AtomicU32>,
    frames: mpsc::Sender<Result<AMQPFrame, Reply>>,
) {
    let mut read = BufReader::with_capacity(64 * 1024, read);
    loop {
        let mut head = [0u8; 7];
        if read.read_exact(&mut head).await.is_err() {
            return;
        }
        let result = match frame_size(&head, limit.load(Ordering::Relaxed)) {
            Err(reply) => Err(reply),
            Ok(size) => {
                let mut frame = Vec::with_capacity(7 + size + 1);
                frame.extend_from_slice(&head);
                frame.resize(7 + size + 1, 0);
                if read.read_exact(&mut frame[7..]).await.is_err() {
                    return;
                }
                parse(&frame)
            }
        };
        let failed = result.is_err();
        if frames.send(result).await.is_err() || failed {
            return;
        }
    }
}

/// The payload size a frame header announces, if its type is known and it fits `limit`.
fn frame_size(head: &[u8; 7], limit: u32) -> Result<usize, Reply> {
    let kind = head[0];
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
    if !matches!(
        kind,
        constants::FRAME_METHOD
            | constants::FRAME_HEADER
            | constants::FRAME_BODY
            | constants::FRAME_HEARTBEAT
    ) {
        return Err(Reply::new(
            reply::FRAME_ERROR,
            format!("unknown frame type {kind}: not AMQP 0-9-1"),
        ));
    }
    if size > limit {
        return Err(Reply::new(
            reply::FRAME_ERROR,
            format!("frame of {size} bytes exceeds the negotiated frame-max of {limit}"),
        ));
    }
    Ok(size as usize)
}

/// One whole frame (header, payload, end octet) parsed by the codec.
fn parse(frame: &[u8]) -> Result<AMQPFrame, Reply> {
    if frame.last() != Some(&constants::FRAME_END) {
        return Err(Reply::new(
            reply::FRAME_ERROR,
            "frame without its end octet (0xCE)",
        ));
    }
    match parse_frame(frame) {
        Ok((_, parsed)) => Ok(parsed),
        Err(_) if frame[0] == constants::FRAME_METHOD && frame.len() >= 12 => {
            let class = u16::from_be_bytes([frame[7], frame[8]]);
            let method = u16::from_be_bytes([frame[9], frame[10]]);
            Err(Reply {
                code: reply::SYNTAX_ERROR,
                text: format!("could not parse method {class}.{method} (class.method ids)"),
                class,
                method,
            })
        }
        Err(_) => Err(Reply::new(
            reply::FRAME_ERROR,
            format!("malformed frame of type {}", frame[0]),
        )),
    }
}

/// Splits bytes into frames exactly as the listener reads them (the fuzz target's entry): each
/// frame parsed, or the reply code and text that would close the connection (reading stops there).
pub fn split_frames(mut bytes: &[u8], frame_max: u32) -> Vec<Result<AMQPFrame, (u16, String)>> {
    let mut out = Vec::new();
    while bytes.len() >= 7 {
        let head: [u8; 7] = bytes[..7].try_into().expect("seven bytes");
        let size = match frame_size(&head, frame_max) {
            Ok(size) => size,
            Err(reply) => {
                out.push(Err((reply.code, reply.text)));
                break;
            }
        };
        let Some(frame) = bytes.get(..7 + size + 1) else {
            break;
        };
        bytes = &bytes[frame.len()..];
        let parsed = parse(frame).map_err(|r| (r.code, r.text));
        let failed = parsed.is_err();
        out.push(parsed);
        if failed {
            break;
        }
    }
    out
}
