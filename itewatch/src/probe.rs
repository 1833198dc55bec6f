//! The loader: loads the BPF object with the running kernel's offsets, attaches every probe
//! it can and reports, per probe, how (or why not) in an attach plan.
//!
//! Only this module (and `record`) touches the kernel. Missing optional probes degrade the
//! tool; they never stop it. The plan is written into every trace header, so a report always
//! says what could and could not be seen.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{FEntry, FExit, KProbe, TracePoint},
    Ebpf, EbpfLoader,
};
use itewatch_common::{Config, Counter, COUNTER_SLOTS, OFFSET_NONE};

use crate::btf;
use crate::kallsyms::{format_field_offset, Kallsyms, Tracefs};
use crate::trace::{ProbeStatus, ProgramStats};

/// The BPF object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/itewatch"));

/// Whether this build carries the BPF programs.
pub fn has_bpf_object() -> bool {
    !BPF_OBJECT.is_empty()
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("this build has no BPF programs (it was built with AYA_BUILD_SKIP=1); replay or simulate work, live tracing does not")]
    NoObject,
    #[error("tracing needs root (or CAP_BPF + CAP_PERFMON); run with sudo, or use `itewatch replay`/`simulate`")]
    NotPrivileged,
    #[error("cannot read the kernel's BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("loading the BPF programs failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no probe attached: {0}")]
    NothingAttached(String),
}

pub use itewatch_core::knowledge::probes::{
    is_required, probe_names, probed_functions, required_probes,
};
use itewatch_core::knowledge::probes::{Attempt, Mechanism, SPECS};

/// Options for [`Probes::attach`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// BTF file; `None` = /sys/kernel/btf/vmlinux.
    pub btf: Option<PathBuf>,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ringbuf_bytes: u32,
    /// Root of the host filesystem for kallsyms and tracefs (tests).
    pub host_root: PathBuf,
    /// Entries of the kernel stack map. The reader deletes the ids it has read once an eighth of
    /// them are taken (see `live::StackTable`), so this bounds memory, not how many distinct
    /// stacks a long run can see.
    pub stack_entries: u32,
}

/// Default size of the kernel stack map (entries of 127 frames: about 2 MiB).
pub const DEFAULT_STACK_ENTRIES: u32 = 2048;

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            btf: None,
            ringbuf_bytes: 4 << 20,
            host_root: PathBuf::from("/"),
            stack_entries: DEFAULT_STACK_ENTRIES,
        }
    }
}

/// The loaded, attached programs and the maps userspace reads.
pub struct Probes {
    // Held for its links: dropping it detaches every probe.
    ebpf: Ebpf,
    pub plan: Vec<ProbeStatus>,
    pub config: Config,
    /// Notes from load time (offsets that BTF did not give, kallsyms state).
    pub notes: Vec<String>,
    pub kallsyms: Option<Kallsyms>,
    /// `pci_dev`'s layout from the same BTF read, for reading the kernel's code (kcode).
    pub pci_dev: Option<crate::kcode::PciDevLayout>,
    /// Root of the host filesystem it was attached on (kallsyms is read again from there).
    pub host_root: PathBuf,
    /// Entries of the kernel stack map.
    pub stack_entries: u32,
}

fn is_privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    // CAP_BPF (39) and CAP_PERFMON (38) in the effective set.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 39) != 0 && caps & (1 << 38) != 0)
}

