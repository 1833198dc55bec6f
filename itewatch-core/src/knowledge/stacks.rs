//! Kernel call paths: which functions on a stack say who issued an invalidation. One table per
//! path, read by the live caller classification ([`crate::event::CallerPath::classify`]), the
//! removal-path fix hint ([`crate::correlate::detect::fix_hint`]) and `analyze`'s reading of
//! call traces in kernel logs. Checked against the Debian 6.1, 6.12, 6.18 and 7.3 sources and
//! the stacks the VM matrix recorded (docs/kernel-support.md).

/// The invalidation itself (what a stuck CPU spins in).
pub const INVALIDATION: &[&str] = &[
    "qi_submit_sync",
    "qi_check_fault",
    "qi_flush_dev_iotlb",
    "qi_flush_dev_iotlb_pasid",
    "__iommu_flush_dev_iotlb",
    "iommu_flush_dev_iotlb",
    "devtlb_invalidation_with_pasid",
    "__context_flush_dev_iotlb",
    "qi_batch_flush_descs",
];

/// Device removal: pciehp's thread, the PCI core's removal and the IOMMU's release.
pub const REMOVAL: &[&str] = &[
    "iommu_bus_notifier",
    "iommu_release_device",
    "intel_iommu_release_device",
    "pciehp_ist",
    "pciehp_unconfigure_device",
    "pciehp_disable_slot",
    "__pciehp_disable_slot",
    "remove_board",
    "pci_stop_and_remove_bus_device",
    "pci_remove_bus_device",
    "iommu_deinit_device",
    "__iommu_group_remove_device",
    "intel_pasid_teardown_sm_context",
];

/// Teardown helpers shared by device release and domain detach (VFIO): a removal only when no
/// [`DOMAIN_CHANGE`] frame is there.
pub const TEARDOWN: &[&str] = &["dmar_remove_one_dev_info", "__dmar_remove_one_dev_info"];

/// pciehp handling a link or presence change: a surprise removal.
pub const SURPRISE: &[&str] = &["pciehp_handle_presence_or_link_change"];

/// A removal someone asked for: the attention button, sysfs `remove`, slot power.
pub const SAFE: &[&str] = &[
    "pciehp_handle_disable_request",
    "remove_store",
    "pci_stop_and_remove_bus_device_locked",
    "pciehp_sysfs_disable_slot",
];

/// The DMA API's deferred flush queue (a timer, not the unmapping task).
pub const FLUSH_QUEUE: &[&str] = &[
    "fq_flush_timeout",
    "iommu_dma_flush_fq",
    "fq_ring_free",
    "flush_unmaps_timeout",
];

/// A driver unmapping DMA memory (strict mode: one invalidation per unmap).
pub const DRIVER_UNMAP: &[&str] = &[
    "iommu_dma_unmap_page",
    "iommu_dma_unmap_sg",
    "iommu_dma_free",
    "__iommu_dma_unmap",
    "dma_unmap_page_attrs",
    "dma_unmap_sg_attrs",
    "iommu_unmap",
    "intel_iommu_tlb_sync",
    "intel_iommu_unmap_pages",
    "intel_unmap",
    "intel_unmap_page",
    "intel_unmap_sg",
    "iommu_flush_iotlb_psi",
    "cache_tag_flush_range",
    "intel_flush_iotlb_all",
    "iommu_iotlb_sync",
];

/// Attaching or detaching a domain (VFIO handing a device to a guest and back).
pub const DOMAIN_CHANGE: &[&str] = &[
    "vfio_group_fops_release",
    "vfio_iommu_type1_detach_group",
    "iommu_detach_group",
    "__iommu_detach_group",
    "intel_iommu_detach_device",
    "vfio_device_fops_release",
    "iommu_detach_device",
    "iommu_attach_device",
    "iommu_attach_group",
    "__iommu_attach_device",
];

/// The driver's `remove()` running inside the PCI core's unbind: with a [`DRIVER_UNMAP`] frame,
/// the driver's own teardown (no disconnect check guards it).
pub const DRIVER_UNBIND: &[&str] = &[
    "pci_stop_bus_device",
    "pci_device_remove",
    "device_release_driver_internal",
];

/// The unmap frames that, under [`DRIVER_UNBIND`], make the driver's own teardown.
pub const TEARDOWN_UNMAP: &[&str] = &[
    "__iommu_dma_unmap",
    "iommu_dma_unmap_page",
    "iommu_dma_unmap_sg",
    "iommu_dma_free",
    "intel_iommu_tlb_sync",
    "cache_tag_flush_range",
];

