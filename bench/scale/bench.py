#!/usr/bin/env python3
"""bench/scale: does `surge sim` predict the live autoscaler?

The same load runs twice: live, through `surge up` (surge-echo instances that start in
STARTUP and serve 4 requests at once for 100 ms each) driven by `surge load` with a trace
shape, and in `surge sim` with a model calibrated to those instances (4 slots, 100 ms fixed
service time, the start-up measured from the live run's "is ready after" log lines). The
loads: a step (20 -> 200 -> 20 requests/s) and a compressed slice of the Azure code trace
(data/traces, CC-BY 4.0). Compared: instance-seconds (starting, ready and draining instances),
time to SLO after the step (p99 of each second back under 1 s for 30 s running) and
reversals of the desired count. The goal (issue 15): instance-seconds within 15%, time to SLO
within 2 s.

Environment: SURGE_BIN_DIR (target/release), STARTUP (2s), TRACE_FROM (180, seconds into the
trace), TRACE_SECONDS (600), SPEEDUP (4), SCALE (2).
"""

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = (ROOT / os.environ.get("SURGE_BIN_DIR", "target/release")).resolve()
STARTUP = os.environ.get("STARTUP", "2s")
SLOTS = 4
SERVICE_MS = 100
MAX = 30
SLO_S = 1.0
HOLD = 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_arrivals():
    """20 requests/s for 30 s, 200/s for 90 s, 20/s for 30 s, evenly spaced."""
    times, t = [], 0.0
    for rate, length in ((20, 30), (200, 90), (20, 30)):
        end = t + length
        while t < end - 1e-9:
            times.append(t)
            t += 1.0 / rate
        t = end
    return times, 30


