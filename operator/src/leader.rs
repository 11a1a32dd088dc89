//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's elector does it: every
//! replica polls the Lease; the holder renews it, the others take it over once it has not changed
//! for a whole lease duration (measured on their own monotonic clock, so clock skew between nodes
//! does not matter), and a leader that shuts down releases it so the next one takes over at once.
//!
//! ```text
//!         every duration/3                          holder == me ──replace(renewTime)──▶ leader
//!   Elector ───────────▶ GET lease ──▶ no lease ──create──▶ leader
//!                                     held by other, unchanged ≥ duration ──replace──▶ leader
//!                                     held by other, fresh ─────────────────────────▶ follower
//! ```
//! Every write is guarded by the `resourceVersion` just read (a conflict means someone else won).
//! A leader that cannot renew for 2/3 of the duration steps down before anyone may take over.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Takes part in the election for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// Holder and renew time last seen, and when they last changed (local clock).
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

// === impl Elector ===

impl Elector {
    /// An elector for Lease `name` in `namespace`, as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: None,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: acquires, renews or observes the Lease. `Ok(true)` while this replica leads.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
        if changed {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let unchanged_for = self
            .observed
            .as_ref()
            .map_or(Duration::ZERO, |(_, _, at)| at.elapsed());
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs);

        let mut new_spec = spec.clone();
        match holder.as_deref() {
            Some(me) if me == self.identity => {
                new_spec.renew_time = Some(now);
                new_spec.lease_duration_seconds = Some(self.duration_seconds());
            }
            Some(_) if unchanged_for < their_duration => return Ok(false),
            _ => {
                tracing::info!(lease = %self.name, previous = ?holder, "taking over the lease");
                new_spec.holder_identity = Some(self.identity.clone());
                new_spec.acquire_time = Some(now.clone());
                new_spec.renew_time = Some(now);
                new_spec.lease_duration_seconds = Some(self.duration_seconds());
                new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        lease.spec = Some(new_spec);
        // The resourceVersion read above guards the replace.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica holds it, so another replica takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Campaigns until `shutdown`, publishing whether this replica leads; releases the Lease at the end.
    pub async fn run(mut self, leader: watch::Sender<bool>, shutdown: CancellationToken) {
        let retry = (self.duration / 3).max(Duration::from_millis(100));
        let renew_deadline = self.duration * 2 / 3;
        let mut last_renewal: Option<Instant> = None;
        loop {
            let leading = match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_renewal = Some(Instant::now());
                    true
                }
                Ok(false) => false,
                Err(error) => {
                    tracing::warn!(%error, lease = %self.name, "lease round failed");
                    *leader.borrow() && last_renewal.is_some_and(|at| at.elapsed() < renew_deadline)
                }
            };
            leader.send_if_modified(|current| {
                if *current == leading {
                    return false;
                }
                if leading {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                } else {
                    tracing::info!(lease = %self.name, identity = %self.identity, "not the leader");
                }
                *current = leading;
                true
            });
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(retry) => {}
            }
        }
        let was_leading = *leader.borrow();
        leader.send_replace(false);
        if was_leading {
            match self.release().await {
                Ok(()) => tracing::info!(lease = %self.name, "released the lease"),
                Err(error) => {
                    tracing::warn!(%error, lease = %self.name, "releasing the lease failed")
                }
            }
        }
    }
}
