#!/bin/sh
# Programs the tests run: real proxy servers for tests/test_outbounds.py and tests/test_detour.py (see
# tests/support/proxies.py): microsocks (SOCKS5 with user/password), tinyproxy (HTTP forwarding + CONNECT,
# Basic auth) and v2ray (SOCKS4/4a, and an HTTP proxy over TLS); strace (tests/test_atomic_writes.py);
# redis-server (tests/test_state*.py: shared state of several nodes, plain and TLS);
# unshare (util-linux: a private network namespace in tests/test_proxy.py) and chattr (e2fsprogs:
# tests/test_faults.py); chromium and chromium-driver (tests/test_status_page.py drives the status page in a
# headless browser). Idempotent, quiet, non-interactive: installs only what is missing, so it needs root (or
# password-less sudo) only then. None of these is started here; the tests run their own.
set -eu

have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

missing=""
have microsocks || missing="$missing microsocks"
have tinyproxy || missing="$missing tinyproxy"
have v2ray || missing="$missing v2ray"
have strace || missing="$missing strace"
have unshare || missing="$missing util-linux"
have chattr || missing="$missing e2fsprogs"
have ss || missing="$missing iproute2"
have node || missing="$missing nodejs npm"
have redis-server || missing="$missing redis-server"
have chromium || missing="$missing chromium"
have chromedriver || missing="$missing chromium-driver"
[ -z "$missing" ] && exit 0

sudo=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo -n"
    else
        echo "tests/install-system-deps.sh: root is needed to install:$missing" >&2
        exit 1
    fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "tests/install-system-deps.sh: apt-get failed for:$missing" >&2
    exit 1
fi
for program in microsocks tinyproxy v2ray strace unshare chattr ss node chromium chromedriver redis-server; do
    have "$program" || { echo "tests/install-system-deps.sh: $program still missing after apt-get" >&2; exit 1; }
done
