//! Per-second rates of the counters a sidecar reports to its control plane — messages published
//! per owned queue, deliveries acked per consumed subscription — over the last few seconds, so
//! `qmesh get`, the console and the operator's `Control/Status` show PUBLISH/S and ACKS/S.
//!
//! ```text
//!   stats() ──(key, running total, now)──▶ samples of the last WINDOW ──▶ Δtotal / Δt
//! ```

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

/// How far back a rate looks.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Shortest span a rate is computed over (before it, the rate is 0).
const MIN_SPAN: Duration = Duration::from_millis(500);

/// Running totals sampled at each report, by counter.
#[derive(Debug, Default)]
pub struct Rates {
    samples: HashMap<String, VecDeque<(Instant, u64)>>,
    seen: HashSet<String>,
}

impl Rates {
    /// Records `total` of counter `key` at `now`; its rate per second over the window.
    pub fn observe(&mut self, key: &str, total: u64, now: Instant) -> f64 {
        self.seen.insert(key.to_owned());
        let samples = self.samples.entry(key.to_owned()).or_default();
        // A counter that went back (a restart of what counts it) starts over.
        if samples.back().is_some_and(|&(_, last)| total < last) {
            samples.clear();
        }
        samples.push_back((now, total));
        // Keep one sample at or beyond the window's start, so the span covers the whole window.
        while samples.len() > 2 && samples[1].0 + WINDOW <= now {
            samples.pop_front();
        }
        let (since, first) = samples[0];
        let span = now.saturating_duration_since(since);
        if span < MIN_SPAN {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let delta = total.saturating_sub(first) as f64;
        delta / span.as_secs_f64()
    }

    /// Forgets counters not observed since the last call (queues and subscriptions gone).
    pub fn sweep(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.samples.retain(|key, _| seen.contains(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_the_counter_s_growth_per_second_over_the_window() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rates = Rates::default();
        assert_eq!(
            rates.observe("q/orders", 100, at(0)),
            0.0,
            "one sample: no rate"
        );
        assert_eq!(rates.observe("q/orders", 150, at(1_000)), 50.0);
        assert_eq!(rates.observe("q/orders", 250, at(2_000)), 75.0);
        // Samples older than the window drop out: 10 s without a publish is a rate of 0, and
        // 100 more a second later are spread over the 11 s since the window's first sample.
        assert_eq!(rates.observe("q/orders", 250, at(12_000)), 0.0);
        let rate = rates.observe("q/orders", 350, at(13_000));
        assert!((rate - 100.0 / 11.0).abs() < 1e-9, "{rate}");
    }

    #[test]
    fn a_counter_that_goes_back_starts_over_and_gone_counters_are_forgotten() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rates = Rates::default();
        rates.observe("s/billing", 1_000, at(0));
        rates.sweep();
        assert_eq!(rates.observe("s/billing", 10, at(1_000)), 0.0);
        assert_eq!(rates.observe("s/billing", 30, at(2_000)), 20.0);
        rates.sweep();
        rates.sweep();
        assert!(rates.samples.is_empty(), "not observed since: forgotten");
    }
}
