//! PCI devices, hot-plug slots and IOMMU units as sysfs shows them.
//!
//! Everything is read below a root directory (`/` live, a fixture tree in tests), so the same
//! code runs on `itewatch/tests/fixtures/sysfs-*`:
//! - `sys/bus/pci/devices/*` → [`PciDevice`] / [`DeviceInfo`]: IDs, driver (`driver` link),
//!   IOMMU unit (`iommu` link → `dmarN`), hot-plug slot and port, and ATS from the extended
//!   capability list in `config` (beyond 64 bytes needs root: otherwise ATS is "unknown").
//! - `sys/bus/pci/slots/*` → [`Slot`] (`address` is `ssss:bb:dd` of the card in the slot; a
//!   `power` file marks a hot-plug driver's slot; the port is the bridge whose secondary bus
//!   is the slot's bus).
//! - `sys/class/iommu/*/intel-iommu/{cap,ecap,version,address}` → [`IommuUnit`].
//!
//! [`DeviceInventory`] keeps the last known identity of every device it has seen, also after
//! the device is gone: a removal race is diagnosed after the fact, when sysfs no longer has it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::event::{Bdf, DeviceInfo, KTime, Sid};

/// Errors of the sysfs area.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("{} is not there: sysfs not mounted, or no PCI bus", path.display())]
    NoPciBus { path: PathBuf },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads sysfs below a root directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysfs {
    pub root: PathBuf,
}

/// ATS (PCIe Address Translation Services) state of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "why", rename_all = "snake_case")]
pub enum AtsState {
    /// ATS capability present, Enable bit (control register bit 15) set.
    Enabled,
    /// ATS capability present, not enabled.
    Disabled,
    /// No ATS capability (or not a PCIe device).
    Absent,
    /// Could not tell, and why.
    Unknown(String),
}

impl AtsState {
    /// The [`DeviceInfo::ats`] view: enabled → `Some(true)`, known not enabled →
    /// `Some(false)`, unknown → `None`.
    pub fn as_option(&self) -> Option<bool> {
        match self {
            AtsState::Enabled => Some(true),
            AtsState::Disabled | AtsState::Absent => Some(false),
            AtsState::Unknown(_) => None,
        }
    }
}

/// PCI capability ids (PCI Local Bus / PCIe base spec; include/uapi/linux/pci_regs.h).
const PCI_CAP_ID_EXP: u8 = 0x10;
const PCI_EXT_CAP_ID_ATS: u16 = 0x000f;
/// ATS control register (offset 6 in the capability): Enable is bit 15.
const PCI_ATS_CTRL: usize = 6;
const PCI_ATS_CTRL_ENABLE: u16 = 1 << 15;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Whether the standard capability list has a PCI Express capability.
fn is_pcie(config: &[u8]) -> bool {
    let status = u16_at(config, 0x06).unwrap_or(0);
    if status & 0x10 == 0 {
        return false;
    }
    let mut ptr = config.get(0x34).copied().unwrap_or(0) & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            return false;
        }
        let (Some(&id), Some(&next)) = (config.get(ptr as usize), config.get(ptr as usize + 1))
        else {
            return false;
        };
        if id == PCI_CAP_ID_EXP {
            return true;
        }
        ptr = next & 0xfc;
    }
    false
}

/// ATS state from a device's config space bytes (as much as sysfs let us read).
pub fn ats_from_config(config: &[u8]) -> AtsState {
    if config.len() < 64 {
        return AtsState::Unknown("config space unreadable".into());
    }
    if config.len() < 256 {
        return AtsState::Unknown(
            "only the first 64 bytes of config space are readable without root".into(),
        );
    }
    if config[0..2] == [0xff, 0xff] {
        // Vendor ID all ones: the device no longer answers config reads (surprise-removed or
        // powered off while still in sysfs). Its capabilities cannot be read now.
        return AtsState::Unknown("device does not answer config reads (gone from the bus)".into());
    }
    if !is_pcie(config) {
        return AtsState::Absent;
    }
    if config.len() < 4096 {
        return AtsState::Unknown(
            "extended config space (beyond 256 bytes) is not accessible".into(),
        );
    }
    let mut off = 0x100usize;
    for _ in 0..((4096 - 0x100) / 4) {
        let Some(h) = u32_at(config, off) else { break };
        if h == 0 || h == 0xffff_ffff {
            break;
        }
        if (h & 0xffff) as u16 == PCI_EXT_CAP_ID_ATS {
            return match u16_at(config, off + PCI_ATS_CTRL) {
                Some(c) if c & PCI_ATS_CTRL_ENABLE != 0 => AtsState::Enabled,
                Some(_) => AtsState::Disabled,
                None => AtsState::Unknown("ATS capability truncated".into()),
            };
        }
        let next = ((h >> 20) & 0xffc) as usize;
        if next < 0x100 {
            break;
        }
        off = next;
    }
    AtsState::Absent
}

