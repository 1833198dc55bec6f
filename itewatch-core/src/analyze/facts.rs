//! What one kernel message says: the format strings of kernel-facts §8 (VT-d QI faults,
//! pciehp, watchdogs), the call-trace lines around them, and the boot banner lines that give
//! the host facts. A cheap multi-pattern prefilter skips the ~all lines that are none of these.
//!
//! Checked against the 5.15.85, 6.1.y, 6.9 and 6.12 sources (drivers/iommu/intel/dmar.c,
//! drivers/pci/hotplug/pciehp_ctrl.c, kernel/watchdog*.c) as quoted in kernel-facts.md.

use std::sync::OnceLock;

use aho_corasick::AhoCorasick;

use crate::event::{Bdf, Sid};

/// What a pciehp `Slot(%s): ...` line reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotWhat {
    LinkDown,
    CardNotPresent,
    CardPresent,
    LinkUp,
    /// Attention button pressed / "Powering off due to button press" / "Button press: will
    /// power off": a safe removal starts.
    Button,
    /// "Button cancel" and the like: the safe removal was cancelled.
    ButtonCancel,
    Other,
}

impl SlotWhat {
    pub fn name(self) -> &'static str {
        match self {
            SlotWhat::LinkDown => "link-down",
            SlotWhat::CardNotPresent => "card-not-present",
            SlotWhat::CardPresent => "card-present",
            SlotWhat::LinkUp => "link-up",
            SlotWhat::Button => "attention-button",
            SlotWhat::ButtonCancel => "button-cancel",
            SlotWhat::Other => "slot-other",
        }
    }
}

/// The watchdog (or oops) report that opens a call-trace block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReportKind {
    HardLockup,
    SoftLockup,
    RcuStall,
    NmiBacktrace,
    HungTask,
    /// WARNING / BUG / Oops / general protection fault.
    Oops,
    /// A `CPU: N PID: P Comm: X` line with no header before it (dump_stack, quoted traces).
    Dump,
}

impl ReportKind {
    pub fn name(self) -> &'static str {
        match self {
            ReportKind::HardLockup => "hard-lockup",
            ReportKind::SoftLockup => "soft-lockup",
            ReportKind::RcuStall => "rcu-stall",
            ReportKind::NmiBacktrace => "nmi-backtrace",
            ReportKind::HungTask => "hung-task",
            ReportKind::Oops => "oops",
            ReportKind::Dump => "stack-dump",
        }
    }
    /// Whether the CPU was spinning (as opposed to a task sleeping too long).
    pub fn spinning(self) -> bool {
        matches!(
            self,
            ReportKind::HardLockup
                | ReportKind::SoftLockup
                | ReportKind::RcuStall
                | ReportKind::NmiBacktrace
        )
    }
}

