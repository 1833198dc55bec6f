//! The host a trace is recorded on: what goes into the trace header's `host` and `hardware`
//! (docs/trace-format.md) and from there into the report document's `host` section.
//!
//! Everything is read below a root directory (`/` live, a fake tree in tests):
//! - `proc/sys/kernel/{hostname,osrelease}`, `proc/cmdline`;
//! - `proc/cpuinfo` → the first "model name";
//! - `sys/class/iommu/*/intel-iommu/{cap,ecap,version,address}` → the VT-d units
//!   ([`crate::sysfs::Sysfs::iommu_units`]);
//! - `boot/config-<release>` → `CONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON`, the default the
//!   command line overrides;
//! - `sys/bus/pci/devices/*/config` → ATS enabled on some device (needs root beyond 64 bytes).
//!
//! Nothing here fails: an unreadable file is an unknown (`None`), never a guess.

use std::path::Path;

use crate::sysfs::Sysfs;
use crate::trace::{HostHardware, HostInfo, HostIommu, ProbeStatus, Source, TraceHeader};

/// What [`collect_host`] found: the header's `host` and `hardware`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CollectedHost {
    pub info: HostInfo,
    pub hardware: HostHardware,
}

impl CollectedHost {
    /// Puts both into a trace header (the recorder calls this before writing it).
    pub fn apply(self, header: &mut TraceHeader) {
        header.host = self.info;
        header.hardware = Some(self.hardware);
    }
}

fn read_trim(root: &Path, rel: &str) -> Option<String> {
    // Bounded: these files are small, but a fake or hostile root could hold anything.
    let f = std::fs::File::open(root.join(rel)).ok()?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, 1 << 20), &mut s).ok()?;
    Some(s.trim().to_string())
}

/// The first `model name` of `/proc/cpuinfo` (x86); `None` when there is none.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        let v = v.trim();
        (k.trim() == "model name" && !v.is_empty()).then(|| v.chars().take(256).collect())
    })
}

/// `CONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON` from a kernel config: `Some(true)` when
/// `=y`, `Some(false)` when unset or `is not set`, `None` for a config without VT-d at all.
pub fn sm_default_from_config(config: &str) -> Option<bool> {
    let mut intel_iommu = false;
    for l in config.lines() {
        let l = l.trim();
        if l == "CONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON=y" {
            return Some(true);
        }
        if l == "# CONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON is not set" {
            return Some(false);
        }
        if l == "CONFIG_INTEL_IOMMU=y" {
            intel_iommu = true;
        }
    }
    intel_iommu.then_some(false)
}

pub use itewatch_core::knowledge::iommu::scalable_mode;

/// Collects the host facts below `root` (`/` on a live system). Never fails: what cannot be
/// read stays unknown.
/// The trace header of a live capture on this host, as `record`, `agent` and `live` write or
/// report it: this host's facts (read now: a device's ATS state needs the privileges that
/// `agent` drops later), the probes as attached, the fixes as the kernel's own code shows
/// them ([`crate::live::LiveReader::kernel_fixes`]) and the capture's monotonic start.
pub fn live_header(
    probes: &[ProbeStatus],
    kernel_fixes: Vec<crate::trace::KernelFixStatus>,
    started_mono_ns: u64,
) -> TraceHeader {
    let mut header = TraceHeader::new(Source::Live);
    collect_host(Path::new("/")).apply(&mut header);
    header.kernel_fixes = kernel_fixes;
    header.probes = probes.to_vec();
    header.started_mono_ns = Some(started_mono_ns);
    header
}

