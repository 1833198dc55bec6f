//! Which upstream fixes the running kernel carries, read from its own machine code.
//!
//! The fixes that matter most for the race are inline checks (a `pci_device_is_present()` call,
//! a changed loop step): BTF and kallsyms cannot see them, the code can. This module owns the
//! *decision*: function bytes and a few symbol addresses in ([`KernelCode`]), a verdict per fix
//! out ([`assess`]) — pure, no I/O, unit-tested on code cut out of the Debian kernels of the VM
//! matrix (`itewatch/tests/data/kcode/`). [`read`] owns the I/O that fills a [`KernelCode`] from
//! `/proc/kcore` and `/proc/kallsyms` (or from a vmlinux ELF and its System.map, which is how
//! the fixtures were cut).
//!
//! What each check looks for (the shapes were read in Debian 6.1.170, 6.12.117, 6.18.15 and
//! 7.3.4's `drivers/iommu/intel/{pasid,dmar}.c` and in their compiled code):
//! - 4fc82cd907ac / 10e60d878139, `devtlb_invalidation_with_pasid()`: a call to
//!   `pci_device_is_present` (10e60d878139's form) or a compare of `pci_dev.error_state` with
//!   `pci_channel_io_perm_failure` (3; 4fc82cd907ac's inline `pci_dev_is_disconnected()`), in a
//!   function that goes on to call `qi_flush_dev_iotlb{,_pasid}`.
//! - 42662d19839f, the legacy-mode context flush: `__context_flush_dev_iotlb()` (6.12+) or,
//!   before it existed, `__iommu_flush_dev_iotlb()` as inlined into `domain_context_clear_one()`
//!   (6.1): the same presence check before its `qi_flush_dev_iotlb` call.
//! - 80a9b50c0b9e, `qi_check_fault()` (inlined into `qi_submit_sync` on every kernel seen):
//!   calls to `device_rbtree_find` and `pci_device_is_present`; the 8-byte loads at +0xb0
//!   (`DMAR_IQER_REG`) are reported as evidence only, because `qi_dump_fault()` reads IQER on
//!   kernels without the fix too.
//! - fe89277c9ceb, the ITE abort walk in `qi_check_fault()`: the loop that compares a
//!   `desc_status` slot with `QI_IN_USE` (1) and stores `QI_ABORT` (3); its index steps by
//!   -1 modulo 256 with the fix, by -2 (after `head |= 1`) without.
//!
//! Anything else — a function not found, bytes that could not be read, a shape that matches
//! neither form — is [`CodeStatus::Unknown`] with the reason; nothing is inferred from the
//! kernel version.

pub mod read;
mod x86;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::knowledge::fixes::{self, UpstreamFix};

pub use read::pci_dev_layout;
pub use x86::AbortWalk;

/// One out-of-line copy of a function (the function itself, a `.part.N`/`.isra.N`/
/// `.constprop.N` clone or its `.cold` part), with its machine code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    /// Address of its first byte (as in kallsyms).
    pub addr: u64,
    /// From `addr` up to the next symbol.
    pub bytes: Vec<u8>,
}

/// What was read for one base name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Copies {
    /// Every copy the symbol table lists, with its code (empty: no symbol, e.g. inlined).
    Read(Vec<Function>),
    /// The symbol table lists it but its code could not be read (the reason).
    Unreadable(String),
}

/// Offsets in `struct pci_dev` (from BTF) that the disconnected-state test uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevLayout {
    /// `pci_dev.error_state`.
    pub error_state: u32,
    /// `pci_dev.dev` (code reaches `error_state` through `to_pci_dev(dev)`).
    pub dev: u32,
}

/// The input of [`assess`]: everything it may look at, nothing it has to fetch.
#[derive(Clone, Debug, Default)]
pub struct KernelCode {
    /// Base name (no clone suffix) → its copies. A name missing from the map was not looked up.
    pub functions: BTreeMap<String, Copies>,
    /// Callee name → the addresses of its copies (to name direct call targets).
    pub callees: BTreeMap<String, Vec<u64>>,
    /// `None` without BTF: the disconnected-state test cannot be recognised.
    pub pci_dev: Option<PciDevLayout>,
}

/// Base names [`assess`] reads, in the order it needs them.
pub const FUNCTIONS: &[&str] = &[
    "devtlb_invalidation_with_pasid",
    "intel_pasid_tear_down_entry",
    "__context_flush_dev_iotlb",
    "intel_context_flush_no_pasid",
    "intel_context_flush_present",
    "__iommu_flush_dev_iotlb",
    "domain_context_clear_one",
    "qi_check_fault",
    "qi_submit_sync",
];

