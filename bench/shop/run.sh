#!/usr/bin/env bash
# bench/shop: the reference shop at rising rates, caches on and off (see bench.py).
#   bench/shop/run.sh                       # about 20 minutes, after seeding 1,000,000 orders
#   STEP=10 RATES="200 400 800" bench/shop/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p surge -p surge-shop
exec python3 bench/shop/bench.py
