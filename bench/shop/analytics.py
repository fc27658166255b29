#!/usr/bin/env python3
"""bench/shop/analytics.py: sales by category over 1,000,000 orders, counted by 1, 2 and 4
workers (issue 18's batch job: one message per range of the orders table, each range counted by
a worker of the `analytics` pool, the partial counts merged).

Run after bench/shop/run.sh has built the release binaries (or with SURGE_BIN_DIR); it sets up
and seeds the shopbench_ databases if they are empty (USERS, PRODUCTS, ORDERS). For each worker
count the shipped examples/shop/surge.toml runs with the analytics pool fixed at that many
instances, and the job (PARTITIONS ranges, 16 by default) is started and polled until done; the
time reported is the job's own, from its start to its last range counted. ROUNDS rounds each,
the median reported. Appends a table to bench/RESULTS.md.
"""

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  bench/shop's helpers: setup, seed, starting the shop

PARTITIONS = int(os.environ.get("PARTITIONS", "16"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
WORKERS = [int(w) for w in os.environ.get("WORKERS", "1 2 4").split()]


def fixed_pool(config, workers):
    """The analytics pool at exactly `workers` instances, not autoscaled."""
    block = re.search(r"\[workers\.analytics\].*?(?=\n\[)", config, re.S).group(0)
    fixed = re.sub(r"instances = \{[^}]*\}", f"instances = {{ min = {workers}, max = {workers} }}", block)
    fixed = re.sub(r"\nautoscale = \{[^}]*\}", "", fixed)
    return config.replace(block, fixed)


def call(method, path):
    request = urllib.request.Request(f"http://{bench.GATEWAY}{path}", method=method)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, json.load(answer)


def job_seconds():
    status, started = call("POST", f"/reports/sales-by-category?partitions={PARTITIONS}")
    job = started["job_id"]
    deadline = time.time() + 600
    while time.time() < deadline:
        status, answer = call("GET", f"/reports/sales-by-category/{job}")
        if status == 200:
            return answer["seconds"], sum(answer["sales"].values())
        time.sleep(0.2)
    sys.exit(f"job {job} did not finish")


def main():
    bench.prepare()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=bench.ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    for workers in WORKERS:
        with tempfile.TemporaryDirectory() as work:
            surge = bench.start(work, True, True, lambda config, w=workers: fixed_pool(config, w))
            try:
                times = []
                for _ in range(ROUNDS):
                    seconds, sales = job_seconds()
                    times.append(seconds)
                    print(f"  {workers} workers: {seconds:.2f} s ({sales} order lines counted)", flush=True)
                rows.append((workers, statistics.median(times), min(times), max(times), sales))
            finally:
                bench.stop(surge)
    lines = [
        f"\n## bench/shop/analytics.py, {datetime.date.today()} (commit {commit})\n",
        f"`python3 bench/shop/analytics.py` with release binaries (`cargo build --release -p surge -p surge-shop`; PARTITIONS={PARTITIONS}, ROUNDS={ROUNDS}): "
        f"sales by category over {bench.ORDERS} orders, one message a range, each counted by a worker of the "
        "`analytics` pool fixed at 1, 2 or 4 instances; the job's own time from its start to its last range "
        "counted, median of the rounds. This machine has 2 cores, shared by PostgreSQL, surge and the workers.\n",
        "| workers | seconds (median) | fastest | slowest | order lines counted |",
        "|---|---|---|---|---|",
    ]
    for workers, median, fastest, slowest, sales in rows:
        lines.append(f"| {workers} | {median:.2f} | {fastest:.2f} | {slowest:.2f} | {sales} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(bench.ROOT / "bench/RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
