#!/usr/bin/env bash
# One-time (idempotent) setup for building and testing itewatch on Debian 12.
#
# Installs: the Debian packages the build and the VM tests need (LLVM 22 for bpf-linker,
# QEMU and a patched build of it (scripts/qemu-ite.sh), busybox-static, musl; Prometheus and Alertmanager for the agent's tests), the Rust nightly toolchain with rust-src for the BPF crate,
# the musl target for the static guest binary, and bpf-linker. Every step is skipped when
# its result is already present, so running it again is cheap.
#
# Usage: scripts/setup.sh            (build + VM test prerequisites)
#        ITEWATCH_SETUP_MINIMAL=1 scripts/setup.sh   (userspace only: no LLVM/bpf-linker/QEMU)
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }
need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then echo sudo; else
            log "not root and no sudo: cannot install Debian packages"; exit 1
        fi
    fi
}
SUDO=$(need_root)

# Rust itself: install rustup's stable toolchain if cargo is missing.
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        log "installing rustup + stable Rust"
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq curl ca-certificates build-essential >/dev/null
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

debs=(build-essential pkg-config musl-tools cpio tmux)  # tmux: the live view's end-to-end test
debs+=(systemd)  # systemd-analyze: the agent's tests verify deploy/systemd/itewatch-agent.service
if [ -z "${ITEWATCH_SETUP_MINIMAL:-}" ]; then
    debs+=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev qemu-system-x86 busybox-static
           kmod xz-utils zstd)
fi
missing=()
for d in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || missing+=("$d")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The agent's tests against real components (itewatch/tests/agent_real.rs): promtool, a
# Prometheus server and an Alertmanager, which the tests start themselves on loopback ports.
# Debian enables both as services on install; where systemd runs, stop and disable those so
# that the setup leaves no daemon listening on 9090/9093.
prom=()
for d in prometheus prometheus-alertmanager; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || prom+=("$d")
done
if [ ${#prom[@]} -gt 0 ]; then
    log "installing Debian packages: ${prom[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${prom[@]}" >/dev/null
    if [ -d /run/systemd/system ]; then
        for d in "${prom[@]}"; do $SUDO systemctl disable --now "$d" >/dev/null 2>&1 || true; done
    fi
fi

# The VM tests (`cargo xtask vm-test`) `apt-get download` two pinned kernel packages; make
# sure apt knows those versions (the 6.12 one comes from bookworm-security). Keep in step
# with PINNED in xtask/src/kernels.rs.
if [ -z "${ITEWATCH_SETUP_MINIMAL:-}" ]; then
    for kv in linux-image-6.1.0-47-amd64-unsigned=6.1.170-3 \
              'linux-image-6.12.117+deb12-amd64-unsigned=6.12.117-1~deb12u1'; do
        if ! apt-cache show "$kv" >/dev/null 2>&1; then
            log "apt does not know $kv yet: apt-get update"
            $SUDO apt-get update -qq
            break
        fi
    done
fi

rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl ||
    rustup target add x86_64-unknown-linux-musl
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

if [ -z "${ITEWATCH_SETUP_MINIMAL:-}" ]; then
    if ! rustup toolchain list | grep -q '^nightly'; then
        log "installing the nightly toolchain (BPF crate: -Z build-std=core)"
        rustup toolchain install nightly --profile minimal
    fi
    rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' ||
        rustup component add rust-src --toolchain nightly
    if ! command -v bpf-linker >/dev/null 2>&1; then
        log "building bpf-linker against Debian's LLVM 22 (a few minutes)"
        PATH=/usr/lib/llvm-22/bin:$PATH cargo install --locked bpf-linker \
            --no-default-features --features llvm-22
    fi
fi
# The VM matrix's `ite-surprise` scenario runs Debian's QEMU with the emulated invalidation
# time-out (qemu-ite/README.md): built once into a cache outside the work tree, keyed by the
# patch's hash (about 4 minutes; nothing when cached).
if [ -z "${ITEWATCH_SETUP_MINIMAL:-}" ]; then
    "$(dirname "$0")/qemu-ite.sh" >/dev/null
fi
# cargo-fuzz for scripts/fuzz-smoke.sh (needs the nightly toolchain above).
if [ -z "${ITEWATCH_SETUP_MINIMAL:-}" ] && ! command -v cargo-fuzz >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
log "done"
