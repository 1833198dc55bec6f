//! Struct member offsets and symbol presence from the running kernel's BTF.
//!
//! The BPF programs read kernel structs at byte offsets that userspace resolves here, at load
//! time, from `/sys/kernel/btf/vmlinux` (or a given file), and hands over in
//! [`itewatch_common::Offsets`]. Nothing is taken from a header of one kernel version.
//!
//! Every field is resolved on its own: a struct this kernel does not have (no VT-d, no pciehp
//! built in) or a member of an unexpected width leaves that one field at [`OFFSET_NONE`] and
//! yields an [`OffsetNote`] saying why; the BPF side then skips that read. Only a missing or
//! unreadable BTF file is an error for the whole resolution ([`BtfError::Missing`] /
//! [`BtfError::Read`]): the tool then runs degraded.
//!
//! Widths are checked against what the BPF side reads (`itewatch-ebpf`: `read_at::<T>`), so a
//! kernel whose layout changed gives a clear "is X, expected Y" instead of a wrong read.

use std::fmt;
use std::path::{Path, PathBuf};

use btf_rs::{Btf, BtfType, Struct, Type};
use itewatch_common::{Offsets, OFFSET_NONE};

/// Where the running kernel exposes its own BTF (CONFIG_DEBUG_INFO_BTF, 5.4+).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Errors of the BTF area.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// No BTF file: the kernel lacks CONFIG_DEBUG_INFO_BTF or sysfs is not mounted.
    #[error(
        "no kernel BTF at {}: kernel built without CONFIG_DEBUG_INFO_BTF, or sysfs not mounted; \
         struct offsets are unavailable (degraded mode)",
        path.display()
    )]
    Missing { path: PathBuf },
    /// The file is there but could not be read or parsed.
    #[error("cannot read kernel BTF at {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    /// A lookup inside an already parsed BTF failed (corrupt type graph).
    #[error("BTF lookup of {what} failed")]
    Lookup {
        what: String,
        #[source]
        source: btf_rs::Error,
    },
    /// No struct of that name (with the identifying members, if any were required).
    #[error("struct {name} is not in this kernel's BTF{}", required_note(.required))]
    NoStruct { name: String, required: Vec<String> },
    /// The struct has no such member (nested path components separated by dots).
    #[error("struct {strukt} has no member {path}")]
    NoMember { strukt: String, path: String },
    /// A path component that is not the last one is not a struct or union.
    #[error("{strukt}.{path}: {component} is a {found}, not a struct or union")]
    NotAggregate {
        strukt: String,
        path: String,
        component: String,
        found: String,
    },
    /// The member is a bitfield or not byte aligned: it cannot be read at a byte offset.
    #[error("{field} is a bitfield or not byte aligned (bit offset {bit_offset})")]
    NotByteAligned { field: String, bit_offset: u32 },
    /// The member's type is not what the BPF side reads.
    #[error("{field} is {found}, but the BPF side reads {expected}")]
    Shape {
        field: String,
        expected: String,
        found: String,
    },
}

fn required_note(required: &[String]) -> String {
    if required.is_empty() {
        String::new()
    } else {
        format!(" (looked for one with members {})", required.join(", "))
    }
}

