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

# Compiled crates are kept between runs outside the work tree, like the patched QEMU
# (scripts/qemu-ite.sh): a fresh clone then compiles only what changed, itewatch's own crates
# and what depends on them, instead of every dependency three times over (clippy, test, the
# guest's musl release build). An explicit CARGO_TARGET_DIR wins; ITEWATCH_TARGET_DIR moves
# the cache. Past 24 GiB it is emptied and starts again (each clone path adds its own copy
# of the workspace's crates).
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
    CARGO_TARGET_DIR=${ITEWATCH_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/itewatch/target}
    export CARGO_TARGET_DIR
    if [ -d "$CARGO_TARGET_DIR" ] &&
        [ "$(du -s --block-size=1G "$CARGO_TARGET_DIR" | cut -f1)" -gt 24 ]; then
        printf 'test.sh: %s is over 24 GiB: emptying it\n' "$CARGO_TARGET_DIR" >&2
        rm -rf "$CARGO_TARGET_DIR"
    fi
fi
printf 'test.sh: build directory %s\n' "$CARGO_TARGET_DIR" >&2

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
