//! Redelivery delays: exponential backoff with jitter, decided by the owner of a message.
//!
//! Attempt 1 failed → wait `initial`; attempt 2 → `initial × multiplier`; … never more than `max`.
//! "Equal jitter": the wait is uniformly drawn from [d/2, d], so retries of many messages spread out
//! while each still waits at least half the nominal delay.

use std::time::Duration;

use qmesh_api::Backoff;

/// The nominal (un-jittered) delay after `failed_attempts` failed deliveries (≥ 1).
pub fn nominal_delay(backoff: &Backoff, failed_attempts: u32) -> Duration {
    let initial = backoff.initial.get();
    let max = backoff.max.get();
    let exponent = failed_attempts.saturating_sub(1).min(63);
    let factor = u64::from(backoff.multiplier.max(1)).saturating_pow(exponent);
    let nominal_ms = (initial.as_millis() as u64).saturating_mul(factor);
    Duration::from_millis(nominal_ms).min(max)
}

/// The delay to wait, with jitter: `unit` is a uniform random number in [0, 1) supplied by the caller
/// (keeps this module free of randomness, so it is testable exactly).
pub fn jittered_delay(backoff: &Backoff, failed_attempts: u32, unit: f64) -> Duration {
    let nominal = nominal_delay(backoff, failed_attempts);
    let unit = unit.clamp(0.0, 1.0);
    nominal.mul_f64(0.5 + 0.5 * unit)
}

#[cfg(test)]
mod tests {
    use qmesh_api::Duration as Spec;

    use super::*;

    fn backoff(initial_ms: u64, max_ms: u64, multiplier: u32) -> Backoff {
        Backoff {
            initial: Spec::from_millis(initial_ms),
            max: Spec::from_millis(max_ms),
            multiplier,
        }
    }

    #[test]
    fn grows_by_the_multiplier_and_stops_at_max() {
        let b = backoff(1_000, 60_000, 2);
        let secs: Vec<u64> = (1..=8).map(|n| nominal_delay(&b, n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let b = backoff(1_000, 60_000, 100);
        assert_eq!(nominal_delay(&b, u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_nominal_delay() {
        let b = backoff(1_000, 60_000, 2);
        assert_eq!(jittered_delay(&b, 3, 0.0), Duration::from_secs(2));
        assert_eq!(jittered_delay(&b, 3, 1.0), Duration::from_secs(4));
        assert_eq!(jittered_delay(&b, 3, 0.5), Duration::from_secs(3));
    }
}
