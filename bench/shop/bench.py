#!/usr/bin/env python3
"""bench/shop: the reference shop under its browse-heavy mix, at rising rates until p99 passes
100 ms, with Surge's response cache and the services' cache-aside on and off.

Run through bench/shop/run.sh, which builds surge and shop (release) first. The shop's
databases (prefix shopbench_) are set up and seeded once (USERS, PRODUCTS, ORDERS: 100,000,
10,000 and 1,000,000 by default), then for each variant surge runs the shipped
examples/shop/surge.toml (the gateway cache on /products removed, or SHOP_CACHE=off, as the
variant says), and `surge load -s examples/shop/scenarios/browse.toml` runs STEP seconds at each
rate of RATES in turn. A step passes when its p99 (from the intended send time) is at most
100 ms and fewer than 1% of its requests fail. For each step the CPU time of everything that
serves (surge, every shop instance, PostgreSQL, Redis; not the load generator) is read from
/proc, so "requests/s per core" is the achieved rate over the cores those processes used. The
instances each pool had at the end of the step come from /status. Everything shares this
machine's two cores with the load generator, so the absolute rates are this machine's.

Appends a dated table to bench/RESULTS.md.
"""

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = (ROOT / os.environ.get("SURGE_BIN_DIR", "target/release")).resolve()
PREFIX = "shopbench_"
USERS = os.environ.get("USERS", "100000")
PRODUCTS = os.environ.get("PRODUCTS", "10000")
ORDERS = os.environ.get("ORDERS", "1000000")
STEP = int(os.environ.get("STEP", "20"))
RATES = [int(r) for r in os.environ.get("RATES", "250 500 1000 1500 2000 3000 4000 5000 6500 8000").split()]
P99_LIMIT_MS = 100.0
GATEWAY = "127.0.0.1:8088"
ADMIN = "127.0.0.1:9988"
VARIANTS = [
    ("gateway cache and cache-aside", True, True),
    ("cache-aside only", False, True),
    ("gateway cache only", True, False),
    ("no cache", False, False),
]


def shop(*args, env=None):
    full = dict(os.environ, SHOP_DATABASE_PREFIX=PREFIX, **(env or {}))
    subprocess.run([str(BIN / "shop"), *args], env=full, check=True)


def ticks():
    return os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total / ticks()


