//! The live pipeline (ring buffer → correlator) and the sentinels that keep it running when
//! the agent's own threads are stuck behind a CPU spinning with interrupts off.
//!
//! Why: in the 6.1 lockup (docs/vm-tests.md) every agent thread whose last CPU was the
//! spinning one stopped for good — runnable but never scheduled, or asleep with its timer or
//! wake-up owed by that CPU — and records written there never woke a reader. Which CPU spins
//! is not known in advance (the pciehp thread's, a driver's), so the agent keeps one small
//! sentinel thread pinned to each of a few CPUs. Each sleeps on its own timer; when the main
//! loop's heartbeat is older than [`STALE`], the first sentinel to get the pipeline drains the
//! ring itself, advances the correlator to its own clock and writes what comes out to its
//! last-gasp channel (agent/lastgasp.rs) at once. The incidents also go to the main loop,
//! which spools, prints and alerts them if it ever runs again.
//!
//! What a sentinel cannot do: take the pipeline from a thread that stalled while holding it
//! (it then says so on its channel, once), or serve HTTP.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::correlate::incident::Incident;
use crate::correlate::Correlator;
use crate::event::{DecoderStats, KTime, Record};
use crate::live::{monotonic_ns, LiveReader};
use crate::trace::ProgramStats;

use super::lastgasp::LastGasp;
use super::metrics::Metrics;

/// Records drained per step.
pub const CHUNK: usize = 8192;
/// A sentinel's sleep between two looks at the heartbeat.
pub const PERIOD: Duration = Duration::from_millis(50);
/// The main loop is presumed stuck when its last step is older than this (its own tick is
/// 100 ms).
pub const STALE: Duration = Duration::from_millis(300);
/// Records a sentinel drained that the metrics have not counted yet, at most.
const MAX_UNOBSERVED: usize = 1 << 16;
/// Most sentinels, spread over the CPUs the agent may run on.
pub const MAX_SENTINELS: usize = 8;

/// What the pipeline drains: the live probes' ring ([`LiveReader`]), or a test's stand-in.
pub trait Ring {
    /// At most `budget` records into `out`; returns how many kernel records were taken.
    fn drain(&mut self, budget: usize, out: &mut Vec<Record>) -> usize;
    /// Loss markers and device records, about once a second.
    fn periodic(&mut self, now: KTime, out: &mut Vec<Record>);
    /// BPF run-time statistics read by the last `periodic`.
    fn program_stats(&self) -> &[ProgramStats];
    /// What the decoder could not complete so far (ABI 3 announcements not seen).
    fn decoder_stats(&self) -> DecoderStats {
        DecoderStats::default()
    }
}

impl Ring for LiveReader {
    fn drain(&mut self, budget: usize, out: &mut Vec<Record>) -> usize {
        LiveReader::drain(self, budget, out)
    }
    fn periodic(&mut self, now: KTime, out: &mut Vec<Record>) {
        LiveReader::periodic(self, now, out)
    }
    fn program_stats(&self) -> &[ProgramStats] {
        self.last_program_stats()
    }
    fn decoder_stats(&self) -> DecoderStats {
        LiveReader::decoder_stats(self)
    }
}

/// The live source and the correlator it feeds: one drain step at a time, by whoever holds it.
pub struct Pipe<R = LiveReader> {
    pub reader: R,
    pub corr: Correlator,
    last_periodic: Option<Instant>,
    /// Records drained by a sentinel, for the metrics (which a sentinel does not touch: their
    /// locks may be held by a stalled thread).
    unobserved: VecDeque<Record>,
    /// Records the metrics never saw because `unobserved` was full.
    pub unobserved_dropped: u64,
    /// Kernel log lines in the current second, and in the one before (lastgasp.rs keeps off
    /// /dev/kmsg while the log floods).
    log_window: (u64, u32, u32),
    /// The newest timestamp the ring has delivered.
    delivered: KTime,
}

/// What one step did.
pub struct Step {
    pub incidents: Vec<Incident>,
    /// The ring had more than one chunk waiting: step again at once.
    pub more: bool,
    /// Time the correlator was advanced to: the monotonic clock after a drain that emptied
    /// the ring, else the newest record delivered.
    pub advanced_to: KTime,
    /// Start of the oldest submission still in flight.
    pub oldest_inflight: Option<KTime>,
}

