//! The simulated machine: a fixed topology (two IOMMUs, three hot-plug slots, five devices),
//! the kernel stacks each path leaves, and builders for the event sequences the kernels
//! emit (6.1: `qi_flush_dev_iotlb` before every device-TLB submit; 6.12: IOTLB + device-TLB
//! batched in one submit on the unmap path).

use std::collections::BTreeMap;

use crate::event::{
    Bdf, Descriptor, DeviceInfo, DeviceRef, Event, FixedStr, Flush, Iommu, IstReturn, KTime,
    LogLine, Meta, Payload, RawDesc, Record, Sid, Slot, StackId, StackRecord, Submit, SubmitReturn,
    Walk,
};
use itewatch_common as abi;

use super::Rng;

/// Which kernel's behaviour to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 6.1.y: no ITE presence check (retries forever), per-descriptor `qi_flush_dev_iotlb`.
    V6_1,
    /// 6.12.y: 80a9b50c0b9e (-ETIMEDOUT when the ITE target is gone), batched unmap flushes.
    V6_12,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
        }
    }
}

pub const US: u64 = 1_000;
pub const MS: u64 = 1_000_000;

/// Linux's largest `pid_max` (64-bit, `PID_MAX_LIMIT`): no simulated thread id reaches it.
pub const PID_MAX: u32 = 4_194_304;

/// Thread id of `ksoftirqd/N` (booted kernels give the per-CPU threads small ids in CPU order).
pub fn ksoftirqd_tid(cpu: u32) -> u32 {
    15 + 8 * cpu
}

/// Thread id of the per-CPU worker `kworker/N:<k>H` (`k` < 8).
pub fn kworker_tid(cpu: u32, k: u32) -> u32 {
    200 + 8 * cpu + k.min(7)
}

/// Key of `World::running`: the thread, or for thread 0 (several CPUs' idle tasks) the CPU.
fn running_key(tid: u32, cpu: u32) -> (u32, u32) {
    (tid, if tid == 0 { cpu } else { 0 })
}

/// A per-CPU kernel thread runs only on its CPU: the thread that ran on `cpu` under the name
/// `comm` is that CPU's instance (`swapper/N` is thread 0, the idle task; `ksoftirqd/N`,
/// `kworker/N:kH` have one id per CPU). Other threads are returned unchanged.
pub fn on_cpu(tid: u32, comm: &str, cpu: u32) -> (u32, String) {
    if comm.starts_with("swapper/") {
        return (0, format!("swapper/{cpu}"));
    }
    if comm.starts_with("ksoftirqd/") {
        return (ksoftirqd_tid(cpu), format!("ksoftirqd/{cpu}"));
    }
    if let Some(rest) = comm.strip_prefix("kworker/") {
        if let Some((n, pool)) = rest.split_once(':') {
            if n.bytes().all(|b| b.is_ascii_digit()) {
                let k = pool.trim_end_matches('H').parse::<u32>().unwrap_or(0);
                return (kworker_tid(cpu, k), format!("kworker/{cpu}:{pool}"));
            }
        }
    }
    (tid, comm.to_string())
}

/// Stack ids of the simulated kernel paths.
pub mod stacks {
    pub const DRIVER_612: u32 = 1;
    pub const DRIVER_61_SUBMIT: u32 = 2;
    pub const DRIVER_61_FLUSH: u32 = 3;
    pub const DRIVER_61_IOTLB: u32 = 4;
    pub const REMOVAL_61_PASID: u32 = 5;
    pub const REMOVAL_61_CONTEXT: u32 = 6;
    pub const REMOVAL_612_LEGACY: u32 = 7;
    pub const REMOVAL_612_BATCH: u32 = 8;
    pub const PCIEHP: u32 = 9;
    pub const FLUSH_QUEUE: u32 = 10;
    pub const NVME_612: u32 = 11;
}

const DRIVER_TAIL: &[&str] = &[
    "__iommu_dma_unmap+0x12c",
    "iommu_dma_unmap_page+0x48",
    "dma_unmap_page_attrs+0x52",
    "virtqueue_unmap_sgs+0x5d",
    "detach_buf_split+0x71",
    "virtqueue_get_buf_ctx_split+0xd4",
    "virtblk_done+0x86",
    "vring_interrupt+0x6e",
    "__handle_irq_event_percpu+0x4a",
    "handle_irq_event+0x38",
];

const PCIEHP_TAIL: &[&str] = &[
    "pci_stop_and_remove_bus_device+0x12",
    "pciehp_unconfigure_device+0x9c",
    "pciehp_disable_slot+0x6b",
    "pciehp_handle_presence_or_link_change+0x7d",
    "pciehp_ist+0x1d6",
    "irq_thread_fn+0x20",
    "irq_thread+0xfa",
    "kthread+0xe8",
    "ret_from_fork+0x34",
];

