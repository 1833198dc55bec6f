//! Owned, typed events: the one vocabulary of everything downstream of the probes.
//!
//! The kernel writes `itewatch_common` structs into the ring buffer; [`Event::decode`] turns
//! those bytes into an [`Event`] (length-checked, `read_unaligned`, unknown kinds refused) and
//! [`Event::encode`] does the reverse, so the simulator produces exactly the bytes a kernel
//! would and the trace file can store raw kernel records. Records that are not kernel events
//! (stacks, lost-event markers, device snapshots) are [`Record`] variants.

use std::fmt;

use itewatch_common as abi;
use serde::{Deserialize, Serialize};

/// Kernel time: CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`), the dmesg time base.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct KTime(pub u64);

impl KTime {
    pub fn saturating_sub(self, earlier: KTime) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for KTime {
    /// `seconds.micros`, like dmesg.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:06}",
            self.0 / 1_000_000_000,
            (self.0 % 1_000_000_000) / 1000
        )
    }
}

/// A NUL-padded fixed-size kernel string (`comm`, IOMMU name) kept without allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FixedStr<const N: usize>(pub [u8; N]);

impl<const N: usize> FixedStr<N> {
    pub fn new(s: &str) -> Self {
        let mut b = [0u8; N];
        let n = s.len().min(N);
        b[..n].copy_from_slice(&s.as_bytes()[..n]);
        FixedStr(b)
    }
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(N);
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl<const N: usize> Default for FixedStr<N> {
    fn default() -> Self {
        FixedStr([0; N])
    }
}

impl<const N: usize> fmt::Debug for FixedStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl<const N: usize> fmt::Display for FixedStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl<const N: usize> Serialize for FixedStr<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

impl<'de, const N: usize> Deserialize<'de> for FixedStr<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(FixedStr::new(&s))
    }
}

pub type Comm = FixedStr<{ abi::COMM_LEN }>;
pub type IommuName = FixedStr<{ abi::IOMMU_NAME_LEN }>;

/// PCI source-id: `bus << 8 | devfn`. Carries no segment.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct Sid(pub u16);

impl Sid {
    pub fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn devfn(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for Sid {
    /// Hexadecimal, as the kernel prints a source-id (`SID %llx`: `200` for 02:00.0); a
    /// device's `bus:dev.fn` is its [`Bdf`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// PCI address `segment:bus:dev.fn`. `segment` is `None` when the probe could not read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    pub segment: Option<u16>,
    pub bus: u8,
    pub devfn: u8,
}

impl Bdf {
    pub fn new(segment: u16, bus: u8, dev: u8, func: u8) -> Self {
        Bdf {
            segment: Some(segment),
            bus,
            devfn: (dev << 3) | (func & 7),
        }
    }
    pub fn from_sid(segment: Option<u16>, sid: Sid) -> Self {
        Bdf {
            segment,
            bus: sid.bus(),
            devfn: sid.devfn(),
        }
    }
    pub fn sid(self) -> Sid {
        Sid(((self.bus as u16) << 8) | self.devfn as u16)
    }
    /// Segment, with the unknown one taken as 0 (the only segment on most hosts).
    pub fn segment_or_zero(self) -> u16 {
        self.segment.unwrap_or(0)
    }
    fn from_abi(b: abi::Bdf) -> Self {
        Bdf {
            segment: (b.segment != abi::SEGMENT_UNKNOWN).then_some(b.segment),
            bus: b.bus,
            devfn: b.devfn,
        }
    }
    fn to_abi(self) -> abi::Bdf {
        abi::Bdf {
            segment: self.segment.unwrap_or(abi::SEGMENT_UNKNOWN),
            bus: self.bus,
            devfn: self.devfn,
        }
    }
}

impl fmt::Display for Bdf {
    /// `ssss:bb:dd.f` (`????:` when the segment is unknown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.segment {
            Some(s) => write!(f, "{s:04x}:")?,
            None => f.write_str("????:")?,
        }
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus,
            self.devfn >> 3,
            self.devfn & 7
        )
    }
}

impl std::str::FromStr for Bdf {
    type Err = String;
    /// Parses `ssss:bb:dd.f` or `bb:dd.f` (segment 0).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("not a PCI address (want ssss:bb:dd.f): {s:?}");
        let parts: Vec<&str> = s.split(':').collect();
        let (seg, bus, df) = match parts.as_slice() {
            [seg, bus, df] => (u16::from_str_radix(seg, 16).map_err(|_| bad())?, *bus, *df),
            [bus, df] => (0, *bus, *df),
            _ => return Err(bad()),
        };
        let bus = u8::from_str_radix(bus, 16).map_err(|_| bad())?;
        let (dev, func) = df.split_once('.').ok_or_else(bad)?;
        let dev = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
        let func = func.parse::<u8>().map_err(|_| bad())?;
        if dev > 31 || func > 7 {
            return Err(bad());
        }
        Ok(Bdf::new(seg, bus, dev, func))
    }
}

impl Serialize for Bdf {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(rest) = s.strip_prefix("????:") {
            let mut b: Bdf = rest.parse().map_err(serde::de::Error::custom)?;
            b.segment = None;
            return Ok(b);
        }
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Common fields of every kernel event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub ts: KTime,
    pub cpu: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
}

/// An IOMMU unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Iommu {
    /// Kernel address of the `struct intel_iommu`; identifies the unit within one boot.
    pub ptr: u64,
    /// `dmarN`.
    pub name: IommuName,
    pub segment: Option<u16>,
}

/// Stack id in the trace's stack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StackId(pub u32);

fn stack_from_abi(id: i32) -> Option<StackId> {
    (id >= 0).then_some(StackId(id as u32))
}

fn stack_to_abi(id: Option<StackId>) -> i32 {
    id.map_or(abi::STACK_NONE, |s| s.0 as i32)
}

/// One raw invalidation descriptor (qw0, qw1 of `struct qi_desc`).
pub type RawDesc = abi::Desc;

/// A decoded invalidation descriptor. Encodings: drivers/iommu/intel/iommu.h, identical on
/// 6.1 and 6.12 (checked against both kernels' headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Descriptor {
    /// Type 0x3, device-TLB (ATS) invalidation.
    DevTlb {
        sid: Sid,
        pfsid: Sid,
        qdep: u8,
        addr: u64,
        size_bit: bool,
    },
    /// Type 0x8, PASID-based device-TLB invalidation.
    PasidDevTlb {
        sid: Sid,
        pfsid: Sid,
        pasid: u32,
        qdep: u8,
        addr: u64,
        size_bit: bool,
    },
    /// Type 0x2, IOTLB invalidation.
    Iotlb { did: u16 },
    /// Type 0x6, PASID-based IOTLB.
    PasidIotlb { did: u16, pasid: u32 },
    /// Type 0x1, context-cache.
    ContextCache { did: u16, sid: Sid },
    /// Type 0x5, invalidation wait.
    Wait,
    /// Any other type (0x4 interrupt entry cache, 0x7 PASID cache, 0x9 page response, ..).
    Other { code: u8 },
}

impl Descriptor {
    pub fn decode(d: RawDesc) -> Descriptor {
        let (qw0, qw1) = (d.qw0, d.qw1);
        let pfsid = Sid((((qw0 >> 12) & 0xf) | (((qw0 >> 52) & 0xfff) << 4)) as u16);
        match qw0 & 0xf {
            0x1 => Descriptor::ContextCache {
                did: (qw0 >> 16) as u16,
                sid: Sid((qw0 >> 32) as u16),
            },
            0x2 => Descriptor::Iotlb {
                did: (qw0 >> 16) as u16,
            },
            0x3 => Descriptor::DevTlb {
                sid: Sid((qw0 >> 32) as u16),
                pfsid,
                qdep: ((qw0 >> 16) & 0x1f) as u8,
                addr: qw1 & !0xfff,
                size_bit: qw1 & 1 != 0,
            },
            0x5 => Descriptor::Wait,
            0x6 => Descriptor::PasidIotlb {
                did: (qw0 >> 16) as u16,
                pasid: ((qw0 >> 32) & 0xfffff) as u32,
            },
            0x8 => Descriptor::PasidDevTlb {
                sid: Sid((qw0 >> 16) as u16),
                pfsid,
                pasid: ((qw0 >> 32) & 0xfffff) as u32,
                qdep: ((qw0 >> 4) & 0x1f) as u8,
                addr: qw1 & !0xfff,
                size_bit: qw1 & (1 << 11) != 0,
            },
            code => Descriptor::Other { code: code as u8 },
        }
    }

