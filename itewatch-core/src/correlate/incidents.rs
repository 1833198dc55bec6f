//! Incidents: opening and joining them, their members, and emitting revisions (coalesced,
//! never going down in severity).

use super::*;

impl Correlator {
    /// Adds `inf` to the aggregate incident of `kind` for `key`, opening it if needed.
    pub(super) fn join(
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

    pub(super) fn insert_open(&mut self, o: OpenIncident) {
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

    pub(super) fn new_incident(
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

    pub(super) fn blank_incident(
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
    pub(super) fn add_member(&mut self, id: &IncidentId, inf: &mut Inflight) {
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
    pub(super) fn relink(&mut self, ids: &[IncidentId]) {
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

    pub(super) fn flush_pending(&mut self) {
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
    pub(super) fn release_held(&mut self) {
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
    pub(super) fn close(&mut self, id: &IncidentId) {
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

    pub(super) fn render(&self, o: &OpenIncident, revision: u32, closed: bool) -> Incident {
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
            kernel: &self.cfg.kernel_fixes,
            attributed_to: o.attribution.as_ref().map(|a| a.kind),
            lockup_seen: o.lockup_seen,
        };
        Incident {
            id: o.id.clone(),
            revision,
            kind: o.kind,
            severity,
            window,
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
