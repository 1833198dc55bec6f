//! The kernel/user event ABI of itewatch.
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of integers and fixed arrays only, with
//! explicit padding and a compile-time size check. The BPF programs (`itewatch-ebpf`) write
//! these structs into the `EVENTS` ring buffer; userspace decodes them with a length check and
//! `read_unaligned` (see `itewatch::event`), and the trace file stores them as they came out of
//! the kernel, so a recorded trace replays through the very same decoder as a live one.
//!
//! Compatibility: any change to a struct below bumps [`ABI_VERSION`], which the trace header
//! carries. Readers refuse a trace whose ABI version they do not know.
#![no_std]

/// Version of the structs below. Bump on any layout or meaning change.
///
/// 2: adds [`EventKind::HotplugTrace`], and a [`SubmitEvent`] record may end after the
/// descriptors it carries (`SUBMIT_FIXED_LEN + 16 * min(count, MAX_BATCH)` bytes); every
/// struct of version 1 is unchanged, so a reader of version 2 reads version-1 traces as they
/// are ([`ABI_VERSIONS_READ`]).
///
/// 3: the submission hot path goes out as compact records ([`CompactKind`]): a 16-byte
/// [`CompactHeader`] without `pid`/`comm`, the IOMMU as a per-CPU slot announced once by an
/// [`IommuInfoEvent`], the thread's `pid`/`comm` announced by a [`TaskEvent`] when the thread
/// of a CPU's task slot changes, a [`SubmitCompactEvent`] that carries only its device-TLB descriptors
/// (the others summarised by type), a 20-byte [`ReturnCompactEvent`] and a 40-byte
/// [`FlushCompactEvent`]. Decoding them needs the announcements that came before on the same
/// CPU (a stateful decoder). [`SubmitEvent::others`] (was padding, always 0 before) may
/// summarise descriptors not carried. Every other struct of version 2 is unchanged.
pub const ABI_VERSION: u32 = 3;
/// The ABI versions this build decodes.
pub const ABI_VERSIONS_READ: core::ops::RangeInclusive<u32> = 1..=ABI_VERSION;

/// Descriptors of one `qi_submit_sync` batch captured per submission event. 6.12 batches up to
/// 16 (`QI_MAX_BATCHED_DESC_COUNT`, drivers/iommu/intel/iommu.h); 6.1 submits 1 at a time.
pub const MAX_BATCH: usize = 16;
/// `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;
/// `intel_iommu::name` is `char name[16]` on 6.1 and 6.12 ("dmar%d").
pub const IOMMU_NAME_LEN: usize = 16;
/// Bytes of a kernel log record captured by the printk probe.
pub const LOG_TEXT_LEN: usize = 192;
/// Bytes of a PCI device name (`pci_name()`, "0000:00:1c.0") or hot-plug slot name captured
/// from the `pci:pci_hp_event` tracepoint.
pub const HP_NAME_LEN: usize = 16;
/// Callbacks recognised as a copy of `pci_dev_set_disconnected` (6.1 has 3, 6.12 has 4).
pub const MAX_DISCONNECT_CALLBACKS: usize = 8;
/// An offset that the running kernel's BTF did not provide: the field is not read.
pub const OFFSET_NONE: u32 = u32::MAX;
/// A stack id that could not be taken.
pub const STACK_NONE: i32 = -1;
/// A PCI segment the probe could not read.
pub const SEGMENT_UNKNOWN: u16 = u16::MAX;

