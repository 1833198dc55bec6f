//! The checks: small pure functions that turn facts into verdicts (outcome of a submission,
//! severity, whether a device is gone, what a log line says, which fix a stack points at).
//! Wording lives in `describe`; state lives in `state`.

use crate::analyze::facts::{classify, Fact, ReportKind, SlotWhat};
use crate::event::{CallerPath, KTime, Sid, ETIMEDOUT};

use super::incident::{IncidentKind, Outcome, Severity};
use super::Config;

/// How a submission ended, from its return code and latency.
pub fn classify_return(ret: i64, latency_ns: u64, cfg: &Config) -> Outcome {
    match ret {
        0 if latency_ns >= cfg.slow_ns => Outcome::CompletedLate { latency_ns },
        0 => Outcome::Completed { latency_ns },
        ETIMEDOUT => Outcome::Aborted { latency_ns, ret },
        _ => Outcome::Failed { latency_ns, ret },
    }
}

/// Severity of one submission's outcome inside a race-window incident.
pub fn outcome_severity(o: &Outcome, cfg: &Config) -> Severity {
    match *o {
        Outcome::Completed { .. } => Severity::Latent,
        Outcome::CompletedLate { latency_ns } if latency_ns >= cfg.hung_crit_ns => {
            Severity::Critical
        }
        Outcome::CompletedLate { .. }
        | Outcome::Aborted { .. }
        | Outcome::Failed { .. }
        | Outcome::ReturnLost => Severity::Warning,
        Outcome::InFlight { outstanding_ns } | Outcome::NotReturned { outstanding_ns } => {
            if outstanding_ns >= cfg.hung_crit_ns {
                Severity::Critical
            } else if outstanding_ns >= cfg.slow_ns {
                Severity::Warning
            } else {
                Severity::Latent
            }
        }
    }
}

/// Severity of a hung submission from how long it has been (or was) outstanding.
pub fn hung_severity(duration_ns: u64, cfg: &Config) -> Severity {
    if duration_ns >= cfg.hung_crit_ns {
        Severity::Critical
    } else {
        Severity::Warning
    }
}

/// Rank of outcomes, worst last: the incident's headline outcome is the worst member's.
pub fn outcome_rank(o: &Outcome) -> (u8, u64) {
    let r = match o {
        Outcome::Completed { .. } => 0,
        Outcome::CompletedLate { .. } => 2,
        Outcome::Failed { .. } => 3,
        Outcome::Aborted { .. } => 4,
        Outcome::ReturnLost => 1,
        Outcome::InFlight { .. } => 5,
        Outcome::NotReturned { .. } => 6,
    };
    (r, o.duration_ns().unwrap_or(0))
}

/// Severity of an incident from its kind and its members' outcomes.
pub fn incident_severity(kind: IncidentKind, outcomes: &[Outcome], cfg: &Config) -> Severity {
    let worst = outcomes
        .iter()
        .map(|o| outcome_severity(o, cfg))
        .max()
        .unwrap_or(Severity::Warning);
    match kind {
        IncidentKind::HungInvalidation => hung_severity(
            outcomes
                .iter()
                .filter_map(|o| o.duration_ns())
                .max()
                .unwrap_or(0),
            cfg,
        ),
        IncidentKind::IteReported => worst.max(Severity::Warning),
        IncidentKind::InflightAcrossDisconnect => {
            // A driver invalidation that crossed the disconnect and came back 0 fast was
            // answered by something (QEMU, a device that was not gone yet): latent.
            worst
        }
        IncidentKind::FlushToGoneDevice | IncidentKind::SafeRemovalFlushTimeout => worst,
    }
}

/// Device lifecycle facts needed to tell whether a flush targets a gone device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lifecycle {
    pub disconnected: Option<KTime>,
    pub released: Option<Release>,
}

