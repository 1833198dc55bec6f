//! The probe plan: which kernel functions and tracepoints itewatch watches, how each may be
//! attached (preferred first), and which the tool cannot do without. The BPF programs named
//! here live in itewatch-ebpf; attaching them is `itewatch::probe`.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// BPF trampoline at function entry: cheaper than a kprobe, needs kernel BTF and
    /// CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS.
    Fentry,
    /// BPF trampoline at function exit: sees the arguments and the return value, and unlike a
    /// kretprobe has no instance limit (a return is never missed for lack of one).
    Fexit,
    Kprobe,
    Kretprobe,
    Tracepoint,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Fentry => "fentry",
            Mechanism::Fexit => "fexit",
            Mechanism::Kprobe => "kprobe",
            Mechanism::Kretprobe => "kretprobe",
            Mechanism::Tracepoint => "tracepoint",
        }
    }
}

/// One way to attach a probe: a BPF program of the object on a kernel function (or a
/// `sys:event` tracepoint).
pub struct Attempt {
    pub mechanism: Mechanism,
    pub program: &'static str,
    pub target: &'static str,
}

const fn fentry(program: &'static str, target: &'static str) -> Attempt {
    Attempt {
        mechanism: Mechanism::Fentry,
        program,
        target,
    }
}

const fn fexit(program: &'static str, target: &'static str) -> Attempt {
    Attempt {
        mechanism: Mechanism::Fexit,
        program,
        target,
    }
}

const fn kprobe(program: &'static str, target: &'static str) -> Attempt {
    Attempt {
        mechanism: Mechanism::Kprobe,
        program,
        target,
    }
}

const fn kretprobe(program: &'static str, target: &'static str) -> Attempt {
    Attempt {
        mechanism: Mechanism::Kretprobe,
        program,
        target,
    }
}

const fn tracepoint(program: &'static str, target: &'static str) -> Attempt {
    Attempt {
        mechanism: Mechanism::Tracepoint,
        program,
        target,
    }
}

/// The kernel functions the probes enter (fentry, kprobe): the first frame of a stack they
/// take is one of these, and any frame before it is the tracer's own (BPF program,
/// trampoline).
pub fn probed_functions() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = SPECS
        .iter()
        .flat_map(|s| s.attempts)
        .filter(|a| matches!(a.mechanism, Mechanism::Fentry | Mechanism::Kprobe))
        .map(|a| a.target)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// One probe of the plan and the ways to attach it.
pub struct Spec {
    /// Name in the plan (and in docs/kernel-support.md).
    pub name: &'static str,
    /// Tried in order until one attaches. The first is the preferred one: a later one is a
    /// fallback (another mechanism, or another kernel function that sees the same thing).
    pub attempts: &'static [Attempt],
    /// Whether the tool is blind to its core without it.
    pub required: bool,
}

/// The hot path (every invalidation) prefers trampolines; the rare hot-plug path uses kprobes,
/// which work on every kernel and cost nothing while the function is not called.
pub const SPECS: &[Spec] = &[
    Spec {
        name: "qi_submit_sync",
        attempts: &[
            fentry("qi_submit_sync_fentry", "qi_submit_sync"),
            kprobe("qi_submit_sync", "qi_submit_sync"),
        ],
        required: true,
    },
    Spec {
        name: "qi_submit_sync:return",
        attempts: &[
            fexit("qi_submit_sync_fexit", "qi_submit_sync"),
            kretprobe("qi_submit_sync_ret", "qi_submit_sync"),
        ],
        required: true,
    },
    Spec {
        name: "qi_flush_dev_iotlb",
        attempts: &[
            fentry("qi_flush_dev_iotlb_fentry", "qi_flush_dev_iotlb"),
            kprobe("qi_flush_dev_iotlb", "qi_flush_dev_iotlb"),
        ],
        required: false,
    },
    Spec {
        name: "qi_flush_dev_iotlb_pasid",
        attempts: &[
            fentry(
                "qi_flush_dev_iotlb_pasid_fentry",
                "qi_flush_dev_iotlb_pasid",
            ),
            kprobe("qi_flush_dev_iotlb_pasid", "qi_flush_dev_iotlb_pasid"),
        ],
        required: false,
    },
    Spec {
        name: "pciehp_ist",
        attempts: &[kprobe("pciehp_ist", "pciehp_ist")],
        required: true,
    },
    Spec {
        name: "pciehp_ist:return",
        attempts: &[kretprobe("pciehp_ist_ret", "pciehp_ist")],
        required: false,
    },
    Spec {
        name: "pciehp_unconfigure_device",
        attempts: &[kprobe(
            "pciehp_unconfigure_device",
            "pciehp_unconfigure_device",
        )],
        required: true,
    },
    Spec {
        name: "pci_walk_bus",
        attempts: &[kprobe("pci_walk_bus", "pci_walk_bus")],
        required: false,
    },
    Spec {
        name: "pci_dev_set_disconnected",
        attempts: &[kprobe("device_disconnected", "pci_dev_set_disconnected")],
        required: false,
    },
    Spec {
        name: "pci_doe_disconnected",
        attempts: &[kprobe("device_disconnected", "pci_doe_disconnected")],
        required: false,
    },
    Spec {
        name: "pci_stop_and_remove_bus_device",
        attempts: &[kprobe("device_remove", "pci_stop_and_remove_bus_device")],
        required: false,
    },
    Spec {
        name: "iommu_release_device",
        attempts: &[
            kprobe("iommu_release", "iommu_release_device"),
            kprobe("iommu_release", "intel_iommu_release_device"),
        ],
        required: false,
    },
    Spec {
        name: "printk:console",
        attempts: &[tracepoint("printk_console", "printk:console")],
        required: false,
    },
    // 7.x (Debian 7.3.4 has it; Debian 6.18.15 does not): pciehp's link and presence changes
    // as fields, fired next to its `Slot(%s): Link Down` lines. Older kernels: the printk
    // tracepoint's copy of those lines and the pciehp kprobes carry the same facts.
    Spec {
        name: "pci:pci_hp_event",
        attempts: &[tracepoint("pci_hp_event", "pci:pci_hp_event")],
        required: false,
    },
];

/// Names of all probes in the plan, in order.
pub fn probe_names() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|s| s.name)
}

/// Names of the probes without which the tool cannot do its core job.
pub fn required_probes() -> impl Iterator<Item = &'static str> {
    SPECS.iter().filter(|s| s.required).map(|s| s.name)
}

/// Whether `name` is one of [`required_probes`].
pub fn is_required(name: &str) -> bool {
    required_probes().any(|r| r == name)
}
