//! What the correlator remembers between events: devices, hot-plug slots, in-flight
//! submissions, open incidents, lost-event markers and the reorder buffer. All maps are
//! ordered (`BTreeMap`) so iteration, and thus output, is deterministic.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use crate::event::{Bdf, CallerPath, DeviceInfo, Event, KTime, Meta, Payload, Record, Sid, Submit};

use super::detect::{FixHint, Lifecycle, Release};
use super::incident::{
    Attribution, DeviceState, IncidentDevice, IncidentId, IncidentKind, Outcome, RemovalKind,
    SubmissionView, TimelineEntry,
};

/// A device key: (PCI segment, unknown taken as 0; source-id).
pub type DevKey = (u16, Sid);

/// How a device came to be disconnected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DisconnectHow {
    /// `pci_walk_bus(.., pci_dev_set_disconnected, ..)` covering its bus (6.1 and 6.12).
    Walk,
    /// `pci_doe_disconnected` for the device (6.12).
    Doe,
}

/// One device, by (segment, SID).
#[derive(Clone, Debug)]
pub struct DeviceEntry {
    pub bdf: Bdf,
    pub info: Option<DeviceInfo>,
    /// vendor:device from a device event when no snapshot named it.
    pub ids: Option<(u16, u16)>,
    pub iommu: Option<String>,
    pub disconnected: Option<(KTime, DisconnectHow)>,
    pub removing: Option<KTime>,
    pub released: Option<Release>,
    pub last_seen: KTime,
    /// Lifecycle events (disconnect, remove, release) for timelines; bounded.
    pub history: Vec<(KTime, u64, TimelineEntry)>,
}

impl DeviceEntry {
    pub fn new(bdf: Bdf, ts: KTime) -> Self {
        DeviceEntry {
            bdf,
            info: None,
            ids: None,
            iommu: None,
            disconnected: None,
            removing: None,
            released: None,
            last_seen: ts,
            history: Vec::new(),
        }
    }

    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            disconnected: self.disconnected.map(|d| d.0),
            released: self.released,
        }
    }

    /// State at time `ts`.
    pub fn state_at(&self, ts: KTime) -> DeviceState {
        if self.released.is_some_and(|r| r.at <= ts) {
            DeviceState::Released
        } else if self.disconnected.is_some_and(|d| d.0 <= ts) {
            DeviceState::Disconnected
        } else if self.removing.is_some_and(|r| r <= ts) {
            DeviceState::Removing
        } else {
            DeviceState::Present
        }
    }

    /// A new incarnation (hot-add): forget the previous one's removal.
    pub fn reset(&mut self) {
        self.disconnected = None;
        self.removing = None;
        self.released = None;
        self.history.clear();
    }

    pub fn is_gone(&self) -> bool {
        self.disconnected.is_some() || self.released.is_some()
    }

    pub fn view(&self, ts: KTime, slot_name: Option<String>) -> IncidentDevice {
        let mut state = self.state_at(ts);
        if state == DeviceState::Present && self.info.is_none() && self.ids.is_none() {
            // Only ever seen in descriptors: we cannot say the device exists.
            state = DeviceState::Unknown;
        }
        IncidentDevice {
            bdf: Some(self.bdf),
            sid: Some(self.bdf.sid()),
            driver: self.info.as_ref().and_then(|i| i.driver.clone()),
            slot: self
                .info
                .as_ref()
                .and_then(|i| i.slot.clone())
                .or(slot_name),
            port: self.info.as_ref().and_then(|i| i.port),
            vendor: self
                .info
                .as_ref()
                .map(|i| i.vendor)
                .or(self.ids.map(|i| i.0)),
            device_id: self
                .info
                .as_ref()
                .map(|i| i.device)
                .or(self.ids.map(|i| i.1)),
            iommu: self
                .info
                .as_ref()
                .and_then(|i| i.iommu.clone())
                .or(self.iommu.clone()),
            state: Some(state),
            present: state.present(),
            ..Default::default()
        }
    }
}

