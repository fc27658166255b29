#!/usr/bin/env python3
"""bench/proxy: Surge's gateway against nginx and HAProxy, in front of the same backend.

Run through bench/proxy/run.sh, which builds surge first. For each backend (nginx serving a
fixed body, and surge-echo), each response size and each connection count, wrk measures the
backend directly and then through each proxy. Every proxy runs one worker (one process or one
thread) pinned to core 1; the backend and wrk share core 0, the same for every proxy. Reports
requests/s, p50 and p99, and the proxy's CPU time per request (from /proc), each as a ratio to
nginx. `nginx+fields` is nginx made to add the fields Surge adds by default, so that
Surge's CPU can also be set against nginx doing the same work. Then the resident memory of
each proxy holding 10,000 idle keep-alive client connections. Appends a dated table to
bench/RESULTS.md.
"""

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SURGE = os.path.join(ROOT, "target", "release", "surge")
ECHO = os.path.join(ROOT, "target", "release", "surge-echo")
DURATION = os.environ.get("DURATION", "10s")
CONNECTIONS = [int(c) for c in os.environ.get("CONNECTIONS", "16 64 256").split()]
SIZES = [int(s) for s in os.environ.get("SIZES", "100 65536").split()]
IDLE_CONNECTIONS = int(os.environ.get("IDLE_CONNECTIONS", "10000"))
PROXY_CORE, SHARED_CORE = "1", "0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench/proxy: {what} did not start listening on port {port}")


def process_tree(pid):
    """pid and all its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        pids += children
        frontier += children
    return pids


def cpu_seconds(pid):
    """User + system CPU time of a process tree, all threads included."""
    return sum(cpu_split(pid))


def cpu_split(pid):
    """User and system CPU time of a process tree, all threads included, apart."""
    user = system = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def core_times(core):
    """(busy, total) clock ticks of one core since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                ticks = [int(t) for t in line.split()[1:]]
                idle = ticks[3] + ticks[4]  # idle, iowait
                return sum(ticks) - idle, sum(ticks)
    return 0, 1


def rss_kib(pid):
    """Resident KiB of `pid` and its children, read once: (all of it, the anonymous part).
    The anonymous part is the processes' own memory; the rest is pages mapped from files,
    their code."""
    total, anonymous = 0, 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anonymous += int(line.split()[1])
        except OSError:
            pass
    return total, anonymous


def to_ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[unit]


def wrk(url, connections, core, duration=None, headers=()):
    # wrk runs on one core: a second thread there adds no throughput, only the other thread's
    # time slice to the latency of half the connections (measured: a 64 KiB p99 of 5 ms
    # against 1.2-1.5 ms with one thread, the same proxy).
    threads = 1
    header_args = [arg for header in headers for arg in ("-H", header)]
    out = subprocess.run(
        ["taskset", "-c", core, "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration or DURATION}", "--latency",
         *header_args, url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    if errors or socket_errors:
        print(f"  warning: {url}: {errors.group(0) if errors else ''} {socket_errors.group(0) if socket_errors else ''}",
              file=sys.stderr)
    return {"rps": rps, "p50": p50, "p99": p99, "requests": total}


def measure(process, url, connections, duration=None, headers=()):
    """wrk against `url`, with the CPU time `process` (and its children) spent per request."""
    before = cpu_split(process.pid)
    cores_before = {core: core_times(core) for core in (SHARED_CORE, PROXY_CORE)}
    m = wrk(url, connections, SHARED_CORE, duration, headers)
    user, system = (after - then for after, then in zip(cpu_split(process.pid), before))
    requests = max(m["requests"], 1)
    m["cpu_us"] = (user + system) / requests * 1e6
    m["sys_us"] = system / requests * 1e6
    for core, (busy, total) in cores_before.items():
        busy_now, total_now = core_times(core)
        m[f"busy_{core}"] = (busy_now - busy) / max(total_now - total, 1)
    return m


def median(measurements, keys):
    """The median of each of `keys` over `measurements`."""
    middle = lambda values: sorted(values)[len(values) // 2]
    return {key: middle([m[key] for m in measurements]) for key in keys}


def run_in_work(run):
    """`run(work)` in a scratch folder whose processes are stopped and files removed after."""
    work = Work()
    try:
        run(work)
    finally:
        work.close()


def require(bench_name, tools, install):
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"{bench_name} needs {tool}: apt-get install -y {install}")


class Work:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="surge-bench-proxy-")
        self.processes = []

    def spawn(self, args, core, env=None, **kwargs):
        process = subprocess.Popen(
            ["taskset", "-c", core] + args, env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kwargs,
        )
        self.processes.append(process)
        return process

    def stop(self, process):
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                self.stop(process)
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)