/// What an event is. Stored as a `u32` in [`Header::kind`]; decode with `TryFrom`, which fails
/// on kinds this build does not know.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// `qi_submit_sync` entry: [`SubmitEvent`].
    Submit = 1,
    /// `qi_submit_sync` return: [`SubmitReturnEvent`].
    SubmitReturn = 2,
    /// `qi_flush_dev_iotlb` / `qi_flush_dev_iotlb_pasid` entry: [`FlushEvent`].
    DevTlbFlush = 3,
    /// `pciehp_ist` entry: [`SlotEvent`].
    HotplugIst = 4,
    /// `pciehp_ist` return: [`IstReturnEvent`].
    HotplugIstReturn = 5,
    /// `pciehp_unconfigure_device(ctrl, presence)` entry: [`SlotEvent`].
    Unconfigure = 6,
    /// `pci_walk_bus(bus, <a pci_dev_set_disconnected copy>, ..)`: [`WalkEvent`].
    DisconnectWalk = 7,
    /// A device marked disconnected (`pci_doe_disconnected`, or a working
    /// `pci_dev_set_disconnected` probe): [`DeviceEvent`].
    DeviceDisconnected = 8,
    /// `pci_stop_and_remove_bus_device(dev)`: the device's removal starts. [`DeviceEvent`].
    DeviceRemove = 9,
    /// `iommu_release_device(dev)` (BUS_NOTIFY_REMOVED_DEVICE): the device leaves the IOMMU;
    /// the thread's "still findable by BDF" window ends here. [`DeviceEvent`].
    IommuRelease = 10,
    /// A kernel log record of interest (DMAR, pciehp, watchdog): [`LogEvent`].
    KernelLog = 11,
    /// `pci:pci_hp_event` tracepoint (7.x): link up/down, card present/not present on a
    /// hot-plug port. [`HpTraceEvent`].
    HotplugTrace = 12,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::Submit,
        EventKind::SubmitReturn,
        EventKind::DevTlbFlush,
        EventKind::HotplugIst,
        EventKind::HotplugIstReturn,
        EventKind::Unconfigure,
        EventKind::DisconnectWalk,
        EventKind::DeviceDisconnected,
        EventKind::DeviceRemove,
        EventKind::IommuRelease,
        EventKind::KernelLog,
        EventKind::HotplugTrace,
    ];

    /// Size in bytes of the struct that carries this kind.
    pub const fn wire_size(self) -> usize {
        match self {
            EventKind::Submit => core::mem::size_of::<SubmitEvent>(),
            EventKind::SubmitReturn => core::mem::size_of::<SubmitReturnEvent>(),
            EventKind::DevTlbFlush => core::mem::size_of::<FlushEvent>(),
            EventKind::HotplugIst | EventKind::Unconfigure => core::mem::size_of::<SlotEvent>(),
            EventKind::HotplugIstReturn => core::mem::size_of::<IstReturnEvent>(),
            EventKind::DisconnectWalk => core::mem::size_of::<WalkEvent>(),
            EventKind::DeviceDisconnected | EventKind::DeviceRemove | EventKind::IommuRelease => {
                core::mem::size_of::<DeviceEvent>()
            }
            EventKind::KernelLog => core::mem::size_of::<LogEvent>(),
            EventKind::HotplugTrace => core::mem::size_of::<HpTraceEvent>(),
        }
    }
}

/// The `u32` was not a known [`EventKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownKind(pub u32);

impl TryFrom<u32> for EventKind {
    type Error = UnknownKind;
    fn try_from(v: u32) -> Result<Self, UnknownKind> {
        EventKind::ALL
            .iter()
            .copied()
            .find(|k| *k as u32 == v)
            .ok_or(UnknownKind(v))
    }
}

/// The record kinds of the ABI 3 hot path. The first byte of every record is its kind: the
/// [`EventKind`]s are `u32`s below 256, little-endian, so their first byte is the kind too.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CompactKind {
    /// [`IommuInfoEvent`]: what IOMMU slot `aux` means on this CPU from now on.
    IommuInfo = 13,
    /// [`TaskEvent`]: the thread whose compact records on this CPU follow.
    Task = 14,
    /// [`SubmitCompactEvent`]: `qi_submit_sync` entry.
    Submit = 15,
    /// [`ReturnCompactEvent`]: `qi_submit_sync` return.
    Return = 16,
    /// [`FlushCompactEvent`]: `qi_flush_dev_iotlb(_pasid)` entry.
    Flush = 17,
}

impl CompactKind {
    pub const ALL: [CompactKind; 5] = [
        CompactKind::IommuInfo,
        CompactKind::Task,
        CompactKind::Submit,
        CompactKind::Return,
        CompactKind::Flush,
    ];

    pub fn from_u8(v: u8) -> Option<CompactKind> {
        CompactKind::ALL.iter().copied().find(|k| *k as u8 == v)
    }

    /// The shortest record of this kind, in bytes (a submission adds 16 per descriptor it
    /// carries; every other kind is exactly this long).
    pub const fn min_len(self) -> usize {
        match self {
            CompactKind::IommuInfo => core::mem::size_of::<IommuInfoEvent>(),
            CompactKind::Task => core::mem::size_of::<TaskEvent>(),
            CompactKind::Submit => SUBMIT_COMPACT_FIXED_LEN,
            CompactKind::Return => RETURN_COMPACT_LEN,
            CompactKind::Flush => core::mem::size_of::<FlushCompactEvent>(),
        }
    }
}

