//! Wording: renders events as timeline entries, and verdicts as explanations and fix lists.
//! Nothing here decides anything; `detect` does.

use std::fmt::Write as _;

use crate::event::{kind_name, CallerPath, Descriptor, Event, HpWhat, LostRecord, Payload, Sid};

use super::detect::FixHint;
use super::incident::{
    Fix, FixStatus, IncidentDevice, IncidentKind, Outcome, RemovalKind, TimelineEntry,
};

use crate::knowledge::fixes::UpstreamFix;

fn fix(f: UpstreamFix, status: FixStatus) -> Fix {
    Fix {
        commit: f.commit.to_string(),
        subject: f.subject.to_string(),
        status,
        landed: f.landed.to_string(),
    }
}

/// Whether the recording kernel's code carries `commit` (None: not known).
fn kernel_has(f: &Facts<'_>, commit: &str) -> Option<bool> {
    f.kernel
        .iter()
        .find(|k| k.commit == commit)
        .and_then(|k| match k.status.as_str() {
            "present" => Some(true),
            "absent" => Some(false),
            _ => None,
        })
}

/// What a device-TLB invalidation that times out then does on this kernel, from its code.
fn timeout_consequence(f: &Facts<'_>) -> &'static str {
    use crate::knowledge::fixes::{ite_response, IteResponse, HARDLOCKUP_RETRY, IMPROVE_ITE};
    match ite_response(
        kernel_has(f, IMPROVE_ITE.commit),
        kernel_has(f, HARDLOCKUP_RETRY.commit),
    ) {
        IteResponse::AbortWalkSpins => {
            "this kernel's ITE abort walk can then spin for ever with interrupts off (its code \
             has 80a9b50c0b9e but not fe89277c9ceb)"
        }
        IteResponse::GivesUp => {
            "this kernel gives up with -ETIMEDOUT (its code has 80a9b50c0b9e; it still retries \
             for ever when the hardware reports SID 0)"
        }
        IteResponse::GivesUpUnlessWalkSpins => {
            "this kernel gives up with -ETIMEDOUT unless its ITE abort walk spins first (its code \
             has 80a9b50c0b9e; fe89277c9ceb could not be told)"
        }
        IteResponse::RetriesForever => "the retry loop hangs the CPU (its code lacks 80a9b50c0b9e)",
        IteResponse::Unknown => "the retry loop hangs the CPU unless the kernel has 80a9b50c0b9e",
    }
}

/// What the describer needs to know about an incident.
pub struct Facts<'a> {
    pub kind: IncidentKind,
    pub device: &'a IncidentDevice,
    pub outcome: Option<&'a Outcome>,
    pub caller: CallerPath,
    pub hint: FixHint,
    pub removal: Option<RemovalKind>,
    pub submissions: usize,
    /// ITE: reports merged; SID 0 reported; the device was inferred from what was in flight.
    pub reports: u32,
    pub sid_zero: bool,
    pub inferred: bool,
    /// Every SID an inferred device may be, most likely first.
    pub candidates: &'a [Sid],
    /// The fixes as the recording kernel's own code showed them (empty: unknown).
    pub kernel: &'a [crate::trace::KernelFixStatus],
    pub attributed_to: Option<IncidentKind>,
    pub lockup_seen: bool,
}