/// Builds the BPF programs' configuration from the running kernel: struct offsets from BTF,
/// `pci_bus_type` and the `pci_dev_set_disconnected` copies from kallsyms, the printk
/// tracepoint's message field from tracefs.
fn build_config(
    opts: &LoadOptions,
    notes: &mut Vec<String>,
) -> Result<(Config, Option<Kallsyms>, Option<crate::kcode::PciDevLayout>), ProbeError> {
    // Only the offsets (and pci_dev's layout) are kept: the BTF is gone before kallsyms is
    // read, so the two never peak together.
    let (offsets, offset_notes, pci_dev) = {
        let b = btf::load(opts.btf.as_deref())?;
        let (offsets, notes) = btf::resolve_offsets(&b);
        (offsets, notes, crate::kcode::pci_dev_layout(&b))
    };
    for n in offset_notes.iter().filter(|n| n.unavailable()) {
        notes.push(format!("offset {n}"));
    }
    let mut config = Config {
        offsets,
        ..Config::DEFAULT
    };
    let kallsyms = match Kallsyms::load_from(&opts.host_root.join("proc/kallsyms")) {
        Ok(k) => Some(k),
        Err(e) => {
            notes.push(format!("kallsyms: {e}"));
            None
        }
    };
    if let Some(k) = &kallsyms {
        match k.unique_address("pci_bus_type") {
            Ok(a) => config.pci_bus_type = a,
            Err(e) => notes.push(format!(
                "pci_bus_type: {e}; IOMMU releases will not name their PCI device"
            )),
        }
        match k.disconnect_callbacks() {
            Ok((cbs, dropped)) => {
                config.disconnect_callbacks = cbs;
                if dropped > 0 {
                    notes.push(format!(
                        "{dropped} pci_dev_set_disconnected copies beyond the {} tracked",
                        cbs.len()
                    ));
                }
            }
            Err(e) => notes.push(format!("pci_dev_set_disconnected copies: {e}")),
        }
    }
    match Tracefs::find(&opts.host_root) {
        Ok(t) => {
            match t.event_format("printk", "console") {
                Ok(f) => {
                    config.console_msg_loc = format_field_offset(&f, "msg").unwrap_or(OFFSET_NONE)
                }
                Err(e) => notes.push(format!("printk:console format: {e}")),
            }
            // Only 7.x kernels have it; elsewhere its probe says "not found" on its own.
            if let Ok(f) = t.event_format("pci", "pci_hp_event") {
                config.hp_port_loc = format_field_offset(&f, "port_name").unwrap_or(OFFSET_NONE);
                config.hp_slot_loc = format_field_offset(&f, "slot").unwrap_or(OFFSET_NONE);
                config.hp_event_off = format_field_offset(&f, "event").unwrap_or(OFFSET_NONE);
            }
        }
        Err(e) => notes.push(format!("tracefs: {e}")),
    }
    Ok((config, kallsyms, pci_dev))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Explains an attach error in the terms of vm-notes.md.
fn explain(target: &str, err: &str) -> String {
    let hint = if err.contains("event_source/devices/kprobe") {
        " (this kernel has no kprobe support: no kprobe PMU)"
    } else if err.contains("os error 99") || err.contains("EADDRNOTAVAIL") {
        " (non-unique symbol: several static copies share the name)"
    } else if err.contains("os error 22") && target == "pci_dev_set_disconnected" {
        " (notrace copies of a static inline function)"
    } else if err.contains("os error 524") {
        " (the kernel cannot build a BPF trampoline for this function, e.g. too many arguments)"
    } else if err.contains("os error 2)") || err.contains("os error 2 ") {
        " (no such symbol in this kernel)"
    } else {
        ""
    };
    format!("{target}: {err}{hint}")
}

impl Probes {
    /// Loads the programs and attaches everything it can.
    pub fn attach(opts: &LoadOptions) -> Result<Probes, ProbeError> {
        if !has_bpf_object() {
            return Err(ProbeError::NoObject);
        }
        if !is_privileged() {
            return Err(ProbeError::NotPrivileged);
        }
        let mut notes = Vec::new();
        let (config, kallsyms, pci_dev) = build_config(opts, &mut notes)?;
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", opts.ringbuf_bytes)
            .map_max_entries("STACKS", opts.stack_entries.max(2))
            .load(BPF_OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;
        let traceable = Tracefs::find(&opts.host_root)
            .ok()
            .and_then(|t| t.traceable_functions().ok());
        // Kernel BTF for the trampolines' targets, parsed on first use.
        let mut btf = KernelBtf::Unread(opts.btf.clone());
        let mut plan = Vec::new();
        for spec in SPECS {
            let mut status = ProbeStatus {
                name: spec.name.to_string(),
                state: "unavailable".into(),
                mechanism: None,
                detail: None,
            };
            if spec.name == "pci_walk_bus" && config.disconnect_callbacks.iter().all(|&c| c == 0) {
                status.detail = Some("no pci_dev_set_disconnected copy found in kallsyms to match the walk's callback".into());
                plan.push(status);
                continue;
            }
            let mut errors = Vec::new();
            for (i, a) in spec.attempts.iter().enumerate() {
                match attach_one(&mut ebpf, a, &mut btf) {
                    Ok(()) => {
                        status.state = if i == 0 { "attached" } else { "fell-back" }.into();
                        status.mechanism = Some(format!("{}:{}", a.mechanism.name(), a.target));
                        break;
                    }
                    Err(e) => {
                        let mut why = format!("{}: {}", a.mechanism.name(), explain(a.target, &e));
                        if let Some(t) = &traceable {
                            if a.mechanism != Mechanism::Tracepoint && !t.contains(a.target) {
                                why.push_str(" [absent from available_filter_functions]");
                            }
                        }
                        errors.push(why);
                    }
                }
            }
            if status.mechanism.is_some() && !errors.is_empty() {
                status.detail = Some(format!("first choice failed: {}", errors.join("; ")));
            } else if status.mechanism.is_none() {
                status.detail = Some(errors.join("; "));
            }
            plan.push(status);
        }
        if !plan.iter().any(|p| p.mechanism.is_some()) {
            let details: Vec<String> = plan.iter().filter_map(|p| p.detail.clone()).collect();
            // A kernel without kprobe support fails every kprobe the same way: say it once.
            let (no_kprobes, other): (Vec<String>, Vec<String>) = details
                .into_iter()
                .partition(|d| d.contains("event_source/devices/kprobe"));
            let mut parts = Vec::new();
            if !no_kprobes.is_empty() {
                parts.push(
                    "this kernel has no kprobe support (no /sys/bus/event_source/devices/kprobe)"
                        .to_string(),
                );
            }
            parts.extend(other);
            let why = parts.join("; ");
            return Err(ProbeError::NothingAttached(why));
        }
        Ok(Probes {
            ebpf,
            plan,
            config,
            notes,
            kallsyms,
            pci_dev,
            host_root: opts.host_root.clone(),
            stack_entries: opts.stack_entries.max(2),
        })
    }

    /// Required probes that did not attach.
    pub fn missing_required(&self) -> Vec<&str> {
        required_probes()
            .filter(|n| {
                !self
                    .plan
                    .iter()
                    .any(|p| p.name == *n && p.mechanism.is_some())
            })
            .collect()
    }

    /// The required probes that did not attach, each with why (`qi_submit_sync (fentry: ...
    /// Verifier output: ...)`): what a refusal or a blind screen must say.
    pub fn missing_required_why(&self) -> Vec<String> {
        self.missing_required()
            .into_iter()
            .map(|n| {
                let detail = self
                    .plan
                    .iter()
                    .find(|p| p.name == n)
                    .and_then(|p| p.detail.as_deref())
                    .unwrap_or("not attached");
                format!("{n} ({detail})")
            })
            .collect()
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })
    }

    /// Takes the stack map (once).
    pub fn take_stacks(&mut self) -> Result<StackTraceMap<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("STACKS")
            .ok_or(ProbeError::MissingMap("STACKS"))?;
        StackTraceMap::try_from(map).map_err(|source| ProbeError::Map {
            name: "STACKS",
            source,
        })
    }

    /// Takes the per-CPU failure counters (once).
    pub fn take_counters(&mut self) -> Result<Counters, ProbeError> {
        let map = self
            .ebpf
            .take_map("COUNTERS")
            .ok_or(ProbeError::MissingMap("COUNTERS"))?;
        let arr = PerCpuArray::try_from(map).map_err(|source| ProbeError::Map {
            name: "COUNTERS",
            source,
        })?;
        Ok(Counters { arr })
    }

    /// Per-program run statistics (meaningful while `aya::sys::enable_stats` is held).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut out = Vec::new();
        for (name, prog) in self.ebpf.programs() {
            if let Ok(info) = prog.info() {
                let misses = prog
                    .fd()
                    .ok()
                    .and_then(|fd| recursion_misses(fd.as_fd()))
                    .unwrap_or(0);
                out.push(ProgramStats {
                    program: name.to_string(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    misses,
                });
            }
        }
        out.sort_by(|a, b| a.program.cmp(&b.program));
        out
    }
}

