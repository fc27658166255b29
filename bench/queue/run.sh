#!/usr/bin/env bash
# bench/queue: the embedded queue against RabbitMQ (durable queue, persistent messages,
# publisher confirms, manual acks) on this machine, with the same in-flight window: each
# publisher has one publish awaiting its confirmation at a time.
#
#   bench/queue/run.sh            # DURATION=5s PUBLISHERS="1 16 256" SIZES="12 1024" PENDING=1000000
#
# RabbitMQ must listen on 127.0.0.1:5672 (guest/guest). Prints a table to append to
# bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin surge --bin surge-echo
cd bench/queue
cargo build --release --quiet
exec target/release/surge-bench-queue