    /// Encodes a device-TLB descriptor as `qi_desc_dev_iotlb` / `qi_flush_dev_iotlb` does.
    pub fn dev_tlb_raw(sid: Sid, pfsid: Sid, qdep: u8, addr: u64, mask: u32) -> RawDesc {
        let qdep = if qdep >= 32 { 0 } else { qdep };
        let qw1 = if mask > 0 {
            let a = addr | ((1u64 << (12 + mask - 1)) - 1);
            (a & !0xfff) | 1
        } else {
            addr & !0xfff
        };
        let pf = pfsid.0 as u64;
        let qw0 = ((sid.0 as u64) << 32)
            | (((qdep as u64) & 0x1f) << 16)
            | 0x3
            | ((pf & 0xf) << 12)
            | (((pf >> 4) & 0xfff) << 52);
        RawDesc { qw0, qw1 }
    }

    /// The SID a device-TLB descriptor targets.
    pub fn dev_tlb_sid(&self) -> Option<Sid> {
        match *self {
            Descriptor::DevTlb { sid, .. } | Descriptor::PasidDevTlb { sid, .. } => Some(sid),
            _ => None,
        }
    }
}

/// The captured descriptors of one submission. Two fit inline, which covers 6.1 (one per
/// submission) and 6.12's usual IOTLB + device-TLB pair without an allocation, and keeps a
/// [`Record`] at 160 bytes instead of 352: records are moved through the reorder buffer and the
/// in-flight table on every event.
pub type Descs = smallvec::SmallVec<[RawDesc; 2]>;

/// Descriptors of a submission that the probe read but did not send (ABI 3 sends only the
/// device-TLB ones): how many, and which types (bit `t` set: a descriptor of type `t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OtherDescs {
    pub types: u16,
    pub count: u16,
}

impl OtherDescs {
    /// The type codes present, lowest first.
    pub fn type_codes(self) -> impl Iterator<Item = u8> {
        (0..16u8).filter(move |t| self.types & (1 << t) != 0)
    }
}

/// `qi_submit_sync` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submit {
    pub iommu: Iommu,
    pub options: u64,
    /// `count` as passed by the caller.
    pub count: u32,
    /// The descriptors carried, in batch order: up to ABI 2 the first `count`, at most
    /// [`abi::MAX_BATCH`]; from ABI 3 only the device-TLB ones among those.
    pub raw: Descs,
    /// Descriptors read but not carried (ABI 3), summarised; empty before ABI 3.
    pub others: OtherDescs,
    pub stack: Option<StackId>,
}

impl Submit {
    /// The carried raw descriptors.
    pub fn raw_descs(&self) -> &[RawDesc] {
        &self.raw
    }
    /// How many descriptors the probe read (carried or summarised).
    pub fn captured(&self) -> u32 {
        self.raw.len() as u32 + u32::from(self.others.count)
    }
    /// The carried descriptors, decoded (from ABI 3 the device-TLB ones; see `others`).
    pub fn descriptors(&self) -> impl Iterator<Item = Descriptor> + '_ {
        self.raw_descs().iter().map(|d| Descriptor::decode(*d))
    }
    /// SIDs of device-TLB descriptors in the captured part of the batch.
    pub fn dev_tlb_sids(&self) -> impl Iterator<Item = Sid> + '_ {
        self.descriptors().filter_map(|d| d.dev_tlb_sid())
    }
    /// True when the batch was longer than what was captured.
    pub fn truncated(&self) -> bool {
        self.captured() < self.count
    }
}

/// `qi_submit_sync` return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitReturn {
    /// 0, or a negative errno (-110 = -ETIMEDOUT).
    pub ret: i64,
    /// Entry time seen by the entry probe on this thread; `None` when it was not seen.
    pub start: Option<KTime>,
}

/// `-ETIMEDOUT` as returned by `qi_submit_sync` on 6.9+.
pub const ETIMEDOUT: i64 = -110;

/// `qi_flush_dev_iotlb` / `qi_flush_dev_iotlb_pasid` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flush {
    pub iommu: Iommu,
    pub sid: Sid,
    pub pfsid: Sid,
    pub qdep: u16,
    /// Set for `qi_flush_dev_iotlb_pasid`.
    pub pasid: Option<u32>,
    pub addr: u64,
    pub mask: u32,
    pub stack: Option<StackId>,
}

/// A hot-plug controller event (`pciehp_ist` entry, `pciehp_unconfigure_device` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// `struct controller *`.
    pub ctrl: u64,
    /// The hot-plug port; `None` when the probe could not read it.
    pub port: Option<Bdf>,
    /// Bus range behind the port.
    pub secondary: u8,
    pub subordinate: u8,
    /// `pciehp_ist`: the irq (-1 = poll mode / not applicable).
    pub irq: i32,
    /// `pciehp_unconfigure_device`: presence (true = safe removal, false = surprise).
    pub presence: Option<bool>,
    pub stack: Option<StackId>,
}

impl Slot {
    /// Whether `sid` (on `segment`) is behind this port.
    pub fn covers(&self, segment: Option<u16>, sid: Sid) -> bool {
        let Some(port) = self.port else { return false };
        let seg_ok = match (port.segment, segment) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        seg_ok && (self.secondary..=self.subordinate).contains(&sid.bus()) && self.secondary != 0
    }
}

/// `pciehp_ist` return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IstReturn {
    pub ctrl: u64,
    pub start: Option<KTime>,
    pub ret: i32,
}

/// The disconnect walk: `pci_walk_bus(bus, pci_dev_set_disconnected, ..)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Walk {
    pub callback: u64,
    pub segment: Option<u16>,
    /// First and last bus number covered.
    pub bus: u8,
    pub bus_end: u8,
    pub stack: Option<StackId>,
}

/// A device-level event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRef {
    pub dev_ptr: u64,
    /// `None` for a non-PCI device (or a failed read).
    pub bdf: Option<Bdf>,
    pub vendor: u16,
    pub device: u16,
    pub stack: Option<StackId>,
}

/// A kernel log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub text: String,
    /// Set when the record was longer than what the probe captured.
    pub truncated: bool,
}

/// What `pci:pci_hp_event` reports (`enum pci_hotplug_event`, include/trace/events/pci.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HpWhat {
    LinkUp,
    LinkDown,
    CardPresent,
    CardNotPresent,
    /// A value this build does not know (a newer kernel's).
    Unknown(u32),
}

impl HpWhat {
    pub fn from_abi(v: u32) -> HpWhat {
        match v {
            0 => HpWhat::LinkUp,
            1 => HpWhat::LinkDown,
            2 => HpWhat::CardPresent,
            3 => HpWhat::CardNotPresent,
            n => HpWhat::Unknown(n),
        }
    }

    pub fn to_abi(self) -> u32 {
        match self {
            HpWhat::LinkUp => 0,
            HpWhat::LinkDown => 1,
            HpWhat::CardPresent => 2,
            HpWhat::CardNotPresent => 3,
            HpWhat::Unknown(n) => n,
        }
    }

    /// The kernel's own name for it, as the tracepoint prints it.
    pub fn kernel_name(self) -> &'static str {
        match self {
            HpWhat::LinkUp => "LINK_UP",
            HpWhat::LinkDown => "LINK_DOWN",
            HpWhat::CardPresent => "CARD_PRESENT",
            HpWhat::CardNotPresent => "CARD_NOT_PRESENT",
            HpWhat::Unknown(_) => "UNKNOWN",
        }
    }
}

/// A `pci:pci_hp_event` tracepoint hit: the structured form of pciehp's `Slot(%s): Link Down`
/// (and friends) log lines, from kernels that have the tracepoint (7.x).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HpTrace {
    /// The hot-plug port, parsed from its `pci_name()`; `None` if that did not parse.
    pub port: Option<Bdf>,
    /// `pci_name()` of the port as the kernel gave it.
    pub port_name: String,
    pub slot: String,
    pub what: HpWhat,
}

