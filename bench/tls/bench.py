#!/usr/bin/env python3
"""bench/tls: Surge's gateway terminating TLS against nginx, both in front of the same nginx backend
serving 100 bytes, with the same ECDSA P-256 certificate.

Run through bench/tls/run.sh, which builds surge first. Each proxy runs one worker pinned to core 1;
the backend and wrk share core 0. Two measurements per proxy, each with wrk over HTTPS:
- keep-alive: CONNECTIONS connections, many requests each (the cost of encrypting);
- handshakes: `Connection: close` on every request, so each request is a new TCP connection and a
  full TLS handshake (wrk never resumes sessions).
The proxies take turns for ROUNDS rounds (default 3); each figure is the median of its rounds, since
one round on a shared machine can be off by a third. Reports requests/s, p99 and the proxy's CPU time
per request or handshake (from /proc), as ratios to nginx, and the protocol and cipher negotiated. Appends a dated table to bench/RESULTS.md.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "proxy"))
import bench  # noqa: E402  bench/proxy's helpers: processes, ports, wrk, CPU time

DURATION = os.environ.get("DURATION", "10s")
CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SIZE = 100


def certificate(work):
    cert, key = work.path("cert.pem"), work.path("key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


def nginx_tls(work, port, backend_port, cert, key):
    return bench.nginx_proxy(work, port, backend_port, tls=(cert, key))


def surge_tls(work, port, backend_port, cert, key):
    gateway = f'listen_tls = "127.0.0.1:{port}"\ntls = {{ cert = "{cert}", key = "{key}" }}'
    conf = bench.surge_config(work, bench.free_port(), backend_port, health=f'path = "/{SIZE}"', gateway=gateway)
    return work.spawn([bench.SURGE, "up", "-c", conf], bench.PROXY_CORE, env={"SURGE_LOG": "warn"})


def negotiated(port):
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost"],
        input="", capture_output=True, text=True, timeout=10,
    ).stdout
    line = next((l for l in out.splitlines() if l.startswith("New, ")), "?")
    return line.removeprefix("New, ").replace(", Cipher is ", " ")


def main():
    bench.require("bench/tls", ["nginx", "wrk", "openssl", "taskset"], "nginx wrk openssl")
    bench.run_in_work(run)


def run(work):
    cert, key = certificate(work)
    origin_port = bench.free_port()
    bench.nginx_origin(work, origin_port, [SIZE])
    bench.wait_port(origin_port, "the nginx backend")
    rounds = {"nginx": [], "surge": []}
    suites = {}
    for _ in range(ROUNDS):
        for name, start in [("nginx", nginx_tls), ("surge", surge_tls)]:
            port = bench.free_port()
            process = start(work, port, origin_port, cert, key)
            bench.wait_port(port, name)
            time.sleep(0.5)
            url = f"https://localhost:{port}/{SIZE}"
            bench.wrk(url, 16, bench.SHARED_CORE, "2s")  # warm-up
            suites[name] = negotiated(port)
            kept = bench.measure(process, url, CONNECTIONS, DURATION)
            fresh = bench.measure(process, url, CONNECTIONS, DURATION, ["Connection: close"])
            work.stop(process)
            rounds[name].append((kept, fresh))
            for what, m in [("keep-alive", kept), ("handshakes", fresh)]:
                print(f"{name:6} {what:10} {m['rps']:>9,.0f}/s  p99 {m['p99']:.2f} ms  cpu {m['cpu_us']:.1f} µs",
                      file=sys.stderr)
    results = []
    for name, measured in rounds.items():
        keys = ("rps", "p99", "cpu_us", f"busy_{bench.PROXY_CORE}", f"busy_{bench.SHARED_CORE}")
        kept, fresh = (bench.median([m[i] for m in measured], keys) for i in (0, 1))
        results.append((name, suites[name], kept, fresh))
    report(results)


def report(results):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    day = bench.datetime.now(bench.timezone.utc).strftime("%Y-%m-%d")
    base = {what: m for what, m in [("keep-alive", results[0][2]), ("handshakes", results[0][3])]}
    lines = [
        f"### tls, {day}, {os.cpu_count()} cores ({cpu})",
        "",
        f"Code at `{bench.commit()}`.",
        "",
        f"`bench/tls/run.sh` (DURATION={DURATION}, {CONNECTIONS} connections, median of {ROUNDS} rounds): wrk over HTTPS to each proxy "
        f"terminating TLS with one ECDSA P-256 certificate, in front of nginx serving {SIZE} B; each proxy one "
        f"worker pinned to core {bench.PROXY_CORE}, backend and wrk on core {bench.SHARED_CORE}. `handshakes` "
        "sends `Connection: close`, so every request is a new connection with a full handshake. "
        "CPU is the proxy's user + system time per request; busy is how much of each core was in use "
        "(the proxy's, and the one wrk and the backend share). Ratios are to nginx.",
        "",
        "| proxy | negotiated | mode | req/s | × nginx | p99 ms | p99 × nginx | CPU µs/req | CPU × nginx "
        "| busy proxy core | busy client core |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, suite, kept, fresh in results:
        for what, m in [("keep-alive", kept), ("handshakes", fresh)]:
            b = base[what]
            lines.append(
                f"| {name} | {suite} | {what} | {m['rps']:,.0f} | {m['rps'] / b['rps']:.2f} | {m['p99']:.2f} "
                f"| {m['p99'] / b['p99']:.2f} | {m['cpu_us']:.1f} | {m['cpu_us'] / b['cpu_us']:.2f} "
                f"| {m[f'busy_{bench.PROXY_CORE}']:.0%} | {m[f'busy_{bench.SHARED_CORE}']:.0%} |"
            )
    lines.append("")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(bench.ROOT, "bench", "RESULTS.md"), "a") as f:
        f.write("\n" + table)


if __name__ == "__main__":
    main()
