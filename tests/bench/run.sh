#!/bin/sh
# `make bench`: ccm-wsgi against direct, nginx and the bare gevent proxy, in one interleaved run.
#
#   sh tests/bench/run.sh                 # the full run (about 30 minutes), table + targets in bench-results/
#   QUICK=1 sh tests/bench/run.sh         # a 1-2 minute smoke run (coarse numbers)
#   sh tests/bench/run.sh soak            # the 10-minute streaming soak (RSS growth), see soak.py
#   sh tests/bench/run.sh -- --phases stream --streams 100 --repeat 5   # replace the load.py options
#   EXTRA=gevent sh tests/bench/run.sh -- ...   # only some of the extra targets (default: all nine)
#   CCM_BASE=/tmp/old sh tests/bench/run.sh     # also "ccm-base": the ccm_wsgi package in /tmp/old (e.g.
#                                               # `git archive OLD ccm_wsgi | tar -x -C /tmp/old`), same config
#   TOGETHER=0 sh tests/bench/run.sh            # without the closing together.sh measurement (see below)
#
# The harness is ../shared/bench (BENCH_DIR to override), used as it is: compare.sh starts the fake
# upstream (with --strict-tokens, so ccm-wsgi must refresh its expired token before anything works),
# nginx and ccm-wsgi; everything after `--` goes to load.py. This script starts the other targets first
# and passes them to load.py as extra `--target NAME=URL,pid=PID`, so every number comes from one run:
#
#   ccm-wsgi      `ccm-wsgi serve`, two users, usage tracking, access log at level info (to a file)
#   gevent        minimal_gevent_proxy.py, the bare gevent + Flask + urllib3 reference (ratios: --ref2)
#   ccm-nousage   the same ccm-wsgi config without usages_path (usage tracking on/off ratio)
#   ccm-twin, ccm-nousage-twin   second processes of the ccm-wsgi and ccm-nousage configs: the figures of
#                 the usage-on and usage-off configs are the medians over both processes' points, and the
#                 twins against their firsts show how far two processes of one config differ in this run
#   ccm-limits    the same ccm-wsgi config with every limit on every user, none reached (limits on/off)
#   ccm-nometrics the same ccm-wsgi config with CCM_METRICS=off (metrics on/off)
#   gunicorn-w1   gunicorn -c conf/gunicorn.conf.py ccm_wsgi.wsgi:app, 1 gevent worker, usage on
#   gunicorn-w2   the same with 2 workers (non-streaming scaling)
#   ccm-redis     the ccm-wsgi config with shared state on a redis-server started here (left out when
#                 redis-server is not installed), to compare its CPU per request with the ccm-wsgi column
#
# Targets run one after another in this order, rotated each repeat, so that the compared configs sit
# next to each other in time (ccm-wsgi, ccm-nousage, ccm-limits, ccm-twin, ccm-nousage-twin, ccm-nometrics).
# Then (not with QUICK=1) together.sh measures usage tracking on/off and every limit on every user again,
# all of those servers loaded in the same windows on one core (12 rounds of 5 s), where a machine whose speed
# moves from window to window moves them all alike; its figures close summary.md.
#
# The clients authenticate with `x-api-key: <user token>`: ccm-wsgi takes it as the user token and
# sends its own refreshed OAuth token upstream, while direct, nginx and the bare proxy pass it through
# and the strict fake upstream accepts an API key (it would reject a user token sent as a Bearer).
#
# nginx and wrk are installed with apt-get when missing and we are root (BENCH_NO_INSTALL=1 skips
# that); without them compare.sh leaves out the nginx column and load.py uses its python client.
# Results: OUT_DIR (default bench-results/<UTC stamp>): table-*.txt, results-*.json, summary.md (the
# targets), every process's log. Only the processes started here are stopped (by process group).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "${BASH_SOURCE[0]}")/paths.sh"

mode=compare
if [ "${1:-}" = soak ]; then
    mode=soak
    shift
fi
[ "${1:-}" = "--" ] && shift

if [ ! -f "$BENCH_DIR/compare.sh" ] && [ "$mode" = compare ]; then
    echo "benchmark harness not found at $BENCH_DIR (set BENCH_DIR to the directory of compare.sh)" >&2
    exit 1
fi
if ! "$PY" -c 'import gevent, urllib3, flask' 2>/dev/null; then
    echo "$PY lacks gevent/urllib3/flask: run 'make bench' (it installs the package) or set PY" >&2
    exit 1
fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
install_tools() {
    local missing=""
    have nginx || missing="$missing nginx"
    have wrk || missing="$missing wrk"
    case ",$EXTRA," in *",ccm-redis,"*) have redis-server || missing="$missing redis-server" ;; esac
    [ -z "$missing" ] && return 0
    if [ "${BENCH_NO_INSTALL:-}" = 1 ] || [ "$(id -u)" != 0 ] || ! have apt-get; then
        echo "missing:$missing (as root: apt-get update && apt-get install -y$missing); going on without" >&2
        return 0
    fi
    echo "installing:$missing (apt-get)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$missing; } \
        >"${TMPDIR:-/tmp}/ccm-bench-apt.log" 2>&1; then
        echo "apt-get failed (see ${TMPDIR:-/tmp}/ccm-bench-apt.log); going on without:$missing" >&2
    fi
}