/// A PCI device as sysfs shows it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PciDevice {
    pub info: DeviceInfo,
    /// `class` (24-bit class code).
    pub class: Option<u32>,
    pub ats: AtsState,
    /// Bus number behind it, for a bridge (`pci_bus/ssss:bb`).
    pub secondary_bus: Option<u8>,
    /// Every slot on its path to the root complex, nearest first (`info.slot` is the first):
    /// pulling the card in any of them takes this device along (a switch card in a root
    /// port's slot carries the devices in its own downstream slots).
    pub slots: Vec<String>,
}

/// A slot under `/sys/bus/pci/slots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub name: String,
    pub segment: u16,
    pub bus: u8,
    /// Device number of the card in the slot (`None` when the address has no device part).
    pub dev: Option<u8>,
    /// A hot-plug driver (pciehp, acpiphp, ...) registered it (`power` attribute present).
    pub hotplug: bool,
    /// The bridge whose secondary bus is the slot's bus.
    pub port: Option<Bdf>,
}

impl Slot {
    fn covers(&self, bdf: Bdf) -> bool {
        bdf.segment_or_zero() == self.segment
            && bdf.bus == self.bus
            && self.dev.is_none_or(|d| d == bdf.devfn >> 3)
    }
}

/// Decoded VT-d extended capability bits (bit numbers as in drivers/iommu/intel/iommu.h,
/// checked on 6.1/6.12: `ecap_qis` bit 1, `ecap_dev_iotlb_support` bit 2, `ecap_smts` bit 43).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ecap {
    /// Queued invalidation (bit 1): qi_submit_sync is used at all.
    pub qi: bool,
    /// Device-TLB (ATS) support (bit 2): device-TLB invalidations can happen.
    pub dt: bool,
    /// Interrupt remapping (bit 3).
    pub ir: bool,
    /// Pass-through (bit 6).
    pub pt: bool,
    /// Snoop control (bit 7).
    pub sc: bool,
    /// PASID (bit 40).
    pub pasid: bool,
    /// Scalable-mode translation (bit 43): 256-bit descriptors, PASID device-TLB type.
    pub smts: bool,
}

impl Ecap {
    pub fn decode(e: u64) -> Ecap {
        let bit = |n: u32| (e >> n) & 1 == 1;
        Ecap {
            qi: bit(1),
            dt: bit(2),
            ir: bit(3),
            pt: bit(6),
            sc: bit(7),
            pasid: bit(40),
            smts: bit(43),
        }
    }
}

/// An IOMMU unit from `/sys/class/iommu`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IommuUnit {
    /// `dmarN` (Intel) or the class device name.
    pub name: String,
    /// `intel-iommu`, `amd-iommu`, or `other`.
    pub kind: String,
    pub version: Option<String>,
    pub address: Option<u64>,
    pub cap: Option<u64>,
    pub ecap: Option<u64>,
    pub decoded: Option<Ecap>,
    /// Caching mode (cap bit 7): set by emulated IOMMUs (QEMU).
    pub caching_mode: Option<bool>,
}

fn read_trim(path: &Path) -> Result<String, SysfsError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysfsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Parses a slot address `ssss:bb:dd` or `ssss:bb`.
fn parse_slot_address(s: &str) -> Option<(u16, u8, Option<u8>)> {
    let mut it = s.trim().split(':');
    let seg = u16::from_str_radix(it.next()?, 16).ok()?;
    let bus = u8::from_str_radix(it.next()?, 16).ok()?;
    let dev = match it.next() {
        Some(d) => Some(u8::from_str_radix(d, 16).ok()?),
        None => None,
    };
    Some((seg, bus, dev))
}