def nginx_origin(work, port, sizes, access_log=None, extra=""):
    """nginx, one worker, serving `/<size>` from memory-cached files; logging requests to
    `access_log` if given, with `extra` lines in its server block."""
    root = work.path("www")
    os.makedirs(root, exist_ok=True)
    for size in sizes:
        with open(os.path.join(root, str(size)), "wb") as f:
            f.write(b"x" * size)
    conf = work.path("origin.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
pid {work.path('origin.pid')};
error_log {work.path('origin-error.log')};
events {{ worker_connections 4096; }}
http {{
  access_log {access_log or 'off'};
  keepalive_requests 10000000;
  open_file_cache max=16;
  client_body_temp_path {work.dir}; proxy_temp_path {work.dir}; fastcgi_temp_path {work.dir};
  uwsgi_temp_path {work.dir}; scgi_temp_path {work.dir};
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    root {root};
    default_type application/octet-stream;
    {extra}
  }}
}}
""")
    return work.spawn(["nginx", "-c", conf, "-p", work.dir], SHARED_CORE)


def nginx_proxy(work, port, backend_port, tls=None, surge_fields=False):
    """nginx proxying to `backend_port`; with `tls` = (certificate, key), over HTTPS (h2 by ALPN);
    with `surge_fields`, adding what Surge adds (`NGINX_SURGE_FIELDS`)."""
    conf = nginx_proxy_conf(work, port, backend_port, tls, surge_fields=surge_fields)
    return work.spawn(["nginx", "-c", conf, "-p", work.dir], PROXY_CORE)


# The fields Surge adds to a proxied request and its answer by default (a request id, a W3C
# `traceparent`, `X-Forwarded-*` and the time left), made by nginx, so that both proxies can be
# counted doing about the same work. Not quite the same: the span id is the request id's first
# half, taken by a regex; `$host` is lower-cased and without its port where Surge copies Host;
# `X-Forwarded-For` extends a client's where Surge replaces an untrusted client's; the time
# left is a constant.
NGINX_SURGE_FIELDS = """
      proxy_set_header X-Request-ID $request_id;
      proxy_set_header traceparent 00-$request_id-$span_id-01;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Surge-Deadline-Ms 60000;
      add_header X-Request-ID $request_id always;"""


def nginx_proxy_conf(work, port, backend_port, tls=None, one_process=False, surge_fields=False):
    """The configuration `nginx_proxy` runs; with `one_process`, the worker's work is done by
    the master itself (for tools that follow one process, such as valgrind); with
    `surge_fields`, nginx adds what Surge adds (`NGINX_SURGE_FIELDS`)."""
    listen = f"127.0.0.1:{port} backlog=4096"
    tls_lines = ""
    if tls:
        cert, key = tls
        listen = f"127.0.0.1:{port} ssl http2 backlog=4096"
        tls_lines = (f"ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
                     "    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:SSL:10m;")
    conf = work.path(f"proxy-{port}.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
{'master_process off;' if one_process else ''}
pid {work.path(f'proxy-{port}.pid')};
error_log {work.path('proxy-error.log')};
events {{ worker_connections 19000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {work.dir}; proxy_temp_path {work.dir}; fastcgi_temp_path {work.dir};
  uwsgi_temp_path {work.dir}; scgi_temp_path {work.dir};
  {'map $request_id $span_id { "~^(?<half>.{16})" $half; }' if surge_fields else ''}
  upstream backend {{
    least_conn;
    server 127.0.0.1:{backend_port};
    keepalive 512;
    keepalive_requests 10000000;
  }}
  server {{
    listen {listen};
    {tls_lines}
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";{NGINX_SURGE_FIELDS if surge_fields else ''}
    }}
  }}
}}
""")
    return conf


