#!/usr/bin/env bash
# bench/tls: Surge's gateway terminating TLS against nginx, in front of the same nginx backend.
#
#   apt-get install -y nginx wrk openssl    # once
#   bench/tls/run.sh                        # DURATION=10s CONNECTIONS=64
#
# Details in bench/tls/bench.py; appends a dated table to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin surge
exec python3 bench/tls/bench.py