/// What happened, by kind.
// `Submit` carries its 16-descriptor batch inline (~300 bytes): boxing it would allocate once
// per submission on the decode → correlate hot path, which the benchmark measures.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    Submit(Submit),
    SubmitReturn(SubmitReturn),
    DevTlbFlush(Flush),
    HotplugIst(Slot),
    HotplugIstReturn(IstReturn),
    Unconfigure(Slot),
    DisconnectWalk(Walk),
    DeviceDisconnected(DeviceRef),
    DeviceRemove(DeviceRef),
    IommuRelease(DeviceRef),
    KernelLog(LogLine),
    HotplugTrace(HpTrace),
}

impl Payload {
    pub fn kind(&self) -> abi::EventKind {
        use abi::EventKind as K;
        match self {
            Payload::Submit(_) => K::Submit,
            Payload::SubmitReturn(_) => K::SubmitReturn,
            Payload::DevTlbFlush(_) => K::DevTlbFlush,
            Payload::HotplugIst(_) => K::HotplugIst,
            Payload::HotplugIstReturn(_) => K::HotplugIstReturn,
            Payload::Unconfigure(_) => K::Unconfigure,
            Payload::DisconnectWalk(_) => K::DisconnectWalk,
            Payload::DeviceDisconnected(_) => K::DeviceDisconnected,
            Payload::DeviceRemove(_) => K::DeviceRemove,
            Payload::IommuRelease(_) => K::IommuRelease,
            Payload::KernelLog(_) => K::KernelLog,
            Payload::HotplugTrace(_) => K::HotplugTrace,
        }
    }

    /// The kernel stack id this event carries, if any.
    pub fn stack(&self) -> Option<StackId> {
        match self {
            Payload::Submit(s) => s.stack,
            Payload::DevTlbFlush(f) => f.stack,
            Payload::HotplugIst(s) | Payload::Unconfigure(s) => s.stack,
            Payload::DisconnectWalk(w) => w.stack,
            Payload::DeviceDisconnected(d)
            | Payload::DeviceRemove(d)
            | Payload::IommuRelease(d) => d.stack,
            Payload::SubmitReturn(_)
            | Payload::HotplugIstReturn(_)
            | Payload::KernelLog(_)
            | Payload::HotplugTrace(_) => None,
        }
    }
}

/// The stable name of an event kind, as used in JSON and docs.
pub fn kind_name(k: abi::EventKind) -> &'static str {
    use abi::EventKind as K;
    match k {
        K::Submit => "submit",
        K::SubmitReturn => "submit-return",
        K::DevTlbFlush => "devtlb-flush",
        K::HotplugIst => "hotplug-ist",
        K::HotplugIstReturn => "hotplug-ist-return",
        K::Unconfigure => "unconfigure",
        K::DisconnectWalk => "disconnect-walk",
        K::DeviceDisconnected => "device-disconnected",
        K::DeviceRemove => "device-remove",
        K::IommuRelease => "iommu-release",
        K::KernelLog => "kernel-log",
        K::HotplugTrace => "hotplug-trace",
    }
}

/// One kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub meta: Meta,
    pub payload: Payload,
}

/// Why a kernel record could not be decoded.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event header ({need} bytes)")]
    ShortHeader { len: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind} record of {len} bytes, expected at least {need}")]
    Short {
        kind: &'static str,
        len: usize,
        need: usize,
    },
    #[error("compact record of kind {0} needs the stream's earlier announcements (decode it with an `event::Decoder`)")]
    NeedsDecoder(u8),
    #[error("{kind} record on CPU {cpu} names IOMMU slot {slot}, which no earlier iommu-info record of that CPU announced (trace cut or spliced?)")]
    NoIommuInfo {
        kind: &'static str,
        cpu: u16,
        slot: u8,
    },
    #[error("{kind} record is invalid: {reason}")]
    Invalid {
        kind: &'static str,
        reason: &'static str,
    },
}

/// Reads a `T` from the start of `bytes` after checking the length.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked above; `T` is one of the `itewatch_common` ABI types,
    // which are `#[repr(C)]` plain integers and arrays valid for any bit pattern, and
    // `read_unaligned` has no alignment requirement.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: `T` is an ABI type with all padding as explicit fields, so every byte of it is
    // initialised; the slice borrows `v` for its lifetime.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn iommu_from_abi(i: abi::IommuId) -> Iommu {
    Iommu {
        ptr: i.ptr,
        name: FixedStr(i.name),
        segment: (i.segment != abi::SEGMENT_UNKNOWN).then_some(i.segment),
    }
}

fn iommu_to_abi(i: &Iommu) -> abi::IommuId {
    abi::IommuId {
        ptr: i.ptr,
        name: i.name.0,
        segment: i.segment.unwrap_or(abi::SEGMENT_UNKNOWN),
        _pad0: 0,
        _pad1: 0,
    }
}

