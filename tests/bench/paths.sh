# Sourced by every bench script (bash): the shell options they share and where things are.
set -uo pipefail
set -m
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$root/../shared/bench}"
PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