const NOTIFIER: &[&str] = &[
    "iommu_release_device+0x4c",
    "iommu_bus_notifier+0x5f",
    "blocking_notifier_call_chain+0x64",
    "device_del+0x2c3",
    "pci_remove_bus_device+0x6c",
];

fn frames(head: &[&str], tails: &[&[&str]]) -> Vec<String> {
    head.iter()
        .chain(tails.iter().flat_map(|t| t.iter()))
        .map(|s| s.to_string())
        .collect()
}

/// Every stack the simulator uses (written at the start of each trace).
pub fn stack_records() -> Vec<StackRecord> {
    use stacks::*;
    let mk = |id: u32, frames: Vec<String>| StackRecord {
        id: StackId(id),
        frames,
    };
    vec![
        mk(
            DRIVER_612,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_batch_flush_descs+0x3f",
                    "cache_tag_flush_range+0x1b5",
                    "intel_iommu_tlb_sync+0x1e",
                ],
                &[DRIVER_TAIL],
            ),
        ),
        mk(
            DRIVER_61_SUBMIT,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_flush_dev_iotlb+0xb1",
                    "iommu_flush_dev_iotlb.part.0+0x8d",
                    "iommu_flush_iotlb_psi+0x13c",
                    "intel_iommu_tlb_sync+0x49",
                ],
                &[DRIVER_TAIL],
            ),
        ),
        mk(
            DRIVER_61_FLUSH,
            frames(
                &[
                    "qi_flush_dev_iotlb+0x0",
                    "iommu_flush_dev_iotlb.part.0+0x8d",
                    "iommu_flush_iotlb_psi+0x13c",
                    "intel_iommu_tlb_sync+0x49",
                ],
                &[DRIVER_TAIL],
            ),
        ),
        mk(
            DRIVER_61_IOTLB,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_flush_iotlb+0x7a",
                    "iommu_flush_iotlb_psi+0xf6",
                    "intel_iommu_tlb_sync+0x49",
                ],
                &[DRIVER_TAIL],
            ),
        ),
        mk(
            REMOVAL_61_PASID,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_flush_dev_iotlb+0xb1",
                    "intel_pasid_tear_down_entry+0x19a",
                    "dmar_remove_one_dev_info+0x6e",
                    "intel_iommu_release_device+0x21",
                ],
                &[NOTIFIER, PCIEHP_TAIL],
            ),
        ),
        mk(
            REMOVAL_61_CONTEXT,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_flush_dev_iotlb+0xb1",
                    "domain_context_clear_one+0x1f4",
                    "dmar_remove_one_dev_info+0x9a",
                    "intel_iommu_release_device+0x21",
                ],
                &[NOTIFIER, PCIEHP_TAIL],
            ),
        ),
        mk(
            REMOVAL_612_LEGACY,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_flush_dev_iotlb+0x9a",
                    "__context_flush_dev_iotlb.part.0+0x5c",
                    "domain_context_clear_one_cb+0x6b",
                    "pci_for_each_dma_alias+0x3b",
                    "device_block_translation+0x12e",
                    "blocking_domain_attach_dev+0x12",
                    "__iommu_device_set_domain+0x7d",
                    "iommu_deinit_device+0x8c",
                    "__iommu_group_remove_device+0x5e",
                ],
                &[NOTIFIER, PCIEHP_TAIL],
            ),
        ),
        mk(
            REMOVAL_612_BATCH,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_batch_flush_descs+0x3f",
                    "cache_tag_flush_all+0x94",
                    "device_block_translation+0x10b",
                    "blocking_domain_attach_dev+0x12",
                    "__iommu_device_set_domain+0x7d",
                    "iommu_deinit_device+0x8c",
                ],
                &[NOTIFIER, PCIEHP_TAIL],
            ),
        ),
        mk(PCIEHP, frames(&[], &[PCIEHP_TAIL])),
        mk(
            FLUSH_QUEUE,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_batch_flush_descs+0x3f",
                    "cache_tag_flush_all+0x94",
                    "intel_flush_iotlb_all+0x12",
                    "fq_flush_timeout+0x2a",
                    "call_timer_fn+0x27",
                    "__run_timers+0x1f0",
                    "run_timer_softirq+0x1d",
                    "handle_softirqs+0xd5",
                ],
                &[],
            ),
        ),
        mk(
            NVME_612,
            frames(
                &[
                    "qi_submit_sync+0x2c0",
                    "qi_batch_flush_descs+0x3f",
                    "cache_tag_flush_range+0x1b5",
                    "intel_iommu_tlb_sync+0x1e",
                    "__iommu_dma_unmap+0x12c",
                    "iommu_dma_unmap_sg+0x1a1",
                    "dma_unmap_sg_attrs+0x5a",
                    "nvme_unmap_data+0xcd",
                    "nvme_pci_complete_rq+0x8a",
                    "blk_mq_complete_request+0x3b",
                ],
                &[],
            ),
        ),
    ]
}

