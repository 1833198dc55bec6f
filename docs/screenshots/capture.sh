#!/usr/bin/env bash
# Regenerates the screenshots of `itewatch live` in this directory: runs the real binary in a
# tmux pane (120x40), drives it with send-keys, captures the screen with its colours
# (capture-pane -e) and turns it into SVG (ansi2svg.py).
#
# Usage: docs/screenshots/capture.sh [path/to/itewatch]   (default: target/release/itewatch)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-target/release/itewatch}
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
s=itewatch-shots-$$
# A tmux server of its own (its socket in a temporary directory): never touches the user's
# sessions, and leaves nothing behind.
sockdir=$(mktemp -d)
t() { tmux -S "$sockdir/tmux.sock" -f /dev/null "$@"; }
trap 't kill-server 2>/dev/null || true; rm -rf "$sockdir"' EXIT

shot() { # shot NAME TITLE
    t capture-pane -e -p -t "$s" | python3 "$here/ansi2svg.py" "$2" > "$here/$1.svg"
    echo "wrote $here/$1.svg"
}
start() { # start COMMAND...
    t kill-session -t "$s" 2>/dev/null || true
    t new-session -d -s "$s" -x 120 -y 40 "$*; sleep 60"
    sleep "${WAIT:-2}"
}

# Main view at the end of a simulated W1 race, and its incident detail (the CPU lanes).
start "$bin" live --simulate w1-driver-inflight --seed 3
shot main "itewatch live --simulate w1-driver-inflight --seed 3"
t send-keys -t "$s" Tab Tab Enter; sleep 0.5
shot detail-w1 "Enter on the W1 incident: per-CPU lanes, explanation, upstream fixes"

# A hung invalidation, about 1.2 s into the hang (played in real time).
WAIT=1.3 start "$bin" live --simulate hang-no-hotplug --seed 0
shot hung "itewatch live --simulate hang-no-hotplug: a hung invalidation"

# The help screen.
t send-keys -t "$s" '?'; sleep 0.3
shot help "? : keys"

# This machine cannot trace: the one-screen explanation, then the bundled VM trace.
WAIT=6 start "$bin" live
shot cannot-trace "itewatch live on a host without VT-d / kprobes / BPF object"
t send-keys -t "$s" Enter; sleep 2
shot bundled-vm-trace "Enter: the trace recorded in the VM test (Linux 6.1), replayed"
