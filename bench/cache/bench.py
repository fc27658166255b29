#!/usr/bin/env python3
"""bench/cache: cache hits through Surge's response cache against Varnish and nginx's
proxy_cache, in front of the same origin; and a miss storm on cold keys.

Run through bench/cache/run.sh, which builds surge first. The origin is nginx serving files of
each size with `Cache-Control: public, max-age=3600`, one worker, on core 0 with wrk. Each cache
runs pinned to core 1 (nginx `worker_processes 1`; Varnish `thread_pools=1` with a thread for
each connection started ahead, the whole process on that core; Surge's runtime sees one core). For each object size and connection count, wrk
measures hits (the object is fetched once first); the caches take turns, ROUNDS times, and the
median of each figure is reported: requests/s, p50, p99 and the cache's CPU time per request,
as ratios to Varnish and to nginx.

The miss storm: for each cache, STORM_KEYS cold keys, each asked by 256 connections at once
(wrk for 2 s on a key no one asked before); the origin's access log says how many requests
reached it per key (the goal: exactly one). Appends a dated table to bench/RESULTS.md.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "proxy"))
import bench  # noqa: E402  bench/proxy's helpers: processes, ports, wrk, CPU time

DURATION = os.environ.get("DURATION", "10s")
CONNECTIONS = [int(c) for c in os.environ.get("CONNECTIONS", "16 64 256").split()]
SIZES = [int(s) for s in os.environ.get("SIZES", "100 65536").split()]
STORM_KEYS = int(os.environ.get("STORM_KEYS", "3"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
STORM_CONNECTIONS = 256


def origin(work, port):
    """nginx serving `/<size>` and `/cold/<anything>` (the smallest file) with an hour's
    freshness, logging every request it gets."""
    fresh = 'add_header Cache-Control "public, max-age=3600";'
    return bench.nginx_origin(work, port, SIZES, access_log=work.path("origin-access.log"),
                              extra=f"{fresh}\n    location /cold/ {{ try_files /{SIZES[0]} =404; {fresh} }}")


def nginx_cache(work, port, origin_port):
    cache_dir = work.path(f"nginx-cache-{port}")
    os.makedirs(cache_dir, exist_ok=True)
    conf = work.path(f"nginx-cache-{port}.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {work.path(f'nginx-cache-{port}.pid')};
error_log {work.path('nginx-cache-error.log')};
events {{ worker_connections 19000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {work.dir}; proxy_temp_path {work.dir}; fastcgi_temp_path {work.dir};
  uwsgi_temp_path {work.dir}; scgi_temp_path {work.dir};
  proxy_cache_path {cache_dir} levels=1:2 keys_zone=bench:16m max_size=256m inactive=1h use_temp_path=off;
  upstream origin {{
    server 127.0.0.1:{origin_port};
    keepalive 512;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10s;
      add_header Cache-Status $upstream_cache_status;
    }}
  }}
}}
""")
    return work.spawn(["nginx", "-c", conf, "-p", work.dir], bench.PROXY_CORE)


def varnish(work, port, origin_port):
    name = work.path(f"varnish-{port}")
    return work.spawn(
        ["varnishd", "-F", "-n", name, "-a", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{origin_port}",
         "-s", "malloc,256m", "-p", "thread_pools=1", "-p", f"thread_pool_min={max(CONNECTIONS) + 50}",
         "-p", f"thread_pool_max={max(CONNECTIONS) + 200}"],
        bench.PROXY_CORE,
    )


def surge(work, port, origin_port):
    conf = work.path(f"surge-{port}.toml")
    with open(conf, "w") as f:
        f.write(f"""
[gateway]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{bench.free_port()}"
[services.origin]
upstreams = ["127.0.0.1:{origin_port}"]
routes = [{{ prefix = "/", cache = {{ memory = "256MiB" }} }}]
health = {{ path = "/{SIZES[0]}" }}
""")
    return work.spawn([bench.SURGE, "up", "-c", conf], bench.PROXY_CORE, env={"SURGE_LOG": "warn"})


def origin_requests(work, path):
    try:
        with open(work.path("origin-access.log")) as f:
            return sum(1 for line in f if f'"GET {path} ' in line)
    except OSError:
        return 0


def main():
    bench.require("bench/cache", ["nginx", "varnishd", "wrk", "taskset"], "nginx varnish wrk")
    bench.run_in_work(run)


def run(work):
    origin_port = bench.free_port()
    origin(work, origin_port)
    bench.wait_port(origin_port, "the nginx origin")
    caches = [("varnish", varnish), ("nginx", nginx_cache), ("surge", surge)]
    rounds, storms = [], []
    for round_number in range(ROUNDS):
        hits = []
        for name, start in caches:
            hits_and_storm(work, origin_port, name, start, hits, storms if round_number == 0 else None)
        rounds.append(hits)
    report(median_of(rounds), storms)