def haproxy(work, port, backend_port):
    conf = work.path(f"haproxy-{port}.cfg")
    with open(conf, "w") as f:
        f.write(f"""
global
  nbthread 1
  maxconn 10200
  no strict-limits
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
frontend web
  bind 127.0.0.1:{port} backlog 4096
  default_backend backend
backend backend
  balance leastconn
  http-reuse always
  server b1 127.0.0.1:{backend_port}
""")
    return work.spawn(["haproxy", "-f", conf], PROXY_CORE)


def surge_config(work, port, backend_port, health=f'path = "/{SIZES[0]}"', gateway="", routes='["/"]'):
    """A surge.toml that puts `backend_port` behind a gateway on `port` (with more `gateway`
    keys, if given, and `routes`); its path."""
    conf = work.path(f"surge-{port}.toml")
    with open(conf, "w") as f:
        f.write(f"""
[gateway]
listen = "127.0.0.1:{port}"
{gateway}
[admin]
listen = "127.0.0.1:{free_port()}"
[services.backend]
upstreams = ["127.0.0.1:{backend_port}"]
routes = {routes}
health = {{ {health} }}
""")
    return conf


def surge(work, port, backend_port):
    conf = surge_config(work, port, backend_port)
    return work.spawn([SURGE, "up", "-c", conf], PROXY_CORE, env={"SURGE_LOG": "warn"})


