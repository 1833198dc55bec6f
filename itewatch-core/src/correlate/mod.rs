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
pub mod incident;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::event::{
    Bdf, CallerPath, Descriptor, DeviceInfo, DeviceRef, Event, Flush, IstReturn, KTime, LogLine,
    LostRecord, Payload, Record, Sid, Slot, StackId, StackRecord, Submit, SubmitReturn, Walk,
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

    fn on_flush(&mut self, e: &Event, _f: &Flush) {
        if !self.last_flush.contains_key(&Runner::of(&e.meta))
            && self.last_flush.len() >= self.cfg.max_inflight
        {
            // Drop the stalest: it issued no submit.
            if let Some(k) = self
                .last_flush
                .iter()
                .min_by_key(|(k, e)| (e.meta.ts, **k))
                .map(|(k, _)| *k)
            {
                self.last_flush.remove(&k);
            }
        }
        self.last_flush
            .insert(Runner::of(&e.meta), Box::new(e.clone()));
    }

    fn stack_info(&self, id: Option<StackId>) -> Option<StackInfo> {
        id.and_then(|id| self.stacks.get(&id).copied())
    }

    fn ist_thread(&self, tid: u32) -> Option<u64> {
        self.slots
            .values()
            .find(|s| s.ist.is_some_and(|(t, _)| t == tid))
            .map(|s| s.ctrl)
    }

    fn on_submit(&mut self, seq: u64, e: &Event, s: &Submit) {
        let tid = e.meta.tid;
        let ts = e.meta.ts;
        let runner = Runner::of(&e.meta);
        if let Some(prev) = self.inflight.innermost(runner) {
            if prev.start() == ts && prev.submit == *s {
                self.stats.duplicates += 1;
                return;
            }
        }
        self.stats.submissions += 1;
        // Nested (an interrupt's submission on the same thread) or replacing one whose return
        // was lost: the pairing rule decides (pairing.rs).
        let (key, opened, evicted) = self.inflight.reserve(&e.meta);
        match opened {
            Opened::ReplacedLost(prev) => {
                self.stats.returns_lost += 1;
                self.end_submission(prev, End::ReturnLost);
            }
            Opened::Nested => self.stats.nested += 1,
            Opened::Fresh => {}
        }
        if let Some(old) = evicted {
            self.stats.evicted.inflight += 1;
            self.end_submission(old, End::Evicted);
        }
        let flush = self
            .last_flush
            .remove(&runner)
            .filter(|f| f.meta.ts <= ts && ts.saturating_sub(f.meta.ts) <= self.cfg.flush_link_ns);
        let flush_stack = flush.as_ref().and_then(|f| f.payload.stack());
        let info = self
            .stack_info(s.stack)
            .or_else(|| self.stack_info(flush_stack));
        let (caller, hint) = match info {
            Some(i) => (i.path, i.hint),
            None if self.ist_thread(tid).is_some() => (CallerPath::Removal, FixHint::None),
            None => (CallerPath::Unknown, FixHint::None),
        };
        // No stack, or one that tells nothing (not read, or only the reader's markers).
        let no_stack =
            info.is_none_or(|i| i.path == CallerPath::Unknown) && s.dev_tlb_sids().next().is_some();
        if no_stack {
            self.stats.dev_tlb_without_stack += 1;
        }
        let iommu_name = s.iommu.name.to_string();
        if let Some(seg) = s.iommu.segment {
            self.learn_segment(seg, Some(&iommu_name));
        }
        let segment = self.resolve_segment(s.iommu.segment, Some(&iommu_name), None);
        if segment == SEG_UNKNOWN && s.dev_tlb_sids().next().is_some() {
            self.stats.unknown_segment += 1;
        }
        let mut sids = Sids::default();
        for sid in s.dev_tlb_sids() {
            self.stats.dev_tlb_descriptors += 1;
            sids.push_unique(sid);
        }
        let mut inf = Inflight {
            seq,
            key,
            meta: e.meta,
            submit: s.clone(),
            flush,
            caller,
            hint,
            segment,
            sids,
            incidents: Vec::new(),
            hung_level: 0,
            safe_removal_slot: None,
            slow_checked: false,
            partial: BTreeSet::new(),
        };
        if no_stack {
            inf.partial.insert(
                "no kernel stack for it (not taken, or unreadable): its caller path is unknown"
                    .to_string(),
            );
        }
        if s.truncated() {
            inf.partial.insert(format!(
                "batch of {} descriptors, {} captured",
                s.count,
                s.captured()
            ));
        }
        for i in 0..inf.sids.len() {
            let sid = inf.sids[i];
            let key = (segment, sid);
            let Some(dev) = self.device_entry(key, None, ts) else {
                inf.partial
                    .insert("device table full: state of its device unknown".to_string());
                continue;
            };
            if dev.iommu.is_none() {
                dev.iommu = Some(s.iommu.name.to_string());
            }
            if detect::gone_at(&dev.lifecycle(), tid, ts) {
                let parts = [u64::from(segment), u64::from(sid.0), ts.0, u64::from(tid)];
                self.join(IncidentKind::FlushToGoneDevice, Some(key), &parts, &mut inf);
            } else if let Some(pf) = self.gone_pf(s, segment, sid, tid, ts) {
                // A VF's invalidation carries its PF's SID (pfsid): the PF went away.
                let parts = [u64::from(segment), u64::from(sid.0), ts.0, u64::from(tid)];
                let id = self.join(IncidentKind::FlushToGoneDevice, Some(key), &parts, &mut inf);
                if let Some(o) = self.open.get_mut(&id) {
                    o.device.via_pf = Some(pf);
                }
            } else if let Some(ctrl) = self.safe_removal_covering(segment, sid, ts) {
                inf.safe_removal_slot = Some(ctrl);
            }
        }
        let first =
            ts.0.saturating_add(self.cfg.slow_ns.min(self.cfg.hung_warn_ns));
        self.next_deadline = self.next_deadline.min(first);
        // Reuse a box from a finished submission: no allocation on the hot path.
        let slot = match self.spare.pop() {
            Some(mut b) => {
                *b = inf;
                b
            }
            None => Box::new(inf),
        };
        self.inflight.insert(key, ts, slot);
    }

