//! Devices and slots: hot-plug events, the disconnect walk, device lifecycle events (W1
//! checks), and the lookups that key a device by (segment, SID).

use super::*;

impl Correlator {
    pub(super) fn on_ist(&mut self, seq: u64, e: &Event, s: &Slot) {
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

    pub(super) fn on_unconfigure(&mut self, seq: u64, e: &Event, s: &Slot) {
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

    pub(super) fn on_ist_return(&mut self, seq: u64, e: &Event, r: &IstReturn) {
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

    pub(super) fn on_walk(&mut self, seq: u64, e: &Event, w: &Walk) {
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

    pub(super) fn on_device_event(&mut self, seq: u64, e: &Event, d: &DeviceRef, what: DevEv) {
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
    pub(super) fn release_progress(&mut self, tid: u32, except: Option<DevKey>) {
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

    pub(super) fn append_to_device_incidents(
        &mut self,
        key: DevKey,
        ts: KTime,
        seq: u64,
        e: &TimelineEntry,
    ) {
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
    pub(super) fn check_w1(&mut self, key: DevKey, at: KTime) {
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

    /// The device entry for `key`, created if needed (applying walks that already covered
    /// it). `None` only when the table is full of devices that cannot be evicted.
    pub(super) fn learn_segment(&mut self, seg: u16, iommu: Option<&str>) {
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
    pub(super) fn resolve_segment(
        &self,
        seg: Option<u16>,
        iommu: Option<&str>,
        bus: Option<u8>,
    ) -> u16 {
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

    pub(super) fn device_entry(
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

    pub(super) fn evict_device(&mut self) -> bool {
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

    pub(super) fn slot_entry(&mut self, s: &Slot) -> Option<&mut SlotState> {
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

    pub(super) fn slot_for(&self, key: DevKey) -> Option<&SlotState> {
        self.slots.values().find(|s| s.covers(key.0, key.1))
    }

    pub(super) fn slot_name_for(&self, key: DevKey) -> Option<String> {
        self.slot_for(key).and_then(|s| s.name.clone())
    }
}
