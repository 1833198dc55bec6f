//! Derived metrics of the live view: small pure functions, each with unit tests (the bpftop
//! habit). Nothing here reads a clock or the kernel; callers pass the numbers in.

use crate::correlate::Config;
use crate::trace::ProgramStats;

/// How alarming an outstanding submission's age is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgeLevel {
    Ok,
    /// At or past `hung_warn_ns`.
    Warn,
    /// At or past `hung_crit_ns`.
    Critical,
}

/// The level of a submission outstanding for `age_ns`, by the correlator's thresholds.
pub fn age_level(age_ns: u64, cfg: &Config) -> AgeLevel {
    if age_ns >= cfg.hung_crit_ns {
        AgeLevel::Critical
    } else if age_ns >= cfg.hung_warn_ns {
        AgeLevel::Warn
    } else {
        AgeLevel::Ok
    }
}

/// A `width`-cell bar for an age, log-scaled from 1 µs to `full_ns` (the critical threshold
/// fills it): a 1 ms submission shows a short bar, a hung one a full bar.
pub fn age_bar(age_ns: u64, full_ns: u64, width: usize) -> String {
    let lo = 1_000f64.ln();
    let hi = (full_ns.max(2_000) as f64).ln();
    let x = ((age_ns.max(1) as f64).ln() - lo) / (hi - lo);
    let cells = (x.clamp(0.0, 1.0) * width as f64).round() as usize;
    let cells = if age_ns > 0 { cells.max(1) } else { 0 };
    let mut s = "█".repeat(cells.min(width));
    s.push_str(&"·".repeat(width - cells.min(width)));
    s
}

/// Human duration: `850 ns`, `12.3 µs`, `4.56 ms`, `1.234 s`.
pub fn fmt_ns(ns: u64) -> String {
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.3} s", ns as f64 / 1e9)
    }
}

/// Short count: `999`, `12.3k`, `4.5M`.
pub fn fmt_count(n: u64) -> String {
    if n < 1_000 {
        n.to_string()
    } else if n < 1_000_000 {
        format!("{:.1}k", n as f64 / 1e3)
    } else {
        format!("{:.1}M", n as f64 / 1e6)
    }
}

/// Number of buckets of [`LogHistogram`]: `< 1 µs`, then powers of two of µs up to `≥ 2^23 µs`
/// (8.4 s).
pub const BUCKETS: usize = 25;

/// A log2 latency histogram (µs buckets).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogHistogram {
    pub counts: [u64; BUCKETS],
    pub total: u64,
    pub max_ns: u64,
}

/// The bucket of a latency: 0 for `< 1 µs`, `k` for `[2^(k-1), 2^k) µs`, the last one open.
pub fn bucket_of(ns: u64) -> usize {
    let us = ns / 1_000;
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(BUCKETS - 1)
    }
}

/// Label of a bucket's lower bound: `0`, `1µ`, `2µ`, .., `1m`, .., `1s`, ...
pub fn bucket_label(i: usize) -> String {
    if i == 0 {
        return "0".into();
    }
    let us = 1u64 << (i - 1);
    if us < 1_000 {
        format!("{us}µ")
    } else if us < 1_000_000 {
        format!("{}m", us / 1_000)
    } else {
        format!("{}s", us / 1_000_000)
    }
}

impl LogHistogram {
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// First and last non-empty buckets.
    pub fn span(&self) -> Option<(usize, usize)> {
        let first = self.counts.iter().position(|&c| c > 0)?;
        let last = self.counts.iter().rposition(|&c| c > 0)?;
        Some((first, last))
    }
}

/// Bar height for a count on a log scale (so that one 2 s hang stays visible next to a
/// million 2 µs flushes): `0` stays 0, any other count is at least 1, `max` maps to `top`.
pub fn log_height(count: u64, max: u64, top: u64) -> u64 {
    if count == 0 || max == 0 {
        return 0;
    }
    let h = ((count as f64).ln_1p() / (max as f64).ln_1p() * top as f64).round() as u64;
    h.clamp(1, top)
}

/// A sparkline string of `values` (most recent last), log-scaled, at most `width` cells.
pub fn sparkline(values: &[u64], width: usize) -> String {
    const TICKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let v = &values[values.len().saturating_sub(width)..];
    let max = v.iter().copied().max().unwrap_or(0);
    v.iter()
        .map(|&x| {
            if max == 0 {
                TICKS[0]
            } else {
                let h = log_height(x, max, 8).max(1);
                TICKS[(h - 1) as usize]
            }
        })
        .collect()
}

/// Events per second between two samples of a running total taken `dt_ns` apart.
pub fn rate_per_s(prev_total: u64, total: u64, dt_ns: u64) -> f64 {
    if dt_ns == 0 {
        return 0.0;
    }
    total.saturating_sub(prev_total) as f64 * 1e9 / dt_ns as f64
}

