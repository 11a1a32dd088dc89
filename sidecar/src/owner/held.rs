//! Held messages, for the dead-letter tools (`qmesh dlq peek` / `redrive` / `purge`, the console):
//! what this owner keeps for a queue without delivering it, sending it back, or deleting it. The
//! tools reach every owner through the control plane ([`Owner::held`], asked over `Join`), or
//! one sidecar through its app API.
//!
//! ```text
//!   Browse(queue)  ──▶ messages of the queue + per subscription: attempts, ready / waiting /
//!                      in-flight / parked, last error
//!   Redrive(queue) ──▶ dead letter (qmesh-original-queue or `to`) ─publish─▶ that queue ─ack─▶ removed here
//!                  └─▶ parked message ──▶ ready again, delivery count reset
//!   Purge(queue)   ──▶ every message no consumer holds now ──▶ settled and gone
//! ```

use std::sync::Arc;

use qmesh_proto::{
    control::{HeldRequest, HeldResponse, held_request::Call, held_response::Result as Answer},
    v1,
};

use super::{OwnedQueue, Owner, Schedule, headers, log::Outcome, new_id};
use crate::error::BrokerError;

/// Headers a dead letter carries that do not belong on the redriven message.
const DEAD_LETTER_HEADERS: [&str; 5] = [
    headers::REASON,
    headers::ORIGINAL_QUEUE,
    headers::ORIGINAL_SUBSCRIPTION,
    headers::DELIVERY_COUNT,
    headers::LAST_ERROR,
];

impl Owner {
    fn held_queue(&self, queue: &str) -> Result<Option<Arc<OwnedQueue>>, BrokerError> {
        let view = self.view.borrow().clone();
        if view.queue(queue).is_none() {
            return Err(if view.is_foreign_queue(queue) {
                BrokerError::NotPublisher(queue.to_owned())
            } else {
                BrokerError::UnknownQueue(queue.to_owned())
            });
        }
        Ok(self.get_queue(queue))
    }

    /// Answers a held-message operation the control plane forwards (`Control/HeldMessages`).
    pub async fn held(self: &Arc<Self>, request: HeldRequest) -> HeldResponse {
        let result = match request.call {
            Some(Call::Browse(b)) => self
                .browse(&b.queue, browse_limit(b.max))
                .map(Answer::Browse),
            Some(Call::Redrive(r)) => self
                .redrive(&r.queue, &r.to, r.max as usize)
                .await
                .map(Answer::Redrive),
            Some(Call::Purge(p)) => self.purge(&p.queue, p.max as usize).map(Answer::Purge),
            None => Err(BrokerError::Invalid(
                "a held-message request names no operation".into(),
            )),
        };
        HeldResponse {
            result: Some(result.unwrap_or_else(|e| Answer::Error(e.to_proto()))),
        }
    }

    /// Up to `max` messages held for `queue`, oldest first, and how many there are in all.
    pub fn browse(&self, queue: &str, max: usize) -> Result<v1::BrowseResponse, BrokerError> {
        let Some(q) = self.held_queue(queue)? else {
            return Ok(v1::BrowseResponse::default());
        };
        let state = q.lock();
        let messages = state
            .messages
            .iter()
            .take(max)
            .map(|(sequence, entry)| v1::HeldMessage {
                sequence: *sequence,
                payload_bytes: entry.message.payload.len() as u64,
                message: Some((*entry.message).clone()),
                subscriptions: state
                    .held_for(*sequence)
                    .into_iter()
                    .map(|(subscription, attempts, where_, last_error)| v1::HeldFor {
                        subscription,
                        attempts,
                        state: where_.to_owned(),
                        last_error,
                    })
                    .collect(),
            })
            .collect();
        Ok(v1::BrowseResponse {
            messages,
            total: state.messages.len() as u64,
        })
    }