/// An IOMMU slot that could not be announced (the ring buffer was full for the announcement):
/// the submission's IOMMU is unknown.
pub const IOMMU_SLOT_NONE: u8 = 0xff;
/// IOMMU slots per CPU (a slot is picked from the `struct intel_iommu` address; two units on
/// one slot take turns, announced again at each change).
pub const IOMMU_SLOTS: usize = 8;

/// Task slots per CPU: a compact record's thread is the one the last [`TaskEvent`] of its
/// CPU and slot (`tid % TASK_SLOTS`) named. A power of two.
pub const TASK_SLOTS: usize = 4;

/// First bytes of every ABI 3 compact record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactHeader {
    /// [`CompactKind`] as `u8`.
    pub kind: u8,
    /// Per kind: the IOMMU slot for submissions, flushes and IOMMU announcements; else 0.
    pub aux: u8,
    /// CPU the probe ran on.
    pub cpu: u16,
    /// Thread id (the thread group id and `comm` come from the CPU's last [`TaskEvent`]).
    pub tid: u32,
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
}

/// Announces IOMMU slot `hdr.aux` on CPU `hdr.cpu`: compact records of that CPU that name the
/// slot mean this unit until the next announcement of the slot there.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IommuInfoEvent {
    pub hdr: CompactHeader,
    pub iommu: IommuId,
}

/// Announces the thread `hdr.tid` on CPU `hdr.cpu`, in task slot `hdr.tid % TASK_SLOTS`:
/// compact records of that CPU with the same tid belong to it. Sent when the slot's thread
/// changes, and at least once a second.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TaskEvent {
    pub hdr: CompactHeader,
    /// Thread group id.
    pub pid: u32,
    pub _pad: u32,
    /// `current->comm`, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// Bytes of a [`SubmitCompactEvent`] before its descriptors.
pub const SUBMIT_COMPACT_FIXED_LEN: usize = 28;
/// Bytes of a [`ReturnCompactEvent`] on the wire (the struct has 4 bytes of tail padding that
/// are not sent).
pub const RETURN_COMPACT_LEN: usize = 20;
/// `count` or `options` too large for a compact field.
pub const COMPACT_SATURATED: u16 = u16::MAX;

/// `qi_submit_sync(iommu, desc, count, options)` entry, compact (ABI 3). `hdr.aux` is the
/// IOMMU slot ([`IOMMU_SLOT_NONE`]: unknown). Only the device-TLB descriptors (types 0x3 and
/// 0x8) of the first `min(count, MAX_BATCH)` go out, in batch order: the record is
/// `SUBMIT_COMPACT_FIXED_LEN + 16 * sent` bytes. The others are summarised by type.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SubmitCompactEvent {
    pub hdr: CompactHeader,
    /// `count` as the kernel passed it, [`COMPACT_SATURATED`] if it did not fit.
    pub count: u16,
    /// `options`, [`COMPACT_SATURATED`] if it did not fit.
    pub options: u16,
    /// Kernel stack id in the `STACKS` map, or [`STACK_NONE`].
    pub stack_id: i32,
    /// Bit `t` set: a descriptor of type `t` (`qw0 & 0xf`) was read and not sent.
    pub other_types: u16,
    /// Device-TLB descriptors in `descs`.
    pub sent: u8,
    /// Descriptors read and not sent (summarised in `other_types`).
    pub others: u8,
    /// `qw0` low, `qw0` high, `qw1` low, `qw1` high (32-bit words: no padding before them).
    pub descs: [[u32; 4]; MAX_BATCH],
}

/// `qi_submit_sync` return, compact (ABI 3): [`RETURN_COMPACT_LEN`] bytes on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReturnCompactEvent {
    pub hdr: CompactHeader,
    /// The `int` return value.
    pub ret: i32,
    pub _pad: u32,
}

/// `qi_flush_dev_iotlb(_pasid)` entry, compact (ABI 3). `hdr.aux` is the IOMMU slot. No
/// stack: the submission it makes carries one where one is taken.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlushCompactEvent {
    pub hdr: CompactHeader,
    pub addr: u64,
    pub sid: u16,
    pub pfsid: u16,
    pub qdep: u16,
    pub has_pasid: u16,
    pub pasid: u32,
    pub mask: u32,
}