/// One recognised message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    /// `DMAR: VT-d detected Invalidation Time-out Error: SID %llx` (`sid` None for 0 and for
    /// the all-ones `ffff`, which no device has: `all_ones` says which).
    IteDetected { sid: Option<Sid>, all_ones: bool },
    /// `... Invalidation Queue Error: Reason %llx`.
    IqeDetected { reason: u64 },
    /// `... Invalidation Completion Error: SID %llx`.
    IceDetected { sid: Option<Sid> },
    /// `DMAR: QI HEAD|PRIOR: <type> qw0 = 0x.., qw1 = 0x..`; `dev_tlb_sid` decoded from a
    /// (PASID-based) Device-TLB descriptor.
    QiDesc {
        prior: bool,
        desc_type: String,
        qw0: Option<u64>,
        dev_tlb_sid: Option<Sid>,
    },
    /// `Invalidation Time-out Error (ITE) cleared` (and IQE/ICE).
    Cleared { what: &'static str },
    /// `DMAR: DRHD: handling fault status reg %x`.
    FaultStatus { reg: u32 },
    /// A DMA remapping fault (`[DMA Read NO_PASID] Request device [..] fault addr`), or an
    /// interrupt-remapping fault: NOT an ITE.
    DmaFault { device: Option<Sid> },
    Slot {
        port: Option<Bdf>,
        slot: String,
        what: SlotWhat,
    },
    /// DPC containment / trigger.
    Dpc { port: Option<Bdf> },
    /// AER error report.
    Aer { device: Option<Bdf> },
    /// Header of a watchdog/oops report; `cpu`, `comm`, `pid` when the header says them.
    ReportHeader {
        kind: ReportKind,
        cpu: Option<u32>,
        comm: Option<String>,
        pid: Option<u32>,
        stuck_s: Option<u64>,
    },
    /// `CPU: N PID: P Comm: X ...`.
    Task {
        cpu: Option<u32>,
        pid: Option<u32>,
        comm: String,
        release: Option<String>,
    },
    /// A stack frame (`RIP:` included); `reliable` false for `? sym` frames.
    Frame { sym: String, reliable: bool },
    /// `Call Trace:`, `<TASK>`, register dumps: inside a report, not the end of it.
    TraceContext,
    /// `</TASK>`, `---[ end trace`, `Kernel Offset:`: the report ended.
    TraceEnd,
    /// `Kernel panic - not syncing: <why>`.
    Panic { why: String },
    /// `pci 0000:01:00.0: Removing from iommu group N`.
    IommuGroupRemove { bdf: Bdf },
    /// `pci 0000:01:00.0: [8086:0b60] type 00 class 0x010802`.
    Enumerated { bdf: Bdf, vendor: u16, device: u16 },
    /// `<driver> 0000:01:00.0: ...` (any device message from a bound driver).
    DriverSays { bdf: Bdf, driver: String },
    /// `Linux version <release> ...`.
    LinuxVersion { release: String },
    /// `Command line: ...` / `Kernel command line: ...`.
    CommandLine { cmdline: String },
    /// `smpboot: CPU0: <model> (family: ..)`.
    CpuModel { model: String },
    /// `DMAR: dmar0: reg_base_addr fed90000 ver 1:0 cap d2008c40660462 ecap f050da`.
    DmarUnit {
        name: String,
        version: Option<String>,
        address: Option<u64>,
        cap: Option<u64>,
        ecap: Option<u64>,
    },
    /// A line with a relevant keyword that matched no pattern fully (truncated, mangled).
    Mangled { keyword: &'static str },
    /// `sysrq: <action>` (6.1: drivers/tty/sysrq.c, pr_fmt "sysrq: "; older "SysRq : "):
    /// backtraces that follow were asked for by someone, not printed by a watchdog.
    Sysrq { action: String },
}

const KEYWORDS: &[&str] = &[
    "DMAR",
    "dmar",
    "Slot(",
    "LOCKUP",
    "lockup",
    "stall",
    "NMI backtrace",
    "Call Trace",
    "RIP:",
    "Comm:",
    "+0x",
    "TASK>",
    "IRQ>",
    "NMI>",
    "end trace",
    "Kernel panic",
    "blocked for more than",
    "AER",
    "DPC",
    "iommu group",
    "] type ",
    "Linux version",
    "ommand line:",
    "smpboot: CPU0",
    "WARNING:",
    "BUG:",
    "Oops",
    "general protection",
    "Kernel Offset",
    "Invalidation",
    "atchdog",
    "VT-d detected",
    "QI HEAD:",
    "QI PRIOR:",
    "fault status",
    "fault addr",
    "fault index",
    "fault reason",
    "reg_base_addr",
    "sysrq: ",
    "SysRq : ",
];

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The bit of a keyword in [`keyword_mask`]; a name that is not in [`KEYWORDS`] fails to
/// compile.
const fn kw(name: &str) -> u64 {
    let mut i = 0;
    while i < KEYWORDS.len() {
        if same(KEYWORDS[i], name) {
            return 1 << i;
        }
        i += 1;
    }
    panic!("not a keyword")
}

const _: () = assert!(KEYWORDS.len() <= 64);

/// Which keywords `text` contains (bit `i` for `KEYWORDS[i]`), in one pass; all bits when the
/// prefilter could not be built. Classification asks the bits before any substring search,
/// so a line pays one automaton pass, not a search per message kind.
fn keyword_mask(text: &str) -> u64 {
    // Most lines hold no keyword: a SIMD multi-substring search (Teddy) says so at a fraction
    // of the automaton's cost per byte; only lines with a hit pay for the overlapping pass.
    static ANY: OnceLock<Option<aho_corasick::packed::Searcher>> = OnceLock::new();
    if let Some(any) = ANY.get_or_init(|| aho_corasick::packed::Searcher::new(KEYWORDS.iter())) {
        if any.find(text).is_none() {
            return 0;
        }
    }
    match prefilter() {
        Some(ac) => ac
            .find_overlapping_iter(text)
            .fold(0, |m, hit| m | 1u64 << hit.pattern().as_usize()),
        None => u64::MAX,
    }
}

/// Messages whose end a wrapping console or collector may cut off, with the least of each
/// that must be left to tell (a shorter tail is too ambiguous to call).
const CUT_TAILS: &[(&str, usize)] = &[
    ("VT-d detected Invalidation Time-out Error: SID", 8),
    ("Invalidation Time-out Error (ITE) cleared", 12),
    ("handling fault status reg", 8),
    ("Watchdog detected hard LOCKUP on cpu", 8),
    ("soft lockup - CPU#", 9),
];

/// The phrase whose beginning `t` ends with (the line was cut inside it), if any. Only lines
/// naming DMAR or a watchdog are asked, so the cost stays off ordinary lines.
fn cut_tail(t: &str) -> Option<&'static str> {
    if !(t.contains("DMAR") || t.contains("atchdog")) {
        return None;
    }
    CUT_TAILS.iter().find_map(|(phrase, min)| {
        (*min..phrase.len())
            .rev()
            .any(|k| phrase.get(..k).is_some_and(|p| t.ends_with(p)))
            .then_some(*phrase)
    })
}

fn prefilter() -> Option<&'static AhoCorasick> {
    static P: OnceLock<Option<AhoCorasick>> = OnceLock::new();
    // Fixed literals always build; if they ever did not, every line goes to the full matcher.
    // A DFA: more memory (a few hundred KiB for these literals) for a search that is several
    // times cheaper per byte than the default NFA on the ~all lines that match nothing.
    P.get_or_init(|| {
        AhoCorasick::builder()
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            .build(KEYWORDS)
            .ok()
    })
    .as_ref()
}

fn hex_after(s: &str, pat: &str) -> Option<u64> {
    let i = s.find(pat)?;
    let rest = s.get(i + pat.len()..)?.trim_start();
    let rest = rest.strip_prefix("0x").unwrap_or(rest);
    let end = rest
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(rest.len());
    if end == 0 || end > 16 {
        return None;
    }
    u64::from_str_radix(rest.get(..end)?, 16).ok()
}

fn dec_after(s: &str, pat: &str) -> Option<u64> {
    let i = s.find(pat)?;
    let rest = s.get(i + pat.len()..)?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if end == 0 || end > 19 {
        return None;
    }
    rest.get(..end)?.parse().ok()
}