    /// The PF SID (`pfsid`) of `sid`'s device-TLB descriptors in `s`, when it is another
    /// device and that device is gone.
    fn gone_pf(&self, s: &Submit, segment: u16, sid: Sid, tid: u32, ts: KTime) -> Option<Sid> {
        s.descriptors()
            .filter_map(|d| match d {
                Descriptor::DevTlb { sid: v, pfsid, .. }
                | Descriptor::PasidDevTlb { sid: v, pfsid, .. }
                    if v == sid && pfsid != sid && pfsid.0 != 0 =>
                {
                    Some(pfsid)
                }
                _ => None,
            })
            .find(|pf| {
                self.devices
                    .get(&(segment, *pf))
                    .is_some_and(|d| detect::gone_at(&d.lifecycle(), tid, ts))
            })
    }

    fn safe_removal_covering(&self, segment: u16, sid: Sid, ts: KTime) -> Option<u64> {
        self.slots
            .values()
            .find(|s| {
                s.removal
                    .is_some_and(|r| r.active && r.kind == Some(RemovalKind::Safe) && r.at <= ts)
                    && s.covers(segment, sid)
            })
            .map(|s| s.ctrl)
    }

    fn on_return(&mut self, e: &Event, r: &SubmitReturn) {
        self.stats.returns += 1;
        let Some((_, mut inf)) = self.inflight.close(&e.meta) else {
            self.stats.orphan_returns += 1;
            return;
        };
        if r.start.is_some_and(|s| s != inf.start()) {
            inf.partial
                .insert("the return's entry time does not match the submission seen".to_string());
        }
        self.end_submission(
            inf,
            End::Returned {
                event: e,
                ret: r.ret,
            },
        );
    }

    /// A submission ended: decide hung / W3 / ITE, then update every incident it is part of.
    fn end_submission(&mut self, mut inf: Box<Inflight>, end: End<'_>) {
        let start = inf.start();
        let (outcome, end_ts, ret, ret_event) = match end {
            End::Returned { event, ret } => {
                let lat = event.meta.ts.saturating_sub(start);
                (
                    detect::classify_return(ret, lat, &self.cfg),
                    Some(event.meta.ts),
                    Some(ret),
                    Some(event),
                )
            }
            End::ReturnLost => {
                inf.partial.insert(
                    "its return was not seen (the thread submitted again first)".to_string(),
                );
                (Outcome::ReturnLost, None, None, None)
            }
            End::Evicted => {
                inf.partial
                    .insert("dropped from the in-flight table (bound reached)".to_string());
                (
                    Outcome::NotReturned {
                        outstanding_ns: self.clock.saturating_sub(start),
                    },
                    None,
                    None,
                    None,
                )
            }
            End::Stopped => (
                Outcome::NotReturned {
                    outstanding_ns: self.clock.saturating_sub(start),
                },
                None,
                None,
                None,
            ),
        };
        let dur = outcome.duration_ns().unwrap_or(0);
        if dur >= self.cfg.hung_warn_ns && inf.hung_level == 0 {
            self.open_hung(&mut inf);
        }
        if inf.safe_removal_slot.is_some() {
            self.check_w3(&mut inf, &outcome);
        }
        if let Some(ev) = ret_event {
            if ret == Some(crate::event::ETIMEDOUT) {
                self.ite_return(ev, &mut inf);
            }
        }
        if inf.incidents.is_empty() {
            self.recycle(inf);
            return;
        }
        let view = inf.view(outcome, end_ts, ret);
        let ret_entry = ret_event.map(|ev| describe::entry(ev, None));
        let now = end_ts.unwrap_or(self.clock);
        let max_members = self.cfg.max_members;
        for id in inf.incidents.clone() {
            let Some(o) = self.open.get_mut(&id) else {
                continue;
            };
            o.put_member(inf.seq, view.clone(), max_members);
            o.partial.extend(inf.partial.iter().cloned());
            if let Some(en) = &ret_entry {
                push_timeline(o, now, inf.seq, en.clone(), self.cfg.max_timeline);
            }
            o.end = o.end.max(now);
            o.last_activity = o.last_activity.max(now);
            self.pending.insert(id.clone());
            let all_final = o.members.values().all(|m| m.outcome.is_final());
            let closes = match o.kind {
                IncidentKind::HungInvalidation => true,
                IncidentKind::InflightAcrossDisconnect => all_final,
                _ => false,
            };
            if closes {
                self.close(&id);
            }
        }
        self.recycle(inf);
    }

    fn recycle(&mut self, inf: Box<Inflight>) {
        if self.spare.len() < 64 {
            self.spare.push(inf);
        }
    }

    fn open_hung(&mut self, inf: &mut Inflight) {
        let parts = [inf.start().0, u64::from(inf.meta.tid)];
        let key = inf.sids.first().map(|s| (inf.segment, *s));
        let id = IncidentId::derive(IncidentKind::HungInvalidation, &parts);
        if !self.open.contains_key(&id) {
            let o = self.new_incident(IncidentKind::HungInvalidation, id.clone(), key, inf);
            self.insert_open(o);
        }
        inf.hung_level = 1;
        self.add_member(&id, inf);
    }

    fn check_w3(&mut self, inf: &mut Inflight, outcome: &Outcome) {
        let slow = match outcome {
            Outcome::Aborted { .. } | Outcome::Failed { .. } => true,
            o => o.duration_ns().unwrap_or(0) >= self.cfg.slow_ns,
        };
        if !slow {
            return;
        }
        let Some(ctrl) = inf.safe_removal_slot else {
            return;
        };
        let at = self
            .slots
            .get(&ctrl)
            .and_then(|s| s.removal.map(|r| r.at))
            .unwrap_or(inf.start());
        let sids = inf.sids;
        for sid in sids.iter().copied() {
            let key = (inf.segment, sid);
            let parts = [u64::from(inf.segment), u64::from(sid.0), at.0];
            self.join(
                IncidentKind::SafeRemovalFlushTimeout,
                Some(key),
                &parts,
                inf,
            );
        }
    }