/// Callees [`assess`] names.
pub const CALLEES: &[&str] = &[
    PCI_DEVICE_IS_PRESENT,
    DEVICE_RBTREE_FIND,
    QI_FLUSH_DEV_IOTLB,
    QI_FLUSH_DEV_IOTLB_PASID,
];

const PCI_DEVICE_IS_PRESENT: &str = "pci_device_is_present";
const DEVICE_RBTREE_FIND: &str = "device_rbtree_find";
const QI_FLUSH_DEV_IOTLB: &str = "qi_flush_dev_iotlb";
const QI_FLUSH_DEV_IOTLB_PASID: &str = "qi_flush_dev_iotlb_pasid";

/// `pci_channel_io_perm_failure` (include/linux/pci.h, 6.1–7.3): what `pci_dev_is_disconnected()`
/// compares `error_state` with.
const PCI_CHANNEL_IO_PERM_FAILURE: u64 = 3;

/// A verdict read from the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeStatus {
    Present,
    Absent,
    /// The code could not tell (the evidence says why).
    Unknown,
}

impl CodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CodeStatus::Present => "present",
            CodeStatus::Absent => "absent",
            CodeStatus::Unknown => "unknown",
        }
    }
}

/// One fix as the code shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeFinding {
    /// Upstream commit id (abbreviated, as in `knowledge::fixes`).
    pub commit: String,
    pub status: CodeStatus,
    /// The functions whose code the verdict rests on.
    pub functions: Vec<String>,
    /// What was found, in words.
    pub evidence: String,
}

/// The commits [`assess`] answers, in its output order.
pub const COMMITS: [&UpstreamFix; 5] = [
    &fixes::DONT_ISSUE_DISCONNECTED,
    &fixes::FLUSH_ONLY_ACCESSIBLE_SM,
    &fixes::SKIP_INACCESSIBLE_LEGACY,
    &fixes::IMPROVE_ITE,
    &fixes::HARDLOCKUP_RETRY,
];

/// The findings for one kernel, with where they came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeReport {
    /// What was read, e.g. `/proc/kcore via /proc/kallsyms`.
    pub source: String,
    /// Why the code could not be read (every finding is then `unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub findings: Vec<CodeFinding>,
}

impl CodeReport {
    /// Every commit unknown, for `why`.
    pub fn unreadable(source: impl Into<String>, why: String) -> CodeReport {
        CodeReport {
            source: source.into(),
            findings: COMMITS
                .iter()
                .map(|f| CodeFinding {
                    commit: f.commit.to_string(),
                    status: CodeStatus::Unknown,
                    functions: Vec::new(),
                    evidence: format!("kernel code not read: {why}"),
                })
                .collect(),
            error: Some(why),
        }
    }

    /// The finding for `commit`.
    pub fn get(&self, commit: &str) -> Option<&CodeFinding> {
        self.findings.iter().find(|f| f.commit == commit)
    }

    /// The form the trace header keeps.
    pub fn header_fixes(&self) -> Vec<crate::trace::KernelFixStatus> {
        self.findings
            .iter()
            .map(|f| crate::trace::KernelFixStatus {
                commit: f.commit.clone(),
                status: f.status.as_str().to_string(),
                evidence: f.evidence.clone(),
            })
            .collect()
    }
}

/// Reads the running kernel's code below `root` (`/` live: `proc/kcore`, `proc/kallsyms`) and
/// decides. Never fails: an unreadable kcore makes every finding `unknown`, with the reason.
/// `pci_dev` is [`pci_dev_layout`] of the kernel's BTF; `syms` is the caller's kallsyms of
/// this host, if it has read them already (read here otherwise).
pub fn read_live(
    root: &std::path::Path,
    pci_dev: Option<PciDevLayout>,
    syms: Option<&crate::kallsyms::Kallsyms>,
) -> CodeReport {
    let source = "/proc/kcore via /proc/kallsyms";
    match read::live(root, pci_dev, syms) {
        Ok(code) => CodeReport {
            source: source.into(),
            error: None,
            findings: assess(&code),
        },
        Err(e) => CodeReport::unreadable(source, crate::doctor::error_chain(&e)),
    }
}

