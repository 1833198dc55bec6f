//! `cargo xtask`: developer and CI tasks that are not part of the shipped binary.
//!
//! `cargo xtask vm-test` boots real Debian kernels under QEMU with an emulated Intel IOMMU
//! (device-IOTLB on) and PCIe hot-plug slots holding ATS-capable virtio disks, runs
//! `itewatch record` in the guest while DMA, a safe removal and a surprise removal happen, and
//! asserts on what the probes saw (scenario `removals`); then the same guest with the IOMMU
//! timing out device-TLB invalidations to absent devices (patched QEMU, qemu-ite/) and a
//! surprise removal (scenario `ite-surprise`). docs/vm-tests.md describes both.

mod assert;
mod bench;
mod bench_guest;
mod bench_rootfs;
mod guest;
mod initramfs;
mod ite;
mod kcode_check;
mod kernels;
mod preflight_vm;
mod qemu;
mod qmp;
mod vmtest;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "xtask", about = "itewatch developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    #[value(name = "6.18")]
    V6_18,
    #[value(name = "7.3")]
    V7_3,
    All,
}

/// What one guest run does (docs/vm-tests.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioChoice {
    /// DMA, a safe and a surprise removal on QEMU's stock IOMMU (every invalidation completes).
    Removals,
    /// A surprise removal with the IOMMU timing out device-TLB invalidations to absent devices.
    IteSurprise,
    All,
}

#[derive(clap::Args, Debug)]
pub struct VmTestArgs {
    /// Which pinned Debian kernel(s) to boot.
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: KernelChoice,
    /// Which scenario(s) to run on each kernel.
    #[arg(long, value_enum, default_value = "all")]
    pub scenario: ScenarioChoice,
    /// Keep the per-run work directory (serial log, disks, initramfs) even on success.
    #[arg(long)]
    pub keep: bool,
    /// Copy trace, dmesg and doctor output into itewatch/tests/data/vm/<kernel>/.
    #[arg(long)]
    pub save_traces: bool,
    /// Use this static itewatch binary instead of building it (musl target).
    #[arg(long, value_name = "PATH")]
    pub itewatch: Option<PathBuf>,
    /// Boot a busybox-only guest: exercise boot, DMA and both removals without recording
    /// (harness self-test; trace assertions are skipped).
    #[arg(long)]
    pub no_record: bool,
    /// Reproduce the virtio-blk hang: cut the surprise slot while a read may be in flight
    /// (the removal then never finishes and the run fails; see docs/vm-tests.md).
    #[arg(long)]
    pub surprise_inflight: bool,
    /// Use this build of QEMU with qemu-ite/*.patch for `ite-surprise` instead of the one
    /// scripts/qemu-ite.sh builds and caches.
    #[arg(long, value_name = "PATH")]
    pub qemu_ite: Option<PathBuf>,
    /// `ite-surprise`: microseconds from the wait descriptor to ITE (0: at once, a printk
    /// storm no hardware produces; docs/vm-tests.md).
    #[arg(long, default_value_t = 20_000)]
    pub ite_timeout_us: u32,
    /// The guest's console is cut off (QEMU killed) past this many MiB.
    #[arg(long, default_value_t = 48)]
    pub serial_cap_mib: u64,
    /// Upper bound for one kernel's guest run, in seconds (boot to power-off). A run takes
    /// about a minute; on a loaded machine, TCG slows attaching three tracers to minutes.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Cache directory for kernel packages and run directories.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the pinned kernels under QEMU and check what itewatch records there.
    VmTest(VmTestArgs),
    /// Measure what tracing costs the workload, itewatch beside bpftrace, in one boot per
    /// kernel (docs/benchmarks.md).
    VmBench(bench::VmBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::VmTest(args) => vmtest::run(&args),
        Cmd::VmBench(args) => bench::run(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
