//! The correlator: events in, incidents out (docs/correlator.md).
//!
//! Pure and deterministic: no clocks, I/O, threads or randomness. Time comes only from event
//! timestamps (and [`Correlator::advance`] for a live caller's "nothing happened until now"),
//! maps are ordered and ids are derived from the input, so replaying a trace gives the same
//! incidents byte for byte. All state is bounded by [`Config`]; evictions are counted in
//! [`Stats`] and mark the incidents they touch partial.
//!
//! ```text
//! push(record) ─► reorder buffer (reorder_window_ns) ─► process in (ts, arrival) order
//!                  devices by (segment, SID) · slots by controller · submissions by thread
//!                  ─► detect (verdicts) ─► describe (wording) ─► Vec<Incident> (revisions)
//! ```

pub mod describe;
pub mod detect;
mod devices;
pub mod incident;
mod incidents;
mod ite;
pub mod state;
mod submissions;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::event::{
    Bdf, CallerPath, Descriptor, DeviceInfo, DeviceRef, Event, Flush, HpTrace, HpWhat, IstReturn,
    KTime, LogLine, LostRecord, Payload, Record, Sid, Slot, StackId, StackRecord, Submit,
    SubmitReturn, Walk,
};

use crate::analyze::facts::SlotWhat;
use crate::pairing::{Opened, PairKey, Pairing, Runner};
use detect::{FixHint, LogFact, Release};
use incident::{
    Attribution, DeviceState, Incident, IncidentDevice, IncidentId, IncidentKind, Outcome,
    RemovalKind, SubmissionView, TimelineEntry, Window,
};
use state::{
    push_bounded, DevKey, DeviceEntry, DisconnectHow, FastMap, Inflight, LostLog, OpenIncident,
    Removal, ReorderBuffer, Sids, SlotState, WalkRec,
};

const MS: u64 = 1_000_000;

/// Thresholds and bounds. Defaults are documented in docs/correlator.md.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// A submission outstanding this long is `hung-invalidation` (warning).
    pub hung_warn_ns: u64,
    /// ... and this long, critical (the hard-lockup watchdog fires at ~10 s).
    pub hung_crit_ns: u64,
    /// A device-TLB invalidation slower than this "took long" (W1 completed late, W3).
    pub slow_ns: u64,
    /// Records are held this long to put per-CPU interleavings back in time order.
    pub reorder_window_ns: u64,
    /// ITE reports about one device this close together are one incident.
    pub ite_merge_ns: u64,
    /// An aggregate incident (W2, W3, ITE) with nothing in flight closes after this quiet time.
    pub idle_close_ns: u64,
    /// Removed devices, walks and lost markers are forgotten after this long.
    pub retention_ns: u64,
    /// A `qi_flush_dev_iotlb` at most this long before a submit on the same thread issued it.
    pub flush_link_ns: u64,
    pub max_devices: usize,
    pub max_inflight: usize,
    pub max_slots: usize,
    pub max_stacks: usize,
    pub max_open_incidents: usize,
    /// Timeline entries per incident (first half and last half kept).
    pub max_timeline: usize,
    /// Lifecycle events remembered per device / slot.
    pub max_history: usize,
    pub max_lost_markers: usize,
    pub max_walks: usize,
    /// Member submissions listed per incident; past it the oldest finished ones are left out
    /// (counted in `submissions_omitted`; their worst outcomes still count).
    pub max_members: usize,
    /// A revision that changes nothing a reader acts on (kind, severity, outcome class,
    /// window, attribution, device, removal, partial, related, closed) waits until this much
    /// stream time has passed since the last one; the final revision always goes out.
    pub coalesce_ns: u64,
    /// The upstream fixes as the recording kernel's own code showed them (the trace header's
    /// `kernel_fixes`, from `itewatch`'s kcode checks). Empty: unknown. A fix the code shows
    /// present is never reported missing, and the explanations say what this kernel does.
    pub kernel_fixes: Vec<crate::trace::KernelFixStatus>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hung_warn_ns: 100 * MS,
            hung_crit_ns: 1000 * MS,
            slow_ns: 10 * MS,
            reorder_window_ns: 10 * MS,
            ite_merge_ns: 1000 * MS,
            idle_close_ns: 1000 * MS,
            retention_ns: 60_000 * MS,
            flush_link_ns: MS,
            max_devices: 4096,
            max_inflight: 4096,
            max_slots: 256,
            max_stacks: 65536,
            max_open_incidents: 1024,
            max_timeline: 64,
            max_history: 16,
            max_lost_markers: 1024,
            max_walks: 64,
            kernel_fixes: Vec::new(),
            max_members: 256,
            coalesce_ns: 1000 * MS,
        }
    }
}