UPSTREAM_PORT="${UPSTREAM_PORT:-18080}"
NGINX_PORT="${NGINX_PORT:-18081}"
TARGET_PORT="${TARGET_PORT:-18082}"
GEVENT_PORT="${GEVENT_PORT:-18083}"
NOUSAGE_PORT="${NOUSAGE_PORT:-18084}"
GUNI1_PORT="${GUNI1_PORT:-18085}"
GUNI2_PORT="${GUNI2_PORT:-18086}"
BASE_PORT="${BASE_PORT:-18087}"
LIMITS_PORT="${LIMITS_PORT:-18088}"
NOMETRICS_PORT="${NOMETRICS_PORT:-18089}"
REDIS_TARGET_PORT="${REDIS_TARGET_PORT:-18090}"
REDIS_PORT="${REDIS_PORT:-18091}"
TWIN_PORT="${TWIN_PORT:-18092}"
NOUSAGE_TWIN_PORT="${NOUSAGE_TWIN_PORT:-18093}"
UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT"
EXTRA="${EXTRA:-gevent,ccm-nousage,ccm-limits,ccm-twin,ccm-nousage-twin,ccm-nometrics,gunicorn-w1,gunicorn-w2,ccm-redis}"
export UPSTREAM_PORT NGINX_PORT TARGET_PORT

OUT_DIR="${OUT_DIR:-$root/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export OUT_DIR
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
USER_TOKEN="$("$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import genconfig; print(genconfig.USER_TOKENS["alice"])' "$here")"

if [ "$mode" = soak ]; then
    exec "$PY" "$here/soak.py" --bench-dir "$BENCH_DIR" --out-dir "$OUT_DIR" "$@"
fi

install_tools

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$UPSTREAM_PORT" "$NGINX_PORT" "$TARGET_PORT" "$GEVENT_PORT" "$NOUSAGE_PORT" "$GUNI1_PORT" "$GUNI2_PORT" \
    "$LIMITS_PORT" "$NOMETRICS_PORT" "$TWIN_PORT" "$NOUSAGE_TWIN_PORT" \
    $([ -n "${CCM_BASE:-}" ] && echo "$BASE_PORT") \
    $(case ",$EXTRA," in *",ccm-redis,"*) echo "$REDIS_TARGET_PORT $REDIS_PORT" ;; esac); do
    if ! port_free "$p"; then
        echo "port $p is in use on 127.0.0.1 (set UPSTREAM_PORT, NGINX_PORT, TARGET_PORT, GEVENT_PORT," \
            "NOUSAGE_PORT, GUNI1_PORT, GUNI2_PORT, BASE_PORT, LIMITS_PORT, NOMETRICS_PORT, REDIS_TARGET_PORT, REDIS_PORT," \
            "TWIN_PORT, NOUSAGE_TWIN_PORT)" >&2
        exit 1
    fi
done

gen() {  # gen NAME PORT [--no-usage]
    "$PY" "$here/genconfig.py" --dir "$OUT_DIR" --name "$1" --port "$2" --upstream "$UPSTREAM_URL" "${@:3}" >/dev/null
}
gen ccm "$TARGET_PORT"
gen ccm-nousage "$NOUSAGE_PORT" --no-usage
gen ccm-limits "$LIMITS_PORT" --limits
gen ccm-twin "$TWIN_PORT"
gen ccm-nousage-twin "$NOUSAGE_TWIN_PORT" --no-usage
gen ccm-nometrics "$NOMETRICS_PORT"
gen gunicorn-w1 "$GUNI1_PORT"
gen gunicorn-w2 "$GUNI2_PORT"
[ -n "${CCM_BASE:-}" ] && gen ccm-base "$BASE_PORT"
gen ccm-redis "$REDIS_TARGET_PORT" --redis "redis://127.0.0.1:$REDIS_PORT/0"

