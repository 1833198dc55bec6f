//! `itewatch doctor`: can this host be traced, and what will the trace be able to see?
//!
//! Modelled on `tetra probe`, `retsnoop -Vv` and `bpftrace --info`: one pass over the host
//! (kernel release, privileges, BTF and the struct offsets the probes need, ring-buffer
//! support, kallsyms, tracefs, VT-d units, ATS devices, hot-plug slots), each probe target's
//! availability, and which upstream fixes the running kernel appears to carry — each verdict
//! with its evidence, and "unknown" rather than a guess from the version string.
//!
//! Every check degrades: not root, no tracefs, no BTF, no sysfs entries all end in a
//! [`Status::Unknown`] or [`Status::Missing`] line that says why, never a panic. Everything is
//! read through a [`HostView`] rooted at a directory, so tests run on fixture trees.
//!
//! The JSON form (`--json`) is the serialized [`DoctorReport`]; its `schema_version` is a
//! `MAJOR.MINOR` string, as in the report document (crate::document): MINOR for additions,
//! MAJOR when a field is removed, renamed, retyped or changes meaning.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::btf;
use crate::event::DeviceInfo;
use crate::kallsyms::{self, Kallsyms, TraceableFunctions, Tracefs};
use crate::kcode::{self, CodeReport, CodeStatus};
use crate::sysfs::{AtsState, IommuUnit, Slot, Sysfs};
use itewatch_core::knowledge::fixes;

/// Version of the JSON report layout. 2.0: `schema_version` itself became a string (it was
/// the number 1), the type the report document's has. 2.1: `kernel_code`, `fixes[].basis`.
pub const SCHEMA_VERSION: &str = "2.1";

/// Capability bit numbers (include/uapi/linux/capability.h).
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// What the doctor looks at.
#[derive(Clone, Debug)]
pub struct HostView {
    /// Root of the host filesystem: `/` live, a fixture directory in tests. `proc/`, `sys/`
    /// are read below it.
    pub root: PathBuf,
    /// BTF file; `None` = `<root>/sys/kernel/btf/vmlinux`.
    pub btf: Option<PathBuf>,
    /// Run checks that ask the running kernel directly (the BPF ring-buffer feature probe,
    /// `uname`). Off for fixtures.
    pub live: bool,
}

impl HostView {
    /// The running host.
    pub fn live() -> HostView {
        HostView {
            root: PathBuf::from("/"),
            btf: None,
            live: true,
        }
    }

    /// A fixture tree; nothing is asked of the running kernel.
    pub fn fixture(root: impl Into<PathBuf>) -> HostView {
        HostView {
            root: root.into(),
            btf: None,
            live: false,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn btf_path(&self) -> PathBuf {
        self.btf
            .clone()
            .unwrap_or_else(|| self.path("sys/kernel/btf/vmlinux"))
    }

    /// A path as shown in the report: absolute as on the host, whatever the root.
    fn show(&self, p: &Path) -> String {
        match p.strip_prefix(&self.root) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => p.display().to_string(),
        }
    }
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Works / present.
    Ok,
    /// Present with a caveat, or handled another way.
    Warn,
    /// Absent or not possible.
    Missing,
    /// Could not be determined (the detail says why).
    Unknown,
}

impl Status {
    pub fn symbol(self) -> &'static str {
        match self {
            Status::Ok => "✓",
            Status::Warn => "!",
            Status::Missing => "✗",
            Status::Unknown => "?",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

fn check(name: &str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        status,
        detail: detail.into(),
    }
}

/// Effective user and capabilities (`/proc/self/status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Privileges {
    pub euid: Option<u32>,
    /// `CapEff` as hex.
    pub cap_eff: Option<String>,
    pub cap_bpf: Option<bool>,
    pub cap_perfmon: Option<bool>,
    pub cap_sys_admin: Option<bool>,
}

impl Privileges {
    /// Parses `/proc/<pid>/status` text.
    pub fn parse(status: &str) -> Privileges {
        let mut p = Privileges::default();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("Uid:") {
                p.euid = v.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            } else if let Some(v) = line.strip_prefix("CapEff:") {
                let v = v.trim();
                if let Ok(bits) = u64::from_str_radix(v, 16) {
                    let has = |n: u32| Some((bits >> n) & 1 == 1);
                    p.cap_eff = Some(v.to_string());
                    p.cap_bpf = has(CAP_BPF);
                    p.cap_perfmon = has(CAP_PERFMON);
                    p.cap_sys_admin = has(CAP_SYS_ADMIN);
                }
            }
        }
        p
    }

    /// Loading kprobe programs needs CAP_BPF + CAP_PERFMON (5.8+) or CAP_SYS_ADMIN.
    pub fn can_trace(&self) -> Option<bool> {
        let admin = self.cap_sys_admin?;
        Some(admin || (self.cap_bpf? && self.cap_perfmon?))
    }
}

/// One field of the offsets the BPF programs read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OffsetCheck {
    pub field: String,
    pub offset: Option<u32>,
    pub status: Status,
    pub detail: String,
}

/// Availability of one probe target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeCheck {
    /// Function name, or `sys:event` for a tracepoint.
    pub target: String,
    /// `kprobe` or `tracepoint`.
    pub kind: &'static str,
    /// The tool is blind to its core without it.
    pub required: bool,
    pub status: Status,
    /// Out-of-line copies in kallsyms (functions; `None` when kallsyms is unreadable).
    pub copies: Option<usize>,
    pub detail: String,
}

/// Whether the running kernel appears to carry an upstream change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FixCheck {
    /// Upstream commit id (abbreviated).
    pub commit: &'static str,
    pub title: &'static str,
    /// `Ok` = appears present, `Missing` = appears absent, `Unknown` = cannot be seen.
    pub status: Status,
    /// Where the verdict comes from: `code` (the running kernel's machine code, `kcode`),
    /// `btf/kallsyms` (types and symbols the change added), or `none` (nothing could tell).
    pub basis: &'static str,
    /// What the verdict rests on.
    pub evidence: String,
}