/// `iommu_release_device` seen for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    pub at: KTime,
    pub tid: u32,
    /// The releasing thread has moved on (another device, or the pciehp handler returned):
    /// the release is over and the device is no longer known to the IOMMU.
    pub done: bool,
}

/// Whether an invalidation issued at `ts` on thread `tid` targets a device that is gone:
/// marked disconnected (surprise removal), or released from the IOMMU — except for the
/// releasing thread's own flushes while the release is still running (a safe removal's
/// teardown flushes are legitimate).
pub fn gone_at(l: &Lifecycle, tid: u32, ts: KTime) -> bool {
    l.disconnected.is_some_and(|d| d <= ts)
        || l.released
            .is_some_and(|r| r.at <= ts && (r.tid != tid || r.done))
}

/// Facts a kernel log line carries, for the live correlator. The line is read by the one
/// parser of kernel messages, [`crate::analyze::facts::classify`] (the format strings of
/// kernel-facts §8); this keeps only what the correlator acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFact {
    /// `DMAR: VT-d detected Invalidation Time-out Error: SID %llx`; `None` for SID 0 and the
    /// all-ones SID (the hardware gave none).
    IteDetected(Option<Sid>),
    /// `DMAR: Invalidation Time-out Error (ITE) cleared`.
    IteCleared,
    /// `DMAR: QI HEAD|PRIOR: <type> qw0 = ..` (the descriptors around the fault, printed with
    /// an ITE); `dev_tlb_sid` when the descriptor is a (PASID-based) device-TLB one.
    QiDescriptor {
        prior: bool,
        dev_tlb_sid: Option<Sid>,
    },
    /// `DMAR: DRHD: handling fault status reg %x` with FSTS.ITE (bit 6) set. The same line
    /// for a plain DMA fault (`reg 2`) is not an ITE and reads as [`LogFact::Other`].
    IteFaultStatus,
    /// `pcieport SSSS:BB:DD.F: pciehp: Slot(%s): <what>`.
    Pciehp {
        port: Option<crate::event::Bdf>,
        slot: String,
        what: SlotWhat,
    },
    /// A hard-lockup watchdog report.
    HardLockup,
    Other,
}

/// FSTS.ITE: the fault status register's Invalidation Time-out Error bit.
const FSTS_ITE: u32 = 1 << 6;

/// Parses a kernel log line (docs: kernel-facts §8 format strings).
pub fn parse_log(text: &str) -> LogFact {
    match classify(text) {
        Some(Fact::IteDetected { sid, .. }) => LogFact::IteDetected(sid),
        Some(Fact::Cleared { what: "ITE" }) => LogFact::IteCleared,
        Some(Fact::QiDesc {
            prior, dev_tlb_sid, ..
        }) => LogFact::QiDescriptor { prior, dev_tlb_sid },
        Some(Fact::FaultStatus { reg }) if reg & FSTS_ITE != 0 => LogFact::IteFaultStatus,
        Some(Fact::Slot { port, slot, what }) => LogFact::Pciehp { port, slot, what },
        Some(Fact::ReportHeader {
            kind: ReportKind::HardLockup,
            ..
        }) => LogFact::HardLockup,
        _ => LogFact::Other,
    }
}

/// Which kernel code path issued a removal-time flush, from its stack: it decides which fix
/// would have skipped it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum FixHint {
    /// `intel_pasid_tear_down_entry` → `devtlb_invalidation_with_pasid`: 4fc82cd907ac's check
    /// (then 10e60d878139's `pci_device_is_present`).
    PasidTeardown,
    /// Scalable-mode context teardown (`intel_pasid_teardown_sm_context` →
    /// `__context_flush_dev_iotlb`): 10e60d878139.
    ContextFlushScalable,
    /// Legacy-mode context clear (`domain_context_clear_one_cb` → `__context_flush_dev_iotlb`):
    /// 42662d19839f.
    ContextFlushLegacy,
    /// ≤ 6.8 removal (`dmar_remove_one_dev_info`, `domain_context_clear_one`, ..).
    OldRemoval,
    /// The driver's own teardown: its `remove()` unmapping DMA memory inside
    /// `pci_stop_bus_device` (what both VM kernels did after the disconnect walk:
    /// `virtblk_remove` → `vring_free` → `iommu_dma_free` → `__iommu_dma_unmap` →
    /// `intel_iommu_tlb_sync`). None of the disconnect checks guards this path.
    DriverTeardown,
    /// Nothing specific.
    #[default]
    None,
}