/// A hot-plug slot of the simulated machine.
#[derive(Clone, Debug)]
pub struct SimSlot {
    pub ctrl: u64,
    pub port: Bdf,
    pub bus: u8,
    pub irq: i32,
    pub name: &'static str,
    pub ist_tid: u32,
}

/// A PCI device of the simulated machine.
#[derive(Clone, Debug)]
pub struct SimDevice {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub driver: &'static str,
    pub slot: Option<usize>,
    pub iommu: usize,
    pub ats: bool,
    pub tid: u32,
    pub comm: &'static str,
    pub dev_ptr: u64,
    /// A VF's PF (its SID goes in the device-TLB descriptors' `pfsid`).
    pub pf: Option<Sid>,
}

impl SimDevice {
    pub fn sid(&self) -> Sid {
        self.bdf.sid()
    }

    /// The SID a device-TLB descriptor for this device carries as `pfsid`: its PF's for a VF,
    /// else its own.
    pub fn pfsid(&self) -> Sid {
        self.pf.unwrap_or_else(|| self.sid())
    }

    /// A device-TLB invalidation descriptor for this device.
    pub fn devtlb(&self, addr: u64, mask: u32) -> RawDesc {
        Descriptor::dev_tlb_raw(self.sid(), self.pfsid(), 0, addr, mask)
    }
}

/// Builds one event stream.
pub struct World {
    pub rng: Rng,
    pub kernel: Kernel,
    pub iommus: Vec<Iommu>,
    pub slots: Vec<SimSlot>,
    pub devices: Vec<SimDevice>,
    /// Per device: `[from, to)` during which noise traffic may target it.
    pub alive: Vec<Vec<(u64, u64)>>,
    pub ncpu: u32,
    pub t0: u64,
    recs: Vec<(u64, u64, Record)>,
    order: u64,
    /// Submissions issued, by thread (thread 0: by CPU): (submit, return or `u64::MAX`), so
    /// that noise never starts a second one on a thread that is in one. Keyed, not a list:
    /// a scan of every submission per noise submission made a soak chunk quadratic (half the
    /// agent's CPU under `--simulate soak`, docs/benchmarks.md).
    running: BTreeMap<(u32, u32), Vec<(u64, u64)>>,
    /// Records delivered late: (thread, from, to, after) moves the thread's records of
    /// `[from, to]` behind the first record newer than `after` (a ring buffer drained late).
    late: Vec<(u32, u64, u64, u64)>,
}

impl World {
    pub fn new(seed: u64, t0: u64) -> World {
        let mut rng = Rng::new(seed);
        let kernel = if rng.chance(50) {
            Kernel::V6_1
        } else {
            Kernel::V6_12
        };
        // Segment unknown to the probe on some runs: the correlator treats it as 0.
        let segment = if rng.chance(20) { None } else { Some(0) };
        let iommus = vec![
            Iommu {
                ptr: 0xffff_8881_0040_0000,
                name: FixedStr::new("dmar0"),
                segment,
            },
            Iommu {
                ptr: 0xffff_8881_0040_8000,
                name: FixedStr::new("dmar1"),
                segment,
            },
        ];
        let slots = (0..3)
            .map(|i| SimSlot {
                ctrl: 0xffff_8881_03a1_c000 + i as u64 * 0x800,
                port: Bdf::new(0, 0, 4 + i as u8, 0),
                bus: 1 + i as u8,
                irq: 24 + i,
                name: ["1", "2", "3"][i as usize],
                ist_tid: 118 + i as u32,
            })
            .collect();
        let dev =
            |bdf: Bdf, vendor, device, driver, slot, iommu, ats, tid, comm, n: u64| SimDevice {
                bdf,
                vendor,
                device,
                driver,
                slot,
                iommu,
                ats,
                tid,
                comm,
                dev_ptr: 0xffff_8881_0480_0000 + n * 0x1000,
                pf: None,
            };
        let devices = vec![
            dev(
                Bdf::new(0, 1, 0, 0),
                0x1af4,
                0x1042,
                "virtio-pci",
                Some(0),
                0,
                true,
                3101,
                "fio",
                0,
            ),
            dev(
                Bdf::new(0, 2, 0, 0),
                0x8086,
                0x0a54,
                "nvme",
                Some(1),
                0,
                true,
                3102,
                "kworker/1:1H",
                1,
            ),
            dev(
                Bdf::new(0, 3, 0, 0),
                0x15b3,
                0x101d,
                "mlx5_core",
                Some(2),
                0,
                true,
                3103,
                "iperf3",
                2,
            ),
            dev(
                Bdf::new(0, 0x80, 0, 0),
                0x8086,
                0x1563,
                "ixgbe",
                None,
                1,
                true,
                3104,
                "ksoftirqd/1",
                3,
            ),
            dev(
                Bdf::new(0, 0x81, 0, 0),
                0x8086,
                0x0b60,
                "nvme",
                None,
                1,
                false,
                3105,
                "kworker/0:2H",
                4,
            ),
        ];
        let alive = devices.iter().map(|_| vec![(0, u64::MAX)]).collect();
        World {
            rng,
            kernel,
            iommus,
            slots,
            devices,
            alive,
            ncpu: 4,
            t0,
            recs: Vec::new(),
            order: 0,
            running: BTreeMap::new(),
            late: Vec::new(),
        }
    }

