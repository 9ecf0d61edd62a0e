//! Statistics of side-by-side runs: latency percentiles, medians with min/max over rounds, and
//! ratios.
//!
//! Our test machines are noisy (±25% run to run), so a figure on its own means little; what the
//! suites report is the median over rounds that alternate the two systems (A B A B …), the
//! spread (min/max) of those rounds, and the ratio of the two medians.

use serde::Serialize;

/// Median, min and max of one figure over the rounds of one side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none (or any is NaN).
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// `a / b`, or `None` when `b` is zero (a ratio to nothing is not a figure).
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// Request latencies of one round, in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    nanos: Vec<u64>,
}

impl Latencies {
    /// Room for `n` requests, so that recording never allocates inside a timed loop.
    pub fn with_capacity(n: usize) -> Latencies {
        Latencies {
            nanos: Vec::with_capacity(n),
        }
    }

    pub fn record(&mut self, elapsed: std::time::Duration) {
        self.nanos
            .push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nanos.len()
    }

    /// Adds the requests of another connection of the same round.
    pub fn merge(&mut self, other: Latencies) {
        self.nanos.extend(other.nanos);
    }

    /// The `q` quantile (0..=1) in microseconds, nearest-rank; `None` without requests.
    pub fn quantile_us(&mut self, q: f64) -> Option<f64> {
        if self.nanos.is_empty() {
            return None;
        }
        self.nanos.sort_unstable();
        let n = self.nanos.len();
        // Nearest rank: the smallest value with at least q*n values at or below it.
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
        Some(self.nanos[rank - 1] as f64 / 1000.0)
    }
}

/// Runs `rounds` rounds of `a` then `b` (A B A B …) and collects what each returns.
///
/// Alternating inside one run is what makes the two sides comparable on a machine whose speed
/// drifts: both see the same drift.
pub async fn interleave<T, FA, FB>(
    rounds: usize,
    mut a: FA,
    mut b: FB,
) -> anyhow::Result<(Vec<T>, Vec<T>)>
where
    FA: AsyncFnMut(usize) -> anyhow::Result<T>,
    FB: AsyncFnMut(usize) -> anyhow::Result<T>,
{
    let mut out_a = Vec::with_capacity(rounds);
    let mut out_b = Vec::with_capacity(rounds);
    for round in 0..rounds {
        out_a.push(a(round).await?);
        out_b.push(b(round).await?);
    }
    Ok((out_a, out_b))
}

/// Rounds a figure for printing: 4 significant digits are more than the noise allows.
pub fn round4(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let digits = 4 - 1 - x.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn spread_takes_median_min_max() {
        let s = Spread::of(&[5.0, 1.0, 3.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut l = Latencies::with_capacity(100);
        for us in (1..=100).rev() {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.quantile_us(0.5), Some(50.0));
        assert_eq!(l.quantile_us(0.99), Some(99.0));
        assert_eq!(l.quantile_us(1.0), Some(100.0));
        assert_eq!(l.quantile_us(0.0), Some(1.0));
        assert_eq!(Latencies::default().quantile_us(0.5), None);
    }

    #[test]
    fn ratios_refuse_division_by_zero() {
        assert_eq!(ratio(10.0, 4.0), Some(2.5));
        assert_eq!(ratio(1.0, 0.0), None);
    }

    #[test]
    fn rounding_keeps_four_significant_digits() {
        assert_eq!(round4(123_456.0), 123_500.0);
        assert_eq!(round4(0.012_345_6), 0.01235);
        assert_eq!(round4(0.0), 0.0);
    }

    #[tokio::test]
    async fn interleave_alternates_sides() {
        let order = std::cell::RefCell::new(Vec::new());
        let (a, b) = interleave(
            3,
            async |r| {
                order.borrow_mut().push(('a', r));
                Ok(r)
            },
            async |r| {
                order.borrow_mut().push(('b', r));
                Ok(r * 10)
            },
        )
        .await
        .expect("rounds");
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(b, vec![0, 10, 20]);
        assert_eq!(
            order.into_inner(),
            vec![('a', 0), ('b', 0), ('a', 1), ('b', 1), ('a', 2), ('b', 2)]
        );
    }
}