/// The tool's own BPF cost over an interval, from the kernel's run-time statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BpfCost {
    /// Program invocations in the interval.
    pub runs: u64,
    /// Average BPF run time per invocation (excludes the kprobe or trampoline dispatch itself).
    pub ns_per_run: f64,
    /// Share of one CPU: run time / wall time × 100.
    pub cpu_percent: f64,
}

/// Cost between two readings of `program_stats()` taken `wall_ns` apart (bpftop's formula).
/// Programs missing from `prev` count from zero.
pub fn bpf_cost(prev: &[ProgramStats], now: &[ProgramStats], wall_ns: u64) -> BpfCost {
    let mut runs = 0u64;
    let mut time = 0u64;
    for s in now {
        let base = prev.iter().find(|p| p.program == s.program);
        runs += s.run_count.saturating_sub(base.map_or(0, |b| b.run_count));
        time += s
            .run_time_ns
            .saturating_sub(base.map_or(0, |b| b.run_time_ns));
    }
    BpfCost {
        runs,
        ns_per_run: if runs == 0 {
            0.0
        } else {
            time as f64 / runs as f64
        },
        cpu_percent: if wall_ns == 0 {
            0.0
        } else {
            time as f64 * 100.0 / wall_ns as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn age_levels_follow_the_correlator_thresholds() {
        let cfg = Config::default();
        assert_eq!(age_level(5 * MS, &cfg), AgeLevel::Ok);
        assert_eq!(age_level(cfg.hung_warn_ns, &cfg), AgeLevel::Warn);
        assert_eq!(age_level(cfg.hung_crit_ns + 1, &cfg), AgeLevel::Critical);
    }

    #[test]
    fn age_bar_is_log_scaled_and_saturates() {
        assert_eq!(age_bar(0, 1000 * MS, 10), "··········");
        assert_eq!(
            age_bar(1, 1000 * MS, 10)
                .chars()
                .filter(|&c| c == '█')
                .count(),
            1
        );
        // 1 ms is half-way between 1 µs and 1 s on a log scale.
        assert_eq!(age_bar(MS, 1000 * MS, 10), "█████·····");
        assert_eq!(age_bar(5000 * MS, 1000 * MS, 10), "██████████");
    }

    #[test]
    fn durations_and_counts_read_well() {
        assert_eq!(fmt_ns(850), "850 ns");
        assert_eq!(fmt_ns(12_345), "12.3 µs");
        assert_eq!(fmt_ns(4_560_000), "4.56 ms");
        assert_eq!(fmt_ns(1_234_000_000), "1.234 s");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(12_345), "12.3k");
        assert_eq!(fmt_count(4_500_000), "4.5M");
    }

    #[test]
    fn buckets_are_powers_of_two_of_microseconds() {
        assert_eq!(bucket_of(999), 0);
        assert_eq!(bucket_of(1_000), 1);
        assert_eq!(bucket_of(1_999), 1);
        assert_eq!(bucket_of(2_000), 2);
        assert_eq!(bucket_of(3_999), 2);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_label(0), "0");
        assert_eq!(bucket_label(1), "1µ");
        assert_eq!(bucket_label(11), "1m");
        assert_eq!(bucket_label(21), "1s");
        let mut h = LogHistogram::default();
        assert_eq!(h.span(), None);
        h.record(1_500);
        h.record(2 * 1000 * MS);
        assert_eq!(h.span(), Some((1, 21)));
        assert_eq!(h.total, 2);
        assert_eq!(h.max_ns, 2000 * MS);
    }

    #[test]
    fn log_heights_keep_rare_buckets_visible() {
        assert_eq!(log_height(0, 1_000_000, 8), 0);
        assert_eq!(log_height(1, 1_000_000, 8), 1);
        assert_eq!(log_height(1_000_000, 1_000_000, 8), 8);
        assert!(log_height(1_000, 1_000_000, 8) >= 3);
        assert_eq!(sparkline(&[], 5), "");
        assert_eq!(sparkline(&[0, 0], 5), "▁▁");
        assert_eq!(sparkline(&[1, 2, 3, 1000], 3), "▁▂█");
    }

    #[test]
    fn rates_and_bpf_cost_like_bpftop() {
        assert_eq!(rate_per_s(100, 1100, 500 * MS), 2000.0);
        assert_eq!(rate_per_s(5, 5, 0), 0.0);
        let p = |name: &str, run_count, run_time_ns| ProgramStats {
            program: name.into(),
            run_count,
            run_time_ns,
            misses: 0,
        };
        let prev = [p("a", 10, 1_000), p("b", 0, 0)];
        let now = [p("a", 110, 21_000), p("b", 100, 10_000), p("c", 0, 0)];
        let c = bpf_cost(&prev, &now, 1000 * MS);
        assert_eq!(c.runs, 200);
        assert_eq!(c.ns_per_run, 150.0);
        assert!((c.cpu_percent - 0.003).abs() < 1e-9);
        assert_eq!(bpf_cost(&[], &[], 0), BpfCost::default());
    }
}