    /// Stack and device records at the start of the stream.
    pub fn preamble(&mut self) {
        for s in stack_records() {
            self.push_at(0, Record::Stack(s));
        }
        for i in 0..self.devices.len() {
            self.device_snapshot(i, self.t0);
        }
    }

    /// Adds an IOMMU unit; returns its index.
    pub fn add_iommu(&mut self, name: &str, ptr: u64, segment: Option<u16>) -> usize {
        self.iommus.push(Iommu {
            ptr,
            name: FixedStr::new(name),
            segment,
        });
        self.iommus.len() - 1
    }

    /// Adds a device (noise may target it from the start); `snapshot` says whether the trace
    /// has its sysfs snapshot. Returns its index.
    pub fn add_device(&mut self, mut d: SimDevice, snapshot: bool) -> usize {
        d.dev_ptr = 0xffff_8881_0480_0000 + self.devices.len() as u64 * 0x1000;
        self.devices.push(d);
        self.alive.push(vec![(0, u64::MAX)]);
        let i = self.devices.len() - 1;
        if snapshot {
            self.device_snapshot(i, self.t0);
        }
        i
    }

    /// Thread `tid`'s records of `[from, to]` reach the reader only after the first record
    /// newer than `after` (its CPU's ring buffer drained late).
    pub fn deliver_late(&mut self, tid: u32, from: u64, to: u64, after: u64) {
        self.late.push((tid, from, to, after));
    }

    /// A sysfs snapshot of device `i` taken at `t`.
    pub fn device_snapshot(&mut self, i: usize, t: u64) {
        let d = self.devices[i].clone();
        let info = DeviceInfo {
            bdf: d.bdf,
            vendor: d.vendor,
            device: d.device,
            driver: Some(d.driver.to_string()),
            slot: d.slot.map(|s| self.slots[s].name.to_string()),
            port: d.slot.map(|s| self.slots[s].port),
            ats: Some(d.ats),
            iommu: Some(self.iommus[d.iommu].name.to_string()),
            seen: KTime(t),
        };
        self.push_at(t, Record::Device(info));
    }

    fn push_at(&mut self, ts: u64, r: Record) {
        self.recs.push((ts, self.order, r));
        self.order += 1;
    }

    /// An event of thread `tid` (`comm`) on `cpu`; a per-CPU kernel thread's name and id are
    /// those of `cpu`'s instance ([`on_cpu`]).
    pub fn ev(&mut self, ts: u64, cpu: u32, tid: u32, comm: &str, payload: Payload) {
        let (tid, comm) = on_cpu(tid, comm, cpu);
        let e = Event {
            meta: Meta {
                ts: KTime(ts),
                cpu,
                pid: tid,
                tid,
                comm: FixedStr::new(&comm),
            },
            payload,
        };
        self.push_at(ts, Record::Event(e));
    }

    pub fn cpu(&mut self) -> u32 {
        self.rng.below(self.ncpu as u64) as u32
    }

    /// The CPU slot `s`'s pciehp interrupt (and so its irq thread) is affine to.
    pub fn ist_cpu(&self, s: usize) -> u32 {
        self.slots[s].irq as u32 % self.ncpu
    }

    /// A CPU not in `busy` (all CPUs if every one is).
    pub fn cpu_not_in(&mut self, busy: &[u32]) -> u32 {
        let free: Vec<u32> = (0..self.ncpu).filter(|c| !busy.contains(c)).collect();
        if free.is_empty() {
            return self.cpu();
        }
        free[self.rng.below(free.len() as u64) as usize]
    }

    /// Whether thread `tid` (thread 0: on `cpu`) has a submission open during `[from, to]`.
    fn thread_busy(&self, tid: u32, cpu: u32, from: u64, to: u64) -> bool {
        self.running
            .get(&running_key(tid, cpu))
            .is_some_and(|v| v.iter().any(|r| r.0 <= to && from <= r.1))
    }

    /// A CPU other than `busy`.
    pub fn cpu_except(&mut self, busy: u32) -> u32 {
        let c = self.rng.below(self.ncpu as u64 - 1) as u32;
        if c >= busy {
            c + 1
        } else {
            c
        }
    }