/// Upstream fixes addressing the incident, with whether the events show them missing.
pub fn fixes_for(f: &Facts<'_>) -> Vec<Fix> {
    use crate::knowledge::fixes::*;
    use FixStatus::*;
    let aborted = matches!(f.outcome, Some(Outcome::Aborted { .. }));
    let ite_fix = if aborted { Present } else { Related };
    let mut v = Vec::new();
    match f.kind {
        IncidentKind::InflightAcrossDisconnect => {
            let status = match f.outcome {
                Some(Outcome::Aborted { .. }) => Present,
                Some(Outcome::CompletedLate { .. } | Outcome::NotReturned { .. }) => Missing,
                _ => Related,
            };
            v.push(fix(IMPROVE_ITE, status));
            v.push(fix(HARDLOCKUP_RETRY, Related));
        }
        IncidentKind::FlushToGoneDevice => {
            match f.hint {
                FixHint::PasidTeardown => {
                    v.push(fix(DONT_ISSUE_DISCONNECTED, Missing));
                    v.push(fix(FLUSH_ONLY_ACCESSIBLE_SM, Missing));
                }
                FixHint::ContextFlushScalable => v.push(fix(FLUSH_ONLY_ACCESSIBLE_SM, Missing)),
                FixHint::ContextFlushLegacy => v.push(fix(SKIP_INACCESSIBLE_LEGACY, Missing)),
                FixHint::OldRemoval | FixHint::None => {
                    v.push(fix(DONT_ISSUE_DISCONNECTED, Missing));
                    v.push(fix(SKIP_INACCESSIBLE_LEGACY, Missing));
                }
                FixHint::DriverTeardown => {
                    // Those checks guard the IOMMU's release paths, not a driver's unmap.
                    v.push(fix(DONT_ISSUE_DISCONNECTED, Related));
                    v.push(fix(SKIP_INACCESSIBLE_LEGACY, Related));
                    v.push(fix(FLUSH_ONLY_ACCESSIBLE_SM, Related));
                }
            }
            v.push(fix(IMPROVE_ITE, ite_fix));
        }
        IncidentKind::SafeRemovalFlushTimeout => {
            match f.hint {
                FixHint::ContextFlushScalable | FixHint::PasidTeardown => {
                    v.push(fix(FLUSH_ONLY_ACCESSIBLE_SM, Related))
                }
                _ => v.push(fix(SKIP_INACCESSIBLE_LEGACY, Related)),
            }
            v.push(fix(IMPROVE_ITE, ite_fix));
            v.push(fix(HARDLOCKUP_RETRY, Related));
        }
        IncidentKind::HungInvalidation => {
            v.push(fix(HARDLOCKUP_RETRY, Related));
            v.push(fix(IMPROVE_ITE, Related));
        }
        IncidentKind::IteReported => {
            let status = if f.sid_zero { Related } else { ite_fix };
            v.push(fix(IMPROVE_ITE, status));
            v.push(fix(HARDLOCKUP_RETRY, Related));
        }
    }
    // The kernel's own code outranks what a path suggests: a fix its code carries is never
    // called missing (it was there and did not prevent this).
    for x in &mut v {
        if x.status == Missing && kernel_has(f, &x.commit) == Some(true) {
            x.status = Present;
        }
    }
    v
}

fn device_words(d: &IncidentDevice) -> String {
    let mut s = match (d.bdf, d.sid) {
        (Some(b), _) => format!("device {b}"),
        (None, Some(sid)) => format!("SID {sid}"),
        (None, None) => "an unknown device".to_string(),
    };
    if let Some(drv) = &d.driver {
        let _ = write!(s, " ({drv})");
    }
    if let Some(slot) = &d.slot {
        let _ = write!(s, " in slot {slot}");
    }
    if let Some(pf) = d.via_pf {
        let _ = write!(s, ", a VF whose PF (SID {pf}) went away");
    }
    s
}

fn ms(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} us", ns as f64 / 1e3)
    }
}

/// What became of the worst member; `many` when the incident holds several submissions.
fn outcome_words(o: Option<&Outcome>, many: bool) -> String {
    let it = if many { "the worst invalidation" } else { "it" };
    match o {
        None => "nothing was in flight to attribute it to".into(),
        Some(Outcome::Completed { latency_ns }) if many => {
            format!("they completed, the slowest in {}", ms(*latency_ns))
        }
        Some(Outcome::Completed { latency_ns }) => format!("it completed in {}", ms(*latency_ns)),
        Some(Outcome::CompletedLate { latency_ns }) => format!(
            "{it} completed only after {} (time-out, then retry)",
            ms(*latency_ns)
        ),
        Some(Outcome::Aborted { latency_ns, .. }) => format!(
            "{it} was aborted with -ETIMEDOUT after {} (the kernel has 80a9b50c0b9e)",
            ms(*latency_ns)
        ),
        Some(Outcome::Failed { latency_ns, ret }) => {
            format!("{it} failed with {ret} after {}", ms(*latency_ns))
        }
        Some(Outcome::InFlight { outstanding_ns }) => {
            format!("{it} is still in flight after {}", ms(*outstanding_ns))
        }
        Some(Outcome::NotReturned { outstanding_ns }) => format!(
            "{it} had not returned after {} when the stream ended",
            ms(*outstanding_ns)
        ),
        Some(Outcome::ReturnLost) if many => "the return of one invalidation was not seen".into(),
        Some(Outcome::ReturnLost) => "its return was not seen".into(),
    }
}