/// What a reader acts on in a revision (docs/correlator.md): a revision that changes none of
/// it waits for `coalesce_ns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    kind: IncidentKind,
    severity: incident::Severity,
    outcome: Option<&'static str>,
    window: Option<Window>,
    attribution: Option<incident::Attribution>,
    device: incident::IncidentDevice,
    removal: Option<incident::RemovalKind>,
    partial: bool,
    related: Vec<IncidentId>,
    closed: bool,
}

impl Material {
    /// What `i` says that a reader acts on.
    pub fn of(i: &Incident) -> Material {
        Material::with_omitted(i, None)
    }

    /// The outcome that counts is the worst *finished* one (members left out of the list
    /// included: `omitted`), or in flight when none has finished: an aggregate incident's
    /// worst outcome otherwise flips to "in flight" with every member that comes, and back;
    /// a member that stays in flight too long changes the severity instead.
    pub(crate) fn with_omitted(i: &Incident, omitted: Option<Outcome>) -> Material {
        let finished = i
            .submissions
            .iter()
            .map(|s| s.outcome)
            .chain(omitted)
            .filter(|o| o.is_final())
            .max_by_key(detect::outcome_rank);
        let outcome = finished.or(i.outcome).map(|o| o.name());
        Material {
            kind: i.kind,
            severity: i.severity,
            outcome,
            window: i.window,
            attribution: i.attribution.clone(),
            device: i.device.clone(),
            removal: i.removal,
            partial: i.partial,
            related: i.related.clone(),
            closed: i.closed,
        }
    }
}

/// State dropped to stay within the bounds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evictions {
    pub devices: u64,
    pub inflight: u64,
    pub slots: u64,
    pub stacks: u64,
    pub incidents: u64,
    pub walks: u64,
    pub lost_markers: u64,
}

/// The segment of a [`DevKey`] whose PCI segment could not be resolved (never taken as 0).
pub const SEG_UNKNOWN: u16 = itewatch_common::SEGMENT_UNKNOWN;

/// `Some(segment)` unless it is [`SEG_UNKNOWN`].
pub fn known_segment(seg: u16) -> Option<u16> {
    (seg != SEG_UNKNOWN).then_some(seg)
}

/// Counters: what the correlator saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub records: u64,
    pub events: u64,
    pub stacks: u64,
    pub device_snapshots: u64,
    pub lost_markers: u64,
    /// Sum of the markers' counts (ring buffer full + missed + undecodable).
    pub lost_events: u64,
    pub submissions: u64,
    pub returns: u64,
    pub dev_tlb_descriptors: u64,
    /// Returns with no submission in flight on their thread.
    pub orphan_returns: u64,
    /// Submissions whose return was lost: open across lost records when the next one on the
    /// same thread (CPU, for thread 0) came (pairing.rs).
    pub returns_lost: u64,
    /// Submissions issued while another was open on the same thread: an interrupt's, nested
    /// on the one it interrupted (pairing.rs).
    #[serde(default)]
    pub nested: u64,
    /// Device-TLB submissions and disconnect walks whose PCI segment could not be resolved
    /// (several segments, and neither the event, its IOMMU unit nor a slot told): they match
    /// only devices of unknown segment, so a verdict about them may be missed.
    #[serde(default)]
    pub unknown_segment: u64,
    /// Exact duplicates of the submission in flight on a thread, ignored.
    pub duplicates: u64,
    /// Submissions carrying a device-TLB descriptor that came without a kernel stack (the
    /// probe could not take one: stack map full, or a hash collision): their caller path is
    /// unknown.
    #[serde(default)]
    pub dev_tlb_without_stack: u64,
    /// Records older than what had already been processed (beyond the reorder window).
    pub late_records: u64,
    /// Submissions still outstanding when the stream ended.
    pub unreturned_at_end: u64,
    /// Incidents opened, by kind name.
    pub incidents: BTreeMap<String, u64>,
    /// Incident revisions emitted.
    pub revisions: u64,
    /// Revisions held back because nothing a reader acts on had changed (coalesced into a
    /// later one).
    #[serde(default)]
    pub revisions_coalesced: u64,
    pub evicted: Evictions,
}

