//! `itewatch preflight BDF | --slot N [--json]`: before a planned removal, does pulling this
//! device now risk the device-TLB invalidation race, and what to do first.
//!
//! Two halves, as in `kcode`: [`gather`] reads the host (sysfs: the functions in the slot,
//! their ATS state and drivers, the port's Slot Capabilities; VT-d units; the kernel's fixes
//! from its code) into [`Facts`]; [`decide`] is pure — facts in, a [`Decision`] out (verdict,
//! reasons, recommended sequence, what not to do), unit-tested below. The exit status is the
//! verdict's: 0 go, 1 risk, 2 cannot tell (also for any error: a preflight that cannot look
//! must not read as an all-clear).
//!
//! Device-TLB invalidations to the card's SIDs are measured only when asked (`--watch SECONDS`,
//! root): the probes attach for that bounded window and [`count_window`] (pure) counts the
//! submissions carrying a device-TLB descriptor for one of the card's SIDs, and those still
//! without a return at the window's end. Otherwise the output says they were not measured
//! (`invalidations.measured: false`).
//!
//! Whether the IOMMU already timed out an invalidation in this boot comes from the kernel's
//! log (`/dev/kmsg`, read whole without waiting): its ITE reports, recognised by
//! `analyze::facts` (the one parser of kernel messages), are counted per SID by
//! [`KernelLogScan`] (pure). They change the reasons, not the verdict.
//!
//! JSON (`--json`): the serialized [`Report`], `schema_version` `MAJOR.MINOR` as in doctor;
//! docs/preflight.md documents every field.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::analyze::facts::{self as log_facts, Fact};
use crate::event::{Bdf, KTime, Payload, Record, Sid};
use crate::kcode::{self, CodeFinding, CodeStatus};
use crate::knowledge::fixes;
use crate::sysfs::{AtsState, SlotCaps, Sysfs};

/// Version of the JSON layout. 1.1: `kernel_log`.
pub const SCHEMA_VERSION: &str = "1.1";

/// What to look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A device (`ssss:bb:dd.f` or `bb:dd.f`); its slot's other functions come with it.
    Device(Bdf),
    /// A slot by its name in `/sys/bus/pci/slots`.
    Slot(String),
}

/// One function that leaves with the card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Function {
    pub bdf: Bdf,
    pub driver: Option<String>,
    pub ats: AtsState,
}

/// The slot the card sits in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlotFacts {
    pub name: String,
    /// A hot-plug driver registered it.
    pub hotplug: bool,
    pub port: Option<Bdf>,
    /// The port's Slot Capabilities/Control, or why they could not be read.
    pub caps: Result<SlotCaps, String>,
}

/// Whether device-TLB invalidations to the card were watched, and what the window saw.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Invalidations {
    pub measured: bool,
    /// Why not, when not.
    pub why: Option<String>,
    /// Length of the probe window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    /// `qi_submit_sync` calls in the window carrying a device-TLB descriptor for the card.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submissions: Option<u64>,
    /// Of those, the ones with no return seen by the window's end (in flight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight_at_end: Option<u64>,
    /// `submissions` per second of window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
}

impl Invalidations {
    /// Not measured, and why.
    pub fn not_measured(why: impl Into<String>) -> Invalidations {
        Invalidations {
            measured: false,
            why: Some(why.into()),
            window_ms: None,
            submissions: None,
            in_flight_at_end: None,
            per_second: None,
        }
    }
}

/// Counts, in the records of one probe window of `window_ns`, the submissions carrying a
/// device-TLB descriptor for one of `sids`, and those whose return was not seen (per thread:
/// `qi_submit_sync` does not nest). Pure.
pub fn count_window(records: &[Record], sids: &[Sid], window_ns: u64) -> Invalidations {
    let mut submissions = 0u64;
    // tid -> whether its pending submission is to the card.
    let mut pending: BTreeMap<u32, bool> = BTreeMap::new();
    for r in records {
        let Record::Event(e) = r else { continue };
        match &e.payload {
            Payload::Submit(s) => {
                let to_card = s.dev_tlb_sids().any(|x| sids.contains(&x));
                if to_card {
                    submissions += 1;
                }
                pending.insert(e.meta.tid, to_card);
            }
            Payload::SubmitReturn(_) => {
                pending.remove(&e.meta.tid);
            }
            _ => {}
        }
    }
    let in_flight = pending.values().filter(|&&c| c).count() as u64;
    let secs = window_ns as f64 / 1e9;
    Invalidations {
        measured: true,
        why: None,
        window_ms: Some(window_ns / 1_000_000),
        submissions: Some(submissions),
        in_flight_at_end: Some(in_flight),
        per_second: (secs > 0.0).then(|| (submissions as f64 / secs * 10.0).round() / 10.0),
    }
}

/// One SID the kernel's ITE reports named.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IteSid {
    /// `null`: the report named SID 0 or ffff (the hardware latched none).
    pub sid: Option<Sid>,
    pub reports: u64,
    /// Seconds since boot of the first report.
    pub first_s: f64,
    /// The devices present now whose bus/devfn is that SID (on any segment: the report does
    /// not name one); empty when the device has left.
    pub present: Vec<Bdf>,
}

/// What the kernel's log says about invalidation time-outs (ITE) in this boot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelLog {
    /// The log was read.
    pub read: bool,
    /// Why not; or what the reading may have missed.
    pub why: Option<String>,
    /// Messages the ring buffer had already overwritten when it was read (the first record's
    /// sequence number); 0: the log still begins at the boot. `null` when not read.
    pub overwritten: Option<u64>,
    /// `VT-d detected Invalidation Time-out Error` reports.
    pub ite_reports: u64,
    /// Per SID, in the order first reported.
    pub ite_sids: Vec<IteSid>,
}

impl KernelLog {
    /// Not read, and why.
    pub fn unread(why: impl Into<String>) -> KernelLog {
        KernelLog {
            read: false,
            why: Some(why.into()),
            overwritten: None,
            ite_reports: 0,
            ite_sids: Vec::new(),
        }
    }
}

/// Counts the ITE reports among kernel log messages fed in order. Pure: the messages come
/// from the caller, what one says from `analyze::facts::classify`.
#[derive(Clone, Debug, Default)]
pub struct KernelLogScan {
    first_seq: Option<u64>,
    reports: u64,
    /// (sid, reports, first µs since boot), in order of first report.
    sids: Vec<(Option<Sid>, u64, u64)>,
}