    /// Adds `inf` to the aggregate incident of `kind` for `key`, opening it if needed.
    fn join(
        &mut self,
        kind: IncidentKind,
        key: Option<DevKey>,
        parts: &[u64],
        inf: &mut Inflight,
    ) -> IncidentId {
        let id = match self.by_key.get(&(kind, key)) {
            Some(id) if self.open.contains_key(id) => id.clone(),
            _ => {
                let id = IncidentId::derive(kind, parts);
                if !self.open.contains_key(&id) {
                    let o = self.new_incident(kind, id.clone(), key, inf);
                    self.insert_open(o);
                }
                self.by_key.insert((kind, key), id.clone());
                id
            }
        };
        self.add_member(&id, inf);
        id
    }

    fn insert_open(&mut self, o: OpenIncident) {
        if self.open.len() >= self.cfg.max_open_incidents {
            // Close the oldest to make room; it is reported as it stands.
            if let Some(oldest) = self
                .open
                .values()
                .min_by_key(|o| (o.last_activity, o.id.clone()))
                .map(|o| o.id.clone())
            {
                self.stats.evicted.incidents += 1;
                if let Some(x) = self.open.get_mut(&oldest) {
                    x.partial
                        .insert("closed early: too many open incidents".to_string());
                }
                self.close(&oldest);
            }
        }
        *self
            .stats
            .incidents
            .entry(o.kind.name().to_string())
            .or_default() += 1;
        self.pending.insert(o.id.clone());
        self.open.insert(o.id.clone(), o);
    }

    fn new_incident(
        &self,
        kind: IncidentKind,
        id: IncidentId,
        key: Option<DevKey>,
        inf: &Inflight,
    ) -> OpenIncident {
        let ts = inf.start();
        let mut o = self.blank_incident(kind, id, key, ts);
        o.caller = inf.caller;
        o.hint = inf.hint;
        if o.device.iommu.is_none() {
            o.device.iommu = Some(inf.submit.iommu.name.to_string());
        }
        o
    }

    fn blank_incident(
        &self,
        kind: IncidentKind,
        id: IncidentId,
        key: Option<DevKey>,
        ts: KTime,
    ) -> OpenIncident {
        let mut timeline = Vec::new();
        let mut device = IncidentDevice::default();
        let mut removal = None;
        if let Some(k) = key {
            if let Some(d) = self.devices.get(&k) {
                device = d.view(ts, self.slot_name_for(k));
                timeline.extend(d.history.iter().cloned());
            } else {
                device.bdf = Some(Bdf::from_sid(known_segment(k.0), k.1));
                device.sid = Some(k.1);
                device.state = Some(DeviceState::Unknown);
            }
            if let Some(slot) = self.slot_for(k) {
                timeline.extend(slot.history.iter().cloned());
                removal = slot.removal.and_then(|r| r.kind);
                if device.port.is_none() {
                    device.port = slot.port;
                }
            }
        }
        OpenIncident {
            id,
            kind,
            revision: None,
            dev: key,
            device,
            removal,
            start: ts,
            end: ts,
            members: BTreeMap::new(),
            caller: CallerPath::Unknown,
            hint: FixHint::None,
            timeline,
            timeline_omitted: 0,
            partial: BTreeSet::new(),
            reports: 0,
            sid_zero: false,
            inferred: false,
            candidates: Vec::new(),
            lockup_seen: false,
            peak: None,
            attribution: None,
            related: BTreeSet::new(),
            last_activity: ts,
            dirty: true,
            omitted: state::Omitted::default(),
            emitted: None,
        }
    }

    /// Makes `inf` a member of incident `id` (once), with its events on the timeline, and
    /// re-links the incidents the submission is part of.
    fn add_member(&mut self, id: &IncidentId, inf: &mut Inflight) {
        let max_tl = self.cfg.max_timeline;
        let max_members = self.cfg.max_members;
        let outstanding = self.clock.saturating_sub(inf.start());
        let Some(o) = self.open.get_mut(id) else {
            return;
        };
        if o.members.contains_key(&inf.seq) {
            return;
        }
        o.put_member(
            inf.seq,
            inf.view(
                Outcome::InFlight {
                    outstanding_ns: outstanding,
                },
                None,
                None,
            ),
            max_members,
        );
        if let Some(f) = &inf.flush {
            push_timeline(
                o,
                f.meta.ts,
                inf.seq,
                describe::entry(f, Some(inf.caller)),
                max_tl,
            );
        }
        push_timeline(
            o,
            inf.start(),
            inf.seq,
            describe::entry(&inf.event(), Some(inf.caller)),
            max_tl,
        );
        if o.caller == CallerPath::Unknown {
            o.caller = inf.caller;
        }
        if o.hint == FixHint::None {
            o.hint = inf.hint;
        }
        o.start = o.start.min(inf.start());
        o.end = o.end.max(self.clock).max(inf.start());
        o.last_activity = o.last_activity.max(self.clock);
        o.partial.extend(inf.partial.iter().cloned());
        self.pending.insert(id.clone());
        if !inf.incidents.contains(id) {
            inf.incidents.push(id.clone());
        }
        self.relink(&inf.incidents.clone());
    }

    /// Incidents about the same submission name each other; a hung or ITE incident is
    /// attributed to the race window that explains it (W1 before W2 before W3).
    fn relink(&mut self, ids: &[IncidentId]) {
        let explaining = ids
            .iter()
            .filter_map(|id| self.open.get(id).map(|o| (o.kind, id.clone())))
            .filter(|(k, _)| k.window().is_some())
            .min();
        for id in ids {
            let Some(o) = self.open.get_mut(id) else {
                continue;
            };
            for other in ids {
                if other != id && o.related.insert(other.clone()) {
                    o.dirty = true;
                }
            }
            if o.kind.window().is_none() {
                let attr = explaining.as_ref().map(|(k, eid)| Attribution {
                    kind: *k,
                    window: k.window(),
                    id: eid.clone(),
                });
                if attr.is_some() && o.attribution != attr {
                    o.attribution = attr;
                    self.pending.insert(id.clone());
                }
            }
        }
    }

    fn on_ist(&mut self, seq: u64, e: &Event, s: &Slot) {
        let max = self.cfg.max_history;
        let Some(slot) = self.slot_entry(s) else {
            return;
        };
        slot.ist = Some((e.meta.tid, e.meta.ts));
        slot.ist_saw_unconfigure = false;
        push_bounded(
            &mut slot.history,
            (e.meta.ts, seq, describe::entry(e, None)),
            max,
        );
    }

