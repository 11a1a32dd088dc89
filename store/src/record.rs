//! Record framing of the message log. Every record is
//!
//! ```text
//!   ┌──────────┬──────────┬──────────┬──────┬──────────────┐
//!   │ len: u32 │ crc: u32 │ seq: u64 │ kind │ body …       │   little-endian
//!   └──────────┴──────────┴──────────┴──────┴──────────────┘
//!     len  = bytes after the crc (seq + kind + body)
//!     crc  = CRC-32C of those bytes
//! ```
//!
//! Decoding never panics: a short buffer is a torn tail, a bad length or checksum is corruption, and
//! both tell the caller where the good data ends.

use qmesh_proto::v1;

/// Bytes of `len` + `crc`.
pub const HEADER: usize = 8;
/// Largest record accepted (a 64 MiB message plus metadata) — by decoding and, the same limit, by
/// every writer: a record replay would reject is never written.
pub const MAX_RECORD: usize = 64 * 1024 * 1024 + 64 * 1024;

/// Whether a framed record of `framed` bytes (header included) is within [`MAX_RECORD`].
pub fn fits(framed: usize) -> bool {
    framed.saturating_sub(HEADER) <= MAX_RECORD
}

/// What a record says.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A new message, owed to `pending` subscriptions.
    Message {
        /// Queue.
        queue: String,
        /// The message (protobuf-encoded in the record).
        message: v1::Message,
        /// Subscriptions that owe an ack.
        pending: Vec<String>,
    },
    /// A subscription finished with message `target`.
    Settle {
        /// Queue.
        queue: String,
        /// Subscription.
        subscription: String,
        /// The message's sequence.
        target: u64,
        /// 0 = acked, 1 = dead-lettered.
        outcome: u8,
    },
    /// Delivery attempts so far of `target` for a subscription.
    Attempt {
        /// Queue.
        queue: String,
        /// Subscription.
        subscription: String,
        /// The message's sequence.
        target: u64,
        /// Attempts.
        attempts: u32,
    },
    /// A stored message's id, remembered for de-duplication until `until_ms` (the dedup journal).
    Remember {
        /// Queue.
        queue: String,
        /// The message id.
        id: String,
        /// The message's sequence.
        target: u64,
        /// Unix time in milliseconds after which the id is forgotten.
        until_ms: u64,
    },
    /// The first sequence not yet used, written at the start of every segment: numbering never
    /// goes backwards, even once every segment that held a message is deleted.
    Floor {
        /// Next free sequence.
        next: u64,
    },
    /// A live message copied forward by compaction, keeping its original sequence and state.
    Relocated {
        /// Queue.
        queue: String,
        /// The message.
        message: v1::Message,
        /// Subscriptions that owe an ack, with attempts so far.
        pending: Vec<(String, u32)>,
        /// The message's original sequence.
        target: u64,
    },
    /// The owner stopped keeping new messages of `queue` in memory from sequence `from` on: they
    /// stay in the log only, from `(segment, offset)`, until it pages them in.
    Spill {
        /// Queue.
        queue: String,
        /// First sequence kept on disk only.
        from: u64,
        /// Segment of that message's record.
        segment: u64,
        /// Offset of that record.
        offset: u64,
    },
    /// The owner read spilled messages of `queue` back into memory, through sequence `through`;
    /// the next page-in starts at `(segment, offset)`.
    PagedIn {
        /// Queue.
        queue: String,
        /// Highest sequence now in memory.
        through: u64,
        /// Segment the next page-in reads from.
        segment: u64,
        /// Offset it reads from.
        offset: u64,
    },
    /// Every spilled message of `queue` is back in memory: new ones are kept there again.
    SpillEnd {
        /// Queue.
        queue: String,
    },
}