impl KernelLogScan {
    /// One message: its sequence number, its time (µs since boot) and its text.
    pub fn feed(&mut self, seq: u64, ts_us: u64, text: &str) {
        self.first_seq.get_or_insert(seq);
        if let Some(Fact::IteDetected { sid, .. }) = log_facts::classify(text) {
            self.reports += 1;
            match self.sids.iter_mut().find(|(s, _, _)| *s == sid) {
                Some(e) => e.1 += 1,
                None => self.sids.push((sid, 1, ts_us)),
            }
        }
    }

    /// The summary; `present` gives the devices now at a SID, `note` what the reading may
    /// have missed.
    pub fn finish(self, present: impl Fn(Sid) -> Vec<Bdf>, note: Option<String>) -> KernelLog {
        KernelLog {
            read: true,
            why: note,
            overwritten: Some(self.first_seq.unwrap_or(0)),
            ite_reports: self.reports,
            ite_sids: self
                .sids
                .into_iter()
                .map(|(sid, reports, us)| IteSid {
                    sid,
                    reports,
                    first_s: (us / 1000) as f64 / 1000.0,
                    present: sid.map(&present).unwrap_or_default(),
                })
                .collect(),
        }
    }
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    /// How the target was named (`0000:01:00.0`, `slot 1`).
    pub target: String,
    /// `None`: the device is not in a registered slot.
    pub slot: Option<SlotFacts>,
    pub functions: Vec<Function>,
    /// An Intel VT-d unit is active (`None`: unknown).
    pub vtd: Option<bool>,
    /// Commit → status, from the kernel's code (`kcode`).
    pub fixes: BTreeMap<String, CodeStatus>,
    pub invalidations: Invalidations,
    /// ITE reports in this boot's kernel log.
    pub kernel_log: KernelLog,
}

/// The answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Pulling now cannot race: no device-TLB invalidation can target the card.
    Go,
    /// An ATS-enabled function leaves with the card: follow the sequence.
    Risk,
    /// Something needed is unknown (the reasons say what).
    CannotTell,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Go => 0,
            Verdict::Risk => 1,
            Verdict::CannotTell => 2,
        }
    }
}

/// One step, with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    pub action: String,
    /// A command that performs it, where there is one.
    pub command: Option<String>,
    pub why: String,
}

fn step(action: impl Into<String>, command: Option<String>, why: impl Into<String>) -> Step {
    Step {
        action: action.into(),
        command,
        why: why.into(),
    }
}

/// What [`decide`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    /// In order.
    pub sequence: Vec<Step>,
    pub avoid: Vec<Step>,
}

fn status(f: &Facts, fix: &fixes::UpstreamFix) -> CodeStatus {
    f.fixes
        .get(fix.commit)
        .copied()
        .unwrap_or(CodeStatus::Unknown)
}

/// What an ITE for the pulled card does on this kernel, from its code.
fn ite_outcome(f: &Facts) -> String {
    let improve = status(f, &fixes::IMPROVE_ITE);
    let walk = status(f, &fixes::HARDLOCKUP_RETRY);
    let known = |s: CodeStatus| match s {
        CodeStatus::Present => Some(true),
        CodeStatus::Absent => Some(false),
        _ => None,
    };
    match fixes::ite_response(known(improve), known(walk)) {
        fixes::IteResponse::RetriesForever => format!(
            "this kernel lacks {} (read from its code): an invalidation time-out (ITE) for a \
             gone device is retried for ever with interrupts off — a hard lockup",
            fixes::IMPROVE_ITE.commit
        ),
        fixes::IteResponse::AbortWalkSpins => format!(
            "this kernel has {} but not {} (read from its code): its ITE abort walk can loop for \
             ever with interrupts off — a hard lockup",
            fixes::IMPROVE_ITE.commit,
            fixes::HARDLOCKUP_RETRY.commit
        ),
        fixes::IteResponse::GivesUp => format!(
            "this kernel has {} and {} (read from its code): it gives up on an ITE for a gone \
             device (-ETIMEDOUT), unless the hardware reports ITE SID 0; each invalidation to \
             the gone device still waits for the hardware's time-out",
            fixes::IMPROVE_ITE.commit,
            fixes::HARDLOCKUP_RETRY.commit
        ),
        fixes::IteResponse::GivesUpUnlessWalkSpins | fixes::IteResponse::Unknown => format!(
            "whether this kernel survives an ITE is unknown ({} {}, {} {}, read from its code)",
            fixes::IMPROVE_ITE.commit,
            improve.as_str(),
            fixes::HARDLOCKUP_RETRY.commit,
            walk.as_str()
        ),
    }
}

