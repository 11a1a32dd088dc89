//! Replay from the log: the acked messages a queue keeps (`retention.keepAcked`, like Kafka's
//! `retention.ms`) and the replays that owe them to one subscription again (`startAt` of a new
//! subscription, `qmesh sub rewind`).
//!
//! ```text
//!   settled everywhere ──keepAcked?──▶ kept: runs per segment, until publish + keepAcked ──▶ released
//!                      ──otherwise───▶ released at once
//!   replay(sub, from, through) ── scan the log from its oldest segment, one page at a time:
//!       held, not owed to sub ──────────▶ owed again (a copy records it)
//!       settled, publish + keepAcked > now ─▶ copied forward, held, owed to sub
//!       spilled ───────────────────────▶ the scan waits until it is paged in
//!       older than `from`, filtered out, newer than `through`, no longer kept ──▶ passed over
//! ```
//!
//! Kept messages cost no memory per message: a run per (segment, second) of publish time.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::log::Position;

/// Acked messages kept in the log for replay, oldest first.
#[derive(Debug, Default)]
pub struct Kept {
    runs: VecDeque<KeptRun>,
    /// Record bytes kept.
    pub bytes: u64,
    /// Messages kept.
    pub messages: u64,
}

#[derive(Debug, Clone, Copy)]
struct KeptRun {
    /// Unix ms after which the run may go.
    until_ms: u64,
    segment: u64,
    messages: u64,
    bytes: u64,
}

/// Records handed back to the log: `(segment, messages)`.
pub type Released = Vec<(u64, u64)>;

impl Kept {
    /// Keeps a settled message's record until `until_ms`.
    pub fn keep(&mut self, at: Position, until_ms: u64) {
        self.keep_run(at.segment, 1, u64::from(at.len), until_ms);
    }

    /// Keeps `messages` settled records of `segment` until `until_ms`.
    pub fn keep_run(&mut self, segment: u64, messages: u64, bytes: u64, until_ms: u64) {
        self.bytes += bytes;
        self.messages += messages;
        if let Some(last) = self.runs.back_mut()
            && last.segment == segment
            && until_ms.abs_diff(last.until_ms) < 1000
        {
            last.messages += messages;
            last.bytes += bytes;
            last.until_ms = last.until_ms.max(until_ms);
            return;
        }
        self.runs.push_back(KeptRun {
            until_ms,
            segment,
            messages,
            bytes,
        });
    }

    /// Runs whose time is up at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Released {
        let mut released = Vec::new();
        while self.runs.front().is_some_and(|r| r.until_ms <= now_ms) {
            if let Some(run) = self.pop() {
                released.push(run);
            }
        }
        released
    }

    /// The oldest runs, until at least `bytes` are freed (room for a publish inside a byte limit:
    /// what is only kept goes before anything owed).
    pub fn shed(&mut self, bytes: u64) -> Released {
        let mut freed = 0;
        let mut released = Vec::new();
        while freed < bytes
            && let Some(run) = self.runs.front().copied()
        {
            self.pop();
            freed += run.bytes;
            released.push((run.segment, run.messages));
        }
        released
    }

    /// Everything (the queue no longer keeps acked messages).
    pub fn all(&mut self) -> Released {
        self.shed(u64::MAX)
    }

    fn pop(&mut self) -> Option<(u64, u64)> {
        let run = self.runs.pop_front()?;
        self.bytes = self.bytes.saturating_sub(run.bytes);
        self.messages = self.messages.saturating_sub(run.messages);
        Some((run.segment, run.messages))
    }
}

/// A replay of one subscription: messages published at or after `from_ms`, numbered up to
/// `through`, that the owner still keeps, owed to it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// The subscription.
    pub subscription: String,
    /// Unix ms of the oldest publish time replayed (0 = everything kept).
    pub from_ms: u64,
    /// The highest sequence replayed: later ones are owed to the subscription anyway.
    pub through: u64,
    /// Where the scan reads next (`None`: the oldest segment).
    #[serde(skip)]
    pub cursor: Option<Position>,
    /// The first message record the scan read: a relocated copy of an older one is the only copy
    /// left (its original's segment is gone); of a later one, a second sighting.
    #[serde(skip)]
    pub first_message: Option<u64>,
    /// The scan stopped at this spilled message, until it is paged in.
    #[serde(skip)]
    pub waiting_for: Option<u64>,
}

impl Replay {
    /// A replay from the start of the log.
    pub fn new(subscription: String, from_ms: u64, through: u64) -> Self {
        Self {
            subscription,
            from_ms,
            through,
            cursor: None,
            first_message: None,
            waiting_for: None,
        }
    }
}

/// What an owner remembers of a queue across restarts beside its log: the subscriptions it has
/// served (a new one is replayed from its `startAt` once) and the replays not finished.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMemo {
    /// Subscriptions served so far.
    pub subscriptions: Vec<String>,
    /// Replays still running.
    pub replays: Vec<Replay>,
}

/// Unix milliseconds of a time (0 before the epoch).
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix milliseconds of a message's publish time (0 when it has none): what replay reads back.
pub use qmesh_store::record::published_ms;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(segment: u64) -> Position {
        Position {
            segment,
            offset: 0,
            len: 100,
        }
    }

    #[test]
    fn kept_records_merge_into_runs_and_go_in_time_order() {
        let mut kept = Kept::default();
        for i in 0..1000 {
            kept.keep(at(1), 10_000 + i);
        }
        kept.keep(at(2), 10_500);
        kept.keep(at(2), 20_000);
        assert_eq!(kept.runs.len(), 3, "one run per segment and second");
        assert_eq!((kept.messages, kept.bytes), (1002, 100_200));
        assert!(kept.expire(10_998).is_empty());
        assert_eq!(kept.expire(11_000), vec![(1, 1000), (2, 1)]);
        assert_eq!(kept.shed(1), vec![(2, 1)]);
        assert_eq!((kept.messages, kept.bytes), (0, 0));
        assert!(kept.all().is_empty());
    }

    #[test]
    fn a_memo_round_trips_without_its_scan_position() {
        let mut replay = Replay::new("audit".into(), 5, 9);
        replay.cursor = Some(at(3));
        let memo = QueueMemo {
            subscriptions: vec!["audit".into()],
            replays: vec![replay],
        };
        let back: QueueMemo = serde_json::from_str(&serde_json::to_string(&memo).unwrap()).unwrap();
        assert_eq!(back.replays[0], Replay::new("audit".into(), 5, 9));
    }
}
