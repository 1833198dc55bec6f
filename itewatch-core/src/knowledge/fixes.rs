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
}

pub const DONT_ISSUE_DISCONNECTED: UpstreamFix = UpstreamFix {
    commit: "4fc82cd907ac",
    subject: "iommu/vt-d: Don't issue ATS Invalidation request when device is disconnected",
    landed: "v6.9; stable 5.10.214, 5.15.153, 6.1.83, 6.6.23, 6.8.2",
};

pub const IMPROVE_ITE: UpstreamFix = UpstreamFix {
    commit: "80a9b50c0b9e",
    subject: "iommu/vt-d: Improve ITE fault handling if target device isn't present",
    landed: "v6.9; 6.8.2 (not in 5.15.y, 6.1.y, 6.6.y)",
};

pub const FLUSH_ONLY_ACCESSIBLE_SM: UpstreamFix = UpstreamFix {
    commit: "10e60d878139",
    subject: "iommu/vt-d: Flush dev-IOTLB only when PCIe device is accessible in scalable mode",
    landed: "6.18-stable (Feb 2026; not in Debian 6.18.15); in Debian 6.1.170 and 6.12.117",
};

pub const SKIP_INACCESSIBLE_LEGACY: UpstreamFix = UpstreamFix {
    commit: "42662d19839f",
    subject: "iommu/vt-d: Skip dev-iotlb flush for inaccessible PCIe device without scalable mode",
    landed: "stable 6.19, 6.18, 6.12 (Mar 2026)",
};

pub const HARDLOCKUP_RETRY: UpstreamFix = UpstreamFix {
    commit: "fe89277c9ceb",
    subject: "iommu/vt-d: Fix intel iommu iotlb sync hardlockup and retry",
    landed: "stable 6.19/6.18/6.12/6.6 (Mar 2026), 5.15 (Apr 2026)",
};

/// What a kernel does when a device-TLB invalidation to a gone device times out (ITE), from
/// whether its code carries [`IMPROVE_ITE`] and [`HARDLOCKUP_RETRY`]. The one reading of
/// those two fixes that reports, the live correlator and `preflight` share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IteResponse {
    /// No 80a9b50c0b9e: the ITE is retried for ever with interrupts off.
    RetriesForever,
    /// 80a9b50c0b9e without fe89277c9ceb: the abort walk can loop for ever first.
    AbortWalkSpins,
    /// Both: gives up with -ETIMEDOUT (unless the hardware reports ITE SID 0).
    GivesUp,
    /// 80a9b50c0b9e, fe89277c9ceb not known: gives up unless the abort walk spins first.
    GivesUpUnlessWalkSpins,
    /// 80a9b50c0b9e not known.
    Unknown,
}

/// [`IteResponse`] from the two fixes' status (`None`: not known).
pub fn ite_response(improve_ite: Option<bool>, hardlockup_retry: Option<bool>) -> IteResponse {
    match (improve_ite, hardlockup_retry) {
        (Some(false), _) => IteResponse::RetriesForever,
        (Some(true), Some(false)) => IteResponse::AbortWalkSpins,
        (Some(true), Some(true)) => IteResponse::GivesUp,
        (Some(true), None) => IteResponse::GivesUpUnlessWalkSpins,
        (None, _) => IteResponse::Unknown,
    }
}