/// Opens the kernel BTF: `path`, or [`VMLINUX_BTF`] when `None`.
pub fn load(path: Option<&Path>) -> Result<Btf, BtfError> {
    let path = path.unwrap_or(Path::new(VMLINUX_BTF));
    if !path.exists() {
        return Err(BtfError::Missing {
            path: path.to_path_buf(),
        });
    }
    if let Some(btf) = mapped_copy(path) {
        return Ok(btf);
    }
    Btf::from_file(path).map_err(|source| BtfError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The BTF file copied into an anonymous memory file and mapped, for btf-rs's mmap backend:
/// it keeps an index of type offsets (about 1 MB) and decodes a type when asked, where the
/// default backend decodes and keeps every type (about 40 MB for a 5 MB vmlinux BTF, most of
/// a live process's start-up under TCG). A copy, not the file itself: sysfs's BTF cannot be
/// mapped before 6.16, and a file someone truncates under a mapping would kill the process
/// (SIGBUS). `None` when any step fails; the caller then parses the file the default way.
fn mapped_copy(path: &Path) -> Option<Btf> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut src = std::fs::File::open(path).ok()?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; a valid fd or -1 comes back.
    let fd = unsafe { libc::memfd_create(c"itewatch-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let mut copy = unsafe { std::fs::File::from_raw_fd(fd) };
    std::io::copy(&mut src, &mut copy).ok()?;
    // The mapping keeps the memory file alive after `copy` is closed.
    let proc_path = PathBuf::from(format!("/proc/self/fd/{}", copy.as_raw_fd()));
    Btf::from_file_with_backend(&proc_path, btf_rs::Backend::Mmap).ok()
}

/// The type of a member, as far as the checks need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    Int { size: u32, signed: bool, char: bool },
    Enum { size: u32 },
    Ptr,
    Array { elem: Box<Shape>, len: u32 },
    Struct { name: String, size: u32 },
    Union { name: String, size: u32 },
    Other(&'static str),
}

impl Shape {
    /// Size in bytes (pointers are 8: x86_64 is the only target).
    pub fn size(&self) -> Option<u32> {
        match self {
            Shape::Int { size, .. } | Shape::Enum { size } => Some(*size),
            Shape::Ptr => Some(8),
            Shape::Array { elem, len } => elem.size().map(|s| s * len),
            Shape::Struct { size, .. } | Shape::Union { size, .. } => Some(*size),
            Shape::Other(_) => None,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Int {
                size,
                signed,
                char: true,
            } => write!(
                f,
                "a {size}-byte {} char",
                if *signed { "signed" } else { "unsigned" }
            ),
            Shape::Int { size, signed, .. } => {
                write!(
                    f,
                    "a {size}-byte {} integer",
                    if *signed { "signed" } else { "unsigned" }
                )
            }
            Shape::Enum { size } => write!(f, "a {size}-byte enum"),
            Shape::Ptr => f.write_str("a pointer"),
            Shape::Array { elem, len } => write!(f, "an array [{len}] of {elem}"),
            Shape::Struct { name, size } => write!(f, "struct {name} ({size} bytes)"),
            Shape::Union { name, size } => write!(f, "union {name} ({size} bytes)"),
            Shape::Other(k) => write!(f, "a {k}"),
        }
    }
}

/// A member found by [`member_offset`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub offset_bytes: u32,
    pub shape: Shape,
}

/// What the BPF side reads at an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// An unsigned integer of this many bytes.
    Unsigned(u32),
    /// An integer (either signedness) or enum of this many bytes.
    Int(u32),
    /// A pointer.
    Ptr,
    /// A `char` array with a length in this range (inclusive).
    CharArray { min: u32, max: u32 },
    /// An embedded struct of this name (its offset is used, not read).
    Struct(&'static str),
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Unsigned(n) => write!(f, "a {n}-byte unsigned integer"),
            Expect::Int(n) => write!(f, "a {n}-byte integer"),
            Expect::Ptr => f.write_str("a pointer"),
            Expect::CharArray { min, max } if min == max => write!(f, "a char[{max}]"),
            Expect::CharArray { min, max } => write!(f, "a char[{min}..={max}]"),
            Expect::Struct(n) => write!(f, "an embedded struct {n}"),
        }
    }
}

impl Expect {
    fn accepts(&self, s: &Shape) -> bool {
        match (self, s) {
            (
                Expect::Unsigned(n),
                Shape::Int {
                    size,
                    signed: false,
                    ..
                },
            ) => size == n,
            (Expect::Int(n), Shape::Int { size, .. } | Shape::Enum { size }) => size == n,
            (Expect::Ptr, Shape::Ptr) => true,
            (Expect::CharArray { min, max }, Shape::Array { elem, len }) => {
                matches!(**elem, Shape::Int { size: 1, .. }) && (*min..=*max).contains(len)
            }
            (Expect::Struct(n), Shape::Struct { name, .. }) => name == n,
            _ => false,
        }
    }
}

fn lookup_err(what: impl Into<String>) -> impl FnOnce(btf_rs::Error) -> BtfError {
    let what = what.into();
    move |source| BtfError::Lookup { what, source }
}

fn name_of(btf: &Btf, t: &dyn BtfType) -> String {
    // Anonymous types and members have name offset 0 ("") or none at all.
    btf.resolve_name(t).unwrap_or_default()
}

/// Follows typedef / const / volatile / restrict / type tags down to the real type.
fn strip(btf: &Btf, mut t: Type) -> Result<Type, BtfError> {
    for _ in 0..32 {
        t = match &t {
            Type::Typedef(x) => btf.resolve_chained_type(x),
            Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => btf.resolve_chained_type(x),
            Type::TypeTag(x) => btf.resolve_chained_type(x),
            _ => return Ok(t),
        }
        .map_err(lookup_err("a typedef/qualifier chain"))?;
    }
    Ok(Type::Void)
}

fn shape_of(btf: &Btf, t: Type, depth: u32) -> Result<Shape, BtfError> {
    let t = strip(btf, t)?;
    Ok(match &t {
        Type::Int(i) => Shape::Int {
            size: i.size() as u32,
            signed: i.is_signed(),
            char: i.is_char() || (i.size() == 1 && name_of(btf, i).contains("char")),
        },
        Type::Enum(e) => Shape::Enum {
            size: e.size() as u32,
        },
        Type::Enum64(e) => Shape::Enum {
            size: e.size() as u32,
        },
        Type::Ptr(_) => Shape::Ptr,
        Type::Array(a) if depth < 4 => {
            let elem = btf
                .resolve_chained_type(a)
                .map_err(lookup_err("an array element type"))?;
            Shape::Array {
                elem: Box::new(shape_of(btf, elem, depth + 1)?),
                len: a.len() as u32,
            }
        }
        Type::Struct(s) => Shape::Struct {
            name: name_of(btf, s),
            size: s.size() as u32,
        },
        Type::Union(s) => Shape::Union {
            name: name_of(btf, s),
            size: s.size() as u32,
        },
        other => Shape::Other(other.name()),
    })
}

