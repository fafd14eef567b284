//! Latency distributions (merged over rounds), percentiles and the formatting of the table.

/// A latency distribution in nanoseconds: (value, count) pairs, so wrk's histograms and raw
/// samples merge alike.
#[derive(Clone, Debug, Default)]
pub struct Dist {
    points: Vec<(u64, u64)>,
}

impl Dist {
    pub fn from_samples(samples: &[u64]) -> Self {
        let mut dist = Self::default();
        dist.add_samples(samples);
        dist
    }

    pub fn add_samples(&mut self, samples: &[u64]) {
        self.points.extend(samples.iter().map(|&s| (s, 1)));
    }

    pub fn add_weighted(&mut self, value: u64, count: u64) {
        if count > 0 {
            self.points.push((value, count));
        }
    }

    pub fn merge(&mut self, other: &Dist) {
        self.points.extend_from_slice(&other.points);
    }

    pub fn count(&self) -> u64 {
        self.points.iter().map(|(_, n)| n).sum()
    }

    /// Nearest-rank percentile (`p` in 0..=100); `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let mut sorted = self.points.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (value, count) in sorted {
            seen += count;
            if seen >= rank {
                return Some(value);
            }
        }
        None
    }

    /// The arithmetic mean; `None` when empty.
    pub fn mean(&self) -> Option<u64> {
        let total = self.count();
        (total > 0).then(|| {
            let sum: u128 = self
                .points
                .iter()
                .map(|&(v, n)| u128::from(v) * u128::from(n))
                .sum();
            (sum / u128::from(total)) as u64
        })
    }

    /// The time samples spent beyond `limit`, summed over the samples that exceed it.
    pub fn excess_over(&self, limit: u64) -> u64 {
        self.points
            .iter()
            .filter(|(v, _)| *v > limit)
            .map(|(v, n)| (v - limit) * n)
            .sum()
    }

    /// How many samples exceed `limit`.
    pub fn count_above(&self, limit: u64) -> u64 {
        self.points
            .iter()
            .filter(|(v, _)| *v > limit)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn median(&self) -> Option<u64> {
        self.percentile(50.0)
    }

    pub fn p99(&self) -> Option<u64> {
        self.percentile(99.0)
    }
}

/// The median of plain numbers (per-round rates); 0 when empty.
pub fn median_f64(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A statistic with its 95 % interval and the range of the values it comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// The statistic itself (a median of per-round values).
    pub mid: f64,
    /// Bootstrap 95 % percentile interval of that median (rounds resampled).
    pub lo: f64,
    pub hi: f64,
    /// Smallest and largest per-round value.
    pub min: f64,
    pub max: f64,
    /// How many per-round values.
    pub n: usize,
}

impl Interval {
    /// The median of `values` with a bootstrap interval: the values are resampled with
    /// replacement [`BOOTSTRAP_RESAMPLES`] times and the 2.5th and 97.5th percentiles of the
    /// resampled medians taken. Deterministic (a fixed seed), so a report can be reproduced from
    /// its numbers. `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        let values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        let mut rng = SplitMix64(0x6b32_695f_6265_6e63);
        let mut medians = Vec::with_capacity(BOOTSTRAP_RESAMPLES);
        let mut sample = vec![0.0; values.len()];
        for _ in 0..BOOTSTRAP_RESAMPLES {
            for slot in sample.iter_mut() {
                *slot = values[(rng.next() % values.len() as u64) as usize];
            }
            medians.push(median_f64(&sample));
        }
        medians.sort_by(f64::total_cmp);
        let at = |q: f64| medians[((q * (medians.len() - 1) as f64).round()) as usize];
        Some(Self {
            mid: median_f64(&values),
            lo: at(0.025),
            hi: at(0.975),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n: values.len(),
        })
    }

    /// Per-round ratios `num[i] / den[i]` (rounds where either is missing or zero are left out).
    pub fn of_ratios(num: &[Option<f64>], den: &[Option<f64>]) -> Option<Self> {
        let ratios: Vec<f64> = num
            .iter()
            .zip(den)
            .filter_map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) if *b > 0.0 => Some(a / b),
                _ => None,
            })
            .collect();
        Self::of(&ratios)
    }

    /// Whether the whole interval is at most `limit`.
    pub fn all_at_most(&self, limit: f64) -> bool {
        self.hi <= limit
    }

    /// Whether the whole interval is at least `limit`.
    pub fn all_at_least(&self, limit: f64) -> bool {
        self.lo >= limit
    }

    /// `1.03× [0.99–1.07]`.
    pub fn ratio_text(&self) -> String {
        format!("{:.2}× [{:.2}–{:.2}]", self.mid, self.lo, self.hi)
    }

    /// `1.03 (0.95–1.20)`: the per-round range.
    pub fn range_text(&self) -> String {
        format!("{:.2}–{:.2}", self.min, self.max)
    }
}