/// First bytes of every event of an [`EventKind`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    /// CPU the probe ran on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds (the printk/dmesg time base, less any
    /// suspend time).
    pub ts_ns: u64,
    /// Thread group id (userspace "PID").
    pub pid: u32,
    /// Thread id; a kernel thread's own PID.
    pub tid: u32,
    /// `current->comm`, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// PCI address, packed. `segment == SEGMENT_UNKNOWN` when it could not be read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    pub segment: u16,
    pub bus: u8,
    pub devfn: u8,
}

impl Bdf {
    /// PCI source-id, `bus << 8 | devfn` (PCI_DEVID).
    pub const fn sid(self) -> u16 {
        ((self.bus as u16) << 8) | self.devfn as u16
    }
}

/// Which IOMMU unit a submission went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuId {
    /// Kernel address of `struct intel_iommu` (stable for the unit's life; never shown alone).
    pub ptr: u64,
    /// `iommu->name`, e.g. "dmar0", NUL padded.
    pub name: [u8; IOMMU_NAME_LEN],
    /// `iommu->segment` where BTF has it, else `SEGMENT_UNKNOWN`.
    pub segment: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

/// One invalidation descriptor: `struct qi_desc` qw0 and qw1 (qw2/qw3 carry nothing for the
/// device-TLB types).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub qw0: u64,
    pub qw1: u64,
}

/// Bytes of a [`SubmitEvent`] before its descriptors: the shortest record of that kind.
pub const SUBMIT_FIXED_LEN: usize = core::mem::size_of::<SubmitEvent>() - MAX_BATCH * 16;

/// `qi_submit_sync(iommu, desc, count, options)` entry. From ABI 2 the probe sends only the
/// first `min(count, MAX_BATCH)` descriptors: the record is that much shorter.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SubmitEvent {
    pub hdr: Header,
    pub iommu: IommuId,
    pub options: u64,
    /// `count` as the kernel passed it.
    pub count: u32,
    /// How many of `descs` were read (`min(count, MAX_BATCH)`, less any failed read).
    pub captured: u32,
    /// Kernel stack id in the `STACKS` map, or [`STACK_NONE`].
    pub stack_id: i32,
    /// ABI 3: descriptors read and not carried in `descs`, summarised: bits 0..16 a type mask
    /// (bit `t`: a descriptor of type `t`), bits 16..32 how many. Always 0 before ABI 3.
    pub others: u32,
    pub descs: [Desc; MAX_BATCH],
}

/// `qi_submit_sync` return.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SubmitReturnEvent {
    pub hdr: Header,
    /// Return value: 0, or -ETIMEDOUT (6.9+ when the ITE target is gone), -EINVAL (IQE).
    pub ret: i64,
    /// Entry timestamp from the entry probe on this thread, 0 when it was not seen.
    pub start_ts_ns: u64,
}

/// `qi_flush_dev_iotlb(iommu, sid, pfsid, qdep, addr, mask)` or
/// `qi_flush_dev_iotlb_pasid(iommu, sid, pfsid, pasid, qdep, addr, size_order)` entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlushEvent {
    pub hdr: Header,
    pub iommu: IommuId,
    pub addr: u64,
    pub sid: u16,
    pub pfsid: u16,
    pub qdep: u16,
    /// 1 for the PASID variant.
    pub has_pasid: u16,
    pub pasid: u32,
    /// `mask` (or `size_order` for the PASID variant).
    pub mask: u32,
    pub stack_id: i32,
    pub _pad: u32,
}

/// A hot-plug controller event: `pciehp_ist(irq, ctrl)` entry or
/// `pciehp_unconfigure_device(ctrl, presence)` entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlotEvent {
    pub hdr: Header,
    /// `struct controller *` (pairs an ist entry with its unconfigure).
    pub ctrl: u64,
    /// The hot-plug port (`ctrl->pcie->port`).
    pub port: Bdf,
    /// `irq` for `pciehp_ist`, -1 otherwise.
    pub irq: i32,
    /// Bus range behind the port: `port->subordinate->busn_res.start..=end`.
    pub secondary: u8,
    pub subordinate: u8,
    /// `presence` for `pciehp_unconfigure_device` (1 = safe removal, 0 = surprise); 0xff for ist.
    pub presence: u8,
    /// 1 when the port fields were read, 0 when a read failed.
    pub valid: u8,
    pub stack_id: i32,
}

/// `pciehp_ist` return.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IstReturnEvent {
    pub hdr: Header,
    pub ctrl: u64,
    pub start_ts_ns: u64,
    /// irqreturn_t.
    pub ret: i32,
    pub _pad: u32,
}