def median_of(rounds):
    """Each figure's median over the rounds."""
    by_key = {}
    for hits in rounds:
        for size, connections, name, m in hits:
            by_key.setdefault((size, connections, name), []).append(m)
    return [(size, connections, name, bench.median(ms, ("rps", "p50", "p99", "cpu_us", "sys_us", "busy_cache", "busy_client")))
            for (size, connections, name), ms in by_key.items()]


def hits_and_storm(work, origin_port, name, start, hits, storms):
    """One round of hits through one cache (and, when `storms` is given, its miss storm)."""
    port = bench.free_port()
    process = start(work, port, origin_port)
    bench.wait_port(port, name, timeout=30)
    time.sleep(1)
    for size in SIZES:
        url = f"http://127.0.0.1:{port}/{size}"
        bench.wrk(url, 16, bench.SHARED_CORE, "2s")  # fills the cache, warms up
        for connections in CONNECTIONS:
            m = bench.measure(process, url, connections)
            m["busy_cache"], m["busy_client"] = m[f"busy_{bench.PROXY_CORE}"], m[f"busy_{bench.SHARED_CORE}"]
            hits.append((size, connections, name, m))
            print(f"{name:8} {size:>6} B {connections:>3} conns {m['rps']:>10,.0f} req/s  p50 {m['p50']:.2f} ms"
                  f"  p99 {m['p99']:.2f} ms  cpu {m['cpu_us']:.1f} µs/req", file=sys.stderr)
    upstream = []
    for key in range(STORM_KEYS if storms is not None else 0):
        path = f"/cold/{name}-{key}-{time.time_ns()}"
        bench.wrk(f"http://127.0.0.1:{port}{path}", STORM_CONNECTIONS, bench.SHARED_CORE, "2s")
        time.sleep(0.2)
        upstream.append(origin_requests(work, path))
    if storms is not None:
        storms.append((name, upstream))
        print(f"{name:8} miss storm: origin requests per cold key {upstream}", file=sys.stderr)
    work.stop(process)


def report(hits, storms):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    day = bench.datetime.now(bench.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"### cache, {day}, {os.cpu_count()} cores ({cpu})",
        "",
        f"Code at `{bench.commit()}`.",
        "",
        f"`bench/cache/run.sh` (DURATION={DURATION}, ROUNDS={ROUNDS}, medians): cache hits, wrk closed loop; each cache pinned to core "
        f"{bench.PROXY_CORE} (Varnish `thread_pools=1`, nginx `worker_processes 1` with `proxy_cache`, Surge's "
        f"runtime sees one core), the nginx origin and wrk on core {bench.SHARED_CORE}. Ratios are to Varnish "
        "(higher req/s is better; lower latency and CPU are better). CPU is the cache's user + system time per request, "
        "kernel its system time alone; busy is how much of each core was in use (the cache's, and wrk's with the origin's).",
        "",
        "| body | conns | cache | req/s | × varnish | × nginx | p50 ms | p99 ms | p99 × varnish | p99 × nginx "
        "| CPU µs/req | CPU × varnish | kernel µs/req | busy cache core | busy client core |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    index = {(s, c, n): m for s, c, n, m in hits}
    for size in SIZES:
        for connections in CONNECTIONS:
            base = index[(size, connections, "varnish")]
            other = index[(size, connections, "nginx")]
            for name in ["varnish", "nginx", "surge"]:
                m = index[(size, connections, name)]
                body = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
                lines.append(
                    f"| {body} | {connections} | {name} | {m['rps']:,.0f} | {m['rps'] / base['rps']:.2f} "
                    f"| {m['rps'] / other['rps']:.2f} | {m['p50']:.2f} | {m['p99']:.2f} "
                    f"| {m['p99'] / base['p99']:.2f} | {m['p99'] / other['p99']:.2f} | {m['cpu_us']:.1f} "
                    f"| {m['cpu_us'] / base['cpu_us']:.2f} | {m['sys_us']:.1f} | {m['busy_cache']:.0%} "
                    f"| {m['busy_client']:.0%} |"
                )
    lines += [
        "",
        f"Miss storm: {STORM_CONNECTIONS} connections at once on a cold key for 2 s; requests that reached the "
        "origin, per key:",
        "",
        "| cache | origin requests per cold key |",
        "|---|---|",
    ]
    for name, upstream in storms:
        lines.append(f"| {name} | {', '.join(str(u) for u in upstream)} |")
    lines.append("")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(bench.ROOT, "bench", "RESULTS.md"), "a") as f:
        f.write("\n" + table)


if __name__ == "__main__":
    main()
