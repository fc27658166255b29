#!/usr/bin/env python3
"""bench/proxy/callgrind: instructions per proxied request, counted by valgrind.

Wall-clock figures on this machine move by a third between runs; instruction counts do not.
Surge runs under `valgrind --tool=callgrind` in front of nginx serving 100 bytes; the counters
are zeroed once Surge is up, h2load sends REQUESTS requests over CONNECTIONS keep-alive
connections, and the counters are dumped: everything Surge executed in between, divided by
the requests. Usage:

    bench/proxy/callgrind.py [SURGE_BINARY ...]     # default: target/release/surge

The word `nginx` in place of a binary counts nginx proxying the same way (one worker, no master
process, its keep-alive pool to the backend as bench/proxy configures it), for comparison;
ROUTE does not apply to it. `nginx+fields` counts nginx also adding the fields Surge adds by
default (request id, `traceparent`, `X-Forwarded-*`, the time left; bench.py's
NGINX_SURGE_FIELDS), so that both do the same work.

With GATEWAY set, its text is added to the `[gateway]` table of Surge's configuration, such as
GATEWAY='request_ids = false' (no request id or `traceparent` made); nginx ignores it.

With ROUTE=cache the route caches what nginx answers (`default_ttl`, nginx sends no freshness),
so every counted request is a cache hit: the instructions of the response cache's hit path.

Each binary given is measured in turn, so a before and an after can be compared in one run.
With KEEP=DIR the dumps stay in DIR, for `callgrind_annotate --inclusive=yes DIR/FILE`.
Needs nginx, h2load (nghttp2-client) and valgrind.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench import SURGE, SIZES, Work, free_port, nginx_origin, nginx_proxy_conf, surge_config, wait_port  # noqa: E402

REQUESTS = int(os.environ.get("REQUESTS", "20000"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "16"))
ROUTES = {"proxy": '["/"]', "cache": '[{ prefix = "/", cache = { default_ttl = "1h" } }]'}[
    os.environ.get("ROUTE", "proxy")]
SIZE = SIZES[0]


def total_instructions(dump):
    with open(dump) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    sys.exit(f"bench/proxy/callgrind: no totals in {dump}")


def command(work, binary, port, origin_port):
    """What runs under valgrind: surge, or nginx in one process."""
    if binary in ("nginx", "nginx+fields"):
        conf = nginx_proxy_conf(work, port, origin_port, one_process=True, surge_fields=binary == "nginx+fields")
        return ["nginx", "-c", conf, "-p", work.dir]
    # Health checks once a minute, so that they are not in the count.
    conf = surge_config(work, port, origin_port, health=f'path = "/{SIZE}", interval = "60s"',
                        gateway=os.environ.get("GATEWAY", ""), routes=ROUTES)
    return [binary, "up", "-c", conf]


def measure(work, binary, origin_port):
    port = free_port()
    out = work.path(f"callgrind-{port}")
    process = work.spawn(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no",
         "--compress-strings=no", "--compress-pos=no", *command(work, binary, port, origin_port)],
        "1", env={"SURGE_LOG": "warn"})
    wait_port(port, f"{binary} under valgrind", timeout=120)
    url = f"http://127.0.0.1:{port}/{SIZE}"
    # Warm up: connections to the backend made, buffers sized.
    subprocess.run(["h2load", "--h1", "-n", "2000", "-c", str(CONNECTIONS), url], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "--zero", str(process.pid)], capture_output=True, check=True)
    result = subprocess.run(["h2load", "--h1", "-n", str(REQUESTS), "-c", str(CONNECTIONS), url],
                            capture_output=True, text=True, check=True).stdout
    subprocess.run(["callgrind_control", "--dump", str(process.pid)], capture_output=True, check=True)
    time.sleep(1)
    succeeded = int(re.search(r"(\d+) succeeded", result).group(1))
    dumps = sorted(glob.glob(f"{out}.*"), key=os.path.getmtime)
    if os.environ.get("KEEP"):
        os.makedirs(os.environ["KEEP"], exist_ok=True)
        shutil.copy(dumps[-1], os.path.join(os.environ["KEEP"], os.path.basename(binary) + ".callgrind"))
    work.stop(process)
    if succeeded != REQUESTS:
        sys.exit(f"bench/proxy/callgrind: {REQUESTS - succeeded} of {REQUESTS} requests failed")
    return total_instructions(dumps[-1]) / REQUESTS


def main():
    for tool in ["nginx", "h2load", "valgrind", "callgrind_control"]:
        if not shutil.which(tool):
            sys.exit(f"bench/proxy/callgrind needs {tool}: apt-get install -y nginx nghttp2-client valgrind")
    binaries = sys.argv[1:] or [SURGE]
    work = Work()
    try:
        origin_port = free_port()
        nginx_origin(work, origin_port, [SIZE])
        wait_port(origin_port, "the nginx backend")
        for binary in binaries:
            per_request = measure(work, binary, origin_port)
            print(f"{binary}: {per_request:,.0f} instructions per request ({os.environ.get('ROUTE', 'proxy')}, "
                  f"{REQUESTS} requests of {SIZE} B over {CONNECTIONS} connections)")
    finally:
        work.close()


if __name__ == "__main__":
    main()