/// Directory entries' names, sorted; a missing directory is an empty list.
fn list(dir: &Path) -> Result<Vec<String>, SysfsError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SysfsError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    /// The running system (`/`).
    pub fn live() -> Sysfs {
        Sysfs::new("/")
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Hot-plug and other slots.
    pub fn slots(&self) -> Result<Vec<Slot>, SysfsError> {
        let dir = self.p("sys/bus/pci/slots");
        let bridges = self.bridges()?;
        let mut out = Vec::new();
        for name in list(&dir)? {
            let sd = dir.join(&name);
            let Ok(addr) = read_trim(&sd.join("address")) else {
                continue;
            };
            let Some((segment, bus, dev)) = parse_slot_address(&addr) else {
                continue;
            };
            let port = bridges
                .iter()
                .find(|(b, sec)| b.segment_or_zero() == segment && *sec == bus)
                .map(|(b, _)| *b);
            out.push(Slot {
                name,
                segment,
                bus,
                dev,
                hotplug: sd.join("power").exists(),
                port,
            });
        }
        Ok(out)
    }

    /// (bridge, secondary bus) for every device with a `pci_bus/ssss:bb` child.
    fn bridges(&self) -> Result<Vec<(Bdf, u8)>, SysfsError> {
        let dir = self.p("sys/bus/pci/devices");
        let mut out = Vec::new();
        for name in list(&dir)? {
            let Ok(bdf) = name.parse::<Bdf>() else {
                continue;
            };
            if let Some(sec) = secondary_bus(&dir.join(&name)) {
                out.push((bdf, sec));
            }
        }
        Ok(out)
    }

    /// Every PCI device now present. A device that vanishes mid-scan (hot removal) is
    /// skipped; attributes that cannot be read are left empty.
    pub fn pci_devices(&self, seen: KTime) -> Result<Vec<PciDevice>, SysfsError> {
        let dir = self.p("sys/bus/pci/devices");
        if !dir.is_dir() {
            return Err(SysfsError::NoPciBus { path: dir });
        }
        let slots = self.slots()?;
        let mut out = Vec::new();
        for name in list(&dir)? {
            let Ok(bdf) = name.parse::<Bdf>() else {
                continue;
            };
            let d = dir.join(&name);
            let Ok(vendor) = read_trim(&d.join("vendor")) else {
                continue; // gone
            };
            let vendor = parse_hex(&vendor).unwrap_or(0xffff) as u16;
            let device = read_trim(&d.join("device"))
                .ok()
                .and_then(|s| parse_hex(&s))
                .unwrap_or(0xffff) as u16;
            let class = read_trim(&d.join("class"))
                .ok()
                .and_then(|s| parse_hex(&s))
                .map(|c| c as u32);
            let ats = match fs::read(d.join("config")) {
                Ok(c) => ats_from_config(&c),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    AtsState::Unknown("config space not readable (needs root)".into())
                }
                Err(e) => AtsState::Unknown(format!("config space not readable: {e}")),
            };
            // The device itself and its ancestors, nearest first: the first one sitting in
            // a slot gives the slot and its port (a card with a switch is removed whole).
            let mut chain = vec![bdf];
            if let Ok(real) = fs::canonicalize(&d) {
                chain.extend(
                    real.ancestors()
                        .skip(1)
                        .filter_map(|a| a.file_name()?.to_str()?.parse::<Bdf>().ok()),
                );
            }
            let enclosing: Vec<&Slot> = chain
                .iter()
                .filter_map(|b| slots.iter().find(|s| s.covers(*b)))
                .collect();
            let in_slot = enclosing.first().copied();
            let port = in_slot.and_then(|s| s.port.or_else(|| chain.get(1).copied()));
            out.push(PciDevice {
                info: DeviceInfo {
                    bdf,
                    vendor,
                    device,
                    driver: link_name(&d.join("driver")),
                    slot: in_slot.map(|s| s.name.clone()),
                    port,
                    ats: ats.as_option(),
                    iommu: link_name(&d.join("iommu")),
                    seen,
                },
                class,
                ats,
                secondary_bus: secondary_bus(&d),
                slots: enclosing.iter().map(|s| s.name.clone()).collect(),
            });
        }
        Ok(out)
    }

    /// [`DeviceInfo`] for every device now present.
    pub fn device_infos(&self, seen: KTime) -> Result<Vec<DeviceInfo>, SysfsError> {
        Ok(self
            .pci_devices(seen)?
            .into_iter()
            .map(|d| d.info)
            .collect())
    }

    /// IOMMU units (`/sys/class/iommu`); an empty list when there are none (IOMMU off, or
    /// not an Intel/AMD system).
    pub fn iommu_units(&self) -> Result<Vec<IommuUnit>, SysfsError> {
        let dir = self.p("sys/class/iommu");
        let mut out = Vec::new();
        for name in list(&dir)? {
            let u = dir.join(&name);
            let (kind, attrs) = if u.join("intel-iommu").is_dir() {
                ("intel-iommu", u.join("intel-iommu"))
            } else if u.join("amd-iommu").is_dir() {
                ("amd-iommu", u.join("amd-iommu"))
            } else {
                ("other", u.clone())
            };
            let hex = |f: &str| read_trim(&attrs.join(f)).ok().and_then(|s| parse_hex(&s));
            let cap = hex("cap");
            let ecap = if kind == "intel-iommu" {
                hex("ecap")
            } else {
                None
            };
            out.push(IommuUnit {
                name,
                kind: kind.to_string(),
                version: read_trim(&attrs.join("version")).ok(),
                address: hex("address"),
                cap,
                ecap,
                decoded: ecap.map(Ecap::decode),
                caching_mode: cap
                    .filter(|_| kind == "intel-iommu")
                    .map(|c| (c >> 7) & 1 == 1),
            });
        }
        Ok(out)
    }
}