def tree(root):
    """root and every process below it."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def named(*names):
    pids = []
    for name in names:
        out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
        pids.extend(int(p) for p in out.split())
    return pids


def serving(surge):
    """Everything that serves the shop: surge's tree, PostgreSQL's processes, Redis."""
    return tree(surge.pid) + named("postgres", "redis-server")


def status():
    request = urllib.request.Request(f"http://{ADMIN}/status", headers={"Host": "127.0.0.1"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.load(answer)


def instances(sample):
    return {
        pool["service"]: sum(1 for i in pool["instances"] if i["state"] == "ready")
        for pool in sample["services"]
        if pool["kind"] != "worker"
    }


def start(work, gateway_cache, cache_aside, tweak=None):
    """surge up on the shipped configuration in `work`, the caches as asked, `tweak` applied to
    its text; returns once every pool is ready."""
    config = (ROOT / "examples/shop/surge.toml").read_text()
    if tweak:
        config = tweak(config)
    # Where [admin] token_file (relative to surge.toml) looks.
    token = Path(work) / ".surge" / "admin.token"
    config = config.replace("examples/shop/.surge/admin.token", str(token))
    if not gateway_cache:
        config = config.replace(', cache = { grace = "30s" }', "")
    # The load generator is one client standing for many: the per-client limit on /orders
    # would answer most of its orders 429 (cheaply), which is not the work being measured.
    config = config.replace(', rate_limit = { rate = 100, per = "1s", burst = 200 }', "")
    path = Path(work) / "surge.toml"
    path.write_text(config)
    env = dict(os.environ, SHOP_DATABASE_PREFIX=PREFIX, SHOP_ADMIN_TOKEN_FILE=str(token))
    if not cache_aside:
        env["SHOP_CACHE"] = "off"
    shop("setup", env={"SHOP_ADMIN_TOKEN_FILE": str(token)})
    log = open(Path(work) / "surge.log", "w")
    surge = subprocess.Popen([str(BIN / "surge"), "up", "-c", str(path)], env=env, stdout=log, stderr=log)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            sample = status()
            if all(sum(1 for i in p["instances"] if i["state"] == "ready") >= p["desired"] for p in sample["services"]):
                return surge
        except OSError:
            pass
        time.sleep(0.2)
    surge.kill()
    sys.exit(f"the shop did not come up; see {work}/surge.log")


def load(rate, seconds, report):
    scenario = ROOT / "examples/shop/scenarios/browse.toml"
    subprocess.run(
        [str(BIN / "surge"), "load", "-s", str(scenario), "--rate", f"{rate}/s", "-d", f"{seconds}s",
         "-c", "256", "--json", str(report)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    with open(report) as f:
        return json.load(f)


def run_variant(work, name, gateway_cache, cache_aside):
    surge = start(work, gateway_cache, cache_aside)
    steps = []
    try:
        load(100, 10, Path(work) / "warm.json")  # warm the caches and the pools
        for rate in RATES:
            pids = serving(surge)
            before, t0 = cpu_seconds(pids), time.time()
            report = load(rate, STEP, Path(work) / f"step-{rate}.json")
            used = cpu_seconds(pids + [p for p in serving(surge) if p not in pids]) - before
            elapsed = time.time() - t0
            p99 = report["latency_ms"]["p99"]
            failed = report["errors"] / max(report["sent"], 1)
            outcomes = {}
            for kind in report["kinds"]:
                for outcome, count in kind["outcomes"].items():
                    outcomes[outcome] = outcomes.get(outcome, 0) + count
            answered_2xx = sum(n for o, n in outcomes.items() if o.startswith("2")) / max(report["sent"], 1)
            step = {
                "rate": rate,
                "achieved": report["achieved_rate"],
                "p99": p99,
                "failed": failed,
                "cores": used / elapsed,
                "ok": answered_2xx,
                "instances": instances(status()),
            }
            steps.append(step)
            print(f"  {name}: {rate}/s -> {step['achieved']:.0f}/s, p99 {p99:.1f} ms, "
                  f"{failed:.1%} failed, {answered_2xx:.1%} 2xx, {step['cores']:.2f} cores, {step['instances']}", flush=True)
            if p99 > P99_LIMIT_MS or failed >= 0.01:
                break
    finally:
        stop(surge)
    return steps


def stop(surge):
    surge.terminate()
    try:
        surge.wait(timeout=30)
    except subprocess.TimeoutExpired:
        surge.kill()


def prepare():
    """The shopbench_ databases, set up, and seeded unless they hold users already."""
    print(f"seeding {USERS} users, {PRODUCTS} products, {ORDERS} orders (prefix {PREFIX})", flush=True)
    shop("setup")
    counts = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", f"{PREFIX}users", "-Atc", "SELECT count(*) FROM users"],
        capture_output=True, text=True).stdout.strip()
    if counts in ("", "0"):
        shop("seed", "--users", USERS, "--products", PRODUCTS, "--orders", ORDERS)


def main():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    prepare()
    results = []
    for name, gateway_cache, cache_aside in VARIANTS:
        with tempfile.TemporaryDirectory() as work:
            print(f"variant: {name}", flush=True)
            results.append((name, run_variant(work, name, gateway_cache, cache_aside)))
    lines = [
        f"\n## bench/shop, {datetime.date.today()} (commit {commit})\n",
        f"`bench/shop/run.sh` (STEP={STEP}s, RATES={' '.join(map(str, RATES))}): the browse-heavy mix "
        f"(examples/shop/scenarios/browse.toml) on {USERS} users, {PRODUCTS} products and {ORDERS} orders, "
        "release builds, everything on this machine's 2 cores (the load generator too). The best step is the "
        "highest rate whose p99 stayed at or under 100 ms with under 1% failed; cores are the CPU time of "
        "surge, the shop's instances, PostgreSQL and Redis over the step. The per-client rate limit on /orders is "
        "off for the run (the generator is one client standing for many).\n",
        "| variant | best step (req/s achieved) | answered 2xx | p99 ms | cores used | req/s per core | instances (ready) at that step | first step past the limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, steps in results:
        good = [s for s in steps if s["p99"] <= P99_LIMIT_MS and s["failed"] < 0.01]
        bad = [s for s in steps if not (s["p99"] <= P99_LIMIT_MS and s["failed"] < 0.01)]
        past = (f"{bad[0]['rate']}/s: p99 {bad[0]['p99']:.0f} ms, {bad[0]['failed']:.1%} failed" if bad
                else "none within the rates tried")
        if not good:
            lines.append(f"| {name} | none | | | | | | {past} |")
            continue
        best = good[-1]
        pools = ", ".join(f"{k} {v}" for k, v in sorted(best["instances"].items()))
        per_core = best["achieved"] / best["cores"] if best["cores"] > 0 else 0
        lines.append(f"| {name} | {best['achieved']:.0f} | {best['ok']:.1%} | {best['p99']:.1f} | {best['cores']:.2f} | "
                     f"{per_core:.0f} | {pools} | {past} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(ROOT / "bench/RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