/// A removal of a slot (from `pciehp_unconfigure_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removal {
    pub kind: Option<RemovalKind>,
    pub at: KTime,
    pub tid: u32,
    /// Until the pciehp handler that started it returns.
    pub active: bool,
}

/// A hot-plug slot, by controller.
#[derive(Clone, Debug)]
pub struct SlotState {
    pub ctrl: u64,
    pub port: Option<Bdf>,
    pub secondary: u8,
    pub subordinate: u8,
    pub name: Option<String>,
    /// The pciehp handler running now: (tid, since).
    pub ist: Option<(u32, KTime)>,
    pub ist_saw_unconfigure: bool,
    pub removal: Option<Removal>,
    pub link_down: Option<KTime>,
    /// Hot-plug events for timelines; bounded.
    pub history: Vec<(KTime, u64, TimelineEntry)>,
}

impl SlotState {
    pub fn covers(&self, segment: u16, sid: Sid) -> bool {
        let seg_ok = self
            .port
            .and_then(|p| p.segment)
            .is_none_or(|s| s == segment);
        self.secondary != 0 && seg_ok && (self.secondary..=self.subordinate).contains(&sid.bus())
    }
}

/// A disconnect walk, remembered for devices first seen after it.
#[derive(Clone, Copy, Debug)]
pub struct WalkRec {
    pub segment: Option<u16>,
    pub bus: u8,
    pub bus_end: u8,
    pub at: KTime,
}

impl WalkRec {
    pub fn covers(&self, segment: u16, sid: Sid) -> bool {
        self.segment.is_none_or(|s| s == segment) && (self.bus..=self.bus_end).contains(&sid.bus())
    }
}

/// One submission in flight on a thread.
#[derive(Clone, Debug)]
pub struct Inflight {
    /// Arrival sequence number of the submit event: the submission's identity.
    pub seq: u64,
    /// Where it is open (pairing.rs): its thread, or CPU for thread 0, and nesting depth.
    pub key: crate::pairing::PairKey,
    pub meta: Meta,
    pub submit: Submit,
    /// The `qi_flush_dev_iotlb` that issued it (6.1, and the removal path on both), where the
    /// probe recorded one: ABI 3 probes record flushes only near a hot-plug or removal.
    pub flush: Option<Box<Event>>,
    pub caller: CallerPath,
    pub hint: FixHint,
    pub segment: u16,
    /// Device-TLB SIDs in the batch, deduplicated, in descriptor order.
    pub sids: Sids,
    /// Incidents this submission is part of.
    pub incidents: Vec<IncidentId>,
    /// Hung level raised so far: 0 none, 1 warning, 2 critical.
    pub hung_level: u8,
    /// The slot whose safe removal was running when it was issued (W3 candidate).
    pub safe_removal_slot: Option<u64>,
    /// Passed the slow threshold while in flight (W3 checked).
    pub slow_checked: bool,
    /// Reasons the facts about it may be incomplete.
    pub partial: BTreeSet<String>,
}

impl Inflight {
    pub fn start(&self) -> KTime {
        self.meta.ts
    }

    /// The submit event.
    pub fn event(&self) -> Event {
        Event {
            meta: self.meta,
            payload: Payload::Submit(self.submit.clone()),
        }
    }

    pub fn view(&self, outcome: Outcome, end: Option<KTime>, ret: Option<i64>) -> SubmissionView {
        SubmissionView {
            tid: self.meta.tid,
            cpu: self.meta.cpu,
            task: self.meta.comm.to_string(),
            iommu: self.submit.iommu.name.to_string(),
            start: self.start(),
            end,
            ret,
            outcome,
            caller: self.caller,
            descriptors: self.submit.count,
            dev_tlb_sids: self.sids.to_vec(),
        }
    }
}

/// The device-TLB SIDs of one batch, without allocating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sids {
    n: u8,
    s: [Sid; itewatch_common::MAX_BATCH],
}

