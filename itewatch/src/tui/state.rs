//! What the live view shows: a plain struct, updated from records, correlator snapshots and
//! incident revisions, and by [`Action`]s. Rendering (`ui`) reads it and nothing else, so a
//! test can build an `App`, feed it a stream and compare the rendered screen.
//!
//! Each panel owns its selection and sort state ([`TableView`]); the filter applies to all.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::correlate::incident::{Incident, IncidentId, SubmissionView};
use crate::correlate::state::FastMap;
use crate::correlate::{Config, Correlator, DeviceView, Snapshot};
use crate::event::{Descriptor, DeviceInfo, KTime, Payload, Record, Sid};
use crate::trace::ProbeStatus;
use itewatch_core::pairing::Pairing;

use super::input::Action;
use super::metrics::{BpfCost, LogHistogram};

/// Latencies kept per device for its sparkline.
pub const RECENT: usize = 24;
/// Outstanding submissions tracked for latencies and descriptor kinds (beyond: not tracked,
/// counted in `untracked`).
const MAX_PENDING: usize = 16_384;
/// Device snapshots kept for the exported report's inventory (as `itewatch report` keeps).
const MAX_DEVICE_INFOS: usize = 65_536;

/// The panels of the main screen, in Tab order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panel {
    InFlight,
    Devices,
    Incidents,
    Histogram,
}

impl Panel {
    pub const ALL: [Panel; 4] = [
        Panel::InFlight,
        Panel::Devices,
        Panel::Incidents,
        Panel::Histogram,
    ];

    fn next(self, by: isize) -> Panel {
        let i = Panel::ALL.iter().position(|p| *p == self).unwrap_or(0) as isize;
        Panel::ALL[(i + by).rem_euclid(Panel::ALL.len() as isize) as usize]
    }

    /// Sort orders the panel offers (`s` cycles them).
    pub fn sorts(self) -> &'static [&'static str] {
        match self {
            Panel::InFlight => &["age", "iommu", "cpu"],
            Panel::Devices => &["bdf", "state", "latency", "count"],
            Panel::Incidents => &["time", "severity", "kind"],
            Panel::Histogram => &["iommu"],
        }
    }
}

/// A panel's own selection and sort state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableView {
    pub selected: usize,
    /// Index into [`Panel::sorts`].
    pub sort: usize,
}

/// Where the view's data comes from, and how that went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderInfo {
    /// `live`, `replay FILE`, `simulate SCENARIO seed N`.
    pub source: String,
    pub host: String,
    pub kernel: String,
    pub iommus: BTreeSet<String>,
    pub probes: Vec<ProbeStatus>,
    /// Shown in red under the header (e.g. why this is not live).
    pub warning: Option<String>,
    /// The report document's host section (CPU model, VT-d units with their capabilities,
    /// scalable mode) when the source knows it: a recorded trace's header, or this host when
    /// live. Exports carry it; `None` for a simulation.
    pub doc_host: Option<crate::document::Host>,
    /// Compact records the decoder could not complete (thread or IOMMU not announced): a
    /// replayed trace's totals (its first pass reads them all), a live reader's so far.
    pub decoder: crate::event::DecoderStats,
}

/// Rates and costs, computed by the loop (wall clock) and passed in.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Meters {
    pub events_per_s: f64,
    /// Kernel BPF cost over the last interval (live with stats only).
    pub bpf: Option<BpfCost>,
    /// Kernel BPF cost recorded in a trace's end frame (replay).
    pub recorded_bpf: Option<BpfCost>,
}

/// Descriptor kinds of one submission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescKinds {
    pub iotlb: u16,
    pub dev_tlb: u16,
    pub context: u16,
    pub wait: u16,
    pub other: u16,
}

impl DescKinds {
    pub fn add(&mut self, d: &Descriptor) {
        let c = match d {
            Descriptor::DevTlb { .. } | Descriptor::PasidDevTlb { .. } => &mut self.dev_tlb,
            Descriptor::Iotlb { .. } | Descriptor::PasidIotlb { .. } => &mut self.iotlb,
            Descriptor::ContextCache { .. } => &mut self.context,
            Descriptor::Wait => &mut self.wait,
            Descriptor::Other { .. } => &mut self.other,
        };
        *c = c.saturating_add(1);
    }

