//! itewatch's BPF programs: the only code that runs in the kernel.
//!
//! Each program reads the arguments of one kernel function (or tracepoint), builds one
//! `itewatch_common` record directly in the `EVENTS` ring buffer and submits it. Struct fields
//! are read at offsets resolved by userspace from the running kernel's BTF (`CONFIG`), never
//! at offsets compiled in: Rust BPF has no CO-RE. Programs fail open: a failed read leaves a
//! field zero/unknown and is counted, a full ring buffer is counted per CPU (`COUNTERS`), and
//! every program returns 0 so the traced function is never affected.
//!
//! Checked against Debian 6.1.170 and 6.12.117 (drivers/iommu/intel/dmar.c,
//! drivers/pci/hotplug/pciehp_{hpc,pci}.c, drivers/pci/bus.c, drivers/iommu/iommu.c).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut};

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
    },
    macros::{fentry, fexit, kprobe, kretprobe, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{
        tracing::StackIdContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext,
        TracePointContext,
    },
    EbpfContext,
};
use itewatch_common::{
    Bdf, CompactHeader, CompactKind, Config, Counter, Desc, DeviceEvent, EventKind,
    FlushCompactEvent, Header, HpTraceEvent, IommuId, IommuInfoEvent, IstReturnEvent, LogEvent,
    ReturnCompactEvent, SlotEvent, SubmitCompactEvent, TaskEvent, WalkEvent, COMPACT_SATURATED,
    COUNTER_SLOTS, IOMMU_SLOTS, IOMMU_SLOT_NONE, LOG_TEXT_LEN, MAX_BATCH, MAX_DISCONNECT_CALLBACKS,
    OFFSET_NONE, RETURN_COMPACT_LEN, SEGMENT_UNKNOWN, STACK_NONE, SUBMIT_COMPACT_FIXED_LEN,
};

/// Set by the loader before load (`EbpfLoader::set_global`).
#[no_mangle]
static CONFIG: Config = Config::DEFAULT;

/// Event stream to userspace. Size is overridden by the loader (`--ringbuf-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Kernel stacks of submissions that carry a device-TLB descriptor and of the hot-plug and
/// removal events. A taken id is never overwritten (no BPF_F_REUSE_STACKID): userspace reads
/// each id once, and deletes the ids it has read once an eighth of the map is taken, so it stays
/// bounded on a host that runs for months (see `live::StackTable`). The loader may resize it.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(2048, 0);

/// What the programs could not do, per CPU (index = `Counter`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What one CPU's hot-path programs keep between runs: one map lookup gives all of it.
#[repr(C)]
pub struct CpuState {
    /// The submission record being built (see `on_submit`).
    submit: SubmitCompactEvent,
    /// The batch's descriptors as read, by position (see `on_submit`).
    raw: [Desc; MAX_BATCH],
    /// The batch as the kernel holds it (`struct qi_desc`: four quadwords), read at once.
    batch: [u64; 4 * MAX_BATCH],
    /// Bit `i`: `raw[i]` is a device-TLB descriptor of this submission. Kept in the map, not
    /// in a register: the verifier does not track what a map holds, while a register's exact
    /// value would make it walk every combination of bits apart (6.1: over a million
    /// instructions).
    devmask: u32,
    _pad: u32,
    /// Per task slot (`tid % TASK_SLOTS`): the thread the slot's last `Task` announcement on
    /// this CPU named, and when it went out.
    task_tid: [u32; TASK_SLOTS],
    task_ns: [u64; TASK_SLOTS],
    /// Records sent since the ring's fill level was last looked at (see `hot_flags`).
    since_check: u32,
    _pad2: u32,
    /// When this CPU last took a stack for an ordinary submission (the sample; `want_stack`).
    sample_ns: u64,
    /// `struct intel_iommu *` each IOMMU slot was last announced for on this CPU (0: none).
    iommu: [u64; IOMMU_SLOTS],
}

/// Per CPU: see `CpuState`.
#[map]
static CPU: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// A thread on a CPU is announced again after this long, so a `comm` that changed (exec,
/// prctl) or a thread id reused is named right within a second.
const TASK_NS: u64 = 1_000_000_000;
/// Task slots per CPU (`itewatch_common::TASK_SLOTS`).
const TASK_SLOTS: usize = itewatch_common::TASK_SLOTS;
/// Ring-buffer fill level looked at every this many hot-path records per CPU.
const CHECK_EVERY: u32 = 64;

/// When a stack is worth its cost (see `want_stack`). Slot 0: `bpf_ktime_get_ns()` of the
/// last hot-plug or removal event any probe saw.
#[map]
static STATE: Array<u64> = Array::with_max_entries(1, 0);

/// Source-ids of devices a removal or disconnect probe has seen, one bit per SID (all
/// segments share it: a collision only costs an extra stack). Set by the BPF programs
/// themselves, so a flush to a removed device carries its stack however late it comes.
#[map]
static GONE_SIDS: Array<u64> = Array::with_max_entries(1024, 0);

/// `sizeof(struct qi_desc)` since 5.0 (four quadwords): the batch is read at once when the
/// kernel's BTF says so (`Config::qi_desc_size`).
const QI_DESC_BYTES: u32 = 32;

/// Stacks of ordinary device-TLB submissions: at most one per CPU per this period.
const SAMPLE_NS: u64 = 1_000_000_000;
/// Every device-TLB submission this long after a hot-plug or removal event carries a stack.
const HOT_NS: u64 = 60_000_000_000;

/// `bpf_ringbuf_*` flags (uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;

