//! Kernel log lines: ITE reports and their detail, pciehp lines, lockups; and the ITE
//! incidents they and -ETIMEDOUT returns open.

use super::*;

impl Correlator {
    pub(super) fn on_log(&mut self, seq: u64, e: &Event, l: &LogLine) {
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
            LogFact::Pciehp { port, slot, what } => self.slot_fact(seq, e, port, &slot, what),
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

    /// What a hot-plug port's driver saw (pciehp's `Slot(%s): ...` line, or the
    /// `pci:pci_hp_event` tracepoint that 7.x fires next to it): kept in the slot's history;
    /// a link down or a card gone marks the slot's surprise time.
    pub(super) fn slot_fact(
        &mut self,
        seq: u64,
        e: &Event,
        port: Option<Bdf>,
        slot: &str,
        what: SlotWhat,
    ) {
        let ts = e.meta.ts;
        let max = self.cfg.max_history;
        let entry = describe::entry(e, None);
        let down = matches!(what, SlotWhat::LinkDown | SlotWhat::CardNotPresent);
        for s in self.slots.values_mut() {
            let same = match (s.port, port) {
                (Some(a), Some(b)) => {
                    a.sid() == b.sid()
                        && (a.segment == b.segment || a.segment.is_none() || b.segment.is_none())
                }
                _ => false,
            };
            if same {
                s.name = Some(slot.to_string());
                if down {
                    s.link_down = Some(ts);
                }
                push_bounded(&mut s.history, (ts, seq, entry.clone()), max);
            }
        }
    }

    /// The `pci:pci_hp_event` tracepoint: the same fact as pciehp's log line, from a field
    /// rather than from text (no log level, console or rate limit between it and itewatch).
    pub(super) fn on_hp_trace(&mut self, seq: u64, e: &Event, h: &HpTrace) {
        let what = match h.what {
            HpWhat::LinkUp => SlotWhat::LinkUp,
            HpWhat::LinkDown => SlotWhat::LinkDown,
            HpWhat::CardPresent => SlotWhat::CardPresent,
            HpWhat::CardNotPresent => SlotWhat::CardNotPresent,
            HpWhat::Unknown(_) => SlotWhat::Other,
        };
        self.slot_fact(seq, e, h.port, &h.slot, what);
    }

    /// A detail line of the last ITE report (descriptor dump, "cleared", fault status).
    pub(super) fn ite_detail(&mut self, seq: u64, e: &Event) {
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
    pub(super) fn ite_descriptor(&mut self, sid: Sid) {
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
    pub(super) fn device_view(&self, k: DevKey, ts: KTime) -> IncidentDevice {
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
    pub(super) fn ite_return(&mut self, ev: &Event, inf: &mut Inflight) {
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
    pub(super) fn ite_report(&mut self, seq: u64, e: &Event, sid: Option<Sid>) {
        let ts = e.meta.ts;
        let mut members: Vec<PairKey>;
        let key: Option<DevKey>;
        let mut candidates = Vec::new();
        match sid {
            Some(sid) => {
                // The submissions carrying the SID, and every other one stalled behind the
                // time-out on the same IOMMU queue (fetching stops until ITE is cleared).
                let seg = self.ite_segment(sid);
                // Only the carriers on that segment's queues: a device at the same bus:devfn
                // on another segment is another device.
                let on_seg = |i: &Inflight| seg == SEG_UNKNOWN || i.segment == seg;
                let queues: BTreeSet<u64> = self
                    .inflight
                    .values()
                    .filter(|i| i.sids.contains(&sid) && on_seg(i))
                    .map(|i| i.submit.iommu.ptr)
                    .collect();
                members = self.inflight.keys_where(|i| {
                    (i.sids.contains(&sid) && on_seg(i)) || queues.contains(&i.submit.iommu.ptr)
                });
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

    /// The segment of an ITE report's SID (the log line has none): that of the in-flight
    /// submissions carrying it when they agree; when they do not (the same bus:devfn on two
    /// segments), the one whose device is gone — a present device answers, a gone one times
    /// out; else the only known device with that SID, else the trace's only segment, else
    /// unknown (never 0).
    pub(super) fn ite_segment(&self, sid: Sid) -> u16 {
        let carriers: BTreeSet<u16> = self
            .inflight
            .values()
            .filter(|i| i.sids.contains(&sid))
            .map(|i| i.segment)
            .collect();
        if carriers.len() == 1 {
            return carriers.into_iter().next().unwrap_or(SEG_UNKNOWN);
        }
        let candidates: BTreeSet<u16> = if carriers.is_empty() {
            self.devices
                .keys()
                .filter(|k| k.1 == sid)
                .map(|k| k.0)
                .collect()
        } else {
            carriers
        };
        let gone: Vec<u16> = candidates
            .iter()
            .copied()
            .filter(|seg| self.devices.get(&(*seg, sid)).is_some_and(|d| d.is_gone()))
            .collect();
        if gone.len() == 1 {
            return gone[0];
        }
        if candidates.len() == 1 {
            return candidates.into_iter().next().unwrap_or(SEG_UNKNOWN);
        }
        if candidates.is_empty() {
            return self.resolve_segment(None, None, None);
        }
        SEG_UNKNOWN
    }

    /// The kernel named `sid` in an ITE report: an open ITE incident that had inferred its
    /// device among candidates that include `sid` now knows it.
    pub(super) fn confirm_inferred_ite(&mut self, ts: KTime, seg: u16, sid: Sid) {
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
    pub(super) fn ite_open(
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
}
