//! Bandwidth limit for the ship: a token bucket in bytes per second that the sender consults
//! before each frame, changeable while running (the control socket sets it).
//!
//! `TokenBucket` is a pure state machine that is told the time, so its bound is tested with
//! explicit instants; `RateLimiter` wraps it for async senders and does the sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket that allows debt: a frame larger than the bucket is still sent whole, and the
/// sender then waits until the debt is paid back. Over any interval of length T the bytes taken
/// are at most `rate * T + burst + largest frame`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second; 0 means unlimited.
    rate_bytes_per_s: u64,
    burst_bytes: u64,
    /// Available bytes; negative is debt. Kept as f64 so that refills of a few microseconds at
    /// low rates are not rounded away.
    tokens_bytes: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A bucket that starts full. `rate_bytes_per_s == 0` means no limit.
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate_bytes_per_s,
            burst_bytes,
            tokens_bytes: burst_bytes as f64,
            refilled_at: now,
        }
    }

    /// The configured rate; 0 means unlimited.
    pub fn rate_bytes_per_s(&self) -> u64 {
        self.rate_bytes_per_s
    }

    /// Changes the rate from `now` on; bytes already granted stay granted, and a debt is
    /// repaid at the new rate.
    pub fn set_rate(&mut self, rate_bytes_per_s: u64, now: Instant) {
        self.refill(now);
        self.rate_bytes_per_s = rate_bytes_per_s;
        if rate_bytes_per_s == 0 {
            self.tokens_bytes = self.burst_bytes as f64;
        }
    }

    /// Takes `bytes` at `now` and returns how long the caller must wait before sending them
    /// (zero if tokens were available).
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate_bytes_per_s == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens_bytes -= bytes as f64;
        if self.tokens_bytes >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens_bytes / self.rate_bytes_per_s as f64)
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_s = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.refilled_at = self.refilled_at.max(now);
        if self.rate_bytes_per_s == 0 {
            return;
        }
        self.tokens_bytes = (self.tokens_bytes + elapsed_s * self.rate_bytes_per_s as f64)
            .min(self.burst_bytes as f64);
    }
}

/// A token bucket shared by the senders of one connection (or one appliance).
#[derive(Debug)]
pub struct RateLimiter {
    bucket: Mutex<TokenBucket>,
}

/// Burst allowance: a tenth of a second of traffic, at least one full frame of 1 MiB, so a
/// limit smooths the flow without making single frames wait.
fn burst_bytes_for(rate_bytes_per_s: u64) -> u64 {
    (rate_bytes_per_s / 10).max(1 << 20)
}

impl RateLimiter {
    /// A limiter at `rate_bytes_per_s`; 0 means unlimited.
    pub fn new(rate_bytes_per_s: u64) -> RateLimiter {
        RateLimiter {
            bucket: Mutex::new(TokenBucket::new(
                rate_bytes_per_s,
                burst_bytes_for(rate_bytes_per_s),
                Instant::now(),
            )),
        }
    }

    /// Changes the limit at run time; 0 removes it.
    pub fn set_rate(&self, rate_bytes_per_s: u64) {
        let mut bucket = self.lock();
        bucket.burst_bytes = burst_bytes_for(rate_bytes_per_s);
        bucket.set_rate(rate_bytes_per_s, Instant::now());
    }

    /// The current limit; 0 means unlimited.
    pub fn rate_bytes_per_s(&self) -> u64 {
        self.lock().rate_bytes_per_s()
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.lock().take(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        // The bucket holds plain numbers that are valid after any panic; keep using it.
        self.bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a sender that sends a frame whenever the bucket lets it, over `duration`, and
    /// returns the bytes it got out.
    fn bytes_sent_within(
        bucket: &mut TokenBucket,
        start: Instant,
        duration: Duration,
        frame_bytes: u64,
    ) -> u64 {
        let mut now = start;
        let mut sent_bytes = 0;
        let end = start + duration;
        // Bounded: each iteration advances time by the wait or sends within the burst.
        for _ in 0..1_000_000 {
            let wait = bucket.take(frame_bytes, now);
            now += wait;
            if now > end {
                break;
            }
            sent_bytes += frame_bytes;
        }
        sent_bytes
    }

    #[test]
    fn bucket_bounds_bytes_per_simulated_time() {
        let start = Instant::now();
        let rate_bytes_per_s = 10_000_000;
        let burst_bytes = 1_000_000;
        for frame_bytes in [4096u64, 65_536, 1 << 20, 3 << 20] {
            let mut bucket = TokenBucket::new(rate_bytes_per_s, burst_bytes, start);
            let duration = Duration::from_secs(10);
            let sent_bytes = bytes_sent_within(&mut bucket, start, duration, frame_bytes);
            let bound_bytes = rate_bytes_per_s * 10 + burst_bytes + frame_bytes;
            assert!(
                sent_bytes <= bound_bytes,
                "frame {frame_bytes}: sent {sent_bytes} > bound {bound_bytes}"
            );
            // And the limiter does not starve the sender either: within one frame and the
            // burst of the ideal.
            let floor_bytes = rate_bytes_per_s * 10 - frame_bytes;
            assert!(
                sent_bytes >= floor_bytes,
                "frame {frame_bytes}: sent {sent_bytes} < {floor_bytes}"
            );
        }
    }

    #[test]
    fn bucket_rate_change_takes_effect_and_zero_means_unlimited() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000_000, 100_000, start);
        assert_eq!(bucket.take(100_000, start), Duration::ZERO);
        // Empty now: 500 kB more at 1 MB/s is half a second of debt.
        assert_eq!(bucket.take(500_000, start), Duration::from_millis(500));
        // Raising the rate tenfold repays the remaining debt ten times faster.
        bucket.set_rate(10_000_000, start);
        let wait = bucket.take(0, start);
        assert_eq!(wait, Duration::from_millis(50));
        bucket.set_rate(0, start);
        assert_eq!(bucket.take(u64::MAX / 2, start), Duration::ZERO);
        assert_eq!(bucket.rate_bytes_per_s(), 0);
    }

    #[test]
    fn bucket_does_not_hoard_beyond_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000, 2_000, start);
        let later = start + Duration::from_secs(3600);
        assert_eq!(bucket.take(2_000, later), Duration::ZERO);
        assert_eq!(bucket.take(1_000, later), Duration::from_secs(1));
        // Time going backwards (a caller passing an older instant) never adds tokens.
        assert_eq!(bucket.take(1_000, start), Duration::from_secs(2));
    }
}