/// What the kernel log says about ITEs in this boot, as a reason.
fn kernel_log_reason(f: &Facts) -> String {
    let log = &f.kernel_log;
    if !log.read {
        return format!(
            "whether an invalidation time-out (ITE) was already reported in this boot is \
             unknown: {}",
            log.why.as_deref().unwrap_or("the kernel log was not read")
        );
    }
    let lost = log.overwritten.unwrap_or(0);
    if log.ite_reports == 0 {
        return if lost == 0 {
            "the kernel log shows no invalidation time-out (ITE) in this boot".into()
        } else {
            format!(
                "no invalidation time-out (ITE) in the kernel log, but its oldest {lost} \
                 message(s) of this boot were overwritten: an earlier ITE report may be gone"
            )
        };
    }
    let sids: Vec<String> = log
        .ite_sids
        .iter()
        .map(|s| {
            let sid = s
                .sid
                .map_or("0/ffff (none latched)".to_string(), |x| x.to_string());
            let now = match (&s.sid, s.present.as_slice()) {
                (None, _) => String::new(),
                (Some(_), []) => "; no device has that SID now".into(),
                (Some(_), p) => format!(
                    "; now {}",
                    p.iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            format!(
                "SID {sid} ×{} (first at {:.1} s{now})",
                s.reports, s.first_s
            )
        })
        .collect();
    let mut r = format!(
        "the kernel log shows {} invalidation time-out (ITE) report(s) in this boot: {}: the \
         IOMMU has already timed out a device-TLB invalidation on this host, so a removal \
         raced before (`dmesg | itewatch analyze` tells which)",
        log.ite_reports,
        sids.join(", ")
    );
    let on_card: Vec<String> = f
        .functions
        .iter()
        .filter(|func| {
            log.ite_sids
                .iter()
                .any(|s| s.present.iter().any(|b| same(*b, func.bdf)))
        })
        .map(|func| func.bdf.to_string())
        .collect();
    if !on_card.is_empty() {
        let _ = write!(
            r,
            "; {} on this card has that SID: it (or the device before it at that address) \
             already failed to answer one",
            on_card.join(", ")
        );
    }
    r
}

/// The orderly sequence for the card in `f`.
fn sequence(f: &Facts) -> Vec<Step> {
    let mut v = vec![step(
        "stop I/O to every function on the card (unmount, stop the workload)",
        None,
        "DMA still running when the card goes makes unmaps — and their device-TLB \
         invalidations — race the removal; virtio-blk even blocks the removal for good with a \
         request in flight (docs/vm-tests.md)",
    )];
    for func in f.functions.iter().filter(|x| x.driver.is_some()) {
        v.push(step(
            format!(
                "unbind {} from its driver {}",
                func.bdf,
                func.driver.as_deref().unwrap_or("")
            ),
            Some(format!(
                "echo {} > /sys/bus/pci/devices/{}/driver/unbind",
                func.bdf, func.bdf
            )),
            "the driver's teardown unmaps its DMA memory, and each unmap invalidates the \
             device's TLB: done while the device answers, they complete; after a pull they go \
             to a gone device (the fixes' presence checks guard only the IOMMU's own release \
             paths, not a driver's unmaps)",
        ));
    }
    // Through the slot's hot-plug driver where one registered it (its `power` file): writing
    // 0 removes the functions whether or not the slot has a power controller (6.18:
    // pciehp_sysfs_disable_slot -> remove_board, which cuts power only `if (POWER_CTRL(ctrl))`).
    match &f.slot {
        Some(s) if s.hotplug => {
            let n = &s.name;
            let caps = s.caps.as_ref().ok();
            let button = if caps.is_some_and(|c| c.attention_button) {
                "; pressing its attention button does the same after 5 s"
            } else {
                ""
            };
            let release = "the hot-plug driver removes the functions and their IOMMU state \
                           while the card still answers, so the release path's device-TLB flush \
                           completes";
            let (action, why) = match caps.map(|c| c.power_controller) {
                Some(true) => (
                    format!("power slot {n} off"),
                    format!("{release}, then cuts the slot's power{button}"),
                ),
                Some(false) => (
                    format!(
                        "release slot {n} through its hot-plug driver (no power controller: the \
                         card stays powered)"
                    ),
                    format!(
                        "{release}; the slot has no power controller, so the card keeps power \
                         until it is pulled{button}"
                    ),
                ),
                None => (
                    format!("release slot {n} through its hot-plug driver"),
                    format!(
                        "{release} (whether the slot also cuts power is unknown: its \
                         capabilities could not be read)"
                    ),
                ),
            };
            v.push(step(
                action,
                Some(format!("echo 0 > /sys/bus/pci/slots/{n}/power")),
                why,
            ));
        }
        _ => {
            for func in &f.functions {
                v.push(step(
                    format!("remove {} from the kernel", func.bdf),
                    Some(format!("echo 1 > /sys/bus/pci/devices/{}/remove", func.bdf)),
                    "the kernel releases the device while it still answers (no hot-plug driver \
                     registered a slot for it to do so through the slot)",
                ));
            }
        }
    }
    v.push(step(
        "check that every function is gone, then pull the card",
        Some(
            f.functions
                .iter()
                .map(|x| format!("test ! -e /sys/bus/pci/devices/{}", x.bdf))
                .collect::<Vec<_>>()
                .join(" && "),
        )
        .filter(|c| !c.is_empty()),
        "nothing the kernel still holds can send it an invalidation once it has left sysfs",
    ));
    v
}

/// The decision. Pure.
pub fn decide(f: &Facts) -> Decision {
    let mut reasons = Vec::new();
    let inv = &f.invalidations;
    if !inv.measured {
        reasons.push(format!(
            "device-TLB invalidations to the card were not measured ({})",
            inv.why.as_deref().unwrap_or("no probe window")
        ));
    } else {
        let (n, inflight, ms) = (
            inv.submissions.unwrap_or(0),
            inv.in_flight_at_end.unwrap_or(0),
            inv.window_ms.unwrap_or(0),
        );
        reasons.push(if n == 0 {
            format!("no device-TLB invalidation went to the card in a {ms} ms probe window (idle)")
        } else {
            format!(
                "{n} submission(s) with a device-TLB invalidation to the card in a {ms} ms probe \
                 window ({}/s), {inflight} in flight at its end: DMA is running — stop it first",
                inv.per_second.unwrap_or(0.0)
            )
        });
    }
    reasons.push(kernel_log_reason(f));
    let decision = |verdict, mut reasons: Vec<String>, r: &str| {
        reasons.insert(0, r.to_string());
        Decision {
            verdict,
            reasons,
            sequence: if verdict == Verdict::Go && f.functions.is_empty() {
                Vec::new()
            } else {
                sequence(f)
            },
            avoid: avoid(f, verdict),
        }
    };
    if f.functions.is_empty() {
        return decision(
            Verdict::Go,
            reasons,
            &format!(
                "{}: no device present, nothing for an invalidation to reach",
                f.target
            ),
        );
    }
    let unknown: Vec<String> = f
        .functions
        .iter()
        .filter_map(|x| match &x.ats {
            AtsState::Unknown(why) => Some(format!("{}: {why}", x.bdf)),
            _ => None,
        })
        .collect();
    let enabled: Vec<String> = f
        .functions
        .iter()
        .filter(|x| x.ats == AtsState::Enabled)
        .map(|x| x.bdf.to_string())
        .collect();
    if f.vtd == Some(false) {
        return decision(
            Verdict::Go,
            reasons,
            "no Intel VT-d unit is active: the kernel sends no device-TLB invalidations",
        );
    }
    if !unknown.is_empty() {
        reasons.push(format!("ATS state unknown: {}", unknown.join("; ")));
        return decision(
            Verdict::CannotTell,
            reasons,
            "whether a function on the card has ATS enabled is unknown (run as root)",
        );
    }
    if enabled.is_empty() {
        return decision(
            Verdict::Go,
            reasons,
            "no function on the card has ATS enabled: the IOMMU sends it no device-TLB \
             invalidations, so a pull cannot race one (the sequence below is still the gentle way)",
        );
    }
    if f.vtd.is_none() {
        reasons.push("whether VT-d is active is unknown (/sys/class/iommu unreadable)".into());
    }
    reasons.push(ite_outcome(f));
    match &f.slot {
        None => reasons.push(
            "the device is not in a registered hot-plug slot: pulling it is not a supported \
             removal at all"
                .into(),
        ),
        Some(s) if !s.hotplug => reasons.push(format!(
            "slot {} has no hot-plug driver: pulling the card is not a supported removal",
            s.name
        )),
        Some(s) => match &s.caps {
            Ok(c) => reasons.push(format!(
                "slot {}: attention button {}, power controller {}, surprise-capable {}",
                s.name,
                yes_no(c.attention_button),
                yes_no(c.power_controller),
                yes_no(c.surprise)
            )),
            Err(why) => reasons.push(format!("slot {} capabilities unknown: {why}", s.name)),
        },
    }
    decision(
        Verdict::Risk,
        reasons,
        &format!(
            "ATS is enabled on {}: pulling the card while it is present sends device-TLB \
             invalidations to a device that can no longer answer them",
            enabled.join(", ")
        ),
    )
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn avoid(f: &Facts, verdict: Verdict) -> Vec<Step> {
    if verdict == Verdict::Go {
        return Vec::new();
    }
    let mut v = vec![step(
        "pulling the card while its functions are still present (a surprise removal)",
        None,
        format!(
            "the driver's and the IOMMU's teardown flushes then go to a gone device and time \
             out; {}",
            ite_outcome(f)
        ),
    )];
    if f.slot
        .as_ref()
        .and_then(|s| s.caps.as_ref().ok())
        .is_some_and(|c| c.surprise)
    {
        v.push(step(
            "relying on the slot being surprise-capable",
            None,
            "pciehp accepts the pull at any time, but that is exactly the path that races",
        ));
    }
    v.push(step(
        "`echo 1 > remove` or re-scanning after the card is out",
        None,
        "the device no longer answers: every flush of its teardown then times out",
    ));
    v
}

/// The whole output.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: String,
    pub target: String,
    pub slot: Option<SlotFacts>,
    pub functions: Vec<Function>,
    pub vtd: Option<bool>,
    /// Fixes read from the kernel's code (`present`/`absent`/`unknown`, with evidence).
    pub kernel_fixes: Vec<CodeFinding>,
    /// Why the kernel's code could not be read, if so.
    pub kernel_code_error: Option<String>,
    pub invalidations: Invalidations,
    /// ITE reports in this boot's kernel log (schema 1.1).
    pub kernel_log: KernelLog,
    pub verdict: Verdict,
    pub exit_code: u8,
    pub reasons: Vec<String>,
    pub sequence: Vec<Step>,
    pub avoid: Vec<Step>,
}

/// Errors of the gathering half (all exit 2).
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("no PCI device {0} in /sys/bus/pci/devices")]
    NoDevice(Bdf),
    #[error("no slot {0:?} in /sys/bus/pci/slots")]
    NoSlot(String),
    #[error(transparent)]
    Sysfs(#[from] crate::sysfs::SysfsError),
}

/// The same function, whether or not the segment was given.
fn same(a: Bdf, b: Bdf) -> bool {
    a.segment_or_zero() == b.segment_or_zero() && a.bus == b.bus && a.devfn == b.devfn
}

/// Reads the host below `root` (`/` live) into [`Facts`], with the kernel-code report.
pub fn gather(root: &Path, target: &Target) -> Result<(Facts, kcode::CodeReport), PreflightError> {
    let sysfs = Sysfs::new(root);
    let devices = sysfs.pci_devices(KTime(0))?;
    let slots = sysfs.slots()?;
    let (label, slot_name) = match target {
        Target::Device(b) => {
            let d = devices
                .iter()
                .find(|d| same(d.info.bdf, *b))
                .ok_or(PreflightError::NoDevice(*b))?;
            (d.info.bdf.to_string(), d.info.slot.clone())
        }
        Target::Slot(n) => {
            if !slots.iter().any(|s| &s.name == n) {
                return Err(PreflightError::NoSlot(n.clone()));
            }
            (format!("slot {n}"), Some(n.clone()))
        }
    };
    let members: Vec<&crate::sysfs::PciDevice> = match (&slot_name, target) {
        // Every device with the slot on its path: a switch card takes the devices in its own
        // downstream slots along.
        (Some(n), _) => devices.iter().filter(|d| d.slots.contains(n)).collect(),
        (None, Target::Device(b)) => devices.iter().filter(|d| same(d.info.bdf, *b)).collect(),
        (None, Target::Slot(_)) => Vec::new(),
    };
    let functions = members
        .iter()
        .map(|d| Function {
            bdf: d.info.bdf,
            driver: d.info.driver.clone(),
            ats: d.ats.clone(),
        })
        .collect();
    let slot = slot_name.and_then(|n| {
        let s = slots.iter().find(|s| s.name == n)?;
        Some(SlotFacts {
            name: s.name.clone(),
            hotplug: s.hotplug,
            port: s.port,
            caps: match s.port {
                Some(p) => sysfs.slot_caps(p),
                None => Err("the slot's port was not found".into()),
            },
        })
    });
    let vtd = match sysfs.iommu_units() {
        Ok(u) => Some(u.iter().any(|u| u.kind == "intel-iommu")),
        Err(_) => None,
    };
    let pci_dev = crate::btf::load(Some(&root.join("sys/kernel/btf/vmlinux")))
        .ok()
        .and_then(|b| kcode::pci_dev_layout(&b));
    let code = kcode::read_live(root, pci_dev, None);
    let fixes = code
        .findings
        .iter()
        .map(|f| (f.commit.clone(), f.status))
        .collect();
    let present = |sid: Sid| {
        devices
            .iter()
            .map(|d| d.info.bdf)
            .filter(|b| b.sid() == sid)
            .collect()
    };
    let kernel_log = read_kernel_log(&root.join("dev/kmsg"), present);
    Ok((
        Facts {
            target: label,
            slot,
            functions,
            vtd,
            fixes,
            invalidations: Invalidations::not_measured(
                "no probe window asked for: `--watch SECONDS` (root) attaches the probes",
            ),
            kernel_log,
        },
        code,
    ))
}

/// Most kernel log records read (a log buffer of 32 MiB holds fewer).
const MAX_LOG_RECORDS: u64 = 1 << 20;

/// The ITE reports in the kernel log at `path` (`/dev/kmsg`).
fn read_kernel_log(path: &Path, present: impl Fn(Sid) -> Vec<Bdf>) -> KernelLog {
    let mut scan = KernelLogScan::default();
    match crate::kmsg::read_all(path, MAX_LOG_RECORDS, |r| scan.feed(r.seq, r.ts_us, r.text)) {
        Ok(stats) => {
            let mut notes = Vec::new();
            if stats.overwritten_while_reading > 0 {
                notes.push("messages were overwritten while it was read".to_string());
            }
            if stats.capped {
                notes.push(format!(
                    "only its first {MAX_LOG_RECORDS} messages were read"
                ));
            }
            if stats.malformed > 0 {
                notes.push(format!("{} record(s) were not understood", stats.malformed));
            }
            scan.finish(present, (!notes.is_empty()).then(|| notes.join("; ")))
        }
        Err(e) => KernelLog::unread(format!(
            "cannot read {}: {e}{}",
            path.display(),
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (needs root: CAP_SYSLOG)"
            } else {
                ""
            }
        )),
    }
}