/// All structs named `name` whose every member path in `required` resolves.
fn structs_named(btf: &Btf, name: &str, required: &[&str]) -> Result<Vec<Struct>, BtfError> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(lookup_err(format!("struct {name}")))?;
    let mut out = Vec::new();
    for t in types {
        if let Type::Struct(s) = t {
            if required
                .iter()
                .all(|p| find_path(btf, name, &s, p).is_ok_and(|m| m.is_some()))
            {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// Picks the struct `name` that has all `required` members (BTF can hold several structs of
/// one name: `controller` is pciehp's and others'), or says why there is none.
pub fn find_struct(btf: &Btf, name: &str, required: &[&str]) -> Result<Struct, BtfError> {
    structs_named(btf, name, required)?
        .into_iter()
        .next()
        .ok_or_else(|| BtfError::NoStruct {
            name: name.to_string(),
            required: required.iter().map(|s| s.to_string()).collect(),
        })
}

/// Looks for `member` in `s`, descending into anonymous struct/union members. Returns the
/// member's type and absolute bit offset from the start of `s`.
fn find_member_in(
    btf: &Btf,
    s: &Struct,
    member: &str,
    depth: u32,
) -> Result<Option<(Type, u32, bool)>, BtfError> {
    for m in &s.members {
        let mname = name_of(btf, m);
        let bitfield = m.bitfield_size().is_some_and(|b| b != 0);
        if mname == member {
            let t = btf
                .resolve_chained_type(m)
                .map_err(lookup_err(format!("member {member}")))?;
            return Ok(Some((t, m.bit_offset(), bitfield)));
        }
        if mname.is_empty() && depth < 8 {
            let t = strip(
                btf,
                btf.resolve_chained_type(m)
                    .map_err(lookup_err("an anonymous member"))?,
            )?;
            if let Type::Struct(inner) | Type::Union(inner) = &t {
                if let Some((t, off, bf)) = find_member_in(btf, inner, member, depth + 1)? {
                    return Ok(Some((t, m.bit_offset() + off, bf)));
                }
            }
        }
    }
    Ok(None)
}

/// Resolves a dotted member path (`busn_res.start`) inside `s`; `None` when a component is
/// missing.
fn find_path(
    btf: &Btf,
    sname: &str,
    s: &Struct,
    path: &str,
) -> Result<Option<(Type, u32, bool)>, BtfError> {
    let mut cur = s.clone();
    let mut bits = 0u32;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Some((t, off, bitfield)) = find_member_in(btf, &cur, part, 0)? else {
            return Ok(None);
        };
        bits += off;
        if i + 1 == parts.len() {
            return Ok(Some((t, bits, bitfield)));
        }
        match strip(btf, t)? {
            Type::Struct(next) | Type::Union(next) => cur = next,
            other => {
                return Err(BtfError::NotAggregate {
                    strukt: sname.to_string(),
                    path: path.to_string(),
                    component: part.to_string(),
                    found: other.name().to_string(),
                })
            }
        }
    }
    Ok(None)
}

/// Byte offset and type of `path` (dotted, anonymous members transparent) in struct `strukt`.
/// `required` picks among several structs of the same name (see [`find_struct`]).
pub fn member_offset(
    btf: &Btf,
    strukt: &str,
    required: &[&str],
    path: &str,
) -> Result<MemberInfo, BtfError> {
    let candidates = structs_named(btf, strukt, required)?;
    if candidates.is_empty() {
        return Err(BtfError::NoStruct {
            name: strukt.to_string(),
            required: required.iter().map(|s| s.to_string()).collect(),
        });
    }
    let field = format!("{strukt}.{path}");
    // The first struct of that name that has the member (duplicates of a name are rare;
    // `required` disambiguates the known ones).
    let mut found = None;
    let mut first_err = None;
    for s in &candidates {
        match find_path(btf, strukt, s, path) {
            Ok(Some(hit)) => {
                found = Some(hit);
                break;
            }
            Ok(None) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let Some((t, bits, bitfield)) = found else {
        return Err(first_err.unwrap_or_else(|| BtfError::NoMember {
            strukt: strukt.to_string(),
            path: path.to_string(),
        }));
    };
    if bitfield || bits % 8 != 0 {
        return Err(BtfError::NotByteAligned {
            field,
            bit_offset: bits,
        });
    }
    Ok(MemberInfo {
        offset_bytes: bits / 8,
        shape: shape_of(btf, t, 0)?,
    })
}

/// [`member_offset`] plus a check that the member is what the BPF side reads.
pub fn checked_offset(
    btf: &Btf,
    strukt: &str,
    required: &[&str],
    path: &str,
    expect: Expect,
) -> Result<MemberInfo, BtfError> {
    let m = member_offset(btf, strukt, required, path)?;
    if !expect.accepts(&m.shape) {
        return Err(BtfError::Shape {
            field: format!("{strukt}.{path}"),
            expected: expect.to_string(),
            found: m.shape.to_string(),
        });
    }
    Ok(m)
}

/// How a field of [`Offsets`] came out, when it did not simply resolve.
#[derive(Debug)]
pub struct OffsetNote {
    /// `struct.member` path, e.g. `pci_bus.busn_res.start`.
    pub field: &'static str,
    /// The kernel may legitimately lack it (e.g. `pci_bus.domain_nr` without
    /// CONFIG_PCI_DOMAINS_GENERIC); its absence is not a problem.
    pub optional: bool,
    /// The field was resolved but something about it is worth saying (e.g. a `char[13]`
    /// name on an older kernel); `None` when the field is unavailable.
    pub resolved_offset: Option<u32>,
    pub reason: BtfError,
}

impl OffsetNote {
    /// The field is at `OFFSET_NONE`: the BPF side will not read it.
    pub fn unavailable(&self) -> bool {
        self.resolved_offset.is_none()
    }
}

impl fmt::Display for OffsetNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.resolved_offset, self.optional) {
            (Some(off), _) => write!(f, "{} at {off}: {}", self.field, self.reason),
            (None, true) => write!(f, "{} absent (optional): {}", self.field, self.reason),
            (None, false) => write!(f, "{} unavailable: {}", self.field, self.reason),
        }
    }
}

/// One field of [`Offsets`]: where it lives and what the BPF side reads there.
struct FieldSpec {
    field: &'static str,
    strukt: &'static str,
    /// Members that identify the right struct among several of the same name.
    required: &'static [&'static str],
    path: &'static str,
    expect: Expect,
    optional: bool,
    set: fn(&mut Offsets, u32),
}