    fn on_unconfigure(&mut self, seq: u64, e: &Event, s: &Slot) {
        let max = self.cfg.max_history;
        let Some(slot) = self.slot_entry(s) else {
            return;
        };
        slot.ist_saw_unconfigure = true;
        slot.removal = Some(Removal {
            kind: s.presence.map(|p| {
                if p {
                    RemovalKind::Safe
                } else {
                    RemovalKind::Surprise
                }
            }),
            at: e.meta.ts,
            tid: e.meta.tid,
            active: true,
        });
        push_bounded(
            &mut slot.history,
            (e.meta.ts, seq, describe::entry(e, None)),
            max,
        );
    }

    fn on_ist_return(&mut self, seq: u64, e: &Event, r: &IstReturn) {
        let tid = e.meta.tid;
        let max = self.cfg.max_history;
        let ctrl = if self.slots.contains_key(&r.ctrl) {
            Some(r.ctrl)
        } else {
            self.ist_thread(tid)
        };
        self.release_progress(tid, None);
        let Some(ctrl) = ctrl else {
            return;
        };
        let Some(slot) = self.slots.get_mut(&ctrl) else {
            return;
        };
        slot.ist = None;
        if let Some(rm) = slot.removal.as_mut() {
            if rm.tid == tid {
                rm.active = false;
            }
        }
        push_bounded(
            &mut slot.history,
            (e.meta.ts, seq, describe::entry(e, None)),
            max,
        );
        if !slot.ist_saw_unconfigure {
            // A handler run with no removal in it: the slot was (re)enabled. Devices behind it
            // that went away earlier are new incarnations from now on.
            let slot = slot.clone();
            let ts = e.meta.ts;
            for (k, d) in self.devices.iter_mut() {
                if slot.covers(k.0, k.1) && d.released.is_some_and(|r| r.done && r.at < ts) {
                    d.reset();
                }
            }
            self.walks
                .retain(|w| !(w.at < ts && (slot.secondary..=slot.subordinate).contains(&w.bus)));
            if let Some(s) = self.slots.get_mut(&ctrl) {
                s.removal = None;
                s.link_down = None;
            }
        }
    }

    fn on_walk(&mut self, seq: u64, e: &Event, w: &Walk) {
        let ts = e.meta.ts;
        if self.walks.len() >= self.cfg.max_walks {
            self.walks.pop_front();
            self.stats.evicted.walks += 1;
        }
        if let Some(seg) = w.segment {
            self.learn_segment(seg, None);
        }
        // A walk whose segment cannot be told covers only devices whose segment is unknown
        // too, never every segment (counted: its devices may be missed).
        let seg = self.resolve_segment(w.segment, None, Some(w.bus));
        if seg == SEG_UNKNOWN && self.segments.len() > 1 {
            self.stats.unknown_segment += 1;
        }
        let rec = WalkRec {
            segment: Some(seg),
            bus: w.bus,
            bus_end: w.bus_end.max(w.bus),
            at: ts,
        };
        self.walks.push_back(rec);
        let entry = describe::entry(e, None);
        let max = self.cfg.max_history;
        let mut hit = Vec::new();
        for (k, d) in self.devices.iter_mut() {
            if rec.covers(k.0, k.1) {
                if d.disconnected.is_none() {
                    d.disconnected = Some((ts, DisconnectHow::Walk));
                }
                push_bounded(&mut d.history, (ts, seq, entry.clone()), max);
                hit.push(*k);
            }
        }
        for s in self.slots.values_mut() {
            if s.secondary != 0 && (rec.bus..=rec.bus_end).contains(&s.secondary) {
                push_bounded(&mut s.history, (ts, seq, entry.clone()), max);
            }
        }
        for k in hit {
            self.append_to_device_incidents(k, ts, seq, &entry);
            self.check_w1(k, ts);
        }
    }

    fn on_device_event(&mut self, seq: u64, e: &Event, d: &DeviceRef, what: DevEv) {
        let Some(bdf) = d.bdf else {
            return;
        };
        let ts = e.meta.ts;
        let tid = e.meta.tid;
        if let Some(seg) = bdf.segment {
            self.learn_segment(seg, None);
        }
        let key = (
            self.resolve_segment(bdf.segment, None, Some(bdf.bus)),
            bdf.sid(),
        );
        if matches!(what, DevEv::Remove | DevEv::Release) {
            self.release_progress(tid, Some(key));
        }
        let max = self.cfg.max_history;
        let entry = describe::entry(e, None);
        let Some(dev) = self.device_entry(key, Some(bdf), ts) else {
            return;
        };
        dev.ids = Some((d.vendor, d.device));
        let mut check = false;
        match what {
            DevEv::Disconnected => {
                if dev.disconnected.is_none() {
                    dev.disconnected = Some((ts, DisconnectHow::Doe));
                    check = true;
                }
            }
            DevEv::Remove => {
                dev.removing.get_or_insert(ts);
            }
            DevEv::Release => {
                if dev.released.is_none() {
                    dev.released = Some(Release {
                        at: ts,
                        tid,
                        done: false,
                    });
                    check = true;
                }
            }
        }
        push_bounded(&mut dev.history, (ts, seq, entry.clone()), max);
        self.append_to_device_incidents(key, ts, seq, &entry);
        if check {
            self.check_w1(key, ts);
        }
    }

    /// The releasing thread moved on: releases it started (other than `except`) are over.
    fn release_progress(&mut self, tid: u32, except: Option<DevKey>) {
        for (k, d) in self.devices.iter_mut() {
            if Some(*k) == except {
                continue;
            }
            if let Some(r) = d.released.as_mut() {
                if r.tid == tid {
                    r.done = true;
                }
            }
        }
    }

    fn append_to_device_incidents(&mut self, key: DevKey, ts: KTime, seq: u64, e: &TimelineEntry) {
        let max = self.cfg.max_timeline;
        for kind in IncidentKind::ALL {
            if let Some(id) = self.by_key.get(&(kind, Some(key))) {
                if let Some(o) = self.open.get_mut(id) {
                    push_timeline(o, ts, seq, e.clone(), max);
                    o.dirty = true;
                }
            }
        }
    }