/// End of stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Revisions emitted by `finish` (every incident still open, closed).
    pub incidents: Vec<Incident>,
    pub stats: Stats,
    /// Submissions that had not returned when the stream ended (incidents or not).
    pub unreturned: Vec<SubmissionView>,
    /// Time of the last record.
    pub end: KTime,
}

/// A device as the correlator sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device: IncidentDevice,
    pub disconnected_at: Option<KTime>,
    pub removing_at: Option<KTime>,
    pub released_at: Option<KTime>,
}

/// A slot as the correlator sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotView {
    pub ctrl: u64,
    pub port: Option<Bdf>,
    pub name: Option<String>,
    pub secondary: u8,
    pub subordinate: u8,
    /// pciehp handler running: its thread and start.
    pub handler: Option<(u32, KTime)>,
    pub removal: Option<RemovalKind>,
    pub removal_at: Option<KTime>,
    pub removal_active: bool,
    pub link_down_at: Option<KTime>,
}

/// Live state for a TUI or an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub now: KTime,
    pub inflight: Vec<SubmissionView>,
    pub devices: Vec<DeviceView>,
    pub slots: Vec<SlotView>,
    pub open_incidents: Vec<Incident>,
    pub buffered_records: usize,
    pub stats: Stats,
}

#[derive(Clone, Copy, Debug)]
struct StackInfo {
    path: CallerPath,
    hint: FixHint,
}

/// How a submission ended.
enum End<'a> {
    Returned { event: &'a Event, ret: i64 },
    ReturnLost,
    Evicted,
    Stopped,
}

/// The correlation engine. Feed it records with [`push`](Correlator::push), tell it the time
/// with [`advance`](Correlator::advance) when live, and call [`finish`](Correlator::finish) at
/// the end of the stream.
pub struct Correlator {
    cfg: Config,
    buf: ReorderBuffer,
    arrivals: u64,
    clock: KTime,
    stacks: BTreeMap<StackId, StackInfo>,
    devices: BTreeMap<DevKey, DeviceEntry>,
    slots: BTreeMap<u64, SlotState>,
    walks: VecDeque<WalkRec>,
    /// PCI segments the trace has shown, and the segment of each IOMMU unit (a unit serves
    /// one segment): what resolves an event that came without one (segments.rs rule below).
    segments: BTreeSet<u16>,
    iommu_segments: BTreeMap<String, u16>,
    inflight: Pairing<Box<Inflight>>,
    last_flush: FastMap<Runner, Box<Event>>,
    /// Boxes of finished submissions, reused (allocation-free steady state).
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Inflight>>,
    open: BTreeMap<IncidentId, OpenIncident>,
    by_key: BTreeMap<(IncidentKind, Option<DevKey>), IncidentId>,
    last_ite: Option<IncidentId>,
    pending: BTreeSet<IncidentId>,
    /// Revisions held back by coalescing, and the earliest time one of them is due.
    held: BTreeSet<IncidentId>,
    next_release: u64,
    lost: LostLog,
    stats: Stats,
    next_deadline: u64,
    next_housekeeping: u64,
    out: Vec<Incident>,
}

