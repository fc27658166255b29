#!/usr/bin/env bash
# bench/scale: the autoscaler live against `surge sim` on the same load (about 6 minutes).
#
#   bench/scale/run.sh            # STARTUP=2s TRACE_FROM=180 TRACE_SECONDS=600 SPEEDUP=4 SCALE=2
#
# Details in bench/scale/bench.py; appends a dated table to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${SURGE_BIN_DIR:-}" ]; then
  cargo build --release --quiet --bin surge --bin surge-echo
fi
exec python3 bench/scale/bench.py