/// Attaches the probes for `secs` seconds and counts the device-TLB invalidations to the
/// functions in `facts` (I/O; the counting is [`count_window`]).
pub fn watch(facts: &Facts, secs: f64) -> Invalidations {
    let sids: Vec<Sid> = facts.functions.iter().map(|f| f.bdf.sid()).collect();
    let mut reader = match crate::live::LiveReader::attach(&crate::probe::LoadOptions::default()) {
        Ok(r) => r,
        Err(e) => {
            return Invalidations::not_measured(format!(
                "the probes could not attach: {}",
                crate::doctor::error_chain(&e)
            ))
        }
    };
    let missing = reader.missing_required();
    if !missing.is_empty() {
        return Invalidations::not_measured(format!(
            "required probes missing: {}",
            missing.join(", ")
        ));
    }
    let window = std::time::Duration::from_secs_f64(secs.clamp(0.1, 60.0));
    let start = std::time::Instant::now();
    let mut records = Vec::new();
    while start.elapsed() < window {
        reader.drain(4096, &mut records);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    reader.drain(usize::MAX, &mut records);
    count_window(&records, &sids, start.elapsed().as_nanos() as u64)
}

/// Facts + decision → the output.
pub fn report(facts: Facts, code: kcode::CodeReport) -> Report {
    let d = decide(&facts);
    Report {
        schema_version: SCHEMA_VERSION.into(),
        target: facts.target,
        slot: facts.slot,
        functions: facts.functions,
        vtd: facts.vtd,
        kernel_fixes: code.findings,
        kernel_code_error: code.error,
        invalidations: facts.invalidations,
        kernel_log: facts.kernel_log,
        verdict: d.verdict,
        exit_code: d.verdict.exit_code(),
        reasons: d.reasons,
        sequence: d.sequence,
        avoid: d.avoid,
    }
}

impl Report {
    /// The text form.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let v = match self.verdict {
            Verdict::Go => "GO",
            Verdict::Risk => "RISK",
            Verdict::CannotTell => "CANNOT TELL",
        };
        let _ = writeln!(
            s,
            "itewatch preflight {}: {v} (exit {})",
            self.target, self.exit_code
        );
        let _ = writeln!(s, "\nWhy");
        for r in &self.reasons {
            let _ = writeln!(s, "  - {r}");
        }
        if !self.functions.is_empty() {
            let _ = writeln!(s, "\nFunctions on the card");
            for f in &self.functions {
                let ats = match &f.ats {
                    AtsState::Enabled => "ATS enabled".to_string(),
                    AtsState::Disabled => "ATS disabled".to_string(),
                    AtsState::Absent => "no ATS".to_string(),
                    AtsState::Unknown(w) => format!("ATS unknown ({w})"),
                };
                let _ = writeln!(
                    s,
                    "  {}  {ats}, driver {}",
                    f.bdf,
                    f.driver.as_deref().unwrap_or("none")
                );
            }
        }
        let _ = writeln!(s, "\nKernel fixes (read from its code)");
        for f in &self.kernel_fixes {
            let _ = writeln!(s, "  {} {}", f.commit, f.status.as_str());
        }
        if let Some(e) = &self.kernel_code_error {
            let _ = writeln!(s, "  (code not read: {e})");
        }
        if !self.sequence.is_empty() {
            let _ = writeln!(s, "\nRecommended sequence");
            for (i, st) in self.sequence.iter().enumerate() {
                let _ = writeln!(s, "  {}. {}", i + 1, st.action);
                if let Some(c) = &st.command {
                    let _ = writeln!(s, "     $ {c}");
                }
                let _ = writeln!(s, "     why: {}", st.why);
            }
        }
        if !self.avoid.is_empty() {
            let _ = writeln!(s, "\nDo not");
            for st in &self.avoid {
                let _ = writeln!(s, "  - {}: {}", st.action, st.why);
            }
        }
        s
    }
}