/// A hot-plug port's Slot Capabilities and Slot Control (PCIe capability + 0x14 / + 0x18;
/// PCIe base spec 7.5.3.9–10, include/uapi/linux/pci_regs.h `PCI_EXP_SLTCAP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SlotCaps {
    /// Attention Button Present (SLTCAP bit 0): a button press starts an orderly removal.
    pub attention_button: bool,
    /// Power Controller Present (bit 1): software can power the slot off (`slots/N/power`).
    pub power_controller: bool,
    /// Hot-Plug Surprise (bit 5): the card may be pulled without notice.
    pub surprise: bool,
    /// Hot-Plug Capable (bit 6).
    pub hotplug_capable: bool,
    /// Slot Control's Power Controller Control (bit 10) reads "on" (0); `None` without a
    /// power controller.
    pub powered: Option<bool>,
    pub slot_capabilities: u32,
    pub slot_control: u16,
}

impl SlotCaps {
    /// Decodes SLTCAP and SLTCTL.
    pub fn decode(sltcap: u32, sltctl: u16) -> SlotCaps {
        let power_controller = sltcap & (1 << 1) != 0;
        SlotCaps {
            attention_button: sltcap & 1 != 0,
            power_controller,
            surprise: sltcap & (1 << 5) != 0,
            hotplug_capable: sltcap & (1 << 6) != 0,
            powered: power_controller.then_some(sltctl & (1 << 10) == 0),
            slot_capabilities: sltcap,
            slot_control: sltctl,
        }
    }
}

/// Slot Capabilities and Control from a port's config space bytes.
pub fn slot_caps_from_config(config: &[u8]) -> Result<SlotCaps, String> {
    if config.len() < 256 {
        return Err(
            "the port's PCIe capability is beyond the 64 bytes readable without root".into(),
        );
    }
    if config[0..2] == [0xff, 0xff] {
        return Err("the port does not answer config reads".into());
    }
    let mut ptr = config[0x34] & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let p = ptr as usize;
        if config[p] == PCI_CAP_ID_EXP {
            let (Some(cap), Some(ctl)) = (u32_at(config, p + 0x14), u16_at(config, p + 0x18))
            else {
                break;
            };
            return Ok(SlotCaps::decode(cap, ctl));
        }
        ptr = config[p + 1] & 0xfc;
    }
    Err("the port has no PCI Express capability".into())
}