    fn submit_payload(&self, iommu: usize, descs: &[RawDesc], stack: u32) -> Payload {
        let captured = descs.len().min(abi::MAX_BATCH);
        Payload::Submit(Submit {
            iommu: self.iommus[iommu],
            options: 0,
            count: descs.len() as u32,
            raw: descs[..captured].into(),
            others: Default::default(),
            stack: Some(StackId(stack)),
        })
    }

    pub fn iotlb_desc(did: u16) -> RawDesc {
        // QI_IOTLB_TYPE | DID | DR | DW, page-selective (granularity bits left 0).
        RawDesc {
            qw0: 0x2 | ((did as u64) << 16) | (1 << 7) | (1 << 6),
            qw1: 0,
        }
    }

    pub fn devtlb_desc(sid: Sid, addr: u64, mask: u32) -> RawDesc {
        Descriptor::dev_tlb_raw(sid, sid, 0, addr, mask)
    }

    /// Emits a submission by `tid` and returns the submit's timestamp.
    #[allow(clippy::too_many_arguments)]
    pub fn submission(
        &mut self,
        ts: u64,
        cpu: u32,
        tid: u32,
        comm: &str,
        iommu: usize,
        descs: &[RawDesc],
        stack: u32,
        ret: Option<(u64, i64)>,
    ) {
        let p = self.submit_payload(iommu, descs, stack);
        let (rtid, _) = on_cpu(tid, comm, cpu);
        let until = ret.map_or(u64::MAX, |(lat, _)| ts + lat);
        self.running
            .entry(running_key(rtid, cpu))
            .or_default()
            .push((ts, until));
        self.ev(ts, cpu, tid, comm, p);
        if let Some((lat, ret)) = ret {
            self.ev(
                ts + lat,
                cpu,
                tid,
                comm,
                Payload::SubmitReturn(SubmitReturn {
                    ret,
                    start: Some(KTime(ts)),
                }),
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn flush_event(
        &mut self,
        ts: u64,
        cpu: u32,
        tid: u32,
        comm: &str,
        dev: usize,
        mask: u32,
        stack: u32,
    ) {
        let d = self.devices[dev].clone();
        let f = Flush {
            iommu: self.iommus[d.iommu],
            sid: d.sid(),
            pfsid: d.pfsid(),
            qdep: 0,
            pasid: None,
            addr: 0,
            mask,
            stack: Some(StackId(stack)),
        };
        self.ev(ts, cpu, tid, comm, Payload::DevTlbFlush(f));
    }

    /// A driver DMA unmap for device `dev` starting at `t` on `tid`: the invalidations the
    /// kernel issues for it. `ret` = (latency of the device-TLB submission, return code),
    /// `None` = it never returns. Returns the device-TLB submit's time.
    #[allow(clippy::too_many_arguments)]
    pub fn driver_unmap(
        &mut self,
        t: u64,
        cpu: u32,
        tid: u32,
        comm: &str,
        dev: usize,
        ret: Option<(u64, i64)>,
    ) -> u64 {
        let d = self.devices[dev].clone();
        let addr = 0xfff0_0000 + (self.rng.below(4096) << 12);
        let did = 1 + dev as u16;
        if !d.ats {
            self.submission(
                t,
                cpu,
                tid,
                comm,
                d.iommu,
                &[Self::iotlb_desc(did)],
                stacks::DRIVER_612,
                ret,
            );
            return t;
        }
        match self.kernel {
            Kernel::V6_1 => {
                let l1 = self.rng.range(800, 3_000);
                self.submission(
                    t,
                    cpu,
                    tid,
                    comm,
                    d.iommu,
                    &[Self::iotlb_desc(did)],
                    stacks::DRIVER_61_IOTLB,
                    Some((l1, 0)),
                );
                let tf = t + l1 + self.rng.range(200, 800);
                self.flush_event(tf, cpu, tid, comm, dev, 0, stacks::DRIVER_61_FLUSH);
                let ts = tf + self.rng.range(100, 400);
                self.submission(
                    ts,
                    cpu,
                    tid,
                    comm,
                    d.iommu,
                    &[d.devtlb(addr, 0)],
                    stacks::DRIVER_61_SUBMIT,
                    ret,
                );
                ts
            }
            Kernel::V6_12 => {
                let stack = if d.driver == "nvme" {
                    stacks::NVME_612
                } else {
                    stacks::DRIVER_612
                };
                self.submission(
                    t,
                    cpu,
                    tid,
                    comm,
                    d.iommu,
                    &[Self::iotlb_desc(did), d.devtlb(addr, 0)],
                    stack,
                    ret,
                );
                t
            }
        }
    }

    /// Whether noise may target device `i` during `[t, t + span]`.
    pub fn is_alive(&self, i: usize, t: u64, span: u64) -> bool {
        self.alive[i]
            .iter()
            .any(|(a, b)| *a <= t && t.saturating_add(span) < *b)
    }

    /// Stops noise to device `i` from `t` on.
    pub fn kill(&mut self, i: usize, t: u64) {
        for w in self.alive[i].iter_mut() {
            if w.1 > t {
                w.1 = t.max(w.0);
            }
        }
    }

    /// Benign traffic: `n` driver unmaps completing in microseconds, spread over `[from, to)`,
    /// on devices in `devs` that are alive then, never on CPU `avoid`.
    pub fn noise(&mut self, from: u64, to: u64, n: usize, devs: &[usize], avoid: Option<u32>) {
        let avoid: Vec<u32> = avoid.into_iter().collect();
        self.noise_avoiding(from, to, n, devs, &avoid);
    }

    /// [`World::noise`], never on the CPUs in `avoid` (e.g. spinning with interrupts off).
    pub fn noise_avoiding(&mut self, from: u64, to: u64, n: usize, devs: &[usize], avoid: &[u32]) {
        if to <= from || devs.is_empty() {
            return;
        }
        // About two records per submission: grow once, not record by record.
        self.recs.reserve(2 * n);
        for _ in 0..n {
            let t = self.rng.range(from, to - 1);
            let i = devs[self.rng.below(devs.len() as u64) as usize];
            // An unmap takes at most ~10 us here; leave margin.
            if !self.is_alive(i, t, 100 * US) {
                continue;
            }
            let cpu = self.cpu_not_in(avoid);
            let d = self.devices[i].clone();
            // Many threads per device (its user's, each well below pid_max); a per-CPU kernel
            // thread is the one of `cpu`.
            let tid = 100_000 + i as u32 * 100_000 + self.rng.below(100_000) as u32;
            let lat = self.rng.range(2 * US, 30 * US);
            let fq = self.rng.chance(8) && self.kernel == Kernel::V6_12;
            let comm = if fq { "ksoftirqd/0" } else { d.comm };
            let (rtid, _) = on_cpu(tid, comm, cpu);
            // A 6.1 unmap is three records over a few microseconds: leave room for it, inside
            // the span (what follows it may be a scenario's submission on the same thread).
            if t + lat + 10 * US >= to || self.thread_busy(rtid, cpu, t, t + lat + 10 * US) {
                continue;
            }
            if fq {
                // Lazy-mode flush queue: a whole-range invalidation from the timer.
                let descs = [Self::iotlb_desc(1 + i as u16), d.devtlb(0, 52)];
                let descs: &[RawDesc] = if d.ats { &descs } else { &descs[..1] };
                self.submission(
                    t,
                    cpu,
                    tid,
                    comm,
                    d.iommu,
                    descs,
                    stacks::FLUSH_QUEUE,
                    Some((lat, 0)),
                );
            } else {
                self.driver_unmap(t, cpu, tid, d.comm, i, Some((lat, 0)));
            }
        }
    }

    fn slot_payload(&self, s: usize, presence: Option<bool>) -> Slot {
        let sl = &self.slots[s];
        Slot {
            ctrl: sl.ctrl,
            port: Some(sl.port),
            secondary: sl.bus,
            subordinate: sl.bus,
            irq: if presence.is_some() { -1 } else { sl.irq },
            presence,
            stack: presence.map(|_| StackId(stacks::PCIEHP)),
        }
    }

    pub fn ist_comm(&self, s: usize) -> String {
        format!("irq/{}-pciehp", self.slots[s].irq)
    }

    pub fn log(&mut self, ts: u64, cpu: u32, tid: u32, comm: &str, text: String) {
        self.ev(
            ts,
            cpu,
            tid,
            comm,
            Payload::KernelLog(LogLine {
                text,
                truncated: false,
            }),
        );
    }

    pub fn pciehp_log(&mut self, ts: u64, cpu: u32, s: usize, what: &str) {
        let sl = self.slots[s].clone();
        let comm = self.ist_comm(s);
        self.log(
            ts,
            cpu,
            sl.ist_tid,
            &comm,
            format!("pcieport {}: pciehp: Slot({}): {what}", sl.port, sl.name),
        );
    }

    pub fn ist(&mut self, ts: u64, cpu: u32, s: usize) {
        let p = Payload::HotplugIst(self.slot_payload(s, None));
        let (tid, comm) = (self.slots[s].ist_tid, self.ist_comm(s));
        self.ev(ts, cpu, tid, &comm, p);
    }

    pub fn ist_return(&mut self, ts: u64, cpu: u32, s: usize, start: u64) {
        let sl = self.slots[s].clone();
        let comm = self.ist_comm(s);
        self.ev(
            ts,
            cpu,
            sl.ist_tid,
            &comm,
            Payload::HotplugIstReturn(IstReturn {
                ctrl: sl.ctrl,
                start: Some(KTime(start)),
                ret: 1,
            }),
        );
    }

    pub fn unconfigure(&mut self, ts: u64, cpu: u32, s: usize, presence: bool) {
        let p = Payload::Unconfigure(self.slot_payload(s, Some(presence)));
        let (tid, comm) = (self.slots[s].ist_tid, self.ist_comm(s));
        self.ev(ts, cpu, tid, &comm, p);
    }

    pub fn walk(&mut self, ts: u64, cpu: u32, s: usize) {
        let sl = self.slots[s].clone();
        let comm = self.ist_comm(s);
        let seg = self.iommus[0].segment;
        self.ev(
            ts,
            cpu,
            sl.ist_tid,
            &comm,
            Payload::DisconnectWalk(Walk {
                callback: 0xffff_ffff_81a0_c2f0,
                segment: seg,
                bus: sl.bus,
                bus_end: sl.bus,
                stack: Some(StackId(stacks::PCIEHP)),
            }),
        );
    }

    fn dev_ref(&self, dev: usize) -> DeviceRef {
        let d = &self.devices[dev];
        DeviceRef {
            dev_ptr: d.dev_ptr,
            bdf: Some(d.bdf),
            vendor: d.vendor,
            device: d.device,
            stack: Some(StackId(stacks::PCIEHP)),
        }
    }

    /// A device event on the pciehp thread of slot `s`.
    pub fn dev_event(&mut self, ts: u64, cpu: u32, s: usize, dev: usize, what: DevWhat) {
        let r = self.dev_ref(dev);
        let p = match what {
            DevWhat::Disconnected => Payload::DeviceDisconnected(r),
            DevWhat::Remove => Payload::DeviceRemove(r),
            DevWhat::Release => Payload::IommuRelease(r),
        };
        let (tid, comm) = (self.slots[s].ist_tid, self.ist_comm(s));
        self.ev(ts, cpu, tid, &comm, p);
    }

    /// The log block one ITE produces on the spinning CPU (and the fault IRQ elsewhere).
    pub fn ite_block(
        &mut self,
        ts: u64,
        cpu: u32,
        tid: u32,
        comm: &str,
        sid_hex: Option<Sid>,
        qw0: u64,
    ) {
        let other = self.cpu_except(cpu);
        self.log(
            ts,
            other,
            0,
            "swapper/1",
            "DMAR: DRHD: handling fault status reg 40".to_string(),
        );
        let sid = sid_hex.map_or("0".to_string(), |s| format!("{:x}", s.0));
        self.log(
            ts + 1_500,
            cpu,
            tid,
            comm,
            format!("DMAR: VT-d detected Invalidation Time-out Error: SID {sid}"),
        );
        self.log(
            ts + 2_000,
            cpu,
            tid,
            comm,
            format!(
                "DMAR: QI HEAD: Device-TLB Invalidation qw0 = {qw0:#x}, qw1 = 0x7ffffffffffff001"
            ),
        );
        self.log(
            ts + 2_400,
            cpu,
            tid,
            comm,
            "DMAR: QI PRIOR: Invalidation Wait qw0 = 0x200000025, qw1 = 0x1003a5e08".to_string(),
        );
        self.log(
            ts + 3_000,
            cpu,
            tid,
            comm,
            "DMAR: Invalidation Time-out Error (ITE) cleared".to_string(),
        );
    }

    /// The removal path's device-TLB flushes for `dev` on the pciehp thread of slot `s`:
    /// `n` flushes starting at `t`, each with `ret` (latency, code) or never returning.
    /// Returns the time after the last one (or of the hung one).
    pub fn removal_flushes(
        &mut self,
        t: u64,
        cpu: u32,
        s: usize,
        dev: usize,
        n: usize,
        mut ret: impl FnMut(&mut World, usize, u64) -> Option<(u64, i64)>,
    ) -> u64 {
        let d = self.devices[dev].clone();
        let (tid, comm) = (self.slots[s].ist_tid, self.ist_comm(s));
        let batched = self.kernel == Kernel::V6_12 && self.rng.chance(50);
        let mut t = t;
        for k in 0..n {
            let r = ret(self, k, t);
            let submit_t;
            match self.kernel {
                Kernel::V6_1 => {
                    let stack = if k == 0 {
                        stacks::REMOVAL_61_PASID
                    } else {
                        stacks::REMOVAL_61_CONTEXT
                    };
                    self.flush_event(t, cpu, tid, &comm, dev, 52, stack);
                    submit_t = t + self.rng.range(200, 600);
                    self.submission(
                        submit_t,
                        cpu,
                        tid,
                        &comm,
                        d.iommu,
                        &[d.devtlb(0, 52)],
                        stack,
                        r,
                    );
                }
                Kernel::V6_12 if batched => {
                    submit_t = t;
                    self.submission(
                        t,
                        cpu,
                        tid,
                        &comm,
                        d.iommu,
                        &[Self::iotlb_desc(1 + dev as u16), d.devtlb(0, 52)],
                        stacks::REMOVAL_612_BATCH,
                        r,
                    );
                }
                Kernel::V6_12 => {
                    self.flush_event(t, cpu, tid, &comm, dev, 52, stacks::REMOVAL_612_LEGACY);
                    submit_t = t + self.rng.range(200, 600);
                    self.submission(
                        submit_t,
                        cpu,
                        tid,
                        &comm,
                        d.iommu,
                        &[d.devtlb(0, 52)],
                        stacks::REMOVAL_612_LEGACY,
                        r,
                    );
                }
            }
            match r {
                Some((lat, _)) => t = submit_t + lat + self.rng.range(2 * US, 20 * US),
                None => return submit_t,
            }
        }
        t
    }

    /// Sorts by time, then lets records of different threads that are close in time arrive
    /// out of order (per-CPU ring buffers), and returns the stream.
    pub fn finish(mut self) -> Vec<Record> {
        // The order is worked out on (time, order, index) keys, then each record is moved
        // once: a `Record` is a few hundred bytes, and sorting and shuffling the records
        // themselves was most of the cost of a long stream. `(ts, order)` is unique, so an
        // unstable sort gives the stable order.
        let recs = std::mem::take(&mut self.recs);
        let mut keys: Vec<(u64, u64, usize)> = recs
            .iter()
            .enumerate()
            .map(|(i, (ts, o, _))| (*ts, *o, i))
            .collect();
        keys.sort_unstable_by_key(|&(ts, o, _)| (u128::from(ts) << 64) | u128::from(o));
        let tid = |i: usize| match &recs[i].2 {
            Record::Event(e) => Some((e.meta.tid, e.meta.cpu)),
            _ => None,
        };
        let mut i = 0;
        while i + 1 < keys.len() {
            if let (Some(a), Some(b)) = (tid(keys[i].2), tid(keys[i + 1].2)) {
                if a.0 != b.0
                    && a.1 != b.1
                    && keys[i + 1].0 - keys[i].0 < 30 * US
                    && self.rng.chance(30)
                {
                    keys.swap(i, i + 1);
                    i += 2;
                    continue;
                }
            }
            i += 1;
        }
        let mut slots: Vec<Option<Record>> = recs.into_iter().map(|(_, _, r)| Some(r)).collect();
        let mut out = Vec::with_capacity(keys.len());
        out.extend(
            keys.iter()
                .filter_map(|&(_, _, i)| slots.get_mut(i).and_then(Option::take)),
        );
        for &(tid, from, to, after) in &self.late {
            let is_late = |r: &Record| match r {
                Record::Event(e) => e.meta.tid == tid && (from..=to).contains(&e.meta.ts.0),
                _ => false,
            };
            let (late, rest): (Vec<Record>, Vec<Record>) = out.into_iter().partition(is_late);
            let at = rest
                .iter()
                .position(|r| r.ts().is_some_and(|t| t.0 > after))
                .map_or(rest.len(), |p| p + 1);
            let mut rest = rest;
            let tail = rest.split_off(at);
            rest.extend(late);
            rest.extend(tail);
            out = rest;
        }
        out
    }
}

/// Device events on the removal path.
#[derive(Clone, Copy, Debug)]
pub enum DevWhat {
    Disconnected,
    Remove,
    Release,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::T0_NS as T0;

    /// A thread is busy only during its own submissions; thread 0 (the idle tasks) only on
    /// the CPU it ran on.
    #[test]
    fn thread_busy_is_per_thread_and_per_cpu_for_thread_zero() {
        let mut w = World::new(1, T0);
        let desc = [World::iotlb_desc(1)];
        w.submission(T0 + 100, 1, 4242, "fio", 0, &desc, 0, Some((50, 0)));
        w.submission(T0 + 100, 2, 0, "swapper/2", 0, &desc, 0, None);
        assert!(w.thread_busy(4242, 1, T0 + 120, T0 + 130));
        // Another CPU is still the same thread.
        assert!(w.thread_busy(4242, 3, T0 + 120, T0 + 130));
        assert!(!w.thread_busy(4242, 1, T0 + 151, T0 + 160));
        assert!(!w.thread_busy(4243, 1, T0 + 120, T0 + 130));
        // No return: open for ever, on its CPU only.
        assert!(w.thread_busy(0, 2, T0 + 1_000_000, T0 + 1_000_001));
        assert!(!w.thread_busy(0, 1, T0 + 120, T0 + 130));
    }
}