    /// The device went away at `at`: driver-side invalidations in flight to it are W1; ones
    /// issued after `at` but seen earlier (reordering beyond the window) are W2.
    fn check_w1(&mut self, key: DevKey, at: KTime) {
        let mut keys = self
            .inflight
            .keys_where(|i| i.segment == key.0 && i.sids.contains(&key.1));
        keys.sort_unstable();
        for k in keys {
            let Some((start, lost, mut inf)) = self.inflight.take(&k) else {
                continue;
            };
            if inf.start() <= at {
                if detect::driver_side(inf.caller) {
                    let parts = [u64::from(key.0), u64::from(key.1 .0), at.0];
                    self.join(
                        IncidentKind::InflightAcrossDisconnect,
                        Some(key),
                        &parts,
                        &mut inf,
                    );
                }
            } else {
                let parts = [
                    u64::from(key.0),
                    u64::from(key.1 .0),
                    inf.start().0,
                    u64::from(inf.meta.tid),
                ];
                self.join(IncidentKind::FlushToGoneDevice, Some(key), &parts, &mut inf);
            }
            self.inflight.put(k, (start, lost, inf));
        }
    }

    fn on_log(&mut self, seq: u64, e: &Event, l: &LogLine) {
        let ts = e.meta.ts;
        match detect::parse_log(&l.text) {
            LogFact::IteDetected(sid) => self.ite_report(seq, e, sid),
            LogFact::QiDescriptor {
                prior: true,
                dev_tlb_sid: Some(sid),
            } => {
                self.ite_descriptor(sid);
                self.ite_detail(seq, e);
            }
            LogFact::IteCleared | LogFact::QiDescriptor { .. } | LogFact::IteFaultStatus => {
                self.ite_detail(seq, e)
            }
            LogFact::Pciehp { port, slot, what } => {
                let max = self.cfg.max_history;
                let entry = describe::entry(e, None);
                let down = matches!(what, SlotWhat::LinkDown | SlotWhat::CardNotPresent);
                for s in self.slots.values_mut() {
                    let same = match (s.port, port) {
                        (Some(a), Some(b)) => {
                            a.sid() == b.sid()
                                && (a.segment == b.segment
                                    || a.segment.is_none()
                                    || b.segment.is_none())
                        }
                        _ => false,
                    };
                    if same {
                        s.name = Some(slot.clone());
                        if down {
                            s.link_down = Some(ts);
                        }
                        push_bounded(&mut s.history, (ts, seq, entry.clone()), max);
                    }
                }
            }
            LogFact::HardLockup => {
                let max = self.cfg.max_timeline;
                let entry = describe::entry(e, None);
                let ids: Vec<IncidentId> = self
                    .open
                    .values()
                    .filter(|o| o.kind == IncidentKind::HungInvalidation)
                    .map(|o| o.id.clone())
                    .collect();
                for id in ids {
                    if let Some(o) = self.open.get_mut(&id) {
                        o.lockup_seen = true;
                        push_timeline(o, ts, seq, entry.clone(), max);
                        self.pending.insert(id);
                    }
                }
            }
            LogFact::Other => {}
        }
    }

    /// A detail line of the last ITE report (descriptor dump, "cleared", fault status).
    fn ite_detail(&mut self, seq: u64, e: &Event) {
        let ts = e.meta.ts;
        if let Some(id) = self.last_ite.clone() {
            let max = self.cfg.max_timeline;
            if let Some(o) = self.open.get_mut(&id) {
                push_timeline(o, ts, seq, describe::entry(e, None), max);
                o.end = o.end.max(ts);
                o.last_activity = o.last_activity.max(ts);
                o.dirty = true;
            }
        }
    }

    /// `QI PRIOR` of the last ITE report is a device-TLB descriptor for `sid`: the descriptor
    /// just before the queue head, fetched last before the time-out. When the ITE's device
    /// was inferred and `sid` is one of its candidates, it becomes the most likely one (still
    /// inferred: the hardware may have fetched further). `QI HEAD` is the next descriptor to
    /// fetch, a later submission's (the 6.1 VM's console shows another device's there), and
    /// is not used.
    fn ite_descriptor(&mut self, sid: Sid) {
        let Some(id) = self.last_ite.clone() else {
            return;
        };
        let Some(o) = self.open.get(&id) else {
            return;
        };
        if !o.inferred || o.candidates.first() == Some(&sid) || !o.candidates.contains(&sid) {
            return;
        }
        let seg = o.dev.map_or(SEG_UNKNOWN, |k| k.0);
        let device = self.device_view((seg, sid), o.start);
        if let Some(o) = self.open.get_mut(&id) {
            o.candidates.retain(|c| *c != sid);
            o.candidates.insert(0, sid);
            o.device = device;
            o.dirty = true;
        }
    }

    /// How the trace knows a device (or only its SID) at `ts`.
    fn device_view(&self, k: DevKey, ts: KTime) -> IncidentDevice {
        match self.devices.get(&k) {
            Some(d) => d.view(ts, self.slot_name_for(k)),
            None => IncidentDevice {
                bdf: Some(Bdf::from_sid(known_segment(k.0), k.1)),
                sid: Some(k.1),
                state: Some(DeviceState::Unknown),
                ..Default::default()
            },
        }
    }

    /// A submission returned -ETIMEDOUT (80a9b50c0b9e: the ITE's SID had no present device).
    /// The kernel printed that SID just before (`qi_dump_fault` runs before the return), and
    /// the return goes to whichever CPU checked the fault first, possibly a bystander whose
    /// batch never held that SID: the printed report's incident takes the submission. Without
    /// a printed report (no log probe, or the console has not flushed it yet), the device is
    /// inferred: the batch's SIDs, then those of the other submissions stalled on the same
    /// IOMMU queue, are the candidates.
    fn ite_return(&mut self, ev: &Event, inf: &mut Inflight) {
        let ts = ev.meta.ts;
        let printed = self.last_ite.clone().filter(|id| {
            self.open.get(id).is_some_and(|o| {
                !o.sid_zero
                    && !o.inferred
                    && o.reports > 0
                    && ts.saturating_sub(o.last_activity) <= self.cfg.ite_merge_ns
            })
        });
        if let Some(id) = printed {
            self.add_member(&id, inf);
            return;
        }
        let mut candidates: Vec<Sid> = inf.sids.to_vec();
        let iommu = inf.submit.iommu.ptr;
        let mut stalled: Vec<&Inflight> = self
            .inflight
            .values()
            .filter(|i| i.submit.iommu.ptr == iommu && i.seq != inf.seq)
            .map(|b| &**b)
            .collect();
        stalled.sort_by_key(|i| (i.start(), i.seq));
        for i in &stalled {
            for s in i.sids.iter() {
                if !candidates.contains(s) {
                    candidates.push(*s);
                }
            }
        }
        let key = candidates.first().map(|s| (inf.segment, *s));
        self.ite_open(ts, None, key, false, candidates, Some(inf), Vec::new());
    }