    /// Deletes up to `max` (0 = all) messages held for `queue` that no consumer holds now.
    pub fn purge(&self, queue: &str, max: usize) -> Result<v1::PurgeResponse, BrokerError> {
        let mut response = v1::PurgeResponse::default();
        let Some(q) = self.held_queue(queue)? else {
            return Ok(response);
        };
        let limit = if max == 0 { usize::MAX } else { max };
        let removed: Vec<(u64, Vec<String>)> = {
            let mut state = q.lock();
            let sequences: Vec<u64> = state.messages.keys().copied().collect();
            let mut removed = Vec::new();
            for sequence in sequences {
                if removed.len() >= limit {
                    break;
                }
                if state.in_flight_anywhere(sequence) {
                    response.skipped += 1;
                    continue;
                }
                removed.push((sequence, state.remove_held(sequence)));
            }
            response.remaining =
                state.messages.len() as u64 + state.spill.as_ref().map_or(0, |s| s.messages);
            removed
        };
        for (sequence, owed) in &removed {
            for sub in owed {
                q.log.settle(queue, sub, *sequence, Outcome::DeadLettered);
            }
        }
        response.purged = removed.len() as u32;
        q.wake.notify_one();
        if response.purged > 0 {
            tracing::warn!(
                queue,
                purged = response.purged,
                skipped = response.skipped,
                "held messages purged"
            );
        }
        Ok(response)
    }

    /// Sends up to `max` (0 = all) held messages of `queue` back: dead letters to `to` or their
    /// original queue, parked ones to their subscriptions.
    pub async fn redrive(
        self: &Arc<Self>,
        queue: &str,
        to: &str,
        max: usize,
    ) -> Result<v1::RedriveResponse, BrokerError> {
        let mut response = v1::RedriveResponse::default();
        let Some(q) = self.held_queue(queue)? else {
            return Ok(response);
        };
        let candidates: Vec<(u64, Arc<v1::Message>)> = {
            let state = q.lock();
            let limit = if max == 0 { usize::MAX } else { max };
            state
                .messages
                .iter()
                .take(limit)
                .map(|(seq, e)| (*seq, Arc::clone(&e.message)))
                .collect()
        };
        for (sequence, message) in candidates {
            if q.lock().in_flight_anywhere(sequence) {
                response.skipped += 1;
                continue;
            }
            let target = if to.is_empty() {
                message
                    .headers
                    .get(headers::ORIGINAL_QUEUE)
                    .cloned()
                    .unwrap_or_default()
            } else {
                to.to_owned()
            };
            if target.is_empty() {
                // Not a dead letter: a message parked in this queue goes back to its subscriptions.
                let unparked = q.lock().unpark(sequence);
                if unparked > 0 {
                    response.unparked += 1;
                    q.wake.notify_one();
                }
                continue;
            }
            let mut again = (*message).clone();
            for h in DEAD_LETTER_HEADERS {
                again.headers.remove(h);
            }
            again
                .headers
                .entry(headers::ORIGINAL_ID.to_owned())
                .or_insert_with(|| message.id.clone());
            again
                .headers
                .insert(headers::REDRIVEN_FROM.to_owned(), queue.to_owned());
            // A fresh id: the original may still sit in the target's dedup window.
            again.id = new_id();
            again.publish_time = None;
            match self.publish(&target, again, Schedule::Now).await {
                Ok(_) => {
                    // Gone meanwhile (expired, or consumed) means there is nothing left to remove.
                    let owed = q.lock().remove_held(sequence);
                    for sub in owed {
                        q.log.settle(queue, &sub, sequence, Outcome::Acked);
                    }
                    q.wake.notify_one();
                    response.republished += 1;
                    tracing::info!(queue, target, sequence, id = %message.id, "dead letter redriven");
                }
                Err(error) => response.failed.push(v1::RedriveFailure {
                    id: message.id.clone(),
                    error: Some(error.to_proto()),
                }),
            }
        }
        Ok(response)
    }
}

/// How many messages one Browse returns: 100 when not said, at most 1000 — bounded like an HTTP
/// poll, one answer never carries more.
pub fn browse_limit(max: u32) -> usize {
    if max == 0 {
        100
    } else {
        (max as usize).min(1000)
    }
}
