//! Reconnect backoff for the source: exponential delays with jitter, as a small policy that
//! never reads the clock (the caller sleeps), so it is tested without time.

use std::time::Duration;

/// Exponential backoff: `delay_initial`, doubling up to `delay_max`, each delay drawn
/// uniformly from its upper half so that sources restarted together do not dial in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    delay_initial: Duration,
    delay_max: Duration,
    attempts: u32,
    random_state: u64,
}

impl Backoff {
    /// Ferry's default: 100 ms doubling to 10 s.
    pub fn new(seed: u64) -> Backoff {
        Backoff::with_bounds(Duration::from_millis(100), Duration::from_secs(10), seed)
    }

    /// A backoff with explicit bounds. `seed` drives the jitter; two sources should use
    /// different seeds (the process id and the time are fine).
    pub fn with_bounds(delay_initial: Duration, delay_max: Duration, seed: u64) -> Backoff {
        assert!(delay_initial <= delay_max, "backoff bounds are inverted");
        Backoff {
            delay_initial,
            delay_max,
            attempts: 0,
            random_state: seed,
        }
    }

    /// Failed attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The delay to wait before the next attempt, after a failed one.
    pub fn next_delay(&mut self) -> Duration {
        let shift = self.attempts.min(30);
        self.attempts = self.attempts.saturating_add(1);
        let ceiling = self
            .delay_initial
            .saturating_mul(1u32 << shift)
            .min(self.delay_max);
        let ceiling_ns = ceiling.as_nanos() as u64;
        let half_ns = ceiling_ns / 2;
        let jitter_ns = if half_ns == 0 {
            0
        } else {
            self.next_random() % (half_ns + 1)
        };
        Duration::from_nanos(ceiling_ns - half_ns + jitter_ns)
    }

    /// Forget past failures (call after a connection succeeded).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// splitmix64: tiny, seedable, good enough for jitter.
    fn next_random(&mut self) -> u64 {
        self.random_state = self.random_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.random_state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_up_to_the_cap_and_reset() {
        for seed in [0u64, 1, 42, u64::MAX] {
            let mut backoff = Backoff::new(seed);
            let mut ceiling = Duration::from_millis(100);
            for attempt in 0..20 {
                let delay = backoff.next_delay();
                assert!(
                    delay <= ceiling && delay >= ceiling / 2,
                    "seed {seed} attempt {attempt}: {delay:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
                ceiling = (ceiling * 2).min(Duration::from_secs(10));
            }
            assert_eq!(backoff.attempts(), 20);
            backoff.reset();
            assert!(backoff.next_delay() <= Duration::from_millis(100));
        }
    }

    #[test]
    fn jitter_differs_between_seeds() {
        let mut first = Backoff::new(1);
        let mut second = Backoff::new(2);
        let first_delays: Vec<_> = (0..8).map(|_| first.next_delay()).collect();
        let second_delays: Vec<_> = (0..8).map(|_| second.next_delay()).collect();
        assert_ne!(first_delays, second_delays);
    }
}