/// `itewatch preflight`: prints the report, returns the exit status (2 on any error, with the
/// error on stderr). `watch_s > 0` attaches the probes for that long first.
pub fn run(target: &Target, json: bool, watch_s: f64, out: &mut impl std::io::Write) -> u8 {
    match gather(Path::new("/"), target) {
        Ok((mut facts, code)) => {
            if watch_s > 0.0 && !facts.functions.is_empty() {
                facts.invalidations = watch(&facts, watch_s);
            }
            let r = report(facts, code);
            let written = if json {
                serde_json::to_writer_pretty(&mut *out, &r)
                    .map_err(std::io::Error::other)
                    .and_then(|()| writeln!(out))
            } else {
                out.write_all(r.render_text().as_bytes())
            };
            match written {
                Ok(()) => r.exit_code,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => r.exit_code,
                Err(e) => {
                    eprintln!("itewatch preflight: {e}");
                    Verdict::CannotTell.exit_code()
                }
            }
        }
        Err(e) => {
            eprintln!(
                "itewatch preflight: {}; cannot tell (exit 2)",
                crate::doctor::error_chain(&e)
            );
            Verdict::CannotTell.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_records::{ret, submit};

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    fn caps(button: bool, power: bool, surprise: bool) -> SlotCaps {
        let mut cap = 1 << 6;
        if button {
            cap |= 1;
        }
        if power {
            cap |= 2;
        }
        if surprise {
            cap |= 1 << 5;
        }
        SlotCaps::decode(cap, 0x01f1)
    }

    fn fixes(improve: CodeStatus, walk: CodeStatus) -> BTreeMap<String, CodeStatus> {
        [
            (fixes::IMPROVE_ITE.commit.to_string(), improve),
            (fixes::HARDLOCKUP_RETRY.commit.to_string(), walk),
        ]
        .into_iter()
        .collect()
    }

    /// The VM's surprise disk: virtio-blk with ATS on in slot 2 (button, power controller,
    /// surprise-capable, as QEMU's pcie-root-port reports them), on a kernel like Debian 6.1.
    fn vm_disk() -> Facts {
        Facts {
            target: "0000:02:00.0".into(),
            slot: Some(SlotFacts {
                name: "2".into(),
                hotplug: true,
                port: Some(bdf("0000:00:05.0")),
                caps: Ok(caps(true, true, true)),
            }),
            functions: vec![Function {
                bdf: bdf("0000:02:00.0"),
                driver: Some("virtio-pci".into()),
                ats: AtsState::Enabled,
            }],
            vtd: Some(true),
            fixes: fixes(CodeStatus::Absent, CodeStatus::Present),
            invalidations: Invalidations::not_measured("not attached"),
            kernel_log: KernelLog {
                read: true,
                why: None,
                overwritten: Some(0),
                ite_reports: 0,
                ite_sids: Vec::new(),
            },
        }
    }

    #[test]
    fn ats_on_a_kernel_without_the_ite_fix_is_a_risk_of_lockup() {
        let d = decide(&vm_disk());
        assert_eq!(d.verdict, Verdict::Risk);
        assert_eq!(d.verdict.exit_code(), 1);
        assert!(
            d.reasons[0].contains("ATS is enabled on 0000:02:00.0"),
            "{d:#?}"
        );
        assert!(
            d.reasons.iter().any(|r| r.contains("hard lockup")),
            "{d:#?}"
        );
        // Stop I/O, unbind, power the slot off, check: in that order.
        let actions: Vec<&str> = d.sequence.iter().map(|s| s.action.as_str()).collect();
        assert!(actions[0].starts_with("stop I/O"), "{actions:?}");
        assert!(actions[1].starts_with("unbind 0000:02:00.0"), "{actions:?}");
        assert_eq!(
            d.sequence[2].command.as_deref(),
            Some("echo 0 > /sys/bus/pci/slots/2/power")
        );
        assert!(actions[3].starts_with("check"), "{actions:?}");
        assert!(d
            .avoid
            .iter()
            .any(|s| s.action.contains("surprise-capable")));
    }

    /// An event at 1 ns on thread `tid`.
    fn ev(tid: u32, payload: Payload) -> Record {
        crate::test_records::ev(1, tid, payload)
    }

    #[test]
    fn a_probe_window_counts_the_cards_invalidations_and_those_in_flight() {
        let card = [Sid(0x0200)];
        let recs = vec![
            ev(1, submit(0x0200)),
            ev(1, ret()),
            ev(2, submit(0x0100)), // another device's
            ev(2, ret()),
            ev(3, submit(0x0200)), // no return by the end: in flight
            ev(4, ret()),          // a return whose entry came before the window
        ];
        let w = count_window(&recs, &card, 2_000_000_000);
        assert!(w.measured);
        assert_eq!(w.submissions, Some(2));
        assert_eq!(w.in_flight_at_end, Some(1));
        assert_eq!(w.window_ms, Some(2000));
        assert_eq!(w.per_second, Some(1.0));
        let mut f = vm_disk();
        f.invalidations = w;
        let d = decide(&f);
        assert!(
            d.reasons.iter().any(|r| r.contains("1 in flight")),
            "{d:#?}"
        );
        f.invalidations = count_window(&[], &card, 2_000_000_000);
        let d = decide(&f);
        assert!(d.reasons.iter().any(|r| r.contains("(idle)")), "{d:#?}");
        assert_eq!(d.verdict, Verdict::Risk);
    }

    #[test]
    fn the_output_says_when_invalidations_were_not_measured() {
        let d = decide(&vm_disk());
        assert!(
            d.reasons.iter().any(|r| r.contains("not measured")),
            "{d:#?}"
        );
    }

    #[test]
    fn the_kernel_fixes_change_the_stated_outcome_not_the_verdict() {
        let mut f = vm_disk();
        f.fixes = fixes(CodeStatus::Present, CodeStatus::Absent);
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Risk);
        assert!(d.reasons.iter().any(|r| r.contains("abort walk")), "{d:#?}");
        f.fixes = fixes(CodeStatus::Present, CodeStatus::Present);
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Risk);
        assert!(d.reasons.iter().any(|r| r.contains("-ETIMEDOUT")), "{d:#?}");
        f.fixes.clear();
        let d = decide(&f);
        assert!(d.reasons.iter().any(|r| r.contains("is unknown")), "{d:#?}");
    }

    #[test]
    fn no_ats_on_the_card_is_go() {
        let mut f = vm_disk();
        f.functions[0].ats = AtsState::Absent;
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Go);
        assert_eq!(d.verdict.exit_code(), 0);
        assert!(d.avoid.is_empty());
    }

    #[test]
    fn unknown_ats_is_cannot_tell_never_go() {
        let mut f = vm_disk();
        f.functions.push(Function {
            bdf: bdf("0000:02:00.1"),
            driver: None,
            ats: AtsState::Unknown("config space not readable (needs root)".into()),
        });
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::CannotTell);
        assert_eq!(d.verdict.exit_code(), 2);
        assert!(
            d.reasons.iter().any(|r| r.contains("0000:02:00.1")),
            "{d:#?}"
        );
    }

    #[test]
    fn one_ats_function_behind_the_slot_makes_the_whole_card_a_risk() {
        let mut f = vm_disk();
        f.functions[0].ats = AtsState::Disabled;
        f.functions.push(Function {
            bdf: bdf("0000:03:00.0"),
            driver: Some("nvme".into()),
            ats: AtsState::Enabled,
        });
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Risk);
        assert!(d.reasons[0].contains("0000:03:00.0"), "{d:#?}");
        assert!(d
            .sequence
            .iter()
            .any(|s| s.action.contains("unbind 0000:03:00.0")));
    }

    fn slot_step(d: &Decision) -> &Step {
        // Stop I/O, unbind (one function), the slot's step, check.
        &d.sequence[2]
    }

    #[test]
    fn a_hotplug_slot_is_released_through_its_power_file_with_or_without_power_controller() {
        let mut f = vm_disk();
        let d = decide(&f);
        assert_eq!(slot_step(&d).action, "power slot 2 off");
        assert!(
            slot_step(&d).why.contains("cuts the slot's power"),
            "{d:#?}"
        );
        // QEMU's xio3130-downstream / pcie-root-port with power_controller_present=off:
        // attention button, no power controller. pciehp still removes the functions on a
        // write of 0 to `power` (the VM runs it).
        f.slot.as_mut().unwrap().caps = Ok(caps(true, false, true));
        let d = decide(&f);
        let st = slot_step(&d);
        assert_eq!(
            st.command.as_deref(),
            Some("echo 0 > /sys/bus/pci/slots/2/power")
        );
        assert!(st.action.contains("no power controller"), "{st:#?}");
        assert!(st.why.contains("keeps power"), "{st:#?}");
        assert!(st.why.contains("attention button"), "{st:#?}");
        assert!(
            d.reasons.iter().any(|r| r.contains("power controller no")),
            "{d:#?}"
        );
        f.slot.as_mut().unwrap().caps = Ok(caps(false, false, false));
        let st = slot_step(&decide(&f)).clone();
        assert!(!st.why.contains("attention button"), "{st:#?}");
        assert_eq!(
            st.command.as_deref(),
            Some("echo 0 > /sys/bus/pci/slots/2/power")
        );
        f.slot.as_mut().unwrap().caps = Err("not root".into());
        let st = slot_step(&decide(&f)).clone();
        assert!(st.why.contains("unknown"), "{st:#?}");
    }

    #[test]
    fn without_a_hotplug_driver_the_sequence_removes_each_function() {
        let mut f = vm_disk();
        // A slot some firmware table named, with a button nobody handles.
        f.slot.as_mut().unwrap().hotplug = false;
        let d = decide(&f);
        assert_eq!(
            slot_step(&d).command.as_deref(),
            Some("echo 1 > /sys/bus/pci/devices/0000:02:00.0/remove")
        );
        assert!(!d.sequence.iter().any(|s| s.action.contains("button")));
        f.slot = None;
        let d = decide(&f);
        assert_eq!(
            slot_step(&d).command.as_deref(),
            Some("echo 1 > /sys/bus/pci/devices/0000:02:00.0/remove")
        );
    }

    /// The kernel log of a VM `ite-surprise` run on 6.12 around the ITE (its dmesg, with
    /// made-up sequence numbers).
    const ITE_LOG: &[(u64, u64, &str)] = &[
        (0, 0, "Linux version 6.12.117+deb12-amd64"),
        (
            436,
            50_202_446,
            "pcieport 0000:00:05.0: pciehp: Slot(2): Card not present",
        ),
        (
            437,
            50_254_938,
            "DMAR: VT-d detected Invalidation Time-out Error: SID 200",
        ),
        (
            438,
            50_255_280,
            "DMAR: QI HEAD: Invalidation Wait qw0 = 0x200000025, qw1 = 0x1042ce4",
        ),
        (
            439,
            50_255_891,
            "DMAR: QI PRIOR: Invalidation Wait qw0 = 0x200000025, qw1 = 0x1042ce0",
        ),
        (
            440,
            50_256_541,
            "DMAR: Invalidation Time-out Error (ITE) cleared",
        ),
        (
            441,
            50_278_125,
            "DMAR: VT-d detected Invalidation Time-out Error: SID 200",
        ),
        (
            442,
            50_278_299,
            "DMAR: QI HEAD: Interrupt Entry Cache Invalidation qw0 = 0x1600000014, qw1 = 0x0",
        ),
        (
            443,
            50_278_850,
            "DMAR: QI PRIOR: Invalidation Wait qw0 = 0x200000025, qw1 = 0x1042cf4",
        ),
        (
            444,
            50_279_124,
            "DMAR: Invalidation Time-out Error (ITE) cleared",
        ),
    ];

    fn scan(log: &[(u64, u64, &str)], present: &[&str]) -> KernelLog {
        let mut sc = KernelLogScan::default();
        for (seq, us, text) in log {
            sc.feed(*seq, *us, text);
        }
        let present: Vec<Bdf> = present.iter().map(|b| bdf(b)).collect();
        sc.finish(
            |sid| present.iter().copied().filter(|b| b.sid() == sid).collect(),
            None,
        )
    }

    #[test]
    fn the_kernel_logs_ite_reports_are_counted_per_sid() {
        let log = scan(ITE_LOG, &["0000:01:00.0"]);
        assert!(log.read);
        assert_eq!(log.overwritten, Some(0));
        assert_eq!(log.ite_reports, 2);
        assert_eq!(log.ite_sids.len(), 1);
        let s = &log.ite_sids[0];
        assert_eq!(s.sid, Some(Sid(0x200)));
        assert_eq!(s.reports, 2);
        assert_eq!(s.first_s, 50.254);
        assert!(s.present.is_empty());
        // Nothing else in the log is an ITE: not the QI dump, not "cleared".
        let log = scan(&ITE_LOG[..2], &[]);
        assert_eq!(log.ite_reports, 0);
    }

    #[test]
    fn an_ite_in_this_boot_is_a_reason_for_the_other_disk_and_the_emptied_slot() {
        // After the surprise disk's ITE and its completed removal: the other ATS disk is still
        // a risk, and the reasons say the IOMMU already timed out once.
        let mut f = vm_disk();
        f.target = "slot 1".into();
        f.functions[0].bdf = bdf("0000:01:00.0");
        f.fixes = fixes(CodeStatus::Present, CodeStatus::Present);
        f.kernel_log = scan(ITE_LOG, &["0000:01:00.0"]);
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Risk);
        let r = d
            .reasons
            .iter()
            .find(|r| r.contains("ITE) report"))
            .unwrap_or_else(|| panic!("{d:#?}"));
        assert!(
            r.contains("SID 200 ×2 (first at 50.3 s; no device has that SID now)"),
            "{r}"
        );
        assert!(r.contains("already timed out"), "{r}");
        assert!(!r.contains("on this card"), "{r}");
        // The emptied slot: still go (nothing left to race), with the same reason.
        f.functions.clear();
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Go);
        assert!(
            d.reasons.iter().any(|r| r.contains("already timed out")),
            "{d:#?}"
        );
        // Before any ITE: said so.
        let d = decide(&vm_disk());
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("shows no invalidation time-out")),
            "{d:#?}"
        );
    }

    #[test]
    fn an_ite_for_a_function_on_the_card_is_named() {
        let mut f = vm_disk();
        f.kernel_log = scan(ITE_LOG, &["0000:02:00.0"]);
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Risk);
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("now 0000:02:00.0") && r.contains("0000:02:00.0 on this card")),
            "{d:#?}"
        );
    }

    #[test]
    fn an_overwritten_or_unreadable_log_is_said_never_read_as_no_ite() {
        let mut f = vm_disk();
        f.kernel_log = scan(&[(5000, 1, "x"), (5001, 2, "y")], &[]);
        assert_eq!(f.kernel_log.overwritten, Some(5000));
        let d = decide(&f);
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("oldest 5000 message(s)") && r.contains("may be gone")),
            "{d:#?}"
        );
        f.kernel_log = KernelLog::unread("cannot read /dev/kmsg: Operation not permitted");
        let d = decide(&f);
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("is unknown") && r.contains("Operation not permitted")),
            "{d:#?}"
        );
        assert_eq!(d.verdict, Verdict::Risk);
    }

    #[test]
    fn no_vtd_is_go_and_an_empty_slot_is_go() {
        let mut f = vm_disk();
        f.vtd = Some(false);
        assert_eq!(decide(&f).verdict, Verdict::Go);
        let mut f = vm_disk();
        f.functions.clear();
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Go);
        assert!(d.sequence.is_empty());
    }

    #[test]
    fn slot_caps_decode_the_vm_root_port() {
        // QEMU 7.2 pcie-root-port with hot-plug: SLTCAP 0x0002007b-like (button, power,
        // surprise, capable), SLTCTL 0x01f1 = powered.
        let c = SlotCaps::decode(0x0010_007b, 0x01f1);
        assert!(c.attention_button && c.power_controller && c.surprise && c.hotplug_capable);
        assert_eq!(c.powered, Some(true));
        assert_eq!(SlotCaps::decode(0x7b, 0x07d1).powered, Some(false));
    }

    /// The q35 fixture plus the VM's switch card: root port 00:07.0 (slot 3) holding an
    /// x3130 upstream port 03:00.0, its downstream port 04:00.0 (slot 4, no power controller)
    /// and behind it an ATS virtio disk 05:00.0 (config spaces copied from the fixture's root
    /// port and disk).
    fn switch_tree() -> tempfile::TempDir {
        use crate::sysfs::tests_support::{copy_tree, fixture};
        use std::fs;
        let tmp = tempfile::tempdir().unwrap();
        copy_tree(&fixture("sysfs-qemu-q35"), tmp.path());
        let base = tmp.path().join("sys/devices/pci0000:00");
        let port_cfg = fs::read(base.join("0000:00:04.0/config")).unwrap();
        let disk_cfg = fs::read(base.join("0000:00:04.0/0000:01:00.0/config")).unwrap();
        let mut no_pcp = port_cfg.clone();
        let mut p = (no_pcp[0x34] & 0xfc) as usize;
        while no_pcp[p] != 0x10 {
            p = (no_pcp[p + 1] & 0xfc) as usize;
        }
        no_pcp[p + 0x14] &= !0x02; // Slot Capabilities: Power Controller Present off
        let mut dir = base.clone();
        for (bdf, cfg, sec) in [
            ("0000:00:07.0", &port_cfg, Some("0000:03")),
            ("0000:03:00.0", &port_cfg, Some("0000:04")),
            ("0000:04:00.0", &no_pcp, Some("0000:05")),
            ("0000:05:00.0", &disk_cfg, None),
        ] {
            dir = dir.join(bdf);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("config"), cfg).unwrap();
            fs::write(dir.join("vendor"), "0x1af4\n").unwrap();
            fs::write(dir.join("device"), "0x1042\n").unwrap();
            if let Some(bus) = sec {
                fs::create_dir_all(dir.join("pci_bus").join(bus)).unwrap();
            }
            std::os::unix::fs::symlink(&dir, tmp.path().join("sys/bus/pci/devices").join(bdf))
                .unwrap();
        }
        for (n, addr) in [("3", "0000:03:00"), ("4", "0000:05:00")] {
            let sd = tmp.path().join("sys/bus/pci/slots").join(n);
            fs::create_dir_all(&sd).unwrap();
            fs::write(sd.join("address"), format!("{addr}\n")).unwrap();
            fs::write(sd.join("power"), "1\n").unwrap();
        }
        tmp
    }

    #[test]
    fn a_switch_card_takes_the_ats_disk_of_its_downstream_slot_along() {
        let tmp = switch_tree();
        let (f, _) = gather(tmp.path(), &Target::Slot("3".into())).unwrap();
        let bdfs: Vec<String> = f.functions.iter().map(|x| x.bdf.to_string()).collect();
        assert_eq!(bdfs, ["0000:03:00.0", "0000:04:00.0", "0000:05:00.0"]);
        assert_eq!(f.functions[2].ats, AtsState::Enabled);
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Risk);
        assert!(
            d.reasons[0].contains("ATS is enabled on 0000:05:00.0"),
            "{d:#?}"
        );
        // The disk alone: its own slot (the downstream port's, without power controller).
        let (f, _) = gather(tmp.path(), &Target::Device(bdf("0000:05:00.0"))).unwrap();
        assert_eq!(f.functions.len(), 1);
        let slot = f.slot.as_ref().unwrap();
        assert_eq!(
            (slot.name.as_str(), slot.port),
            ("4", Some(bdf("0000:04:00.0")))
        );
        assert!(!slot.caps.as_ref().unwrap().power_controller);
        let d = decide(&f);
        assert_eq!(d.verdict, Verdict::Risk);
        assert!(
            d.sequence
                .iter()
                .any(|s| s.action.contains("no power controller")
                    && s.command.as_deref() == Some("echo 0 > /sys/bus/pci/slots/4/power")),
            "{d:#?}"
        );
        // No /dev/kmsg in the tree: said, not taken for "no ITE".
        assert!(!f.kernel_log.read, "{:?}", f.kernel_log);
    }

    #[test]
    fn a_missing_device_is_an_error_not_an_all_clear() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("sys/bus/pci/devices")).unwrap();
        std::fs::create_dir_all(tmp.path().join("sys/bus/pci/slots")).unwrap();
        let e = gather(tmp.path(), &Target::Device(bdf("0000:09:00.0"))).unwrap_err();
        assert!(e.to_string().contains("0000:09:00.0"), "{e}");
        let e = gather(tmp.path(), &Target::Slot("7".into())).unwrap_err();
        assert!(e.to_string().contains("\"7\""), "{e}");
    }
}