/// The decision: one [`CodeFinding`] per entry of [`COMMITS`], in that order.
pub fn assess(code: &KernelCode) -> Vec<CodeFinding> {
    let pasid = presence_guard(
        code,
        "devtlb_invalidation_with_pasid",
        &["intel_pasid_tear_down_entry"],
    );
    let (dont_issue, flush_sm) = pasid_verdicts(&pasid);
    let legacy = legacy_context_flush(code);
    let (improve, walk) = qi_fault_verdicts(code);
    vec![
        finding(&fixes::DONT_ISSUE_DISCONNECTED, dont_issue),
        finding(&fixes::FLUSH_ONLY_ACCESSIBLE_SM, flush_sm),
        finding(&fixes::SKIP_INACCESSIBLE_LEGACY, legacy),
        finding(&fixes::IMPROVE_ITE, improve),
        finding(&fixes::HARDLOCKUP_RETRY, walk),
    ]
}

/// A verdict before it is tied to its commit.
struct Verdict {
    status: CodeStatus,
    functions: Vec<String>,
    evidence: String,
}

fn verdict(status: CodeStatus, functions: Vec<String>, evidence: impl Into<String>) -> Verdict {
    Verdict {
        status,
        functions,
        evidence: evidence.into(),
    }
}

fn finding(fix: &UpstreamFix, v: Verdict) -> CodeFinding {
    CodeFinding {
        commit: fix.commit.to_string(),
        status: v.status,
        functions: v.functions,
        evidence: v.evidence,
    }
}

/// What a flush function's code holds: where it was found and the guards in it.
struct Guard {
    /// Why nothing can be said, when that is so.
    unknown: Option<String>,
    functions: Vec<String>,
    /// `true` when the code is that of a host the function is inlined into.
    inlined_into: Option<String>,
    present_calls: usize,
    /// `None`: not looked for (no BTF layout).
    disconnected_tests: Option<usize>,
    flush_calls: usize,
}

impl Guard {
    fn unknown(why: String) -> Guard {
        Guard {
            unknown: Some(why),
            functions: Vec::new(),
            inlined_into: None,
            present_calls: 0,
            disconnected_tests: None,
            flush_calls: 0,
        }
    }

    fn place(&self) -> String {
        match &self.inlined_into {
            Some(h) => format!("{h} (the check's function is inlined there)"),
            None => self.functions.join(" + "),
        }
    }

    fn has_guard(&self) -> bool {
        self.present_calls > 0 || self.disconnected_tests.unwrap_or(0) > 0
    }
}

/// The copies of `base`, or of the first of `hosts` that exists when `base` has no symbol.
fn code_of<'a>(
    code: &'a KernelCode,
    base: &str,
    hosts: &[&str],
) -> Result<(Vec<&'a Function>, Option<String>), String> {
    match code.functions.get(base) {
        None => return Err(format!("{base} was not looked up")),
        Some(Copies::Unreadable(why)) => return Err(format!("{base}: {why}")),
        Some(Copies::Read(v)) if !v.is_empty() => return Ok((v.iter().collect(), None)),
        Some(Copies::Read(_)) => {}
    }
    for h in hosts {
        match code.functions.get(*h) {
            Some(Copies::Read(v)) if !v.is_empty() => {
                return Ok((v.iter().collect(), Some(h.to_string())));
            }
            Some(Copies::Unreadable(why)) => return Err(format!("{h}: {why}")),
            _ => {}
        }
    }
    Err(format!(
        "no symbol for {base}{}",
        if hosts.is_empty() {
            String::new()
        } else {
            format!(" nor for {}", hosts.join(", "))
        }
    ))
}

fn callee(code: &KernelCode, name: &str) -> Vec<u64> {
    code.callees.get(name).cloned().unwrap_or_default()
}