    /// Descriptors the probe summarised (ABI 3): by type when the summary has one type; with
    /// several, one of each type and the rest under `other` (the record does not say how
    /// many of each).
    pub fn add_others(&mut self, o: crate::event::OtherDescs) {
        let mut rest = o.count;
        for t in o.type_codes() {
            if rest == 0 {
                break;
            }
            let n = if o.types.count_ones() == 1 { rest } else { 1 };
            let d = Descriptor::decode(crate::event::RawDesc {
                qw0: u64::from(t),
                qw1: 0,
            });
            for _ in 0..n {
                self.add(&d);
            }
            rest -= n;
        }
        self.other = self.other.saturating_add(rest);
    }

    /// `iotlb+dev-tlb×2`.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        for (n, name) in [
            (self.iotlb, "iotlb"),
            (self.dev_tlb, "dev-tlb"),
            (self.context, "ctx"),
            (self.other, "other"),
        ] {
            match n {
                0 => {}
                1 => parts.push(name.to_string()),
                n => parts.push(format!("{name}×{n}")),
            }
        }
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join("+")
        }
    }
}

#[derive(Clone, Debug)]
struct Pending {
    tid: u32,
    start: KTime,
    iommu: u64,
    kinds: DescKinds,
    sids: Sids,
}

/// The device-TLB SIDs of one submission: inline up to four (almost every submission), so that
/// taking in a submission allocates nothing; more spill to the heap.
#[derive(Clone, Debug, Default)]
struct Sids {
    inline: [Sid; 4],
    len: u8,
    more: Vec<Sid>,
}

impl Sids {
    fn push(&mut self, sid: Sid) {
        match self.inline.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = sid;
                self.len += 1;
            }
            None => self.more.push(sid),
        }
    }

    fn iter(&self) -> impl Iterator<Item = Sid> + '_ {
        self.inline[..usize::from(self.len)]
            .iter()
            .chain(&self.more)
            .copied()
    }
}

/// Device-TLB invalidation latencies of one device (by SID).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevStats {
    pub recent: VecDeque<u64>,
    pub count: u64,
    /// Returned with an error (-ETIMEDOUT after an ITE, ..).
    pub errors: u64,
    pub max_ns: u64,
}

/// One row of the in-flight panel.
#[derive(Clone, Debug)]
pub struct InflightRow<'a> {
    pub sub: &'a SubmissionView,
    pub age_ns: u64,
    pub kinds: Option<DescKinds>,
    /// SID → device (BDF and driver) where known.
    pub devices: Vec<(Sid, Option<&'a DeviceView>)>,
}

/// The state of a device now.
pub fn device_state(d: &DeviceView) -> &'static str {
    if d.released_at.is_some() {
        "released"
    } else if d.disconnected_at.is_some() {
        "disconnected"
    } else if d.removing_at.is_some() {
        "removing"
    } else {
        "present"
    }
}

/// The whole UI state.
pub struct App {
    pub cfg: Config,
    pub header: HeaderInfo,
    pub meters: Meters,
    pub snapshot: Snapshot,
    incidents: BTreeMap<IncidentId, Incident>,
    pub histograms: BTreeMap<String, LogHistogram>,
    pub dev_stats: BTreeMap<Sid, DevStats>,
    /// SIDs whose sysfs snapshot said ATS is enabled.
    pub ats: BTreeSet<Sid>,
    /// The latest sysfs snapshot of each device, by (segment, SID): the export's inventory.
    pub device_infos: BTreeMap<(u16, u16), DeviceInfo>,
    /// Timestamp of the first record that had one (the export's capture start).
    pub first_ts: Option<KTime>,
    iommu_names: FastMap<u64, String>,
    pending: Pairing<Pending>,
    /// Descriptor kinds by submission (tid, start): kept until the correlator, which lags by
    /// its reorder window, no longer shows the submission in flight.
    kinds: FastMap<(u32, KTime), DescKinds>,
    pub untracked: u64,
    pub events: u64,
    pub lost_ringbuf: u64,
    pub missed: u64,
    pub undecodable: u64,

    pub focus: Panel,
    pub views: [TableView; 4],
    /// Incident detail view open (its id and scroll offset).
    pub detail: Option<(IncidentId, u16)>,
    pub filter: String,
    pub filter_editing: bool,
    pub paused: bool,
    pub help: bool,
    /// One-line message (export path, errors).
    pub status: Option<String>,
    /// The stream ended (replay/simulate): the view shows its final state.
    pub ended: bool,
}

