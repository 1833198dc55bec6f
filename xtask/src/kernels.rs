//! The pinned Debian kernels: download (`apt-get download`), cache, extract (`dpkg-deb -x`),
//! and pick out the kernel image and the modules the guest needs, decompressed and with their
//! dependencies resolved from each module's own `.modinfo` `depends=` (the packages ship no
//! modules.dep: depmod runs at install time).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where a pinned kernel's packages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apt {
    /// The machine's own apt lists (Debian bookworm and bookworm-security).
    System,
    /// trixie-backports and trixie-security on the same mirror, through a private apt
    /// configuration in the cache (the system's sources are not touched).
    Trixie,
}

/// One pinned kernel.
#[derive(Clone, Copy, Debug)]
pub struct Pinned {
    /// Short name used on the command line and for test-data directories.
    pub name: &'static str,
    /// The package with the kernel image (and, up to 7.1, its modules).
    pub package: &'static str,
    /// More packages of the same version the image needs (7.2+ split the image, its
    /// modules and its base files: `linux-binary-unsigned-*`, `linux-modules-*`, `linux-base-*`).
    pub extra: &'static [&'static str],
    pub version: &'static str,
    pub apt: Apt,
    /// What this kernel's source says it does when a device-TLB invalidation to a removed
    /// device times out (the `ite-surprise` scenario asserts it).
    pub ite: IteResponse,
    /// Whether the legacy-mode context clear (`__context_flush_dev_iotlb`) sends a device-TLB
    /// invalidation to a surprise-removed device: yes without 42662d19839f's
    /// `pci_device_is_present` check there (the `removals` scenario asserts it).
    pub context_clear_flushes_gone_device: bool,
}

/// A kernel's response to an ITE for a device that is gone, from its drivers/iommu/intel/dmar.c.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IteResponse {
    /// No 80a9b50c0b9e: `qi_check_fault` clears ITE, aborts the wait descriptor and returns
    /// -EAGAIN; `qi_submit_sync` resubmits for ever with interrupts off (the thread's lockup).
    RetriesForever,
    /// 80a9b50c0b9e: the ITE's SID has no present device, so `qi_check_fault` returns
    /// -ETIMEDOUT and `qi_submit_sync` gives up; the removal completes.
    AbortsTimedOut,
    /// 80a9b50c0b9e but not fe89277c9ceb: `qi_check_fault`'s abort walk (`head |= 1`, steps of
    /// 2 until `head == tail`) never ends when the tail's parity differs, before the
    /// -ETIMEDOUT check is reached: one ITE report, then the CPU spins with interrupts off.
    LocksUpInAbortWalk,
}

pub const PINNED: [Pinned; 2] = [
    Pinned {
        name: "6.1",
        package: "linux-image-6.1.0-47-amd64-unsigned",
        extra: &[],
        version: "6.1.170-3",
        apt: Apt::System,
        // Debian 6.1.170 source, drivers/iommu/intel/dmar.c: qi_check_fault reads no ITE SID
        // (only qi_dump_fault prints it) and returns -EAGAIN after the abort loop (already in
        // its fe89277c9ceb form: step 1, no `head |= 1`).
        ite: IteResponse::RetriesForever,
        // 6.1's legacy release path sends no device-TLB flush from a context clear (none in
        // the recorded traces; `__context_flush_dev_iotlb` does not exist in 6.1).
        context_clear_flushes_gone_device: false,
    },
    Pinned {
        name: "6.12",
        package: "linux-image-6.12.117+deb12-amd64-unsigned",
        extra: &[],
        version: "6.12.117-1~deb12u1",
        apt: Apt::System,
        // 80a9b50c0b9e (mainline v6.9): qi_check_fault reads DMAR_IQER_REG_ITESID, finds no
        // present device (device_rbtree_find + pci_device_is_present) and returns -ETIMEDOUT.
        // Every 6.12 has it; Debian's 6.12.117 source package is no longer on the mirror.
        ite: IteResponse::AbortsTimedOut,
        // 42662d19839f is in 6.12-stable (Mar 2026); the recorded traces show no context-clear
        // flush to the removed disk.
        context_clear_flushes_gone_device: false,
    },
];

