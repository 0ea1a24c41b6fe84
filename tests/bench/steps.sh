#!/bin/sh
# What usage tracking costs per request, step by step: CPU time counted inside two running `ccm-wsgi serve`
# (usage on and off, steps.py) under the same non-streaming load (wrk c=16), against the strict fake upstream.
#
#   sh tests/bench/steps.sh [SECONDS]      # default 8 s per server; results in OUT_DIR (bench-results/steps-*)
#
# Prints, per server, each step's calls per request and CPU µs per call and per request. Unlike the load.py
# figures (the whole process's CPU over a window), these count only the steps' own work, so they do not move
# with the other processes on the machine; compare them with each other.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -uo pipefail
set -m
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$root/../shared/bench}"
PY="${PY:-$root/.venv/bin/python}"
secs="${1:-8}"
OUT_DIR="${OUT_DIR:-$root/bench-results/steps-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR"
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
UP="${UPSTREAM_PORT:-18280}"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
start() {  # start NAME COMMAND...: in its own process group, from the repository root
    local name="$1"
    shift
    (cd "$root" && exec "$@") >"$OUT_DIR/$name.log" 2>&1 &
    pids+=("$!")
}

start upstream "$PY" "$BENCH_DIR/fake_upstream.py" --port "$UP" --strict-tokens
sleep 1
"$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name on --port $((UP + 1)) --upstream "http://127.0.0.1:$UP" >/dev/null
"$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name off --port $((UP + 2)) --upstream "http://127.0.0.1:$UP" \
    --no-usage >/dev/null
start on "$PY" "$here/steps.py" "$OUT_DIR/on.json" "$OUT_DIR/steps-on.jsonl"
pid_on=$!
start off "$PY" "$here/steps.py" "$OUT_DIR/off.json" "$OUT_DIR/steps-off.jsonl"
pid_off=$!
sleep 2
token="$("$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import genconfig; print(genconfig.USER_TOKENS["alice"])' "$here")"
"$PY" - "$BENCH_DIR" "$token" "$OUT_DIR/wrk.lua" <<'LUA'
import sys
sys.path.insert(0, sys.argv[1])
import load
body = load.messages_body(1000, False).decode()
with open(sys.argv[3], "w") as f:
    f.write('wrk.method = "POST"\nwrk.body = [==[%s]==]\n' % body)
    f.write('wrk.headers["Content-Type"] = "application/json"\nwrk.headers["anthropic-version"] = "2023-06-01"\n')
    f.write('wrk.headers["x-api-key"] = "%s"\n' % sys.argv[2])
LUA

for name in on off; do
    pid=$pid_on port=$((UP + 1))
    [ $name = off ] && pid=$pid_off port=$((UP + 2))
    url="http://127.0.0.1:$port/v1/messages"
    wrk -t1 -c16 -d2s -s "$OUT_DIR/wrk.lua" "$url" >/dev/null  # warm-up (and the first token refresh)
    kill -USR1 "$pid"
    sleep 0.5
    wrk -t1 -c16 -d"${secs}s" -s "$OUT_DIR/wrk.lua" "$url" >"$OUT_DIR/wrk-$name.txt"
    kill -USR1 "$pid"
    sleep 0.5
done
"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/steps.md"
import json, sys
out = sys.argv[1]
for name in ("on", "off"):
    before, after = [json.loads(line) for line in open(f"{out}/steps-{name}.jsonl")][:2]
    requests = after["Proxy._finish"][1] - before["Proxy._finish"][1]
    print(f"usage tracking {name}: {requests} requests")
    for step in sorted(after):
        ns = after[step][0] - before.get(step, [0, 0])[0]
        calls = after[step][1] - before.get(step, [0, 0])[1]
        if calls:
            print(f"  {step:26s} {calls / requests:5.2f} calls/request {ns / calls / 1000:8.1f} µs/call "
                  f"{ns / requests / 1000:7.1f} µs/request")
EOF
