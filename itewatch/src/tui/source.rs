//! Where the live view's records come from: the live probes, or a recorded / simulated stream
//! played back against the wall clock (`--speed`). Every source hands out [`Record`]s, so the
//! correlator and the view cannot tell them apart.

use crate::event::{KTime, Record};
use crate::live::LiveReader;
use crate::probe::Probes;
use crate::trace::ProgramStats;

use super::metrics::{bpf_cost, BpfCost};

/// A finite stream played back in (scaled) real time.
pub struct Playback {
    recs: Box<dyn Iterator<Item = Record>>,
    next: Option<Record>,
    /// Virtual ns per wall ns; `0` = as fast as possible.
    speed: f64,
    /// (wall, stream time) at which playback started: the first timestamped record that is
    /// not a device snapshot. A recording starts with the snapshot and its first event may
    /// come seconds later (9 s in the bundled VM trace): the snapshot is handed out at once
    /// and the clock starts at the first event, so a replay does not open on a still screen.
    origin: Option<(u64, KTime)>,
    paused_at: Option<u64>,
    paused_total: u64,
    last_ts: KTime,
    done: bool,
}

impl Playback {
    pub fn new(recs: Box<dyn Iterator<Item = Record>>, speed: f64) -> Playback {
        Playback {
            recs,
            next: None,
            speed: if speed.is_finite() && speed > 0.0 {
                speed
            } else {
                0.0
            },
            origin: None,
            paused_at: None,
            paused_total: 0,
            last_ts: KTime(0),
            done: false,
        }
    }

    /// Plays the rest as fast as possible.
    pub fn unpace(&mut self) {
        self.speed = 0.0;
    }

    /// Stream time at wall time `wall_ns`.
    fn vnow(&self, wall_ns: u64) -> Option<KTime> {
        let (w0, t0) = self.origin?;
        if self.speed == 0.0 {
            return Some(KTime(u64::MAX));
        }
        let wall = self.paused_at.unwrap_or(wall_ns);
        let elapsed = wall.saturating_sub(w0).saturating_sub(self.paused_total);
        Some(KTime(
            t0.0.saturating_add((elapsed as f64 * self.speed) as u64),
        ))
    }

    pub fn set_paused(&mut self, paused: bool, wall_ns: u64) {
        match (paused, self.paused_at) {
            (true, None) => self.paused_at = Some(wall_ns),
            (false, Some(at)) => {
                self.paused_total += wall_ns.saturating_sub(at);
                self.paused_at = None;
            }
            _ => {}
        }
    }

    /// Appends every record due by `wall_ns` (at most `budget`) to `out`.
    pub fn poll(&mut self, wall_ns: u64, budget: usize, out: &mut Vec<Record>) {
        if self.paused_at.is_some() {
            return;
        }
        for _ in 0..budget {
            if self.next.is_none() {
                self.next = self.recs.next();
            }
            let Some(r) = self.next.take() else {
                self.done = true;
                return;
            };
            if let Some(ts) = r.ts() {
                if self.origin.is_none() && !matches!(r, Record::Device(_)) {
                    self.origin = Some((wall_ns, ts));
                }
                if self.vnow(wall_ns).is_some_and(|now| ts > now) {
                    self.next = Some(r);
                    return;
                }
                self.last_ts = self.last_ts.max(ts);
            }
            out.push(r);
        }
    }

    /// The time to tell the correlator: never past what the stream has shown. With the next
    /// record in hand, stream time may run up to it (paced playback of a quiet stretch);
    /// without it (the poll's budget ran out first) nothing beyond the last record played is
    /// known: at `--speed 0` the stream time is unbounded, and advancing to it declared hung
    /// every submission whose return was simply not pulled yet.
    pub fn clock(&self, wall_ns: u64) -> KTime {
        match (self.vnow(wall_ns), &self.next) {
            (Some(now), Some(r)) if !self.done => now.min(r.ts().unwrap_or(self.last_ts)),
            _ => self.last_ts,
        }
    }

    /// The whole stream has been handed out.
    pub fn done(&self) -> bool {
        self.done
    }
}

/// The live probes ([`LiveReader`], shared with `record` and `agent`), read without blocking
/// at the loop's tick, and the BPF cost of each interval for the header.
pub struct Live {
    reader: LiveReader,
    stats_prev: Vec<ProgramStats>,
    stats_prev_wall: u64,
    pub cost: Option<BpfCost>,
}

impl Live {
    /// Takes the maps of attached probes and enables BPF stats.
    pub fn new(probes: Probes, wall_ns: u64) -> Result<Live, crate::probe::ProbeError> {
        let reader = LiveReader::new(probes)?;
        Ok(Live {
            cost: reader.stats_enabled().then(BpfCost::default),
            stats_prev: reader.program_stats(),
            stats_prev_wall: wall_ns,
            reader,
        })
    }

    pub fn plan(&self) -> &[crate::trace::ProbeStatus] {
        self.reader.plan()
    }

    pub fn kernel_fixes(&self) -> Vec<crate::trace::KernelFixStatus> {
        self.reader.kernel_fixes()
    }

    pub fn decoder_stats(&self) -> crate::event::DecoderStats {
        self.reader.decoder_stats()
    }

    /// Drains the ring buffer (at most `budget` events) into `out`.
    pub fn poll(&mut self, budget: usize, out: &mut Vec<Record>) {
        self.reader.drain(budget, out);
    }