/// The newest kernels Debian ships (trixie-backports), in the matrix beside [`PINNED`].
pub const NEWER: [Pinned; 2] = [
    Pinned {
        name: "6.18",
        // The signed image boots as it is with QEMU's -kernel; it carries its modules.
        package: "linux-image-6.18.15+deb13-amd64",
        extra: &[],
        version: "6.18.15-1~bpo13+1",
        apt: Apt::Trixie,
        // Debian 6.18.15 source, drivers/iommu/intel/dmar.c: 80a9b50c0b9e's -ETIMEDOUT check
        // after the abort walk that fe89277c9ceb fixed (`head |= 1`, steps of 2).
        ite: IteResponse::LocksUpInAbortWalk,
        // Debian 6.18.15 source, drivers/iommu/intel/pasid.c: `__context_flush_dev_iotlb`
        // checks only `info->ats_enabled` before `qi_flush_dev_iotlb` (no 42662d19839f).
        context_clear_flushes_gone_device: true,
    },
    Pinned {
        name: "7.3",
        package: "linux-binary-unsigned-7.3.4+deb13-amd64",
        extra: &[
            "linux-modules-7.3.4+deb13-amd64",
            "linux-base-7.3.4+deb13-amd64",
        ],
        version: "7.3.4-1~bpo13+1",
        apt: Apt::Trixie,
        ite: IteResponse::AbortsTimedOut,
        // 42662d19839f (7.0): the context clear skips a device that is not present.
        context_clear_flushes_gone_device: false,
    },
];

/// The pinned kernels (the matrix's, then the newer ones) that `--kernel` selects.
pub fn chosen(choice: crate::KernelChoice) -> Vec<Pinned> {
    use crate::KernelChoice::*;
    PINNED
        .iter()
        .chain(NEWER.iter())
        .copied()
        .filter(|p| match choice {
            All => true,
            V6_1 => p.name == "6.1",
            V6_12 => p.name == "6.12",
            V6_18 => p.name == "6.18",
            V7_3 => p.name == "7.3",
        })
        .collect()
}

/// Modules the guest loads (those built in are skipped); dependencies are added.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// An extracted kernel.
pub struct Kernel {
    pub pinned: Pinned,
    /// `uname -r` of the kernel (the lib/modules directory name).
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Decompressed modules in load order (dependencies first): (module name, file).
    pub modules: Vec<(String, PathBuf)>,
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// apt-get options of a private configuration under `cache/<name>` with `sources` as its
/// sources.list (made once, its lists fetched once; remove `.updated` there to fetch them
/// again). The system's sources are neither read nor changed.
pub(crate) fn private_apt(cache: &Path, name: &str, sources: &str) -> Result<Vec<String>> {
    let dir = cache.join(name);
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let list = dir.join("sources.list");
    fs::write(&list, sources)?;
    let opts: Vec<String> = vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/dev/null".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Architecture=amd64".into(),
        "-oDebug::NoLocking=1".into(),
        "-oAPT::Sandbox::User=root".into(),
    ];
    let stamp = dir.join(".updated");
    if !stamp.exists() {
        eprintln!("xtask: fetching the package lists of {name} (private apt configuration)");
        run(Command::new("apt-get").args(&opts).args(["-qq", "update"]))?;
        fs::write(&stamp, "")?;
    }
    Ok(opts)
}

/// apt-get options of the private trixie configuration under `cache`.
fn trixie_apt(cache: &Path) -> Result<Vec<String>> {
    private_apt(
        cache,
        "apt-trixie",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main\n\
         deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main\n",
    )
}