def hold_idle_connections(port, count, path, batch=100):
    """Opens `count` keep-alive connections with one request answered on each, `batch` at a time
    (so the proxy never has more than `batch` requests upstream), and keeps them all open."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    sockets, answered = [], 0
    for start in range(0, count, batch):
        group = [socket.create_connection(("127.0.0.1", port)) for _ in range(min(batch, count - start))]
        for s in group:
            s.sendall(request)
        for s in group:
            s.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            answered += data.startswith(b"HTTP/1.1 200")
        sockets += group
    return sockets, answered


def main():
    require("bench/proxy", ["nginx", "haproxy", "wrk", "taskset"], "nginx haproxy wrk")
    if os.cpu_count() < 2:
        sys.exit("bench/proxy needs two cores: one for the proxy, one for the backend and wrk")
    run_in_work(run)


def run(work):
    origin_port, echo_port = free_port(), free_port()
    nginx_origin(work, origin_port, SIZES)
    work.spawn([ECHO], SHARED_CORE, env={"PORT": str(echo_port), "SURGE_INSTANCE": "bench"})
    wait_port(origin_port, "the nginx backend")
    wait_port(echo_port, "surge-echo")
    backends = [
        ("nginx", origin_port, lambda size: f"/{size}"),
        ("surge-echo", echo_port, lambda size: f"/?bytes={size}"),
    ]
    proxies = [("nginx", nginx_proxy), ("nginx+fields", functools.partial(nginx_proxy, surge_fields=True)),
               ("haproxy", haproxy), ("surge", surge)]

    results = []  # (backend, size, connections, target, measurement)
    for backend, backend_port, path_of in backends:
        for name, start in proxies:
            port = free_port()
            process = start(work, port, backend_port)
            wait_port(port, name)
            time.sleep(0.5)
            wrk(f"http://127.0.0.1:{port}{path_of(SIZES[0])}", 16, SHARED_CORE, "2s")  # warm-up
            for size in SIZES:
                for connections in CONNECTIONS:
                    m = measure(process, f"http://127.0.0.1:{port}{path_of(size)}", connections)
                    results.append((backend, size, connections, name, m))
                    print(f"{backend:10} {size:>6} B {connections:>3} conns  {name:12} {m['rps']:>10,.0f} req/s"
                          f"  p50 {m['p50']:.2f} ms  p99 {m['p99']:.2f} ms  cpu {m['cpu_us']:.1f} µs/req",
                          file=sys.stderr)
            work.stop(process)
        for size in SIZES:
            for connections in CONNECTIONS:
                m = wrk(f"http://127.0.0.1:{backend_port}{path_of(size)}", connections, PROXY_CORE)
                m["cpu_us"] = None
                results.append((backend, size, connections, "direct", m))

    idle = []
    for name, start in proxies:
        if name == "nginx+fields":  # the same as nginx with no request in flight
            continue
        port = free_port()
        process = start(work, port, origin_port)
        wait_port(port, name)
        time.sleep(0.5)
        baseline, baseline_anon = rss_kib(process.pid)
        sockets, answered = hold_idle_connections(port, IDLE_CONNECTIONS, f"/{SIZES[0]}")
        time.sleep(1)
        held, held_anon = rss_kib(process.pid)
        for s in sockets:
            s.close()
        work.stop(process)
        idle.append((name, baseline, held, baseline_anon, held_anon, answered))
        print(f"{name}: {baseline / 1024:.1f} MiB idle, {held / 1024:.1f} MiB with {answered} idle connections",
              file=sys.stderr)

    report(results, idle)


def commit():
    """The commit measured, marked when the tree has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def report(results, idle):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"### proxy, {day}, {os.cpu_count()} cores ({cpu})",
        "",
        f"Code at `{commit()}`.",
        "",
        f"`bench/proxy/run.sh` (DURATION={DURATION}): wrk closed loop; each proxy one worker pinned to core "
        f"{PROXY_CORE} (nginx `worker_processes 1`, HAProxy `nbthread 1`, Surge's runtime sees one core), "
        f"backend and wrk on core {SHARED_CORE}; `direct` is wrk on core {PROXY_CORE} against the backend. "
        "Ratios are to nginx (higher req/s is better; lower latency and CPU are better). "
        "`nginx+fields` is nginx adding the fields Surge adds to each request and answer by default "
        "(request id, `traceparent`, `X-Forwarded-*`, time left; `NGINX_SURGE_FIELDS` in bench.py), "
        "and the last column is Surge's CPU per request against it: the two doing the same work. "
        "CPU is the proxy's user + system time per request, `kernel` the system part of it; "
        f"`core {SHARED_CORE}` is how busy the core wrk and the backend share was (near 100%: they, not "
        "the proxy, set the pace).",
        "",
        "| backend | body | conns | target | req/s | × nginx | p50 ms | p99 ms | p99 × nginx | CPU µs/req "
        f"| kernel µs/req | CPU × nginx | core {SHARED_CORE} | CPU × nginx+fields |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    index = {(b, s, c, t): m for b, s, c, t, m in results}
    keys = []
    for backend, size, connections, _, _ in results:
        if (backend, size, connections) not in keys:
            keys.append((backend, size, connections))
    for backend, size, connections in keys:
        base = index[(backend, size, connections, "nginx")]
        same_work = index[(backend, size, connections, "nginx+fields")]
        for target in ["direct", "nginx", "nginx+fields", "haproxy", "surge"]:
            m = index[(backend, size, connections, target)]
            if m["cpu_us"] is None:  # wrk straight at the backend: no proxy to measure
                cpu_cell = kernel_cell = cpu_ratio = busy_cell = "-"
            else:
                cpu_cell, kernel_cell = f"{m['cpu_us']:.1f}", f"{m['sys_us']:.1f}"
                cpu_ratio = f"{m['cpu_us'] / base['cpu_us']:.2f}"
                busy_cell = f"{m[f'busy_{SHARED_CORE}']:.0%}"
            same_work_cell = f"{m['cpu_us'] / same_work['cpu_us']:.2f}" if target == "surge" else "-"
            body = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
            lines.append(
                f"| {backend} | {body} | {connections} | {target} | {m['rps']:,.0f} | {m['rps'] / base['rps']:.2f} "
                f"| {m['p50']:.2f} | {m['p99']:.2f} | {m['p99'] / base['p99']:.2f} | {cpu_cell} | {kernel_cell} "
                f"| {cpu_ratio} | {busy_cell} | {same_work_cell} |"
            )
    lines += [
        "",
        f"Resident memory holding {IDLE_CONNECTIONS:,} idle keep-alive client connections (one request answered on each):",
        "",
        "| proxy | RSS before | RSS holding them | anonymous before | anonymous holding them | connections answered |",
        "|---|---|---|---|---|---|",
    ]
    for name, baseline, held, baseline_anon, held_anon, answered in idle:
        lines.append(f"| {name} | {baseline / 1024:.1f} MiB | {held / 1024:.1f} MiB | {baseline_anon / 1024:.1f} MiB "
                     f"| {held_anon / 1024:.1f} MiB | {answered:,} |")
    lines.append("")
    table = "\n".join(lines) + "\n"
    print(table)
    # A blank line first: the file before may end with a paragraph.
    table = "\n" + table
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as f:
        f.write(table)


if __name__ == "__main__":
    main()