impl Sids {
    /// Adds `sid` unless present; beyond the capacity (a batch's size) it is dropped.
    pub fn push_unique(&mut self, sid: Sid) {
        if !self.contains(&sid) && (self.n as usize) < self.s.len() {
            self.s[self.n as usize] = sid;
            self.n += 1;
        }
    }
}

impl std::ops::Deref for Sids {
    type Target = [Sid];
    fn deref(&self) -> &[Sid] {
        &self.s[..self.n as usize]
    }
}

/// An incident that may still change.
#[derive(Clone, Debug)]
pub struct OpenIncident {
    pub id: IncidentId,
    pub kind: IncidentKind,
    pub revision: Option<u32>,
    pub dev: Option<DevKey>,
    pub device: IncidentDevice,
    pub removal: Option<RemovalKind>,
    pub start: KTime,
    pub end: KTime,
    /// Member submissions by seq, with their latest view.
    pub members: BTreeMap<u64, SubmissionView>,
    pub caller: CallerPath,
    pub hint: FixHint,
    pub timeline: Vec<(KTime, u64, TimelineEntry)>,
    pub timeline_omitted: u32,
    pub partial: BTreeSet<String>,
    pub reports: u32,
    pub sid_zero: bool,
    /// The device is inferred, not named by the kernel; `candidates` are every SID it may be,
    /// most likely first.
    pub inferred: bool,
    pub candidates: Vec<Sid>,
    pub lockup_seen: bool,
    /// The highest severity a revision of this incident has had: an incident's severity never
    /// goes down (a hung submission whose return was later lost stays critical).
    pub peak: Option<super::incident::Severity>,
    pub attribution: Option<Attribution>,
    pub related: BTreeSet<IncidentId>,
    /// Last activity, for closing idle aggregate incidents.
    pub last_activity: KTime,
    /// Changed since the last emission.
    pub dirty: bool,
    /// Finished members left out of `members` to keep it bounded.
    pub omitted: Omitted,
    /// What the last emitted revision said that a reader acts on, and when it went out.
    pub emitted: Option<(super::Material, KTime)>,
}

/// Members left out of an incident's list: how many, and the outcomes that still decide
/// its outcome and severity (the worst one, and the longest).
#[derive(Clone, Debug, Default)]
pub struct Omitted {
    pub count: u32,
    pub worst: Option<Outcome>,
    pub longest: Option<Outcome>,
}

impl Omitted {
    pub fn add(&mut self, o: Outcome) {
        self.count = self.count.saturating_add(1);
        if self
            .worst
            .is_none_or(|w| super::detect::outcome_rank(&o) > super::detect::outcome_rank(&w))
        {
            self.worst = Some(o);
        }
        if self
            .longest
            .is_none_or(|l| o.duration_ns().unwrap_or(0) > l.duration_ns().unwrap_or(0))
        {
            self.longest = Some(o);
        }
    }

    pub fn outcomes(&self) -> impl Iterator<Item = Outcome> + '_ {
        self.worst.into_iter().chain(self.longest)
    }
}

impl OpenIncident {
    /// Adds or updates a member; past `max` members the oldest finished one is left out.
    pub fn put_member(&mut self, seq: u64, view: SubmissionView, max: usize) {
        self.members.insert(seq, view);
        while self.members.len() > max.max(1) {
            let Some(oldest) = self
                .members
                .iter()
                .find(|(_, m)| m.outcome.is_final())
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(m) = self.members.remove(&oldest) {
                self.omitted.add(m.outcome);
            }
        }
    }
}

/// Records held back until nothing older can still arrive (per-CPU ring buffers interleave
/// with small skew). Insertion from the back: O(1) for in-order input.
#[derive(Default)]
pub struct ReorderBuffer {
    items: VecDeque<(KTime, u64, Record)>,
    pub max_ts: KTime,
}

impl ReorderBuffer {
    pub fn push(&mut self, ts: KTime, seq: u64, rec: Record) {
        self.max_ts = self.max_ts.max(ts);
        let mut i = self.items.len();
        while i > 0 && self.items[i - 1].0 > ts {
            i -= 1;
        }
        if i == self.items.len() {
            self.items.push_back((ts, seq, rec));
        } else {
            self.items.insert(i, (ts, seq, rec));
        }
    }