impl Sysfs {
    /// The Slot Capabilities and Control of hot-plug port `port` (root: config space beyond
    /// 64 bytes).
    pub fn slot_caps(&self, port: Bdf) -> Result<SlotCaps, String> {
        let path = self.p(&format!("sys/bus/pci/devices/{port}/config"));
        match fs::read(&path) {
            Ok(c) => slot_caps_from_config(&c),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

fn secondary_bus(dev_dir: &Path) -> Option<u8> {
    list(&dev_dir.join("pci_bus"))
        .ok()?
        .iter()
        .find_map(|n| parse_slot_address(n).map(|(_, bus, _)| bus))
}

/// CLOCK_MONOTONIC now, the time base of [`KTime`] (what `bpf_ktime_get_ns` returns).
pub fn monotonic_now() -> KTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return KTime(0);
    }
    KTime(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// One device the inventory knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KnownDevice {
    /// Last identity seen (`seen` says when).
    pub info: DeviceInfo,
    /// In the most recent refresh.
    pub present: bool,
}

/// What a refresh changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InventoryChanges {
    pub added: Vec<Bdf>,
    /// Present before, not now (kept in the inventory as not present).
    pub gone: Vec<Bdf>,
    /// Same address, different device (vendor/device id changed: a card swap).
    pub replaced: Vec<Bdf>,
}

/// Every device ever seen, by address; never forgets one.
#[derive(Clone, Debug, Default)]
pub struct DeviceInventory {
    devices: BTreeMap<Bdf, KnownDevice>,
}

impl DeviceInventory {
    pub fn new() -> Self {
        Self::default()
    }

    /// A first snapshot from sysfs.
    pub fn snapshot(sysfs: &Sysfs, seen: KTime) -> Result<Self, SysfsError> {
        let mut inv = Self::new();
        inv.refresh(sysfs, seen)?;
        Ok(inv)
    }

    /// Re-reads sysfs and merges ([`DeviceInventory::merge`]).
    pub fn refresh(&mut self, sysfs: &Sysfs, seen: KTime) -> Result<InventoryChanges, SysfsError> {
        Ok(self.merge(sysfs.device_infos(seen)?))
    }

    /// Merges a complete list of the devices present now: those listed are updated and
    /// marked present, the others are kept with their last identity and marked not present.
    pub fn merge(&mut self, now: Vec<DeviceInfo>) -> InventoryChanges {
        let mut ch = InventoryChanges::default();
        let mut listed = std::collections::BTreeSet::new();
        for info in now {
            let bdf = info.bdf;
            listed.insert(bdf);
            match self.devices.get_mut(&bdf) {
                Some(k) => {
                    if !k.present {
                        ch.added.push(bdf);
                    }
                    if (k.info.vendor, k.info.device) != (info.vendor, info.device) {
                        ch.replaced.push(bdf);
                    }
                    k.info = info;
                    k.present = true;
                }
                None => {
                    ch.added.push(bdf);
                    self.devices.insert(
                        bdf,
                        KnownDevice {
                            info,
                            present: true,
                        },
                    );
                }
            }
        }
        for (bdf, k) in self.devices.iter_mut() {
            if k.present && !listed.contains(bdf) {
                k.present = false;
                ch.gone.push(*bdf);
            }
        }
        ch
    }

    /// Adds or updates one device without touching the others (e.g. a device record from a
    /// trace file).
    pub fn upsert(&mut self, info: DeviceInfo, present: bool) {
        self.devices.insert(info.bdf, KnownDevice { info, present });
    }

    pub fn by_bdf(&self, bdf: Bdf) -> Option<&KnownDevice> {
        self.devices.get(&bdf).or_else(|| {
            // An address with an unknown segment matches on bus/devfn alone when unique.
            if bdf.segment.is_none() {
                self.by_sid(None, bdf.sid())
            } else {
                None
            }
        })
    }