impl Event {
    /// Decodes one kernel record (as it came out of the ring buffer or a trace file).
    /// Trailing bytes beyond the struct are ignored (a newer kernel side may append fields).
    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        use abi::EventKind as K;
        let hdr: abi::Header = read(bytes).ok_or(DecodeError::ShortHeader {
            len: bytes.len(),
            need: std::mem::size_of::<abi::Header>(),
        })?;
        if let Some(k) = bytes.first().and_then(|b| abi::CompactKind::from_u8(*b)) {
            return Err(DecodeError::NeedsDecoder(k as u8));
        }
        let kind = K::try_from(hdr.kind).map_err(|e| DecodeError::UnknownKind(e.0))?;
        let short = || DecodeError::Short {
            kind: kind_name(kind),
            len: bytes.len(),
            need: kind.wire_size(),
        };
        let meta = Meta {
            ts: KTime(hdr.ts_ns),
            cpu: hdr.cpu,
            pid: hdr.pid,
            tid: hdr.tid,
            comm: FixedStr(hdr.comm),
        };
        let payload = match kind {
            K::Submit => {
                let e: abi::SubmitEvent = if bytes.len() >= kind.wire_size() {
                    read(bytes).ok_or_else(short)?
                } else {
                    // ABI 2: the record ends after the descriptors the batch had.
                    if bytes.len() < abi::SUBMIT_FIXED_LEN {
                        return Err(short());
                    }
                    let mut full = [0u8; std::mem::size_of::<abi::SubmitEvent>()];
                    full[..bytes.len()].copy_from_slice(bytes);
                    let e: abi::SubmitEvent = read(&full).ok_or_else(short)?;
                    let sent = (e.count as usize).min(abi::MAX_BATCH);
                    if bytes.len() < abi::SUBMIT_FIXED_LEN + sent * std::mem::size_of::<RawDesc>() {
                        return Err(DecodeError::Short {
                            kind: kind_name(kind),
                            len: bytes.len(),
                            need: abi::SUBMIT_FIXED_LEN + sent * std::mem::size_of::<RawDesc>(),
                        });
                    }
                    e
                };
                let captured = e.captured.min(abi::MAX_BATCH as u32);
                Payload::Submit(Submit {
                    iommu: iommu_from_abi(e.iommu),
                    options: e.options,
                    count: e.count,
                    raw: Descs::from_slice(&e.descs[..captured as usize]),
                    others: OtherDescs {
                        types: e.others as u16,
                        count: (e.others >> 16) as u16,
                    },
                    stack: stack_from_abi(e.stack_id),
                })
            }
            K::SubmitReturn => {
                let e: abi::SubmitReturnEvent = read(bytes).ok_or_else(short)?;
                Payload::SubmitReturn(SubmitReturn {
                    ret: e.ret,
                    start: (e.start_ts_ns != 0).then_some(KTime(e.start_ts_ns)),
                })
            }
            K::DevTlbFlush => {
                let e: abi::FlushEvent = read(bytes).ok_or_else(short)?;
                Payload::DevTlbFlush(Flush {
                    iommu: iommu_from_abi(e.iommu),
                    sid: Sid(e.sid),
                    pfsid: Sid(e.pfsid),
                    qdep: e.qdep,
                    pasid: (e.has_pasid != 0).then_some(e.pasid),
                    addr: e.addr,
                    mask: e.mask,
                    stack: stack_from_abi(e.stack_id),
                })
            }
            K::HotplugIst | K::Unconfigure => {
                let e: abi::SlotEvent = read(bytes).ok_or_else(short)?;
                let slot = Slot {
                    ctrl: e.ctrl,
                    port: (e.valid != 0).then(|| Bdf::from_abi(e.port)),
                    secondary: e.secondary,
                    subordinate: e.subordinate,
                    irq: e.irq,
                    presence: (e.presence != 0xff).then_some(e.presence != 0),
                    stack: stack_from_abi(e.stack_id),
                };
                if kind == K::HotplugIst {
                    Payload::HotplugIst(slot)
                } else {
                    Payload::Unconfigure(slot)
                }
            }
            K::HotplugIstReturn => {
                let e: abi::IstReturnEvent = read(bytes).ok_or_else(short)?;
                Payload::HotplugIstReturn(IstReturn {
                    ctrl: e.ctrl,
                    start: (e.start_ts_ns != 0).then_some(KTime(e.start_ts_ns)),
                    ret: e.ret,
                })
            }
            K::DisconnectWalk => {
                let e: abi::WalkEvent = read(bytes).ok_or_else(short)?;
                Payload::DisconnectWalk(Walk {
                    callback: e.callback,
                    segment: (e.segment != abi::SEGMENT_UNKNOWN).then_some(e.segment),
                    bus: e.bus,
                    bus_end: e.bus_end,
                    stack: stack_from_abi(e.stack_id),
                })
            }
            K::DeviceDisconnected | K::DeviceRemove | K::IommuRelease => {
                let e: abi::DeviceEvent = read(bytes).ok_or_else(short)?;
                let d = DeviceRef {
                    dev_ptr: e.dev_ptr,
                    bdf: (e.is_pci != 0).then(|| Bdf::from_abi(e.bdf)),
                    vendor: e.vendor,
                    device: e.device,
                    stack: stack_from_abi(e.stack_id),
                };
                match kind {
                    K::DeviceDisconnected => Payload::DeviceDisconnected(d),
                    K::DeviceRemove => Payload::DeviceRemove(d),
                    _ => Payload::IommuRelease(d),
                }
            }
            K::KernelLog => {
                let e: abi::LogEvent = read(bytes).ok_or_else(short)?;
                let cap = (e.len as usize).min(abi::LOG_TEXT_LEN);
                let end = e.text[..cap].iter().position(|&c| c == 0).unwrap_or(cap);
                let text = String::from_utf8_lossy(&e.text[..end])
                    .trim_end()
                    .to_string();
                Payload::KernelLog(LogLine {
                    text,
                    truncated: e.len as usize > abi::LOG_TEXT_LEN,
                })
            }
            K::HotplugTrace => {
                let e: abi::HpTraceEvent = read(bytes).ok_or_else(short)?;
                let port_name = nul_terminated(&e.port);
                Payload::HotplugTrace(HpTrace {
                    port: port_name.parse().ok(),
                    port_name,
                    slot: nul_terminated(&e.slot),
                    what: HpWhat::from_abi(e.event),
                })
            }
        };
        Ok(Event { meta, payload })
    }

    /// Encodes the event as the kernel would have written it.
    pub fn encode(&self) -> Vec<u8> {
        let hdr = abi::Header {
            kind: self.payload.kind() as u32,
            cpu: self.meta.cpu,
            ts_ns: self.meta.ts.0,
            pid: self.meta.pid,
            tid: self.meta.tid,
            comm: self.meta.comm.0,
        };
        match &self.payload {
            Payload::Submit(s) => {
                let mut descs = [RawDesc::default(); abi::MAX_BATCH];
                for (d, r) in descs.iter_mut().zip(s.raw_descs()) {
                    *d = *r;
                }
                as_bytes(&abi::SubmitEvent {
                    hdr,
                    iommu: iommu_to_abi(&s.iommu),
                    options: s.options,
                    count: s.count,
                    captured: s.raw.len() as u32,
                    stack_id: stack_to_abi(s.stack),
                    others: u32::from(s.others.types) | (u32::from(s.others.count) << 16),
                    descs,
                })
                .to_vec()
            }
            Payload::SubmitReturn(r) => as_bytes(&abi::SubmitReturnEvent {
                hdr,
                ret: r.ret,
                start_ts_ns: r.start.map_or(0, |t| t.0),
            })
            .to_vec(),
            Payload::DevTlbFlush(f) => as_bytes(&abi::FlushEvent {
                hdr,
                iommu: iommu_to_abi(&f.iommu),
                addr: f.addr,
                sid: f.sid.0,
                pfsid: f.pfsid.0,
                qdep: f.qdep,
                has_pasid: f.pasid.is_some() as u16,
                pasid: f.pasid.unwrap_or(0),
                mask: f.mask,
                stack_id: stack_to_abi(f.stack),
                _pad: 0,
            })
            .to_vec(),
            Payload::HotplugIst(s) | Payload::Unconfigure(s) => as_bytes(&abi::SlotEvent {
                hdr,
                ctrl: s.ctrl,
                port: s.port.map(Bdf::to_abi).unwrap_or_default(),
                irq: s.irq,
                secondary: s.secondary,
                subordinate: s.subordinate,
                presence: s.presence.map_or(0xff, u8::from),
                valid: s.port.is_some() as u8,
                stack_id: stack_to_abi(s.stack),
            })
            .to_vec(),
            Payload::HotplugIstReturn(r) => as_bytes(&abi::IstReturnEvent {
                hdr,
                ctrl: r.ctrl,
                start_ts_ns: r.start.map_or(0, |t| t.0),
                ret: r.ret,
                _pad: 0,
            })
            .to_vec(),
            Payload::DisconnectWalk(w) => as_bytes(&abi::WalkEvent {
                hdr,
                callback: w.callback,
                segment: w.segment.unwrap_or(abi::SEGMENT_UNKNOWN),
                bus: w.bus,
                bus_end: w.bus_end,
                stack_id: stack_to_abi(w.stack),
            })
            .to_vec(),
            Payload::DeviceDisconnected(d)
            | Payload::DeviceRemove(d)
            | Payload::IommuRelease(d) => as_bytes(&abi::DeviceEvent {
                hdr,
                dev_ptr: d.dev_ptr,
                bdf: d.bdf.map(Bdf::to_abi).unwrap_or_default(),
                vendor: d.vendor,
                device: d.device,
                is_pci: d.bdf.is_some() as u8,
                _pad0: 0,
                _pad1: 0,
                stack_id: stack_to_abi(d.stack),
            })
            .to_vec(),
            Payload::KernelLog(l) => {
                let mut text = [0u8; abi::LOG_TEXT_LEN];
                let n = l.text.len().min(abi::LOG_TEXT_LEN);
                text[..n].copy_from_slice(&l.text.as_bytes()[..n]);
                let len = if l.truncated {
                    l.text.len().max(abi::LOG_TEXT_LEN + 1)
                } else {
                    n
                };
                as_bytes(&abi::LogEvent {
                    hdr,
                    len: len as u32,
                    _pad: 0,
                    text,
                })
                .to_vec()
            }
            Payload::HotplugTrace(h) => {
                let name = |s: &str| {
                    // NUL terminated, as the BPF program's string read leaves it.
                    let mut b = [0u8; abi::HP_NAME_LEN];
                    let n = s.len().min(abi::HP_NAME_LEN - 1);
                    b[..n].copy_from_slice(&s.as_bytes()[..n]);
                    b
                };
                as_bytes(&abi::HpTraceEvent {
                    hdr,
                    event: h.what.to_abi(),
                    _pad: 0,
                    port: name(&h.port_name),
                    slot: name(&h.slot),
                })
                .to_vec()
            }
        }
    }
}

/// The thread a CPU's compact records belong to, from its last `Task` announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TaskInfo {
    tid: u32,
    pid: u32,
    comm: Comm,
}

/// Compact records the decoder handed out with a field it could not fill, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderStats {
    /// Announcements (`Task`, `IommuInfo`) read.
    pub announcements: u64,
    /// Events whose thread no `Task` record announced on their CPU: `pid` 0 and an empty
    /// `comm` (the announcement was lost to a full ring buffer, or the trace was cut before it).
    pub unknown_task: u64,
    /// Submissions and flushes whose IOMMU the probe could not announce (slot
    /// `IOMMU_SLOT_NONE`: the ring buffer was full): IOMMU unknown (`ptr` 0, empty name).
    pub unknown_iommu: u64,
}