/// Overall answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every required probe can attach and the process may load BPF.
    Ready,
    /// Tracing works, with gaps (optional probes, offsets, fixes unknown).
    Degraded,
    /// A required probe or the privilege to load BPF is missing (or unknown).
    NotReady,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct DoctorReport {
    pub schema_version: String,
    pub kernel_release: Option<String>,
    pub verdict: Verdict,
    /// Host-level checks, in display order.
    pub host: Vec<Check>,
    pub privileges: Privileges,
    pub offsets: Vec<OffsetCheck>,
    pub iommu_units: Vec<IommuUnit>,
    /// Devices with ATS enabled (device-TLB invalidations go to these).
    pub ats_devices: Vec<DeviceInfo>,
    pub slots: Vec<Slot>,
    pub probes: Vec<ProbeCheck>,
    pub fixes: Vec<FixCheck>,
    /// The fixes as the running kernel's code shows them (`/proc/kcore`, root only).
    pub kernel_code: CodeReport,
}

/// Function targets of the probe plan, in display order.
pub const FUNCTION_TARGETS: &[&str] = &[
    "qi_submit_sync",
    "qi_flush_dev_iotlb",
    "qi_flush_dev_iotlb_pasid",
    "pciehp_ist",
    "pciehp_unconfigure_device",
    "pci_walk_bus",
    kallsyms::PCI_DEV_SET_DISCONNECTED,
    "pci_doe_disconnected",
    "pci_stop_and_remove_bus_device",
    "iommu_release_device",
];

/// Tracepoints the tool uses or would prefer, `sys:event`.
pub const TRACEPOINT_TARGETS: &[&str] = &[
    "intel_iommu:qi_submit",
    "printk:console",
    "pci:pci_hp_event",
    "pci:pcie_link_event",
];

fn is_required(target: &str) -> bool {
    crate::probe::required_probes().any(|r| r == target || r.split(':').next() == Some(target))
}

/// What the individual sources gave, shared by the checks.
struct Sources {
    btf: Result<btf_rs::Btf, btf::BtfError>,
    kallsyms: Result<Kallsyms, kallsyms::KallsymsError>,
    tracefs: Result<Tracefs, kallsyms::TracefsError>,
    traceable: Result<TraceableFunctions, String>,
    cmdline: Option<String>,
}

