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
//! JSON (`--json`): the serialized [`Report`], `schema_version` `MAJOR.MINOR` as in doctor;
//! docs/preflight.md documents every field.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::event::{Bdf, KTime, Payload, Record, Sid};
use crate::kcode::{self, CodeFinding, CodeStatus};
use crate::knowledge::fixes;
use crate::sysfs::{AtsState, SlotCaps, Sysfs};

/// Version of the JSON layout.
pub const SCHEMA_VERSION: &str = "1.0";

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
    let caps = f.slot.as_ref().and_then(|s| s.caps.as_ref().ok());
    let slot_name = f.slot.as_ref().map(|s| s.name.as_str());
    match (slot_name, caps) {
        (Some(n), Some(c)) if c.power_controller => v.push(step(
            format!("power slot {n} off"),
            Some(format!("echo 0 > /sys/bus/pci/slots/{n}/power")),
            "pciehp removes the functions and their IOMMU state while the card still answers, \
             so the release path's device-TLB flush completes",
        )),
        (Some(n), Some(c)) if c.attention_button => v.push(step(
            format!("press slot {n}'s attention button and wait for its power indicator to go off"),
            None,
            "pciehp waits 5 s, then removes the functions while the card still answers",
        )),
        _ => {
            for func in &f.functions {
                v.push(step(
                    format!("remove {} from the kernel", func.bdf),
                    Some(format!("echo 1 > /sys/bus/pci/devices/{}/remove", func.bdf)),
                    "the kernel releases the device while it still answers (no power \
                     controller or attention button to do it through the slot)",
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
        (Some(n), _) => devices
            .iter()
            .filter(|d| d.info.slot.as_deref() == Some(n.as_str()))
            .collect(),
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
    let btf = crate::btf::load(Some(&root.join("sys/kernel/btf/vmlinux"))).ok();
    let code = kcode::read_live(root, btf.as_ref());
    let fixes = code
        .findings
        .iter()
        .map(|f| (f.commit.clone(), f.status))
        .collect();
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
        },
        code,
    ))
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

    fn ev(tid: u32, payload: Payload) -> Record {
        use crate::event::{Event, FixedStr, Meta};
        Record::Event(Event {
            meta: Meta {
                ts: KTime(1),
                cpu: 0,
                pid: tid,
                tid,
                comm: FixedStr::new("t"),
            },
            payload,
        })
    }

    fn submit(sid: u16) -> Payload {
        use crate::event::{Descriptor, FixedStr, Iommu, Submit};
        Payload::Submit(Submit {
            iommu: Iommu {
                ptr: 1,
                name: FixedStr::new("dmar0"),
                segment: Some(0),
            },
            options: 0,
            count: 1,
            raw: [Descriptor::dev_tlb_raw(Sid(sid), Sid(sid), 0, 0, 0)]
                .into_iter()
                .collect(),
            stack: None,
        })
    }

    fn ret() -> Payload {
        Payload::SubmitReturn(crate::event::SubmitReturn {
            ret: 0,
            start: None,
        })
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

    #[test]
    fn without_power_controller_or_button_the_sequence_removes_each_function() {
        let mut f = vm_disk();
        f.slot.as_mut().unwrap().caps = Ok(caps(false, false, false));
        let d = decide(&f);
        assert!(d
            .sequence
            .iter()
            .any(|s| s.command.as_deref()
                == Some("echo 1 > /sys/bus/pci/devices/0000:02:00.0/remove")));
        f.slot.as_mut().unwrap().caps = Ok(caps(true, false, false));
        let d = decide(&f);
        assert!(d
            .sequence
            .iter()
            .any(|s| s.action.contains("attention button")));
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