pids=()
cleanup() {
    local pid i
    for pid in "${pids[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    pids=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The extra targets start once the fake upstream (started by compare.sh) answers, so that nothing
# (ccm-wsgi's first token refresh, its quota poller) meets a closed port. `exec` keeps the PID.
wait_upstream='for i in $(seq 1 600); do curl -s -o /dev/null --max-time 1 "$UPSTREAM_URL/health" && break; sleep 0.1; done'
extra=()
start() {  # start NAME PORT COMMAND...
    local name="$1" port="$2"
    shift 2
    case ",$EXTRA," in *",$name,"*) ;; *) return 0 ;; esac
    (cd "${START_CWD:-$root}" && UPSTREAM_URL="$UPSTREAM_URL" exec bash -c "$wait_upstream; exec \"\$@\"" bash "$@") \
        >"$OUT_DIR/$name.log" 2>&1 &
    pids+=("$!")
    extra+=(--target "$name=http://127.0.0.1:$port,pid=$!")
}
start ccm-nousage "$NOUSAGE_PORT" "$PY" -m ccm_wsgi serve -c "$OUT_DIR/ccm-nousage.json"
start ccm-limits "$LIMITS_PORT" "$PY" -m ccm_wsgi serve -c "$OUT_DIR/ccm-limits.json"
start ccm-twin "$TWIN_PORT" "$PY" -m ccm_wsgi serve -c "$OUT_DIR/ccm-twin.json"
start ccm-nousage-twin "$NOUSAGE_TWIN_PORT" "$PY" -m ccm_wsgi serve -c "$OUT_DIR/ccm-nousage-twin.json"
CCM_METRICS=off start ccm-nometrics "$NOMETRICS_PORT" "$PY" -m ccm_wsgi serve -c "$OUT_DIR/ccm-nometrics.json"
start gevent "$GEVENT_PORT" "$PY" "$BENCH_DIR/minimal_gevent_proxy.py" --port "$GEVENT_PORT" --upstream "$UPSTREAM_URL"
gunicorn_cmd=("$(dirname "$PY")/gunicorn" -c "$root/conf/gunicorn.conf.py" ccm_wsgi.wsgi:app)
if [ -n "${CCM_BASE:-}" ]; then
    [ -d "$CCM_BASE/ccm_wsgi" ] || { echo "CCM_BASE=$CCM_BASE has no ccm_wsgi/ directory" >&2; exit 1; }
    # from its own directory: `python -m` puts the working directory first on sys.path
    EXTRA="$EXTRA,ccm-base" START_CWD="$(cd "$CCM_BASE" && pwd)" PYTHONPATH="$(cd "$CCM_BASE" && pwd)" \
        start ccm-base "$BASE_PORT" "$PY" -m ccm_wsgi serve -c "$OUT_DIR/ccm-base.json"
fi
case ",$EXTRA," in *",ccm-redis,"*)
    if have redis-server; then
        mkdir -p "$OUT_DIR/redis"
        redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$OUT_DIR/redis" --save "" --appendonly yes \
            --appendfsync everysec --logfile "$OUT_DIR/redis/redis.log" &
        pids+=("$!")
        start ccm-redis "$REDIS_TARGET_PORT" "$PY" -m ccm_wsgi serve -c "$OUT_DIR/ccm-redis.json"
    else
        echo "redis-server not installed: skipping the ccm-redis column" >&2
    fi ;;
esac
if [ -x "${gunicorn_cmd[0]}" ]; then
    CCM_CONFIG="$OUT_DIR/gunicorn-w1.json" CCM_WORKERS=1 start gunicorn-w1 "$GUNI1_PORT" "${gunicorn_cmd[@]}"
    CCM_CONFIG="$OUT_DIR/gunicorn-w2.json" CCM_WORKERS=2 start gunicorn-w2 "$GUNI2_PORT" "${gunicorn_cmd[@]}"
else
    echo "gunicorn not installed next to $PY: skipping the gunicorn columns" >&2
fi

if [ $# -gt 0 ]; then
    load_args=("$@")
elif [ "${QUICK:-}" = 1 ]; then
    load_args=(--phases nonstream,stream,hold --concurrency 16,64 --duration 2 --streams 100 --stream-rounds 2
               --hold-streams 500 --hold-ramp 1 --hold-seconds 4 --warmup 1 --repeat 1)
else
    load_args=(--phases nonstream,stream,hold --concurrency 16,64 --duration 4 --streams 100 --stream-rounds 3
               --hold-streams 2000 --hold-ramp 4 --hold-seconds 10 --warmup 2 --repeat 7)
fi

echo "results: $OUT_DIR" >&2
TARGET_NAME=ccm-wsgi PYTHON="$PY" UPSTREAM_ARGS="--strict-tokens ${UPSTREAM_ARGS:-}" TARGET_CWD="$root" \
    "$BENCH_DIR/compare.sh" 'exec "$PYTHON" -m ccm_wsgi serve -c "$OUT_DIR/ccm.json"' -- \
    "${extra[@]}" --ref2 gevent --api-key "$USER_TOKEN" "${load_args[@]}"
rc=$?
cleanup
json="$(ls -t "$OUT_DIR"/results-*.json 2>/dev/null | head -1)"
if [ -n "$json" ]; then
    "$PY" "$here/report.py" "$json" --out-dir "$OUT_DIR" | tee "$OUT_DIR/summary.md"
    if [ "${QUICK:-}" != 1 ] && [ "${TOGETHER:-1}" != 0 ] && have wrk && have taskset; then
        # usage tracking and limits once more, every compared server in the same windows on one core
        { printf '\n### Usage tracking and limits, measured together on one core (together.sh)\n\n```\n'
          OUT_DIR="$OUT_DIR/together" sh "$here/together.sh" 12 5
          printf '```\n'; } | tee -a "$OUT_DIR/summary.md"
    fi
fi
exit "$rc"