    /// By PCI source-id within a segment. With `segment == None` (the probe could not read
    /// it) the match is on the SID alone: the only device with that SID, or the one in
    /// segment 0 when several segments have it.
    pub fn by_sid(&self, segment: Option<u16>, sid: Sid) -> Option<&KnownDevice> {
        match segment {
            Some(s) => self.devices.get(&Bdf::from_sid(Some(s), sid)),
            None => {
                let mut hits = self.devices.values().filter(|k| k.info.bdf.sid() == sid);
                let first = hits.next()?;
                match hits.next() {
                    None => Some(first),
                    Some(_) => self.devices.get(&Bdf::from_sid(Some(0), sid)),
                }
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &KnownDevice> {
        self.devices.values()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    //! Fixture helpers shared with the doctor's tests.
    use std::fs;
    use std::path::{Path, PathBuf};

    /// `itewatch/tests/fixtures/<name>`.
    pub fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// Copies a fixture tree (symlinks kept) into a temp dir for tests that change it.
    pub fn copy_tree(from: &Path, to: &Path) {
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(e.path()).unwrap(), &t).unwrap();
            } else if ft.is_dir() {
                fs::create_dir_all(&t).unwrap();
                copy_tree(&e.path(), &t);
            } else {
                fs::copy(e.path(), &t).unwrap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{copy_tree, fixture};
    use super::*;

    fn q35() -> Sysfs {
        Sysfs::new(fixture("sysfs-qemu-q35"))
    }

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn q35_inventory() {
        let devs = q35().pci_devices(KTime(7)).unwrap();
        let names: Vec<String> = devs.iter().map(|d| d.info.bdf.to_string()).collect();
        assert_eq!(
            names,
            [
                "0000:00:00.0",
                "0000:00:04.0",
                "0000:00:05.0",
                "0000:00:1f.0",
                "0000:01:00.0",
                "0000:02:00.0"
            ]
        );
        let vd1 = devs
            .iter()
            .find(|d| d.info.bdf == bdf("0000:01:00.0"))
            .unwrap();
        assert_eq!(
            vd1.info,
            DeviceInfo {
                bdf: bdf("0000:01:00.0"),
                vendor: 0x1af4,
                device: 0x1042,
                driver: Some("virtio-pci".into()),
                slot: Some("1".into()),
                port: Some(bdf("0000:00:04.0")),
                ats: Some(true),
                iommu: Some("dmar0".into()),
                seen: KTime(7),
            }
        );
        assert_eq!(vd1.ats, AtsState::Enabled);
        let vd2 = devs
            .iter()
            .find(|d| d.info.bdf == bdf("0000:02:00.0"))
            .unwrap();
        assert_eq!(vd2.info.slot.as_deref(), Some("2"));
        assert_eq!(vd2.info.port, Some(bdf("0000:00:05.0")));
        let rp1 = devs
            .iter()
            .find(|d| d.info.bdf == bdf("0000:00:04.0"))
            .unwrap();
        assert_eq!(rp1.secondary_bus, Some(1));
        assert_eq!(rp1.info.slot, None, "the port is not in its own slot");
        assert_eq!(rp1.info.driver.as_deref(), Some("pcieport"));
        assert_eq!(rp1.ats, AtsState::Absent, "PCIe, no ATS capability");
        let host = devs
            .iter()
            .find(|d| d.info.bdf == bdf("0000:00:00.0"))
            .unwrap();
        assert_eq!(host.ats, AtsState::Absent, "not PCIe");
        assert_eq!(host.info.driver, None);
    }

    #[test]
    fn q35_slots_and_iommu() {
        let slots = q35().slots().unwrap();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].name, "1");
        assert_eq!(
            (slots[0].segment, slots[0].bus, slots[0].dev),
            (0, 1, Some(0))
        );
        assert!(slots[0].hotplug);
        assert_eq!(slots[0].port, Some(bdf("0000:00:04.0")));
        assert_eq!(slots[1].port, Some(bdf("0000:00:05.0")));

        let units = q35().iommu_units().unwrap();
        assert_eq!(units.len(), 1);
        let u = &units[0];
        assert_eq!(u.name, "dmar0");
        assert_eq!(u.kind, "intel-iommu");
        assert_eq!(u.address, Some(0xfed90000));
        assert_eq!(u.version.as_deref(), Some("1:0"));
        let e = u.decoded.unwrap();
        assert!(e.qi && e.dt && e.ir && e.pt);
        assert!(!e.smts && !e.pasid);
        assert_eq!(u.caching_mode, Some(true));
    }

    #[test]
    fn ecap_bits_match_the_kernel_macros() {
        // ecap_qis: bit 1, ecap_dev_iotlb_support: bit 2, ecap_smts: bit 43.
        assert!(Ecap::decode(1 << 1).qi);
        assert!(Ecap::decode(1 << 2).dt);
        assert!(Ecap::decode(1 << 43).smts);
        assert!(!Ecap::decode(1 << 43).qi);
        // A real scalable-mode server unit (Sapphire Rapids dmesg: ecap 3ee9e86f050df).
        let e = Ecap::decode(0x3ee9e86f050df);
        assert!(e.qi && e.dt && e.smts);
    }

    fn config_with_ats(ctrl: u16) -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        c[6] = 0x10;
        c[0x34] = 0x40;
        c[0x40] = PCI_CAP_ID_EXP;
        // A dummy extended cap, then ATS at 0x200.
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | (1 << 16) | (0x200 << 20)).to_le_bytes());
        c[0x200..0x204].copy_from_slice(&(0x000fu32 | (1 << 16)).to_le_bytes());
        c[0x206..0x208].copy_from_slice(&ctrl.to_le_bytes());
        c
    }