/// The kernel's BTF as aya reads it (for fentry/fexit targets), read once, on first use.
enum KernelBtf {
    Unread(Option<PathBuf>),
    Read(Result<aya::Btf, String>),
}

impl KernelBtf {
    fn get(&mut self) -> Result<&aya::Btf, String> {
        if let KernelBtf::Unread(path) = self {
            let r = match path {
                Some(p) => aya::Btf::parse_file(p, aya::Endianness::default()),
                None => aya::Btf::from_sys_fs(),
            };
            *self = KernelBtf::Read(r.map_err(|e| format!("no kernel BTF for a trampoline: {e}")));
        }
        match self {
            KernelBtf::Read(r) => r.as_ref().map_err(Clone::clone),
            KernelBtf::Unread(_) => Err("kernel BTF not read".into()),
        }
    }
}

fn attach_one(ebpf: &mut Ebpf, a: &Attempt, btf: &mut KernelBtf) -> Result<(), String> {
    let prog = ebpf
        .program_mut(a.program)
        .ok_or_else(|| format!("program {} missing from the object", a.program))?;
    let chain = |e: aya::programs::ProgramError| error_chain(&e);
    match a.mechanism {
        Mechanism::Fentry => {
            let p: &mut FEntry = prog.try_into().map_err(chain)?;
            if p.fd().is_err() {
                p.load(a.target, btf.get()?).map_err(chain)?;
            }
            p.attach().map(|_| ()).map_err(chain)
        }
        Mechanism::Fexit => {
            let p: &mut FExit = prog.try_into().map_err(chain)?;
            if p.fd().is_err() {
                p.load(a.target, btf.get()?).map_err(chain)?;
            }
            p.attach().map(|_| ()).map_err(chain)
        }
        Mechanism::Kprobe | Mechanism::Kretprobe => {
            let p: &mut KProbe = prog.try_into().map_err(chain)?;
            if p.fd().is_err() {
                p.load().map_err(chain)?;
            }
            p.attach(a.target, 0).map(|_| ()).map_err(chain)
        }
        Mechanism::Tracepoint => {
            let (cat, name) = a.target.split_once(':').ok_or("bad tracepoint name")?;
            let p: &mut TracePoint = prog.try_into().map_err(chain)?;
            if p.fd().is_err() {
                p.load().map_err(chain)?;
            }
            p.attach(cat, name).map(|_| ()).map_err(chain)
        }
    }
}