/// Decodes a stream of kernel records, ABI 3's compact ones included.
///
/// Compact records do not carry what stays the same from one submission to the next: the
/// thread's `pid` and `comm` come from the last `Task` record of the same CPU and task slot
/// (`tid % TASK_SLOTS`), when its tid is the record's; the IOMMU from the last `IommuInfo` record of the same CPU for the record's
/// slot. The probe sends those announcements before the record that needs them, on the same
/// CPU, so ring-buffer order (which is also trace order) has them first. One decoder per
/// stream: a live ring buffer or one trace file.
///
/// What is missing is never guessed: a thread not announced gives `pid` 0 and an empty `comm`
/// (counted in [`DecoderStats::unknown_task`]); an IOMMU slot the probe could not announce
/// gives an unknown IOMMU (counted); a slot that was announced by the probe but whose
/// announcement is not in the stream (a cut or spliced trace) is a
/// [`DecodeError::NoIommuInfo`].
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    /// Indexed by CPU, then task slot (`tid % TASK_SLOTS`).
    tasks: Vec<[Option<TaskInfo>; abi::TASK_SLOTS]>,
    iommus: std::collections::HashMap<(u16, u8), Iommu>,
    pub stats: DecoderStats,
}

const UNKNOWN_IOMMU: Iommu = Iommu {
    ptr: 0,
    name: FixedStr([0; abi::IOMMU_NAME_LEN]),
    segment: None,
};

/// Length of the compact record at the start of `bytes` (`None`: not a compact record), from
/// its kind and, for a submission, how many descriptors it carries; an error when `bytes` is
/// shorter than that. Lets a trace store compact
/// records back to back without a length each.
pub fn compact_len(bytes: &[u8]) -> Option<Result<usize, DecodeError>> {
    let kind = abi::CompactKind::from_u8(*bytes.first()?)?;
    let min = kind.min_len();
    if bytes.len() < min {
        return Some(Err(DecodeError::Short {
            kind: compact_name(kind),
            len: bytes.len(),
            need: min,
        }));
    }
    if kind != abi::CompactKind::Submit {
        return Some(Ok(min));
    }
    // `sent` is byte 26 (SubmitCompactEvent: header 16, count 2, options 2, stack 4, types 2).
    let sent = bytes[26] as usize;
    if sent > abi::MAX_BATCH {
        return Some(Err(DecodeError::Invalid {
            kind: compact_name(kind),
            reason: "carries more descriptors than a batch can have",
        }));
    }
    let need = min + 16 * sent;
    if bytes.len() < need {
        return Some(Err(DecodeError::Short {
            kind: compact_name(kind),
            len: bytes.len(),
            need,
        }));
    }
    Some(Ok(need))
}

fn compact_name(k: abi::CompactKind) -> &'static str {
    match k {
        abi::CompactKind::IommuInfo => "iommu-info",
        abi::CompactKind::Task => "task",
        abi::CompactKind::Submit => "submit",
        abi::CompactKind::Return => "submit-return",
        abi::CompactKind::Flush => "devtlb-flush",
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Decodes one record: `Ok(None)` for an announcement (it only updates the decoder).
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Option<Event>, DecodeError> {
        let Some(len) = compact_len(bytes) else {
            return Event::decode(bytes).map(Some);
        };
        let len = len?;
        let bytes = &bytes[..len];
        let kind = abi::CompactKind::from_u8(bytes[0]).ok_or(DecodeError::UnknownKind(0))?;
        let name = compact_name(kind);
        // Padded to the struct's size for `read` (only `len` bytes were sent).
        let mut full = [0u8; std::mem::size_of::<abi::SubmitCompactEvent>()];
        full[..len].copy_from_slice(bytes);
        let hdr: abi::CompactHeader = read(&full).ok_or(DecodeError::ShortHeader {
            len,
            need: std::mem::size_of::<abi::CompactHeader>(),
        })?;
        let cpu = hdr.cpu;
        match kind {
            abi::CompactKind::Task => {
                let e: abi::TaskEvent =
                    read(&full).ok_or(DecodeError::ShortHeader { len, need: 40 })?;
                let i = cpu as usize;
                if self.tasks.len() <= i {
                    self.tasks.resize(i + 1, [None; abi::TASK_SLOTS]);
                }
                self.tasks[i][hdr.tid as usize % abi::TASK_SLOTS] = Some(TaskInfo {
                    tid: hdr.tid,
                    pid: e.pid,
                    comm: FixedStr(e.comm),
                });
                self.stats.announcements += 1;
                return Ok(None);
            }
            abi::CompactKind::IommuInfo => {
                let e: abi::IommuInfoEvent =
                    read(&full).ok_or(DecodeError::ShortHeader { len, need: 48 })?;
                if hdr.aux as usize >= abi::IOMMU_SLOTS {
                    return Err(DecodeError::Invalid {
                        kind: name,
                        reason: "IOMMU slot out of range",
                    });
                }
                self.iommus.insert((cpu, hdr.aux), iommu_from_abi(e.iommu));
                self.stats.announcements += 1;
                return Ok(None);
            }
            _ => {}
        }
        let slot = hdr.tid as usize % abi::TASK_SLOTS;
        let meta = match self.tasks.get(cpu as usize).and_then(|t| t[slot]) {
            Some(t) if t.tid == hdr.tid => Meta {
                ts: KTime(hdr.ts_ns),
                cpu: u32::from(cpu),
                pid: t.pid,
                tid: hdr.tid,
                comm: t.comm,
            },
            _ => {
                self.stats.unknown_task += 1;
                Meta {
                    ts: KTime(hdr.ts_ns),
                    cpu: u32::from(cpu),
                    pid: 0,
                    tid: hdr.tid,
                    comm: FixedStr::default(),
                }
            }
        };
        let payload = match kind {
            abi::CompactKind::Return => {
                let e: abi::ReturnCompactEvent =
                    read(&full).ok_or(DecodeError::ShortHeader { len, need: 20 })?;
                Payload::SubmitReturn(SubmitReturn {
                    ret: i64::from(e.ret),
                    start: None,
                })
            }
            abi::CompactKind::Submit => {
                let e: abi::SubmitCompactEvent =
                    read(&full).ok_or(DecodeError::ShortHeader { len, need: 28 })?;
                let iommu = self.iommu(name, cpu, hdr.aux)?;
                let raw = e.descs[..e.sent as usize]
                    .iter()
                    .map(|w| RawDesc {
                        qw0: u64::from(w[0]) | (u64::from(w[1]) << 32),
                        qw1: u64::from(w[2]) | (u64::from(w[3]) << 32),
                    })
                    .collect();
                Payload::Submit(Submit {
                    iommu,
                    options: u64::from(e.options),
                    count: u32::from(e.count),
                    raw,
                    others: OtherDescs {
                        types: e.other_types,
                        count: u16::from(e.others),
                    },
                    stack: stack_from_abi(e.stack_id),
                })
            }
            abi::CompactKind::Flush => {
                let e: abi::FlushCompactEvent =
                    read(&full).ok_or(DecodeError::ShortHeader { len, need: 40 })?;
                Payload::DevTlbFlush(Flush {
                    iommu: self.iommu(name, cpu, hdr.aux)?,
                    sid: Sid(e.sid),
                    pfsid: Sid(e.pfsid),
                    qdep: e.qdep,
                    pasid: (e.has_pasid != 0).then_some(e.pasid),
                    addr: e.addr,
                    mask: e.mask,
                    stack: None,
                })
            }
            // Handled above.
            abi::CompactKind::Task | abi::CompactKind::IommuInfo => return Ok(None),
        };
        Ok(Some(Event { meta, payload }))
    }

    fn iommu(&mut self, kind: &'static str, cpu: u16, slot: u8) -> Result<Iommu, DecodeError> {
        if slot == abi::IOMMU_SLOT_NONE {
            self.stats.unknown_iommu += 1;
            return Ok(UNKNOWN_IOMMU);
        }
        self.iommus
            .get(&(cpu, slot))
            .copied()
            .ok_or(DecodeError::NoIommuInfo { kind, cpu, slot })
    }
}