impl Correlator {
    pub fn new(cfg: Config) -> Self {
        let max_inflight = cfg.max_inflight;
        Correlator {
            cfg,
            buf: ReorderBuffer::default(),
            arrivals: 0,
            clock: KTime(0),
            stacks: BTreeMap::new(),
            devices: BTreeMap::new(),
            slots: BTreeMap::new(),
            walks: VecDeque::new(),
            segments: BTreeSet::new(),
            iommu_segments: BTreeMap::new(),
            inflight: Pairing::new(max_inflight),
            last_flush: FastMap::default(),
            spare: Vec::new(),
            open: BTreeMap::new(),
            by_key: BTreeMap::new(),
            last_ite: None,
            pending: BTreeSet::new(),
            held: BTreeSet::new(),
            next_release: u64::MAX,
            lost: LostLog::default(),
            stats: Stats::default(),
            next_deadline: u64::MAX,
            next_housekeeping: 0,
            out: Vec::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Feeds one record; returns the incident revisions it caused (usually none). Records
    /// are processed after `reorder_window_ns` of later records have arrived.
    pub fn push(&mut self, rec: &Record) -> Vec<Incident> {
        self.push_owned(rec.clone())
    }

    /// [`push`](Correlator::push) for a record the caller no longer needs (saves a copy).
    pub fn push_owned(&mut self, rec: Record) -> Vec<Incident> {
        self.stats.records += 1;
        match rec {
            // Side records that carry no transition apply at once: a stack is written before
            // the first event that references it, a snapshot names a device.
            Record::Stack(s) => self.on_stack(&s),
            Record::Device(d) => self.on_device_info(&d),
            Record::Event(_) | Record::Lost(_) => {
                let ts = rec.ts().unwrap_or(self.clock);
                let seq = self.arrivals;
                self.arrivals += 1;
                self.buf.push(ts, seq, rec);
                while let Some((ts, seq, r)) = self.buf.pop_ready(self.cfg.reorder_window_ns, false)
                {
                    self.process(ts, seq, &r);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Feeds many records; returns every revision they caused.
    pub fn push_all<'a>(&mut self, recs: impl IntoIterator<Item = &'a Record>) -> Vec<Incident> {
        let mut v = Vec::new();
        for r in recs {
            v.extend(self.push(r));
        }
        v
    }

    /// Tells the correlator that time `now` has come (live use: call it periodically with the
    /// current CLOCK_MONOTONIC). Releases buffered records older than the reorder window and
    /// raises `hung-invalidation` for submissions outstanding too long.
    pub fn advance(&mut self, now: KTime) -> Vec<Incident> {
        self.buf.max_ts = self.buf.max_ts.max(now);
        while let Some((ts, seq, r)) = self.buf.pop_ready(self.cfg.reorder_window_ns, false) {
            self.process(ts, seq, &r);
        }
        let settled = KTime(now.0.saturating_sub(self.cfg.reorder_window_ns));
        self.tick(settled);
        self.flush_pending();
        std::mem::take(&mut self.out)
    }

    /// Ends the stream: processes what is buffered, reports submissions still outstanding and
    /// closes every open incident.
    pub fn finish(mut self) -> Summary {
        while let Some((ts, seq, r)) = self.buf.pop_ready(0, true) {
            self.process(ts, seq, &r);
        }
        let end = self.clock;
        self.check_deadlines();
        let mut left: Vec<Box<Inflight>> = self.inflight.drain();
        left.sort_by_key(|i| (i.start(), i.seq));
        let mut unreturned = Vec::new();
        for inf in left {
            self.stats.unreturned_at_end += 1;
            unreturned.push(inf.view(
                Outcome::NotReturned {
                    outstanding_ns: end.saturating_sub(inf.start()),
                },
                None,
                None,
            ));
            self.end_submission(inf, End::Stopped);
        }
        self.flush_pending();
        let mut ids: Vec<(KTime, IncidentId)> = self
            .open
            .values()
            .map(|o| (o.start, o.id.clone()))
            .collect();
        ids.sort();
        for (_, id) in ids {
            self.close(&id);
        }
        Summary {
            incidents: std::mem::take(&mut self.out),
            stats: self.stats,
            unreturned,
            end,
        }
    }

    /// How many submissions are in flight, and when the oldest of them started: what the
    /// agent's gauges and its stop guard need, many times a second. A
    /// [`snapshot`](Correlator::snapshot) gives the same from its `inflight`, but builds a view
    /// of every device and slot and clones every open incident, so its cost grows with them
    /// (the agent's CPU under a steady 100 k events/s rose from 10 % to 17 % of a core over
    /// four minutes when it took one per chunk; docs/benchmarks.md).
    pub fn inflight_summary(&self) -> (usize, Option<KTime>) {
        (
            self.inflight.len(),
            self.inflight.values().map(|i| i.start()).min(),
        )
    }

    /// What is in flight and how devices and slots stand now.
    pub fn snapshot(&self) -> Snapshot {
        let mut inflight: Vec<SubmissionView> = self
            .inflight
            .values()
            .map(|i| {
                i.view(
                    Outcome::InFlight {
                        outstanding_ns: self.clock.saturating_sub(i.start()),
                    },
                    None,
                    None,
                )
            })
            .collect();
        inflight.sort_by_key(|v| (v.start, v.tid));
        Snapshot {
            now: self.clock,
            inflight,
            devices: self
                .devices
                .iter()
                .map(|(k, d)| DeviceView {
                    device: d.view(self.clock, self.slot_name_for(*k)),
                    disconnected_at: d.disconnected.map(|x| x.0),
                    removing_at: d.removing,
                    released_at: d.released.map(|r| r.at),
                })
                .collect(),
            slots: self
                .slots
                .values()
                .map(|s| SlotView {
                    ctrl: s.ctrl,
                    port: s.port,
                    name: s.name.clone(),
                    secondary: s.secondary,
                    subordinate: s.subordinate,
                    handler: s.ist,
                    removal: s.removal.and_then(|r| r.kind),
                    removal_at: s.removal.map(|r| r.at),
                    removal_active: s.removal.is_some_and(|r| r.active),
                    link_down_at: s.link_down,
                })
                .collect(),
            open_incidents: self
                .open
                .values()
                .map(|o| self.render(o, o.revision.map_or(0, |r| r + 1), false))
                .collect(),
            buffered_records: self.buf.len(),
            stats: self.stats.clone(),
        }
    }

    // ----- processing -------------------------------------------------------------------

    fn tick(&mut self, ts: KTime) {
        if ts < self.clock {
            return;
        }
        self.clock = ts;
        if ts.0 >= self.next_deadline {
            self.check_deadlines();
        }
        if ts.0 >= self.next_housekeeping {
            self.housekeeping();
            self.next_housekeeping = ts.0.saturating_add(1000 * MS);
        }
    }

    fn process(&mut self, ts: KTime, seq: u64, rec: &Record) {
        let late = ts < self.clock && matches!(rec, Record::Event(_));
        if ts < self.clock {
            self.stats.late_records += 1;
        }
        self.tick(ts);
        match rec {
            Record::Event(e) => {
                self.stats.events += 1;
                self.on_event(seq, e);
            }
            Record::Lost(l) => self.on_lost(l),
            Record::Stack(_) | Record::Device(_) => {}
        }
        if late {
            self.late_event(ts);
        }
        self.flush_pending();
    }

    /// An event arrived after later ones had been processed (beyond the reorder window):
    /// what it shows was not there when the open incidents of its time were judged (a
    /// disconnect seen late cannot make a submission that already returned W1). They say so.
    fn late_event(&mut self, ts: KTime) {
        let from = ts.0.saturating_sub(self.cfg.reorder_window_ns);
        let ids: Vec<IncidentId> = self
            .open
            .values()
            .filter(|o| o.end.0 >= from)
            .map(|o| o.id.clone())
            .collect();
        for id in ids {
            if let Some(o) = self.open.get_mut(&id) {
                let fresh = o.partial.insert(
                    "an event of its time arrived later than the reorder window (stats.late_records): \
                     the verdict may miss what it shows"
                        .to_string(),
                );
                if fresh {
                    o.dirty = true;
                    self.pending.insert(id);
                }
            }
        }
    }

    fn on_event(&mut self, seq: u64, e: &Event) {
        match &e.payload {
            Payload::Submit(s) => self.on_submit(seq, e, s),
            Payload::SubmitReturn(r) => self.on_return(e, r),
            Payload::DevTlbFlush(f) => self.on_flush(e, f),
            Payload::HotplugIst(s) => self.on_ist(seq, e, s),
            Payload::HotplugIstReturn(r) => self.on_ist_return(seq, e, r),
            Payload::Unconfigure(s) => self.on_unconfigure(seq, e, s),
            Payload::DisconnectWalk(w) => self.on_walk(seq, e, w),
            Payload::DeviceDisconnected(d) => self.on_device_event(seq, e, d, DevEv::Disconnected),
            Payload::DeviceRemove(d) => self.on_device_event(seq, e, d, DevEv::Remove),
            Payload::IommuRelease(d) => self.on_device_event(seq, e, d, DevEv::Release),
            Payload::KernelLog(l) => self.on_log(seq, e, l),
            Payload::HotplugTrace(h) => self.on_hp_trace(seq, e, h),
        }
    }

    fn on_stack(&mut self, s: &StackRecord) {
        self.stats.stacks += 1;
        if !self.stacks.contains_key(&s.id) && self.stacks.len() >= self.cfg.max_stacks {
            self.stats.evicted.stacks += 1;
            return;
        }
        self.stacks.insert(
            s.id,
            StackInfo {
                path: CallerPath::classify(&s.frames),
                hint: detect::fix_hint(&s.frames),
            },
        );
    }

    fn on_device_info(&mut self, d: &DeviceInfo) {
        self.stats.device_snapshots += 1;
        if let Some(seg) = d.bdf.segment {
            self.learn_segment(seg, d.iommu.as_deref());
        }
        let seg = self.resolve_segment(d.bdf.segment, d.iommu.as_deref(), Some(d.bdf.bus));
        let key = (seg, d.bdf.sid());
        let Some(dev) = self.device_entry(key, Some(d.bdf), d.seen) else {
            return;
        };
        // A snapshot taken after the device went away is a new incarnation (hot-add).
        let gone_at = dev
            .disconnected
            .map(|x| x.0)
            .into_iter()
            .chain(dev.released.map(|r| r.at))
            .max();
        if gone_at.is_some_and(|g| d.seen > g) {
            dev.reset();
        }
        dev.bdf = d.bdf;
        dev.info = Some(d.clone());
        dev.last_seen = dev.last_seen.max(d.seen);
    }

    fn on_lost(&mut self, l: &LostRecord) {
        self.stats.lost_markers += 1;
        self.stats.lost_events += l.ringbuf_full + l.missed + l.undecodable;
        if self
            .lost
            .push(l.after, describe::lost_entry(l), self.cfg.max_lost_markers)
        {
            self.stats.evicted.lost_markers += 1;
        }
        self.inflight.mark_lost();
        for inf in self.inflight.values_mut() {
            inf.partial
                .insert("events were lost while it was in flight".to_string());
        }
        let ids: Vec<IncidentId> = self.open.keys().cloned().collect();
        for id in ids {
            self.pending.insert(id);
        }
    }

    fn check_deadlines(&mut self) {
        let now = self.clock;
        let cfg = self.cfg.clone();
        let mut next = u64::MAX;
        let mut keys = self.inflight.keys_where(|_| true);
        keys.sort_unstable();
        for k in keys {
            let Some((start_key, lost, mut inf)) = self.inflight.take(&k) else {
                continue;
            };
            let start = inf.start();
            let out = now.saturating_sub(start);
            let mut crossed = false;
            if out >= cfg.hung_warn_ns && inf.hung_level == 0 {
                self.open_hung(&mut inf);
                crossed = true;
            }
            if out >= cfg.hung_crit_ns && inf.hung_level < 2 {
                inf.hung_level = 2;
                crossed = true;
            }
            if out >= cfg.slow_ns && !inf.slow_checked {
                inf.slow_checked = true;
                crossed = true;
                if inf.safe_removal_slot.is_some() {
                    self.check_w3(
                        &mut inf,
                        &Outcome::InFlight {
                            outstanding_ns: out,
                        },
                    );
                }
            }
            if crossed {
                let view = inf.view(
                    Outcome::InFlight {
                        outstanding_ns: out,
                    },
                    None,
                    None,
                );
                for id in &inf.incidents {
                    if let Some(o) = self.open.get_mut(id) {
                        o.put_member(inf.seq, view.clone(), cfg.max_members);
                        o.end = o.end.max(now);
                        self.pending.insert(id.clone());
                    }
                }
            }
            for t in [cfg.slow_ns, cfg.hung_warn_ns, cfg.hung_crit_ns] {
                let d = start.0.saturating_add(t);
                if d > now.0 {
                    next = next.min(d);
                }
            }
            self.inflight.put(k, (start_key, lost, inf));
        }
        // Close quiet aggregate incidents.
        let mut closing = Vec::new();
        for o in self.open.values() {
            let aggregate = matches!(
                o.kind,
                IncidentKind::FlushToGoneDevice
                    | IncidentKind::SafeRemovalFlushTimeout
                    | IncidentKind::IteReported
            );
            if !aggregate || o.members.values().any(|m| !m.outcome.is_final()) {
                continue;
            }
            let due = o.last_activity.0.saturating_add(cfg.idle_close_ns);
            if now.0 >= due {
                closing.push(o.id.clone());
            } else {
                next = next.min(due);
            }
        }
        for id in closing {
            self.close(&id);
        }
        self.next_deadline = next;
    }

    /// Forgets what no longer matters: removed devices, walks and lost markers older than
    /// the retention time.
    fn housekeeping(&mut self) {
        let horizon = KTime(self.clock.0.saturating_sub(self.cfg.retention_ns));
        let open_devs: BTreeSet<DevKey> = self.open.values().filter_map(|o| o.dev).collect();
        let inflight_devs: BTreeSet<DevKey> = self
            .inflight
            .values()
            .flat_map(|i| i.sids.iter().map(move |s| (i.segment, *s)))
            .collect();
        self.devices.retain(|k, d| {
            let gone_long = d
                .released
                .map(|r| r.at)
                .or(d.disconnected.map(|x| x.0))
                .is_some_and(|t| t < horizon);
            !(gone_long && !open_devs.contains(k) && !inflight_devs.contains(k))
        });
        self.walks.retain(|w| w.at >= horizon);
        self.lost.age_out(horizon);
        let stale: Vec<Runner> = self
            .last_flush
            .iter()
            .filter(|(_, e)| e.meta.ts < horizon)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.last_flush.remove(&k);
        }
        self.by_key.retain(|_, id| self.open.contains_key(id));
    }
}

#[derive(Clone, Copy)]
enum DevEv {
    Disconnected,
    Remove,
    Release,
}

/// Appends to an open incident's timeline; past twice the bound, the middle is dropped.
fn push_timeline(o: &mut OpenIncident, ts: KTime, seq: u64, e: TimelineEntry, max: usize) {
    o.timeline.push((ts, seq, e));
    let cap = max.max(2) * 2;
    if o.timeline.len() > cap {
        o.timeline.sort_by_key(|x| (x.0, x.1));
        o.timeline.remove(max.max(2) / 2);
        o.timeline_omitted += 1;
    }
}

/// Keeps the last revision of each incident, ordered by start time then id: the final
/// verdicts of a run.
pub fn latest(revisions: impl IntoIterator<Item = Incident>) -> Vec<Incident> {
    let mut by_id: BTreeMap<IncidentId, Incident> = BTreeMap::new();
    for inc in revisions {
        match by_id.get(&inc.id) {
            Some(old) if old.revision > inc.revision => {}
            _ => {
                by_id.insert(inc.id.clone(), inc);
            }
        }
    }
    let mut v: Vec<Incident> = by_id.into_values().collect();
    v.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
    v
}

/// Runs a whole stream through a correlator: the final verdicts plus the summary.
pub fn correlate_all<'a>(
    cfg: Config,
    recs: impl IntoIterator<Item = &'a Record>,
) -> (Vec<Incident>, Summary) {
    let mut c = Correlator::new(cfg);
    let mut all = Vec::new();
    for r in recs {
        all.extend(c.push(r));
    }
    let mut summary = c.finish();
    all.append(&mut summary.incidents);
    (latest(all), summary)
}