    /// The kernel reported an ITE in its log (`sid` None = SID 0).
    fn ite_report(&mut self, seq: u64, e: &Event, sid: Option<Sid>) {
        let ts = e.meta.ts;
        let mut members: Vec<PairKey>;
        let key: Option<DevKey>;
        let mut candidates = Vec::new();
        match sid {
            Some(sid) => {
                // The submissions carrying the SID, and every other one stalled behind the
                // time-out on the same IOMMU queue (fetching stops until ITE is cleared).
                let queues: BTreeSet<u64> = self
                    .inflight
                    .values()
                    .filter(|i| i.sids.contains(&sid))
                    .map(|i| i.submit.iommu.ptr)
                    .collect();
                // The log line has no segment: that of the submissions carrying the SID when
                // they agree, else the trace's only segment, else unknown (never 0).
                let segs: BTreeSet<u16> = self
                    .inflight
                    .values()
                    .filter(|i| i.sids.contains(&sid))
                    .map(|i| i.segment)
                    .collect();
                let seg = match segs.len() {
                    0 => self.resolve_segment(None, None, None),
                    1 => segs.into_iter().next().unwrap_or(SEG_UNKNOWN),
                    _ => SEG_UNKNOWN,
                };
                members = self
                    .inflight
                    .keys_where(|i| i.sids.contains(&sid) || queues.contains(&i.submit.iommu.ptr));
                key = Some((seg, sid));
                self.confirm_inferred_ite(ts, seg, sid);
            }
            None => {
                // SID 0: the device-TLB invalidations in flight are the candidates, oldest
                // first (the oldest is the one most likely waiting); all of its queue's
                // submissions are stalled behind it.
                let mut waiting: Vec<&Inflight> = self
                    .inflight
                    .values()
                    .filter(|i| !i.sids.is_empty())
                    .map(|b| &**b)
                    .collect();
                waiting.sort_by_key(|i| (i.start(), i.seq));
                for i in &waiting {
                    for s in i.sids.iter() {
                        if !candidates.contains(s) {
                            candidates.push(*s);
                        }
                    }
                }
                key = waiting.first().map(|i| (i.segment, i.sids[0]));
                let queue = waiting.first().map(|i| i.submit.iommu.ptr);
                members = match queue {
                    Some(q) => self.inflight.keys_where(|i| i.submit.iommu.ptr == q),
                    None => Vec::new(),
                };
            }
        }
        members.sort_unstable();
        self.ite_open(
            ts,
            Some((seq, e)),
            key,
            sid.is_none(),
            candidates,
            None,
            members,
        );
    }

    /// The kernel named `sid` in an ITE report: an open ITE incident that had inferred its
    /// device among candidates that include `sid` now knows it.
    fn confirm_inferred_ite(&mut self, ts: KTime, seg: u16, sid: Sid) {
        let merge = self.cfg.ite_merge_ns;
        let found = self
            .open
            .values()
            .filter(|o| {
                o.kind == IncidentKind::IteReported
                    && o.inferred
                    && !o.sid_zero
                    && o.candidates.contains(&sid)
                    && ts.saturating_sub(o.last_activity) <= merge
            })
            .map(|o| (o.start, o.id.clone()))
            .min();
        let Some((start, id)) = found else {
            return;
        };
        let seg = self.open.get(&id).and_then(|o| o.dev).map_or(seg, |k| k.0);
        let device = self.device_view((seg, sid), start);
        if let Some(o) = self.open.get_mut(&id) {
            o.dev = Some((seg, sid));
            o.device = device;
            o.inferred = false;
            o.candidates.clear();
            o.dirty = true;
        }
        self.by_key
            .insert((IncidentKind::IteReported, Some((seg, sid))), id);
    }

    /// Opens (or merges into) the ITE incident for `key` and adds its members.
    /// `log`: the report line (seq, event), None for a -ETIMEDOUT return.
    #[allow(clippy::too_many_arguments)]
    fn ite_open(
        &mut self,
        ts: KTime,
        log: Option<(u64, &Event)>,
        key: Option<DevKey>,
        sid_zero: bool,
        candidates: Vec<Sid>,
        mut returning: Option<&mut Inflight>,
        members: Vec<PairKey>,
    ) {
        let from_log = log.is_some();
        // Inferred: SID 0, or a -ETIMEDOUT without a printed report.
        let inferred = key.is_some() && (sid_zero || !from_log);
        let existing = self
            .by_key
            .get(&(IncidentKind::IteReported, key))
            .filter(|id| {
                self.open.get(*id).is_some_and(|o| {
                    ts.saturating_sub(o.last_activity) <= self.cfg.ite_merge_ns
                        || o.members.values().any(|m| !m.outcome.is_final())
                })
            })
            .cloned();
        let id = match existing {
            Some(id) => {
                if let Some(o) = self.open.get_mut(&id) {
                    if from_log {
                        o.reports += 1;
                        o.dirty = true;
                    }
                    for c in &candidates {
                        if o.inferred && !o.candidates.contains(c) {
                            o.candidates.push(*c);
                        }
                    }
                    o.end = o.end.max(ts);
                    o.last_activity = o.last_activity.max(ts);
                }
                id
            }
            None => {
                let parts = [
                    key.map_or(u64::MAX, |k| u64::from(k.0)),
                    key.map_or(u64::MAX, |k| u64::from(k.1 .0)),
                    ts.0,
                ];
                let id = IncidentId::derive(IncidentKind::IteReported, &parts);
                if !self.open.contains_key(&id) {
                    if let Some(k) = key {
                        // Name the device if the trace knows it.
                        let _ = self.device_entry(k, None, ts);
                    }
                    let mut o = self.blank_incident(IncidentKind::IteReported, id.clone(), key, ts);
                    o.reports = u32::from(from_log);
                    o.sid_zero = sid_zero;
                    o.inferred = inferred;
                    o.candidates = if inferred { candidates } else { Vec::new() };
                    self.insert_open(o);
                }
                self.by_key
                    .insert((IncidentKind::IteReported, key), id.clone());
                id
            }
        };
        if let Some((seq, e)) = log {
            let max = self.cfg.max_timeline;
            if let Some(o) = self.open.get_mut(&id) {
                push_timeline(o, ts, seq, describe::entry(e, None), max);
            }
        }
        self.last_ite = Some(id.clone());
        if let Some(r) = returning.as_mut() {
            self.add_member(&id, r);
        }
        for k in members {
            if let Some((start, lost, mut inf)) = self.inflight.take(&k) {
                self.add_member(&id, &mut inf);
                self.inflight.put(k, (start, lost, inf));
            }
        }
    }

