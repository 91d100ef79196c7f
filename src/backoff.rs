//! The one backoff policy: exponential with jitter, capped. Used for job retries and for
//! reconnecting to a broker alike.

use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Fraction of the delay added or removed at random (0.2 = ±20 %).
    pub jitter: f64,
}

impl Backoff {
    /// The delay before retry number `n` (1 = the first retry).
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self.multiplier.powi(n.saturating_sub(1).min(64) as i32);
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            rand::rng().random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_secs_f64((base * (1.0 + spread)).clamp(0.0, self.max.as_secs_f64()))
    }

    /// For reconnect loops: 100 ms doubling to 5 s.
    pub fn reconnect() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: 0.0,
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(10), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let b = Backoff {
            initial: Duration::from_millis(1000),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
        };
        for _ in 0..200 {
            let d = b.delay(1).as_millis();
            assert!((800..=1200).contains(&d), "{d}");
        }
    }
}
