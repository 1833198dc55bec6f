//! Cuts the functions `itewatch::kcode` reads out of a vmlinux, for its unit tests
//! (itewatch/tests/data/kcode/<kernel>/):
//!
//! ```sh
//! cargo run -p itewatch --example kcode_fixture -- VMLINUX SYSTEM_MAP OUT_DIR [BTF]
//! ```
//!
//! VMLINUX is the kernel package's vmlinuz decompressed (the kernel's
//! scripts/extract-vmlinux does it), SYSTEM_MAP the full one from the `-dbg` package (the
//! image package's is a stub) or a kallsyms dump with the KASLR offset taken off, BTF the raw
//! `.BTF` section (`objcopy -O binary --only-section=.BTF VMLINUX btf`). Writes one
//! `<symbol>.bin` per function copy, `symbols` (kallsyms format: the copies and the callees)
//! and, with BTF, `layout` (`pci_dev` offsets).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use itewatch::kallsyms::Kallsyms;
use itewatch::kcode::{read, Copies};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [vmlinux, map, out, rest @ ..] = args.as_slice() else {
        bail!("usage: kcode_fixture VMLINUX SYSTEM_MAP OUT_DIR [BTF]");
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let syms = Kallsyms::load_from(map.as_ref())?;
    let image = read::ElfImage::open(vmlinux.as_ref())?;
    let layout = match rest.first() {
        Some(b) => Some(
            read::pci_dev_layout(&itewatch::btf::load(Some(b.as_ref()))?)
                .context("no pci_dev.error_state/dev in that BTF")?,
        ),
        None => None,
    };
    let code = read::kernel_code(&image, &syms, layout)?;
    let mut symbols = String::new();
    for (base, copies) in &code.functions {
        match copies {
            Copies::Read(v) => {
                for f in v {
                    std::fs::write(out.join(format!("{}.bin", f.name)), &f.bytes)?;
                    let _ = writeln!(symbols, "{:016x} t {}", f.addr, f.name);
                }
            }
            Copies::Unreadable(why) => bail!("{base}: {why}"),
        }
    }
    for (name, addrs) in &code.callees {
        for a in addrs {
            let _ = writeln!(symbols, "{a:016x} T {name}");
        }
    }
    std::fs::write(out.join("symbols"), symbols)?;
    if let Some(l) = layout {
        std::fs::write(
            out.join("layout"),
            format!("error_state {}\ndev {}\n", l.error_state, l.dev),
        )?;
    }
    for f in itewatch::kcode::assess(&code) {
        println!("{} {:?}: {}", f.commit, f.status, f.evidence);
    }
    Ok(())
}