const KIND_MESSAGE: u8 = 1;
const KIND_SETTLE: u8 = 2;
const KIND_ATTEMPT: u8 = 3;
const KIND_RELOCATED: u8 = 4;
const KIND_REMEMBER: u8 = 5;
const KIND_FLOOR: u8 = 6;
const KIND_SPILL: u8 = 7;
const KIND_PAGED_IN: u8 = 8;
const KIND_SPILL_END: u8 = 9;

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not enough bytes for a whole record: a torn write at the tail.
    Torn,
    /// A length out of range or a checksum mismatch.
    Corrupt(&'static str),
}

/// Appends a framed message record to `out` without building a [`Body`] (the append hot path).
pub fn encode_message<S: AsRef<str>>(
    seq: u64,
    queue: &str,
    message: &v1::Message,
    pending: &[S],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(KIND_MESSAGE);
    put_str(out, queue);
    put_message(out, message);
    put_u32(out, pending.len() as u32);
    for p in pending {
        put_str(out, p.as_ref());
    }
    seal(start, out);
}

/// Appends the framed record to `out`.
pub fn encode(seq: u64, body: &Body, out: &mut Vec<u8>) {
    let start = out.len();
    match body {
        Body::Message {
            queue,
            message,
            pending,
        } => {
            return encode_message(seq, queue, message, pending, out);
        }
        Body::Settle {
            queue,
            subscription,
            target,
            outcome,
        } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_SETTLE);
            put_str(out, queue);
            put_str(out, subscription);
            out.extend_from_slice(&target.to_le_bytes());
            out.push(*outcome);
        }
        Body::Attempt {
            queue,
            subscription,
            target,
            attempts,
        } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_ATTEMPT);
            put_str(out, queue);
            put_str(out, subscription);
            out.extend_from_slice(&target.to_le_bytes());
            put_u32(out, *attempts);
        }
        Body::Floor { next } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_FLOOR);
            out.extend_from_slice(&next.to_le_bytes());
        }
        Body::Remember {
            queue,
            id,
            target,
            until_ms,
        } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_REMEMBER);
            put_str(out, queue);
            put_str(out, id);
            out.extend_from_slice(&target.to_le_bytes());
            out.extend_from_slice(&until_ms.to_le_bytes());
        }
        Body::Spill {
            queue,
            from,
            segment,
            offset,
        } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_SPILL);
            put_str(out, queue);
            for v in [from, segment, offset] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Body::PagedIn {
            queue,
            through,
            segment,
            offset,
        } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_PAGED_IN);
            put_str(out, queue);
            for v in [through, segment, offset] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Body::SpillEnd { queue } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_SPILL_END);
            put_str(out, queue);
        }
        Body::Relocated {
            queue,
            message,
            pending,
            target,
        } => {
            out.extend_from_slice(&[0u8; HEADER]);
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(KIND_RELOCATED);
            put_str(out, queue);
            put_message(out, message);
            put_u32(out, pending.len() as u32);
            for (p, a) in pending {
                put_str(out, p);
                put_u32(out, *a);
            }
            out.extend_from_slice(&target.to_le_bytes());
        }
    }
    seal(start, out);
}

/// Fills in the length and checksum of the record that starts at `start`.
fn seal(start: usize, out: &mut [u8]) {
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Checks the record at the start of `buf` and, when it is a message, returns its sequence and
/// queue without decoding the message (replay passes over spilled messages this way).
/// Borrows from `buf`: replay passes over millions of spilled messages, and allocates nothing for
/// each but the list of who owes it.
pub fn peek_message(buf: &[u8]) -> Result<Option<MessageHead<'_>>, DecodeError> {
    let data = checked(buf)?;
    let mut r = Reader { buf: data, pos: 0 };
    let seq = r.u64()?;
    if r.u8()? != KIND_MESSAGE {
        return Ok(None);
    }
    let queue = r.str()?;
    let n = r.u32()? as usize;
    let message = r.take(n)?;
    let n = r.u32()? as usize;
    let mut pending = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        pending.push(r.str()?);
    }
    if r.pos != data.len() {
        return Err(DecodeError::Corrupt("trailing bytes in record"));
    }
    Ok(Some(MessageHead {
        seq,
        queue,
        message,
        pending,
    }))
}

