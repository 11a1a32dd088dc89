//! Held messages, for the dead-letter tools (`qmesh dlq peek` / `redrive`): what this owner keeps
//! for a queue without delivering it, and sending it back.
//!
//! ```text
//!   Browse(queue)  ──▶ messages of the queue + per subscription: attempts, ready / waiting /
//!                      in-flight / parked, last error
//!   Redrive(queue) ──▶ dead letter (qmesh-original-queue or `to`) ─publish─▶ that queue ─ack─▶ removed here
//!                  └─▶ parked message ──▶ ready again, delivery count reset
//! ```

use std::sync::Arc;

use qmesh_proto::v1;

use super::{OwnedQueue, Owner, headers, log::Outcome, new_id};
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
            match self.publish(&target, again).await {
                Ok(_) => {
                    // Gone meanwhile (expired, or consumed) means there is nothing left to remove.
                    let owed = q.lock().remove_redriven(sequence);
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