    /// Pops the oldest record if it is at least `window_ns` older than the newest seen
    /// (or unconditionally with `all`).
    pub fn pop_ready(&mut self, window_ns: u64, all: bool) -> Option<(KTime, u64, Record)> {
        let front = self.items.front()?;
        if all || front.0 .0.saturating_add(window_ns) <= self.max_ts.0 {
            self.items.pop_front()
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Lost-event markers, kept to mark incidents partial.
#[derive(Default)]
pub struct LostLog {
    pub markers: VecDeque<(KTime, TimelineEntry)>,
    /// Markers were dropped for the bound: anything before this time may have lost events.
    pub evicted_until: Option<KTime>,
}

impl LostLog {
    pub fn push(&mut self, ts: KTime, e: TimelineEntry, max: usize) -> bool {
        let mut evicted = false;
        while self.markers.len() >= max.max(1) {
            if let Some((t, _)) = self.markers.pop_front() {
                self.evicted_until = Some(self.evicted_until.map_or(t, |u| u.max(t)));
                evicted = true;
            }
        }
        self.markers.push_back((ts, e));
        evicted
    }

    /// Markers in `[from, to]`.
    pub fn within(&self, from: KTime, to: KTime) -> impl Iterator<Item = &(KTime, TimelineEntry)> {
        self.markers
            .iter()
            .filter(move |(t, _)| *t >= from && *t <= to)
    }

    /// Whether markers for `[from, ..]` may have been dropped.
    pub fn unknown_before(&self, from: KTime) -> bool {
        self.evicted_until.is_some_and(|u| u >= from)
    }

    pub fn age_out(&mut self, before: KTime) {
        while self.markers.front().is_some_and(|(t, _)| *t < before) {
            self.markers.pop_front();
        }
    }
}

/// FxHash (rustc's): fast for small integer keys and unseeded, hence the same on every run.
/// Maps that use it are never iterated in hash order where order shows in the output: the
/// correlator sorts keys first.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash map with [`FxHasher`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Pushes onto a bounded history, dropping the oldest.
pub fn push_bounded<T>(v: &mut Vec<T>, item: T, max: usize) {
    if v.len() >= max.max(1) {
        v.remove(0);
    }
    v.push(item);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{LostRecord, StackRecord};

    fn rec(id: u32) -> Record {
        Record::Stack(StackRecord {
            id: crate::event::StackId(id),
            frames: vec![],
        })
    }

    #[test]
    fn reorder_buffer_releases_in_time_order_after_the_window() {
        let mut b = ReorderBuffer::default();
        b.push(KTime(10), 0, rec(0));
        b.push(KTime(30), 1, rec(1));
        b.push(KTime(20), 2, rec(2));
        assert!(b.pop_ready(25, false).is_none());
        b.push(KTime(40), 3, rec(3));
        assert_eq!(b.pop_ready(25, false).map(|x| x.1), Some(0));
        assert!(b.pop_ready(25, false).is_none());
        let rest: Vec<u64> = std::iter::from_fn(|| b.pop_ready(25, true).map(|x| x.1)).collect();
        assert_eq!(rest, vec![2, 1, 3]);
    }

    #[test]
    fn lost_log_is_bounded_and_remembers_what_it_dropped() {
        let mut l = LostLog::default();
        let e = crate::correlate::describe::lost_entry(&LostRecord {
            after: KTime(1),
            ringbuf_full: 1,
            missed: 0,
            undecodable: 0,
        });
        for t in 0..5 {
            l.push(KTime(t), e.clone(), 3);
        }
        assert_eq!(l.markers.len(), 3);
        assert!(l.unknown_before(KTime(1)));
        assert!(!l.unknown_before(KTime(2)));
        assert_eq!(l.within(KTime(3), KTime(9)).count(), 2);
    }
}