const CONTROLLER_ID: &[&str] = &["pcie", "slot_cap"];

const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        field: "intel_iommu.name",
        strukt: "intel_iommu",
        required: &[],
        path: "name",
        // 16 since the "dmar%d" overflow fix; older kernels (pre ~6.7) had char[13]. The
        // BPF side reads 16 bytes and stops at the NUL, which snprintf always writes.
        expect: Expect::CharArray { min: 13, max: 16 },
        optional: false,
        set: |o, v| o.intel_iommu_name = v,
    },
    FieldSpec {
        field: "intel_iommu.segment",
        strukt: "intel_iommu",
        required: &[],
        path: "segment",
        expect: Expect::Unsigned(2),
        optional: true,
        set: |o, v| o.intel_iommu_segment = v,
    },
    FieldSpec {
        field: "pci_dev.bus",
        strukt: "pci_dev",
        required: &[],
        path: "bus",
        expect: Expect::Ptr,
        optional: false,
        set: |o, v| o.pci_dev_bus = v,
    },
    FieldSpec {
        field: "pci_dev.devfn",
        strukt: "pci_dev",
        required: &[],
        path: "devfn",
        expect: Expect::Unsigned(4),
        optional: false,
        set: |o, v| o.pci_dev_devfn = v,
    },
    FieldSpec {
        field: "pci_dev.vendor",
        strukt: "pci_dev",
        required: &[],
        path: "vendor",
        expect: Expect::Unsigned(2),
        optional: false,
        set: |o, v| o.pci_dev_vendor = v,
    },
    FieldSpec {
        field: "pci_dev.device",
        strukt: "pci_dev",
        required: &[],
        path: "device",
        expect: Expect::Unsigned(2),
        optional: false,
        set: |o, v| o.pci_dev_device = v,
    },
    FieldSpec {
        field: "pci_dev.subordinate",
        strukt: "pci_dev",
        required: &[],
        path: "subordinate",
        expect: Expect::Ptr,
        optional: false,
        set: |o, v| o.pci_dev_subordinate = v,
    },
    FieldSpec {
        field: "pci_dev.dev",
        strukt: "pci_dev",
        required: &[],
        path: "dev",
        expect: Expect::Struct("device"),
        optional: false,
        set: |o, v| o.pci_dev_dev = v,
    },
    FieldSpec {
        field: "pci_bus.number",
        strukt: "pci_bus",
        required: &[],
        path: "number",
        expect: Expect::Unsigned(1),
        optional: false,
        set: |o, v| o.pci_bus_number = v,
    },
    FieldSpec {
        field: "pci_bus.busn_res.start",
        strukt: "pci_bus",
        required: &[],
        path: "busn_res.start",
        expect: Expect::Unsigned(8),
        optional: false,
        set: |o, v| o.pci_bus_busn_start = v,
    },
    FieldSpec {
        field: "pci_bus.busn_res.end",
        strukt: "pci_bus",
        required: &[],
        path: "busn_res.end",
        expect: Expect::Unsigned(8),
        optional: false,
        set: |o, v| o.pci_bus_busn_end = v,
    },
    FieldSpec {
        field: "pci_bus.domain_nr",
        strukt: "pci_bus",
        required: &[],
        path: "domain_nr",
        expect: Expect::Int(4),
        optional: true,
        set: |o, v| o.pci_bus_domain_nr = v,
    },
    FieldSpec {
        field: "pci_bus.sysdata",
        strukt: "pci_bus",
        required: &[],
        path: "sysdata",
        expect: Expect::Ptr,
        optional: false,
        set: |o, v| o.pci_bus_sysdata = v,
    },
    FieldSpec {
        field: "pci_sysdata.domain",
        strukt: "pci_sysdata",
        required: &[],
        path: "domain",
        expect: Expect::Int(4),
        optional: true,
        set: |o, v| o.pci_sysdata_domain = v,
    },
    FieldSpec {
        field: "controller.pcie",
        strukt: "controller",
        required: CONTROLLER_ID,
        path: "pcie",
        expect: Expect::Ptr,
        optional: false,
        set: |o, v| o.controller_pcie = v,
    },
    FieldSpec {
        field: "pcie_device.port",
        strukt: "pcie_device",
        required: &[],
        path: "port",
        expect: Expect::Ptr,
        optional: false,
        set: |o, v| o.pcie_device_port = v,
    },
    FieldSpec {
        field: "device.bus",
        strukt: "device",
        required: &[],
        path: "bus",
        expect: Expect::Ptr,
        optional: false,
        set: |o, v| o.device_bus = v,
    },
];