    #[test]
    fn a_device_gone_from_the_bus_has_unknown_ats_not_absent() {
        // Regression: after a surprise removal the device stays in sysfs for a moment and its
        // config space reads all ones; that is not "no ATS capability".
        let gone = vec![0xffu8; 4096];
        assert!(matches!(ats_from_config(&gone), AtsState::Unknown(w) if w.contains("answer")));
    }

    #[test]
    fn ats_from_config_space() {
        assert_eq!(ats_from_config(&config_with_ats(0x8000)), AtsState::Enabled);
        assert_eq!(
            ats_from_config(&config_with_ats(0x001f)),
            AtsState::Disabled
        );
        let full = config_with_ats(0x8000);
        // Not root: 64 bytes.
        let s = ats_from_config(&full[..64]);
        assert!(
            matches!(&s, AtsState::Unknown(w) if w.contains("root")),
            "{s:?}"
        );
        assert_eq!(s.as_option(), None);
        // PCIe but only 256 bytes readable.
        assert!(matches!(
            ats_from_config(&full[..256]),
            AtsState::Unknown(_)
        ));
        // Looping or garbage lists end.
        let mut looped = config_with_ats(0x8000);
        looped[0x100..0x104].copy_from_slice(&(0x0001u32 | (0x100 << 20)).to_le_bytes());
        assert_eq!(ats_from_config(&looped), AtsState::Absent);
        // Garbage after a valid vendor ID (an all-ones vendor ID means the device is gone:
        // see a_device_gone_from_the_bus_has_unknown_ats_not_absent).
        let mut ff = vec![0xffu8; 4096];
        ff[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        ff[0x34] = 0;
        assert_eq!(ats_from_config(&ff), AtsState::Absent);
    }

    #[test]
    fn unprivileged_config_reads_give_unknown_ats() {
        let tmp = tempfile::tempdir().unwrap();
        copy_tree(&fixture("sysfs-qemu-q35"), tmp.path());
        let cfg = tmp
            .path()
            .join("sys/devices/pci0000:00/0000:00:04.0/0000:01:00.0/config");
        let bytes = fs::read(&cfg).unwrap();
        fs::write(&cfg, &bytes[..64]).unwrap();
        let devs = Sysfs::new(tmp.path()).device_infos(KTime(0)).unwrap();
        let d = devs.iter().find(|d| d.bdf == bdf("0000:01:00.0")).unwrap();
        assert_eq!(d.ats, None);
    }

    #[test]
    fn no_sysfs_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Sysfs::new(tmp.path());
        let e = s.pci_devices(KTime(0)).unwrap_err();
        assert!(e.to_string().contains("not mounted"), "{e}");
        assert!(s.iommu_units().unwrap().is_empty());
        assert!(s.slots().unwrap().is_empty());
    }