    /// Once a second (and at once): loss markers, device identities after a hot-plug, and
    /// the BPF cost of the interval.
    pub fn periodic(&mut self, wall_ns: u64, out: &mut Vec<Record>) {
        self.reader.periodic(KTime(wall_ns), out);
        if self.cost.is_some() {
            let stats = self.reader.last_program_stats().to_vec();
            self.cost = Some(bpf_cost(
                &self.stats_prev,
                &stats,
                wall_ns.saturating_sub(self.stats_prev_wall),
            ));
            self.stats_prev = stats;
            self.stats_prev_wall = wall_ns;
        }
    }
}

/// Either source.
pub enum Source {
    Live(Box<Live>),
    Playback(Box<Playback>),
}

impl Source {
    pub fn poll(&mut self, wall_ns: u64, budget: usize, out: &mut Vec<Record>) {
        match self {
            Source::Live(l) => l.poll(budget, out),
            Source::Playback(p) => p.poll(wall_ns, budget, out),
        }
    }

    /// The time to give the correlator's `advance` (live: only after a poll that drained the
    /// ring, see `Engine::step`).
    pub fn clock(&self, wall_ns: u64) -> KTime {
        match self {
            Source::Live(_) => KTime(wall_ns),
            Source::Playback(p) => p.clock(wall_ns),
        }
    }

    pub fn done(&self) -> bool {
        match self {
            Source::Live(_) => false,
            Source::Playback(p) => p.done(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::LostRecord;

    fn lost(ts: u64) -> Record {
        Record::Lost(LostRecord {
            after: KTime(ts),
            ringbuf_full: 1,
            missed: 0,
            undecodable: 0,
        })
    }

    #[test]
    fn playback_follows_the_wall_clock_at_its_speed() {
        let recs = vec![lost(1_000), lost(2_000), lost(11_000)];
        let mut p = Playback::new(Box::new(recs.into_iter()), 1.0);
        let mut out = Vec::new();
        p.poll(500, 100, &mut out);
        assert_eq!(out.len(), 1, "first record sets the origin");
        p.poll(1_500, 100, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(p.clock(1_500), KTime(2_000));
        p.set_paused(true, 1_600);
        p.poll(50_000, 100, &mut out);
        assert_eq!(out.len(), 2, "paused");
        p.set_paused(false, 10_000);
        // 8400 ns paused: stream time at wall 19_000 is 1000 + 18500 - 8400 = 11_100.
        p.poll(19_000, 100, &mut out);
        assert_eq!(out.len(), 3);
        p.poll(19_001, 100, &mut out);
        assert!(p.done());
        assert_eq!(
            p.clock(1 << 40),
            KTime(11_000),
            "the clock stops at the end"
        );
    }

    /// Regression: at --speed 0 a poll cut by its budget left the clock at u64::MAX (the
    /// header showed t=18446744073.699551 and replays invented hangs).
    #[test]
    fn a_budget_cut_poll_leaves_the_clock_at_the_last_record() {
        let recs: Vec<Record> = (0..10).map(|i| lost(i * 1_000_000_000)).collect();
        let mut p = Playback::new(Box::new(recs.into_iter()), 0.0);
        let mut out = Vec::new();
        p.poll(0, 4, &mut out);
        assert_eq!(p.clock(5), KTime(3_000_000_000));
        let mut paced = Playback::new(Box::new((0..10).map(|i| lost(i * 1_000_000_000))), 1.0);
        paced.poll(0, 3, &mut out);
        // The next record (1 s) is in hand: stream time may run up to it.
        assert_eq!(paced.clock(60_000_000_000), KTime(1_000_000_000));
        paced.poll(60_000_000_000, 2, &mut out);
        // The budget ran out before the next was pulled: the last played (2 s), not 60 s.
        assert_eq!(paced.clock(60_000_000_000), KTime(2_000_000_000));
    }

    // Regression: the bundled VM trace opened on a still screen for 9 s at --speed 1 (its
    // device snapshot is 9 s older than its first event).
    #[test]
    fn playback_starts_at_the_first_event_not_at_the_device_snapshot() {
        let reader = crate::trace::TraceReader::new(crate::tui::BUNDLED_TRACE).unwrap();
        let recs: Vec<Record> = reader.map_while(Result::ok).collect();
        let first_device = recs.iter().find_map(|r| match r {
            Record::Device(d) => Some(d.seen),
            _ => None,
        });
        let first_event = recs.iter().find_map(|r| match r {
            Record::Event(e) => Some(e.meta.ts),
            _ => None,
        });
        let (dev, ev) = (first_device.unwrap(), first_event.unwrap());
        assert!(
            ev.0 - dev.0 > 5_000_000_000,
            "the trace has the quiet stretch"
        );
        let mut p = Playback::new(Box::new(recs.into_iter()), 1.0);
        let mut out = Vec::new();
        p.poll(1_000, 1_000_000, &mut out);
        // At once: the snapshot and the first event (and all else at the first event's time).
        assert!(out.iter().any(|r| matches!(r, Record::Device(_))));
        assert!(
            out.iter().any(|r| matches!(r, Record::Event(_))),
            "{}",
            out.len()
        );
        assert_eq!(p.clock(1_000), ev, "stream time starts at the first event");
    }

    #[test]
    fn speed_zero_plays_everything_at_once() {
        let recs: Vec<Record> = (0..10).map(|i| lost(i * 1_000_000_000)).collect();
        let mut p = Playback::new(Box::new(recs.into_iter()), 0.0);
        let mut out = Vec::new();
        p.poll(0, 4, &mut out);
        assert_eq!(out.len(), 4, "within the budget");
        p.poll(0, 100, &mut out);
        assert_eq!(out.len(), 10);
        assert!(p.done());
    }
}