/// The presence / disconnected-state checks in `base` (or its inline host).
fn presence_guard(code: &KernelCode, base: &str, hosts: &[&str]) -> Guard {
    let (funcs, inlined_into) = match code_of(code, base, hosts) {
        Ok(v) => v,
        Err(why) => return Guard::unknown(why),
    };
    let present = callee(code, PCI_DEVICE_IS_PRESENT);
    if present.is_empty() {
        return Guard::unknown(format!(
            "{PCI_DEVICE_IS_PRESENT} is not in the symbol table"
        ));
    }
    let mut flush = callee(code, QI_FLUSH_DEV_IOTLB);
    flush.extend(callee(code, QI_FLUSH_DEV_IOTLB_PASID));
    let disconnect_disps: Option<Vec<i64>> = code.pci_dev.map(|l| {
        vec![
            i64::from(l.error_state),
            i64::from(l.error_state) - i64::from(l.dev),
        ]
    });
    let mut g = Guard {
        unknown: None,
        functions: funcs.iter().map(|f| f.name.clone()).collect(),
        inlined_into,
        present_calls: 0,
        disconnected_tests: disconnect_disps.as_ref().map(|_| 0),
        flush_calls: 0,
    };
    for f in &funcs {
        let d = match x86::decode(f) {
            Ok(d) => d,
            Err(why) => return Guard::unknown(why),
        };
        g.present_calls += d.calls_to(&present);
        g.flush_calls += d.calls_to(&flush);
        if let (Some(n), Some(disps)) = (g.disconnected_tests.as_mut(), &disconnect_disps) {
            *n += d.compares_with(disps, PCI_CHANNEL_IO_PERM_FAILURE);
        }
    }
    if g.flush_calls == 0 {
        let place = g.place();
        return Guard::unknown(format!(
            "{place} calls neither {QI_FLUSH_DEV_IOTLB} nor {QI_FLUSH_DEV_IOTLB_PASID}: \
             not the code the check guards"
        ));
    }
    g
}

fn guard_words(g: &Guard) -> String {
    let mut parts = vec![format!(
        "{} call(s) to {PCI_DEVICE_IS_PRESENT}",
        g.present_calls
    )];
    match g.disconnected_tests {
        Some(n) => parts.push(format!(
            "{n} compare(s) of pci_dev.error_state with pci_channel_io_perm_failure"
        )),
        None => parts.push("error_state compares not looked for (no BTF layout)".into()),
    }
    parts.push(format!(
        "{} call(s) to {QI_FLUSH_DEV_IOTLB}{{,_pasid}}",
        g.flush_calls
    ));
    format!("{}: {}", g.place(), parts.join(", "))
}

/// 4fc82cd907ac (the disconnected-state test) and 10e60d878139 (its replacement by the
/// presence check) from `devtlb_invalidation_with_pasid`.
fn pasid_verdicts(g: &Guard) -> (Verdict, Verdict) {
    if let Some(why) = &g.unknown {
        return (
            verdict(CodeStatus::Unknown, Vec::new(), why.clone()),
            verdict(CodeStatus::Unknown, Vec::new(), why.clone()),
        );
    }
    let words = guard_words(g);
    let fns = g.functions.clone();
    let disconnected = g.disconnected_tests.unwrap_or(0) > 0;
    let dont_issue = if g.present_calls > 0 {
        verdict(
            CodeStatus::Present,
            fns.clone(),
            format!("{words} (its test, superseded by 10e60d878139's presence check)"),
        )
    } else if disconnected {
        verdict(CodeStatus::Present, fns.clone(), words.clone())
    } else if g.disconnected_tests.is_none() {
        verdict(
            CodeStatus::Unknown,
            fns.clone(),
            format!("{words}; without BTF an inline error_state test cannot be recognised"),
        )
    } else {
        verdict(CodeStatus::Absent, fns.clone(), words.clone())
    };
    let flush_sm = if g.present_calls > 0 {
        verdict(CodeStatus::Present, fns, words)
    } else {
        verdict(CodeStatus::Absent, fns, words)
    };
    (dont_issue, flush_sm)
}

/// 42662d19839f: the legacy-mode context flush checks presence.
fn legacy_context_flush(code: &KernelCode) -> Verdict {
    let modern = matches!(code.functions.get("__context_flush_dev_iotlb"), Some(Copies::Read(v)) if !v.is_empty())
        || [
            "intel_context_flush_no_pasid",
            "intel_context_flush_present",
        ]
        .iter()
        .any(|h| matches!(code.functions.get(*h), Some(Copies::Read(v)) if !v.is_empty()));
    let g = if modern {
        presence_guard(
            code,
            "__context_flush_dev_iotlb",
            &[
                "intel_context_flush_no_pasid",
                "intel_context_flush_present",
            ],
        )
    } else {
        // Before 6.10 the context clear flushed through __iommu_flush_dev_iotlb (iommu.c),
        // inlined into domain_context_clear_one on 6.1.
        presence_guard(
            code,
            "__iommu_flush_dev_iotlb",
            &["domain_context_clear_one"],
        )
    };
    if let Some(why) = g.unknown {
        return verdict(CodeStatus::Unknown, Vec::new(), why);
    }
    let status = if g.has_guard() {
        CodeStatus::Present
    } else if g.disconnected_tests.is_none() {
        return verdict(
            CodeStatus::Unknown,
            g.functions.clone(),
            format!(
                "{}; without BTF an inline error_state test cannot be recognised",
                guard_words(&g)
            ),
        );
    } else {
        CodeStatus::Absent
    };
    verdict(status, g.functions.clone(), guard_words(&g))
}

