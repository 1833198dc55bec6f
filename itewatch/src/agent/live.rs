//! The live source: attached probes, their ring buffer drained on each tick, loss counters
//! turned into `Lost` records, BPF run-time stats enabled while the agent runs (the fd is
//! held; closing it, also by dying, turns them off again).

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use aya::maps::{MapData, RingBuf, StackTraceMap};

use crate::event::{Event, KTime, LostRecord, Record, StackRecord};
use crate::kallsyms::Kallsyms;
use crate::probe::{CounterTotals, Counters, LoadOptions, ProbeError, Probes};
use crate::trace::ProgramStats;

pub struct Live {
    probes: Probes,
    ring: RingBuf<MapData>,
    stacks: StackTraceMap<MapData>,
    counters: Counters,
    kallsyms: Option<Kallsyms>,
    seen_stacks: HashSet<u32>,
    reported: CounterTotals,
    undecodable: u64,
    undecodable_reported: u64,
    last_ts: KTime,
    _stats_fd: Option<OwnedFd>,
}

impl Live {
    pub fn attach() -> Result<Live, ProbeError> {
        let mut probes = Probes::attach(&LoadOptions::default())?;
        let ring = probes.take_events()?;
        let stacks = probes.take_stacks()?;
        let counters = probes.take_counters()?;
        let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let kallsyms = probes.kallsyms.take();
        Ok(Live {
            probes,
            ring,
            stacks,
            counters,
            kallsyms,
            seen_stacks: HashSet::new(),
            reported: CounterTotals::default(),
            undecodable: 0,
            undecodable_reported: 0,
            last_ts: KTime(0),
            _stats_fd: stats_fd,
        })
    }

    /// (probe, attached) for every probe of the plan.
    pub fn plan(&self) -> Vec<(String, bool)> {
        self.probes
            .plan
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.state == "attached" || p.state == "fell-back",
                )
            })
            .collect()
    }

    pub fn missing_required(&self) -> Vec<String> {
        self.probes
            .missing_required()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.probes.program_stats()
    }

    fn symbolize(&self, id: u32) -> Vec<String> {
        match self.stacks.get(&id, 0) {
            Ok(st) => st
                .frames()
                .iter()
                .map(|f| match &self.kallsyms {
                    Some(k) => k.symbolize(f.ip),
                    None => format!("{:#x}", f.ip),
                })
                .collect(),
            Err(e) => vec![format!("<stack {id} unreadable: {e}>")],
        }
    }

    /// Drains at most `budget` events into `out`.
    pub fn poll(&mut self, budget: usize, out: &mut Vec<Record>) {
        for _ in 0..budget {
            let Some(item) = self.ring.next() else {
                break;
            };
            let ev = match Event::decode(&item) {
                Ok(e) => e,
                Err(_) => {
                    self.undecodable += 1;
                    continue;
                }
            };
            drop(item);
            if let Some(id) = ev.payload.stack() {
                if self.seen_stacks.insert(id.0) {
                    let frames = self.symbolize(id.0);
                    out.push(Record::Stack(StackRecord { id, frames }));
                }
            }
            self.last_ts = self.last_ts.max(ev.meta.ts);
            out.push(Record::Event(ev));
        }
    }

    /// Loss counters since the last call, as a `Lost` record.
    pub fn losses(&mut self, now: KTime, out: &mut Vec<Record>) {
        let t = self.counters.totals();
        let full = t.ringbuf_full.saturating_sub(self.reported.ringbuf_full);
        let undecodable = self.undecodable - self.undecodable_reported;
        if full > 0 || undecodable > 0 {
            out.push(Record::Lost(LostRecord {
                after: if self.last_ts.0 == 0 {
                    now
                } else {
                    self.last_ts
                },
                ringbuf_full: full,
                missed: 0,
                undecodable,
            }));
        }
        self.reported = t;
        self.undecodable_reported = self.undecodable;
    }
}
