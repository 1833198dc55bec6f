#!/usr/bin/env bash
# Every test itewatch has: formatting, lints, unit/property/golden tests, and the VM kernel
# matrix (real Debian 6.1 and 6.12 kernels under QEMU; stock and with the emulated ITE). Run scripts/setup.sh once first.
#
#   scripts/test.sh            everything
#   scripts/test.sh --no-vm    skip the VM matrix (no QEMU / kernel packages needed)
#   scripts/test.sh --fuzz     also the cargo-fuzz sanitizer smoke run (nightly; a cold build
#                              takes far longer than CI's budget: docs/fuzzing.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

vm=1
fuzz=
for a in "$@"; do
    case "$a" in
        --no-vm) vm= ;;
        --fuzz) fuzz=1 ;;
        *) echo "usage: scripts/test.sh [--no-vm] [--fuzz]" >&2; exit 2 ;;
    esac
done

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test"
cargo test

# The fuzz targets' bodies run inside `cargo test` above (tests/fuzz_bodies.rs: the corpus,
# random and mutated inputs). The coverage-guided sanitizer run needs a cold nightly ASAN
# build that does not fit CI's budget on a 2-core runner (docs/fuzzing.md): only with --fuzz.
if [ -n "$fuzz" ]; then
    step "cargo-fuzz smoke run (FUZZ_SECONDS=${FUZZ_SECONDS:-60} per target)"
    scripts/fuzz-smoke.sh
fi

if [ -n "$vm" ]; then
    step "VM kernel matrix (6.1, 6.12; scenarios removals and ite-surprise)"
    cargo xtask vm-test --kernel all
fi
step "all tests passed"
