//! The upstream kernel changes that bear on the race, once: what reports name, what `doctor`
//! and `preflight` look for in the running kernel. Commit ids, subjects and where they landed
//! as kernel-facts.md gives them (checked against the kernel's git history).

/// One upstream change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamFix {
    /// Abbreviated commit id (12 hex digits).
    pub commit: &'static str,
    pub subject: &'static str,
    /// Where it landed (mainline release, stable branches).
    pub landed: &'static str,
    /// What it guards, in one line.
    pub guards: &'static str,
}

pub const DONT_ISSUE_DISCONNECTED: UpstreamFix = UpstreamFix {
    commit: "4fc82cd907ac",
    subject: "iommu/vt-d: Don't issue ATS Invalidation request when device is disconnected",
    landed: "v6.9; stable 5.10.214, 5.15.153, 6.1.83, 6.6.23, 6.8.2",
    guards: "the PASID entry teardown (devtlb_invalidation_with_pasid) skips a device pciehp has \
             already marked disconnected (a surprise removal; a window remains)",
};

pub const IMPROVE_ITE: UpstreamFix = UpstreamFix {
    commit: "80a9b50c0b9e",
    subject: "iommu/vt-d: Improve ITE fault handling if target device isn't present",
    landed: "v6.9; 6.8.2 (not in 5.15.y, 6.1.y, 6.6.y)",
    guards: "qi_submit_sync gives up with -ETIMEDOUT when the ITE's SID has no present device \
             (it still retries when the hardware reports SID 0)",
};

pub const FLUSH_ONLY_ACCESSIBLE_SM: UpstreamFix = UpstreamFix {
    commit: "10e60d878139",
    subject: "iommu/vt-d: Flush dev-IOTLB only when PCIe device is accessible in scalable mode",
    landed: "6.18-stable (Feb 2026; not in Debian 6.18.15); in Debian 6.1.170 and 6.12.117",
    guards: "scalable-mode teardown skips the device-TLB flush to a device that is not present",
};

pub const SKIP_INACCESSIBLE_LEGACY: UpstreamFix = UpstreamFix {
    commit: "42662d19839f",
    subject: "iommu/vt-d: Skip dev-iotlb flush for inaccessible PCIe device without scalable mode",
    landed: "stable 6.19, 6.18, 6.12 (Mar 2026)",
    guards: "legacy-mode context clear skips the device-TLB flush to a device that is not present",
};

pub const HARDLOCKUP_RETRY: UpstreamFix = UpstreamFix {
    commit: "fe89277c9ceb",
    subject: "iommu/vt-d: Fix intel iommu iotlb sync hardlockup and retry",
    landed: "stable 6.19/6.18/6.12/6.6 (Mar 2026), 5.15 (Apr 2026)",
    guards:
        "the ITE abort walk in qi_check_fault ends (it could loop for ever with interrupts off)",
};

/// Every fix a report can name.
pub const ALL: &[UpstreamFix] = &[
    DONT_ISSUE_DISCONNECTED,
    IMPROVE_ITE,
    FLUSH_ONLY_ACCESSIBLE_SM,
    SKIP_INACCESSIBLE_LEGACY,
    HARDLOCKUP_RETRY,
];

/// The catalog entry of a commit id.
pub fn by_commit(commit: &str) -> Option<&'static UpstreamFix> {
    ALL.iter().find(|f| f.commit == commit)
}