/// Builds the report. Never fails: every problem becomes a line of it.
pub fn diagnose(view: &HostView) -> DoctorReport {
    let btf_path = view.btf_path();
    let tracefs = Tracefs::find(&view.root);
    let traceable = match &tracefs {
        Ok(t) => t.traceable_functions().map_err(|e| error_chain(&e)),
        Err(_) => Err("tracefs not mounted".to_string()),
    };
    let src = Sources {
        btf: btf::load(Some(&btf_path)),
        kallsyms: Kallsyms::load_from(&view.path("proc/kallsyms")),
        tracefs,
        traceable,
        cmdline: std::fs::read_to_string(view.path("proc/cmdline"))
            .ok()
            .map(|s| s.trim().to_string()),
    };
    let sysfs = Sysfs::new(&view.root);

    let kernel_release = kernel_release(view);
    let privileges = std::fs::read_to_string(view.path("proc/self/status"))
        .map(|s| Privileges::parse(&s))
        .unwrap_or_default();

    let mut host = Vec::new();
    host.push(privilege_check(&privileges));
    let offsets = offset_checks(&src);
    host.push(btf_check(view, &btf_path, &src, &offsets));
    host.push(ringbuf_check(view, kernel_release.as_deref()));
    host.push(kallsyms_check(&src));
    host.push(tracefs_check(view, &src));

    let iommu_units = sysfs.iommu_units().unwrap_or_default();
    host.extend(iommu_checks(&iommu_units, src.cmdline.as_deref()));

    let (ats_devices, device_check) = match sysfs.pci_devices(crate::event::KTime(0)) {
        Ok(devs) => {
            let unknown: Vec<_> = devs
                .iter()
                .filter_map(|d| match &d.ats {
                    AtsState::Unknown(why) => Some(why.clone()),
                    _ => None,
                })
                .collect();
            let ats: Vec<DeviceInfo> = devs
                .into_iter()
                .filter(|d| d.ats == AtsState::Enabled)
                .map(|d| d.info)
                .collect();
            let check = if !unknown.is_empty() {
                check(
                    "ATS devices",
                    Status::Unknown,
                    format!(
                        "{} with ATS enabled; {} unknown: {}",
                        ats.len(),
                        unknown.len(),
                        unknown[0]
                    ),
                )
            } else if ats.is_empty() {
                check(
                    "ATS devices",
                    Status::Missing,
                    "no device has ATS enabled: no device-TLB invalidations to watch",
                )
            } else {
                check(
                    "ATS devices",
                    Status::Ok,
                    ats.iter()
                        .map(|d| d.bdf.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            };
            (ats, check)
        }
        Err(e) => (
            Vec::new(),
            check("ATS devices", Status::Unknown, error_chain(&e)),
        ),
    };
    host.push(device_check);

    let slots = sysfs.slots().unwrap_or_default();
    let hp: Vec<&Slot> = slots.iter().filter(|s| s.hotplug).collect();
    host.push(if hp.is_empty() {
        check(
            "hot-plug slots",
            Status::Missing,
            "none registered in /sys/bus/pci/slots (no pciehp/acpiphp slot)",
        )
    } else {
        check(
            "hot-plug slots",
            Status::Ok,
            hp.iter()
                .map(|s| match s.port {
                    Some(p) => format!("{} (port {p})", s.name),
                    None => s.name.clone(),
                })
                .collect::<Vec<_>>()
                .join(", "),
        )
    });

    let mut probes: Vec<ProbeCheck> = FUNCTION_TARGETS
        .iter()
        .map(|t| function_check(t, &src))
        .collect();
    probes.extend(TRACEPOINT_TARGETS.iter().map(|t| tracepoint_check(t, &src)));

    let kernel_code = kcode::read_live(
        &view.root,
        src.btf.as_ref().ok().and_then(kcode::pci_dev_layout),
        src.kallsyms.as_ref().ok(),
    );
    host.push(match &kernel_code.error {
        None => check(
            "kernel code",
            Status::Ok,
            format!(
                "{}: {} of {} fixes decided from the code",
                kernel_code.source,
                kernel_code
                    .findings
                    .iter()
                    .filter(|f| f.status != CodeStatus::Unknown)
                    .count(),
                kernel_code.findings.len()
            ),
        ),
        Some(why) => check(
            "kernel code",
            Status::Unknown,
            format!("inline fixes stay unknown: {why}"),
        ),
    });
    let fixes = fix_checks(&src, &kernel_code);

    let verdict = verdict(&privileges, &probes, &host, &offsets);
    DoctorReport {
        schema_version: SCHEMA_VERSION.into(),
        kernel_release,
        verdict,
        host,
        privileges,
        offsets,
        iommu_units,
        ats_devices,
        slots,
        probes,
        fixes,
        kernel_code,
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

fn kernel_release(view: &HostView) -> Option<String> {
    if let Ok(s) = std::fs::read_to_string(view.path("proc/sys/kernel/osrelease")) {
        return Some(s.trim().to_string());
    }
    if !view.live {
        return None;
    }
    // SAFETY: `uts` is a zeroed, writable utsname; uname fills NUL-terminated fields.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// `(major, minor)` of a release string like `6.12.117+deb12-amd64`.
pub fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn privilege_check(p: &Privileges) -> Check {
    let caps: Vec<&str> = [
        (p.cap_bpf, "CAP_BPF"),
        (p.cap_perfmon, "CAP_PERFMON"),
        (p.cap_sys_admin, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(has, _)| *has == Some(true))
    .map(|(_, n)| *n)
    .collect();
    let who = match p.euid {
        Some(0) => "root".to_string(),
        Some(u) => format!("uid {u}"),
        None => "unknown user".to_string(),
    };
    match p.can_trace() {
        Some(true) => check(
            "privileges",
            Status::Ok,
            format!("{who} ({})", caps.join(", ")),
        ),
        Some(false) => check(
            "privileges",
            Status::Missing,
            format!(
                "{who} lacks CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN): cannot load probes; \
                 run as root"
            ),
        ),
        None => check(
            "privileges",
            Status::Unknown,
            "cannot read CapEff from /proc/self/status",
        ),
    }
}

fn offset_checks(src: &Sources) -> Vec<OffsetCheck> {
    let Ok(b) = &src.btf else {
        return btf::offset_fields()
            .map(|f| OffsetCheck {
                field: f.to_string(),
                offset: None,
                status: Status::Unknown,
                detail: "no BTF".into(),
            })
            .collect();
    };
    let (o, notes) = btf::resolve_offsets(b);
    let fields: Vec<&str> = btf::offset_fields().collect();
    let values = offsets_in_order(&o);
    fields
        .iter()
        .zip(values)
        .map(|(f, v)| {
            let note = notes.iter().find(|n| n.field == *f);
            let (status, detail) = match note {
                None => (Status::Ok, String::new()),
                Some(n) if !n.unavailable() => (Status::Warn, n.reason.to_string()),
                Some(n) if n.optional => (Status::Warn, format!("optional: {}", n.reason)),
                Some(n) => (Status::Missing, n.reason.to_string()),
            };
            OffsetCheck {
                field: f.to_string(),
                offset: (v != itewatch_common::OFFSET_NONE).then_some(v),
                status,
                detail,
            }
        })
        .collect()
}

/// The values of [`itewatch_common::Offsets`] in [`btf::offset_fields`] order.
fn offsets_in_order(o: &itewatch_common::Offsets) -> [u32; 17] {
    [
        o.intel_iommu_name,
        o.intel_iommu_segment,
        o.pci_dev_bus,
        o.pci_dev_devfn,
        o.pci_dev_vendor,
        o.pci_dev_device,
        o.pci_dev_subordinate,
        o.pci_dev_dev,
        o.pci_bus_number,
        o.pci_bus_busn_start,
        o.pci_bus_busn_end,
        o.pci_bus_domain_nr,
        o.pci_bus_sysdata,
        o.pci_sysdata_domain,
        o.controller_pcie,
        o.pcie_device_port,
        o.device_bus,
    ]
}

fn btf_check(view: &HostView, path: &Path, src: &Sources, offsets: &[OffsetCheck]) -> Check {
    match &src.btf {
        Ok(_) => {
            let ok = offsets.iter().filter(|o| o.offset.is_some()).count();
            let missing: Vec<&str> = offsets
                .iter()
                .filter(|o| o.status == Status::Missing)
                .map(|o| o.field.as_str())
                .collect();
            if missing.is_empty() {
                check(
                    "BTF",
                    Status::Ok,
                    format!("{}: {ok}/{} offsets", view.show(path), offsets.len()),
                )
            } else {
                check(
                    "BTF",
                    Status::Warn,
                    format!(
                        "{}: {ok}/{} offsets; unavailable: {}",
                        view.show(path),
                        offsets.len(),
                        missing.join(", ")
                    ),
                )
            }
        }
        Err(btf::BtfError::Missing { .. }) => check(
            "BTF",
            Status::Missing,
            format!(
                "no {}: kernel without CONFIG_DEBUG_INFO_BTF; struct fields are not read \
                 (degraded)",
                view.show(path)
            ),
        ),
        Err(e) => check("BTF", Status::Missing, error_chain(e)),
    }
}

fn ringbuf_check(view: &HostView, release: Option<&str>) -> Check {
    let by_version = release.and_then(parse_version).map(|v| v >= (5, 8));
    let weak = match (release, by_version) {
        (Some(r), Some(true)) => format!("kernel {r} ≥ 5.8 (weak signal)"),
        (Some(r), Some(false)) => format!("kernel {r} < 5.8 (weak signal)"),
        _ => "kernel version unknown".to_string(),
    };
    if view.live {
        match aya::sys::is_map_supported(aya::maps::MapType::RingBuf) {
            Ok(true) => return check("ring buffer", Status::Ok, "BPF_MAP_TYPE_RINGBUF: probed"),
            Ok(false) => {
                return check(
                    "ring buffer",
                    Status::Missing,
                    "BPF_MAP_TYPE_RINGBUF not supported (feature probe)",
                )
            }
            Err(e) => {
                return check(
                    "ring buffer",
                    Status::Unknown,
                    format!("feature probe failed ({e}); {weak}"),
                )
            }
        }
    }
    match by_version {
        Some(true) => check("ring buffer", Status::Ok, weak),
        Some(false) => check("ring buffer", Status::Missing, weak),
        None => check("ring buffer", Status::Unknown, weak),
    }
}

fn kallsyms_check(src: &Sources) -> Check {
    match &src.kallsyms {
        Ok(k) if k.addresses_hidden() => check(
            "kallsyms",
            Status::Warn,
            format!(
                "{} symbols, addresses hidden (kptr_restrict): run as root; \
                 no stack symbols, no disconnect-walk matching",
                k.len()
            ),
        ),
        Ok(k) => check("kallsyms", Status::Ok, format!("{} symbols", k.len())),
        Err(e) => check("kallsyms", Status::Unknown, error_chain(e)),
    }
}

fn tracefs_check(view: &HostView, src: &Sources) -> Check {
    match (&src.tracefs, &src.traceable) {
        (Ok(t), Ok(f)) => check(
            "tracefs",
            Status::Ok,
            format!("{}: {} traceable functions", view.show(&t.root), f.len()),
        ),
        (Ok(t), Err(e)) => check(
            "tracefs",
            Status::Warn,
            format!("{} mounted, but {e}", view.show(&t.root)),
        ),
        (Err(_), _) => check(
            "tracefs",
            Status::Unknown,
            "not mounted (mount -t tracefs nodev /sys/kernel/tracing): \
             kprobe-ability and tracepoints cannot be checked",
        ),
    }
}

fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

fn iommu_checks(units: &[IommuUnit], cmdline: Option<&str>) -> Vec<Check> {
    let intel: Vec<&IommuUnit> = units.iter().filter(|u| u.kind == "intel-iommu").collect();
    let opt = cmdline.and_then(|c| cmdline_value(c, "intel_iommu"));
    let mut out = Vec::new();
    if intel.is_empty() {
        let why = match opt {
            Some(v) if v.split(',').any(|o| o == "off") => {
                "disabled on the kernel command line (intel_iommu=off)".to_string()
            }
            _ if units.is_empty() => {
                "no units in /sys/class/iommu (IOMMU off, or not Intel VT-d)".to_string()
            }
            _ => format!("no Intel VT-d unit ({} other IOMMU unit(s))", units.len()),
        };
        out.push(check("intel_iommu", Status::Missing, why));
        out.push(check("scalable mode", Status::Unknown, "no VT-d unit"));
        return out;
    }
    let names: Vec<String> = intel
        .iter()
        .map(|u| {
            let mut s = u.name.clone();
            if let Some(e) = u.decoded {
                let mut f = Vec::new();
                if e.qi {
                    f.push("qi");
                }
                if e.dt {
                    f.push("dev-tlb");
                }
                if e.smts {
                    f.push("smts");
                }
                let _ = write!(s, " [{}]", f.join(" "));
            }
            s
        })
        .collect();
    let dt = intel.iter().any(|u| u.decoded.is_some_and(|e| e.dt));
    out.push(check(
        "intel_iommu",
        if dt { Status::Ok } else { Status::Warn },
        if dt {
            names.join(", ")
        } else {
            format!(
                "{}; no unit supports device-TLB (ecap.dt): no ATS invalidations",
                names.join(", ")
            )
        },
    ));
    let hw_sm = intel.iter().any(|u| u.decoded.is_some_and(|e| e.smts));
    let sm_opt = opt.and_then(|v| {
        v.split(',').find_map(|o| match o {
            "sm_on" => Some(true),
            "sm_off" => Some(false),
            _ => None,
        })
    });
    out.push(match (hw_sm, sm_opt) {
        (false, _) => check(
            "scalable mode",
            Status::Ok,
            "off: hardware lacks ecap.smts (legacy 128-bit descriptors)",
        ),
        (true, Some(true)) => check("scalable mode", Status::Ok, "on (intel_iommu=sm_on)"),
        (true, Some(false)) => check("scalable mode", Status::Ok, "off (intel_iommu=sm_off)"),
        (true, None) => check(
            "scalable mode",
            Status::Unknown,
            "hardware supports it (ecap.smts); on or off depends on \
             CONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON (see dmesg)",
        ),
    });
    let strict = cmdline.and_then(|c| cmdline_value(c, "iommu.strict"));
    out.push(match strict {
        Some("1") => check(
            "invalidation mode",
            Status::Ok,
            "strict (iommu.strict=1): one invalidation per unmap",
        ),
        Some("0") => check(
            "invalidation mode",
            Status::Ok,
            "lazy (iommu.strict=0): batched flush-queue invalidations",
        ),
        _ => check(
            "invalidation mode",
            Status::Unknown,
            "kernel default (usually lazy: batched flush-queue invalidations)",
        ),
    });
    out
}

fn function_check(target: &str, src: &Sources) -> ProbeCheck {
    let required = is_required(target);
    let (copies, clones) = match &src.kallsyms {
        Ok(k) => {
            let all = k.addresses_of(target);
            let exact = all.iter().filter(|s| s.name == target).count();
            let clones: Vec<String> = all
                .iter()
                .filter(|s| s.name != target && s.suffix() != Some(".cold"))
                .map(|s| s.name.clone())
                .collect();
            (Some(exact), clones)
        }
        Err(_) => (None, Vec::new()),
    };
    let in_btf = src.btf.as_ref().ok().map(|b| btf::has_function(b, target));
    let mk = |status, detail: String| ProbeCheck {
        target: target.to_string(),
        kind: "kprobe",
        required,
        status,
        copies,
        detail,
    };

    if target == kallsyms::PCI_DEV_SET_DISCONNECTED {
        return match copies {
            Some(0) => mk(
                Status::Missing,
                "no out-of-line copy in kallsyms; the disconnect walk cannot be recognised".into(),
            ),
            Some(1) => mk(
                Status::Warn,
                "1 copy, static inline and notrace; attach via pci_walk_bus callback instead"
                    .into(),
            ),
            Some(n) => mk(
                Status::Warn,
                format!(
                    "non-unique: {n} copies, static inline and notrace; \
                     attach via pci_walk_bus callback instead"
                ),
            ),
            None => mk(
                Status::Unknown,
                "kallsyms unreadable; static inline and notrace in every kernel seen: \
                 attach via pci_walk_bus callback instead"
                    .into(),
            ),
        };
    }

    match (copies, &src.traceable) {
        (Some(0), _) if clones.is_empty() => mk(
            Status::Missing,
            match in_btf {
                Some(true) => "in BTF but not in kallsyms (module not loaded?)".into(),
                _ => "not in this kernel (kallsyms)".into(),
            },
        ),
        (Some(0), Ok(t)) => {
            let traceable: Vec<&String> = clones.iter().filter(|c| t.contains(c)).collect();
            if traceable.is_empty() {
                mk(
                    Status::Missing,
                    format!(
                        "only compiler clones ({}), not traceable",
                        clones.join(", ")
                    ),
                )
            } else {
                mk(
                    Status::Warn,
                    format!(
                        "only as {}: attach by that name or address",
                        traceable
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        }
        (Some(0), Err(_)) => mk(
            Status::Warn,
            format!("only compiler clones ({})", clones.join(", ")),
        ),
        (Some(n), Ok(t)) => {
            if !t.contains(target) {
                mk(
                    Status::Missing,
                    "present but notrace (absent from available_filter_functions)".into(),
                )
            } else if n > 1 {
                mk(
                    Status::Warn,
                    format!("non-unique: {n} copies; attach by name fails (EADDRNOTAVAIL)"),
                )
            } else {
                mk(Status::Ok, "traceable".into())
            }
        }
        (Some(n), Err(e)) => mk(
            Status::Unknown,
            format!(
                "{n} cop{} in kallsyms; traceability unknown: {e}",
                if n == 1 { "y" } else { "ies" }
            ),
        ),
        (None, Ok(t)) if t.contains(target) => mk(Status::Ok, "traceable".into()),
        (None, Ok(_)) => mk(
            Status::Missing,
            "absent from available_filter_functions".into(),
        ),
        (None, Err(_)) => match in_btf {
            Some(true) => mk(
                Status::Unknown,
                "in BTF; kallsyms and tracefs unreadable, traceability unknown".into(),
            ),
            _ => mk(
                Status::Unknown,
                "kallsyms, tracefs and BTF all unavailable".into(),
            ),
        },
    }
}

fn tracepoint_check(target: &str, src: &Sources) -> ProbeCheck {
    let (sys, name) = target.split_once(':').unwrap_or(("", target));
    let (status, detail) = match &src.tracefs {
        Ok(t) if t.has_event(sys, name) => (Status::Ok, "present".to_string()),
        Ok(_) => (
            Status::Missing,
            match target {
                "pci:pci_hp_event" | "pci:pcie_link_event" => {
                    "absent (added ≈7.0): pciehp is traced with kprobes".to_string()
                }
                _ => "absent".to_string(),
            },
        ),
        Err(_) => (Status::Unknown, "tracefs not mounted".to_string()),
    };
    ProbeCheck {
        target: target.to_string(),
        kind: "tracepoint",
        required: is_required(target),
        status,
        copies: None,
        detail,
    }
}

fn code_status(s: CodeStatus) -> Status {
    match s {
        CodeStatus::Present => Status::Ok,
        CodeStatus::Absent => Status::Missing,
        CodeStatus::Unknown => Status::Unknown,
    }
}

fn fix_checks(src: &Sources, code: &CodeReport) -> Vec<FixCheck> {
    let btf = src.btf.as_ref().ok();
    let ks = src.kallsyms.as_ref().ok();
    let vtd_in_btf = btf.map(|b| btf::has_type(b, "intel_iommu", Some("struct")));
    let mut out = Vec::new();

    // 80a9b50c0b9e + 1a75cc710b95: device_rbtree_find() (iommu.c, global) and
    // intel_iommu.device_rbtree arrive together (6.9, 6.8.2).
    let rb_fn_btf = btf.map(|b| btf::has_function(b, "device_rbtree_find"));
    let rb_fn_ks = ks.map(|k| k.contains("device_rbtree_find"));
    let rb_member = btf
        .filter(|_| vtd_in_btf == Some(true))
        .map(|b| btf::has_member(b, "intel_iommu", "device_rbtree"));
    let mut ev = Vec::new();
    if let Some(v) = rb_fn_btf {
        ev.push(format!("device_rbtree_find in BTF: {}", yes_no(v)));
    }
    if let Some(v) = rb_fn_ks {
        ev.push(format!("in kallsyms: {}", yes_no(v)));
    }
    if let Some(v) = rb_member {
        ev.push(format!("intel_iommu.device_rbtree member: {}", yes_no(v)));
    }
    let any_yes = [rb_fn_btf, rb_fn_ks, rb_member].contains(&Some(true));
    let vtd_known = vtd_in_btf == Some(true) || ks.is_some_and(|k| k.contains("qi_submit_sync"));
    let status = if any_yes {
        Status::Ok
    } else if vtd_known && (rb_fn_ks == Some(false) || rb_member == Some(false)) {
        Status::Missing
    } else {
        ev.push("VT-d code not visible in BTF/kallsyms".into());
        Status::Unknown
    };
    let symbols_evidence = if status == Status::Ok {
        format!(
            "{}; the rbtree was added for this fix, so it is likely present \
                 (still retries forever when the hardware reports ITE SID 0)",
            ev.join("; ")
        )
    } else {
        ev.join("; ")
    };
    let ite_code = code.get("80a9b50c0b9e");
    let (status, basis, evidence) = match ite_code {
        Some(f) if f.status != CodeStatus::Unknown => (
            code_status(f.status),
            "code",
            format!("code: {}; BTF/kallsyms: {symbols_evidence}", f.evidence),
        ),
        Some(f) if status != Status::Unknown => (
            status,
            "btf/kallsyms",
            format!("{symbols_evidence}; code: {}", f.evidence),
        ),
        _ if status != Status::Unknown => (status, "btf/kallsyms", symbols_evidence),
        _ => (status, "none", symbols_evidence),
    };
    out.push(FixCheck {
        commit: fixes::IMPROVE_ITE.commit,
        title: fixes::IMPROVE_ITE.subject,
        status,
        basis,
        evidence,
    });

    // Inline checks: no symbol or type changes, only the code shows them.
    let inline = |fix: fixes::UpstreamFix| {
        let (commit, title) = (fix.commit, fix.subject);
        let (status, evidence) = match code.get(commit) {
            Some(f) => (code_status(f.status), f.evidence.clone()),
            None => (Status::Unknown, "not assessed".to_string()),
        };
        FixCheck {
            commit,
            title,
            status,
            basis: if status == Status::Unknown {
                "none"
            } else {
                "code"
            },
            evidence,
        }
    };
    // The subjects come from the one catalog (itewatch_core::knowledge::fixes).
    for fix in [
        fixes::DONT_ISSUE_DISCONNECTED,
        fixes::FLUSH_ONLY_ACCESSIBLE_SM,
        fixes::SKIP_INACCESSIBLE_LEGACY,
        fixes::HARDLOCKUP_RETRY,
    ] {
        out.push(inline(fix));
    }

    // Not fixes, but they change what the probes see.
    let batch = btf.map(|b| btf::has_type(b, "qi_batch", Some("struct")));
    let status = match batch {
        Some(true) => Status::Ok,
        Some(false) if vtd_in_btf == Some(true) => Status::Missing,
        _ => Status::Unknown,
    };
    out.push(FixCheck {
        commit: "705c1cdf1e73",
        title: "iommu/vt-d: Introduce batched cache invalidation (behaviour, not a fix)",
        status,
        basis: if status == Status::Unknown {
            "none"
        } else {
            "btf/kallsyms"
        },
        evidence: match batch {
            Some(true) => "struct qi_batch in BTF: device-TLB invalidations arrive batched \
                           in qi_submit_sync, not via qi_flush_dev_iotlb"
                .into(),
            Some(false) if vtd_in_btf == Some(true) => {
                "no struct qi_batch in BTF: one qi_flush_dev_iotlb per invalidation".into()
            }
            Some(false) => "VT-d structs not in BTF".into(),
            None => "no BTF".into(),
        },
    });
    out
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn verdict(
    p: &Privileges,
    probes: &[ProbeCheck],
    host: &[Check],
    offsets: &[OffsetCheck],
) -> Verdict {
    let required_ok = probes
        .iter()
        .filter(|c| c.required)
        .all(|c| matches!(c.status, Status::Ok | Status::Warn));
    if p.can_trace() != Some(true) || !required_ok {
        return Verdict::NotReady;
    }
    let gaps = probes.iter().any(|c| c.status != Status::Ok)
        || host.iter().any(|c| c.status != Status::Ok)
        || offsets.iter().any(|o| o.status == Status::Missing);
    if gaps {
        Verdict::Degraded
    } else {
        Verdict::Ready
    }
}

impl DoctorReport {
    /// The aligned text form.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "itewatch doctor: kernel {}",
            self.kernel_release.as_deref().unwrap_or("(unknown)")
        );
        let section = |s: &mut String, title: &str, rows: Vec<(Status, String, String)>| {
            let w = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
            let _ = writeln!(s, "\n{title}");
            for (st, name, detail) in rows {
                let pad = w - name.chars().count();
                let _ = writeln!(s, "  {} {name}{}  {detail}", st.symbol(), " ".repeat(pad));
            }
        };
        section(
            &mut s,
            "Host",
            self.host
                .iter()
                .map(|c| (c.status, c.name.clone(), c.detail.clone()))
                .collect(),
        );
        section(
            &mut s,
            "Struct offsets (BTF)",
            self.offsets
                .iter()
                .map(|o| {
                    let at = o
                        .offset
                        .map(|v| format!("@{v}"))
                        .unwrap_or_else(|| "-".into());
                    let d = if o.detail.is_empty() {
                        at
                    } else {
                        format!("{at}  {}", o.detail)
                    };
                    (o.status, o.field.clone(), d)
                })
                .collect(),
        );
        section(
            &mut s,
            "Probe targets",
            self.probes
                .iter()
                .map(|p| {
                    let req = if p.required { "required" } else { "optional" };
                    (
                        p.status,
                        p.target.clone(),
                        format!("{} {req}: {}", p.kind, p.detail),
                    )
                })
                .collect(),
        );
        section(
            &mut s,
            "Upstream changes (from the kernel's code and BTF/kallsyms, never from the version string)",
            self.fixes
                .iter()
                .map(|f| {
                    (
                        f.status,
                        f.commit.to_string(),
                        format!("{}\n{}[{}] {}", f.title, " ".repeat(18), f.basis, f.evidence),
                    )
                })
                .collect(),
        );
        let _ = writeln!(
            s,
            "\nVerdict: {}",
            match self.verdict {
                Verdict::Ready => "ready",
                Verdict::Degraded => "degraded (tracing works with the gaps above)",
                Verdict::NotReady => "not ready (see ✗ above)",
            }
        );
        let _ = writeln!(s, "Legend: ✓ ok  ! caveat  ✗ missing  ? unknown");
        s
    }
}

/// `itewatch doctor [--json]` on the running host: writes the report, returns whether the
/// host is ready enough to trace (not [`Verdict::NotReady`]).
pub fn run(json: bool, out: &mut impl Write) -> io::Result<bool> {
    run_on(&HostView::live(), json, out)
}

/// [`run`] on any [`HostView`].
pub fn run_on(view: &HostView, json: bool, out: &mut impl Write) -> io::Result<bool> {
    let report = diagnose(view);
    if json {
        serde_json::to_writer_pretty(&mut *out, &report).map_err(io::Error::other)?;
        writeln!(out)?;
    } else {
        out.write_all(report.render_text().as_bytes())?;
    }
    Ok(report.verdict != Verdict::NotReady)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::tests_support::{copy_tree, fixture};

    const KALLSYMS_612: &str = "\
ffffffff81100000 t pci_dev_set_disconnected
ffffffff81100040 T pci_walk_bus
ffffffff81100200 t pci_dev_set_disconnected
ffffffff81100300 T pci_stop_and_remove_bus_device
ffffffff81100400 T pci_doe_disconnected
ffffffff81200000 T qi_submit_sync
ffffffff81200490 T qi_flush_dev_iotlb
ffffffff81200500 T qi_flush_dev_iotlb_pasid
ffffffff81200600 T device_rbtree_find
ffffffff81300000 t pci_dev_set_disconnected
ffffffff81300100 t pciehp_ist
ffffffff81300200 T pciehp_unconfigure_device
ffffffff81400000 t pci_dev_set_disconnected
ffffffff81500000 T iommu_release_device
ffffffff81600000 D pci_bus_type
";

    const STATUS_ROOT: &str = "Name:\titewatch\nUid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n";

    /// The q35 fixture plus a live-like proc/tracefs/BTF, in a temp dir.
    fn host(status: &str, tracefs: bool, btf: bool) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        copy_tree(&fixture("sysfs-qemu-q35"), r);
        std::fs::create_dir_all(r.join("proc/self")).unwrap();
        std::fs::create_dir_all(r.join("proc/sys/kernel")).unwrap();
        std::fs::write(
            r.join("proc/sys/kernel/osrelease"),
            "6.12.117+deb12-amd64\n",
        )
        .unwrap();
        std::fs::write(r.join("proc/self/status"), status).unwrap();
        std::fs::write(r.join("proc/kallsyms"), KALLSYMS_612).unwrap();
        if tracefs {
            let t = r.join("sys/kernel/tracing");
            for ev in ["intel_iommu/qi_submit", "printk/console"] {
                std::fs::create_dir_all(t.join("events").join(ev)).unwrap();
            }
            std::fs::write(
                t.join("available_filter_functions"),
                "pci_walk_bus\npci_stop_and_remove_bus_device\npci_doe_disconnected\n\
                 qi_submit_sync\nqi_flush_dev_iotlb\nqi_flush_dev_iotlb_pasid\n\
                 device_rbtree_find\npciehp_ist\npciehp_unconfigure_device\n\
                 iommu_release_device\n",
            )
            .unwrap();
        }
        if btf {
            std::fs::create_dir_all(r.join("sys/kernel/btf")).unwrap();
            std::fs::write(
                r.join("sys/kernel/btf/vmlinux"),
                crate::btf::testbtf::kernel_like(),
            )
            .unwrap();
        }
        tmp
    }

    fn probe<'a>(r: &'a DoctorReport, t: &str) -> &'a ProbeCheck {
        r.probes.iter().find(|p| p.target == t).unwrap()
    }

    fn host_check<'a>(r: &'a DoctorReport, n: &str) -> &'a Check {
        r.host.iter().find(|c| c.name == n).unwrap()
    }

    #[test]
    fn q35_guest_as_root() {
        let h = host(STATUS_ROOT, true, true);
        let r = diagnose(&HostView::fixture(h.path()));
        assert_eq!(r.kernel_release.as_deref(), Some("6.12.117+deb12-amd64"));
        assert_eq!(host_check(&r, "privileges").status, Status::Ok);
        assert_eq!(host_check(&r, "BTF").status, Status::Ok, "{:?}", r.host);
        assert_eq!(host_check(&r, "ring buffer").status, Status::Ok);
        assert_eq!(host_check(&r, "intel_iommu").status, Status::Ok);
        assert!(host_check(&r, "intel_iommu")
            .detail
            .contains("dmar0 [qi dev-tlb]"));
        assert_eq!(
            host_check(&r, "scalable mode").detail,
            "off: hardware lacks ecap.smts (legacy 128-bit descriptors)"
        );
        assert!(host_check(&r, "invalidation mode")
            .detail
            .starts_with("strict"));
        assert_eq!(
            host_check(&r, "ATS devices").detail,
            "0000:01:00.0, 0000:02:00.0"
        );
        assert_eq!(
            host_check(&r, "hot-plug slots").detail,
            "1 (port 0000:00:04.0), 2 (port 0000:00:05.0)"
        );
        assert_eq!(r.ats_devices.len(), 2);

        assert_eq!(probe(&r, "qi_submit_sync").status, Status::Ok);
        assert!(probe(&r, "qi_submit_sync").required);
        let psd = probe(&r, "pci_dev_set_disconnected");
        assert_eq!(psd.status, Status::Warn);
        assert_eq!(psd.copies, Some(4));
        assert_eq!(
            psd.detail,
            "non-unique: 4 copies, static inline and notrace; \
             attach via pci_walk_bus callback instead"
        );
        assert_eq!(probe(&r, "intel_iommu:qi_submit").status, Status::Ok);
        assert_eq!(probe(&r, "pci:pci_hp_event").status, Status::Missing);

        let ite = &r.fixes[0];
        assert_eq!(ite.commit, "80a9b50c0b9e");
        assert_eq!(ite.status, Status::Ok);
        assert!(ite.evidence.contains("device_rbtree_find in BTF: yes"));
        assert!(r
            .fixes
            .iter()
            .any(|f| f.commit == "4fc82cd907ac" && f.status == Status::Unknown));
        // Everything required is there; optional gaps (pci_hp_event, ...) make it degraded.
        assert_eq!(r.verdict, Verdict::Degraded);
    }

    #[test]
    fn degrades_without_root_tracefs_or_btf() {
        let h = host(
            "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n",
            false,
            false,
        );
        let r = diagnose(&HostView::fixture(h.path()));
        assert_eq!(host_check(&r, "privileges").status, Status::Missing);
        assert!(host_check(&r, "privileges").detail.contains("run as root"));
        assert_eq!(host_check(&r, "BTF").status, Status::Missing);
        assert!(host_check(&r, "BTF")
            .detail
            .contains("CONFIG_DEBUG_INFO_BTF"));
        assert_eq!(host_check(&r, "tracefs").status, Status::Unknown);
        assert!(r.offsets.iter().all(|o| o.status == Status::Unknown));
        let q = probe(&r, "qi_submit_sync");
        assert_eq!(q.status, Status::Unknown);
        assert!(q.detail.contains("traceability unknown"), "{}", q.detail);
        assert_eq!(probe(&r, "printk:console").status, Status::Unknown);
        assert_eq!(r.verdict, Verdict::NotReady);
        // Renders without panicking, and JSON serializes.
        let text = r.render_text();
        assert!(text.contains("Verdict: not ready"));
        assert!(serde_json::to_string(&r).unwrap().contains("\"not_ready\""));
    }

    #[test]
    fn empty_root_is_all_unknown_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let r = diagnose(&HostView::fixture(tmp.path()));
        assert_eq!(r.kernel_release, None);
        assert_eq!(host_check(&r, "privileges").status, Status::Unknown);
        assert_eq!(host_check(&r, "ring buffer").status, Status::Unknown);
        assert_eq!(host_check(&r, "kallsyms").status, Status::Unknown);
        assert_eq!(host_check(&r, "intel_iommu").status, Status::Missing);
        assert_eq!(host_check(&r, "ATS devices").status, Status::Unknown);
        assert_eq!(r.fixes[0].status, Status::Unknown);
        assert_eq!(r.verdict, Verdict::NotReady);
        let mut out = Vec::new();
        assert!(!run_on(&HostView::fixture(tmp.path()), true, &mut out).unwrap());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        // A string, as in the report document: one type for one name.
        assert!(v["schema_version"].is_string(), "{}", v["schema_version"]);
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
    }

    #[test]
    fn hidden_addresses_and_notrace_are_explained() {
        let h = host(STATUS_ROOT, true, true);
        let ks = h.path().join("proc/kallsyms");
        let hidden: String = KALLSYMS_612
            .lines()
            .map(|l| format!("0000000000000000{}\n", &l[16..]))
            .collect();
        std::fs::write(&ks, hidden).unwrap();
        // pciehp_ist made notrace.
        let aff = h
            .path()
            .join("sys/kernel/tracing/available_filter_functions");
        let text = std::fs::read_to_string(&aff)
            .unwrap()
            .replace("pciehp_ist\n", "");
        std::fs::write(&aff, text).unwrap();
        let r = diagnose(&HostView::fixture(h.path()));
        let k = host_check(&r, "kallsyms");
        assert_eq!(k.status, Status::Warn);
        assert!(k.detail.contains("run as root"));
        let ist = probe(&r, "pciehp_ist");
        assert_eq!(ist.status, Status::Missing);
        assert!(ist.detail.contains("notrace"));
        assert_eq!(r.verdict, Verdict::NotReady, "pciehp_ist is required");
    }

    #[test]
    fn text_output_is_aligned() {
        let h = host(STATUS_ROOT, true, true);
        let text = diagnose(&HostView::fixture(h.path())).render_text();
        let probe_lines: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Probe targets")
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect();
        assert_eq!(
            probe_lines.len(),
            FUNCTION_TARGETS.len() + TRACEPOINT_TARGETS.len()
        );
        let col = |l: &str| {
            let byte = [l.find(" kprobe "), l.find(" tracepoint ")]
                .into_iter()
                .flatten()
                .min()
                .unwrap();
            l[..byte].chars().count()
        };
        let c0 = col(probe_lines[0]);
        assert!(probe_lines.iter().all(|l| col(l) == c0), "{text}");
        assert!(text.contains("✓ qi_submit_sync"));
    }

    #[test]
    fn versions_and_privileges_parse() {
        assert_eq!(parse_version("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(parse_version("5.4.0"), Some((5, 4)));
        assert_eq!(parse_version("garbage"), None);
        let p = Privileges::parse("Uid:\t1000\t0\t0\t0\nCapEff:\t000000c000000000\n");
        assert_eq!(p.euid, Some(0));
        assert_eq!(
            (p.cap_bpf, p.cap_perfmon, p.cap_sys_admin),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(p.can_trace(), Some(true));
        assert_eq!(Privileges::parse("").can_trace(), None);
        assert_eq!(
            cmdline_value("a intel_iommu=on,sm_on b", "intel_iommu"),
            Some("on,sm_on")
        );
    }

    #[test]
    fn live_host_does_not_panic() {
        let mut out = Vec::new();
        run(false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Verdict:"));
    }
}