impl App {
    pub fn new(cfg: Config, header: HeaderInfo) -> App {
        let snapshot = Correlator::new(cfg.clone()).snapshot();
        App {
            cfg,
            header,
            meters: Meters::default(),
            snapshot,
            incidents: BTreeMap::new(),
            histograms: BTreeMap::new(),
            dev_stats: BTreeMap::new(),
            ats: BTreeSet::new(),
            device_infos: BTreeMap::new(),
            first_ts: None,
            iommu_names: FastMap::default(),
            pending: Pairing::new(MAX_PENDING),
            kinds: FastMap::default(),
            untracked: 0,
            events: 0,
            lost_ringbuf: 0,
            missed: 0,
            undecodable: 0,
            focus: Panel::InFlight,
            views: [TableView::default(); 4],
            detail: None,
            filter: String::new(),
            filter_editing: false,
            paused: false,
            help: false,
            status: None,
            ended: false,
        }
    }

    // ----- updates from the stream ----------------------------------------------------------

    /// Takes in one record (before it goes to the correlator): latencies per IOMMU and device,
    /// descriptor kinds, loss counts. Cheap: no allocation in the steady state.
    pub fn observe(&mut self, rec: &Record) {
        if self.first_ts.is_none() {
            self.first_ts = rec.ts();
        }
        match rec {
            Record::Event(e) => {
                self.events += 1;
                match &e.payload {
                    Payload::Submit(s) => {
                        if !self.iommu_names.contains_key(&s.iommu.ptr) {
                            let name = s.iommu.name.to_string();
                            self.header.iommus.insert(name.clone());
                            self.iommu_names.insert(s.iommu.ptr, name);
                        }
                        let mut p = Pending {
                            tid: e.meta.tid,
                            start: e.meta.ts,
                            iommu: s.iommu.ptr,
                            kinds: DescKinds::default(),
                            sids: Sids::default(),
                        };
                        for d in s.descriptors() {
                            p.kinds.add(&d);
                            if let Some(sid) = d.dev_tlb_sid() {
                                p.sids.push(sid);
                            }
                        }
                        p.kinds.add_others(s.others);
                        if self.kinds.len() < 4 * MAX_PENDING {
                            self.kinds.insert((e.meta.tid, e.meta.ts), p.kinds);
                        }
                        // Paired as the kernel runs them (itewatch_core::pairing); past the
                        // bound the oldest is forgotten and counted.
                        let (_, _, evicted) = self.pending.open(&e.meta, p);
                        if evicted.is_some() {
                            self.untracked += 1;
                        }
                    }
                    Payload::SubmitReturn(r) => {
                        if let Some((_, p)) = self.pending.close(&e.meta) {
                            let lat = e.meta.ts.saturating_sub(p.start);
                            if let Some(name) = self.iommu_names.get(&p.iommu) {
                                match self.histograms.get_mut(name) {
                                    Some(h) => h.record(lat),
                                    None => {
                                        let mut h = LogHistogram::default();
                                        h.record(lat);
                                        self.histograms.insert(name.clone(), h);
                                    }
                                }
                            }
                            for sid in p.sids.iter() {
                                let d = self.dev_stats.entry(sid).or_default();
                                d.count += 1;
                                d.max_ns = d.max_ns.max(lat);
                                if r.ret != 0 {
                                    d.errors += 1;
                                }
                                if d.recent.len() >= RECENT {
                                    d.recent.pop_front();
                                }
                                d.recent.push_back(lat);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Record::Lost(l) => {
                self.pending.mark_lost();
                self.lost_ringbuf += l.ringbuf_full;
                self.missed += l.missed;
                self.undecodable += l.undecodable;
            }
            Record::Device(d) => {
                if d.ats == Some(true) {
                    self.ats.insert(d.bdf.sid());
                }
                let key = (d.bdf.segment_or_zero(), d.bdf.sid().0);
                if self.device_infos.len() < MAX_DEVICE_INFOS
                    || self.device_infos.contains_key(&key)
                {
                    self.device_infos.insert(key, d.clone());
                }
                if let Some(i) = &d.iommu {
                    if !self.header.iommus.contains(i) {
                        self.header.iommus.insert(i.clone());
                    }
                }
            }
            Record::Stack(_) => {}
        }
    }

    /// Takes in incident revisions: the latest revision of each is kept.
    pub fn on_revisions(&mut self, revs: Vec<Incident>) {
        for inc in revs {
            match self.incidents.get(&inc.id) {
                Some(old) if old.revision > inc.revision => {}
                _ => {
                    self.incidents.insert(inc.id.clone(), inc);
                }
            }
        }
    }

    pub fn set_snapshot(&mut self, s: Snapshot) {
        let inflight: BTreeSet<(u32, KTime)> =
            s.inflight.iter().map(|v| (v.tid, v.start)).collect();
        let horizon = s.now.0.saturating_sub(2 * self.cfg.reorder_window_ns);
        let pending: BTreeSet<(u32, KTime)> =
            self.pending.values().map(|p| (p.tid, p.start)).collect();
        self.kinds
            .retain(|k, _| inflight.contains(k) || k.1 .0 >= horizon || pending.contains(k));
        // Open incidents as they stand now (their last revision may be older).
        self.on_revisions(s.open_incidents.clone());
        self.snapshot = s;
        self.clamp_selections();
    }

    // ----- what the panels show (filtered, sorted) -------------------------------------------

    fn matches(&self, hay: &str) -> bool {
        self.filter.is_empty() || hay.to_lowercase().contains(&self.filter.to_lowercase())
    }

    fn device_for(&self, sid: Sid) -> Option<&DeviceView> {
        self.snapshot
            .devices
            .iter()
            .find(|d| d.device.sid == Some(sid))
    }

    fn device_hay(d: &DeviceView) -> String {
        let dv = &d.device;
        format!(
            "{} {} sid=0x{:04x} {} {} {}",
            dv.bdf.map(|b| b.to_string()).unwrap_or_default(),
            dv.sid.map(|s| s.to_string()).unwrap_or_default(),
            dv.sid.map_or(0, |s| s.0),
            dv.driver.as_deref().unwrap_or(""),
            dv.slot
                .as_deref()
                .map(|s| format!("slot {s} slot{s}"))
                .unwrap_or_default(),
            dv.iommu.as_deref().unwrap_or(""),
        )
    }

    /// In-flight submissions, filtered and sorted.
    pub fn inflight_rows(&self) -> Vec<InflightRow<'_>> {
        let mut rows: Vec<InflightRow<'_>> = self
            .snapshot
            .inflight
            .iter()
            .map(|s| InflightRow {
                sub: s,
                age_ns: s.outcome.duration_ns().unwrap_or(0),
                kinds: self.kinds.get(&(s.tid, s.start)).copied(),
                devices: s
                    .dev_tlb_sids
                    .iter()
                    .map(|sid| (*sid, self.device_for(*sid)))
                    .collect(),
            })
            .filter(|r| {
                if self.filter.is_empty() {
                    return true;
                }
                let mut hay = format!("{} {} cpu{}", r.sub.iommu, r.sub.task, r.sub.cpu);
                for (sid, d) in &r.devices {
                    hay.push_str(&format!(" {sid} sid=0x{:04x}", sid.0));
                    if let Some(d) = d {
                        hay.push(' ');
                        hay.push_str(&Self::device_hay(d));
                    }
                }
                self.matches(&hay)
            })
            .collect();
        match self.views[0].sort {
            1 => rows.sort_by(|a, b| (&a.sub.iommu, b.age_ns).cmp(&(&b.sub.iommu, a.age_ns))),
            2 => rows.sort_by_key(|r| (r.sub.cpu, r.sub.start)),
            _ => rows.sort_by_key(|r| (std::cmp::Reverse(r.age_ns), r.sub.tid)),
        }
        rows
    }

    /// Devices worth showing: ATS-capable (or seen taking device-TLB invalidations), under a
    /// hot-plug slot, or not present any more. Filtered and sorted.
    pub fn device_rows(&self) -> Vec<&DeviceView> {
        let mut rows: Vec<&DeviceView> = self
            .snapshot
            .devices
            .iter()
            .filter(|d| {
                let sid = d.device.sid;
                sid.is_some_and(|s| self.ats.contains(&s) || self.dev_stats.contains_key(&s))
                    || d.device.slot.is_some()
                    || device_state(d) != "present"
            })
            .filter(|d| self.matches(&Self::device_hay(d)))
            .collect();
        let stats = |d: &DeviceView| d.device.sid.and_then(|s| self.dev_stats.get(&s));
        match self.views[1].sort {
            1 => rows.sort_by_key(|d| (device_state(d) == "present", d.device.bdf)),
            2 => rows.sort_by_key(|d| {
                (
                    std::cmp::Reverse(stats(d).and_then(|s| s.recent.back().copied())),
                    d.device.bdf,
                )
            }),
            3 => rows.sort_by_key(|d| (std::cmp::Reverse(stats(d).map(|s| s.count)), d.device.bdf)),
            _ => rows.sort_by_key(|d| (d.device.bdf, d.device.sid)),
        }
        rows
    }

    /// Incidents (latest revisions), filtered and sorted.
    pub fn incident_rows(&self) -> Vec<&Incident> {
        let mut rows: Vec<&Incident> = self
            .incidents
            .values()
            .filter(|i| {
                if self.filter.is_empty() {
                    return true;
                }
                let dv = &i.device;
                let hay = format!(
                    "{} {} sid=0x{:04x} {} {} {} {}",
                    dv.bdf.map(|b| b.to_string()).unwrap_or_default(),
                    dv.sid.map(|s| s.to_string()).unwrap_or_default(),
                    dv.sid.map_or(0, |s| s.0),
                    dv.driver.as_deref().unwrap_or(""),
                    dv.slot
                        .as_deref()
                        .map(|s| format!("slot {s} slot{s}"))
                        .unwrap_or_default(),
                    i.kind,
                    i.window.map(|w| format!("{w:?}")).unwrap_or_default(),
                );
                self.matches(&hay)
            })
            .collect();
        match self.views[2].sort {
            1 => {
                rows.sort_by(|a, b| (b.severity, a.start, &a.id).cmp(&(a.severity, b.start, &b.id)))
            }
            2 => rows.sort_by(|a, b| (a.kind, a.start, &a.id).cmp(&(b.kind, b.start, &b.id))),
            _ => rows.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id))),
        }
        rows
    }

    /// Every incident, by start time (for "export all").
    pub fn all_incidents(&self) -> Vec<Incident> {
        crate::correlate::latest(self.incidents.values().cloned())
    }

    pub fn incident(&self, id: &IncidentId) -> Option<&Incident> {
        self.incidents.get(id)
    }

    /// The incident the detail view shows, or the one selected in the incidents panel.
    pub fn selected_incident(&self) -> Option<&Incident> {
        if let Some((id, _)) = &self.detail {
            return self.incidents.get(id);
        }
        if self.focus == Panel::Incidents {
            return self.incident_rows().get(self.views[2].selected).copied();
        }
        None
    }

    /// IOMMU units the histogram can show, in order.
    pub fn histogram_units(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.histograms.keys().map(String::as_str).collect();
        for u in &self.header.iommus {
            if !self.histograms.contains_key(u) {
                v.push(u.as_str());
            }
        }
        v.sort_unstable();
        v
    }

    /// How long an open incident's submissions have been outstanding now (its last revision
    /// may be older than the snapshot).
    pub fn live_age(&self, inc: &Incident) -> Option<u64> {
        inc.submissions
            .iter()
            .filter_map(|m| {
                self.snapshot
                    .inflight
                    .iter()
                    .find(|v| v.tid == m.tid && v.start == m.start)
                    .and_then(|v| v.outcome.duration_ns())
            })
            .max()
    }

    /// Worst in-flight age now.
    pub fn worst_inflight(&self) -> Option<&SubmissionView> {
        self.snapshot
            .inflight
            .iter()
            .max_by_key(|s| s.outcome.duration_ns().unwrap_or(0))
    }

    fn rows_in(&self, p: Panel) -> usize {
        match p {
            Panel::InFlight => self.inflight_rows().len(),
            Panel::Devices => self.device_rows().len(),
            Panel::Incidents => self.incident_rows().len(),
            Panel::Histogram => self.histogram_units().len(),
        }
    }

    fn panel_index(p: Panel) -> usize {
        Panel::ALL.iter().position(|x| *x == p).unwrap_or(0)
    }

    fn clamp_selections(&mut self) {
        for p in Panel::ALL {
            let n = self.rows_in(p);
            let v = &mut self.views[Self::panel_index(p)];
            v.selected = v.selected.min(n.saturating_sub(1));
        }
    }

    fn move_selection(&mut self, by: isize) {
        let n = self.rows_in(self.focus);
        let v = &mut self.views[Self::panel_index(self.focus)];
        if n == 0 {
            v.selected = 0;
            return;
        }
        v.selected = (v.selected as isize + by).clamp(0, n as isize - 1) as usize;
    }

    // ----- actions ----------------------------------------------------------------------------

    /// Applies a state-only action (Quit and Export are the loop's: they do I/O).
    pub fn apply(&mut self, a: Action) {
        if !matches!(a, Action::None) {
            self.status = None;
        }
        if let Some((_, scroll)) = &mut self.detail {
            match a {
                Action::Up => *scroll = scroll.saturating_sub(1),
                Action::Down => *scroll = scroll.saturating_add(1),
                Action::PageUp => *scroll = scroll.saturating_sub(10),
                Action::PageDown => *scroll = scroll.saturating_add(10),
                Action::Top => *scroll = 0,
                Action::Back => self.detail = None,
                Action::ToggleHelp => self.help = !self.help,
                Action::TogglePause => self.paused = !self.paused,
                _ => {}
            }
            return;
        }
        match a {
            Action::None | Action::Quit | Action::Export | Action::ExportAll => {}
            Action::ToggleHelp => self.help = !self.help,
            Action::FocusNext | Action::Right => self.focus = self.focus.next(1),
            Action::FocusPrev | Action::Left => self.focus = self.focus.next(-1),
            Action::Up => self.move_selection(-1),
            Action::Down => self.move_selection(1),
            Action::PageUp => self.move_selection(-10),
            Action::PageDown => self.move_selection(10),
            Action::Top => self.move_selection(isize::MIN / 2),
            Action::Bottom => self.move_selection(isize::MAX / 2),
            Action::Open => {
                if self.focus == Panel::Incidents {
                    if let Some(i) = self.incident_rows().get(self.views[2].selected) {
                        self.detail = Some((i.id.clone(), 0));
                    }
                } else if self.focus == Panel::InFlight {
                    // Open the incident this submission belongs to, if any.
                    let tid = self
                        .inflight_rows()
                        .get(self.views[0].selected)
                        .map(|r| (r.sub.tid, r.sub.start));
                    if let Some((tid, start)) = tid {
                        let inc = self.incidents.values().find(|i| {
                            i.submissions
                                .iter()
                                .any(|s| s.tid == tid && s.start == start)
                        });
                        if let Some(i) = inc {
                            self.detail = Some((i.id.clone(), 0));
                        }
                    }
                }
            }
            Action::Back => {
                if !self.filter.is_empty() {
                    self.filter.clear();
                }
            }
            Action::StartFilter => self.filter_editing = true,
            Action::FilterInput(c) => self.filter.push(c),
            Action::FilterBackspace => {
                self.filter.pop();
            }
            Action::FilterCommit => self.filter_editing = false,
            Action::FilterCancel => {
                self.filter_editing = false;
                self.filter.clear();
            }
            Action::TogglePause => self.paused = !self.paused,
            Action::CycleSort => {
                let n = self.focus.sorts().len();
                let v = &mut self.views[Self::panel_index(self.focus)];
                v.sort = (v.sort + 1) % n;
                v.selected = 0;
            }
        }
        self.clamp_selections();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::incident::IncidentKind;

    /// The app after playing `name` with `seed`, to the end or up to `stop_at`.
    fn played(name: &str, seed: u64, stop_at: Option<KTime>) -> App {
        let sim = crate::simulate::generate(name, seed).unwrap();
        super::super::play(HeaderInfo::default(), sim.records, stop_at)
    }

    fn filtered(app: &mut App, f: &str) {
        app.apply(Action::StartFilter);
        for c in f.chars() {
            app.apply(Action::FilterInput(c));
        }
        app.apply(Action::FilterCommit);
    }

    fn device_bdfs(app: &App) -> Vec<String> {
        app.device_rows()
            .iter()
            .map(|d| d.device.bdf.map(|b| b.to_string()).unwrap_or_default())
            .collect()
    }

    /// W1 on seed 3: virtio-pci 01:00.0 slot 1, nvme 02:00.0 slot 2, mlx5_core 03:00.0 slot 3
    /// (the incidents' device), ixgbe 80:00.0 on dmar1 without a slot.
    #[test]
    fn filter_by_bdf_sid_driver_slot_and_iommu() {
        let mut app = played("w1-driver-inflight", 3, None);
        assert_eq!(device_bdfs(&app).len(), 4);
        assert_eq!(app.incident_rows().len(), 2);
        for (f, devices, incidents) in [
            ("0000:03:00.0", vec!["0000:03:00.0"], 2),
            ("03:00.0", vec!["0000:03:00.0"], 2),
            ("sid=0x0300", vec!["0000:03:00.0"], 2),
            ("SID=0X0300", vec!["0000:03:00.0"], 2),
            ("mlx5", vec!["0000:03:00.0"], 2),
            ("MLX5_core", vec!["0000:03:00.0"], 2),
            ("slot 2", vec!["0000:02:00.0"], 0),
            ("slot2", vec!["0000:02:00.0"], 0),
            ("slot 3", vec!["0000:03:00.0"], 2),
            ("80:00.0", vec!["0000:80:00.0"], 0),
            ("dmar1", vec!["0000:80:00.0"], 0),
            ("nvme", vec!["0000:02:00.0"], 0),
            ("no-such-device", vec![], 0),
        ] {
            filtered(&mut app, f);
            assert_eq!(app.filter, f);
            assert_eq!(device_bdfs(&app), devices, "filter {f:?}");
            assert_eq!(app.incident_rows().len(), incidents, "filter {f:?}");
            // Esc clears it, and every row is back.
            app.apply(Action::Back);
            assert_eq!(app.filter, "");
            assert_eq!(device_bdfs(&app).len(), 4);
        }
        // Editing: backspace, and cancel clears.
        app.apply(Action::StartFilter);
        app.apply(Action::FilterInput('n'));
        app.apply(Action::FilterInput('x'));
        app.apply(Action::FilterBackspace);
        assert_eq!(app.filter, "n");
        assert!(app.filter_editing);
        app.apply(Action::FilterCancel);
        assert_eq!(app.filter, "");
        assert!(!app.filter_editing);
    }

    #[test]
    fn filter_applies_to_in_flight_submissions() {
        // During the W1 submission to the mlx5 device (03:00.0) that is being removed: it is
        // in flight (aborted after 7 ms), next to benign traffic to other devices. The
        // correlator shows it once its reorder window (10 ms) has passed the submission and
        // before it has passed the return.
        let all = played("w1-driver-inflight", 3, None);
        let w1 = all
            .all_incidents()
            .into_iter()
            .find(|i| i.kind == IncidentKind::InflightAcrossDisconnect)
            .unwrap();
        let mlx5 = Sid(0x0300);
        let mut app = played(
            "w1-driver-inflight",
            3,
            Some(KTime(w1.start.0 + 12_000_000)),
        );
        let has_mlx5 = |app: &App| {
            app.inflight_rows()
                .iter()
                .any(|r| r.sub.dev_tlb_sids.contains(&mlx5))
        };
        assert!(has_mlx5(&app), "the W1 submission is in flight");
        let (task, cpu) = app
            .inflight_rows()
            .iter()
            .find(|r| r.sub.dev_tlb_sids.contains(&mlx5))
            .map(|r| (r.sub.task.clone(), r.sub.cpu))
            .unwrap();
        // Device filters keep exactly the submissions to that device.
        for f in ["0000:03:00.0", "03:00.0", "sid=0x0300", "mlx5", "slot 3"] {
            filtered(&mut app, f);
            let rows = app.inflight_rows();
            assert!(!rows.is_empty(), "filter {f:?}");
            assert!(
                rows.iter().all(|r| r.sub.dev_tlb_sids.contains(&mlx5)),
                "filter {f:?}"
            );
            drop(rows);
            app.apply(Action::Back);
        }
        // The task and CPU are in the haystack too.
        for f in [task.clone(), format!("cpu{cpu}")] {
            filtered(&mut app, &f);
            assert!(has_mlx5(&app), "filter {f:?}");
            app.apply(Action::Back);
        }
        for f in ["0000:02:00.0", "slot 2", "dmar1", "no-such-device"] {
            filtered(&mut app, f);
            assert!(!has_mlx5(&app), "filter {f:?}");
            app.apply(Action::Back);
        }
    }

    fn focus(app: &mut App, p: Panel) {
        while app.focus != p {
            app.apply(Action::FocusNext);
        }
    }

    #[test]
    fn s_cycles_each_panels_sort_orders() {
        let mut app = played("w1-driver-inflight", 3, None);
        // Devices: bdf, state (not present first), latency (last, longest first), count.
        focus(&mut app, Panel::Devices);
        app.apply(Action::Down);
        let last = |app: &App, d: &DeviceView| {
            d.device
                .sid
                .and_then(|s| app.dev_stats.get(&s))
                .and_then(|s| s.recent.back().copied())
        };
        let count = |app: &App, d: &DeviceView| {
            d.device
                .sid
                .and_then(|s| app.dev_stats.get(&s))
                .map(|s| s.count)
        };
        let rows = app.device_rows();
        assert!(rows.is_sorted_by_key(|d| d.device.bdf), "bdf");
        app.apply(Action::CycleSort);
        assert_eq!(app.views[1].sort, 1);
        assert_eq!(
            app.views[1].selected, 0,
            "a new order selects the first row"
        );
        let rows = app.device_rows();
        assert_eq!(device_state(rows[0]), "released");
        assert!(rows.is_sorted_by_key(|d| device_state(d) == "present"));
        app.apply(Action::CycleSort);
        let rows = app.device_rows();
        assert_eq!(rows[0].device.bdf.unwrap().to_string(), "0000:03:00.0");
        assert!(rows.is_sorted_by_key(|d| std::cmp::Reverse(last(&app, d))));
        app.apply(Action::CycleSort);
        let rows = app.device_rows();
        assert!(rows.is_sorted_by_key(|d| std::cmp::Reverse(count(&app, d))));
        assert_eq!(rows[0].device.bdf.unwrap().to_string(), "0000:01:00.0");
        app.apply(Action::CycleSort);
        assert_eq!(app.views[1].sort, 0, "wraps to bdf");

        // Incidents: time, severity (worst first), kind. The sort belongs to the panel.
        focus(&mut app, Panel::Incidents);
        assert_eq!(app.views[2].sort, 0);
        let rows = app.incident_rows();
        assert!(rows.is_sorted_by_key(|i| (i.start, i.id.clone())));
        app.apply(Action::CycleSort);
        let rows = app.incident_rows();
        assert!(rows.is_sorted_by_key(|i| std::cmp::Reverse(i.severity)));
        app.apply(Action::CycleSort);
        let rows = app.incident_rows();
        assert!(rows.is_sorted_by_key(|i| i.kind));
        assert_eq!(rows[0].kind, IncidentKind::InflightAcrossDisconnect);
        assert_eq!(app.views[1].sort, 0, "the devices panel kept its order");
    }

    #[test]
    fn in_flight_sorts_by_age_iommu_and_cpu() {
        // The soak stream has several submissions in flight at some moments; find one with
        // at least two on different CPUs.
        let recs: Vec<Record> = crate::simulate::LongStream::new(1, 60_000).collect();
        let mut app = None;
        for r in recs.iter().rev().step_by(97) {
            let Some(t) = r.ts() else { continue };
            let a = super::super::play(HeaderInfo::default(), recs.clone(), Some(t));
            let rows = a.inflight_rows();
            let cpus: BTreeSet<u32> = rows.iter().map(|r| r.sub.cpu).collect();
            let units: BTreeSet<&str> = rows.iter().map(|r| r.sub.iommu.as_str()).collect();
            if cpus.len() >= 2 && units.len() >= 2 {
                drop(rows);
                app = Some(a);
                break;
            }
        }
        let mut app = app.expect("a moment with submissions in flight on two CPUs and units");
        assert_eq!(app.focus, Panel::InFlight);
        let rows = app.inflight_rows();
        assert!(
            rows.is_sorted_by_key(|r| std::cmp::Reverse(r.age_ns)),
            "age"
        );
        app.apply(Action::CycleSort);
        let rows = app.inflight_rows();
        assert!(rows.is_sorted_by_key(|r| r.sub.iommu.clone()), "iommu");
        app.apply(Action::CycleSort);
        let rows = app.inflight_rows();
        assert!(rows.is_sorted_by_key(|r| (r.sub.cpu, r.sub.start)), "cpu");
        app.apply(Action::CycleSort);
        assert_eq!(app.views[0].sort, 0);
    }

    #[test]
    fn descriptor_kinds_label() {
        let mut k = DescKinds::default();
        assert_eq!(k.label(), "-");
        k.add(&Descriptor::Iotlb { did: 1 });
        k.add(&Descriptor::Wait);
        k.add(&Descriptor::DevTlb {
            sid: Sid(1),
            pfsid: Sid(0),
            qdep: 0,
            addr: 0,
            size_bit: false,
        });
        k.add(&Descriptor::DevTlb {
            sid: Sid(2),
            pfsid: Sid(0),
            qdep: 0,
            addr: 0,
            size_bit: false,
        });
        assert_eq!(k.label(), "iotlb+dev-tlb×2");
    }

    #[test]
    fn panels_cycle_and_sorts_wrap() {
        let mut app = App::new(Config::default(), HeaderInfo::default());
        assert_eq!(app.focus, Panel::InFlight);
        app.apply(Action::FocusPrev);
        assert_eq!(app.focus, Panel::Histogram);
        app.apply(Action::FocusNext);
        app.apply(Action::FocusNext);
        assert_eq!(app.focus, Panel::Devices);
        for _ in 0..4 {
            app.apply(Action::CycleSort);
        }
        assert_eq!(app.views[1].sort, 0);
        app.apply(Action::StartFilter);
        app.apply(Action::FilterInput('m'));
        app.apply(Action::FilterCommit);
        assert_eq!(app.filter, "m");
        assert!(!app.filter_editing);
        app.apply(Action::Back);
        assert_eq!(app.filter, "");
    }
}
