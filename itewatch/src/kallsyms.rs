//! Kernel symbols (`/proc/kallsyms`) and what tracefs says can be traced.
//!
//! Owns three questions the loader and `doctor` ask of the running kernel:
//! - *Where is it?* Address lookup for stack symbolization ([`Kallsyms::symbolize`]) and all
//!   copies of a function ([`Kallsyms::addresses_of`]), with compiler clones (`.part.0`,
//!   `.isra.0`, `.constprop.0`, `.cold`, `.llvm.N`) told apart from the function itself. The
//!   out-of-line copies of the `static inline` `pci_dev_set_disconnected` (6.1: 3, 6.12: 4) are
//!   what the `pci_walk_bus` probe compares its callback against
//!   ([`Kallsyms::disconnect_callbacks`]).
//! - *Can it be kprobed?* [`TraceableFunctions`] parses `available_filter_functions`; notrace
//!   functions (all `pci_dev_set_disconnected` copies) are absent from it.
//! - *Does the tracepoint exist?* [`Tracefs::has_event`] looks for `events/<sys>/<name>`.
//!
//! Real addresses need root (or `kernel.kptr_restrict=0`): otherwise every address reads 0,
//! which [`Kallsyms::addresses_hidden`] reports ("run as root"); names stay usable.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use itewatch_common::MAX_DISCONNECT_CALLBACKS;

/// Where the kernel lists its symbols.
pub const PROC_KALLSYMS: &str = "/proc/kallsyms";

/// The static inline helper pciehp passes to `pci_walk_bus` on surprise removal.
pub const PCI_DEV_SET_DISCONNECTED: &str = "pci_dev_set_disconnected";

/// Errors reading kernel symbols.
#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kallsyms line {line}: cannot parse {text:?}")]
    Parse { line: usize, text: String },
    /// Every address is 0: kptr_restrict hides them from this user.
    #[error(
        "kernel symbol addresses are hidden (all read as 0; kernel.kptr_restrict): run as root"
    )]
    AddressesHidden,
    #[error("no kernel symbol {0}")]
    NotFound(String),
    #[error("{name} is not unique: {count} copies")]
    NotUnique { name: String, count: usize },
}

/// One `/proc/kallsyms` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    /// nm-style type letter: `T`/`t` text (global/local), `D`/`d` data, `W` weak, ...
    pub kind: char,
    pub name: String,
    /// Module name for module symbols (`[nvme]`), `None` for vmlinux; one allocation per
    /// module, shared by its symbols.
    pub module: Option<Arc<str>>,
}

impl Symbol {
    /// Code (`t`, `T`, `w`, `W`): what a stack address can point into.
    pub fn is_text(&self) -> bool {
        matches!(self.kind, 't' | 'T' | 'w' | 'W')
    }
    /// File-local (lower-case type letter): `static` functions and their clones.
    pub fn is_local(&self) -> bool {
        self.kind.is_ascii_lowercase()
    }
    /// Name without a compiler clone suffix: `foo.isra.0` → `foo`.
    pub fn base_name(&self) -> &str {
        split_suffix(&self.name).0
    }
    /// The compiler clone suffix (`.part.0`, `.cold`, ...), if any.
    pub fn suffix(&self) -> Option<&str> {
        split_suffix(&self.name).1
    }
}

/// Splits `foo.constprop.0` into (`foo`, Some(`.constprop.0`)). C identifiers have no dots, so
/// everything from the first dot on is a compiler-made suffix.
pub fn split_suffix(name: &str) -> (&str, Option<&str>) {
    match name.find('.') {
        Some(i) if i > 0 => (&name[..i], Some(&name[i..])),
        _ => (name, None),
    }
}

/// A symbol an address falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located<'a> {
    pub symbol: &'a Symbol,
    pub offset: u64,
}

impl fmt::Display for Located<'_> {
    /// `sym+0xoff [module]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.symbol.name, self.offset)?;
        if let Some(m) = &self.symbol.module {
            write!(f, " [{m}]")?;
        }
        Ok(())
    }
}

