//! Builds the BPF programs (itewatch-ebpf) with aya-build and puts the object in OUT_DIR.
//!
//! `AYA_BUILD_SKIP=1` skips the BPF build (for machines without the nightly toolchain or
//! bpf-linker): the binary then carries no BPF object, and `record`/`live` say so and offer
//! replay and simulate.
use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .map(|p| p.join("itewatch-ebpf"))
        .ok_or_else(|| anyhow::anyhow!("no workspace root"))?;
    println!("cargo:rerun-if-changed={}", root.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.toml").display()
    );
    let root_str = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    share_bpf_target_dir();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "itewatch-ebpf",
            root_dir: root_str,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    let obj = PathBuf::from(std::env::var("OUT_DIR")?).join("itewatch");
    if !obj.exists() {
        // AYA_BUILD_SKIP: an empty object; the loader reports "built without BPF programs".
        std::fs::write(&obj, [])?;
    }
    Ok(())
}

/// aya-build builds the BPF crate in a target directory inside OUT_DIR, which is different for
/// every profile and host target: `cargo clippy`, `cargo test` and the VM's musl release build
/// each built the same BPF object from cold (about 40 s apiece on a 2-core machine). Its
/// arguments (`--release --target bpfel-unknown-none`, the same flags) do not depend on the
/// outer build, so one directory serves them all: OUT_DIR's entry becomes a link to
/// `<target dir>/bpf/itewatch-ebpf`. Cargo's lock on that directory orders builds that run
/// at once. When the link cannot be made (no target directory found, not a Unix file system),
/// aya-build's own directory is used as before.
fn share_bpf_target_dir() {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    // CARGO_TARGET_DIR when the build was given one (absolute), else the outermost ancestor
    // cargo tagged as its target directory (it tags the directories it creates, and
    // `<target dir>/<triple>` of `--target` builds too).
    let Some(target) = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && out.starts_with(d))
        .or_else(|| {
            out.ancestors()
                .filter(|a| a.join("CACHEDIR.TAG").is_file())
                .last()
                .map(Path::to_path_buf)
        })
    else {
        return;
    };
    let shared = target.join("bpf").join("itewatch-ebpf");
    let link = out.join("aya-build").join("target").join("itewatch-ebpf");
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => return,
        // aya-build's own directory from a build before this one: replaced by the link.
        Ok(m) if m.is_dir() => {
            if std::fs::remove_dir_all(&link).is_err() {
                return;
            }
        }
        Ok(_) => return,
        Err(_) => {}
    }
    let made = link
        .parent()
        .is_some_and(|p| std::fs::create_dir_all(p).is_ok())
        && std::fs::create_dir_all(&shared).is_ok();
    #[cfg(unix)]
    if made {
        let _ = std::os::unix::fs::symlink(&shared, &link);
    }
}
