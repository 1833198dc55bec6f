//! The benchmark guest's bpftrace: Debian bookworm's `bpftrace` and `bpftool` packages with
//! their library dependencies, fetched with `apt-get download` through a private apt
//! configuration (binary `deb` lines of our own, the system's sources untouched), unpacked with
//! `dpkg-deb -x` into a tree and packed as one tar file the guest unpacks into a tmpfs and
//! `chroot`s into. Everything is cached under `~/.cache/itewatch/` and keyed by the exact list
//! of package files, so a new Debian point release of any of them makes a new tree.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The packages asked for; their `Depends` (recursively) come with them.
pub const PACKAGES: &[&str] = &["bpftrace", "bpftool"];

/// The shared cache directory (`$XDG_CACHE_HOME/itewatch` or `~/.cache/itewatch`).
pub fn cache_root() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("itewatch"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set: no cache directory")?;
    Ok(PathBuf::from(home).join(".cache/itewatch"))
}

use crate::kernels::run;

/// apt options of the private bookworm configuration under `cache/apt-bench`.
fn apt_opts(cache: &Path) -> Result<Vec<String>> {
    let keyring = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
    crate::kernels::private_apt(
        cache,
        "apt-bench",
        &format!(
            "deb [{keyring}] http://deb.debian.org/debian bookworm main\n\
             deb [{keyring}] http://deb.debian.org/debian bookworm-updates main\n\
             deb [{keyring}] http://deb.debian.org/debian-security bookworm-security main\n"
        ),
    )
}

/// Package names of `apt-cache depends --recurse` output: the unindented lines, without
/// virtual packages (`<name>`).
pub fn depends_closure(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(' ') && !l.starts_with('<'))
        .map(|l| l.trim().to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// File names of `apt-get download --print-uris` output (`'URI' FILE SIZE HASH` per line).
pub fn uri_files(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with('\''))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|f| f.ends_with(".deb") && !f.contains('/'))
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// FNV-1a: a cache key that stays the same across Rust releases (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The rootfs tar for the guest, built on first use; returns its path.
pub fn prepare() -> Result<PathBuf> {
    let cache = cache_root()?;
    let opts = apt_opts(&cache)?;
    let out = Command::new("apt-cache")
        .args(&opts)
        .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
        .args([
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(PACKAGES)
        .output()
        .context("running apt-cache depends")?;
    if !out.status.success() {
        bail!(
            "apt-cache depends {PACKAGES:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pkgs = depends_closure(&String::from_utf8_lossy(&out.stdout));
    for p in PACKAGES {
        if !pkgs.iter().any(|x| x == p) {
            bail!("apt-cache does not know {p} (private lists under {}/apt-bench stale? remove its .updated)", cache.display());
        }
    }
    let out = Command::new("apt-get")
        .args(&opts)
        .args(["download", "--print-uris"])
        .args(&pkgs)
        .output()
        .context("running apt-get download --print-uris")?;
    if !out.status.success() {
        bail!(
            "apt-get download --print-uris failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let files = uri_files(&String::from_utf8_lossy(&out.stdout));
    if files.len() < pkgs.len() {
        bail!(
            "apt-get download --print-uris named {} files for {} packages",
            files.len(),
            pkgs.len()
        );
    }
    let key = format!("{:016x}", fnv1a(files.join("\n").as_bytes()));
    let dir = cache.join(format!("bench-rootfs-{key}"));
    let tar = dir.join("rootfs.tar");
    let manifest = dir.join("packages.txt");
    if tar.exists() && fs::read_to_string(&manifest).ok().as_deref() == Some(&files.join("\n")) {
        return Ok(tar);
    }
    eprintln!(
        "vm-bench: building the bpftrace rootfs from {} Debian packages into {}",
        files.len(),
        dir.display()
    );
    let debs = cache.join("bench-debs");
    fs::create_dir_all(&debs)?;
    let missing: Vec<&String> = files.iter().filter(|f| !debs.join(f).exists()).collect();
    if !missing.is_empty() {
        // apt-get download takes names; the file names' first `_` field is the package.
        let names: Vec<&str> = missing.iter().filter_map(|f| f.split('_').next()).collect();
        run(Command::new("apt-get")
            .args(&opts)
            .args(["-qq", "download"])
            .args(&names)
            .current_dir(&debs))?;
        for f in &missing {
            if !debs.join(f).exists() {
                bail!("apt-get download did not leave {f} in {}", debs.display());
            }
        }
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let tree = dir.join("tree");
    fs::create_dir_all(&tree)?;
    for f in &files {
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(debs.join(f))
            .arg(&tree))?;
    }
    // Mount points for the guest's chroot; documentation is not needed.
    for d in ["proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(tree.join(d))?;
    }
    for d in ["usr/share/doc", "usr/share/man", "usr/share/lintian"] {
        let _ = fs::remove_dir_all(tree.join(d));
    }
    let partial = dir.join("rootfs.tar.partial");
    run(Command::new("tar")
        .arg("cf")
        .arg(&partial)
        .args(["--owner=0", "--group=0", "-C"])
        .arg(&tree)
        .arg("."))?;
    fs::rename(&partial, &tar)?;
    fs::remove_dir_all(&tree)?;
    fs::write(&manifest, files.join("\n"))?;
    Ok(tar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_closure_keeps_real_packages_only() {
        let out = "bpftrace\n  Depends: libc6\n  Depends: <libbpfcc>\n    libbpfcc\nlibc6\n<debconf-2.0>\nbpftrace\n";
        assert_eq!(depends_closure(out), vec!["bpftrace", "libc6"]);
    }

    #[test]
    fn cache_key_is_fnv1a() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn print_uris_gives_file_names() {
        let out = "'http://deb.debian.org/debian/pool/main/b/bpftrace/bpftrace_0.17.0-1_amd64.deb' bpftrace_0.17.0-1_amd64.deb 936508 SHA256:ab\n\
                   'http://x/libbpf1_1%3a1.1.2-0+deb12u1_amd64.deb' libbpf1_1%3a1.1.2-0+deb12u1_amd64.deb 145032 SHA256:cd\n\
                   W: something\n";
        assert_eq!(
            uri_files(out),
            vec![
                "bpftrace_0.17.0-1_amd64.deb",
                "libbpf1_1%3a1.1.2-0+deb12u1_amd64.deb"
            ]
        );
    }
}
