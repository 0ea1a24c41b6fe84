#!/bin/sh
# Usage tracking and limits, on and off, measured at the same time: three `ccm-wsgi serve` (usage on, usage
# off, every limit on every user; with CCM_BASE also "base", the ccm_wsgi package in that directory, usage on)
# each loaded by its own `wrk -c8` during the same windows, so that whatever the machine does in a window
# (other processes, the VM's neighbours) it does to all of them. `make bench` measures them one after another.
#
#   sh tests/bench/together.sh [ROUNDS] [SECONDS]     # default 8 rounds of 6 s; results in OUT_DIR
#
# Prints each server's median CPU per request and, per round, its ratio to "off".
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
rounds="${1:-8}"
secs="${2:-6}"
results_dir together
UP="${UPSTREAM_PORT:-18380}"

start upstream "$UP" "$PY" "$BENCH_DIR/fake_upstream.py" --port "$UP" --strict-tokens
sleep 1
names=(on limits off)
flags=("" --limits --no-usage)
[ -n "${CCM_BASE:-}" ] && names=(base "${names[@]}") && flags=("" "${flags[@]}")
for i in "${!names[@]}"; do
    name=${names[$i]}
    "$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name "$name" --port $((UP + 1 + i)) \
        --upstream "http://127.0.0.1:$UP" ${flags[$i]} >/dev/null
    tree="$root"
    [ "$name" = base ] && tree="$(cd "$CCM_BASE" && pwd)"
    # from the tree's own directory: `python -m` puts the working directory first on sys.path
    start "$name" $((UP + 1 + i)) sh -c 'cd "$1" && shift && exec "$@"' sh "$tree" \
        "$PY" -m ccm_wsgi serve -c "$OUT_DIR/$name.json"
done
sleep 2
wrk_script "$OUT_DIR/wrk.lua"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, in clock ticks
for name in "${names[@]}"; do  # warm-up (and the first token refresh)
    wrk -t1 -c8 -d2s -s "$OUT_DIR/wrk.lua" "http://127.0.0.1:${port[$name]}/v1/messages" >/dev/null
done
declare -A before
for r in $(seq "$rounds"); do
    for name in "${names[@]}"; do before[$name]=$(cpu "${pid[$name]}"); done
    loads=()
    for name in "${names[@]}"; do
        wrk -t1 -c8 -d"${secs}s" -s "$OUT_DIR/wrk.lua" "http://127.0.0.1:${port[$name]}/v1/messages" \
            >"$OUT_DIR/wrk-$r-$name.txt" &
        loads+=("$!")
    done
    wait "${loads[@]}"
    for name in "${names[@]}"; do
        echo "$r $name $(awk '/requests in/ {print $1}' "$OUT_DIR/wrk-$r-$name.txt")" \
            "$(( $(cpu "${pid[$name]}") - before[$name] ))" >>"$OUT_DIR/points"
    done
done
"$PY" - "$OUT_DIR/points" "$(getconf CLK_TCK)" "${names[@]}" <<'PY' | tee "$OUT_DIR/together.md"
import collections, statistics, sys
points, tck, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
per = collections.defaultdict(dict)  # round -> name -> µs of CPU per request
for line in open(points):
    r, name, requests, ticks = line.split()
    per[r][name] = int(ticks) * 1e6 / tck / int(requests)
for name in names:
    mine = [v[name] for v in per.values()]
    ratios = sorted(v[name] / v["off"] for v in per.values())
    print(f"{name:7s} {statistics.median(mine):6.1f} µs CPU per request; to off: median "
          f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
PY
