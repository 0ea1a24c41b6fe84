#!/bin/sh
# What usage tracking and limits cost per request, step by step: CPU time counted inside three running
# `ccm-wsgi serve` (usage on, usage off, usage on with every limit on every user; steps.py) under the same
# non-streaming load (wrk c=16), against the strict fake upstream.
#
#   sh tests/bench/steps.sh [SECONDS]      # default 8 s per server; results in OUT_DIR (bench-results/steps-*)
#
# Prints, per server, each step's calls per request and CPU µs per call and per request. Unlike the load.py
# figures (the whole process's CPU over a window), these count only the steps' own work, so they do not move
# with the other processes on the machine; compare them with each other.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
secs="${1:-8}"
results_dir steps
UP="${UPSTREAM_PORT:-18280}"

start upstream "$UP" "$PY" "$BENCH_DIR/fake_upstream.py" --port "$UP" --strict-tokens
sleep 1
"$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name on --port $((UP + 1)) --upstream "http://127.0.0.1:$UP" >/dev/null
"$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name off --port $((UP + 2)) --upstream "http://127.0.0.1:$UP" \
    --no-usage >/dev/null
"$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name limits --port $((UP + 3)) --upstream "http://127.0.0.1:$UP" \
    --limits >/dev/null
start on $((UP + 1)) "$PY" "$here/steps.py" "$OUT_DIR/on.json" "$OUT_DIR/steps-on.jsonl"
start off $((UP + 2)) "$PY" "$here/steps.py" "$OUT_DIR/off.json" "$OUT_DIR/steps-off.jsonl"
start limits $((UP + 3)) "$PY" "$here/steps.py" "$OUT_DIR/limits.json" "$OUT_DIR/steps-limits.jsonl"
sleep 2
wrk_script "$OUT_DIR/wrk.lua"

for name in on off limits; do
    url="http://127.0.0.1:${port[$name]}/v1/messages"
    wrk -t1 -c16 -d2s -s "$OUT_DIR/wrk.lua" "$url" >/dev/null  # warm-up (and the first token refresh)
    kill -USR1 "${pid[$name]}"
    sleep 0.5
    wrk -t1 -c16 -d"${secs}s" -s "$OUT_DIR/wrk.lua" "$url" >"$OUT_DIR/wrk-$name.txt"
    kill -USR1 "${pid[$name]}"
    sleep 0.5
done
"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/steps.md"
import json, sys
out = sys.argv[1]
for name in ("on", "off", "limits"):
    before, after = [json.loads(line) for line in open(f"{out}/steps-{name}.jsonl")][:2]
    requests = after["Proxy._finish"][1] - before["Proxy._finish"][1]
    print(f"{'limits on, usage tracking on' if name == 'limits' else 'usage tracking ' + name}: {requests} requests")
    for step in sorted(after):
        ns = after[step][0] - before.get(step, [0, 0])[0]
        calls = after[step][1] - before.get(step, [0, 0])[1]
        if calls:
            print(f"  {step:26s} {calls / requests:5.2f} calls/request {ns / calls / 1000:8.1f} µs/call "
                  f"{ns / requests / 1000:7.1f} µs/request")
EOF
