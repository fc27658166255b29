#!/usr/bin/env bash
# bench/cache: cache hits through Surge against Varnish and nginx proxy_cache, and a miss storm.
#
#   apt-get install -y nginx varnish wrk     # once
#   bench/cache/run.sh                       # DURATION=10s CONNECTIONS="16 64 256" SIZES="100 65536"
#
# Details in bench/cache/bench.py; appends a dated table to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin surge
exec python3 bench/cache/bench.py
