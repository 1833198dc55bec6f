//! Log analyzer throughput on a large synthetic log (generated here): ordinary kernel noise
//! with a realistic density of DMAR/pciehp lines, a few ITE bursts and call traces.
//!
//! `cargo bench -p itewatch --bench analyze` (BENCH_LOG_MB sets the size, default 256;
//! BENCH_RUNS the number of runs, default 3). Prints MiB/s on the thread's CPU time and on
//! wall time (best run); the figures and the command live in docs/benchmarks.md.

mod common;
use common::thread_cpu;
use std::time::Instant;

fn synthetic_log(target_bytes: usize) -> Vec<u8> {
    const NOISE: &[&str] = &[
        "nvme nvme0: I/O 123 QID 4 timeout, completion polled",
        "EXT4-fs (nvme0n1p2): mounted filesystem 1a2b3c4d-0000-4000-8000-1234567890ab r/w with ordered data mode. Quota mode: none.",
        "audit: type=1400 audit(1712345678.123:412): apparmor=\"STATUS\" operation=\"profile_load\" profile=\"unconfined\" name=\"/usr/bin/man\" pid=812 comm=\"apparmor_parser\"",
        "e1000e 0000:00:19.0 eno1: NIC Link is Up 1000 Mbps Full Duplex, Flow Control: Rx/Tx",
        "usb 1-1.4: new high-speed USB device number 5 using ehci-pci",
        "systemd[1]: Started Journal Service.",
        "IPv6: ADDRCONF(NETDEV_CHANGE): eno1: link becomes ready",
        "perf: interrupt took too long (2503 > 2500), lowering kernel.perf_event_max_sample_rate to 79750",
        "mlx5_core 0000:b1:00.0: mlx5e_set_dev_port_mtu:3175:(pid 1403): MTU 9000",
        "pci 0000:00:1c.0: [8086:a110] type 01 class 0x060400 PCIe Root Port",
    ];
    const RARE: &[&str] = &[
        "pcieport 0000:b0:02.0: pciehp: Slot(3): Link Down",
        "pcieport 0000:b0:02.0: pciehp: Slot(3): Card not present",
        "DMAR: DRHD: handling fault status reg 2",
        "DMAR: [DMA Read NO_PASID] Request device [02:00.0] fault addr 0xfffd3000 [fault reason 0x06] PTE Read access is not set",
        "DMAR: VT-d detected Invalidation Time-out Error: SID b100",
        "DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0xb10000000003, qw1 = 0x7ffffffffffff001",
        "DMAR: Invalidation Time-out Error (ITE) cleared",
        "pcieport 0000:b0:02.0: pciehp: Slot(3): Card present",
        "pcieport 0000:b0:02.0: pciehp: Slot(3): Link Up",
    ];
    const TRACE: &[&str] = &[
        "watchdog: BUG: soft lockup - CPU#17 stuck for 26s! [irq/122-pciehp:933]",
        "CPU: 17 UID: 0 PID: 933 Comm: irq/122-pciehp Not tainted 6.12.73 #1",
        "RIP: 0010:qi_submit_sync+0x5b1/0x7e0",
        "Call Trace:",
        " <TASK>",
        " qi_flush_dev_iotlb+0x8c/0xb0",
        " __context_flush_dev_iotlb.part.0+0x5c/0x80",
        " iommu_bus_notifier+0x26/0x40",
        " pciehp_unconfigure_device+0x98/0x160",
        " pciehp_handle_presence_or_link_change+0xf2/0x360",
        " pciehp_ist+0x1a1/0x1c0",
        " </TASK>",
    ];
    let mut out = Vec::with_capacity(target_bytes + 4096);
    let mut i: u64 = 0;
    let mut ts: u64 = 1_000_000;
    while out.len() < target_bytes {
        ts += 137;
        let msg = if i.is_multiple_of(50_000) {
            // A trace every 50k lines.
            for t in TRACE {
                out.extend_from_slice(
                    format!("[{:5}.{:06}] {t}\n", ts / 1_000_000, ts % 1_000_000).as_bytes(),
                );
            }
            i += 1;
            continue;
        } else if i.is_multiple_of(500) {
            RARE[(i / 500) as usize % RARE.len()]
        } else {
            NOISE[(i as usize * 7) % NOISE.len()]
        };
        out.extend_from_slice(
            format!("[{:5}.{:06}] {msg}\n", ts / 1_000_000, ts % 1_000_000).as_bytes(),
        );
        i += 1;
    }
    out
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep it quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mb: usize = std::env::var("BENCH_LOG_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 4 } else { 256 });
    let log = synthetic_log(mb << 20);
    let lines = log.iter().filter(|b| **b == b'\n').count();
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let mut best = f64::MAX;
    let mut best_cpu = f64::MAX;
    let mut incidents = 0;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let c0 = thread_cpu();
        let a = itewatch::analyze::analyze_bytes(&log, itewatch::analyze::Options::default());
        best_cpu = best_cpu.min(thread_cpu().saturating_sub(c0).as_secs_f64());
        best = best.min(t0.elapsed().as_secs_f64());
        incidents = a.incidents.len();
    }
    let mib = log.len() as f64 / (1 << 20) as f64;
    println!(
        "analyze: {mib:.1} MiB, {lines} lines, {incidents} incidents, best of {runs}:\n  CPU time {best_cpu:.3} s = {:.0} MiB/s ({:.0} k lines/s)\n  wall     {best:.3} s = {:.0} MiB/s",
        mib / best_cpu,
        lines as f64 / best_cpu / 1e3,
        mib / best,
    );
}