/// pciehp_ist entry (time, ctrl) by thread.
#[map]
static IST_START: HashMap<u64, [u64; 2]> = HashMap::with_max_entries(1024, 0);

macro_rules! cfg {
    ($($f:ident).+) => {
        // SAFETY: CONFIG is a plain global written by the loader before load; a volatile read
        // stops the compiler from folding in the compiled-in default.
        unsafe { core::ptr::read_volatile(addr_of!(CONFIG.$($f).+)) }
    };
}

#[inline(always)]
fn bump(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot of this CPU; programs on one CPU do not run concurrently with
        // each other for the same slot except through nesting, where a lost increment is
        // acceptable for a diagnostic counter.
        unsafe { *p += 1 };
    }
}

/// Copies a finished record into the ring buffer, counting a full buffer.
#[inline(always)]
fn emit<T>(ev: &T) {
    if EVENTS.output::<T>(ev, 0).is_err() {
        bump(Counter::RingbufFull);
    }
}

/// Reads a `T` at `base + off`; `None` when the offset is unknown or the read faults.
#[inline(always)]
fn read_at<T>(base: u64, off: u32) -> Option<T> {
    if off == OFFSET_NONE || base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            bump(Counter::ReadFailed);
            None
        }
    }
}

/// Key for per-thread maps: the pid/tgid of a task; on the idle task (pid 0, one per CPU)
/// the CPU number with the top bit set, so two idle CPUs never share an entry.
#[inline(always)]
fn thread_key() -> u64 {
    let id = bpf_get_current_pid_tgid();
    if id as u32 == 0 {
        // SAFETY: no preconditions.
        (1u64 << 63) | unsafe { bpf_get_smp_processor_id() } as u64
    } else {
        id
    }
}

/// `current->comm`. The helper fills all 16 bytes (zeros on failure), so no zero-filled
/// array is needed (that would be a `memset` call, see itewatch-common).
#[inline(always)]
fn comm() -> [u8; 16] {
    let mut c = core::mem::MaybeUninit::<[u8; 16]>::uninit();
    // SAFETY: the helper writes exactly 16 bytes to `c`, zeroing them on failure.
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(c.as_mut_ptr().cast(), 16);
        c.assume_init()
    }
}

/// Reads 16 bytes at `base + off` (`OFFSET_NONE` or a failed read give zeros: the helper
/// zeroes its destination on failure).
#[inline(always)]
fn read_16(base: u64, off: u32) -> [u8; 16] {
    let src = if off == OFFSET_NONE || base == 0 {
        0
    } else {
        base + off as u64
    };
    let mut b = core::mem::MaybeUninit::<[u8; 16]>::uninit();
    // SAFETY: the helper writes exactly 16 bytes to `b` whatever `src` is.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            b.as_mut_ptr().cast(),
            16,
            src as *const core::ffi::c_void,
        );
        b.assume_init()
    }
}

#[inline(always)]
fn header(kind: EventKind) -> Header {
    let id = bpf_get_current_pid_tgid();
    Header {
        kind: kind as u32,
        // SAFETY: no preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: (id >> 32) as u32,
        tid: id as u32,
        comm: comm(),
    }
}

/// Kernel stack of the current call, stored in `STACKS`; `STACK_NONE` if it could not be
/// taken (map full, or a hash collision with a different stack: ids are not reused), which is
/// counted (`Counter::StackFailed`).
#[inline(always)]
fn stack_id<C: StackIdContext>(ctx: &C) -> i32 {
    match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(_) => {
            bump(Counter::StackFailed);
            STACK_NONE
        }
    }
}