/// Plain explanation of an incident.
pub fn explain(f: &Facts<'_>) -> String {
    let dev = device_words(f.device);
    let many = f.submissions > 1;
    let out = outcome_words(f.outcome, many);
    let (was, them) = if many {
        ("were", "them")
    } else {
        ("was", "it")
    };
    let n = if many {
        format!("{} device-TLB invalidations", f.submissions)
    } else {
        "a device-TLB invalidation".to_string()
    };
    let mut s = match f.kind {
        IncidentKind::InflightAcrossDisconnect => format!(
            "W1 (case 1): {n} for {dev}, issued from the {} path, {was} in flight when the \
             device was disconnected by hot-plug removal; {out}. The device stays findable by BDF until \
             its driver is unbound and BUS_NOTIFY_REMOVED_DEVICE runs, so the ITE handler must \
             notice it is gone (80a9b50c0b9e, 6.9+) or the CPU retries with IRQs off.",
            caller_words(f.caller)
        ),
        IncidentKind::FlushToGoneDevice => format!(
            "W2 (case 2): {n} for {dev} {was} issued from {} after the device was marked \
             disconnected or released; {out}. The kernel should have skipped {them}.{} {}",
            if f.hint == FixHint::DriverTeardown {
                // The stack is the removal's, but the flush is the driver's own: say which.
                "the driver's own teardown (its remove() unmapping DMA memory inside \
                 pci_stop_bus_device, after the disconnect walk)"
                    .to_string()
            } else {
                format!("the {} path", caller_words(f.caller))
            },
            if f.hint == FixHint::DriverTeardown {
                " The disconnect checks of 4fc82cd907ac, 10e60d878139 and 42662d19839f guard \
                 only the IOMMU's release paths, so no fix listed here skips this flush."
            } else {
                ""
            },
            if matches!(f.outcome, Some(Outcome::Completed { .. })) {
                if many {
                    format!(
                        "They completed here (a device or QEMU still answered), but on real \
                         hardware with the device gone they time out and {}: latent.",
                        timeout_consequence(f)
                    )
                } else {
                    format!(
                        "It completed here (a device or QEMU still answered), but on real \
                         hardware with the device gone it times out and {}: latent.",
                        timeout_consequence(f)
                    )
                }
            } else {
                "With the device gone nothing answers the ATS request.".to_string()
            }
        ),
        IncidentKind::SafeRemovalFlushTimeout => format!(
            "W3 (case 3): {n} for {dev} {was} issued during a safe removal of its slot and \
             {out}. The link went down or the device left while the removal's teardown flush \
             was waiting for the device's answer."
        ),
        IncidentKind::HungInvalidation => format!(
            "A qi_submit_sync call from the {} path ({dev}): {out}. The CPU spins with IRQs \
             off while it waits; past ~10 s the hard-lockup watchdog fires.",
            caller_words(f.caller)
        ),
        IncidentKind::IteReported => {
            let others = candidate_words(f.candidates);
            let who = if f.sid_zero && f.inferred {
                format!(
                    "The hardware gave SID 0 (no SID); inferred, not known: {dev}, the oldest \
                     device-TLB invalidation in flight{others}"
                )
            } else if f.inferred {
                format!(
                    "The kernel's ITE report was not seen, so which device timed out is \
                     inferred, not known: {dev}, from the submission that returned \
                     -ETIMEDOUT{others}"
                )
            } else if f.sid_zero {
                "The hardware gave SID 0 (no SID) and nothing was in flight to attribute it to"
                    .to_string()
            } else {
                format!("It names {dev}")
            };
            let present = match f.device.present {
                Some(true) => "the device was present",
                Some(false) => "the device was already gone",
                None => "the device is unknown to the trace",
            };
            format!(
                "The kernel reported an invalidation time-out ({} report{}). {who}; {present}; {out}.{}",
                f.reports,
                if f.reports == 1 { "" } else { "s" },
                if f.sid_zero {
                    " With SID 0, even 6.9+ kernels skip the presence check of 80a9b50c0b9e and \
                     retry."
                } else {
                    ""
                }
            )
        }
    };
    if let Some(k) = f.attributed_to {
        let _ = write!(s, " Explained by the {k} incident (see attribution).");
    }
    if let Some(r) = f.removal {
        let _ = write!(
            s,
            " Removal: {}.",
            match r {
                RemovalKind::Safe => "safe (attention button / sysfs)",
                RemovalKind::Surprise => "surprise",
            }
        );
    }
    if f.lockup_seen {
        s.push_str(" The kernel logged a hard LOCKUP.");
    }
    s
}

