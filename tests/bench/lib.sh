# Sourced by profile.sh and steps.sh (bash): paths.sh, the results directory, starting processes that are
# stopped on exit, and the wrk script of the non-streaming load (the load.py request body, user alice's token).
. "$(dirname "${BASH_SOURCE[0]}")/paths.sh"

results_dir() {  # results_dir KIND: OUT_DIR (default bench-results/KIND-<stamp>), created; wrk must be there
    OUT_DIR="${OUT_DIR:-$root/bench-results/$1-$(date -u +%Y%m%dT%H%M%SZ)}"
    mkdir -p "$OUT_DIR"
    command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
}

pids=()
declare -A pid port
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
start() {  # start NAME PORT COMMAND...: in its own process group, from the repository root, log in OUT_DIR
    local name="$1"
    port[$name]="$2"
    shift 2
    (cd "$root" && exec "$@") >"$OUT_DIR/$name.log" 2>&1 &
    pids+=("$!")
    pid[$name]="$!"
}

token="$("$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import genconfig; print(genconfig.USER_TOKENS["alice"])' "$here")"
wrk_script() {  # wrk_script FILE: a POST of load.py's 1000-byte non-streaming request as alice
    "$PY" - "$BENCH_DIR" "$token" "$1" <<'LUA'
import sys
sys.path.insert(0, sys.argv[1])
import load
body = load.messages_body(1000, False).decode()
with open(sys.argv[3], "w") as f:
    f.write('wrk.method = "POST"\nwrk.body = [==[%s]==]\n' % body)
    f.write('wrk.headers["Content-Type"] = "application/json"\nwrk.headers["anthropic-version"] = "2023-06-01"\n')
    f.write('wrk.headers["x-api-key"] = "%s"\n' % sys.argv[2])
LUA
}
