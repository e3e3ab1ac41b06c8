//! Pure helpers: percentiles, summaries of samples and of repeated runs, and the number
//! formats the report uses. No I/O here, so everything is unit-tested.

use std::time::Duration;

/// The nearest-rank percentile `p` (0–100) of `sorted` (ascending); `None` if empty.
///
/// Nearest rank: the smallest value such that at least `p` % of the samples are less
/// than or equal to it. p50 of `[1, 2, 3, 4]` is 2, p99 of 100 samples is the 99th.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !p.is_finite() {
        return None;
    }
    let n = sorted.len();
    // The epsilon keeps float error (99.9 / 100 × 1000 = 999.0000000000001) from
    // pushing the rank up by one.
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * n as f64 - 1e-9).ceil() as usize;
    let idx = rank.clamp(1, n) - 1;
    sorted.get(idx).copied()
}

/// Distribution of a set of samples (any unit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples` (any order); `None` if there are none or one is not finite.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        Some(Summary {
            n: v.len(),
            min: v[0],
            p50: percentile(&v, 50.0)?,
            p90: percentile(&v, 90.0)?,
            p99: percentile(&v, 99.0)?,
            p999: percentile(&v, 99.9)?,
            max: v[v.len() - 1],
            mean,
        })
    }

    /// Summarises durations in microseconds.
    pub fn of_durations_us(samples: &[Duration]) -> Option<Summary> {
        let us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        Summary::of(&us)
    }
}

/// Median and range of a figure measured in several repeated runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Repeated {
    /// How many runs.
    pub runs: usize,
    /// The median run (for an even count, the lower of the two middle runs, so that the
    /// figure is one that was actually measured).
    pub median: f64,
    /// The lowest run.
    pub min: f64,
    /// The highest run.
    pub max: f64,
}

impl Repeated {
    /// From the per-run values; `None` if there are none.
    pub fn of(values: &[f64]) -> Option<Repeated> {
        let s = Summary::of(values)?;
        Some(Repeated {
            runs: s.n,
            median: s.p50,
            min: s.min,
            max: s.max,
        })
    }

    /// `12,345` or, with several runs, `12,345 (12,001–12,900, 3 runs)`.
    pub fn fmt_count(&self) -> String {
        if self.runs <= 1 {
            fmt_count(self.median)
        } else {
            format!(
                "{} ({}–{}, {} runs)",
                fmt_count(self.median),
                fmt_count(self.min),
                fmt_count(self.max),
                self.runs
            )
        }
    }
}

/// A count or rate with thousands separators, rounded to an integer: `12,345`.
pub fn fmt_count(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let neg = v < 0.0;
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if neg && out != "0" {
        format!("-{out}")
    } else {
        out
    }
}

/// A latency given in microseconds: `85 µs`, `1.23 ms`, `2.50 s`.
pub fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        "n/a".into()
    } else if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// A size in bytes: `512 B`, `3.1 KiB`, `28.4 MiB` (binary units).
pub fn fmt_bytes(b: f64) -> String {
    if !b.is_finite() {
        "n/a".into()
    } else if b.abs() < 1024.0 {
        format!("{b:.0} B")
    } else if b.abs() < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    }
}

/// A ratio as a percentage: `73.4 %`.
pub fn fmt_pct(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{:.1} %", ratio * 100.0)
    } else {
        "n/a".into()
    }
}

/// A duration: in the latency format below a second (`850 µs`), else `2.50 s`.
pub fn fmt_secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        fmt_us(d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// p50 / p99 / max / mean of `samples`, formatted.
pub fn lat_cells(samples: &[Duration]) -> [String; 4] {
    match Summary::of_durations_us(samples) {
        Some(s) => [fmt_us(s.p50), fmt_us(s.p99), fmt_us(s.max), fmt_us(s.mean)],
        None => Default::default(),
    }
}

/// `ours / idle / others` cores, medians of each.
pub fn fmt_cores(v: &[(f64, f64, f64)]) -> String {
    let med = |f: fn(&(f64, f64, f64)) -> f64| {
        Repeated::of(&v.iter().map(f).collect::<Vec<_>>()).map_or(f64::NAN, |r| r.median)
    };
    format!(
        "{:.2} / {:.2} / {:.2}",
        med(|c| c.0),
        med(|c| c.1),
        med(|c| c.2)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), Some(2.0));
        assert_eq!(percentile(&v, 75.0), Some(3.0));
        assert_eq!(percentile(&v, 99.0), Some(4.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0), "p0 is the minimum");
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.9), Some(7.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 99.0), Some(99.0));
        assert_eq!(percentile(&hundred, 99.9), Some(100.0));
        assert_eq!(percentile(&hundred, 50.0), Some(50.0));
        let thousand: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&thousand, 99.9), Some(999.0));
    }

    #[test]
    fn summaries_sort_their_input() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.min, s.p50, s.max), (5, 1.0, 3.0, 5.0));
        assert!((s.mean - 3.0).abs() < 1e-9);
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
        let d = Summary::of_durations_us(&[Duration::from_millis(2), Duration::from_micros(500)])
            .unwrap();
        assert_eq!((d.min, d.max), (500.0, 2000.0));
    }

    #[test]
    fn repeated_runs_report_a_measured_median_and_the_range() {
        let r = Repeated::of(&[10_400.0, 9_800.0, 12_050.0]).unwrap();
        assert_eq!(
            (r.median, r.min, r.max, r.runs),
            (10_400.0, 9_800.0, 12_050.0, 3)
        );
        assert_eq!(r.fmt_count(), "10,400 (9,800–12,050, 3 runs)");
        let even = Repeated::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(even.median, 2.0, "lower middle of an even count");
        assert_eq!(Repeated::of(&[15_500.4]).unwrap().fmt_count(), "15,500");
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_count(0.0), "0");
        assert_eq!(fmt_count(999.4), "999");
        assert_eq!(fmt_count(1_000.0), "1,000");
        assert_eq!(fmt_count(1_234_567.0), "1,234,567");
        assert_eq!(fmt_count(-4_200.0), "-4,200");
        assert_eq!(fmt_us(85.2), "85 µs");
        assert_eq!(fmt_us(1_234.0), "1.23 ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50 s");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(3_200.0), "3.1 KiB");
        assert_eq!(fmt_bytes(30.0 * 1024.0 * 1024.0), "30.0 MiB");
        assert_eq!(fmt_pct(0.734), "73.4 %");
        assert_eq!(fmt_pct(f64::NAN), "n/a");
    }
}