/// Fills every field of [`Offsets`] from `btf`. A field that cannot be resolved, or whose type
/// is not what the BPF side reads, stays at [`OFFSET_NONE`] and gets an [`OffsetNote`];
/// fields that resolved with a remark get a note too (with `resolved_offset` set).
pub fn resolve_offsets(btf: &Btf) -> (Offsets, Vec<OffsetNote>) {
    let mut offsets = Offsets::NONE;
    let mut notes = Vec::new();
    for spec in FIELDS {
        match checked_offset(btf, spec.strukt, spec.required, spec.path, spec.expect) {
            Ok(m) => {
                (spec.set)(&mut offsets, m.offset_bytes);
                if let Shape::Array { len, .. } = m.shape {
                    if matches!(spec.expect, Expect::CharArray { max, .. } if len < max) {
                        notes.push(OffsetNote {
                            field: spec.field,
                            optional: spec.optional,
                            resolved_offset: Some(m.offset_bytes),
                            reason: BtfError::Shape {
                                field: spec.field.to_string(),
                                expected: spec.expect.to_string(),
                                found: format!("{} (older layout; read stops at the NUL)", m.shape),
                            },
                        });
                    }
                }
            }
            Err(reason) => {
                (spec.set)(&mut offsets, OFFSET_NONE);
                notes.push(OffsetNote {
                    field: spec.field,
                    optional: spec.optional,
                    resolved_offset: None,
                    reason,
                })
            }
        }
    }
    (offsets, notes)
}

/// The names of all fields [`resolve_offsets`] fills, in order.
pub fn offset_fields() -> impl Iterator<Item = &'static str> {
    FIELDS.iter().map(|f| f.field)
}

/// Whether BTF has a function (`BTF_KIND_FUNC`) of this name. BTF lists functions that exist
/// out of line in the image (not fully inlined ones), so presence is evidence that a change
/// adding the function is in this kernel; absence only says it is not in *this* BTF (a module's
/// functions live in the module's split BTF).
pub fn has_function(btf: &Btf, name: &str) -> bool {
    btf.resolve_types_by_name(name)
        .is_ok_and(|ts| ts.iter().any(|t| matches!(t, Type::Func(_))))
}

/// Whether BTF has a named type of this kind: `"struct"`, `"union"`, `"enum"`, `"typedef"`,
/// or any type at all with `kind == None`.
pub fn has_type(btf: &Btf, name: &str, kind: Option<&str>) -> bool {
    btf.resolve_types_by_name(name).is_ok_and(|ts| {
        ts.iter().any(|t| match kind {
            None => !matches!(t, Type::Func(_) | Type::Var(_)),
            Some(k) => t.name() == k || (k == "enum" && matches!(t, Type::Enum64(_))),
        })
    })
}

/// Whether struct `strukt` (the first of that name) has a member at the dotted `path`.
pub fn has_member(btf: &Btf, strukt: &str, path: &str) -> bool {
    member_offset(btf, strukt, &[], path).is_ok()
}

#[cfg(test)]
pub(crate) mod testbtf {
    //! A tiny BTF encoder, enough to build deterministic test blobs (little endian, v1).

