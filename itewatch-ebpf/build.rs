//! Rebuild when bpf-linker changes (artifact dependencies cannot express it; cargo#12385), and
//! keep memset/memcpy out of the object as functions of their own: 6.1's verifier rejects a
//! call to a global subprogram with a stack pointer argument ("reg type unsupported for arg#0
//! function memset"), which 6.12 accepts. Without the exported builtins LLVM expands them
//! inline.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--disable-memory-builtins");
    }
}