/// Classifies a stack for [`FixHint`] (innermost first, `+0x..` offsets allowed), from the
/// call-path tables of [`crate::knowledge::stacks`].
pub fn fix_hint<S: AsRef<str>>(frames: &[S]) -> FixHint {
    use crate::knowledge::stacks::*;
    let frames = own_context(frames);
    let has = |names: &[&str]| any_in(frames, names);
    if has(TEARDOWN_UNMAP) && has(DRIVER_UNBIND) {
        FixHint::DriverTeardown
    } else if has(PASID_TEARDOWN) {
        FixHint::PasidTeardown
    } else if has(CONTEXT_FLUSH_SCALABLE) {
        FixHint::ContextFlushScalable
    } else if has(CONTEXT_FLUSH_LEGACY) {
        FixHint::ContextFlushLegacy
    } else if has(OLD_REMOVAL) {
        FixHint::OldRemoval
    } else {
        FixHint::None
    }
}

/// Whether an invalidation on this caller path counts as "the device driver's path" for W1.
/// Unknown callers count (the thread's CPU0 is whatever is not the removal).
pub fn driver_side(caller: CallerPath) -> bool {
    !matches!(caller, CallerPath::Removal | CallerPath::DriverTeardown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::default()
    }

    #[test]
    fn return_codes_classify() {
        let c = cfg();
        assert!(matches!(
            classify_return(0, 1_000, &c),
            Outcome::Completed { .. }
        ));
        assert!(matches!(
            classify_return(0, c.slow_ns, &c),
            Outcome::CompletedLate { .. }
        ));
        assert!(matches!(
            classify_return(-110, 5, &c),
            Outcome::Aborted { ret: -110, .. }
        ));
        assert!(matches!(
            classify_return(-22, 5, &c),
            Outcome::Failed { ret: -22, .. }
        ));
    }

    #[test]
    fn severity_follows_duration() {
        let c = cfg();
        assert_eq!(
            outcome_severity(&Outcome::Completed { latency_ns: 1 }, &c),
            Severity::Latent
        );
        assert_eq!(
            outcome_severity(
                &Outcome::NotReturned {
                    outstanding_ns: c.hung_crit_ns
                },
                &c
            ),
            Severity::Critical
        );
        assert_eq!(hung_severity(c.hung_warn_ns, &c), Severity::Warning);
        assert_eq!(
            incident_severity(IncidentKind::IteReported, &[], &c),
            Severity::Warning
        );
    }

    #[test]
    fn release_is_gone_only_after_the_releasing_thread_moved_on() {
        let l = Lifecycle {
            disconnected: None,
            released: Some(Release {
                at: KTime(100),
                tid: 7,
                done: false,
            }),
        };
        assert!(
            !gone_at(&l, 7, KTime(150)),
            "safe removal's own teardown flush"
        );
        assert!(gone_at(&l, 8, KTime(150)), "another thread after release");
        assert!(!gone_at(&l, 8, KTime(50)), "before release");
        let done = Lifecycle {
            released: Some(Release {
                at: KTime(100),
                tid: 7,
                done: true,
            }),
            ..l
        };
        assert!(gone_at(&done, 7, KTime(150)));
        let disc = Lifecycle {
            disconnected: Some(KTime(10)),
            released: None,
        };
        assert!(gone_at(&disc, 7, KTime(10)));
        assert!(!gone_at(&disc, 7, KTime(9)));
    }

    #[test]
    fn parses_the_kernel_log_lines() {
        assert_eq!(
            parse_log("DMAR: VT-d detected Invalidation Time-out Error: SID 0"),
            LogFact::IteDetected(None)
        );
        assert_eq!(
            parse_log("DMAR: VT-d detected Invalidation Time-out Error: SID af03"),
            LogFact::IteDetected(Some(Sid(0xaf03)))
        );
        assert_eq!(
            parse_log("DMAR: Invalidation Time-out Error (ITE) cleared"),
            LogFact::IteCleared
        );
        match parse_log("pcieport 0000:00:04.0: pciehp: Slot(1): Link Down") {
            LogFact::Pciehp { port, slot, what } => {
                assert_eq!(port.unwrap().to_string(), "0000:00:04.0");
                assert_eq!(slot, "1");
                assert_eq!(what, SlotWhat::LinkDown);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_log("NMI watchdog: Watchdog detected hard LOCKUP on cpu 144"),
            LogFact::HardLockup
        );
        assert_eq!(parse_log("random"), LogFact::Other);
        // A plain DMA fault's status (reg 2: PPF) is not ITE detail; reg 40 (ITE) is.
        assert_eq!(
            parse_log("DMAR: DRHD: handling fault status reg 2"),
            LogFact::Other
        );
        assert_eq!(
            parse_log("DMAR: DRHD: handling fault status reg 40"),
            LogFact::IteFaultStatus
        );
        // The descriptor dump names the device-TLB descriptor's SID (format of the 6.1 VM console).
        assert_eq!(
            parse_log(
                "DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0x20000000003, qw1 = 0xffffb000"
            ),
            LogFact::QiDescriptor {
                prior: false,
                dev_tlb_sid: Some(Sid(0x200))
            }
        );
    }

    #[test]
    fn fix_hints_from_the_kernel_call_traces() {
        // 6.12 legacy mode, quoted in 42662d19839f.
        let legacy = [
            "qi_submit_sync",
            "qi_flush_dev_iotlb",
            "__context_flush_dev_iotlb.part.0",
            "domain_context_clear_one_cb",
            "pci_for_each_dma_alias",
            "device_block_translation",
        ];
        assert_eq!(fix_hint(&legacy), FixHint::ContextFlushLegacy);
        let sm = [
            "qi_flush_dev_iotlb",
            "__context_flush_dev_iotlb.part.0",
            "intel_context_flush_no_pasid",
            "device_pasid_table_teardown",
            "pci_pasid_table_teardown",
            "intel_pasid_teardown_sm_context",
        ];
        assert_eq!(fix_hint(&sm), FixHint::ContextFlushScalable);
        assert_eq!(
            fix_hint(&["qi_flush_dev_iotlb", "intel_pasid_tear_down_entry+0x10"]),
            FixHint::PasidTeardown
        );
        assert_eq!(
            fix_hint(&[
                "qi_flush_dev_iotlb+0xb1",
                "__dmar_remove_one_dev_info+0x224"
            ]),
            FixHint::OldRemoval
        );
        assert_eq!(fix_hint::<&str>(&[]), FixHint::None);
        // Both VM kernels: the driver's remove() unmapping after the disconnect walk.
        let teardown = [
            "qi_submit_sync+0x5",
            "qi_batch_flush_descs+0x25",
            "cache_tag_flush_range+0x17f",
            "intel_iommu_tlb_sync+0x2d",
            "__iommu_dma_unmap+0x23c",
            "iommu_dma_free+0x1c",
            "vring_free+0xb2",
            "virtblk_remove+0x5e [virtio_blk]",
            "pci_device_remove",
            "device_release_driver_internal",
            "pci_stop_bus_device",
            "pci_stop_and_remove_bus_device",
            "pciehp_unconfigure_device",
        ];
        assert_eq!(fix_hint(&teardown), FixHint::DriverTeardown);
    }
}