/// `pci_walk_bus(bus, cb, data)` whose `cb` is a copy of `pci_dev_set_disconnected`: every
/// device on `bus` and below is being marked disconnected.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WalkEvent {
    pub hdr: Header,
    pub callback: u64,
    pub segment: u16,
    /// `bus->number` and its subordinate range.
    pub bus: u8,
    pub bus_end: u8,
    pub stack_id: i32,
}

/// A device-level event ([`EventKind::DeviceDisconnected`], [`EventKind::DeviceRemove`],
/// [`EventKind::IommuRelease`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DeviceEvent {
    pub hdr: Header,
    /// `struct pci_dev *` (or `struct device *` for a non-PCI device on `IommuRelease`).
    pub dev_ptr: u64,
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// 1 if `bdf`/`vendor`/`device` were read from a PCI device; 0 for a non-PCI device or a
    /// failed read.
    pub is_pci: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    pub stack_id: i32,
}

/// A kernel log record, as `printk:console` saw it (message text only, no level prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LogEvent {
    pub hdr: Header,
    /// Full length of the record; may exceed `LOG_TEXT_LEN`.
    pub len: u32,
    pub _pad: u32,
    pub text: [u8; LOG_TEXT_LEN],
}

/// `pci:pci_hp_event(port_name, slot, event)`: what the hot-plug driver saw on a port.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HpTraceEvent {
    pub hdr: Header,
    /// `enum pci_hotplug_event` (include/trace/events/pci.h): 0 LINK_UP, 1 LINK_DOWN,
    /// 2 CARD_PRESENT, 3 CARD_NOT_PRESENT.
    pub event: u32,
    pub _pad: u32,
    /// `pci_name()` of the hot-plug port, NUL terminated (bytes after the NUL are not data).
    pub port: [u8; HP_NAME_LEN],
    /// The slot's name, NUL terminated (bytes after the NUL are not data).
    pub slot: [u8; HP_NAME_LEN],
}

/// Per-CPU counters of what the BPF programs could not do (`COUNTERS` map, index = variant).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `bpf_ringbuf_reserve` failed: an event was lost.
    RingbufFull = 0,
    /// A kernel memory read failed (the event went out with partial fields).
    ReadFailed = 1,
    /// A return probe found no entry timestamp (entry missed, or tracer started mid-call).
    ReturnWithoutEntry = 2,
    /// The per-thread start map was full.
    StartMapFull = 3,
    /// A kernel stack could not be taken (stack map full, or a different stack already holds
    /// its hash bucket): the event went out with [`STACK_NONE`].
    StackFailed = 4,
}

pub const COUNTER_SLOTS: u32 = 5;

/// Struct member offsets (bytes) from the running kernel's BTF, resolved at load time by
/// userspace and written into the BPF programs' `CONFIG` global. `OFFSET_NONE` = not available.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub intel_iommu_name: u32,
    pub intel_iommu_segment: u32,
    pub pci_dev_bus: u32,
    pub pci_dev_devfn: u32,
    pub pci_dev_vendor: u32,
    pub pci_dev_device: u32,
    pub pci_dev_subordinate: u32,
    /// Offset of the embedded `struct device dev` in `struct pci_dev`.
    pub pci_dev_dev: u32,
    pub pci_bus_number: u32,
    pub pci_bus_busn_start: u32,
    pub pci_bus_busn_end: u32,
    /// `pci_bus::domain_nr` (CONFIG_PCI_DOMAINS_GENERIC), else `OFFSET_NONE`.
    pub pci_bus_domain_nr: u32,
    /// `pci_bus::sysdata`; with `pci_sysdata_domain` gives the segment on x86.
    pub pci_bus_sysdata: u32,
    pub pci_sysdata_domain: u32,
    pub controller_pcie: u32,
    pub pcie_device_port: u32,
    pub device_bus: u32,
    pub _pad: u32,
}

impl Offsets {
    pub const NONE: Offsets = Offsets {
        intel_iommu_name: OFFSET_NONE,
        intel_iommu_segment: OFFSET_NONE,
        pci_dev_bus: OFFSET_NONE,
        pci_dev_devfn: OFFSET_NONE,
        pci_dev_vendor: OFFSET_NONE,
        pci_dev_device: OFFSET_NONE,
        pci_dev_subordinate: OFFSET_NONE,
        pci_dev_dev: OFFSET_NONE,
        pci_bus_number: OFFSET_NONE,
        pci_bus_busn_start: OFFSET_NONE,
        pci_bus_busn_end: OFFSET_NONE,
        pci_bus_domain_nr: OFFSET_NONE,
        pci_bus_sysdata: OFFSET_NONE,
        pci_sysdata_domain: OFFSET_NONE,
        controller_pcie: OFFSET_NONE,
        pcie_device_port: OFFSET_NONE,
        device_bus: OFFSET_NONE,
        _pad: 0,
    };
}