/// A SID the hardware reported: not 0 (no SID: old hardware, or the IOMMU did not latch one)
/// and not all ones (`ffff`: what a read of a register or device that is gone returns; bus ff
/// device 1f.7 is not what it means).
fn sid_of(v: u64) -> Option<Sid> {
    (v != 0 && v < 0xffff).then_some(Sid(v as u16))
}

/// A PCI address word `ssss:bb:dd.f` (no `????`).
pub fn parse_bdf(w: &str) -> Option<Bdf> {
    let w = w.trim_end_matches([':', ',', ';']);
    let b = w.as_bytes();
    if b.len() != 12 || b.get(4) != Some(&b':') || b.get(7) != Some(&b':') {
        return None;
    }
    w.parse().ok()
}

/// `[bb:dd.f]` or `[ssss:bb:dd.f]` inside a DMA fault line.
fn bracket_sid(s: &str) -> Option<Sid> {
    let i = s.find("device [")?;
    let rest = s.get(i + "device [".len()..)?;
    let end = rest.find(']')?;
    let inner = rest.get(..end)?;
    let bdf: Bdf = inner.parse().ok()?;
    Some(bdf.sid())
}

/// Whether `w` is a kernel symbol frame `sym+0xoff[/0xlen]`; returns the symbol.
fn frame_sym(w: &str) -> Option<&str> {
    let plus = w.find("+0x")?;
    let sym = w.get(..plus)?;
    let off = w.get(plus + 3..)?;
    let first = sym.chars().next()?;
    if !(first.is_ascii_alphabetic() || first == '_' || first == '.') {
        return None;
    }
    if !sym
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$')
    {
        return None;
    }
    if !off.chars().next()?.is_ascii_hexdigit() {
        return None;
    }
    Some(sym)
}

/// A frame line without its address prefix (old style: `[<ffffffff8123>] sym+0x../0x..`)
/// and its `? ` mark: (reliable, the rest).
fn frame_text(t: &str) -> Option<(bool, &str)> {
    let mut s = t.trim();
    if let Some(r) = s.strip_prefix("[<") {
        s = r.split_once(">]").map(|x| x.1)?.trim_start();
    }
    Some(match s.strip_prefix("? ") {
        Some(r) => (false, r.trim_start()),
        None => (true, s),
    })
}

fn parse_frame(t: &str) -> Option<Fact> {
    let (reliable, s) = frame_text(t)?;
    let rip = s.starts_with("RIP: ");
    let s = s.strip_prefix("RIP: ").map_or(s, |r| {
        r.split_once(':').map_or(r, |(seg, rest)| {
            if seg.len() == 4 && seg.bytes().all(|c| c.is_ascii_hexdigit()) {
                rest
            } else {
                r
            }
        })
    });
    let word = s.split_whitespace().next()?;
    // `RIP: 0010:qi_submit_sync` (offsets stripped, as bug reports often paste them): the RIP
    // line says it is a frame whatever follows.
    let sym = match frame_sym(word) {
        Some(sym) => sym,
        None if rip => bare_sym(word)?,
        None => return None,
    };
    // A frame line has at most a `[module]` and maybe an `(inlined)`/`(..)` after it.
    let extra = s.get(word.len()..).unwrap_or("").trim();
    if !(extra.is_empty()
        || extra.starts_with('[')
        || extra.starts_with('(')
        || extra.starts_with("RSP"))
    {
        return None;
    }
    Some(Fact::Frame {
        sym: sym.to_string(),
        reliable,
    })
}

/// A frame a kernel stack starts from: a trace that shows it has been printed to its bottom
/// (the `</TASK>` after it may be missing, as in kernels before 5.16 or a pasted excerpt).
pub fn bottom_frame(sym: &str) -> bool {
    matches!(
        sym,
        "ret_from_fork"
            | "ret_from_fork_asm"
            | "entry_SYSCALL_64_after_hwframe"
            | "secondary_startup_64"
            | "secondary_startup_64_no_verify"
            | "common_startup_64"
            | "x86_64_start_kernel"
    )
}

/// The x86 register names a report's register dump starts its lines with (`__show_regs`,
/// `show_iret_regs`, `show_opcodes`): `RIP:`, `RSP:`, `RAX:` .. `R15:`, `FS:`, `CS:`, `CR2:`,
/// `DR0:`, `DR6:`, `PKRU:`, `Code:`.
const REGISTERS: &[&str] = &[
    "RIP", "RSP", "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R08", "R09", "R10", "R11",
    "R12", "R13", "R14", "R15", "FS", "CS", "CR2", "DR0", "DR3", "DR6", "PKRU", "Code",
];

/// A line of a report's register dump: it starts with a register name and a colon.
pub fn register_line(t: &str) -> bool {
    let t = t.trim_start();
    REGISTERS
        .iter()
        .any(|r| t.strip_prefix(r).is_some_and(|rest| rest.starts_with(':')))
}

/// The rest of a register-dump line a console or collector wrapped onto a line of its own:
/// only hex values (`ffff9a4e40a1e8c0`, `0000000000000(0000)`, `<49>`) and register names
/// (`RCX:`, `knlGS:0000`, a name cut in two). It must hold at least one hex value.
pub fn register_continuation(t: &str) -> bool {
    let mut hex = false;
    let ok = t.split_whitespace().all(|w| {
        w.split([':', '(', ')', '<', '>']).all(|p| {
            if !p.is_empty() && p.bytes().all(|c| c.is_ascii_hexdigit()) {
                hex = true;
                true
            } else {
                p.is_empty()
                    || (p.len() <= 5
                        && p.bytes().all(|c| {
                            c.is_ascii_uppercase() || c.is_ascii_digit() || b"knl".contains(&c)
                        }))
                    || (p.len() <= 6 && "EFLAGS ORIG_RAX knlGS".contains(p))
            }
        })
    });
    ok && hex
}