/// 80a9b50c0b9e and fe89277c9ceb from `qi_check_fault` (or `qi_submit_sync`, where it is
/// inlined).
fn qi_fault_verdicts(code: &KernelCode) -> (Verdict, Verdict) {
    let (funcs, inlined) = match code_of(code, "qi_check_fault", &["qi_submit_sync"]) {
        Ok(v) => v,
        Err(why) => {
            return (
                verdict(CodeStatus::Unknown, Vec::new(), why.clone()),
                verdict(CodeStatus::Unknown, Vec::new(), why),
            )
        }
    };
    let fns: Vec<String> = funcs.iter().map(|f| f.name.clone()).collect();
    let place = match &inlined {
        Some(_) => format!("{} (qi_check_fault is inlined there)", fns.join(" + ")),
        None => fns.join(" + "),
    };
    let present = callee(code, PCI_DEVICE_IS_PRESENT);
    let rbtree = callee(code, DEVICE_RBTREE_FIND);
    let (mut present_calls, mut rbtree_calls, mut iqer_loads, mut etimedout) = (0, 0, 0, 0);
    let mut walks = Vec::new();
    for f in &funcs {
        let d = match x86::decode(f) {
            Ok(d) => d,
            Err(why) => {
                return (
                    verdict(CodeStatus::Unknown, fns.clone(), why.clone()),
                    verdict(CodeStatus::Unknown, fns, why),
                )
            }
        };
        present_calls += d.calls_to(&present);
        rbtree_calls += d.calls_to(&rbtree);
        iqer_loads += d.qword_loads_at(x86::DMAR_IQER_REG);
        etimedout += d.immediates(x86::MINUS_ETIMEDOUT);
        walks.extend(d.abort_walks());
    }
    let steps: Vec<i32> = {
        let mut s: Vec<i32> = walks.iter().map(|w| w.step).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let walk_words = if walks.is_empty() {
        "no ITE abort walk (a loop comparing a desc_status slot with QI_IN_USE and storing \
         QI_ABORT) found"
            .to_string()
    } else {
        walks
            .iter()
            .map(|w| {
                format!(
                    "abort walk at {}+{:#x} steps {}{}",
                    w.function,
                    w.offset,
                    w.step,
                    if w.or_one_before {
                        ", after `or 1` (head |= 1)"
                    } else {
                        ""
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let walk = match steps.as_slice() {
        [-1] => verdict(
            CodeStatus::Present,
            fns.clone(),
            format!("{place}: {walk_words}"),
        ),
        [-2] => verdict(
            CodeStatus::Absent,
            fns.clone(),
            format!(
                "{place}: {walk_words}: the walk never ends when head and tail differ in parity"
            ),
        ),
        _ => verdict(
            CodeStatus::Unknown,
            fns.clone(),
            format!("{place}: {walk_words}"),
        ),
    };
    let calls = format!(
        "{rbtree_calls} call(s) to {DEVICE_RBTREE_FIND}, {present_calls} to \
         {PCI_DEVICE_IS_PRESENT}, {iqer_loads} 8-byte load(s) at +0xb0 (DMAR_IQER_REG), \
         {etimedout} use(s) of -ETIMEDOUT"
    );
    let improve = if present.is_empty() {
        verdict(
            CodeStatus::Unknown,
            fns,
            format!("{PCI_DEVICE_IS_PRESENT} is not in the symbol table"),
        )
    } else if rbtree_calls > 0 && present_calls > 0 {
        verdict(CodeStatus::Present, fns, format!("{place}: {calls}"))
    } else if rbtree_calls == 0 && present_calls == 0 && !walks.is_empty() {
        // The abort walk proves the ITE branch is in the code looked at.
        verdict(
            CodeStatus::Absent,
            fns,
            format!("{place}: {calls}; the ITE branch (its abort walk) is there without them"),
        )
    } else {
        verdict(CodeStatus::Unknown, fns, format!("{place}: {calls}"))
    };
    (improve, walk)
}

#[cfg(test)]
mod tests;
