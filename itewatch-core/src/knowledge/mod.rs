//! Kernel knowledge, one home for each piece: what the probes watch, how the kernel picks
//! scalable mode, the upstream fixes. The correlator, `analyze`, `doctor` and the reports read
//! it from here.

pub mod fixes;
pub mod iommu;
pub mod probes;
pub mod stacks;