/// Ring-buffer flags for a record of the submission hot path: no wake-up (every sink also
/// drains on a timer: `record` 250 ms, `agent` 100 ms, `live` each frame), unless the ring is
/// a quarter full, so a burst still wakes the reader before it fills.
#[inline(always)]
fn quiet_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) > EVENTS.query(BPF_RB_RING_SIZE) / 4 {
        0
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// A hot-plug or removal event: for `HOT_NS` from now, device-TLB submissions carry stacks and
/// device-TLB flushes are recorded (`emit_flush`).
#[inline(always)]
fn mark_hot(now: u64) {
    if let Some(p) = STATE.get_ptr_mut(0) {
        // SAFETY: slot 0 of an array map; a racing store of another CPU's "now" is as good.
        unsafe { *p = now };
    }
}

/// Within `HOT_NS` of a hot-plug or removal event ([`mark_hot`]).
#[inline(always)]
fn is_hot(now: u64) -> bool {
    match STATE.get(0) {
        Some(last) => *last != 0 && now.wrapping_sub(*last) < HOT_NS,
        None => false,
    }
}

/// The device at `sid` is being removed or was disconnected.
#[inline(always)]
fn mark_gone(sid: u16) {
    if let Some(p) = GONE_SIDS.get_ptr_mut((sid >> 6) as u32) {
        // SAFETY: an array slot; a lost bit from a racing update costs stacks, not events.
        unsafe { *p |= 1u64 << (sid & 63) };
    }
}

#[inline(always)]
fn is_gone(sid: u16) -> bool {
    match GONE_SIDS.get((sid >> 6) as u32) {
        Some(w) => *w & (1u64 << (sid & 63)) != 0,
        None => false,
    }
}

/// Whether a submission that carries a device-TLB descriptor (`gone`: to a device a removal
/// probe has seen) takes a kernel stack. The stack names the caller path, which a verdict
/// needs where an invalidation meets a removal; on ordinary traffic one sample per CPU per
/// second keeps the callers classified. Unwinding on every submission was most of the
/// probe's cost (issue 14: 15 us of 17 us per call under TCG).
#[inline(always)]
fn want_stack(st: *mut CpuState, now: u64, gone: bool) -> bool {
    if gone || is_hot(now) {
        return true;
    }
    // SAFETY: `st` is this CPU's state (see `on_submit`).
    unsafe {
        let p = addr_of_mut!((*st).sample_ns);
        if *p == 0 || now.wrapping_sub(*p) >= SAMPLE_NS {
            *p = now;
            true
        } else {
            false
        }
    }
}

/// Whether a descriptor's first quadword is a device-TLB invalidation (type 0x3, or 0x8
/// PASID-based; the type's low 4 bits, as dmar.c's `QI_DIOTLB_TYPE` / `QI_DEIOTLB_TYPE`).
#[inline(always)]
fn is_dev_tlb(qw0: u64) -> bool {
    let t = qw0 & 0xf;
    t == 0x3 || t == 0x8
}

/// `pci_domain_nr(bus)`: `bus->domain_nr` (CONFIG_PCI_DOMAINS_GENERIC) or, on x86,
/// `((struct pci_sysdata *)bus->sysdata)->domain`.
#[inline(always)]
fn bus_segment(bus: u64) -> u16 {
    if let Some(d) = read_at::<i32>(bus, cfg!(offsets.pci_bus_domain_nr)) {
        return d as u16;
    }
    if let Some(sd) = read_at::<u64>(bus, cfg!(offsets.pci_bus_sysdata)) {
        if let Some(d) = read_at::<i32>(sd, cfg!(offsets.pci_sysdata_domain)) {
            return d as u16;
        }
    }
    SEGMENT_UNKNOWN
}

/// The address of a `struct pci_dev`, or `None`.
#[inline(always)]
fn pdev_bdf(pdev: u64) -> Option<Bdf> {
    let bus: u64 = read_at(pdev, cfg!(offsets.pci_dev_bus))?;
    let number: u8 = read_at(bus, cfg!(offsets.pci_bus_number))?;
    let devfn: u32 = read_at(pdev, cfg!(offsets.pci_dev_devfn))?;
    Some(Bdf {
        segment: bus_segment(bus),
        bus: number,
        devfn: devfn as u8,
    })
}

#[inline(always)]
fn iommu_id(iommu: u64) -> IommuId {
    let mut id = IommuId {
        ptr: iommu,
        name: read_16(iommu, cfg!(offsets.intel_iommu_name)),
        segment: SEGMENT_UNKNOWN,
        _pad0: 0,
        _pad1: 0,
    };
    if let Some(seg) = read_at::<u16>(iommu, cfg!(offsets.intel_iommu_segment)) {
        id.segment = seg;
    }
    id
}

// ---------------------------------------------------------------------------------------------
// qi_submit_sync(struct intel_iommu *iommu, struct qi_desc *desc, unsigned int count,
//                unsigned long options)          (6.1, 6.12: drivers/iommu/intel/dmar.c)

//
// Two ways in, one body: fentry/fexit (BPF trampoline: cheaper than a kprobe, and fexit has no
// kretprobe instance limit, so a return is never missed however many submissions are in
// flight) where the kernel supports them, kprobe/kretprobe otherwise. The loader tries them in
// that order and records which one attached.

/// Argument `n` of a trampoline program as a plain integer. The verifier types a pointer
/// argument read by `ctx.arg(n)` as a BTF pointer, on which it allows no arithmetic but adding
/// and subtracting (the IOMMU slot shifts and masks the address); this helper, which it
/// inlines on x86-64, gives the value.
#[inline(always)]
fn func_arg(ctx: &FEntryContext, n: u32) -> u64 {
    let mut v = 0u64;
    // SAFETY: the helper writes one u64 to `v` (0 when `n` is out of range).
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_func_arg(ctx.as_ptr(), n, &mut v);
    }
    v
}

#[fentry(function = "qi_submit_sync")]
pub fn qi_submit_sync_fentry(ctx: FEntryContext) -> u32 {
    let iommu = func_arg(&ctx, 0);
    let desc: u64 = ctx.arg(1);
    let count = ctx.arg::<u64>(2) as u32;
    let options: u64 = ctx.arg(3);
    on_submit(&ctx, iommu, desc, count, options)
}

#[kprobe]
pub fn qi_submit_sync(ctx: ProbeContext) -> u32 {
    let iommu: u64 = ctx.arg(0).unwrap_or(0);
    let desc: u64 = ctx.arg(1).unwrap_or(0);
    let count: u32 = ctx.arg::<u64>(2).unwrap_or(0) as u32;
    let options: u64 = ctx.arg(3).unwrap_or(0);
    on_submit(&ctx, iommu, desc, count, options)
}

/// The compact header of a hot-path record (ABI 3) of thread `tid`, taken at `now`.
#[inline(always)]
fn compact_header(kind: CompactKind, tid: u32, now: u64) -> CompactHeader {
    CompactHeader {
        kind: kind as u8,
        aux: 0,
        // SAFETY: no preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() } as u16,
        tid,
        ts_ns: now,
    }
}

/// Ring-buffer flags for a hot-path record: no wake-up (every sink also drains on a timer:
/// `record` 250 ms, `agent` 100 ms, `live` each frame), except that every `CHECK_EVERY`
/// records of a CPU the fill level is looked at (two helper calls), and a ring a quarter full
/// wakes the reader before it fills.
#[inline(always)]
fn hot_flags(st: *mut CpuState) -> u64 {
    // SAFETY: `st` is this CPU's state; programs of one CPU do not run at once (see
    // `on_submit`).
    unsafe {
        let n = addr_of_mut!((*st).since_check);
        *n += 1;
        if *n >= CHECK_EVERY {
            *n = 0;
            quiet_flags()
        } else {
            BPF_RB_NO_WAKEUP
        }
    }
}