pub fn collect_host(root: &Path) -> CollectedHost {
    let info = HostInfo {
        hostname: read_trim(root, "proc/sys/kernel/hostname").unwrap_or_default(),
        kernel_release: read_trim(root, "proc/sys/kernel/osrelease").unwrap_or_default(),
        kernel_cmdline: read_trim(root, "proc/cmdline").unwrap_or_default(),
    };
    let sysfs = Sysfs::new(root);
    let units = sysfs.iommu_units().unwrap_or_default();
    let smts: Vec<Option<bool>> = units
        .iter()
        .filter(|u| u.kind == "intel-iommu")
        .map(|u| u.decoded.map(|d| d.smts))
        .collect();
    let config_default = (!info.kernel_release.is_empty())
        .then(|| read_trim(root, &format!("boot/config-{}", info.kernel_release)))
        .flatten()
        .and_then(|c| sm_default_from_config(&c));
    let (sm, basis) = if smts.is_empty() {
        (None, None)
    } else {
        let (v, why) = scalable_mode(
            (!info.kernel_cmdline.is_empty()).then_some(info.kernel_cmdline.as_str()),
            config_default,
            &smts,
        );
        (v, Some(why))
    };
    let ats_in_use = sysfs
        .pci_devices(crate::event::KTime(0))
        .ok()
        .and_then(|devs| {
            let ats: Vec<Option<bool>> = devs.iter().map(|d| d.info.ats).collect();
            if ats.contains(&Some(true)) {
                Some(true)
            } else if !ats.is_empty() && ats.iter().all(|a| a.is_some()) {
                Some(false)
            } else {
                None
            }
        });
    let hex = |v: Option<u64>| v.map(|x| format!("{x:x}"));
    CollectedHost {
        hardware: HostHardware {
            cpu_model: read_trim(root, "proc/cpuinfo").and_then(|c| cpu_model(&c)),
            iommu_units: units
                .into_iter()
                .map(|u| HostIommu {
                    name: u.name,
                    kind: u.kind,
                    version: u.version,
                    address: hex(u.address),
                    cap: hex(u.cap),
                    ecap: hex(u.ecap),
                })
                .collect(),
            scalable_mode: sm,
            scalable_mode_basis: basis,
            ats_in_use,
        },
        info,
    }
}