impl<R: Ring> Pipe<R> {
    pub fn new(reader: R, corr: Correlator) -> Pipe<R> {
        Pipe {
            reader,
            corr,
            last_periodic: None,
            unobserved: VecDeque::new(),
            unobserved_dropped: 0,
            log_window: (0, 0, 0),
            delivered: KTime(0),
        }
    }

    /// Kernel log lines a second, by the last full second or the current one if higher.
    pub fn log_rate(&self) -> u32 {
        self.log_window.1.max(self.log_window.2)
    }

    fn count_log(&mut self, ts: KTime) {
        let sec = ts.0 / 1_000_000_000;
        let (cur, n, _) = self.log_window;
        if sec == cur {
            self.log_window.1 = n.saturating_add(1);
        } else if sec > cur {
            let prev = if sec == cur + 1 { n } else { 0 };
            self.log_window = (sec, 1, prev);
        }
    }

    /// Drains up to a chunk, adds the periodic records (losses, devices) once a second and
    /// advances the correlator's clock to what the ring has delivered: to the monotonic clock
    /// when the drain emptied it, else only to the newest record delivered (the correlator's
    /// reorder window covers the skew between CPUs). A reader that lags never declares hung a
    /// submission whose return is still waiting in the ring, and one that never catches up (a
    /// log storm) still sees time pass. `metrics`: the main loop's; `None` from a sentinel.
    pub fn step(&mut self, metrics: Option<&Metrics>) -> Step {
        let mut incidents = Vec::new();
        let mut step = self.step_each(metrics, |inc, _, _| incidents.push(inc));
        step.incidents = incidents;
        step
    }

    /// [`step`](Pipe::step), handing each incident revision to `each` as the correlator emits
    /// it, with the kernel log's rate and the correlator's counts at that moment: one found
    /// early in a drain of 8192 records does not wait for the rest to be processed (issue 11:
    /// onset to durable). The returned step's `incidents` is empty.
    pub fn step_each(
        &mut self,
        metrics: Option<&Metrics>,
        mut each: impl FnMut(Incident, u32, &crate::correlate::Stats),
    ) -> Step {
        let mut recs = Vec::new();
        let more = self.reader.drain(CHUNK, &mut recs) == CHUNK;
        let now = KTime(monotonic_ns());
        if self
            .last_periodic
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_periodic = Some(Instant::now());
            self.reader.periodic(now, &mut recs);
            if let Some(m) = metrics {
                for p in self.reader.program_stats() {
                    m.bpf_run_time(&p.program, p.run_time_ns);
                }
                m.decoder(self.reader.decoder_stats());
            }
        }
        if let Some(m) = metrics {
            for r in self.unobserved.drain(..) {
                m.observe(&r);
            }
        }
        for r in recs {
            if let Record::Event(e) = &r {
                self.delivered = self.delivered.max(e.meta.ts);
                if matches!(e.payload, crate::event::Payload::KernelLog(_)) {
                    self.count_log(e.meta.ts);
                }
            }
            match metrics {
                Some(m) => m.observe(&r),
                None if self.unobserved.len() < MAX_UNOBSERVED => {
                    self.unobserved.push_back(r.clone())
                }
                None => self.unobserved_dropped += 1,
            }
            for inc in self.corr.push_owned(r) {
                each(inc, self.log_rate(), self.corr.stats());
            }
        }
        let advanced_to = if more { self.delivered } else { now };
        for inc in self.corr.advance(advanced_to) {
            each(inc, self.log_rate(), self.corr.stats());
        }
        // Not a full snapshot: it clones every open incident, many times a second.
        let (n, oldest) = self.corr.inflight_summary();
        if let Some(m) = metrics {
            m.inflight_at(n, oldest, now);
        }
        Step {
            incidents: Vec::new(),
            more,
            advanced_to,
            oldest_inflight: oldest,
        }
    }
}

/// What the main loop and the sentinels share.
pub struct Shared<R = LiveReader> {
    pub pipe: Mutex<Pipe<R>>,
    /// Monotonic ns of the last completed step, by anyone.
    pub heartbeat: AtomicU64,
    pub stop: AtomicBool,
    /// Start (monotonic ns) of the oldest submission in flight after the last step; 0: none.
    /// Shared with the agent's state: its stop guard reads it.
    pub oldest_inflight_ns: Arc<AtomicU64>,
}

