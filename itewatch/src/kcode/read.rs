//! The I/O behind [`super::assess`]: function bytes from an ELF image — `/proc/kcore` on the
//! running host (root only), or a vmlinux extracted from a kernel package — located through a
//! kallsyms-format symbol table (`/proc/kallsyms`, or the package's System.map).
//!
//! Both files are ELF: kcore is a core file whose `PT_LOAD` segments map the kernel's virtual
//! addresses (KASLR applied, matching kallsyms) to file offsets; a vmlinux maps its link-time
//! addresses (matching System.map) the same way. Code is read with positioned reads, so the
//! size kcore claims (the whole address space) never matters.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::kallsyms::{Kallsyms, KallsymsError};

use super::{Copies, Function, KernelCode, PciDevLayout, CALLEES, FUNCTIONS};

/// Where the running kernel's memory is readable as an ELF core file.
pub const PROC_KCORE: &str = "/proc/kcore";

/// Longest function copy read (qi_submit_sync is ~3 KiB on the kernels seen).
const MAX_FUNCTION_BYTES: u64 = 64 * 1024;

/// Errors reading kernel code.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {}{}", path.display(), hint(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a 64-bit little-endian ELF file ({what})", path.display())]
    NotElf { path: PathBuf, what: &'static str },
    #[error("{}: no segment holds {addr:#x}..+{len:#x}", path.display())]
    Unmapped { path: PathBuf, addr: u64, len: u64 },
    #[error(transparent)]
    Symbols(#[from] KallsymsError),
}

fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            " (needs root: CAP_SYS_RAWIO; a kernel in lockdown=confidentiality refuses it)"
        }
        std::io::ErrorKind::NotFound => " (kernel built without CONFIG_PROC_KCORE?)",
        _ => "",
    }
}

/// One `PT_LOAD` segment.
#[derive(Clone, Copy, Debug)]
struct Load {
    vaddr: u64,
    offset: u64,
    filesz: u64,
}

/// An ELF file read as a map from virtual addresses to bytes.
pub struct ElfImage {
    path: PathBuf,
    file: File,
    loads: Vec<Load>,
}

impl ElfImage {
    /// Opens `path` and reads its program headers.
    pub fn open(path: &Path) -> Result<ElfImage, ReadError> {
        let io = |source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not = |what| ReadError::NotElf {
            path: path.to_path_buf(),
            what,
        };
        let file = File::open(path).map_err(io)?;
        let mut eh = [0u8; 64];
        file.read_exact_at(&mut eh, 0).map_err(io)?;
        if &eh[..4] != b"\x7fELF" {
            return Err(not("bad magic"));
        }
        if eh[4] != 2 || eh[5] != 1 {
            return Err(not("not ELFCLASS64/ELFDATA2LSB"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([eh[o], eh[o + 1]]);
        let u64_at = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let phoff = u64_at(&eh, 32);
        let phentsize = u16_at(54) as u64;
        let phnum = u16_at(56) as u64;
        if phentsize < 56 || phnum == 0 || phnum > 4096 {
            return Err(not("no usable program headers"));
        }
        let mut ph = vec![0u8; (phentsize * phnum) as usize];
        file.read_exact_at(&mut ph, phoff).map_err(io)?;
        let mut loads = Vec::new();
        for k in 0..phnum as usize {
            let p = &ph[k * phentsize as usize..];
            let p_type = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            if p_type != 1 {
                continue; // PT_LOAD only
            }
            loads.push(Load {
                offset: u64_at(p, 8),
                vaddr: u64_at(p, 16),
                filesz: u64_at(p, 32),
            });
        }
        Ok(ElfImage {
            path: path.to_path_buf(),
            file,
            loads,
        })
    }

    /// `len` bytes at virtual address `addr`.
    pub fn read(&self, addr: u64, len: u64) -> Result<Vec<u8>, ReadError> {
        let seg = self.loads.iter().find(|l| {
            addr >= l.vaddr
                && addr
                    .checked_add(len)
                    .is_some_and(|e| e <= l.vaddr + l.filesz)
        });
        let Some(seg) = seg else {
            return Err(ReadError::Unmapped {
                path: self.path.clone(),
                addr,
                len,
            });
        };
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, seg.offset + (addr - seg.vaddr))
            .map_err(|source| ReadError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }
}

/// Every copy of `base` in `syms`, with its code read from `image`.
pub fn copies(image: &ElfImage, syms: &Kallsyms, base: &str) -> Copies {
    let mut out = Vec::new();
    for s in syms
        .addresses_of(base)
        .into_iter()
        .filter(|s| s.is_text() && s.module.is_none())
    {
        let end = syms
            .next_text_after(s.addr)
            .unwrap_or(s.addr + MAX_FUNCTION_BYTES)
            .min(s.addr + MAX_FUNCTION_BYTES);
        match image.read(s.addr, end - s.addr) {
            Ok(bytes) => out.push(Function {
                name: s.name.clone(),
                addr: s.addr,
                bytes,
            }),
            Err(e) => return Copies::Unreadable(crate::doctor::error_chain(&e)),
        }
    }
    Copies::Read(out)
}

/// Fills a [`KernelCode`] with every function [`super::assess`] reads.
pub fn kernel_code(
    image: &ElfImage,
    syms: &Kallsyms,
    pci_dev: Option<PciDevLayout>,
) -> Result<KernelCode, ReadError> {
    syms.require_addresses()?;
    let functions = FUNCTIONS
        .iter()
        .map(|f| (f.to_string(), copies(image, syms, f)))
        .collect();
    let callees = CALLEES
        .iter()
        .map(|c| {
            let addrs: Vec<u64> = syms
                .addresses_of(c)
                .into_iter()
                .filter(|s| s.is_text() && s.suffix().is_none())
                .map(|s| s.addr)
                .collect();
            (c.to_string(), addrs)
        })
        .collect::<BTreeMap<_, _>>();
    Ok(KernelCode {
        functions,
        callees,
        pci_dev,
    })
}

/// `pci_dev.error_state` and `pci_dev.dev` from BTF.
pub fn pci_dev_layout(btf: &btf_rs::Btf) -> Option<PciDevLayout> {
    let off = |m| {
        crate::btf::member_offset(btf, "pci_dev", &[], m)
            .ok()
            .map(|i| i.offset_bytes)
    };
    Some(PciDevLayout {
        error_state: off("error_state")?,
        dev: off("dev")?,
    })
}

/// The running kernel's code: `/proc/kcore` through `/proc/kallsyms` (below `root`, `/` live).
pub fn live(
    root: &Path,
    pci_dev: Option<PciDevLayout>,
    syms: Option<&Kallsyms>,
) -> Result<KernelCode, ReadError> {
    let read;
    let syms = match syms {
        Some(s) => s,
        None => {
            read = Kallsyms::load_from(&root.join("proc/kallsyms"))?;
            &read
        }
    };
    syms.require_addresses()?;
    let image = ElfImage::open(&root.join("proc/kcore"))?;
    kernel_code(&image, syms, pci_dev)
}