/// The checked bytes after the header of the record at the start of `buf`.
fn checked(buf: &[u8]) -> Result<&[u8], DecodeError> {
    if buf.len() < HEADER {
        return Err(DecodeError::Torn);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if !(9..=MAX_RECORD).contains(&len) {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    if buf.len() < HEADER + len {
        return Err(DecodeError::Torn);
    }
    let data = &buf[HEADER..HEADER + len];
    if crc32c::crc32c(data) != crc {
        return Err(DecodeError::Corrupt("checksum mismatch"));
    }
    Ok(data)
}

/// Decodes the record at the start of `buf`: `(seq, body, bytes used)`.
pub fn decode(buf: &[u8]) -> Result<(u64, Body, usize), DecodeError> {
    let data = checked(buf)?;
    let len = data.len();
    let mut r = Reader { buf: data, pos: 0 };
    let seq = r.u64()?;
    let body = match r.u8()? {
        KIND_MESSAGE => {
            let queue = r.string()?;
            let message = r.message()?;
            let n = r.u32()? as usize;
            let mut pending = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                pending.push(r.string()?);
            }
            Body::Message {
                queue,
                message,
                pending,
            }
        }
        KIND_SETTLE => Body::Settle {
            queue: r.string()?,
            subscription: r.string()?,
            target: r.u64()?,
            outcome: r.u8()?,
        },
        KIND_ATTEMPT => Body::Attempt {
            queue: r.string()?,
            subscription: r.string()?,
            target: r.u64()?,
            attempts: r.u32()?,
        },
        KIND_RELOCATED => {
            let queue = r.string()?;
            let message = r.message()?;
            let n = r.u32()? as usize;
            let mut pending = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                pending.push((r.string()?, r.u32()?));
            }
            Body::Relocated {
                queue,
                message,
                pending,
                target: r.u64()?,
            }
        }
        KIND_FLOOR => Body::Floor { next: r.u64()? },
        KIND_SPILL => Body::Spill {
            queue: r.string()?,
            from: r.u64()?,
            segment: r.u64()?,
            offset: r.u64()?,
        },
        KIND_PAGED_IN => Body::PagedIn {
            queue: r.string()?,
            through: r.u64()?,
            segment: r.u64()?,
            offset: r.u64()?,
        },
        KIND_SPILL_END => Body::SpillEnd { queue: r.string()? },
        KIND_REMEMBER => Body::Remember {
            queue: r.string()?,
            id: r.string()?,
            target: r.u64()?,
            until_ms: r.u64()?,
        },
        _ => return Err(DecodeError::Corrupt("unknown record kind")),
    };
    if r.pos != data.len() {
        return Err(DecodeError::Corrupt("trailing bytes in record"));
    }
    Ok((seq, body, HEADER + len))
}

/// A message record's sequence, queue and owing subscriptions, read without decoding the message.
#[derive(Debug)]
pub struct MessageHead<'a> {
    /// Sequence.
    pub seq: u64,
    /// Queue.
    pub queue: &'a str,
    /// The message, protobuf-encoded (not decoded).
    pub message: &'a [u8],
    /// Subscriptions that owe an ack.
    pub pending: Vec<&'a str>,
}

/// The one field of a message that replay needs without the rest: decoding it passes over the
/// payload without copying it.
#[derive(Clone, PartialEq, prost::Message)]
struct PublishTimeOnly {
    #[prost(message, optional, tag = "5")]
    publish_time: Option<prost_types::Timestamp>,
}

/// Unix milliseconds of a message's publish time (0 when it has none or it is negative).
pub fn published_ms(message: &v1::Message) -> u64 {
    timestamp_ms(message.publish_time.as_ref())
}

/// [`published_ms`] of a protobuf-encoded message, without decoding its payload (0 when it does
/// not decode).
pub fn published_ms_of(encoded: &[u8]) -> u64 {
    use prost::Message as _;
    PublishTimeOnly::decode(encoded).map_or(0, |m| timestamp_ms(m.publish_time.as_ref()))
}

