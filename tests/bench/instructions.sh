#!/bin/sh
# What usage tracking and the limits cost in instructions: three `ccm-wsgi serve` (usage off, usage on, usage
# on with every limit on every user) each run under valgrind's callgrind, against the strict fake upstream, and
# the instructions of an exact number of non-streaming requests counted (the counters are zeroed after a
# warm-up and dumped once the last reply came; user space only). A firmer figure than CPU time on a shared VM.
#
#   sh tests/bench/instructions.sh [REQUESTS]   # default 1500 per server (about 3 minutes); in OUT_DIR
#
# Needs valgrind (apt-get install valgrind). Prints each server's instructions per request, the ratios on/off
# and limits/on, and the functions (Python's C functions, by name) whose own instructions differ most.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
requests="${1:-1500}"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
OUT_DIR="${OUT_DIR:-$root/bench-results/instructions-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR"
export BENCH_DIR
UP="${UPSTREAM_PORT:-18580}"
names=(off on limits)
flags=(--no-usage "" --limits)

start upstream "$UP" "$PY" "$BENCH_DIR/fake_upstream.py" --port "$UP" --strict-tokens
sleep 1
for i in "${!names[@]}"; do
    name=${names[$i]}
    mkdir -p "$OUT_DIR/$name"
    "$PY" "$here/genconfig.py" --dir "$OUT_DIR/$name" --name "$name" --port $((UP + 1 + i)) \
        --upstream "http://127.0.0.1:$UP" ${flags[$i]} >/dev/null
    start "$name" $((UP + 1 + i)) valgrind --tool=callgrind --callgrind-out-file="$OUT_DIR/$name/callgrind.out.%p" \
        "$PY" -m ccm_wsgi serve -c "$OUT_DIR/$name/$name.json"
done
measure() {  # measure NAME: warm-up (and the first token refresh), zero, the counted requests, dump
    local name=$1 url="http://127.0.0.1:${port[$1]}/"
    for _ in $(seq 600); do curl -s -o /dev/null "$url" && break; sleep 0.5; done
    "$PY" "$here/instructions.py" load "${port[$name]}" 400 8 || exit 1
    callgrind_control -z "${pid[$name]}" >/dev/null 2>&1
    "$PY" "$here/instructions.py" load "${port[$name]}" "$requests" 8 || exit 1
    callgrind_control -d "${pid[$name]}" >/dev/null 2>&1
}
loads=()
for name in "${names[@]}"; do
    measure "$name" &
    loads+=("$!")
done
wait "${loads[@]}"
"$PY" "$here/instructions.py" report "$OUT_DIR" "$requests" "${names[@]}" | tee "$OUT_DIR/instructions.md"