/// The bytes of `b` up to its first NUL, as text (the BPF string reads leave stale bytes after
/// the NUL).
fn nul_terminated(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Which way a kernel call path reached an invalidation (from its stack).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum CallerPath {
    /// A device driver's DMA unmap / IOTLB flush (the thread's CPU0 in case 1).
    DriverUnmap,
    /// The flush queue timer (lazy mode).
    FlushQueue,
    /// Device removal: iommu_bus_notifier / iommu_release_device / pciehp (cases 2 and 3).
    Removal,
    /// The driver's own teardown inside a removal: its `remove()` unmapping DMA memory under
    /// the PCI core's unbind (`pci_stop_bus_device` → `virtblk_remove` → … →
    /// `iommu_dma_free`). On the removal's thread, but not the IOMMU's release path: none of
    /// the disconnect checks guards it. Schema 1.3.
    DriverTeardown,
    /// Domain attach/detach (VFIO open/close, driver bind).
    DomainChange,
    /// Something else (the frames say what).
    Other,
    /// No stack available.
    Unknown,
}

pub use crate::knowledge::stacks::own_context;

impl CallerPath {
    /// Classifies a symbolized kernel stack (innermost frame first; `+0x..` offsets allowed)
    /// by the frames of its own context ([`own_context`]), from the call-path tables of
    /// [`crate::knowledge::stacks`].
    pub fn classify<S: AsRef<str>>(frames: &[S]) -> CallerPath {
        use crate::knowledge::stacks::*;
        let frames = own_context(frames);
        // No frames, or only the reader's markers (`<stack N unknown: ...>`,
        // `<stack N unreadable: ...>`): nothing says who called.
        if frames.iter().all(|f| f.as_ref().starts_with('<')) {
            return CallerPath::Unknown;
        }
        let has = |names: &[&str]| any_in(frames, names);
        let domain = has(DOMAIN_CHANGE);
        if has(DRIVER_UNBIND) && has(TEARDOWN_UNMAP) {
            CallerPath::DriverTeardown
        } else if has(REMOVAL) || has(SURPRISE) || has(SAFE) || (!domain && has(TEARDOWN)) {
            CallerPath::Removal
        } else if has(FLUSH_QUEUE) {
            CallerPath::FlushQueue
        } else if has(DRIVER_UNMAP) {
            CallerPath::DriverUnmap
        } else if domain {
            CallerPath::DomainChange
        } else {
            CallerPath::Other
        }
    }
}

/// A symbolized kernel stack, recorded once per id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackRecord {
    pub id: StackId,
    /// Innermost first, `symbol+0xoff` (or a raw hex address when unknown).
    pub frames: Vec<String>,
}

/// Events the probes could not deliver, reported as a marker in the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRecord {
    /// Time of the last event delivered before the loss was noticed.
    pub after: KTime,
    /// Events dropped because the ring buffer was full (delta since the previous marker).
    pub ringbuf_full: u64,
    /// Probe hits the kernel skipped (kprobe/kretprobe misses, recursion; delta), where known.
    pub missed: u64,
    /// Records the reader could not decode (delta).
    pub undecodable: u64,
}

/// A PCI device's identity, snapshotted from sysfs (kept after the device is gone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub driver: Option<String>,
    /// Hot-plug slot name (`/sys/bus/pci/slots/*/address`), if any.
    pub slot: Option<String>,
    /// The hot-plug port above it, if any.
    pub port: Option<Bdf>,
    /// ATS capability present / enabled, where readable.
    pub ats: Option<bool>,
    /// IOMMU unit (`dmarN`) it sits behind.
    pub iommu: Option<String>,
    /// Time of the snapshot (kernel clock).
    pub seen: KTime,
}

/// One item of an event stream: a kernel event or one of the stream's side records.
// Events are by far the most frequent records; see `Payload` for why they are not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Event(Event),
    Stack(StackRecord),
    Lost(LostRecord),
    Device(DeviceInfo),
}

impl Record {
    /// Kernel time of the record where it has one.
    pub fn ts(&self) -> Option<KTime> {
        match self {
            Record::Event(e) => Some(e.meta.ts),
            Record::Lost(l) => Some(l.after),
            Record::Device(d) => Some(d.seen),
            Record::Stack(_) => None,
        }
    }
}

/// Compact records (ABI 3) as the probes write them, for tests.
#[cfg(test)]
pub(crate) mod test_wire {
    use super::*;

    fn hdr(kind: abi::CompactKind, aux: u8, cpu: u16, tid: u32, ts: u64) -> abi::CompactHeader {
        abi::CompactHeader {
            kind: kind as u8,
            aux,
            cpu,
            tid,
            ts_ns: ts,
        }
    }

    pub fn task(cpu: u16, tid: u32, pid: u32, comm: &str, ts: u64) -> Vec<u8> {
        as_bytes(&abi::TaskEvent {
            hdr: hdr(abi::CompactKind::Task, 0, cpu, tid, ts),
            pid,
            _pad: 0,
            comm: FixedStr::<16>::new(comm).0,
        })
        .to_vec()
    }

    pub fn iommu(cpu: u16, slot: u8, i: &Iommu, ts: u64) -> Vec<u8> {
        as_bytes(&abi::IommuInfoEvent {
            hdr: hdr(abi::CompactKind::IommuInfo, slot, cpu, 0, ts),
            iommu: iommu_to_abi(i),
        })
        .to_vec()
    }