/// Sends a `Task` record for the current thread when its slot (`tid % TASK_SLOTS`) on this
/// CPU last named another thread, or is older than `TASK_NS`. Several slots, because a
/// submission from an interrupt (a DMA completion unmapping) runs on whatever thread it
/// interrupted: with one slot, a CPU alternating between the workload and the threads it
/// interrupts sent a `Task` record every few submissions. Marked as sent only when it went
/// out: a lost one is sent again with the next record (and the decoder names a record without
/// one as unknown).
#[inline(always)]
fn announce_task(st: *mut CpuState, hdr: &CompactHeader, pid: u32) {
    let slot = hdr.tid as usize & (TASK_SLOTS - 1);
    // SAFETY: as in `hot_flags`; `slot` < TASK_SLOTS (masked).
    unsafe {
        let (tid, at) = ((*st).task_tid[slot], (*st).task_ns[slot]);
        if tid == hdr.tid && at != 0 && hdr.ts_ns.wrapping_sub(at) < TASK_NS {
            return;
        }
    }
    let ev = TaskEvent {
        hdr: CompactHeader {
            kind: CompactKind::Task as u8,
            ..*hdr
        },
        pid,
        _pad: 0,
        comm: comm(),
    };
    if EVENTS.output::<TaskEvent>(&ev, BPF_RB_NO_WAKEUP).is_ok() {
        // SAFETY: as above.
        unsafe {
            (*st).task_tid[slot] = hdr.tid;
            (*st).task_ns[slot] = hdr.ts_ns;
        }
    } else {
        bump(Counter::RingbufFull);
    }
}

/// The slot that names `iommu` in this CPU's compact records, announcing it (its name and
/// segment: two kernel reads, once per unit and CPU) when the slot named another unit or none.
/// `IOMMU_SLOT_NONE` when the announcement could not go out (ring buffer full) or the pointer
/// is null: the IOMMU of that record is unknown, never another unit's.
#[inline(always)]
fn iommu_slot(st: *mut CpuState, hdr: &CompactHeader, iommu: u64) -> u8 {
    if iommu == 0 {
        return IOMMU_SLOT_NONE;
    }
    // `struct intel_iommu` is a kmalloc-2k object on 6.1 and 6.12: bits 11 and up differ
    // between units. Two units on one slot only cost announcements.
    let slot = ((iommu >> 11) as usize) & (IOMMU_SLOTS - 1);
    // SAFETY: as in `hot_flags`; `slot` < IOMMU_SLOTS (masked).
    unsafe {
        let p = addr_of_mut!((*st).iommu[slot]);
        if *p == iommu {
            return slot as u8;
        }
        let ev = IommuInfoEvent {
            hdr: CompactHeader {
                kind: CompactKind::IommuInfo as u8,
                aux: slot as u8,
                ..*hdr
            },
            iommu: iommu_id(iommu),
        };
        if EVENTS
            .output::<IommuInfoEvent>(&ev, BPF_RB_NO_WAKEUP)
            .is_ok()
        {
            *p = iommu;
            slot as u8
        } else {
            bump(Counter::RingbufFull);
            IOMMU_SLOT_NONE
        }
    }
}

#[inline(always)]
fn saturate16(v: u64) -> u16 {
    if v >= COMPACT_SATURATED as u64 {
        COMPACT_SATURATED
    } else {
        v as u16
    }
}