    // ----- time -------------------------------------------------------------------------

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

    // ----- lookups ------------------------------------------------------------------------

    /// The device entry for `key`, created if needed (applying walks that already covered
    /// it). `None` only when the table is full of devices that cannot be evicted.
    fn learn_segment(&mut self, seg: u16, iommu: Option<&str>) {
        if seg == SEG_UNKNOWN {
            return;
        }
        if self.segments.len() < 64 {
            self.segments.insert(seg);
        }
        if let Some(name) = iommu {
            if !self.iommu_segments.contains_key(name) && self.iommu_segments.len() < 256 {
                self.iommu_segments.insert(name.to_string(), seg);
            }
        }
    }

    /// The segment of an event that may have come without one. An unknown segment is not
    /// segment 0: it is the IOMMU unit's (each device maps to one unit, a unit to one
    /// segment), else that of the hot-plug slots whose bus range holds `bus` if they agree,
    /// else the only segment the trace has shown, else [`SEG_UNKNOWN`].
    fn resolve_segment(&self, seg: Option<u16>, iommu: Option<&str>, bus: Option<u8>) -> u16 {
        if let Some(s) = seg.filter(|s| *s != SEG_UNKNOWN) {
            return s;
        }
        if let Some(s) = iommu.and_then(|n| self.iommu_segments.get(n)) {
            return *s;
        }
        if let Some(b) = bus {
            let segs: BTreeSet<u16> = self
                .slots
                .values()
                .filter(|s| s.secondary != 0 && (s.secondary..=s.subordinate).contains(&b))
                .filter_map(|s| s.port.and_then(|p| p.segment))
                .collect();
            if segs.len() == 1 {
                return segs.into_iter().next().unwrap_or(SEG_UNKNOWN);
            }
        }
        if self.segments.len() == 1 {
            return self.segments.iter().next().copied().unwrap_or(SEG_UNKNOWN);
        }
        SEG_UNKNOWN
    }

    fn device_entry(
        &mut self,
        key: DevKey,
        bdf: Option<Bdf>,
        ts: KTime,
    ) -> Option<&mut DeviceEntry> {
        if !self.devices.contains_key(&key) {
            if self.devices.len() >= self.cfg.max_devices && !self.evict_device() {
                return None;
            }
            let bdf = bdf.unwrap_or(Bdf::from_sid(known_segment(key.0), key.1));
            let mut d = DeviceEntry::new(bdf, ts);
            if let Some(w) = self.walks.iter().find(|w| w.covers(key.0, key.1)) {
                d.disconnected = Some((w.at, DisconnectHow::Walk));
            }
            self.devices.insert(key, d);
        }
        let d = self.devices.get_mut(&key)?;
        d.last_seen = d.last_seen.max(ts);
        Some(d)
    }

    fn evict_device(&mut self) -> bool {
        let busy: BTreeSet<DevKey> = self
            .open
            .values()
            .filter_map(|o| o.dev)
            .chain(
                self.inflight
                    .values()
                    .flat_map(|i| i.sids.iter().map(move |s| (i.segment, *s))),
            )
            .collect();
        let victim = self
            .devices
            .iter()
            .filter(|(k, _)| !busy.contains(k))
            .min_by_key(|(k, d)| (!d.is_gone(), d.last_seen, **k))
            .map(|(k, _)| *k);
        match victim {
            Some(k) => {
                self.devices.remove(&k);
                self.stats.evicted.devices += 1;
                true
            }
            None => false,
        }
    }

    fn slot_entry(&mut self, s: &Slot) -> Option<&mut SlotState> {
        if !self.slots.contains_key(&s.ctrl) {
            if self.slots.len() >= self.cfg.max_slots {
                let victim = self
                    .slots
                    .values()
                    .filter(|x| x.ist.is_none())
                    .min_by_key(|x| (x.history.last().map(|h| h.0), x.ctrl))
                    .map(|x| x.ctrl);
                match victim {
                    Some(v) => {
                        self.slots.remove(&v);
                        self.stats.evicted.slots += 1;
                    }
                    None => return None,
                }
            }
            self.slots.insert(
                s.ctrl,
                SlotState {
                    ctrl: s.ctrl,
                    port: None,
                    secondary: 0,
                    subordinate: 0,
                    name: None,
                    ist: None,
                    ist_saw_unconfigure: false,
                    removal: None,
                    link_down: None,
                    history: Vec::new(),
                },
            );
        }
        let slot = self.slots.get_mut(&s.ctrl)?;
        if s.port.is_some() {
            slot.port = s.port;
        }
        if s.secondary != 0 {
            slot.secondary = s.secondary;
            slot.subordinate = s.subordinate.max(s.secondary);
        }
        Some(slot)
    }

    fn slot_for(&self, key: DevKey) -> Option<&SlotState> {
        self.slots.values().find(|s| s.covers(key.0, key.1))
    }

    fn slot_name_for(&self, key: DevKey) -> Option<String> {
        self.slot_for(key).and_then(|s| s.name.clone())
    }

    // ----- emission -------------------------------------------------------------------------

