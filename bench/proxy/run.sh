#!/usr/bin/env bash
# bench/proxy: Surge's gateway against nginx and HAProxy in front of the same backend.
#
#   apt-get install -y nginx haproxy wrk    # once
#   bench/proxy/run.sh                      # DURATION=10s CONNECTIONS="16 64 256" SIZES="100 65536"
#
# Details in bench/proxy/bench.py; appends a dated table to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin surge --bin surge-echo
exec python3 bench/proxy/bench.py