    /// Builds a BTF blob type by type; ids start at 1 in the order added.
    #[derive(Default)]
    pub struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    pub struct M<'a> {
        pub name: &'a str,
        pub ty: u32,
        pub bit_offset: u32,
        /// Bitfield size (sets kind_flag on the struct when any member has one).
        pub bits: u32,
    }

    pub fn m(name: &str, ty: u32, byte_offset: u32) -> M<'_> {
        M {
            name,
            ty,
            bit_offset: byte_offset * 8,
            bits: 0,
        }
    }

    impl Builder {
        pub fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }
        fn s(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn u32(&mut self, v: u32) {
            self.types.extend_from_slice(&v.to_le_bytes());
        }
        fn head(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size_type: u32) -> u32 {
            let n = self.s(name);
            self.u32(n);
            self.u32((vlen & 0xffff) | (kind << 24) | if kflag { 1 << 31 } else { 0 });
            self.u32(size_type);
            let id = self.next_id;
            self.next_id += 1;
            id
        }
        pub fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
            let char = name.contains("char");
            let id = self.head(name, 1, 0, false, size);
            let enc = (signed as u32) | if char { 2 } else { 0 };
            self.u32((enc << 24) | (size * 8));
            id
        }
        pub fn ptr(&mut self, to: u32) -> u32 {
            self.head("", 2, 0, false, to)
        }
        pub fn array(&mut self, elem: u32, index: u32, len: u32) -> u32 {
            let id = self.head("", 3, 0, false, 0);
            self.u32(elem);
            self.u32(index);
            self.u32(len);
            id
        }
        fn aggregate(&mut self, kind: u32, name: &str, size: u32, members: &[M]) -> u32 {
            let kflag = members.iter().any(|m| m.bits != 0);
            let id = self.head(name, kind, members.len() as u32, kflag, size);
            for mm in members {
                let n = self.s(mm.name);
                self.u32(n);
                self.u32(mm.ty);
                let off = if kflag {
                    (mm.bits << 24) | mm.bit_offset
                } else {
                    mm.bit_offset
                };
                self.u32(off);
            }
            id
        }
        pub fn strukt(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.aggregate(4, name, size, members)
        }
        pub fn union(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.aggregate(5, name, size, members)
        }
        pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.head(name, 8, 0, false, to)
        }
        pub fn func(&mut self, name: &str) -> u32 {
            let proto = self.head("", 13, 0, false, 0);
            self.head(name, 12, 1, false, proto)
        }
        /// Reserves the id a later type will get (for forward references).
        pub fn next(&self) -> u32 {
            self.next_id
        }
        pub fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            out.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
            out.extend_from_slice(&0u32.to_le_bytes()); // type_off
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes()); // str_off
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A kernel-like BTF with everything [`super::resolve_offsets`] needs, including the
    /// awkward cases: a second `struct controller` without `slot_cap` listed first, `busn_res`
    /// reached through a typedef'd struct, `devfn` inside an anonymous union, `segment` in an
    /// anonymous struct.
    pub fn kernel_like() -> Vec<u8> {
        let mut b = Builder::new();
        let u8_ = b.int("unsigned char", 1, false);
        let u16_ = b.int("short unsigned int", 2, false);
        let u32_ = b.int("unsigned int", 4, false);
        let int_ = b.int("int", 4, true);
        let u64_ = b.int("long long unsigned int", 8, false);
        let void_ptr = b.ptr(0);
        let idx = u32_;
        let name16 = b.array(u8_, idx, 16);
        let rsz = b.typedef("resource_size_t", u64_);
        let resource = b.strukt(
            "resource",
            32,
            &[
                m("start", rsz, 0),
                m("end", rsz, 8),
                m("name", void_ptr, 16),
            ],
        );
        let bus_type = b.strukt("bus_type", 8, &[m("name", void_ptr, 0)]);
        let bus_type_ptr = b.ptr(bus_type);
        let device = b.strukt(
            "device",
            64,
            &[m("parent", void_ptr, 0), m("bus", bus_type_ptr, 40)],
        );
        // Forward ids: pci_bus is defined after pci_dev.
        let pci_bus_ptr = b.ptr(b.next() + 3);
        let anon_devfn = b.union("", 4, &[m("devfn", u32_, 0), m("raw", u32_, 0)]);
        let pci_dev = b.strukt(
            "pci_dev",
            256,
            &[
                m("bus_list", void_ptr, 0),
                m("bus", pci_bus_ptr, 16),
                m("subordinate", pci_bus_ptr, 24),
                m("sysdata", void_ptr, 32),
                m("", anon_devfn, 56),
                m("vendor", u16_, 60),
                m("device", u16_, 62),
                m("dev", device, 128),
            ],
        );
        let pci_bus = b.strukt(
            "pci_bus",
            200,
            &[
                m("parent", void_ptr, 0),
                m("self", void_ptr, 8),
                m("sysdata", void_ptr, 96),
                m("busn_res", resource, 104),
                m("number", u8_, 136),
                m("primary", u8_, 137),
                m("domain_nr", int_, 160),
            ],
        );
        assert_eq!(pci_bus_ptr + 3, pci_bus);
        let _ = pci_dev;
        b.strukt(
            "pci_sysdata",
            16,
            &[m("domain", int_, 0), m("node", int_, 4)],
        );
        let anon_seg = b.strukt("", 4, &[m("segment", u16_, 0), m("pad", u16_, 2)]);
        b.strukt(
            "intel_iommu",
            128,
            &[
                m("reg", void_ptr, 0),
                m("cap", u64_, 16),
                m("ecap", u64_, 24),
                m("", anon_seg, 60),
                m("name", name16, 64),
            ],
        );
        // An unrelated `struct controller` first, as in real kernels (e.g. sound drivers).
        b.strukt("controller", 16, &[m("pcie", u32_, 0), m("x", u32_, 4)]);
        let pcie_device = b.strukt(
            "pcie_device",
            32,
            &[m("irq", int_, 0), m("port", void_ptr, 8)],
        );
        let pcie_device_ptr = b.ptr(pcie_device);
        b.strukt(
            "controller",
            64,
            &[m("pcie", pcie_device_ptr, 0), m("slot_cap", u32_, 8)],
        );
        b.func("device_rbtree_find");
        b.func("qi_submit_sync");
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::testbtf::{kernel_like, m, Builder, M};
    use super::*;

    fn parse(blob: &[u8]) -> Btf {
        Btf::from_bytes(blob).expect("test BTF parses")
    }

    #[test]
    fn resolves_every_field_of_a_kernel_like_btf() {
        let btf = parse(&kernel_like());
        let (o, notes) = resolve_offsets(&btf);
        assert!(notes.is_empty(), "unexpected notes: {notes:#?}");
        assert_eq!(o.intel_iommu_name, 64);
        assert_eq!(o.intel_iommu_segment, 60, "anonymous struct member");
        assert_eq!(o.pci_dev_bus, 16);
        assert_eq!(o.pci_dev_devfn, 56, "anonymous union member");
        assert_eq!(o.pci_dev_vendor, 60);
        assert_eq!(o.pci_dev_device, 62);
        assert_eq!(o.pci_dev_subordinate, 24);
        assert_eq!(o.pci_dev_dev, 128);
        assert_eq!(o.pci_bus_number, 136);
        assert_eq!(o.pci_bus_busn_start, 104, "nested path through a struct");
        assert_eq!(o.pci_bus_busn_end, 112);
        assert_eq!(o.pci_bus_domain_nr, 160);
        assert_eq!(o.pci_bus_sysdata, 96);
        assert_eq!(o.pci_sysdata_domain, 0);
        assert_eq!(o.controller_pcie, 0, "the controller with slot_cap");
        assert_eq!(o.pcie_device_port, 8);
        assert_eq!(o.device_bus, 40);
    }

    #[test]
    fn picks_the_controller_with_pcie_and_slot_cap() {
        let btf = parse(&kernel_like());
        let m = checked_offset(&btf, "controller", CONTROLLER_ID, "pcie", Expect::Ptr).unwrap();
        assert_eq!(m.shape, Shape::Ptr);
        // Without the identifying members the first (wrong) one is taken, and the width
        // check catches it.
        let err = checked_offset(&btf, "controller", &[], "pcie", Expect::Ptr).unwrap_err();
        assert!(matches!(err, BtfError::Shape { .. }), "{err}");
    }

    #[test]
    fn missing_structs_are_per_field_notes_not_a_failure() {
        let mut b = Builder::new();
        let u32_ = b.int("unsigned int", 4, false);
        b.strukt("pci_dev", 64, &[m("devfn", u32_, 8)]);
        let btf = parse(&b.build());
        let (o, notes) = resolve_offsets(&btf);
        assert_eq!(o.pci_dev_devfn, 8);
        assert_eq!(o.intel_iommu_name, OFFSET_NONE);
        assert_eq!(o.controller_pcie, OFFSET_NONE);
        let iommu = notes
            .iter()
            .find(|n| n.field == "intel_iommu.name")
            .unwrap();
        assert!(iommu.unavailable() && !iommu.optional);
        assert!(matches!(iommu.reason, BtfError::NoStruct { .. }));
        let ctrl = notes.iter().find(|n| n.field == "controller.pcie").unwrap();
        assert!(
            ctrl.to_string().contains("pcie, slot_cap"),
            "says which controller it wanted: {ctrl}"
        );
        let vendor = notes.iter().find(|n| n.field == "pci_dev.vendor").unwrap();
        assert!(
            matches!(vendor.reason, BtfError::NoMember { .. }),
            "{vendor}"
        );
        // Every field not resolved has exactly one note.
        assert_eq!(notes.len(), offset_fields().count() - 1);
    }

    #[test]
    fn width_mismatch_is_an_error_not_an_offset() {
        let mut b = Builder::new();
        let u8_ = b.int("unsigned char", 1, false);
        let u16_ = b.int("short unsigned int", 2, false);
        let int_ = b.int("int", 4, true);
        // devfn as a byte, vendor signed, name a char[8].
        let name8 = b.array(u8_, int_, 8);
        b.strukt(
            "pci_dev",
            64,
            &[
                m("devfn", u8_, 8),
                m("vendor", int_, 12),
                m("device", u16_, 16),
            ],
        );
        b.strukt("intel_iommu", 64, &[m("name", name8, 0)]);
        let btf = parse(&b.build());
        let (o, notes) = resolve_offsets(&btf);
        assert_eq!(o.pci_dev_devfn, OFFSET_NONE);
        assert_eq!(o.pci_dev_vendor, OFFSET_NONE);
        assert_eq!(o.pci_dev_device, 16);
        assert_eq!(o.intel_iommu_name, OFFSET_NONE);
        let devfn = notes.iter().find(|n| n.field == "pci_dev.devfn").unwrap();
        let text = devfn.to_string();
        assert!(
            text.contains("1-byte unsigned") && text.contains("4-byte unsigned"),
            "{text}"
        );
    }

    #[test]
    fn an_older_char13_name_resolves_with_a_remark() {
        let mut b = Builder::new();
        let u8_ = b.int("unsigned char", 1, false);
        let name13 = b.array(u8_, u8_, 13);
        b.strukt("intel_iommu", 64, &[m("name", name13, 40)]);
        let btf = parse(&b.build());
        let (o, notes) = resolve_offsets(&btf);
        assert_eq!(o.intel_iommu_name, 40);
        let n = notes
            .iter()
            .find(|n| n.field == "intel_iommu.name")
            .unwrap();
        assert_eq!(n.resolved_offset, Some(40));
        assert!(n.to_string().contains("[13]"), "{n}");
    }

    #[test]
    fn bitfields_and_non_aggregate_paths_are_refused() {
        let mut b = Builder::new();
        let u32_ = b.int("unsigned int", 4, false);
        let u64_ = b.int("long long unsigned int", 8, false);
        b.strukt(
            "pci_bus",
            64,
            &[
                M {
                    name: "number",
                    ty: u32_,
                    bit_offset: 3,
                    bits: 8,
                },
                m("busn_res", u64_, 8),
            ],
        );
        let btf = parse(&b.build());
        let e = member_offset(&btf, "pci_bus", &[], "number").unwrap_err();
        assert!(matches!(e, BtfError::NotByteAligned { .. }), "{e}");
        let e = member_offset(&btf, "pci_bus", &[], "busn_res.start").unwrap_err();
        assert!(matches!(e, BtfError::NotAggregate { .. }), "{e}");
        let e = member_offset(&btf, "pci_bus", &[], "nope").unwrap_err();
        assert!(matches!(e, BtfError::NoMember { .. }), "{e}");
    }

    #[test]
    fn a_duplicate_struct_name_without_the_member_is_skipped() {
        let mut b = Builder::new();
        let u32_ = b.int("unsigned int", 4, false);
        b.strukt("pcie_device", 8, &[m("irq", u32_, 0)]);
        let vp = b.ptr(0);
        b.strukt("pcie_device", 32, &[m("irq", u32_, 0), m("port", vp, 8)]);
        let btf = parse(&b.build());
        let mi = checked_offset(&btf, "pcie_device", &[], "port", Expect::Ptr).unwrap();
        assert_eq!(mi.offset_bytes, 8);
    }

    #[test]
    fn function_and_type_presence() {
        let btf = parse(&kernel_like());
        assert!(has_function(&btf, "device_rbtree_find"));
        assert!(!has_function(&btf, "pci_doe_disconnected"));
        assert!(!has_function(&btf, "pci_dev"), "a struct is not a function");
        assert!(has_type(&btf, "pci_dev", Some("struct")));
        assert!(has_type(&btf, "resource_size_t", Some("typedef")));
        assert!(!has_type(&btf, "qi_batch", None));
        assert!(has_member(&btf, "pci_bus", "busn_res.end"));
        assert!(!has_member(&btf, "pci_bus", "busn_res.flags"));
    }

    #[test]
    fn missing_btf_file_says_so() {
        let Err(e) = load(Some(Path::new("/nonexistent/btf/vmlinux"))) else {
            panic!("loaded a BTF that does not exist");
        };
        assert!(matches!(e, BtfError::Missing { .. }));
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{e}");
    }

    #[test]
    fn garbage_btf_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmlinux");
        std::fs::write(&p, b"not btf at all").unwrap();
        assert!(matches!(load(Some(&p)), Err(BtfError::Read { .. })));
    }

    /// Against the running kernel, when it has BTF. The host may lack VT-d and pciehp (their
    /// structs then come back as notes), but the PCI core structs are always built in.
    #[test]
    fn host_vmlinux_btf() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: no {VMLINUX_BTF} on this host");
            return;
        }
        let btf = load(Some(path)).expect("host BTF parses");
        let (o, notes) = resolve_offsets(&btf);
        for n in &notes {
            eprintln!("note: {n}");
        }
        for (name, v) in [
            ("pci_dev.bus", o.pci_dev_bus),
            ("pci_dev.devfn", o.pci_dev_devfn),
            ("pci_dev.vendor", o.pci_dev_vendor),
            ("pci_dev.device", o.pci_dev_device),
            ("pci_dev.subordinate", o.pci_dev_subordinate),
            ("pci_dev.dev", o.pci_dev_dev),
            ("pci_bus.number", o.pci_bus_number),
            ("pci_bus.busn_res.start", o.pci_bus_busn_start),
            ("pci_bus.busn_res.end", o.pci_bus_busn_end),
            ("pci_bus.sysdata", o.pci_bus_sysdata),
            ("device.bus", o.device_bus),
        ] {
            assert_ne!(v, OFFSET_NONE, "{name} should resolve on any kernel");
        }
        assert_eq!(o.pci_bus_busn_end, o.pci_bus_busn_start + 8);
        assert_eq!(o.pci_dev_device, o.pci_dev_vendor + 2);
        // Whatever is missing is explained, and nothing resolved is also noted as missing.
        for n in notes.iter().filter(|n| n.unavailable()) {
            assert!(!n.reason.to_string().is_empty());
        }
        assert!(has_function(&btf, "pci_walk_bus"));
        assert!(has_type(&btf, "pci_dev", Some("struct")));
    }
}