/// A symbol with no offset (`qi_submit_sync`, `qi_submit_sync()`, `__context_flush_dev_iotlb.part.0`).
fn bare_sym(w: &str) -> Option<&str> {
    let sym = w.strip_suffix("()").unwrap_or(w);
    let first = sym.chars().next()?;
    if !(first.is_ascii_lowercase() || first == '_') || sym.len() < 2 || sym.len() > 128 {
        return None;
    }
    sym.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$')
        .then_some(sym)
}

/// A call-trace line without `+0x..` offsets (`  qi_flush_dev_iotlb`, `? irq_thread`,
/// `pciehp_ist()`, `iommu_bus_notifier [intel_iommu]`): traces pasted into bug reports and
/// patch mails often lose them. A bare word could be anything, so the analyzer asks only for
/// lines inside a call trace it is already reading.
pub fn bare_frame(t: &str) -> Option<Fact> {
    let (reliable, s) = frame_text(t)?;
    let mut words = s.split_whitespace();
    let sym = bare_sym(words.next()?)?;
    match (words.next(), words.next()) {
        (None, _) => {}
        (Some(m), None) if m.starts_with('[') && m.ends_with(']') => {}
        _ => return None,
    }
    Some(Fact::Frame {
        sym: sym.to_string(),
        reliable,
    })
}

fn parse_slot(t: &str, i: usize) -> Option<Fact> {
    let rest = t.get(i + "Slot(".len()..)?;
    let close = rest.find(')')?;
    let slot = rest.get(..close)?.to_string();
    if slot.len() > 64 {
        return None;
    }
    let what_s = rest.get(close + 1..)?.trim_start_matches(':').trim();
    let lw = what_s.to_ascii_lowercase();
    let what = if lw.starts_with("link down") {
        SlotWhat::LinkDown
    } else if lw.starts_with("card not present") {
        SlotWhat::CardNotPresent
    } else if lw.starts_with("card present") {
        SlotWhat::CardPresent
    } else if lw.starts_with("link up") {
        SlotWhat::LinkUp
    } else if lw.contains("cancel") {
        SlotWhat::ButtonCancel
    } else if lw.contains("button") || lw.starts_with("powering off") {
        SlotWhat::Button
    } else {
        SlotWhat::Other
    };
    // "pcieport 0000:00:04.0: pciehp: Slot(1)" or the 4.x "pciehp 0000:00:1c.0:pcie004:".
    let before = t.get(..i)?;
    let port = before
        .split(|c: char| c.is_whitespace())
        .filter_map(|w| parse_bdf(w.get(..w.len().min(13))?))
        .next_back();
    Some(Fact::Slot { port, slot, what })
}