/// Everything userspace hands the BPF programs at load time (the `CONFIG` global).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub offsets: Offsets,
    /// Address of `pci_bus_type` (tells a PCI `struct device` from others).
    pub pci_bus_type: u64,
    /// Addresses of the out-of-line copies of `pci_dev_set_disconnected` (0 = unused slot).
    pub disconnect_callbacks: [u64; MAX_DISCONNECT_CALLBACKS],
    /// Bytes per `struct qi_desc` in the caller's array (32 on 5.0+).
    pub qi_desc_size: u32,
    /// Offset of the `__data_loc char[] msg` field in the `printk:console` tracepoint record,
    /// from tracefs `events/printk/console/format`; `OFFSET_NONE` if unknown.
    pub console_msg_loc: u32,
    /// Offsets of `pci:pci_hp_event`'s `__data_loc char[] port_name`, `__data_loc char[] slot`
    /// and `int event` (tracefs `events/pci/pci_hp_event/format`); `OFFSET_NONE` if unknown.
    pub hp_port_loc: u32,
    pub hp_slot_loc: u32,
    pub hp_event_off: u32,
    pub _pad: u32,
}

impl Config {
    pub const DEFAULT: Config = Config {
        offsets: Offsets::NONE,
        pci_bus_type: 0,
        disconnect_callbacks: [0; MAX_DISCONNECT_CALLBACKS],
        qi_desc_size: 32,
        console_msg_loc: OFFSET_NONE,
        hp_port_loc: OFFSET_NONE,
        hp_slot_loc: OFFSET_NONE,
        hp_event_off: OFFSET_NONE,
        _pad: 0,
    };
}

// Layout checks: the wire format must not change by accident. Padding is made of integer
// fields, never byte arrays: zero-filling a byte array compiles to a call to a global
// `memset` subprogram in BPF, which 6.1's verifier rejects.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<Header>() == 40);
    assert!(size_of::<Bdf>() == 4);
    assert!(size_of::<IommuId>() == 32);
    assert!(size_of::<Desc>() == 16);
    assert!(size_of::<SubmitEvent>() == 40 + 32 + 8 + 16 + 16 * 16);
    assert!(size_of::<SubmitReturnEvent>() == 56);
    assert!(size_of::<FlushEvent>() == 40 + 32 + 8 + 8 + 12 + 4);
    assert!(size_of::<SlotEvent>() == 40 + 8 + 4 + 4 + 4 + 4);
    assert!(size_of::<IstReturnEvent>() == 64);
    assert!(size_of::<WalkEvent>() == 40 + 8 + 8);
    assert!(size_of::<DeviceEvent>() == 40 + 8 + 8 + 4 + 4);
    assert!(size_of::<LogEvent>() == 40 + 8 + LOG_TEXT_LEN);
    assert!(size_of::<Offsets>() == 18 * 4);
    assert!(size_of::<HpTraceEvent>() == 40 + 8 + 2 * HP_NAME_LEN);
    assert!(size_of::<Config>() == 72 + 8 + 64 + 8 + 16);
    assert!(align_of::<SubmitEvent>() == 8);
    assert!(SUBMIT_FIXED_LEN == 96);
    assert!(size_of::<Desc>() == 16);
    assert!(size_of::<CompactHeader>() == 16);
    assert!(size_of::<IommuInfoEvent>() == 48);
    assert!(size_of::<TaskEvent>() == 40);
    assert!(size_of::<SubmitCompactEvent>() == 288);
    assert!(core::mem::offset_of!(SubmitCompactEvent, descs) == SUBMIT_COMPACT_FIXED_LEN);
    assert!(size_of::<ReturnCompactEvent>() == 24);
    assert!(core::mem::offset_of!(ReturnCompactEvent, _pad) == RETURN_COMPACT_LEN);
    assert!(size_of::<FlushCompactEvent>() == 40);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and arrays of
    // integers, and have every padding byte spelled out as a named field, so any bit pattern
    // is a valid value.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Offsets {}
}