#[inline(always)]
fn on_submit<C: StackIdContext>(ctx: &C, iommu: u64, desc: u64, count: u32, options: u64) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Built in this CPU's state, then copied out with only the device-TLB descriptors: an
    // IOTLB + device-TLB pair is 44 bytes on the wire. The stack is taken before the copy, not
    // while a ring-buffer slot is held (which makes other CPUs' records wait). Safe per CPU: a
    // trampoline program does not re-enter on the same CPU (the kernel skips and counts a
    // nested run), nor does a kprobe.
    let Some(st) = CPU.get_ptr_mut(0) else {
        return 0;
    };
    let hdr = compact_header(CompactKind::Submit, id as u32, now);
    announce_task(st, &hdr, (id >> 32) as u32);
    let slot = iommu_slot(st, &hdr, iommu);
    let want = if count as usize > MAX_BATCH {
        MAX_BATCH as u32
    } else {
        count
    };
    let stride = cfg!(qi_desc_size) as u64;
    let mut others = 0u32;
    let mut types = 0u16;
    let mut gone = false;
    // SAFETY: `st` is this CPU's state (see above); the fields sent are all written before
    // the copy.
    let e = unsafe { addr_of_mut!((*st).submit) };
    let raw = unsafe { addr_of_mut!((*st).raw) };
    let devmask = unsafe { addr_of_mut!((*st).devmask) };
    let batch = unsafe { addr_of_mut!((*st).batch) };
    // The whole batch in one read when the kernel's `struct qi_desc` is the 32 bytes it has
    // been since 5.0 (one helper call instead of one per descriptor: 6.12 batches an IOTLB and
    // a device-TLB descriptor); one read per descriptor otherwise.
    let whole = stride == QI_DESC_BYTES as u64 && {
        let len = (want as u64 * QI_DESC_BYTES as u64) & 0x3ff;
        len <= core::mem::size_of::<[u64; 4 * MAX_BATCH]>() as u64
            // SAFETY: `batch` is this CPU's map value of at least `len` bytes.
            && unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                    batch.cast(),
                    len as u32,
                    desc as *const core::ffi::c_void,
                )
            } == 0
    };
    if stride == QI_DESC_BYTES as u64 && !whole && want > 0 {
        bump(Counter::ReadFailed);
    }
    let sent = unsafe {
        devmask.write_volatile(0);
        // Bounded loop: MAX_BATCH iterations at most (verifier: constant trip count), left at
        // the end of the batch. Each descriptor goes to its batch position: a store at a
        // position that depends on the descriptors before it made 6.1's verifier walk over a
        // million instructions.
        for i in 0..MAX_BATCH {
            if (i as u32) >= want {
                break;
            }
            let d = if whole {
                Some(Desc {
                    qw0: *addr_of!((*batch)[4 * i]),
                    qw1: *addr_of!((*batch)[4 * i + 1]),
                })
            } else if stride == QI_DESC_BYTES as u64 {
                // The whole read failed (counted once above).
                None
            } else {
                match bpf_probe_read_kernel((desc + i as u64 * stride) as *const Desc) {
                    Ok(d) => Some(d),
                    Err(_) => {
                        bump(Counter::ReadFailed);
                        None
                    }
                }
            };
            if let Some(d) = d {
                addr_of_mut!((*raw)[i]).write(d);
                if is_dev_tlb(d.qw0) {
                    devmask.write_volatile(devmask.read_volatile() | (1 << i));
                    // SID: bits 31:16 of both device-TLB descriptor types.
                    gone |= is_gone((d.qw0 >> 16) as u16);
                } else {
                    types |= 1u16 << (d.qw0 & 0xf);
                    others += 1;
                }
            }
        }
        // The device-TLB ones, packed in batch order, without a branch on their type: every
        // position of the batch is copied to the next free slot, which only a device-TLB
        // descriptor takes (positions of a failed read have no bit in `devmask`).
        let dm = devmask.read_volatile();
        let mut sent = 0u32;
        for j in 0..MAX_BATCH {
            if (j as u32) >= want {
                break;
            }
            let d = *addr_of!((*raw)[j]);
            addr_of_mut!((*e).descs[sent as usize & (MAX_BATCH - 1)]).write([
                d.qw0 as u32,
                (d.qw0 >> 32) as u32,
                d.qw1 as u32,
                (d.qw1 >> 32) as u32,
            ]);
            sent += (dm >> j) & 1;
        }
        sent
    };
    unsafe {
        // The caller path matters only where a device-TLB invalidation is sent (it names the
        // code path that sent it to a removed device); every other submission (IOTLB,
        // context, wait-only) goes without a stack: no unwind, no map entry. See `want_stack`
        // for which device-TLB submissions take one.
        let stack = if sent > 0 && want_stack(st, now, gone) {
            stack_id(ctx)
        } else {
            STACK_NONE
        };
        addr_of_mut!((*e).hdr).write(CompactHeader { aux: slot, ..hdr });
        addr_of_mut!((*e).count).write(saturate16(count as u64));
        addr_of_mut!((*e).options).write(saturate16(options));
        addr_of_mut!((*e).stack_id).write(stack);
        addr_of_mut!((*e).other_types).write(types);
        addr_of_mut!((*e).sent).write(sent as u8);
        addr_of_mut!((*e).others).write(others as u8);
    }
    // `sent` <= MAX_BATCH, so `len` <= size_of::<SubmitCompactEvent>() (the mask and the
    // check restate it for the verifier).
    let len = (SUBMIT_COMPACT_FIXED_LEN + sent as usize * 16) & 0x1ff;
    if len > core::mem::size_of::<SubmitCompactEvent>() {
        return 0;
    }
    // SAFETY: `e` is within a map value and `len` bytes of it are the record.
    let bytes = unsafe { core::slice::from_raw_parts(e as *const u8, len) };
    if EVENTS.output::<[u8]>(bytes, hot_flags(st)).is_err() {
        bump(Counter::RingbufFull);
    }
    0
}

/// fexit: the arguments, then the return value (an `int`: the low 32 bits).
#[fexit(function = "qi_submit_sync")]
pub fn qi_submit_sync_fexit(ctx: FExitContext) -> u32 {
    on_submit_return(ctx.arg::<u64>(4) as i32)
}

#[kretprobe]
pub fn qi_submit_sync_ret(ctx: RetProbeContext) -> u32 {
    on_submit_return(ctx.ret::<i64>() as i32)
}