/// The scalable-mode PASID entry teardown (4fc82cd907ac, then 10e60d878139 guard it).
pub const PASID_TEARDOWN: &[&str] = &[
    "devtlb_invalidation_with_pasid",
    "intel_pasid_tear_down_entry",
];

/// Scalable-mode context teardown (10e60d878139 guards it).
pub const CONTEXT_FLUSH_SCALABLE: &[&str] = &[
    "intel_pasid_teardown_sm_context",
    "pci_pasid_table_teardown",
    "device_pasid_table_teardown",
    "intel_context_flush_no_pasid",
];

/// Legacy-mode context clear (42662d19839f guards it).
pub const CONTEXT_FLUSH_LEGACY: &[&str] =
    &["domain_context_clear_one_cb", "__context_flush_dev_iotlb"];

/// The ≤ 6.8 removal path.
pub const OLD_REMOVAL: &[&str] = &[
    "dmar_remove_one_dev_info",
    "__dmar_remove_one_dev_info",
    "domain_context_clear_one",
    "iommu_flush_dev_iotlb",
    "intel_iommu_release_device",
];

/// A frame's function: `__context_flush_dev_iotlb.part.0+0x1c/0x40` →
/// `__context_flush_dev_iotlb`.
pub fn function(frame: &str) -> &str {
    let sym = frame.split('+').next().unwrap_or(frame);
    sym.split('.').next().unwrap_or(sym)
}

/// Whether the frame is in one of `names` (compiler suffixes such as `.cold`, `.part.0` and
/// `+0x..` offsets allowed).
pub fn frame_in(frame: &str, names: &[&str]) -> bool {
    names.contains(&function(frame))
}

/// Whether any frame is in one of `names`.
pub fn any_in<S: AsRef<str>>(frames: &[S], names: &[&str]) -> bool {
    frames.iter().any(|f| frame_in(f.as_ref(), names))
}

/// The frames of a kernel stack that belong to the context that made the call: up to and
/// including the first interrupt or exception entry (`asm_common_interrupt`,
/// `asm_sysvec_*`, `asm_exc_*`) or softirq entry (`handle_softirqs`, `__do_softirq`). What
/// lies below such an entry is whatever the interrupt happened to interrupt, not a caller:
/// a DMA unmap in a disk's completion interrupt that lands on pciehp's thread is not a
/// removal.
pub fn own_context<S: AsRef<str>>(frames: &[S]) -> &[S] {
    let end = frames.iter().position(|f| {
        let sym = f.as_ref().split('+').next().unwrap_or("");
        sym.starts_with("asm_") || matches!(sym, "handle_softirqs" | "__do_softirq" | "do_softirq")
    });
    match end {
        Some(i) => &frames[..=i],
        None => frames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_match_by_function_whatever_the_suffix() {
        assert_eq!(
            function("__context_flush_dev_iotlb.part.0+0x1c/0x40"),
            "__context_flush_dev_iotlb"
        );
        assert_eq!(function("qi_submit_sync.cold+0x2ce"), "qi_submit_sync");
        assert_eq!(function("pciehp_ist"), "pciehp_ist");
        assert!(frame_in("qi_submit_sync+0x2ff/0x5a0", INVALIDATION));
        // A prefix of a name is not the name.
        assert!(!frame_in("qi_submit_sync_extra+0x1", INVALIDATION));
        assert!(!any_in(&["schedule+0x1", "worker_thread+0x2"], REMOVAL));
    }

    #[test]
    fn no_function_is_in_two_caller_tables() {
        let tables: [(&str, &[&str]); 6] = [
            ("REMOVAL", REMOVAL),
            ("TEARDOWN", TEARDOWN),
            ("SURPRISE", SURPRISE),
            ("SAFE", SAFE),
            ("FLUSH_QUEUE", FLUSH_QUEUE),
            ("DRIVER_UNMAP", DRIVER_UNMAP),
        ];
        for (i, (a, ta)) in tables.iter().enumerate() {
            for (b, tb) in &tables[i + 1..] {
                for f in *ta {
                    assert!(!tb.contains(f), "{f} is in {a} and {b}");
                }
            }
            for f in *ta {
                assert!(
                    !DOMAIN_CHANGE.contains(f),
                    "{f} is in {a} and DOMAIN_CHANGE"
                );
            }
        }
    }
}
