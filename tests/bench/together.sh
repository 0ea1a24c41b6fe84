#!/bin/sh
# Usage tracking and limits, on and off, measured at the same time on the same core: five `ccm-wsgi serve`
# (usage on, every limit on every user, usage off, and a second process of usage on and of usage off; with
# CCM_BASE also "base", the ccm_wsgi package in that directory, usage on) all pinned to the last CPU and each
# loaded by its own `wrk -c8` during the same windows, the fake upstream and the loads pinned to the other
# CPUs. Whatever the machine does in a window (its speed, the VM's neighbours), it does to every server alike,
# and they take turns on one core, so none of them has a core of its own for a while. `make bench` measures
# its targets one after another, each with the whole machine.
#
#   sh tests/bench/together.sh [ROUNDS] [SECONDS]     # default 12 rounds of 5 s; results in OUT_DIR
#
# Prints each server's median CPU per request and the medians of the per-round ratios: usage on/off (over
# both processes of each), limits / usage on, base / usage on, and each config's second process against its
# first (the noise floor of this measurement: 0.98-1.03 per round on the 2-vCPU VM of the README).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
rounds="${1:-12}"
secs="${2:-5}"
results_dir together
UP="${UPSTREAM_PORT:-18380}"
last=$(( $(nproc) - 1 ))
servers=(taskset -c "$last")
others=()
[ "$last" -gt 0 ] && others=(taskset -c "0-$(( last - 1 ))")

start upstream "$UP" "${others[@]}" "$PY" "$BENCH_DIR/fake_upstream.py" --port "$UP" --strict-tokens
sleep 1
names=(on limits off on2 off2)
flags=("" --limits --no-usage "" --no-usage)
[ -n "${CCM_BASE:-}" ] && names=(base "${names[@]}") && flags=("" "${flags[@]}")
for i in "${!names[@]}"; do
    name=${names[$i]}
    "$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name "$name" --port $((UP + 1 + i)) \
        --upstream "http://127.0.0.1:$UP" ${flags[$i]} >/dev/null
    tree="$root"
    [ "$name" = base ] && tree="$(cd "$CCM_BASE" && pwd)"
    # from the tree's own directory: `python -m` puts the working directory first on sys.path
    start "$name" $((UP + 1 + i)) "${servers[@]}" sh -c 'cd "$1" && shift && exec "$@"' sh "$tree" \
        "$PY" -m ccm_wsgi serve -c "$OUT_DIR/$name.json"
done
for name in "${names[@]}"; do  # several servers starting on one core take a while
    for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:${port[$name]}/" && break; sleep 0.2; done
done
wrk_script "$OUT_DIR/wrk.lua"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, in clock ticks
for name in "${names[@]}"; do  # warm-up (and the first token refresh)
    "${others[@]}" wrk -t1 -c8 -d2s -s "$OUT_DIR/wrk.lua" "http://127.0.0.1:${port[$name]}/v1/messages" >/dev/null
done
declare -A before
for r in $(seq "$rounds"); do
    for name in "${names[@]}"; do before[$name]=$(cpu "${pid[$name]}"); done
    loads=()
    for name in "${names[@]}"; do
        "${others[@]}" wrk -t1 -c8 -d"${secs}s" -s "$OUT_DIR/wrk.lua" "http://127.0.0.1:${port[$name]}/v1/messages" \
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
rounds = list(per.values())
for name in names:
    print(f"{name:6s} {statistics.median(v[name] for v in rounds):7.1f} µs CPU per request (median of {len(rounds)} rounds)")
rows = [("usage on/off", lambda v: (v["on"] + v["on2"]) / (v["off"] + v["off2"])),
        ("limits on every user / none", lambda v: v["limits"] / v["on"]),
        ("one config, two processes: on2/on", lambda v: v["on2"] / v["on"]),
        ("one config, two processes: off2/off", lambda v: v["off2"] / v["off"])]
if "base" in names:
    rows.append(("base / on", lambda v: v["base"] / v["on"]))
for label, ratio in rows:
    values = sorted(map(ratio, rounds))
    print(f"{label}: median {statistics.median(values):.3f} (rounds {values[0]:.2f}-{values[-1]:.2f})")
PY