def trace_slice():
    """TRACE_SECONDS of the Azure trace from TRACE_FROM, compressed by SPEEDUP."""
    start = float(os.environ.get("TRACE_FROM", "180"))
    length = float(os.environ.get("TRACE_SECONDS", "600"))
    speedup = float(os.environ.get("SPEEDUP", "4"))
    lines = (ROOT / "data/traces/azure-llm-2023-code.csv").read_text().splitlines()[1:]
    stamps = [
        datetime.datetime.strptime(line.split(",")[0][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        for line in lines
    ]
    first = stamps[0]
    chosen = [(s - first - start) / speedup for s in stamps if start <= s - first < start + length]
    return chosen, None


def write_csv(path, times):
    path.write_text("t\n" + "".join(f"{t:.6f}\n" for t in times))


def parse_duration(text):
    value = re.match(r"([0-9.]+)(ns|µs|us|ms|s)", text)
    number, unit = float(value.group(1)), value.group(2)
    return number * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def reversals(series):
    count, last = 0, 0
    for a, b in zip(series, series[1:]):
        direction = (b > a) - (b < a)
        if direction == 0:
            continue
        if last and direction != last:
            count += 1
        last = direction
    return count


def time_to_slo(p99s, errors, step):
    if step is None:
        return None
    for start in range(step, len(p99s)):
        window = range(start, min(start + HOLD, len(p99s)))
        if all(p99s[s] <= SLO_S and errors[s] == 0 for s in window):
            return start - step
    return None


def live(name, csv, scale, step, work):
    gateway, admin = free_port(), free_port()
    config = work / f"{name}.toml"
    config.write_text(
        f"""[gateway]
listen = "127.0.0.1:{gateway}"

[admin]
listen = "127.0.0.1:{admin}"

[services.web]
command = "{BIN / 'surge-echo'}"
routes = ["/"]
env = {{ SURGE_ECHO_CONCURRENCY = "{SLOTS}", SURGE_ECHO_STARTUP = "{STARTUP}" }}
instance_concurrency = {SLOTS}
instances = {{ min = 1, max = {MAX}, initial = 1 }}
buffer = {{ requests = 100000, timeout = "30s" }}
autoscale = {{ target = {SLOTS} }}
"""
    )
    scenario = work / f"{name}-load.toml"
    scenario.write_text(
        f"""target = "http://127.0.0.1:{gateway}"
connections = 1024
timeout = "35s"

[shape]
kind = "trace"
file = "{csv.name}"
scale = {scale}

[[requests]]
path = "/work?delay={SERVICE_MS}ms"
"""
    )
    log = open(work / f"{name}-surge.log", "w")
    surge = subprocess.Popen([BIN / "surge", "up", "-c", config], stdout=log, stderr=subprocess.STDOUT)
    try:
        status_url = f"http://127.0.0.1:{admin}/status"
        for _ in range(200):
            try:
                pools = json.load(urllib.request.urlopen(status_url, timeout=1))["services"]
                if any(i["state"] == "ready" for i in pools[0]["instances"]):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            sys.exit(f"surge did not become ready; see {log.name}")

        samples, done = [], threading.Event()

        def watch():
            started = time.monotonic()
            while not done.is_set():
                try:
                    pool = json.load(urllib.request.urlopen(status_url, timeout=1))["services"][0]
                    paid = sum(1 for i in pool["instances"] if i["state"] not in ("exited", "stopping"))
                    samples.append((time.monotonic() - started, paid, pool["desired"]))
                except OSError:
                    pass
                time.sleep(0.25)

        watcher = threading.Thread(target=watch)
        watcher.start()
        report_path = work / f"{name}-report.json"
        load = subprocess.run(
            [BIN / "surge", "load", "-s", scenario, "--json", report_path],
            capture_output=True,
            text=True,
        )
        done.set()
        watcher.join()
        if load.returncode != 0:
            sys.exit(f"surge load failed:\n{load.stderr}")
    finally:
        surge.terminate()
        surge.wait(timeout=60)
        log.close()

    report = json.loads(report_path.read_text())
    timeline = report["timeline"]
    p99s = [s["p99_ms"] / 1e3 for s in timeline]
    errors = [s["errors"] for s in timeline]
    length = len(timeline)
    # Instance-seconds over the load's length, from the 0.25 s samples.
    instance_seconds, desired_per_second = 0.0, []
    for (at, paid, _), following in zip(samples, samples[1:] + [(length, 0, 0)]):
        if at >= length:
            break
        instance_seconds += paid * (min(following[0], length) - at)
    for second in range(length):
        before = [d for (at, _, d) in samples if at <= second + 1]
        desired_per_second.append(before[-1] if before else 1)
    startups = [
        parse_duration(m.group(1))
        for m in re.finditer(r"is ready after ([0-9.]+(?:ns|µs|us|ms|s))", (work / f"{name}-surge.log").read_text())
    ]
    return {
        "instance_seconds": instance_seconds,
        "time_to_slo_s": time_to_slo(p99s, errors, step),
        "reversals": reversals(desired_per_second),
        "sent": report["sent"],
        "errors": report["errors"],
        "startup_s": sum(startups) / len(startups) if startups else None,
        "startups": len(startups),
    }


def simulated(name, csv, scale, step, startup_s, work):
    out = work / f"{name}-sim.json"
    args = [
        BIN / "surge", "sim", "--trace", csv, "--scale", str(scale),
        "--slots", str(SLOTS), "--service", f"{SERVICE_MS}ms", "--service-extra", "0s",
        "--startup", f"{startup_s * 1000:.0f}ms", "--slo", f"{SLO_S}s",
        "--min", "1", "--max", str(MAX), "--initial", "1", "--json", out,
    ]
    if step is not None:
        args += ["--step-at", str(step)]
    subprocess.run(args, check=True, capture_output=True)
    row = next(r for r in json.loads(out.read_text())["rows"] if r["policy"] == "surge")
    return {
        "instance_seconds": row["instance_seconds"],
        "time_to_slo_s": row["time_to_slo_s"],
        "reversals_per_hour": row["reversals_per_hour"],
        "requests": row["requests"],
        "dropped": row["dropped"],
    }


def main():
    work = Path(tempfile.mkdtemp(prefix="surge-bench-scale-"))
    loads = {"step": step_arrivals(), "trace": trace_slice()}
    scale = {"step": 1, "trace": float(os.environ.get("SCALE", "2"))}
    rows = []
    for name, (times, step) in loads.items():
        csv = work / f"{name}.csv"
        write_csv(csv, times)
        print(f"{name}: {len(times)} arrivals x {scale[name]} over {times[-1]:.0f} s, live...", file=sys.stderr)
        measured = live(name, csv, scale[name], step, work)
        startup = measured["startup_s"] or parse_duration(STARTUP)
        sim = simulated(name, csv, scale[name], step, startup, work)
        length_h = (times[-1] + 1) / 3600
        rows.append((name, measured, sim, length_h))
        print(json.dumps({"live": measured, "sim": sim}), file=sys.stderr)

    lines = [
        "",
        f"### scale (sim against live), {datetime.date.today()}, {os.cpu_count()} cores",
        "",
        f"`bench/scale/run.sh` (SURGE_BIN_DIR={BIN.relative_to(ROOT) if BIN.is_relative_to(ROOT) else BIN}, "
        f"STARTUP={STARTUP}): surge-echo instances of {SLOTS} slots x {SERVICE_MS} ms, 1 to {MAX} instances; "
        "the simulator's start-up is the mean of the live run's.",
        "",
        "| load | requests (live errors) | start-up live (n) | instance-s live | instance-s sim | sim/live | time to SLO live | sim | reversals live | sim |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, measured, sim, length_h in rows:
        ratio = sim["instance_seconds"] / max(measured["instance_seconds"], 1e-9)
        show = lambda t: "-" if t is None else f"{t} s"
        lines.append(
            f"| {name} | {measured['sent']:,} ({measured['errors']}) | "
            f"{measured['startup_s'] or 0:.2f} s ({measured['startups']}) | {measured['instance_seconds']:,.0f} | "
            f"{sim['instance_seconds']:,.0f} | {ratio:.2f} | {show(measured['time_to_slo_s'])} | "
            f"{show(sim['time_to_slo_s'])} | {measured['reversals']} | {sim['reversals_per_hour'] * length_h:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a") as results:
        results.write(text)


if __name__ == "__main__":
    main()