/// Largest distance past the last text symbol that is still attributed to it.
const MAX_TAIL_BYTES: u64 = 1 << 20;

/// The parsed symbol table.
#[derive(Clone, Debug, Default)]
pub struct Kallsyms {
    /// All symbols, in file order.
    symbols: Vec<Symbol>,
    /// Indices of text symbols sorted by address, for lookup.
    text_by_addr: Vec<u32>,
    /// Indices of all symbols sorted by base name (suffix stripped), for `addresses_of`. A
    /// sorted index, not a map of names: a host has 100 000 to 200 000 symbols, and a map
    /// with a string and a vector per name made the table about 35 MB on a 6.18 host.
    by_base: Vec<u32>,
    hidden: bool,
}

impl Kallsyms {
    /// Reads [`PROC_KALLSYMS`].
    pub fn load() -> Result<Kallsyms, KallsymsError> {
        Self::load_from(Path::new(PROC_KALLSYMS))
    }

    /// Reads a kallsyms-format file.
    pub fn load_from(path: &Path) -> Result<Kallsyms, KallsymsError> {
        let text = std::fs::read_to_string(path).map_err(|source| KallsymsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses kallsyms text (`addr type name [module]` per line). Blank lines are skipped; a
    /// malformed line is an error (the file is generated by the kernel; garbage means the
    /// wrong file).
    pub fn parse(text: &str) -> Result<Kallsyms, KallsymsError> {
        let mut symbols = Vec::new();
        let mut modules: HashMap<&str, Arc<str>> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = || KallsymsError::Parse {
                line: i + 1,
                text: line.chars().take(120).collect(),
            };
            let mut it = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                return Err(bad());
            };
            let addr = u64::from_str_radix(addr, 16).map_err(|_| bad())?;
            let mut kc = kind.chars();
            let (Some(kind), None) = (kc.next(), kc.next()) else {
                return Err(bad());
            };
            let module = it.next().map(|m| {
                let m = m.trim_start_matches('[').trim_end_matches(']');
                modules.entry(m).or_insert_with(|| Arc::from(m)).clone()
            });
            symbols.push(Symbol {
                addr,
                kind,
                name: name.to_string(),
                module,
            });
        }
        Ok(Self::from_symbols(symbols))
    }

    /// Builds the indices over already parsed symbols.
    pub fn from_symbols(symbols: Vec<Symbol>) -> Kallsyms {
        let hidden = !symbols.is_empty() && symbols.iter().all(|s| s.addr == 0);
        // u32 indices: /proc/kallsyms has far fewer than 4 billion lines.
        let n = u32::try_from(symbols.len()).unwrap_or(u32::MAX);
        let mut text_by_addr: Vec<u32> = if hidden {
            Vec::new()
        } else {
            (0..n).filter(|&i| symbols[i as usize].is_text()).collect()
        };
        // Stable on address; among aliases (`_stext`/`_text`) prefer a global name.
        text_by_addr.sort_by_key(|&i| (symbols[i as usize].addr, symbols[i as usize].is_local()));
        // Keys computed once, not per comparison: finding each name's suffix inside the
        // comparator was most of a live process's start-up under TCG. The index breaks ties,
        // so an unstable sort gives the same order as a stable one.
        let mut keyed: Vec<(&str, u32)> = (0..n)
            .map(|i| (symbols[i as usize].base_name(), i))
            .collect();
        keyed.sort_unstable();
        let by_base: Vec<u32> = keyed.into_iter().map(|(_, i)| i).collect();
        Kallsyms {
            symbols,
            text_by_addr,
            by_base,
            hidden,
        }
    }

    /// Every address read as 0 (kptr_restrict): lookups and attach-by-address are impossible.
    pub fn addresses_hidden(&self) -> bool {
        self.hidden
    }