/// Takes this process's memory out of transparent huge page collapsing
/// (`prctl(PR_SET_THP_DISABLE)`, inherited by threads and children).
///
/// Why: when the race hits, a CPU spins in `qi_submit_sync` with interrupts off, and any
/// cross-CPU call that waits for every CPU then stalls the CPU that makes it. In the 6.1 ITE
/// storm run the surviving CPU stopped in `smp_call_function_many_cond`, called by
/// khugepaged: `collapse_huge_page` → `tlb_remove_table_smp_sync` (symbolized from the
/// harness's `cpus.txt`; docs/vm-tests.md). The tracer, whose memory is the busiest on a host
/// that is otherwise waiting, must not hand khugepaged the work that triggers it. Best effort:
/// a kernel without THP refuses it, and nothing else changes.
pub fn keep_memory_off_khugepaged() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// A Sapphire Rapids-like host: two VT-d units with SMTS, 6.12 kernel, sm_on.
    fn fake_host(root: &Path, cmdline: &str) {
        put(root, "proc/sys/kernel/hostname", "node17\n");
        put(root, "proc/sys/kernel/osrelease", "6.12.73-amd64\n");
        put(root, "proc/cmdline", cmdline);
        put(
            root,
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n",
        );
        for (n, addr) in [("dmar0", "ee7fc000"), ("dmar1", "c87fc000")] {
            let d = format!("sys/class/iommu/{n}/intel-iommu");
            put(root, &format!("{d}/cap"), "9ed008c40780466\n");
            put(root, &format!("{d}/ecap"), "3ee9e86f050df\n");
            put(root, &format!("{d}/version"), "4:0\n");
            put(root, &format!("{d}/address"), &format!("{addr}\n"));
        }
    }

    #[test]
    fn a_fake_sapphire_rapids_host_is_read_fully() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path(), "BOOT_IMAGE=/vmlinuz ro intel_iommu=on,sm_on\n");
        let h = collect_host(dir.path());
        assert_eq!(h.info.hostname, "node17");
        assert_eq!(h.info.kernel_release, "6.12.73-amd64");
        assert_eq!(
            h.info.kernel_cmdline,
            "BOOT_IMAGE=/vmlinuz ro intel_iommu=on,sm_on"
        );
        assert_eq!(
            h.hardware.cpu_model.as_deref(),
            Some("Intel(R) Xeon(R) Platinum 8480+")
        );
        let names: Vec<_> = h.hardware.iommu_units.iter().map(|u| &u.name).collect();
        assert_eq!(names, ["dmar0", "dmar1"]);
        let u = &h.hardware.iommu_units[0];
        assert_eq!(u.kind, "intel-iommu");
        assert_eq!(u.cap.as_deref(), Some("9ed008c40780466"));
        assert_eq!(u.ecap.as_deref(), Some("3ee9e86f050df"));
        assert_eq!(u.version.as_deref(), Some("4:0"));
        assert_eq!(u.address.as_deref(), Some("ee7fc000"));
        assert_eq!(h.hardware.scalable_mode, Some(true));
        assert!(h
            .hardware
            .scalable_mode_basis
            .as_deref()
            .unwrap()
            .contains("sm_on"));
        // No PCI devices in this tree: ATS unknown, not "no".
        assert_eq!(h.hardware.ats_in_use, None);
    }

    #[test]
    fn the_kernel_config_default_decides_without_a_command_line_option() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path(), "ro quiet\n");
        assert_eq!(collect_host(dir.path()).hardware.scalable_mode, None);
        put(
            dir.path(),
            "boot/config-6.12.73-amd64",
            "CONFIG_INTEL_IOMMU=y\nCONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON=y\n",
        );
        let h = collect_host(dir.path());
        assert_eq!(h.hardware.scalable_mode, Some(true));
        assert!(h.hardware.scalable_mode_basis.unwrap().contains("config"));
        // The command line overrides the default.
        put(dir.path(), "proc/cmdline", "ro intel_iommu=sm_on,sm_off\n");
        assert_eq!(collect_host(dir.path()).hardware.scalable_mode, Some(false));
    }

    #[test]
    fn the_qemu_fixture_has_no_smts_so_no_scalable_mode() {
        let root = crate::sysfs::tests_support::fixture("sysfs-qemu-q35");
        let h = collect_host(&root);
        assert_eq!(h.hardware.iommu_units.len(), 1);
        assert_eq!(h.hardware.iommu_units[0].ecap.as_deref(), Some("f00f5e"));
        assert_eq!(h.hardware.scalable_mode, Some(false));
        assert!(h.info.kernel_cmdline.contains("intel_iommu=on"));
    }

    #[test]
    fn an_empty_root_is_all_unknown_and_does_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let h = collect_host(dir.path());
        assert_eq!(h, CollectedHost::default());
        let h = collect_host(Path::new("/nonexistent/itewatch-root"));
        assert_eq!(h.hardware.iommu_units, Vec::new());
    }

    #[test]
    fn garbage_registers_are_unknown_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path(), "intel_iommu=on,sm_on");
        put(dir.path(), "sys/class/iommu/dmar1/intel-iommu/ecap", "zz\n");
        let h = collect_host(dir.path());
        assert_eq!(h.hardware.iommu_units[1].ecap, None);
        // One unit's SMTS unknown: scalable mode is not claimed.
        assert_eq!(h.hardware.scalable_mode, None);
    }

    #[test]
    fn scalable_mode_rules() {
        let yes = [Some(true), Some(true)];
        assert_eq!(
            scalable_mode(Some("intel_iommu=off"), Some(true), &yes).0,
            Some(false)
        );
        assert_eq!(
            scalable_mode(Some("intel_iommu=sm_off"), Some(true), &yes).0,
            Some(false)
        );
        assert_eq!(
            scalable_mode(None, Some(true), &[Some(true), Some(false)]).0,
            Some(false)
        );
        assert_eq!(scalable_mode(Some("intel_iommu=sm_on"), None, &[]).0, None);
        assert_eq!(scalable_mode(Some("ro"), None, &yes).0, None);
        assert_eq!(scalable_mode(Some("ro"), Some(false), &yes).0, Some(false));
    }

    #[test]
    fn cpuinfo_and_config_parsing() {
        assert_eq!(cpu_model("processor : 0\nflags : fpu\n"), None);
        assert_eq!(
            cpu_model("model name\t: AMD EPYC 7B13\n").as_deref(),
            Some("AMD EPYC 7B13")
        );
        assert_eq!(sm_default_from_config("CONFIG_X86=y\n"), None);
        assert_eq!(
            sm_default_from_config("CONFIG_INTEL_IOMMU=y\n"),
            Some(false)
        );
        assert_eq!(
            sm_default_from_config(
                "CONFIG_INTEL_IOMMU=y\n# CONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON is not set\n"
            ),
            Some(false)
        );
    }

    #[test]
    fn thp_is_off_for_the_process_after_the_call() {
        // Linux since 3.15; a kernel without THP refuses it (then nothing changed).
        if keep_memory_off_khugepaged().is_ok() {
            // SAFETY: PR_GET_THP_DISABLE takes no pointer.
            let v = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
            assert_eq!(v, 1);
        }
    }
}