fn parse_task(t: &str) -> Option<Fact> {
    // `CPU: 144 PID: 1422 Comm: irq/57-pciehp Not tainted 5.x #1`
    // `CPU: 3 UID: 0 PID: 1422 Comm: irq/57-pciehp Tainted: G ... 6.12.0 #1`
    let i = t.find("Comm: ")?;
    let cpu = dec_after(t, "CPU: ").map(|c| c as u32);
    let pid = dec_after(t, "PID: ").map(|p| p as u32);
    let rest = t.get(i + "Comm: ".len()..)?;
    // The comm may contain spaces ("kworker/u8:2 Not tainted"): cut at the taint words.
    let end = [" Not tainted", " Tainted:", " Kdump:"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .unwrap_or_else(|| rest.find(' ').unwrap_or(rest.len()));
    let comm: String = rest.get(..end)?.chars().take(64).collect();
    if comm.is_empty() {
        return None;
    }
    let release = rest
        .get(end..)
        .and_then(|r| {
            r.split_whitespace()
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        })
        .map(|s| s.chars().take(96).collect());
    Some(Fact::Task {
        cpu,
        pid,
        comm,
        release,
    })
}

/// `... [comm:pid]` at the end of a soft lockup / hung task header.
fn bracket_comm(t: &str) -> (Option<String>, Option<u32>) {
    let Some(open) = t.rfind('[') else {
        return (None, None);
    };
    let rest = t.get(open + 1..).unwrap_or("").trim_end();
    // Without its `]` the line was cut: the comm before `:` is whole, the PID may not be.
    let closed = rest.ends_with(']');
    let inner = rest.trim_end_matches(']');
    match inner.rsplit_once(':') {
        Some((c, p)) => (
            Some(c.chars().take(64).collect()),
            p.trim().parse::<u32>().ok().filter(|_| closed),
        ),
        None => (None, None),
    }
}

fn parse_dmar_unit(t: &str) -> Option<Fact> {
    // `DMAR: dmar0: reg_base_addr fed90000 ver 1:0 cap d2008c40660462 ecap f050da`
    let i = t.find("reg_base_addr")?;
    let before = t.get(..i)?.trim_end().trim_end_matches(':');
    let name = before.rsplit([' ', ':']).next()?.to_string();
    if !name.starts_with("dmar") || name.len() > 16 {
        return None;
    }
    let version = t.find(" ver ").and_then(|v| {
        t.get(v + 5..)?
            .split_whitespace()
            .next()
            .map(|s| s.chars().take(16).collect())
    });
    Some(Fact::DmarUnit {
        name,
        version,
        address: hex_after(t, "reg_base_addr"),
        cap: hex_after(t, " cap "),
        ecap: hex_after(t, " ecap "),
    })
}

/// Decodes the SID of a Device-TLB (type 3) or PASID-based Device-TLB (type 8) descriptor.
pub fn dev_tlb_sid(qw0: u64) -> Option<Sid> {
    match qw0 & 0xf {
        0x3 => Some(Sid(((qw0 >> 32) & 0xffff) as u16)),
        0x8 => Some(Sid(((qw0 >> 16) & 0xffff) as u16)),
        _ => None,
    }
    .filter(|s| s.0 != 0xffff)
}

/// What `text` says, if anything this analyzer knows about.
pub fn classify(text: &str) -> Option<Fact> {
    let m = keyword_mask(text);
    if m == 0 {
        return None;
    }
    let has = |k: u64| m & k != 0;
    let t = text.trim_end();

    // VT-d queued-invalidation faults (dmar.c qi_dump_fault / qi_check_fault / dmar_fault).
    if has(kw("Invalidation")) {
        if t.contains("Invalidation Time-out Error: SID") {
            if let Some(v) = hex_after(t, "Invalidation Time-out Error: SID") {
                return Some(Fact::IteDetected {
                    sid: sid_of(v),
                    all_ones: v == 0xffff,
                });
            }
            return Some(Fact::Mangled {
                keyword: "Invalidation Time-out Error",
            });
        }
        if t.contains("Invalidation Time-out Error (ITE) cleared") {
            return Some(Fact::Cleared { what: "ITE" });
        }
        if t.contains("Invalidation Queue Error (IQE) cleared") {
            return Some(Fact::Cleared { what: "IQE" });
        }
        if t.contains("Invalidation Completion Error (ICE) cleared") {
            return Some(Fact::Cleared { what: "ICE" });
        }
        if t.contains("Invalidation Queue Error: Reason") {
            return Some(Fact::IqeDetected {
                reason: hex_after(t, "Reason").unwrap_or(0),
            });
        }
        if t.contains("Invalidation Completion Error: SID") {
            return Some(Fact::IceDetected {
                sid: hex_after(t, "Completion Error: SID").and_then(sid_of),
            });
        }
    }
    if has(kw("VT-d detected")) {
        return Some(Fact::Mangled {
            keyword: "VT-d detected",
        });
    }
    if let Some(i) = (has(kw("QI HEAD:") | kw("QI PRIOR:")))
        .then(|| t.find("QI HEAD:").or_else(|| t.find("QI PRIOR:")))
        .flatten()
    {
        let prior = t.get(i..).is_some_and(|r| r.starts_with("QI PRIOR"));
        let rest = t.get(i..).and_then(|r| r.split_once(':')).map(|x| x.1);
        let desc_type = rest
            .and_then(|r| r.split(" qw0").next())
            .map(|s| s.trim().chars().take(64).collect())
            .unwrap_or_default();
        let qw0 = hex_after(t, "qw0 =");
        return Some(Fact::QiDesc {
            prior,
            desc_type,
            qw0,
            dev_tlb_sid: qw0.and_then(dev_tlb_sid),
        });
    }
    if has(kw("fault status")) && t.contains("handling fault status reg") {
        return match hex_after(t, "handling fault status reg") {
            Some(r) => Some(Fact::FaultStatus { reg: r as u32 }),
            None => Some(Fact::Mangled {
                keyword: "handling fault status reg",
            }),
        };
    }
    if has(kw("fault addr") | kw("fault index") | kw("fault reason"))
        && (t.contains("DMAR") || t.contains("DMA "))
        && (t.contains("fault addr") || t.contains("fault index") || t.contains("[fault reason"))
    {
        return Some(Fact::DmaFault {
            device: bracket_sid(t),
        });
    }
    if has(kw("reg_base_addr")) {
        return parse_dmar_unit(t);
    }

    if let Some(phrase) = (has(kw("DMAR") | kw("atchdog")))
        .then(|| cut_tail(t))
        .flatten()
    {
        return Some(Fact::Mangled { keyword: phrase });
    }

    // pciehp.
    if let Some(i) = has(kw("Slot(")).then(|| t.find("Slot(")).flatten() {
        if let Some(f) = parse_slot(t, i) {
            return Some(f);
        }
    }

    // Watchdogs and oopses.
    if has(kw("LOCKUP")) && t.contains("Watchdog detected hard LOCKUP") {
        let cpu = dec_after(t, "hard LOCKUP on cpu").map(|c| c as u32);
        return Some(Fact::ReportHeader {
            kind: ReportKind::HardLockup,
            cpu,
            comm: None,
            pid: None,
            stuck_s: None,
        });
    }
    if has(kw("lockup")) && t.contains("soft lockup - CPU#") {
        let (comm, pid) = bracket_comm(t);
        return Some(Fact::ReportHeader {
            kind: ReportKind::SoftLockup,
            cpu: dec_after(t, "CPU#").map(|c| c as u32),
            comm,
            pid,
            stuck_s: dec_after(t, "stuck for"),
        });
    }
    if has(kw("stall"))
        && (t.contains("detected stall") || t.contains("self-detected stall"))
        && (t.contains("rcu") || t.contains("RCU"))
    {
        return Some(Fact::ReportHeader {
            kind: ReportKind::RcuStall,
            cpu: dec_after(t, "stall on CPU").map(|c| c as u32),
            comm: None,
            pid: None,
            stuck_s: None,
        });
    }
    if let Some(i) = has(kw("NMI backtrace"))
        .then(|| t.find("NMI backtrace for cpu"))
        .flatten()
    {
        let cpu = t
            .get(i..)
            .and_then(|r| dec_after(r, "NMI backtrace for cpu"))
            .map(|c| c as u32);
        return Some(Fact::ReportHeader {
            kind: ReportKind::NmiBacktrace,
            cpu,
            comm: None,
            pid: None,
            stuck_s: None,
        });
    }
    if has(kw("blocked for more than")) {
        // `INFO: task irq/57-pciehp:1422 blocked for more than 122 seconds.`
        let (comm, pid) = t
            .find("task ")
            .and_then(|i| t.get(i + 5..))
            .and_then(|r| r.split(" blocked").next())
            .and_then(|r| r.rsplit_once(':'))
            .map(|(c, p)| (Some(c.chars().take(64).collect()), p.parse().ok()))
            .unwrap_or((None, None));
        return Some(Fact::ReportHeader {
            kind: ReportKind::HungTask,
            cpu: None,
            comm,
            pid,
            stuck_s: dec_after(t, "blocked for more than"),
        });
    }
    if let Some(i) = (has(kw("sysrq: ") | kw("SysRq : ")))
        .then(|| t.find("sysrq: ").or_else(|| t.find("SysRq : ")))
        .flatten()
    {
        if i == 0 {
            let action = t
                .get(i..)
                .and_then(|r| r.split_once(": "))
                .map_or("", |x| x.1);
            return Some(Fact::Sysrq {
                action: action.trim().chars().take(96).collect(),
            });
        }
    }
    if let Some(i) = has(kw("Kernel panic"))
        .then(|| t.find("Kernel panic - not syncing:"))
        .flatten()
    {
        return Some(Fact::Panic {
            why: t
                .get(i + "Kernel panic - not syncing:".len()..)
                .unwrap_or("")
                .trim()
                .chars()
                .take(128)
                .collect(),
        });
    }
    if t.starts_with("WARNING: CPU:")
        || t.starts_with("BUG: ")
        || t.starts_with("Oops:")
        || t.starts_with("general protection fault")
    {
        return Some(Fact::ReportHeader {
            kind: ReportKind::Oops,
            cpu: dec_after(t, "CPU:").map(|c| c as u32),
            comm: None,
            pid: dec_after(t, "PID:").map(|p| p as u32),
            stuck_s: None,
        });
    }
    if has(kw("Comm:")) && t.contains("Comm: ") && (t.starts_with("CPU: ") || t.contains(" PID: "))
    {
        if let Some(f) = parse_task(t) {
            return Some(f);
        }
    }
    if has(kw("+0x")) || (has(kw("RIP:")) && t.trim_start().starts_with("RIP: ")) {
        if let Some(f) = parse_frame(t) {
            return Some(f);
        }
    }
    let marker = t.trim_start();
    if t.starts_with("Call Trace")
        || marker == "<TASK>"
        || marker == "<IRQ>"
        || marker == "</IRQ>"
        || marker == "<NMI>"
        || marker == "</NMI>"
        || t.starts_with("RIP:")
        || t.starts_with("Code:")
    {
        return Some(Fact::TraceContext);
    }
    if marker == "</TASK>"
        || (has(kw("end trace")) && t.contains("---[ end trace"))
        || t.starts_with("Kernel Offset:")
    {
        return Some(Fact::TraceEnd);
    }

    // PCIe error handling around removal.
    if has(kw("DPC")) && t.contains("DPC:") && (t.contains("containment") || t.contains("detected"))
    {
        return Some(Fact::Dpc {
            port: t.split_whitespace().find_map(parse_bdf),
        });
    }
    if has(kw("AER"))
        && t.contains("AER:")
        && (t.contains("error received") || t.contains("Error") || t.contains("error"))
    {
        let device = t
            .rsplit_once("received:")
            .and_then(|(_, r)| r.split_whitespace().find_map(parse_bdf))
            .or_else(|| t.split_whitespace().find_map(parse_bdf));
        return Some(Fact::Aer { device });
    }

    // Device lifecycle and inventory.
    if let Some(i) = has(kw("iommu group"))
        .then(|| t.find(": Removing from iommu group"))
        .flatten()
    {
        if let Some(bdf) = t
            .get(..i)
            .and_then(|b| b.split_whitespace().last())
            .and_then(parse_bdf)
        {
            return Some(Fact::IommuGroupRemove { bdf });
        }
    }
    if has(kw("] type ")) {
        // `pci 0000:01:00.0: [8086:0b60] type 00 class 0x010802`
        let mut words = t.split_whitespace();
        if words.next() == Some("pci") {
            if let (Some(bdf), Some(ids)) = (words.next().and_then(parse_bdf), words.next()) {
                let ids = ids.trim_start_matches('[').trim_end_matches(']');
                if let Some((v, d)) = ids.split_once(':') {
                    if let (Ok(vendor), Ok(device)) =
                        (u16::from_str_radix(v, 16), u16::from_str_radix(d, 16))
                    {
                        return Some(Fact::Enumerated {
                            bdf,
                            vendor,
                            device,
                        });
                    }
                }
            }
        }
    }
    if let Some(i) = has(kw("Linux version"))
        .then(|| t.find("Linux version "))
        .flatten()
    {
        if i < 8 {
            let release = t
                .get(i + "Linux version ".len()..)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("")
                .chars()
                .take(96)
                .collect();
            return Some(Fact::LinuxVersion { release });
        }
    }
    if let Some(i) = has(kw("ommand line:"))
        .then(|| t.find("ommand line: "))
        .flatten()
    {
        if i <= 8 {
            return Some(Fact::CommandLine {
                cmdline: t
                    .get(i + "ommand line: ".len()..)
                    .unwrap_or("")
                    .chars()
                    .take(1024)
                    .collect(),
            });
        }
    }
    if let Some(i) = has(kw("smpboot: CPU0"))
        .then(|| t.find("smpboot: CPU0: "))
        .flatten()
    {
        let rest = t.get(i + "smpboot: CPU0: ".len()..).unwrap_or("");
        let model = rest.split(" (family").next().unwrap_or(rest).trim();
        return Some(Fact::CpuModel {
            model: model.chars().take(128).collect(),
        });
    }
    if t.contains("DMAR") || t.contains("dmar") {
        return None;
    }
    None
}

/// `<driver> ssss:bb:dd.f: ...`: a driver speaking about its device. Checked separately from
/// [`classify`] because it matches most device lines; the caller only wants it for SIDs it
/// already cares about.
pub fn driver_says(text: &str) -> Option<Fact> {
    let (bdf, driver) = driver_and_device(text)?;
    Some(Fact::DriverSays {
        bdf,
        driver: driver.to_string(),
    })
}

/// [`driver_says`] without the allocation: the device and the driver's name in `text`.
pub fn driver_and_device(text: &str) -> Option<(Bdf, &str)> {
    let (drv, rest) = text.split_once(' ')?;
    // Cheap shape check first (`ssss:bb:dd.f`): most lines are not device lines.
    let w = rest.trim_start().as_bytes();
    if w.len() < 12 || w[4] != b':' || w[7] != b':' || w[10] != b'.' {
        return None;
    }
    if drv.is_empty()
        || drv.len() > 32
        || matches!(drv, "pci" | "pcieport" | "pci_bus" | "DMAR:" | "iommu:")
        || !drv
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return None;
    }
    let word = rest.split_whitespace().next()?;
    Some((parse_bdf(word)?, drv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qi_fault_lines() {
        assert_eq!(
            classify("DMAR: VT-d detected Invalidation Time-out Error: SID 0"),
            Some(Fact::IteDetected {
                sid: None,
                all_ones: false
            })
        );
        assert_eq!(
            classify("DMAR: VT-d detected Invalidation Time-out Error: SID af03"),
            Some(Fact::IteDetected {
                sid: Some(Sid(0xaf03)),
                all_ones: false
            })
        );
        assert_eq!(
            classify("DMAR: VT-d detected Invalidation Time-out Error: SID ffff"),
            Some(Fact::IteDetected {
                sid: None,
                all_ones: true
            })
        );
        assert_eq!(dev_tlb_sid(0xffff00000003), None);
        match classify(
            "DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0xaf0300100003, qw1 = 0x7ffffffffffff001",
        ) {
            Some(Fact::QiDesc {
                prior: false,
                desc_type,
                dev_tlb_sid,
                ..
            }) => {
                assert_eq!(desc_type, "Device-TLB Invalidation");
                assert_eq!(dev_tlb_sid, Some(Sid(0xaf03)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify("DMAR: QI PRIOR: Invalidation Wait qw0 = 0x200000025, qw1 = 0x10b8b5e0c"),
            Some(Fact::QiDesc {
                prior: true,
                dev_tlb_sid: None,
                ..
            })
        ));
        assert_eq!(
            classify("DMAR: DRHD: handling fault status reg 40"),
            Some(Fact::FaultStatus { reg: 0x40 })
        );
        assert_eq!(
            classify("DMAR: Invalidation Time-out Error (ITE) cleared"),
            Some(Fact::Cleared { what: "ITE" })
        );
        assert!(matches!(
            classify("DMAR: VT-d detected Invalidation Time-o"),
            None | Some(Fact::Mangled { .. })
        ));
    }

    #[test]
    fn dma_faults_are_not_ite() {
        for l in [
            "DMAR: [DMA Read NO_PASID] Request device [01:00.0] fault addr 0xfffd0000 [fault reason 0x06] PTE Read access is not set",
            "DMAR: DMAR:[DMA Write] Request device [03:00.0] fault addr 7ffff000 ",
            "DMAR: [INTR-REMAP] Request device [f0:1f.0] fault index 0x0 [fault reason 0x25] Blocked a compatibility format interrupt request",
        ] {
            assert!(matches!(classify(l), Some(Fact::DmaFault { .. })), "{l}");
        }
    }

    #[test]
    fn pciehp_lines_old_and_new_prefixes() {
        assert_eq!(
            classify("pcieport 0000:17:01.0: pciehp: Slot(108): Link Down"),
            Some(Fact::Slot {
                port: Some("0000:17:01.0".parse().unwrap()),
                slot: "108".into(),
                what: SlotWhat::LinkDown
            })
        );
        assert!(matches!(
            classify("pciehp 0000:00:1c.0:pcie004: Slot(0-1): Card not present"),
            Some(Fact::Slot {
                port: Some(_),
                what: SlotWhat::CardNotPresent,
                ..
            })
        ));
        assert!(matches!(
            classify("pcieport 0000:00:04.0: pciehp: Slot(1): Attention button pressed"),
            Some(Fact::Slot {
                what: SlotWhat::Button,
                ..
            })
        ));
        assert!(matches!(
            classify("pcieport 0000:00:04.0: pciehp: Slot(1): Powering off due to button press"),
            Some(Fact::Slot {
                what: SlotWhat::Button,
                ..
            })
        ));
    }

    #[test]
    fn watchdogs_tasks_and_frames() {
        assert!(matches!(
            classify("NMI watchdog: Watchdog detected hard LOCKUP on cpu 144"),
            Some(Fact::ReportHeader {
                kind: ReportKind::HardLockup,
                cpu: Some(144),
                ..
            })
        ));
        assert!(matches!(
            classify("watchdog: CPU3: Watchdog detected hard LOCKUP on cpu 5"),
            Some(Fact::ReportHeader {
                kind: ReportKind::HardLockup,
                cpu: Some(5),
                ..
            })
        ));
        match classify("watchdog: BUG: soft lockup - CPU#7 stuck for 22s! [irq/57-pciehp:1422]") {
            Some(Fact::ReportHeader {
                kind: ReportKind::SoftLockup,
                cpu,
                comm,
                pid,
                stuck_s,
            }) => {
                assert_eq!(
                    (cpu, comm.as_deref(), pid, stuck_s),
                    (Some(7), Some("irq/57-pciehp"), Some(1422), Some(22))
                );
            }
            other => panic!("{other:?}"),
        }
        match classify("CPU: 144 PID: 1422 Comm: irq/57-pciehp Not tainted 5.15.0-rc1 #1") {
            Some(Fact::Task {
                cpu,
                pid,
                comm,
                release,
            }) => {
                assert_eq!(
                    (cpu, pid, comm.as_str(), release.as_deref()),
                    (Some(144), Some(1422), "irq/57-pciehp", Some("5.15.0-rc1"))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify("CPU: 3 UID: 0 PID: 88 Comm: kworker/u8:2 Tainted: G        W 6.12.0 #1"),
            Some(Fact::Task { pid: Some(88), .. })
        ));
        assert_eq!(
            classify("RIP: 0010:qi_submit_sync+0x2c0/0x490"),
            Some(Fact::Frame {
                sym: "qi_submit_sync".into(),
                reliable: true
            })
        );
        assert_eq!(
            classify(" ? __dmar_remove_one_dev_info+0x224/0x250"),
            Some(Fact::Frame {
                sym: "__dmar_remove_one_dev_info".into(),
                reliable: false
            })
        );
        assert_eq!(
            classify("[<ffffffff8150a3b1>] qi_flush_dev_iotlb+0xb1/0xd0 [intel_iommu]"),
            Some(Fact::Frame {
                sym: "qi_flush_dev_iotlb".into(),
                reliable: true
            })
        );
        assert_eq!(
            classify("__context_flush_dev_iotlb.part.0+0x5c/0x80"),
            Some(Fact::Frame {
                sym: "__context_flush_dev_iotlb.part.0".into(),
                reliable: true
            })
        );
    }

    #[test]
    fn sysrq_lines() {
        assert_eq!(
            classify("sysrq: Show backtrace of all active CPUs"),
            Some(Fact::Sysrq {
                action: "Show backtrace of all active CPUs".into()
            })
        );
        assert!(matches!(
            classify("SysRq : Show Blocked State"),
            Some(Fact::Sysrq { .. })
        ));
    }

    #[test]
    fn frames_without_offsets() {
        assert_eq!(
            classify("RIP: 0010:qi_submit_sync"),
            Some(Fact::Frame {
                sym: "qi_submit_sync".into(),
                reliable: true
            })
        );
        for (l, sym, reliable) in [
            ("  qi_flush_dev_iotlb", "qi_flush_dev_iotlb", true),
            (" ? irq_forced_thread_fn", "irq_forced_thread_fn", false),
            ("pciehp_ist()", "pciehp_ist", true),
            (
                "iommu_bus_notifier [intel_iommu]",
                "iommu_bus_notifier",
                true,
            ),
            (
                "[<ffffffff8150a3b1>] qi_submit_sync",
                "qi_submit_sync",
                true,
            ),
        ] {
            assert_eq!(
                bare_frame(l),
                Some(Fact::Frame {
                    sym: sym.into(),
                    reliable
                }),
                "{l}"
            );
        }
        for l in [
            "Hardware name: QEMU",
            "the host hung",
            "<TASK>",
            "RAX: 0000",
            "",
        ] {
            assert_eq!(bare_frame(l), None, "{l}");
        }
    }

    #[test]
    fn banner_lines() {
        assert_eq!(
            classify("Linux version 6.1.0-47-amd64 (debian-kernel@lists.debian.org) (gcc-12)"),
            Some(Fact::LinuxVersion {
                release: "6.1.0-47-amd64".into()
            })
        );
        assert!(matches!(
            classify("DMAR: dmar0: reg_base_addr fed90000 ver 1:0 cap d2008c40660462 ecap f050da"),
            Some(Fact::DmarUnit {
                cap: Some(0xd2008c40660462),
                ecap: Some(0xf050da),
                ..
            })
        ));
        assert!(matches!(
            classify(
                "pci 0000:01:00.0: [1af4:1042] type 00 class 0x010000 conventional PCI endpoint"
            ),
            Some(Fact::Enumerated {
                vendor: 0x1af4,
                device: 0x1042,
                ..
            })
        ));
        assert!(matches!(
            driver_says("nvme 0000:01:00.0: enabling device (0000 -> 0002)"),
            Some(Fact::DriverSays { .. })
        ));
    }

    #[test]
    fn register_dump_lines_and_their_wrapped_rest() {
        assert!(register_line("RAX: 0000000000000010 RBX: 0000000000000"));
        assert!(register_line("FS:  0000000000000000(0000) GS:ffff9a4e7"));
        assert!(register_line("PKRU: 55555554"));
        assert!(!register_line("RAXES: 1"));
        assert!(!register_line(
            "pcieport 0000:00:1c.4: pciehp: Slot(4): Link Down"
        ));
        for c in [
            "002 RCX: 0000000000000000",
            "f8c0000(0000) knlGS:0000000000000000",
            "246",
            " 8b 45 00 <49> 63 d6 48 8b 45 00 48 c1",
            "080050033",
            "004 CR4: 00000000007706e0",
            "AGS: 00000246",
        ] {
            assert!(register_continuation(c), "{c}");
        }
        for c in [
            "",
            "Call Trace:",
            "qi_flush_dev_iotlb",
            "ret_from_fork",
            "login: ok",
        ] {
            assert!(!register_continuation(c), "{c}");
        }
    }
}