    /// `Err(AddressesHidden)` when addresses are hidden.
    pub fn require_addresses(&self) -> Result<(), KallsymsError> {
        if self.hidden {
            Err(KallsymsError::AddressesHidden)
        } else {
            Ok(())
        }
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// The text symbol `addr` falls in (the nearest one at or below it).
    pub fn lookup(&self, addr: u64) -> Option<Located<'_>> {
        let pos = self
            .text_by_addr
            .partition_point(|&i| self.symbols[i as usize].addr <= addr);
        // Among symbols at the same address the sort put the global one first; take the first
        // of the run that ends at `pos`.
        let last = *self.text_by_addr.get(pos.checked_sub(1)?)? as usize;
        let at = self.symbols[last].addr;
        let run = self.text_by_addr[..pos].partition_point(|&i| self.symbols[i as usize].addr < at);
        let first = self.text_by_addr[run] as usize;
        let offset = addr - at;
        if pos == self.text_by_addr.len() && offset > MAX_TAIL_BYTES {
            return None;
        }
        Some(Located {
            symbol: &self.symbols[first],
            offset,
        })
    }

    /// `sym+0xoff [module]`, or the bare hex address when nothing covers it (or addresses
    /// are hidden).
    pub fn symbolize(&self, addr: u64) -> String {
        match self.lookup(addr) {
            Some(l) => l.to_string(),
            None => format!("{addr:#x}"),
        }
    }

    /// All symbols whose name is `name` or `name` plus a compiler clone suffix, in address
    /// order. Each keeps its full name, so `foo` and `foo.cold` are told apart.
    pub fn addresses_of(&self, name: &str) -> Vec<&Symbol> {
        let base = split_suffix(name).0;
        let key = |i: &u32| self.symbols[*i as usize].base_name();
        let from = self.by_base.partition_point(|i| key(i) < base);
        let to = from + self.by_base[from..].partition_point(|i| key(i) == base);
        let mut out: Vec<&Symbol> = self.by_base[from..to]
            .iter()
            .map(|&i| &self.symbols[i as usize])
            .filter(|s| s.name == name || (base == name && s.base_name() == name))
            .collect();
        out.sort_by_key(|s| s.addr);
        out
    }

    /// The address of the first text symbol after `addr`: where the code of a function that
    /// starts at `addr` ends at the latest (`kcode` reads functions up to it).
    pub fn next_text_after(&self, addr: u64) -> Option<u64> {
        let pos = self
            .text_by_addr
            .partition_point(|&i| self.symbols[i as usize].addr <= addr);
        self.text_by_addr
            .get(pos)
            .map(|&i| self.symbols[i as usize].addr)
    }

    /// Symbols named exactly `name` (no clones).
    pub fn exact(&self, name: &str) -> Vec<&Symbol> {
        self.addresses_of(name)
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// Whether any symbol of that exact name exists.
    pub fn contains(&self, name: &str) -> bool {
        !self.exact(name).is_empty()
    }

    /// The address of a symbol that must be unique (e.g. `pci_bus_type`).
    pub fn unique_address(&self, name: &str) -> Result<u64, KallsymsError> {
        self.require_addresses()?;
        match self.exact(name).as_slice() {
            [] => Err(KallsymsError::NotFound(name.to_string())),
            [s] => Ok(s.addr),
            many => Err(KallsymsError::NotUnique {
                name: name.to_string(),
                count: many.len(),
            }),
        }
    }

    /// The out-of-line copies of `pci_dev_set_disconnected` (one per translation unit that
    /// takes its address; 6.1: 3, 6.12: 4). Only exact-name text copies: a `.cold` or
    /// `.isra` clone is never what `pci_walk_bus` gets as its callback.
    pub fn disconnect_copies(&self) -> Vec<&Symbol> {
        self.exact(PCI_DEV_SET_DISCONNECTED)
            .into_iter()
            .filter(|s| s.is_text())
            .collect()
    }

    /// The copies' addresses laid out for [`itewatch_common::Config::disconnect_callbacks`]
    /// (0 = unused), and how many did not fit.
    pub fn disconnect_callbacks(
        &self,
    ) -> Result<([u64; MAX_DISCONNECT_CALLBACKS], usize), KallsymsError> {
        self.require_addresses()?;
        let copies = self.disconnect_copies();
        let mut out = [0u64; MAX_DISCONNECT_CALLBACKS];
        for (slot, s) in out.iter_mut().zip(&copies) {
            *slot = s.addr;
        }
        Ok((out, copies.len().saturating_sub(MAX_DISCONNECT_CALLBACKS)))
    }
}

/// Errors reading tracefs.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked in {}); mount it with \
         `mount -t tracefs nodev /sys/kernel/tracing`",
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotMounted { looked: Vec<PathBuf> },
    #[error("cannot read {}{}", path.display(), permission_hint(source))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn permission_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        " (tracefs needs root)"
    } else {
        ""
    }
}