    #[test]
    fn inventory_keeps_removed_devices() {
        let tmp = tempfile::tempdir().unwrap();
        copy_tree(&fixture("sysfs-qemu-q35"), tmp.path());
        let s = Sysfs::new(tmp.path());
        let mut inv = DeviceInventory::snapshot(&s, KTime(1)).unwrap();
        assert_eq!(inv.len(), 6);
        // Surprise removal of the card in slot 1.
        fs::remove_file(tmp.path().join("sys/bus/pci/devices/0000:01:00.0")).unwrap();
        let ch = inv.refresh(&s, KTime(2)).unwrap();
        assert_eq!(ch.gone, [bdf("0000:01:00.0")]);
        assert!(ch.added.is_empty());
        let k = inv.by_sid(Some(0), Sid(0x0100)).unwrap();
        assert!(!k.present);
        assert_eq!(k.info.vendor, 0x1af4);
        assert_eq!(k.info.slot.as_deref(), Some("1"));
        assert_eq!(k.info.seen, KTime(1), "last time it was seen");
        assert_eq!(inv.len(), 6, "never drops");
        // By SID with the segment unknown.
        assert_eq!(
            inv.by_sid(None, Sid(0x0200)).unwrap().info.bdf,
            bdf("0000:02:00.0")
        );
        let unknown_seg = Bdf::from_sid(None, Sid(0x0100));
        assert_eq!(
            inv.by_bdf(unknown_seg).unwrap().info.bdf,
            bdf("0000:01:00.0")
        );
        assert!(inv.by_sid(Some(1), Sid(0x0100)).is_none());
    }

    #[test]
    fn merge_tracks_returns_and_swaps() {
        let dev = |b: &str, device: u16, t: u64| DeviceInfo {
            bdf: bdf(b),
            vendor: 0x8086,
            device,
            driver: None,
            slot: None,
            port: None,
            ats: None,
            iommu: None,
            seen: KTime(t),
        };
        let mut inv = DeviceInventory::new();
        inv.merge(vec![dev("0000:01:00.0", 1, 1), dev("0001:01:00.0", 2, 1)]);
        let ch = inv.merge(vec![dev("0001:01:00.0", 2, 2)]);
        assert_eq!(ch.gone, [bdf("0000:01:00.0")]);
        let ch = inv.merge(vec![dev("0000:01:00.0", 9, 3), dev("0001:01:00.0", 2, 3)]);
        assert_eq!(ch.added, [bdf("0000:01:00.0")]);
        assert_eq!(ch.replaced, [bdf("0000:01:00.0")]);
        // Same SID in two segments: an unknown segment prefers segment 0.
        assert_eq!(inv.by_sid(None, Sid(0x0100)).unwrap().info.device, 9);
        assert_eq!(inv.by_sid(Some(1), Sid(0x0100)).unwrap().info.device, 2);
    }

    #[test]
    fn host_sysfs_does_not_fail() {
        // Whatever this host has (possibly no PCI at all), reading it must not panic.
        let s = Sysfs::live();
        let _ = s.pci_devices(monotonic_now());
        let _ = s.iommu_units();
        let _ = s.slots();
        assert!(monotonic_now().0 > 0);
    }

    proptest::proptest! {
        /// Arbitrary config space bytes (any length, any capability chain) never panic or
        /// loop.
        #[test]
        fn ats_decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4200)) {
            let _ = ats_from_config(&bytes);
        }

        #[test]
        fn ats_decoder_on_mutated_chains(ptrs in proptest::collection::vec(0u32..4096, 1..20), ctrl: u16) {
            let mut c = config_with_ats(ctrl);
            for (i, p) in ptrs.iter().enumerate() {
                let off = 0x100 + (i * 4) % 0xe00;
                c[off..off + 4].copy_from_slice(&(0x0001u32 | (p << 20)).to_le_bytes());
            }
            let _ = ats_from_config(&c);
        }
    }
}