    /// A submission of `count` carrying `dev` (device-TLB descriptors) and summarising
    /// `others` descriptors of the types in `types`.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        cpu: u16,
        tid: u32,
        ts: u64,
        slot: u8,
        count: u16,
        dev: &[RawDesc],
        types: u16,
        others: u8,
        stack: i32,
    ) -> Vec<u8> {
        let mut descs = [[0u32; 4]; abi::MAX_BATCH];
        for (w, d) in descs.iter_mut().zip(dev) {
            *w = [
                d.qw0 as u32,
                (d.qw0 >> 32) as u32,
                d.qw1 as u32,
                (d.qw1 >> 32) as u32,
            ];
        }
        let e = abi::SubmitCompactEvent {
            hdr: hdr(abi::CompactKind::Submit, slot, cpu, tid, ts),
            count,
            options: 0,
            stack_id: stack,
            other_types: types,
            sent: dev.len() as u8,
            others,
            descs,
        };
        as_bytes(&e)[..abi::SUBMIT_COMPACT_FIXED_LEN + 16 * dev.len()].to_vec()
    }

    pub fn ret(cpu: u16, tid: u32, ts: u64, ret: i32) -> Vec<u8> {
        let e = abi::ReturnCompactEvent {
            hdr: hdr(abi::CompactKind::Return, 0, cpu, tid, ts),
            ret,
            _pad: 0,
        };
        as_bytes(&e)[..abi::RETURN_COMPACT_LEN].to_vec()
    }

    pub fn flush(cpu: u16, tid: u32, ts: u64, slot: u8, sid: u16) -> Vec<u8> {
        as_bytes(&abi::FlushCompactEvent {
            hdr: hdr(abi::CompactKind::Flush, slot, cpu, tid, ts),
            addr: 0x1000,
            sid,
            pfsid: sid,
            qdep: 32,
            has_pasid: 0,
            pasid: 0,
            mask: 0,
        })
        .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            ts: KTime(1_000),
            cpu: 1,
            pid: 42,
            tid: 43,
            comm: FixedStr::new("irq/24-pciehp"),
        }
    }

    #[test]
    fn decodes_the_device_tlb_example_from_the_kernel_notes() {
        // qw0 0xaf0300100003: type 3, qdep 16, sid af:00.3, pfsid 0.
        let d = Descriptor::decode(RawDesc {
            qw0: 0xaf0300100003,
            qw1: 0x7ffffffffffff001,
        });
        assert_eq!(
            d,
            Descriptor::DevTlb {
                sid: Sid(0xaf03),
                pfsid: Sid(0),
                qdep: 16,
                addr: 0x7ffffffffffff000,
                size_bit: true
            }
        );
        // The VM's 6.1 guest: qw0=0x0000010000000003 is SID 01:00.0.
        let d = Descriptor::decode(RawDesc {
            qw0: 0x0000010000000003,
            qw1: 0,
        });
        assert_eq!(d.dev_tlb_sid(), Some(Sid(0x0100)));
        // Shown as the kernel prints a SID (`SID %llx`); the device is 01:00.0.
        assert_eq!(Sid(0x0100).to_string(), "100");
        assert_eq!(Bdf::from_sid(None, Sid(0x0100)).sid(), Sid(0x0100));
    }

    #[test]
    fn full_range_flush_encodes_like_the_kernel() {
        // qi_flush_dev_iotlb(.., addr 0, mask 52) gives qw1 = 0x7ffffffffffff001.
        let raw = Descriptor::dev_tlb_raw(Sid(0xaf03), Sid(0), 16, 0, 52);
        assert_eq!(raw.qw1, 0x7ffffffffffff001);
        assert_eq!(raw.qw0, 0xaf0300100003);
        let pf = Descriptor::dev_tlb_raw(Sid(1), Sid(0x1234), 0, 0, 0);
        match Descriptor::decode(pf) {
            Descriptor::DevTlb { pfsid, .. } => assert_eq!(pfsid, Sid(0x1234)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_kind_round_trips_through_the_wire_format() {
        let iommu = Iommu {
            ptr: 0xffff_8880_0000_1000,
            name: FixedStr::new("dmar0"),
            segment: Some(0),
        };
        let mut raw = [RawDesc::default(); abi::MAX_BATCH];
        raw[0] = RawDesc { qw0: 0x2, qw1: 0 };
        raw[1] = Descriptor::dev_tlb_raw(Sid(0x0100), Sid(0x0100), 0, 0x1000, 0);
        let dev = DeviceRef {
            dev_ptr: 7,
            bdf: Some(Bdf::new(0, 1, 0, 0)),
            vendor: 0x1af4,
            device: 0x1042,
            stack: Some(StackId(3)),
        };
        let slot = Slot {
            ctrl: 9,
            port: Some(Bdf::new(0, 0, 4, 0)),
            secondary: 1,
            subordinate: 1,
            irq: 24,
            presence: None,
            stack: None,
        };
        let payloads = vec![
            Payload::Submit(Submit {
                iommu,
                options: 0,
                count: 2,
                raw: raw[..2].into(),
                others: OtherDescs {
                    types: 1 << 5,
                    count: 1,
                },
                stack: Some(StackId(1)),
            }),
            Payload::SubmitReturn(SubmitReturn {
                ret: ETIMEDOUT,
                start: Some(KTime(5)),
            }),
            Payload::DevTlbFlush(Flush {
                iommu,
                sid: Sid(0x100),
                pfsid: Sid(0x100),
                qdep: 32,
                pasid: Some(3),
                addr: 0,
                mask: 52,
                stack: None,
            }),
            Payload::HotplugIst(slot),
            Payload::HotplugIstReturn(IstReturn {
                ctrl: 9,
                start: None,
                ret: 1,
            }),
            Payload::Unconfigure(Slot {
                presence: Some(false),
                irq: -1,
                ..slot
            }),
            Payload::DisconnectWalk(Walk {
                callback: 0xffff,
                segment: None,
                bus: 1,
                bus_end: 1,
                stack: None,
            }),
            Payload::DeviceDisconnected(dev),
            Payload::DeviceRemove(dev),
            Payload::IommuRelease(DeviceRef { bdf: None, ..dev }),
            Payload::KernelLog(LogLine {
                text: "DMAR: VT-d detected Invalidation Time-out Error: SID 0".into(),
                truncated: false,
            }),
        ];
        for p in payloads {
            let e = Event {
                meta: meta(),
                payload: p,
            };
            let bytes = e.encode();
            assert_eq!(bytes.len(), e.payload.kind().wire_size());
            assert_eq!(Event::decode(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn short_and_unknown_records_are_errors_not_panics() {
        assert!(matches!(
            Event::decode(&[0u8; 3]),
            Err(DecodeError::ShortHeader { .. })
        ));
        let mut b = Event {
            meta: meta(),
            payload: Payload::SubmitReturn(SubmitReturn {
                ret: 0,
                start: None,
            }),
        }
        .encode();
        b[0] = 99;
        assert_eq!(Event::decode(&b), Err(DecodeError::UnknownKind(99)));
        b[0] = abi::EventKind::Submit as u8;
        assert!(matches!(Event::decode(&b), Err(DecodeError::Short { .. })));
    }

    /// ABI 2: the probe sends a submission record only as long as its batch.
    #[test]
    fn a_submission_record_may_end_after_its_descriptors() {
        let mut raw = [RawDesc::default(); abi::MAX_BATCH];
        raw[0] = Descriptor::dev_tlb_raw(Sid(0x0200), Sid(0x0200), 0, 0x2000, 0);
        raw[1] = RawDesc { qw0: 0x2, qw1: 0 };
        let full = Event {
            meta: meta(),
            payload: Payload::Submit(Submit {
                iommu: Iommu {
                    ptr: 1,
                    name: FixedStr::new("dmar0"),
                    segment: Some(0),
                },
                options: 0,
                count: 2,
                raw: raw[..2].into(),
                others: OtherDescs::default(),
                stack: None,
            }),
        };
        let bytes = full.encode();
        assert_eq!(bytes.len(), abi::EventKind::Submit.wire_size());
        let short = &bytes[..abi::SUBMIT_FIXED_LEN + 2 * 16];
        assert_eq!(short.len(), 128);
        assert_eq!(Event::decode(short), Ok(full.clone()));
        // One descriptor missing of the two the batch had: refused, not zero-filled.
        assert!(matches!(
            Event::decode(&bytes[..abi::SUBMIT_FIXED_LEN + 16]),
            Err(DecodeError::Short { need: 128, .. })
        ));
        assert!(matches!(
            Event::decode(&bytes[..abi::SUBMIT_FIXED_LEN - 1]),
            Err(DecodeError::Short { .. })
        ));
    }

    fn dmar(ptr: u64, name: &str) -> Iommu {
        Iommu {
            ptr,
            name: FixedStr::new(name),
            segment: Some(0),
        }
    }

    /// ABI 3: the hot path's compact records take their thread and IOMMU from the
    /// announcements of the same CPU before them, and are as short as issue 14 asks.
    #[test]
    fn compact_records_decode_against_their_announcements() {
        use test_wire as w;
        let dev = Descriptor::dev_tlb_raw(Sid(0x0100), Sid(0x0100), 0, 0x5000, 0);
        let sub = w::submit(1, 7, 100, 3, 2, &[dev], 1 << 2, 1, 4);
        let ret = w::ret(1, 7, 150, -110);
        // The common path of 6.12 (an IOTLB and a device-TLB descriptor) and its return.
        assert_eq!(sub.len(), 44);
        assert_eq!(ret.len(), 20);
        assert!(sub.len() + ret.len() <= 64);
        assert_eq!(compact_len(&sub), Some(Ok(44)));
        assert_eq!(compact_len(&ret), Some(Ok(20)));
        assert_eq!(w::task(1, 7, 5, "dd", 90).len(), 40);
        assert_eq!(
            w::iommu(1, 3, &dmar(0xffff_8880_1000_0000, "dmar1"), 90).len(),
            48
        );
        assert_eq!(w::flush(1, 7, 95, 3, 0x100).len(), 40);

        let mut d = Decoder::new();
        assert_eq!(d.decode(&w::task(1, 7, 5, "dd", 90)), Ok(None));
        let unit = dmar(0xffff_8880_1000_0000, "dmar1");
        assert_eq!(d.decode(&w::iommu(1, 3, &unit, 90)), Ok(None));
        let e = d.decode(&sub).unwrap().unwrap();
        assert_eq!(
            e.meta,
            Meta {
                ts: KTime(100),
                cpu: 1,
                pid: 5,
                tid: 7,
                comm: FixedStr::new("dd"),
            }
        );
        let Payload::Submit(s) = &e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(s.iommu, unit);
        assert_eq!(s.raw.as_slice(), &[dev]);
        assert_eq!(s.dev_tlb_sids().collect::<Vec<_>>(), vec![Sid(0x0100)]);
        assert_eq!(s.others, OtherDescs { types: 4, count: 1 });
        assert_eq!((s.count, s.captured(), s.truncated()), (2, 2, false));
        assert_eq!(s.stack, Some(StackId(4)));
        // Re-encoded as a self-contained kind-1 record, the summary survives.
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        let r = d.decode(&ret).unwrap().unwrap();
        assert_eq!((r.meta.pid, r.meta.comm.as_str().as_ref()), (5, "dd"));
        assert_eq!(
            r.payload,
            Payload::SubmitReturn(SubmitReturn {
                ret: ETIMEDOUT,
                start: None
            })
        );
        let f = d.decode(&w::flush(1, 7, 95, 3, 0x100)).unwrap().unwrap();
        assert!(
            matches!(f.payload, Payload::DevTlbFlush(Flush { iommu, sid: Sid(0x100), .. }) if iommu == unit)
        );
        assert_eq!(d.stats.unknown_task, 0);
        // Without a decoder a compact record is refused, not misread.
        assert_eq!(Event::decode(&sub), Err(DecodeError::NeedsDecoder(15)));
    }

    #[test]
    fn an_iommu_slot_nobody_announced_is_an_error_naming_it() {
        use test_wire as w;
        let sub = w::submit(1, 7, 100, 3, 1, &[], 1 << 2, 1, -1);
        let mut d = Decoder::new();
        let err = DecodeError::NoIommuInfo {
            kind: "submit",
            cpu: 1,
            slot: 3,
        };
        assert_eq!(d.decode(&sub), Err(err.clone()));
        assert!(err.to_string().contains("IOMMU slot 3"), "{err}");
        // Another CPU's announcement of the same slot is not this CPU's.
        d.decode(&w::iommu(0, 3, &dmar(1, "dmar0"), 90)).unwrap();
        assert_eq!(d.decode(&sub), Err(err));
        assert!(matches!(
            d.decode(&w::flush(1, 7, 95, 3, 0x100)),
            Err(DecodeError::NoIommuInfo {
                kind: "devtlb-flush",
                ..
            })
        ));
        // A slot the probe could not announce: the IOMMU is unknown, and counted.
        let none = w::submit(1, 7, 100, abi::IOMMU_SLOT_NONE, 1, &[], 4, 1, -1);
        let e = d.decode(&none).unwrap().unwrap();
        let Payload::Submit(s) = e.payload else {
            panic!()
        };
        assert_eq!((s.iommu.ptr, s.iommu.name.as_str().as_ref()), (0, ""));
        assert_eq!(d.stats.unknown_iommu, 1);
    }

    #[test]
    fn a_thread_not_announced_on_its_cpu_is_unknown_not_another() {
        use test_wire as w;
        let mut d = Decoder::new();
        d.decode(&w::task(1, 7, 5, "dd", 90)).unwrap();
        // Thread 8 on CPU 1, and thread 7 on CPU 0: neither was announced there.
        for (cpu, tid) in [(1, 8), (0, 7)] {
            let r = d.decode(&w::ret(cpu, tid, 150, 0)).unwrap().unwrap();
            assert_eq!((r.meta.pid, r.meta.tid), (0, tid));
            assert_eq!(r.meta.comm.as_str(), "");
        }
        assert_eq!(d.stats.unknown_task, 2);
        assert_eq!(d.stats.announcements, 1);
        // Threads in other slots of the CPU stay announced; one in the same slot replaces it.
        d.decode(&w::task(1, 8, 6, "swapper/1", 95)).unwrap();
        for (tid, comm) in [(7, "dd"), (8, "swapper/1"), (7, "dd")] {
            let r = d.decode(&w::ret(1, tid, 160, 0)).unwrap().unwrap();
            assert_eq!(r.meta.comm.as_str(), comm);
        }
        d.decode(&w::task(1, 11, 9, "kworker", 96)).unwrap();
        let r = d.decode(&w::ret(1, 7, 170, 0)).unwrap().unwrap();
        assert_eq!((r.meta.pid, r.meta.comm.as_str().as_ref()), (0, ""));
        assert_eq!(d.stats.unknown_task, 3);
    }

    #[test]
    fn truncated_and_impossible_compact_records_are_errors() {
        use test_wire as w;
        let dev = Descriptor::dev_tlb_raw(Sid(1), Sid(1), 0, 0, 0);
        let recs = [
            w::task(0, 1, 1, "x", 1),
            w::iommu(0, 0, &dmar(1, "dmar0"), 1),
            w::submit(0, 1, 1, 0, 2, &[dev, dev], 0, 0, -1),
            w::ret(0, 1, 1, 0),
            w::flush(0, 1, 1, 0, 1),
        ];
        for r in &recs {
            for cut in 0..r.len() {
                let mut d = Decoder::new();
                let got = d.decode(&r[..cut]);
                assert!(
                    got.is_err(),
                    "{} of {} bytes decoded: {got:?}",
                    cut,
                    r.len()
                );
            }
        }
        // Two descriptors announced, one sent: the record is cut, not zero-filled.
        let sub = &recs[2];
        assert_eq!(compact_len(sub), Some(Ok(60)));
        assert!(matches!(
            compact_len(&sub[..44]),
            Some(Err(DecodeError::Short { need: 60, .. }))
        ));
        let mut d = Decoder::new();
        d.decode(&recs[1]).unwrap();
        assert!(matches!(
            d.decode(&sub[..44]),
            Err(DecodeError::Short { need: 60, .. })
        ));
        let mut bad = sub.clone();
        bad[26] = 17;
        assert!(matches!(
            compact_len(&bad),
            Some(Err(DecodeError::Invalid { .. }))
        ));
        let mut bad = recs[1].clone();
        bad[1] = abi::IOMMU_SLOTS as u8;
        assert!(matches!(d.decode(&bad), Err(DecodeError::Invalid { .. })));
    }

    #[test]
    fn bdf_parses_and_prints() {
        let b: Bdf = "0000:01:00.0".parse().unwrap();
        assert_eq!(b.to_string(), "0000:01:00.0");
        assert_eq!(b.sid(), Sid(0x0100));
        assert!("01:20.0".parse::<Bdf>().is_err());
        assert!("zz".parse::<Bdf>().is_err());
        let j = serde_json::to_string(&Bdf {
            segment: None,
            bus: 2,
            devfn: 9,
        })
        .unwrap();
        assert_eq!(j, "\"????:02:01.1\"");
        assert_eq!(serde_json::from_str::<Bdf>(&j).unwrap().segment, None);
    }

    #[test]
    fn caller_paths_from_the_thread_stacks() {
        let removal = [
            "qi_submit_sync+0x2c0",
            "qi_flush_dev_iotlb+0xb1",
            "__dmar_remove_one_dev_info+0x224",
            "iommu_bus_notifier+0x5f",
            "pciehp_ist+0x120",
        ];
        assert_eq!(CallerPath::classify(&removal), CallerPath::Removal);
        let unmap = [
            "qi_submit_sync",
            "cache_tag_flush_range+0x1",
            "intel_iommu_tlb_sync",
            "__iommu_dma_unmap",
            "iommu_dma_unmap_page",
            "dma_unmap_page_attrs",
            "virtqueue_unmap_sgs",
        ];
        assert_eq!(CallerPath::classify(&unmap), CallerPath::DriverUnmap);
        assert_eq!(CallerPath::classify::<&str>(&[]), CallerPath::Unknown);
        assert_eq!(
            CallerPath::classify(&[
                "<stack 5 unknown: its map entry was reused while the event was read>"
            ]),
            CallerPath::Unknown
        );
        assert_eq!(
            CallerPath::classify(&["qi_submit_sync", "fq_flush_timeout.cold+0x2"]),
            CallerPath::FlushQueue
        );
    }

    #[test]
    fn an_interrupted_removal_is_not_the_caller() {
        // A disk's completion interrupt unmapping DMA while pciehp's thread runs (the shape
        // of the 6.1 VM stacks): the frames below the interrupt entry are pciehp's, but the
        // call is the driver's unmap.
        let frames = [
            "qi_submit_sync+0x5",
            "qi_flush_iotlb+0x89",
            "iommu_flush_iotlb_psi+0x124",
            "intel_iommu_tlb_sync+0xa3",
            "__iommu_dma_unmap+0x23f",
            "iommu_dma_unmap_page+0x44",
            "vring_unmap_one_split+0x42 [virtio_ring]",
            "vring_interrupt+0x60 [virtio_ring]",
            "__handle_irq_event_percpu+0x46",
            "common_interrupt+0x7d",
            "asm_common_interrupt+0x22",
            "pciehp_unconfigure_device+0x30",
            "pciehp_ist+0x120",
        ];
        assert_eq!(own_context(&frames).len(), 11);
        assert_eq!(CallerPath::classify(&frames), CallerPath::DriverUnmap);
        // Without an entry frame, the whole stack is the caller's.
        assert_eq!(own_context(&frames[..9]).len(), 9);
    }
}