/// A mounted tracefs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracefs {
    pub root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs under a host root (`/` on a live system, a fixture directory in tests):
    /// `sys/kernel/tracing`, then the legacy `sys/kernel/debug/tracing`. An empty mount point
    /// (not mounted) does not count.
    pub fn find(host_root: &Path) -> Result<Tracefs, TracefsError> {
        let looked: Vec<PathBuf> = ["sys/kernel/tracing", "sys/kernel/debug/tracing"]
            .iter()
            .map(|p| host_root.join(p))
            .collect();
        for p in &looked {
            if p.join("events").is_dir() || p.join("available_filter_functions").exists() {
                return Ok(Tracefs { root: p.clone() });
            }
        }
        Err(TracefsError::NotMounted { looked })
    }

    /// Whether tracepoint `<sys>:<name>` exists (`events/<sys>/<name>`).
    pub fn has_event(&self, sys: &str, name: &str) -> bool {
        self.root.join("events").join(sys).join(name).is_dir()
    }

    /// The tracepoint's `format` file.
    pub fn event_format(&self, sys: &str, name: &str) -> Result<String, TracefsError> {
        let path = self.root.join("events").join(sys).join(name).join("format");
        std::fs::read_to_string(&path).map_err(|source| TracefsError::Read { path, source })
    }

    /// Parses `available_filter_functions`.
    pub fn traceable_functions(&self) -> Result<TraceableFunctions, TracefsError> {
        let path = self.root.join("available_filter_functions");
        let text =
            std::fs::read_to_string(&path).map_err(|source| TracefsError::Read { path, source })?;
        Ok(TraceableFunctions::parse(&text))
    }
}

/// Offset of `field` in a tracepoint record, from its `format` file text
/// (`field:__data_loc char[] msg;\toffset:8;\tsize:4;\tsigned:0;`).
pub fn format_field_offset(format: &str, field: &str) -> Option<u32> {
    for line in format.lines() {
        let line = line.trim();
        let Some(decl) = line.strip_prefix("field:") else {
            continue;
        };
        let decl = decl.split(';').next().unwrap_or("");
        // The name is the last word, less any array suffix: `char comm[16]` → `comm`.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("");
        let name = name.split('[').next().unwrap_or("");
        if name != field {
            continue;
        }
        return line
            .split(';')
            .filter_map(|kv| kv.trim().strip_prefix("offset:"))
            .next()
            .and_then(|v| v.trim().parse().ok());
    }
    None
}

/// Functions ftrace (and so kprobes on a function entry) can attach to.
#[derive(Clone, Debug, Default)]
pub struct TraceableFunctions {
    /// Full name (with clone suffix) → number of entries (several local copies list once
    /// each).
    counts: HashMap<String, usize>,
}