/// `bpf_prog_info.recursion_misses` of a loaded program (aya 0.14 does not expose it).
///
/// `BPF_OBJ_GET_INFO_BY_FD` with the UAPI `struct bpf_prog_info` (include/uapi/linux/bpf.h;
/// a stable ABI: the kernel fills the fields it knows and leaves the rest zero).
/// `recursion_misses` is at byte 208, after `run_time_ns` (192) and `run_cnt` (200).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const INFO_LEN: usize = 224;
    const RECURSION_MISSES: usize = 208;
    let mut info = [0u64; INFO_LEN / 8];
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points to a valid `bpf_attr` prefix for this command and `info` to
    // INFO_LEN writable bytes that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    (rc == 0).then(|| info[RECURSION_MISSES / 8])
}

/// Totals of the BPF side's per-CPU failure counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterTotals {
    pub ringbuf_full: u64,
    pub read_failed: u64,
    pub return_without_entry: u64,
    pub start_map_full: u64,
    /// Kernel stacks that could not be taken (stack map full, or hash bucket taken).
    pub stack_failed: u64,
}

pub struct Counters {
    arr: PerCpuArray<MapData, u64>,
}

impl Counters {
    /// Sums every counter over CPUs. A failed read counts as zero (and is rare: the map is
    /// an array of fixed size).
    pub fn totals(&self) -> CounterTotals {
        let sum = |c: Counter| -> u64 {
            if c as u32 >= COUNTER_SLOTS {
                return 0;
            }
            self.arr
                .get(&(c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        CounterTotals {
            ringbuf_full: sum(Counter::RingbufFull),
            read_failed: sum(Counter::ReadFailed),
            return_without_entry: sum(Counter::ReturnWithoutEntry),
            start_map_full: sum(Counter::StartMapFull),
            stack_failed: sum(Counter::StackFailed),
        }
    }
}

/// `/proc/sys/kernel/...`-style read of a small text file, trimmed.
pub fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_names_a_program_in_the_bpf_crate() {
        let src = include_str!("../../itewatch-ebpf/src/main.rs");
        for s in SPECS {
            for a in s.attempts {
                assert!(
                    src.contains(&format!("pub fn {}(", a.program)),
                    "{} has no BPF program {}",
                    s.name,
                    a.program
                );
                // The program's section must match the mechanism the loader uses for it.
                let macro_name = match a.mechanism {
                    Mechanism::Fentry => "#[fentry(",
                    Mechanism::Fexit => "#[fexit(",
                    Mechanism::Kprobe => "#[kprobe]",
                    Mechanism::Kretprobe => "#[kretprobe]",
                    Mechanism::Tracepoint => "#[tracepoint]",
                };
                let at = src.find(&format!("pub fn {}(", a.program)).unwrap_or(0);
                let before = &src[..at];
                let attr = before.rfind("#[").map(|i| &before[i..]).unwrap_or("");
                assert!(
                    attr.starts_with(macro_name),
                    "{}: program {} is not a {:?} program ({attr:?})",
                    s.name,
                    a.program,
                    a.mechanism
                );
            }
        }
    }

    #[test]
    fn a_kernel_without_kprobes_is_named_as_such() {
        let e = explain(
            "qi_submit_sync",
            "`/sys/bus/event_source/devices/kprobe/type`: No such file or directory (os error 2)",
        );
        assert!(e.contains("no kprobe support"), "{e}");
    }

    #[test]
    fn attach_errors_are_explained() {
        assert!(explain(
            "pci_dev_set_disconnected",
            "perf_event_open failed (os error 99)"
        )
        .contains("non-unique"));
        assert!(
            explain("pci_dev_set_disconnected", "Invalid argument (os error 22)")
                .contains("notrace")
        );
    }

    #[test]
    fn a_trampoline_the_kernel_cannot_build_is_explained() {
        // 6.1 on qi_flush_dev_iotlb_pasid (7 arguments), seen in the VM matrix.
        let e = explain(
            "qi_flush_dev_iotlb_pasid",
            "`bpf_raw_tracepoint_open` failed: No error information (os error 524)",
        );
        assert!(e.contains("trampoline"), "{e}");
    }

    #[test]
    fn the_hot_path_prefers_trampolines_and_falls_back_to_kprobes() {
        for name in [
            "qi_submit_sync",
            "qi_submit_sync:return",
            "qi_flush_dev_iotlb",
        ] {
            let spec = SPECS.iter().find(|s| s.name == name).expect(name);
            let kinds: Vec<Mechanism> = spec.attempts.iter().map(|a| a.mechanism).collect();
            assert!(
                matches!(
                    kinds.as_slice(),
                    [
                        Mechanism::Fentry | Mechanism::Fexit,
                        Mechanism::Kprobe | Mechanism::Kretprobe
                    ]
                ),
                "{name}: {kinds:?}"
            );
            // Both ways in target the same function: the fallback loses nothing.
            assert_eq!(spec.attempts[0].target, spec.attempts[1].target);
        }
    }

    #[test]
    fn the_core_probes_are_required() {
        let req: Vec<_> = required_probes().collect();
        assert!(req.contains(&"qi_submit_sync") && req.contains(&"qi_submit_sync:return"));
        assert!(!req.contains(&"pci_dev_set_disconnected"));
    }
}