#[inline(always)]
fn on_submit_return(ret: i32) -> u32 {
    // No entry time here: userspace pairs a return with its entry by thread (itewatch-core's
    // `pairing`). No `comm` either: the thread's `Task` record of this CPU came with the entry.
    let id = bpf_get_current_pid_tgid();
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let ev = ReturnCompactEvent {
        hdr: compact_header(CompactKind::Return, id as u32, now),
        ret,
        _pad: 0,
    };
    // A failed submission wakes the reader at once; an ordinary one waits for its timer (the
    // entries look at the fill level).
    let flags = if ret != 0 { 0 } else { BPF_RB_NO_WAKEUP };
    // SAFETY: `ev` is a local of at least RETURN_COMPACT_LEN bytes, all written.
    let bytes =
        unsafe { core::slice::from_raw_parts(addr_of!(ev) as *const u8, RETURN_COMPACT_LEN) };
    if EVENTS.output::<[u8]>(bytes, flags).is_err() {
        bump(Counter::RingbufFull);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// void qi_flush_dev_iotlb(struct intel_iommu *iommu, u16 sid, u16 pfsid, u16 qdep, u64 addr,
//                         unsigned mask)
// void qi_flush_dev_iotlb_pasid(struct intel_iommu *iommu, u16 sid, u16 pfsid, u32 pasid,
//                               u16 qdep, u64 addr, unsigned int size_order)

#[inline(always)]
fn emit_flush(
    iommu: u64,
    sid: u16,
    pfsid: u16,
    qdep: u16,
    pasid: Option<u32>,
    addr: u64,
    mask: u32,
) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Only where a verdict's timeline uses it: to a device a removal probe has seen, or within
    // `HOT_NS` of a hot-plug or removal event. Elsewhere the submission this flush makes
    // (`qi_submit_sync` inside it, a record of its own) carries the same descriptor: SID, PF
    // SID, queue depth, address and size. On 6.1, which flushes one device-TLB descriptor per
    // call, this record was 40 of the 104 bytes of every such submission (issue 14).
    if !is_gone(sid) && !is_hot(now) {
        return;
    }
    let id = bpf_get_current_pid_tgid();
    let Some(st) = CPU.get_ptr_mut(0) else {
        return;
    };
    let hdr = compact_header(CompactKind::Flush, id as u32, now);
    announce_task(st, &hdr, (id >> 32) as u32);
    let slot = iommu_slot(st, &hdr, iommu);
    // No stack: the submission this flush makes (`qi_submit_sync` inside it, on the same
    // thread) carries the same one a frame deeper where one is taken.
    let ev = FlushCompactEvent {
        hdr: CompactHeader { aux: slot, ..hdr },
        addr,
        sid,
        pfsid,
        qdep,
        has_pasid: pasid.is_some() as u16,
        pasid: pasid.unwrap_or(0),
        mask,
    };
    // On the submission hot path (6.1 flushes one device-TLB descriptor per call).
    if EVENTS
        .output::<FlushCompactEvent>(&ev, hot_flags(st))
        .is_err()
    {
        bump(Counter::RingbufFull);
    }
}

#[fentry(function = "qi_flush_dev_iotlb")]
pub fn qi_flush_dev_iotlb_fentry(ctx: FEntryContext) -> u32 {
    let iommu = func_arg(&ctx, 0);
    let sid = ctx.arg::<u64>(1) as u16;
    let pfsid = ctx.arg::<u64>(2) as u16;
    let qdep = ctx.arg::<u64>(3) as u16;
    let addr: u64 = ctx.arg(4);
    let mask = ctx.arg::<u64>(5) as u32;
    emit_flush(iommu, sid, pfsid, qdep, None, addr, mask);
    0
}

#[fentry(function = "qi_flush_dev_iotlb_pasid")]
pub fn qi_flush_dev_iotlb_pasid_fentry(ctx: FEntryContext) -> u32 {
    let iommu = func_arg(&ctx, 0);
    let sid = ctx.arg::<u64>(1) as u16;
    let pfsid = ctx.arg::<u64>(2) as u16;
    let pasid = ctx.arg::<u64>(3) as u32;
    let qdep = ctx.arg::<u64>(4) as u16;
    let addr: u64 = ctx.arg(5);
    // A trampoline sees every argument, also the 7th (size_order) that a kprobe would have to
    // read from the stack.
    let size_order = ctx.arg::<u64>(6) as u32;
    emit_flush(iommu, sid, pfsid, qdep, Some(pasid), addr, size_order);
    0
}

#[kprobe]
pub fn qi_flush_dev_iotlb(ctx: ProbeContext) -> u32 {
    let iommu: u64 = ctx.arg(0).unwrap_or(0);
    let sid = ctx.arg::<u64>(1).unwrap_or(0) as u16;
    let pfsid = ctx.arg::<u64>(2).unwrap_or(0) as u16;
    let qdep = ctx.arg::<u64>(3).unwrap_or(0) as u16;
    let addr: u64 = ctx.arg(4).unwrap_or(0);
    let mask = ctx.arg::<u64>(5).unwrap_or(0) as u32;
    emit_flush(iommu, sid, pfsid, qdep, None, addr, mask);
    0
}

#[kprobe]
pub fn qi_flush_dev_iotlb_pasid(ctx: ProbeContext) -> u32 {
    let iommu: u64 = ctx.arg(0).unwrap_or(0);
    let sid = ctx.arg::<u64>(1).unwrap_or(0) as u16;
    let pfsid = ctx.arg::<u64>(2).unwrap_or(0) as u16;
    let pasid = ctx.arg::<u64>(3).unwrap_or(0) as u32;
    let qdep = ctx.arg::<u64>(4).unwrap_or(0) as u16;
    let addr: u64 = ctx.arg(5).unwrap_or(0);
    // The 7th argument (size_order) is on the stack on x86-64 and not read.
    emit_flush(iommu, sid, pfsid, qdep, Some(pasid), addr, 0);
    0
}

// ---------------------------------------------------------------------------------------------
// pciehp: static irqreturn_t pciehp_ist(int irq, void *dev_id)       (dev_id: struct controller *)
//         void pciehp_unconfigure_device(struct controller *ctrl, bool presence)

#[inline(always)]
fn slot_event<C: StackIdContext>(
    ctx: &C,
    kind: EventKind,
    ctrl: u64,
    irq: i32,
    presence: u8,
) -> SlotEvent {
    let hdr = header(kind);
    mark_hot(hdr.ts_ns);
    let mut ev = SlotEvent {
        hdr,
        ctrl,
        port: Bdf {
            segment: SEGMENT_UNKNOWN,
            bus: 0,
            devfn: 0,
        },
        irq,
        secondary: 0,
        subordinate: 0,
        presence,
        valid: 0,
        stack_id: stack_id(ctx),
    };
    // ctrl->pcie->port: the hot-plug port; its ->subordinate bus range is the slot's.
    let port = read_at::<u64>(ctrl, cfg!(offsets.controller_pcie))
        .and_then(|pcie| read_at::<u64>(pcie, cfg!(offsets.pcie_device_port)));
    if let Some(port) = port {
        if let Some(bdf) = pdev_bdf(port) {
            ev.port = bdf;
            ev.valid = 1;
        }
        if let Some(sub) = read_at::<u64>(port, cfg!(offsets.pci_dev_subordinate)) {
            ev.secondary = read_at::<u64>(sub, cfg!(offsets.pci_bus_busn_start)).unwrap_or(0) as u8;
            ev.subordinate = read_at::<u64>(sub, cfg!(offsets.pci_bus_busn_end)).unwrap_or(0) as u8;
        }
    }
    ev
}

#[kprobe]
pub fn pciehp_ist(ctx: ProbeContext) -> u32 {
    let irq = ctx.arg::<u64>(0).unwrap_or(0) as i32;
    let ctrl: u64 = ctx.arg(1).unwrap_or(0);
    let ev = slot_event(&ctx, EventKind::HotplugIst, ctrl, irq, 0xff);
    let _ = IST_START.insert(&thread_key(), &[ev.hdr.ts_ns, ctrl], 0);
    emit(&ev);
    0
}

#[kretprobe]
pub fn pciehp_ist_ret(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as i32;
    let key = thread_key();
    // SAFETY: the value is copied out before the entry is removed.
    let [start, ctrl] = match unsafe { IST_START.get(&key) } {
        Some(v) => *v,
        None => {
            bump(Counter::ReturnWithoutEntry);
            [0, 0]
        }
    };
    let _ = IST_START.remove(&key);
    let ev = IstReturnEvent {
        hdr: header(EventKind::HotplugIstReturn),
        ctrl,
        start_ts_ns: start,
        ret,
        _pad: 0,
    };
    emit(&ev);
    0
}

#[kprobe]
pub fn pciehp_unconfigure_device(ctx: ProbeContext) -> u32 {
    let ctrl: u64 = ctx.arg(0).unwrap_or(0);
    let presence = (ctx.arg::<u64>(1).unwrap_or(0) & 0xff != 0) as u8;
    let ev = slot_event(&ctx, EventKind::Unconfigure, ctrl, -1, presence);
    emit(&ev);
    0
}

// ---------------------------------------------------------------------------------------------
// void pci_walk_bus(struct pci_bus *top, int (*cb)(struct pci_dev *, void *), void *userdata)
// Only walks whose callback is a copy of pci_dev_set_disconnected are reported.

#[kprobe]
pub fn pci_walk_bus(ctx: ProbeContext) -> u32 {
    let bus: u64 = ctx.arg(0).unwrap_or(0);
    let cb: u64 = ctx.arg(1).unwrap_or(0);
    let mut hit = false;
    for i in 0..MAX_DISCONNECT_CALLBACKS {
        // SAFETY: see `cfg!`; `i` is bounded by the loop (verifier: constant trip count).
        let c = unsafe { core::ptr::read_volatile(addr_of!(CONFIG.disconnect_callbacks[i])) };
        if c != 0 && c == cb {
            hit = true;
        }
    }
    if !hit {
        return 0;
    }
    let hdr = header(EventKind::DisconnectWalk);
    mark_hot(hdr.ts_ns);
    let ev = WalkEvent {
        hdr,
        callback: cb,
        segment: bus_segment(bus),
        bus: read_at::<u8>(bus, cfg!(offsets.pci_bus_number)).unwrap_or(0),
        bus_end: read_at::<u64>(bus, cfg!(offsets.pci_bus_busn_end)).unwrap_or(0) as u8,
        stack_id: stack_id(&ctx),
    };
    emit(&ev);
    0
}

// ---------------------------------------------------------------------------------------------
// Device-level events. Argument 0 is a `struct pci_dev *` except for the IOMMU release, whose
// argument is a `struct device *` (a PCI one when dev->bus == &pci_bus_type).

#[inline(always)]
fn emit_device<C: StackIdContext>(ctx: &C, kind: EventKind, pdev: u64, dev_ptr: u64) {
    let (bdf, is_pci, vendor, device) = match pdev_bdf(pdev) {
        Some(bdf) if pdev != 0 => (
            bdf,
            1u8,
            read_at::<u16>(pdev, cfg!(offsets.pci_dev_vendor)).unwrap_or(0),
            read_at::<u16>(pdev, cfg!(offsets.pci_dev_device)).unwrap_or(0),
        ),
        _ => (
            Bdf {
                segment: SEGMENT_UNKNOWN,
                bus: 0,
                devfn: 0,
            },
            0u8,
            0u16,
            0u16,
        ),
    };
    let hdr = header(kind);
    mark_hot(hdr.ts_ns);
    if is_pci == 1 {
        mark_gone(bdf.sid());
    }
    let mut ev = core::mem::MaybeUninit::<DeviceEvent>::uninit();
    let e = ev.as_mut_ptr();
    // SAFETY: every field of the local `ev` is written before `assume_init`. Volatile stores
    // keep LLVM from merging the run of (often zero) fields into a `memset` call, which 6.1's
    // verifier rejects (see itewatch-common).
    let ev = unsafe {
        addr_of_mut!((*e).hdr).write(hdr);
        addr_of_mut!((*e).dev_ptr).write_volatile(dev_ptr);
        addr_of_mut!((*e).bdf).write_volatile(bdf);
        addr_of_mut!((*e).vendor).write_volatile(vendor);
        addr_of_mut!((*e).device).write_volatile(device);
        addr_of_mut!((*e).is_pci).write_volatile(is_pci);
        addr_of_mut!((*e)._pad0).write_volatile(0);
        addr_of_mut!((*e)._pad1).write_volatile(0);
        addr_of_mut!((*e).stack_id).write_volatile(stack_id(ctx));
        ev.assume_init()
    };
    emit(&ev);
}

/// `pci_doe_disconnected(struct pci_dev *)` (6.12; called per device by
/// pci_dev_set_disconnected) and `pci_dev_set_disconnected(struct pci_dev *, void *)` itself
/// where a kernel lets it be probed.
#[kprobe]
pub fn device_disconnected(ctx: ProbeContext) -> u32 {
    let pdev: u64 = ctx.arg(0).unwrap_or(0);
    emit_device(&ctx, EventKind::DeviceDisconnected, pdev, pdev);
    0
}

/// `void pci_stop_and_remove_bus_device(struct pci_dev *dev)`.
#[kprobe]
pub fn device_remove(ctx: ProbeContext) -> u32 {
    let pdev: u64 = ctx.arg(0).unwrap_or(0);
    emit_device(&ctx, EventKind::DeviceRemove, pdev, pdev);
    0
}

/// `iommu_release_device(struct device *dev)` / `intel_iommu_release_device(struct device *)`.
#[kprobe]
pub fn iommu_release(ctx: ProbeContext) -> u32 {
    let dev: u64 = ctx.arg(0).unwrap_or(0);
    let pci_bus_type = cfg!(pci_bus_type);
    let off = cfg!(offsets.pci_dev_dev);
    let is_pci = pci_bus_type != 0
        && off != OFFSET_NONE
        && read_at::<u64>(dev, cfg!(offsets.device_bus)) == Some(pci_bus_type);
    let pdev = if is_pci { dev - off as u64 } else { 0 };
    emit_device(&ctx, EventKind::IommuRelease, pdev, dev);
    0
}

// ---------------------------------------------------------------------------------------------
// printk:console(const char *text, size_t len): kernel log records of interest.

const PREFIXES: [&[u8]; 8] = [
    b"DMAR",
    b"pcieport",
    b"pciehp",
    b"pci 0",
    b"watchdog",
    b"NMI watchdog",
    b"Kernel panic",
    b"rcu:",
];

#[tracepoint]
pub fn printk_console(ctx: TracePointContext) -> u32 {
    let loc_off = cfg!(console_msg_loc);
    if loc_off == OFFSET_NONE {
        return 0;
    }
    // SAFETY: the offset comes from the tracepoint's format file.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(loc_off as usize) }) else {
        return 0;
    };
    let (off, len) = ((loc & 0xffff) as u64, loc >> 16);
    let Some(mut entry) = EVENTS.reserve::<LogEvent>(0) else {
        bump(Counter::RingbufFull);
        return 0;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is reserved ring-buffer memory owned by this program until submit/discard.
    let keep = unsafe {
        let text = &mut *addr_of_mut!((*e).text);
        // The helper NUL-terminates; bytes after the NUL are stale ring-buffer contents that
        // the reader ignores (it stops at the NUL and at `len`).
        if bpf_probe_read_kernel_str_bytes((ctx.as_ptr() as u64 + off) as *const u8, text).is_err()
        {
            entry.discard(0);
            return 0;
        }
        let mut any = false;
        for p in PREFIXES {
            let mut m = true;
            for (i, b) in p.iter().enumerate() {
                if i >= LOG_TEXT_LEN || text[i] != *b {
                    m = false;
                    break;
                }
            }
            any |= m;
        }
        addr_of_mut!((*e).hdr).write(header(EventKind::KernelLog));
        addr_of_mut!((*e).len).write(len);
        addr_of_mut!((*e)._pad).write(0);
        any
    };
    if keep {
        entry.submit(0);
    } else {
        entry.discard(0);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// pci:pci_hp_event(const char *port_name, const char *slot, int event)   (7.x;
// include/trace/events/pci.h): pciehp's link and presence changes, as fields.

/// Copies a `__data_loc char[]` field of a tracepoint record (`loc`: its offset in the record)
/// into `dst`, NUL terminated; zeros when the offset is unknown or a read fails.
#[inline(always)]
fn data_loc_str(ctx: &TracePointContext, loc: u32, dst: &mut [u8; 16]) {
    if loc == OFFSET_NONE {
        return;
    }
    // SAFETY: the offset comes from the tracepoint's format file.
    let Ok(v) = (unsafe { ctx.read_at::<u32>(loc as usize) }) else {
        return;
    };
    let src = ctx.as_ptr() as u64 + (v & 0xffff) as u64;
    // SAFETY: the helper bounds the copy by `dst` and NUL-terminates.
    if unsafe { bpf_probe_read_kernel_str_bytes(src as *const u8, dst) }.is_err() {
        bump(Counter::ReadFailed);
    }
}

#[tracepoint]
pub fn pci_hp_event(ctx: TracePointContext) -> u32 {
    let event_off = cfg!(hp_event_off);
    if event_off == OFFSET_NONE {
        return 0;
    }
    let hdr = header(EventKind::HotplugTrace);
    mark_hot(hdr.ts_ns);
    // SAFETY: the offset comes from the tracepoint's format file.
    let event = unsafe { ctx.read_at::<i32>(event_off as usize) }.unwrap_or(-1) as u32;
    let mut ev = HpTraceEvent {
        hdr,
        event,
        _pad: 0,
        port: [0; 16],
        slot: [0; 16],
    };
    data_loc_str(&ctx, cfg!(hp_port_loc), &mut ev.port);
    data_loc_str(&ctx, cfg!(hp_slot_loc), &mut ev.slot);
    emit(&ev);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