impl TraceableFunctions {
    /// Parses `available_filter_functions` (`name` or `name [module]` per line) or
    /// `available_filter_functions_addrs` (`addr name [module]`).
    pub fn parse(text: &str) -> TraceableFunctions {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let Some(first) = it.next() else { continue };
            let name = if first.len() >= 8 && first.bytes().all(|b| b.is_ascii_hexdigit()) {
                match it.next() {
                    Some(n) => n,
                    None => first,
                }
            } else {
                first
            };
            *counts.entry(name.to_string()).or_default() += 1;
        }
        TraceableFunctions { counts }
    }

    /// Whether `name` (exact, suffix included) can be traced.
    pub fn contains(&self, name: &str) -> bool {
        self.counts.contains_key(name)
    }

    /// How many traceable entries carry this exact name.
    pub fn count(&self, name: &str) -> usize {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// Traceable names that are `base` or a clone of it.
    pub fn variants_of(&self, base: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .counts
            .keys()
            .filter(|n| split_suffix(n).0 == base)
            .map(|s| s.as_str())
            .collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Modelled on a 6.12 guest: four copies of pci_dev_set_disconnected, clones of
    /// iommu_flush_dev_iotlb and qi_submit_sync's .cold part, a module symbol.
    pub(crate) const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81100000 t pci_dev_set_disconnected
ffffffff81100040 T pci_walk_bus
ffffffff81100200 t pci_dev_set_disconnected
ffffffff81200000 T qi_submit_sync
ffffffff81200490 T qi_flush_dev_iotlb
ffffffff81200600 t iommu_flush_dev_iotlb.part.0
ffffffff81200700 t devtlb_invalidation_with_pasid.isra.0
ffffffff81200800 t intel_pasid_setup.constprop.0
ffffffff81300000 t pci_dev_set_disconnected
ffffffff81300100 t pciehp_ist
ffffffff81400000 t pci_dev_set_disconnected
ffffffff81500000 t qi_submit_sync.cold
ffffffff81600000 D pci_bus_type
ffffffffc0001000 t virtblk_probe\t[virtio_blk]
ffffffffc0001400 t virtblk_remove\t[virtio_blk]
";

    #[test]
    fn symbolizes_with_offset_and_module() {
        let k = Kallsyms::parse(SAMPLE).unwrap();
        assert!(!k.addresses_hidden());
        assert_eq!(k.symbolize(0xffffffff812002c0), "qi_submit_sync+0x2c0");
        assert_eq!(k.symbolize(0xffffffff81200000), "qi_submit_sync+0x0");
        assert_eq!(
            k.symbolize(0xffffffffc0001010),
            "virtblk_probe+0x10 [virtio_blk]"
        );
        // Aliases at one address: the first global one wins consistently.
        assert_eq!(k.symbolize(0xffffffff81000010), "_stext+0x10");
        // Below every symbol, and far beyond the last one.
        assert_eq!(k.symbolize(0x1000), "0x1000");
        assert_eq!(k.symbolize(0xffffffffc1000000), "0xffffffffc1000000");
        // Data symbols are not used for code addresses.
        assert_eq!(
            k.symbolize(0xffffffff81600008),
            "qi_submit_sync.cold+0x100008"
        );
    }

    #[test]
    fn addresses_of_tells_clones_apart() {
        let k = Kallsyms::parse(SAMPLE).unwrap();
        let q: Vec<&str> = k
            .addresses_of("qi_submit_sync")
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(q, ["qi_submit_sync", "qi_submit_sync.cold"]);
        assert_eq!(k.exact("qi_submit_sync").len(), 1);
        let cold = k.addresses_of("qi_submit_sync.cold");
        assert_eq!(cold.len(), 1);
        assert_eq!(cold[0].suffix(), Some(".cold"));
        let f = k.addresses_of("iommu_flush_dev_iotlb");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].suffix(), Some(".part.0"));
        assert!(k.exact("iommu_flush_dev_iotlb").is_empty());
        assert_eq!(
            k.addresses_of("devtlb_invalidation_with_pasid")[0].suffix(),
            Some(".isra.0")
        );
        assert_eq!(
            k.addresses_of("intel_pasid_setup")[0].base_name(),
            "intel_pasid_setup"
        );
        assert!(k.addresses_of("no_such_fn").is_empty());
    }

    #[test]
    fn disconnect_copies_for_the_walk_probe() {
        let k = Kallsyms::parse(SAMPLE).unwrap();
        let copies = k.disconnect_copies();
        assert_eq!(copies.len(), 4);
        assert!(copies.iter().all(|s| s.is_local()));
        let (cbs, overflow) = k.disconnect_callbacks().unwrap();
        assert_eq!(overflow, 0);
        assert_eq!(
            &cbs[..5],
            &[
                0xffffffff81100000,
                0xffffffff81100200,
                0xffffffff81300000,
                0xffffffff81400000,
                0
            ]
        );
        assert_eq!(
            k.unique_address("pci_bus_type").unwrap(),
            0xffffffff81600000
        );
        assert!(matches!(
            k.unique_address(PCI_DEV_SET_DISCONNECTED),
            Err(KallsymsError::NotUnique { count: 4, .. })
        ));
        assert!(matches!(
            k.unique_address("nope"),
            Err(KallsymsError::NotFound(_))
        ));
    }

    #[test]
    fn too_many_copies_are_counted_not_dropped_silently() {
        let text: String = (0..10)
            .map(|i| format!("ffffffff8100{i:04x} t pci_dev_set_disconnected\n"))
            .collect();
        let k = Kallsyms::parse(&text).unwrap();
        let (cbs, overflow) = k.disconnect_callbacks().unwrap();
        assert_eq!(overflow, 2);
        assert!(cbs.iter().all(|&a| a != 0));
    }

    #[test]
    fn hidden_addresses_are_detected() {
        let hidden: String = SAMPLE
            .lines()
            .map(|l| format!("0000000000000000{}\n", &l[16..]))
            .collect();
        let k = Kallsyms::parse(&hidden).unwrap();
        assert!(k.addresses_hidden());
        // Names still answer presence questions.
        assert_eq!(k.disconnect_copies().len(), 4);
        assert!(k.contains("pciehp_ist"));
        assert_eq!(k.symbolize(0xffffffff81200010), "0xffffffff81200010");
        let e = k.disconnect_callbacks().unwrap_err();
        assert!(e.to_string().contains("run as root"), "{e}");
        assert!(matches!(
            k.unique_address("pci_bus_type"),
            Err(KallsymsError::AddressesHidden)
        ));
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(matches!(
            Kallsyms::parse("zzzz T foo\n"),
            Err(KallsymsError::Parse { line: 1, .. })
        ));
        assert!(matches!(
            Kallsyms::parse("ffff T\n"),
            Err(KallsymsError::Parse { .. })
        ));
        assert!(Kallsyms::parse("\n\n").unwrap().is_empty());
    }

    #[test]
    fn host_kallsyms() {
        let Ok(k) = Kallsyms::load() else {
            eprintln!("skipped: {PROC_KALLSYMS} unreadable");
            return;
        };
        assert!(k.len() > 1000);
        assert!(k.contains("pci_walk_bus"));
        if k.addresses_hidden() {
            eprintln!("addresses hidden on this host; lookups skipped");
            return;
        }
        let walk = k.exact("pci_walk_bus")[0].addr;
        assert_eq!(k.symbolize(walk + 4), "pci_walk_bus+0x4");
    }

    #[test]
    fn available_filter_functions() {
        let t = TraceableFunctions::parse(
            "qi_submit_sync\nqi_flush_dev_iotlb\npci_walk_bus\n\
             iommu_flush_dev_iotlb.part.0\nvirtblk_probe [virtio_blk]\n\
             dup_local\ndup_local\n",
        );
        assert!(t.contains("qi_submit_sync"));
        assert!(t.contains("virtblk_probe"));
        assert!(
            !t.contains(PCI_DEV_SET_DISCONNECTED),
            "notrace copies are absent"
        );
        assert!(!t.contains("iommu_flush_dev_iotlb"));
        assert_eq!(
            t.variants_of("iommu_flush_dev_iotlb"),
            ["iommu_flush_dev_iotlb.part.0"]
        );
        assert_eq!(t.count("dup_local"), 2);
        let a = TraceableFunctions::parse(
            "ffffffff81200000 qi_submit_sync\nffffffffc0001000 virtblk_probe [virtio_blk]\n",
        );
        assert!(a.contains("qi_submit_sync") && a.contains("virtblk_probe"));
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn tracefs_on_a_fixture_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // An empty mount point does not count as mounted.
        std::fs::create_dir_all(root.join("sys/kernel/tracing")).unwrap();
        let e = Tracefs::find(root).unwrap_err();
        assert!(e.to_string().contains("not mounted"), "{e}");
        let legacy = root.join("sys/kernel/debug/tracing");
        std::fs::create_dir_all(legacy.join("events/intel_iommu/qi_submit")).unwrap();
        std::fs::write(
            legacy.join("events/intel_iommu/qi_submit/format"),
            "name: qi_submit\nID: 1234\nformat:\n\
             \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
             \tfield:u64 qw0;\toffset:8;\tsize:8;\tsigned:0;\n\
             \tfield:__data_loc char[] iommu;\toffset:40;\tsize:4;\tsigned:0;\n",
        )
        .unwrap();
        std::fs::write(
            legacy.join("available_filter_functions"),
            "qi_submit_sync\n",
        )
        .unwrap();
        let t = Tracefs::find(root).unwrap();
        assert_eq!(t.root, legacy);
        assert!(t.has_event("intel_iommu", "qi_submit"));
        assert!(!t.has_event("pci", "pci_hp_event"));
        let fmt = t.event_format("intel_iommu", "qi_submit").unwrap();
        assert_eq!(format_field_offset(&fmt, "iommu"), Some(40));
        assert_eq!(format_field_offset(&fmt, "qw0"), Some(8));
        assert_eq!(format_field_offset(&fmt, "qw9"), None);
        assert!(t.traceable_functions().unwrap().contains("qi_submit_sync"));
    }

    proptest::proptest! {
        /// Any text parses or errors, never panics; any address symbolizes to a symbol at or
        /// below it.
        #[test]
        fn parse_and_lookup_never_panic(text in "[0-9a-fTtDd \\[\\]._\n]{0,400}", addr: u64) {
            if let Ok(k) = Kallsyms::parse(&text) {
                if let Some(l) = k.lookup(addr) {
                    proptest::prop_assert!(l.symbol.addr <= addr);
                    proptest::prop_assert_eq!(l.offset, addr - l.symbol.addr);
                }
                let _ = k.symbolize(addr);
            }
            let _ = TraceableFunctions::parse(&text);
            let _ = format_field_offset(&text, "msg");
        }

        #[test]
        fn lookup_picks_the_nearest_symbol(mut addrs in proptest::collection::vec(0xffff_ffff_8100_0000u64..0xffff_ffff_8200_0000, 1..40), probe in 0u64..0x100_0000) {
            addrs.sort_unstable();
            addrs.dedup();
            let text: String = addrs.iter().enumerate().map(|(i, a)| format!("{a:016x} t f{i}\n")).collect();
            let k = Kallsyms::parse(&text).unwrap();
            let q = 0xffff_ffff_8100_0000u64 + probe;
            let want = addrs.iter().rposition(|&a| a <= q).filter(|&i| {
                // Past the last symbol only up to MAX_TAIL_BYTES.
                i + 1 < addrs.len() || q - addrs[i] <= MAX_TAIL_BYTES
            });
            match (k.lookup(q), want) {
                (Some(l), Some(i)) => proptest::prop_assert_eq!(&l.symbol.name, &format!("f{i}")),
                (None, None) => {}
                (got, want) => proptest::prop_assert!(false, "{got:?} vs {want:?}"),
            }
        }
    }
}