/// Resamples of [`Interval::of`].
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// A small, fixed-seed generator for the bootstrap (and for jitter the harness draws).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `12.3 µs`, `1.25 ms`.
pub fn fmt_ns(ns: Option<u64>) -> String {
    match ns {
        None => "–".to_owned(),
        Some(ns) if ns < 100_000 => format!("{:.1} µs", ns as f64 / 1e3),
        Some(ns) if ns < 10_000_000 => format!("{:.0} µs", ns as f64 / 1e3),
        Some(ns) => format!("{:.1} ms", ns as f64 / 1e6),
    }
}

/// `a / b` as `1.23×`.
pub fn fmt_ratio(a: Option<u64>, b: Option<u64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0 => format!("{:.2}×", a as f64 / b as f64),
        _ => "–".to_owned(),
    }
}

pub fn ratio(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
        _ => None,
    }
}

/// A Markdown table.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.header));
        out.push_str(&line(
            &self
                .header
                .iter()
                .map(|_| "---".to_owned())
                .collect::<Vec<_>>(),
        ));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let dist = Dist::from_samples(&[5, 1, 4, 2, 3]);
        assert_eq!(dist.median(), Some(3));
        assert_eq!(dist.percentile(100.0), Some(5));
        assert_eq!(dist.percentile(0.0), Some(1));
        let mut weighted = Dist::default();
        weighted.add_weighted(10, 98);
        weighted.add_weighted(1000, 2);
        assert_eq!(weighted.median(), Some(10));
        assert_eq!(weighted.p99(), Some(1000));
        assert_eq!(Dist::default().median(), None);
        assert_eq!(Dist::from_samples(&[1, 2, 6]).mean(), Some(3));
    }

    #[test]
    fn bootstrap_intervals_hold_the_median_and_stay_within_the_values() {
        let values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 1.0];
        let i = Interval::of(&values).unwrap();
        assert_eq!(i.mid, 1.0);
        assert!(i.lo <= i.mid && i.mid <= i.hi, "{i:?}");
        assert!(i.lo >= 0.9 && i.hi <= 1.2, "{i:?}");
        assert_eq!((i.min, i.max, i.n), (0.9, 1.2, 7));
        assert!(i.all_at_most(1.2) && !i.all_at_most(1.0));
        let same = Interval::of(&[2.0; 5]).unwrap();
        assert_eq!((same.lo, same.mid, same.hi), (2.0, 2.0, 2.0));
        assert!(Interval::of(&[]).is_none());
        let r = Interval::of_ratios(
            &[Some(2.0), None, Some(3.0)],
            &[Some(1.0), Some(1.0), Some(0.0)],
        )
        .unwrap();
        assert_eq!(r.n, 1);
        assert_eq!(r.mid, 2.0);
    }

    #[test]
    fn medians_of_rates() {
        assert_eq!(median_f64(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_f64(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median_f64(&[]), 0.0);
    }
}