impl<R> Shared<R> {
    pub fn new(pipe: Pipe<R>, oldest_inflight_ns: Arc<AtomicU64>) -> Arc<Shared<R>> {
        Arc::new(Shared {
            pipe: Mutex::new(pipe),
            heartbeat: AtomicU64::new(monotonic_ns()),
            stop: AtomicBool::new(false),
            oldest_inflight_ns,
        })
    }

    /// A step completed.
    pub fn beat(&self, step: &Step) {
        self.heartbeat.store(monotonic_ns(), Ordering::Relaxed);
        self.oldest_inflight_ns
            .store(step.oldest_inflight.map_or(0, |t| t.0), Ordering::Relaxed);
    }
}

/// How long the oldest submission has been in flight at `now_ns`, if at least `bound_ns`: then
/// a CPU is presumably spinning in it with interrupts off, and detaching the probes (kernel
/// text patching, which waits for every CPU to answer an IPI) would stop the detaching CPU
/// too (pure).
pub fn stalled_for(oldest_start_ns: u64, now_ns: u64, bound_ns: u64) -> Option<u64> {
    let age = now_ns.saturating_sub(oldest_start_ns);
    (oldest_start_ns != 0 && age >= bound_ns).then_some(age)
}

/// Whether a heartbeat at `beat_ns` is stale at `now_ns` (pure).
pub fn is_stale(beat_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(beat_ns) >= STALE.as_nanos() as u64
}

