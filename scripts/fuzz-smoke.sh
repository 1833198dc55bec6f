#!/usr/bin/env bash
# Bounded fuzzing smoke run for CI: each cargo-fuzz target for FUZZ_SECONDS (default 60),
# seeded with the test corpus. Longer runs: docs/fuzzing.md.
#
# Usage: scripts/fuzz-smoke.sh [target...]      (default: analyze_log trace_reader)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(analyze_log trace_reader)
export AYA_BUILD_SKIP=1
command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz-smoke: cargo-fuzz missing (scripts/setup.sh installs it)" >&2; exit 1; }
mkdir -p fuzz/corpus/analyze_log fuzz/corpus/trace_reader
cp -n itewatch/tests/data/logs/* fuzz/corpus/analyze_log/ 2>/dev/null || true
rm -f fuzz/corpus/analyze_log/manifest.json
for k in 6.1 6.12; do
    cp -n "itewatch/tests/data/vm/$k/dmesg.txt" "fuzz/corpus/analyze_log/vm-$k-dmesg.txt" 2>/dev/null || true
    cp -n "itewatch/tests/data/vm/$k/trace.itw" "fuzz/corpus/trace_reader/vm-$k.itw" 2>/dev/null || true
done
for t in "${targets[@]}"; do
    echo "fuzz-smoke: $t for ${secs}s" >&2
    (cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=262144 -timeout=10 -print_final_stats=1)
done
echo "fuzz-smoke: ok" >&2
