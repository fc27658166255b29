#!/usr/bin/env bash
# bench/loadgen: does `surge load` measure what wrk measures?
#
# One target, measured in one run by wrk and by `surge load --closed` at the same connection
# count. The target runs on core 0, each load tool on core 1, one at a time, in alternating
# order over ROUNDS rounds. Appends a dated table to bench/RESULTS.md.
#
#   apt-get install -y nginx wrk      # once
#   bench/loadgen/run.sh              # DURATION=10s CONNECTIONS=64 ROUNDS=2 by default
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-2}

for tool in wrk nginx taskset python3; do
  command -v "$tool" >/dev/null || { echo "bench/loadgen needs $tool: apt-get install -y nginx wrk" >&2; exit 1; }
done
cargo build --release --quiet
SURGE=target/release/surge

work=$(mktemp -d)
cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ -n "${echo_pid:-}" ] && kill "$echo_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Target 1: nginx, one worker, a fixed 100-byte body.
nginx_port=$(free_port)
body=$(printf 'x%.0s' $(seq 1 99))
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
daemon on;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  server {
    listen 127.0.0.1:$nginx_port;
    location / { default_type text/plain; return 200 "$body\n"; }
  }
}
CONF
taskset -c 0 nginx -c "$work/nginx.conf" -p "$work"

# Target 2: the test backend (one thread).
echo_port=$(free_port)
PORT=$echo_port SURGE_INSTANCE=bench taskset -c 0 target/release/surge-echo 2>/dev/null &
echo_pid=$!
sleep 0.5

measure_wrk() {
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "$1" | awk '/Requests\/sec/ {print $2}'
}
measure_surge() {
  taskset -c 1 "$SURGE" load "$1" --closed --connections "$CONNECTIONS" --duration "$DURATION" \
    --json "$work/report.json" >/dev/null 2>&1
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["achieved_rate"], 1))' "$work/report.json"
}

rows=()
for target in "nginx http://127.0.0.1:$nginx_port/" "surge-echo http://127.0.0.1:$echo_port/"; do
  name=${target%% *}; url=${target#* }
  wrk_total=0; surge_total=0
  for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
      w=$(measure_wrk "$url"); s=$(measure_surge "$url")
    else
      s=$(measure_surge "$url"); w=$(measure_wrk "$url")
    fi
    echo "$name round $round: wrk $w/s, surge load $s/s" >&2
    wrk_total=$(python3 -c "print($wrk_total + $w)"); surge_total=$(python3 -c "print($surge_total + $s)")
  done
  rows+=("$(python3 -c "
w=$wrk_total/$ROUNDS; s=$surge_total/$ROUNDS
print(f'| $name | {w:,.0f} | {s:,.0f} | {s/w:.3f} |')")")
done

cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
table=$(
  echo "### loadgen, $(date -u +%Y-%m-%d), $(nproc) cores ($cpu)"
  echo
  echo "\`bench/loadgen/run.sh\` (DURATION=$DURATION CONNECTIONS=$CONNECTIONS ROUNDS=$ROUNDS): closed loop,"
  echo "$CONNECTIONS connections, target pinned to core 0, each tool pinned to core 1, mean of $ROUNDS rounds."
  echo
  echo "| target | wrk req/s | surge load req/s | surge load / wrk |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
)
echo "$table"
[ -f bench/RESULTS.md ] || printf '# Benchmark results\n\nNewest first within each benchmark. Every table names the command that made it.\n\n' > bench/RESULTS.md
printf '%s\n' "$table" >> bench/RESULTS.md