fn timestamp_ms(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map_or(0, |t| {
        u64::try_from(t.seconds)
            .unwrap_or(0)
            .saturating_mul(1000)
            .saturating_add(u64::try_from(t.nanos).unwrap_or(0) / 1_000_000)
    })
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

fn put_message(out: &mut Vec<u8>, m: &v1::Message) {
    use prost::Message as _;
    put_u32(out, m.encoded_len() as u32);
    // Encoding into a Vec cannot run out of space.
    let _ = m.encode(out);
}

/// Little-endian fields of a record (or of an index entry), checked against its end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Corrupt("length overflow"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Corrupt("field past record end"))?;
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Corrupt("invalid UTF-8"))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::Corrupt("invalid UTF-8"))
    }

    fn message(&mut self) -> Result<v1::Message, DecodeError> {
        use prost::Message as _;
        let n = self.u32()? as usize;
        v1::Message::decode(self.take(n)?).map_err(|_| DecodeError::Corrupt("undecodable message"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str) -> v1::Message {
        v1::Message {
            id: id.into(),
            payload: vec![7u8; 100].into(),
            headers: [("a".to_owned(), "b".to_owned())].into(),
            key: "k".into(),
            publish_time: None,
        }
    }

    fn samples() -> Vec<Body> {
        vec![
            Body::Message {
                queue: "orders".into(),
                message: message("m1"),
                pending: vec!["billing".into(), "shipping".into()],
            },
            Body::Settle {
                queue: "orders".into(),
                subscription: "billing".into(),
                target: 1,
                outcome: 0,
            },
            Body::Attempt {
                queue: "orders".into(),
                subscription: "billing".into(),
                target: 1,
                attempts: 3,
            },
            Body::Relocated {
                queue: "orders".into(),
                message: message("m2"),
                pending: vec![("billing".into(), 2)],
                target: 9,
            },
            Body::Remember {
                queue: "orders".into(),
                id: "order-7".into(),
                target: 9,
                until_ms: 1_780_000_000_000,
            },
            Body::Floor { next: 42 },
            Body::Spill {
                queue: "orders".into(),
                from: 10,
                segment: 3,
                offset: 4096,
            },
            Body::PagedIn {
                queue: "orders".into(),
                through: 12,
                segment: 3,
                offset: 8192,
            },
            Body::SpillEnd {
                queue: "orders".into(),
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for (i, body) in samples().into_iter().enumerate() {
            let mut buf = Vec::new();
            encode(i as u64 + 1, &body, &mut buf);
            let (seq, decoded, used) = decode(&buf).unwrap();
            assert_eq!((seq, &decoded, used), (i as u64 + 1, &body, buf.len()));
        }
    }

    #[test]
    fn a_peeked_message_head_matches_the_decoded_record() {
        let mut buf = Vec::new();
        encode(5, &samples()[0], &mut buf);
        let head = peek_message(&buf).unwrap().unwrap();
        assert_eq!((head.seq, head.queue), (5, "orders"));
        assert_eq!(head.pending, vec!["billing", "shipping"]);
        let mut settle = Vec::new();
        encode(0, &samples()[1], &mut settle);
        assert!(peek_message(&settle).unwrap().is_none());
    }

    #[test]
    fn a_truncated_record_is_a_torn_tail() {
        let mut buf = Vec::new();
        encode(1, &samples()[0], &mut buf);
        for cut in [0, 3, HEADER, buf.len() - 1] {
            assert_eq!(
                decode(&buf[..cut]).unwrap_err(),
                DecodeError::Torn,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode(1, &samples()[0], &mut buf);
        for i in HEADER..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(decode(&bad), Err(DecodeError::Corrupt(_))),
                "flip at byte {i}"
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678_u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 33) as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
        // A huge declared length is refused, not allocated.
        let mut huge = vec![0xff, 0xff, 0xff, 0x7f];
        huge.extend_from_slice(&[0; 20]);
        assert!(matches!(decode(&huge), Err(DecodeError::Corrupt(_))));
    }
}