/// Up to `max` CPUs spread evenly over `allowed` (sorted), first and last included (pure).
pub fn spread(allowed: &[usize], max: usize) -> Vec<usize> {
    if allowed.len() <= max {
        return allowed.to_vec();
    }
    if max <= 1 {
        return allowed.iter().take(max).copied().collect();
    }
    let mut out: Vec<usize> = (0..max)
        .map(|i| allowed[i * (allowed.len() - 1) / (max - 1)])
        .collect();
    out.dedup();
    out
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it for this
    // thread, and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as above; sched_setaffinity(0, ..) applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The sentinel threads; stopped and joined on drop.
pub struct Sentinels<R = LiveReader> {
    shared: Arc<Shared<R>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl<R: Ring + Send + 'static> Sentinels<R> {
    /// One sentinel per CPU in `cpus`, each with its own last-gasp descriptors (`open`, given
    /// the writer's name), each sending what it produced to `rescued`.
    pub fn spawn(
        shared: Arc<Shared<R>>,
        cpus: &[usize],
        open: impl Fn(&str) -> LastGasp,
        rescued: mpsc::Sender<Incident>,
    ) -> Sentinels<R> {
        let mut threads = Vec::new();
        for &cpu in cpus {
            let shared = shared.clone();
            let mut lg = open(&format!("sentinel/{cpu}"));
            let rescued = rescued.clone();
            let t = std::thread::Builder::new()
                .name(format!("sentinel/{cpu}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    if let Err(e) = pin_to(cpu) {
                        eprintln!("itewatch agent: sentinel on CPU {cpu}: cannot pin: {e}");
                        return;
                    }
                    watch(&shared, &mut lg, &rescued);
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => eprintln!("itewatch agent: cannot start a sentinel on CPU {cpu}: {e}"),
            }
        }
        Sentinels { shared, threads }
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl<R> Drop for Sentinels<R> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A sentinel's loop.
fn watch<R: Ring>(shared: &Shared<R>, lg: &mut LastGasp, rescued: &mpsc::Sender<Incident>) {
    let mut said_blocked = false;
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(PERIOD);
        if !is_stale(shared.heartbeat.load(Ordering::Relaxed), monotonic_ns()) {
            said_blocked = false;
            continue;
        }
        let mut pipe = match shared.pipe.try_lock() {
            Ok(p) => p,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                // Held by another sentinel (fine) or by a stalled thread (nothing to do).
                if !said_blocked
                    && monotonic_ns().saturating_sub(shared.heartbeat.load(Ordering::Relaxed))
                        >= 10 * STALE.as_nanos() as u64
                {
                    said_blocked = true;
                    eprintln!("itewatch agent: the live pipeline has been held for over 3 s (a stalled CPU?)");
                }
                continue;
            }
        };
        loop {
            let step = pipe.step(None);
            shared.beat(&step);
            let now = monotonic_ns();
            let rate = pipe.log_rate();
            for inc in step.incidents {
                lg.write(&inc, now, rate);
                let _ = rescued.send(inc);
            }
            if !step.more {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_goes_stale_after_the_bound() {
        let ms = 1_000_000;
        assert!(!is_stale(1_000 * ms, 1_000 * ms));
        assert!(!is_stale(1_000 * ms, 1_299 * ms));
        assert!(is_stale(1_000 * ms, 1_300 * ms));
        // A beat from the future (another CPU's clock read just now) is not stale.
        assert!(!is_stale(2_000 * ms, 1_000 * ms));
    }

    #[test]
    fn a_stop_is_refused_only_behind_a_long_submission() {
        let s = 1_000_000_000;
        assert_eq!(stalled_for(0, 100 * s, s), None, "nothing in flight");
        assert_eq!(stalled_for(99 * s + 1, 100 * s, s), None);
        assert_eq!(stalled_for(98 * s, 100 * s, s), Some(2 * s));
    }

    #[test]
    fn sentinels_spread_over_the_allowed_cpus() {
        assert_eq!(spread(&[0, 1], 8), vec![0, 1]);
        assert_eq!(spread(&[3], 8), vec![3]);
        let many: Vec<usize> = (0..64).collect();
        let s = spread(&many, 8);
        assert_eq!(s.len(), 8);
        assert_eq!(s.first(), Some(&0));
        assert_eq!(s.last(), Some(&63));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(spread(&many, 1), vec![0]);
        assert!(spread(&many, 0).is_empty());
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(!allowed_cpus().is_empty());
    }

    /// A ring that hands out a simulated hang's records, then nothing (the spinning CPU's
    /// submission never returns).
    struct FakeRing(std::vec::IntoIter<Record>);

    impl Ring for FakeRing {
        fn drain(&mut self, budget: usize, out: &mut Vec<Record>) -> usize {
            let before = out.len();
            out.extend(self.0.by_ref().take(budget));
            out.len() - before
        }
        fn periodic(&mut self, _now: KTime, _out: &mut Vec<Record>) {}
        fn program_stats(&self) -> &[ProgramStats] {
            &[]
        }
    }

    /// A simulated hang cut right after its last submission (so nothing after it returns),
    /// moved so that it ends now on the monotonic clock the sentinels advance the correlator
    /// to.
    fn hang_now() -> Vec<Record> {
        use crate::event::Payload;
        let sim = crate::simulate::generate("hang-no-hotplug", 0).unwrap();
        let last_submit = sim
            .records
            .iter()
            .filter_map(|r| match r {
                Record::Event(e) if matches!(e.payload, Payload::Submit(_)) => Some(e.meta.ts),
                _ => None,
            })
            .max()
            .unwrap();
        let now = monotonic_ns();
        sim.records
            .into_iter()
            .filter(|r| r.ts().is_none_or(|t| t <= last_submit))
            .map(|mut r| {
                if let Record::Event(e) = &mut r {
                    e.meta.ts = KTime(now - (last_submit.0 - e.meta.ts.0));
                }
                r
            })
            .collect()
    }

    /// The main loop stopped (a stale heartbeat, as when its CPU spins with interrupts off):
    /// a sentinel takes the pipeline over, drains and correlates, writes the critical hang to
    /// its own last-gasp channel under its own name, and hands the incident to the main loop.
    #[test]
    fn a_sentinel_takes_over_a_stalled_main_loop() {
        let dir = std::env::temp_dir().join(format!("itewatch-sentinel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = dir.join("lastgasp");
        let _ = std::fs::remove_file(&lines);
        let pipe = Pipe::new(
            FakeRing(hang_now().into_iter()),
            Correlator::new(Default::default()),
        );
        let shared = Shared::new(pipe, Arc::default());
        // The main loop's last beat was long ago.
        shared.heartbeat.store(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let cpu = allowed_cpus()[0];
        let path = lines.clone();
        let sentinels = Sentinels::spawn(
            shared.clone(),
            &[cpu],
            move |w: &str| LastGasp::open(w, std::slice::from_ref(&path), false).0,
            tx,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while std::time::Instant::now() < deadline {
            got.extend(rx.try_iter());
            if got.iter().any(|i: &Incident| {
                i.kind == crate::correlate::incident::IncidentKind::HungInvalidation
                    && i.severity == crate::correlate::incident::Severity::Critical
            }) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(sentinels);
        let text = std::fs::read_to_string(&lines).unwrap_or_default();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            got.iter()
                .any(|i| i.severity == crate::correlate::incident::Severity::Critical),
            "no critical incident from the sentinel: {:?}",
            got.iter().map(|i| (i.kind, i.severity)).collect::<Vec<_>>()
        );
        let writer = format!("\"writer\":\"sentinel/{cpu}\"");
        assert!(
            text.lines()
                .any(|l| l.contains("\"severity\":\"critical\"") && l.contains(&writer)),
            "the sentinel wrote no critical line: {text}"
        );
        assert_ne!(shared.oldest_inflight_ns.load(Ordering::Relaxed), 0);
    }

    /// Regression (issue: invented hangs; and the storm that never drains): a drain cut by its
    /// budget advances the clock only to the newest record delivered; an emptied ring, to now.
    #[test]
    fn a_lagging_ring_advances_the_clock_only_to_what_it_delivered() {
        let recs = hang_now();
        let newest = recs.iter().filter_map(Record::ts).max().unwrap();
        let n = recs.len();
        // Pad past one chunk so the first drain is cut by its budget.
        let mut padded: Vec<Record> = (0..CHUNK)
            .map(|_| {
                Record::Lost(crate::event::LostRecord {
                    after: KTime(1),
                    ringbuf_full: 0,
                    missed: 0,
                    undecodable: 0,
                })
            })
            .collect();
        padded.extend(recs);
        let mut pipe = Pipe::new(
            FakeRing(padded.into_iter()),
            Correlator::new(Default::default()),
        );
        let first = pipe.step(None);
        assert!(first.more);
        assert!(first.advanced_to < KTime(monotonic_ns()));
        let second = pipe.step(None);
        assert!(!second.more, "{n} records left after one chunk");
        assert!(second.advanced_to >= newest);
    }

    /// Issue 11: a drain hands an incident over as the correlator emits it, before the rest
    /// of the records it drained are processed.
    #[test]
    fn a_drain_hands_an_incident_over_before_the_rest_of_it() {
        let recs = crate::simulate::generate("w1-driver-inflight", 1)
            .unwrap()
            .records;
        assert!(recs.len() < CHUNK, "one drain takes the whole scenario");
        let total = recs.len() as u64;
        let mut pipe = Pipe::new(
            FakeRing(recs.into_iter()),
            Correlator::new(Default::default()),
        );
        let mut handed = Vec::new();
        let step = pipe.step_each(None, |inc, _, st| handed.push((inc.revision, st.records)));
        let (rev, counted) = *handed.first().expect("the scenario raises an incident");
        assert_eq!(rev, 0);
        assert!(
            counted < total,
            "handed over after all {total} drained records were processed"
        );
        assert!(step.incidents.is_empty());
    }

    /// While the main loop beats, sentinels leave the pipeline alone.
    #[test]
    fn sentinels_stay_out_of_a_healthy_main_loop() {
        let pipe = Pipe::new(
            FakeRing(hang_now().into_iter()),
            Correlator::new(Default::default()),
        );
        let shared = Shared::new(pipe, Arc::default());
        let (tx, rx) = mpsc::channel();
        let sentinels = Sentinels::spawn(
            shared.clone(),
            &[allowed_cpus()[0]],
            |w: &str| LastGasp::open(w, &[], false).0,
            tx,
        );
        for _ in 0..20 {
            shared.heartbeat.store(monotonic_ns(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(25));
        }
        drop(sentinels);
        assert_eq!(rx.try_iter().count(), 0);
        let pipe = shared.pipe.lock().unwrap();
        assert!(pipe.reader.0.len() > 0, "nothing was drained");
    }
}