/// ` (candidates: SID 200, SID 100)` when there is more than one.
fn candidate_words(c: &[Sid]) -> String {
    if c.len() < 2 {
        return String::new();
    }
    let v: Vec<String> = c.iter().map(|s| format!("SID {s}")).collect();
    format!(" (candidates: {})", v.join(", "))
}

fn caller_words(c: CallerPath) -> &'static str {
    match c {
        CallerPath::DriverUnmap => "device driver's DMA unmap",
        CallerPath::FlushQueue => "flush-queue timer",
        CallerPath::Removal => "device removal (iommu_bus_notifier / iommu_release_device)",
        CallerPath::DriverTeardown => {
            "driver's own teardown (its remove() unmapping DMA memory during the removal)"
        }
        CallerPath::DomainChange => "domain attach/detach",
        CallerPath::Other => "kernel (other)",
        CallerPath::Unknown => "unknown (no stack)",
    }
}

/// Decoded fields of an event for the timeline.
pub fn detail(e: &Event) -> String {
    let mut s = String::new();
    match &e.payload {
        Payload::Submit(sub) => {
            let _ = write!(s, "iommu={} count={}", sub.iommu.name, sub.count);
            for (i, d) in sub.descriptors().enumerate() {
                match d {
                    Descriptor::DevTlb {
                        sid,
                        addr,
                        size_bit,
                        ..
                    } => {
                        let _ = write!(
                            s,
                            " desc[{i}]=dev-tlb sid={sid} addr={addr:#x} s={}",
                            size_bit as u8
                        );
                    }
                    Descriptor::PasidDevTlb { sid, pasid, .. } => {
                        let _ = write!(s, " desc[{i}]=pasid-dev-tlb sid={sid} pasid={pasid}");
                    }
                    Descriptor::Iotlb { did } => {
                        let _ = write!(s, " desc[{i}]=iotlb did={did}");
                    }
                    Descriptor::PasidIotlb { did, pasid } => {
                        let _ = write!(s, " desc[{i}]=pasid-iotlb did={did} pasid={pasid}");
                    }
                    Descriptor::ContextCache { did, sid } => {
                        let _ = write!(s, " desc[{i}]=context did={did} sid={sid}");
                    }
                    Descriptor::Wait => {
                        let _ = write!(s, " desc[{i}]=wait");
                    }
                    Descriptor::Other { code } => {
                        let _ = write!(s, " desc[{i}]=type{code:#x}");
                    }
                }
            }
            if sub.others.count > 0 {
                let types: Vec<String> =
                    sub.others.type_codes().map(|t| format!("{t:#x}")).collect();
                let _ = write!(s, " +{} other (type {})", sub.others.count, types.join("/"));
            }
            if sub.truncated() {
                let _ = write!(s, " (captured {} of {})", sub.captured(), sub.count);
            }
        }
        Payload::SubmitReturn(r) => {
            let _ = write!(s, "ret={}", r.ret);
            if let Some(start) = r.start {
                let _ = write!(s, " latency={}", ms(e.meta.ts.saturating_sub(start)));
            }
        }
        Payload::DevTlbFlush(f) => {
            let _ = write!(
                s,
                "iommu={} sid={} pfsid={} qdep={} addr={:#x} mask={}",
                f.iommu.name, f.sid, f.pfsid, f.qdep, f.addr, f.mask
            );
            if let Some(p) = f.pasid {
                let _ = write!(s, " pasid={p}");
            }
        }
        Payload::HotplugIst(sl) | Payload::Unconfigure(sl) => {
            match sl.port {
                Some(p) => {
                    let _ = write!(s, "port={p}");
                }
                None => s.push_str("port=?"),
            }
            let _ = write!(s, " bus={:02x}..{:02x}", sl.secondary, sl.subordinate);
            if let Payload::HotplugIst(_) = e.payload {
                let _ = write!(s, " irq={}", sl.irq);
            }
            match sl.presence {
                Some(true) => s.push_str(" presence=1 (safe removal)"),
                Some(false) => s.push_str(" presence=0 (surprise removal)"),
                None => {}
            }
        }
        Payload::HotplugIstReturn(r) => {
            let _ = write!(s, "ret={}", r.ret);
        }
        Payload::DisconnectWalk(w) => {
            match w.segment {
                Some(seg) => {
                    let _ = write!(s, "segment={seg:04x}");
                }
                None => s.push_str("segment=?"),
            }
            let _ = write!(
                s,
                " bus={:02x}..{:02x} (pci_dev_set_disconnected)",
                w.bus, w.bus_end
            );
        }
        Payload::DeviceDisconnected(d) | Payload::DeviceRemove(d) | Payload::IommuRelease(d) => {
            match d.bdf {
                Some(b) => {
                    let _ = write!(s, "bdf={b}");
                }
                None => s.push_str("non-PCI"),
            }
            let _ = write!(s, " id={:04x}:{:04x}", d.vendor, d.device);
        }
        Payload::KernelLog(l) => s.push_str(&l.text),
        Payload::HotplugTrace(h) => {
            let _ = write!(
                s,
                "port={} slot={} event={}",
                h.port_name,
                h.slot,
                h.what.kernel_name()
            );
            if let HpWhat::Unknown(n) = h.what {
                let _ = write!(s, "({n})");
            }
        }
    }
    s
}