/// Downloads (once) and extracts (once) a pinned kernel under `cache`.
pub fn prepare(cache: &Path, p: Pinned) -> Result<Kernel> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let mut files = Vec::new();
    for pkg in std::iter::once(p.package).chain(p.extra.iter().copied()) {
        // apt-get download names the file PKG_VER_ARCH.deb with ':' escaped as %3a.
        let deb_name = format!("{}_{}_amd64.deb", pkg, p.version.replace(':', "%3a"));
        let deb = debs.join(&deb_name);
        if !deb.exists() {
            eprintln!("vm-test: downloading {}={}", pkg, p.version);
            let opts = match p.apt {
                Apt::System => Vec::new(),
                Apt::Trixie => trixie_apt(cache)?,
            };
            let st = Command::new("apt-get")
                .args(&opts)
                .arg("download")
                .arg(format!("{}={}", pkg, p.version))
                .current_dir(&debs)
                .status()
                .context("running apt-get download")?;
            if !st.success() || !deb.exists() {
                let hint = match p.apt {
                    Apt::System => {
                        "is the Debian bookworm(-security) apt list set up? try `apt-get update`"
                    }
                    Apt::Trixie => "the private trixie lists may be stale: remove apt-trixie/.updated in the cache",
                };
                bail!("could not download {}={} ({hint})", pkg, p.version);
            }
        }
        files.push((deb_name, deb));
    }
    let root = cache.join(format!("kernel-{}", p.name));
    let stamp = root.join(".extracted");
    let want_stamp: String = files
        .iter()
        .map(|f| f.0.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(want_stamp.as_str()) {
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        fs::create_dir_all(&root)?;
        for (_, deb) in &files {
            run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
        }
        fs::write(&stamp, &want_stamp)?;
    }
    // Merged /usr (6.18+) puts the modules under usr/lib/modules.
    let mods_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .with_context(|| format!("no lib/modules in {}", root.display()))?;
    let release = fs::read_dir(&mods_root)
        .with_context(|| format!("reading {}", mods_root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("no lib/modules/<release> in the package")?;
    // boot/vmlinuz-<release> up to 7.1; 7.2+ ship it in the modules directory.
    let vmlinuz = [
        root.join(format!("boot/vmlinuz-{release}")),
        mods_root.join(&release).join("vmlinuz"),
        mods_root.join(&release).join("vmlinuz.unsigned"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("no vmlinuz for {release} in {}", root.display()))?;
    let modules = resolve_modules(
        &mods_root.join(&release),
        &cache.join(format!("ko-{}", p.name)),
    )?;
    Ok(Kernel {
        pinned: p,
        release,
        vmlinuz,
        modules,
    })
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a file name (`virtio_blk.ko.xz` -> `virtio_blk`).
fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(norm(stem))
}

fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            walk(&path, out)?;
        } else if let Some(m) = module_name(&e.file_name().to_string_lossy()) {
            out.insert(m, path);
        }
    }
    Ok(())
}

/// The module's bytes, decompressed (xz / zstd through the command-line tools).
fn decompressed(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "-dc"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "-dcq"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "-dc"))
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some((t, flag)) => {
            let out = Command::new(t)
                .arg(flag)
                .arg(path)
                .output()
                .with_context(|| format!("running {t} (install it: scripts/setup.sh)"))?;
            if !out.status.success() {
                bail!("{t} {flag} {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}

/// `depends=` of a module's `.modinfo`.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(key.as_slice()))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(norm)
                .collect()
        })
        .unwrap_or_default()
}

fn resolve_modules(moddir: &Path, out_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = BTreeMap::new();
    walk(&moddir.join("kernel"), &mut files)?;
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    fs::create_dir_all(out_dir)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        out_dir: &Path,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(src) = files.get(name) else {
            if builtin.contains(name) {
                return Ok(());
            }
            bail!("module {name} is neither a file nor built in");
        };
        let bytes = decompressed(src)?;
        for dep in depends(&bytes) {
            visit(&dep, files, builtin, out_dir, seen, order)?;
        }
        let dst = out_dir.join(format!("{name}.ko"));
        fs::write(&dst, &bytes)?;
        order.push((name.to_string(), dst));
        Ok(())
    }
    for m in GUEST_MODULES {
        visit(m, &files, &builtin, out_dir, &mut seen, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_is_parsed() {
        let ko = b"\x7fELF....\0license=GPL\0depends=virtio,virtio-ring\0vermagic=6.1\0";
        assert_eq!(depends(ko), vec!["virtio", "virtio_ring"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert_eq!(
            module_name("virtio_blk.ko.xz").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("a-b.ko").as_deref(), Some("a_b"));
        assert_eq!(module_name("README"), None);
    }
}
