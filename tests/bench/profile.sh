#!/bin/sh
# Where the CPU goes: py-spy profiles of ccm-wsgi (usage on), ccm-wsgi (usage off) and the bare gevent
# proxy under the same non-streaming load (wrk c=16) and the same streaming load (load.py, n=100).
#
#   sh tests/bench/profile.sh [SECONDS]     # default 12 s per profile; results in OUT_DIR (bench-results/profile-*)
#
# Needs py-spy (pip install py-spy; installed into the venv when missing) and wrk. Prints, for each
# load, the layer/function summary of ccm-wsgi and the per-function differences (inclusive µs per
# request or per event) against usage off and against the bare proxy. The CPU figures here are taken
# with py-spy attached (a few % higher than in run.sh); compare them with each other only.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
secs="${1:-12}"
results_dir profile
SPY="$(dirname "$PY")/py-spy"
[ -x "$SPY" ] || "$PY" -m pip install -q py-spy || { echo "py-spy is needed (pip install py-spy)" >&2; exit 1; }
UP="${UPSTREAM_PORT:-18180}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

declare -A cost

start upstream "$UP" "$PY" "$BENCH_DIR/fake_upstream.py" --port "$UP" --strict-tokens
sleep 1
"$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name on --port $((UP + 1)) --upstream "http://127.0.0.1:$UP" >/dev/null
"$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name off --port $((UP + 2)) --upstream "http://127.0.0.1:$UP" \
    --no-usage >/dev/null
start on $((UP + 1)) "$PY" -m ccm_wsgi serve -c "$OUT_DIR/on.json"
start off $((UP + 2)) "$PY" -m ccm_wsgi serve -c "$OUT_DIR/off.json"
start min $((UP + 3)) "$PY" "$BENCH_DIR/minimal_gevent_proxy.py" --port $((UP + 3)) --upstream "http://127.0.0.1:$UP"
sleep 2
wrk_script "$OUT_DIR/wrk.lua"

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for name in on off min; do
    url="http://127.0.0.1:${port[$name]}/v1/messages"
    wrk -t1 -c16 -d2s -s "$OUT_DIR/wrk.lua" "$url" >/dev/null  # warm-up (and the first token refresh)
    c0=$(cpu "${pid[$name]}")
    wrk -t1 -c16 -d"$((secs + 2))s" -s "$OUT_DIR/wrk.lua" "$url" >"$OUT_DIR/wrk-$name.txt" &
    wp=$!
    sleep 1
    "$SPY" record -p "${pid[$name]}" -r 200 -d "$secs" -f raw -o "$OUT_DIR/ns-$name.raw" >/dev/null 2>&1
    wait "$wp"
    c1=$(cpu "${pid[$name]}")
    n=$(awk '/requests in/{print $1}' "$OUT_DIR/wrk-$name.txt")
    cost[ns-$name]=$(awk -v c="$((c1 - c0))" -v n="$n" 'BEGIN{printf "%.1f", c * 10000 / n}')  # 10 ms ticks -> µs
    echo "non-streaming $name: $n requests, ${cost[ns-$name]} µs CPU per request (py-spy attached)" >&2
done
for name in on off min; do
    "$PY" "$BENCH_DIR/load.py" --target "$name=http://127.0.0.1:${port[$name]},pid=${pid[$name]}" --api-key "$token" \
        --phases stream --streams 100 --stream-rounds "$((secs + 3))" --warmup 0 --json "$OUT_DIR/stream-$name.json" \
        >/dev/null 2>&1 &
    lp=$!
    sleep 2
    "$SPY" record -p "${pid[$name]}" -r 200 -d "$secs" -f raw -o "$OUT_DIR/st-$name.raw" >/dev/null 2>&1
    wait "$lp"
    cost[st-$name]=$("$PY" -c 'import json, sys; print("%.1f" % json.load(open(sys.argv[1]))["summary"][0]["proxy_cpu_us_per_event"])' \
        "$OUT_DIR/stream-$name.json")
    echo "streaming $name: ${cost[st-$name]} µs CPU per event (py-spy attached)" >&2
done
{
    echo "# py-spy profiles ($(date -u +%Y-%m-%dT%H:%MZ), $secs s each; OUT_DIR=$OUT_DIR)"
    for load in ns st; do
        unit=$([ $load = ns ] && echo "request (wrk c=16)" || echo "event (100 streams)")
        echo
        echo "## per $unit: ccm-wsgi ${cost[$load-on]} µs, usage off ${cost[$load-off]} µs, bare proxy ${cost[$load-min]} µs"
        echo
        "$PY" "$here/profile_summary.py" "$OUT_DIR/$load-on.raw" --top 30
        echo
        "$PY" "$here/profile_summary.py" "$OUT_DIR/$load-on.raw" --compare "$OUT_DIR/$load-off.raw" \
            --cost "${cost[$load-on]}" "${cost[$load-off]}" --top 30
        echo
        "$PY" "$here/profile_summary.py" "$OUT_DIR/$load-on.raw" --compare "$OUT_DIR/$load-min.raw" \
            --cost "${cost[$load-on]}" "${cost[$load-min]}" --top 30
    done
} | tee "$OUT_DIR/profile.md"
