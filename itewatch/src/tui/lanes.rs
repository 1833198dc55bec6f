//! The per-CPU lane view of an incident's timeline: the ITE thread's CPU0/CPU1 picture, drawn
//! from the events themselves (one column per CPU, time going down). Pure.

use crate::correlate::incident::TimelineEntry;
use crate::event::KTime;

/// One event placed in its CPU's lane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneRow {
    /// Nanoseconds since the incident's start.
    pub rel_ns: u64,
    /// Index into [`Lanes::cpus`].
    pub lane: usize,
    /// `event  task[tid]`.
    pub head: String,
    /// The decoded fields.
    pub detail: String,
}

/// Lanes and their rows, in time order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lanes {
    /// Lane titles: `CPU0`, `CPU1`, .. (`other` collects CPUs beyond the lane budget).
    pub titles: Vec<String>,
    pub rows: Vec<LaneRow>,
}

/// Lays `timeline` out in at most `max_lanes` lanes: the busiest CPUs get their own lane (in
/// CPU order), the rest share an `other` lane.
pub fn lanes(timeline: &[TimelineEntry], start: KTime, max_lanes: usize) -> Lanes {
    let max_lanes = max_lanes.max(1);
    let mut counts: std::collections::BTreeMap<u32, usize> = Default::default();
    for t in timeline {
        *counts.entry(t.cpu).or_default() += 1;
    }
    let mut cpus: Vec<u32> = counts.keys().copied().collect();
    let overflow = cpus.len() > max_lanes;
    if overflow {
        let mut by_count: Vec<(usize, u32)> = counts.iter().map(|(c, n)| (*n, *c)).collect();
        by_count.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        cpus = by_count.iter().take(max_lanes - 1).map(|x| x.1).collect();
        cpus.sort_unstable();
    }
    let mut titles: Vec<String> = cpus.iter().map(|c| format!("CPU{c}")).collect();
    if overflow {
        titles.push("other".into());
    }
    let rows = timeline
        .iter()
        .map(|t| {
            let lane = cpus.iter().position(|c| *c == t.cpu).unwrap_or(cpus.len());
            let mut head = format!("{}  {}[{}]", t.event, t.task, t.tid);
            if overflow && lane == cpus.len() {
                head = format!("cpu{} {head}", t.cpu);
            }
            LaneRow {
                rel_ns: t.ts.saturating_sub(start),
                lane,
                head,
                detail: t.detail.clone(),
            }
        })
        .collect();
    Lanes { titles, rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(ts: u64, cpu: u32, event: &str) -> TimelineEntry {
        TimelineEntry {
            ts: KTime(ts),
            cpu,
            tid: 100 + cpu,
            task: format!("t{cpu}"),
            event: event.into(),
            detail: format!("d{ts}"),
            caller: None,
        }
    }

    #[test]
    fn two_cpus_two_lanes_in_time_order() {
        let tl = [
            e(1000, 0, "submit"),
            e(1500, 1, "hotplug-ist"),
            e(3000, 0, "submit-return"),
        ];
        let l = lanes(&tl, KTime(1000), 4);
        assert_eq!(l.titles, ["CPU0", "CPU1"]);
        assert_eq!(
            l.rows
                .iter()
                .map(|r| (r.rel_ns, r.lane))
                .collect::<Vec<_>>(),
            [(0, 0), (500, 1), (2000, 0)]
        );
        assert_eq!(l.rows[1].head, "hotplug-ist  t1[101]");
    }

    #[test]
    fn extra_cpus_share_an_other_lane() {
        let tl = [
            e(1, 0, "a"),
            e(2, 0, "b"),
            e(3, 5, "c"),
            e(4, 7, "d"),
            e(5, 5, "e"),
        ];
        let l = lanes(&tl, KTime(0), 2);
        assert_eq!(l.titles, ["CPU0", "other"]);
        assert_eq!(l.rows[2].lane, 1);
        assert!(l.rows[2].head.starts_with("cpu5 "));
        assert!(lanes(&[], KTime(0), 3).titles.is_empty());
    }
}