    fn flush_pending(&mut self) {
        self.release_held();
        if self.pending.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.pending);
        let clock = self.clock;
        for id in ids {
            if let Some(o) = self.open.get(&id) {
                let rev = o.revision.map_or(0, |r| r + 1);
                let inc = self.render(o, rev, false);
                let key = Material::with_omitted(&inc, o.omitted.worst);
                let due = match &o.emitted {
                    None => true,
                    Some((k, _)) if *k != key => true,
                    Some((_, at)) => clock.0 >= at.0.saturating_add(self.cfg.coalesce_ns),
                };
                if !due {
                    // Held back: it goes out with the next change that matters, when the
                    // coalescing time has passed (a later record or `advance`), or at close.
                    if let Some((_, at)) = &o.emitted {
                        self.next_release = self
                            .next_release
                            .min(at.0.saturating_add(self.cfg.coalesce_ns));
                    }
                    self.stats.revisions_coalesced += 1;
                    self.held.insert(id);
                    continue;
                }
                self.held.remove(&id);
                if let Some(o) = self.open.get_mut(&id) {
                    o.revision = Some(rev);
                    o.peak = Some(inc.severity);
                    o.dirty = false;
                    o.emitted = Some((key, clock));
                }
                self.stats.revisions += 1;
                self.out.push(inc);
            }
        }
    }

    /// Held-back revisions whose coalescing time has passed become pending again.
    fn release_held(&mut self) {
        if self.held.is_empty() || self.clock.0 < self.next_release {
            return;
        }
        self.next_release = u64::MAX;
        let (clock, wait) = (self.clock, self.cfg.coalesce_ns);
        let open = &self.open;
        let due: Vec<IncidentId> = self
            .held
            .iter()
            .filter(|id| {
                open.get(*id).is_none_or(|o| {
                    o.emitted
                        .as_ref()
                        .is_none_or(|(_, at)| clock.0 >= at.0.saturating_add(wait))
                })
            })
            .cloned()
            .collect();
        for id in due {
            self.held.remove(&id);
            if self.open.contains_key(&id) {
                self.pending.insert(id);
            }
        }
        for id in &self.held {
            if let Some((_, at)) = self.open.get(id).and_then(|o| o.emitted.as_ref()) {
                self.next_release = self.next_release.min(at.0.saturating_add(wait));
            }
        }
    }

    /// Closes an incident: emits its final revision.
    fn close(&mut self, id: &IncidentId) {
        self.pending.remove(id);
        self.held.remove(id);
        let Some(o) = self.open.remove(id) else {
            return;
        };
        if self.last_ite.as_ref() == Some(id) {
            self.last_ite = None;
        }
        if self.by_key.get(&(o.kind, o.dev)) == Some(id) {
            self.by_key.remove(&(o.kind, o.dev));
        }
        let rev = o.revision.map_or(0, |r| r + 1);
        self.stats.revisions += 1;
        let inc = self.render(&o, rev, true);
        self.out.push(inc);
    }

    fn render(&self, o: &OpenIncident, revision: u32, closed: bool) -> Incident {
        let cfg = &self.cfg;
        let mut submissions: Vec<SubmissionView> = o.members.values().cloned().collect();
        submissions.sort_by_key(|s| (s.start, s.tid));
        let mut outcomes: Vec<Outcome> = submissions.iter().map(|s| s.outcome).collect();
        outcomes.extend(o.omitted.outcomes());
        let outcome = outcomes.iter().copied().max_by_key(detect::outcome_rank);
        // Never below what an earlier revision said.
        let severity = detect::incident_severity(o.kind, &outcomes, cfg)
            .max(o.peak.unwrap_or(incident::Severity::Info));
        let window = o
            .kind
            .window()
            .or(o.attribution.as_ref().and_then(|a| a.window));
        let end = submissions
            .iter()
            .filter_map(|s| s.end)
            .fold(o.end, KTime::max);
        // Lost markers inside the window make the verdict partial.
        let from = KTime(o.start.0.saturating_sub(cfg.reorder_window_ns));
        let to = if closed || outcomes.iter().any(|x| !x.is_final()) {
            self.clock.max(end)
        } else {
            end
        };
        let mut partial: Vec<String> = o.partial.iter().cloned().collect();
        let mut timeline = o.timeline.clone();
        let lost: Vec<&(KTime, TimelineEntry)> = self.lost.within(from, to).collect();
        if !lost.is_empty() {
            partial.push(format!(
                "{} lost-event marker{} inside the time window",
                lost.len(),
                if lost.len() == 1 { "" } else { "s" }
            ));
            for (t, e) in lost {
                timeline.push((*t, u64::MAX, e.clone()));
            }
        }
        if self.lost.unknown_before(from) {
            partial.push("lost-event markers of this time were dropped (bound)".to_string());
        }
        partial.sort();
        partial.dedup();
        timeline.sort_by_key(|x| (x.0, x.1));
        timeline.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1 && a.2 == b.2);
        let mut omitted = o.timeline_omitted;
        let max = cfg.max_timeline.max(2);
        if timeline.len() > max {
            let drop = timeline.len() - max;
            timeline.drain(max / 2..max / 2 + drop);
            omitted += drop as u32;
        }
        let facts = describe::Facts {
            kind: o.kind,
            device: &o.device,
            outcome: outcome.as_ref(),
            caller: o.caller,
            hint: o.hint,
            removal: o.removal,
            submissions: submissions.len() + o.omitted.count as usize,
            reports: o.reports,
            sid_zero: o.sid_zero,
            inferred: o.inferred,
            candidates: &o.candidates,
            attributed_to: o.attribution.as_ref().map(|a| a.kind),
            lockup_seen: o.lockup_seen,
        };
        Incident {
            id: o.id.clone(),
            revision,
            kind: o.kind,
            severity,
            window,
            case: window.map(Window::case),
            device: IncidentDevice {
                inferred: o.inferred,
                candidates: if o.inferred || o.dev.is_none() {
                    o.candidates.clone()
                } else {
                    Vec::new()
                },
                ..o.device.clone()
            },
            removal: o.removal,
            start: o.start,
            end,
            outcome,
            explanation: describe::explain(&facts),
            fixes: describe::fixes_for(&facts),
            submissions,
            submissions_omitted: o.omitted.count,
            timeline: timeline.into_iter().map(|x| x.2).collect(),
            timeline_omitted: omitted,
            partial: !partial.is_empty(),
            partial_reasons: partial,
            reports: o.reports,
            attribution: o.attribution.clone(),
            related: o.related.iter().cloned().collect(),
            closed,
            evidence: None,
        }
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
