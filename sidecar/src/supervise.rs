//! No task dies silently: every task the sidecar spawns goes through [`Supervisor::spawn`]. A task
//! that panics fails the whole sidecar — `/readyz` answers 503 naming the task, and [`crate::run`]
//! returns the failure so the process exits non-zero and the kubelet restarts it on its log (which
//! loses nothing acknowledged). Limping on with a dead delivery loop would silently stop acks,
//! timeouts and redeliveries instead.
//!
//! ```text
//!   spawn(name, task) ──▶ tokio task ──panic──▶ watcher ──▶ failure = "name: message" ──▶ /readyz 503
//!                                                                         └──▶ run() returns Err, exit 1
//! ```

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::{sync::Notify, task::AbortHandle};

/// Watches the sidecar's tasks.
#[derive(Debug, Default)]
pub struct Supervisor {
    failure: Mutex<Option<String>>,
    failed: Notify,
}

impl Supervisor {
    /// A supervisor with no failure yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Spawns `task` as `name`; a panic in it fails the sidecar. The handle aborts it (an aborted
    /// task is not a failure).
    pub fn spawn<F>(self: &Arc<Self>, name: impl Into<String>, task: F) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task);
        let abort = handle.abort_handle();
        let name = name.into();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = handle.await
                && error.is_panic()
            {
                let panic = error.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                this.fail(format!("task {name} panicked: {message}"));
            }
        });
        abort
    }

    /// Records a fatal failure (the first one is kept).
    pub fn fail(&self, reason: String) {
        tracing::error!(%reason, "internal task died: the sidecar is no longer ready and exits");
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(reason);
        }
        drop(failure);
        self.failed.notify_waiters();
        self.failed.notify_one();
    }

    /// The failure, if a task died.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves with the reason once a task died.
    pub async fn failed(&self) -> String {
        loop {
            let notified = self.failed.notified();
            if let Some(reason) = self.failure() {
                return reason;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panicking_task_fails_the_sidecar_with_its_name() {
        let supervisor = Supervisor::new();
        supervisor.spawn("quiet", async {});
        assert!(supervisor.failure().is_none());
        supervisor.spawn("owner events", async {
            panic!("overflow when adding duration")
        });
        let reason = tokio::time::timeout(Duration::from_secs(5), supervisor.failed())
            .await
            .expect("the failure is reported");
        assert!(
            reason.contains("owner events") && reason.contains("overflow when adding duration"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn an_aborted_task_is_no_failure() {
        let supervisor = Supervisor::new();
        let handle = supervisor.spawn("pump", std::future::pending());
        handle.abort();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(supervisor.failure().is_none());
    }
}
