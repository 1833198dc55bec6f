//! Submissions: a submit opens one (its caller from the stack, its devices checked against
//! their lifecycle), a return or its absence ends it (hung, W3, a -ETIMEDOUT's ITE).

use super::*;

impl Correlator {
    pub(super) fn on_flush(&mut self, e: &Event, _f: &Flush) {
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

    pub(super) fn stack_info(&self, id: Option<StackId>) -> Option<StackInfo> {
        id.and_then(|id| self.stacks.get(&id).copied())
    }

    pub(super) fn ist_thread(&self, tid: u32) -> Option<u64> {
        self.slots
            .values()
            .find(|s| s.ist.is_some_and(|(t, _)| t == tid))
            .map(|s| s.ctrl)
    }

    pub(super) fn on_submit(&mut self, seq: u64, e: &Event, s: &Submit) {
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
    pub(super) fn gone_pf(
        &self,
        s: &Submit,
        segment: u16,
        sid: Sid,
        tid: u32,
        ts: KTime,
    ) -> Option<Sid> {
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

    pub(super) fn safe_removal_covering(&self, segment: u16, sid: Sid, ts: KTime) -> Option<u64> {
        self.slots
            .values()
            .find(|s| {
                s.removal
                    .is_some_and(|r| r.active && r.kind == Some(RemovalKind::Safe) && r.at <= ts)
                    && s.covers(segment, sid)
            })
            .map(|s| s.ctrl)
    }

    pub(super) fn on_return(&mut self, e: &Event, r: &SubmitReturn) {
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
    pub(super) fn end_submission(&mut self, mut inf: Box<Inflight>, end: End<'_>) {
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

    pub(super) fn recycle(&mut self, inf: Box<Inflight>) {
        if self.spare.len() < 64 {
            self.spare.push(inf);
        }
    }

    pub(super) fn open_hung(&mut self, inf: &mut Inflight) {
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

    pub(super) fn check_w3(&mut self, inf: &mut Inflight, outcome: &Outcome) {
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
}
