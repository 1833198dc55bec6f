//! Rebuild when bpf-linker changes (artifact dependencies cannot express it; cargo#12385).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
