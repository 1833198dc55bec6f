#!/usr/bin/env bash
# Build Debian's QEMU 7.2 x86_64 system emulator with qemu-ite/*.patch applied (the emulated
# VT-d invalidation time-out, qemu-ite/README.md), once, into a cache outside the work tree
# keyed by the patch's hash. Prints the binary's path on stdout; every other line goes to
# stderr. Idempotent: a cached build is reused at no cost.
#
# Usage: scripts/qemu-ite.sh            build if needed, print the path
#        scripts/qemu-ite.sh --path     print the path only if the build is cached (exit 1 if not)
#
# The source is Debian's own package (`apt-get source qemu`), fetched through a private apt
# configuration with a bookworm deb-src line: the system's apt sources are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."

QEMU_VERSION=${ITEWATCH_QEMU_VERSION:-1:7.2+dfsg-7+deb12u18}
cache=${ITEWATCH_QEMU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/itewatch/qemu-ite}
log() { printf 'qemu-ite: %s\n' "$*" >&2; }

patches=(qemu-ite/*.patch)
# The key covers the patches, the QEMU version and this script's build recipe.
key=$( { printf '%s\n' "$QEMU_VERSION"; cat "${patches[@]}"; sed -n '/^# recipe:/,$p' "$0"; } |
       sha256sum | cut -c1-16)
out="$cache/$key"
bin="$out/qemu-system-x86_64"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
if [ "${1:-}" = "--path" ]; then
    log "no cached build for key $key (run scripts/qemu-ite.sh)"
    exit 1
fi

# recipe: everything below is part of the cache key.
for d in ninja-build meson libglib2.0-dev libpixman-1-dev libfdt-dev dpkg-dev; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || {
        log "installing build dependency $d"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$d" >/dev/null
    }
done

apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/src"
cat > "$apt_dir/sources.list" <<'EOF'
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
EOF
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
          -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
dsc="$apt_dir/src/qemu_${QEMU_VERSION#*:}.dsc"
if [ ! -f "$dsc" ]; then
    log "fetching Debian's qemu $QEMU_VERSION source (private apt configuration)"
    apt-get "${apt_opts[@]}" -qq update >&2
    (cd "$apt_dir/src" && apt-get "${apt_opts[@]}" -qq source --download-only "qemu=$QEMU_VERSION" >&2)
fi

build=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$build"' EXIT
log "unpacking and patching in $build"
dpkg-source -x "$dsc" "$build/src" >/dev/null
for p in "${patches[@]}"; do
    patch -d "$build/src" -p1 --quiet < "$p"
done
log "building qemu-system-x86_64 (about 4 minutes on 2 cores)"
(
    cd "$build/src"
    mkdir -p build && cd build
    ../configure --target-list=x86_64-softmmu --without-default-features --disable-docs \
        --disable-tools --disable-user --disable-werror --enable-fdt=system >"$build/configure.log" 2>&1 ||
        { tail -30 "$build/configure.log" >&2; exit 1; }
    ninja qemu-system-x86_64 >"$build/ninja.log" 2>&1 || { tail -40 "$build/ninja.log" >&2; exit 1; }
)
mkdir -p "$out.tmp"
cp "$build/src/build/qemu-system-x86_64" "$out.tmp/"
cp "${patches[@]}" "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
log "built $bin"
echo "$bin"