/// A timeline entry for a kernel event.
pub fn entry(e: &Event, caller: Option<CallerPath>) -> TimelineEntry {
    TimelineEntry {
        ts: e.meta.ts,
        cpu: e.meta.cpu,
        tid: e.meta.tid,
        task: e.meta.comm.to_string(),
        event: kind_name(e.payload.kind()).to_string(),
        detail: detail(e),
        caller,
    }
}

/// A timeline entry for a lost-events marker.
pub fn lost_entry(l: &LostRecord) -> TimelineEntry {
    TimelineEntry {
        ts: l.after,
        cpu: 0,
        tid: 0,
        task: String::new(),
        event: "lost".into(),
        detail: format!(
            "ringbuf_full={} missed={} undecodable={}",
            l.ringbuf_full, l.missed, l.undecodable
        ),
        caller: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Bdf, Sid};

    fn dev() -> IncidentDevice {
        IncidentDevice {
            bdf: Some(Bdf::new(0, 1, 0, 0)),
            sid: Some(Sid(0x100)),
            driver: Some("virtio-pci".into()),
            ..Default::default()
        }
    }

    fn facts<'a>(kind: IncidentKind, d: &'a IncidentDevice, o: Option<&'a Outcome>) -> Facts<'a> {
        Facts {
            kind,
            device: d,
            outcome: o,
            caller: CallerPath::Removal,
            hint: FixHint::ContextFlushLegacy,
            removal: Some(RemovalKind::Surprise),
            submissions: 2,
            reports: 1,
            sid_zero: false,
            inferred: false,
            candidates: &[],
            kernel: &[],
            attributed_to: None,
            lockup_seen: false,
        }
    }

    #[test]
    fn w2_names_the_missing_fix_for_its_path() {
        let d = dev();
        let o = Outcome::Completed { latency_ns: 3000 };
        let f = facts(IncidentKind::FlushToGoneDevice, &d, Some(&o));
        let fx = fixes_for(&f);
        assert_eq!(fx[0].commit, "42662d19839f");
        assert_eq!(fx[0].status, FixStatus::Missing);
        let text = explain(&f);
        assert!(text.contains("latent"), "{text}");
        assert!(text.contains("0000:01:00.0"), "{text}");
    }

    #[test]
    fn w1_aborted_shows_the_ite_fix_present() {
        let d = dev();
        let o = Outcome::Aborted {
            latency_ns: 2_000_000,
            ret: -110,
        };
        let f = facts(IncidentKind::InflightAcrossDisconnect, &d, Some(&o));
        let fx = fixes_for(&f);
        assert_eq!(fx[0].commit, "80a9b50c0b9e");
        assert_eq!(fx[0].status, FixStatus::Present);
    }

    #[test]
    fn ite_sid_zero_says_so() {
        let d = dev();
        let mut f = facts(IncidentKind::IteReported, &d, None);
        f.sid_zero = true;
        f.inferred = true;
        assert!(explain(&f).contains("SID 0"));
    }
}
