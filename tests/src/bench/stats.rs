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
    fn medians_of_rates() {
        assert_eq!(median_f64(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_f64(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median_f64(&[]), 0.0);
    }
}
